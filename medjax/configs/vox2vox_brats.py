"""3D pix2pix (Vox2Vox, Cirillo et al. 2020) on whole BraTS volumes, trained on 3D patches.

Default: FLAIR -> T1c synthesis (L1 weight 100), scored on the whole validation volumes by
Gaussian-blended sliding window with MAE, PSNR and SSIM inside the brain mask beside the identity
and mean baselines. `seg`: segmentation as translation (FLAIR + T1c -> BraTS classes; Dice + CE
reconstruction term, scored by Dice and sensitivity per region WT / TC / ET). Volumes are scaled
to [-1, 1] in the brain mask, cropped to the brain and resampled to 2 mm so a CPU can train them;
on a GPU use `--config.data.spacing="()"` and 128^3 patches.

    python scripts/train.py --config medjax/configs/vox2vox_brats.py --workdir runs/vox2vox_synth
    python scripts/train.py --config medjax/configs/vox2vox_brats.py:seg --workdir runs/vox2vox_seg
"""

import ml_collections

from medjax.configs import common
from medjax.configs.pix2pix_brats import pix2pix


def get_config(arg: str | None = None):
    args = common.parse_arg(arg)
    c = pix2pix(common.gan("pix2pix"), num_downs=4, features=16)
    c.model.spatial_dims = 3
    c.model.generator.norm = "instance"
    c.model.discriminator.norm = "instance"
    c.model.discriminator.features = 16
    common.brats_folders(c.data, "brats_volumes")
    c.data.spacing = (2.0, 2.0, 2.0)
    c.data.crop_margin = 4
    c.data.fg_fraction = 0.5
    if "seg" in args:
        c.target = "label"
        c.data.source_modalities = ("flair", "t1ce")
        c.data.target_modalities = ()
        c.loss.recon_weight = 10.0
        c.best_metric = "dice_mean"
        c.best_mode = "max"
    else:
        c.data.source_modalities = ("flair",)
        c.data.target_modalities = ("t1ce",)
        c.best_metric = "mae"
        c.best_mode = "min"
    c.patch_size = (48, 48, 48)
    c.batch_size = 2
    c.eval_batch_size = 1
    c.num_steps = 600
    c.eval_every = 200
    c.sample_every = 0
    c.checkpoint_every = 100
    c.num_pictures = 2
    c.inference = ml_collections.ConfigDict()
    c.inference.window = ()
    c.inference.overlap = 0.5
    c.inference.window_batch = 2
    c.inference.sigma_scale = 0.125
    c.inference.mode = "gaussian"
    if "smoke" in args:
        common.shrink_gan_for_smoke(c)
        c.data.max_examples = 1
        c.data.spacing = (6.0, 6.0, 6.0)
        c.patch_size = (16, 16, 16)
        c.model.generator.num_downs = 2
        c.model.generator.features = 4
        c.model.discriminator.features = 4
        c.model.discriminator.num_layers = 1
        c.sample_every = 0
    return c
