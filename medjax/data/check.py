"""Check a whole dataset before a long run (`medjax check DATA_DIR --layout ...`).

nnU-Net's `verify_dataset_integrity`, for every layout medjax reads. Every file is read with the
same readers training uses (so everything they refuse is found here first), and every problem of
the dataset is listed at once, not only the first:

- unreadable, truncated or non-NIfTI files, 4D volumes where 3D is expected, NaN/Inf voxels;
- label values outside the declared classes (the layout's scheme, an nnU-Net / MSD
  `dataset.json`, or `--labels`), masks that are empty after thresholding;
- image / label / mask shape, spacing or affine mismatches within a case;
- missing modalities, labels or brain masks, duplicate case ids;
- DICOM series with gaps or mixed spacing.

Warnings (reported, not failures): label maps without foreground, and spacings that differ
between cases (nnU-Net resamples them; medjax's volume configs resample to `data.spacing`).
Each case gets a row with its shape, spacing and voxel count per class.

This module reads data only; it never imports the trainer.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medjax.data import io, sources, volumes
from medjax.data.listing import Listing

__all__ = ["IMAGE_LAYOUTS", "LAYOUTS", "Report", "check_dataset"]

# 2D / image layouts; the volume layouts are `volumes.LAYOUTS`.
IMAGE_LAYOUTS = (
    "folder",  # <split>/images/ + <split>/masks/ (names: --images / --masks), or at the root
    "hc18",  # training_set/<name>.png + <name>_Annotation.png
    "class_folders",  # <split>/<class>/<image>
    "medmnist",  # one .npz
    "pairs",  # <split>/A/ + <split>/B/ (pix2pix)
    "aligned",  # <split>/<[A | B] image> (pytorch-CycleGAN-and-pix2pix)
    "unpaired",  # trainA/ trainB/ testA/ testB/ (CycleGAN)
    "images",  # <split>/<image> (GAN folders)
)
LAYOUTS = (*volumes.LAYOUTS, "dicom", *IMAGE_LAYOUTS)
_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, IndexError, TypeError)


@dataclasses.dataclass
class Report:
    """What `check_dataset` found: one row per case, errors and warnings (one line each)."""

    root: Path
    layout: str
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self, max_rows: int = 200) -> str:
        """A per-case table, then the warnings and errors, then a one-line verdict."""
        out = [f"{self.root} (layout {self.layout}): {len(self.rows)} cases read"]
        cols = list(dict.fromkeys(k for r in self.rows for k in r))
        if self.rows:
            width = {c: max(len(c), *(len(_cell(r.get(c))) for r in self.rows)) for c in cols}
            out.append("  ".join(c.ljust(width[c]) for c in cols))
            for r in self.rows[:max_rows]:
                out.append("  ".join(_cell(r.get(c)).ljust(width[c]) for c in cols))
            if len(self.rows) > max_rows:
                out.append(f"... {len(self.rows) - max_rows} more cases")
        out += [f"warning: {w}" for w in self.warnings]
        out += [f"error: {e}" for e in self.errors]
        verdict = "OK" if self.ok else f"{len(self.errors)} problems"
        out.append(f"{verdict} ({len(self.warnings)} warnings)")
        return "\n".join(out)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (tuple, list)):
        return "x".join(_cell(x) for x in v)
    if isinstance(v, dict):
        return " ".join(f"{k}:{n}" for k, n in v.items())
    return str(v)


def _message(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0] if len(text) > 400 else " ".join(text.split())


def _class_counts(label: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(np.asarray(label), return_counts=True)
    return {int(v): int(n) for v, n in zip(values, counts, strict=True)}


def _split_roots(root: Path) -> list[tuple[str, Path]]:
    """`(split, folder)` for each split folder of `root`, or `[("", root)]`."""
    if not sources.has_split_folders(root):
        return [("", root)]
    folders = [(split, sources.split_folder(root, split)) for split in sources.SPLIT_ALIASES]
    return [(split, folder) for split, folder in folders if folder != root]


def _declared_classes(root: Path, layout: str) -> set[int] | None:
    """The internal classes an nnU-Net / MSD `dataset.json` declares (`volumes.label_spec`,
    the parser training uses); None for layouts whose label scheme already rejects unknown
    values when a case is read."""
    if layout not in ("nnunet", "msd"):
        return None
    return set(range(volumes.label_spec(root, layout).num_classes))


# --------------------------------------------------------------------------------------------
# volumes
# --------------------------------------------------------------------------------------------


def _check_volumes(report: Report, modalities: Sequence[str] | None, labels: set[int] | None):
    root, layout = report.root, report.layout
    if layout in ("msd", "nnunet"):
        parts = [("train", root, "train")]
        if (root / "imagesTs").is_dir():
            parts.append(("test", root, "test"))
    else:
        parts = [(split, folder, "train") for split, folder in _split_roots(root)]
    try:
        declared = labels if labels is not None else _declared_classes(root, layout)
    except (OSError, ValueError) as exc:
        report.errors.append(f"{root / 'dataset.json'}: {_message(exc)}")
        return
    spacings: dict[tuple[float, ...], list[str]] = {}
    for split, folder, subset in parts:
        errors: list[Exception] = []
        try:  # a test split may come without labels (withheld for scoring)
            cases = volumes.find_cases(
                folder, layout, modalities=modalities, subset=subset, errors=errors,
                require_labels=split != "test",
            )  # fmt: skip
        except _READ_ERRORS as exc:
            report.errors.append(_message(exc))
            continue
        report.errors += [_message(e) for e in errors]
        for case in cases:
            where = f"{split}/{case.id}" if split else case.id
            try:
                v = volumes.load_case(case)
            except _READ_ERRORS as exc:
                report.errors.append(f"{where}: {_message(exc)}")
                continue
            spacing = tuple(round(float(s), 3) for s in v["spacing"])
            spacings.setdefault(spacing, []).append(where)
            row: dict[str, Any] = {
                "case": where,
                "shape": tuple(int(n) for n in v["image"].shape[:3]),
                "spacing": spacing,
                "channels": len(v["modalities"]),
                "brain %": round(100 * float(np.mean(v["mask"])), 1),
            }
            label = v.get("label")
            if label is not None:
                counts = _class_counts(label)
                row["voxels per class"] = counts
                if declared is not None and set(counts) - declared:
                    report.errors.append(
                        f"{case.label}: label values {sorted(set(counts) - declared)} are not "
                        f"among the declared classes {sorted(declared)}"
                    )
                if set(counts) <= {0}:
                    report.warnings.append(f"{case.label}: the label map has no foreground")
            report.rows.append(row)
    if len(spacings) > 1:
        shown = ", ".join(f"{s} ({len(c)} cases, e.g. {c[0]})" for s, c in spacings.items())
        report.warnings.append(f"cases have different voxel spacings: {shown}")


def _check_dicom(report: Report) -> None:
    folders = sorted(
        {p.parent for p in report.root.rglob("*") if p.is_file() and not p.name.startswith(".")},
        key=lambda p: sources.natural_key(str(p)),
    )
    for folder in folders:
        try:
            vol, geom = io.read_dicom_series(folder)
        except FileNotFoundError:
            continue  # no DICOM slice in this folder (a README, masks of another format)
        except _READ_ERRORS as exc:
            if "no DICOM" in str(exc):
                continue
            report.errors.append(f"{folder}: {_message(exc)}")
            continue
        row: dict[str, Any] = {
            "series": str(folder.relative_to(report.root)) or ".",
            "shape": tuple(int(n) for n in vol.shape),
            "spacing": tuple(round(float(s), 3) for s in geom.spacing),
        }
        if not np.isfinite(vol).all():
            report.errors.append(f"{folder}: NaN/Inf voxels")
        report.rows.append(row)
    if not report.rows and not report.errors:
        report.errors.append(f"no DICOM series found under {report.root}")


# --------------------------------------------------------------------------------------------
# 2D images
# --------------------------------------------------------------------------------------------


def _read_each(
    report: Report,
    listing: Listing[Any],
    split: str,
    describe: Callable[[Any], dict[str, Any]],
) -> None:
    """Reads a listing one example at a time, so one bad file does not hide the others."""
    for i, ex_id in enumerate(listing.ids):
        where = f"{split}/{ex_id}" if split else str(ex_id)
        try:
            read = listing.take([i]).read()
        except _READ_ERRORS as exc:
            report.errors.append(f"{where}: {_message(exc)}")
            continue
        report.rows.append({"case": where, **describe(read)})


def _describe_segmentation(examples: list[dict[str, Any]]) -> dict[str, Any]:
    (ex,) = examples
    row: dict[str, Any] = {"shape": tuple(int(n) for n in np.shape(ex["image"]))}
    if ex.get("label") is not None:
        row["pixels per class"] = _class_counts(ex["label"])
    return row


def _describe_set(arrays: dict[str, Any]) -> dict[str, Any]:
    key = "image" if "image" in arrays else "source"
    row: dict[str, Any] = {"shape": tuple(int(n) for n in np.shape(arrays[key])[1:])}
    if "label" in arrays and np.ndim(arrays["label"]) == 1:
        row["class"] = int(np.asarray(arrays["label"])[0])
    return row


def _pair_dirs(root: Path, split: str, folder: Path) -> tuple[Path, Path, Path | None]:
    """(A, B, mask or None) of a pix2pix "pairs" split: `A/<split>/`, `B/<split>/`,
    `mask/<split>/` (`folder` is `A/<split>`), or `<split>/A/`, `<split>/B/`, `<split>/mask/`."""
    if folder.parent == root / "A" or folder == root / "A":
        rel = folder.relative_to(root / "A")
        a, b, m = folder, root / "B" / rel, root / "mask" / rel
    else:
        a, b, m = folder / "A", folder / "B", folder / "mask"
    return a, b, (m if m.is_dir() else None)


def _check_images(report: Report, options: dict[str, Any]) -> None:
    from medjax.data import image_sets

    root, layout = report.root, report.layout
    if layout == "medmnist":
        try:
            npz = image_sets.find_npz(root)
            with np.load(npz) as f:
                present = [s for s in ("train", "val", "test") if f"{s}_images" in f.files]
        except _READ_ERRORS as exc:
            report.errors.append(f"{root}: {_message(exc)}")
            return
        if not present:
            report.errors.append(f"{npz} has no <split>_images array (train, val or test)")
        for split in present:
            try:
                d = image_sets.load_medmnist(root, split)
            except _READ_ERRORS as exc:
                report.errors.append(f"{split}: {_message(exc)}")
                continue
            counts = _class_counts(d["label"])
            report.rows.append(
                {"case": split, "images": len(d["image"]),
                 "shape": tuple(d["image"].shape[1:]), "images per class": counts}
            )  # fmt: skip
            if not np.isfinite(d["image"]).all():
                report.errors.append(f"{split}: NaN/Inf pixels")
        return
    if layout == "hc18":
        folder = root / "training_set"
        missing = [
            p
            for p in (sorted(folder.glob("*.png")) if folder.is_dir() else [])
            if not p.stem.endswith("_Annotation")
            and not (folder / f"{p.stem}_Annotation.png").exists()
        ]
        for p in missing:  # every one at once (the listing stops at the first)
            report.errors.append(f"{p}: no annotation {folder / p.stem}_Annotation.png")
        if missing:
            return
        try:
            listing = sources.list_hc18(root, num_workers=1)
        except _READ_ERRORS as exc:
            report.errors.append(f"{root}: {_message(exc)}")
            return
        _read_each(report, listing, "", _describe_segmentation)
        return
    if layout == "unpaired":
        folders = [
            (p.name, p)
            for p in sorted(root.iterdir())
            if p.is_dir() and p.name[-1:] in "AB" and not p.name.startswith(".")
        ]
        if not folders:
            report.errors.append(f"{root} has no trainA/ trainB/ (testA/ testB/) folders")
    elif layout == "pairs" and (root / "A").is_dir():  # A/<split>/ + B/<split>/
        folders = _split_roots(root / "A")
    else:
        folders = _split_roots(root)
    for split, folder in folders:
        try:
            if layout == "folder":
                masks = options.get("masks", "masks")
                channels = int(options.get("channels") or 0)
                # masks not required by the listing, so that each image without one is a
                # problem of its own (a test split may come without masks: withheld)
                listing = sources.list_segmentation_folder(
                    folder,
                    images=options.get("images", "images"),
                    masks=masks,
                    num_classes=int(options.get("num_classes") or 2),
                    threshold=options.get("threshold"),
                    label_values=options.get("label_values"),
                    mode={1: "L", 3: "RGB"}.get(channels),
                    require_masks=False,
                    num_workers=1,
                )
                before = len(report.rows)
                _read_each(report, listing, split, _describe_segmentation)
                if split != "test" or (folder / masks).is_dir():
                    for row in report.rows[before:]:
                        if "pixels per class" not in row:
                            report.errors.append(
                                f"{row['case']}: no mask in {folder / masks} (expected a file "
                                f"with the image's stem {row['case'].rsplit('/', 1)[-1]!r})"
                            )
                continue
            if layout == "class_folders":
                listing = image_sets.list_class_folders(folder)
            elif layout == "pairs":
                a, b, m = _pair_dirs(root, split, folder)
                listing = image_sets.list_paired_folders(a, b, mask_dir=m)
            elif layout == "aligned":
                listing = image_sets.list_side_by_side(folder)
            else:  # "images", "unpaired": every image of the folder
                listing = image_sets.list_image_folder(folder)
        except _READ_ERRORS as exc:
            report.errors.append(f"{folder}: {_message(exc)}")
            continue
        _read_each(report, listing, split, _describe_set)
    if layout == "folder" and options.get("labels") is not None:
        allowed = set(options["labels"])
        for row in report.rows:
            bad = set(row.get("pixels per class", {})) - allowed
            if bad:
                report.errors.append(
                    f"{row['case']}: classes {sorted(bad)} are not among {sorted(allowed)}"
                )


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def check_dataset(
    directory: str | os.PathLike[str],
    layout: str,
    *,
    modalities: Sequence[str] | None = None,
    labels: Sequence[int] | None = None,
    **options: Any,
) -> Report:
    """Reads every file of the dataset at `directory` in `layout` (one of :data:`LAYOUTS`) and
    returns every problem found (`Report.errors`, one line each naming the file), warnings and
    a row per case.

    Args:
      modalities: volume layouts: the modalities to read (default: the layout's).
      labels: the allowed label values (default: the layout's scheme, or dataset.json's).
      options: `"folder"` layout: `images`, `masks`, `num_classes`, `threshold`, `label_values`
        (as `medjax.data.sources.list_segmentation_folder`), `channels` (1 or 3: read the
        images as grey or RGB, the masks as grey).
    """
    root = Path(directory)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {list(LAYOUTS)}")
    report = Report(root, layout)
    if not root.exists():
        report.errors.append(f"{root} does not exist")
        return report
    allowed = {int(x) for x in labels} if labels is not None else None
    if layout in volumes.LAYOUTS:
        _check_volumes(report, modalities, allowed)
    elif layout == "dicom":
        _check_dicom(report)
    else:
        _check_images(report, {**options, "labels": allowed})
    return report
