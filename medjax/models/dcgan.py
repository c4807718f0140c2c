"""DCGAN generator and discriminator, N-D (Radford, Metz & Chintala 2016, "Unsupervised
Representation Learning with Deep Convolutional Generative Adversarial Networks").

Channels-last ``[B, *spatial, C]``; the same code builds 2D and 3D models from
``spatial_dims``. The discriminator doubles as a WGAN-GP critic (Gulrajani et al. 2017,
"Improved Training of Wasserstein GANs") with ``norm='layer'`` or ``'none'``, and as an
SN-GAN discriminator (Miyato et al. 2018, "Spectral Normalization for Generative Adversarial
Networks") with ``spectral_norm=True``.

With ``num_classes > 0`` both are class-conditional: the generator concatenates a learned class
embedding to ``z`` (the conditional GAN of Mirza & Osindero 2014, "Conditional Generative
Adversarial Nets"), and the discriminator adds the projection term ``<embed(y), phi(x)>`` of
Miyato & Koyama 2018 ("cGANs with Projection Discriminator"), ``phi(x)`` its last features
summed over the spatial positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax.models.generators import conv_bias, gan_norm
from medjax.models.generators import leaky_relu_02 as leaky
from medjax.models.layers import Conv, ConvTranspose4, StridedConv4

Array = jax.Array
Dtype = Any

__all__ = [
    "GENERATOR_HEADS",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "dcgan_num_upsamples",
    "spectral_normed",
]


def dcgan_num_upsamples(output_shape: Sequence[int]) -> int:
    """Number of 2x up-samplings that keeps every base size an integer ``>= 4``.

    E.g. ``(28, 28) -> 2`` (base 7), ``(64, 64) -> 4`` (base 4), ``(32, 32, 32) -> 3``,
    ``(6, 6) -> 0``.
    """
    n, sizes = 0, [int(s) for s in output_shape]
    while all(s % 2 == 0 and s // 2 >= 4 for s in sizes):
        sizes = [s // 2 for s in sizes]
        n += 1
    return n


def spectral_normed(
    layer: nn.Module, x: Array, *, enabled: bool, train: bool, name: str | None = None
) -> Array:
    """Applies ``layer`` to ``x``, through :class:`flax.linen.SpectralNorm` when ``enabled``.

    Spectral normalisation (Miyato et al. 2018) divides every weight matrix (kernels reshaped
    to ``[-1, Cout]``) by its largest singular value, estimated by one power-iteration step
    per call. The power-iteration vector ``u`` and the estimate ``sigma`` live in the
    ``'batch_stats'`` collection (as ``<layer name>/kernel/u`` and ``.../sigma`` under the
    wrapper's name) and are updated when ``train=True`` (``update_stats=train``), so train
    with ``apply(..., train=True, mutable=['batch_stats'])``. Must be called inside a compact
    method.
    """
    if enabled:
        return nn.SpectralNorm(layer, name=name)(x, update_stats=train)
    return layer(x)


# DCGANGenerator's output layers (see its `head` attribute).
GENERATOR_HEADS = ("conv", "transpose")


class DCGANGenerator(nn.Module):
    """DCGAN generator (Radford et al. 2016), N-D.

    ``z -> Dense -> reshape to the base grid [*output_shape / 2**num_upsamples,
    base_features] -> norm + ReLU -> num_upsamples x (ConvTranspose4 (kernel 4, stride 2,
    exact 2x) + norm + ReLU) -> 3^d conv to channels -> tanh`` (``head='conv'``), or, as in
    the paper and the canonical PyTorch DCGAN, with the last up-sampling as the output layer:
    ``... -> (num_upsamples - 1) x (ConvTranspose4 + norm + ReLU) -> ConvTranspose4 to
    channels -> tanh`` (``head='transpose'``). Up-sampling step ``i`` (from 1) has
    ``max(base_features // 2**i, min_features)`` channels. Layers followed by a norm with a
    learned shift have no bias (:func:`~medjax.models.generators.conv_bias`).

    Attributes:
      output_shape: spatial output shape, ``spatial_dims`` ints (e.g. ``(28, 28)``,
        ``(64, 64)``, ``(32, 32, 32)``).
      channels: output channels.
      latent_dim: size of ``z``.
      base_features: channels at the lowest resolution.
      min_features: floor of the channel halving.
      num_upsamples: 2x up-samplings; ``None``: :func:`dcgan_num_upsamples` (as many as keep
        the base size an integer >= 4: 28 -> 7 (2), 64 -> 4 (4)).
      norm: see :func:`~medjax.models.generators.gan_norm` (DCGAN: ``'batch'``; call
        ``apply(..., train=True, mutable=['batch_stats'])`` when training).
      head: ``'conv'``: a stride-1 3^d convolution to ``channels`` after the last up-sampling
        stage; ``'transpose'``: the last up-sampling stage is the output layer, a kernel-4
        transposed convolution to ``channels`` with a bias and no norm (Radford et al. 2016;
        pytorch/examples ``dcgan``), one layer and one full-resolution feature map fewer.
      spatial_dims: 2 or 3.
      num_classes: > 0 makes the generator class-conditional: ``y`` picks a learned
        ``latent_dim``-vector that is concatenated to ``z``.
      dtype: compute dtype (parameters float32; tanh and the output in float32).

    ``__call__(z [B, latent_dim], y [B] int (conditional only), *, train=False) ->
    [B, *output_shape, channels]`` float32 in ``(-1, 1)``. ``ValueError`` when ``output_shape``
    is not divisible by ``2**num_upsamples`` or has the wrong length, when ``head`` is unknown
    (or ``'transpose'`` with no up-sampling), or when ``y`` is missing (conditional) or given
    (unconditional).
    """

    output_shape: Sequence[int]
    channels: int = 1
    latent_dim: int = 128
    base_features: int = 256
    min_features: int = 32
    num_upsamples: int | None = None
    norm: str = "batch"
    head: str = "conv"
    spatial_dims: int = 2
    num_classes: int = 0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: Array, y: Array | None = None, *, train: bool = False) -> Array:
        d = self.spatial_dims
        shape = tuple(int(s) for s in self.output_shape)
        if len(shape) != d:
            raise ValueError(f"output_shape {shape} must have spatial_dims={d} entries")
        n = dcgan_num_upsamples(shape) if self.num_upsamples is None else self.num_upsamples
        if n < 0 or any(s % 2**n for s in shape):
            raise ValueError(f"output_shape {shape} is not divisible by 2**num_upsamples = {2**n}")
        if self.head not in GENERATOR_HEADS:
            raise ValueError(f"unknown generator head {self.head!r}; use one of {GENERATOR_HEADS}")
        if self.head == "transpose" and n < 1:
            raise ValueError("head='transpose' needs num_upsamples >= 1 (it is the last one)")
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"expected z of shape [B, {self.latent_dim}], got {z.shape}")
        base = tuple(s // 2**n for s in shape)
        bias = conv_bias(self.norm)
        h = z.astype(self.dtype)
        if self.num_classes:
            if y is None:
                raise ValueError("a class-conditional generator needs labels y [B]")
            emb = nn.Embed(self.num_classes, self.latent_dim, dtype=self.dtype, name="embed")(y)
            h = jnp.concatenate([h, emb.astype(self.dtype)], -1)
        elif y is not None:
            raise ValueError("labels y given to an unconditional generator (num_classes=0)")

        h = nn.Dense(
            int(np.prod(base)) * self.base_features, use_bias=bias, dtype=self.dtype, name="fc"
        )(h)
        h = h.reshape((z.shape[0],) + base + (self.base_features,))
        h = gan_norm(
            h, self.norm, train=train, dtype=self.dtype, name="fc_norm", activation=nn.relu
        )
        stages = n if self.head == "conv" else n - 1
        for i in range(1, stages + 1):
            f = max(self.base_features // 2**i, self.min_features)
            h = ConvTranspose4(f, d, use_bias=bias, dtype=self.dtype, name=f"up{i}")(h)
            h = gan_norm(
                h, self.norm, train=train, dtype=self.dtype, name=f"up_norm{i}", activation=nn.relu
            )
        if self.head == "conv":
            h = Conv(self.channels, 3, 1, d, use_bias=True, dtype=self.dtype, name="conv_out")(h)
        else:
            h = ConvTranspose4(self.channels, d, use_bias=True, dtype=self.dtype, name="up_out")(h)
        return jnp.tanh(h.astype(jnp.float32))


class DCGANDiscriminator(nn.Module):
    """DCGAN discriminator / WGAN critic (Radford et al. 2016), N-D.

    ``len(features)`` x (:class:`~medjax.models.layers.StridedConv4` (kernel 4, stride 2,
    'SAME': sizes ceil-halved) + norm (not on the first) + LeakyReLU(0.2)), then flatten ->
    ``Dense(1)``.

    Attributes:
      features: channels of each stride-2 convolution.
      norm: see :func:`~medjax.models.generators.gan_norm`: ``'batch'`` (DCGAN), or
        ``'layer'`` / ``'none'`` for a WGAN-GP critic (the gradient penalty is per example,
        which batch norm breaks).
      spectral_norm: wrap every convolution and the final dense layer in
        :class:`flax.linen.SpectralNorm` (Miyato et al. 2018); the power-iteration state is
        in the ``'batch_stats'`` collection and updated when ``train=True`` (see
        :func:`spectral_normed`).
      spatial_dims: 2 or 3.
      num_classes: > 0 adds the projection term ``<V y, phi(x)>`` (Miyato & Koyama 2018):
        ``V`` a learned ``[num_classes, features[-1]]`` embedding, ``phi(x)`` the last
        features summed over the spatial positions.
      dtype: compute dtype.

    ``__call__(x [B, *spatial, C], y [B] int (conditional only), *, train=False) -> [B]``
    float32 logits. With ``norm='batch'`` or ``spectral_norm=True`` train with
    ``apply(..., train=True, mutable=['batch_stats'])``.
    """

    features: Sequence[int] = (64, 128, 256)
    norm: str = "batch"
    spectral_norm: bool = False
    spatial_dims: int = 2
    num_classes: int = 0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, y: Array | None = None, *, train: bool = False) -> Array:
        d = self.spatial_dims
        if x.ndim != d + 2:
            raise ValueError(f"expected [B, *{d} spatial, C] input, got shape {x.shape}")
        if not self.features:
            raise ValueError("features must have at least one entry")
        h = x.astype(self.dtype)
        for i, f in enumerate(self.features):
            conv = StridedConv4(
                f, d, use_bias=i == 0 or conv_bias(self.norm), dtype=self.dtype, name=f"conv{i}"
            )
            h = spectral_normed(conv, h, enabled=self.spectral_norm, train=train, name=f"sn{i}")
            norm = self.norm if i > 0 else "none"  # 'none': the activation alone
            h = gan_norm(h, norm, train=train, dtype=self.dtype, name=f"norm{i}", activation=leaky)
        phi = jnp.sum(h.astype(jnp.float32), axis=tuple(range(1, d + 1)))  # [B, features[-1]]
        h = h.reshape(h.shape[0], -1)
        fc = nn.Dense(1, dtype=self.dtype, name="fc")
        logits = spectral_normed(fc, h, enabled=self.spectral_norm, train=train, name="sn_fc")
        logits = logits[:, 0].astype(jnp.float32)
        if self.num_classes:
            if y is None:
                raise ValueError("a projection discriminator needs labels y [B]")
            v = nn.Embed(self.num_classes, phi.shape[-1], name="embed")(y)
            logits = logits + jnp.sum(v.astype(jnp.float32) * phi, axis=-1)
        elif y is not None:
            raise ValueError("labels y given to an unconditional discriminator (num_classes=0)")
        return logits
