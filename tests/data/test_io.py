"""medjax.data.io on real BraTS NIfTI / TCIA DICOM data and on small synthetic files.

References are independent of the code under test: nibabel / pydicom used directly, numpy flips
and transposes derived by hand from the affines, world positions computed by hand from the
DICOM tags, voxel counts from the dataset README.
"""

from __future__ import annotations

import math
import os
import pickle
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medjax.data import io
from medjax.data.paths import data_dir

BRATS_CASE = "validation/brats_2013_pat0003_1"
BRATS_COUNTS = (8754072, 1252, 148264, 3162, 21250)  # README: pat0003 voxels per label 0..4
PGBM_SERIES = (
    "34907-T1prereg-43695",
    "11-T1post-80644",
    "37908-T2reg-21119",
    "35623-FLAIRreg-79237",
    "5388-MaskTumor-63335",
)
MASK_SERIES = "5388-MaskTumor-63335"
T1_SERIES = "34907-T1prereg-43695"


def _dir_or_skip(name: str) -> Path:
    try:
        return data_dir(name)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def _world(affine: np.ndarray, ijk: tuple[float, float, float]) -> np.ndarray:
    return (np.asarray(affine) @ np.array([*ijk, 1.0]))[:3]


# --------------------------------------------------------------------------------------------
# fixtures: every real volume is read once per module
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def brats_dir() -> Path:
    return _dir_or_skip("brats2015_deepmedic_3d") / BRATS_CASE


@pytest.fixture(scope="module")
def raw_label(brats_dir: Path) -> nib.Nifti1Image:
    """OTMultiClass read by plain nibabel, data cached in memory."""
    img = nib.load(str(brats_dir / "OTMultiClass.nii.gz"))
    img.get_fdata()  # cache once
    return img


@pytest.fixture(scope="module")
def label(brats_dir: Path) -> tuple[np.ndarray, io.Geometry]:
    return io.read_nifti(brats_dir / "OTMultiClass.nii.gz", dtype=np.int32)


@pytest.fixture(scope="module")
def pgbm_dir() -> Path:
    return _dir_or_skip("brain_tumor_progression_pgbm001")


@pytest.fixture(scope="module")
def dicom_series(pgbm_dir: Path) -> dict[str, tuple[np.ndarray, io.Geometry]]:
    return {s: io.read_dicom_series(pgbm_dir / s, canonical=False) for s in PGBM_SERIES}


def _pydicom_slices(folder: Path) -> list[tuple[Path, pydicom.Dataset]]:
    """Reference ordering: all .dcm files sorted by InstanceNumber (independent of the reader)."""
    items = [(p, pydicom.dcmread(p)) for p in sorted(folder.glob("*.dcm"))]
    return sorted(items, key=lambda t: int(t[1].InstanceNumber))


@pytest.fixture(scope="module")
def mask_reference(pgbm_dir: Path) -> list[tuple[Path, pydicom.Dataset]]:
    return _pydicom_slices(pgbm_dir / MASK_SERIES)


def _hand_world(ds: pydicom.Dataset, i: float, j: float) -> np.ndarray:
    """RAS position of column i, row j of a slice: LPS IPP + i*dc*row_cos + j*dr*col_cos."""
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    dr, dc = (float(v) for v in ds.PixelSpacing)  # (between rows, between columns)
    lps = np.array(ds.ImagePositionPatient, dtype=float) + i * dc * iop[:3] + j * dr * iop[3:]
    return lps * np.array([-1.0, -1.0, 1.0])


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def test_voxel_spacing_and_orientation_codes_by_hand():
    aff = np.array(
        [[0.0, 0.0, -3.0, 5.0], [2.0, 0.0, 0.0, 1.0], [0.0, -1.5, 0.0, 0.0], [0, 0, 0, 1]]
    )
    assert io.voxel_spacing(aff) == (2.0, 1.5, 3.0)
    assert io.orientation_codes(aff) == "AIL"
    assert io.orientation_codes(np.diag([-1.0, -1.0, 1.0, 1.0])) == "LPS"
    assert io.orientation_codes(np.eye(4)) == "RAS"
    with pytest.raises(ValueError, match="degenerate"):
        io.orientation_codes(np.diag([1.0, 0.0, 1.0, 1.0]))


def test_check_finite_names_file_and_count():
    arr = np.zeros((4, 4, 4), np.float32)
    io.check_finite(arr, "ok.nii.gz")
    arr[0, 0, 0] = np.nan
    arr[1, 2, 3] = np.inf
    arr[3, 3, 3] = -np.inf
    with pytest.raises(ValueError, match=r"case7\.nii\.gz: 3 of 64 voxels are not finite"):
        io.check_finite(arr, "case7.nii.gz")
    io.check_finite(np.ones((2, 2, 2), np.int16), "labels.nii.gz")


def test_geometry_identity_pickle_and_validation():
    g = io.Geometry.identity((7, 9, 5), spacing=(0.5, 2.0, 3.0))
    np.testing.assert_array_equal(g.affine, np.diag([0.5, 2.0, 3.0, 1.0]))
    assert g.shape == g.original_shape == (7, 9, 5)
    assert g.spacing == (0.5, 2.0, 3.0)
    assert g.codes == "RAS"
    g2 = pickle.loads(pickle.dumps(g))
    assert g2 == g and g2.shape == (7, 9, 5)
    assert not g.affine.flags.writeable
    with pytest.raises(ValueError, match="spacing"):
        io.Geometry.identity((7, 9, 5), spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        io.Geometry(
            affine=np.eye(4),
            shape=(7, 9, 6),
            spacing=(1.0, 1.0, 1.0),
            original_affine=np.eye(4),
            original_shape=(7, 9, 5),
            ornt=np.array([[0, 1], [1, 1], [2, 1]]),
        )


# --------------------------------------------------------------------------------------------
# NIfTI: real BraTS
# --------------------------------------------------------------------------------------------


def test_read_nifti_brats_label_is_flipped_raw(label, raw_label):
    arr, geom = label
    raw = np.asanyarray(raw_label.dataobj)  # float32, LPS per the README
    assert arr.dtype == np.int32 and arr.shape == (240, 240, 155) and arr.flags.c_contiguous
    # LPS -> RAS: flip axes 0 and 1 (hand-derived from diag(-1, -1, 1)).
    np.testing.assert_array_equal(arr, np.flip(raw, (0, 1)).astype(np.int32))
    assert geom.shape == geom.original_shape == (240, 240, 155)
    assert geom.spacing == (1.0, 1.0, 1.0)
    assert (geom.codes, geom.original_codes) == ("RAS", "LPS")
    np.testing.assert_array_equal(geom.original_affine, raw_label.affine)
    # world x = -(239 - i) = i - 239, y = -(239 - j) + 239 = j, z = k
    hand = np.array([[1, 0, 0, -239], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    np.testing.assert_allclose(geom.affine, hand)
    for i, j, k in [(0, 0, 0), (10, 200, 77), (239, 239, 154), (120, 5, 3)]:
        np.testing.assert_allclose(
            _world(geom.affine, (i, j, k)), _world(raw_label.affine, (239 - i, 239 - j, k))
        )
        assert arr[i, j, k] == raw[239 - i, 239 - j, k]


def test_read_nifti_brats_label_values_match_readme(label):
    arr, _ = label
    assert set(np.unique(arr).tolist()) == {0, 1, 2, 3, 4}
    assert tuple(np.bincount(arr.ravel(), minlength=5).tolist()) == BRATS_COUNTS


def test_read_nifti_brats_flair_float_and_non_canonical(brats_dir: Path, label):
    path = brats_dir / "Flair_subtrMeanDivStd.nii.gz"
    raw_img = nib.load(str(path))
    raw = np.asanyarray(raw_img.dataobj)
    arr, geom = io.read_nifti(path, canonical=False, dtype=None)  # nibabel's own dtype/layout
    assert arr.dtype == raw.dtype == np.float32
    np.testing.assert_array_equal(arr, raw)
    np.testing.assert_array_equal(geom.affine, raw_img.affine)
    assert geom.codes == "LPS"
    np.testing.assert_array_equal(geom.ornt, [[0, 1], [1, 1], [2, 1]])
    # canonical float read, rebuilt from the non-canonical array by hand
    can, can_geom = io.read_nifti(path)
    assert can.dtype == np.float32
    np.testing.assert_array_equal(can, np.flip(raw, (0, 1)))
    assert can_geom == label[1]  # all volumes of a case share one grid


def test_read_nifti_brainmask_rounds_not_truncates(brats_dir: Path):
    path = brats_dir / "brainmask.nii.gz"
    raw = np.asanyarray(nib.load(str(path)).dataobj)  # scaled int32 -> float64 0.99999997
    assert raw.dtype == np.float64 and 0.999 < raw.max() < 1.0  # the case this guards against
    mask, _ = io.read_nifti(path, dtype=np.uint8)
    assert mask.dtype == np.uint8
    expected = np.flip(raw > 0.5, (0, 1)).astype(np.uint8)
    np.testing.assert_array_equal(mask, expected)
    assert mask.max() == 1 and raw.astype(np.uint8).max() == 0  # truncation would lose it all


def test_write_nifti_brats_label_round_trip(label, raw_label, tmp_path: Path):
    arr, geom = label
    out = io.write_nifti(tmp_path / "pred.nii.gz", arr, geom)
    assert out == tmp_path / "pred.nii.gz"
    assert os.listdir(tmp_path) == ["pred.nii.gz"]  # no temp file left behind
    img = nib.load(str(out))
    assert img.shape == raw_label.shape
    np.testing.assert_allclose(img.affine, raw_label.affine)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), np.asanyarray(raw_label.dataobj))
    assert img.get_data_dtype() == np.uint8
    assert (img.dataobj.slope, img.dataobj.inter) == (1.0, 0.0)
    hdr, ref = img.header, raw_label.header
    assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == (
        int(ref["qform_code"]),
        int(ref["sform_code"]),
    )
    np.testing.assert_allclose(img.get_qform(), raw_label.affine)
    np.testing.assert_allclose(img.get_sform(), raw_label.affine)
    assert hdr.get_xyzt_units() == ref.get_xyzt_units()


# --------------------------------------------------------------------------------------------
# NIfTI: synthetic oblique, permuted, flipped, anisotropic
# --------------------------------------------------------------------------------------------


def _oblique_affine() -> np.ndarray:
    """Original axis 0 -> Inferior (0.8 mm), 1 -> Right (1.5 mm), 2 -> Posterior (3 mm), then a
    10 degree rotation about the world z axis and an offset."""
    t = math.radians(10.0)
    rot = np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])
    lin = np.zeros((3, 3))
    lin[:, 0] = (0.0, 0.0, -0.8)
    lin[:, 1] = (1.5, 0.0, 0.0)
    lin[:, 2] = (0.0, -3.0, 0.0)
    aff = np.eye(4)
    aff[:3, :3] = rot @ lin
    aff[:3, 3] = (-12.5, 30.0, 7.25)
    return aff


def _save_nibabel(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def _hand_canonical(orig: np.ndarray) -> np.ndarray:
    """Canonical axes: R = original 1, A = flipped original 2, S = flipped original 0."""
    return np.flip(np.moveaxis(orig, (1, 2, 0), (0, 1, 2)), (1, 2))


def test_oblique_synthetic_read_and_round_trip(tmp_path: Path):
    aff = _oblique_affine()
    orig = np.arange(7 * 9 * 5, dtype=np.float32).reshape(7, 9, 5)
    src = tmp_path / "oblique.nii"
    _save_nibabel(src, orig, aff)

    arr, geom = io.read_nifti(src)
    assert arr.shape == geom.shape == (9, 5, 7)
    np.testing.assert_array_equal(arr, _hand_canonical(orig))
    np.testing.assert_allclose(geom.spacing, (1.5, 3.0, 0.8), rtol=1e-6)
    assert (geom.codes, geom.original_codes) == ("RAS", "IRP")
    # nibabel's own reorientation agrees
    ref = nib.as_closest_canonical(nib.load(str(src)))
    np.testing.assert_array_equal(arr, np.asanyarray(ref.dataobj))
    np.testing.assert_allclose(geom.affine, ref.affine, atol=1e-6)
    # canonical voxel (a, b, c) = original voxel (6 - c, a, 4 - b): same world point
    for a, b, c in [(0, 0, 0), (8, 4, 6), (3, 1, 5)]:
        np.testing.assert_allclose(
            _world(geom.affine, (a, b, c)), _world(aff, (6 - c, a, 4 - b)), atol=1e-5
        )

    for name, data in [("back.nii", arr), ("back_int.nii.gz", arr.astype(np.int64))]:
        out = io.write_nifti(tmp_path / name, data, geom)
        img = nib.load(str(out))
        assert img.shape == (7, 9, 5)
        np.testing.assert_allclose(img.affine, aff, atol=1e-5)
        np.testing.assert_array_equal(np.asanyarray(img.dataobj), orig)
        assert (int(img.header["qform_code"]), int(img.header["sform_code"])) == (1, 1)
    assert nib.load(str(tmp_path / "back_int.nii.gz")).get_data_dtype() == np.int16  # 0..314
    assert sorted(os.listdir(tmp_path)) == ["back.nii", "back_int.nii.gz", "oblique.nii"]


def test_4d_channels_reoriented_spatially_and_round_trip(tmp_path: Path):
    aff = _oblique_affine()
    rng = np.random.default_rng(0)
    orig = rng.normal(size=(7, 9, 5, 3)).astype(np.float32)
    src = tmp_path / "multi.nii.gz"
    _save_nibabel(src, orig, aff)

    arr, geom = io.read_nifti(src)
    assert arr.shape == (9, 5, 7, 3) and geom.shape == (9, 5, 7)
    for ch in range(3):
        np.testing.assert_array_equal(arr[..., ch], _hand_canonical(orig[..., ch]))

    out = io.write_nifti(tmp_path / "multi_back.nii.gz", arr, geom)
    img = nib.load(str(out))
    assert img.shape == (7, 9, 5, 3)
    np.testing.assert_allclose(img.affine, aff, atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), orig)

    # a 3D prediction on the grid of a 4D input is written as 3D in the input's layout
    pred = (arr[..., 0] > 0).astype(np.uint8)
    img = nib.load(str(io.write_nifti(tmp_path / "pred.nii.gz", pred, geom)))
    assert img.shape == (7, 9, 5) and img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), (orig[..., 0] > 0).astype(np.uint8))


def test_read_nifti_integer_dtype_rounds_and_rejects_nan(tmp_path: Path):
    data = np.zeros((3, 3, 3), np.float32)
    data[0, 0, 0], data[1, 1, 1], data[2, 2, 2], data[0, 1, 2] = 2.9999, 1.0000001, -0.4, 4.5
    _save_nibabel(tmp_path / "lab.nii.gz", data, np.eye(4))
    arr, _ = io.read_nifti(tmp_path / "lab.nii.gz", dtype=np.int16)
    assert arr.dtype == np.int16
    assert (arr[0, 0, 0], arr[1, 1, 1], arr[2, 2, 2], arr[0, 1, 2]) == (3, 1, 0, 4)  # half->even
    data[1, 0, 0] = np.nan
    _save_nibabel(tmp_path / "nan.nii.gz", data, np.eye(4))
    with pytest.raises(ValueError, match=r"nan\.nii\.gz.*1 voxels are NaN"):
        io.read_nifti(tmp_path / "nan.nii.gz", dtype=np.int16)
    farr, _ = io.read_nifti(tmp_path / "nan.nii.gz")  # float: left to the caller
    with pytest.raises(ValueError, match=r"nan\.nii\.gz: 1 of 27"):
        io.check_finite(farr, tmp_path / "nan.nii.gz")


# --------------------------------------------------------------------------------------------
# NIfTI: errors, overwrite, atomic write
# --------------------------------------------------------------------------------------------


def test_read_nifti_missing_truncated_and_not_nifti(brats_dir: Path, tmp_path: Path):
    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        io.read_nifti(missing)
    blob = (brats_dir / "OTMultiClass.nii.gz").read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"truncated\.nii\.gz.*truncated"):
        io.read_nifti(truncated)
    rng = np.random.default_rng(1)
    for name in ("random.nii.gz", "random.nii"):
        (tmp_path / name).write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        with pytest.raises(ValueError, match=rf"{name}.*not a NIfTI file"):
            io.read_nifti(tmp_path / name)


def test_write_nifti_refuses_overwrite_and_checks_shape(tmp_path: Path):
    geom = io.Geometry.identity((4, 5, 6), spacing=(1.0, 2.0, 3.0))
    target = tmp_path / "seg.nii.gz"
    target.write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="seg.nii.gz"):
        io.write_nifti(target, np.zeros((4, 5, 6), np.uint8), geom)
    assert target.read_bytes() == b"user data"
    io.write_nifti(target, np.ones((4, 5, 6), np.uint8), geom, overwrite=True)
    img = nib.load(str(target))
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), np.ones((4, 5, 6)))
    np.testing.assert_allclose(img.affine, np.diag([1.0, 2.0, 3.0, 1.0]))

    with pytest.raises(ValueError, match=r"bad\.nii\.gz.*\(4, 6, 5\).*\(4, 5, 6\)"):
        io.write_nifti(tmp_path / "bad.nii.gz", np.zeros((4, 6, 5)), geom)
    with pytest.raises(ValueError, match="non-integer"):
        io.write_nifti(tmp_path / "prob.nii.gz", np.full((4, 5, 6), 0.3), geom, dtype=np.uint8)
    with pytest.raises(ValueError, match=r"\.nii or \.nii\.gz"):
        io.write_nifti(tmp_path / "seg.png", np.zeros((4, 5, 6)), geom)
    assert os.listdir(tmp_path) == ["seg.nii.gz"]


def test_write_nifti_is_atomic_when_the_writer_crashes(tmp_path: Path, monkeypatch):
    geom = io.Geometry.identity((4, 5, 6))
    target = tmp_path / "seg.nii.gz"
    target.write_bytes(b"previous result")

    def crash(self, filename, **kwargs):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(nib.Nifti1Image, "to_filename", crash)
    with pytest.raises(OSError, match="disk full"):
        io.write_nifti(target, np.zeros((4, 5, 6), np.uint8), geom, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        io.write_nifti(tmp_path / "new.nii", np.zeros((4, 5, 6), np.uint8), geom)
    assert os.listdir(tmp_path) == ["seg.nii.gz"]  # no partial target, no temp file
    assert target.read_bytes() == b"previous result"


# --------------------------------------------------------------------------------------------
# DICOM: real TCIA exam
# --------------------------------------------------------------------------------------------


def test_dicom_file_names_are_not_anatomical(mask_reference):
    by_name = sorted(mask_reference, key=lambda t: t[0].name)
    assert [p for p, _ in by_name] != [p for p, _ in mask_reference]  # the test is meaningful
    z = [float(ds.ImagePositionPatient[2]) for _, ds in mask_reference]
    assert z == sorted(z)  # InstanceNumber order is also ascending in IPP z (README)


def test_dicom_mask_volume_order_values_and_counts(dicom_series, mask_reference):
    vol, geom = dicom_series[MASK_SERIES]
    assert vol.shape == geom.original_shape == (260, 320, 24)  # (columns, rows, slices)
    expected = np.stack([ds.pixel_array.T for _, ds in mask_reference], axis=2)
    np.testing.assert_array_equal(vol, expected)
    assert vol.dtype == np.float32
    assert set(np.unique(vol).tolist()) == {0.0, 1.0}
    assert int((vol == 1).sum()) == 6809
    assert int(np.count_nonzero(vol.any(axis=(0, 1)))) == 8


def test_dicom_affine_matches_hand_computed_positions(dicom_series, mask_reference):
    _, geom = dicom_series[MASK_SERIES]
    np.testing.assert_allclose(io.voxel_spacing(geom.original_affine), (0.6875, 0.6875, 6.5))
    assert float(mask_reference[0][1].SliceThickness) == 5.0  # not what the spacing comes from
    for i, j, k in [(0, 0, 0), (259, 0, 5), (0, 319, 11), (130, 160, 23), (17, 301, 14)]:
        np.testing.assert_allclose(
            _world(geom.original_affine, (i, j, k)),
            _hand_world(mask_reference[k][1], i, j),
            atol=1e-3,
        )


def test_dicom_canonical_matches_nibabel_reorientation(pgbm_dir: Path, dicom_series):
    orig, geom0 = dicom_series[T1_SERIES]
    arr, geom = io.read_dicom_series(pgbm_dir / T1_SERIES)
    ref = nib.as_closest_canonical(nib.Nifti1Image(orig, geom0.original_affine))
    np.testing.assert_array_equal(arr, np.asanyarray(ref.dataobj))
    np.testing.assert_allclose(geom.affine, ref.affine, atol=1e-6)
    assert (geom.original_codes, geom.codes) == ("LPS", "RAS")
    np.testing.assert_array_equal(arr, np.flip(orig, (0, 1)))  # hand: L->R and P->A flips


def test_dicom_all_series_share_one_grid(dicom_series):
    vols = list(dicom_series.values())
    _, g0 = vols[0]
    for vol, g in vols[1:]:
        assert vol.shape == (260, 320, 24) and g.original_shape == g0.original_shape
        np.testing.assert_allclose(g.original_affine, g0.original_affine, atol=1e-3)
    assert [float(v.max()) for v, _ in vols] == [2175.0, 2505.0, 1820.0, 1934.0, 1.0]


def _copy_slices(reference, indices, dest: Path, names=None) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for n, idx in enumerate(indices):
        name = names[n] if names else f"s{n}.dcm"
        shutil.copyfile(reference[idx][0], dest / name)
        out.append(dest / name)
    return out


def test_dicom_rescale_applied_and_non_dicom_skipped(pgbm_dir: Path, tmp_path: Path):
    ref = _pydicom_slices(pgbm_dir / T1_SERIES)
    folder = tmp_path / "rescaled"
    # anatomical slices 3, 4, 5 under names that sort the other way round
    paths = _copy_slices(ref, [3, 4, 5], folder, names=["c.dcm", "b.dcm", "a.dcm"])
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.RescaleSlope, ds.RescaleIntercept = 2, -10
        ds.PixelSpacing = [0.6, 0.9]  # (between rows, between columns): catches a swap
        ds.save_as(p)
    (folder / "README").write_text("not a DICOM file\n")
    vol, geom = io.read_dicom_series(folder, canonical=False, dtype=None)
    assert vol.dtype == np.float64 and vol.shape == (260, 320, 3)
    for k, idx in enumerate([3, 4, 5]):
        expected = 2.0 * ref[idx][1].pixel_array.T.astype(np.float64) - 10.0
        np.testing.assert_array_equal(vol[:, :, k], expected)
    assert io.voxel_spacing(geom.original_affine) == pytest.approx((0.9, 0.6, 6.5), rel=1e-5)
    for i, j, k in [(5, 7, 0), (259, 0, 1), (0, 319, 2)]:
        ds = pydicom.dcmread(folder / ["c.dcm", "b.dcm", "a.dcm"][k])
        np.testing.assert_allclose(
            _world(geom.original_affine, (i, j, k)), _hand_world(ds, i, j), atol=1e-3
        )


def test_dicom_errors(pgbm_dir: Path, tmp_path: Path):
    t1 = _pydicom_slices(pgbm_dir / T1_SERIES)
    mask = _pydicom_slices(pgbm_dir / MASK_SERIES)

    two = tmp_path / "two"
    _copy_slices(t1, [0, 1], two, names=["t1a.dcm", "t1b.dcm"])
    _copy_slices(mask, [0, 1], two, names=["ma.dcm", "mb.dcm"])
    with pytest.raises(ValueError, match="2 DICOM series") as info:
        io.read_dicom_series(two)
    assert str(t1[0][1].SeriesInstanceUID) in str(info.value)
    assert str(mask[0][1].SeriesInstanceUID) in str(info.value)

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no DICOM image files"):
        io.read_dicom_series(tmp_path / "empty")
    (tmp_path / "readme_only").mkdir()
    (tmp_path / "readme_only" / "README.md").write_text("hello")
    with pytest.raises(ValueError, match="no DICOM image files"):
        io.read_dicom_series(tmp_path / "readme_only")
    with pytest.raises(FileNotFoundError, match="missing"):
        io.read_dicom_series(tmp_path / "missing")

    gap = tmp_path / "gap"  # slice 2 missing: gaps 6.5 and 13 mm
    _copy_slices(t1, [0, 1, 3], gap)
    with pytest.raises(ValueError, match="non-uniform slice spacing"):
        io.read_dicom_series(gap)

    odd = tmp_path / "odd"
    paths = _copy_slices(t1, [0, 1, 2], odd)
    ds = pydicom.dcmread(paths[1])
    ds.PixelSpacing = [0.9, 0.9]
    ds.save_as(paths[1])
    with pytest.raises(ValueError, match=r"s1\.dcm has PixelSpacing"):
        io.read_dicom_series(odd)


def test_write_nifti_of_dicom_volume_lands_on_dicom_positions(
    pgbm_dir: Path, mask_reference, tmp_path: Path
):
    arr, geom = io.read_dicom_series(pgbm_dir / MASK_SERIES, dtype=np.uint8)
    out = io.write_nifti(tmp_path / "mask.nii.gz", arr, geom)
    img = nib.load(str(out))
    assert img.shape == (260, 320, 24) and img.get_data_dtype() == np.uint8
    assert (int(img.header["qform_code"]), int(img.header["sform_code"])) == (1, 1)
    np.testing.assert_allclose(img.get_qform(), img.get_sform(), atol=1e-4)
    data = np.asanyarray(img.dataobj)
    assert int(data.sum()) == 6809
    for i, j, k in [(0, 0, 0), (259, 319, 23), (100, 150, 12), (40, 10, 7)]:
        np.testing.assert_allclose(
            _world(img.affine, (i, j, k)), _hand_world(mask_reference[k][1], i, j), atol=1e-3
        )
    # voxel values follow the DICOM pixels: file voxel (i, j, k) = pixel (row j, column i)
    k_tumour = [k for k, (_, ds) in enumerate(mask_reference) if ds.pixel_array.any()]
    for k in k_tumour[:3]:
        np.testing.assert_array_equal(data[:, :, k], mask_reference[k][1].pixel_array.T)
