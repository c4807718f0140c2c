"""End-to-end behaviour of the training loop: resume after a crash, 1 vs 8 devices, CLI."""

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from medjax.data import pipeline
from medjax.train import loop
from tests.helpers import cpu_env, tiny_demo_config

ROOT = Path(__file__).resolve().parents[2]


def _train_cmd(workdir, *overrides):
    """`scripts/train.py` on the smoke demo config, as a subprocess argv."""
    config = str(ROOT / "medjax" / "configs" / "mni152_demo.py") + ":smoke"
    script = str(ROOT / "scripts" / "train.py")
    return [sys.executable, script, "--config", config, "--workdir", str(workdir), *overrides]


def _params(cfg, workdir):
    _, state = loop.restore(cfg, workdir, best=False)
    return state, [np.asarray(x) for x in jax.tree.leaves(state)]


def test_crash_and_resume_matches_uninterrupted_run_bitwise(tmp_path, monkeypatch):
    cfg = tiny_demo_config()
    loop.run(cfg, tmp_path / "straight")

    real_iter = pipeline.make_train_iter

    def crashing_iter(*args, **kwargs):
        # Hands out steps 1..5, then the "machine dies" while fetching step 6.
        for i, batch in enumerate(real_iter(*args, **kwargs)):
            if i == 5:
                raise RuntimeError("simulated crash")
            yield batch

    monkeypatch.setattr(pipeline, "make_train_iter", crashing_iter)
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.run(cfg, tmp_path / "resumed")
    monkeypatch.setattr(pipeline, "make_train_iter", real_iter)
    ckpts = sorted(
        int(p.name) for p in (tmp_path / "resumed" / "checkpoints").iterdir() if p.name.isdigit()
    )
    assert max(ckpts) == 4, ckpts  # the crash lost steps 5..6, not the saved state
    final = loop.run(cfg, tmp_path / "resumed")
    assert final["step"] == 8

    s1, a = _params(cfg, tmp_path / "straight")
    s2, b = _params(cfg, tmp_path / "resumed")
    assert int(s1.step) == int(s2.step) == 8
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    # The resumed run logged steps 5..8 again, with the same losses as the straight run.
    rows = [json.loads(line) for line in open(tmp_path / "resumed" / "metrics.jsonl")]
    ref = {
        r["step"]: r["loss"]
        for r in map(json.loads, open(tmp_path / "straight" / "metrics.jsonl"))
        if r["split"] == "train"
    }
    last = {r["step"]: r["loss"] for r in rows if r["split"] == "train"}
    assert last == ref


def test_resume_refuses_an_incompatible_config(tmp_path):
    cfg = tiny_demo_config(num_steps=2)
    loop.run(cfg, tmp_path)
    cfg.model.features = (4, 8)
    with pytest.raises(ValueError, match="model.features"):
        loop.run(cfg, tmp_path)


def test_unknown_task_is_named():
    cfg = tiny_demo_config()
    cfg.task = "no_such_task"
    with pytest.raises(ValueError, match="no_such_task"):
        loop.get_task(cfg)


def test_one_and_eight_devices_agree(tmp_path):
    env = cpu_env(devices=8)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("equivalence_script.py")), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["devices"] == [1, 8]
    np.testing.assert_allclose(report["losses_1"], report["losses_8"], rtol=1e-4, atol=1e-5)
    assert abs(report["dice_1"] - report["dice_8"]) < 1e-3
    # Parameters after 4 Adam steps: float reassociation across devices only (no biases before
    # norms, whose zero true gradient Adam would amplify).
    assert report["max_param_diff"] < 1e-4 * max(1.0, report["param_scale"])


def test_train_and_evaluate_scripts_end_to_end(tmp_path):
    work = tmp_path / "run"
    env = cpu_env()
    train = subprocess.run(
        _train_cmd(work, "--config.num_steps=4", "--config.eval_every=2"),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert "step 4/4" in train.stdout and "eval @ 4" in train.stdout
    assert (work / "checkpoints" / "4").is_dir() and (work / "best").is_dir()
    assert list((work / "images").glob("eval_predictions_*.png"))
    rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
    assert {r["split"] for r in rows} == {"train", "eval"}
    ev = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "evaluate.py"),
            "--workdir",
            str(work),
            "--checkpoint",
            "latest",
            "--pictures",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    out = work / "eval" / "latest-val"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 4 and summary["cases"] == 20
    assert 0.0 <= summary["dice_grey_matter"] <= 1.0
    assert len(list((out / "overlays").glob("*.png"))) == 2
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "hd95_white_matter" in header


def test_sigterm_then_relaunch_equals_an_uninterrupted_run_bitwise(tmp_path):
    """SIGTERM mid-run saves a checkpoint and exits 0; relaunched with the same command, the
    run ends with bit for bit the state of a run that was never interrupted."""
    flags = ("--config.num_steps=12", "--config.log_every=1", "--config.eval_every=12",
             "--config.checkpoint_every=100")  # fmt: skip
    env = cpu_env(PYTHONUNBUFFERED="1")
    work, straight = tmp_path / "preempted", tmp_path / "straight"
    proc = subprocess.Popen(
        _train_cmd(work, *flags),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    for line in proc.stdout:
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.stdout.read()
    assert proc.wait(timeout=300) == 0, out[-2000:]
    match = re.search(r"stopped by SIGTERM/preemption at step (\d+)", out)
    assert match and int(match.group(1)) < 12, out[-2000:]
    saved = [int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved == [int(match.group(1))]  # saved on the way out, nothing else
    for w in (work, straight):
        done = subprocess.run(_train_cmd(w, *flags), capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    states = [loop.restore(loop.load_run_config(w), w, best=False)[1] for w in (work, straight)]
    assert int(states[0].step) == int(states[1].step) == 12
    for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
