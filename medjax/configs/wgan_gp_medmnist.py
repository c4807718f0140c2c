"""WGAN-GP (Gulrajani et al. 2017) on MedMNIST images: PneumoniaMNIST by default.

The DCGAN generator, a critic without batch norm, gradient penalty weight 10, 5 critic updates per
generator update inside one compiled step, Adam(1e-4, b1=0.0, b2=0.9). `batch_size` counts every
real image of one step: 5 critic batches of 64. Arguments as in `dcgan_medmnist` (`breast`,
`64`, `ema`, `smoke`).

    python scripts/train.py --config medjax/configs/wgan_gp_medmnist.py \\
        --workdir runs/wgan_pneumonia
"""

from medjax.configs import common, dcgan_medmnist


def get_config(arg: str | None = None):
    c = dcgan_medmnist.get_config(arg, task="wgan_gp")
    args = common.parse_arg(arg)
    c.loss.kind = "wasserstein"
    c.loss.gp_weight = 10.0
    c.n_critic = 5
    c.model.discriminator.norm = "none"
    c.model.discriminator.spectral_norm = False
    c.optimizer_g = common._adam(1e-4, 0.0, 0.9)
    c.optimizer_d = common._adam(1e-4, 0.0, 0.9)
    c.batch_size = 5 * 64
    c.num_steps = 2000
    if "smoke" in args:
        common.shrink_gan_for_smoke(c)
        c.batch_size = 2 * c.n_critic
    return c
