"""Multi-modal 3D MRI cases on disk: dataset layouts, BraTS label conventions and tumour regions.

A :class:`Case` names the files of one subject (one NIfTI per modality, or one 4D NIfTI holding
every modality, plus an optional label map and brain mask). :func:`find_cases` discovers the
cases of a folder in one of four layouts, and :func:`load_case` reads one case into an example::

    {
        "id":           str,
        "image":        float32 [X, Y, Z, C], canonical RAS+ voxel order, modalities stacked
                        along the last axis in the requested order,
        "label":        int32 [X, Y, Z] internal classes (absent when the case has no label),
        "mask":         bool [X, Y, Z] brain mask,
        "geometry":     medjax.data.io.Geometry of the first modality (canonical affine etc.),
        "spacing":      float32 [3], voxel size in mm along (X, Y, Z) of the returned array,
        "label_scheme": str, the scheme the label file was mapped from,
        "modalities":   tuple[str, ...], the channel names in order,
    }

Layouts (``layout=`` of :func:`find_cases`):

``"brats"``
    BraTS 2018-2021: ``<dir>/<case>/<case>_{flair,t1,t1ce,t2}.nii.gz`` (``.nii`` also accepted)
    and an optional ``<case>_seg.nii.gz`` (labels 0, 1 NCR/NET, 2 edema, 4 enhancing; scheme
    ``"brats"``). Default modalities ``("flair", "t1", "t1ce", "t2")``.
``"deepmedic"``
    The DeepMedic copy of BRATS 2015 (``<dir>/<case>/Flair_subtrMeanDivStd.nii.gz``,
    ``T1c_subtrMeanDivStd.nii.gz``, ``OTMultiClass.nii.gz``, ``brainmask.nii.gz``). Modality
    names ``"flair"`` and ``"t1ce"`` (default; ``"t1"`` / ``"t2"`` map to ``T1_`` / ``T2_``
    files of the same naming when present). Labels 0-4 (scheme ``"deepmedic"``); the mask is
    ``brainmask > 0.5`` (the file stores 0.99999997 for brain).
``"msd"``
    Medical Segmentation Decathlon task folder: ``imagesTr/<case>.nii.gz`` (4D, modality on the
    last axis; 3D for single-modality tasks), ``labelsTr/<case>.nii.gz`` and ``dataset.json``,
    whose ``"modality"`` dict names the channels (names kept as spelled there, e.g. ``"FLAIR"``,
    ``"T1w"``, ``"t1gd"``, ``"T2w"``). macOS ``._*`` files are skipped; ``imagesTs`` (no labels)
    is not read. Every modality of a case points at the same 4D file and
    :attr:`Case.channels` gives its channel index. A task whose ``"labels"`` are BraTS-like
    (1 edema, 2 non-enhancing tumour, 3 enhancing tumour: Task01_BrainTumour) gets scheme
    ``"msd_brain"``; any other task's labels pass through unchanged (scheme ``"identity"``).
``"brats2023"``
    BraTS 2023+ (GLI/MEN/MET/PED/SSA): ``<dir>/<case>/<case>-{t1c,t1n,t2f,t2w}.nii.gz`` and an
    optional ``<case>-seg.nii.gz`` (labels 0, 1 NCR, 2 edema, 3 enhancing; scheme
    ``"brats2023"``, already the internal classes). Default modalities
    ``("t2f", "t1n", "t1c", "t2w")`` (FLAIR, T1, T1c, T2).
``"nnunet"``
    An nnU-Net v2 raw dataset folder: ``imagesTr/<case>_<XXXX>.nii.gz`` (one file per channel,
    ``XXXX`` the 4-digit channel index), ``labelsTr/<case>.nii.gz`` (consecutive integer labels
    0..K-1), ``imagesTs/`` (and ``labelsTs/``) for ``subset="test"``, and ``dataset.json`` with
    ``channel_names`` (index -> name), ``labels`` (name -> int, or name -> list of ints for
    nnU-Net's region-based labels, with ``regions_class_order``) and ``file_ending``. Labels
    pass through unchanged (scheme ``"identity"``); :func:`label_spec` reads classes and regions.
``"generic"``
    One folder per case, one file per modality: ``<dir>/<case>/<modality>.nii(.gz)``, the label
    file ``<label_name>.nii(.gz)`` (default ``"label"``; ``"seg"`` is accepted too when the
    default is used) and an optional mask file ``<mask_name>.nii(.gz)``. Without
    ``modalities=`` the modalities are all other NIfTI files of the first case (natural order
    of their names), and every other case must hold the same set. Scheme ``"identity"``
    unless ``label_scheme=`` says otherwise.

Label conventions. Every BraTS-like source is mapped to ONE internal class scheme,
:data:`BRATS_CLASSES`: 0 background, 1 NCR/NET (necrotic and non-enhancing tumour core),
2 edema (ED), 3 enhancing tumour (ET)::

    scheme       native -> internal
    "brats"      0->0, 1->1, 2->2, 4->3                (BraTS 2017-2021)
    "deepmedic"  0->0, 1->1, 3->1, 2->2, 4->3          (BRATS 2013/2015: necrosis 1 and
                                                        non-enhancing 3 both become NCR/NET,
                                                        as BraTS 2017+ merged them)
    "msd_brain"  0->0, 1->2, 2->1, 3->3                (MSD Task01: 1 edema, 2 non-enh., 3 enh.)
    "brats2023"  0->0, 1->1, 2->2, 3->3                (BraTS 2023+: 1 NCR, 2 ED, 3 ET)
    "identity"   unchanged (any non-negative integer)

Classes and evaluation regions of a dataset are a :class:`LabelSpec` (:func:`label_spec`),
declared as nnU-Net declares them (``{"background": 0, "WT": [1, 2, 3], ...}`` with
``regions_class_order``; :func:`labels_from_nnunet`): the BraTS layouts are one instance of it
(:data:`BRATS_LABELS`), an nnU-Net or MSD folder brings its own in ``dataset.json``.

Tumour regions (:data:`BRATS_REGIONS`, in internal classes; :func:`region_masks`):

- WT, whole tumour = internal {1, 2, 3} = native {1, 2, 4} (BraTS 2018-21) = {1, 2, 3, 4}
  (deepmedic) = {1, 2, 3} (MSD);
- TC, tumour core = internal {1, 3} = native {1, 4} (BraTS 2018-21) = {1, 3, 4} (deepmedic) =
  {2, 3} (MSD);
- ET, enhancing tumour = internal {3} = native {4} (BraTS, deepmedic) = {3} (MSD).

This module uses numpy and :mod:`medjax.data.io` (nibabel) only; it never imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medjax.data.io import Geometry, check_finite, read_nifti
from medjax.data.sources import natural_key

__all__ = [
    "BRATS_CLASSES",
    "BRATS_REGIONS",
    "DEFAULT_MODALITIES",
    "LABEL_SCHEMES",
    "LAYOUTS",
    "REGION_NAMES",
    "BRATS_LABELS",
    "BRATS_SPEC",
    "Case",
    "LabelSpec",
    "find_cases",
    "label_spec",
    "labels_from_nnunet",
    "load_case",
    "map_labels",
    "msd_modalities",
    "read_nnunet_json",
    "region_masks",
    "to_native",
]

BRATS_CLASSES = ("background", "ncr_net", "edema", "enhancing")

# native label value -> internal class, per scheme; "identity" (None) passes labels through.
LABEL_SCHEMES: dict[str, dict[int, int] | None] = {
    "brats": {0: 0, 1: 1, 2: 2, 4: 3},
    "deepmedic": {0: 0, 1: 1, 3: 1, 2: 2, 4: 3},
    "msd_brain": {0: 0, 1: 2, 2: 1, 3: 3},
    "brats2023": {0: 0, 1: 1, 2: 2, 3: 3},
    "identity": None,
}

# internal class -> native label for writing predictions back (inverse of LABEL_SCHEMES; for
# deepmedic, NCR/NET goes back to 1 "necrosis" because the merge cannot be undone).
_NATIVE: dict[str, dict[int, int]] = {
    "brats": {0: 0, 1: 1, 2: 2, 3: 4},
    "deepmedic": {0: 0, 1: 1, 2: 2, 3: 4},
    "msd_brain": {0: 0, 1: 2, 2: 1, 3: 3},
    "brats2023": {0: 0, 1: 1, 2: 2, 3: 3},
}

BRATS_REGIONS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
REGION_NAMES = tuple(BRATS_REGIONS)

# The BraTS classes and regions as nnU-Net declares them (region -> classes, and the class each
# region paints when regions are turned back into a label map, later regions on top).
BRATS_LABELS: dict[str, Any] = {"background": 0, "WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}
BRATS_REGION_ORDER = (2, 1, 3)

LAYOUTS = ("brats", "brats2023", "deepmedic", "msd", "nnunet", "generic")

DEFAULT_MODALITIES: dict[str, tuple[str, ...] | None] = {
    "brats": ("flair", "t1", "t1ce", "t2"),
    "brats2023": ("t2f", "t1n", "t1c", "t2w"),
    "deepmedic": ("flair", "t1ce"),
    "msd": None,  # every channel named in dataset.json
    "nnunet": None,  # every channel of dataset.json's channel_names
    "generic": None,  # every non-label, non-mask NIfTI of the first case
}

_DEFAULT_SCHEME = {
    "brats": "brats",
    "brats2023": "brats2023",
    "deepmedic": "deepmedic",
    "msd": "identity",
    "nnunet": "identity",
    "generic": "identity",
}

_NIFTI_SUFFIXES = (".nii.gz", ".nii")

# deepmedic layout: modality name -> file stem (FLAIR and T1c ship with the example data; T1 and
# T2 are the names DeepMedic's preprocessing gives the other two BRATS contrasts).
_DEEPMEDIC_FILES = {
    "flair": "Flair_subtrMeanDivStd",
    "t1ce": "T1c_subtrMeanDivStd",
    "t1": "T1_subtrMeanDivStd",
    "t2": "T2_subtrMeanDivStd",
}
_DEEPMEDIC_LABEL = "OTMultiClass"
_DEEPMEDIC_MASK = "brainmask"

_AFFINE_ATOL = 1e-3
_LABEL_ATOL = 1e-3  # float label maps: values within this of an integer count as that integer


@dataclasses.dataclass(frozen=True)
class Case:
    """The files of one multi-modal case.

    Attributes:
      id: case identifier (the case folder name, or the MSD file name without ``.nii.gz``).
      images: modality name -> NIfTI file, in channel order. Several modalities may point at the
        same 4D file (MSD); their channel index in that file is then in ``channels``.
      label: label-map file, or None when the case has none.
      mask: brain-mask file (voxels > 0.5 are brain), or None: :func:`load_case` then derives
        the mask from the image.
      label_scheme: key of :data:`LABEL_SCHEMES` that maps the label file to internal classes.
      channels: modality name -> channel index (last axis) inside a 4D file; modalities not in
        it are 3D files. A 3D file listed here with index 0 is read as that single channel.
    """

    id: str
    images: dict[str, Path]
    label: Path | None
    mask: Path | None
    label_scheme: str
    channels: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modality names, in channel order."""
        return tuple(self.images)


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def _nifti_stem(name: str) -> str | None:
    """``"a.nii.gz"`` / ``"a.nii"`` -> ``"a"``; None for anything else."""
    low = name.lower()
    for suffix in _NIFTI_SUFFIXES:
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _find_nifti(folder: Path, stem: str) -> Path | None:
    """``<folder>/<stem>.nii.gz``, else ``<folder>/<stem>.nii``, else None."""
    for suffix in _NIFTI_SUFFIXES:
        path = folder / (stem + suffix)
        if path.is_file():
            return path
    return None


def _nifti_files(folder: Path) -> list[Path]:
    """The NIfTI files of a folder (hidden and macOS ``._*`` files skipped), in natural order."""
    files = [
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and _nifti_stem(p.name) is not None
    ]
    return sorted(files, key=lambda p: natural_key(p.name))


@contextlib.contextmanager
def _per_case(errors: list[Exception] | None) -> Iterator[None]:
    """Raises a case's error, or appends it to `errors` (the case is then skipped)."""
    if errors is None:
        yield
        return
    try:
        yield
    except (FileNotFoundError, ValueError) as exc:
        errors.append(exc)


def _case_dirs(root: Path) -> list[Path]:
    dirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(dirs, key=lambda p: natural_key(p.name))


def _check_scheme(scheme: str) -> str:
    if scheme not in LABEL_SCHEMES:
        raise ValueError(f"unknown label scheme {scheme!r}; expected one of {list(LABEL_SCHEMES)}")
    return scheme


def _select_modalities(
    available: Sequence[str], wanted: Sequence[str] | None, where: str
) -> list[str]:
    """``wanted`` resolved against ``available`` (exact name, else a unique case-insensitive
    match); all of ``available`` when ``wanted`` is None."""
    if wanted is None:
        return list(available)
    if isinstance(wanted, str):
        raise ValueError(f"modalities must be a sequence of names, got the string {wanted!r}")
    if not wanted:
        raise ValueError("modalities must name at least one modality")
    out = []
    for name in wanted:
        if name in available:
            out.append(name)
            continue
        folded = [a for a in available if a.lower() == str(name).lower()]
        if len(folded) != 1:
            raise ValueError(
                f"{where} has no modality {name!r}; its modalities are {list(available)}"
            )
        out.append(folded[0])
    if len(set(out)) != len(out):
        raise ValueError(f"modalities {list(wanted)} name a modality twice")
    return out


def _missing_label(case_id: str, where: Path, expected: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"case {case_id!r} has no label file: expected {where / expected}(.gz) "
        f"(labels are required)"
    )


# --------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------


def _brats_cases(
    root: Path,
    modalities: Sequence[str] | None,
    require_labels: bool,
    scheme: str,
    layout: str = "brats",
    errors: list[Exception] | None = None,
) -> list[Case]:
    """BraTS 2018-21 (``<case>_<mod>``) or, with ``layout="brats2023"``, ``<case>-<mod>``."""
    sep = "-" if layout == "brats2023" else "_"
    mods = list(modalities) if modalities is not None else list(DEFAULT_MODALITIES[layout])
    cases = []
    for folder in _case_dirs(root):
        with _per_case(errors):
            cid = folder.name
            images: dict[str, Path] = {}
            for mod in mods:
                path = _find_nifti(folder, f"{cid}{sep}{mod}")
                if path is None:
                    prefix = f"{cid}{sep}"
                    present = [
                        s[len(prefix) :]
                        for s in (_nifti_stem(p.name) for p in _nifti_files(folder))
                        if s is not None and s.startswith(prefix) and s != f"{cid}{sep}seg"
                    ]
                    raise FileNotFoundError(
                        f"case {cid!r}: modality {mod!r} file {folder / (prefix + mod)}.nii.gz "
                        f"(or .nii) does not exist; this case has modalities {present} "
                        f"({layout} layout <case>/<case>{sep}<modality>.nii.gz)"
                    )
                images[mod] = path
            label = _find_nifti(folder, f"{cid}{sep}seg")
            if label is None and require_labels:
                raise _missing_label(cid, folder, f"{cid}{sep}seg.nii")
            cases.append(Case(cid, images, label, None, scheme))
    return cases


def _deepmedic_cases(
    root: Path,
    modalities: Sequence[str] | None,
    require_labels: bool,
    scheme: str,
    mask_name: str | None = None,
    errors: list[Exception] | None = None,
) -> list[Case]:
    mods = list(modalities) if modalities is not None else list(DEFAULT_MODALITIES["deepmedic"])
    unknown = [m for m in mods if m not in _DEEPMEDIC_FILES]
    if unknown:
        raise ValueError(
            f"deepmedic layout has no modality {unknown[0]!r}; known modalities "
            f"{list(_DEEPMEDIC_FILES)} (files {list(_DEEPMEDIC_FILES.values())})"
        )
    cases = []
    for folder in _case_dirs(root):
        with _per_case(errors):
            cid = folder.name
            images: dict[str, Path] = {}
            for mod in mods:
                path = _find_nifti(folder, _DEEPMEDIC_FILES[mod])
                if path is None:
                    stems = {_nifti_stem(p.name) for p in _nifti_files(folder)}
                    present = [m for m, s in _DEEPMEDIC_FILES.items() if s in stems]
                    raise FileNotFoundError(
                        f"case {cid!r}: modality {mod!r} file "
                        f"{folder / _DEEPMEDIC_FILES[mod]}.nii.gz (or .nii) does not exist; this "
                        f"case has modalities {present}"
                    )
                images[mod] = path
            label = _find_nifti(folder, _DEEPMEDIC_LABEL)
            if label is None and require_labels:
                raise _missing_label(cid, folder, f"{_DEEPMEDIC_LABEL}.nii")
            mask = None
            if mask_name != "":  # "": the caller opted in to a brain from the non-zero voxels
                mask = _find_nifti(folder, mask_name or _DEEPMEDIC_MASK)
                if mask is None:
                    expected = folder / (mask_name or _DEEPMEDIC_MASK)
                    raise FileNotFoundError(
                        f"case {cid!r}: brain mask {expected}.nii.gz "
                        "(or .nii) does not exist; the deepmedic layout z-scores and crops inside "
                        "it. Add it, or set config.data.brain_mask='nonzero' (mask_name='') to use "
                        "the non-zero voxels of the images as the brain"
                    )
            cases.append(Case(cid, images, label, mask, scheme))
    return cases


def _msd_scheme(labels: Mapping[str, Any]) -> str:
    """``"msd_brain"`` when dataset.json's labels are Task01's BraTS-like classes."""
    names = {str(k): str(v).lower().replace("_", "-").replace(" ", "-") for k, v in labels.items()}
    brain = (
        set(names) == {"0", "1", "2", "3"}
        and "edema" in names["1"]
        and "non-enhancing" in names["2"]
        and "enhancing" in names["3"]
        and "non" not in names["3"]
    )
    return "msd_brain" if brain else "identity"


def _read_dataset_json(root: Path) -> dict[str, Any]:
    path = root / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"MSD task folder {root} has no dataset.json (expected {path} next to imagesTr/)"
        )
    try:
        with open(path) as fh:
            meta = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("modality"), dict):
        raise ValueError(f"{path} has no 'modality' dict (e.g. {{'0': 'FLAIR', '1': 'T1w'}})")
    return meta


def msd_modalities(directory: str | os.PathLike[str]) -> tuple[str, ...]:
    """The channel names of an MSD task folder, in channel order, from its dataset.json."""
    meta = _read_dataset_json(Path(directory))
    try:
        order = sorted(meta["modality"].items(), key=lambda kv: int(kv[0]))
    except ValueError as exc:
        raise ValueError(
            f"{Path(directory) / 'dataset.json'}: 'modality' keys must be channel indices "
            f"'0', '1', ...; got {list(meta['modality'])}"
        ) from exc
    if [int(k) for k, _ in order] != list(range(len(order))):
        raise ValueError(
            f"{Path(directory) / 'dataset.json'}: 'modality' keys {list(meta['modality'])} are "
            f"not the channel indices 0..{len(order) - 1}"
        )
    return tuple(str(v) for _, v in order)


def _subset_dirs(root: Path, subset: str, what: str) -> tuple[Path, Path]:
    """``imagesTr``/``labelsTr`` (``subset="train"``) or ``imagesTs``/``labelsTs`` ("test")."""
    if subset not in ("train", "test"):
        raise ValueError(f"subset must be 'train' or 'test', got {subset!r}")
    tag = "Tr" if subset == "train" else "Ts"
    image_dir, label_dir = root / f"images{tag}", root / f"labels{tag}"
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{what} folder {root} has no images{tag}/ folder")
    return image_dir, label_dir


def _msd_cases(
    root: Path,
    modalities: Sequence[str] | None,
    require_labels: bool,
    scheme: str | None,
    subset: str = "train",
    errors: list[Exception] | None = None,
) -> list[Case]:
    meta = _read_dataset_json(root)
    names = msd_modalities(root)
    mods = _select_modalities(names, modalities, f"MSD task {root}")
    channels = {m: names.index(m) for m in mods}
    if scheme is None:
        scheme = _msd_scheme(meta.get("labels", {}))
    image_dir, label_dir = _subset_dirs(root, subset, "MSD task")
    cases = []
    for path in _nifti_files(image_dir):
        with _per_case(errors):
            cid = _nifti_stem(path.name)
            assert cid is not None
            label = label_dir / path.name
            if not label.is_file():
                if require_labels:
                    raise FileNotFoundError(
                        f"case {cid!r} ({path}) has no label file: expected {label} "
                        f"(labels are required)"
                    )
                label = None
            cases.append(Case(cid, {m: path for m in mods}, label, None, scheme, dict(channels)))
    return cases


def read_nnunet_json(root: str | os.PathLike[str]) -> dict[str, Any]:
    """``dataset.json`` of an nnU-Net v2 raw dataset, checked: ``channel_names`` (``"0"``,
    ``"1"``, ... -> name), ``labels`` (name -> int or list of ints) and ``file_ending``."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"nnU-Net dataset folder {root} has no dataset.json (expected {path} next to imagesTr/)"
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    for key, kind in (("channel_names", dict), ("labels", dict)):
        if not isinstance(meta.get(key), kind):
            alt = " (an MSD / nnU-Net v1 file? use layout 'msd')" if "modality" in meta else ""
            raise ValueError(f"{path} has no {key!r} dict{alt}")
    try:
        idx = sorted(int(k) for k in meta["channel_names"])
    except ValueError as exc:
        raise ValueError(
            f"{path}: channel_names keys must be channel indices '0', '1', ...; got "
            f"{list(meta['channel_names'])}"
        ) from exc
    if idx != list(range(len(idx))):
        raise ValueError(f"{path}: channel_names keys {idx} are not 0..{len(idx) - 1}")
    ending = meta.get("file_ending", ".nii.gz")
    if ending not in _NIFTI_SUFFIXES:
        raise ValueError(
            f"{path}: file_ending {ending!r} is not supported for volumes; expected one of "
            f"{list(_NIFTI_SUFFIXES)}"
        )
    return meta


def _nnunet_cases(
    root: Path,
    modalities: Sequence[str] | None,
    require_labels: bool,
    subset: str,
    errors: list[Exception] | None = None,
) -> list[Case]:
    meta = read_nnunet_json(root)
    names = [str(meta["channel_names"][k]) for k in sorted(meta["channel_names"], key=int)]
    mods = _select_modalities(names, modalities, f"nnU-Net dataset {root}")
    ending = str(meta.get("file_ending", ".nii.gz"))
    image_dir, label_dir = _subset_dirs(root, subset, "nnU-Net dataset")
    by_case: dict[str, dict[int, Path]] = {}
    for path in sorted(image_dir.iterdir(), key=lambda p: natural_key(p.name)):
        if path.name.startswith(".") or not path.name.endswith(ending):
            continue
        stem = path.name[: -len(ending)]
        cid, sep, channel = stem.rpartition("_")
        if not sep or len(channel) != 4 or not channel.isdigit():
            raise ValueError(
                f"{path}: nnU-Net image files are named <case>_<XXXX>{ending} with a 4-digit "
                f"channel index"
            )
        by_case.setdefault(cid, {})[int(channel)] = path
    cases = []
    for cid, files in by_case.items():
        with _per_case(errors):
            missing = [
                f"{cid}_{names.index(m):04d}{ending}" for m in mods if names.index(m) not in files
            ]
            if missing:
                raise FileNotFoundError(
                    f"case {cid!r} in {image_dir} has no {missing} (dataset.json declares channels "
                    f"{dict(enumerate(names))})"
                )
            label = label_dir / f"{cid}{ending}"
            if not label.is_file():
                if require_labels:
                    raise FileNotFoundError(
                        f"case {cid!r} has no label file: expected {label} (labels are required)"
                    )
                label = None
            images = {m: files[names.index(m)] for m in mods}
            cases.append(Case(cid, images, label, None, "identity"))
    return cases


def _generic_cases(
    root: Path,
    modalities: Sequence[str] | None,
    require_labels: bool,
    scheme: str,
    label_name: str,
    mask_name: str | None,
    errors: list[Exception] | None = None,
) -> list[Case]:
    label_names = [label_name] + (["seg"] if label_name == "label" else [])
    cases = []
    inferred: list[str] | None = None
    for folder in _case_dirs(root):
        with _per_case(errors):
            cid = folder.name
            stems = {_nifti_stem(p.name): p for p in _nifti_files(folder)}
            label = next((stems[n] for n in label_names if n in stems), None)
            if label is None and require_labels:
                raise FileNotFoundError(
                    f"case {cid!r} has no label file: expected {folder / label_name}.nii.gz "
                    f"(or .nii{', or seg.nii.gz' if label_name == 'label' else ''}) "
                    f"(labels are required)"
                )
            mask = None
            if mask_name is not None:
                mask = stems.get(mask_name)
                if mask is None:
                    raise FileNotFoundError(
                        f"case {cid!r} has no mask file: expected {folder / mask_name}.nii.gz "
                        "(or .nii)"
                    )
            others = [s for s in stems if s not in label_names and s != mask_name]
            if modalities is not None:
                mods = list(modalities)
            elif inferred is None:
                if not others:
                    raise FileNotFoundError(
                        f"case {cid!r}: folder {folder} holds no image files (only label/mask)"
                    )
                inferred = mods = others  # already in natural order
            else:
                mods = inferred
                if sorted(others) != sorted(inferred):
                    raise ValueError(
                        f"case {cid!r} has modalities {others} but the first case has {inferred}; "
                        f"pass modalities= to choose the ones every case has"
                    )
            images: dict[str, Path] = {}
            for mod in mods:
                if mod not in stems or mod in label_names or mod == mask_name:
                    raise FileNotFoundError(
                        f"case {cid!r}: modality {mod!r} file {folder / mod}.nii.gz (or .nii) does "
                        f"not exist; this case has modalities {others}"
                    )
                images[mod] = stems[mod]
            cases.append(Case(cid, images, label, mask, scheme))
    return cases


def find_cases(
    directory: str | os.PathLike[str],
    layout: str,
    *,
    modalities: Sequence[str] | None = None,
    label_name: str = "label",
    mask_name: str | None = None,
    label_scheme: str | None = None,
    require_labels: bool = False,
    subset: str = "train",
    errors: list[Exception] | None = None,
) -> list[Case]:
    """The cases of ``directory`` in ``layout`` (see the module docstring), in natural id order.

    Args:
      directory: the folder holding one sub-folder per case (``"brats"``, ``"deepmedic"``,
        ``"generic"``) or the MSD task folder (``"msd"``, holding ``dataset.json``).
      layout: one of :data:`LAYOUTS`.
      modalities: the modalities to use, in channel order (default: :data:`DEFAULT_MODALITIES`
        of the layout; for ``"msd"`` all of dataset.json's, for ``"generic"`` those of the
        first case).
      label_name: file stem of the label (``"generic"`` only).
      mask_name: file stem of the brain mask: optional for ``"generic"`` (None: no mask);
        ``"deepmedic"`` requires one (default ``brainmask``) unless ``mask_name=""``, an
        explicit opt-in to a brain made of the images' non-zero voxels.
      label_scheme: overrides the layout's scheme (e.g. ``"brats"`` for a generic folder of
        BraTS labels).
      require_labels: raise when a case has no label file (otherwise its ``label`` is None).
      subset: ``"msd"`` / ``"nnunet"``: ``"train"`` reads ``imagesTr``, ``"test"``
        ``imagesTs`` (with ``labelsTs`` when present).
      errors: when a list, a case's error (missing file, duplicate id) is appended to it and
        the case left out, instead of raised: every problem of a dataset at once
        (`medjax.data.check`).

    Raises:
      FileNotFoundError: missing folder, no cases, a missing modality file (names the file and
        the modalities the case has), a missing label when required.
      ValueError: unknown layout / scheme / modality name, unreadable dataset.json.
    """
    root = Path(directory)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {list(LAYOUTS)}")
    if not root.is_dir():
        raise FileNotFoundError(f"{layout} data folder {root} does not exist (or is not a folder)")
    scheme = _check_scheme(label_scheme) if label_scheme is not None else None
    if layout in ("brats", "brats2023"):
        cases = _brats_cases(root, modalities, require_labels, scheme or layout, layout, errors)
    elif layout == "deepmedic":
        cases = _deepmedic_cases(
            root, modalities, require_labels, scheme or "deepmedic", mask_name, errors
        )
    elif layout == "msd":
        cases = _msd_cases(root, modalities, require_labels, scheme, subset, errors)
    elif layout == "nnunet":
        cases = _nnunet_cases(root, modalities, require_labels, subset, errors)
    else:
        cases = _generic_cases(
            root,
            modalities,
            require_labels,
            scheme or "identity",
            label_name,
            mask_name or None,
            errors,
        )
    if not cases and not errors:
        tag = "Tr" if subset == "train" else "Ts"
        where = root / f"images{tag}" if layout in ("msd", "nnunet") else root
        raise FileNotFoundError(f"no cases found in {where} (layout {layout!r})")
    ids = [c.id for c in cases]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        with _per_case(errors):
            raise ValueError(f"case ids {dup} occur twice in {root}")
    return sorted(cases, key=lambda c: natural_key(c.id))


# --------------------------------------------------------------------------------------------
# labels and regions
# --------------------------------------------------------------------------------------------


def _shown(values: np.ndarray, limit: int = 12) -> str:
    vals = [f"{v:g}" if isinstance(v, float) else str(v) for v in values[:limit].tolist()]
    return "{" + ", ".join(vals) + (", ..." if values.size > limit else "") + "}"


def map_labels(
    label: np.ndarray, scheme: str, *, path: str | os.PathLike[str] | None = None
) -> np.ndarray:
    """Native label map -> int32 internal classes (:data:`BRATS_CLASSES`) under ``scheme``.

    ``label`` may be any integer or float array holding integral values (NIfTI label maps are
    often stored as float; values within 1e-3 of an integer are rounded to it, anything else,
    NaN included, is an error). ``"identity"`` keeps the values (they must be non-negative
    integers). Raises ValueError naming ``path`` (when given), the unexpected values and the
    allowed ones when a value is not integral or not in the scheme.
    """
    mapping = LABEL_SCHEMES[_check_scheme(scheme)]
    lab = np.asarray(label)
    what = f"label file {path}" if path is not None else "label map"
    if lab.dtype == np.bool_:
        lab = lab.view(np.uint8)
    if np.issubdtype(lab.dtype, np.integer):
        ints = lab
    elif np.issubdtype(lab.dtype, np.floating):
        # Round to nearest within a tolerance: scaled label files store e.g. 0.99999997 for 1.
        rounded = np.rint(lab)
        with np.errstate(invalid="ignore"):  # NaN/inf: flagged by the comparison below
            off = ~(np.abs(rounded - lab) <= _LABEL_ATOL)
            ints = rounded.astype(np.int32)
        if off.any():
            raise ValueError(
                f"{what} has non-integer values {_shown(np.unique(lab[off]))}; expected integral "
                f"class labels" + (f" in {sorted(mapping)}" if mapping is not None else "")
            )
    else:
        raise ValueError(f"{what} has dtype {lab.dtype}; expected an integer or float label map")
    if ints.size == 0:
        return ints.astype(np.int32)
    lo, hi = int(ints.min()), int(ints.max())
    if mapping is None:
        if lo < 0:
            raise ValueError(
                f"{what} has negative values {_shown(np.unique(ints[ints < 0]))}; expected "
                f"non-negative integer labels (scheme 'identity')"
            )
        return ints.astype(np.int32, copy=False)
    allowed = sorted(mapping)
    lut = np.full(max(allowed) + 1, -1, np.int32)
    for native, internal in mapping.items():
        lut[native] = internal

    def fail(bad: np.ndarray) -> ValueError:
        return ValueError(
            f"{what} has values {_shown(np.unique(bad))} that are not labels of scheme "
            f"{scheme!r}; expected only {allowed}"
        )

    if lo < 0 or hi >= lut.size:
        outside = (ints < 0) | (ints >= lut.size)
        inside = ints[~outside]
        raise fail(np.concatenate([ints[outside], inside[lut[inside] < 0]]))
    out = lut[ints]
    if lut.min() < 0 and out.min() < 0:
        raise fail(ints[out < 0])
    return out


def to_native(label: np.ndarray, scheme: str) -> np.ndarray:
    """Internal classes (0-3) -> the native label values of ``scheme``, as int32.

    For writing predictions back in a dataset's own convention (``"brats"``: 3 -> 4;
    ``"deepmedic"``: NCR/NET 1 -> 1 necrosis, 3 -> 4; ``"msd_brain"``: 1 <-> 2 swapped).
    ``"identity"`` returns the values unchanged. Raises ValueError on values outside 0-3.
    """
    _check_scheme(scheme)
    lab = np.asarray(label)
    if scheme == "identity":
        return lab.astype(np.int32)
    if not np.issubdtype(lab.dtype, np.integer) and lab.dtype != np.bool_:
        raise ValueError(f"to_native expects an integer class map, got dtype {lab.dtype}")
    mapping = _NATIVE[scheme]
    lut = np.array([mapping[c] for c in range(len(BRATS_CLASSES))], np.int32)
    if lab.size and (int(lab.min()) < 0 or int(lab.max()) >= lut.size):
        bad = lab[(lab < 0) | (lab >= lut.size)]
        raise ValueError(
            f"class map has values {_shown(np.unique(bad))}; expected internal classes "
            f"0..{lut.size - 1} {BRATS_CLASSES}"
        )
    return lut[lab.astype(np.intp, copy=False)]


def region_masks(label: Any) -> Any:
    """Internal class map ``[...]`` -> bool ``[..., 3]`` region masks in the order WT, TC, ET.

    Works on numpy arrays (returns numpy) and on jax arrays (returns jax, jit-able).
    """
    if isinstance(label, np.ndarray | np.generic | int | list | tuple):
        xp: Any = np
        lab = np.asarray(label)
    else:
        import jax.numpy as jnp

        xp, lab = jnp, label
    masks = []
    for classes in BRATS_REGIONS.values():
        m = lab == classes[0]
        for c in classes[1:]:
            m = m | (lab == c)
        masks.append(m)
    return xp.stack(masks, axis=-1)


# --------------------------------------------------------------------------------------------
# classes and regions of a dataset
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LabelSpec:
    """The classes a network predicts and the regions it is scored on.

    Attributes:
      class_names: names of the internal classes ``0..K-1`` (0 is background).
      regions: region name -> internal classes, in evaluation order (a class on its own is a
        region of one; BraTS whole tumour is ``(1, 2, 3)``).
      scheme: key of :data:`LABEL_SCHEMES` mapping the label files to internal classes.
      region_order: nnU-Net's ``regions_class_order`` (the class each region paints, in order)
        when the regions were declared as overlapping label groups, else None.
    """

    class_names: tuple[str, ...]
    regions: dict[str, tuple[int, ...]]
    scheme: str = "identity"
    region_order: tuple[int, ...] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def labels_from_nnunet(
    labels: Mapping[str, Any],
    regions_class_order: Sequence[int] | None = None,
    *,
    class_names: Sequence[str] | None = None,
    scheme: str = "identity",
    where: str = "dataset.json",
) -> LabelSpec:
    """A :class:`LabelSpec` from nnU-Net v2's ``labels`` (name -> int, or name -> list of ints
    for region-based labels) and ``regions_class_order``.

    Plain labels: class ``v`` is named by its key and every foreground class is a region of
    its own. Region-based labels: the regions are the list entries (a bare int is a region of
    one class); class ``c`` is named by the region that paints it in ``regions_class_order``
    (unless ``class_names`` are given). Labels must be the consecutive integers ``0..K-1`` with
    0 the background, as nnU-Net requires; otherwise ValueError naming ``where``.
    """
    if not labels:
        raise ValueError(f"{where}: 'labels' is empty")
    groups: dict[str, tuple[int, ...]] = {}
    region_based = False
    for name, value in labels.items():
        vals = value if isinstance(value, list | tuple) else [value]
        region_based |= isinstance(value, list | tuple)
        try:
            groups[str(name)] = tuple(int(v) for v in vals)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: label {name!r} has value {value!r}; expected ints") from exc
    values = sorted({v for vs in groups.values() for v in vs} | {0})
    if values != list(range(len(values))):
        raise ValueError(
            f"{where}: label values {values} are not the consecutive integers 0..{len(values) - 1} "
            f"(nnU-Net needs consecutive labels, background 0)"
        )
    k = len(values)
    regions = {n: v for n, v in groups.items() if v != (0,)}
    order = tuple(int(c) for c in regions_class_order) if regions_class_order else None
    if region_based and order is not None and len(order) != len(regions):
        raise ValueError(
            f"{where}: regions_class_order {list(order)} needs one class per region {list(regions)}"
        )
    if class_names is not None:
        names = tuple(str(n) for n in class_names)
    elif region_based:
        names_l = ["background"] + [f"class{c}" for c in range(1, k)]
        for region, c in zip(regions, order or (), strict=False):
            names_l[c] = region
        names = tuple(names_l)
    else:
        by_value = {v[0]: n for n, v in groups.items()}
        names = tuple(by_value.get(c, f"class{c}") for c in range(k))
    if len(names) != k:
        raise ValueError(f"{where}: {len(names)} class names for {k} classes")
    return LabelSpec(names, regions, scheme, order if region_based else None)


BRATS_SPEC = labels_from_nnunet(
    BRATS_LABELS, BRATS_REGION_ORDER, class_names=BRATS_CLASSES, scheme="brats"
)


def label_spec(
    directory: str | os.PathLike[str] | None,
    layout: str,
    *,
    label_scheme: str | None = None,
    num_classes: int = 0,
    class_names: Sequence[str] = (),
    regions: Mapping[str, Sequence[int]] | None = None,
) -> LabelSpec:
    """Classes and regions of a dataset in ``layout``.

    - ``"brats"``, ``"brats2023"``, ``"deepmedic"``: the BraTS classes and regions WT/TC/ET
      (:data:`BRATS_SPEC`, with the layout's label scheme);
    - ``"nnunet"``: ``dataset.json``'s ``labels`` / ``regions_class_order``
      (:func:`labels_from_nnunet`);
    - ``"msd"``: ``dataset.json``'s ``labels`` (index -> name); BraTS-like Task01 labels map to
      the BraTS classes and regions (scheme ``"msd_brain"``);
    - ``"generic"``: ``num_classes`` classes (``class_names`` or ``class0``...), identity labels.

    ``regions`` (name -> classes) and ``class_names`` override what the dataset declares.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {list(LAYOUTS)}")
    root = Path(directory) if directory is not None else None
    if layout in ("brats", "brats2023", "deepmedic"):
        spec = dataclasses.replace(BRATS_SPEC, scheme=label_scheme or _DEFAULT_SCHEME[layout])
    elif layout == "nnunet":
        if root is None:
            raise ValueError("an nnU-Net dataset needs its folder (data.directory)")
        meta = read_nnunet_json(root)
        spec = labels_from_nnunet(
            meta["labels"], meta.get("regions_class_order"), where=str(root / "dataset.json")
        )
    elif layout == "msd":
        if root is None:
            raise ValueError("an MSD task needs its folder (data.directory)")
        meta = _read_dataset_json(root)
        scheme = label_scheme or _msd_scheme(meta.get("labels", {}))
        if scheme == "msd_brain":
            spec = dataclasses.replace(BRATS_SPEC, scheme=scheme)
        else:
            names = {int(k): str(v) for k, v in (meta.get("labels") or {"0": "background"}).items()}
            spec = labels_from_nnunet(
                {v: k for k, v in names.items()}, where=str(root / "dataset.json")
            )
    else:
        if num_classes < 2 and not class_names:
            raise ValueError(
                "a generic-layout dataset needs data.num_classes (>= 2) or data.class_names"
            )
        names = tuple(class_names) or tuple(f"class{c}" for c in range(int(num_classes)))
        spec = LabelSpec(
            names, {n: (c,) for c, n in enumerate(names) if c}, label_scheme or "identity"
        )
    if class_names:
        if len(class_names) != spec.num_classes:
            raise ValueError(
                f"data.class_names has {len(class_names)} names; the dataset has "
                f"{spec.num_classes} classes {spec.class_names}"
            )
        spec = dataclasses.replace(spec, class_names=tuple(str(n) for n in class_names))
    if regions:
        bad = {
            n: c for n, c in regions.items() if any(not 0 < int(x) < spec.num_classes for x in c)
        }
        if bad:
            raise ValueError(f"data.regions {bad} name classes outside 1..{spec.num_classes - 1}")
        spec = dataclasses.replace(
            spec, regions={str(n): tuple(int(x) for x in c) for n, c in regions.items()}
        )
    return spec


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def _check_grid(
    case_id: str,
    ref_path: Path,
    ref_shape: tuple,
    ref: Geometry,
    path: Path,
    shape: tuple,
    geom: Geometry,
) -> None:
    if tuple(shape) != tuple(ref_shape):
        raise ValueError(
            f"case {case_id!r}: {path} has shape {tuple(shape)} but {ref_path} has shape "
            f"{tuple(ref_shape)}; every volume of a case must share one voxel grid"
        )
    if not np.allclose(geom.affine, ref.affine, atol=_AFFINE_ATOL):
        raise ValueError(
            f"case {case_id!r}: {path} has affine\n{np.asarray(geom.affine).round(4)}\nbut "
            f"{ref_path} has affine\n{np.asarray(ref.affine).round(4)}\n(canonical RAS+, "
            f"compared with atol {_AFFINE_ATOL}); every volume of a case must share one grid"
        )


def load_case(
    case: Case,
    *,
    modalities: Sequence[str] | None = None,
    dtype: Any = np.float32,
) -> dict[str, Any]:
    """Read one case into an example dict (see the module docstring for the keys).

    ``modalities`` picks / reorders channels among ``case.images`` (default: all, in order).
    Every image is read in canonical RAS+ orientation (``medjax.data.io.read_nifti``) and copied
    once into the preallocated ``[X, Y, Z, C]`` output (a 4D file whose channels are taken
    whole and in order is returned as read, without a copy). ``"mask"`` is the case's brain
    mask (> 0.5) when it has one, else the voxels where any channel is non-zero (BraTS
    volumes are skull-stripped with background exactly 0).

    Raises ValueError naming the case and both files when a modality, the label or the mask
    differs from the first modality in shape or (canonical) affine (``np.allclose``, atol
    1e-3), naming the file when an image holds NaN/inf or a label has unexpected values.
    """
    names = _select_modalities(list(case.images), modalities, f"case {case.id!r}")
    files: dict[Path, tuple[np.ndarray, Geometry]] = {}
    image: np.ndarray | None = None
    ref: tuple[Path, tuple, Geometry] | None = None
    n = len(names)
    for i, name in enumerate(names):
        path = Path(case.images[name])
        if path not in files:
            arr, geom = read_nifti(path, dtype=dtype)
            if arr.ndim not in (3, 4):
                raise ValueError(
                    f"case {case.id!r}: image {path} has shape {arr.shape}; expected a 3D "
                    f"volume or a 4D volume with modalities on the last axis"
                )
            check_finite(arr, path)
            if ref is None:
                ref = (path, arr.shape[:3], geom)
            else:
                _check_grid(case.id, ref[0], ref[1], ref[2], path, arr.shape[:3], geom)
            files[path] = (arr, geom)
        arr = files[path][0]
        channel = case.channels.get(name)
        if arr.ndim == 4:
            if channel is None:
                raise ValueError(
                    f"case {case.id!r}: image {path} of modality {name!r} is 4D {arr.shape} "
                    f"but the case gives no channel index for it"
                )
            if not 0 <= channel < arr.shape[-1]:
                raise ValueError(
                    f"case {case.id!r}: modality {name!r} is channel {channel} of {path}, "
                    f"which has only {arr.shape[-1]} channels (shape {arr.shape})"
                )
        elif channel not in (None, 0):
            raise ValueError(
                f"case {case.id!r}: modality {name!r} is channel {channel} of {path}, which "
                f"is a 3D volume {arr.shape}"
            )
        if (
            i == 0
            and arr.ndim == 4
            and [case.channels.get(m) for m in names] == list(range(arr.shape[-1]))
            and all(Path(case.images[m]) == path for m in names)
        ):
            image = arr  # the whole 4D file, channels in order: no copy
            break
        if image is None:
            image = np.empty(arr.shape[:3] + (n,), dtype=arr.dtype)
        image[..., i] = arr[..., channel] if arr.ndim == 4 else arr
        if sum(1 for m in names[i + 1 :] if Path(case.images[m]) == path) == 0:
            del files[path]  # done with this file: free it before reading the next
    assert image is not None and ref is not None
    ref_path, ref_shape, geometry = ref

    out: dict[str, Any] = {
        "id": case.id,
        "image": image,
        "geometry": geometry,
        "spacing": np.asarray(geometry.spacing, np.float32),
        "label_scheme": case.label_scheme,
        "modalities": tuple(names),
    }
    if case.label is not None:
        # dtype=None: keep the stored integer type (uint8/int16 for BraTS) instead of a float copy
        lab, lgeom = read_nifti(case.label, dtype=None)
        _check_grid(case.id, ref_path, ref_shape, geometry, Path(case.label), lab.shape, lgeom)
        out["label"] = map_labels(lab, case.label_scheme, path=case.label)
    if case.mask is not None:
        msk, mgeom = read_nifti(case.mask, dtype=np.float32)
        if not np.isfinite(msk).all():
            raise ValueError(
                f"{case.mask}: the brain mask of case {case.id!r} has "
                f"{int(msk.size - np.isfinite(msk).sum())} NaN/Inf voxels; expected values in "
                "[0, 1] (> 0.5 is brain)"
            )
        _check_grid(case.id, ref_path, ref_shape, geometry, Path(case.mask), msk.shape, mgeom)
        out["mask"] = msk > 0.5
    else:
        out["mask"] = np.any(image != 0, axis=-1)
    return out
