"""DCGAN (Radford et al. 2016) on MedMNIST images: PneumoniaMNIST chest X-rays by default.

Arguments (comma separated): `breast` (BreastMNIST ultrasound instead), `64` (images upsampled
to 64x64, one more generator stage), `lsgan` / `hinge` (loss), `sn` (spectral norm in D), `ema`
(EMA generator for samples), `smoke`.

    python scripts/train.py --config medjax/configs/dcgan_medmnist.py --workdir runs/dcgan_pneumonia
    python scripts/train.py --config medjax/configs/dcgan_medmnist.py:breast,64 \\
        --workdir runs/dcgan_breast64
    python scripts/sample.py --workdir runs/dcgan_pneumonia --num 64 --output samples/

Evaluation: sliced Wasserstein distance (Laplacian-pyramid patches) of generated vs validation
images beside the real-vs-real value (`swd_mean_real`); with `--config.eval.classifier_workdir`
(a `classifier_medmnist` run on the same data) also FID and KID on its features.
"""

from medjax.configs import common

FOLDERS = {"pneumonia": "medmnist_pneumoniamnist", "breast": "medmnist_breastmnist"}


def get_config(arg: str | None = None, task: str = "dcgan"):
    args = common.parse_arg(arg)
    c = common.gan(task)
    c.data.source = "medmnist"
    c.data.shared_folder = FOLDERS["breast" if "breast" in args else "pneumonia"]
    c.data.image_size = (64, 64) if "64" in args else (28, 28)
    c.data.channels = 1
    c.model.generator.latent_dim = 100
    c.model.generator.base_features = 256
    c.model.generator.norm = "batch"
    c.model.generator.head = "conv"  # "transpose": the paper's output layer (DCGANGenerator)
    c.model.discriminator.features = (64, 128, 256) if "64" not in args else (64, 128, 256, 512)
    c.model.discriminator.norm = "batch"
    c.model.discriminator.spectral_norm = "sn" in args
    c.loss.kind = "lsgan" if "lsgan" in args else "hinge" if "hinge" in args else "non_saturating"
    c.ema_decay = 0.999 if "ema" in args else 0.0
    c.batch_size = 64
    c.num_steps = 3000
    if "smoke" in args:
        common.shrink_gan_for_smoke(c)
        c.model.generator.base_features = 16
        c.model.discriminator.features = (8, 16)
    return c
