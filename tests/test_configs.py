"""Every shipped config (discovered, never listed) builds its task, is consistent, and rejects
unknown keys; every task module has a config."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from medjax.configs import common
from medjax.data import paths
from medjax.train import loop, task
from medjax.train.cli import config_path
from tests.helpers import cpu_env

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "medjax" / "configs"
ALL = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in ("__init__", "common"))


def _get(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    return importlib.import_module(f"medjax.configs.{name}").get_config(arg)


def _task(c: ml_collections.ConfigDict) -> task.Task:
    """The config's task; skips when it needs a shared dataset folder that is absent."""
    try:
        return loop.get_task(c)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def test_every_task_has_a_config_and_subclasses_the_contract():
    names = loop.task_names()
    assert {"segmentation", "volume_segmentation", "classification", "dcgan"} <= set(names)
    used = {_get(n).task for n in ALL}
    assert set(names) <= used, f"tasks without a shipped config: {set(names) - used}"
    for name in names:
        module = importlib.import_module(f"medjax.train.tasks.{name}")
        assert issubclass(module.Task, task.Task), name


@pytest.mark.parametrize("arg", [None, "smoke"])
@pytest.mark.parametrize("name", ALL)
def test_config_builds_its_task(name, arg):
    c = _get(name, arg)
    assert isinstance(c, ml_collections.ConfigDict)
    t = _task(c)
    assert t.name == c.task
    assert c.batch_size > 0 and c.num_steps > 0
    assert c.eval_every <= c.num_steps and c.checkpoint_every <= c.num_steps
    assert c.get("best_mode", "max") in ("max", "min")
    for key in t.progress_keys:
        assert isinstance(key, str)


@pytest.mark.parametrize("name", ALL)
def test_smoke_is_small(name):
    full, smoke = _get(name), _get(name, "smoke")
    assert smoke.num_steps <= 6 < full.num_steps
    assert smoke.batch_size <= full.batch_size
    assert smoke.tensorboard is False
    assert smoke.task == full.task and smoke.data.get("source") == full.data.get("source")
    # Comma-separated arguments still switch smoke on.
    assert _get(name, "foo, smoke").num_steps == smoke.num_steps


@pytest.mark.parametrize("name", ALL)
def test_get_config_returns_independent_objects(name):
    a, b = _get(name), _get(name)
    a.num_steps = 123456
    a.data.directory = "elsewhere"
    assert b.num_steps != 123456 and b.data.directory != "elsewhere"


@pytest.mark.parametrize("name", ALL)
def test_the_docstring_gives_the_command(name):
    doc = importlib.import_module(f"medjax.configs.{name}").__doc__ or ""
    assert "train.py" in doc or "medjax train" in doc, name


def test_segmentation_configs_have_a_validation_rule():
    for name in ALL:
        c = _get(name)
        if c.task != "segmentation":
            continue
        d = c.data
        assert (
            d.get("val_ids")
            or d.get("val_slices")
            or 0 < d.get("val_fraction", 0) < 1
            or (d.get("val_directory") is not None)
        ), name
        assert c.model.features == tuple(sorted(c.model.features)), name


def test_gan_defaults_follow_the_papers():
    p2p = _get("pix2pix_brats")
    assert p2p.loss.recon_weight == 100 and p2p.model.discriminator.num_layers == 3
    cyc = _get("cyclegan_brats")
    assert (cyc.loss.kind, cyc.loss.cycle_weight, cyc.loss.identity_weight) == ("lsgan", 10, 0.5)
    assert cyc.pool_size == 50 and cyc.optimizer_g.schedule == "linear_decay"
    assert cyc.model.generator.norm == cyc.model.discriminator.norm == "instance"
    dc = _get("dcgan_medmnist")
    assert (dc.optimizer_g.learning_rate, dc.optimizer_g.b1) == (2e-4, 0.5)
    wg = _get("wgan_gp_medmnist")
    assert (wg.optimizer_d.b1, wg.optimizer_d.b2, wg.optimizer_d.learning_rate) == (0.0, 0.9, 1e-4)
    assert wg.batch_size % wg.n_critic == 0 and wg.model.discriminator.norm in ("none", "layer")
    assert _get("vox2vox_brats").model.spatial_dims == 3
    assert _get("vox2vox_brats", "seg").target == "label"


def test_experiment_specifics():
    isbi = _get("isbi2012")
    assert isbi.data.val_ids == ("15", "16", "17", "18", "19")
    mni = _get("mni152_demo")
    assert mni.data.val_slices == (80, 100) and mni.data.val_gap == 3
    assert _get("mni152_demo", "smoke").data.max_examples == 0  # the whole (small) volume
    # Smoke runs shrink the images, never grow them.
    assert _get("hc18", "smoke").data.scale < _get("hc18").data.scale
    small, full = _get("kvasir_seg", "smoke").data.image_size, _get("kvasir_seg").data.image_size
    assert all(s < f for s, f in zip(small, full, strict=True))


def test_parse_arg():
    assert common.parse_arg(None) == set()
    assert common.parse_arg("") == set()
    assert common.parse_arg("smoke, big ,,x") == {"smoke", "big", "x"}


def test_locked_config_rejects_new_keys_but_accepts_known_ones():
    c = _get("mni152_demo", "smoke")
    c.lock()
    c.num_steps = 3
    c.optimizer.learning_rate = 0.5
    with pytest.raises(AttributeError, match="no_such_key"):
        c.no_such_key = 1
    with pytest.raises(AttributeError, match="learnin_rate"):
        c.optimizer.learnin_rate = 1.0


def test_config_by_name_or_path(tmp_path):
    assert config_path("isbi2012:smoke") == f"{CONFIG_DIR / 'isbi2012.py'}:smoke"
    assert config_path("isbi2012") == str(CONFIG_DIR / "isbi2012.py")
    mine = tmp_path / "mine.py"
    mine.write_text("x = 1\n")
    assert config_path(f"{mine}:a") == f"{mine}:a"  # an existing path wins
    with pytest.raises(SystemExit, match="no shipped config 'isbi2013'"):
        config_path("isbi2013")


def _train(*flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "medjax.train.cli", "train", "--config", "mni152_demo:smoke"]
    return subprocess.run(
        [*cmd, *flags], capture_output=True, text=True, timeout=120, cwd=REPO, env=cpu_env()
    )


def test_train_command_rejects_unknown_config_key(tmp_path):
    workdir = tmp_path / "run"
    bad = _train("--workdir", str(workdir), "--config.no_such_key=1")
    assert bad.returncode != 0
    assert "no_such_key" in bad.stderr
    assert not workdir.exists()  # rejected before anything ran
    # Control: a known key parses; the stray positional argument then stops main() before
    # training, so this is cheap and shows that the failure above is the unknown key.
    ok = _train("--workdir", str(workdir), "--config.optimizer.learning_rate=0.5", "stray")
    assert ok.returncode != 0
    assert "unexpected arguments: ['stray']" in ok.stdout + ok.stderr
    assert not workdir.exists()


def test_shared_data_helper_names_the_override():
    with pytest.raises(FileNotFoundError, match=paths.ENV_VAR):
        paths.data_dir("no_such_dataset_folder")


@pytest.mark.parametrize("name", ALL)
def test_every_network_of_every_config_has_a_compute_dtype_and_the_scale_keys(name):
    """Mixed precision is one switch per network; the mesh, accumulation, replicas and data
    shards are keys of every config (so `--config.<key>=...` works everywhere)."""
    c = _get(name)
    nets = [c.model[k] for k in ("generator", "discriminator") if k in c.model] or [c.model]
    for net in nets:
        assert net.dtype == "float32", name
    for key in ("num_devices", "fsdp", "grad_accum_steps", "replicas", "replica_lr_scales"):
        assert key in c, (name, key)
    assert c.data.shards == 0, name


def test_a_dtype_outside_the_compute_dtypes_is_refused_with_its_key():
    c = _get("dcgan_medmnist", "smoke")
    c.model.generator.dtype = "float8"
    with pytest.raises(ValueError, match=r"model\.generator\.dtype='float8': expected one of"):
        loop.Trainer(c)
