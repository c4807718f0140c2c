"""The benchmark suite's own machinery (no timing targets: those live in the printed numbers)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from medjax.configs import classifier_medmnist

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_train_step  # noqa: E402
import suite  # noqa: E402


def test_data_section_lists_every_shipped_config():
    files = {
        p.stem
        for p in (BENCH.parent / "medjax" / "configs").glob("*.py")
        if "def get_config" in p.read_text()
    }
    assert set(suite.shipped_configs()) == files
    assert {"mni152_demo", "wgan_gp_medmnist", "vox2vox_brats"} <= files


def test_measure_runs_the_loop_pattern_on_real_data():
    cfg = classifier_medmnist.get_config("smoke")
    r = bench_train_step.measure(cfg, steps=3)
    assert r["steps"] == 3 and r["batch"] == int(cfg.batch_size)
    assert r["num_train"] > 0 and r["example"]["image"][-1] == 1
    for key in ("pipeline_s", "step_s", "loop_s", "compile_s"):
        assert r[key] > 0, key
    assert 0.0 <= r["wait_frac"] < 1.0
    assert r["progress"] and all(math.isfinite(v) for v in r["progress"].values())


def test_config_overrides_are_checked():
    cfg = classifier_medmnist.get_config("smoke")
    suite._set(cfg, "data.max_examples", 7)
    assert cfg.data.max_examples == 7
    with pytest.raises(KeyError, match="not a key"):
        suite._set(cfg, "data.nosuch", 1)
