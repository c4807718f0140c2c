"""Readers that turn dataset files on disk into in-memory *examples*.

An **example** is a plain ``dict`` of numpy arrays (plus a string id and a few scalar extras)::

    {
        "image":   float32 [H, W, C], scaled to [0, 1] (8-bit PNG/JPEG pixels / 255),
        "label":   int32 [H, W] class ids (or ``None`` for unlabelled data, see below),
        "spacing": float32 [2], pixel size in mm along (H, W); 1.0 when the format carries none,
        "id":      str, unique within one reader call (the file stem, or a slice name),
        ...        dataset extras (``"hc_mm"`` for HC18, ``"slice_index"`` for MNI152),
    }

Every reader takes the dataset folder as an argument and discovers the cases present there, so it
works on any folder in the same layout (e.g. a copy with fewer cases, or a withheld test split).
Bad input raises ``FileNotFoundError`` (missing folder / file) or ``ValueError`` (unreadable or
truncated image, image/mask shape mismatch, unexpected label values), always naming the file(s).

Readers accept ``transform`` (a callable applied to each example right after it is read, e.g. a
resize to keep memory bounded for large images) and ``num_workers`` (threads used for decoding;
PIL releases the GIL while decoding, so 2-4 threads give a real speed-up). Output order never
depends on ``num_workers``.

This module uses numpy, scipy, PIL, nibabel and nilearn only (the latter two imported lazily);
it never imports TensorFlow.
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

Example = dict[str, Any]
Transform = Callable[[Example], Example]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

MNI152_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
MNI152_CLASSES = ("background", "grey_matter", "white_matter")
ISBI2012_CLASSES = ("interior", "membrane")
KVASIR_CLASSES = ("background", "polyp")
HC18_CLASSES = ("background", "head")

__all__ = [
    "Example",
    "HC18_CLASSES",
    "ISBI2012_CLASSES",
    "KVASIR_CLASSES",
    "MNI152_CLASSES",
    "load_hc18",
    "load_isbi2012",
    "load_kvasir_seg",
    "load_mni152_slices",
    "mni152_data_dir",
    "natural_key",
    "read_image",
    "split_examples",
]


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key that orders embedded numbers numerically (``"2.png" < "10.png"``)."""
    parts = re.split(r"(\d+)", name)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p.lower()) for p in parts if p != "")


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder {path} does not exist (or is not a directory)")
    return path


def _list_images(folder: Path, exclude: Callable[[str], bool] | None = None) -> list[Path]:
    files = [
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    ]
    if exclude is not None:
        files = [p for p in files if not exclude(p.name)]
    return sorted(files, key=lambda p: natural_key(p.name))


def read_image(path: str | os.PathLike[str], mode: str | None = None) -> np.ndarray:
    """Decode an image file with PIL, optionally converting to a PIL ``mode`` ("L", "RGB").

    Raises ``FileNotFoundError`` if the file is missing and ``ValueError`` naming the file if it
    cannot be decoded completely (corrupt, truncated, not an image).
    """
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()  # force a full decode so truncated files fail here, not later
            if mode is not None and im.mode != mode:
                im = im.convert(mode)
            return np.asarray(im).copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(
            f"cannot read image file {path}: {exc} (expected a complete, readable image file)"
        ) from exc


def _to_unit_float(arr: np.ndarray, path: Path) -> np.ndarray:
    """uint8 [H, W] or [H, W, C] -> float32 [H, W, C] in [0, 1]."""
    if arr.dtype != np.uint8:
        raise ValueError(f"image file {path} decoded to dtype {arr.dtype}; expected 8-bit (uint8)")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr.astype(np.float32) / np.float32(255.0)


def _check_same_shape(image: np.ndarray, label: np.ndarray, ipath: Path, lpath: Path) -> None:
    if image.shape[:2] != label.shape[:2]:
        raise ValueError(
            f"image/mask shape mismatch: image {ipath} has shape {tuple(image.shape[:2])} but "
            f"mask {lpath} has shape {tuple(label.shape[:2])}; expected identical H x W"
        )


def _map(fn: Callable[[Any], Example], items: Sequence[Any], num_workers: int) -> list[Example]:
    if num_workers <= 1 or len(items) <= 1:
        return [fn(it) for it in items]
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        return list(pool.map(fn, items))  # keeps input order; re-raises the first error


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _finish(ex: Example, transform: Transform | None) -> Example:
    return transform(ex) if transform is not None else ex


# --------------------------------------------------------------------------------------------
# ISBI 2012 EM membranes
# --------------------------------------------------------------------------------------------


def load_isbi2012(
    directory: str | os.PathLike[str],
    split: str = "train",
    *,
    transform: Transform | None = None,
    num_workers: int | None = None,
) -> list[Example]:
    """Read the ISBI 2012 EM membrane data set.

    Layout: ``<directory>/<split>/image/<name>.png`` and, for ``split="train"``,
    ``<directory>/train/label/<name>.png`` paired by file name, in numeric order of the names.

    Label convention (the quirk of this data set is handled here): the PNG stores
    **0 = membrane, 255 = cell interior**; the returned ``label`` is **1 = membrane, 0 = interior**
    (:data:`ISBI2012_CLASSES`). Label PNGs with any other value raise ``ValueError``.

    ``split="test"`` reads ``test/image`` only; those examples have ``"label": None``.
    Images are 8-bit grayscale (any other mode is converted to "L"): ``image`` is [H, W, 1].
    ``spacing`` is ``[1, 1]`` (the PNGs carry no pixel size). ``id`` is the file stem.
    """
    root = _require_dir(Path(directory), "ISBI 2012 data set")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    image_dir = _require_dir(root / split / "image", f"ISBI 2012 {split!r} image")
    label_dir = root / split / "label"
    labelled = split == "train"
    if labelled:
        _require_dir(label_dir, "ISBI 2012 train label")
    images = _list_images(image_dir)
    if not images:
        raise FileNotFoundError(f"no image files found in {image_dir}")
    if labelled:
        missing = [p for p in images if not (label_dir / p.name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"image {missing[0]} has no label file; expected {label_dir / missing[0].name}"
                + (f" ({len(missing)} images without labels)" if len(missing) > 1 else "")
            )

    def read(ipath: Path) -> Example:
        img = read_image(ipath, "L")
        ex: Example = {
            "image": _to_unit_float(img, ipath),
            "label": None,
            "spacing": np.ones(2, np.float32),
            "id": ipath.stem,
        }
        if labelled:
            lpath = label_dir / ipath.name
            lab = read_image(lpath, "L")
            _check_same_shape(img, lab, ipath, lpath)
            values = np.unique(lab)
            bad = values[(values != 0) & (values != 255)]
            if bad.size:
                shown = ", ".join(str(int(v)) for v in values[:12])
                more = ", ..." if values.size > 12 else ""
                raise ValueError(
                    f"label file {lpath} has values {{{shown}{more}}}; expected only {{0, 255}} "
                    f"(0 = membrane, 255 = cell interior)"
                )
            ex["label"] = (lab == 0).astype(np.int32)
        return _finish(ex, transform)

    return _map(read, images, _default_workers() if num_workers is None else num_workers)


# --------------------------------------------------------------------------------------------
# Kvasir-SEG polyps
# --------------------------------------------------------------------------------------------


def load_kvasir_seg(
    directory: str | os.PathLike[str],
    *,
    threshold: int = 127,
    transform: Transform | None = None,
    num_workers: int | None = None,
) -> list[Example]:
    """Read Kvasir-SEG: ``<directory>/images/<id>.jpg`` with ``<directory>/masks/<id>.jpg``.

    ``image`` is RGB float32 [H, W, 3] in [0, 1] at the original (varying) size; resizing is a
    transform (pass ``transform=`` to resize while loading and keep memory bounded). The mask
    JPEG is converted to "L" and thresholded ``> threshold`` (JPEG noise) -> class 1 polyp,
    else 0 (:data:`KVASIR_CLASSES`). The mask may use any image suffix; it is matched by stem.
    ``spacing`` is ``[1, 1]`` (unknown). ``id`` is the file stem.
    """
    root = _require_dir(Path(directory), "Kvasir-SEG data set")
    image_dir = _require_dir(root / "images", "Kvasir-SEG images")
    mask_dir = _require_dir(root / "masks", "Kvasir-SEG masks")
    images = _list_images(image_dir)
    if not images:
        raise FileNotFoundError(f"no image files found in {image_dir}")
    masks = {p.stem: p for p in _list_images(mask_dir)}
    pairs = []
    for ipath in images:
        mpath = masks.get(ipath.stem)
        if mpath is None:
            raise FileNotFoundError(
                f"image {ipath} has no mask; expected {mask_dir / ipath.name} "
                f"(a mask file with stem {ipath.stem!r} in {mask_dir})"
            )
        pairs.append((ipath, mpath))

    def read(pair: tuple[Path, Path]) -> Example:
        ipath, mpath = pair
        img = read_image(ipath, "RGB")
        mask = read_image(mpath, "L")
        _check_same_shape(img, mask, ipath, mpath)
        ex: Example = {
            "image": _to_unit_float(img, ipath),
            "label": (mask > threshold).astype(np.int32),
            "spacing": np.ones(2, np.float32),
            "id": ipath.stem,
        }
        return _finish(ex, transform)

    return _map(read, pairs, _default_workers() if num_workers is None else num_workers)


# --------------------------------------------------------------------------------------------
# HC18 fetal head ultrasound
# --------------------------------------------------------------------------------------------

_HC18_ANNOTATION = "_Annotation"


def _read_hc18_csv(csv_path: Path) -> dict[str, tuple[float, float]]:
    if not csv_path.is_file():
        raise FileNotFoundError(f"HC18 pixel-size CSV {csv_path} does not exist")
    table: dict[str, tuple[float, float]] = {}
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        need = ("filename", "pixel size(mm)", "head circumference (mm)")
        if any(n not in fields for n in need):
            raise ValueError(
                f"HC18 CSV {csv_path} has columns {fields}; expected at least {list(need)}"
            )
        for lineno, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            try:
                table[row["filename"]] = (
                    float(row["pixel size(mm)"]),
                    float(row["head circumference (mm)"]),
                )
            except ValueError as exc:
                raise ValueError(f"HC18 CSV {csv_path} line {lineno}: {exc}") from exc
    return table


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes`` computed on the mask's bounding box (+1 px margin).

    Identical result to filling the whole image (a hole inside the box cannot reach the image
    border without crossing the background ring around the box), but ~10x cheaper for small
    outlines in large images.
    """
    from scipy import ndimage

    if not mask.any():
        return mask.copy()
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = np.pad(mask[r0:r1, c0:c1], 1)
    out = np.zeros_like(mask)
    out[r0:r1, c0:c1] = ndimage.binary_fill_holes(crop)[1:-1, 1:-1]
    return out


def load_hc18(
    directory: str | os.PathLike[str],
    csv_path: str | os.PathLike[str] | None = None,
    *,
    transform: Transform | None = None,
    num_workers: int | None = None,
) -> list[Example]:
    """Read HC18: ``<directory>/training_set/<name>.png`` + ``<name>_Annotation.png``.

    The annotation is a 1-pixel ellipse outline (255 on 0); it is filled with
    ``scipy.ndimage.binary_fill_holes(annotation > 0)`` -> class 1 head, 0 background
    (:data:`HC18_CLASSES`). A warning is issued if an outline encloses nothing (not closed).
    Pixel size comes from the CSV (default ``<directory>/training_set_pixel_size_and_HC.csv``,
    columns ``filename,pixel size(mm),head circumference (mm)``): ``spacing = [ps, ps]`` and the
    extra ``"hc_mm"`` (float) holds the reference head circumference. An image whose file name
    is not in the CSV raises ``ValueError``. ``image`` is grayscale [H, W, 1]; ``id`` is the stem.
    """
    root = _require_dir(Path(directory), "HC18 data set")
    image_dir = _require_dir(root / "training_set", "HC18 training_set")
    csv_file = (
        Path(csv_path) if csv_path is not None else root / "training_set_pixel_size_and_HC.csv"
    )
    table = _read_hc18_csv(csv_file)
    images = _list_images(image_dir, exclude=lambda n: Path(n).stem.endswith(_HC18_ANNOTATION))
    if not images:
        raise FileNotFoundError(f"no image files found in {image_dir}")
    for ipath in images:
        apath = ipath.with_name(ipath.stem + _HC18_ANNOTATION + ipath.suffix)
        if not apath.is_file():
            raise FileNotFoundError(f"image {ipath} has no annotation; expected {apath}")
        if ipath.name not in table:
            raise ValueError(
                f"image {ipath} is not listed in {csv_file}; expected a row with "
                f"filename={ipath.name!r} giving its pixel size"
            )

    def read(ipath: Path) -> Example:
        apath = ipath.with_name(ipath.stem + _HC18_ANNOTATION + ipath.suffix)
        img = read_image(ipath, "L")
        ann = read_image(apath, "L")
        _check_same_shape(img, ann, ipath, apath)
        outline = ann > 0
        filled = _fill_holes(outline)
        if outline.any() and filled.sum() == outline.sum():
            warnings.warn(
                f"annotation {apath} encloses no area (outline not closed?); label is the outline",
                stacklevel=2,
            )
        ps, hc = table[ipath.name]
        ex: Example = {
            "image": _to_unit_float(img, ipath),
            "label": filled.astype(np.int32),
            "spacing": np.array([ps, ps], np.float32),
            "id": ipath.stem,
            "hc_mm": float(hc),
        }
        return _finish(ex, transform)

    return _map(read, images, _default_workers() if num_workers is None else num_workers)


# --------------------------------------------------------------------------------------------
# MNI152 template (embedded default; ships inside the nilearn wheel)
# --------------------------------------------------------------------------------------------


def mni152_data_dir() -> Path:
    """The folder inside the installed nilearn package that holds the MNI152 2009a volumes."""
    try:
        import nilearn
    except ImportError as exc:  # pragma: no cover - nilearn is a declared dependency
        raise FileNotFoundError(
            "nilearn is not installed; it ships the MNI152 template used by load_mni152_slices "
            "(pip install 'medjax[data]')"
        ) from exc
    return Path(os.path.dirname(nilearn.__file__)) / "datasets" / "data"


def _block_mean(x: np.ndarray, f: int) -> np.ndarray:
    h, w = (x.shape[0] // f) * f, (x.shape[1] // f) * f
    return x[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3))


def _block_mode(lab: np.ndarray, f: int, n_classes: int) -> np.ndarray:
    h, w = (lab.shape[0] // f) * f, (lab.shape[1] // f) * f
    blocks = lab[:h, :w].reshape(h // f, f, w // f, f)
    counts = np.stack([(blocks == c).sum(axis=(1, 3)) for c in range(n_classes)], axis=-1)
    return counts.argmax(axis=-1)  # ties -> lowest class id


def load_mni152_slices(
    axis: int = 2,
    step: int = 1,
    *,
    downsample: int = 1,
    min_labelled_voxels: int = 1,
    directory: str | os.PathLike[str] | None = None,
    transform: Transform | None = None,
) -> list[Example]:
    """2D slices of the MNI152 (ICBM 2009a symmetric) T1 template with GM/WM labels.

    The embedded default data set: the three 197 x 233 x 189 uint8 volumes at 1 mm ship inside
    the nilearn wheel (``<nilearn>/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_
    converted.nii.gz``), so nothing is downloaded. ``directory`` overrides that folder.

    - ``image`` = T1 / 255 as float32 [H, W, 1]; the in-plane axes are the two remaining volume
      axes in voxel order (no rotation/flip), e.g. ``axis=2`` gives [197 (x), 233 (y)].
    - ``label``: 1 grey matter, 2 white matter where that probability map (0..255 -> 0..1) is
      the larger of the two and > 0.5, else 0 (background, CSF, other)
      (:data:`MNI152_CLASSES`).
    - ``spacing`` = the NIfTI zooms of the two in-plane axes (times ``downsample``).
    - Slices ``0, step, 2*step, ...`` along ``axis`` are visited; only those with at least
      ``min_labelled_voxels`` GM/WM pixels (after downsampling) are kept.
    - ``id`` = ``f"mni152_axis{axis}_{index}"``; extra ``"slice_index"`` (int) = ``index`` in the
      full-resolution volume, e.g. to hold out every 5th slice for validation.
    - ``downsample=f > 1`` reduces each slice in-plane by ``f``: the image is block-averaged over
      f x f blocks and the label is the mode (majority class, ties -> lower id) of each block;
      trailing rows/columns that do not fill a whole block are dropped.
    """
    import nibabel as nib

    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    if step < 1 or downsample < 1:
        raise ValueError(f"step and downsample must be >= 1, got step={step}, {downsample=}")
    folder = _require_dir(
        Path(directory) if directory is not None else mni152_data_dir(), "MNI152 template"
    )
    vols: dict[str, np.ndarray] = {}
    zooms: tuple[float, ...] = ()
    for key, name in MNI152_FILES.items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"MNI152 volume {path} does not exist")
        try:
            img = nib.load(str(path))
            vols[key] = np.asarray(img.dataobj)
        except Exception as exc:  # nibabel raises several types for corrupt gzip/NIfTI
            raise ValueError(f"cannot read NIfTI file {path}: {exc}") from exc
        if key == "t1":
            zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
        if vols[key].shape != vols["t1"].shape:
            raise ValueError(
                f"MNI152 volume {path} has shape {vols[key].shape}; expected the T1 shape "
                f"{vols['t1'].shape}"
            )
    t1 = vols["t1"]
    scale = 255.0 if t1.dtype == np.uint8 else float(max(t1.max(), 1))
    gm, wm = vols["gm"], vols["wm"]
    if gm.dtype == np.uint8 and wm.dtype == np.uint8:
        thr = 127  # p = v / 255 > 0.5  <=>  v >= 128: compare in uint8, no float copies
    else:
        gm, wm, thr = gm.astype(np.float32), wm.astype(np.float32), 0.5
    # argmax over (gm, wm) (ties -> gm) where that probability > 0.5, else background
    label_vol = np.zeros(t1.shape, np.int32)
    label_vol[(gm > thr) & (gm >= wm)] = 1
    label_vol[(wm > thr) & (wm > gm)] = 2
    in_plane = [a for a in range(3) if a != axis]
    # slice axis first and contiguous: per-slice indexing is then a cheap view
    t1 = np.ascontiguousarray(np.moveaxis(t1, axis, 0))
    label_vol = np.ascontiguousarray(np.moveaxis(label_vol, axis, 0))
    spacing = np.array([zooms[a] * downsample for a in in_plane], np.float32)

    out: list[Example] = []
    for index in range(0, t1.shape[0], step):
        lab = label_vol[index]
        image = t1[index].astype(np.float32) / np.float32(scale)
        if downsample > 1:
            image = _block_mean(image, downsample)
            lab = _block_mode(lab, downsample, len(MNI152_CLASSES))
        if int((lab > 0).sum()) < max(1, min_labelled_voxels):
            continue
        ex: Example = {
            "image": image.astype(np.float32)[:, :, None],
            "label": lab.astype(np.int32),
            "spacing": spacing.copy(),
            "id": f"mni152_axis{axis}_{index}",
            "slice_index": int(index),
        }
        out.append(_finish(ex, transform))
    return out


# --------------------------------------------------------------------------------------------
# splitting
# --------------------------------------------------------------------------------------------


def split_examples(
    examples: Iterable[Example],
    val_fraction: float | Callable[[Example], bool] = 0.2,
    seed: int = 0,
) -> tuple[list[Example], list[Example]]:
    """Split examples into ``(train, val)`` deterministically.

    ``val_fraction`` is either a fraction in [0, 1) -- ``round(fraction * n)`` examples (at least
    one when the fraction is > 0 and n > 1, never all of them) chosen by a permutation seeded
    with ``seed`` -- or a predicate ``example -> bool`` that is True for validation examples
    (e.g. ``lambda ex: ex["slice_index"] % 5 == 0``; ``seed`` is then unused). Both lists keep
    the input order.
    """
    items = list(examples)
    n = len(items)
    if callable(val_fraction):
        is_val = [bool(val_fraction(ex)) for ex in items]
    else:
        frac = float(val_fraction)
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {frac}")
        n_val = int(round(frac * n))
        if frac > 0 and n > 1:
            n_val = min(max(n_val, 1), n - 1)
        chosen = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
        is_val = [i in chosen for i in range(n)]
    train = [ex for ex, v in zip(items, is_val, strict=True) if not v]
    val = [ex for ex, v in zip(items, is_val, strict=True) if v]
    return train, val
