"""Class-conditional DCGAN with a projection discriminator on MedMNIST: normal vs pneumonia chest
X-rays on demand (PneumoniaMNIST by default; `breast` for BreastMNIST malignant vs benign).

The DCGAN settings of `dcgan_medmnist` with the class fed to both networks (see
`medjax/train/tasks/conditional_gan.py`). Evaluation per class: SWD to that class's validation
images beside its real-vs-real floor and trivial baseline; with `--config.eval.classifier_workdir`
(a `classifier_medmnist` run of the same data) also how often the classifier calls a generated
image the class it was asked for, beside the classifier's accuracy on real images of the class.

    python scripts/train.py --config conditional_gan_medmnist --workdir runs/cgan \
        --config.eval.classifier_workdir=runs/cls
    python scripts/sample.py --workdir runs/cgan --num 16 --output samples/   # classes alternate

Arguments: `breast`, `64`, `lsgan` / `hinge`, `sn`, `ema`, `smoke` (as `dcgan_medmnist`).
"""

from medjax.configs import common, dcgan_medmnist

CLASS_NAMES = {"pneumonia": ("normal", "pneumonia"), "breast": ("malignant", "benign")}


def get_config(arg: str | None = None):
    c = dcgan_medmnist.get_config(arg, task="conditional_gan")
    c.data.num_classes = 2
    # PneumoniaMNIST is 10 % normal: draw class-balanced batches, or the minority class is
    # rarely seen by either network
    c.data.balance_classes = True
    c.data.class_names = CLASS_NAMES["breast" if "breast" in (arg or "") else "pneumonia"]
    if "smoke" in common.parse_arg(arg):
        c.data.max_examples = 0  # every image: the first few may all be of one class
    return c
