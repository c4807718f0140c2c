"""Pix2Pix on the co-registered TCIA Brain-Tumor-Progression exam: T1 (pre-contrast) -> T2.

`flair`: T1 -> FLAIR; `t1post`: T1 -> T1 post-contrast. One exam of 24 slices (320x260, resized
to 128x128): slices 14-17 are held out for validation, the rest train. Far too little data for a
generalising model: it shows the pipeline on DICOM input, and its validation numbers are to be
read beside the identity and mean-image baselines it prints.

    python scripts/train.py --config medjax/configs/pix2pix_tcia.py --workdir runs/pix2pix_tcia
"""

from medjax.configs import common
from medjax.configs.pix2pix_brats import pix2pix


def get_config(arg: str | None = None):
    args = common.parse_arg(arg)
    c = pix2pix(common.gan("pix2pix"), num_downs=7)
    c.data.source = "tcia"
    c.data.shared_folder = "brain_tumor_progression_pgbm001"
    c.data.image_size = (128, 128)
    target = "flair" if "flair" in args else "t1post" if "t1post" in args else "t2"
    c.data.source_modalities = ("t1pre",)
    c.data.target_modalities = (target,)
    c.data.val_slices = (14, 18)
    c.batch_size = 4
    c.eval_batch_size = 4
    c.num_steps = 1000
    c.best_metric = "mae"
    c.best_mode = "min"
    if "smoke" in args:
        common.shrink_gan_for_smoke(c)
        c.data.image_size = (32, 32)
        c.data.val_slices = (6, 8)
        c.model.generator.num_downs = 5
        c.model.generator.features = 8
        c.model.discriminator.features = 8
        c.model.discriminator.num_layers = 2
    return c
