"""PatchGAN discriminator, N-D (Isola, Zhu, Zhou & Efros 2017, "Image-to-Image Translation
with Conditional Adversarial Networks"; pytorch-CycleGAN-and-pix2pix's
``NLayerDiscriminator``).

The whole-image DCGAN discriminator is :class:`medjax.models.dcgan.DCGANDiscriminator`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.models.dcgan import spectral_normed
from medjax.models.generators import PaddedConv, conv_bias, gan_norm
from medjax.models.generators import leaky_relu_02 as leaky

Array = jax.Array
Dtype = Any

__all__ = ["PatchGAN", "patchgan_output_shape", "patchgan_receptive_field"]


def _patchgan_layers(num_layers: int) -> list[tuple[int, int]]:
    """``(kernel, stride)`` of every convolution; all have zero padding 1."""
    if num_layers < 1:
        raise ValueError(f"PatchGAN needs num_layers >= 1, got {num_layers}")
    return [(4, 2)] * num_layers + [(4, 1), (4, 1)]


def patchgan_receptive_field(num_layers: int) -> int:
    """Receptive field (input samples per axis) of one PatchGAN output cell.

    Walking back from one output cell: ``r <- (r - 1) * stride + kernel`` per layer. Gives 16,
    34, 70, 142, 286 for ``num_layers = 1 .. 5`` (pix2pix's "16x16", "70x70", "286x286"
    PatchGANs).
    """
    r = 1
    for k, s in reversed(_patchgan_layers(num_layers)):
        r = (r - 1) * s + k
    return r


def patchgan_output_shape(spatial: Sequence[int], num_layers: int = 3) -> tuple[int, ...]:
    """Patch-grid shape for an input of spatial shape ``spatial``.

    Each stride-2 kernel-4 padding-1 convolution maps ``n -> n // 2`` and each stride-1 one
    ``n -> n - 1`` (256 -> 128 -> 64 -> 32 -> 31 -> 30 for 3 layers). ``ValueError`` (naming
    the shape) when a size would drop below 1.
    """
    out = [int(s) for s in spatial]
    for k, s in _patchgan_layers(num_layers):
        out = [(n + 2 - k) // s + 1 if n + 2 >= k else 0 for n in out]
        if min(out) < 1:
            raise ValueError(
                f"input spatial shape {tuple(spatial)} is too small for a {num_layers}-layer "
                "PatchGAN"
            )
    return tuple(out)


class PatchGAN(nn.Module):
    """PatchGAN ("NLayerDiscriminator") of pix2pix/CycleGAN (Isola et al. 2017), N-D.

    Exactly the PyTorch architecture, with zero padding 1 on every convolution:

    * conv k4 s2 to ``features`` + LeakyReLU(0.2) (no norm);
    * for ``n = 1 .. num_layers - 1``: conv k4 s2 to ``features * min(2**n, 8)`` + norm +
      LeakyReLU(0.2);
    * conv k4 s1 to ``features * min(2**num_layers, 8)`` + norm + LeakyReLU(0.2);
    * conv k4 s1 to 1 channel (with bias).

    Each output cell classifies a ``patchgan_receptive_field(num_layers)``-wide input patch
    (70 for 3 layers). Convolutions have a bias exactly as in PyTorch: always on the first and
    last, otherwise only with ``'instance'`` (affine-free, as PyTorch's ``InstanceNorm2d``) or
    ``'none'``. The pix2pix discriminator (``input_nc=6``, i.e. condition and image
    concatenated on channels, ``features=64``, 3 layers, batch norm) has 2,768,705 parameters,
    as in PyTorch.

    Attributes:
      features: channels of the first convolution (``ndf``).
      num_layers: stride-2 convolutions (3: the 70x70 PatchGAN).
      norm: see :func:`~medjax.models.generators.gan_norm`: ``'batch'`` (pix2pix) or
        ``'instance'`` (CycleGAN).
      spectral_norm: wrap every convolution in :class:`flax.linen.SpectralNorm` (Miyato et al.
        2018); the power-iteration state is in the ``'batch_stats'`` collection and updated
        when ``train=True`` (see :func:`~medjax.models.dcgan.spectral_normed`).
      spatial_dims: 2 or 3.
      dtype: compute dtype.

    ``__call__(x [B, *spatial, C], *, train=False) -> [B, *patch_grid, 1]`` float32 logits,
    ``patch_grid = patchgan_output_shape(spatial, num_layers)`` (256x256 -> 30x30). With
    ``norm='batch'`` or ``spectral_norm=True`` train with
    ``apply(..., train=True, mutable=['batch_stats'])``.
    """

    features: int = 64
    num_layers: int = 3
    norm: str = "batch"
    spectral_norm: bool = False
    spatial_dims: int = 2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        d = self.spatial_dims
        if x.ndim != d + 2:
            raise ValueError(f"expected [B, *{d} spatial, C] input, got shape {x.shape}")
        patchgan_output_shape(x.shape[1:-1], self.num_layers)  # validates the size
        layers = _patchgan_layers(self.num_layers)
        last = len(layers) - 1
        h = x.astype(self.dtype)
        for i, (k, s) in enumerate(layers):
            f = 1 if i == last else self.features * min(2**i, 8)
            has_norm = 0 < i < last
            conv = PaddedConv(
                f,
                k,
                s,
                1,
                d,
                use_bias=not has_norm or conv_bias(self.norm),
                dtype=self.dtype,
                name=f"conv{i}",
            )
            h = spectral_normed(conv, h, enabled=self.spectral_norm, train=train, name=f"sn{i}")
            h = gan_norm(
                h,
                self.norm if has_norm else "none",  # 'none': the activation alone
                train=train,
                dtype=self.dtype,
                name=f"norm{i}",
                activation=leaky if i < last else None,
            )
        return h.astype(jnp.float32)
