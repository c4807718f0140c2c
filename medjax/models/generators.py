"""Image-to-image GAN generators, N-D, channels-last ``[B, *spatial, C]``.

* :class:`ResnetGenerator`: Johnson, Alahi & Fei-Fei 2016, "Perceptual Losses for Real-Time
  Style Transfer and Super-Resolution", as used by CycleGAN (Zhu, Park, Isola & Efros 2017,
  "Unpaired Image-to-Image Translation using Cycle-Consistent Adversarial Networks").
* :class:`UNetGenerator`: the pix2pix generator (Isola, Zhu, Zhou & Efros 2017, "Image-to-Image
  Translation with Conditional Adversarial Networks").

Both follow the reference PyTorch code (``junyanz/pytorch-CycleGAN-and-pix2pix``), whose
conventions the shared blocks below reproduce: ``'instance'`` normalisation is
*affine-free* (``InstanceNorm2d(affine=False)``), and a convolution has a bias exactly when it
is not followed by a normalisation with a learned shift (``norm in ('none', 'instance')``).

Shared GAN building blocks used by :mod:`medjax.models.dcgan` and
:mod:`medjax.models.discriminators` also live here: :func:`gan_norm`, :class:`PaddedConv`,
:func:`reflect_pad` and :func:`conv_bias`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from medjax.models.layers import (
    ConvTranspose4,
    InstanceNorm,
    Norm,
    StridedConv4,
    conv_nd,
    default_kernel_init,
    linear_with_transpose,
)

Array = jax.Array
Dtype = Any

__all__ = [
    "GAN_NORMS",
    "PaddedConv",
    "ResnetBlock",
    "ResnetGenerator",
    "UNetGenerator",
    "conv_bias",
    "gan_norm",
    "reflect_pad",
]

GAN_NORMS = ("batch", "instance", "layer", "group", "none")


# --------------------------------------------------------------------------------------
# Shared GAN building blocks
# --------------------------------------------------------------------------------------


def conv_bias(norm: str) -> bool:
    """Whether a convolution followed by normalisation ``norm`` gets a bias.

    As in pytorch-CycleGAN-and-pix2pix: no bias before batch/layer/group norm (their learned
    shift makes it redundant), a bias before the affine-free instance norm and without norm.
    """
    return norm in ("none", "instance")


def leaky_relu_02(x: Array) -> Array:
    """LeakyReLU with negative slope 0.2, the activation of the DCGAN and PatchGAN
    discriminators and of pix2pix's U-Net encoder."""
    return nn.leaky_relu(x, negative_slope=0.2)


def gan_norm(
    x: Array,
    kind: str,
    *,
    train: bool,
    dtype: Dtype = jnp.float32,
    name: str | None = None,
    activation: Callable[[Array], Array] | None = None,
) -> Array:
    """Normalisation for the GAN models, selected by name; call inside a compact method.

    * ``'batch'``: :class:`~medjax.models.layers.Norm` ``'batch'`` (Ioffe & Szegedy 2015;
      momentum 0.9 = PyTorch's 0.1, statistics in the ``'batch_stats'`` collection, running
      averages when ``train=False``).
    * ``'instance'``: affine-free instance norm (Ulyanov et al. 2016), statistics per sample
      and channel over all spatial axes, *no* learned scale/bias -- PyTorch's
      ``InstanceNorm2d`` default, as used by pix2pix/CycleGAN.
    * ``'layer'``: :class:`flax.linen.LayerNorm` (Ba et al. 2016) over channels *and* spatial
      axes per example, with a learned per-channel scale and bias (the batch-free choice for a
      WGAN-GP critic, Gulrajani et al. 2017).
    * ``'group'``: :class:`~medjax.models.layers.Norm` ``'group'`` (Wu & He 2018).
    * ``'none'``: identity.

    Args:
      x: ``[B, *spatial, C]``.
      kind: one of :data:`GAN_NORMS`.
      train: batch statistics (and their update) instead of running averages.
      dtype: compute dtype.
      name: submodule name (its parameters live under it).
      activation: an elementwise function applied after the norm (inside the instance norm's
        VJP for ``'instance'``: :func:`~medjax.models.layers.instance_norm`), or ``None``.

    Returns:
      ``[B, *spatial, C]``.
    """
    if kind in ("batch", "group"):
        return Norm(kind, dtype=dtype, name=name)(x, train=train, activation=activation)
    if kind == "instance":
        return InstanceNorm(dtype=dtype, use_scale=False, use_bias=False, name=name)(x, activation)
    if kind == "layer":
        x = nn.LayerNorm(
            dtype=dtype, reduction_axes=tuple(range(1, x.ndim)), feature_axes=-1, name=name
        )(x)
    elif kind != "none":
        raise ValueError(f"unknown norm {kind!r}; choose from {GAN_NORMS}")
    return x if activation is None else activation(x)


def reflect_pad(x: Array, pad: int) -> Array:
    """Reflection padding of every spatial axis of ``[B, *spatial, C]`` by ``pad`` on each side.

    Same as ``np.pad(mode='reflect')`` / PyTorch's ``ReflectionPad`` (the edge sample is not
    repeated). Like PyTorch, requires ``pad < size`` on every spatial axis.

    Returns:
      ``[B, *(spatial + 2 * pad), C]``.
    """
    sp = x.shape[1:-1]
    if any(pad >= s for s in sp):
        raise ValueError(
            f"reflection padding {pad} needs every spatial size > {pad}, got shape {x.shape}"
        )
    return _reflect_pad(x, pad)


def _reflect_pad_plain(x: Array, pad: int) -> Array:
    return jnp.pad(x, [(0, 0)] + [(pad, pad)] * (x.ndim - 2) + [(0, 0)], mode="reflect")


def _reflect_fold(dy: Array, pad: int) -> Array:
    """The transpose of :func:`_reflect_pad`: per axis, the centre of ``dy`` with each padded
    margin, flipped, added in place onto the samples it copies (``1 .. pad`` and ``n - 1 - pad
    .. n - 2``); its own transpose is :func:`_reflect_pad_plain` (:func:`linear_with_transpose`).
    Written out because XLA:CPU runs JAX's own transpose about 8x slower (24 -> 3 ms
    at batch 1, 256^2 x 64 channels, pad 3: CycleGAN's output convolution; BENCHMARKS.md)."""
    for axis in range(1, dy.ndim - 1):
        n = dy.shape[axis] - 2 * pad
        low = jnp.flip(lax.slice_in_dim(dy, 0, pad, axis=axis), axis)
        high = jnp.flip(lax.slice_in_dim(dy, pad + n, n + 2 * pad, axis=axis), axis)
        dy = lax.slice_in_dim(dy, pad, pad + n, axis=axis)
        at = (slice(None),) * axis
        dy = dy.at[(*at, slice(1, pad + 1))].add(low)
        dy = dy.at[(*at, slice(n - 1 - pad, n - 1))].add(high)
    return dy


_reflect_pad, _ = linear_with_transpose(_reflect_pad_plain, _reflect_fold, num_static=1)


class PaddedConv(nn.Module):
    """N-D convolution with explicit (PyTorch-style) zero padding.

    Parameters ``kernel: [*kernel_size, Cin, features]`` and ``bias: [features]``, as
    :class:`~medjax.models.layers.Conv`; computed by :func:`~medjax.models.layers.conv_nd`.

    Attributes:
      features: output channels.
      kernel_size: int or one per spatial axis.
      strides: int or one per spatial axis.
      padding: int ``p`` (``(p, p)`` on every axis, PyTorch's ``padding=p``) or one
        ``(low, high)`` pair per spatial axis.
      spatial_dims: number of spatial axes ``d``.
      use_bias: add a learned bias.
      dtype: compute dtype.

    Input ``[B, *spatial, Cin]`` -> ``[B, *((spatial + lo + hi - k) // s + 1), features]``.
    """

    features: int
    kernel_size: int | Sequence[int] = 3
    strides: int | Sequence[int] = 1
    padding: int | Sequence[tuple[int, int]] = 0
    spatial_dims: int = 2
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = self.spatial_dims
        if x.ndim != d + 2:
            raise ValueError(f"expected [B, *{d} spatial, C] input, got shape {x.shape}")
        ks = (self.kernel_size,) * d if isinstance(self.kernel_size, int) else self.kernel_size
        ks = tuple(int(k) for k in ks)
        p = self.padding
        pad = [(p, p)] * d if isinstance(p, int) else [(int(lo), int(hi)) for lo, hi in p]
        if len(ks) != d or len(pad) != d:
            raise ValueError(f"kernel_size {ks} and padding {pad} need {d} entries")
        sizes = zip(x.shape[1:-1], ks, pad, strict=True)
        if any(s + lo + hi < k for s, k, (lo, hi) in sizes):
            raise ValueError(
                f"input shape {x.shape} too small for a kernel {ks} convolution with padding {pad}"
            )
        kernel = self.param("kernel", default_kernel_init, ks + (x.shape[-1], self.features))
        y = conv_nd(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, pad)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
            y = y + bias.astype(self.dtype)
        return y


def _check_input(x: Array, d: int, multiple: int, name: str, min_size: int = 1) -> None:
    if x.ndim != d + 2:
        raise ValueError(f"{name}: expected [B, *{d} spatial, C] input, got shape {x.shape}")
    sp = x.shape[1:-1]
    if any(s % multiple or s < min_size for s in sp):
        raise ValueError(
            f"{name}: spatial shape {tuple(sp)} (input {x.shape}) must be divisible by "
            f"{multiple} and >= {min_size} on every axis"
        )


# --------------------------------------------------------------------------------------
# ResNet generator (Johnson et al. 2016 / CycleGAN)
# --------------------------------------------------------------------------------------


class ResnetBlock(nn.Module):
    """CycleGAN residual block: ``x + norm(conv(pad(relu(norm(conv(pad(x)))))))``.

    ``pad`` is a reflection padding by 1 and ``conv`` a 3^d 'VALID' convolution with
    ``features`` channels (Johnson et al. 2016; pytorch-CycleGAN's ``ResnetBlock`` without
    dropout). No activation after the sum.

    Attributes:
      features: channels (must equal the input channels).
      norm: see :func:`gan_norm` (CycleGAN: ``'instance'``).
      spatial_dims: number of spatial axes ``d``.
      dtype: compute dtype.

    ``__call__(x [B, *spatial, features], *, train=False) -> [B, *spatial, features]``
    (every spatial size >= 2).
    """

    features: int
    norm: str = "instance"
    spatial_dims: int = 2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        if x.shape[-1] != self.features:
            raise ValueError(
                f"ResnetBlock({self.features}) needs {self.features} input channels, "
                f"got shape {x.shape}"
            )
        x = x.astype(self.dtype)
        h = x
        for i in range(2):
            h = reflect_pad(h, 1)
            h = PaddedConv(
                self.features,
                3,
                1,
                0,
                self.spatial_dims,
                conv_bias(self.norm),
                self.dtype,
                name=f"conv{i}",
            )(h)
            act = nn.relu if i == 0 else None
            h = gan_norm(
                h, self.norm, train=train, dtype=self.dtype, name=f"norm{i}", activation=act
            )
        return x + h


class ResnetGenerator(nn.Module):
    """ResNet image-to-image generator (Johnson et al. 2016), as used by CycleGAN (Zhu et al.
    2017), N-D.

    Layers (pytorch-CycleGAN's ``ResnetGenerator``): reflection pad 3 + 7^d conv to
    ``features`` + norm + ReLU; ``num_downsamples`` x (3^d conv stride 2, zero padding 1, +
    norm + ReLU), channels doubling; ``num_blocks`` :class:`ResnetBlock`; ``num_downsamples``
    x (2x transposed conv + norm + ReLU), channels halving; reflection pad 3 + 7^d conv (with
    bias) to ``out_channels`` -> tanh (computed in float32).

    Difference from PyTorch: the up-sampler is :class:`~medjax.models.layers.ConvTranspose4`
    (kernel 4, stride 2, exact 2x), whereas PyTorch uses ``ConvTranspose2d(k=3, s=2, p=1,
    output_padding=1)`` (also exact 2x). Kernel 4 with stride 2 overlaps every output evenly,
    avoiding the checkerboard pattern of the uneven kernel-3 overlap (Odena et al. 2016,
    "Deconvolution and Checkerboard Artifacts"); it costs ``(4^d - 3^d) * Cin * Cout`` extra
    weights per up-sampler (2D, 9 blocks, 3->3 channels, ``features=64``: 11,664,899
    parameters instead of PyTorch's 11,378,179). Everything else -- affine-free instance norm,
    conv biases -- matches PyTorch, so the counts differ by exactly that amount.

    Attributes:
      out_channels: output channels.
      features: channels of the first convolution (``ngf``).
      num_blocks: residual blocks (CycleGAN: 9 for 256x256, 6 for 128x128).
      num_downsamples: stride-2 down-samplings (and up-samplings).
      norm: see :func:`gan_norm` (CycleGAN: ``'instance'``). With ``'batch'``, call
        ``apply(..., train=True, mutable=['batch_stats'])`` when training.
      spatial_dims: 2 or 3.
      dtype: compute dtype (parameters are float32; the output is float32).

    ``__call__(x [B, *spatial, Cin], *, train=False) -> [B, *spatial, out_channels]`` in
    ``(-1, 1)``. Every spatial size must be divisible by ``2**num_downsamples`` and leave
    ``>= 2`` at the lowest resolution (and be ``>= 4`` for the 7^d reflection padding);
    otherwise ``ValueError``.
    """

    out_channels: int
    features: int = 64
    num_blocks: int = 9
    num_downsamples: int = 2
    norm: str = "instance"
    spatial_dims: int = 2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        d, nd = self.spatial_dims, self.num_downsamples
        _check_input(x, d, 2**nd, "ResnetGenerator", max(4, 2 ** (nd + 1)))
        bias = conv_bias(self.norm)
        x = x.astype(self.dtype)

        x = PaddedConv(self.features, 7, 1, 0, d, bias, self.dtype, name="conv_in")(
            reflect_pad(x, 3)
        )
        x = gan_norm(
            x, self.norm, train=train, dtype=self.dtype, name="norm_in", activation=nn.relu
        )
        f = self.features
        for i in range(nd):
            f = self.features * 2 ** (i + 1)
            x = PaddedConv(f, 3, 2, 1, d, bias, self.dtype, name=f"down{i}")(x)
            x = gan_norm(
                x,
                self.norm,
                train=train,
                dtype=self.dtype,
                name=f"down_norm{i}",
                activation=nn.relu,
            )
        for i in range(self.num_blocks):
            x = ResnetBlock(f, self.norm, d, self.dtype, name=f"block{i}")(x, train=train)
        for i in reversed(range(nd)):
            f = self.features * 2**i
            x = ConvTranspose4(f, d, use_bias=bias, dtype=self.dtype, name=f"up{i}")(x)
            x = gan_norm(
                x, self.norm, train=train, dtype=self.dtype, name=f"up_norm{i}", activation=nn.relu
            )
        x = PaddedConv(self.out_channels, 7, 1, 0, d, True, self.dtype, name="conv_out")(
            reflect_pad(x, 3)
        )
        return jnp.tanh(x.astype(jnp.float32))


# --------------------------------------------------------------------------------------
# U-Net generator (pix2pix)
# --------------------------------------------------------------------------------------


class UNetGenerator(nn.Module):
    """The pix2pix U-Net generator (Isola et al. 2017), N-D.

    Encoder level ``i`` (``i = 0 .. num_downs - 1``) has ``min(features * 2**i,
    max_features)`` channels and applies LeakyReLU(0.2) (not on level 0, which sees the
    image) + :class:`~medjax.models.layers.StridedConv4` (kernel 4, stride 2, halving each
    size) + norm (not on level 0 nor the innermost level). The decoder mirrors it from the
    innermost level: ReLU + :class:`~medjax.models.layers.ConvTranspose4` (exact 2x) to the
    next outer level's channels + norm (+ dropout), then concatenation ``[skip, up]`` with that
    level's encoder output; the outermost up-convolution (with bias) maps to ``out_channels``
    followed by ``final_activation``. This is pytorch-CycleGAN-and-pix2pix's nested
    ``UnetSkipConnectionBlock`` structure (256x256 input: ``num_downs=8``, 1x1 bottleneck).

    Dropout (rate ``dropout``) follows the norm on the ``dropout_levels`` decoder levels
    directly above the innermost one; ``None`` gives the PyTorch rule ``max(num_downs - 5,
    0)`` (3 for the 256x256 default: the three 512-channel ``use_dropout`` blocks). The
    paper's text instead puts dropout on the first three decoder layers (including the
    innermost up-convolution). Dropout is deterministic when ``train=False``; with
    ``train=True`` it needs ``rngs={'dropout': key}``. (pix2pix also keeps dropout on at test
    time as its noise source: call with ``train=True`` for that.)

    Biases: a convolution has a bias when no shift-learning norm follows (:func:`conv_bias`),
    so the first and innermost down-convolutions (no norm) always have one. PyTorch gives
    those two ``bias=use_bias`` (none with batch norm): for the 2D 256x256 default with 3 -> 3
    channels that is 54,414,531 parameters here vs. PyTorch's 54,413,955 (64 + 512 biases).

    Attributes:
      out_channels: output channels.
      features: channels of the first level (``ngf``).
      max_features: channel cap (``ngf * 8`` in pix2pix).
      num_downs: down-samplings (8 for 256 input, 7 for 128, 6 for 64, ...; >= 2).
      norm: see :func:`gan_norm` (pix2pix: ``'batch'``; with ``'batch'`` call
        ``apply(..., train=True, mutable=['batch_stats'])`` when training).
      dropout: dropout rate on the dropout levels.
      dropout_levels: number of decoder levels with dropout (``None``: ``max(num_downs - 5,
        0)``); at most ``num_downs - 2``.
      spatial_dims: 2 or 3.
      dtype: compute dtype (parameters and output are float32).
      final_activation: ``'tanh'`` (images in ``(-1, 1)``) or ``'none'`` (logits, e.g.
        segmentation as translation).

    ``__call__(x [B, *spatial, Cin], *, train=False) -> [B, *spatial, out_channels]`` float32;
    every spatial size must be divisible by ``2**num_downs`` (``ValueError`` otherwise).
    """

    out_channels: int
    features: int = 64
    max_features: int = 512
    num_downs: int = 8
    norm: str = "batch"
    dropout: float = 0.5
    dropout_levels: int | None = None
    spatial_dims: int = 2
    dtype: Dtype = jnp.float32
    final_activation: str = "tanh"

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        d, n = self.spatial_dims, self.num_downs
        if n < 2:
            raise ValueError(f"UNetGenerator needs num_downs >= 2, got {n}")
        if self.final_activation not in ("tanh", "none"):
            raise ValueError(
                f"final_activation must be 'tanh' or 'none', got {self.final_activation!r}"
            )
        n_drop = max(n - 5, 0) if self.dropout_levels is None else self.dropout_levels
        if not 0 <= n_drop <= n - 2:
            raise ValueError(f"dropout_levels must be in [0, {n - 2}] for num_downs={n}")
        _check_input(x, d, 2**n, "UNetGenerator")
        feats = [min(self.features * 2**i, self.max_features) for i in range(n)]
        bias = conv_bias(self.norm)
        h = x.astype(self.dtype)
        skips = []
        for i in range(n):
            if i > 0:
                h = leaky_relu_02(h)
            has_norm = 0 < i < n - 1
            h = StridedConv4(
                feats[i], d, use_bias=bias or not has_norm, dtype=self.dtype, name=f"down{i}"
            )(h)
            if has_norm:
                h = gan_norm(h, self.norm, train=train, dtype=self.dtype, name=f"down_norm{i}")
            skips.append(h)

        h = skips[-1]
        for i in reversed(range(n)):
            h = nn.relu(h)
            if i == 0:
                h = ConvTranspose4(self.out_channels, d, dtype=self.dtype, name="up0")(h)
                break
            h = ConvTranspose4(feats[i - 1], d, use_bias=bias, dtype=self.dtype, name=f"up{i}")(h)
            h = gan_norm(h, self.norm, train=train, dtype=self.dtype, name=f"up_norm{i}")
            if n - 1 - n_drop <= i <= n - 2 and self.dropout > 0:
                h = nn.Dropout(self.dropout, deterministic=not train, name=f"dropout{i}")(h)
            h = jnp.concatenate([skips[i - 1], h], axis=-1)
        h = h.astype(jnp.float32)
        return jnp.tanh(h) if self.final_activation == "tanh" else h
