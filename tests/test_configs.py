"""Experiment configs (medjax/configs/*.py) build, are consistent, and reject unknown keys."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from medjax.configs import common
from medjax.data import datasets
from medjax.train.optim import make_optimizer

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "medjax" / "configs"
ALL = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in ("__init__", "common"))
VOLUME = ["unet3d_brats"]
GAN = [
    "dcgan_medmnist",
    "wgan_gp_medmnist",
    "dcgan_brats_flair",
    "dcgan_brats3d",
    "pix2pix_brats",
    "pix2pix_tcia",
    "cyclegan_brats",
    "vox2vox_brats",
]
OTHER = ["classifier_medmnist"]
EXPERIMENTS = [n for n in ALL if n not in VOLUME + GAN + OTHER]  # 2D segmentation configs


def _get(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    return importlib.import_module(f"medjax.configs.{name}").get_config(arg)


def test_every_experiment_file_is_listed():
    assert {"mni152_demo", "isbi2012", "kvasir_seg", "hc18", "unet2d_brats_crops"} <= set(
        EXPERIMENTS
    )
    assert set(VOLUME) <= set(ALL)


@pytest.mark.parametrize("arg", [None, "smoke"])
@pytest.mark.parametrize("name", VOLUME)
def test_volume_config_is_consistent(name, arg):
    c = _get(name, arg)
    assert c.task == "volume_segmentation"
    assert len(c.patch_size) == c.model.spatial_dims == 3
    window = tuple(c.inference.window) or tuple(c.patch_size)
    assert len(window) == 3 and 0 <= c.inference.overlap < 1
    assert 0 <= c.data.fg_fraction <= 1 and c.data.num_classes == 4
    assert 0 < c.optimizer.warmup_steps < c.num_steps


@pytest.mark.parametrize("arg", [None, "", "smoke"])
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_config_builds_and_is_consistent(name, arg):
    c = _get(name, arg)
    assert isinstance(c, ml_collections.ConfigDict)
    assert c.task == "segmentation"
    src = datasets.get_source(c.data.source)  # a known source
    assert c.data.num_classes == len(src.class_names)
    assert c.batch_size > 0 and c.eval_batch_size > 0
    assert 0 < c.optimizer.warmup_steps < c.num_steps
    assert c.eval_every <= c.num_steps and c.checkpoint_every <= c.num_steps
    assert c.model.features == tuple(sorted(c.model.features))
    assert c.crop_size == () or len(c.crop_size) == 2
    assert c.data.image_size == () or len(c.data.image_size) == 2
    assert c.best_mode in ("max", "min")
    # Some validation rule is active, and the optimizer block is usable as is.
    assert c.data.val_ids or c.data.val_slices or 0 < c.data.val_fraction < 1
    make_optimizer(c.optimizer, c.num_steps)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_smoke_is_small(name):
    full, smoke = _get(name), _get(name, "smoke")
    assert smoke.num_steps == 6 < full.num_steps
    assert smoke.batch_size == 2 and smoke.model.features == (8, 16)
    assert smoke.tensorboard is False
    assert smoke.data.source == full.data.source
    # Comma-separated arguments still switch smoke on.
    assert _get(name, "foo, smoke").num_steps == 6


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_get_config_returns_independent_objects(name):
    a, b = _get(name), _get(name)
    a.optimizer.learning_rate = 123.0
    a.data.source = "elsewhere"
    assert b.optimizer.learning_rate != 123.0 and b.data.source != "elsewhere"


@pytest.mark.parametrize("arg", [None, "smoke"])
@pytest.mark.parametrize("name", GAN + OTHER)
def test_gan_and_classifier_configs_build(name, arg):
    c = _get(name, arg)
    assert importlib.import_module(f"medjax.train.tasks.{c.task}").Task  # the task exists
    blocks = ("optimizer_g", "optimizer_d") if name in GAN else ("optimizer",)
    for b in blocks:
        make_optimizer(c[b], c.num_steps)
    assert c.eval_every <= c.num_steps and c.checkpoint_every <= c.num_steps
    if arg == "smoke":
        assert c.num_steps <= 6 and c.tensorboard is False
        assert _get(name).num_steps > c.num_steps
    if c.task == "wgan_gp":
        assert c.batch_size % c.n_critic == 0 and c.model.discriminator.norm in ("none", "layer")
        assert (c.optimizer_d.b1, c.optimizer_d.b2, c.optimizer_d.learning_rate) == (0.0, 0.9, 1e-4)


def test_gan_defaults_follow_the_papers():
    p2p = _get("pix2pix_brats")
    assert p2p.loss.recon_weight == 100 and p2p.model.discriminator.num_layers == 3
    cyc = _get("cyclegan_brats")
    assert (cyc.loss.kind, cyc.loss.cycle_weight, cyc.loss.identity_weight) == ("lsgan", 10, 0.5)
    assert cyc.pool_size == 50 and cyc.optimizer_g.schedule == "linear_decay"
    assert cyc.model.generator.norm == cyc.model.discriminator.norm == "instance"
    dc = _get("dcgan_medmnist")
    assert (dc.optimizer_g.learning_rate, dc.optimizer_g.b1) == (2e-4, 0.5)
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


def _train(*flags: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "train.py"),
        "--config",
        f"{CONFIG_DIR / 'mni152_demo.py'}:smoke",
        *flags,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)


def test_train_script_rejects_unknown_config_key(tmp_path):
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
