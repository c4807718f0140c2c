"""medjax.data.volumes on the real DeepMedic BRATS copy and on small folders cropped from it.

References are computed here with nibabel directly (``nib.as_closest_canonical``), numpy and
hand-written label tables, never from the module's own output. The small folders are 40x40x24
crops around the tumour of one real case, written in every supported layout by
:func:`write_layout` (also used by tests/data/test_builders.py).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medjax.data import volumes
from medjax.data.paths import data_dir

CASE = "brats_2013_pat0005_1"
CROP = (40, 40, 24)
# start of the crop around the tumour (stored voxel order), and a second, shifted crop
STARTS = {"A": (65, 148, 81), "B": (75, 133, 87), "C": (58, 140, 75)}

# README: per-label voxel counts 0/1/2/3/4 of the real cases
README_COUNTS = {
    "brats_2013_pat0003_1": (8754072, 1252, 148264, 3162, 21250),
    "brats_2013_pat0004_1": (8807326, 12956, 45203, 44699, 17816),
    "brats_2013_pat0005_1": (8847318, 23030, 35416, 3882, 18354),
    "brats_2013_pat0006_1": (8710620, 41838, 109935, 22228, 43379),
}

# native label conversions written out by hand (deepmedic labels 0 bg, 1 necrosis, 2 edema,
# 3 non-enhancing, 4 enhancing)
DM_TO_BRATS = {0: 0, 1: 1, 2: 2, 3: 1, 4: 4}  # BraTS 2017+: necrosis + non-enh. = label 1
DM_TO_MSD = {0: 0, 1: 2, 2: 1, 3: 2, 4: 3}  # MSD Task01: 1 edema, 2 non-enh., 3 enhancing
DM_TO_INTERNAL = {0: 0, 1: 1, 2: 2, 3: 1, 4: 3}


def _relabel(label: np.ndarray, table: dict[int, int]) -> np.ndarray:
    out = np.zeros(label.shape, np.int32)
    for src, dst in table.items():
        out[label == src] = dst
    return out


def deepmedic_dir() -> Path:
    try:
        return data_dir("brats2015_deepmedic_3d")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@functools.lru_cache(maxsize=1)
def _real_case() -> dict[str, object]:
    folder = deepmedic_dir() / "train" / CASE
    out: dict[str, object] = {}
    for key, name in (
        ("flair", "Flair_subtrMeanDivStd"),
        ("t1ce", "T1c_subtrMeanDivStd"),
        ("label", "OTMultiClass"),
        ("mask", "brainmask"),
    ):
        img = nib.load(str(folder / f"{name}.nii.gz"))
        out[key] = np.asarray(img.dataobj)
        out["affine"] = img.affine
    return out


def real_crop(which: str = "A") -> dict[str, np.ndarray]:
    """A 40x40x24 crop of the real case in stored voxel order, with the crop's own affine.

    Keys: flair, t1ce (float32), t1, t2 (synthetic, 0 outside the brain like BraTS), label
    (deepmedic 0-4, int), brain (bool, brainmask > 0.5), affine (voxel -> world of the crop).
    """
    real = _real_case()
    s = STARTS[which]
    sl = tuple(slice(a, a + n) for a, n in zip(s, CROP, strict=True))
    brain = real["mask"][sl] > 0.5
    # zero outside the brain, like skull-stripped BraTS volumes (the DeepMedic copy z-scored
    # every voxel, so its background is not 0)
    flair = np.where(brain, real["flair"][sl], 0.0).astype(np.float32)
    t1ce = np.where(brain, real["t1ce"][sl], 0.0).astype(np.float32)
    shift = np.eye(4)
    shift[:3, 3] = s
    return {
        "flair": flair,
        "t1ce": t1ce,
        "t1": np.where(flair != 0, 0.5 * flair + 1.0, 0.0).astype(np.float32),
        "t2": np.where(t1ce != 0, 2.0 - t1ce, 0.0).astype(np.float32),
        "label": np.rint(real["label"][sl]).astype(np.int16),
        "brain": brain,
        "affine": real["affine"] @ shift,
    }


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def write_layout(root: Path, layout: str, cases: dict[str, str], *, labels: bool = True) -> Path:
    """Write crops (``cases``: case id -> crop key of STARTS) into ``root`` in ``layout``.

    Returns the folder to pass to find_cases (the MSD task folder for "msd").
    """
    for cid, which in cases.items():
        c = real_crop(which)
        aff = c["affine"]
        if layout == "deepmedic":
            d = root / cid
            _save(d / "Flair_subtrMeanDivStd.nii.gz", c["flair"], aff)
            _save(d / "T1c_subtrMeanDivStd.nii.gz", c["t1ce"], aff)
            if labels:
                _save(d / "OTMultiClass.nii.gz", c["label"].astype(np.float32), aff)
            # brain stored just below 1 (like the real file); a few 0.3 voxels must stay outside
            mask = np.where(c["brain"], np.float32(0.99999994), np.float32(0.0))
            mask[0, 0, :3] = 0.3
            _save(d / "brainmask.nii.gz", mask.astype(np.float32), aff)
        elif layout == "brats":
            d = root / cid
            for mod in ("flair", "t1", "t1ce", "t2"):
                _save(d / f"{cid}_{mod}.nii.gz", c[mod], aff)
            if labels:
                seg = _relabel(c["label"], DM_TO_BRATS).astype(np.uint8)
                _save(d / f"{cid}_seg.nii.gz", seg, aff)
        elif layout == "msd":
            d = root / "Task01_BrainTumour"
            img4 = np.stack([c["flair"], c["t1"], c["t1ce"], c["t2"]], axis=-1)
            _save(d / "imagesTr" / f"{cid}.nii.gz", img4, aff)
            (d / "imagesTr" / f"._{cid}.nii.gz").write_bytes(b"\x00\x05\x16\x07 macOS junk")
            if labels:
                lab = _relabel(c["label"], DM_TO_MSD).astype(np.uint8)
                _save(d / "labelsTr" / f"{cid}.nii.gz", lab, aff)
            meta = {
                "name": "BRATS",
                "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
                "labels": {
                    "0": "background",
                    "1": "edema",
                    "2": "non-enhancing tumor",
                    "3": "enhancing tumour",
                },
            }
            (d / "dataset.json").write_text(json.dumps(meta))
        elif layout == "brats2023":
            d = root / cid
            for mod, key in (("t2f", "flair"), ("t1n", "t1"), ("t1c", "t1ce"), ("t2w", "t2")):
                _save(d / f"{cid}-{mod}.nii.gz", c[key], aff)
            if labels:  # BraTS 2023: 1 NCR, 2 ED, 3 ET (the internal classes)
                seg = _relabel(c["label"], DM_TO_INTERNAL).astype(np.uint8)
                _save(d / f"{cid}-seg.nii.gz", seg, aff)
        elif layout == "nnunet":
            d = root / "Dataset001_BraTS"
            for i, key in enumerate(("flair", "t1ce")):
                _save(d / "imagesTr" / f"{cid}_{i:04d}.nii.gz", c[key], aff)
            if labels:
                seg = _relabel(c["label"], DM_TO_INTERNAL).astype(np.uint8)
                _save(d / "labelsTr" / f"{cid}.nii.gz", seg, aff)
            meta = {
                "channel_names": {"0": "FLAIR", "1": "T1c"},
                "labels": {"background": 0, "WT": [1, 2, 3], "TC": [1, 3], "ET": 3},
                "regions_class_order": [2, 1, 3],
                "numTraining": len(cases),
                "file_ending": ".nii.gz",
            }
            (d / "dataset.json").write_text(json.dumps(meta))
        elif layout == "generic":
            d = root / cid
            _save(d / "t1ce.nii.gz", c["t1ce"], aff)
            _save(d / "flair.nii", c["flair"], aff)
            if labels:
                _save(d / "seg.nii.gz", c["label"].astype(np.uint8), aff)
            _save(d / "brain.nii.gz", c["brain"].astype(np.uint8), aff)
        else:
            raise ValueError(layout)
    return {"msd": root / "Task01_BrainTumour", "nnunet": root / "Dataset001_BraTS"}.get(
        layout, root
    )


def canonical(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(data, affine) of a file in closest-canonical RAS+ order, straight from nibabel."""
    img = nib.as_closest_canonical(nib.load(str(path)))
    return np.asarray(img.dataobj), img.affine


# --------------------------------------------------------------------------------------------
# real data
# --------------------------------------------------------------------------------------------


def test_find_cases_real_deepmedic_folders() -> None:
    root = deepmedic_dir()
    train = volumes.find_cases(root / "train", "deepmedic")
    val = volumes.find_cases(root / "validation", "deepmedic")
    assert [c.id for c in train] == ["brats_2013_pat0005_1", "brats_2013_pat0006_1"]
    assert [c.id for c in val] == ["brats_2013_pat0003_1", "brats_2013_pat0004_1"]
    for c in train + val:
        folder = root / ("train" if c in train else "validation") / c.id
        assert c.images == {
            "flair": folder / "Flair_subtrMeanDivStd.nii.gz",
            "t1ce": folder / "T1c_subtrMeanDivStd.nii.gz",
        }
        assert c.label == folder / "OTMultiClass.nii.gz"
        assert c.mask == folder / "brainmask.nii.gz"
        assert c.label_scheme == "deepmedic" and c.modalities == ("flair", "t1ce")
    only_t1ce = volumes.find_cases(root / "train", "deepmedic", modalities=["t1ce"])
    assert list(only_t1ce[0].images) == ["t1ce"]


def test_load_case_real_matches_nibabel_and_readme_counts() -> None:
    root = deepmedic_dir()
    case = volumes.find_cases(root / "train", "deepmedic")[0]
    ex = volumes.load_case(case)
    assert ex["id"] == CASE and ex["modalities"] == ("flair", "t1ce")
    assert ex["image"].shape == (240, 240, 155, 2) and ex["image"].dtype == np.float32
    assert ex["label"].shape == (240, 240, 155) and ex["label"].dtype == np.int32
    assert ex["mask"].dtype == np.bool_ and ex["spacing"].dtype == np.float32
    np.testing.assert_array_equal(ex["spacing"], [1.0, 1.0, 1.0])

    real = _real_case()
    # README: affine diag(-1, -1, 1), i.e. LPS; canonical RAS+ flips the first two axes
    np.testing.assert_array_equal(ex["image"][..., 0], real["flair"][::-1, ::-1, :])
    np.testing.assert_array_equal(ex["image"][..., 1], real["t1ce"][::-1, ::-1, :])
    np.testing.assert_array_equal(ex["mask"], (real["mask"] > 0.5)[::-1, ::-1, :])
    _, ref_affine = canonical(case.images["flair"])
    np.testing.assert_allclose(ex["geometry"].affine, ref_affine)

    n0, n1, n2, n3, n4 = README_COUNTS[CASE]
    counts = np.bincount(ex["label"].ravel(), minlength=4)
    # internal: NCR/NET = necrosis (1) + non-enhancing (3), edema 2, enhancing 4 -> 3
    np.testing.assert_array_equal(counts, [n0, n1 + n3, n2, n4])


def test_map_labels_real_validation_counts() -> None:
    root = deepmedic_dir()
    for case in volumes.find_cases(root / "validation", "deepmedic"):
        native = np.asarray(nib.load(str(case.label)).dataobj)
        internal = volumes.map_labels(native, "deepmedic", path=case.label)
        n0, n1, n2, n3, n4 = README_COUNTS[case.id]
        np.testing.assert_array_equal(np.bincount(internal.ravel()), [n0, n1 + n3, n2, n4])


# --------------------------------------------------------------------------------------------
# layouts on small folders
# --------------------------------------------------------------------------------------------


def _check_against_files(ex: dict, files: list[Path], label_ref: np.ndarray | None) -> None:
    refs = [canonical(p) for p in files]
    ref_img = np.stack([r[0] for r in refs], axis=-1).astype(np.float32)
    np.testing.assert_array_equal(ex["image"], ref_img)
    np.testing.assert_allclose(ex["geometry"].affine, refs[0][1])
    if label_ref is None:
        assert "label" not in ex
    else:
        np.testing.assert_array_equal(ex["label"], label_ref)


def test_deepmedic_layout_small(tmp_path: Path) -> None:
    root = write_layout(tmp_path, "deepmedic", {"case10": "A", "case2": "B"})
    cases = volumes.find_cases(root, "deepmedic")
    assert [c.id for c in cases] == ["case2", "case10"]  # natural order
    ex = volumes.load_case(cases[1])
    c = real_crop("A")
    lab = canonical(root / "case10" / "OTMultiClass.nii.gz")[0]
    _check_against_files(
        ex,
        [
            root / "case10" / "Flair_subtrMeanDivStd.nii.gz",
            root / "case10" / "T1c_subtrMeanDivStd.nii.gz",
        ],
        _relabel(np.rint(lab).astype(int), DM_TO_INTERNAL),
    )
    # mask = brainmask > 0.5: the 0.3 voxels written at stored [0, 0, :3] are not brain
    brain = c["brain"].copy()
    brain[0, 0, :3] = False
    np.testing.assert_array_equal(ex["mask"], brain[::-1, ::-1, :])
    # translation of the crop: world position of voxel 0 of the canonical grid
    expected_origin = c["affine"] @ np.array([CROP[0] - 1, CROP[1] - 1, 0, 1.0])
    np.testing.assert_allclose(ex["geometry"].affine[:, 3], expected_origin)


def test_brats_layout_small(tmp_path: Path) -> None:
    root = write_layout(tmp_path, "brats", {"BraTS2021_00001": "A", "BraTS2021_00002": "B"})
    write_layout(tmp_path, "brats", {"BraTS2021_00010": "C"}, labels=False)  # no _seg
    cases = volumes.find_cases(root, "brats")
    assert [c.id for c in cases] == ["BraTS2021_00001", "BraTS2021_00002", "BraTS2021_00010"]
    assert cases[2].label is None and cases[0].label_scheme == "brats"
    assert cases[0].modalities == ("flair", "t1", "t1ce", "t2")

    d = root / "BraTS2021_00001"
    ex = volumes.load_case(cases[0])
    seg = canonical(d / "BraTS2021_00001_seg.nii.gz")[0].astype(int)
    internal = np.select([seg == 1, seg == 2, seg == 4], [1, 2, 3], 0)
    files = [d / f"BraTS2021_00001_{m}.nii.gz" for m in ("flair", "t1", "t1ce", "t2")]
    _check_against_files(ex, files, internal)
    # no brain mask in this layout: any channel non-zero
    ref = np.stack([canonical(p)[0] for p in files], axis=-1)
    np.testing.assert_array_equal(ex["mask"], (ref != 0).any(axis=-1))
    assert 0 < ex["mask"].mean() < 1  # crop A reaches outside the brain

    # channel subset and order, case without a label
    ex3 = volumes.load_case(cases[2], modalities=["t2", "flair"])
    d3 = root / "BraTS2021_00010"
    _check_against_files(
        ex3, [d3 / "BraTS2021_00010_t2.nii.gz", d3 / "BraTS2021_00010_flair.nii.gz"], None
    )
    with pytest.raises(FileNotFoundError, match="BraTS2021_00010.*no label file"):
        volumes.find_cases(root, "brats", require_labels=True)


def test_msd_layout_small(tmp_path: Path) -> None:
    task = write_layout(tmp_path, "msd", {"BRATS_001": "A", "BRATS_010": "B", "BRATS_002": "C"})
    cases = volumes.find_cases(task, "msd")
    assert [c.id for c in cases] == ["BRATS_001", "BRATS_002", "BRATS_010"]  # ._ files skipped
    c0 = cases[0]
    assert c0.modalities == ("FLAIR", "T1w", "t1gd", "T2w")
    assert c0.channels == {"FLAIR": 0, "T1w": 1, "t1gd": 2, "T2w": 3}
    assert c0.label_scheme == "msd_brain"
    assert volumes.msd_modalities(task) == ("FLAIR", "T1w", "t1gd", "T2w")

    ex = volumes.load_case(c0)
    img, aff = canonical(task / "imagesTr" / "BRATS_001.nii.gz")
    np.testing.assert_array_equal(ex["image"], img)
    np.testing.assert_allclose(ex["geometry"].affine, aff)
    lab = canonical(task / "labelsTr" / "BRATS_001.nii.gz")[0].astype(int)
    np.testing.assert_array_equal(ex["label"], np.select([lab == 1, lab == 2, lab == 3], [2, 1, 3]))
    # same internal classes as the deepmedic original of the same crop
    ref = _relabel(real_crop("A")["label"], DM_TO_INTERNAL)[::-1, ::-1, :]
    np.testing.assert_array_equal(ex["label"], ref)

    # selecting channels (case-insensitive names) reads the matching slices of the 4D file
    ex2 = volumes.load_case(c0, modalities=["t2w", "FLAIR"])
    np.testing.assert_array_equal(ex2["image"], img[..., [3, 0]])
    sub = volumes.find_cases(task, "msd", modalities=["t1gd"])
    np.testing.assert_array_equal(volumes.load_case(sub[0])["image"], img[..., 2:3])

    # another task's labels pass through unchanged
    meta = json.loads((task / "dataset.json").read_text())
    meta["labels"] = {"0": "background", "1": "a", "2": "b", "3": "c"}
    (task / "dataset.json").write_text(json.dumps(meta))
    other = volumes.find_cases(task, "msd")[0]
    assert other.label_scheme == "identity"
    np.testing.assert_array_equal(volumes.load_case(other)["label"], lab)


def test_generic_layout_small(tmp_path: Path) -> None:
    root = write_layout(tmp_path, "generic", {"p1": "A", "p2": "B"})
    cases = volumes.find_cases(root, "generic", mask_name="brain", label_scheme="deepmedic")
    assert [c.id for c in cases] == ["p1", "p2"]
    c = cases[1]
    assert c.modalities == ("flair", "t1ce")  # inferred: every other NIfTI, sorted
    assert c.label == root / "p2" / "seg.nii.gz" and c.mask == root / "p2" / "brain.nii.gz"
    ex = volumes.load_case(c)
    lab = canonical(root / "p2" / "seg.nii.gz")[0].astype(int)
    _check_against_files(
        ex, [root / "p2" / "flair.nii", root / "p2" / "t1ce.nii.gz"], _relabel(lab, DM_TO_INTERNAL)
    )
    np.testing.assert_array_equal(ex["mask"], real_crop("B")["brain"][::-1, ::-1, :])

    # default scheme is identity: labels unchanged
    plain = volumes.find_cases(root, "generic", modalities=["t1ce"])
    assert plain[0].label_scheme == "identity" and plain[0].mask is None
    np.testing.assert_array_equal(volumes.load_case(plain[1])["label"], lab)

    # a case with another set of files than the first
    _save(root / "p2" / "t2.nii.gz", real_crop("B")["t2"], real_crop("B")["affine"])
    with pytest.raises(ValueError, match=r"'p2' has modalities .*t2.* first case has"):
        volumes.find_cases(root, "generic", mask_name="brain")


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def test_missing_modality_names_the_file(tmp_path: Path) -> None:
    root = write_layout(tmp_path, "brats", {"B1": "A"})
    (root / "B1" / "B1_t2.nii.gz").unlink()
    with pytest.raises(FileNotFoundError) as info:
        volumes.find_cases(root, "brats")
    msg = str(info.value)
    assert str(root / "B1" / "B1_t2") in msg and "'t2'" in msg
    assert "['flair', 't1', 't1ce']" in msg  # the modalities the case does have

    dm = write_layout(tmp_path / "dm", "deepmedic", {"D1": "A"})
    (dm / "D1" / "T1c_subtrMeanDivStd.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"T1c_subtrMeanDivStd.*has modalities \['flair'\]"):
        volumes.find_cases(dm, "deepmedic")
    with pytest.raises(ValueError, match="no modality 'pd'"):
        volumes.find_cases(dm, "deepmedic", modalities=["pd"])


def test_no_cases_and_bad_arguments(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no cases found"):
        volumes.find_cases(tmp_path / "empty", "brats")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        volumes.find_cases(tmp_path / "nope", "brats")
    with pytest.raises(ValueError, match="unknown layout 'nnunet2'"):
        volumes.find_cases(tmp_path / "empty", "nnunet2")
    with pytest.raises(ValueError, match="unknown label scheme"):
        volumes.find_cases(tmp_path / "empty", "generic", label_scheme="brats2031")
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        volumes.find_cases(tmp_path / "empty", "msd")
    dm = write_layout(tmp_path / "dm", "deepmedic", {"D1": "A"}, labels=False)
    with pytest.raises(FileNotFoundError, match=r"'D1'.*OTMultiClass"):
        volumes.find_cases(dm, "deepmedic", require_labels=True)


def _one_brats_case(tmp_path: Path) -> tuple[volumes.Case, Path, dict[str, np.ndarray]]:
    root = write_layout(tmp_path, "brats", {"B1": "A"})
    return volumes.find_cases(root, "brats")[0], root / "B1", real_crop("A")


def test_shape_mismatch_names_case_and_both_files(tmp_path: Path) -> None:
    case, d, c = _one_brats_case(tmp_path)
    _save(d / "B1_t1.nii.gz", c["t1"][:, :, :23], c["affine"])
    with pytest.raises(ValueError) as info:
        volumes.load_case(case)
    msg = str(info.value)
    assert "'B1'" in msg and str(d / "B1_t1.nii.gz") in msg and str(d / "B1_flair.nii.gz") in msg
    assert "(40, 40, 23)" in msg and "(40, 40, 24)" in msg


def test_label_shape_mismatch(tmp_path: Path) -> None:
    case, d, c = _one_brats_case(tmp_path)
    _save(d / "B1_seg.nii.gz", np.zeros((40, 39, 24), np.uint8), c["affine"])
    with pytest.raises(ValueError, match=r"B1_seg.nii.gz has shape \(40, 39, 24\)"):
        volumes.load_case(case)


def test_affine_mismatch_names_both_files(tmp_path: Path) -> None:
    case, d, c = _one_brats_case(tmp_path)
    moved = c["affine"].copy()
    moved[:3, 3] += (0.0, 2.0, 0.0)
    _save(d / "B1_t1ce.nii.gz", c["t1ce"], moved)
    with pytest.raises(ValueError) as info:
        volumes.load_case(case)
    msg = str(info.value)
    assert "'B1'" in msg and "affine" in msg
    assert str(d / "B1_t1ce.nii.gz") in msg and str(d / "B1_flair.nii.gz") in msg
    # a shift below the tolerance (1e-3 mm) is the same grid
    nudged = c["affine"].copy()
    nudged[0, 3] += 1e-4
    _save(d / "B1_t1ce.nii.gz", c["t1ce"], nudged)
    volumes.load_case(case)


def test_unexpected_label_value_names_file_and_value(tmp_path: Path) -> None:
    case, d, c = _one_brats_case(tmp_path)
    seg = _relabel(c["label"], DM_TO_BRATS).astype(np.uint8)
    seg[3, 4, 5] = 7
    _save(d / "B1_seg.nii.gz", seg, c["affine"])
    with pytest.raises(ValueError) as info:
        volumes.load_case(case)
    msg = str(info.value)
    assert str(d / "B1_seg.nii.gz") in msg and "{7}" in msg and "[0, 1, 2, 4]" in msg
    # deepmedic label 3 is not a BraTS 2018-21 label either
    seg[3, 4, 5] = 3
    _save(d / "B1_seg.nii.gz", seg, c["affine"])
    with pytest.raises(ValueError, match=r"values \{3\}"):
        volumes.load_case(case)


def test_nan_in_image_names_the_file(tmp_path: Path) -> None:
    case, d, c = _one_brats_case(tmp_path)
    bad = c["t2"].copy()
    bad[1, 2, 3] = np.nan
    _save(d / "B1_t2.nii.gz", bad, c["affine"])
    with pytest.raises(ValueError, match=r"B1_t2.nii.gz.*not finite"):
        volumes.load_case(case)


def test_unknown_modality_in_load_case(tmp_path: Path) -> None:
    case, _, _ = _one_brats_case(tmp_path)
    with pytest.raises(ValueError, match=r"'B1' has no modality 'dwi'.*\['flair', 't1'"):
        volumes.load_case(case, modalities=["dwi"])


# --------------------------------------------------------------------------------------------
# labels and regions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "native", "internal"),
    [
        ("brats", [0, 1, 2, 4], [0, 1, 2, 3]),
        ("deepmedic", [0, 1, 2, 3, 4], [0, 1, 2, 1, 3]),
        ("msd_brain", [0, 1, 2, 3], [0, 2, 1, 3]),
        ("identity", [0, 1, 5, 9], [0, 1, 5, 9]),
    ],
)
def test_map_labels_and_to_native(scheme: str, native: list, internal: list) -> None:
    arr = np.array(native * 3).reshape(3, 1, len(native))
    want = np.array(internal * 3).reshape(arr.shape)
    for dtype in (np.uint8, np.int16, np.float32, np.float64):
        got = volumes.map_labels(arr.astype(dtype), scheme)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, want)
    back = volumes.to_native(want, scheme)
    # the round trip is exact except deepmedic's non-enhancing 3, merged into NCR/NET -> 1
    expected_back = np.where(arr == 3, 1, arr) if scheme == "deepmedic" else arr
    np.testing.assert_array_equal(back, expected_back)
    np.testing.assert_array_equal(volumes.map_labels(back, scheme), want)


def test_map_labels_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match=r"x\.nii\.gz has values \{3, 7\}.*\[0, 1, 2, 4\]"):
        volumes.map_labels(np.array([0, 3, 7, 4, 7]), "brats", path="x.nii.gz")
    with pytest.raises(ValueError, match=r"values \{-1\}"):
        volumes.map_labels(np.array([0, -1]), "msd_brain")
    with pytest.raises(ValueError, match=r"non-integer values \{0\.5, nan\}"):
        volumes.map_labels(np.array([0.0, 0.5, np.nan]), "deepmedic")
    with pytest.raises(ValueError, match="negative"):
        volumes.map_labels(np.array([0, -2]), "identity")
    with pytest.raises(ValueError, match="unknown label scheme"):
        volumes.map_labels(np.array([0]), "brats2031")
    # BraTS 2023+ files already hold the internal classes (1 NCR, 2 ED, 3 ET); 4 is not a label
    np.testing.assert_array_equal(
        volumes.map_labels(np.array([0, 3, 1, 2]), "brats2023"), [0, 3, 1, 2]
    )
    with pytest.raises(ValueError, match=r"values \{4\}.*\[0, 1, 2, 3\]"):
        volumes.map_labels(np.array([0, 4]), "brats2023")
    # a scaled mask-like value within 1e-3 of an integer counts as that integer
    np.testing.assert_array_equal(
        volumes.map_labels(np.array([0.99999994, 2.0002]), "brats"), [1, 2]
    )
    with pytest.raises(ValueError, match=r"values \{4\}.*internal classes"):
        volumes.to_native(np.array([0, 4]), "brats")


def test_region_masks_hand_computed() -> None:
    label = np.array([[0, 1, 2, 3], [3, 3, 0, 1]])
    got = volumes.region_masks(label)
    assert got.shape == (2, 4, 3) and got.dtype == np.bool_
    wt = [[0, 1, 1, 1], [1, 1, 0, 1]]
    tc = [[0, 1, 0, 1], [1, 1, 0, 1]]
    et = [[0, 0, 0, 1], [1, 1, 0, 0]]
    np.testing.assert_array_equal(got, np.stack([wt, tc, et], axis=-1).astype(bool))
    assert volumes.REGION_NAMES == ("WT", "TC", "ET")

    import jax
    import jax.numpy as jnp

    got_jax = jax.jit(volumes.region_masks)(jnp.asarray(label))
    assert isinstance(got_jax, jax.Array)
    np.testing.assert_array_equal(np.asarray(got_jax), got)

    # native BraTS regions: WT {1, 2, 4}, TC {1, 4}, ET {4}
    native = np.array([0, 1, 2, 4])
    regions = volumes.region_masks(volumes.map_labels(native, "brats"))
    np.testing.assert_array_equal(regions[:, 0], np.isin(native, [1, 2, 4]))
    np.testing.assert_array_equal(regions[:, 1], np.isin(native, [1, 4]))
    np.testing.assert_array_equal(regions[:, 2], native == 4)


# --------------------------------------------------------------------------------------------
# nnU-Net v2 raw datasets and BraTS 2023+ naming
# --------------------------------------------------------------------------------------------


def test_nnunet_layout_reads_channels_labels_and_regions(tmp_path: Path) -> None:
    root = write_layout(tmp_path, "nnunet", {"BRATS_001": "A", "BRATS_002": "B"})
    cases = volumes.find_cases(root, "nnunet")
    assert [c.id for c in cases] == ["BRATS_001", "BRATS_002"]
    assert cases[0].images == {
        "FLAIR": root / "imagesTr" / "BRATS_001_0000.nii.gz",
        "T1c": root / "imagesTr" / "BRATS_001_0001.nii.gz",
    }
    assert cases[0].label == root / "labelsTr" / "BRATS_001.nii.gz"
    ex = volumes.load_case(cases[0])
    c = real_crop("A")
    # canonical RAS+ of a crop stored LPS: x and y reversed (nibabel's own reorientation)
    np.testing.assert_array_equal(ex["image"][..., 0], c["flair"][::-1, ::-1, :])
    np.testing.assert_array_equal(ex["image"][..., 1], c["t1ce"][::-1, ::-1, :])
    np.testing.assert_array_equal(ex["label"], _relabel(c["label"], DM_TO_INTERNAL)[::-1, ::-1, :])
    # no mask file: the non-zero voxels (the crop is zero outside the brain)
    np.testing.assert_array_equal(
        ex["mask"], c["brain"][::-1, ::-1, :] | (ex["image"] != 0).any(-1)
    )
    spec = volumes.label_spec(root, "nnunet")
    assert spec.num_classes == 4 and spec.region_order == (2, 1, 3)
    assert spec.regions == {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
    # the BraTS declaration is the same nnU-Net-style one
    assert spec.regions == volumes.BRATS_SPEC.regions
    # channel selection by name, and the test subset
    assert list(volumes.find_cases(root, "nnunet", modalities=["t1c"])[0].images) == ["T1c"]
    with pytest.raises(FileNotFoundError, match="imagesTs"):
        volumes.find_cases(root, "nnunet", subset="test")


def test_nnunet_errors_name_the_file(tmp_path: Path) -> None:
    root = write_layout(tmp_path, "nnunet", {"BRATS_001": "A"})
    (root / "imagesTr" / "BRATS_001_0001.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"BRATS_001_0001\.nii\.gz"):
        volumes.find_cases(root, "nnunet")
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "a": 1, "b": 3}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="consecutive"):
        volumes.label_spec(root, "nnunet")
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "x"}, "labels": {}}))
    with pytest.raises(ValueError, match="layout 'msd'"):
        volumes.find_cases(root, "nnunet")


def test_labels_from_nnunet_plain_and_regions() -> None:
    plain = volumes.labels_from_nnunet({"background": 0, "PZ": 1, "TZ": 2})
    assert plain.class_names == ("background", "PZ", "TZ")
    assert plain.regions == {"PZ": (1,), "TZ": (2,)} and plain.region_order is None
    # the example of nnU-Net's region-based training documentation
    reg = volumes.labels_from_nnunet(
        {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": 3},
        [1, 2, 3],
    )
    assert reg.class_names == ("background", "whole_tumor", "tumor_core", "enhancing_tumor")
    assert reg.regions["tumor_core"] == (2, 3) and reg.regions["enhancing_tumor"] == (3,)
    with pytest.raises(ValueError, match="one class per region"):
        volumes.labels_from_nnunet({"background": 0, "a": [1, 2], "b": [2]}, [1])


def test_brats2023_names(tmp_path: Path) -> None:
    root = write_layout(tmp_path, "brats2023", {"BraTS-GLI-00000-000": "A"})
    (case,) = volumes.find_cases(root, "brats2023")
    assert list(case.images) == ["t2f", "t1n", "t1c", "t2w"]
    assert case.label == root / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-seg.nii.gz"
    ex = volumes.load_case(case, modalities=["t1c"])
    c = real_crop("A")
    np.testing.assert_array_equal(ex["image"][..., 0], c["t1ce"][::-1, ::-1, :])
    np.testing.assert_array_equal(ex["label"], _relabel(c["label"], DM_TO_INTERNAL)[::-1, ::-1, :])
    assert volumes.label_spec(root, "brats2023").regions == volumes.BRATS_REGIONS
    # predictions go back to the 2023 values unchanged (1 NCR, 2 ED, 3 ET)
    np.testing.assert_array_equal(
        volumes.to_native(np.array([0, 1, 2, 3]), "brats2023"), [0, 1, 2, 3]
    )
    with pytest.raises(
        FileNotFoundError, match=r"'t1ce'.*has modalities \['t1c', 't1n', 't2f', 't2w'\]"
    ):
        volumes.find_cases(root, "brats2023", modalities=["t1ce"])


def test_convert_to_nnunet_round_trip(tmp_path: Path) -> None:
    """deepmedic cases -> nnU-Net folder: the same images inside the brain (0 outside), the
    same internal labels, the BraTS regions declared the nnU-Net way."""
    from medjax.data import convert

    src = write_layout(tmp_path / "dm", "deepmedic", {"D1": "A", "D2": "B"})
    cases = volumes.find_cases(src, "deepmedic")
    dst = convert.to_nnunet(cases, tmp_path / "nn", volumes.label_spec(src, "deepmedic"))
    meta = json.loads((dst / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "flair", "1": "t1ce"}
    assert meta["labels"] == {"background": 0, "WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}
    assert meta["regions_class_order"] == [2, 1, 3]
    for orig, conv in zip(cases, volumes.find_cases(dst, "nnunet"), strict=True):
        a, b = volumes.load_case(orig), volumes.load_case(conv)
        np.testing.assert_array_equal(b["label"], a["label"])
        np.testing.assert_allclose(b["image"], np.where(a["mask"][..., None], a["image"], 0))
        np.testing.assert_array_equal(b["mask"], a["mask"] & (a["image"] != 0).any(-1))
        np.testing.assert_allclose(b["geometry"].affine, a["geometry"].affine)
    with pytest.raises(FileExistsError, match="not empty"):
        convert.to_nnunet(cases, dst, volumes.BRATS_SPEC)
