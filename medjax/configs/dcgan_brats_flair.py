"""DCGAN on 2D BraTS FLAIR slices (64x64, axial brain slices of the training cases).

    python scripts/train.py --config medjax/configs/dcgan_brats_flair.py --workdir runs/dcgan_flair

`wgan` switches to WGAN-GP (task `wgan_gp`, norm-free critic, n_critic 5); `smoke` shrinks it.
Validation images are the slices of the validation cases.
"""

from medjax.configs import common


def get_config(arg: str | None = None):
    args = common.parse_arg(arg)
    wgan = "wgan" in args
    c = common.gan("wgan_gp" if wgan else "dcgan")
    common.brats_folders(c.data, "brats_flair")
    c.data.modalities = ("flair",)
    c.data.image_size = (64, 64)
    c.data.channels = 1
    c.model.generator.latent_dim = 100
    c.model.generator.base_features = 256
    c.model.generator.norm = "batch"
    c.model.generator.head = "conv"  # "transpose": the paper's output layer (DCGANGenerator)
    c.model.discriminator.features = (64, 128, 256, 512)
    c.model.discriminator.norm = "none" if wgan else "batch"
    c.model.discriminator.spectral_norm = False
    c.loss.kind = "wasserstein" if wgan else "non_saturating"
    c.batch_size = 32
    c.num_steps = 3000
    if wgan:
        c.loss.gp_weight = 10.0
        c.n_critic = 5
        c.batch_size = 5 * 32
        c.optimizer_g = common._adam(1e-4, 0.0, 0.9)
        c.optimizer_d = common._adam(1e-4, 0.0, 0.9)
    if "smoke" in args:
        common.shrink_gan_for_smoke(c)
        c.model.generator.base_features = 16
        c.model.discriminator.features = (8, 16)
        c.data.image_size = (32, 32)
        if wgan:
            c.batch_size = 2 * c.n_critic
    return c
