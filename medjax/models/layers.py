"""N-D building blocks for U-Nets and GANs, channels-last ``[B, *spatial, C]``.

Every module works in 2D and 3D from the same code; the dimensionality comes from a
``spatial_dims`` field. Parameters are stored in float32; a ``dtype`` field sets the compute
dtype (e.g. ``jnp.bfloat16``).

Several convolutions are computed with *exact* reformulations that XLA:CPU runs much faster
than the textbook op, while the parameters keep the conventional shapes (``[*k, Cin, Cout]``)
and meanings of :class:`flax.linen.Conv` / :class:`flax.linen.ConvTranspose`, so a
``fast=False`` module (or the plain Linen layer) with the same parameters gives the same
output up to float rounding:

* On CPUs with oneDNN installed (``medjax[onednn]``, part of ``medjax[train]``), float32
  convolutions with enough output positions (stride-1 2D and 3D, strided 2D; thresholds per kind
  in ``_onednn_is_faster``) and the larger transposed ones of :class:`ConvTranspose4` run as
  oneDNN's convolutions (:mod:`medjax.models.onednn`): U-Net 3D's step at 2 x 64^3 1.55x faster
  than with the XLA formulations below, U-Net 2D's at 8 x 256^2 1.2x (2-core AVX-512 Xeon), which
  every other backend keeps. Strided 3D convolutions and the Winograd ones keep XLA's
  formulations: there oneDNN did not make the steps faster (``BENCHMARKS.md``). In a
  ``dtype=jnp.bfloat16`` model every convolution and transposed convolution oneDNN can run goes to
  it, where the CPU has its bfloat16 kernels (:func:`medjax.models.onednn.bfloat16_kernels`: AMX
  on Sapphire Rapids and later, AVX-512 BF16 on AMD's Zen 4): XLA:CPU's own bfloat16 convolutions
  are no faster than its float32 ones, oneDNN's on AMX 4-10x faster than its float32 ones. A
  transposed one to fewer than 8 channels (an output layer) runs only its gradients there:
  oneDNN's kernel for its forward is slow, so that is an XLA formulation below
  (``_conv_transpose4_onednn_gradients``; Vox2Vox's step 6 % faster).
* 3D convolutions with a depth extent > 1 (e.g. 3x3x3) are folded into a single 2D
  convolution: the ``kd`` shifted depth views are stacked along channels,
  ``[B*D', H, W, kd*Cin]``, and convolved with the kernel reshaped to ``[kh, kw, kd*Cin, Cout]``
  (:func:`conv_nd`). Large float32 stride-1 ones (at least 2^18 output positions: U-Net 3D's
  64^3 level) stack the depth taps along the output channels instead, ``[B*D, H, W, kd*Cout]``
  summed over depth-shifted slices, and compute their kernel gradient as one matrix product
  of the depth-stacked input and the in-plane shifts of the output gradient (on CPUs).
* 1x1 convolutions are matrix products (:func:`conv_nd`) whose kernel gradient is oneDNN's
  weights primitive on CPUs that have it, else a product batched over row blocks
  (:func:`channel_matmul`).
* The kernel-2 stride-2 transposed convolution (:class:`UpSample`) is a 1x1 convolution to
  ``2^d * Cout`` channels followed by depth-to-space (pixel shuffle).
* Strided convolutions whose kernel extents are multiples of the stride (the kernel-4
  stride-2 down-sampler of :class:`StridedConv4` and of PyTorch's ``Conv(k=4, s=2, p=1)``) are
  space-to-depth followed by a stride-1 convolution (:func:`conv_space_to_depth`): a kernel-2
  one for kernel 4, stride 2.
* Other strided convolutions (CycleGAN's k3 s2 down-sampler) at batch sizes up to 2 are a sum
  of stride-1 convolutions, one per phase of the stride (:func:`conv_stride_phases`).
* Convolutions with at most 256 output positions (batch x spatial: the deep layers of a
  batch-1 pix2pix generator), and strided ones whose output extents are all at most 4 (a DCGAN
  discriminator's last strided layer), are one matrix product of the stacked shifted (strided)
  input views (:func:`conv_im2col`) with the kernel as it is: no rearranged copy of the kernel
  or of its gradient. Checked after oneDNN's route, before the 3D, space-to-depth and
  stride-phase forms above.
* The kernel-4 stride-2 transposed convolution (:class:`ConvTranspose4`) is ``2^d`` sub-pixel
  kernel-2 convolutions, one per output phase, interleaved by depth-to-space; or, for few output
  channels, a wide input or a tiny one (at most 16 positions), one matrix product to all
  ``4^d`` taps (batched over the taps for a tiny input, so the kernel is read as it is)
  followed by an overlap-add of shifted taps (:func:`conv_transpose4_overlap_add`); or, at
  batch sizes up to 2, one kernel-2 convolution of the zero-padded input to all ``2^d``
  phases, depth-to-space and a one-voxel crop (:func:`conv_transpose4_shuffle`).
* At batch sizes up to 2 the remaining convolutions pad their input before XLA's convolution
  rather than inside it: their filter gradients are up to 4x faster that way.
* Stride-1 convolutions of at most 16 taps to at most 4 output channels (output heads such as a
  PatchGAN's 1-channel map) are one matrix product to all taps followed by a sum of shifted
  taps (:func:`conv_overlap_add`).
* Stride-1 float32 3x3 convolutions with at least 128 input and output channels and outputs of
  at least 32 per axis (CycleGAN's residual blocks) use Winograd's F(4x4, 3x3)
  (:func:`conv_winograd`): 36 instead of 144 products per 4x4 output tile; 4x4 ones (a
  PatchGAN's k4 s1 layers, outputs from 31 per axis) its F(3x3, 4x4), 36 instead of 144 per 3x3
  tile. It is exact in exact arithmetic but not bit-for-bit: its float32 rounding is about 10x
  a direct convolution's (1-2 x 10^-5 of the output's scale); :func:`winograd_convolutions`
  switches it off.
* 2x max-pooling (:func:`max_pool`) folds each window into axes of its own; its gradient picks
  the first maximum of each window by selects, not by ``select_and_scatter``'s scatter.

Inside :func:`second_order_convolutions` (what a gradient penalty uses) those kernel-2
convolutions carry their own VJP, made of ordinary convolutions, so their gradients can be
differentiated again at full speed.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from medjax.models import onednn

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]
Padding = str | Sequence[tuple[int, int]]

__all__ = [
    "ACTIVATIONS",
    "AttentionGate",
    "BatchNorm",
    "Conv",
    "ConvNormAct",
    "ConvTranspose4",
    "DownSample",
    "InstanceNorm",
    "Norm",
    "ResidualBlock",
    "StridedConv4",
    "UpSample",
    "channel_matmul",
    "conv_im2col",
    "conv_nd",
    "conv_overlap_add",
    "conv_space_to_depth",
    "conv_stride_phases",
    "conv_transpose4_overlap_add",
    "conv_transpose4_one_position",
    "conv_transpose4_shuffle",
    "depth_to_space",
    "get_activation",
    "instance_norm",
    "match_spatial",
    "max_pool",
    "normalize",
    "second_order_convolutions",
    "space_to_depth",
]

default_kernel_init = nn.initializers.lecun_normal()


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _tuple(v: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(i) for i in v)
    if len(v) != n:
        raise ValueError(f"{name} must have {n} entries, got {v}")
    return v


def _dimension_numbers(d: int) -> tuple[str, str, str]:
    sp = "DHW"[-d:] if d <= 3 else "".join(chr(ord("a") + i) for i in range(d))
    return ("N" + sp + "C", sp + "IO", "N" + sp + "C")


def _leaky_relu(x: Array) -> Array:
    return nn.leaky_relu(x, negative_slope=0.01)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": nn.relu,
    "leaky_relu": _leaky_relu,
    "gelu": nn.gelu,
    "silu": nn.silu,
    "elu": nn.elu,
    "none": lambda x: x,
}


def get_activation(name: str) -> Callable[[Array], Array]:
    """Returns the activation function called ``name``.

    Args:
      name: one of ``'relu'``, ``'leaky_relu'`` (negative slope 0.01, as in nnU-Net),
        ``'gelu'`` (tanh approximation), ``'silu'``, ``'elu'`` or ``'none'`` (identity).
    """
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}"
        ) from None


def space_to_depth(x: Array, block: int = 2) -> Array:
    """Folds non-overlapping ``block^d`` spatial blocks into channels.

    Args:
      x: ``[B, *spatial, C]``, every spatial size divisible by ``block``.
      block: block edge length.

    Returns:
      ``[B, *(s // block), block^d * C]``; channel index ``(p_1, ..., p_d, c)`` in row-major
      order, where ``p_i`` is the position inside the block along spatial axis ``i``.
    """
    b, *sp, c = x.shape
    d = len(sp)
    if any(s % block for s in sp):
        raise ValueError(f"spatial shape {tuple(sp)} not divisible by {block}")
    x = x.reshape([b] + [v for s in sp for v in (s // block, block)] + [c])
    perm = [0] + [1 + 2 * i for i in range(d)] + [2 + 2 * i for i in range(d)] + [1 + 2 * d]
    return x.transpose(perm).reshape([b] + [s // block for s in sp] + [block**d * c])


def depth_to_space(x: Array, block: int = 2) -> Array:
    """Inverse of :func:`space_to_depth` (pixel shuffle).

    Args:
      x: ``[B, *spatial, block^d * C]`` with channel index ``(p_1, ..., p_d, c)``.
      block: block edge length.

    Returns:
      ``[B, *(s * block), C]`` with ``out[b, block*i + p, c] = x[b, i, (p, c)]``.
    """
    b, *sp, cc = x.shape
    d = len(sp)
    c = cc // block**d
    x = x.reshape([b] + sp + [block] * d + [c])
    perm = [0] + [v for i in range(d) for v in (1 + i, 1 + d + i)] + [1 + 2 * d]
    return x.transpose(perm).reshape([b] + [s * block for s in sp] + [c])


def max_pool(x: Array, window: int = 2) -> Array:
    """Non-overlapping max-pooling (window = stride, 'VALID'), N-D, channels-last.

    The same values and gradients as ``flax.linen.max_pool(x, (window,) * d, strides=(window,)
    * d, padding='VALID')``: trailing rows that do not fill a window are dropped, and the
    gradient of each window goes to its *first* maximum in row-major window order (as XLA's
    ``select_and_scatter`` and PyTorch's ``MaxPool`` route it). The windows are folded into
    axes of their own by a reshape, the maximum is an elementwise one over the window
    positions, and the gradient one select by a mask of each window's first maximum, so
    XLA:CPU needs neither the index arrays nor the scatter of its ``select_and_scatter``
    expansion (several times faster, forward and backward, on the U-Nets' pooling).

    Args:
      x: ``[B, *spatial, C]``.
      window: window edge length and stride along every spatial axis.

    Returns:
      ``[B, *(spatial // window), C]``.
    """
    b, *sp, c = x.shape
    d = len(sp)
    out = [s // window for s in sp]
    if any(o == 0 for o in out):
        raise ValueError(f"spatial shape {tuple(sp)} is smaller than the pooling window {window}")
    if any(s % window for s in sp):
        x = x[(slice(None),) + tuple(slice(0, o * window) for o in out)]
    xr = x.reshape([b] + [v for o in out for v in (o, window)] + [c])
    return _window_max(xr, tuple(2 + 2 * i for i in range(d)))


def _window_positions(xr: Array, axes: tuple[int, ...]) -> Iterator[tuple]:
    """The index of each window position of the folded ``xr`` (the window ``axes`` fixed),
    in row-major window order."""
    for pos in np.ndindex(*(xr.shape[a] for a in axes)):
        index = [slice(None)] * xr.ndim
        for a, p in zip(axes, pos, strict=True):
            index[a] = p
        yield tuple(index)


def _window_maximum(xr: Array, axes: tuple[int, ...]) -> Array:
    """``jnp.max(xr, axes)`` as an elementwise maximum of the window positions: one loop fusion
    where XLA:CPU's reduction over the folded window axes was slower (the classifier's 64 x
    28^2 x 32 pooling 0.29 against 0.45 ms, U-Net 3D's 2 x 64^3 x 32 1.5 against 2.8 ms;
    ``BENCHMARKS.md``). The same values: a maximum is exact."""
    y = None
    for index in _window_positions(xr, axes):
        y = xr[index] if y is None else jnp.maximum(y, xr[index])
    return y


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _window_max(xr: Array, axes: tuple[int, ...]) -> Array:
    return _window_maximum(xr, axes)


@_window_max.defjvp
def _window_max_jvp(axes, primals, tangents):
    (xr,), (dxr,) = primals, tangents
    y = _window_maximum(xr, axes)
    taken = jnp.zeros(y.shape, bool)
    # The compares and selects run in at least float32: XLA:CPU computes bfloat16 ones by
    # converting to float32 and back (U-Net 3D's 2 x 64^3 pooling's gradient in bfloat16, one
    # select per window position: 287 ms against 17 ms in float32).
    wide = jnp.promote_types(dxr.dtype, jnp.float32)
    xw, yw = xr.astype(wide), y.astype(wide)  # exact
    # Window positions in row-major order; the first maximum takes the whole tangent.
    firsts = []
    for index in _window_positions(xr, axes):
        first = (xw[index] == yw) & ~taken
        firsts.append(first)
        taken = taken | first
    # each window axis's index once the window axes before it are stacked in
    mask = _unfold_windows(firsts, [a - k for k, a in enumerate(axes)], [xr.shape[a] for a in axes])
    dy = jnp.sum(jnp.where(mask, dxr.astype(wide), 0), axis=axes)
    return y, dy.astype(dxr.dtype)


def _unfold_windows(parts: list[Array], axes: Sequence[int], sizes: Sequence[int]) -> Array:
    """The arrays of ``parts`` (one per window position, in :func:`_window_positions`' order,
    each of the pooled shape) stacked into the folded input's shape, window axis by window
    axis (``axes[k]``: where the k-th is inserted, the later ones absent; ``sizes``: theirs).
    The tangent is then one select over that shape and its transpose one more, where a select
    per window position transposed into a padded full-size copy each (U-Net 3D's 2 x 64^3 x 32
    pooling, forward and gradient: 19.7 against 41.3 ms, ``BENCHMARKS.md``)."""
    if not axes:
        (part,) = parts
        return part
    n = len(parts) // sizes[0]
    inner = [
        _unfold_windows(parts[i : i + n], axes[1:], sizes[1:]) for i in range(0, len(parts), n)
    ]
    return jnp.stack(inner, axis=axes[0])


def match_spatial(x: Array, shape: Sequence[int]) -> Array:
    """Pads (edge-replicate, at the high end) or crops (at the high end) ``x`` to ``shape``.

    Used to align an up-sampled decoder map with its skip connection when the input size is
    not divisible by the total down-sampling factor (as MONAI's ``BasicUNet`` does).

    Args:
      x: ``[B, *spatial, C]``.
      shape: target spatial shape (``len(spatial)`` ints).

    Returns:
      ``[B, *shape, C]``.
    """
    sp = x.shape[1:-1]
    shape = tuple(shape)
    if tuple(sp) == shape:
        return x
    x = x[(slice(None),) + tuple(slice(0, t) for t in shape)]
    pads = [(0, 0)] + [(0, max(t - s, 0)) for s, t in zip(sp, shape, strict=True)] + [(0, 0)]
    if any(p[1] for p in pads):
        x = jnp.pad(x, pads, mode="edge")
    return x


def _resolve_padding(
    spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int], padding: Padding
) -> list[tuple[int, int]]:
    if isinstance(padding, str):
        return [tuple(p) for p in lax.padtype_to_pads(tuple(spatial), kernel, strides, padding)]
    return [tuple(int(v) for v in p) for p in padding]


_SECOND_ORDER: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "medjax_second_order", default=False
)


@contextlib.contextmanager
def second_order_convolutions() -> Iterator[None]:
    """Inside this context, the small stride-1 convolutions of the fast layers (the kernel-2
    forms of :class:`StridedConv4` and :class:`ConvTranspose4`, 2D and, through the depth
    fold, 3D) are traced with a VJP made of ordinary convolutions, so that differentiating
    their gradient again stays fast. Use it around a network call whose input gradient is
    differentiated again, as :func:`medjax.losses.gradient_penalty` does; the values are the
    same. Measured on a 2-core Xeon: the WGAN-GP critic's penalty gradient takes 125 ms instead
    of 640 ms; outside it, first-order steps keep XLA's own rules, which are faster there
    (DCGAN 1.02 vs 1.11 s, Vox2Vox 159 vs 214 ms).
    """
    token = _SECOND_ORDER.set(True)
    try:
        yield
    finally:
        _SECOND_ORDER.reset(token)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv2d_small(x: Array, kernel: Array, pads: tuple[tuple[int, int], ...]) -> Array:
    """Stride-1 2D convolution (kernel extents <= 2: the sub-pixel and space-to-depth forms)
    whose VJP is written with ordinary stride-1 convolutions, so that derivatives of every
    order stay ordinary convolutions: the input gradient is this same convolution of the
    output gradient with the flipped, in/out-swapped kernel, and the filter gradient is the
    correlation of the padded input with the output gradient (batch and channels swapped).
    JAX's own transpose rules give the second-order filter gradients (the WGAN-GP gradient
    penalty's) as kernel-reversed convolutions that XLA:CPU runs about 5x slower. Used inside
    :func:`second_order_convolutions` only.
    """
    return lax.conv_general_dilated(
        x, kernel, (1, 1), pads, dimension_numbers=_dimension_numbers(2)
    )


def _conv2d_small_fwd(x, kernel, pads):
    return _conv2d_small(x, kernel, pads), (x, kernel)


def _conv2d_small_bwd(pads, res, dy):
    x, kernel = res
    ks = kernel.shape[:2]
    # 0 <= p <= k - 1 (checked by the caller), so the transposed padding is never negative.
    tpads = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(ks, pads, strict=True))
    flipped = jnp.swapaxes(jnp.flip(kernel, (0, 1)), 2, 3)
    dx = _conv2d_small(dy, flipped, tpads)
    xp = jnp.pad(x, [(0, 0), *pads, (0, 0)])
    dk = lax.conv_general_dilated(
        xp, dy, (1, 1), "VALID", dimension_numbers=("CHWN", "IHWO", "HWNC")
    )
    return dx, dk.astype(kernel.dtype)


_conv2d_small.defvjp(_conv2d_small_fwd, _conv2d_small_bwd)


def _overlap_add_conv_is_faster(kernel_shape: Sequence[int]) -> bool:
    """Where :func:`conv_overlap_add` beats XLA:CPU's convolution (forward + backward; measured
    in ``BENCHMARKS.md``): very few output channels, where XLA's filter gradient is slowest,
    and at most 16 taps (PatchGAN's 4x4 output convolution). More taps cost trace and compile
    time for no step-level gain: a 4x4x4 kernel's 64 shifted slices in Vox2Vox (its depth-stacked
    2D form, 4x4 taps, still takes this route), and CycleGAN's
    7x7 output convolution (step unchanged at batch 1, 10 % slower at batch 4; its 49 taps were
    a quarter of the smoke step's trace time)."""
    return kernel_shape[-1] <= 4 and 1 < int(np.prod(kernel_shape[:-2])) <= 16


def _shifted_tap_products(
    x: Array, kernel: Array, shifts: Sequence[Sequence[tuple[int, int]]]
) -> list[Array]:
    """The overlap-add formulations' common part: ``x`` times every tap of ``kernel`` (``[T,
    Cin, Cout]``), each tap's ``[B, *spatial, Cout]`` product then shifted by its ``(low,
    high)`` zero padding per spatial axis (negative: cropping).

    The products are ONE matrix product of ``T * Cout`` columns, which needs the kernel's
    taps moved behind ``Cin`` (a transpose of the kernel, and one of its gradient), unless the
    input has at most ``_TAP_BATCHED_MAX_POSITIONS`` positions (batch x spatial): then ``x`` is
    broadcast to every tap and the products are one matrix product batched over the taps,
    which reads the kernel and writes its gradient in their own layout (the pix2pix
    generator's innermost up-samplers, 1^2 .. 4^2 inputs with 16 MB kernels: 2.6 -> 1.6 and
    13.0 -> 9.2 ms forward + backward; ``BENCHMARKS.md``). The taps are separated by a split
    (or are the batch), so the backward is one concatenation (or one batched product)."""
    taps, cin, cout = kernel.shape
    lead = x.shape[:-1]
    positions = int(np.prod(lead))
    if positions <= _TAP_BATCHED_MAX_POSITIONS:
        xb = jnp.broadcast_to(x.reshape(1, positions, cin), (taps, positions, cin))
        z = lax.dot_general(xb, kernel, (((2,), (1,)), ((0,), (0,))))  # [T, positions, Cout]
        per_tap = [zt.reshape(lead + (cout,)) for zt in z]
    else:
        k = jnp.moveaxis(kernel, 1, 0).reshape(cin, taps * cout)  # columns ordered (tap, c)
        z = jnp.dot(x, k).reshape(lead + (taps, cout))
        per_tap = [zt[..., 0, :] for zt in jnp.split(z, taps, axis=-2)]
    zero = jnp.zeros((), z.dtype)
    return [
        lax.pad(zt, zero, [(0, 0, 0), *((lo, hi, 0) for lo, hi in sh), (0, 0, 0)])
        for zt, sh in zip(per_tap, shifts, strict=True)
    ]


def conv_overlap_add(x: Array, kernel: Array, pads: Sequence[tuple[int, int]]) -> Array:
    """Stride-1 N-D cross-correlation as one matrix product + a sum of shifted taps.

    ``z = x @ kernel`` computes every input position's product with all ``T`` taps at once
    (``[B, *spatial, T, Cout]``, ``Cin`` contracted in one matrix product of ``T * Cout``
    columns). Tap ``t`` of input position ``q`` belongs to output ``m = q - t + pad_lo``, so
    the output is the sum over taps of each tap's slice of ``z`` shifted by ``pad_lo - t``
    (zero-filled). The gradients are matrix products as well: the shifts transpose to shifts
    and a concatenation, then ``dz @ kernel^T`` and ``x^T @ dz``. Same semantics as
    ``lax.conv_general_dilated(x, kernel, 1, pads)``.

    Args:
      x: ``[B, *spatial, Cin]``.
      kernel: ``[*k, Cin, Cout]``.
      pads: one ``(low, high)`` zero padding per spatial axis.

    Returns:
      ``[B, *(spatial + low + high - k + 1), Cout]``.
    """
    d = x.ndim - 2
    ks = tuple(kernel.shape[:d])
    shifts = [
        [(lo - ti, hi - (kk - 1 - ti)) for ti, kk, (lo, hi) in zip(t, ks, pads, strict=True)]
        for t in np.ndindex(*ks)
    ]
    products = _shifted_tap_products(x, kernel.reshape(-1, *kernel.shape[-2:]), shifts)
    return functools.reduce(jnp.add, products)


def _conv_out_sizes(
    sizes: Sequence[int], ks: Sequence[int], strides: Sequence[int], pads: Sequence[tuple[int, int]]
) -> list[int]:
    """Output extent per spatial axis of a convolution with explicit ``(low, high)`` padding."""
    return [
        (n + lo + hi - k) // s + 1
        for n, k, s, (lo, hi) in zip(sizes, ks, strides, pads, strict=True)
    ]


# Below this many output positions (batch x spatial) a convolution is one matrix product of
# its stacked shifted views: at batch 1 the pix2pix generator's deep 512-channel convolutions
# (16^2 .. 2^2 inputs) take 2-15 ms forward + backward this way against 13-33 ms through
# XLA:CPU's convolution, whose input gradient is slowest there (BENCHMARKS.md). Strided ones
# take this route too, and also where every output extent is at most
# ``_IM2COL_MAX_STRIDED_EXTENT`` (DCGAN's 64 x 8^2 -> 4^2 discriminator layer, 256 -> 512
# channels: 41.7 against 53.5 ms through the space-to-depth form), reading the kernel in its
# own layout where the space-to-depth form rearranges it (and its gradient) every step.
_IM2COL_MAX_POSITIONS = 256
_IM2COL_MAX_STRIDED_EXTENT = 4

# Below this many input positions (batch x spatial) the overlap-add formulations multiply by
# each tap of the kernel in a matrix product batched over the taps (_shifted_tap_products).
_TAP_BATCHED_MAX_POSITIONS = 16

# Up to this batch size XLA:CPU computes a convolution's filter gradient 1.2-4x faster when the
# input is zero-padded beforehand than when the convolution pads it (batch 1, 128^2, 3x3, 64 ->
# 64 channels: 45.6 -> 10.9 ms; PatchGAN's k4 s1 p1, 32^2, 256 -> 512: 31 -> 24 ms), while at
# batch 4 and beyond the convolution's own padding is as fast or faster (BENCHMARKS.md). The
# forward and the input gradient are the same either way.
_SMALL_BATCH = 2


def conv_im2col(
    x: Array, kernel: Array, pads: Sequence[tuple[int, int]], strides: int | Sequence[int] = 1
) -> Array:
    """N-D cross-correlation as ONE matrix product (im2col): the ``prod(k)`` shifted (and
    strided) views of the padded input stacked along channels (ordered ``(tap, c)``, as
    ``kernel`` reshapes to ``[prod(k) * Cin, Cout]`` without moving anything). Exact; its
    memory is ``prod(k)`` times the output positions times ``Cin``, so :func:`conv_nd` uses it
    only for small outputs."""
    d = x.ndim - 2
    patches = onednn.im2col_patches(x, kernel.shape[:d], _tuple(strides, d, "strides"), pads)
    return jnp.dot(patches, kernel.reshape(-1, kernel.shape[-1]))


def _im2col_is_faster(x: Array, ks: Sequence[int], strides: Sequence[int], pads) -> bool:
    """Whether :func:`conv_nd` computes this convolution by :func:`conv_im2col`: at most
    ``_IM2COL_MAX_POSITIONS`` output positions, or strided with every output extent at most
    ``_IM2COL_MAX_STRIDED_EXTENT`` (measured on XLA:CPU, ``BENCHMARKS.md``)."""
    if any(p < 0 for pp in pads for p in pp):
        return False
    out = _conv_out_sizes(x.shape[1:-1], ks, strides, pads)
    if x.shape[0] * int(np.prod(out)) <= _IM2COL_MAX_POSITIONS:
        return True
    return any(s > 1 for s in strides) and max(out) <= _IM2COL_MAX_STRIDED_EXTENT


def _pad_to_stride_blocks(
    x: Array, ks: Sequence[int], stride: int, pads: Sequence[tuple[int, int]]
) -> tuple[Array, list[int]]:
    """``x`` padded by ``pads`` and then padded or cropped (the never-read high end) to ``stride *
    (out + ceil(k / stride) - 1)`` per spatial axis -- whole blocks of ``stride``, each phase
    ``p::stride`` of them holding ``out + ceil(k / stride) - 1`` positions -- and the stride-
    ``stride`` convolution's output extents ``out``."""
    sizes = x.shape[1:-1]
    out = _conv_out_sizes(sizes, ks, (stride,) * len(ks), pads)
    lengths = [stride * (o - 1 - (-k // stride)) for o, k in zip(out, ks, strict=True)]
    highs = [length - n - lo for length, n, (lo, _) in zip(lengths, sizes, pads, strict=True)]
    xp = jnp.pad(
        x, [(0, 0), *((lo, max(h, 0)) for (lo, _), h in zip(pads, highs, strict=True)), (0, 0)]
    )
    return xp[(slice(None), *(slice(0, length) for length in lengths))], out


def conv_space_to_depth(
    x: Array, kernel: Array, stride: int, pads: Sequence[tuple[int, int]]
) -> Array:
    """Stride-``s`` N-D cross-correlation whose kernel extents are multiples of ``s``, as a
    stride-1 one: pad (or crop the never-read high end) to ``s * (out + k / s - 1)``, fold
    ``s^d`` blocks into channels (:func:`space_to_depth`) and convolve with the kernel
    rearranged to ``[*(k / s), s^d * Cin, Cout]`` -- the same products without the stride.
    XLA:CPU's gradients of strided convolutions are 2-4x slower than of this form (BENCHMARKS.md).
    The stride-1 convolution goes through :func:`conv_nd` and its routes."""
    d = x.ndim - 2
    ks = kernel.shape[:d]
    cin, cout = kernel.shape[-2:]
    xp, _ = _pad_to_stride_blocks(x, ks, stride, pads)
    xs = space_to_depth(xp, stride)
    # kernel axis k -> (a, p): tap = s * a + p; space_to_depth orders channels (p_1..p_d, c)
    k = kernel.reshape([v for kk in ks for v in (kk // stride, stride)] + [cin, cout])
    perm = [2 * i for i in range(d)] + [2 * i + 1 for i in range(d)] + [2 * d, 2 * d + 1]
    k = k.transpose(perm).reshape(tuple(kk // stride for kk in ks) + (stride**d * cin, cout))
    return conv_nd(xs, k, 1, "VALID", fast=True)


def conv_stride_phases(
    x: Array, kernel: Array, stride: int, pads: Sequence[tuple[int, int]]
) -> Array:
    """Stride-``s`` N-D cross-correlation as a sum of ``s^d`` stride-1 ones, one per phase.

    Output ``o`` reads the padded input at ``s * o + t`` for every tap ``t``; writing ``t = s
    * a + p`` (phase ``p < s``), the taps of one phase read ``x_p[o + a]`` with ``x_p =
    x_padded[p::s]``, a stride-1 'VALID' convolution of ``x_p`` with ``kernel[p::s]``. The
    exact products (a k3 s2 kernel splits into 2x2, 2x1, 1x2 and 1x1 kernels), where
    :func:`conv_space_to_depth` would need the kernel zero-padded to a multiple of ``s``. The
    stride-1 convolutions go through :func:`conv_nd` and its routes; their gradients are
    stride-1 ones, which XLA:CPU computes 1.5-2x faster than a strided convolution's at small
    batch sizes (``BENCHMARKS.md``)."""
    d = x.ndim - 2
    ks = kernel.shape[:d]
    xp, out = _pad_to_stride_blocks(x, ks, stride, pads)
    y = None
    for phase in np.ndindex(*(min(stride, k) for k in ks)):
        kp = kernel[tuple(slice(p, None, stride) for p in phase)]
        view = tuple(
            slice(p, p + stride * (o + kk - 2) + 1, stride)
            for p, o, kk in zip(phase, out, kp.shape[:d], strict=True)
        )
        term = conv_nd(xp[(slice(None), *view)], kp, 1, "VALID", fast=True)
        y = term if y is None else y + term
    return y


# Winograd's minimal filtering F(4x4, 3x3) (Lavin & Gray 2016, "Fast Algorithms for
# Convolutional Neural Networks"): a 6x6 input tile gives a 4x4 output tile of a 3x3
# convolution with 36 products per (input, output) channel pair instead of 144. ``B^T`` maps an
# input tile, ``G`` a 3x3 kernel and ``A^T`` the 6x6 products back to the 4x4 output tile.
_WINOGRAD_BT = np.array(
    [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
    np.float64,
)
_WINOGRAD_G = np.array(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    np.float64,
)
_WINOGRAD_AT = np.array(
    [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    np.float64,
)
# F(3x3, 4x4) for 4x4 kernels (a PatchGAN's k4 s1 layers): the same six interpolation points
# (0, +-1, +-2, infinity), so the same ``B^T``; 36 products per 3x3 output tile instead of 144.
_WINOGRAD_G4 = np.array(
    [
        [1 / 4, 0, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6, 1 / 6],
        [1 / 24, 1 / 12, 1 / 6, 1 / 3],
        [1 / 24, -1 / 12, 1 / 6, -1 / 3],
        [0, 0, 0, 1],
    ],
    np.float64,
)
_WINOGRAD_AT4 = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 1]], np.float64)
# kernel extent -> (B^T, G, A^T); output tile m = A^T's rows, input tile alpha = its columns
_WINOGRAD_TRANSFORMS = {
    3: (_WINOGRAD_BT, _WINOGRAD_G, _WINOGRAD_AT),
    4: (_WINOGRAD_BT, _WINOGRAD_G4, _WINOGRAD_AT4),
}


def _winograd_kernel_extent(kernel: Array) -> int | None:
    """``k`` for a square ``k x k`` 2D kernel that :func:`conv_winograd` has transforms for,
    else None."""
    r = kernel.shape[0]
    square = kernel.ndim == 4 and kernel.shape[:2] == (r, r)
    return r if square and r in _WINOGRAD_TRANSFORMS else None


# Where :func:`conv_winograd` beats XLA:CPU's convolution (2-core EPYC, BENCHMARKS.md): at least
# this many input and output channels, this many output tiles (batch x tiles) and output
# extents of at least ``_WINOGRAD_MIN_SIZE[k]`` for a k x k kernel (smaller ones waste part of
# their last tile and lost in whole steps: the classifier's 128-channel 7^2 stage, the 2D
# U-Net's 16^2 level). Forward + backward, CycleGAN's 256-channel residual convolutions at 64^2:
# batch 1 85 -> 55-59 ms, batch 4 362 -> 199-226 ms; 64-channel convolutions lose (batch 8,
# 64^2, 128 -> 64: 124 -> 131 ms). 4x4 kernels against oneDNN's convolution (2-core Xeon with
# AMX): pix2pix's PatchGAN layer 1 x 32^2, 256 -> 512, k4 s1 p1 (31^2 outputs, 121 tiles)
# forward 11.3 against 15.8 ms, its two gradients 27.9 against 27.2; measured only there.
_WINOGRAD_MIN_CHANNELS = 128
_WINOGRAD_MIN_TILES = {3: 128, 4: 121}
_WINOGRAD_MIN_SIZE = {3: 32, 4: 31}

_WINOGRAD: contextvars.ContextVar[bool] = contextvars.ContextVar("medjax_winograd", default=True)


@contextlib.contextmanager
def winograd_convolutions(enabled: bool) -> Iterator[None]:
    """Turns the Winograd route of :func:`conv_nd` on or off (on by default) for the
    convolutions traced inside this context (a function that ``jax.jit`` has already traced
    keeps the route it was traced with). Winograd's algorithm is exact in exact arithmetic;
    in float32 its outputs differ from the exact (float64) ones by 1-2 x 10^-5 of their largest
    magnitude at 128-256 channels (``tests/models/test_layers.py`` measures it), a direct
    convolution's by about 10^-6. Turn it off for bit-level comparisons with other frameworks."""
    token = _WINOGRAD.set(bool(enabled))
    try:
        yield
    finally:
        _WINOGRAD.reset(token)


def _tile_axis(x: Array, axis: int, tiles: int, m: int, a: int) -> Array:
    """``[.., m * (tiles + 1), ..]`` -> ``[.., tiles, alpha, ..]``: the overlapping ``alpha``-long
    windows at stride ``m`` along ``axis``, as window ``i`` = block ``i`` (``m`` positions) and the
    first ``alpha - m <= m`` positions of block ``i + 1`` -- unit-stride slices and one
    concatenation."""
    shape = x.shape
    blocks = x.reshape(shape[:axis] + (tiles + 1, m) + shape[axis + 1 :])
    head = lax.slice_in_dim(blocks, 0, tiles, axis=axis)
    tail = lax.slice_in_dim(blocks, 1, tiles + 1, axis=axis)
    tail = lax.slice_in_dim(tail, 0, a - m, axis=axis + 1)
    return jnp.concatenate([head, tail], axis=axis + 1)


def _untile_axis(d: Array, axis: int, tiles: int, m: int, a: int) -> Array:
    """The transpose of :func:`_tile_axis`: every window added back in place."""
    head_pads, tail_pads = [(0, 0)] * d.ndim, [(0, 0)] * d.ndim
    head_pads[axis], tail_pads[axis], tail_pads[axis + 1] = (0, 1), (1, 0), (0, 2 * m - a)
    total = jnp.pad(lax.slice_in_dim(d, 0, m, axis=axis + 1), head_pads) + jnp.pad(
        lax.slice_in_dim(d, m, a, axis=axis + 1), tail_pads
    )
    shape = total.shape
    return total.reshape(shape[:axis] + (m * (tiles + 1),) + shape[axis + 2 :])


def linear_with_transpose(
    apply: Callable[..., Array], transpose: Callable[..., Array], num_static: int
) -> tuple[Callable[..., Array], Callable[..., Array]]:
    """A linear map ``apply(x, *static)`` and its written-out ``transpose(y, *static)`` as two
    custom-VJP functions, each the other's VJP, so that derivatives of every order stay the two
    written-out functions (JAX's own transposes of slicing and padding maps can run several
    times slower on XLA:CPU). The ``num_static`` trailing arguments are hashable constants."""
    static = tuple(range(1, 1 + num_static))
    f = jax.custom_vjp(apply, nondiff_argnums=static)
    t = jax.custom_vjp(transpose, nondiff_argnums=static)
    # with nondiff_argnums the backward rule receives (*static, residuals, cotangent)
    f.defvjp(lambda x, *s: (f(x, *s), None), lambda *a: (t(a[-1], *a[:num_static]),))
    t.defvjp(lambda y, *s: (t(y, *s), None), lambda *a: (f(a[-1], *a[:num_static]),))
    return f, t


# The tiles of ``[B, m(th+1), m(tw+1), C]``, ``[B, th, alpha, tw, alpha, C]``, and their transpose
# (JAX's own transpose of the overlapping windows runs several times slower on XLA:CPU).
_winograd_tiles, _winograd_untile = linear_with_transpose(
    lambda x, th, tw, m, a: _tile_axis(_tile_axis(x, 1, th, m, a), 3, tw, m, a),
    lambda d, th, tw, m, a: _untile_axis(_untile_axis(d, 3, tw, m, a), 1, th, m, a),
    num_static=4,
)


def conv_winograd(x: Array, kernel: Array, pads: Sequence[tuple[int, int]]) -> Array:
    """Stride-1 2D 3x3 or 4x4 cross-correlation by Winograd's minimal filtering: F(4x4, 3x3) or
    F(3x3, 4x4), 6x6 input tiles either way. The padded input is cut into overlapping 6x6
    tiles (stride ``m``, the output tile), each transformed by ``B^T d B``; the kernel by ``G g
    G^T``; then 36 matrix products ``[tiles, Cin] x [Cin, Cout]``, one per transformed position,
    and ``A^T M A`` back to ``m x m`` output tiles -- 36 instead of 144 products per tile and
    channel pair. Each transform is one small matrix product (the Kronecker product of its two
    1D matrices), which keeps the graph, and XLA's compile time, small. Gradients are the same
    steps transposed. Exact in exact arithmetic; float32 rounding is about 10x a direct
    convolution's (:func:`winograd_convolutions`). :func:`conv_nd` routes here where it is
    faster (``_winograd_is_faster``).
    """
    r = _winograd_kernel_extent(kernel)
    if x.ndim != 4 or r is None:
        raise ValueError(
            f"conv_winograd needs a 2D input [B, H, W, C] and a 3x3 or 4x4 kernel [k, k, Cin, "
            f"Cout], got {x.shape} and {kernel.shape}"
        )
    if any(p < 0 for pp in pads for p in pp):
        raise ValueError(f"conv_winograd needs paddings >= 0, got {pads}")
    b, h, w, cin = x.shape
    bt, g, at = (np.kron(v, v).astype(x.dtype) for v in _WINOGRAD_TRANSFORMS[r])
    m, a = _WINOGRAD_TRANSFORMS[r][2].shape
    ho, wo = _conv_out_sizes((h, w), (r, r), (1, 1), pads)
    th, tw = -(-ho // m), -(-wo // m)
    # pad to whole tiles: m * (t + 1) >= m * t + r - 1 input positions (m >= r - 1); never below
    # ``pads``' high side
    xp = jnp.pad(
        x,
        [
            (0, 0),
            (pads[0][0], m * (th + 1) - h - pads[0][0]),
            (pads[1][0], m * (tw + 1) - w - pads[1][0]),
            (0, 0),
        ],
    )
    d = _winograd_tiles(xp, th, tw, m, a).transpose(2, 4, 0, 1, 3, 5)  # [a, a, B, th, tw, C]
    v = jnp.tensordot(bt, d.reshape(a * a, b * th * tw, cin), 1)
    u = jnp.dot(g, kernel.reshape(r * r, -1).astype(x.dtype)).reshape(a * a, cin, -1)
    mm = jnp.matmul(v, u)  # [alpha^2, tiles, Cout]
    y = jnp.tensordot(at, mm, 1).reshape(m, m, b, th, tw, -1)
    y = y.transpose(2, 3, 0, 4, 1, 5).reshape(b, m * th, m * tw, -1)
    return y[:, :ho, :wo]


def _winograd_is_faster(x: Array, kernel: Array, out: Sequence[int]) -> bool:
    """The route to :func:`conv_winograd` (see ``_WINOGRAD_MIN_CHANNELS``): float32 3x3 and 4x4
    kernels with many channels, at least ``_WINOGRAD_MIN_TILES`` output tiles and outputs of at
    least ``_WINOGRAD_MIN_SIZE`` per axis, unless :func:`winograd_convolutions` is off."""
    r = _winograd_kernel_extent(kernel)
    if r is None:
        return False
    m = _WINOGRAD_TRANSFORMS[r][2].shape[0]
    tiles = x.shape[0] * int(np.prod([-(-o // m) for o in out]))
    return (
        _WINOGRAD.get()
        and x.dtype == jnp.float32
        and kernel.dtype == jnp.float32
        and min(kernel.shape[-2:]) >= _WINOGRAD_MIN_CHANNELS
        and tiles >= _WINOGRAD_MIN_TILES[r]
        and min(out) >= _WINOGRAD_MIN_SIZE[r]
    )


def _row_blocks_contraction(a: Array, b: Array) -> Array:
    """``a^T b`` for ``a: [M, P]`` and ``b: [M, Q]`` (a weight gradient: the contraction runs
    over the long row axis) as a product batched over up to 16 row blocks, then summed. XLA:CPU
    runs the batched form on the operands as they are; given the plain ``a^T b`` it may first
    write a transposed copy of the larger operand, fused into that operand's producer (the 2x
    up-sampling's kernel gradient in U-Net 3D: a 240 ms transposing copy, BENCHMARKS.md).

    The blocks' partial products (``blocks x P x Q``) are kept to at most an eighth of the
    operands' size (``M x (P + Q)``): for few rows and many channels (U-Net 2D's deepest
    up-sampling, 512 rows, 256 x 512 channels) 16 blocks wrote and summed 8 MB of partial
    products, 14 ms of a 400 ms step, for a 0.13 GFLOP product."""
    m, p, q = a.shape[0], a.shape[1], b.shape[1]
    cap = max(1, min(16, m * (p + q) // (8 * p * q)))
    blocks = max(v for v in range(1, cap + 1) if m % v == 0)
    return lax.dot_general(
        a.reshape(blocks, m // blocks, p),
        b.reshape(blocks, m // blocks, q),
        (((1,), (1,)), ((0,), (0,))),
    ).sum(0)


@jax.custom_vjp
def channel_matmul(x: Array, kernel: Array) -> Array:
    """``x @ kernel`` over the channel axis (``x: [..., Cin]``, ``kernel: [Cin, Cout]``): a 1x1
    convolution, or :class:`UpSample`'s product before depth-to-space. The same values as
    ``jnp.dot``; its VJP computes the kernel gradient with :func:`_channel_kernel_gradient`
    (oneDNN's weights primitive for the 1x1 convolution where it runs, else a product batched
    over row blocks). Reverse-mode derivatives of every order work (the VJP is made of ordinary
    products and oneDNN's primitives, each with its own VJP); forward-mode (``jax.jvp``) does
    not, as with any custom VJP."""
    return jnp.dot(x, kernel)


def _channel_matmul_fwd(x, kernel):
    return jnp.dot(x, kernel), (x, kernel)


def _channel_matmul_bwd(res, dy):
    x, kernel = res
    return jnp.dot(dy, kernel.T).astype(x.dtype), _channel_kernel_gradient(x, dy).astype(
        kernel.dtype
    )


# oneDNN's weights primitive for the kernel gradient of a 1x1 convolution (:func:`channel_matmul`)
# from this many rows (batch x spatial positions) in float32, every one in bfloat16. Against
# :func:`_row_blocks_contraction`, alone (2-core EPYC, ms): U-Net 2D's head 8 x 128^2, 32 -> 3,
# 0.92 against 3.13; U-Net 3D's head 2 x 64^3, 32 -> 4, 4.31 against 14.82 (XLA's product of a
# long axis with 3 or 4 columns is slow); wider products 2 x 32^3, 32 -> 256, 11.5 against 14.6,
# and 8 x 64^2, 64 -> 128, 3.95 against 5.90; but U-Net 3D's up-samplers 2 x 8^3 (1024 rows), 128
# -> 512, 1.51 against 1.36, and 2 x 4^3, 1.17 against 0.73. In bfloat16, 1.13 against 6.02 ms
# (U-Net 2D's head) and 3.23 against 16.52 (U-Net 3D's). Steps (one process, interleaved, median
# per-round ratio of the times with / without): U-Net 3D 0.983 (2360 against 2398 ms) and in
# bfloat16 0.984; U-Net 2D 128^2 in bfloat16 0.958 (221.5 against 228.5 ms), in float32 0.998
# (noise).
_ONEDNN_1X1_KERNEL_GRADIENT_MIN_ROWS = 1 << 12


def _channel_kernel_gradient(x: Array, dy: Array) -> Array:
    """``x^T dy`` over every axis but the channels: the kernel gradient of ``x @ kernel``
    (``[Cin, Cout]``), by oneDNN's weights primitive for the 1x1 convolution where it runs
    (``x`` ``[B, *spatial, Cin]`` with 1-3 spatial axes, ``dy`` of its dtype,
    ``_ONEDNN_1X1_KERNEL_GRADIENT_MIN_ROWS``), else :func:`_row_blocks_contraction`."""
    cin, cout = x.shape[-1], dy.shape[-1]
    d = x.ndim - 2
    kernel = jax.ShapeDtypeStruct((1,) * d + (cin, cout), x.dtype)
    ones, zeros = (1,) * d, ((0, 0),) * d
    rows = int(np.prod(x.shape[:-1]))
    if (
        d >= 1
        and dy.dtype == x.dtype
        and (_onednn_takes_every(x) or rows >= _ONEDNN_1X1_KERNEL_GRADIENT_MIN_ROWS)
        and onednn.applies(x, kernel, ones, zeros)
    ):
        return onednn.conv_kernel_gradient(x, dy, kernel.shape, ones, zeros).reshape(cin, cout)
    return _row_blocks_contraction(x.reshape(-1, cin), dy.reshape(-1, cout))


channel_matmul.defvjp(_channel_matmul_fwd, _channel_matmul_bwd)


# Where :func:`_conv3d_depth_fold_large` beats the depth-stacked route: float32 stride-1 3D
# convolutions with at least this many output positions (batch x spatial) and ``kd * Cin``
# channels in their depth-stacked form. U-Net 3D at 2 x 64^3 (its 64^3 level: 524288 positions,
# 96 and 192 stacked channels), in one process against the depth-stacked route: 4718 -> 4184 ms
# per step; at 2 x 48^3 (221184 positions) no gain was measured (2201 / 2272 ms), nor for the
# first 2 -> 32 convolution (6 stacked channels), whose filter gradient is cheap either way.
_FOLD_LARGE_MIN_POSITIONS = 1 << 18
_FOLD_LARGE_MIN_CHANNELS = 32


def _depth_views(xp: Array, kd: int, sd: int, do: int) -> Array:
    """The ``kd`` depth views (stride ``sd``, ``do`` slices each) of the depth-padded ``xp:
    [B, D_pad, ..., C]`` stacked along channels: ``[B, do, ..., kd * C]``, ordered ``(tap, c)``."""
    return jnp.concatenate([xp[:, i : i + sd * (do - 1) + 1 : sd] for i in range(kd)], axis=-1)


def _conv3d_input_stacked(
    x: Array, kernel: Array, strides: Sequence[int], pads: Sequence[tuple[int, int]]
) -> Array:
    """3D convolution with depth extent ``kd > 1`` as one 2D convolution: the ``kd`` (strided)
    depth views of the depth-padded input stacked along channels, ``[B * D', H, W, kd *
    Cin]``, with the kernel reshaped to ``[kh, kw, kd * Cin, Cout]``."""
    b, dd, h, w, cin = x.shape
    (kd, kh, kw), sd = kernel.shape[:3], strides[0]
    (do,) = _conv_out_sizes((dd,), (kd,), (sd,), (pads[0],))
    xp = jnp.pad(x, [(0, 0), tuple(pads[0]), (0, 0), (0, 0), (0, 0)])
    xs = _depth_views(xp, kd, sd, do).reshape(b * do, h, w, kd * cin)
    k2 = jnp.moveaxis(kernel, 0, 2).reshape(kh, kw, kd * cin, kernel.shape[-1])
    y = conv_nd(xs, k2, strides[1:], pads[1:], fast=True)
    return y.reshape((b, do) + y.shape[1:])


def _conv3d_output_stacked(x: Array, kernel: Array, pads: Sequence[tuple[int, int]]) -> Array:
    """Stride-1 3D convolution as one 2D convolution with the depth taps stacked along the
    OUTPUT channels: every depth slice of the depth-padded input times every depth tap,
    ``[B * D_pad, H', W', kd * Cout]``, then output slice ``d`` is the sum over taps ``t`` of
    tap ``t``'s channels at depth slice ``d + t``. XLA:CPU runs a 2D convolution to ``kd *
    Cout`` channels faster than one from ``kd * Cin`` channels when ``Cout`` is small (32 ->
    32 at 2 x 64^3, forward: 181 against 251 ms)."""
    b, dd, h, w, cin = x.shape
    kd, kh, kw, _, cout = kernel.shape
    (do,) = _conv_out_sizes((dd,), (kd,), (1,), (pads[0],))
    xp = jnp.pad(x, [(0, 0), tuple(pads[0]), (0, 0), (0, 0), (0, 0)])
    dp = xp.shape[1]
    k2 = jnp.moveaxis(kernel, 0, 3).reshape(kh, kw, cin, kd * cout)  # columns ordered (tap, c)
    z = conv_nd(xp.reshape(b * dp, h, w, cin), k2, 1, pads[1:], fast=True)
    z = z.reshape((b, dp) + z.shape[1:3] + (kd, cout))
    return functools.reduce(jnp.add, [z[:, t : t + do, :, :, t] for t in range(kd)])


def _conv3d_filter_gradient(
    x: Array, dy: Array, kernel_shape: Sequence[int], pads: Sequence[tuple[int, int]]
) -> Array:
    """The kernel gradient of a stride-1 3D convolution as ONE product (batched over row
    blocks) on the padded output grid ``[B, D', H_pad, W_pad]``: the depth-stacked padded input
    ``[.., kd * Cin]`` against the ``kh * kw`` in-plane shifts of the output gradient
    ``[.., kh * kw * Cout]`` (shift ``(i, j)`` puts ``dy[h, w]`` at ``(h + i, w + j)``, zero
    elsewhere), so entry ``((t, c), (i, j, o))`` is ``sum x_pad[d + t, h + i, w + j, c] dy[d, h,
    w, o]``. Returns ``[kd, kh, kw, Cin, Cout]``."""
    kd, kh, kw, cin, cout = kernel_shape
    b, do, ho, wo, _ = dy.shape
    hp, wp = ho + kh - 1, wo + kw - 1
    xs = _depth_views(jnp.pad(x, [(0, 0), *pads, (0, 0)]), kd, 1, do)  # [b, do, hp, wp, kd*cin]
    dyp = jnp.pad(dy, [(0, 0), (0, 0), (kh - 1, kh - 1), (kw - 1, kw - 1), (0, 0)])
    shifts = [
        dyp[:, :, kh - 1 - i : kh - 1 - i + hp, kw - 1 - j : kw - 1 - j + wp]
        for i in range(kh)
        for j in range(kw)
    ]
    g = _row_blocks_contraction(
        xs.reshape(-1, kd * cin), jnp.concatenate(shifts, axis=-1).reshape(-1, kh * kw * cout)
    )
    return g.reshape(kd, cin, kh, kw, cout).transpose(0, 2, 3, 1, 4)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv3d_depth_fold_large(x: Array, kernel: Array, pads: tuple[tuple[int, int], ...]) -> Array:
    """Stride-1 3D convolution for large outputs (``_conv3d_depth_fold_large_is_faster``):
    forward :func:`_conv3d_output_stacked`; input gradient the depth-stacked route's;
    kernel gradient :func:`_conv3d_filter_gradient`. Derivatives of every reverse order work
    (the VJP is made of ordinary convolutions and products)."""
    return _conv3d_output_stacked(x, kernel, pads)


def _conv3d_depth_fold_large_fwd(x, kernel, pads):
    return _conv3d_output_stacked(x, kernel, pads), (x, kernel)


def _conv3d_depth_fold_large_bwd(pads, res, dy):
    x, kernel = res
    _, vjp = jax.vjp(lambda v: _conv3d_input_stacked(v, kernel, (1, 1, 1), pads), x)
    (dx,) = vjp(dy)
    return dx, _conv3d_filter_gradient(x, dy, kernel.shape, pads).astype(kernel.dtype)


_conv3d_depth_fold_large.defvjp(_conv3d_depth_fold_large_fwd, _conv3d_depth_fold_large_bwd)


def _conv3d_depth_fold_large_is_faster(
    x: Array, kernel: Array, strides: Sequence[int], pads: Sequence[tuple[int, int]]
) -> bool:
    """The route to :func:`_conv3d_depth_fold_large` (see ``_FOLD_LARGE_MIN_POSITIONS``), on
    the CPU backend only: it was measured there, and its kernel gradient holds ``kh * kw``
    shifted copies of the output gradient (U-Net 3D at 2 x 64^3: XLA's buffers 1983 -> 3105
    MiB), a cost that GPU and TPU convolutions do not need."""
    out = _conv_out_sizes(x.shape[1:-1], kernel.shape[:3], strides, pads)
    return (
        jax.default_backend() == "cpu"
        and all(s == 1 for s in strides)
        and all(p >= 0 for pp in pads for p in pp)
        and x.dtype == jnp.float32
        and kernel.dtype == jnp.float32
        and x.shape[0] * int(np.prod(out)) >= _FOLD_LARGE_MIN_POSITIONS
        and kernel.shape[0] * kernel.shape[3] >= _FOLD_LARGE_MIN_CHANNELS
    )


_ONEDNN_MIN_POSITIONS = 1 << 12
# Stride-1 convolutions from 512 output positions (oneDNN's faster exact form of each is timed,
# ``medjax.models.onednn``): 8 x 16^2, 128 -> 128, forward + backward 5.6 against 6.7 ms;
# 2 x 8^3, 256 -> 128, 13.9 against 16.8; below that XLA's (2 x 4^3, 128 -> 256: 2.8 against 4.5).
# With fewer than 8 output channels from 2^12 positions as before (the PatchGAN's last layer,
# 1 x 31^2, 512 -> 1, k4: 1.84 against 1.24 ms; CycleGAN's 1 x 256^2, 64 -> 3, k7: 37 against 82).
_ONEDNN_STRIDE_1_MIN_POSITIONS = 1 << 9
_ONEDNN_FEW_OUT_CHANNELS = 8
# 3D ones from 200 output positions, whatever their channels: Vox2Vox's PatchGAN layer 2 x 6^3,
# 64 -> 128, k4 p1 (250 positions, im2col's 64 taps) takes 3.6 against 6.4 ms forward +
# backward, and Vox2Vox's step is 3 % faster (one process, interleaved, 120-150 rounds: per-round
# ratios 1.031 and 1.046; 2-core EPYC). From 100 or 128 positions, which adds its 128 -> 1 head
# (2 x 4^3 outputs), the step gained less (1.012, 1.019), and the Xeon's 2 x 4^3 case above
# is XLA's.
_ONEDNN_3D_STRIDE_1_MIN_POSITIONS = 200
# On the 2-core Xeon with AMX from 100 (200 until session 49): Vox2Vox's critic head on the fake
# pairs alone (2 x 5^3, 128 -> 1, k4: 128 output positions), whose im2col data gradient XLA
# summed from 64 shifted slices; its step 1.105 and 1.090 (80 rounds each, quartiles
# 1.043-1.177), from 1 position 1.023.
_ONEDNN_3D_STRIDE_1_MIN_POSITIONS_AMX = 100
_ONEDNN_SPATIAL_DIMS = (2, 3)
# Strided convolutions with at least 8 input channels (below that oneDNN's strided kernels lose:
# 1 x 256^2, 3 -> 64, k4 s2, forward + backward 8.1 against 6.3 ms; Vox2Vox's first layers, 2 x
# 48^3, 1 or 2 -> 16, k4 s2, the two gradients 7.1 / 6.1 against 3.8 / 2.0 ms) and at least this
# many output positions, per number of spatial axes; where oneDNN's bfloat16 kernels are AMX's
# (an Intel Xeon), ``_ONEDNN_STRIDED_MIN_POSITIONS_AMX``. Measured (float32, forward / the two
# gradients, ms; steps: one process, routes interleaved, per-round ratios, ``BENCHMARKS.md``):
# - 2D, the 2-core EPYC (AVX-512, no AMX): DCGAN's and WGAN-GP's critic layer 64 x 8^2, 256 ->
#   512, k4 s2 (1024 positions) 19.1 / 46.2 against im2col's 24.8 / 52.7; steps WGAN-GP 1.080,
#   DCGAN 1.034-1.039, pix2pix (two 32^2-output layers) 0.989, within its noise. On the 2-core
#   Xeon with AMX that layer took 75.1 against 61.5 forward + backward: there strided 2D ones
#   whose outputs are all at most ``_IM2COL_MAX_STRIDED_EXTENT`` keep im2col. The Xeon's other
#   ones from 2^10 positions (2^12 until session 49): pix2pix's 1 x 64^2, 128 -> 256 layers
#   (generator, and the critic on the real and fake pairs) made its step 1.015, 1.032 and 1.024
#   times as fast (16, 30 and 40 rounds).
# - 3D, the 2-core EPYC, against the space-to-depth form (a kernel-2 convolution of the folded
#   input): Vox2Vox's k4 s2 layers 2 x 24^3, 16 -> 32 1.02 / 2.56 against 1.88 / 3.65; 2 x
#   12^3, 32 -> 64 0.50 / 1.32 against 1.36 / 2.37; 2 x 6^3, 64 -> 128 (54 positions) 0.32 /
#   1.45 against 0.86 / 2.32; Vox2Vox's step 1.108 and 1.120 (60 rounds each; from 200 and from
#   32 positions).
# - 3D, the 2-core Xeon with AMX, from 200 positions (none until session 49: Vox2Vox's step
#   took 122 against 113 ms with them, in session 37's handler): forward / the two gradients,
#   ms, now against XLA's formulations: k3 s2 2 x 64^3, 32 -> 64 23.5 / 85.5 against 76.1 /
#   171.6, 2 x 32^3, 64 -> 128 13.7 / 25.8 against 26.1 / 51.0, 2 x 16^3, 128 -> 256 6.6 / 14.2
#   against 8.7 / 17.5; Vox2Vox's k4 s2 2 x 24^3, 16 -> 32 0.77 / 2.22 against 2.12 / 3.35
#   (space-to-depth form), 2 x 12^3, 32 -> 64 0.40 / 1.75 against 0.91 / 2.34; Vox2Vox's step
#   1.044, 1.058 (from 1 position), 1.064 and 1.026 (from 200; 100 rounds each). Its 2 x 6^3,
#   64 -> 128 (54 positions) keeps im2col's one product.
_ONEDNN_STRIDED_MIN_CHANNELS = 8
_ONEDNN_STRIDED_MIN_POSITIONS = {2: 1 << 10, 3: 1}
_ONEDNN_STRIDED_MIN_POSITIONS_AMX = {2: 1 << 10, 3: 200}


def _amx() -> bool:
    """Whether oneDNN's bfloat16 kernels here are AMX's (Intel's Sapphire Rapids and later):
    the CPU class whose measurements set the ``*_AMX`` thresholds of the oneDNN routes."""
    return onednn.bfloat16_kernels() == "avx512_core_amx"


def _onednn_min_positions(
    table: Mapping[int, int], table_amx: Mapping[int, int], d: int
) -> int | None:
    """The fewest output positions (batch x spatial) from which a route sends a ``d``-D
    convolution to oneDNN: ``table[d]``, or ``table_amx[d]`` on a CPU with AMX (``_amx``);
    None where the table has no ``d`` (never)."""
    return (table_amx if _amx() else table).get(d)


def _small_2d_side_on_amx(extents: Sequence[int]) -> bool:
    """Whether a 2D convolution's small side (a strided one's output, a transposed one's input:
    ``extents``) is at most ``_IM2COL_MAX_STRIDED_EXTENT`` per axis on a CPU with AMX, where
    such float32 ones keep XLA's formulations (``_onednn_is_faster``,
    ``_onednn_transpose_is_faster``): DCGAN's critic layer 8^2 -> 4^2 and its generator's 4^2
    -> 8^2, each other's adjoint."""
    return len(extents) == 2 and max(extents) <= _IM2COL_MAX_STRIDED_EXTENT and _amx()


def _onednn_takes_every(x: Array) -> bool:
    """Whether every convolution of ``x`` that oneDNN can run goes to it, whatever its shape:
    bfloat16, which XLA:CPU convolves no faster than float32 while oneDNN's AMX kernels are
    4-10x faster. Keeping XLA's routes for some was slower (float32's thresholds, 2-core Xeon
    with AMX: pix2pix 633 and DCGAN 548 ms a step against 494 and 357; 2-core EPYC with
    AVX-512 BF16 and no AMX: DCGAN 722 against 532; ``BENCHMARKS.md``)."""
    return x.dtype == jnp.bfloat16


def _onednn_is_faster(
    x: Array, kernel: Array, strides: Sequence[int], pads: Sequence[tuple[int, int]]
) -> bool:
    """The route to :func:`medjax.models.onednn.conv`, where oneDNN can run
    (:func:`medjax.models.onednn.applies`): every bfloat16 one (``_onednn_takes_every``), and
    float32 ones as follows. Stride-1 convolutions with
    ``_ONEDNN_SPATIAL_DIMS`` spatial axes (2D and 3D) and at least
    ``_ONEDNN_STRIDE_1_MIN_POSITIONS`` output positions (batch x spatial;
    ``_ONEDNN_MIN_POSITIONS`` with fewer than ``_ONEDNN_FEW_OUT_CHANNELS`` outputs; 3D ones
    from ``_ONEDNN_3D_STRIDE_1_MIN_POSITIONS``, ``_ONEDNN_3D_STRIDE_1_MIN_POSITIONS_AMX`` on a
    CPU with AMX), except
    those that Winograd's algorithm computes (``_winograd_is_faster``), and strided ones with
    at least ``_ONEDNN_STRIDED_MIN_CHANNELS`` input channels and, per number of spatial axes,
    ``_ONEDNN_STRIDED_MIN_POSITIONS`` output positions (2D from 2^10, 3D all; on a CPU with
    AMX ``_ONEDNN_STRIDED_MIN_POSITIONS_AMX``: 2D from 2^10 as well, 3D from 200, and no 2D
    one whose output extents are all at most ``_IM2COL_MAX_STRIDED_EXTENT``, which
    :func:`conv_im2col` computes faster there).

    Measured (steps, one process, routes interleaved; 2-core Xeon, BENCHMARKS.md): U-Net 3D
    4439 against 6899 ms (its levels below 32^3 made no measurable difference either way);
    with the 2D route, U-Net 2D 8 x 256^2 1480 against 1781 ms, 8 x 128^2 377 against 403,
    DCGAN 753 against 827, WGAN-GP 3672 against 4002, the classifier 65 against 73.
    CycleGAN's 256 -> 256 residual-block convolutions are faster by Winograd (4x fewer
    products): 126 against 206 ms forward + backward at 4 x 64^2, and its step took 9213
    against 6769 ms with oneDNN taking them. Strided 2D convolutions by oneDNN directly
    rather than XLA's formulations (space-to-depth, one convolution per stride phase),
    forward + backward: CycleGAN's 1 x 256^2, 64 -> 128, k3 s2 31.2 against 54.5 ms, DCGAN's
    64 x 32^2, 64 -> 128, k4 s2 38.6 against 46.6, but 75.1 against 61.5 at 64 x 8^2,
    256 -> 512 (1024 output positions; the 2-core EPYC without AMX: 46.2 against 52.7 for
    the gradients, see ``_ONEDNN_STRIDED_MIN_POSITIONS``); steps: DCGAN 652 against 690,
    WGAN-GP 3100 against 3339, pix2pix 544 against 556. Strided 3D ones below 200 output
    positions on the Xeon (and those with fewer than 8 input channels everywhere) keep XLA's
    formulations, whose stride-1 convolution may then take this route: the kernel-2 3D one
    of a k4 s2's space-to-depth form, the depth-stacked 2D one of a k3 s2."""
    if _onednn_takes_every(x):
        return onednn.applies(x, kernel, strides, pads)
    d = x.ndim - 2
    out = _conv_out_sizes(x.shape[1:-1], kernel.shape[:d], strides, pads)
    if all(s == 1 for s in strides):
        if d not in _ONEDNN_SPATIAL_DIMS or (d == 2 and _winograd_is_faster(x, kernel, out)):
            return False
        if d == 3:  # oneDNN's native 3D convolution against XLA's depth-stacked or im2col forms
            least = (
                _ONEDNN_3D_STRIDE_1_MIN_POSITIONS_AMX
                if _amx()
                else _ONEDNN_3D_STRIDE_1_MIN_POSITIONS
            )
        elif kernel.shape[-1] < _ONEDNN_FEW_OUT_CHANNELS:
            least = _ONEDNN_MIN_POSITIONS
        else:
            least = _ONEDNN_STRIDE_1_MIN_POSITIONS
    elif x.shape[-1] < _ONEDNN_STRIDED_MIN_CHANNELS:
        return False
    else:
        least = _onednn_min_positions(
            _ONEDNN_STRIDED_MIN_POSITIONS, _ONEDNN_STRIDED_MIN_POSITIONS_AMX, d
        )
        if least is None or _small_2d_side_on_amx(out):
            return False
    return x.shape[0] * int(np.prod(out)) >= least and onednn.applies(x, kernel, strides, pads)


def _used_taps(
    spatial: Sequence[int],
    ks: Sequence[int],
    strides: Sequence[int],
    pads: Sequence[tuple[int, int]],
) -> list[tuple[int, int]] | None:
    """Per spatial axis, the first and last kernel tap that meets the input at some output
    position, when on some axis they are not all of them (with non-negative padding), else
    None. The taps outside only ever multiply padding: on a 2 x 2 input the k4 s2 p1
    convolution (pix2pix's innermost down-sampler, 512 -> 512 channels) reads the centre 2 x 2
    of its 4 x 4 kernel, and its gradient is zero elsewhere.

    Along an axis of ``n`` inputs with ``out`` outputs, output ``o`` reads input
    ``o * s + t - lo`` at tap ``t``, which is in ``[0, n)`` for ``t`` from
    ``lo - (out - 1) * s`` to ``lo + n - 1`` at some ``o``."""
    outs = _conv_out_sizes(spatial, ks, strides, pads)
    if any(p < 0 for pair in pads for p in pair) or min(outs) < 1:
        return None
    used = [
        (max(0, lo - (out - 1) * s), min(k - 1, lo + n - 1))
        for n, k, s, (lo, _), out in zip(spatial, ks, strides, pads, outs, strict=True)
    ]
    if all((a, b) == (0, k - 1) for (a, b), k in zip(used, ks, strict=True)):
        return None
    return used


def conv_nd(
    x: Array,
    kernel: Array,
    strides: Sequence[int] | int = 1,
    padding: Padding = "SAME",
    *,
    fast: bool = True,
) -> Array:
    """N-D cross-correlation, same semantics as :func:`jax.lax.conv_general_dilated`.

    With ``fast=True`` the following exact reformulations are used:

    * kernel taps that only ever meet the padding (a k4 s2 p1 kernel on a 2 x 2 input reads
      its centre 2 x 2) are dropped first (``_used_taps``), the padding cut to match;
    * float32 convolutions with enough output positions (``_onednn_is_faster``'s
      thresholds), on a CPU with oneDNN installed: stride-1 2D and 3D ones unless Winograd's
      algorithm takes them (see below), and strided 2D ones (and 3D ones on a CPU without
      AMX): oneDNN's convolution (:func:`medjax.models.onednn.conv`);
    * kernel of all ones (1x1): strided slicing + :func:`channel_matmul`;
    * 3D kernel with depth extent ``kd > 1``: pad depth, stack the ``kd`` shifted (strided)
      depth views along channels -> ``[B*D', H, W, kd*Cin]`` and run one 2D convolution with
      the kernel reshaped to ``[kh, kw, kd*Cin, Cout]``. On XLA:CPU this is several times
      faster than the native 3D convolution, forward and backward. Large float32 stride-1
      ones (``_conv3d_depth_fold_large_is_faster``) stack the depth taps along the output
      channels instead in the forward and compute the kernel gradient as one matrix product
      (:func:`_conv3d_depth_fold_large`). Strided ones that the next route takes go there.
    * stride ``s > 1`` (the same on every axis) with kernel extents that are multiples of
      ``s`` (PyTorch's k4 s2 p1 down-sampler): :func:`conv_space_to_depth`, a stride-1
      convolution of the space-to-depth input, which then takes the routes above (a 3D one:
      one copy of the input, folded in all three axes, and a kernel-2 3D convolution, which
      oneDNN runs from ``_ONEDNN_3D_STRIDE_1_MIN_POSITIONS``; before, the depth stack's four
      depth views and then a 2D space-to-depth copied the input twice, each copy four times
      its size: Vox2Vox's step 3-5 % slower, ``BENCHMARKS.md``); other
      strides ``s > 1`` at batch sizes up to ``_SMALL_BATCH``: :func:`conv_stride_phases`,
      one stride-1 convolution per phase.
    * stride 1 with very few output channels: :func:`conv_overlap_add`
      (``_overlap_add_conv_is_faster``); inside :func:`second_order_convolutions`, 2D kernels
      of extent <= 2 carry their own VJP.
    * at most ``_IM2COL_MAX_POSITIONS`` output positions (batch x spatial), or strided with
      every output extent at most ``_IM2COL_MAX_STRIDED_EXTENT``: :func:`conv_im2col`, one
      matrix product with the kernel as it is (``_im2col_is_faster``; in the code it comes
      after the 1x1, oneDNN, second-order kernel-2 and overlap-add forms, and before the 3D,
      space-to-depth and stride-phase ones).
    * stride-1 float32 3x3 and 4x4 kernels with many channels and large outputs
      (``_winograd_is_faster``): :func:`conv_winograd`, Winograd's F(4x4, 3x3) or F(3x3, 4x4),
      unless :func:`winograd_convolutions` is off.
    * otherwise XLA's convolution, of the input zero-padded beforehand at batch sizes up to
      ``_SMALL_BATCH`` (a faster filter gradient there).

    Args:
      x: ``[B, *spatial, Cin]``.
      kernel: ``[*k, Cin, Cout]``.
      strides: int or one per spatial axis.
      padding: ``'SAME'``, ``'VALID'`` or one ``(low, high)`` pair per spatial axis.
      fast: use the reformulations above.

    Returns:
      ``[B, *spatial_out, Cout]``.
    """
    d = x.ndim - 2
    ks = tuple(kernel.shape[:d])
    strides = _tuple(strides, d, "strides")
    pads = _resolve_padding(x.shape[1:-1], ks, strides, padding)
    dn = _dimension_numbers(d)
    if not fast:
        return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=dn)

    used = _used_taps(x.shape[1:-1], ks, strides, pads)
    if used is not None:  # taps that only ever meet padding: drop them
        taps = tuple(slice(a, b + 1) for a, b in used)
        pads = [
            (lo - a, hi - (k - 1 - b)) for (lo, hi), k, (a, b) in zip(pads, ks, used, strict=True)
        ]
        return conv_nd(x, kernel[taps], strides, pads, fast=True)

    if all(k == 1 for k in ks):
        if any(p != (0, 0) for p in pads):
            x = jnp.pad(x, [(0, 0)] + pads + [(0, 0)])
        if any(s != 1 for s in strides):
            x = x[(slice(None),) + tuple(slice(None, None, s) for s in strides)]
        return channel_matmul(x, kernel.reshape(kernel.shape[-2:]))

    if _onednn_is_faster(x, kernel, strides, pads):
        return onednn.conv(x, kernel, strides, pads)

    if (
        _SECOND_ORDER.get()
        and d == 2
        and strides == (1, 1)
        and max(ks) <= 2
        and all(0 <= p <= k - 1 for k, pp in zip(ks, pads, strict=True) for p in pp)
    ):
        return _conv2d_small(x, kernel, tuple(tuple(p) for p in pads))

    if all(s == 1 for s in strides) and _overlap_add_conv_is_faster(kernel.shape):
        return conv_overlap_add(x, kernel, pads)

    if _im2col_is_faster(x, ks, strides, pads):
        return conv_im2col(x, kernel, pads, strides)

    s = strides[0]
    uniform = all(v == s for v in strides) and all(p >= 0 for pp in pads for p in pp)
    space_to_depth_applies = uniform and s > 1 and all(k % s == 0 for k in ks)

    if d == 3 and ks[0] > 1 and not space_to_depth_applies:
        if _conv3d_depth_fold_large_is_faster(x, kernel, strides, pads):
            return _conv3d_depth_fold_large(x, kernel, tuple(tuple(p) for p in pads))
        return _conv3d_input_stacked(x, kernel, strides, pads)

    if uniform:
        if space_to_depth_applies:
            return conv_space_to_depth(x, kernel, s, pads)
        if s > 1 and x.shape[0] <= _SMALL_BATCH:
            return conv_stride_phases(x, kernel, s, pads)
        if s == 1:
            out = _conv_out_sizes(x.shape[1:-1], ks, strides, pads)
            if _winograd_is_faster(x, kernel, out):
                return conv_winograd(x, kernel, pads)

    flat = [p for pp in pads for p in pp]
    if x.shape[0] <= _SMALL_BATCH and any(flat) and min(flat) >= 0:
        x, pads = jnp.pad(x, [(0, 0), *pads, (0, 0)]), [(0, 0)] * d
    return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=dn)


def add_bias(y: Array, bias: Array) -> Array:
    """``y + bias.astype(y.dtype)`` over the last axis. For a ``y`` narrower than float32
    (bfloat16) the gradient of ``bias`` is summed in float32 in two stages and never rounded to
    ``y``'s dtype: XLA:CPU reduced a bfloat16 gradient inside a training step by a float32 copy
    and a reduce-window (DCGAN's 64 x 32^2 x 64 first layer: 31 ms a step). That form carries
    a custom VJP: gradients of any order work, forward mode (``jax.jvp``) does not."""
    if jnp.finfo(y.dtype).bits >= 32:
        return y + bias.astype(y.dtype)
    return _add_bias_narrow(y, bias)


@jax.custom_vjp
def _add_bias_narrow(y: Array, bias: Array) -> Array:
    return y + bias.astype(y.dtype)


def _add_bias_narrow_fwd(y, bias):
    return _add_bias_narrow(y, bias), bias  # [C]: only its dtype is used


def _add_bias_narrow_bwd(bias, g):
    rows = g.reshape(-1, g.shape[-1])
    block = next(b for b in (256, 64, 16, 4, 1) if rows.shape[0] % b == 0)
    partial = jnp.sum(rows.reshape(-1, block, rows.shape[-1]), axis=1, dtype=jnp.float32)
    return g, jnp.sum(partial, axis=0).astype(bias.dtype)


_add_bias_narrow.defvjp(_add_bias_narrow_fwd, _add_bias_narrow_bwd)


# --------------------------------------------------------------------------------------
# Convolutions
# --------------------------------------------------------------------------------------


class Conv(nn.Module):
    """N-D convolution with 'SAME' padding, parameter-compatible with :class:`flax.linen.Conv`.

    Parameters are ``kernel: [*kernel_size, Cin, features]`` and (if ``use_bias``)
    ``bias: [features]``, exactly as ``nn.Conv(features, kernel_size, strides,
    padding='SAME')`` creates them, so either module can apply the other's parameters. The
    computation goes through :func:`conv_nd` (fast exact reformulations for 1x1 and 3D
    kernels).

    Attributes:
      features: number of output channels ``Cout``.
      kernel_size: int or one per spatial axis.
      strides: int or one per spatial axis.
      spatial_dims: number of spatial axes ``d`` (2 or 3; any ``d >= 1`` works).
      use_bias: add a learned bias.
      dtype: compute dtype (parameters stay float32).
      fast: use the fast reformulations (``False``: plain ``lax.conv_general_dilated``).
      kernel_init: kernel initializer (default LeCun normal, like ``nn.Conv``).
      bias_init: bias initializer (default zeros).

    Input ``[B, *spatial, Cin]`` -> output ``[B, *ceil(spatial / strides), features]``.
    """

    features: int
    kernel_size: int | Sequence[int] = 3
    strides: int | Sequence[int] = 1
    spatial_dims: int = 2
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    fast: bool = True
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = self.spatial_dims
        if x.ndim != d + 2:
            raise ValueError(f"expected [B, *{d} spatial, C] input, got shape {x.shape}")
        ks = _tuple(self.kernel_size, d, "kernel_size")
        kernel = self.param("kernel", self.kernel_init, ks + (x.shape[-1], self.features))
        x = x.astype(self.dtype)
        y = conv_nd(x, kernel.astype(self.dtype), self.strides, "SAME", fast=self.fast)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,))
            y = add_bias(y, bias)
        return y


# 2D ones from 2^10 output positions; 3D ones from 2^15, where the CPU has no AMX, and from
# 2^17 where it has (the 2-core Xeon, with the tunables of the scripts, forward / backward ms
# against the 1x1 convolution + depth-to-space: 2 x 32^3, 32 -> 32 9.5 / 21.3 against 15.1 /
# 20.9, but 2 x 16^3, 64 -> 32 (2^16 output positions) 3.0 / 3.3 against 1.6 / 2.9; U-Net 3D's
# step (2 x 64^3, one process, interleaved, per-round ratios) 1.017-1.044 against no 3D ones,
# 1.000 against 2^15; none until session 49). The 2-core EPYC, forward /
# backward ms against the 1x1 convolution + depth-to-space (U-Net 3D's up-samplers): 2 x 32^3,
# 32 -> 32: 12.2 / 25.5 against 27.3 / 21.9; 2 x 16^3, 64 -> 32: 2.6 / 4.0 against 4.1 / 5.8;
# but 2 x 8^3, 128 -> 64 (2^13 output positions): 1.1 / 3.8 against 1.0 / 2.1. U-Net 3D's step
# (2 x 64^3, one process, routes interleaved, 8 rounds): 2323 against 2385 ms without 3D ones
# (per-round ratio 0.974), 2312 with every 3D one (0.999 against this threshold).
_ONEDNN_UPSAMPLE_MIN_POSITIONS = {2: 1 << 10, 3: 1 << 15}
_ONEDNN_UPSAMPLE_MIN_POSITIONS_AMX = {2: 1 << 10, 3: 1 << 17}


def _onednn_upsample_is_faster(x: Array, kernel: Array) -> bool:
    """The route of :class:`UpSample` to oneDNN's transposed convolution
    (:func:`medjax.models.onednn.conv_transpose` with stride 2 and no padding), which writes
    the channels-last output directly instead of a 1x1 convolution's ``2^d * features``
    channels and their depth-to-space copy: from ``_ONEDNN_UPSAMPLE_MIN_POSITIONS`` output
    positions (batch x spatial; 2D from 2^10, 3D from 2^15; on a CPU with AMX
    ``_ONEDNN_UPSAMPLE_MIN_POSITIONS_AMX``: 3D from 2^17), where oneDNN can run.

    Measured (2-core Xeon, forward / backward ms, against the 1x1 convolution + depth-to-space):
    8 x 128^2, 32 -> 32: 4.4 / 23.0 against 12.5 / 22.6; 8 x 64^2, 32 -> 32: 1.0 / 3.6 against
    2.7 / 6.2; 8 x 16^2, 128 -> 64: 0.5 / 1.3 against 0.7 / 2.2; 8 x 8^2, 256 -> 128: 0.6 / 1.4
    against 0.9 / 1.8; equal at 64 x 4^2, 128 -> 64 and 1 x 16^2, 64 -> 32. U-Net 2D's step
    (8 x 128^2, one process, interleaved): 281 against 286 ms. In 3D it wins from 2^17 output
    positions on the Xeon (2 x 32^3, 32 -> 32: 9.5 / 21.3 against 15.1 / 20.9; until session 49
    it lost there, 7.5 / 23.4 against 13.2 / 14.9, and the Xeon had no 3D ones), from 2^15 on
    the 2-core EPYC without AMX."""
    return _onednn_doubling_applies(
        x, kernel, _ONEDNN_UPSAMPLE_MIN_POSITIONS, _ONEDNN_UPSAMPLE_MIN_POSITIONS_AMX, pad=0
    )


def _doubled_positions(x: Array) -> int:
    """The output positions (batch x spatial) of a stride-2 transposed convolution of ``x``
    ``[B, *spatial, C]``, which doubles every spatial extent."""
    return x.shape[0] * 2 ** (x.ndim - 2) * int(np.prod(x.shape[1:-1]))


def _onednn_doubling_applies(
    x: Array,
    kernel: Array,
    table: Mapping[int, int],
    table_amx: Mapping[int, int],
    pad: int,
) -> bool:
    """Whether a stride-2 transposed convolution of ``x`` (padding ``pad`` per side) is one
    oneDNN takes whatever its shape (``_onednn_takes_every``) or has at least
    :func:`_onednn_min_positions`'s output positions (batch x 2^d x spatial) for its ``d``
    spatial axes, and oneDNN can run it (:func:`medjax.models.onednn.applies`)."""
    d = x.ndim - 2
    least = _onednn_min_positions(table, table_amx, d)
    return (
        _onednn_takes_every(x) or (least is not None and _doubled_positions(x) >= least)
    ) and onednn.applies(x, kernel, (2,) * d, [(pad, pad)] * d)


class UpSample(nn.Module):
    """Kernel-2 stride-2 transposed convolution (2x up-sampling), N-D.

    Parameter-compatible with ``nn.ConvTranspose(features, (2,)*d, strides=(2,)*d,
    padding='SAME')``: ``kernel: [2]*d + [Cin, features]``, ``bias: [features]``, and the same
    output. With ``fast=True`` a large 2D one runs as oneDNN's transposed convolution where
    oneDNN can run (``_onednn_upsample_is_faster``), any other as a 1x1 convolution to
    ``2^d * features`` channels followed by depth-to-space (pixel shuffle; Shi et al. 2016,
    "Real-Time Single Image and Video Super-Resolution Using an Efficient Sub-Pixel CNN"):
    the stride-2 kernel-2 transposed convolution has no overlapping taps, so output position
    ``2i + r`` is ``x[i] @ kernel[1 - r]`` (``lax.conv_transpose``'s tap order, which is
    reversed with respect to PyTorch's ``ConvTranspose``).

    Attributes:
      features: number of output channels.
      spatial_dims: number of spatial axes ``d``.
      use_bias: add a learned bias.
      dtype: compute dtype.
      fast: 1x1 conv + depth-to-space (``False``: ``lax.conv_transpose``).
      kernel_init: kernel initializer.
      bias_init: bias initializer.

    Input ``[B, *spatial, Cin]`` -> output ``[B, *(2 * spatial), features]``.
    """

    features: int
    spatial_dims: int = 2
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    fast: bool = True
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = self.spatial_dims
        if x.ndim != d + 2:
            raise ValueError(f"expected [B, *{d} spatial, C] input, got shape {x.shape}")
        cin = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (2,) * d + (cin, self.features))
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        if self.fast and _onednn_upsample_is_faster(x, kernel):
            y = onednn.conv_transpose(x, kernel, (2,) * d, [(0, 0)] * d)
        elif self.fast:
            k = jnp.flip(kernel, axis=tuple(range(d)))  # [r_1..r_d, Cin, Cout], r = 1 - tap
            k = jnp.moveaxis(k, d, 0).reshape(cin, 2**d * self.features)
            y = depth_to_space(channel_matmul(x, k), 2)
        else:
            y = lax.conv_transpose(
                x, kernel, (2,) * d, "SAME", dimension_numbers=_dimension_numbers(d)
            )
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,))
            y = add_bias(y, bias)
        return y


class StridedConv4(nn.Module):
    """Kernel-4 stride-2 convolution with 'SAME' padding (the DCGAN/pix2pix down-sampler), N-D.

    Parameter-compatible with ``nn.Conv(features, (4,)*d, strides=(2,)*d, padding='SAME')``
    (for even sizes this is PyTorch's ``Conv(k=4, s=2, p=1)``). With ``fast=True`` it is
    :func:`conv_nd`'s strided route: pad as 'SAME' does (the padded length is always
    ``2 * (out + 1)``), fold 2^d blocks into channels (space-to-depth) and run a kernel-2
    stride-1 'VALID' convolution with the kernel rearranged to ``[2]*d + [2^d * Cin, Cout]``
    -- the same products without the stride (in 3D after the depth axis is stacked).

    Attributes:
      features: number of output channels.
      spatial_dims: number of spatial axes ``d``.
      use_bias: add a learned bias.
      dtype: compute dtype.
      fast: space-to-depth formulation (``False``: plain strided convolution).
      kernel_init: kernel initializer.
      bias_init: bias initializer.

    Input ``[B, *spatial, Cin]`` -> output ``[B, *ceil(spatial / 2), features]``.
    """

    features: int
    spatial_dims: int = 2
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    fast: bool = True
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = self.spatial_dims
        if x.ndim != d + 2:
            raise ValueError(f"expected [B, *{d} spatial, C] input, got shape {x.shape}")
        cin = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (4,) * d + (cin, self.features))
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        y = conv_nd(x, kernel, 2, "SAME", fast=self.fast)  # fast: conv_space_to_depth
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,))
            y = add_bias(y, bias)
        return y


# From 2^10 output positions; 3D ones from 2^14 where oneDNN's bfloat16 kernels are AMX's (an
# Intel Xeon, where XLA's routes won below, see ``_onednn_transpose_is_faster``). 2D ones from
# 2^10 there too since session 46 (a faster 2-core Xeon with AMX, float32 GEMM peak 333 GFLOP/s;
# steps, one process, interleaved, 2^10 / 2^14 per round: pix2pix 0.957 and 0.976 (16 and 24
# rounds), DCGAN 1.001, WGAN-GP 0.991; Vox2Vox's 3D ones 0.967 and 1.038, noise, so kept at
# 2^14). On the 2-core EPYC (AVX-512,
# no AMX), float32, forward / the two gradients, ms: pix2pix's 1 x 16^2, 1024 -> 256 (1024 output
# positions) 16.0-16.5 / 30.3-33.2 against the kernel-2 convolution's 16.3-16.6 / 41.2-43.3;
# DCGAN's 64 x 4^2, 512 -> 256 (4096) forward + backward 43.5-47.2 against 46.4-47.6; Vox2Vox's 2
# x 6^3, 256 -> 64 (3456) 1.84 / 5.08 against 2.64 / 7.18 (session 41). Steps (one process,
# routes interleaved, per-round ratios): pix2pix 1.036 (40 rounds), Vox2Vox 1.038 (50 rounds,
# quartiles 0.946-1.103), DCGAN 1.002, the 3D DCGAN 1.000.
# Session 50 (the same Xeon, float32, forward / backward ms alone, ``BENCHMARKS.md``): 3D ones
# take oneDNN's gradients from 2^11 output positions (the forward stays XLA's overlap-add below
# ``_ONEDNN_TRANSPOSE_FORWARD_MIN_POSITIONS_AMX``, ``_conv_transpose4_forward_on_xla``): 2 x 6^3,
# 128 -> 32 (Vox2Vox's) 1.48 / 2.65 against the overlap-add's 1.43 / 2.91 and oneDNN's 1.83 /
# 3.37; 1 x 8^3, 64 -> 32 1.10 / 1.55 against the sub-pixel route's 1.64 / 3.40; 4 x 4^3, 256 ->
# 128 the overlap-add's forward 4.9 and oneDNN's backward 11.0 against the sub-pixel route's
# 6.3 / 17.9; 2 x 8^3, 128 -> 64 4.8 / 8.1 against 4.7 / 14.2.
_ONEDNN_TRANSPOSE_MIN_POSITIONS = {2: 1 << 10, 3: 1 << 10}
_ONEDNN_TRANSPOSE_MIN_POSITIONS_AMX = {2: 1 << 10, 3: 1 << 11}
_ONEDNN_TRANSPOSE_FORWARD_MIN_POSITIONS_AMX = 1 << 14


def _onednn_transpose_is_faster(x: Array, kernel: Array) -> bool:
    """The route of :class:`ConvTranspose4` to oneDNN (:func:`medjax.models.onednn.conv_transpose`,
    the input gradient of the k4 s2 p1 convolution), where oneDNN can run: 2D and 3D, with at
    least ``_ONEDNN_TRANSPOSE_MIN_POSITIONS`` output positions (batch x spatial; on a CPU with
    AMX ``_ONEDNN_TRANSPOSE_MIN_POSITIONS_AMX``: 3D ones from 2^14).

    Measured forward + backward against the route below (2-core Xeon, ms): DCGAN's 64 x 16^2,
    128 -> 64, 42.2 against 57.1 and 64 x 8^2, 256 -> 128, 46.8 against 50.3; pix2pix's 1 x
    64^2, 512 -> 128, 90.8 against 100.3; but 77.8 against 43.0 at 64 x 4^2, 512 -> 256 (4096
    output positions) and 41.9 against 34.6 at 1 x 16^2, 1024 -> 256. Steps (one process,
    interleaved, with the strided route): DCGAN 659 against 681 ms, CycleGAN 5507 against
    5644, pix2pix 567 against 576, WGAN-GP 3092 against 3099. In 3D (Vox2Vox's up-samplers):
    2 x 12^3, 128 -> 32, 16.8 against 34.7 ms, 2 x 24^3, 64 -> 16, 35.0 against 44.6, but 16.6
    against 12.4 at 2 x 6^3, 256 -> 64 (3456 output positions); Vox2Vox's step 94 against 110
    ms (the EPYC's numbers are at ``_ONEDNN_TRANSPOSE_MIN_POSITIONS``).

    On the AMX Xeon, a float32 2D one whose input extents are all at most
    ``_IM2COL_MAX_STRIDED_EXTENT`` keeps XLA's route, as the strided convolution it is the
    adjoint of keeps im2col: DCGAN's generator layer 64 x 4^2, 512 -> 256, forward / backward
    16.0 / 34.9 ms by the sub-pixel route against oneDNN's 24.6 / 43.3; DCGAN's step 1.031x as
    fast (one process, interleaved, 16 rounds; session 50)."""
    if not _onednn_takes_every(x) and _small_2d_side_on_amx(x.shape[1:-1]):
        return False
    return _onednn_doubling_applies(
        x, kernel, _ONEDNN_TRANSPOSE_MIN_POSITIONS, _ONEDNN_TRANSPOSE_MIN_POSITIONS_AMX, pad=1
    )


def _conv_transpose4_forward_on_xla(x: Array, features: int) -> str | None:
    """The XLA formulation that computes the forward of a :class:`ConvTranspose4` on the
    oneDNN route whose gradients stay oneDNN's (:func:`_conv_transpose4_onednn_gradients`), or
    None where oneDNN computes it all:

    * fewer than ``_ONEDNN_TRANSPOSE_FEW_OUT_CHANNELS`` output channels, where oneDNN's
      transposed-convolution kernel is slow: the overlap-add in float32 with at most
      ``_FEW_OUT_OVERLAP_ADD_MAX_COLUMNS`` tap columns, the shuffle otherwise;
    * on a CPU with AMX, a float32 3D one below ``_ONEDNN_TRANSPOSE_FORWARD_MIN_POSITIONS_AMX``
      output positions: the overlap-add (the table above ``_onednn_transpose_is_faster``)."""
    d = x.ndim - 2
    float32 = x.dtype == jnp.float32
    if features < _ONEDNN_TRANSPOSE_FEW_OUT_CHANNELS:
        few_columns = 4**d * features <= _FEW_OUT_OVERLAP_ADD_MAX_COLUMNS
        return "overlap_add" if float32 and few_columns else "shuffle"
    mid_sized = _doubled_positions(x) < _ONEDNN_TRANSPOSE_FORWARD_MIN_POSITIONS_AMX
    if float32 and d == 3 and mid_sized and _amx():
        return "overlap_add"
    return None


# Below this many output channels oneDNN's transposed convolution (its data-gradient kernel) is
# slow, while the gradients it needs are oneDNN's fast forward and weights kernels: the forward
# is then an exact XLA formulation (_conv_transpose4_onednn_gradients).
_ONEDNN_TRANSPOSE_FEW_OUT_CHANNELS = 8
# Up to this many tap columns (4^d x output channels) that formulation is the overlap-add in
# float32; beyond, and in bfloat16, the single kernel-2 convolution (shuffle).
_FEW_OUT_OVERLAP_ADD_MAX_COLUMNS = 64


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_transpose4_onednn_gradients(x: Array, kernel: Array, forward: str) -> Array:
    """:class:`ConvTranspose4` on the oneDNN route with its forward by an XLA formulation,
    ``forward`` (``'overlap_add'``: :func:`conv_transpose4_overlap_add`, ``'shuffle'``:
    :func:`conv_transpose4_shuffle`; :func:`_conv_transpose4_forward_on_xla` chooses), and its
    gradients by oneDNN (:func:`medjax.models.onednn.conv_transpose`'s VJP: a strided forward
    convolution and a weights gradient; its own forward, unused, is dead code).

    With fewer than ``_ONEDNN_TRANSPOSE_FEW_OUT_CHANNELS`` output channels, measured forward /
    forward + backward against oneDNN's transposed convolution (2-core EPYC, ms): Vox2Vox's
    output layer, 2 x 24^3, 32 -> 1, 1.3 / 2.7 against 9.2 / 11.0; pix2pix's 1 x 128^2, 128 ->
    3, 1.4 / 4.3 against 5.4 / 8.9; DCGAN's 64 x 32^2, 64 -> 3, 3.3 / 9.2 against 11.9 / 18.1;
    in bfloat16 (shuffle) 3.7 against 7.1, 3.9 against 4.8 and 5.8 against 10.0 forward +
    backward. Steps (one process, interleaved, the per-round ratio of the times without to
    with it): Vox2Vox 0.934-0.937 (6 % faster), DCGAN 0.989, pix2pix 1.001; in bfloat16
    Vox2Vox 1.012 and DCGAN 0.980, within the noise."""
    if forward == "overlap_add":
        return conv_transpose4_overlap_add(x, kernel)
    return conv_transpose4_shuffle(x, kernel)


def _onednn_conv_transpose4(x: Array, kernel: Array) -> Array:
    d = x.ndim - 2
    return onednn.conv_transpose(x, kernel, (2,) * d, [(1, 1)] * d)


def _conv_transpose4_onednn_gradients_fwd(x, kernel, forward):
    return _conv_transpose4_onednn_gradients(x, kernel, forward), (x, kernel)


def _conv_transpose4_onednn_gradients_bwd(forward, res, g):
    return jax.vjp(_onednn_conv_transpose4, *res)[1](g)


_conv_transpose4_onednn_gradients.defvjp(
    _conv_transpose4_onednn_gradients_fwd, _conv_transpose4_onednn_gradients_bwd
)


def _kernel_phases(kernel: Array, stride: int) -> list[Array]:
    """``kernel[r_1::s, ..., r_d::s]`` for every phase ``r`` (``np.ndindex`` order) of a kernel
    ``[*k, Cin, Cout]`` whose extents are multiples of ``s``: one reshape and transpose, then a
    split, so that the kernel gradient is one concatenation and one transpose. Strided slices
    of the kernel would give one zero-padded kernel-size gradient per phase, summed by every
    consumer: pix2pix's 4 x 4 x 1024 x 512 up-samplers then fed Adam's three updates four
    32 MB arrays each (its step: 545 ms with the slices, 472 with this)."""
    d = kernel.ndim - 2
    ks, (cin, cout) = kernel.shape[:d], kernel.shape[d:]
    k = kernel.reshape([v for kk in ks for v in (kk // stride, stride)] + [cin, cout])
    k = k.transpose([*range(1, 2 * d, 2), *range(0, 2 * d, 2), 2 * d, 2 * d + 1])
    k = k.reshape((stride**d, *(kk // stride for kk in ks), cin, cout))
    return [p[0] for p in lax.split(k, (1,) * stride**d, axis=0)]


def _conv_transpose4_route(shape: Sequence[int], cout: int) -> str:
    """The fastest of :class:`ConvTranspose4`'s exact XLA formulations for an input ``shape``
    (``[B, *spatial, Cin]``), measured on XLA:CPU, forward + backward (``BENCHMARKS.md``):

    * ``'overlap_add'`` (:func:`conv_transpose4_overlap_add`) for few output channels, where
      XLA's convolutions are slow, and for inputs of at most ``_TAP_BATCHED_MAX_POSITIONS``
      positions (its products then batched over the taps, the kernel read as it is), and
      for 3D inputs of at most ``_IM2COL_MAX_POSITIONS`` positions, where the sub-pixel
      route's eight small convolutions and their gradients cost more than their products
      (2-core Xeon, forward / backward ms: Vox2Vox's 2 x 3^3, 128 -> 64 0.77 / 1.43 against
      1.15 / 2.16; 2 x 4^3, 64 -> 32 0.51 / 1.15 against 0.84 / 2.54; 1 x 6^3, 128 -> 64
      1.85 / 3.12 against 2.25 / 5.44; but 1 x 8^3, 64 -> 32 1.15 / 6.50 against 1.63 /
      3.40; in 2D no clear winner, session 50);
    * ``'shuffle'`` (:func:`conv_transpose4_shuffle`) at batch sizes up to ``_SMALL_BATCH``
      with every spatial extent >= 16 (its one-voxel border then costs at most 13 % more
      products in 2D): batch 1, 128^2, 128 -> 64 channels takes 87 ms against the sub-pixel
      convolutions' 140 and PyTorch's 146 (kernel 4; 91 with its kernel 3);
    * ``'overlap_add'`` again for a wide input, where the product dominates the overlap-add;
    * ``'subpixel'``: ``2^d`` kernel-2 convolutions, one per output phase, otherwise (larger
      batches, where XLA's padded convolutions are at their fastest).
    """
    batch, *spatial, cin = shape
    positions = batch * int(np.prod(spatial))
    if cout < 16 or positions <= _TAP_BATCHED_MAX_POSITIONS:
        return "overlap_add"
    if len(spatial) == 3 and positions <= _IM2COL_MAX_POSITIONS:
        return "overlap_add"
    if batch <= _SMALL_BATCH and min(spatial) >= 16:
        return "shuffle"
    return "overlap_add" if cin >= 4 * cout else "subpixel"


def conv_transpose4_one_position(x: Array, kernel: Array) -> Array:
    """Kernel-4 stride-2 'SAME' transposed convolution of an input with one position (every
    spatial extent 1; pix2pix's innermost up-sampler, 512 -> 512 channels) as one matrix
    product: output ``r`` (0 or 1 per axis) is ``x @ kernel[2 - r]``, so only the kernel's
    centre ``2^d`` taps are read; the others only meet padding (their gradient is zero).
    ``[B, 1, ..., 1, Cin]`` -> ``[B, 2, ..., 2, Cout]``."""
    d = x.ndim - 2
    b, cin, cout = x.shape[0], x.shape[-1], kernel.shape[-1]
    centre = jnp.flip(kernel[(slice(1, 3),) * d], tuple(range(d)))  # [r] = kernel[2 - r]
    y = channel_matmul(x.reshape(b, cin), jnp.moveaxis(centre, -2, 0).reshape(cin, -1))
    return y.reshape(b, *(2,) * d, cout)


def conv_transpose4_shuffle(x: Array, kernel: Array) -> Array:
    """Kernel-4 stride-2 'SAME' transposed convolution as ONE stride-1 kernel-2 convolution.

    Along each axis, output ``2m + r`` is ``x[m - 1 + r] @ kernel[r] + x[m + r] @ kernel[r +
    2]``. Pad the input by one zero per side and convolve it (kernel 2, 'VALID') to ``2^d *
    Cout`` channels, phase ``p`` of position ``j`` taking ``kernel[2a + 1 - p]`` at tap ``a``:
    depth-to-space (pixel shuffle) then places ``x[j - 1 + a] @ kernel[2a + 1 - p]`` at
    ``2j + p``, which is output ``2j + p - 1`` once one output per side is cropped. The same
    products as the sub-pixel convolutions plus those of a one-voxel border, in one convolution
    whose gradients are one convolution each (the input gradient is the k4 s2 strided
    convolution in its space-to-depth form). Same semantics as ``lax.conv_transpose(x, kernel,
    (2,) * d, 'SAME')``; arguments and output as :func:`conv_transpose4_overlap_add`'s.
    """
    d = x.ndim - 2
    cin, cout = kernel.shape[-2:]
    # kernel axis 4 -> (a, q) with tap 2a + q; phase p = 1 - q
    k = jnp.flip(kernel.reshape((2, 2) * d + (cin, cout)), tuple(range(1, 2 * d, 2)))
    k = k.transpose([*range(0, 2 * d, 2), 2 * d, *range(1, 2 * d, 2), 2 * d + 1])
    k = k.reshape((2,) * d + (cin, 2**d * cout))  # channels ordered (p_1..p_d, c)
    xp = jnp.pad(x, [(0, 0), *((1, 1),) * d, (0, 0)])
    y = depth_to_space(conv_nd(xp, k, 1, "VALID", fast=True), 2)
    return y[(slice(None), *(slice(1, -1),) * d)]


def conv_transpose4_overlap_add(x: Array, kernel: Array) -> Array:
    """Kernel-4 stride-2 'SAME' transposed convolution as one matrix product + overlap-add.

    ``z = x @ kernel`` gives every input position's contribution to all ``4^d`` taps at once
    (``[B, *spatial, 4^d, Cout]``, one matrix product with ``Cin`` contracted); output
    ``2m + r`` (per axis) is then the sum of ``z[m - 1 + r + t, tap r + 2t]`` over ``t in {0,
    1}`` -- a shift of each tap's slice, added into its phase, and the phases interleaved by
    depth-to-space. The same products as :class:`ConvTranspose4`'s sub-pixel convolutions, in
    a matrix product of ``4^d * Cout`` columns; its gradients are matrix products too (the
    taps' shifts transpose to shifts and a concatenation). Same semantics as
    ``lax.conv_transpose(x, kernel, (2,) * d, 'SAME')``.

    Args:
      x: ``[B, *spatial, Cin]``.
      kernel: ``[4] * d + [Cin, Cout]``.

    Returns:
      ``[B, *(2 * spatial), Cout]``.
    """
    d = x.ndim - 2
    b, *sp, cin = x.shape
    cout = kernel.shape[-1]
    taps = list(np.ndindex(*(4,) * d))
    # Tap a = r + 2t of input position p lands on phase r's output m = p + 1 - r - t.
    shifts = [[(1 - a % 2 - a // 2, a % 2 + a // 2 - 1) for a in tap] for tap in taps]
    phases: dict[tuple[int, ...], Array] = {}
    products = _shifted_tap_products(x, kernel.reshape(-1, cin, cout), shifts)
    for tap, za in zip(taps, products, strict=True):
        r = tuple(a % 2 for a in tap)
        phases[r] = za if r not in phases else phases[r] + za
    y = jnp.stack([phases[r] for r in np.ndindex(*(2,) * d)], axis=-2)
    return depth_to_space(y.reshape([b, *sp, 2**d * cout]), 2)


class ConvTranspose4(nn.Module):
    """Kernel-4 stride-2 transposed convolution (the DCGAN/pix2pix up-sampler), N-D.

    Parameter-compatible with ``nn.ConvTranspose(features, (4,)*d, strides=(2,)*d,
    padding='SAME')`` (PyTorch's ``ConvTranspose(k=4, s=2, p=1)`` with a spatially flipped
    kernel); output size is exactly twice the input. With ``fast=True`` the output is
    computed per phase (sub-pixel convolution): along each axis, output ``2m + r`` only sees
    ``x[m - 1 + r]`` and ``x[m + r]`` with taps ``kernel[r]`` and ``kernel[r + 2]``, so each of
    the ``2^d`` phases is a kernel-2 stride-1 convolution with ``kernel[r_1::2, ..., r_d::2]``
    and padding ``(1 - r, r)``; the phases are interleaved by depth-to-space. No
    multiplications by the zeros of a dilated input. For few output channels, a tiny input or
    a wide input it is instead one matrix product + overlap-add
    (:func:`conv_transpose4_overlap_add`), and at batch sizes up to 2 with every spatial
    extent >= 16 one kernel-2 convolution to all phases at once
    (:func:`conv_transpose4_shuffle`); ``_conv_transpose4_route`` decides.
    On CPUs with oneDNN, large ones are oneDNN's input gradient of the k4 s2 p1 convolution
    instead (``_onednn_transpose_is_faster``); with fewer than
    ``_ONEDNN_TRANSPOSE_FEW_OUT_CHANNELS`` output channels, and for mid-sized float32 3D ones
    on a CPU with AMX, only their gradients are oneDNN's, the forward the overlap-add or the
    shuffle (``_conv_transpose4_forward_on_xla``). An input of one position is one matrix
    product with the kernel's centre taps (:func:`conv_transpose4_one_position`).

    Attributes:
      features: number of output channels.
      spatial_dims: number of spatial axes ``d``.
      use_bias: add a learned bias.
      dtype: compute dtype.
      fast: the exact formulations above (``False``: ``lax.conv_transpose``).
      kernel_init: kernel initializer.
      bias_init: bias initializer.

    Input ``[B, *spatial, Cin]`` -> output ``[B, *(2 * spatial), features]``.
    """

    features: int
    spatial_dims: int = 2
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    fast: bool = True
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = self.spatial_dims
        if x.ndim != d + 2:
            raise ValueError(f"expected [B, *{d} spatial, C] input, got shape {x.shape}")
        cin = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (4,) * d + (cin, self.features))
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        route = None
        if self.fast and all(n == 1 for n in x.shape[1:-1]):
            route = "one_position"
        elif self.fast:
            route = (
                "onednn"
                if _onednn_transpose_is_faster(x, kernel)
                else _conv_transpose4_route(x.shape, self.features)
            )
        if route == "one_position":
            y = conv_transpose4_one_position(x, kernel)
        elif route == "onednn":
            forward = _conv_transpose4_forward_on_xla(x, self.features)
            if forward is None:
                y = _onednn_conv_transpose4(x, kernel)
            else:
                y = _conv_transpose4_onednn_gradients(x, kernel, forward)
        elif route == "overlap_add":
            y = conv_transpose4_overlap_add(x, kernel)
        elif route == "shuffle":
            y = conv_transpose4_shuffle(x, kernel)
        elif route == "subpixel":
            phases = []
            for r, k in zip(np.ndindex(*(2,) * d), _kernel_phases(kernel, 2), strict=True):
                pads = [(1 - ri, ri) for ri in r]
                phases.append(conv_nd(x, k, 1, pads, fast=True))
            y = jnp.concatenate(phases, axis=-1)  # channels ordered (r_1..r_d, c)
            y = depth_to_space(y, 2)
        else:
            y = lax.conv_transpose(
                x, kernel, (2,) * d, "SAME", dimension_numbers=_dimension_numbers(d)
            )
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,))
            y = add_bias(y, bias)
        return y


# --------------------------------------------------------------------------------------
# Normalisation and composite blocks
# --------------------------------------------------------------------------------------


def _num_groups(channels: int, max_groups: int) -> int:
    return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


def _moments(x: Array, axes: tuple[int, ...]) -> tuple[Array, Array, Array]:
    """(``x`` in at least float32, its mean and biased variance over ``axes``, kept as size-1
    axes). The variance is ``E[x^2] - E[x]^2`` clipped at 0, as Flax's normalisation layers
    compute it (``use_fast_variance``): one pass over ``x``."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(xf, axes, keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(xf), axes, keepdims=True) - jnp.square(mean), 0.0)
    return xf, mean, var


def _apply_activation(activation: Callable[[Array], Array] | None, z: Array) -> Array:
    return z if activation is None else activation(z)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _normalize(x, scale, bias, epsilon, activation, axes):
    return _normalize_res(x, scale, bias, epsilon, activation, axes)[0]


def _scale_shift(xf, mean, var, scale, bias, epsilon, activation):
    """``(activation(scale * (xf - mean) / sqrt(var + epsilon) + bias), 1 / sqrt(var +
    epsilon))``, as one multiply-add per element."""
    rstd = lax.rsqrt(var + epsilon)
    a = scale * rstd
    return _apply_activation(activation, xf * a + (bias - mean * a)), rstd


def _normalize_res(x, scale, bias, epsilon, activation, axes):
    xf, mean, var = _moments(x, axes)
    y, rstd = _scale_shift(xf, mean, var, scale, bias, epsilon, activation)
    return (y, mean, var), (x, scale, bias, mean, rstd)


def _normalize_fwd(x, scale, bias, epsilon, activation, axes):
    # symbolic zeros: the arguments come as CustomVJPPrimal (value, perturbed)
    return _normalize_res(x.value, scale.value, bias.value, epsilon, activation, axes)


_SymbolicZero = jax.custom_derivatives.SymbolicZero  # an unused output's cotangent


def _normalize_bwd(epsilon, activation, axes, res, cotangents):
    x, scale, bias, mean, rstd = res
    dy, dmean, dvar = cotangents
    n = np.prod([x.shape[i] for i in axes])
    centred = x.astype(mean.dtype) - mean
    xhat = centred * rstd
    if isinstance(dy, _SymbolicZero):
        g = jnp.zeros(xhat.shape, xhat.dtype)
    elif activation is None:
        g = dy.astype(xhat.dtype)
    else:
        z = xhat * scale + bias
        _, act_vjp = jax.vjp(activation, z)
        (g,) = act_vjp(dy.astype(z.dtype))
    sum_g = jnp.sum(g, axes, keepdims=True)
    sum_gx = jnp.sum(g * xhat, axes, keepdims=True)
    dx = (scale * rstd) * (g - (sum_g / n) - xhat * (sum_gx / n))
    # the statistics' own cotangents: nonzero only where they are used (running averages of
    # statistics feed no loss, and stay symbolic zeros)
    if not isinstance(dmean, _SymbolicZero):
        dx = dx + dmean / n
    if not isinstance(dvar, _SymbolicZero):
        dx = dx + (2.0 / n) * dvar * centred
    channels = tuple(range(x.ndim - 1))
    return (
        dx.astype(x.dtype),
        jnp.sum(sum_gx, channels).astype(scale.dtype),
        jnp.sum(sum_g, channels).astype(bias.dtype),
    )


_normalize.defvjp(_normalize_fwd, _normalize_bwd, symbolic_zeros=True)


def normalize(
    x: Array,
    scale: Array,
    bias: Array,
    axes: Sequence[int],
    *,
    epsilon: float = 1e-5,
    activation: Callable[[Array], Array] | None = None,
    dtype: Dtype | None = None,
) -> tuple[Array, Array, Array]:
    """``activation(scale * (x - mean) / sqrt(var + epsilon) + bias)`` with the mean and the
    biased variance of ``x`` over ``axes``, and those statistics: ``(y, mean, var)``, the
    statistics with ``axes`` removed.

    The normalisation behind :func:`instance_norm` (the spatial axes) and :class:`BatchNorm`
    (the batch and spatial axes). Statistics and arithmetic run in at least float32, and ``y``
    is cast to ``dtype`` (default: ``x``'s). Its VJP is written out, which autodiff of the
    composition does not find: the forward keeps only ``x`` and the per-channel statistics
    (not ``x - mean`` nor the activation's input, each a tensor the size of ``x``), and the
    backward is two passes over ``x`` and the output gradient (the two per-channel sums, then
    the input gradient), recomputing the normalised input. Gradients flow through the returned
    statistics too. Reverse-mode derivatives of every order work (the backward is ordinary
    differentiable operations, the activation's own VJP included); forward mode
    (``jax.jvp``) does not, as with any custom VJP.

    Args:
      x: ``[B, *spatial, C]``.
      scale, bias: ``[C]``.
      axes: the axes the statistics are taken over.
      epsilon: added to the variance.
      activation: an elementwise function, or ``None``.
      dtype: the dtype of ``y``.
    """
    axes = tuple(sorted(a % x.ndim for a in axes))
    stat = jnp.promote_types(x.dtype, jnp.float32)
    scale = jnp.asarray(scale, stat)
    bias = jnp.asarray(bias, stat)
    y, mean, var = _normalize(x, scale, bias, float(epsilon), activation, axes)
    return y.astype(dtype or x.dtype), jnp.squeeze(mean, axes), jnp.squeeze(var, axes)


def instance_norm(
    x: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    epsilon: float = 1e-5,
    activation: Callable[[Array], Array] | None = None,
    dtype: Dtype | None = None,
) -> Array:
    """Instance normalisation (Ulyanov et al. 2016) followed by an elementwise ``activation``.

    ``activation(scale * (x - mean) / sqrt(var + epsilon) + bias)`` with the mean and the
    (biased) variance per sample and channel over all spatial axes of ``x: [B, *spatial, C]``,
    as :class:`flax.linen.InstanceNorm` followed by the activation (the same values up to
    float rounding). Statistics and arithmetic run in at least float32; the result is cast to
    ``dtype`` (default: ``x``'s).

    Its VJP is written out (:func:`normalize`): 17-18 % less time than autodiff of
    ``nn.InstanceNorm`` + leaky ReLU, forward + backward, at 8 x 128^2 x 32 and 2 x 64^3 x 32
    (2-core Xeon). Reverse-mode derivatives of every order work; forward mode (``jax.jvp``)
    does not, as with any custom VJP.

    Args:
      x: ``[B, *spatial, C]``.
      scale, bias: ``[C]``, or ``None`` for none (affine-free).
      epsilon: added to the variance.
      activation: an elementwise function, or ``None``.
      dtype: result dtype.
    """
    c = x.shape[-1]
    scale = jnp.ones((c,)) if scale is None else scale
    bias = jnp.zeros((c,)) if bias is None else bias
    spatial = tuple(range(1, x.ndim - 1))
    y, _, _ = normalize(
        x, scale, bias, spatial, epsilon=epsilon, activation=activation, dtype=dtype
    )
    return y


class InstanceNorm(nn.Module):
    """:func:`instance_norm` as a module with the parameters of
    :class:`flax.linen.InstanceNorm` (``scale`` ones and ``bias`` zeros, ``[C]``, float32), so
    the two are interchangeable in a parameter tree; an optional activation is applied inside.

    Attributes:
      epsilon: added to the variance.
      use_scale, use_bias: learn a per-channel scale / bias.
      dtype: result dtype (default: the input's).
    """

    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, activation: Callable[[Array], Array] | None = None) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,)) if self.use_scale else None
        bias = self.param("bias", nn.initializers.zeros, (c,)) if self.use_bias else None
        return instance_norm(
            x, scale, bias, epsilon=self.epsilon, activation=activation, dtype=self.dtype
        )


class BatchNorm(nn.Module):
    """Batch normalisation (Ioffe & Szegedy 2015) followed by an optional elementwise
    activation, with the variables and values of :class:`flax.linen.BatchNorm` (``scale`` ones
    and ``bias`` zeros in ``'params'``; running ``mean`` zeros and ``var`` ones in
    ``'batch_stats'``, all ``[C]`` float32), so the two are interchangeable in a parameter
    tree and a checkpoint.

    ``train=True``: statistics of the batch over every axis but the channels (under ``jit``
    with the batch sharded, of the global batch), and the running averages updated as
    ``momentum * running + (1 - momentum) * batch`` (the biased variance, as Flax; apply with
    ``mutable=['batch_stats']``; not during ``init``). Its VJP is :func:`normalize`'s: one
    pass for the two sums, one for the input gradient, with the activation's derivative
    inside (24-33 % less time than autodiff of ``nn.BatchNorm`` + ReLU, forward + backward, at
    64 x 28^2 x 32 and 64 x 32^2 x 64, float32; 32-40 % in bfloat16; 2-core AMD EPYC).
    ``train=False``: the running averages.

    Attributes:
      momentum: of the running averages.
      epsilon: added to the variance.
      dtype: result dtype (default: the input's); statistics run in at least float32.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype | None = None

    @nn.compact
    def __call__(
        self,
        x: Array,
        *,
        train: bool = False,
        activation: Callable[[Array], Array] | None = None,
    ) -> Array:
        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        dtype = self.dtype or x.dtype
        if not train:
            xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
            y, _ = _scale_shift(
                xf, ra_mean.value, ra_var.value, scale, bias, self.epsilon, activation
            )
            return y.astype(dtype)
        batch_and_space = tuple(range(x.ndim - 1))
        y, mean, var = normalize(
            x,
            scale,
            bias,
            batch_and_space,
            epsilon=self.epsilon,
            activation=activation,
            dtype=dtype,
        )
        if not self.is_initializing():
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1 - m) * mean
            ra_var.value = m * ra_var.value + (1 - m) * var
        return y


class Norm(nn.Module):
    """Selects a normalisation layer by name.

    * ``'instance'``: :class:`InstanceNorm` (Ulyanov et al. 2016; the parameters and values of
      :class:`flax.linen.InstanceNorm`), statistics per sample and channel over all spatial
      axes, learned scale and bias.
    * ``'group'``: :class:`flax.linen.GroupNorm` (Wu & He 2018) with the largest divisor of the
      channel count that is ``<= num_groups`` groups.
    * ``'batch'``: :class:`BatchNorm` (Ioffe & Szegedy 2015; the variables and values of
      :class:`flax.linen.BatchNorm`), momentum 0.9, running statistics in the
      ``'batch_stats'`` collection, used when ``train=False`` (so ``apply(..., train=True,
      mutable=['batch_stats'])`` when training).
    * ``'none'``: identity.

    Attributes:
      kind: ``'instance'``, ``'group'``, ``'batch'`` or ``'none'``.
      num_groups: maximum number of groups for ``'group'``.
      epsilon: variance epsilon.
      dtype: compute dtype (statistics are computed in at least float32 by Flax).

    Input and output ``[B, *spatial, C]``.
    """

    kind: str = "instance"
    num_groups: int = 8
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: Array,
        *,
        train: bool = False,
        activation: Callable[[Array], Array] | None = None,
    ) -> Array:
        """Normalises ``x``, then applies ``activation`` (inside the normalisation's VJP for
        ``'instance'`` and ``'batch'``, see :func:`normalize`)."""
        if self.kind == "instance":
            return InstanceNorm(epsilon=self.epsilon, dtype=self.dtype, name="norm")(x, activation)
        if self.kind == "batch":
            norm = BatchNorm(momentum=0.9, epsilon=self.epsilon, dtype=self.dtype, name="norm")
            return norm(x, train=train, activation=activation)
        if self.kind == "group":
            g = _num_groups(x.shape[-1], self.num_groups)
            y = nn.GroupNorm(num_groups=g, epsilon=self.epsilon, dtype=self.dtype, name="norm")(x)
        elif self.kind == "none":
            y = x
        else:
            raise ValueError(f"unknown norm {self.kind!r}; use instance, group, batch or none")
        return _apply_activation(activation, y)


class ConvNormAct(nn.Module):
    """Convolution -> normalisation -> activation.

    The convolution has no bias when a normalisation follows (the norm's mean subtraction
    cancels it: its true gradient is zero and Adam would only amplify rounding noise), and a
    bias when ``norm='none'``.

    Attributes:
      features: number of output channels.
      kernel_size: int or one per spatial axis.
      strides: int or one per spatial axis ('SAME' padding).
      spatial_dims: number of spatial axes ``d``.
      norm: ``'instance'``, ``'group'``, ``'batch'`` or ``'none'`` (see :class:`Norm`).
      activation: name for :func:`get_activation`.
      dtype: compute dtype.
      fast: use the fast exact convolution formulations.

    Input ``[B, *spatial, Cin]`` -> output ``[B, *ceil(spatial / strides), features]``.
    """

    features: int
    kernel_size: int | Sequence[int] = 3
    strides: int | Sequence[int] = 1
    spatial_dims: int = 2
    norm: str = "instance"
    activation: str = "leaky_relu"
    dtype: Dtype = jnp.float32
    fast: bool = True

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        x = Conv(
            self.features,
            self.kernel_size,
            self.strides,
            self.spatial_dims,
            use_bias=self.norm == "none",
            dtype=self.dtype,
            fast=self.fast,
            name="conv",
        )(x)
        act = get_activation(self.activation)
        return Norm(self.norm, dtype=self.dtype, name="norm")(x, train=train, activation=act)


class ResidualBlock(nn.Module):
    """Pre-activation-free residual block (He et al. 2016, "Deep Residual Learning").

    ``act(norm(conv(act(norm(conv(x))))) + shortcut(x))`` with ``num_convs`` convolutions
    (the last one without activation before the sum); the shortcut is the identity, or a 1x1
    convolution + norm when the channel count or stride changes.

    Attributes:
      features: number of output channels.
      kernel_size: int or one per spatial axis.
      strides: stride of the first convolution (and of the shortcut).
      spatial_dims: number of spatial axes ``d``.
      norm: see :class:`Norm`.
      activation: name for :func:`get_activation`.
      num_convs: number of convolutions on the residual branch (>= 1).
      dtype: compute dtype.
      fast: use the fast exact convolution formulations.

    Input ``[B, *spatial, Cin]`` -> output ``[B, *ceil(spatial / strides), features]``.
    """

    features: int
    kernel_size: int | Sequence[int] = 3
    strides: int | Sequence[int] = 1
    spatial_dims: int = 2
    norm: str = "instance"
    activation: str = "leaky_relu"
    num_convs: int = 2
    dtype: Dtype = jnp.float32
    fast: bool = True

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        d = self.spatial_dims
        strides = _tuple(self.strides, d, "strides")
        h = x
        for i in range(self.num_convs):
            last = i == self.num_convs - 1
            h = ConvNormAct(
                self.features,
                self.kernel_size,
                strides if i == 0 else 1,
                d,
                self.norm,
                "none" if last else self.activation,
                self.dtype,
                self.fast,
                name=f"conv{i}",
            )(h, train=train)
        shortcut = x.astype(self.dtype)
        if x.shape[-1] != self.features or any(s != 1 for s in strides):
            shortcut = ConvNormAct(
                self.features,
                1,
                strides,
                d,
                self.norm,
                "none",
                self.dtype,
                self.fast,
                name="shortcut",
            )(x, train=train)
        return get_activation(self.activation)(h + shortcut)


class DownSample(nn.Module):
    """2x down-sampling: max-pooling or a stride-2 conv-norm-act.

    * ``'maxpool'``: window 2, stride 2, 'VALID' (odd sizes are floored, as in PyTorch/MONAI);
      channels unchanged.
    * ``'conv'``: :class:`ConvNormAct` with kernel 3, stride 2, 'SAME' (sizes are ceiled) to
      ``features`` channels (default: unchanged).

    Attributes:
      mode: ``'maxpool'`` or ``'conv'``.
      features: output channels for ``'conv'`` (``None``: same as the input).
      spatial_dims: number of spatial axes ``d``.
      norm: norm for ``'conv'``.
      activation: activation for ``'conv'``.
      dtype: compute dtype.
      fast: use the fast exact convolution formulations.

    Input ``[B, *spatial, C]`` -> ``[B, *floor(spatial / 2), C]`` (maxpool) or
    ``[B, *ceil(spatial / 2), features]`` (conv).
    """

    mode: str = "maxpool"
    features: int | None = None
    spatial_dims: int = 2
    norm: str = "instance"
    activation: str = "leaky_relu"
    dtype: Dtype = jnp.float32
    fast: bool = True

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        d = self.spatial_dims
        if self.mode == "maxpool":
            x = x.astype(self.dtype)
            if self.fast:
                return max_pool(x, 2)
            return nn.max_pool(x, (2,) * d, strides=(2,) * d, padding="VALID")
        if self.mode == "conv":
            feats = self.features or x.shape[-1]
            return ConvNormAct(
                feats, 3, 2, d, self.norm, self.activation, self.dtype, self.fast, name="conv"
            )(x, train=train)
        raise ValueError(f"unknown downsample mode {self.mode!r}; use 'maxpool' or 'conv'")


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al. 2018, "Attention U-Net: Learning Where to Look
    for the Pancreas").

    Given skip features ``x`` and the coarser gating signal ``g`` (the decoder map one level
    below), computes ``alpha = sigmoid(psi(relu(W_x(x) + W_g(g))))`` at the coarse resolution,
    where ``W_x`` is a kernel-2 stride-2 'SAME' convolution (no bias), ``W_g`` a 1x1 convolution and
    ``psi`` a 1x1 convolution to one channel; ``alpha`` is resampled (multi-linear) to ``x``'s
    size and the output is ``norm(W(x * alpha))`` with ``W`` a 1x1 convolution, as in the
    paper's reference implementation.

    Attributes:
      inter_features: channels of the intermediate space (``None``: ``max(Cx // 2, 1)``).
      spatial_dims: number of spatial axes ``d``.
      norm: norm after the output transform (see :class:`Norm`).
      dtype: compute dtype.
      fast: use the fast exact convolution formulations.

    ``__call__(x [B, *S, Cx], g [B, *S', Cg], *, train)`` with ``S'`` about ``S / 2``
    (any size; mismatches are padded/cropped) -> ``[B, *S, Cx]``. The attention coefficients
    are sown as ``intermediates/alpha`` (``[B, *S, 1]``).
    """

    inter_features: int | None = None
    spatial_dims: int = 2
    norm: str = "instance"
    dtype: Dtype = jnp.float32
    fast: bool = True

    @nn.compact
    def __call__(self, x: Array, g: Array, *, train: bool = False) -> Array:
        d = self.spatial_dims
        cx = x.shape[-1]
        inter = self.inter_features or max(cx // 2, 1)
        x = x.astype(self.dtype)
        # W_x: kernel 2 stride 2, like the paper's sub-sampling convolution.
        theta = Conv(
            inter, 2, 2, d, use_bias=False, dtype=self.dtype, fast=self.fast, name="theta_x"
        )(x)
        phi = Conv(inter, 1, 1, d, use_bias=True, dtype=self.dtype, fast=self.fast, name="phi_g")(g)
        phi = match_spatial(phi, theta.shape[1:-1])
        f = nn.relu(theta + phi)
        psi = Conv(1, 1, 1, d, use_bias=True, dtype=self.dtype, fast=self.fast, name="psi")(f)
        alpha = nn.sigmoid(psi.astype(jnp.float32))
        alpha = jax.image.resize(alpha, alpha.shape[:1] + x.shape[1:-1] + (1,), "linear")
        self.sow("intermediates", "alpha", alpha)
        y = x * alpha.astype(self.dtype)
        y = Conv(
            cx, 1, 1, d, use_bias=self.norm == "none", dtype=self.dtype, fast=self.fast, name="out"
        )(y)
        return Norm(self.norm, dtype=self.dtype, name="out_norm")(y, train=train)
