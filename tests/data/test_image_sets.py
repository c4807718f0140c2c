"""medjax.data.image_sets on the shared MedMNIST / BRATS / TCIA data and on small synthetic files.

References are independent of the code under test: numpy reads of the .npz, a naive
half-pixel bilinear interpolation written here, nibabel reads of the raw NIfTI (stored LPS, so
the radiological axial display is ``stored[:, :, z].T``), pydicom ``pixel_array``s sorted by
InstanceNumber, counts from the dataset READMEs, and hand-computed percentile scaling.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from medjax.data import image_sets
from medjax.data.paths import data_dir

BREAST, PNEUMONIA = "medmnist_breastmnist", "medmnist_pneumoniamnist"
# README class counts [label 0, label 1] per split
MEDMNIST_COUNTS = {
    BREAST: {"train": [147, 399], "val": [21, 57]},
    PNEUMONIA: {"train": [388, 3494], "val": [135, 389]},
}
BRATS_CASE = "brats_2013_pat0005_1"
T1_SERIES, T2_SERIES = "34907-T1prereg-43695", "37908-T2reg-21119"
MASK_SERIES = "5388-MaskTumor-63335"
TUMOUR_VOXELS = 6809  # README: voxels of the tumour mask series


def _dir_or_skip(name: str) -> Path:
    try:
        return data_dir(name)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def _npz(folder: Path) -> Path:
    (path,) = sorted(folder.glob("*.npz"))
    return path


def _hand_scale(x: np.ndarray, mask: np.ndarray, lo_p: float = 0.5, hi_p: float = 99.5):
    """Percentile min-max to [-1, 1] of one channel, float64, written out by hand."""
    lo, hi = np.percentile(x[mask].astype(np.float64), [lo_p, hi_p])
    out = np.clip(2.0 * (x.astype(np.float64) - lo) / (hi - lo) - 1.0, -1.0, 1.0)
    out[~mask] = -1.0
    return out


def _bilinear_reference(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Naive half-pixel-centre bilinear resize of one [H, W] image, edges clamped."""
    h, w = img.shape
    out = np.empty((out_h, out_w))
    for i in range(out_h):
        y = min(max((i + 0.5) * h / out_h - 0.5, 0.0), h - 1.0)
        y0 = int(np.floor(y))
        y1, fy = min(y0 + 1, h - 1), y - y0
        for j in range(out_w):
            x = min(max((j + 0.5) * w / out_w - 0.5, 0.0), w - 1.0)
            x0 = int(np.floor(x))
            x1, fx = min(x0 + 1, w - 1), x - x0
            top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
            bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


# --------------------------------------------------------------------------------------------
# MedMNIST
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [BREAST, PNEUMONIA])
@pytest.mark.parametrize("split", ["train", "val"])
def test_medmnist_shapes_ranges_labels(name: str, split: str):
    folder = _dir_or_skip(name)
    out = image_sets.load_medmnist(folder, split)
    with np.load(_npz(folder)) as raw:
        raw_images = raw[f"{split}_images"]
    n = raw_images.shape[0]
    assert out["image"].shape == (n, 28, 28, 1) and out["image"].dtype == np.float32
    assert out["label"].shape == (n,) and out["label"].dtype == np.int32
    assert -1.0 <= out["image"].min() and out["image"].max() <= 1.0
    assert np.bincount(out["label"], minlength=2).tolist() == MEDMNIST_COUNTS[name][split]


def test_medmnist_exact_values():
    folder = _dir_or_skip(BREAST)
    npz = _npz(folder)
    with np.load(npz) as raw:
        images, labels = raw["train_images"], raw["train_labels"]
    out = image_sets.load_medmnist(npz, "train")  # the file itself works as well as its folder
    img = out["image"][..., 0]
    zero, full = np.argwhere(images == 0)[0], np.argwhere(images == 255)[0]
    assert img[tuple(zero)] == -1.0 and img[tuple(full)] == 1.0
    v = int(images[17, 13, 9])
    assert 0 < v < 255  # a mid-grey pixel makes the check meaningful
    assert img[17, 13, 9] == pytest.approx(v / 127.5 - 1.0, abs=1e-6)
    np.testing.assert_array_equal(out["label"], labels.reshape(-1))


def test_medmnist_upsampling_matches_naive_bilinear():
    folder = _dir_or_skip(BREAST)
    with np.load(_npz(folder)) as raw:
        images = raw["val_images"][:4].astype(np.float64) / 127.5 - 1.0
    for size in [(64, 64), (40, 57)]:
        out = image_sets.load_medmnist(folder, "val", size=size)
        assert out["image"].shape == (78, *size, 1)
        for k in range(4):
            ref = _bilinear_reference(images[k], *size)
            np.testing.assert_allclose(out["image"][k, ..., 0], ref, atol=2e-6)


def test_medmnist_errors_name_the_file(tmp_path: Path):
    bad = tmp_path / "bad" / "mnist_like.npz"
    bad.parent.mkdir()
    np.savez(bad, x_train=np.zeros((2, 28, 28), np.uint8), y_train=np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match=r"mnist_like\.npz.*x_train"):
        image_sets.load_medmnist(bad.parent, "train")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        image_sets.load_medmnist(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no .npz"):
        image_sets.load_medmnist(tmp_path)  # holds only the folder "bad"
    np.savez(bad.parent / "second.npz", train_images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="exactly one"):
        image_sets.load_medmnist(bad.parent)
    wrong = tmp_path / "labels.npz"
    np.savez(wrong, train_images=np.zeros((3, 4, 4), np.uint8), train_labels=np.zeros((3, 14)))
    with pytest.raises(ValueError, match=r"labels\.npz.*multi-label"):
        image_sets.load_medmnist(wrong)
    floaty = tmp_path / "floaty.npz"
    np.savez(floaty, train_images=np.zeros((3, 4, 4)), train_labels=np.zeros(3))
    with pytest.raises(ValueError, match=r"floaty\.npz.*uint8"):
        image_sets.load_medmnist(floaty)


# --------------------------------------------------------------------------------------------
# scale_to_unit_range
# --------------------------------------------------------------------------------------------


def test_scale_to_unit_range_matches_numpy():
    rng = np.random.default_rng(3)
    vol = rng.normal(size=(9, 8, 7, 2)).astype(np.float32) * [1.0, 40.0] + [0.0, 300.0]
    mask = np.zeros((9, 8, 7), bool)
    mask[2:8, 1:7, 1:6] = True
    vol[~mask] = 1e4  # outside values must not move the percentiles
    out = image_sets.scale_to_unit_range(vol, mask, percentiles=(2.0, 97.0))
    assert out.dtype == np.float32 and out.shape == vol.shape
    for c in range(2):
        np.testing.assert_allclose(
            out[..., c], _hand_scale(vol[..., c], mask, 2.0, 97.0), atol=2e-6
        )
    # one voxel by scalar arithmetic
    inside = np.sort(vol[..., 1][mask].astype(np.float64))
    lo, hi = np.percentile(inside, 2.0), np.percentile(inside, 97.0)
    v = float(vol[4, 4, 3, 1])
    assert out[4, 4, 3, 1] == pytest.approx(
        min(1.0, max(-1.0, 2 * (v - lo) / (hi - lo) - 1)), abs=2e-6
    )
    assert np.all(out[~mask] == -1.0)
    assert out[mask].min() == -1.0 and out[mask].max() == 1.0  # clipped at both ends

    whole = image_sets.scale_to_unit_range(vol[..., :1], None)
    np.testing.assert_allclose(
        whole[..., 0], _hand_scale(vol[..., 0], np.ones_like(mask)), atol=2e-6
    )
    const = image_sets.scale_to_unit_range(np.full((3, 3, 1), 5.0), None)
    assert np.all(const == -1.0)


def test_scale_to_unit_range_errors():
    vol = np.zeros((4, 4, 1), np.float32)
    with pytest.raises(ValueError, match="mask shape"):
        image_sets.scale_to_unit_range(vol, np.ones((4, 5), bool))
    with pytest.raises(ValueError, match="selects no voxels"):
        image_sets.scale_to_unit_range(vol, np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="percentiles"):
        image_sets.scale_to_unit_range(vol, None, percentiles=(50, 10))
    vol[1, 1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        image_sets.scale_to_unit_range(vol, None)


# --------------------------------------------------------------------------------------------
# BraTS slices: real DeepMedic copy
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def brats_train() -> Path:
    return _dir_or_skip("brats2015_deepmedic_3d") / "train"


@pytest.fixture(scope="module")
def brats_slices(brats_train: Path) -> dict:
    return image_sets.load_brats_slices(brats_train, size=None)


@pytest.fixture(scope="module")
def brats_raw(brats_train: Path) -> dict:
    """nibabel reads: brain masks of every train case, FLAIR + label of one case (stored LPS)."""
    masks = {
        c.name: np.asarray(nib.load(str(c / "brainmask.nii.gz")).dataobj) > 0.5
        for c in sorted(brats_train.iterdir())
        if c.is_dir()
    }
    case = brats_train / BRATS_CASE
    for name in ("Flair_subtrMeanDivStd", "OTMultiClass", "brainmask"):
        img = nib.load(str(case / f"{name}.nii.gz"))
        assert nib.aff2axcodes(img.affine) == ("L", "P", "S")  # README; display = stored.T
    flair = np.asarray(nib.load(str(case / "Flair_subtrMeanDivStd.nii.gz")).dataobj, np.float64)
    label = np.asarray(nib.load(str(case / "OTMultiClass.nii.gz")).dataobj)
    return {"masks": masks, "flair": flair, "label": label}


def _display_bbox(mask3d: np.ndarray) -> tuple[int, int, int, int]:
    proj = mask3d.any(axis=2).T  # rows = stored j (posterior), cols = stored i (left)
    rows, cols = np.nonzero(proj)
    return rows.min(), rows.max() + 1, cols.min(), cols.max() + 1


def _window(plane: np.ndarray, box: tuple[int, int, int, int], side: int, fill) -> np.ndarray:
    """The side x side window centred on box, taken from plane padded generously with fill."""
    r0, r1, c0, c1 = box
    big = side
    padded = np.pad(plane, big, constant_values=fill)
    rs, cs = r0 - (side - (r1 - r0)) // 2 + big, c0 - (side - (c1 - c0)) // 2 + big
    return padded[rs : rs + side, cs : cs + side]


def test_brats_slices_shapes_range_and_selection(brats_slices, brats_raw):
    out = brats_slices
    sides = [max(b[1] - b[0], b[3] - b[2]) for b in map(_display_bbox, brats_raw["masks"].values())]
    side = max(sides)
    n = out["image"].shape[0]
    assert out["image"].shape == (n, side, side, 2) and out["image"].dtype == np.float32
    assert out["mask"].shape == out["label"].shape == (n, side, side)
    assert out["mask"].dtype == bool and out["label"].dtype == np.int32
    assert out["case"].shape == out["slice_index"].shape == (n,)
    assert out["slice_index"].dtype == np.int32
    assert -1.0 <= out["image"].min() and out["image"].max() <= 1.0
    assert np.all(out["image"][~out["mask"]] == -1.0)
    assert set(np.unique(out["label"]).tolist()) <= {0, 1, 2, 3}
    # slices kept: brain fraction of the full 240 x 240 slice >= 0.2, per case, in z order
    assert sorted(set(out["case"].tolist())) == sorted(brats_raw["masks"])
    for cid, mask in brats_raw["masks"].items():
        expected = np.flatnonzero(mask.mean(axis=(0, 1)) >= 0.2)
        np.testing.assert_array_equal(out["slice_index"][out["case"] == cid], expected)


def test_brats_flair_slice_equals_hand_scaled_nifti(brats_slices, brats_raw):
    out = brats_slices
    mask = brats_raw["masks"][BRATS_CASE]
    side = out["image"].shape[1]
    box = _display_bbox(mask)
    scaled = _hand_scale(brats_raw["flair"], mask)
    rows = np.flatnonzero(out["case"] == BRATS_CASE)
    for i in (rows[0], rows[len(rows) // 2]):
        z = int(out["slice_index"][i])
        ref = _window(scaled[:, :, z].T, box, side, -1.0)
        np.testing.assert_allclose(out["image"][i, ..., 0], ref, atol=2e-6)
        np.testing.assert_array_equal(out["mask"][i], _window(mask[:, :, z].T, box, side, False))
        # whole tumour (native labels 1-4) lands on the same pixels
        wt = _window(brats_raw["label"][:, :, z].T > 0, box, side, False)
        assert i == rows[0] or wt.any()  # the middle slice holds tumour: the check bites
        np.testing.assert_array_equal(out["label"][i] > 0, wt)
    # enhancing tumour: native 4 -> internal 3
    z = int(out["slice_index"][rows[len(rows) // 2]])
    et = _window(brats_raw["label"][:, :, z].T == 4, box, side, False)
    assert et.any()
    np.testing.assert_array_equal(out["label"][rows[len(rows) // 2]] == 3, et)


def test_brats_slices_resized(brats_train: Path, brats_slices):
    out = image_sets.load_brats_slices(brats_train, size=(64, 64))
    n = brats_slices["image"].shape[0]
    assert out["image"].shape == (n, 64, 64, 2) and out["mask"].shape == (n, 64, 64)
    assert -1.0 <= out["image"].min() and out["image"].max() <= 1.0
    assert np.all(out["image"][~out["mask"]] == -1.0)
    np.testing.assert_array_equal(out["slice_index"], brats_slices["slice_index"])
    np.testing.assert_array_equal(out["case"], brats_slices["case"])
    # same anatomy: brain area scales with the pixel area (64 / side)^2, within 5 %
    side = brats_slices["image"].shape[1]
    ratio = out["mask"].sum() / brats_slices["mask"].sum() * (side / 64) ** 2
    assert 0.95 < ratio < 1.05
    # splitting the real set by case keeps each case whole
    train, val = image_sets.split_by_case(out["case"], 1)
    last = sorted(set(out["case"].tolist()))[-1]
    assert set(out["case"][val].tolist()) == {last}
    assert last not in set(out["case"][train].tolist())


def _write_generic_case(root: Path, cid: str, box: tuple[slice, slice], seed: int) -> None:
    """A 20 x 24 x 6 RAS case: two contrasts, a box-shaped brain mask, a small label."""
    shape = (20, 24, 6)
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, np.uint8)
    mask[box[0], box[1], :] = 1
    folder = root / cid
    folder.mkdir(parents=True)
    for name in ("flair", "t1ce"):
        data = (rng.uniform(1, 100, size=shape) * mask).astype(np.float32)
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(folder / f"{name}.nii.gz"))
    label = np.zeros(shape, np.uint8)
    label[box[0].start, box[1].start, :] = 1
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(folder / "label.nii.gz"))
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(folder / "mask.nii.gz"))


def test_brats_slices_crop_geometry_on_synthetic_generic_folder(tmp_path: Path):
    boxes = {"a": (slice(2, 12), slice(3, 9)), "b": (slice(5, 9), slice(4, 20))}
    for seed, (cid, box) in enumerate(boxes.items()):
        _write_generic_case(tmp_path, cid, box, seed)
    kwargs = {"layout": "generic", "modalities": ("flair", "t1ce"), "min_brain_fraction": 0.1}
    out = image_sets.load_brats_slices(tmp_path, size=None, **kwargs)
    # display: rows = Y reversed (24 - y), cols = X reversed (20 - x); sides a: 6 x 10, b: 16 x 4
    assert out["image"].shape == (12, 16, 16, 2)
    for cid, box in boxes.items():
        flair = np.asarray(nib.load(str(tmp_path / cid / "flair.nii.gz")).dataobj, np.float64)
        mask = np.zeros(flair.shape, bool)
        mask[box[0], box[1], :] = True
        scaled = _hand_scale(flair, mask)
        y0, y1, x0, x1 = box[1].start, box[1].stop, box[0].start, box[0].stop
        dbox = (24 - y1, 24 - y0, 20 - x1, 20 - x0)
        rows = np.flatnonzero(out["case"] == cid)
        np.testing.assert_array_equal(out["slice_index"][rows], np.arange(6))
        for i in rows:
            z = int(out["slice_index"][i])
            display = scaled[::-1, ::-1, z].T
            ref = _window(display, dbox, 16, -1.0)
            np.testing.assert_allclose(out["image"][i, ..., 0], ref, atol=2e-6)
            # the label voxel (box start corner) sits at display (23 - y0, 19 - x0)
            r, c = 23 - y0, 19 - x0
            rs = dbox[0] - (16 - (dbox[1] - dbox[0])) // 2
            cs = dbox[2] - (16 - (dbox[3] - dbox[2])) // 2
            assert np.argwhere(out["label"][i]).tolist() == [[r - rs, c - cs]]
    # case a's window runs past the volume (rows 10..26 of 24): padded with -1 / False
    a0 = np.flatnonzero(out["case"] == "a")[0]
    assert np.all(out["image"][a0, -2:] == -1.0) and not out["mask"][a0, -2:].any()
    # the fraction counts full 20 x 24 slices: a = 60/480, b = 64/480
    only_b = image_sets.load_brats_slices(
        tmp_path, size=None, **{**kwargs, "min_brain_fraction": 0.13}
    )
    assert set(only_b["case"].tolist()) == {"b"} and only_b["image"].shape[1:3] == (16, 16)
    resized = image_sets.load_brats_slices(tmp_path, size=(8, 12), **kwargs)
    assert resized["image"].shape == (12, 8, 12, 2)  # 16 x 16 padded to 16 x 24, then resized
    assert not resized["mask"][:, :, :2].any() and not resized["mask"][:, :, -2:].any()


# --------------------------------------------------------------------------------------------
# TCIA Brain-Tumor-Progression exam (DICOM)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pgbm_dir() -> Path:
    return _dir_or_skip("brain_tumor_progression_pgbm001")


def _pydicom_stack(folder: Path) -> np.ndarray:
    """[slice, row, column] pixel arrays sorted by InstanceNumber (README: ascending in z)."""
    items = sorted(
        (pydicom.dcmread(p) for p in folder.glob("*.dcm")), key=lambda d: d.InstanceNumber
    )
    return np.stack([d.pixel_array.astype(np.float64) for d in items])


@pytest.fixture(scope="module")
def tcia_all(pgbm_dir: Path) -> dict:
    return image_sets.load_tcia_series(pgbm_dir, ("t1pre", "t2"), size=None, min_head_fraction=0)


def test_tcia_slices_match_pydicom(pgbm_dir: Path, tcia_all):
    out = tcia_all
    assert out["image"].shape == (24, 320, 260, 2) and out["image"].dtype == np.float32
    assert out["mask"].shape == out["label"].shape == (24, 320, 260)
    np.testing.assert_array_equal(out["slice_index"], np.arange(24))
    assert set(out["case"].tolist()) == {pgbm_dir.name}
    t1, t2 = _pydicom_stack(pgbm_dir / T1_SERIES), _pydicom_stack(pgbm_dir / T2_SERIES)
    tumour = _pydicom_stack(pgbm_dir / MASK_SERIES)
    np.testing.assert_array_equal(out["label"], (tumour > 0).astype(np.int32))
    assert int(out["label"].sum()) == TUMOUR_VOXELS
    # head mask by hand: union of > 5 % of each series' 99th percentile, holes filled per slice
    head = (t1 > 0.05 * np.percentile(t1, 99)) | (t2 > 0.05 * np.percentile(t2, 99))
    head = np.stack([ndimage.binary_fill_holes(s) for s in head])
    np.testing.assert_array_equal(out["mask"], head)
    for c, vol in enumerate((t1, t2)):
        np.testing.assert_allclose(out["image"][..., c], _hand_scale(vol, head), atol=2e-6)


def test_tcia_head_fraction_and_resize(pgbm_dir: Path, tcia_all):
    kept = image_sets.load_tcia_series(pgbm_dir, ("t1pre", "t2"), size=None, min_head_fraction=0.1)
    fraction = tcia_all["mask"].mean(axis=(1, 2))
    np.testing.assert_array_equal(kept["slice_index"], np.flatnonzero(fraction >= 0.1))
    assert int(kept["label"].sum()) <= TUMOUR_VOXELS
    resized = image_sets.load_tcia_series(pgbm_dir, ("flair",), size=(128, 128))
    n = resized["image"].shape[0]
    assert resized["image"].shape == (n, 128, 128, 1) and 0 < n <= 24
    assert -1.0 <= resized["image"].min() and resized["image"].max() <= 1.0
    assert np.all(resized["image"][~resized["mask"]] == -1.0)
    # 320 x 260 is padded to 320 x 320 (30 columns each side = 12 of 128) before resizing
    assert not resized["mask"][:, :, :12].any() and not resized["mask"][:, :, -12:].any()
    assert resized["label"].sum() > 0


def test_tcia_grid_mismatch_missing_and_ambiguous_series(pgbm_dir: Path, tmp_path: Path):
    exam = tmp_path / "exam"
    shutil.copytree(pgbm_dir / T1_SERIES, exam / T1_SERIES)
    out = image_sets.load_tcia_series(exam, ("t1pre",), size=None)  # no mask series: zeros
    assert out["image"].shape[1:] == (320, 260, 1) and not out["label"].any()
    with pytest.raises(FileNotFoundError, match=rf"'t2'.*{T1_SERIES}"):
        image_sets.load_tcia_series(exam, ("t1pre", "t2"))
    # a T2 series missing its last slice: 23 slices, not on the T1 grid
    t2 = sorted(
        (pgbm_dir / T2_SERIES).glob("*.dcm"), key=lambda p: pydicom.dcmread(p).InstanceNumber
    )
    (exam / T2_SERIES).mkdir()
    for p in t2[:-1]:
        shutil.copyfile(p, exam / T2_SERIES / p.name)
    with pytest.raises(ValueError, match=rf"(?s){T2_SERIES}.*{T1_SERIES}.*same grid"):
        image_sets.load_tcia_series(exam, ("t1pre", "t2"))
    (exam / "99-t2reg-copy").mkdir()
    with pytest.raises(ValueError, match="matching series 't2'"):
        image_sets.load_tcia_series(exam, ("t2",))
    with pytest.raises(ValueError, match="mask"):
        image_sets.load_tcia_series(exam, ("mask",))


# --------------------------------------------------------------------------------------------
# splits
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 7, 10])
def test_split_unpaired_disjoint_and_covering(n: int):
    a, b = image_sets.split_unpaired(n, seed=1)
    assert len(a) == n // 2 and len(b) == n - n // 2
    assert not set(a.tolist()) & set(b.tolist())
    assert sorted(a.tolist() + b.tolist()) == list(range(n))
    a2, b2 = image_sets.split_unpaired(n, seed=1)
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(b, b2)


def test_split_unpaired_seed_and_errors():
    halves = {tuple(image_sets.split_unpaired(40, seed=s)[0].tolist()) for s in range(5)}
    assert len(halves) > 1
    with pytest.raises(ValueError, match="n >= 2"):
        image_sets.split_unpaired(1)


def test_split_by_case_keeps_cases_whole():
    cases = np.array(["p2", "p1", "p2", "p10", "p1", "p3", "p10", "p3"])
    train, val = image_sets.split_by_case(cases, 2)  # natural order p1 < p2 < p3 < p10
    assert set(cases[val].tolist()) == {"p3", "p10"} and set(cases[train].tolist()) == {"p1", "p2"}
    assert sorted(train.tolist() + val.tolist()) == list(range(len(cases)))
    train, val = image_sets.split_by_case(cases, ["p1"])
    np.testing.assert_array_equal(val, [1, 4])
    np.testing.assert_array_equal(train, [0, 2, 3, 5, 6, 7])
    train, val = image_sets.split_by_case(cases, "p2")
    np.testing.assert_array_equal(val, [0, 2])
    train, val = image_sets.split_by_case(cases, 0)
    assert val.size == 0 and train.size == len(cases)
    with pytest.raises(ValueError, match=r"\['p9'\].*present"):
        image_sets.split_by_case(cases, ["p1", "p9"])
    with pytest.raises(ValueError, match="val_cases=5"):
        image_sets.split_by_case(cases, 5)


def test_split_slice_block_by_hand():
    arrays = {"image": np.arange(6)[:, None] * np.ones((6, 2)), "case": np.array(list("abcdef"))}
    train, val = image_sets.split_slice_block(arrays, (2, 4))
    assert val["case"].tolist() == ["c", "d"] and train["case"].tolist() == ["a", "b", "e", "f"]
    np.testing.assert_array_equal(val["image"][:, 0], [2, 3])
    with pytest.raises(ValueError, match="not inside"):
        image_sets.split_slice_block(arrays, (4, 9))
