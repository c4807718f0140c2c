"""Readers in medjax.data.sources, on the shared real data and on small synthetic folders.

References are computed independently in the tests (PIL/numpy/csv/nibabel/skimage), never from
the readers' own earlier output.
"""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from medjax.data import sources
from medjax.data.paths import data_dir


def _dir_or_skip(name: str) -> Path:
    try:
        return data_dir(name)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def isbi_dir() -> Path:
    return _dir_or_skip("isbi2012_em_membrane")


@pytest.fixture(scope="module")
def kvasir_dir() -> Path:
    return _dir_or_skip("kvasir_seg_polyps")


@pytest.fixture(scope="module")
def hc18_dir() -> Path:
    return _dir_or_skip("hc18_fetal_head_ultrasound")


@pytest.fixture(scope="module")
def isbi_train(isbi_dir: Path) -> list[dict]:
    return sources.load_isbi2012(isbi_dir)


@pytest.fixture(scope="module")
def mni_axial() -> list[dict]:
    return sources.load_mni152_slices(axis=2)


def _check_example_format(ex: dict, channels: int) -> None:
    img, lab = ex["image"], ex["label"]
    assert img.dtype == np.float32 and img.ndim == 3 and img.shape[-1] == channels
    assert 0.0 <= img.min() and img.max() <= 1.0
    assert lab.dtype == np.int32 and lab.shape == img.shape[:2]
    assert ex["spacing"].dtype == np.float32 and ex["spacing"].shape == (2,)
    assert isinstance(ex["id"], str)


# --------------------------------------------------------------------------------------------
# ISBI 2012
# --------------------------------------------------------------------------------------------


def test_isbi_train_matches_files_and_label_convention(isbi_dir: Path, isbi_train: list[dict]):
    files = sorted((isbi_dir / "train" / "image").glob("*.png"), key=lambda p: int(p.stem))
    assert [ex["id"] for ex in isbi_train] == [p.stem for p in files]  # numeric order
    for ex in isbi_train[:3]:
        _check_example_format(ex, 1)
    ex0 = isbi_train[0]
    raw_img = np.asarray(Image.open(isbi_dir / "train" / "image" / "0.png"))
    raw_lab = np.asarray(Image.open(isbi_dir / "train" / "label" / "0.png"))
    np.testing.assert_array_equal(ex0["image"][..., 0], raw_img.astype(np.float32) / 255)
    # membrane (stored as 0) -> class 1, interior (255) -> class 0
    np.testing.assert_array_equal(ex0["label"], (raw_lab == 0).astype(np.int32))
    assert ex0["label"].mean() == pytest.approx(0.22, abs=0.01)  # README: ~78 % interior
    np.testing.assert_array_equal(ex0["spacing"], [1.0, 1.0])


def test_isbi_test_split_has_no_labels(isbi_dir: Path):
    test = sources.load_isbi2012(isbi_dir, split="test")
    n_files = len(list((isbi_dir / "test" / "image").glob("*.png")))
    assert len(test) == n_files > 0
    assert all(ex["label"] is None for ex in test)
    assert test[0]["image"].shape == (512, 512, 1)


def test_isbi_on_copy_with_fewer_cases(isbi_dir: Path, tmp_path: Path):
    for sub in ("image", "label"):
        (tmp_path / "train" / sub).mkdir(parents=True)
        for name in ("3.png", "11.png", "7.png"):
            shutil.copy(isbi_dir / "train" / sub / name, tmp_path / "train" / sub / name)
    exs = sources.load_isbi2012(tmp_path)
    assert [ex["id"] for ex in exs] == ["3", "7", "11"]
    raw = np.asarray(Image.open(tmp_path / "train" / "label" / "11.png"))
    np.testing.assert_array_equal(exs[2]["label"], raw == 0)


# --------------------------------------------------------------------------------------------
# Kvasir-SEG
# --------------------------------------------------------------------------------------------


def test_kvasir_reader_on_shared_data(kvasir_dir: Path):
    exs = sources.load_kvasir_seg(kvasir_dir)
    stems = sorted(p.stem for p in (kvasir_dir / "images").glob("*.jpg"))
    assert sorted(ex["id"] for ex in exs) == stems
    shapes = {ex["image"].shape for ex in exs}
    assert len(shapes) > 1  # original, varying sizes are kept
    fracs = []
    for ex in exs:
        _check_example_format(ex, 3)
        fracs.append(ex["label"].mean())
    assert 0.05 < float(np.median(fracs)) < 0.2  # README: median polyp fraction 10.6 %
    ex = exs[0]
    mask = np.asarray(Image.open(kvasir_dir / "masks" / f"{ex['id']}.jpg").convert("L"))
    np.testing.assert_array_equal(ex["label"], (mask > 127).astype(np.int32))
    rgb = np.asarray(Image.open(kvasir_dir / "images" / f"{ex['id']}.jpg").convert("RGB"))
    np.testing.assert_allclose(ex["image"], rgb / 255.0, atol=1e-6)


def test_kvasir_on_copy_with_fewer_cases_and_transform(kvasir_dir: Path, tmp_path: Path):
    stems = sorted(p.stem for p in (kvasir_dir / "images").glob("*.jpg"))[:2]
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
        for s in stems:
            shutil.copy(kvasir_dir / sub / f"{s}.jpg", tmp_path / sub / f"{s}.jpg")
    calls = []
    exs = sources.load_kvasir_seg(tmp_path, transform=lambda ex: calls.append(ex["id"]) or ex)
    assert [ex["id"] for ex in exs] == stems and sorted(calls) == stems


# --------------------------------------------------------------------------------------------
# HC18
# --------------------------------------------------------------------------------------------


def _ramanujan_perimeter(a: float, b: float) -> float:
    h = ((a - b) / (a + b)) ** 2
    return math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))


def test_hc18_filled_ellipse_and_spacing(hc18_dir: Path):
    from skimage import measure

    exs = sources.load_hc18(hc18_dir)
    names = sorted(
        p.name for p in (hc18_dir / "training_set").glob("*.png") if "Annotation" not in p.name
    )
    assert sorted(ex["id"] + ".png" for ex in exs) == names
    with open(hc18_dir / "training_set_pixel_size_and_HC.csv", newline="") as fh:
        table = {r["filename"]: r for r in csv.DictReader(fh)}
    for ex in exs[:5]:
        _check_example_format(ex, 1)
        row = table[ex["id"] + ".png"]
        ps = float(row["pixel size(mm)"])
        np.testing.assert_allclose(ex["spacing"], [ps, ps], rtol=1e-6)
        assert ex["hc_mm"] == pytest.approx(float(row["head circumference (mm)"]))
        lab = ex["label"].astype(bool)
        outline = np.asarray(Image.open(hc18_dir / "training_set" / f"{ex['id']}_Annotation.png"))
        assert lab[outline > 0].all()  # the outline is part of the head
        np.testing.assert_array_equal(ndimage.binary_fill_holes(lab), lab)  # no holes
        assert ndimage.label(lab)[1] == 1  # one solid region
        assert lab.sum() > 5 * (outline > 0).sum()  # filled, not just the 1-px outline
        # solid ellipse: area matches pi*a*b of its moment ellipse and the perimeter (in mm,
        # using the CSV pixel size) matches the reference head circumference
        props = measure.regionprops(lab.astype(np.uint8))[0]
        a, b = props.axis_major_length / 2, props.axis_minor_length / 2
        assert lab.sum() == pytest.approx(math.pi * a * b, rel=0.02)
        hc = _ramanujan_perimeter(a, b) * ps
        assert hc == pytest.approx(ex["hc_mm"], rel=0.03)


def test_hc18_image_missing_from_csv(hc18_dir: Path, tmp_path: Path):
    src = hc18_dir / "training_set"
    name = sorted(p.name for p in src.glob("*_HC.png"))[0]
    (tmp_path / "training_set").mkdir()
    for n in (name, name.replace(".png", "_Annotation.png")):
        shutil.copy(src / n, tmp_path / "training_set" / n)
    csv_path = tmp_path / "sizes.csv"
    csv_path.write_text("filename,pixel size(mm),head circumference (mm)\nother_HC.png,0.1,50.0\n")
    with pytest.raises(ValueError, match=name):
        sources.load_hc18(tmp_path, csv_path=csv_path)
    csv_path.write_text(f"filename,pixel size(mm),head circumference (mm)\n{name},0.25,60.5\n")
    (ex,) = sources.load_hc18(tmp_path, csv_path=csv_path)
    np.testing.assert_allclose(ex["spacing"], [0.25, 0.25])
    assert ex["hc_mm"] == 60.5


# --------------------------------------------------------------------------------------------
# MNI152 embedded default
# --------------------------------------------------------------------------------------------


def test_mni152_three_classes_and_real_anatomy(mni_axial: list[dict]):
    import nibabel as nib

    assert len(mni_axial) > 100
    for ex in mni_axial[::40]:
        _check_example_format(ex, 1)
        assert ex["id"] == f"mni152_axis2_{ex['slice_index']}"
        assert (ex["label"] > 0).any()
    np.testing.assert_array_equal(mni_axial[0]["spacing"], [1.0, 1.0])
    mid = min(mni_axial, key=lambda ex: abs(ex["slice_index"] - 95))
    assert mid["image"].shape == (197, 233, 1)
    assert set(np.unique(mid["label"])) == {0, 1, 2}
    img, lab = mid["image"][..., 0], mid["label"]
    # T1 contrast: white matter brighter than grey matter, both far brighter than the air
    wm, gm = img[lab == 2].mean(), img[lab == 1].mean()
    assert wm > gm + 0.05 and gm > 0.2 and img[:5, :5].mean() < 0.05
    frac_gm, frac_wm = (lab == 1).mean(), (lab == 2).mean()
    assert 0.05 < frac_gm < 0.4 and 0.05 < frac_wm < 0.4
    # labels recomputed independently from the NIfTI files
    folder = sources.mni152_data_dir()
    gm_v = np.asarray(nib.load(folder / sources.MNI152_FILES["gm"]).dataobj)[:, :, 95]
    wm_v = np.asarray(nib.load(folder / sources.MNI152_FILES["wm"]).dataobj)[:, :, 95]
    t1_v = np.asarray(nib.load(folder / sources.MNI152_FILES["t1"]).dataobj)[:, :, 95]
    ref = np.zeros(gm_v.shape, np.int32)
    ref[(gm_v / 255 > 0.5) & (gm_v >= wm_v)] = 1
    ref[(wm_v / 255 > 0.5) & (wm_v > gm_v)] = 2
    ex95 = next(ex for ex in mni_axial if ex["slice_index"] == 95)
    np.testing.assert_array_equal(ex95["label"], ref)
    np.testing.assert_allclose(ex95["image"][..., 0], t1_v / 255.0, atol=1e-7)
    # top/bottom slices of the volume contain no brain and are dropped
    idx = [ex["slice_index"] for ex in mni_axial]
    assert 0 not in idx and 188 not in idx


def test_mni152_axis_step_downsample(mni_axial: list[dict]):
    from skimage.measure import block_reduce

    sag = sources.load_mni152_slices(axis=0, step=10, downsample=2)
    assert all(ex["slice_index"] % 10 == 0 for ex in sag)
    ex = next(e for e in sag if e["slice_index"] == 100)
    assert ex["image"].shape == (233 // 2, 189 // 2, 1)
    np.testing.assert_array_equal(ex["spacing"], [2.0, 2.0])
    full = sources.load_mni152_slices(axis=0, step=100)
    ref_full = next(e for e in full if e["slice_index"] == 100)
    ref_img = block_reduce(ref_full["image"][:232, :188, 0], (2, 2), np.mean)
    np.testing.assert_allclose(ex["image"][..., 0], ref_img, atol=1e-6)
    # label of each 2x2 block is one of the labels inside that block (mode)
    blocks = ref_full["label"][:232, :188].reshape(116, 2, 94, 2).transpose(0, 2, 1, 3)
    ok = (blocks.reshape(116, 94, 4) == ex["label"][..., None]).any(-1)
    assert ok.all()
    uniform = (blocks.reshape(116, 94, 4) == blocks[..., :1, :1].reshape(116, 94, 1)).all(-1)
    np.testing.assert_array_equal(ex["label"][uniform], blocks[..., 0, 0][uniform])


def test_split_examples(mni_axial: list[dict]):
    train, val = sources.split_examples(mni_axial, lambda ex: ex["slice_index"] % 5 == 0)
    assert all(ex["slice_index"] % 5 == 0 for ex in val)
    assert all(ex["slice_index"] % 5 != 0 for ex in train)
    assert len(train) + len(val) == len(mni_axial)
    items = [{"id": str(i)} for i in range(50)]
    t1, v1 = sources.split_examples(items, 0.2, seed=3)
    t2, v2 = sources.split_examples(items, 0.2, seed=3)
    _, v3 = sources.split_examples(items, 0.2, seed=4)
    assert [e["id"] for e in v1] == [e["id"] for e in v2] and len(v1) == 10
    assert [e["id"] for e in v1] != [e["id"] for e in v3]
    assert sorted(int(e["id"]) for e in t1 + v1) == list(range(50))
    assert [int(e["id"]) for e in t1] == sorted(int(e["id"]) for e in t1)  # order kept
    assert len(sources.split_examples(items[:3], 0.01)[1]) == 1
    with pytest.raises(ValueError):
        sources.split_examples(items, 1.0)


# --------------------------------------------------------------------------------------------
# error paths (synthetic folders)
# --------------------------------------------------------------------------------------------


def _write_isbi(root: Path, n: int = 2, size: tuple[int, int] = (16, 16)) -> None:
    rng = np.random.default_rng(0)
    for sub in ("image", "label"):
        (root / "train" / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.integers(0, 256, size, dtype=np.uint8)
        lab = np.where(rng.random(size) < 0.3, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "train" / "image" / f"{i}.png")
        Image.fromarray(lab).save(root / "train" / "label" / f"{i}.png")


def test_missing_directory(tmp_path: Path):
    missing = tmp_path / "nope"
    for fn in (sources.load_isbi2012, sources.load_kvasir_seg, sources.load_hc18):
        with pytest.raises(FileNotFoundError, match="nope"):
            fn(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        sources.load_mni152_slices(directory=missing)


def test_isbi_synthetic_ok(tmp_path: Path):
    _write_isbi(tmp_path, n=3)
    exs = sources.load_isbi2012(tmp_path)
    raw = np.asarray(Image.open(tmp_path / "train" / "label" / "2.png"))
    assert len(exs) == 3
    np.testing.assert_array_equal(exs[2]["label"], (raw == 0).astype(np.int32))


def test_error_image_without_mask(tmp_path: Path):
    _write_isbi(tmp_path)
    (tmp_path / "train" / "label" / "1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1\.png"):
        sources.load_isbi2012(tmp_path)


def test_error_shape_mismatch(tmp_path: Path):
    _write_isbi(tmp_path)
    Image.fromarray(np.zeros((16, 20), np.uint8)).save(tmp_path / "train" / "label" / "1.png")
    with pytest.raises(ValueError) as info:
        sources.load_isbi2012(tmp_path)
    msg = str(info.value)
    assert "image" in msg and "1.png" in msg and "(16, 16)" in msg and "(16, 20)" in msg
    assert str(tmp_path / "train" / "label" / "1.png") in msg


def test_error_bad_label_values(tmp_path: Path):
    _write_isbi(tmp_path)
    lab = np.full((16, 16), 255, np.uint8)
    lab[3, 3] = 128
    Image.fromarray(lab).save(tmp_path / "train" / "label" / "0.png")
    with pytest.raises(ValueError, match=r"label.*0\.png.*128"):
        sources.load_isbi2012(tmp_path)


def test_error_truncated_png(tmp_path: Path):
    _write_isbi(tmp_path, size=(64, 64))
    path = tmp_path / "train" / "image" / "1.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"1\.png"):
        sources.load_isbi2012(tmp_path)
    path.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"1\.png"):
        sources.load_isbi2012(tmp_path)


def test_error_kvasir_missing_mask_and_mismatch(tmp_path: Path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "a.jpg")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "b.jpg")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "masks" / "a.jpg")
    with pytest.raises(FileNotFoundError, match=r"b\.jpg"):
        sources.load_kvasir_seg(tmp_path)
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(tmp_path / "masks" / "b.jpg")
    with pytest.raises(ValueError, match=r"b\.jpg.*\(8, 8\).*b\.jpg.*\(9, 8\)"):
        sources.load_kvasir_seg(tmp_path)


def test_error_hc18_missing_annotation(tmp_path: Path):
    (tmp_path / "training_set").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "training_set" / "000_HC.png")
    (tmp_path / "training_set_pixel_size_and_HC.csv").write_text(
        "filename,pixel size(mm),head circumference (mm)\n000_HC.png,0.1,50\n"
    )
    with pytest.raises(FileNotFoundError, match=r"000_HC\.png"):
        sources.load_hc18(tmp_path)
