"""The general layouts on real data from ../shared/data, arranged in temporary folders (links,
or files written from the real images), read back and compared with the dataset-specific
readers or with independent numpy / PIL / nibabel reads.

Layouts: 2D image/mask folder pairs (PNG, JPEG, 2D NIfTI; nnU-Net 2D names), a folder of
images (GAN), a folder per class, MedMNIST 3D volumes, pix2pix A/B folders and side-by-side AB
images, CycleGAN trainA/trainB/testA/testB, 3D NIfTI pairs.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medjax.data import convert, image_sets, sources
from medjax.data.paths import data_dir
from tests.helpers import tcia_pair_splits

STEP = 2.0 / 255.0  # one 8-bit grey level in the [-1, 1] range


def _dir(name: str) -> Path:
    try:
        return data_dir(name)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def _cfg(**kw) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(kw)


# ---------------------------------------------------------------------------------------------
# 2D segmentation folders
# ---------------------------------------------------------------------------------------------


def test_isbi_as_nnunet_2d_names_equals_the_isbi_reader(tmp_path: Path):
    isbi = _dir("isbi2012_em_membrane")
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for i in range(6):
        (tmp_path / "imagesTr" / f"em_{i:03d}_0000.png").symlink_to(isbi / f"train/image/{i}.png")
        (tmp_path / "labelsTr" / f"em_{i:03d}.png").symlink_to(isbi / f"train/label/{i}.png")
    got = sources.load_segmentation_folder(
        tmp_path,
        images="imagesTr",
        masks="labelsTr",
        image_suffix="_0000",
        label_values=sources.ISBI2012_LABEL_VALUES,
    )
    ref = sources.load_isbi2012(isbi)[:6]
    assert [e["id"] for e in got] == [f"em_{i:03d}" for i in range(6)]
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_array_equal(g["image"], r["image"])
        np.testing.assert_array_equal(g["label"], r["label"])
        raw = np.asarray(Image.open(isbi / f"train/label/{r['id']}.png"))
        np.testing.assert_array_equal(g["label"], (raw == 0).astype(np.int32))  # membrane = 1


def test_kvasir_renamed_folders_and_mask_checks(tmp_path: Path):
    kv = _dir("kvasir_seg_polyps")
    names = sorted(p.name for p in (kv / "images").iterdir())[:3]
    for sub, src in (("img", "images"), ("gt", "masks")):
        (tmp_path / sub).mkdir()
        for n in names:
            (tmp_path / sub / n).symlink_to(kv / src / n)
    got = sources.load_segmentation_folder(
        tmp_path, images="img", masks="gt", threshold=127, mode="RGB"
    )
    ref = {e["id"]: e for e in sources.load_kvasir_seg(kv)}
    for g in got:
        np.testing.assert_array_equal(g["image"], ref[g["id"]]["image"])
        np.testing.assert_array_equal(g["label"], ref[g["id"]]["label"])
        raw = np.asarray(Image.open(kv / "masks" / f"{g['id']}.jpg").convert("L"))
        np.testing.assert_array_equal(g["label"], (raw > 127).astype(np.int32))
    # the same masks saved as 0/1 PNGs: thresholding at 127 would make them empty -> an error
    bad = tmp_path / "bad"
    (bad / "img").mkdir(parents=True)
    (bad / "gt").mkdir()
    stem = Path(names[0]).stem
    (bad / "img" / names[0]).symlink_to(kv / "images" / names[0])
    Image.fromarray(got[0]["label"].astype(np.uint8)).save(bad / "gt" / f"{stem}.png")
    with pytest.raises(ValueError, match=rf"{stem}\.png.*none above the threshold 127"):
        sources.load_segmentation_folder(bad, images="img", masks="gt", threshold=127)
    # without a threshold, 0/1 are the classes themselves
    ok = sources.load_segmentation_folder(bad, images="img", masks="gt", num_classes=2)
    np.testing.assert_array_equal(ok[0]["label"], got[0]["label"])
    # values that are neither classes nor 0/255 are refused, naming the file and the values
    Image.fromarray((got[0]["label"] * 7).astype(np.uint8)).save(bad / "gt" / f"{stem}.png")
    with pytest.raises(ValueError, match=rf"{stem}\.png has values \{{0, 7\}}"):
        sources.load_segmentation_folder(bad, images="img", masks="gt", num_classes=2)


def test_2d_nifti_images_and_masks(tmp_path: Path):
    isbi = _dir("isbi2012_em_membrane")
    ref = sources.load_isbi2012(isbi)[:2]
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    for r in ref:
        raw = np.asarray(Image.open(isbi / f"train/image/{r['id']}.png"), np.float32)
        aff = np.diag([0.5, 0.25, 1.0, 1.0])
        nib.save(
            nib.Nifti1Image(raw[:, :, None], aff), str(tmp_path / "images" / f"{r['id']}.nii.gz")
        )
        lab = r["label"].astype(np.uint8)
        nib.save(nib.Nifti1Image(lab, aff), str(tmp_path / "masks" / f"{r['id']}.nii.gz"))
    got = sources.load_segmentation_folder(tmp_path, num_classes=2)
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g["image"][..., 0] / 255.0, r["image"][..., 0], atol=1e-6)
        np.testing.assert_array_equal(g["label"], r["label"])
        np.testing.assert_allclose(g["spacing"], [0.5, 0.25])


def test_split_folder_and_aliases(tmp_path: Path):
    (tmp_path / "validation").mkdir()
    (tmp_path / "train").mkdir()
    assert sources.split_folder(tmp_path, "val") == tmp_path / "validation"
    assert sources.split_folder(tmp_path, "train") == tmp_path / "train"
    assert sources.split_folder(tmp_path, "test") == tmp_path  # no test folder: the folder
    assert sources.has_split_folders(tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        sources.split_folder(tmp_path, "dev")


# ---------------------------------------------------------------------------------------------
# GAN and classification image sets
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def breast() -> dict[str, dict[str, np.ndarray]]:
    folder = _dir("medmnist_breastmnist")
    return {s: image_sets.load_medmnist(folder, s) for s in ("train", "val")}


def test_image_folder_and_class_folders_equal_the_npz(tmp_path: Path, breast):
    convert.to_image_folders(breast, tmp_path / "plain")
    names = ("malignant", "benign")
    convert.to_image_folders(breast, tmp_path / "classes", by_class=True, class_names=names)
    for split in ("train", "val"):
        ref = breast[split]
        got = image_sets.load_gan_images(
            _cfg(source="folder", directory=str(tmp_path / "plain"), image_size=(28, 28),
                 channels=1),
            split,
        )  # fmt: skip
        np.testing.assert_allclose(got["image"], ref["image"], atol=1e-6)
        cls = image_sets.load_labelled_images(
            _cfg(source="class_folders", directory=str(tmp_path / "classes"), class_names=names,
                 channels=1),
            split,
        )  # fmt: skip
        # class folders list class 0 first: the same images, grouped by class
        order = np.argsort(ref["label"], kind="stable")
        np.testing.assert_array_equal(cls["label"], ref["label"][order])
        np.testing.assert_allclose(cls["image"], ref["image"][order], atol=1e-6)
    # --data_dir of one split folder alone, and a folder with a stray sub-folder
    alone = image_sets.load_gan_images(_cfg(source="folder", channels=1), "val",
                                       directory=tmp_path / "plain" / "val")  # fmt: skip
    np.testing.assert_allclose(alone["image"], breast["val"]["image"], atol=1e-6)  # all of it
    held = image_sets.load_gan_images(
        _cfg(source="folder", channels=1, directory=str(tmp_path / "plain" / "val")), "val"
    )  # the configured folder without split folders: a seeded fifth is held out
    assert len(held["image"]) == round(0.2 * len(breast["val"]["image"]))
    (tmp_path / "classes" / "train" / "unsure").mkdir()
    with pytest.raises(ValueError, match=r"'unsure'.*not among the classes"):
        image_sets.load_labelled_images(
            _cfg(source="class_folders", directory=str(tmp_path / "classes"), class_names=names),
            "train",
        )


def test_medmnist_3d_volumes_are_never_channels(tmp_path: Path):
    """A [N, 28, 28, 28] MedMNIST-3D array is N volumes with one channel (made here from real
    BraTS FLAIR crops, scaled to uint8)."""
    brats = _dir("brats2015_deepmedic_3d")
    flair = np.asarray(
        nib.load(str(next((brats / "train").iterdir()) / "Flair_subtrMeanDivStd.nii.gz")).dataobj
    )
    crops = [flair[x : x + 28, 100:128, 60:88] for x in (60, 90, 120, 150)]
    vols = np.stack([np.uint8(np.clip((c - c.min()) / np.ptp(c) * 255, 0, 255)) for c in crops])
    np.savez(
        tmp_path / "organmnist3d.npz",
        train_images=vols,
        train_labels=np.array([[0], [1], [1], [0]]),
    )
    d = image_sets.load_medmnist(tmp_path, "train")
    assert d["image"].shape == (4, 28, 28, 28, 1)
    np.testing.assert_allclose(d["image"][2, ..., 0], vols[2] / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(d["label"], [0, 1, 1, 0])
    small = image_sets.load_medmnist(tmp_path, "train", size=(14, 14, 14))
    assert small["image"].shape == (4, 14, 14, 14, 1)
    np.savez(
        tmp_path / "organmnist3d.npz", train_images=vols, train_labels=np.array([0.0, 0.5, 1, 0])
    )
    with pytest.raises(ValueError, match=r"non-integer values \[0\.5\]"):
        image_sets.load_medmnist(tmp_path, "train")


# ---------------------------------------------------------------------------------------------
# translation pairs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tcia_pairs() -> dict[str, dict[str, np.ndarray]]:
    return tcia_pair_splits()


@pytest.mark.parametrize("layout", ["pairs", "aligned"])
def test_pix2pix_folders_equal_the_source_slices(tmp_path: Path, tcia_pairs, layout):
    root = convert.to_pair_folders(tcia_pairs, tmp_path / layout, layout)
    for split in ("train", "val"):
        got = image_sets.load_paired_images(
            _cfg(source=layout, directory=str(root), channels=1), split
        )
        ref = tcia_pairs[split]
        # 8-bit files: within half a grey level of the float slices
        np.testing.assert_allclose(got["source"], ref["source"], atol=STEP / 2 + 1e-6)
        np.testing.assert_allclose(got["target"], ref["target"], atol=STEP / 2 + 1e-6)
        assert got["mask"].all() and got["label"].shape == got["mask"].shape
    if layout == "pairs":  # an A image without its B partner is named
        next((root / "B" / "val").iterdir()).unlink()
        with pytest.raises(FileNotFoundError, match="has no partner"):
            image_sets.load_paired_images(_cfg(source="pairs", directory=str(root)), "val")


def test_cyclegan_folders(tmp_path: Path, tcia_pairs):
    splits = {"train": tcia_pairs["train"], "test": tcia_pairs["val"]}
    root = convert.to_pair_folders(splits, tmp_path / "cyc", "unpaired")
    assert sorted(p.name for p in root.iterdir()) == ["testA", "testB", "trainA", "trainB"]
    cfg = _cfg(source="unpaired", directory=str(root), channels=1)
    train = image_sets.load_unpaired_images(cfg, "train")
    n = len(tcia_pairs["train"]["source"])
    assert len(train["a"]) + len(train["b"]) == n and not train["paired"]
    ev = image_sets.load_unpaired_images(cfg, "val")  # no valA/valB: the test folders
    assert ev["paired"] and ev["mask"].shape == ev["a"].shape[:-1]
    np.testing.assert_allclose(ev["a"], tcia_pairs["val"]["source"], atol=STEP / 2 + 1e-6)
    np.testing.assert_allclose(ev["b"], tcia_pairs["val"]["target"], atol=STEP / 2 + 1e-6)
    (root / "testB").rename(root / "elsewhere")
    with pytest.raises(FileNotFoundError, match="testA\\+testB"):
        image_sets.load_unpaired_images(cfg, "test")


def test_3d_nifti_pairs(tmp_path: Path):
    brats = _dir("brats2015_deepmedic_3d")
    case = next((brats / "train").iterdir())
    vols = [
        np.asarray(nib.load(str(case / f"{m}_subtrMeanDivStd.nii.gz")).dataobj)[
            80:112, 80:112, 60:92
        ]
        for m in ("Flair", "T1c")
    ]
    for sub, v in zip(("A", "B"), vols, strict=True):
        (tmp_path / sub).mkdir()
        for i in range(5):
            nib.save(
                nib.Nifti1Image(np.roll(v, i, 0), np.eye(4)), str(tmp_path / sub / f"c{i}.nii.gz")
            )
    cfg = _cfg(source="pairs", directory=str(tmp_path), spatial_dims=3, image_size=(16, 16, 16))
    train = image_sets.load_paired_images(cfg, "train")
    val = image_sets.load_paired_images(cfg, "val")
    assert train["source"].shape == (4, 16, 16, 16, 1) and val["target"].shape == (1, 16, 16, 16, 1)
    assert train["source"].min() >= -1 and train["source"].max() <= 1
