"""One N-D U-Net for 2D and 3D segmentation.

U-Net: Ronneberger, Fischer & Brox 2015, "U-Net: Convolutional Networks for Biomedical Image
Segmentation"; 3D U-Net: Çiçek et al. 2016, "3D U-Net: Learning Dense Volumetric Segmentation
from Sparse Annotation"; optional residual blocks (He et al. 2016) and attention gates
(Oktay et al. 2018, "Attention U-Net").
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.models.layers import (
    ACTIVATIONS,
    AttentionGate,
    Conv,
    ConvNormAct,
    DownSample,
    ResidualBlock,
    UpSample,
    match_spatial,
)

Array = jax.Array
Dtype = Any

__all__ = ["UNet", "UNet2D", "UNet3D", "UNet2DSmall", "UNet3DSmall", "ConvBlock"]


class ConvBlock(nn.Module):
    """``num_convs`` :class:`ConvNormAct` layers, or one :class:`ResidualBlock`.

    Attributes:
      features: output channels.
      spatial_dims: number of spatial axes ``d``.
      norm: ``'instance'``, ``'group'``, ``'batch'`` or ``'none'``.
      activation: activation name.
      residual: use a :class:`ResidualBlock` with ``num_convs`` convolutions.
      num_convs: number of 3^d convolutions.
      dtype: compute dtype.
      fast: use the fast exact convolution formulations.

    Input ``[B, *spatial, Cin]`` -> output ``[B, *spatial, features]``.
    """

    features: int
    spatial_dims: int = 2
    norm: str = "instance"
    activation: str = "leaky_relu"
    residual: bool = False
    num_convs: int = 2
    dtype: Dtype = jnp.float32
    fast: bool = True

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        if self.residual:
            return ResidualBlock(
                self.features,
                3,
                1,
                self.spatial_dims,
                self.norm,
                self.activation,
                self.num_convs,
                self.dtype,
                self.fast,
                name="res",
            )(x, train=train)
        for i in range(self.num_convs):
            x = ConvNormAct(
                self.features,
                3,
                1,
                self.spatial_dims,
                self.norm,
                self.activation,
                self.dtype,
                self.fast,
                name=f"conv{i}",
            )(x, train=train)
        return x


class UNet(nn.Module):
    """N-D U-Net (Ronneberger et al. 2015; 3D: Çiçek et al. 2016), channels-last.

    Encoder level ``l`` applies a conv block with ``features[l]`` channels (after a 2x
    down-sampling for ``l > 0``); the decoder up-samples with a kernel-2 stride-2 transposed
    convolution to ``features[l]`` channels, aligns it to the skip connection (edge-pad or
    crop at the high end, as MONAI's ``BasicUNet``, so any input size works), optionally
    gates the skip with an :class:`~medjax.models.layers.AttentionGate` (Oktay et al. 2018),
    concatenates ``[skip, up]`` and applies a conv block with ``features[l]`` channels. A 1x1
    convolution (with bias) gives the logits.

    Attributes:
      num_classes: number of output channels (logits).
      features: channels per level, one entry per level (``len(features) - 1``
        down-samplings).
      spatial_dims: 2 or 3.
      norm: ``'instance'``, ``'group'``, ``'batch'`` or ``'none'``. With ``'batch'``, call
        ``apply(variables, x, train=True, mutable=['batch_stats'])`` when training.
      activation: ``'relu'``, ``'leaky_relu'``, ``'gelu'``, ``'silu'`` or ``'elu'``.
      residual: residual conv blocks (He et al. 2016) instead of plain ones.
      attention_gates: gate the skip connections (Oktay et al. 2018).
      convs_per_level: 3^d convolutions per block.
      downsample: ``'maxpool'`` (2x2 max-pool) or ``'conv'`` (stride-2 conv-norm-act).
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters are float32 and the logits are
        returned as float32.
      fast: use the fast exact convolution formulations (``False`` for the plain ops; same
        parameters, same function).

    ``__call__(x [B, *spatial, Cin], *, train=False) -> [B, *spatial, num_classes]`` float32,
    for any spatial size (each size must stay >= 1 after the down-samplings; with max-pooling
    that needs ``size >= 2^(len(features) - 1)``).
    """

    num_classes: int
    features: Sequence[int] = (32, 64, 128, 256, 512)
    spatial_dims: int = 2
    norm: str = "instance"
    activation: str = "leaky_relu"
    residual: bool = False
    attention_gates: bool = False
    convs_per_level: int = 2
    downsample: str = "maxpool"
    dtype: Dtype = jnp.float32
    fast: bool = True

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        d = self.spatial_dims
        if x.ndim != d + 2:
            raise ValueError(f"expected [B, *{d} spatial, C] input, got shape {x.shape}")
        if self.activation not in ACTIVATIONS or self.activation == "none":
            raise ValueError(f"unsupported activation {self.activation!r}")
        feats = tuple(self.features)
        if not feats:
            raise ValueError("features must have at least one level")
        block = partial(
            ConvBlock,
            spatial_dims=d,
            norm=self.norm,
            activation=self.activation,
            residual=self.residual,
            num_convs=self.convs_per_level,
            dtype=self.dtype,
            fast=self.fast,
        )
        x = x.astype(self.dtype)

        skips = []
        for level, f in enumerate(feats):
            if level > 0:
                x = DownSample(
                    self.downsample,
                    None,
                    d,
                    self.norm,
                    self.activation,
                    self.dtype,
                    self.fast,
                    name=f"down{level}",
                )(x, train=train)
                if min(x.shape[1:-1]) < 1:
                    raise ValueError("input too small for the number of down-samplings")
            x = block(f, name=f"enc{level}")(x, train=train)
            skips.append(x)

        x = skips.pop()
        for level in range(len(feats) - 2, -1, -1):
            skip = skips.pop()
            f = feats[level]
            up = UpSample(f, d, dtype=self.dtype, fast=self.fast, name=f"up{level}")(x)
            up = match_spatial(up, skip.shape[1:-1])
            if self.attention_gates:
                skip = AttentionGate(
                    None, d, self.norm, self.dtype, self.fast, name=f"gate{level}"
                )(skip, x, train=train)
            x = jnp.concatenate([skip, up], axis=-1)
            x = block(f, name=f"dec{level}")(x, train=train)

        logits = Conv(self.num_classes, 1, 1, d, True, self.dtype, self.fast, name="head")(x)
        return logits.astype(jnp.float32)


UNet2D = partial(UNet, spatial_dims=2)
"""2D U-Net preset, features (32, 64, 128, 256, 512)."""

UNet3D = partial(UNet, spatial_dims=3)
"""3D U-Net preset, features (32, 64, 128, 256, 512)."""

UNet2DSmall = partial(UNet, spatial_dims=2, features=(16, 32, 64, 128))
"""Small 2D U-Net preset, features (16, 32, 64, 128)."""

UNet3DSmall = partial(UNet, spatial_dims=3, features=(16, 32, 64, 128))
"""Small 3D U-Net preset, features (16, 32, 64, 128)."""
