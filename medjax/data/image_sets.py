"""In-memory 2D image sets for GAN experiments (DCGAN/WGAN, pix2pix, CycleGAN).

Every loader returns a plain ``dict`` of numpy arrays. Images follow the GAN convention:
**float32, channels-last, in [-1, 1]** (the range of a ``tanh`` generator output).

- :func:`load_medmnist`: a MedMNIST ``.npz`` -> ``{"image" [N, H, W, C], "label" [N]}``.
- :func:`load_brats_slices` / :func:`load_tcia_series`: multi-contrast MRI -> paired 2D slices
  ``{"image" [N, H, W, M], "mask" [N, H, W], "label" [N, H, W], "case" [N], "slice_index" [N]}``
  with the M contrasts on the channel axis; image-to-image callers split the channels into source
  and target themselves (FLAIR -> T1c: ``source = image[..., :1]``, ``target = image[..., 1:]``).
- :func:`scale_to_unit_range`: the robust per-channel intensity scaling both MRI loaders use.
- :func:`split_unpaired` / :func:`split_by_case`: index splits for unpaired domains and for
  case-level train/validation sets.

Resizing (``size=``) uses the one rule of :func:`medjax.data.transforms.resize_2d`:
images are resampled bilinearly with ``scipy.ndimage.zoom(order=1, grid_mode=True,
mode="nearest")`` -- pixel-area aligned (half-pixel centres, as PIL / ``tf.image.resize``), edge
values repeated -- after a Gaussian anti-alias pre-filter of sigma ``(1/f - 1) / 2`` on an axis
shrunk by ``f < 1``; masks and labels use nearest neighbour (order 0) on the same grid. Before
resizing, the MRI loaders centre-pad each slice to the aspect ratio of ``size``, so anatomy is
never stretched.

Readers take a folder (or file) and discover what is there, so they work on any folder of the
same layout (e.g. one with withheld cases). Bad input raises ``FileNotFoundError`` (missing file
or folder) or ``ValueError`` (wrong keys, shapes, grids), naming the file, folder or case.

This module uses numpy, scipy and (through :mod:`medjax.data.io` / :mod:`medjax.data.volumes`)
nibabel and pydicom; resizing imports :mod:`medjax.data.transforms` (and so jax) on first use.
It never imports TensorFlow.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from medjax.data.io import read_dicom_series
from medjax.data.listing import Listing
from medjax.data.sources import natural_key
from medjax.data.volumes import find_cases, load_case

__all__ = [
    "TCIA_SERIES",
    "load_brats_slices",
    "load_medmnist",
    "load_tcia_series",
    "scale_to_unit_range",
    "split_by_case",
    "split_unpaired",
]

PathLike = str | os.PathLike[str]
ImageSet = dict[str, np.ndarray]

# TCIA Brain-Tumor-Progression series: name -> case-insensitive keyword of the series folder name
# (folders are e.g. "34907-T1prereg-43695"; the leading/trailing numbers differ per exam).
TCIA_SERIES: dict[str, str] = {
    "t1pre": "T1prereg",
    "t1post": "T1post",
    "t2": "T2reg",
    "flair": "FLAIRreg",
    "mask": "MaskTumor",
}

_AFFINE_ATOL = 1e-3  # mm; same tolerance as medjax.data.volumes uses for one case's grid


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def _as_size(size: Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    out = tuple(int(s) for s in size)
    if len(out) != 2 or min(out) < 1:
        raise ValueError(f"size must be None or two positive ints (H, W), got {size!r}")
    return out  # type: ignore[return-value]


def _resize_stack(x: np.ndarray, size: tuple[int, int], *, order: int) -> np.ndarray:
    """Resize the axes 1, 2 of a stack ``[N, H, W, ...]`` to ``size`` (``transforms.resize_2d``:
    bilinear with anti-aliasing for images, nearest for masks / labels)."""
    from medjax.data.transforms import resize_2d

    if tuple(x.shape[1:3]) == size:
        return x.copy()
    return np.stack([resize_2d(im, size, order=order) for im in x]) if len(x) else x


def _pad_to(x: np.ndarray, shape: tuple[int, int], value: float | int | bool) -> np.ndarray:
    """Centre-pad axes 1, 2 of ``[N, H, W, ...]`` to ``shape`` with ``value`` (odd: extra after)."""
    h, w = x.shape[1:3]
    dh, dw = shape[0] - h, shape[1] - w
    if dh < 0 or dw < 0:
        raise AssertionError(f"cannot pad {(h, w)} to the smaller {shape}")
    if dh == dw == 0:
        return x
    pads = [(0, 0), (dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2)] + [(0, 0)] * (x.ndim - 3)
    return np.pad(x, pads, mode="constant", constant_values=value)


def _aspect_shape(h: int, w: int, size: tuple[int, int]) -> tuple[int, int]:
    """The smallest ``(H, W) >= (h, w)`` with ``H / W`` (nearly) ``size[0] / size[1]``."""
    th, tw = size
    if h * tw >= w * th:  # too tall for the target: widen
        return h, max(w, int(round(h * tw / th)))
    return max(h, int(round(w * th / tw))), w


def _finish_slices(
    image: np.ndarray,
    mask: np.ndarray,
    label: np.ndarray,
    size: tuple[int, int] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pad to the aspect of ``size`` and resize a slice stack; outside the mask stays -1."""
    if size is None:
        return image, mask, label
    shape = _aspect_shape(image.shape[1], image.shape[2], size)
    image = _resize_stack(_pad_to(image, shape, -1.0), size, order=1)
    mask = _resize_stack(_pad_to(mask, shape, False), size, order=0)
    label = _resize_stack(_pad_to(label, shape, 0), size, order=0)
    # Bilinear and anti-alias filters are convex combinations, so the range is kept up to
    # rounding; the (nearest-neighbour) mask decides which pixels are background.
    np.clip(image, -1.0, 1.0, out=image)
    image[~mask] = -1.0
    return image, mask, label


def _empty_set(n_channels: int, shape: tuple[int, int]) -> ImageSet:
    return {
        "image": np.zeros((0, *shape, n_channels), np.float32),
        "mask": np.zeros((0, *shape), bool),
        "label": np.zeros((0, *shape), np.int32),
        "case": np.zeros((0,), str),
        "slice_index": np.zeros((0,), np.int32),
    }


# --------------------------------------------------------------------------------------------
# MedMNIST
# --------------------------------------------------------------------------------------------


def find_npz(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"MedMNIST file or folder {path} does not exist")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".npz")
    files = [p for p in files if not p.name.startswith(".")]
    if not files:
        raise FileNotFoundError(f"MedMNIST folder {path} holds no .npz file (expected exactly one)")
    if len(files) > 1:
        raise ValueError(
            f"MedMNIST folder {path} holds {len(files)} .npz files {[p.name for p in files]}; "
            f"expected exactly one (pass the file itself to choose)"
        )
    return files[0]


def load_medmnist(
    path: PathLike,
    split: str = "train",
    *,
    size: Sequence[int] | None = None,
    spatial_dims: int | None = None,
) -> ImageSet:
    """Read one split of a MedMNIST ``.npz`` as GAN images.

    Args:
      path: the ``.npz`` file, or a folder holding exactly one ``.npz`` (its name does not
        matter: ``BreastMNIST.npz``, ``pneumoniamnist.npz``, ...).
      split: the key prefix: reads ``<split>_images`` (uint8 ``[N, H, W]`` grey,
        ``[N, H, W, 3]`` RGB, or the 3D sets' ``[N, D, H, W]`` volumes) and ``<split>_labels``
        (``[N]`` or ``[N, 1]``).
      size: ``(H', W')`` (``(D', H', W')`` for volumes) to resample to (e.g. ``(64, 64)`` for a
        64x64 DCGAN), or None to keep the stored size. Bilinear, ``scipy.ndimage.zoom`` order 1
        with half-pixel centres and repeated edges (see the module docstring; anti-aliased when
        shrinking 2D images); trilinear for volumes.
      spatial_dims: 2 or 3; None decides from the array: ``[N, D, H, W]`` with a last axis
        other than 1 or 3 is a stack of volumes (never 28 channels), ``[N, D, H, W, C]`` too.

    Returns:
      ``{"image": float32 [N, *spatial, C] = uint8 / 127.5 - 1 in [-1, 1] (C = 1 for grey),
      "label": int32 [N]}``.

    Raises:
      FileNotFoundError: ``path`` missing, or a folder without a ``.npz``.
      ValueError: several ``.npz`` in the folder, an unreadable file, missing split keys (the
        message names the file and lists the keys present), non-uint8 images, multi-label or
        mismatched label arrays.
    """
    npz = find_npz(Path(path))
    img_key, lab_key = f"{split}_images", f"{split}_labels"
    try:
        with np.load(npz, allow_pickle=False) as data:
            keys = list(data.files)
            found = {k: data[k] for k in (img_key, lab_key) if k in keys}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(
            f"cannot read MedMNIST file {npz}: {exc} (expected a .npz archive)"
        ) from exc
    missing = [k for k in (img_key, lab_key) if k not in found]
    if missing:
        raise ValueError(
            f"MedMNIST file {npz} has no {missing} for split {split!r}; keys present: {keys}"
        )
    images, labels = found[img_key], found[lab_key]
    if images.dtype != np.uint8:
        raise ValueError(f"{npz}: {img_key} has dtype {images.dtype}; expected uint8 pixels")
    dims = spatial_dims
    if dims is None:
        dims = 3 if images.ndim == 5 or (images.ndim == 4 and images.shape[-1] not in (1, 3)) else 2
    if images.ndim == dims + 1:
        images = images[..., None]
    if images.ndim != dims + 2:
        want = "[N, H, W] or [N, H, W, C]" if dims == 2 else "[N, D, H, W] or [N, D, H, W, C]"
        raise ValueError(
            f"{npz}: {img_key} has shape {images.shape}; expected {want} ({dims}D images)"
        )
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{npz}: {lab_key} has shape {labels.shape}; expected [{images.shape[0]}] or "
            f"[{images.shape[0]}, 1] (one class per image; multi-label sets are not supported)"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        frac = labels[np.abs(labels - np.rint(labels)) > 0]
        if frac.size or not np.isfinite(labels).all():
            raise ValueError(
                f"{npz}: {lab_key} holds non-integer values {np.unique(frac)[:6].tolist()}; "
                "expected integer class labels"
            )
    image = images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    if size is not None and dims == 3:
        from medjax.data.transforms import resample_to_spacing

        shape = tuple(int(v) for v in size)
        if len(shape) != 3:
            raise ValueError(f"size must be (D, H, W) for volumes, got {size!r}")
        image = np.stack(
            [resample_to_spacing(v, (1.0,) * 3, None, order=1, shape=shape)[0] for v in image]
        )
        np.clip(image, -1.0, 1.0, out=image)
    elif size is not None:
        image = _resize_stack(image, _as_size(size), order=1)
        np.clip(image, -1.0, 1.0, out=image)
    return {"image": image, "label": np.rint(labels).astype(np.int32)}


# --------------------------------------------------------------------------------------------
# intensity scaling
# --------------------------------------------------------------------------------------------


def scale_to_unit_range(
    volume: np.ndarray,
    mask: np.ndarray | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> np.ndarray:
    """Robust per-channel min-max scaling of an MR image to [-1, 1].

    For each channel ``c`` of ``volume [..., C]``: ``lo, hi`` = the ``percentiles`` (numpy's
    default linear method) of the voxels inside ``mask [...]`` (every voxel when None), then
    ``2 * (x - lo) / (hi - lo) - 1`` clipped to [-1, 1]; voxels outside the mask are set to -1.
    A constant channel (``hi == lo``) maps to -1.

    Returns float32 ``[..., C]``. Raises ValueError for a volume without a channel axis, a mask
    of another shape, an empty mask, NaN/inf voxels or percentiles outside 0 <= lo < hi <= 100.
    """
    x = np.asarray(volume, np.float32)
    if x.ndim < 2:
        raise ValueError(f"scale_to_unit_range: volume must be [..., C], got shape {x.shape}")
    lo_p, hi_p = (float(p) for p in percentiles)
    if not 0.0 <= lo_p < hi_p <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= lo < hi <= 100, got {percentiles!r}")
    spatial = x.shape[:-1]
    if mask is None:
        m = np.ones(spatial, bool)
    else:
        m = np.asarray(mask).astype(bool, copy=False)
        if m.shape != spatial:
            raise ValueError(
                f"scale_to_unit_range: mask shape {m.shape} != volume spatial shape {spatial}"
            )
        if not m.any():
            raise ValueError(f"scale_to_unit_range: mask of shape {m.shape} selects no voxels")
    inside = x[m]  # [n, C]
    bad = int(inside.size - np.count_nonzero(np.isfinite(inside)))
    if bad:
        raise ValueError(
            f"scale_to_unit_range: {bad} voxel value(s) inside the mask are NaN or inf; expected "
            f"finite intensities"
        )
    lo, hi = np.percentile(inside.astype(np.float64), [lo_p, hi_p], axis=0)  # [C] each
    spread = hi - lo
    gain = np.where(spread > 0, 2.0 / np.where(spread > 0, spread, 1.0), 0.0)
    out = (x - lo.astype(np.float32)) * gain.astype(np.float32) - np.float32(1.0)
    np.clip(out, -1.0, 1.0, out=out)
    out[~m] = -1.0
    return out


# --------------------------------------------------------------------------------------------
# BraTS-like multi-contrast volumes
# --------------------------------------------------------------------------------------------


def _bbox_2d(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``(r0, r1, c0, c1)`` (half-open) of the True pixels of ``mask [H, W]`` (non-empty)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def load_brats_slices(
    directory: PathLike,
    *,
    layout: str = "deepmedic",
    modalities: Sequence[str] = ("flair", "t1ce"),
    size: Sequence[int] | None = (128, 128),
    min_brain_fraction: float = 0.2,
) -> ImageSet:
    """Paired 2D axial slices of every case of a BraTS-like folder, as GAN images.

    Each case is read with :func:`medjax.data.volumes.load_case` (``layout`` and ``modalities``
    as in :func:`~medjax.data.volumes.find_cases`) and scaled with :func:`scale_to_unit_range`
    inside its brain mask (so background is -1). Axial slices are taken along the canonical
    RAS+ ``Z`` axis and shown in radiological display orientation: row 0 is anterior, column 0
    is the patient's right (``H`` runs anterior -> posterior, ``W`` right -> left; for a
    volume stored LPS, like BraTS, that is ``stored[:, :, z].T``).

    Slice selection and geometry, in order:

    1. a slice is kept when its brain fraction -- brain-mask pixels / pixels of the full
       acquired slice (``X * Y``, e.g. 240 * 240) -- is ``>= min_brain_fraction``; this
       depends on the case alone, not on the other cases of the folder;
    2. every slice of a case is cropped to a square window centred on the case's brain
       bounding box (the union over all its slices); the side is the largest bounding-box side
       over all cases read, so all slices share one square size and one pixel scale; parts of
       the window outside the volume are padded with -1 (image), False (mask), 0 (label);
    3. with ``size``, slices are padded (centred) to the aspect ratio of ``size`` (a no-op for
       square sizes) and resized to it: images bilinearly (anti-aliased when shrinking), mask
       and label by nearest neighbour; image pixels outside the resized mask are set to -1.

    Returns:
      ``"image"`` float32 [N, H, W, len(modalities)] in [-1, 1], channels in ``modalities``
      order; ``"mask"`` bool [N, H, W] brain; ``"label"`` int32 [N, H, W] internal BraTS
      classes as ``load_case`` gives them (0 background, 1 NCR/NET, 2 edema, 3 enhancing;
      zeros for a case without a label file); ``"case"`` str [N] case ids; ``"slice_index"``
      int32 [N], the slice's ``Z`` index in ``load_case``'s array. Cases come in
      ``find_cases`` order, slices in increasing ``Z``. Without ``size``, ``H = W`` = the
      common square side.

    Memory: each case's kept slices are cropped to its brain box before the next case is read,
    so the peak is about one full case plus the cropped slices.

    Raises:
      FileNotFoundError / ValueError: as ``find_cases`` / ``load_case``; ValueError for a case
      with an empty brain mask, a bad ``size`` or ``min_brain_fraction`` outside [0, 1].
    """
    out_size = _as_size(size)
    if not 0.0 <= float(min_brain_fraction) <= 1.0:
        raise ValueError(f"min_brain_fraction must be in [0, 1], got {min_brain_fraction}")
    mods = list(modalities)
    cases = find_cases(directory, layout, modalities=mods)
    parts: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    side = 0
    for case in cases:
        ex = load_case(case, modalities=mods)
        brain = ex["mask"]
        if not brain.any():
            raise ValueError(
                f"case {case.id!r} in {directory}: the brain mask is empty (expected brain voxels "
                f"to scale intensities in and to crop to)"
            )
        image = scale_to_unit_range(ex["image"], brain)
        label = ex.get("label")
        if label is None:
            label = np.zeros(brain.shape, np.int32)
        # [X, Y, Z(, C)] RAS+ -> [Z, H, W(, C)] with H = Y reversed (anterior first) and W = X
        # reversed (patient's right first): the radiological display of an axial slice.
        image = np.flip(image, (0, 1)).transpose(2, 1, 0, 3)
        brain = np.flip(brain, (0, 1)).transpose(2, 1, 0)
        label = np.flip(label, (0, 1)).transpose(2, 1, 0)
        del ex
        r0, r1, c0, c1 = _bbox_2d(brain.any(axis=0))
        side = max(side, r1 - r0, c1 - c0)
        fraction = brain.mean(axis=(1, 2))
        keep = np.flatnonzero(fraction >= min_brain_fraction)
        # Copies: the crops must not keep the whole case alive as views.
        parts.append(
            (
                case.id,
                keep.astype(np.int32),
                np.ascontiguousarray(image[keep, r0:r1, c0:c1]),
                np.ascontiguousarray(brain[keep, r0:r1, c0:c1]),
                np.ascontiguousarray(label[keep, r0:r1, c0:c1]),
            )
        )
        del image, brain, label
    out_shape = out_size if out_size is not None else (side, side)
    result = _empty_set(len(mods), out_shape)
    images, masks, labels, ids, indices = [], [], [], [], []
    for cid, keep, image, brain, label in parts:
        if keep.size == 0:
            continue
        square = (side, side)
        image, brain, label = _finish_slices(
            _pad_to(image, square, -1.0), _pad_to(brain, square, False), _pad_to(label, square, 0),
            out_size,
        )  # fmt: skip
        images.append(image)
        masks.append(brain)
        labels.append(label.astype(np.int32, copy=False))
        ids.append(np.full(keep.size, cid))
        indices.append(keep)
    if images:
        result = {
            "image": np.concatenate(images).astype(np.float32, copy=False),
            "mask": np.concatenate(masks),
            "label": np.concatenate(labels),
            "case": np.concatenate(ids),
            "slice_index": np.concatenate(indices),
        }
    return result


# --------------------------------------------------------------------------------------------
# TCIA Brain-Tumor-Progression DICOM exams
# --------------------------------------------------------------------------------------------


def _find_series(root: Path, name: str) -> Path | None:
    keyword = TCIA_SERIES[name].lower()
    hits = [
        p
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and keyword in p.name.lower()
    ]
    if len(hits) > 1:
        raise ValueError(
            f"exam folder {root} has {len(hits)} folders matching series {name!r} (keyword "
            f"{TCIA_SERIES[name]!r}): {sorted(p.name for p in hits)}; expected one"
        )
    return hits[0] if hits else None


def load_tcia_series(
    directory: PathLike,
    series: Sequence[str] = ("t1pre", "t2"),
    *,
    size: Sequence[int] | None = (128, 128),
    min_head_fraction: float = 0.1,
    head_threshold: float = 0.05,
) -> ImageSet:
    """Paired 2D slices of one TCIA Brain-Tumor-Progression exam (co-registered DICOM series).

    Layout: ``directory`` is one exam folder holding one folder per series; a series is found
    by a case-insensitive keyword in its folder name (:data:`TCIA_SERIES`: ``t1pre``
    "T1prereg", ``t1post`` "T1post", ``t2`` "T2reg", ``flair`` "FLAIRreg"; the tumour mask
    "MaskTumor" is read as the label when present). Each series is read with
    :func:`medjax.data.io.read_dicom_series` (``canonical=False``: the stored
    (column, row, slice) grid, slices sorted along the slice normal); all must share one grid.

    Slicing: along the acquisition's slice axis (the third axis of that grid), each slice shown
    as the acquired plane ``[rows, columns]`` (320 x 260 for this collection), i.e. exactly the
    DICOM ``pixel_array`` of that slice. ``slice_index`` is the position in the sorted stack.

    Head mask: the union over the requested series of the voxels above ``head_threshold`` x
    that series' 99th percentile, with holes filled per slice (``binary_fill_holes``). Each
    series is scaled with :func:`scale_to_unit_range` inside that mask (outside -> -1). Slices
    whose head fraction (mask pixels / plane pixels) is ``>= min_head_fraction`` are kept. With
    ``size``, slices are centre-padded to its aspect ratio (-1 / False / 0) and resized as in
    :func:`load_brats_slices`; without it they stay ``[rows, columns]``.

    Returns:
      The keys of :func:`load_brats_slices`: ``"image"`` float32 [N, H, W, len(series)] in
      [-1, 1]; ``"mask"`` bool [N, H, W] head; ``"label"`` int32 [N, H, W], 1 where the tumour
      mask series is > 0 (zeros when the exam has none); ``"case"`` str [N] (the exam folder's
      name); ``"slice_index"`` int32 [N].

    Raises:
      FileNotFoundError: missing folder or series (the message lists the folders present).
      ValueError: unknown / repeated series names, several folders matching one series, series
        on different grids (names both folders), an empty head mask, bad arguments.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"TCIA exam folder {root} does not exist (or is not a folder)")
    if isinstance(series, str):
        raise ValueError(f"series must be a sequence of names, got the string {series!r}")
    names = list(series)
    images_known = [n for n in TCIA_SERIES if n != "mask"]
    unknown = [n for n in names if n not in images_known]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(
            f"series must name distinct image series among {images_known} (the tumour mask is "
            f"returned as 'label'), got {names}"
        )
    out_size = _as_size(size)
    if not 0.0 <= float(min_head_fraction) <= 1.0:
        raise ValueError(f"min_head_fraction must be in [0, 1], got {min_head_fraction}")
    if not 0.0 <= float(head_threshold) < 1.0:
        raise ValueError(f"head_threshold must be in [0, 1), got {head_threshold}")

    folders: dict[str, Path] = {}
    for name in names:
        folder = _find_series(root, name)
        if folder is None:
            present = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise FileNotFoundError(
                f"exam folder {root} has no {name!r} series (a folder whose name contains "
                f"{TCIA_SERIES[name]!r}); folders present: {present}"
            )
        folders[name] = folder
    mask_folder = _find_series(root, "mask")

    vols: list[np.ndarray] = []
    ref: tuple[Path, Any] | None = None

    def read(folder: Path) -> np.ndarray:
        nonlocal ref
        arr, geom = read_dicom_series(folder, canonical=False, dtype=np.float32)
        if ref is None:
            ref = (folder, geom)
        elif arr.shape != ref[1].shape or not np.allclose(
            geom.affine, ref[1].affine, atol=_AFFINE_ATOL
        ):
            raise ValueError(
                f"series {folder} (shape {arr.shape}, affine\n{np.round(geom.affine, 4)}) and "
                f"{ref[0]} (shape {ref[1].shape}, affine\n{np.round(ref[1].affine, 4)}) are not "
                f"on the same grid; expected co-registered series (affines compared with atol "
                f"{_AFFINE_ATOL} mm)"
            )
        # (column, row, slice) -> (slice, row, column): each slice is the DICOM pixel_array.
        return np.ascontiguousarray(arr.transpose(2, 1, 0))

    for name in names:
        vols.append(read(folders[name]))
    volume = np.stack(vols, axis=-1)  # [K, rows, cols, C]
    del vols
    if mask_folder is not None:
        label = (read(mask_folder) > 0).astype(np.int32)
    else:
        label = np.zeros(volume.shape[:3], np.int32)

    head = np.zeros(volume.shape[:3], bool)
    for c in range(volume.shape[-1]):
        channel = volume[..., c]
        head |= channel > head_threshold * np.percentile(channel, 99)
    for k in range(head.shape[0]):
        head[k] = ndimage.binary_fill_holes(head[k])
    if not head.any():
        raise ValueError(
            f"exam {root}: no voxel is above {head_threshold} x the 99th percentile of any of "
            f"the series {[folders[n].name for n in names]} (empty head mask)"
        )
    image = scale_to_unit_range(volume, head)
    del volume
    keep = np.flatnonzero(head.mean(axis=(1, 2)) >= min_head_fraction)
    plane = image.shape[1:3]
    if keep.size == 0:
        return _empty_set(len(names), out_size if out_size is not None else plane)
    image, head, label = _finish_slices(image[keep], head[keep], label[keep], out_size)
    return {
        "image": image.astype(np.float32, copy=False),
        "mask": head,
        "label": label.astype(np.int32, copy=False),
        "case": np.full(keep.size, root.name),
        "slice_index": keep.astype(np.int32),
    }


# --------------------------------------------------------------------------------------------
# splits
# --------------------------------------------------------------------------------------------


def split_unpaired(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into two disjoint domains for unpaired (CycleGAN-style) training.

    A permutation of ``range(n)`` seeded with ``seed`` is cut after ``n // 2``: ``idx_a`` gets
    the first ``n // 2`` indices, ``idx_b`` the other ``n - n // 2``. Together they cover
    ``range(n)`` exactly once, so no slice is in both domains (take domain A's source channel
    from ``idx_a`` and domain B's target channel from ``idx_b``; the discarded partners remain
    available to the caller for evaluation only). Each half is returned sorted (int64), so
    indexing keeps the data order; the seed alone decides membership.

    Raises ValueError for ``n < 2`` (both domains must be non-empty).
    """
    n = int(n)
    if n < 2:
        raise ValueError(f"split_unpaired needs n >= 2 examples (two non-empty halves), got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    half = n // 2
    return np.sort(perm[:half]).astype(np.int64), np.sort(perm[half:]).astype(np.int64)


def split_by_case(
    cases: np.ndarray, val_cases: Sequence[str] | str | int
) -> tuple[np.ndarray, np.ndarray]:
    """Split examples into ``(train_idx, val_idx)`` keeping every case whole.

    ``cases`` is the per-example case id array ``[N]`` (e.g. ``load_brats_slices(...)["case"]``).
    ``val_cases`` is either the case ids for validation (a sequence, or one id as a string) or
    an int ``n``: the last ``n`` distinct cases in natural sort order (``"pat2" < "pat10"``;
    the plain sorted order for zero-padded ids). Returns two int64 index arrays in increasing
    order; every example of a case lies on one side.

    Raises ValueError when a named case is absent from ``cases`` (listing the cases present),
    or when ``n`` is negative or larger than the number of cases.
    """
    ids = np.asarray(cases).astype(str)
    if ids.ndim != 1:
        raise ValueError(f"cases must be a 1-D array of case ids, got shape {ids.shape}")
    present = sorted(set(ids.tolist()), key=natural_key)
    if isinstance(val_cases, int | np.integer) and not isinstance(val_cases, bool):
        n = int(val_cases)
        if not 0 <= n <= len(present):
            raise ValueError(
                f"val_cases={n}: expected 0..{len(present)} (the number of distinct cases)"
            )
        chosen = present[len(present) - n :] if n else []
    else:
        wanted = [val_cases] if isinstance(val_cases, str) else [str(v) for v in val_cases]
        absent = [v for v in wanted if v not in set(present)]
        if absent:
            shown = present if len(present) <= 20 else present[:20] + ["..."]
            raise ValueError(f"validation cases {absent} are not in cases; present: {shown}")
        chosen = wanted
    is_val = np.isin(ids, np.asarray(chosen, dtype=str)) if chosen else np.zeros(ids.size, bool)
    return np.flatnonzero(~is_val).astype(np.int64), np.flatnonzero(is_val).astype(np.int64)


def split_slice_block(
    arrays: dict[str, Any], block: Sequence[int]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(train, val) of equal-length arrays: rows ``lo <= i < hi`` of ``block = (lo, hi)`` are
    validation, the rest training (one exam's slices, e.g. the TCIA series)."""
    lo, hi = (int(v) for v in block)
    n = len(next(iter(arrays.values())))
    if not 0 <= lo < hi <= n:
        raise ValueError(f"validation slice block {(lo, hi)} is not inside 0..{n}")
    idx = np.arange(n)
    is_val = (idx >= lo) & (idx < hi)
    train = {k: np.asarray(v)[~is_val] for k, v in arrays.items()}
    return train, {k: np.asarray(v)[is_val] for k, v in arrays.items()}


# --------------------------------------------------------------------------------------------
# folders of images in the layouts of other tools (2D files or 3D NIfTI volumes)
# --------------------------------------------------------------------------------------------


def _mode(channels: int | None) -> str | None:
    return {1: "L", 3: "RGB"}.get(int(channels or 0))


def read_scaled(
    path: PathLike,
    *,
    spatial_dims: int = 2,
    channels: int | None = None,
    size: Sequence[int] | None = None,
) -> np.ndarray:
    """One image file as float32 ``[*spatial, C]`` in [-1, 1] (the GAN / classifier range).

    2D files (PNG, JPEG, TIFF, BMP; ``channels`` 1 or 3 converts): 8/16-bit pixels map linearly
    (``2 x / max - 1``). NIfTI (2D, or 3D ``[X, Y, Z(, C)]`` volumes in canonical RAS+ order for
    ``spatial_dims=3``): :func:`scale_to_unit_range` over the whole image (0.5-99.5
    percentiles). With ``size`` the spatial axes are resampled to it (bilinear, anti-aliased
    when shrinking, in 2D; trilinear in 3D).
    """
    from medjax.data import io, sources, transforms

    path = Path(path)
    nifti = path.name.lower().endswith(sources.NIFTI_SUFFIXES)
    if spatial_dims == 2:
        image, _ = sources.read_image_2d(path, _mode(channels))
        image = scale_to_unit_range(image) if nifti else image * 2.0 - 1.0
    elif spatial_dims == 3:
        if not nifti:
            raise ValueError(f"{path}: 3D images must be NIfTI volumes (.nii / .nii.gz)")
        vol, _ = io.read_nifti(path)
        io.check_finite(vol, path)
        image = scale_to_unit_range(vol if vol.ndim == 4 else vol[..., None])
    else:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if channels and image.shape[-1] != int(channels):
        raise ValueError(f"{path} has {image.shape[-1]} channels; config.data.channels={channels}")
    if size:
        size = tuple(int(s) for s in size)
        if len(size) != spatial_dims:
            raise ValueError(f"image_size {size} must have {spatial_dims} entries")
        if spatial_dims == 2:
            image = transforms.resize_2d(image, size, order=1)
        else:
            image, _ = transforms.resample_to_spacing(image, (1.0,) * 3, None, order=1, shape=size)
        np.clip(image, -1.0, 1.0, out=image)
    return image.astype(np.float32, copy=False)


def _stack(images: Sequence[np.ndarray], where: PathLike) -> np.ndarray:
    shapes = sorted({im.shape for im in images})
    if len(shapes) != 1:
        raise ValueError(
            f"images in {where} have different shapes {shapes[:4]}; set config.data.image_size"
        )
    return np.stack(images).astype(np.float32, copy=False)


def _stacked(key: str = "image") -> Any:
    """`combine` of a listing whose examples read as `(id, image)`: ``{key, "id"}``."""

    def combine(read: list[tuple[str, np.ndarray]]) -> ImageSet:
        return {key: _stack([im for _, im in read], "the listed files"), "id": np.array(
            [i for i, _ in read]
        )}  # fmt: skip

    return combine


def list_image_folder(
    folder: PathLike,
    *,
    spatial_dims: int = 2,
    channels: int | None = None,
    size: Sequence[int] | None = None,
) -> Listing[ImageSet]:
    """Every image of one folder (natural name order), listed (:mod:`medjax.data.listing`);
    read, ``{"image": [N, *spatial, C] in [-1, 1], "id": [N]}`` (:func:`read_scaled`); ids are
    the file stems."""
    from medjax.data import sources

    files = sources.list_image_files(folder)
    stems = [sources.image_stem(f) for f in files]
    kw = dict(spatial_dims=spatial_dims, channels=channels, size=size)
    return Listing.of_files(
        stems,
        list(zip(stems, files, strict=True)),
        lambda item: (item[0], read_scaled(item[1], **kw)),
        _stacked(),
        where=str(folder),
    )


def load_image_folder(folder: PathLike, **kw: Any) -> ImageSet:
    """:func:`list_image_folder` (same arguments), read."""
    return list_image_folder(folder, **kw).read()


def list_class_folders(
    root: PathLike,
    *,
    class_names: Sequence[str] | None = None,
    spatial_dims: int = 2,
    channels: int | None = None,
    size: Sequence[int] | None = None,
) -> Listing[ImageSet]:
    """A folder per class (torchvision's ImageFolder): ``root/<class name>/<image>``, listed
    (the class of every image is known before it is read: ``meta["label"]``).

    Class ``c`` is ``class_names[c]`` (default: the sub-folder names in natural order; a class
    without a folder is allowed only when ``class_names`` are given). Read, ``{"image",
    "label" int32 [N], "id"}``; a sub-folder that is not a class is an error naming it.
    """
    from medjax.data import sources

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"class folder root {root} does not exist (or is not a folder)")
    present = sorted(
        (p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=natural_key,
    )
    names = list(class_names) if class_names else present
    extra = sorted(set(present) - set(names))
    if extra:
        raise ValueError(f"{root} has folders {extra} that are not among the classes {names}")
    if not present:
        raise FileNotFoundError(f"{root} holds no class folders (expected {root}/<class>/<image>)")
    items = [
        (f"{name}/{sources.image_stem(f)}", f, c)
        for c, name in enumerate(names)
        if name in present
        for f in sources.list_image_files(root / name)
    ]
    kw = dict(spatial_dims=spatial_dims, channels=channels, size=size)

    def combine(read: list[tuple[str, np.ndarray, int]]) -> ImageSet:
        return {
            "image": _stack([im for _, im, _ in read], root),
            "label": np.asarray([c for _, _, c in read], np.int32),
            "id": np.array([i for i, _, _ in read]),
        }

    return Listing.of_files(
        [it[0] for it in items],
        items,
        lambda it: (it[0], read_scaled(it[1], **kw), it[2]),
        combine,
        meta={"label": np.asarray([it[2] for it in items], np.int32)},
        where=str(root),
    )


def load_class_folders(root: PathLike, **kw: Any) -> ImageSet:
    """:func:`list_class_folders` (same arguments), read."""
    return list_class_folders(root, **kw).read()


def _read_mask(path: Path, spatial_dims: int, size: Sequence[int] | None) -> np.ndarray:
    """A mask file (non-zero = inside) as bool ``[*spatial]``, resized by nearest neighbour."""
    from medjax.data import io, sources, transforms

    if spatial_dims == 3:
        m = io.read_nifti(path)[0] > 0
    else:
        m = sources.read_image_2d(path)[0][..., 0] > 0
    if size and tuple(m.shape) != tuple(size):
        if spatial_dims == 2:
            m = transforms.resize_2d(m.astype(np.uint8), size, order=0) > 0
        else:
            m = (
                transforms.resample_to_spacing(
                    m.astype(np.uint8), (1.0,) * 3, None, order=0, shape=size
                )[0]
                > 0
            )
    return m


def list_paired_folders(
    a_dir: PathLike,
    b_dir: PathLike,
    *,
    mask_dir: PathLike | None = None,
    spatial_dims: int = 2,
    channels: int | None = None,
    size: Sequence[int] | None = None,
) -> Listing[ImageSet]:
    """Aligned pairs from two folders with matching file names (pix2pix's ``A/`` and ``B/``),
    listed; read, ``{"source": [N, *spatial, Ca], "target": [N, *spatial, Cb], "mask": bool
    [N, *spatial], "id"}``. The optional ``mask_dir`` holds a mask per pair (non-zero = inside;
    default: every pixel). An A image without its B partner (or mask) is an error naming both
    paths."""
    from medjax.data import sources

    def by_stem(folder: PathLike) -> dict[str, Path]:
        return {sources.image_stem(p): p for p in sources.list_image_files(folder)}

    b_files = by_stem(b_dir)
    m_files = {} if mask_dir is None else by_stem(mask_dir)
    items = []
    for fa in sources.list_image_files(a_dir):
        stem = sources.image_stem(fa)
        fb = b_files.get(stem)
        if fb is None:
            raise FileNotFoundError(
                f"{fa} has no partner in {b_dir} (expected a file with stem {stem!r})"
            )
        fm = m_files.get(stem)
        if mask_dir is not None and fm is None:
            raise FileNotFoundError(f"{fa} has no mask in {mask_dir} (stem {stem!r})")
        items.append((stem, fa, fb, fm))
    kw = dict(spatial_dims=spatial_dims, channels=channels, size=size)

    def read(item: tuple[str, Path, Path, Path | None]) -> tuple:
        stem, fa, fb, fm = item
        a, b = read_scaled(fa, **kw), read_scaled(fb, **kw)
        if a.shape[:-1] != b.shape[:-1]:
            raise ValueError(f"{fa} {a.shape[:-1]} and {fb} {b.shape[:-1]} differ in size")
        m = np.ones(a.shape[:-1], bool) if fm is None else _read_mask(fm, spatial_dims, size)
        return stem, a, b, m

    return Listing.of_files([it[0] for it in items], items, read, _pairs(a_dir), where=str(a_dir))


def _pairs(where: PathLike) -> Any:
    """`combine` of a listing whose examples read as `(id, source, target, mask)`."""

    def combine(read: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]) -> ImageSet:
        return {
            "source": _stack([r[1] for r in read], where),
            "target": _stack([r[2] for r in read], where),
            "mask": np.stack([r[3] for r in read]),
            "id": np.array([r[0] for r in read]),
        }

    return combine


def load_paired_folders(a_dir: PathLike, b_dir: PathLike, **kw: Any) -> ImageSet:
    """:func:`list_paired_folders` (same arguments), read."""
    return list_paired_folders(a_dir, b_dir, **kw).read()


def list_side_by_side(
    folder: PathLike, *, channels: int | None = None, size: Sequence[int] | None = None
) -> Listing[ImageSet]:
    """pytorch-CycleGAN-and-pix2pix's aligned images: each file is ``[A | B]`` side by side
    (width 2W), listed; read, the keys of :func:`load_paired_folders` (A left, B right)."""
    from medjax.data import sources, transforms

    def read(f: Path) -> tuple:
        ab = read_scaled(f, channels=channels)
        w2 = ab.shape[1]
        if w2 % 2:
            raise ValueError(f"{f} has odd width {w2}; an aligned AB image is two halves [A | B]")
        a, b = ab[:, : w2 // 2], ab[:, w2 // 2 :]
        if size:
            a = np.clip(transforms.resize_2d(a, size, order=1), -1, 1)
            b = np.clip(transforms.resize_2d(b, size, order=1), -1, 1)
        return sources.image_stem(f), a, b, np.ones(a.shape[:-1], bool)

    files = sources.list_image_files(folder)
    return Listing.of_files(
        [sources.image_stem(f) for f in files], files, read, _pairs(folder), where=str(folder)
    )


def load_side_by_side(folder: PathLike, **kw: Any) -> ImageSet:
    """:func:`list_side_by_side` (same arguments), read."""
    return list_side_by_side(folder, **kw).read()


def _holdout(d: Listing, split: str, cfg: Any) -> Listing:
    """`split` of a listing of a folder without split folders: a seeded `data.val_fraction`
    (default 0.2) is validation, the rest training."""
    from medjax.data import sources

    if split == "test":
        raise FileNotFoundError("no test folder in the data folder; pass one (--data_dir)")
    train_i, val_i = sources.split_examples(
        list(range(len(d))), float(cfg.get("val_fraction", 0.2)), int(cfg.get("split_seed", 0))
    )
    return d.take(train_i if split == "train" else val_i)


def _root(cfg: Any, directory: PathLike | None) -> Path:
    """The dataset folder: `directory` (evaluate.py --data_dir), else `data.directory`, else
    the shared folder `data.shared_folder`."""
    from medjax.data.paths import data_dir

    if directory is not None:
        return Path(directory)
    if cfg.get("directory"):
        return Path(str(cfg["directory"]))
    if cfg.get("shared_folder"):
        return data_dir(str(cfg["shared_folder"]))
    raise ValueError("config.data.directory is empty and config.data.shared_folder is not set")


def _sized(cfg: Any) -> dict[str, Any]:
    size = tuple(int(s) for s in (cfg.get("image_size") or ())) or None
    return {
        "spatial_dims": int(cfg.get("spatial_dims") or (len(size) if size else 2)),
        "channels": int(cfg.get("channels") or 0) or None,
        "size": size,
    }


def _split_or_holdout(root: Path, split: str, cfg: Any, read: Any, whole: bool) -> Listing:
    """`read(folder)` (a listing) of the split folder of `root` when it has one; else all of
    `root` when `whole` (a folder given to evaluate.py), or the `split` part of a seeded
    holdout."""
    from medjax.data import sources

    if sources.has_split_folders(root):
        folder = sources.split_folder(root, split)
        if folder == root:
            raise FileNotFoundError(f"{root} has no {split!r} folder (it has split folders)")
        return read(folder)
    return read(root) if whole else _holdout(read(root), split, cfg)


def _capped(d: Listing, cfg: Any, directory: PathLike | None) -> Listing:
    """`data.max_examples` (smoke runs) caps a configured split, not a folder given to
    evaluate.py."""
    return d if directory is not None else d.head(int(cfg.get("max_examples") or 0))


def _keys(d: Listing[ImageSet], keys: Sequence[str]) -> Listing[ImageSet]:
    """The listing, reading only `keys` of its examples."""
    return d.map(lambda x: {k: v for k, v in x.items() if k in keys})


def load_labelled_images(cfg: Any, split: str, *, directory: PathLike | None = None) -> ImageSet:
    """:func:`list_labelled_images`, read."""
    return list_labelled_images(cfg, split, directory=directory).read()


def list_labelled_images(
    cfg: Any, split: str, *, directory: PathLike | None = None
) -> Listing[ImageSet]:
    """Images with a class label for `split`, listed (``meta["label"]``); read, ``{"image"
    [N, *spatial, C] in [-1, 1], "label" int32 [N]}`` from `data.source`:

    - ``"medmnist"``: a MedMNIST ``.npz`` (:func:`load_medmnist`; 3D sets for
      ``data.spatial_dims=3``);
    - ``"class_folders"``: ``<root>/<split>/<class>/<image>`` (or ``<root>/<class>/<image>`` with
      a seeded ``data.val_fraction`` held out).
    """
    source = str(cfg["source"])
    kw = _sized(cfg)
    if source == "medmnist":
        root = _root(cfg, directory)
        d = Listing.of_arrays(
            load_medmnist(root, split, size=kw["size"], spatial_dims=kw["spatial_dims"]),
            meta_keys=("label",),
            where=str(root),
        )
    elif source == "class_folders":
        names = tuple(cfg.get("class_names") or ()) or None
        d = _split_or_holdout(
            _root(cfg, directory),
            split,
            cfg,
            lambda f: list_class_folders(f, class_names=names, **kw),
            directory is not None,
        )
    else:
        raise ValueError(
            f"config.data.source={source!r} is not one of ['class_folders', 'medmnist']"
        )
    return _keys(_capped(d, cfg, directory), ("image", "label"))


def brats_patches(directory: PathLike, cfg: Any, seed: int) -> np.ndarray:
    """`[cases * patches_per_case, *image_size, 1]` brain-centred 3D patches of the first of
    `cfg.modalities`, scaled to [-1, 1] in the brain mask, resampled to `cfg.spacing` and padded
    with -1 outside the volume (a fixed seeded set)."""
    from medjax.data import patches, transforms, volumes

    size = tuple(int(s) for s in cfg["image_size"])
    mods = tuple(cfg.get("modalities") or ("flair",))[:1]
    spacing = tuple(float(s) for s in (cfg.get("spacing") or ()))
    per_case = int(cfg.get("patches_per_case", 64))
    rng = np.random.default_rng(seed)
    layout = str(cfg.get("layout", "deepmedic"))
    out = []
    for case in volumes.find_cases(directory, layout, modalities=mods):
        ex = volumes.load_case(case, modalities=mods)
        image = scale_to_unit_range(ex["image"], ex["mask"])
        mask = ex["mask"].astype(np.uint8)
        if spacing:
            image, _ = transforms.resample_to_spacing(image, ex["spacing"], spacing, order=1)
            mask, _ = transforms.resample_to_spacing(
                mask, ex["spacing"], spacing, order=0, shape=image.shape[:-1]
            )
        starts = patches.sample_patch_starts(
            rng, image.shape[:-1], size, fg_index=patches.foreground_index(mask),
            fg_fraction=1.0, n=per_case,
        )  # fmt: skip
        out.extend(patches.extract_patch(image, st, size, pad_value=-1.0) for st in starts)
    if not out:
        raise ValueError(f"no cases found in {directory} for config.data.source='brats_patches'")
    return np.stack(out).astype(np.float32)


def load_gan_images(cfg: Any, split: str, *, directory: PathLike | None = None) -> ImageSet:
    """:func:`list_gan_images`, read."""
    return list_gan_images(cfg, split, directory=directory).read()


def list_gan_images(cfg: Any, split: str, *, directory: PathLike | None = None) -> Listing:
    """Real images of `split` for an unconditional (or class-conditional) GAN, listed; read,
    ``{"image": [N, *spatial, C] in [-1, 1]}`` (plus ``"label"`` when the source has classes),
    from `data.source`:

    - ``"folder"``: every image of ``<root>/<split>/`` (or of ``<root>`` with a seeded
      ``data.val_fraction`` held out): PNG / JPEG / TIFF / NIfTI, 2D or (``data.spatial_dims=3``)
      3D volumes, resized to ``data.image_size``;
    - ``"medmnist"`` / ``"class_folders"``: as :func:`load_labelled_images`;
    - ``"brats_flair"``: axial brain slices of the first of ``data.modalities`` of BraTS-layout
      case folders (:func:`load_brats_slices`);
    - ``"brats_patches"``: 3D brain-centred patches (:func:`brats_patches`).
    """
    from medjax.data import paths

    source = str(cfg["source"])
    kw = _sized(cfg)
    if source in ("medmnist", "class_folders"):
        return list_labelled_images(cfg, split, directory=directory)
    if source == "folder":
        d = _split_or_holdout(
            _root(cfg, directory), split, cfg, lambda f: list_image_folder(f, **kw),
            directory is not None,
        )  # fmt: skip
        return _keys(_capped(d, cfg, directory), ("image",))
    if source in ("brats_flair", "brats_patches"):
        folder = Path(directory) if directory is not None else paths.split_dir(cfg, split)
        if source == "brats_flair":
            mods = tuple(cfg.get("modalities") or ("flair",))[:1]
            d = load_brats_slices(
                folder, layout=str(cfg.get("layout", "deepmedic")), modalities=mods, size=kw["size"]
            )
            d = {"image": d["image"]}
        else:
            d = {"image": brats_patches(folder, cfg, seed=0 if split == "train" else 1)}
        return _capped(Listing.of_arrays(d, where=str(folder)), cfg, directory)
    raise ValueError(
        f"config.data.source={source!r} is not one of ['brats_flair', 'brats_patches', "
        "'class_folders', 'folder', 'medmnist']"
    )


def prepare_volume_pair(case: Any, cfg: Any, modalities: Sequence[str]) -> dict[str, Any]:
    """One BraTS-layout case for 3D translation (Vox2Vox): ``{"id", "image": [*grid, M] in
    [-1, 1] (scaled in the brain mask), "mask": bool [*grid], "label": int32 [*grid]}`` cropped
    to the brain (``cfg.crop_margin``) and resampled to ``cfg.spacing``, plus what maps a
    prediction back (``bbox``, ``crop_shape``, ``full_shape``, ``net_spacing``, ``geometry``,
    ``label_scheme``)."""
    from medjax.data import transforms, volumes

    ex = volumes.load_case(case, modalities=list(modalities))
    image = scale_to_unit_range(ex["image"], ex["mask"])
    image = np.concatenate([image, ex["mask"][..., None].astype(np.float32)], -1)
    bbox = transforms.foreground_bbox(ex["mask"], margin=int(cfg.get("crop_margin", 4)))
    image = transforms.crop_to_bbox(image, bbox)
    crop_shape = image.shape[:-1]
    label = ex.get("label")
    label = np.zeros(ex["mask"].shape, np.int32) if label is None else label
    label = transforms.crop_to_bbox(label, bbox)
    spacing = tuple(float(s) for s in ex["spacing"])
    net_spacing = spacing
    target = tuple(float(s) for s in (cfg.get("spacing") or ()))
    if target:
        image, net_spacing = transforms.resample_to_spacing(image, spacing, target, order=1)
        label, _ = transforms.resample_to_spacing(
            label, spacing, target, order=0, shape=image.shape[:-1]
        )
    return {
        "id": ex["id"],
        "image": image[..., :-1].astype(np.float32),
        "mask": image[..., -1] > 0.5,
        "label": label.astype(np.int32),
        "bbox": bbox,
        "crop_shape": crop_shape,
        "full_shape": tuple(ex["mask"].shape),
        "net_spacing": tuple(float(s) for s in net_spacing),
        "geometry": ex["geometry"],
        "label_scheme": ex["label_scheme"],
    }


def brats_volume_pairs(
    directory: PathLike, cfg: Any, modalities: Sequence[str], limit: int = 0
) -> list[dict[str, Any]]:
    """Every case (the first `limit` when > 0) of a BraTS-layout folder prepared by
    :func:`prepare_volume_pair`."""
    return list_brats_volume_pairs(directory, cfg, modalities).head(limit).read()


def list_brats_volume_pairs(
    directory: PathLike, cfg: Any, modalities: Sequence[str]
) -> Listing[list[dict[str, Any]]]:
    """The cases of a BraTS-layout folder, listed; each is prepared by
    :func:`prepare_volume_pair` when read."""
    from medjax.data import volumes

    found = volumes.find_cases(
        directory, str(cfg.get("layout", "deepmedic")), modalities=list(modalities)
    )
    if not found:
        raise ValueError(f"no cases in {directory} for config.data.source='brats_volumes'")
    return Listing.of_files(
        [c.id for c in found],
        found,
        lambda c: prepare_volume_pair(c, cfg, modalities),
        where=str(directory),
    )


def _pair_folders(root: Path, split: str) -> tuple[Path, Path, Path | None] | None:
    """``(A, B, mask)`` folders of a pairs dataset: ``root/A/<split>`` (pix2pix's
    combine_A_and_B layout) or ``root/<split>/A``; None when ``root`` has no split folders."""
    from medjax.data import sources

    for a, b, m in (
        (root / "A", root / "B", root / "mask"),
        (sources.split_folder(root, split) / "A", sources.split_folder(root, split) / "B", None),
    ):
        if not (a.is_dir() and b.is_dir()):
            continue
        if sources.has_split_folders(a):
            a_s, b_s = sources.split_folder(a, split), sources.split_folder(b, split)
            if a_s == a:
                raise FileNotFoundError(f"{a} has no {split!r} folder")
            m_s = sources.split_folder(m, split) if m is not None and m.is_dir() else None
            return a_s, b_s, m_s
        if a.parent != root:  # root/<split>/A
            mask = a.parent / "mask"
            return a, b, mask if mask.is_dir() else None
        return None
    raise FileNotFoundError(
        f"{root} holds no pix2pix pairs: expected A/ and B/ folders with matching file names "
        f"(A/<split>/, B/<split>/ or <split>/A/, <split>/B/)"
    )


def load_paired_images(
    cfg: Any,
    split: str,
    modalities: Sequence[str] = (),
    *,
    directory: PathLike | None = None,
    n_source: int | None = None,
) -> ImageSet | list[dict[str, Any]]:
    """:func:`list_paired_images` (same arguments), read."""
    return list_paired_images(cfg, split, modalities, directory=directory, n_source=n_source).read()


def list_paired_images(
    cfg: Any,
    split: str,
    modalities: Sequence[str] = (),
    *,
    directory: PathLike | None = None,
    n_source: int | None = None,
) -> Listing:
    """Aligned (source, target) images of `split` for paired translation (pix2pix), listed;
    read, ``{"source": [N, *spatial, Cs], "target": [N, *spatial, Ct], "mask": bool
    [N, *spatial], "label": int32 [N, *spatial]}``, everything in [-1, 1], from `data.source`:

    - ``"pairs"``: two folders with matching file names, ``A/`` (source) and ``B/`` (target),
      split as ``A/<split>/`` or ``<split>/A/`` (or held out by ``data.val_fraction``), an
      optional ``mask/`` folder; 2D files or 3D NIfTI (``data.spatial_dims=3``), any channels;
    - ``"aligned"``: pytorch-CycleGAN-and-pix2pix's side-by-side ``[A | B]`` images in
      ``<root>/<split>/``;
    - ``"brats_slices"``: axial slices of BraTS-layout cases, `modalities` = source channels
      then target channels (:func:`load_brats_slices`);
    - ``"tcia"``: a co-registered DICOM exam (:func:`load_tcia_series`), validation = the
      slice block ``data.val_slices``;
    - ``"brats_volumes"``: whole 3D cases, a list of :func:`prepare_volume_pair` dicts (with
      ``"image"`` holding the modalities), each case read when the listing is.

    Without a label the ``label`` maps are zeros; without a mask every pixel is inside.
    """
    from medjax.data import paths

    source = str(cfg["source"])
    kw = _sized(cfg)
    if source == "brats_volumes":
        folder = Path(directory) if directory is not None else paths.split_dir(cfg, split)
        return _capped(list_brats_volume_pairs(folder, cfg, modalities), cfg, directory)
    if source in ("brats_slices", "tcia"):
        n_src = n_source or len(tuple(cfg.get("source_modalities") or ())) or 1
        if source == "brats_slices":
            folder = Path(directory) if directory is not None else paths.split_dir(cfg, split)
            d = load_brats_slices(
                folder,
                layout=str(cfg.get("layout", "deepmedic")),
                modalities=tuple(modalities),
                size=kw["size"],
            )
        else:
            folder = _root(cfg, directory)
            d = load_tcia_series(folder, tuple(modalities), size=kw["size"])
            if directory is None:
                train, val = split_slice_block(d, cfg["val_slices"])
                if split == "test":
                    raise FileNotFoundError("the TCIA exam has no test slices; pass --data_dir")
                d = train if split == "train" else val
        out = Listing.of_arrays(
            {
                "source": d["image"][..., :n_src],
                "target": d["image"][..., n_src:],
                "mask": d["mask"],
                "label": d["label"],
            },
            where=str(folder),
        )
    elif source == "pairs":
        root = _root(cfg, directory)
        folders = _pair_folders(root, split)
        if folders is None:
            out = list_paired_folders(root / "A", root / "B", mask_dir=_opt(root / "mask"), **kw)
            out = out if directory is not None else _holdout(out, split, cfg)
        else:
            out = list_paired_folders(folders[0], folders[1], mask_dir=folders[2], **kw)
    elif source == "aligned":
        root = _root(cfg, directory)
        out = _split_or_holdout(
            root,
            split,
            cfg,
            lambda f: list_side_by_side(f, channels=kw["channels"], size=kw["size"]),
            directory is not None,
        )
    else:
        raise ValueError(
            f"config.data.source={source!r} is not one of ['aligned', 'brats_slices', "
            "'brats_volumes', 'pairs', 'tcia']"
        )
    out = _capped(out, cfg, directory)
    if not len(out):
        raise ValueError(f"the {split} split of config.data.source={source!r} is empty")

    def with_label(d: ImageSet) -> ImageSet:
        d.setdefault("label", np.zeros(d["mask"].shape, np.int32))
        return {k: d[k] for k in ("source", "target", "mask", "label")}

    return out.map(with_label)


def _opt(path: Path) -> Path | None:
    return path if path.is_dir() else None


def load_unpaired_images(cfg: Any, split: str, *, directory: PathLike | None = None) -> ImageSet:
    """Two image domains of `split` for unpaired translation (CycleGAN): ``{"a": [Na, ...],
    "b": [Nb, ...], "mask": bool [Na, *spatial] | None, "paired": bool}``, in [-1, 1]: the
    domains of :func:`list_unpaired_images`, read."""
    d = list_unpaired_images(cfg, split, directory=directory)
    a, b = d["a"].read()["image"], d["b"].read()["image"]
    mask = d["mask"]
    if d["paired"] and mask is None:
        mask = np.ones(a.shape[:-1], bool)
    return {"a": a, "b": b, "mask": mask, "paired": d["paired"]}


def list_unpaired_images(
    cfg: Any, split: str, *, directory: PathLike | None = None
) -> dict[str, Any]:
    """Two image domains of `split` for unpaired translation (CycleGAN): ``{"a": Listing,
    "b": Listing, "mask": bool [Na, *spatial] | None, "paired": bool}`` (each domain reads as
    ``{"image": [N, ...]}`` in [-1, 1]) from `data.source`:

    - ``"unpaired"``: pytorch-CycleGAN-and-pix2pix's ``trainA/ trainB/ testA/ testB/`` (the
      validation split reads ``valA/ valB/`` when present, else ``testA/ testB/``); 2D files
      or 3D NIfTI, any channels. When the two folders hold files of the same names, the
      pairs are aligned for scoring (`"paired"`; every pixel is inside the mask);
    - ``"brats_slices"`` / ``"tcia"``: paired slices of `data.domain_a` and `data.domain_b`
      (:func:`load_paired_images`); for training each domain takes one seeded random half of
      the slices (:func:`split_unpaired`), so no slice is seen in both.
    """
    source = str(cfg["source"])
    if source == "unpaired":
        root = _root(cfg, directory)
        tags = {"train": ("train",), "val": ("val", "test"), "test": ("test",)}[split]
        tag = next(
            (t for t in tags if (root / f"{t}A").is_dir() and (root / f"{t}B").is_dir()), None
        )
        if tag is None:
            raise FileNotFoundError(
                f"{root} has no {'/'.join(f'{t}A+{t}B' for t in tags)} folders "
                "(the CycleGAN layout trainA/ trainB/ testA/ testB/)"
            )
        kw = _sized(cfg)
        a = _capped(list_image_folder(root / f"{tag}A", **kw), cfg, directory)
        b = _capped(list_image_folder(root / f"{tag}B", **kw), cfg, directory)
        return {"a": a, "b": b, "mask": None, "paired": a.ids == b.ids}
    if source not in ("brats_slices", "tcia"):
        raise ValueError(
            f"config.data.source={source!r} is not one of ['brats_slices', 'tcia', 'unpaired']"
        )
    mods = (str(cfg["domain_a"]), str(cfg["domain_b"]))
    d = load_paired_images(cfg, split, mods, directory=directory, n_source=1)
    if split != "train":
        a, b, mask, paired = d["source"], d["target"], d["mask"], True
    else:
        idx_a, idx_b = split_unpaired(len(d["source"]), seed=int(cfg.get("split_seed", 0)))
        a, b, mask, paired = d["source"][idx_a], d["target"][idx_b], None, False
    a = _capped(Listing.of_arrays({"image": a}), cfg, directory)
    b = _capped(Listing.of_arrays({"image": b}), cfg, directory)
    return {"a": a, "b": b, "mask": None if mask is None else mask[: len(a)], "paired": paired}
