"""Patch sampling from volumes with foreground oversampling, and tumour-dense 2D crops.

Volumes are host numpy arrays: ``image [*spatial, C]`` float32 and ``label [*spatial]`` int32
(2D or 3D spatial). A patch is described by its integer ``start`` (one entry per spatial axis):
it covers voxels ``start .. start + patch_size - 1`` and whatever part of that window lies
outside the volume is padding (see :func:`extract_patch`).

Valid starts. Along an axis of size ``n`` with patch size ``p``, starts lie in
``[min(0, n - p), max(0, n - p)]``: for ``n >= p`` that is every window inside the volume; for
``n < p`` (volume smaller than the patch) the start is ``<= 0`` and the window always covers the
whole axis, with ``-start`` padded voxels before it and ``p - n + start`` after it.

Training batches are a pure function of ``(seed, step)``: step ``s`` draws its whole global plan
(case, start per row) from ``np.random.default_rng([seed, s])``, so a resumed run sees exactly
the patches an uninterrupted one would, and every process extracts only its own rows of it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from medjax import parallel
from medjax.data import pipeline

__all__ = [
    "densest_window",
    "extract_patch",
    "foreground_index",
    "make_patch_train_iter",
    "patch_batch",
    "patch_plan",
    "sample_patch_starts",
    "start_range",
    "tumour_dense_crops",
]


def _as_size(size: Sequence[int] | int, nd: int | None, what: str) -> tuple[int, ...]:
    out = (int(size),) * (nd or 1) if np.isscalar(size) else tuple(int(s) for s in size)  # type: ignore[arg-type]
    if (nd is not None and len(out) != nd) or not out or min(out) < 1:
        want = f"{nd} positive ints" if nd is not None else "positive ints"
        raise ValueError(f"{what} must be {want}, got {size!r}")
    return out


# ---------------------------------------------------------------------------------------------
# single-volume primitives
# ---------------------------------------------------------------------------------------------


def foreground_index(label: np.ndarray) -> np.ndarray:
    """Flat (C-order) indices of the voxels of ``label [*spatial]`` with ``label > 0``, int64.

    Compute it once per volume; drawing a foreground voxel is then O(1)
    (``np.unravel_index(idx[k], label.shape)``). Empty when the volume has no foreground.
    """
    return np.flatnonzero(np.asarray(label) > 0).astype(np.int64, copy=False)


def start_range(
    spatial_shape: Sequence[int], patch_size: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive ``(lo, hi)`` int64 [nd] of the valid patch starts (see the module docstring)."""
    shape = _as_size(spatial_shape, None, "spatial_shape")
    patch = _as_size(patch_size, len(shape), "patch_size")
    diff = np.asarray(shape, np.int64) - np.asarray(patch, np.int64)
    return np.minimum(diff, 0), np.maximum(diff, 0)


def sample_patch_starts(
    rng: np.random.Generator,
    spatial_shape: Sequence[int],
    patch_size: Sequence[int],
    *,
    fg_index: np.ndarray | None = None,
    fg_fraction: float = 0.33,
    n: int = 1,
) -> np.ndarray:
    """Random patch starts ``[n, nd]`` int64 with foreground oversampling.

    Each patch, independently, with probability ``fg_fraction`` is centred on a foreground voxel
    ``c`` drawn uniformly from ``fg_index`` (flat indices into ``spatial_shape``, e.g. from
    :func:`foreground_index`): ``start = c - patch_size // 2`` clipped to the valid range, so the
    patch always contains ``c`` (at offset ``patch_size // 2`` unless clipped at a border).
    Otherwise (and always when ``fg_index`` is None or empty) the start is uniform over the valid
    starts of :func:`start_range`, independently per axis.
    """
    shape = _as_size(spatial_shape, None, "spatial_shape")
    patch = _as_size(patch_size, len(shape), "patch_size")
    if not 0.0 <= float(fg_fraction) <= 1.0:
        raise ValueError(f"fg_fraction must be in [0, 1], got {fg_fraction}")
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    lo, hi = start_range(shape, patch)
    starts = rng.integers(lo, hi + 1, size=(n, len(shape)), dtype=np.int64)
    use_fg = rng.random(n) < float(fg_fraction)
    fg = None if fg_index is None else np.asarray(fg_index).reshape(-1)
    if fg is not None and fg.size and use_fg.any():
        picks = fg[rng.integers(0, fg.size, size=int(use_fg.sum()))]
        centres = np.stack(np.unravel_index(picks, shape), axis=-1).astype(np.int64)
        starts[use_fg] = np.clip(centres - np.asarray(patch) // 2, lo, hi)
    return starts


def extract_patch(
    array: np.ndarray,
    start: Sequence[int],
    patch_size: Sequence[int],
    pad_value: float | int = 0,
) -> np.ndarray:
    """The window ``start .. start + patch_size`` of the leading axes of ``array [*spatial, ...]``.

    Parts of the window outside the array (negative starts, or past the end) are ``pad_value``;
    trailing axes (channels) are kept whole. Returns a new array of ``array``'s dtype, shape
    ``(*patch_size, *array.shape[len(patch_size):])``.
    """
    a = np.asarray(array)
    patch = _as_size(patch_size, None, "patch_size")
    nd = len(patch)
    st = tuple(int(s) for s in np.asarray(start).reshape(-1))
    if len(st) != nd or a.ndim < nd:
        raise ValueError(
            f"extract_patch: start {st} and patch_size {patch} need one entry per spatial axis "
            f"of an array of shape {a.shape}"
        )
    out = np.full(patch + a.shape[nd:], pad_value, dtype=a.dtype)
    src, dst = [], []
    for s, p, n in zip(st, patch, a.shape, strict=False):
        lo, hi = max(s, 0), min(s + p, n)
        if hi <= lo:  # the window misses the volume on this axis: all padding
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = a[tuple(src)]
    return out


# ---------------------------------------------------------------------------------------------
# batches: a pure function of (seed, step)
# ---------------------------------------------------------------------------------------------


def _check_volumes(
    volumes: Sequence[Mapping[str, Any]], nd: int
) -> tuple[list[tuple[int, ...]], int]:
    """Spatial shapes of the cases (and their common channel count); clear errors otherwise."""
    if not volumes:
        raise ValueError("no volumes given")
    shapes, channels = [], set()
    for i, v in enumerate(volumes):
        for key in ("image", "label"):
            if key not in v:
                raise ValueError(f"volume {i} has no {key!r} key (has {sorted(v)})")
        img, lab = np.shape(v["image"]), np.shape(v["label"])
        if len(img) != nd + 1 or lab != img[:-1]:
            raise ValueError(
                f"volume {i}: expected image [*spatial, C] and label [*spatial] with {nd} spatial "
                f"axes (as patch_size), got image {img} and label {lab}"
            )
        shapes.append(tuple(lab))
        channels.add(img[-1])
    if len(channels) != 1:
        raise ValueError(f"volumes disagree on the number of image channels: {sorted(channels)}")
    return shapes, channels.pop()


def patch_plan(
    step: int,
    *,
    seed: int,
    spatial_shapes: Sequence[Sequence[int]],
    global_batch_size: int,
    patch_size: Sequence[int],
    fg_fraction: float = 0.33,
    fg_indices: Sequence[np.ndarray | None] | None = None,
    case_weights: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The (case, start) of every row of global batch ``step``: ``cases [B]``, ``starts [B, nd]``.

    ``rng = np.random.default_rng([seed, step])`` first draws the B cases (uniformly, or with
    probabilities proportional to ``case_weights``), then row by row a start with
    :func:`sample_patch_starts` (``fg_indices[case]`` gives the case's foreground; None or an
    empty array: uniform starts only).
    """
    n_cases = len(spatial_shapes)
    if n_cases == 0:
        raise ValueError("no volumes given")
    if int(seed) < 0 or int(step) < 0:
        raise ValueError(f"seed and step must be >= 0, got seed={seed}, step={step}")
    if int(global_batch_size) < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if fg_indices is not None and len(fg_indices) != n_cases:
        raise ValueError(f"fg_indices has {len(fg_indices)} entries for {n_cases} volumes")
    rng = np.random.default_rng([int(seed), int(step)])
    b = int(global_batch_size)
    if case_weights is None:
        cases = rng.integers(0, n_cases, size=b, dtype=np.int64)
    else:
        w = np.asarray(case_weights, np.float64).reshape(-1)
        if w.size != n_cases or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
            raise ValueError(
                f"case_weights must be {n_cases} finite non-negative numbers with a positive sum, "
                f"got {case_weights!r}"
            )
        cases = rng.choice(n_cases, size=b, p=w / w.sum()).astype(np.int64)
    nd = len(patch_size)
    starts = np.empty((b, nd), np.int64)
    for r, c in enumerate(cases):
        fg = None if fg_indices is None else fg_indices[c]
        starts[r] = sample_patch_starts(
            rng, spatial_shapes[c], patch_size, fg_index=fg, fg_fraction=fg_fraction, n=1
        )[0]
    return cases, starts


def patch_batch(
    volumes: Sequence[Mapping[str, Any]],
    step: int,
    *,
    seed: int,
    global_batch_size: int,
    patch_size: Sequence[int],
    fg_fraction: float = 0.33,
    fg_indices: Sequence[np.ndarray | None] | None = None,
    case_weights: Sequence[float] | None = None,
    rows: slice | None = None,
    image_pad: float = 0.0,
    label_pad: int = 0,
) -> dict[str, np.ndarray]:
    """Global batch ``step`` of patches: ``{"image": [B, *patch, C] float32, "label": [B, *patch]
    int32}`` (only ``rows`` of it when given, e.g. this process's ``parallel.process_slice``).

    A pure function of ``(seed, step)`` and the inputs (the plan is :func:`patch_plan`). Padding
    outside a volume is ``image_pad`` / ``label_pad``. ``fg_indices`` (one
    :func:`foreground_index` per volume) is computed from the labels when None -- a full pass
    over every volume, so precompute it for training.
    """
    patch = _as_size(patch_size, None, "patch_size")
    shapes, _ = _check_volumes(volumes, len(patch))
    if fg_indices is None:
        fg_indices = [foreground_index(v["label"]) for v in volumes]
    cases, starts = patch_plan(
        step,
        seed=seed,
        spatial_shapes=shapes,
        global_batch_size=global_batch_size,
        patch_size=patch,
        fg_fraction=fg_fraction,
        fg_indices=fg_indices,
        case_weights=case_weights,
    )
    if rows is not None:
        cases, starts = cases[rows], starts[rows]
    n_chan = np.shape(volumes[0]["image"])[-1]
    out = {
        "image": np.empty((len(cases), *patch, n_chan), np.float32),
        "label": np.empty((len(cases), *patch), np.int32),
    }
    for i, (c, st) in enumerate(zip(cases, starts, strict=True)):
        out["image"][i] = extract_patch(volumes[c]["image"], st, patch, image_pad)
        out["label"][i] = extract_patch(volumes[c]["label"], st, patch, label_pad)
    return out


def make_patch_train_iter(
    volumes: Sequence[Mapping[str, Any]],
    *,
    patch_size: Sequence[int],
    fg_fraction: float,
    global_batch_size: int,
    mesh: Mesh,
    seed: int,
    start_step: int = 0,
    num_steps: int | None = None,
    prefetch: int = 2,
    num_workers: int | None = None,
    case_weights: Sequence[float] | None = None,
    image_pad: float = 0.0,
    label_pad: int = 0,
    num_shards: int = 0,
    shard_ids: Sequence[int] | None = None,
) -> Iterator[dict[str, jax.Array]]:
    """Global patch batches ``{"image", "label"}`` for steps ``start_step, ...`` (an iterator
    built on :func:`medjax.data.pipeline.iterate_steps`).

    With one data shard (``num_shards``, see :func:`medjax.data.pipeline.data_shards`; 0: one
    per process), batch ``s`` equals ``patch_batch(volumes, s, ...)`` (so resuming at
    ``start_step`` repeats nothing and skips nothing); every process computes the whole plan
    and extracts only its own rows (``parallel.process_slice``). With K shards, case ``i``
    belongs to shard ``shard_ids[i]`` (default ``i % K``), rows ``[k B/K, (k+1) B/K)`` are
    ``patch_batch`` of shard ``k``'s cases with ``pipeline.shard_seed``, and a process needs
    (and keeps) only the cases of its own shards: pass just those with their ``shard_ids``.
    Extraction runs on ``num_workers`` tf.data threads (AUTOTUNE when None) in step order;
    endless when ``num_steps`` is None. Volumes are cast to float32 images / int32 labels and
    their foreground indexed once, up front.
    """
    patch = _as_size(patch_size, None, "patch_size")
    _check_volumes(volumes, len(patch))
    local = parallel.check_batch_size(global_batch_size, mesh)
    n_shards, shard_parts = pipeline.shard_parts(num_shards, global_batch_size)
    ids = np.arange(len(volumes)) % n_shards if shard_ids is None else np.asarray(shard_ids)
    if len(ids) != len(volumes):
        raise ValueError(f"{len(ids)} shard_ids for {len(volumes)} volumes")
    weights = None if case_weights is None else np.asarray(case_weights, np.float64)

    def plan(shard: int, batch: int, rows: slice | None):
        which = [i for i in range(len(volumes)) if ids[i] == shard]
        if not which:
            raise ValueError(
                f"data shard {shard} of {n_shards} has no training volume (fewer cases than "
                "shards: lower config.data.shards)"
            )
        vols = [
            {
                "image": np.asarray(volumes[i]["image"], np.float32),
                "label": np.asarray(volumes[i]["label"]).astype(np.int32, copy=False),
            }
            for i in which
        ]
        kwargs = dict(
            seed=pipeline.shard_seed(seed, shard, n_shards),
            global_batch_size=batch,
            patch_size=patch,
            fg_fraction=fg_fraction,
            fg_indices=[foreground_index(v["label"]) for v in vols],
            case_weights=None if weights is None else weights[which],
            rows=rows,
            image_pad=image_pad,
            label_pad=label_pad,
        )
        return functools.partial(patch_batch, vols, **kwargs)

    parts = [plan(shard, batch, rows) for shard, batch, rows in shard_parts]
    n_chan = np.shape(volumes[0]["image"])[-1]

    def host_batch(step: int) -> dict[str, np.ndarray]:
        return pipeline.concat_parts([part(step) for part in parts])

    spec = {
        "image": ((local, *patch, n_chan), np.dtype(np.float32)),
        "label": ((local, *patch), np.dtype(np.int32)),
    }
    return pipeline.iterate_steps(
        host_batch,
        spec,
        mesh=mesh,
        start_step=start_step,
        num_steps=num_steps,
        prefetch=prefetch,
        num_workers=num_workers,
    )


# ---------------------------------------------------------------------------------------------
# tumour-dense 2D crops (review recipe)
# ---------------------------------------------------------------------------------------------


_INT64_SAFE = 2**62  # squared tie distances below this are summed in int64 without overflow


def densest_window(label2d: np.ndarray, size: Sequence[int] = (64, 64)) -> tuple[int, int]:
    """Top-left ``(y0, x0)`` of the ``size`` window holding the most foreground (``> 0``) pixels.

    Candidates are the valid starts of :func:`start_range` (a slice smaller than the window along
    an axis gives starts ``<= 0``: the window covers that whole axis and the rest is padding, as
    in :func:`extract_patch`). Box sums come from an integral image (O(H W)). Ties go to the
    window whose centre ``(y0 + (h - 1) / 2, x0 + (w - 1) / 2)`` is nearest (Euclidean, computed
    exactly in integers) the foreground centroid -- the slice centre when there is no
    foreground -- and then to the smallest ``(y0, x0)`` in row-major order.
    """
    m = np.asarray(label2d) > 0
    if m.ndim != 2:
        raise ValueError(f"densest_window: label2d must be [H, W], got shape {m.shape}")
    h, w = m.shape
    sh, sw = _as_size(size, 2, "size")
    (ly, lx), (hy, hx) = start_range((h, w), (sh, sw))
    ys, xs = np.arange(ly, hy + 1), np.arange(lx, hx + 1)
    integral = np.zeros((h + 1, w + 1), np.int64)
    integral[1:, 1:] = m.cumsum(0, dtype=np.int64).cumsum(1)
    ya, yb = np.clip(ys, 0, h), np.clip(ys + sh, 0, h)
    xa, xb = np.clip(xs, 0, w), np.clip(xs + sw, 0, w)
    sums = (
        integral[yb][:, xb] - integral[ya][:, xb] - integral[yb][:, xa] + integral[ya][:, xa]
    )  # [len(ys), len(xs)]
    iy, ix = np.nonzero(sums == sums.max())  # row-major order
    if iy.size == 1:
        return int(ys[iy[0]]), int(xs[ix[0]])
    # Distance to the reference point r = num / den per axis, scaled by 2 den to stay integral:
    # 2 den (centre - r) = den (2 start + size - 1) - num.
    count = int(m.sum())
    if count:
        py, px = np.nonzero(m)
        den, num_y, num_x = count, 2 * int(py.sum()), 2 * int(px.sum())
    else:
        den, num_y, num_x = 1, h - 1, w - 1
    ey = [den * (2 * int(y) + sh - 1) - num_y for y in ys]
    ex = [den * (2 * int(x) + sw - 1) - num_x for x in xs]
    big = max(max(map(abs, ey)), max(map(abs, ex)))
    dtype = np.int64 if 2 * big * big < _INT64_SAFE else object  # python ints beyond int64
    ey2, ex2 = np.asarray(ey, dtype) ** 2, np.asarray(ex, dtype) ** 2
    k = int(np.argmin(ey2[iy] + ex2[ix]))  # first minimum = smallest (y0, x0)
    return int(ys[iy[k]]), int(xs[ix[k]])


def tumour_dense_crops(
    image: np.ndarray,
    label: np.ndarray,
    size: Sequence[int] = (64, 64),
    *,
    image_pad: float = 0.0,
    label_pad: int = 0,
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Crop ``image [H, W, C]`` and ``label [H, W]`` to the :func:`densest_window` of the label.

    Returns ``(image [*size, C], label [*size], (y0, x0))``; a slice smaller than ``size`` is
    padded with ``image_pad`` / ``label_pad`` (see :func:`extract_patch`).
    """
    img, lab = np.asarray(image), np.asarray(label)
    if img.ndim != 3 or lab.shape != img.shape[:2]:
        raise ValueError(
            f"tumour_dense_crops: expected image [H, W, C] and label [H, W], got image "
            f"{img.shape} and label {lab.shape}"
        )
    size = _as_size(size, 2, "size")
    y0, x0 = densest_window(lab, size)
    return (
        extract_patch(img, (y0, x0), size, image_pad),
        extract_patch(lab, (y0, x0), size, label_pad),
        (y0, x0),
    )
