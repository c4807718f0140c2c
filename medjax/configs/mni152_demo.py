"""2D U-Net on the MNI152 template shipped inside the nilearn wheel: grey/white-matter segmentation.

The embedded default dataset of `make demo` (no download). Axial slices of the 1 mm ICBM 2009a T1
template, downsampled x2 to 99 x 117; labels from its grey/white-matter probability maps. Slices
80-99 are held out for validation, with 3 slices either side excluded from training.

    python scripts/train.py --config medjax/configs/mni152_demo.py --workdir runs/demo

Expect (2-core CPU, ~3-4 min): validation Dice grey matter ~0.9, white matter ~0.93.
"""

from medjax.configs import common


def get_config(arg: str | None = None):
    c = common.segmentation("mni152", num_classes=3)
    c.data.scale = 0.5
    c.data.val_slices = (80, 100)
    c.data.val_gap = 3
    c.model.features = (16, 32, 64, 128)
    c.batch_size = 8
    c.eval_batch_size = 10
    c.num_steps = 600
    c.log_every = 50
    c.eval_every = 200
    c.checkpoint_every = 200
    c.optimizer.learning_rate = 2e-3
    c.augment.rot90 = False  # non-square slices
    if "smoke" in common.parse_arg(arg):
        common.shrink_for_smoke(c)
        c.data.max_examples = 0
    return c
