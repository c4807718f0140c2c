"""Volume segmentation end to end: train on patches, sliding-window evaluate, predict NIfTI.

Data: 40x40x24 crops of a real BRATS case written in the BraTS 2018-21 and deepmedic layouts by
`tests.data.test_volumes.write_layout`. References are computed here with nibabel, numpy and
hand-counted sets, never from medjax's own earlier output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ml_collections
import nibabel as nib
import numpy as np
import pytest

from medjax import metrics
from medjax.data import datasets
from medjax.train import evaluate
from medjax.train.tasks import volume_segmentation as vs
from tests.data import test_volumes as tv
from tests.helpers import cpu_env

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def brats_root(tmp_path_factory) -> Path:
    tv.deepmedic_dir()  # skips without the shared data
    root = tmp_path_factory.mktemp("brats")
    tv.write_layout(root / "train", "brats", {"case_a": "A", "case_b": "B"})
    tv.write_layout(root / "validation", "brats", {"case_c": "C"})
    return root


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = cpu_env()
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_region_rows_against_hand_counts():
    # internal classes: 0 bg, 1 NCR/NET, 2 edema, 3 enhancing
    label = np.array([[0, 1, 2, 3], [0, 0, 2, 3]])
    pred = np.array([[0, 1, 1, 0], [2, 0, 2, 3]])
    row = metrics.region_scores(
        pred, label, {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}, spacing=(1.0, 1.0)
    )
    # WT: truth {01,02,03,12,13} pred {01,02,10,12,13}: tp 4, fp 1, fn 1, tn 2
    assert row["dice_WT"] == pytest.approx(8 / 10)
    assert row["sensitivity_WT"] == pytest.approx(4 / 5)
    assert row["specificity_WT"] == pytest.approx(2 / 3)
    # TC: truth {01,03,13} pred {01,02,13}: tp 2, fp 1, fn 1, tn 4
    assert row["dice_TC"] == pytest.approx(4 / 6)
    assert row["specificity_TC"] == pytest.approx(4 / 5)
    # ET: truth {03,13} pred {13}: tp 1, fn 1; surfaces 1 voxel apart
    assert row["dice_ET"] == pytest.approx(2 / 3)
    assert row["sensitivity_ET"] == pytest.approx(1 / 2)
    assert row["hd95_ET"] == pytest.approx(0.95)  # percentile of {0, 1} distances gt->pred


class _OracleTrainer:
    """Stands in for loop.Trainer: its 'network' returns one-hot logits of the true label on
    the network grid, so predict_case isolates the crop / resample / paste geometry."""

    def __init__(self, prepared):
        self.prepared = prepared

    def sliding_window(self, state, image, **kw):
        lab = self.prepared["label"]
        assert image.shape[:-1] == lab.shape
        return np.eye(4, dtype=np.float32)[lab] * 20.0


@pytest.mark.parametrize("spacing", [(), (2.0, 2.0, 2.0)])
def test_predict_case_maps_back_to_the_original_grid(brats_root, spacing):
    config = _volume_config(brats_root, spacing=spacing)
    task = vs.Task(config)
    (case,) = task.cases(brats_root / "validation")
    prepared = task.prepare(case)
    truth = _canonical_internal(brats_root / "validation" / "case_c" / "case_c_seg.nii.gz")
    np.testing.assert_array_equal(prepared["label_full"], truth)
    pred = task.predict_case(_OracleTrainer(prepared), None, prepared)
    assert pred.shape == truth.shape
    if not spacing:
        np.testing.assert_array_equal(pred, truth)  # no resampling: exact
    else:  # 2 mm and back: only boundary voxels may change
        row = metrics.region_scores(pred, truth, vs.Task(config).regions, spacing=(1, 1, 1))
        assert row["dice_WT"] > 0.9 and row["dice_TC"] > 0.8


def _canonical_internal(path: Path) -> np.ndarray:
    img = nib.as_closest_canonical(nib.load(str(path)))
    native = np.rint(np.asarray(img.dataobj)).astype(int)
    return tv._relabel(native, {0: 0, 1: 1, 2: 2, 4: 3})


def _volume_config(root: Path, spacing=()) -> ml_collections.ConfigDict:
    from medjax.configs import unet3d_brats

    c = unet3d_brats.get_config("smoke")
    c.data.layout = "brats"
    c.data.directory = str(root / "train")
    c.data.val_directory = str(root / "validation")
    c.data.spacing = spacing
    return c


def test_train_evaluate_predict_scripts_on_volumes(brats_root, tmp_path):
    work = tmp_path / "run"
    _run(
        [
            "scripts/train.py",
            "--config=medjax/configs/unet3d_brats.py:smoke",
            f"--workdir={work}",
            "--config.data.layout=brats",
            f"--config.data.directory={brats_root / 'train'}",
            f"--config.data.val_directory={brats_root / 'validation'}",
            "--config.data.spacing=(2.0, 2.0, 2.0)",
            "--config.data.max_examples=0",
            "--config.num_steps=4",
            "--config.eval_every=4",
            "--config.checkpoint_every=4",
        ]
    )
    final = json.loads((work / "final_metrics.json").read_text())
    assert final["step"] == 4
    for k in ("dice_WT", "dice_TC", "dice_ET", "sensitivity_WT", "hd95_WT"):
        assert k in final
    assert list((work / "images").glob("eval_predictions_*.png"))

    ev = _run(["scripts/evaluate.py", f"--workdir={work}", "--pictures=1"])
    out = work / "eval" / "best-val"
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[0] == "id"
    for m in ("dice", "sensitivity", "specificity", "hd95"):
        for r in ("WT", "TC", "ET"):
            assert f"{m}_{r}" in header
    assert "case_c" in ev.stdout
    assert json.loads((out / "summary.json").read_text())["cases"] == 1

    # predict: one case folder in, a NIfTI on the input's grid out
    case_dir = brats_root / "validation" / "case_c"
    pred_dir = tmp_path / "pred"
    _run(["scripts/predict.py", f"--workdir={work}", f"--input={case_dir}", f"--output={pred_dir}"])
    out_file = pred_dir / "case_c.nii.gz"
    ref = nib.load(str(case_dir / "case_c_flair.nii.gz"))
    got = nib.load(str(out_file))
    assert got.shape == ref.shape
    np.testing.assert_allclose(got.affine, ref.affine, atol=1e-6)
    assert nib.aff2axcodes(got.affine) == nib.aff2axcodes(ref.affine) == ("L", "P", "S")
    assert set(np.unique(np.asarray(got.dataobj))) <= {0, 1, 2, 4}  # BraTS labels

    # an existing prediction is never replaced without --overwrite
    before = out_file.read_bytes()
    env = cpu_env()
    again = subprocess.run(
        [sys.executable, "scripts/predict.py", f"--workdir={work}", f"--input={case_dir}",
         f"--output={pred_dir}"],
        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert again.returncode != 0 and "--overwrite" in again.stderr
    assert out_file.read_bytes() == before


def test_brats_slices_crop_the_densest_window(tmp_path):
    tv.deepmedic_dir()
    root = tv.write_layout(tmp_path / "dm", "deepmedic", {"case_a": "A"})
    cfg = {"layout": "deepmedic", "modalities": ("t1ce",), "region": "TC", "slice_crop": (16, 16)}
    examples = datasets.load_brats_region_slices(str(root), cfg)
    label = _canonical_internal_dm(root / "case_a" / "OTMultiClass.nii.gz")
    core = np.isin(label, (1, 3))  # tumour core = necrosis, non-enhancing, enhancing
    zs = [z for z in range(core.shape[2]) if core[:, :, z].any()]
    assert [ex["slice_index"] for ex in examples] == zs
    for ex in examples:
        sl = core[:, :, ex["slice_index"]]
        best = max(
            sl[y : y + 16, x : x + 16].sum()
            for y in range(sl.shape[0] - 15)
            for x in range(sl.shape[1] - 15)
        )
        assert ex["image"].shape == (16, 16, 1) and ex["label"].shape == (16, 16)
        assert ex["label"].sum() == best  # brute force over every window
    whole = datasets.load_brats_region_slices(str(root), {**cfg, "slice_crop": ()})
    assert whole[0]["image"].shape == (40, 40, 1)
    assert sum(int(ex["label"].sum()) for ex in whole) == int(core.sum())


def _canonical_internal_dm(path: Path) -> np.ndarray:
    img = nib.as_closest_canonical(nib.load(str(path)))
    return tv._relabel(np.rint(np.asarray(img.dataobj)).astype(int), tv.DM_TO_INTERNAL)


def test_overrides_parse_and_reject_unknown_keys():
    c = ml_collections.ConfigDict({"data": {"slice_crop": [64, 64], "region": "WT"}})
    evaluate.apply_overrides(c, ["data.slice_crop=", "data.region=TC"])
    assert tuple(c.data.slice_crop) == () and c.data.region == "TC"
    evaluate.apply_overrides(c, ["data.slice_crop=(32, 32)"])
    assert tuple(c.data.slice_crop) == (32, 32)
    with pytest.raises(KeyError, match="data.regoin"):
        evaluate.apply_overrides(c, ["data.regoin=ET"])
    with pytest.raises(ValueError, match="key.sub=value"):
        evaluate.apply_overrides(c, ["data.region"])
