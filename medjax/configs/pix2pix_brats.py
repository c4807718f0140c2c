"""Pix2Pix (Isola et al. 2017): FLAIR -> T1c synthesis on 2D axial BraTS slices (128x128).

Slices of the training cases (brain >= 20 % of the slice), each case scaled to [-1, 1] inside its
brain mask, cropped to the brain and resized to 128x128. U-Net generator (7 downsamplings for
128 px), 70x70 PatchGAN on (FLAIR, T1c) pairs, L1 weight 100, Adam(2e-4, 0.5), batch 1 as in the
paper is slow on a CPU: batch 8 here. Evaluation on the validation cases' slices: MAE, PSNR, SSIM
inside the brain mask, beside the identity (FLAIR itself) and mean-image baselines.

    python scripts/train.py --config medjax/configs/pix2pix_brats.py --workdir runs/pix2pix_brats

Arguments: `t1ce2flair` reverses the direction; `smoke`.
"""

from medjax.configs import common


def brats_slices(c, size=(128, 128)):
    common.brats_folders(c.data, "brats_slices")
    c.data.image_size = size
    return c


def pix2pix(c, num_downs: int, features: int = 64):
    c.target = "image"
    c.loss.kind = "non_saturating"
    c.loss.recon_weight = 100.0
    c.model.spatial_dims = 2
    c.model.generator.features = features
    c.model.generator.max_features = 512  # channel cap (ngf * 8)
    c.model.generator.num_downs = num_downs
    c.model.generator.norm = "batch"
    c.model.generator.dropout = 0.5
    c.model.discriminator.features = features
    c.model.discriminator.num_layers = 3
    c.model.discriminator.norm = "batch"
    c.model.discriminator.spectral_norm = False
    c.num_pictures = 4
    return c


def get_config(arg: str | None = None):
    args = common.parse_arg(arg)
    c = pix2pix(brats_slices(common.gan("pix2pix")), num_downs=7)
    c.data.source_modalities = ("t1ce",) if "t1ce2flair" in args else ("flair",)
    c.data.target_modalities = ("flair",) if "t1ce2flair" in args else ("t1ce",)
    c.batch_size = 8
    c.eval_batch_size = 16
    c.num_steps = 2000
    c.best_metric = "mae"
    c.best_mode = "min"
    if "smoke" in args:
        common.shrink_gan_for_smoke(c)
        c.data.image_size = (32, 32)
        c.model.generator.num_downs = 5
        c.model.generator.features = 8
        c.model.discriminator.features = 8
        c.model.discriminator.num_layers = 2
    return c
