"""Unconditional image generation with a DCGAN (Radford et al. 2016, arXiv:1511.06434).

Defaults follow the paper: a transposed-convolution generator with batch norm and ReLU (tanh
output), a strided-convolution discriminator with LeakyReLU(0.2), Adam(2e-4, b1=0.5), the
non-saturating loss. `config.loss.kind` switches to LSGAN (Mao et al. 2017) or hinge (Lim & Ye
2017); `model.discriminator.spectral_norm` adds spectral normalisation (Miyato et al. 2018);
`ema_decay > 0` keeps an exponential moving average of the generator, used for samples and
evaluation. The models are N-D: `model.spatial_dims=3` with a 3-D `data.image_size` generates
volumes (shown as slice montages).

Data: any folder of images (`data.source="folder"`, 2D files or 3D NIfTI), MedMNIST, a folder per
class, BraTS slices or 3D brain patches (`medjax.data.image_sets.load_gan_images`).
Evaluation: SWD (and FID / KID on medjax's own classifier) beside the real-vs-real floor and
the trivial per-pixel Gaussian generator; see `medjax.train.gan.LatentGAN`.
"""

from __future__ import annotations

from medjax.train import gan


class Task(gan.LatentGAN):
    """DCGAN generator and discriminator over one real image set (see `gan.LatentGAN`)."""
