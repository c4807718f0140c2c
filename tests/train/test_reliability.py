"""Bad configs, bad work directories, failed saves, NaN losses and kills: each is refused or
survived with a clear message, and nothing a user already has is changed or lost."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from medjax.errors import CheckpointError, ConfigError, WorkdirError
from medjax.train import evaluate, loop, schema
from tests.helpers import cpu_env, tiny_demo_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(
    p.stem
    for p in (ROOT / "medjax" / "configs").glob("*.py")
    if p.stem not in ("__init__", "common")
)


def _tiny(num_steps: int = 4, **changes):
    return tiny_demo_config(num_steps, eval_every=2, **changes)


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` -> its SHA-256 (to prove nothing was changed)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _train_cmd(workdir, *flags, config="mni152_demo:smoke"):
    return [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", config,
            "--workdir", str(workdir), *flags]  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 4-step run of the demo config (its folder is copied by tests that change it)."""
    work = tmp_path_factory.mktemp("finished") / "run"
    loop.run(_tiny(), work)
    return work


# ---------------------------------------------------------------------------------------------
# the config schema
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arg", [None, "smoke"])
def test_every_shipped_key_has_a_rule_and_passes_it(arg):
    for name in CONFIGS:
        c = importlib.import_module(f"medjax.configs.{name}").get_config(arg)
        keys = list(schema.flatten(c))
        assert not [k for k in keys if schema.rule_for(k) is None], name
        assert schema.problems(c) == [], name


def test_schema_lists_every_problem_with_its_key():
    c = _tiny()
    c.batch_size = 0
    c.num_steps = -5
    c.model.dtype = "float8"
    c.optimizer.learning_rate = -1.0
    c.data.val_fraction = 1.5
    c.augment.flip_axes = (0, "x")
    c.best_mode = "maximum"
    with pytest.raises(ConfigError) as info:
        schema.validate(c)
    lines = info.value.problems
    for key in ("batch_size=0", "num_steps=-5", "model.dtype='float8'", "learning_rate=-1.0",
                "val_fraction=1.5", "flip_axes", "best_mode='maximum'"):  # fmt: skip
        assert sum(key in line for line in lines) == 1, (key, lines)
    assert len(lines) == 7
    assert "did you mean 'float32'" in str(info.value)


def test_schema_relations_and_types():
    c = _tiny()
    c.batch_size, c.grad_accum_steps = 6, 4
    c.replicas, c.replica_lr_scales = 2, (1.0,)
    d = json.loads(c.to_json())  # a config.json or a plain dict: ml_collections types not kept
    d["tensorboard"] = 1  # an int is not a bool
    found = schema.problems(d)
    assert any("grad_accum_steps=4: must divide config.batch_size=6" in f for f in found)
    assert any("replica_lr_scales has 1 entries" in f for f in found)
    assert any(f.startswith("config.tensorboard=1: expected true or false") for f in found)


def test_cli_prints_one_line_per_problem_and_writes_nothing(tmp_path):
    env = cpu_env()
    work = tmp_path / "run"
    typo = subprocess.run(_train_cmd(work, "--config.batch_sise=4"), capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip
    assert typo.returncode == 2
    assert "Traceback" not in typo.stderr
    want = "--config.batch_sise=4: the config has no key 'batch_sise'; did you mean 'batch_size'?"
    assert want in typo.stderr
    bad = subprocess.run(
        _train_cmd(work, "--config.batch_size=0", "--config.num_steps=-5",
                   "--config.model.dtype=float8"),
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    err = bad.stderr[bad.stderr.index("medjax train: error") :]
    for key in ("config.batch_size=0", "config.num_steps=-5", "config.model.dtype='float8'"):
        assert key in err
    assert not work.exists()  # refused before anything was written


def test_eval_batch_size_is_checked_at_start_and_may_change_on_resume(tmp_path):
    work = tmp_path / "two"
    proc = subprocess.run(
        _train_cmd(work, "--config.batch_size=2", "--config.eval_batch_size=3"),
        capture_output=True, text=True, env=cpu_env(devices=2), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "config.eval_batch_size=3 must be a multiple of the 2 devices" in proc.stderr
    assert not work.exists()  # before any step, checkpoint or file
    work = tmp_path / "run"
    loop.run(_tiny(num_steps=2, eval_batch_size=2), work)
    # evaluation-only keys may change on resume; a model key may not
    final = loop.run(_tiny(num_steps=4, eval_batch_size=4, num_pictures=1), work)
    assert final["step"] == 4
    with pytest.raises(WorkdirError, match="model.features"):
        loop.run(_tiny(num_steps=6, **{"model.features": (4, 8)}), work)


# ---------------------------------------------------------------------------------------------
# work directories and checkpoints
# ---------------------------------------------------------------------------------------------


def test_checkpoints_without_config_json_are_refused_untouched(tmp_path, finished_run):
    work = tmp_path / "run"
    shutil.copytree(finished_run, work)
    (work / "config.json").unlink()
    before = _snapshot(work)
    from medjax.configs import dcgan_medmnist

    with pytest.raises(WorkdirError, match="holds checkpoints but no config.json"):
        loop.run(dcgan_medmnist.get_config("smoke"), work)
    assert _snapshot(work) == before


def test_restore_onto_another_model_is_one_clear_error_and_changes_nothing(tmp_path, finished_run):
    work = tmp_path / "run"
    shutil.copytree(finished_run, work)
    cfg = _tiny(num_steps=6, **{"model.features": (4, 8)})
    # the saved config.json says the same (as if it had been edited): only the restore can tell
    (work / "config.json").write_text(json.dumps(loop._config_dict(cfg)))
    before = _snapshot(work)
    with pytest.raises(CheckpointError) as info:
        loop.run(cfg, work)
    msg = str(info.value)
    assert "does not fit this config's model" in msg and str(work / "checkpoints") in msg
    assert "\n" not in msg and len(msg) < 800
    # found from the saved tree's metadata, before any array is read: it names a differing
    # array with both shapes
    assert "arrays of another shape" in msg and " saved (" in msg and " vs model (" in msg
    assert _snapshot(work) == before


_UNWRITABLE_SCRIPT = r"""
import os, sys, json
import jax.numpy as jnp
from medjax.errors import CheckpointError, WorkdirError
from medjax.train.checkpoint import Checkpointer
from medjax.train import loop
from medjax.configs import mni152_demo

root = sys.argv[1]
out = {}
c = Checkpointer(os.path.join(root, "wd"), max_to_keep=2)
for s in (1, 2):
    c.save(s, {"w": jnp.arange(64.0) + s}, force=True)
c.wait()
os.chmod(os.path.join(root, "wd", "checkpoints"), 0o555)  # the disk "becomes read-only"
try:
    c.save(3, {"w": jnp.zeros(64)}, force=True)
    c.wait()
    out["save"] = "no error"
except CheckpointError as e:
    out["save"] = str(e)
os.chmod(os.path.join(root, "wd", "checkpoints"), 0o755)
c.close()
c = Checkpointer(os.path.join(root, "wd"), max_to_keep=2, read_only=True)
out["steps"] = c.all_steps()
out["restored"] = float(c.restore({"w": jnp.zeros(64)}, step=2)["w"][0])
ro = os.path.join(root, "readonly")
os.makedirs(ro)
os.chmod(ro, 0o555)
cfg = mni152_demo.get_config("smoke")
try:
    loop.run(cfg, os.path.join(ro, "run"))
    out["run"] = "no error"
except WorkdirError as e:
    out["run"] = str(e)
print(json.dumps(out))
"""


def test_unwritable_checkpoint_folder_names_it_and_keeps_every_checkpoint():
    cmd = [sys.executable, "-c", _UNWRITABLE_SCRIPT]
    if os.geteuid() == 0:  # root writes through permissions: run the check as "nobody"
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a folder unwritable")
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    root = Path(tempfile.mkdtemp(prefix="medjax-ro-", dir="/tmp"))
    try:
        root.chmod(0o777)
        env = cpu_env(HOME=str(root), PYTHONPATH=str(ROOT))
        proc = subprocess.run([*cmd, str(root)], capture_output=True, text=True, env=env,
                              timeout=300, cwd=str(root))  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["chmod", "-R", "u+rwx", str(root)], check=False)
        shutil.rmtree(root, ignore_errors=True)
    folder = f"{root}/wd/checkpoints"
    assert out["save"].startswith(f"saving step 3 in {folder} failed"), out["save"]
    assert f"the complete checkpoints [1, 2] in {folder} are kept" in out["save"]
    assert out["steps"] == [1, 2] and out["restored"] == 2.0
    assert "is not writable" in out["run"] and f"{root}/readonly/run" in out["run"]


# ---------------------------------------------------------------------------------------------
# non-finite losses
# ---------------------------------------------------------------------------------------------


def _all_finite(cfg, work) -> bool:
    _, state = loop.restore(cfg, work, best=False)
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
    # An absurd learning rate: step 1 is finite, its update overflows the weights, and the
    # loss of step 2 is not finite.
    cfg = _tiny(num_steps=6, checkpoint_every=1, **{"optimizer.learning_rate": 1e38,
                                                     "optimizer.warmup_steps": 0})  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"^step 2: non-finite .*loss"):
        loop.run(cfg, tmp_path)
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [1]  # never a checkpoint of the diverged state
    assert _all_finite(cfg, tmp_path)


def test_nan_steps_are_skipped_when_configured(tmp_path):
    cfg = _tiny(num_steps=4, nonfinite="skip", **{"optimizer.learning_rate": 1e38,
                                                  "optimizer.warmup_steps": 0})  # fmt: skip
    final = loop.run(cfg, tmp_path)
    assert final["step"] == 4
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    skipped = sum(r["nonfinite"] for r in rows if r["split"] == "train")
    assert skipped == 3  # steps 2, 3, 4: the weights stay those after step 1
    assert _all_finite(cfg, tmp_path)


# ---------------------------------------------------------------------------------------------
# deepmedic brain masks
# ---------------------------------------------------------------------------------------------


def _brats_case(tmp_path) -> Path:
    from medjax.data import paths

    try:
        src = paths.data_dir("brats2015_deepmedic_3d")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    case = next(p for p in sorted((src / "train").iterdir()) if p.is_dir())
    dst = tmp_path / "data" / case.name
    shutil.copytree(case, dst)
    return dst


def test_deepmedic_case_without_brain_mask_is_an_error_unless_opted_in(tmp_path):
    from medjax.data import volumes

    case = _brats_case(tmp_path)
    (case / "brainmask.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{case}/brainmask.nii.gz.*brain_mask='nonzero'"):
        volumes.find_cases(case.parent, "deepmedic")
    (found,) = volumes.find_cases(case.parent, "deepmedic", mask_name="")
    v = volumes.load_case(found)
    np.testing.assert_array_equal(v["mask"], np.any(v["image"] != 0, axis=-1))


def test_nan_in_a_brain_mask_names_the_file(tmp_path):
    import nibabel as nib

    from medjax.data import volumes

    case = _brats_case(tmp_path)
    img = nib.load(str(case / "brainmask.nii.gz"))
    data = np.asarray(img.dataobj, np.float32)
    data[0, 0, 0] = np.nan
    out = nib.Nifti1Image(data, img.affine, img.header)
    out.set_data_dtype(np.float32)
    nib.save(out, str(case / "brainmask.nii.gz"))
    (found,) = volumes.find_cases(case.parent, "deepmedic")
    with pytest.raises(ValueError, match=r"brainmask.nii.gz: the brain mask .* 1 NaN/Inf voxels"):
        volumes.load_case(found)


# ---------------------------------------------------------------------------------------------
# resume bookkeeping
# ---------------------------------------------------------------------------------------------


def test_resume_logs_every_step_once_continues_train_seconds_and_restores_best(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    loop.run(_tiny(num_steps=6), straight)
    loop.run(_tiny(num_steps=4), killed)
    # As after a kill just after step 5 was logged and while best/ was being written: rows
    # past the last checkpoint (4) and no best/ checkpoint.
    rows = [json.loads(x) for x in open(killed / "metrics.jsonl")]
    t4 = next(r["train_seconds"] for r in rows if r["step"] == 4 and r["split"] == "train")
    with open(killed / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "split": "train", "loss": 0.5, "train_seconds": 99}) + "\n")
        f.write('{"step": 6, "split": "tr')  # cut by the kill
    shutil.rmtree(killed / "best")
    loop.run(_tiny(num_steps=6), killed)
    a = [(r["step"], r["split"]) for r in map(json.loads, open(straight / "metrics.jsonl"))]
    b = [json.loads(x) for x in open(killed / "metrics.jsonl")]
    assert [(r["step"], r["split"]) for r in b] == a  # every step once, in order
    seconds = [r["train_seconds"] for r in b if r["split"] == "train"]
    assert seconds == sorted(seconds) and seconds[-1] > t4
    # best/ is back at once (the evaluation the resumed step owed), not at the next one
    best = sorted(p.name for p in (killed / "best").iterdir() if p.name.isdigit())
    ref = sorted(p.name for p in (straight / "best").iterdir() if p.name.isdigit())
    assert best == ref


_KILL_FLAGS = ("--config.num_steps=10", "--config.log_every=1", "--config.eval_every=4",
               "--config.checkpoint_every=2", "--config.keep_checkpoints=10",
               "--config.tensorboard=false")  # fmt: skip


def _kill_when(work: Path, ready, env) -> str:
    """Starts the run, SIGKILLs it as soon as `ready(work)` holds; returns what it saw."""
    proc = subprocess.Popen(_train_cmd(work, *_KILL_FLAGS), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)  # fmt: skip
    deadline = time.monotonic() + 300
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            seen = ready(work)
            if seen:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return seen
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    raise AssertionError(f"the run ended (rc {proc.returncode}) before the kill moment")


def _saving(sub: str, step: int):
    def ready(work: Path) -> str:
        d = work / sub
        if d.is_dir():
            for p in d.iterdir():
                if "orbax-checkpoint-tmp" in p.name and p.name.startswith(str(step)):
                    return f"{sub} save of step {step} in flight ({p.name})"
        return ""

    return ready


def _logged(step: int):
    def ready(work: Path) -> str:
        path = work / "metrics.jsonl"
        if path.exists() and f'"step": {step}, "split": "train"' in path.read_text():
            return f"step {step} logged"
        return ""

    return ready


def test_kill_9_at_several_moments_then_relaunch_equals_an_uninterrupted_run(tmp_path):
    """One run killed three times in a row, each time at a later moment than anything the
    previous launch reached (so no moment can be seen in leftovers of the one before), then
    relaunched to the end: its final state equals an uninterrupted run's bitwise."""
    env = cpu_env(PYTHONUNBUFFERED="1")
    straight, work = tmp_path / "straight", tmp_path / "killed"
    done = subprocess.run(_train_cmd(straight, *_KILL_FLAGS), capture_output=True, text=True,
                          env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ref = loop.restore(loop.load_run_config(straight), straight, best=False)[1]
    # checkpoints every 2 steps, evaluation (and best/) every 4, of 10 steps: a kill during a
    # checkpoint save, one between two saves, one during the save of best/
    moments = (_saving("checkpoints", 4), _logged(7), _saving("best", 8))
    seen = [_kill_when(work, ready, env) for ready in moments]
    again = subprocess.run(_train_cmd(work, *_KILL_FLAGS), capture_output=True, text=True,
                           env=env, timeout=600)  # fmt: skip
    assert again.returncode == 0, (seen, again.stderr[-3000:])
    got = loop.restore(loop.load_run_config(work), work, best=False)[1]
    assert int(got.step) == 10, seen
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(seen))
    rows = [(r["step"], r["split"]) for r in map(json.loads, open(work / "metrics.jsonl"))]
    assert len(rows) == len(set(rows)), seen
    assert (work / "best").is_dir() and any(p.name.isdigit() for p in (work / "best").iterdir())


# ---------------------------------------------------------------------------------------------
# evaluate and sample outputs
# ---------------------------------------------------------------------------------------------


def test_evaluation_outputs_of_two_folders_with_one_name_are_kept_apart(tmp_path):
    a = evaluate.default_out_dir(tmp_path, "best", "val", tmp_path / "a" / "validation")
    b = evaluate.default_out_dir(tmp_path, "best", "val", tmp_path / "b" / "validation")
    assert a != b and a.parent == b.parent == tmp_path / "eval"
    assert a.name.startswith("best-validation-") and a.name.endswith("-val")
    assert evaluate.default_out_dir(tmp_path, "best", "val", None).name == "best-val"


def test_sample_overwrite_replaces_the_whole_folder_and_too_many_is_refused(tmp_path):
    from medjax.configs import dcgan_medmnist
    from medjax.data import paths

    try:
        paths.data_dir("medmnist_pneumoniamnist")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    run = tmp_path / "run"
    loop.run(dcgan_medmnist.get_config("smoke"), run)
    out = tmp_path / "samples"
    evaluate.sample_workdir(run, out, num=5)
    before = _snapshot(out)
    with pytest.raises(FileExistsError, match="--overwrite"):
        evaluate.sample_workdir(run, out, num=2)
    assert _snapshot(out) == before
    evaluate.sample_workdir(run, out, num=2, overwrite=True)
    assert sorted(p.name for p in out.glob("sample_*.png")) == [
        "sample_0000.png",
        "sample_0001.png",
    ]
    assert np.load(out / "samples.npz")["samples"].shape[0] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_the_nonfinite_default_is_in_every_config():
    for name in CONFIGS:
        for arg in (None, "smoke"):
            c = importlib.import_module(f"medjax.configs.{name}").get_config(arg)
            assert c.nonfinite == "stop", (name, arg)
    assert loop._resumable("nonfinite")  # runs from before the key resume
