"""Every task module (discovered, never listed), through the task contract:

* two compiled steps on 1 and on 8 simulated devices agree (`step_script.py`, a subprocess);
* a run resumed from a checkpoint ends bitwise equal to an uninterrupted run, on real data.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from medjax.train import loop
from tests.helpers import cpu_env

ROOT = Path(__file__).resolve().parents[2]
GROUPS = 4  # subprocesses, so that the xdist workers share them evenly
CONFIGS = sorted(
    p.stem
    for p in (ROOT / "medjax" / "configs").glob("*.py")
    if p.stem not in ("__init__", "common")
)


@pytest.mark.parametrize("group", range(GROUPS))
def test_data_parallel_fsdp_accumulation_and_bf16_steps_agree(group):
    """Two compiled steps of every task on 1 device against replica 0 of 2 vmapped replicas on
    8 devices with FSDP over a 4 x 2 mesh, 4 accumulated micro-batches, and bfloat16 compute
    (`step_script.py`)."""
    env = cpu_env(devices=8)  # XLA's optimisations are off in tests (tests/conftest.py)
    # XLA:CPU's older loop emitters, not its MLIR fusion emitters: the same operations, compiled
    # in 40 % less time (pix2pix's + WGAN-GP's + U-Net 2D's steps: 7.8 against 13.4 s, 2-core
    # EPYC), and this script is mostly compilation. Only here: their float sums may be ordered
    # differently in two programs that differ elsewhere (a run's step count in its schedule),
    # which the bitwise resume tests would see; these settings agree to a tolerance anyway.
    env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} --xla_cpu_use_fusion_emitters=false"
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("step_script.py")), str(group), str(GROUPS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    names = sorted({*loop.task_names(), "dcgan_hinge_sn_ema", "vox2vox_segmentation"})
    assert sorted(report) == names[group::GROUPS]
    for name, r in report.items():
        ref = r["reference"]
        assert {"fsdp_replicas", "bf16"} <= set(r["settings"]), name
        for setting, got in r["settings"].items():
            what = f"{name} ({setting})"
            assert got["steps"] == [2, 2], what
            assert got["finite"], what
            assert got["dtypes"] == ["float32"], what  # bf16 computes, parameters stay f32
            first, second = got["metrics"]
            assert first.keys() == ref[0].keys(), what
            # the same global batch: only float reassociation differs (bf16: its rounding, which
            # moves the gradient norm by up to ~15 %)
            for k in first:
                rtol, atol = (2e-4, 1e-5)
                if setting == "bf16":
                    rtol, atol = (0.25, 1e-2) if k == "grad_norm" else (5e-2, 5e-3)
                np.testing.assert_allclose(first[k], ref[0][k], rtol=rtol, atol=atol, err_msg=what)
            if setting != "bf16":
                for k in first:
                    np.testing.assert_allclose(
                        second[k], ref[1][k], rtol=2e-2, atol=1e-3, err_msg=what
                    )
                # One Adam step moves a parameter by at most ~lr: parameters with a near-zero
                # true gradient may take opposite signs, nothing more.
                assert got["max_param_diff"] < 5 * r["lr"], what
    accumulating = [n for n, r in report.items() if "accum" in r["settings"]]
    assert accumulating or group, "no task accumulates gradients"


def _first_run(task_name: str, cfg_setup, workdir: Path):
    """Runs the first shipped smoke config of `task_name` whose data is present (layout configs
    that need a user's folder are passed over); returns (config, final metrics)."""
    for name in CONFIGS:
        c = importlib.import_module(f"medjax.configs.{name}").get_config("smoke")
        if c.task != task_name:
            continue
        cfg_setup(c)
        try:
            return c, loop.run(c, workdir / name)
        except (FileNotFoundError, ValueError) as exc:
            if "directory" not in str(exc) and "does not exist" not in str(exc):
                raise
    pytest.skip(f"no shipped config of {task_name!r} has its data here")


@pytest.mark.parametrize("task_name", loop.task_names())
def test_resume_equals_uninterrupted_run_bitwise(task_name, tmp_path):
    def setup(c):
        c.num_steps, c.checkpoint_every, c.eval_every, c.log_every = 3, 1, 3, 1
        c.keep_checkpoints = 3
        if "sample_every" in c:
            c.sample_every = 0

    cfg, full = _first_run(task_name, setup, tmp_path / "full")
    straight = next((tmp_path / "full").iterdir())
    part = cfg.copy_and_resolve_references()
    part.num_steps = 1
    loop.run(part, tmp_path / "resumed")
    resumed = loop.run(cfg, tmp_path / "resumed")  # continues 1 -> 3
    assert full["step"] == resumed["step"] == 3
    states = [loop.restore(cfg, d, best=False)[1] for d in (straight, tmp_path / "resumed")]
    leaves = [jax.tree.leaves(s) for s in states]
    assert len(leaves[0]) == len(leaves[1]) > 0
    for a, b in zip(*leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    shown = [k for k in full if k in (loop.get_task(cfg).summary_keys or ())]
    for k in shown:  # the evaluation of equal states agrees too
        np.testing.assert_allclose(resumed[k], full[k], rtol=1e-6, equal_nan=True, err_msg=k)
