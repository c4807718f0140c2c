"""`medjax check`: every shared dataset passes, and a deliberately broken copy of each lists
every problem at once, each naming its file."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medjax.data import paths
from medjax.data.check import check_dataset
from tests.helpers import cpu_env

ROOT = Path(__file__).resolve().parents[2]


def _shared(name: str) -> Path:
    try:
        return paths.data_dir(name)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


# (folder, layout, options) of every dataset in ../shared/data
SHARED = [
    ("brats2015_deepmedic_3d", "deepmedic", {}),
    ("brain_tumor_progression_pgbm001", "dicom", {}),
    ("isbi2012_em_membrane", "folder", {"images": "image", "masks": "label"}),
    ("kvasir_seg_polyps", "folder", {"threshold": 127.0, "channels": 3}),
    ("hc18_fetal_head_ultrasound", "hc18", {}),
    ("medmnist_breastmnist", "medmnist", {}),
    ("medmnist_pneumoniamnist", "medmnist", {}),
]


@pytest.mark.parametrize(("name", "layout", "options"), SHARED, ids=[s[0] for s in SHARED])
def test_every_shared_dataset_passes(name, layout, options):
    report = check_dataset(_shared(name), layout, **options)
    assert report.ok, report.format()
    assert report.rows
    text = report.format()
    assert text.splitlines()[-1].startswith("OK")


def test_broken_brats_lists_every_problem(tmp_path):
    src = _shared("brats2015_deepmedic_3d") / "train"
    root = tmp_path / "brats"
    for case in sorted(src.iterdir())[:2]:
        shutil.copytree(case, root / "train" / case.name)
    a, b = sorted((root / "train").iterdir())
    shutil.copytree(a, root / "train" / "dup_c")
    # a: the FLAIR file cut in half (truncated download); b: no brain mask, a label value 7
    flair = a / "Flair_subtrMeanDivStd.nii.gz"
    flair.write_bytes(flair.read_bytes()[: flair.stat().st_size // 2])
    (b / "brainmask.nii.gz").unlink()
    c = root / "train" / "dup_c"
    img = nib.load(str(c / "OTMultiClass.nii.gz"))
    lab = np.asarray(img.dataobj).copy()
    lab[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(lab, img.affine, img.header), str(c / "OTMultiClass.nii.gz"))
    # c: a T1c of another shape
    t1c = nib.load(str(c / "T1c_subtrMeanDivStd.nii.gz"))
    full = np.asarray(t1c.dataobj)
    nib.save(nib.Nifti1Image(full[:-1], t1c.affine), str(c / "T1c_subtrMeanDivStd.nii.gz"))

    report = check_dataset(root, "deepmedic")
    assert not report.ok
    text = "\n".join(report.errors)
    assert str(flair) in text  # unreadable
    assert f"{b}/brainmask.nii.gz" in text  # missing mask
    assert "T1c_subtrMeanDivStd" in text and "dup_c" in text  # shape mismatch (reported first)
    assert len(report.errors) == 3, report.format()
    assert report.rows == []  # no case could be read
    # the value 7 is found once the shapes agree
    nib.save(nib.Nifti1Image(full, t1c.affine, t1c.header), str(c / "T1c_subtrMeanDivStd.nii.gz"))
    again = check_dataset(root, "deepmedic")
    assert any("OTMultiClass" in e and "7" in e for e in again.errors), again.format()


def test_broken_dicom_series_names_the_gap(tmp_path):
    src = _shared("brain_tumor_progression_pgbm001")
    series = next(p for p in src.iterdir() if "T1post" in p.name)
    dst = tmp_path / "exam" / series.name
    shutil.copytree(series, dst)
    shutil.copytree(series, tmp_path / "exam" / "second")
    (dst / "000010.dcm").unlink()  # a missing slice
    (tmp_path / "exam" / "second" / "000003.dcm").write_bytes(b"DICM" + b"\0" * 40)
    report = check_dataset(tmp_path / "exam", "dicom")
    assert len(report.errors) == 2, report.format()
    assert any(str(dst) in e for e in report.errors)
    assert any("second" in e for e in report.errors)


def test_broken_image_mask_folder_lists_every_file(tmp_path):
    src = _shared("kvasir_seg_polyps")
    root = tmp_path / "kvasir"
    names = sorted(p.name for p in (src / "images").iterdir())[:6]
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
        for n in names:
            shutil.copy(src / sub / n, root / sub / n)
    n0, n1, n2, n3 = (Path(n).stem for n in names[:4])
    # 0/1 mask: empty after the threshold although the file holds non-zero values
    m = np.asarray(Image.open(root / "masks" / names[0]).convert("L")) > 127
    (root / "masks" / names[0]).unlink()
    Image.fromarray(m.astype(np.uint8)).save(root / "masks" / f"{n0}.png")
    # a mask of another size
    Image.open(root / "masks" / names[1]).resize((40, 30)).save(root / "masks" / names[1])
    # a truncated image
    blob = (root / "images" / names[2]).read_bytes()
    (root / "images" / names[2]).write_bytes(blob[: len(blob) // 3])
    report = check_dataset(root, "folder", threshold=127.0, channels=3)
    text = "\n".join(report.errors)
    assert len(report.errors) == 3, report.format()
    for stem in (n0, n1, n2):
        assert stem in text
    assert len(report.rows) == 3  # the three good pairs are still read and counted
    assert n3 in {r["case"] for r in report.rows}


def test_broken_medmnist_and_hc18(tmp_path):
    src = _shared("medmnist_breastmnist")
    with np.load(next(src.glob("*.npz"))) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["val_labels"] = arrays["val_labels"].astype(np.float32) + 0.5
    np.savez(tmp_path / "broken.npz", **arrays)
    report = check_dataset(tmp_path / "broken.npz", "medmnist")
    assert len(report.errors) == 1 and "val_labels" in report.errors[0], report.format()

    hc = _shared("hc18_fetal_head_ultrasound")
    root = tmp_path / "hc18"
    (root / "training_set").mkdir(parents=True)
    shutil.copy(hc / "training_set_pixel_size_and_HC.csv", root)
    for p in sorted((hc / "training_set").iterdir())[:6]:
        shutil.copy(p, root / "training_set" / p.name)
    annotations = sorted((root / "training_set").glob("*_Annotation.png"))
    annotations[0].unlink()
    report = check_dataset(root, "hc18")
    assert not report.ok and annotations[0].name.split("_Annotation")[0] in report.errors[0]


def test_check_command_exits_1_and_prints_every_problem(tmp_path):
    src = _shared("isbi2012_em_membrane")
    root = tmp_path / "isbi"
    shutil.copytree(src / "train", root / "train")
    first = sorted((root / "train" / "label").iterdir())[0]
    first.unlink()  # an image without its mask
    with gzip.open(tmp_path / "junk.gz", "wb") as f:
        f.write(b"not an image")
    shutil.copy(tmp_path / "junk.gz", root / "train" / "image" / "zz.png")
    cmd = [sys.executable, str(ROOT / "scripts" / "check_data.py"), str(root), "--layout",
           "folder", "--images", "image", "--masks", "label"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cpu_env(), timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "error:" in proc.stdout and str(first.name.split(".")[0]) in proc.stdout
    ok = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_data.py"), str(src), "--layout", "folder",
         "--images", "image", "--masks", "label"],
        capture_output=True, text=True, env=cpu_env(), timeout=300,
    )  # fmt: skip
    assert ok.returncode == 0 and ok.stdout.strip().splitlines()[-1].startswith("OK")


@pytest.mark.parametrize("layout", ["pairs", "aligned", "unpaired", "class_folders", "images"])
def test_gan_and_classifier_folders_are_checked_file_by_file(tmp_path, layout):
    from medjax.data import convert, image_sets

    src = _shared("medmnist_breastmnist")
    splits = {s: image_sets.load_medmnist(src, s) for s in ("train", "val")}
    for d in splits.values():
        d["image"], d["label"] = d["image"][:6], d["label"][:6]
    root = tmp_path / layout
    if layout in ("pairs", "aligned", "unpaired"):
        pairs = {s: {"source": d["image"], "target": d["image"][::-1]} for s, d in splits.items()}
        convert.to_pair_folders(pairs, root, layout)
    else:
        convert.to_image_folders(splits, root, by_class=layout == "class_folders")
    clean = check_dataset(root, layout)
    assert clean.ok and len(clean.rows) >= 12, clean.format()
    # one file cut short and one that is not an image at all: two errors naming them
    files = sorted(p for p in root.rglob("*.png"))
    cut, junk = files[0], files[-1]
    cut.write_bytes(cut.read_bytes()[:20])
    junk.write_bytes(b"no image here")
    broken = check_dataset(root, layout)
    text = "\n".join(broken.errors)
    assert not broken.ok and len(broken.errors) == 2, broken.format()
    assert cut.name in text and junk.name in text


def test_nnunet_labels_are_checked_against_dataset_json(tmp_path):
    from medjax.data import convert, volumes

    src = _shared("brats2015_deepmedic_3d") / "train"
    cases = volumes.find_cases(src, "deepmedic")[:1]
    root = convert.to_nnunet(cases, tmp_path / "nn", volumes.BRATS_SPEC)
    clean = check_dataset(root, "nnunet")
    assert clean.ok and len(clean.rows) == 1, clean.format()
    # a label value dataset.json does not declare (BraTS: classes 0..3)
    (label,) = (root / "labelsTr").iterdir()
    img = nib.load(str(label))
    lab = np.asarray(img.dataobj).copy()
    lab[0, 0, 0] = 5
    nib.save(nib.Nifti1Image(lab, img.affine, img.header), str(label))
    broken = check_dataset(root, "nnunet")
    assert len(broken.errors) == 1, broken.format()
    assert str(label) in broken.errors[0] and "[5]" in broken.errors[0]
    assert "[0, 1, 2, 3]" in broken.errors[0]
