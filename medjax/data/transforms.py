"""Transforms for examples (host, numpy/scipy) and batches (device, jax).

Host functions work on the example dicts produced by :mod:`medjax.data.sources` (``image``
float32 [H, W, C], ``label`` int32 [H, W] or None, ``spacing`` float32 [2]) and are meant for
preprocessing / ``tf.data`` ``numpy_function`` use. They return new dicts and never modify
their input; keys they do not know are copied through unchanged.

Device functions are pure jax, jit-able and keyed by a PRNG key, meant to run *inside* the
jitted train step on a batch ``image [B, *spatial, C]``, ``label [B, *spatial]``. They are N-D
(2D or 3D spatial) wherever that is cheap.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.ndimage import map_coordinates
from scipy import ndimage

Example = dict[str, Any]

__all__ = [
    "AugmentConfig",
    "adjust_gamma",
    "affine_matrix",
    "augment_batch",
    "augment_example",
    "center_crop",
    "crop_to_bbox",
    "foreground_bbox",
    "normalize_image",
    "pad_or_crop_to",
    "paste_into",
    "random_crop",
    "resample_to_spacing",
    "resize_example",
    "to_original_grid",
    "warp_affine",
    "zscore_in_mask",
]


# ============================================================================================
# host (numpy / scipy)
# ============================================================================================


def _target_size(
    shape: Sequence[int], size: Sequence[int] | None, scale: float | Sequence[float] | None
) -> tuple[int, int]:
    if (size is None) == (scale is None):
        raise ValueError("pass exactly one of size=(H, W) or scale=")
    if size is not None:
        out = tuple(int(s) for s in size)
        if len(out) != 2:
            raise ValueError(f"size must be (H, W), got {size!r}")
    else:
        sc = (scale, scale) if np.isscalar(scale) else tuple(scale)  # type: ignore[arg-type]
        if len(sc) != 2:
            raise ValueError(f"scale must be a float or (sy, sx), got {scale!r}")
        out = tuple(max(1, int(round(n * float(f)))) for n, f in zip(shape, sc, strict=True))
    if min(out) < 1:
        raise ValueError(f"target size must be positive, got {out}")
    return out  # type: ignore[return-value]


def resize_2d(
    x: np.ndarray, size: Sequence[int], *, order: int, antialias: bool = True
) -> np.ndarray:
    """Resize the first two axes of ``x [H, W, ...]`` to ``size=(h, w)``, plane by plane.

    ``order=1``: bilinear (``scipy.ndimage.zoom``, ``grid_mode=True`` i.e. pixel-area aligned
    like PIL/TF, edge values repeated), float32 out, with a Gaussian pre-filter of sigma
    ``(1/f - 1)/2`` per shrunk axis when ``antialias`` (as skimage does). ``order=0``: nearest
    neighbour on the same grid, dtype kept (labels keep their class ids). Each 2D plane is
    resampled on its own: one N-D ``zoom`` with factor 1 on the other axes gives the same values
    several times slower.
    """
    x = np.asarray(x)
    h, w = x.shape[:2]
    size = (int(size[0]), int(size[1]))
    dtype = np.float32 if order > 0 else x.dtype
    if (h, w) == size:
        return x.astype(dtype, copy=True)
    fy, fx = size[0] / h, size[1] / w
    sigma = (max(0.0, (1 / fy - 1) / 2), max(0.0, (1 / fx - 1) / 2))
    smooth = order > 0 and antialias and (fy < 1 or fx < 1)
    flat = x.reshape(h, w, -1)
    out = np.empty((*size, flat.shape[-1]), dtype)
    for k in range(flat.shape[-1]):
        plane = flat[:, :, k].astype(np.float32, copy=False) if order > 0 else flat[:, :, k]
        if smooth:
            plane = ndimage.gaussian_filter(plane, sigma=sigma, mode="nearest")
        res = ndimage.zoom(plane, (fy, fx), order=order, mode="nearest", grid_mode=True)
        if res.shape != size:  # zoom rounds its output shape
            raise AssertionError(f"resize produced {res.shape}, wanted {size}")
        out[:, :, k] = res
    return out.reshape(*size, *x.shape[2:])


def resize_example(
    example: Example,
    size: Sequence[int] | None = None,
    *,
    scale: float | Sequence[float] | None = None,
    antialias: bool = True,
) -> Example:
    """Resize an example to ``size=(H, W)`` or by ``scale`` (float or (sy, sx)).

    The image is resampled bilinearly (``scipy.ndimage.zoom``, order 1, ``grid_mode=True`` i.e.
    pixel-area aligned like PIL/TF, edge values repeated); when shrinking with ``antialias``, a
    Gaussian pre-filter with sigma ``(1/f - 1)/2`` per axis is applied first (as skimage does).
    The label is resampled by nearest neighbour on the same grid, so it keeps its class ids.
    ``spacing`` is multiplied by the actual factors ``old_size / new_size`` per axis.
    """
    image = np.asarray(example["image"])
    h, w = image.shape[:2]
    out_h, out_w = _target_size((h, w), size, scale)
    result = dict(example)
    result["image"] = resize_2d(image, (out_h, out_w), order=1, antialias=antialias)
    label = example.get("label")
    if label is not None and (out_h, out_w) != (h, w):
        result["label"] = resize_2d(label, (out_h, out_w), order=0)
    spacing = np.asarray(example.get("spacing", np.ones(2)), np.float32)
    result["spacing"] = (spacing * np.array([h / out_h, w / out_w], np.float32)).astype(np.float32)
    return result


def _center_pad_crop(x: np.ndarray, size: Sequence[int], value: float | int) -> np.ndarray:
    """Center pad (with ``value``) / crop the leading ``len(size)`` axes of ``x`` to ``size``."""
    pads, slices = [], []
    for n, s in zip(x.shape, size, strict=False):
        if s >= n:
            before = (s - n) // 2
            pads.append((before, s - n - before))
            slices.append(slice(None))
        else:
            start = (n - s) // 2
            pads.append((0, 0))
            slices.append(slice(start, start + s))
    pads += [(0, 0)] * (x.ndim - len(size))
    x = x[tuple(slices)]
    if any(p != (0, 0) for p in pads):
        x = np.pad(x, pads, mode="constant", constant_values=value)
    return x


def pad_or_crop_to(
    example: Example,
    size: Sequence[int],
    *,
    image_value: float = 0.0,
    label_value: int = 0,
) -> Example:
    """Center-crop and/or center-pad image and label to ``size=(H, W)``; spacing is unchanged.

    Odd differences put the extra padded pixel after (bottom/right) and crop the extra pixel
    from the after side as well (start offset ``(n - s) // 2``).
    """
    size = tuple(int(s) for s in size)
    result = dict(example)
    result["image"] = _center_pad_crop(np.asarray(example["image"]), size, image_value)
    if example.get("label") is not None:
        result["label"] = _center_pad_crop(np.asarray(example["label"]), size, label_value)
    return result


def normalize_image(
    image: np.ndarray,
    mode: str = "zscore",
    mask: np.ndarray | None = None,
    eps: float = 1e-8,
) -> np.ndarray:
    """Per-channel intensity normalisation of ``image [*spatial, C]`` (returns float32).

    ``"zscore"``: (x - mean) / std; ``"minmax"``: (x - min) / (max - min); ``"none"``: cast only.
    Statistics come from the pixels where ``mask [*spatial]`` is True (all pixels if None) and
    are applied to the whole image. A constant channel (std or range < eps) is only shifted
    (to 0), never divided.
    """
    x = np.asarray(image, np.float32)
    if mode == "none":
        return x.copy()
    if mode not in ("zscore", "minmax"):
        raise ValueError(f"mode must be 'zscore', 'minmax' or 'none', got {mode!r}")
    if mask is not None:
        m = np.asarray(mask, bool)
        if m.shape != x.shape[:-1]:
            raise ValueError(f"mask shape {m.shape} != image spatial shape {x.shape[:-1]}")
        if not m.any():
            raise ValueError("mask selects no pixels")
        pix = x[m]  # [N, C]
    else:
        pix = x.reshape(-1, x.shape[-1])
    pix = pix.astype(np.float64)
    if mode == "zscore":
        centre, spread = pix.mean(axis=0), pix.std(axis=0)
    else:
        centre = pix.min(axis=0)
        spread = pix.max(axis=0) - centre
    spread = np.where(spread < eps, 1.0, spread)
    return ((x - centre) / spread).astype(np.float32)


# --------------------------------------------------------------------------------------------
# host, N-D volumes (2D or 3D): masked z-score, foreground bounding boxes, spacing resampling.
# These take bare arrays (not example dicts): image [*spatial, C], label / mask [*spatial].
# --------------------------------------------------------------------------------------------


def _check_mask(mask: np.ndarray | None, spatial: tuple[int, ...], what: str) -> np.ndarray:
    """A boolean mask of shape ``spatial`` (all True when None) that selects at least one voxel."""
    if mask is None:
        return np.ones(spatial, bool)
    m = np.asarray(mask)
    if m.shape != spatial:
        raise ValueError(f"{what}: mask shape {m.shape} != image spatial shape {spatial}")
    m = m.astype(bool, copy=False)
    if not m.any():
        raise ValueError(f"{what}: mask of shape {m.shape} selects no voxels (empty mask)")
    return m


def zscore_in_mask(
    image: np.ndarray,
    mask: np.ndarray | None,
    *,
    clip_percentiles: tuple[float, float] | None = (0.5, 99.5),
    outside: float = 0.0,
) -> np.ndarray:
    """Per-channel percentile clipping + z-score of ``image [*spatial, C]`` inside ``mask``.

    For each channel (nnU-Net / MONAI style): the intensities of the whole channel are clipped to
    ``[percentile(lo), percentile(hi)]`` of the voxels inside ``mask`` (numpy's default linear
    percentile; skipped when ``clip_percentiles`` is None), then z-scored with the mean and std of
    the clipped voxels inside the mask (via :func:`normalize_image`, so a constant channel is only
    shifted to 0). Voxels outside the mask are set to ``outside`` (e.g. 0 = the in-mask mean).
    ``mask [*spatial]`` bool, or None for "every voxel". Returns float32 [*spatial, C].

    Raises ValueError for an image without a channel axis, a mask of another spatial shape, an
    empty mask, percentiles outside 0..100 or lo > hi, and NaN voxels (the message counts them).
    """
    x = np.asarray(image, np.float32)
    if x.ndim < 2:
        raise ValueError(f"zscore_in_mask: image must be [*spatial, C], got shape {x.shape}")
    spatial = x.shape[:-1]
    nan_voxels = int(np.isnan(x).any(axis=-1).sum())
    if nan_voxels:
        raise ValueError(
            f"zscore_in_mask: image of shape {x.shape} has {nan_voxels} NaN voxel(s) "
            f"(of {math.prod(spatial)}); fill or mask them before normalising"
        )
    m = _check_mask(mask, spatial, "zscore_in_mask")
    if clip_percentiles is not None:
        lo_p, hi_p = (float(p) for p in clip_percentiles)
        if not 0.0 <= lo_p <= hi_p <= 100.0:
            raise ValueError(
                f"clip_percentiles must satisfy 0 <= lo <= hi <= 100, got {clip_percentiles!r}"
            )
        inside = x[m]  # [N, C]
        lo, hi = np.percentile(inside.astype(np.float64), [lo_p, hi_p], axis=0)  # [C] each
        x = np.clip(x, lo.astype(np.float32), hi.astype(np.float32))
    out = normalize_image(x, "zscore", mask=m)
    out[~m] = np.float32(outside)
    return out


def _as_margin(margin: int | Sequence[int], nd: int) -> tuple[int, ...]:
    out = (int(margin),) * nd if np.isscalar(margin) else tuple(int(v) for v in margin)  # type: ignore[arg-type]
    if len(out) != nd or min(out) < 0:
        raise ValueError(f"margin must be an int >= 0 or one per axis ({nd}), got {margin!r}")
    return out


def foreground_bbox(mask: np.ndarray, margin: int | Sequence[int] = 0) -> tuple[slice, ...]:
    """Bounding box of the non-zero voxels of ``mask [*spatial]``, one ``slice`` per axis.

    The box is grown by ``margin`` voxels on both sides (an int, or one per axis) and clipped to
    the array, so ``mask[bbox]`` is always valid. Raises ValueError on an all-zero mask.
    """
    m = np.asarray(mask).astype(bool, copy=False)
    if m.ndim == 0:
        raise ValueError("foreground_bbox: mask must have at least one axis")
    if not m.any():
        raise ValueError(f"foreground_bbox: mask of shape {m.shape} has no foreground voxels")
    pad = _as_margin(margin, m.ndim)
    out = []
    for axis, (n, g) in enumerate(zip(m.shape, pad, strict=True)):
        hit = np.flatnonzero(m.any(axis=tuple(a for a in range(m.ndim) if a != axis)))
        out.append(slice(max(0, int(hit[0]) - g), min(n, int(hit[-1]) + 1 + g)))
    return tuple(out)


def _check_bbox(bbox: Sequence[slice], shape: tuple[int, ...], what: str) -> tuple[slice, ...]:
    bbox = tuple(bbox)
    if len(bbox) > len(shape):
        raise ValueError(f"{what}: bbox has {len(bbox)} axes, array shape {shape} has fewer")
    for s, n in zip(bbox, shape, strict=False):
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise ValueError(f"{what}: bbox entries must be slices with step 1, got {s!r}")
        if s.start is None or s.stop is None or not 0 <= s.start < s.stop <= n:
            raise ValueError(f"{what}: bbox {bbox} does not fit inside shape {shape}")
    return bbox


def crop_to_bbox(array: np.ndarray, bbox: Sequence[slice]) -> np.ndarray:
    """``array[bbox]`` as a new array: the leading ``len(bbox)`` axes are cropped, the rest kept.

    ``bbox`` is e.g. :func:`foreground_bbox`'s output; it must lie inside the array.
    """
    a = np.asarray(array)
    return a[_check_bbox(bbox, a.shape, "crop_to_bbox")].copy()


def paste_into(
    full_shape: Sequence[int], cropped: np.ndarray, bbox: Sequence[slice], fill: float = 0
) -> np.ndarray:
    """Inverse of :func:`crop_to_bbox`: a ``full_shape`` array of ``fill`` with ``cropped`` at bbox.

    ``full_shape`` is the spatial shape (``len(bbox)`` entries; trailing axes of ``cropped`` such
    as channels are appended) or the complete output shape. The result has ``cropped``'s dtype.
    """
    c = np.asarray(cropped)
    full = tuple(int(n) for n in full_shape)
    nd = len(tuple(bbox))
    if len(full) == nd:
        full = full + c.shape[nd:]
    elif len(full) != c.ndim or full[nd:] != c.shape[nd:]:
        raise ValueError(
            f"paste_into: full_shape {tuple(full_shape)} must be the spatial shape ({nd} axes) "
            f"or match the cropped array's trailing axes {c.shape[nd:]}"
        )
    bbox = _check_bbox(bbox, full, "paste_into")
    box_shape = tuple(s.stop - s.start for s in bbox)
    if c.shape[:nd] != box_shape:
        raise ValueError(
            f"paste_into: cropped spatial shape {c.shape[:nd]} != bbox size {box_shape}"
        )
    out = np.full(full, fill, dtype=c.dtype)
    out[bbox] = c
    return out


def to_original_grid(
    array: np.ndarray, prepared: Mapping[str, Any], fill: float | None = None
) -> np.ndarray:
    """A network-grid array `[*grid, C]` of a case cropped and resampled for the network back
    onto its original grid: linear resampling to `prepared["crop_shape"]` (from
    `prepared["net_spacing"]`), then, unless `fill` is None, pasted at `prepared["bbox"]` into
    `prepared["full_shape"]` with `fill` outside."""
    out = np.asarray(array)
    if out.shape[:-1] != tuple(prepared["crop_shape"]):
        out, _ = resample_to_spacing(
            out, prepared["net_spacing"], None, order=1, shape=prepared["crop_shape"]
        )
    if fill is None:
        return out
    return paste_into(prepared["full_shape"], out, prepared["bbox"], fill)


def resample_to_spacing(
    array: np.ndarray,
    spacing: Sequence[float],
    target_spacing: float | Sequence[float] | None,
    *,
    order: int,
    shape: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample an image ``[*spatial, C]`` or a label ``[*spatial]`` to a new voxel spacing.

    ``spacing`` has one entry per spatial axis (its length says whether the last axis of
    ``array`` is a channel axis). The output size is ``round(n * spacing / target_spacing)`` per
    axis (at least 1), or exactly ``shape`` when given -- e.g. to undo a resample back onto the
    original grid; ``target_spacing`` may then be None. Interpolation is ``scipy.ndimage.zoom``
    with ``grid_mode=True`` (voxel areas align: the outer voxel edges of input and output
    coincide, as in ``skimage.transform.resize``), ``mode="nearest"`` (edge values repeated) and
    the given spline ``order``: 1 (or 3) for images, 0 (nearest) for labels, which keeps class ids.
    Channels are resampled independently. There is no anti-alias pre-filter when shrinking.

    Returns ``(array, new_spacing)``: float32 for order > 0, the input dtype for order 0, and the
    actual spacing ``spacing * n_in / n_out`` (float32 [nd]).
    """
    a = np.asarray(array)
    sp = np.asarray(spacing, np.float64).reshape(-1)
    nd = sp.size
    if a.ndim not in (nd, nd + 1) or nd == 0:
        raise ValueError(
            f"resample_to_spacing: spacing {tuple(sp)} has {nd} entries; array shape {a.shape} "
            f"must be [*spatial] or [*spatial, C] with {nd} spatial axes"
        )
    if not np.all(sp > 0):
        raise ValueError(f"resample_to_spacing: spacing must be positive, got {tuple(sp)}")
    if not 0 <= int(order) <= 5:
        raise ValueError(f"resample_to_spacing: order must be 0..5, got {order}")
    spatial = a.shape[:nd]
    if shape is not None:
        out_shape = tuple(int(n) for n in shape)
        if len(out_shape) != nd or min(out_shape) < 1:
            raise ValueError(f"resample_to_spacing: shape must be {nd} positive ints, got {shape}")
    else:
        if target_spacing is None:
            raise ValueError("resample_to_spacing: pass target_spacing or shape")
        tgt = np.broadcast_to(np.asarray(target_spacing, np.float64), (nd,))
        if not np.all(tgt > 0):
            raise ValueError(f"resample_to_spacing: target_spacing must be positive, got {tgt}")
        out_shape = tuple(
            max(1, int(round(n * s / t))) for n, s, t in zip(spatial, sp, tgt, strict=True)
        )
    new_spacing = (sp * np.asarray(spatial) / np.asarray(out_shape)).astype(np.float32)
    if out_shape == spatial:
        out = a.copy() if order == 0 else a.astype(np.float32, copy=True)
        return out, new_spacing
    zoom = tuple(o / n for o, n in zip(out_shape, spatial, strict=True))
    src = a if order == 0 else a.astype(np.float32, copy=False)

    def one(x: np.ndarray) -> np.ndarray:
        y = ndimage.zoom(x, zoom, order=int(order), mode="nearest", grid_mode=True)
        if y.shape != out_shape:  # zoom rounds n * zoom; o / n * n may not round back to o
            raise AssertionError(f"zoom produced {y.shape}, wanted {out_shape}")
        return y

    if a.ndim == nd:
        out = one(src)
    else:
        out = np.stack([one(src[..., c]) for c in range(a.shape[-1])], axis=-1)
    return out.astype(src.dtype, copy=False), new_spacing


# ============================================================================================
# device (jax)
# ============================================================================================


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Random augmentation settings for :func:`augment_batch` (hashable: a valid static arg).

    Geometric (applied identically to image and label):
      - ``flip_axes``: spatial axes (0 = first spatial axis) each flipped with probability 0.5.
      - ``rot90``: rotate by k*90 degrees, k uniform in {0,1,2,3}, in the plane of spatial axes
        (0, 1) -- only when those two sizes are equal (so shapes never change); otherwise the
        rotation is silently skipped.
      - with probability ``affine_prob``: rotation uniform in +-``rotate_deg`` (plane (0, 1)),
        isotropic scale uniform in ``scale_range`` (>1 zooms in), translation uniform in
        +-``translate_frac`` * size per spatial axis, about the array centre. Image: linear
        interpolation; label: nearest. Outside the input: ``fill_mode`` ("constant" fills the
        image with ``cval`` and the label with 0; "nearest"/"reflect"/"mirror"/"wrap" for both).
    Intensity (image only, after the geometry):
      - ``x * (1 + u*intensity_scale) + v*intensity_shift``, u, v uniform in [-1, 1], one draw
        per example (shared by its channels).
      - with probability ``gamma_prob``: gamma g log-uniform in ``gamma_range`` applied to the
        per-channel min-max normalised intensities, then mapped back to the original range.
    """

    flip_axes: tuple[int, ...] = (0, 1)
    rot90: bool = True
    affine_prob: float = 0.5
    rotate_deg: float = 15.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    translate_frac: float = 0.05
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    gamma_range: tuple[float, float] = (0.8, 1.25)
    gamma_prob: float = 0.3
    fill_mode: str = "constant"
    cval: float = 0.0

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> AugmentConfig | None:
        """The settings of a config block (its fields, plus `enabled`); None when disabled."""
        d = dict(cfg or {})
        if not d.pop("enabled", True):
            return None
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"config.augment has unknown keys {unknown}; known: {sorted(fields)}")
        return cls(**{k: tuple(v) if isinstance(v, list | tuple) else v for k, v in d.items()})

    @classmethod
    def identity(cls) -> AugmentConfig:
        """A config that changes nothing (useful as a baseline / for evaluation)."""
        return cls(
            flip_axes=(),
            rot90=False,
            affine_prob=0.0,
            intensity_scale=0.0,
            intensity_shift=0.0,
            gamma_prob=0.0,
        )


def affine_matrix(
    ndim: int, angle_rad: jax.Array | float = 0.0, scale: jax.Array | float = 1.0
) -> jax.Array:
    """Output->input matrix for a rotation by ``angle_rad`` in plane (0, 1) and zoom ``scale``.

    Returns the [ndim, ndim] matrix ``R(-angle) / scale`` that maps output coordinates
    (relative to the centre) to input coordinates, i.e. the content is rotated by ``+angle``
    (from axis 0 towards axis 1) and magnified by ``scale``.
    """
    c, s = jnp.cos(angle_rad), jnp.sin(angle_rad)
    m = jnp.eye(ndim, dtype=jnp.float32)
    if ndim >= 2:
        m = m.at[0, 0].set(c).at[0, 1].set(s).at[1, 0].set(-s).at[1, 1].set(c)
    return m / scale


def warp_affine(
    x: jax.Array,
    matrix: jax.Array,
    offset: jax.Array,
    *,
    order: int,
    mode: str = "constant",
    cval: float = 0.0,
    channel_axis: bool = False,
) -> jax.Array:
    """Resample ``x`` so that ``out[o] = x[matrix @ o + offset]`` (scipy affine_transform rule).

    ``x`` is [*spatial] or, with ``channel_axis=True``, [*spatial, C] (same warp per channel).
    ``order`` 0 (nearest) or 1 (linear). ``mode="constant"`` matches scipy's ``grid-constant``.
    """
    spatial = x.shape[:-1] if channel_axis else x.shape
    nd = len(spatial)
    grid = jnp.stack(
        jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in spatial], indexing="ij"), 0
    )  # [nd, *spatial]
    coords = jnp.tensordot(matrix.astype(jnp.float32), grid, axes=1)
    coords = coords + offset.astype(jnp.float32).reshape((nd,) + (1,) * nd)
    sample = lambda a: map_coordinates(a, list(coords), order=order, mode=mode, cval=cval)
    if channel_axis:
        return jax.vmap(sample, in_axes=-1, out_axes=-1)(x)
    return sample(x)


def adjust_gamma(image: jax.Array, gamma: jax.Array | float, eps: float = 1e-7) -> jax.Array:
    """Gamma on per-channel min-max normalised intensities, mapped back to the original range.

    ``image`` is [*spatial, C]: ``lo + (hi - lo) * ((x - lo) / (hi - lo)) ** gamma`` with lo/hi
    the per-channel min/max. Constant channels are returned unchanged.
    """
    axes = tuple(range(image.ndim - 1))
    lo = jnp.min(image, axis=axes, keepdims=True)
    hi = jnp.max(image, axis=axes, keepdims=True)
    rng = hi - lo
    safe = jnp.where(rng > eps, rng, 1.0)
    xn = jnp.clip((image - lo) / safe, 0.0, 1.0)
    out = lo + rng * xn**gamma
    return jnp.where(rng > eps, out, image).astype(image.dtype)


def _flip_where(x: jax.Array, flag: jax.Array, axis: int) -> jax.Array:
    return jnp.where(flag, jnp.flip(x, axis), x)


def _rot90_k(x: jax.Array, k: jax.Array) -> jax.Array:
    branches = [lambda a, kk=kk: jnp.rot90(a, kk, axes=(0, 1)) for kk in range(4)]
    return jax.lax.switch(k, branches, x)


def augment_example(
    key: jax.Array, image: jax.Array, label: jax.Array | None, config: AugmentConfig
) -> tuple[jax.Array, jax.Array | None]:
    """Augment one example: ``image [*spatial, C]``, ``label [*spatial]`` (or None)."""
    spatial = image.shape[:-1]
    nd = len(spatial)
    if label is not None and label.shape != spatial:
        raise ValueError(f"label shape {label.shape} != image spatial shape {spatial}")
    for a in config.flip_axes:
        if not 0 <= a < nd:
            raise ValueError(f"flip axis {a} out of range for {nd} spatial dims")
    dtype = image.dtype
    # All random numbers of one example come from ONE uniform draw: each separate jax.random
    # call adds its own threefry kernel, which multiplies the jit compile time on CPU.
    n_flip = len(config.flip_axes)
    r = jax.random.uniform(key, (8 + n_flip + nd,))
    rot_u, aff_u, ang_u, scale_u, int_u, int_v, gam_u, gam_v = (r[i] for i in range(8))
    flip_u = [r[8 + i] for i in range(n_flip)]
    shift_u = r[8 + n_flip :]

    # flips
    for a, fu in zip(config.flip_axes, flip_u, strict=True):
        image = _flip_where(image, fu < 0.5, a)
        if label is not None:
            label = _flip_where(label, fu < 0.5, a)

    # rot90 in plane (0, 1), only for square planes (shape-preserving)
    if config.rot90 and nd >= 2 and spatial[0] == spatial[1]:
        k = jnp.clip(jnp.floor(rot_u * 4).astype(jnp.int32), 0, 3)
        image = _rot90_k(image, k)
        if label is not None:
            label = _rot90_k(label, k)

    # affine about the centre
    if config.affine_prob > 0:
        apply = aff_u < config.affine_prob
        max_ang = math.radians(config.rotate_deg)
        angle = (2 * ang_u - 1) * max_ang
        lo_s, hi_s = config.scale_range
        scale = lo_s + (hi_s - lo_s) * scale_u
        size = jnp.asarray(spatial, jnp.float32)
        shift = (2 * shift_u - 1) * config.translate_frac * size
        matrix = affine_matrix(nd, angle, scale)
        centre = (size - 1) / 2
        offset = centre - matrix @ (centre + shift)  # content moves by +shift (output coords)
        warped = warp_affine(
            image, matrix, offset, order=1, mode=config.fill_mode, cval=config.cval,
            channel_axis=True,
        )  # fmt: skip
        image = jnp.where(apply, warped.astype(dtype), image)
        if label is not None:
            wl = warp_affine(label, matrix, offset, order=0, mode=config.fill_mode, cval=0)
            label = jnp.where(apply, wl.astype(label.dtype), label)

    # intensity scale / shift (one draw per example, shared by its channels)
    if config.intensity_scale > 0 or config.intensity_shift > 0:
        fac = 1 + (2 * int_u - 1) * config.intensity_scale
        image = (image * fac + (2 * int_v - 1) * config.intensity_shift).astype(dtype)

    # gamma, log-uniform in gamma_range
    if config.gamma_prob > 0:
        lo_g, hi_g = (math.log(g) for g in config.gamma_range)
        gamma = jnp.exp(lo_g + (hi_g - lo_g) * gam_v)
        image = jnp.where(gam_u < config.gamma_prob, adjust_gamma(image, gamma), image)

    return image, label


def augment_batch(
    key: jax.Array,
    image: jax.Array,
    label: jax.Array | None,
    config: AugmentConfig = AugmentConfig(),  # noqa: B008 - frozen, immutable default
) -> tuple[jax.Array, jax.Array | None]:
    """Randomly augment ``image [B, *spatial, C]`` and ``label [B, *spatial]`` (or None).

    One independent key per example (``jax.random.split(key, B)``), vmapped
    :func:`augment_example`. Jit-able; ``config`` must be static (it is hashable), e.g.
    ``jax.jit(augment_batch, static_argnames="config")``. Shapes and dtypes are preserved.
    """
    keys = jax.random.split(key, image.shape[0])
    if label is None:
        img, _ = jax.vmap(lambda k, x: augment_example(k, x, None, config))(keys, image)
        return img, None
    return jax.vmap(lambda k, x, y: augment_example(k, x, y, config))(keys, image, label)


def _check_crop(spatial: Sequence[int], size: Sequence[int]) -> tuple[int, ...]:
    size = tuple(int(s) for s in size)
    if len(size) != len(spatial):
        raise ValueError(f"crop size {size} must have one entry per spatial axis {tuple(spatial)}")
    if any(s > n or s < 1 for s, n in zip(size, spatial, strict=True)):
        raise ValueError(f"crop size {size} must be within 1..{tuple(spatial)}")
    return size


def random_crop(
    key: jax.Array,
    image: jax.Array,
    label: jax.Array | None,
    size: Sequence[int],
) -> tuple[jax.Array, jax.Array | None]:
    """Crop ``size`` (spatial) at a random offset per example (uniform over valid offsets).

    ``image [B, *spatial, C]``, ``label [B, *spatial]`` or None; same window for both.
    """
    spatial = image.shape[1:-1]
    size = _check_crop(spatial, size)
    b = image.shape[0]
    keys = jax.random.split(key, len(spatial))
    starts = jnp.stack(
        [
            jax.random.randint(k, (b,), 0, n - s + 1)
            for k, n, s in zip(keys, spatial, size, strict=True)
        ],
        axis=1,
    )  # [B, nd]
    zero = jnp.zeros((), starts.dtype)

    def one(st: jax.Array, x: jax.Array, y: jax.Array | None) -> tuple[jax.Array, Any]:
        xi = jax.lax.dynamic_slice(x, (*st, zero), (*size, x.shape[-1]))
        yi = None if y is None else jax.lax.dynamic_slice(y, tuple(st), size)
        return xi, yi

    if label is None:
        return jax.vmap(lambda st, x: one(st, x, None)[0])(starts, image), None
    return jax.vmap(one)(starts, image, label)


def center_crop(
    image: jax.Array, label: jax.Array | None, size: Sequence[int]
) -> tuple[jax.Array, jax.Array | None]:
    """Central crop of ``size`` (spatial), offset ``(n - s) // 2`` per axis (numpy or jax)."""
    spatial = image.shape[1:-1]
    size = _check_crop(spatial, size)
    sl = tuple(slice((n - s) // 2, (n - s) // 2 + s) for n, s in zip(spatial, size, strict=True))
    img = image[(slice(None), *sl, slice(None))]
    lab = None if label is None else label[(slice(None), *sl)]
    return img, lab
