"""A small N-D CNN classifier, channels-last ``[B, *spatial, C]``.

A VGG-style network (Simonyan & Zisserman 2015, "Very Deep Convolutional Networks for
Large-Scale Image Recognition") with normalisation (Ioffe & Szegedy 2015) and global average
pooling (Lin, Chen & Yan 2014, "Network In Network"). Its penultimate embedding serves as the
feature space for FID (Heusel et al. 2017) / KID (Bińkowski et al. 2018) on medical images,
where ImageNet Inception features are a poor fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.models.layers import ConvNormAct, DownSample

Array = jax.Array
Dtype = Any

__all__ = ["Classifier"]


class Classifier(nn.Module):
    """Small N-D CNN classifier with a feature embedding.

    Stage ``s`` applies two 3^d :class:`~medjax.models.layers.ConvNormAct` (ReLU) with
    ``features[s]`` channels; a 2x max-pool follows every stage but the last. Then global
    average pooling gives the embedding ``[B, features[-1]]``, optional dropout, and
    ``Dense(num_classes)``.

    Attributes:
      num_classes: number of logits.
      features: channels per stage.
      norm: ``'batch'``, ``'instance'``, ``'group'`` or ``'none'`` (see
        :class:`~medjax.models.layers.Norm`; with ``'batch'`` train with
        ``apply(..., train=True, mutable=['batch_stats'])``).
      dropout: dropout rate before the last dense layer (``train=True`` then needs
        ``rngs={'dropout': key}``).
      spatial_dims: 2 or 3.
      dtype: compute dtype (parameters, logits and features are float32).

    ``__call__(x [B, *spatial, C], *, train=False, return_features=False)`` -> logits
    ``[B, num_classes]``, or ``(logits, features [B, features[-1]])``. Every spatial size must
    be ``>= 2**(len(features) - 1)`` (``ValueError`` otherwise).
    """

    num_classes: int
    features: Sequence[int] = (32, 64, 128)
    norm: str = "batch"
    dropout: float = 0.0
    spatial_dims: int = 2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Array, *, train: bool = False, return_features: bool = False
    ) -> Array | tuple[Array, Array]:
        d = self.spatial_dims
        if x.ndim != d + 2:
            raise ValueError(f"expected [B, *{d} spatial, C] input, got shape {x.shape}")
        if not self.features:
            raise ValueError("features must have at least one stage")
        need = 2 ** (len(self.features) - 1)
        if min(x.shape[1:-1]) < need:
            raise ValueError(
                f"input shape {x.shape}: every spatial size must be >= {need} for "
                f"{len(self.features)} stages"
            )
        h = x.astype(self.dtype)
        for s, f in enumerate(self.features):
            if s > 0:
                h = DownSample("maxpool", spatial_dims=d, dtype=self.dtype, name=f"pool{s}")(h)
            for j in range(2):
                h = ConvNormAct(
                    f, 3, 1, d, self.norm, "relu", self.dtype, name=f"stage{s}_conv{j}"
                )(h, train=train)
        feats = jnp.mean(h.astype(jnp.float32), axis=tuple(range(1, d + 1)))
        h = feats.astype(self.dtype)
        if self.dropout > 0:
            h = nn.Dropout(self.dropout, deterministic=not train)(h)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(h)
        logits = logits.astype(jnp.float32)
        return (logits, feats) if return_features else logits
