"""CycleGAN (Zhu et al. 2017): unpaired FLAIR <-> T1c on 2D axial BraTS slices (128x128).

The pairing is discarded for training (FLAIR from one random half of the training slices, T1c
from the other half) and used only for evaluation: validation slices translated FLAIR -> T1c
(`*_ab`) and T1c -> FLAIR (`*_ba`) are scored with MAE, PSNR and SSIM inside the brain mask,
beside the identity baseline (`*_identity`). ResNet generators with 6 blocks (the paper's choice
below 256 px), 70x70 PatchGANs with instance norm, LSGAN loss, cycle weight 10, identity 0.5,
pool of 50, learning rate constant for half the steps then linearly to 0.

    python scripts/train.py --config medjax/configs/cyclegan_brats.py --workdir runs/cyclegan_brats
"""

from medjax.configs import common
from medjax.configs.pix2pix_brats import brats_slices


def cyclegan(c, args: set[str], *, features: int = 64, num_blocks: int = 6, dims: int = 2):
    """The paper's CycleGAN settings on `c` (a `common.gan("cyclegan")` config): ResNet
    generators, 70x70 PatchGANs (2 layers in 3D), instance norm, LSGAN, cycle 10, identity 0.5,
    pool 50, linear decay over the second half; `smoke` in `args` shrinks everything."""
    c.model.spatial_dims = dims
    c.model.generator.features = features
    c.model.generator.num_blocks = num_blocks
    c.model.generator.norm = "instance"
    c.model.discriminator.features = features
    c.model.discriminator.num_layers = 3 if dims == 2 else 2
    c.model.discriminator.norm = "instance"
    c.model.discriminator.spectral_norm = False
    c.loss.kind = "lsgan"
    c.loss.cycle_weight = 10.0
    c.loss.identity_weight = 0.5
    c.pool_size = 50
    c.num_steps = 2000
    c.num_pictures = 4
    for opt in (c.optimizer_g, c.optimizer_d):
        opt.schedule = "linear_decay"
        opt.decay_start = c.num_steps // 2
    if "smoke" in args:
        common.shrink_gan_for_smoke(c)
        c.data.image_size = (16,) * dims if dims == 3 else (32, 32)
        c.model.generator.features = 8
        c.model.generator.num_blocks = 2
        c.model.discriminator.features = 8
        c.model.discriminator.num_layers = 2
        c.pool_size = 3
        for opt in (c.optimizer_g, c.optimizer_d):
            opt.decay_start = 2
    return c


def get_config(arg: str | None = None):
    args = common.parse_arg(arg)
    c = brats_slices(common.gan("cyclegan"))
    c.data.domain_a = "flair"
    c.data.domain_b = "t1ce"
    c.batch_size = 4
    c.eval_batch_size = 16
    return cyclegan(c, args)
