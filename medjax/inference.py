"""Sliding-window inference over whole 2D/3D volumes (MONAI ``sliding_window_inference``-style).

A network trained on crops (windows) is applied to a whole volume by tiling the volume with
overlapping windows, predicting each window, and blending the overlapping predictions with a
per-voxel importance weight (a Gaussian centred in the window by default, as in nnU-Net and
MONAI's ``mode="gaussian"``, so that the less reliable window borders count less):

    out[v] = sum_w imp(v - start_w) * pred_w[v - start_w] / sum_w imp(v - start_w)

Everything is functional and jit-able. The window layout is static (it depends only on shapes),
so it is computed in Python at trace time; the windows are then visited in groups of
``window_batch`` inside one ``lax.scan``, so memory is bounded by the window batch and not by the
number of windows. Jit it yourself (the caller owns jit), closing over the model function::

    infer = jax.jit(
        functools.partial(sliding_window_inference, predict_fn, window=(96, 96, 96), overlap=0.5)
    )
    logits = infer(volume)  # [*spatial, C_in] -> [*spatial, C_out]

To keep large parameters as arguments of the executable (rather than constants baked into it),
pass them in explicitly::

    infer = jax.jit(
        lambda params, vol: sliding_window_inference(
            lambda x: model.apply(params, x), vol, window=(96, 96, 96), window_batch=4
        )
    )
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

__all__ = [
    "IMPORTANCE_FLOOR",
    "gaussian_importance",
    "sliding_window_inference",
    "window_starts",
]

IMPORTANCE_FLOOR = 1e-6
"""Smallest importance weight (the map's maximum is 1).

The exact Gaussian never reaches zero, but with a small ``sigma_scale`` its tails underflow
(and denormals are flushed to zero on accelerators), which would leave border voxels with zero
total weight (0/0). MONAI and nnU-Net replace zeros by the smallest non-zero value; we clamp to
this fixed floor instead, which is independent of the window size and far below any weight that
matters where windows overlap (at the default ``sigma_scale=0.125`` the corner of a 3D window has
weight exp(-24) ~ 4e-11 before clamping, so the floor only affects voxels that no window centre
is near, e.g. volume corners with ``overlap=0``).
"""

WINDOW_MODES = ("gaussian", "constant")  # window weighting of sliding_window_inference


def _check_window(window: Sequence[int], what: str = "window") -> tuple[int, ...]:
    win = tuple(int(w) for w in window)
    if (
        not win
        or any(w < 1 for w in win)
        or any(w != float(x) for w, x in zip(win, window, strict=True))
    ):
        raise ValueError(f"{what} must be a non-empty sequence of positive ints, got {window!r}")
    return win


def gaussian_importance(
    window: Sequence[int], sigma_scale: float = 0.125, dtype: Any = jnp.float32
) -> Array:
    """Separable Gaussian importance map for one window.

    ``imp[i_1, ..., i_d] = prod_k exp(-(i_k - c_k)^2 / (2 sigma_k^2))`` with the geometric centre
    ``c_k = (window_k - 1) / 2`` (symmetric, so both halves of the window weigh the same; MONAI
    and nnU-Net put the peak at voxel ``window_k // 2`` instead, half a voxel off for even sizes)
    and ``sigma_k = sigma_scale * window_k`` (0.125 is the MONAI/nnU-Net default). The map is
    normalised to a maximum of 1 and clamped below at :data:`IMPORTANCE_FLOOR` so that every voxel
    gets a positive weight.

    Args:
      window: window size per spatial axis, e.g. ``(96, 96, 96)``.
      sigma_scale: Gaussian sigma as a fraction of the window size (> 0).
      dtype: dtype of the returned map.

    Returns:
      ``[*window]`` array of weights in ``[IMPORTANCE_FLOOR, 1]``.
    """
    win = _check_window(window)
    if not sigma_scale > 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    imp = np.ones((), np.float64)
    for w in win:
        i = np.arange(w, dtype=np.float64)
        g = np.exp(-((i - (w - 1) / 2.0) ** 2) / (2.0 * (sigma_scale * w) ** 2))
        imp = np.multiply.outer(imp, g)
    imp = np.maximum(imp / imp.max(), IMPORTANCE_FLOOR)
    return jnp.asarray(imp, dtype=dtype)


def _axis_starts(size: int, window: int, stride: int) -> list[int]:
    """MONAI's ``dense_patch_slices`` rule for one axis (``size >= window``)."""
    starts = list(range(0, size - window, stride))
    starts.append(size - window)  # the last window is flush with the end
    return sorted(set(starts))


def window_starts(
    shape: Sequence[int], window: Sequence[int], overlap: float
) -> list[tuple[int, ...]]:
    """Start corners of the windows tiling a volume, MONAI's enumeration.

    Per axis: ``stride = max(1, int(window * (1 - overlap)))``; starts ``0, stride, 2 stride,
    ...`` while the window does not reach the end, then one window flush with the end
    (``size - window``), deduplicated. The result is the Cartesian product over the axes (last
    axis fastest). An axis shorter than the window has the single start 0: the volume is padded
    to the window size there (see :func:`sliding_window_inference`).

    Example: size 10, window 4, overlap 0.5 -> ``0, 2, 4, 6``; size 9 -> ``0, 2, 4, 5``.

    Args:
      shape: spatial shape of the volume (no channel axis).
      window: window size per axis, same length as ``shape``.
      overlap: fraction of the window shared by neighbours, in ``[0, 1)``.

    Returns:
      list of start tuples, one per window.
    """
    win = _check_window(window)
    shp = _check_window(shape, "shape")
    if len(shp) != len(win):
        raise ValueError(f"shape {tuple(shape)} and window {win} have different lengths")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    per_axis = [
        _axis_starts(max(s, w), w, max(1, int(w * (1.0 - overlap))))
        for s, w in zip(shp, win, strict=True)
    ]
    return list(itertools.product(*per_axis))


def sliding_window_inference(
    predict_fn: Callable[[Array], Array],
    volume: Array,
    window: Sequence[int],
    *,
    overlap: float = 0.5,
    window_batch: int = 4,
    sigma_scale: float = 0.125,
    mode: str = "gaussian",
    pad_value: float = 0.0,
    window_sharding: jax.sharding.Sharding | None = None,
) -> Array:
    """Blended predictions of ``predict_fn`` over all windows of one volume.

    The windows (:func:`window_starts`) are processed in groups of ``window_batch`` inside a
    ``lax.scan``: each group is cut out with ``lax.dynamic_slice``, predicted in one call of
    ``predict_fn`` on ``[window_batch, *window, C_in]``, weighted by the importance map and added
    into an output accumulator ``[*spatial, C_out]`` and a weight accumulator ``[*spatial, 1]``
    (``lax.dynamic_update_slice``); the result is their ratio. The last group is filled up by
    repeating a valid window with weight 0, so nothing is counted twice. Axes shorter than the
    window are padded symmetrically with ``pad_value`` (extra voxel at the high end, as MONAI)
    and the output is cropped back.

    Memory (bytes, ``S`` = voxels of the volume after padding, ``W`` = voxels of a window,
    ``B = window_batch``, ``e`` = bytes per input element, ``A`` = activation bytes of
    ``predict_fn`` for one window):

        input                     S * C_in * e   (+ the padded copy, only when padding)
        output accumulator        S * C_out * 4
        weight accumulator        S * 4
        output                    S * C_out * 4  (XLA may reuse the output accumulator)
        window batch + preds      B * W * (C_in * e + C_out * 4)
        predict_fn activations    ~ B * A

    i.e. at most ``S * (C_in * e + 4 * (2 C_out + 1)) + B * (W * (C_in * e + 4 C_out) + A)``:
    the volume-sized part does not depend on the number of windows, the rest grows with ``B``
    only. Measured (``benchmarks/bench_sliding_window.py``, CPU, no padding): XLA computes the
    output in place of the output accumulator, and ``memory_analysis()`` temp bytes equal the
    temp bytes of ``predict_fn`` alone on ``B`` windows plus the weight accumulator exactly.

    Jit with the static arguments bound, e.g.
    ``jax.jit(functools.partial(sliding_window_inference, fn, window=(96, 96, 96)))``.

    Args:
      predict_fn: ``[b, *window, C_in] -> [b, *window, C_out]`` (e.g. logits; cast to float32),
        traced once with ``b = window_batch``.
      volume: ONE volume ``[*spatial, C_in]`` (no batch axis), 2D or 3D (any number of axes).
      window: window size per spatial axis (static).
      overlap: fraction of the window shared by neighbouring windows, in ``[0, 1)`` (static).
      window_batch: windows per ``predict_fn`` call (static); bounds the memory.
      sigma_scale: Gaussian sigma as a fraction of the window size (``mode="gaussian"``).
      mode: ``"gaussian"`` (:func:`gaussian_importance`) or ``"constant"`` (plain average).
      pad_value: value for the padding of axes shorter than the window.
      window_sharding: optional sharding of the ``[window_batch, *window, C_in]`` window batch,
        e.g. ``NamedSharding(mesh, P("data"))`` from ``medjax.parallel.data_sharding`` so
        the windows of a group spread over the devices; ``window_batch`` must then be a multiple
        of the number of devices.

    Returns:
      ``[*spatial, C_out]`` float32 blended outputs (apply softmax/argmax yourself).
    """
    win = _check_window(window)
    nd = len(win)
    if volume.ndim != nd + 1:
        raise ValueError(
            f"volume must be [*spatial, C] with {nd} spatial axes for window {win}, "
            f"got shape {volume.shape}"
        )
    if mode not in WINDOW_MODES:
        raise ValueError(f"mode must be one of {WINDOW_MODES}, got {mode!r}")
    window_batch = int(window_batch)
    if window_batch < 1:
        raise ValueError(f"window_batch must be >= 1, got {window_batch}")
    if window_sharding is not None:
        n_dev = len(window_sharding.device_set)
        if window_batch % n_dev:
            raise ValueError(
                f"window_batch={window_batch} must be a multiple of the {n_dev} devices of "
                "window_sharding"
            )
    spatial = tuple(volume.shape[:-1])
    c_in = volume.shape[-1]

    # Pad axes shorter than the window (MONAI: half below, the rest above).
    pads = [
        (max(w - s, 0) // 2, max(w - s, 0) - max(w - s, 0) // 2)
        for s, w in zip(spatial, win, strict=True)
    ]
    if any(lo or hi for lo, hi in pads):
        volume = jnp.pad(volume, [*pads, (0, 0)], constant_values=pad_value)
    padded = tuple(volume.shape[:-1])

    out_spec = jax.eval_shape(
        predict_fn, jax.ShapeDtypeStruct((window_batch, *win, c_in), volume.dtype)
    )
    if not hasattr(out_spec, "shape") or tuple(out_spec.shape[:-1]) != (window_batch, *win):
        got = getattr(out_spec, "shape", type(out_spec).__name__)
        raise ValueError(
            f"predict_fn must map [{window_batch}, *{win}, {c_in}] to [{window_batch}, *{win}, "
            f"C_out], got {got}"
        )
    c_out = out_spec.shape[-1]

    # Static window layout, grouped; the last group is padded with weight-0 repeats.
    starts = np.asarray(window_starts(padded, win, overlap), np.int32).reshape(-1, nd)
    n = starts.shape[0]
    n_groups = math.ceil(n / window_batch)
    fill = n_groups * window_batch - n
    valid = np.concatenate([np.ones(n, np.float32), np.zeros(fill, np.float32)])
    starts = np.concatenate([starts, np.repeat(starts[:1], fill, axis=0)])
    starts = starts.reshape(n_groups, window_batch, nd)
    valid = valid.reshape(n_groups, window_batch)

    if mode == "gaussian":
        imp = gaussian_importance(win, sigma_scale, jnp.float32)
    else:
        imp = jnp.ones(win, jnp.float32)
    imp = imp[..., None]  # [*window, 1]

    zero = jnp.zeros((), jnp.int32)

    def extract(start: Array) -> Array:
        return lax.dynamic_slice(volume, (*start, zero), (*win, c_in))

    def group(carry: tuple[Array, Array], xs: tuple[Array, Array]) -> tuple[tuple, None]:
        g_starts, g_valid = xs  # [B, nd] int32, [B] float32
        windows = jax.vmap(extract)(g_starts)  # [B, *window, C_in]
        if window_sharding is not None:
            windows = lax.with_sharding_constraint(windows, window_sharding)
        preds = predict_fn(windows).astype(jnp.float32)  # [B, *window, C_out]

        # Sequential adds: windows of one group may overlap each other.
        def add(j: Array, acc: tuple[Array, Array]) -> tuple[Array, Array]:
            out_acc, w_acc = acc
            w = imp * g_valid[j]
            corner = (*g_starts[j], zero)
            o = lax.dynamic_slice(out_acc, corner, (*win, c_out))
            out_acc = lax.dynamic_update_slice(out_acc, o + preds[j] * w, corner)
            ws = lax.dynamic_slice(w_acc, corner, (*win, 1))
            w_acc = lax.dynamic_update_slice(w_acc, ws + w, corner)
            return out_acc, w_acc

        return lax.fori_loop(0, window_batch, add, carry), None

    init = (jnp.zeros((*padded, c_out), jnp.float32), jnp.zeros((*padded, 1), jnp.float32))
    (out_acc, w_acc), _ = lax.scan(group, init, (jnp.asarray(starts), jnp.asarray(valid)))
    out = out_acc / w_acc  # every voxel is covered by a window of weight >= IMPORTANCE_FLOOR
    crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(pads, spatial, strict=True))
    return out[crop]
