"""Every general layout end to end on real data arranged in temporary folders: train its config
(smoke sizes), evaluate on a folder the run never saw, predict / sample, and where a
dataset-specific path exists, the same data through both paths gives the same numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medjax.configs import (
    classifier_folder,
    classifier_medmnist,
    cyclegan_folder,
    dcgan_folder,
    dcgan_medmnist,
    isbi2012,
    pix2pix_folder,
    segmentation_folder,
    unet3d_brats,
    unet3d_nnunet,
)
from medjax.data import convert, image_sets, volumes
from medjax.data.paths import data_dir
from medjax.train import evaluate, loop
from tests.data import test_volumes as tv
from tests.helpers import cpu_env, tcia_pair_splits

ROOT = Path(__file__).resolve().parents[2]


def _dir(name: str) -> Path:
    try:
        return data_dir(name)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def _close(a: dict, b: dict, keys, rtol=1e-6):
    for k in keys:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=1e-7, err_msg=k)


# ---------------------------------------------------------------------------------------------
# 2D segmentation: any image/mask folder pair
# ---------------------------------------------------------------------------------------------


def _isbi_as_nnunet_2d(dst: Path, ids) -> Path:
    isbi = _dir("isbi2012_em_membrane")
    for sub in ("imagesTr", "labelsTr"):
        (dst / sub).mkdir(parents=True)
    for i in ids:
        (dst / "imagesTr" / f"em_{i:03d}_0000.png").symlink_to(isbi / f"train/image/{i}.png")
        (dst / "labelsTr" / f"em_{i:03d}.png").symlink_to(isbi / f"train/label/{i}.png")
    return dst


def test_segmentation_folder_equals_the_isbi_path_and_predicts_masks(tmp_path):
    folder = _isbi_as_nnunet_2d(tmp_path / "isbi_nn", range(20))
    cfg = segmentation_folder.get_config("isbi,smoke")
    cfg.data.directory = str(folder)
    general = loop.run(cfg, tmp_path / "general")
    named = loop.run(isbi2012.get_config("smoke"), tmp_path / "named")
    _close(general, named, ("dice_membrane", "dice_interior", "hd95_membrane", "accuracy"))
    # a folder the run never saw, in a test/ split folder: 3 other slices
    unseen = _isbi_as_nnunet_2d(tmp_path / "unseen" / "test", (2, 7, 11))
    rows, summary, out = evaluate.evaluate_workdir(
        tmp_path / "general", data_dir=tmp_path / "unseen", split="test", pictures=1
    )
    assert [r["id"] for r in rows] == ["em_002", "em_007", "em_011"] and summary["cases"] == 3
    assert out.name.startswith("best-unseen-") and out.name.endswith("-test")
    assert len(list((out / "overlays").iterdir())) == 1
    # masks in the dataset's own values (0 = membrane, 255 = interior), on the input grid
    written = evaluate.predict_workdir(tmp_path / "general", [unseen / "imagesTr"], tmp_path / "p")
    assert sorted(p.name for p in written) == [f"em_{i:03d}_0000.png" for i in (2, 7, 11)]
    mask = np.asarray(Image.open(written[0]))
    assert mask.shape == (512, 512) and set(np.unique(mask)) <= {0, 255}


# ---------------------------------------------------------------------------------------------
# 3D segmentation: nnU-Net v2 raw datasets (and the deepmedic path they came from)
# ---------------------------------------------------------------------------------------------


def test_nnunet_dataset_equals_the_deepmedic_path(tmp_path):
    dm = tv.write_layout(tmp_path / "dm" / "train", "deepmedic", {"c1": "A", "c2": "B"})
    tv.write_layout(tmp_path / "dm" / "validation", "deepmedic", {"c3": "C"})
    cases = [
        *volumes.find_cases(dm, "deepmedic"),
        *volumes.find_cases(dm.parent / "validation", "deepmedic"),
    ]
    test_case = volumes.find_cases(
        tv.write_layout(tmp_path / "dm_test", "deepmedic", {"c4": "A"}), "deepmedic"
    )
    nn = convert.to_nnunet(cases, tmp_path / "nn", volumes.BRATS_SPEC, test_cases=test_case)
    cfg = unet3d_nnunet.get_config("smoke")
    cfg.data.directory = str(nn)
    cfg.data.val_ids = ("c3",)
    general = loop.run(cfg, tmp_path / "general")
    old = unet3d_brats.get_config("smoke")
    old.data.directory, old.data.val_directory = str(dm), str(dm.parent / "validation")
    old.data.max_examples = 0
    named = loop.run(old, tmp_path / "named")
    keys = [f"{m}_{r}" for m in ("dice", "sensitivity", "hd95") for r in ("WT", "TC", "ET")]
    _close(general, named, keys, rtol=1e-5)
    # the test subset (imagesTs / labelsTs) of the dataset, then predictions on its grid
    rows, summary, _ = evaluate.evaluate_workdir(tmp_path / "general", split="test")
    assert [r["id"] for r in rows] == ["c4"]
    (pred,) = evaluate.predict_workdir(tmp_path / "general", [nn], tmp_path / "pred")
    ref = nib.load(str(nn / "imagesTs" / "c4_0000.nii.gz"))
    got = nib.load(str(pred))
    assert got.shape == ref.shape and np.allclose(got.affine, ref.affine)
    assert set(np.unique(np.asarray(got.dataobj))) <= {0, 1, 2, 3}  # the dataset's own labels


# ---------------------------------------------------------------------------------------------
# GANs and classifiers on image folders
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def breast_png(tmp_path_factory) -> Path:
    folder = _dir("medmnist_breastmnist")
    splits = {s: image_sets.load_medmnist(folder, s) for s in ("train", "val")}
    root = tmp_path_factory.mktemp("breast")
    convert.to_image_folders(splits, root / "plain")
    convert.to_image_folders(splits, root / "classes", by_class=True, class_names=("m", "b"))
    return root


def test_dcgan_folder_equals_the_medmnist_path_and_scores_any_folder(tmp_path, breast_png):
    cfg = dcgan_folder.get_config("smoke")
    cfg.data.directory = str(breast_png / "plain")
    general = loop.run(cfg, tmp_path / "general")
    named = loop.run(dcgan_medmnist.get_config("breast,smoke"), tmp_path / "named")
    # the PNGs hold the npz's 8-bit pixels: the same images up to float rounding
    _close(general, named, ("swd_mean", "swd_mean_real", "swd_mean_trivial"), rtol=1e-3)
    # evaluate.py --data_dir scores THAT folder (its reference halves), not the validation set
    _, on_val, _ = evaluate.evaluate_workdir(tmp_path / "general", checkpoint="latest")
    _, on_train, out = evaluate.evaluate_workdir(
        tmp_path / "general", data_dir=breast_png / "plain", split="train", checkpoint="latest"
    )
    assert on_train["swd_mean_real"] != on_val["swd_mean_real"]
    assert (out / "summary.json").exists() and out.name.startswith("latest-plain-")
    assert json.loads((out / "summary.json").read_text())["data_dir"] == str(breast_png / "plain")
    written = evaluate.sample_workdir(tmp_path / "general", tmp_path / "s", num=3)
    assert len([k for k in written if k.startswith("sample_")]) == 3


def test_classifier_folder_and_medmnist_test_split(tmp_path, breast_png):
    cfg = classifier_folder.get_config("smoke")
    cfg.data.directory = str(breast_png / "classes")
    cfg.data.class_names = ("m", "b")
    final = loop.run(cfg, tmp_path / "folder")
    assert 0 <= final["accuracy"] <= 1
    rows, summary, _ = evaluate.evaluate_workdir(
        tmp_path / "folder", data_dir=breast_png / "classes" / "val", split="test"
    )
    assert summary["cases"] == len(rows) == 78  # every image of that folder
    # a MedMNIST run scores a test split of any .npz in that layout (here: a copy whose
    # "test" arrays are the validation arrays)
    loop.run(classifier_medmnist.get_config("breast,smoke"), tmp_path / "npz")
    npz = np.load(_dir("medmnist_breastmnist") / "BreastMNIST.npz")
    np.savez(tmp_path / "copy.npz", test_images=npz["val_images"], test_labels=npz["val_labels"])
    _, on_test, _ = evaluate.evaluate_workdir(
        tmp_path / "npz", data_dir=tmp_path / "copy.npz", split="test"
    )
    _, on_val, _ = evaluate.evaluate_workdir(
        tmp_path / "npz", data_dir=_dir("medmnist_breastmnist"), split="val"
    )  # every validation image (the smoke config caps its own splits)
    for k in ("accuracy", "auc", "loss"):
        assert on_test[k] == pytest.approx(on_val[k], rel=1e-6), k


# ---------------------------------------------------------------------------------------------
# translation: pix2pix pairs / aligned AB / 3D NIfTI pairs, CycleGAN folders
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tcia_pairs() -> dict[str, dict[str, np.ndarray]]:
    return tcia_pair_splits()


@pytest.mark.parametrize("layout", ["pairs", "aligned"])
def test_pix2pix_folder_trains_evaluates_and_translates_files(tmp_path, tcia_pairs, layout):
    root = convert.to_pair_folders(tcia_pairs, tmp_path / "data", layout)
    cfg = pix2pix_folder.get_config(f"{layout},smoke")
    cfg.data.directory = str(root)
    final = loop.run(cfg, tmp_path / "run")
    for k in ("mae", "mae_identity", "mae_mean_image", "psnr", "ssim"):
        assert np.isfinite(final[k]), k
    assert 0 < final["mae_identity"] <= 2  # T1 is not T2
    inputs = root / ("A" if layout == "pairs" else "") / "val"
    written = evaluate.predict_workdir(tmp_path / "run", [inputs], tmp_path / "pred")
    first = np.asarray(Image.open(written[0]))
    h, w = np.asarray(Image.open(sorted(inputs.iterdir())[0])).shape[:2]
    assert first.shape == (h, w)  # the input's own size (an AB image is translated whole)


def test_vox2vox_on_nifti_pairs_translates_a_volume(tmp_path):
    brats = _dir("brats2015_deepmedic_3d")
    case = sorted((brats / "train").iterdir())[0]
    vols = [
        np.asarray(nib.load(str(case / f"{m}_subtrMeanDivStd.nii.gz")).dataobj)[
            70:118, 70:118, 50:98
        ]
        for m in ("Flair", "T1c")
    ]
    for sub, v in zip(("A", "B"), vols, strict=True):
        (tmp_path / "data" / sub).mkdir(parents=True)
        for i in range(6):
            nib.save(nib.Nifti1Image(np.roll(v, 4 * i, 0), np.diag([2.0, 2, 2, 1])),
                     str(tmp_path / "data" / sub / f"c{i}.nii.gz"))  # fmt: skip
    cfg = pix2pix_folder.get_config("3d,smoke")
    cfg.data.directory = str(tmp_path / "data")
    final = loop.run(cfg, tmp_path / "run")
    assert np.isfinite(final["mae"]) and np.isfinite(final["mae_identity"])
    (out,) = evaluate.predict_workdir(
        tmp_path / "run", [tmp_path / "data" / "A" / "c0.nii.gz"], tmp_path / "pred"
    )
    ref, got = nib.load(str(tmp_path / "data" / "A" / "c0.nii.gz")), nib.load(str(out))
    assert got.shape == ref.shape and np.allclose(got.affine, ref.affine)
    arr = np.asarray(got.dataobj)
    assert arr.min() >= -1 and arr.max() <= 1


def test_cyclegan_folders_train_evaluate_predict(tmp_path, tcia_pairs):
    splits = {"train": tcia_pairs["train"], "test": tcia_pairs["val"]}
    root = convert.to_pair_folders(splits, tmp_path / "data", "unpaired")
    cfg = cyclegan_folder.get_config("smoke")
    cfg.data.directory = str(root)
    final = loop.run(cfg, tmp_path / "run")
    for k in ("swd_ab", "swd_ba", "swd_ab_identity", "mae_ab", "mae_ab_identity", "ssim_ba"):
        assert np.isfinite(final[k]), k  # testA / testB share file names: scored as pairs
    written = evaluate.predict_workdir(tmp_path / "run", [root / "testA"], tmp_path / "pred")
    assert len(written) == len(tcia_pairs["val"]["source"])
    assert np.asarray(Image.open(written[0])).shape == (64, 64)
    out = evaluate.sample_workdir(tmp_path / "run", tmp_path / "s", num=2)
    arrays = np.load(out["npz"])
    assert arrays["samples"].shape == arrays["source"].shape == (2, 32, 32, 1)
    with pytest.raises(ValueError, match="asked for 9 samples; the run can make 4"):
        evaluate.sample_workdir(tmp_path / "run", tmp_path / "s9", num=9)
    assert not (tmp_path / "s9").exists()


def test_pix2pix_tcia_translates_a_dicom_series(tmp_path):
    """A 2D model trained on the TCIA exam translates a DICOM series slice by slice into a
    NIfTI on the series' grid (its stored pixel arrays are the training orientation)."""
    from medjax.configs import pix2pix_tcia
    from medjax.data import io

    folder = _dir("brain_tumor_progression_pgbm001")
    loop.run(pix2pix_tcia.get_config("smoke"), tmp_path / "run")
    series = next(p for p in folder.iterdir() if "T1prereg" in p.name)
    (out,) = evaluate.predict_workdir(tmp_path / "run", [series], tmp_path / "pred")
    vol, geom = io.read_dicom_series(series, canonical=False)
    got = nib.load(str(out))
    assert got.shape == vol.shape and np.allclose(got.affine, geom.original_affine, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# the installed command line
# ---------------------------------------------------------------------------------------------


def test_console_script_trains_a_shipped_config_by_name_and_evaluates(tmp_path):
    _dir("medmnist_breastmnist")
    env = cpu_env()
    medjax = [sys.executable, "-m", "medjax.train.cli"]
    work = tmp_path / "cls"
    proc = subprocess.run(
        [*medjax, "train", "--config", "classifier_medmnist:breast,smoke", "--workdir", str(work)],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = subprocess.run(
        [*medjax, "evaluate", "--workdir", str(work), "--split", "val"],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert ev.returncode == 0, ev.stderr[-3000:]
    summary = json.loads((work / "eval" / "best-val" / "summary.json").read_text())
    assert {"accuracy", "balanced_accuracy", "auc"} <= set(summary)
    again = subprocess.run(
        [*medjax, "evaluate", "--workdir", str(work), "--split", "val"],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert again.returncode != 0 and "--overwrite" in again.stderr  # nothing is replaced
    test = subprocess.run(
        [*medjax, "evaluate", "--workdir", str(work), "--split", "test"],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert test.returncode != 0 and "test" in test.stderr  # the shared copy withholds it
    assert not (work / "eval" / "best-test").exists()
