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
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from medjax.data.listing import Listing

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
    "list_hc18",
    "list_segmentation_folder",
    "load_segmentation_folder",
    "mask_to_classes",
    "mni152_data_dir",
    "natural_key",
    "read_image",
    "read_image_2d",
    "split_examples",
    "split_folder",
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


def _map(fn: Callable[[Any], Example], items: Sequence[Any], num_workers: int) -> list[Example]:
    if num_workers <= 1 or len(items) <= 1:
        return [fn(it) for it in items]
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        return list(pool.map(fn, items))  # keeps input order; re-raises the first error


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _finish(ex: Example, transform: Transform | None) -> Example:
    return transform(ex) if transform is not None else ex


def _listing(
    items: Sequence[Any], read: Callable[[Any], Example], where: Path, num_workers: int | None
) -> Listing[list[Example]]:
    """A listing of per-file examples (`items[i][0]` or the item's stem is the id), read on
    `num_workers` threads."""
    workers = _default_workers() if num_workers is None else num_workers
    ids = [it[0] if isinstance(it, tuple) else Path(it).stem for it in items]
    return Listing.of_files(
        ids, items, read, where=str(where), map_fn=lambda fn, xs: _map(fn, xs, workers)
    )


# --------------------------------------------------------------------------------------------
# any folder of images (and masks)
# --------------------------------------------------------------------------------------------

NIFTI_SUFFIXES = (".nii.gz", ".nii")

# The folder names each split goes by in the layouts medjax reads (a split folder is used when
# present; a folder without split sub-folders is the split itself).
SPLIT_ALIASES = {
    "train": ("train", "training", "Tr"),
    "val": ("val", "validation", "valid", "Val"),
    "test": ("test", "testing", "Ts"),
}


def split_folder(root: str | os.PathLike[str], split: str) -> Path:
    """``root/<split>`` (or an alias: ``validation``, ``testing``, ...) when it exists, else
    ``root`` itself (a folder without split sub-folders holds the examples to use)."""
    if split not in SPLIT_ALIASES:
        raise ValueError(f"split must be one of {list(SPLIT_ALIASES)}, got {split!r}")
    root = Path(root)
    for name in SPLIT_ALIASES[split]:
        if (root / name).is_dir():
            return root / name
    return root


def has_split_folders(root: str | os.PathLike[str]) -> bool:
    """True when ``root`` holds at least one split folder (``train``, ``val``, ``test``, ...)."""
    root = Path(root)
    return any((root / n).is_dir() for names in SPLIT_ALIASES.values() for n in names)


def image_stem(path: str | os.PathLike[str]) -> str:
    """File name without its image suffix (``a.png`` -> ``a``, ``a.nii.gz`` -> ``a``)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def is_image_file(path: Path) -> bool:
    low = path.name.lower()
    return (
        path.is_file()
        and not path.name.startswith(".")
        and (path.suffix.lower() in IMAGE_SUFFIXES or low.endswith(NIFTI_SUFFIXES))
    )


def list_image_files(folder: str | os.PathLike[str], what: str = "image") -> list[Path]:
    """The image files (PNG, JPEG, TIFF, BMP, NIfTI) of ``folder`` in natural name order;
    FileNotFoundError when the folder is missing or holds none."""
    folder = _require_dir(Path(folder), what)
    files = sorted(
        (p for p in folder.iterdir() if is_image_file(p)), key=lambda p: natural_key(p.name)
    )
    if not files:
        raise FileNotFoundError(
            f"no image files found in {folder} (expected {', '.join(IMAGE_SUFFIXES)}, .nii.gz)"
        )
    return files


def _nifti_array(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Data and voxel sizes of a NIfTI file (stored voxel order; scaling applied)."""
    import nibabel as nib

    from medjax.data.io import _bad_nifti

    try:
        img = nib.load(str(path), mmap=False)
        data = np.asarray(img.dataobj)
    except MemoryError:
        raise
    except Exception as exc:  # gzip, EOF and header errors all mean "unreadable"
        raise _bad_nifti(path, exc) from exc
    zooms = np.asarray(img.header.get_zooms(), np.float32)
    return data, zooms


def read_image_2d(
    path: str | os.PathLike[str], mode: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One 2D image as ``(float32 [H, W, C], spacing float32 [2])``.

    PNG / JPEG / TIFF / BMP (PIL; ``mode`` "L" or "RGB" converts): 8-bit pixels / 255 and 16-bit
    pixels / 65535, so integer images are in [0, 1]; spacing 1 (the formats carry none). NIfTI:
    ``[X, Y]``, ``[X, Y, 1]`` or ``[X, Y, 1, C]`` in stored voxel order, intensities as stored
    (float32), spacing from the header. Anything else (a 3D volume) is a ValueError naming the
    file.
    """
    path = Path(path)
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        data, zooms = _nifti_array(path)
        if data.ndim == 3 and data.shape[2] == 1:
            data = data[:, :, 0]
        elif data.ndim == 4 and data.shape[2] == 1:
            data = data[:, :, 0, :]
        if data.ndim not in (2, 3):
            raise ValueError(f"NIfTI file {path} has shape {data.shape}; expected a 2D image")
        img = data[:, :, None] if data.ndim == 2 else data
        spacing = np.ones(2, np.float32) if zooms.size < 2 else zooms[:2].astype(np.float32)
        return np.asarray(img, np.float32), spacing
    arr = read_image(path, mode)
    return _to_unit_float(arr, path), np.ones(2, np.float32)


def _to_unit_float(arr: np.ndarray, path: Path) -> np.ndarray:
    """Integer pixels [H, W] or [H, W, C] -> float32 [H, W, C] in [0, 1] (8- or 16-bit)."""
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.dtype == np.uint8:
        scale = 255.0
    elif arr.dtype in (np.uint16, np.int32) and arr.size and 0 <= arr.min() and arr.max() <= 65535:
        scale = 65535.0  # 16-bit PNG/TIFF (PIL mode "I;16" or "I")
    else:
        raise ValueError(
            f"image file {path} decoded to dtype {arr.dtype}; expected 8- or 16-bit pixels"
        )
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr.astype(np.float32) / np.float32(scale)


def _check_same_shape(image: np.ndarray, label: np.ndarray, ipath: Path, lpath: Path) -> None:
    if image.shape[:2] != label.shape[:2]:
        raise ValueError(
            f"image/mask shape mismatch: image {ipath} has shape {tuple(image.shape[:2])} but "
            f"mask {lpath} has shape {tuple(label.shape[:2])}; expected identical H x W"
        )


def _shown_values(values: np.ndarray, limit: int = 12) -> str:
    vals = [f"{v:g}" if isinstance(v, float) else str(v) for v in values[:limit].tolist()]
    return "{" + ", ".join(vals) + (", ..." if values.size > limit else "") + "}"


def mask_to_classes(
    mask: np.ndarray,
    path: str | os.PathLike[str],
    *,
    num_classes: int,
    label_values: Mapping[int, int] | None = None,
    threshold: float | None = None,
) -> np.ndarray:
    """A mask image ``[H, W]`` (or ``[H, W, 1]``) -> int32 classes ``0..num_classes-1``.

    - ``threshold``: binary, ``mask > threshold`` is class 1 (lossy JPEG masks). A mask that
      has non-zero pixels but none above the threshold (a 0/1 mask read with threshold 127) is
      an error, not an empty label.
    - ``label_values``: ``{stored value: class}``; any other stored value is an error.
    - neither: stored values ``0..num_classes-1`` are the classes, and a binary mask stored as
      ``{0, 255}`` is 0/1; anything else is an error that names the file and its values.
    """
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.ndim != 2:
        raise ValueError(f"mask file {path} has shape {m.shape}; expected one channel [H, W]")
    if threshold is not None:
        out = (m > threshold).astype(np.int32)
        if not out.any() and np.any(m != 0):
            raise ValueError(
                f"mask file {path} has values {_shown_values(np.unique(m))} but none above the "
                f"threshold {threshold:g}: every pixel would be background (a 0/1 mask? lower "
                f"data.mask_threshold, e.g. to 0)"
            )
        return out
    if not np.issubdtype(m.dtype, np.integer):
        rounded = np.rint(m)
        if np.any(np.abs(rounded - m) > 1e-3) or not np.isfinite(m).all():
            raise ValueError(
                f"mask file {path} has non-integer values {_shown_values(np.unique(m))}; "
                f"expected class labels (or set data.mask_threshold for a soft mask)"
            )
        m = rounded.astype(np.int64)
    values = np.unique(m)
    if label_values:
        lut = {int(k): int(v) for k, v in label_values.items()}
        bad = values[~np.isin(values, list(lut))]
        if bad.size:
            raise ValueError(
                f"label file {path} has values {_shown_values(values)}; expected only "
                f"{sorted(lut)} (data.label_values maps them to classes)"
            )
        out = np.zeros(m.shape, np.int32)
        for k, v in lut.items():
            out[m == k] = v
        return out
    if values.size and 0 <= values.min() and values.max() < num_classes:
        return m.astype(np.int32)
    if num_classes == 2 and set(values.tolist()) <= {0, 255}:
        return (m == 255).astype(np.int32)
    raise ValueError(
        f"label file {path} has values {_shown_values(values)}; expected classes "
        f"0..{num_classes - 1} (or 0/255 for two classes): set data.label_values to map "
        f"stored values to classes, data.mask_threshold for a binary mask, or data.num_classes"
    )


def pair_files(
    image_dir: Path,
    mask_dir: Path,
    *,
    image_suffix: str = "",
    mask_suffix: str = "",
    require_masks: bool = True,
) -> list[tuple[str, Path, Path | None]]:
    """``(id, image, mask)`` for every image of ``image_dir``, the mask matched by name:
    ``<id><image_suffix>.<ext>`` pairs with ``<id><mask_suffix>.<any ext>`` (e.g. nnU-Net's
    ``case_0000.png`` with ``case.png``: ``image_suffix="_0000"``; HC18's ``_Annotation``
    masks: ``mask_suffix="_Annotation"``). Files of ``image_dir`` that end with ``mask_suffix``
    (when masks share the folder) are not images."""
    images = list_image_files(image_dir)
    if mask_suffix and mask_dir == image_dir:
        images = [p for p in images if not image_stem(p).endswith(mask_suffix)]
    masks: dict[str, Path] = {}
    if mask_dir.is_dir():
        masks = {image_stem(p): p for p in mask_dir.iterdir() if is_image_file(p)}
    elif require_masks:
        raise FileNotFoundError(f"mask folder {mask_dir} does not exist (or is not a directory)")
    out = []
    for ipath in images:
        stem = image_stem(ipath)
        if image_suffix:
            if not stem.endswith(image_suffix):
                continue  # another channel of a multi-channel nnU-Net case
            stem = stem[: -len(image_suffix)]
        mpath = masks.get(stem + mask_suffix)
        if mpath is None and require_masks:
            raise FileNotFoundError(
                f"image {ipath} has no mask; expected "
                f"{mask_dir / (stem + mask_suffix + ipath.suffix)} (a mask file with stem "
                f"{stem + mask_suffix!r} in {mask_dir})"
            )
        out.append((stem, ipath, mpath))
    if not out:
        raise FileNotFoundError(f"no images ending in {image_suffix!r} found in {image_dir}")
    return out


def list_segmentation_folder(
    directory: str | os.PathLike[str],
    *,
    images: str = "images",
    masks: str = "masks",
    num_classes: int = 2,
    image_suffix: str = "",
    mask_suffix: str = "",
    label_values: Mapping[int, int] | None = None,
    threshold: float | None = None,
    mode: str | None = None,
    require_masks: bool = True,
    transform: Transform | None = None,
    num_workers: int | None = None,
) -> Listing[list[Example]]:
    """List 2D images and their masks: ``<directory>/<images>/`` and ``<directory>/<masks>/``
    (:mod:`medjax.data.listing`: files are read when the listing is).

    Images are PNG / JPEG / TIFF / BMP / 2D NIfTI (:func:`read_image_2d`, ``mode`` "L" or "RGB"
    converts PIL images), masks are paired by file name (:func:`pair_files`) and mapped to
    classes by :func:`mask_to_classes` (``label_values``, ``threshold`` or the stored values).
    Every image must match its mask's H x W. ``id`` is the image stem (without
    ``image_suffix``). Without ``require_masks`` unlabelled images get ``"label": None``.
    """
    root = _require_dir(Path(directory), "data set")
    image_dir = root / images if images else root
    mask_dir = root / masks if masks else root
    pairs = pair_files(
        image_dir,
        mask_dir,
        image_suffix=image_suffix,
        mask_suffix=mask_suffix,
        require_masks=require_masks,
    )

    def read(item: tuple[str, Path, Path | None]) -> Example:
        cid, ipath, mpath = item
        img, spacing = read_image_2d(ipath, mode)
        ex: Example = {"image": img, "label": None, "spacing": spacing, "id": cid}
        if mpath is not None:
            if mpath.name.lower().endswith(NIFTI_SUFFIXES):
                raw = _nifti_array(mpath)[0]
                raw = raw.reshape(raw.shape[:2]) if raw.size == np.prod(raw.shape[:2]) else raw
            else:
                raw = read_image(mpath, "L" if mode == "RGB" else None)
            _check_same_shape(img, raw, ipath, mpath)
            ex["label"] = mask_to_classes(
                raw, mpath, num_classes=num_classes, label_values=label_values, threshold=threshold
            )
        return _finish(ex, transform)

    return _listing(pairs, read, root, num_workers)


def load_segmentation_folder(directory: str | os.PathLike[str], **kw: Any) -> list[Example]:
    """Every example of :func:`list_segmentation_folder` (same arguments), read."""
    return list_segmentation_folder(directory, **kw).read()


# --------------------------------------------------------------------------------------------
# ISBI 2012 EM membranes and Kvasir-SEG: two instances of the folder layout
# --------------------------------------------------------------------------------------------

ISBI2012_LABEL_VALUES = {0: 1, 255: 0}  # the PNGs store 0 = membrane, 255 = cell interior


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
    This is :func:`load_segmentation_folder` with ``images="image"``, ``masks="label"``.
    """
    root = _require_dir(Path(directory), "ISBI 2012 data set")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    _require_dir(root / split / "image", f"ISBI 2012 {split!r} image")
    return load_segmentation_folder(
        root / split,
        images="image",
        masks="label",
        label_values=ISBI2012_LABEL_VALUES,
        mode="L",
        require_masks=split == "train",
        transform=transform,
        num_workers=num_workers,
    )


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
    ``spacing`` is ``[1, 1]`` (unknown). ``id`` is the file stem. This is
    :func:`load_segmentation_folder` with ``threshold``.
    """
    root = _require_dir(Path(directory), "Kvasir-SEG data set")
    _require_dir(root / "images", "Kvasir-SEG images")
    _require_dir(root / "masks", "Kvasir-SEG masks")
    return load_segmentation_folder(
        root,
        threshold=threshold,
        mode="RGB",
        transform=transform,
        num_workers=num_workers,
    )


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
    """Every example of :func:`list_hc18`, read."""
    return list_hc18(directory, csv_path, transform=transform, num_workers=num_workers).read()


def list_hc18(
    directory: str | os.PathLike[str],
    csv_path: str | os.PathLike[str] | None = None,
    *,
    transform: Transform | None = None,
    num_workers: int | None = None,
) -> Listing[list[Example]]:
    """List HC18: ``<directory>/training_set/<name>.png`` + ``<name>_Annotation.png``.

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

    return _listing(images, read, image_dir, num_workers)


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
