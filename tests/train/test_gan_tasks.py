"""The GAN tasks (dcgan, wgan_gp, conditional_gan, pix2pix / vox2vox, cyclegan).

(One compiled step of every task on 1 and 8 devices, and resume-equals-uninterrupted, are in
`test_every_task.py`.)

* the CycleGAN image pool against the reference algorithm (pytorch-CycleGAN-and-pix2pix's
  `ImagePool`) driven by the same random draws;
* n_critic critic updates per generator step, EMA by hand;
* real-data runs through the shared loop: sample grids and `scripts/sample.py` outputs,
  translation baselines by hand.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.configs import dcgan_medmnist, pix2pix_tcia, vox2vox_brats
from medjax.data import paths
from medjax.train import loop
from medjax.train.tasks import cyclegan, dcgan, wgan_gp
from tests.helpers import cpu_env

ROOT = Path(__file__).resolve().parents[2]


def _have(folder: str) -> bool:
    try:
        paths.data_dir(folder)
        return True
    except FileNotFoundError:
        return False


def _reference_pool(pool_size, batches, draws):
    """pytorch-CycleGAN-and-pix2pix `ImagePool.query`, with its random numbers given."""
    images, out = [], []
    for batch, (uses, idxs) in zip(batches, draws, strict=True):
        ret = []
        for img, u, idx in zip(batch, uses, idxs, strict=True):
            if len(images) < pool_size:
                images.append(img)
                ret.append(img)
            elif u > 0.5:
                ret.append(images[idx])
                images[idx] = img
            else:
                ret.append(img)
        out.append(np.stack(ret))
    return out, np.stack(images)


def test_image_pool_matches_the_reference_algorithm():
    rng = np.random.default_rng(0)
    size, b, steps = 5, 3, 6
    batches = [rng.normal(size=(b, 4, 4, 1)).astype(np.float32) for _ in range(steps)]
    pool = jnp.zeros((size, 4, 4, 1), jnp.float32)
    count = jnp.zeros((), jnp.int32)
    query = jax.jit(cyclegan.pool_query)
    outs, draws = [], []
    for s, batch in enumerate(batches):
        key = jax.random.key(s)
        # the draws pool_query makes, recomputed here to drive the reference
        keys = jax.random.split(key, b)
        uses, idxs = [], []
        for k in keys:
            k_use, k_idx = jax.random.split(k)
            uses.append(float(jax.random.uniform(k_use)))
            idxs.append(int(jax.random.randint(k_idx, (), 0, size)))
        draws.append((uses, idxs))
        out, pool, count = query(pool, count, jnp.asarray(batch), key)
        outs.append(np.asarray(out))
    ref_out, ref_pool = _reference_pool(size, batches, draws)
    for o, r in zip(outs, ref_out, strict=True):
        np.testing.assert_array_equal(o, r)
    np.testing.assert_array_equal(np.asarray(pool), ref_pool)
    assert int(count) == size
    # A pool of size 0 passes images through.
    x = jnp.ones((2, 4, 4, 1))
    out, _, _ = cyclegan.pool_query(jnp.zeros((0, 4, 4, 1)), jnp.zeros((), jnp.int32), x, key)
    np.testing.assert_array_equal(out, x)


def _tiny_state(task, batch):
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    return task.init(jax.random.key(0), spec)


def test_wgan_gp_takes_n_critic_critic_steps_per_generator_step():
    cfg = __import__("medjax.configs.wgan_gp_medmnist", fromlist=["x"]).get_config("smoke")
    task = wgan_gp.Task(cfg)
    rng = np.random.default_rng(1)
    batch = {"image": rng.uniform(-1, 1, (cfg.batch_size, 28, 28, 1)).astype(np.float32)}
    state = _tiny_state(task, batch)
    new, m = jax.jit(task.train_step)(state, batch)
    # Adam's step counters: n_critic updates of the critic, one of the generator.
    counts = {
        k: [int(x) for x in jax.tree.leaves(new.opt_state[k]) if np.ndim(x) == 0]
        for k in ("g", "d")
    }
    assert set(counts["d"]) == {task.n_critic} and set(counts["g"]) == {1}
    assert int(new.step) == 1 and m["gp"] >= 0
    with pytest.raises(ValueError, match="batch statistics"):
        bad = cfg.copy_and_resolve_references()
        bad.model.discriminator.norm = "batch"
        wgan_gp.Task(bad)
    with pytest.raises(ValueError, match="multiple of"):
        bad = cfg.copy_and_resolve_references()
        bad.batch_size = task.n_critic + 1
        wgan_gp.Task(bad)


@pytest.mark.parametrize("norm,joint", [("instance", True), ("none", True), ("batch", False)])
def test_discriminate_scores_real_and_fake_in_one_call_only_where_examples_are_independent(
    monkeypatch, norm, joint
):
    # the real and fake logits, and the gradients of a loss on them, equal two separate calls
    # (with a batch norm's statistics threaded from the first to the second); with a per-example
    # norm the discriminator is called once, on the two batches concatenated
    from medjax.models import PatchGAN
    from medjax.train import gan

    d = PatchGAN(features=4, num_layers=2, norm=norm)
    rng = np.random.default_rng(0)
    real, fake = (jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32) for _ in "rf")
    params, stats = gan.init_model(d, jax.random.key(0), real)
    calls = []
    apply = gan.apply_model

    def counted(module, params, stats, x, **kwargs):
        calls.append(x.shape[0])
        return apply(module, params, stats, x, **kwargs)

    def loss(params, discriminate):
        r, f, s = discriminate(d, params, stats, real, fake)
        return jnp.mean(jnp.square(r - 1)) + jnp.mean(jnp.square(f)), (r, f, s)

    def separate(d, params, stats, real, fake):
        r, s = apply(d, params, stats, real, train=True)
        f, s = apply(d, params, s, fake, train=True)
        return r, f, s

    monkeypatch.setattr(gan, "apply_model", counted)
    (_, got), g_got = jax.value_and_grad(loss, has_aux=True)(params, gan.discriminate)
    assert calls == ([4] if joint else [2, 2])
    (_, want), g_want = jax.value_and_grad(loss, has_aux=True)(params, separate)
    for a, b in zip(jax.tree.leaves((got, g_got)), jax.tree.leaves((want, g_want)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_dcgan_ema_is_the_hand_average():
    cfg = dcgan_medmnist.get_config("smoke,ema")
    task = dcgan.Task(cfg)
    rng = np.random.default_rng(2)
    batch = {"image": rng.uniform(-1, 1, (4, 28, 28, 1)).astype(np.float32)}
    state = _tiny_state(task, batch)
    new, _ = jax.jit(task.train_step)(state, batch)
    d = cfg.ema_decay
    for e, p0, p1 in zip(
        jax.tree.leaves(new.ema["g"]),
        jax.tree.leaves(state.params["g"]),
        jax.tree.leaves(new.params["g"]),
        strict=True,
    ):
        np.testing.assert_allclose(e, d * np.asarray(p0) + (1 - d) * np.asarray(p1), atol=1e-7)
    # samples come from the EMA generator
    z = jnp.asarray(task.fixed_latents(2))
    out = task.predict(new, z)
    ema_state = new.replace(params={**new.params, "g": new.ema["g"]}, ema={})
    np.testing.assert_allclose(out, task.predict(ema_state, z), atol=1e-6)


def test_dcgan_step_updates_g_through_the_updated_d_on_the_same_fakes():
    """The canonical DCGAN order (pytorch/examples `dcgan`): D on real + detached fakes, then
    G's gradient through the UPDATED D on those same fakes. Reference: the gradient of the whole
    composition `loss(D_new(G(params, z)))` by `jax.grad`, with z drawn as the step draws it."""
    import optax

    from medjax import losses
    from medjax.train.state import apply_model, step_key

    cfg = dcgan_medmnist.get_config("smoke")
    task = dcgan.Task(cfg)
    rng = np.random.default_rng(3)
    batch = {"image": rng.uniform(-1, 1, (4, 28, 28, 1)).astype(np.float32)}
    state = _tiny_state(task, batch)
    new, m = jax.jit(task.train_step)(state, batch)

    k_z, _ = jax.random.split(step_key(state))
    z = task.latent(k_z, 4)
    pd, sd = new.params["d"], new.batch_stats["d"]  # D after its update of this step

    def g_loss(pg):
        fake, _ = apply_model(task.generator, pg, state.batch_stats["g"], z, train=True)
        logits, _ = apply_model(task.discriminator, pd, sd, fake, train=True)
        return jnp.mean(losses.gan_generator_loss(logits, task.loss_kind))

    loss, grads = jax.value_and_grad(g_loss)(state.params["g"])
    np.testing.assert_allclose(m["g_loss"], loss, rtol=1e-5)
    mu = optax.tree_utils.tree_get(new.opt_state["g"], "mu")  # Adam's first moment: (1-b1) g
    b1 = float(cfg.optimizer_g.b1)
    for got, want in zip(jax.tree.leaves(mu), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(got, (1 - b1) * np.asarray(want), rtol=2e-4, atol=1e-7)


@pytest.mark.skipif(not _have("brain_tumor_progression_pgbm001"), reason="shared TCIA data missing")
def test_pix2pix_on_tcia_dicom_with_baselines_by_hand(tmp_path):
    from medjax.data import image_sets

    cfg = pix2pix_tcia.get_config("smoke")
    final = loop.run(cfg, tmp_path / "run")
    d = image_sets.load_tcia_series(
        paths.data_dir("brain_tumor_progression_pgbm001"), ("t1pre", "t2"), size=(32, 32)
    )
    lo, hi = cfg.data.val_slices
    src, tgt = d["image"][lo:hi, ..., 0], d["image"][lo:hi, ..., 1]
    mask = d["mask"][lo:hi]
    mae = [np.abs(s - t)[m].mean() for s, t, m in zip(src, tgt, mask, strict=True)]
    np.testing.assert_allclose(final["mae_identity"], np.mean(mae), rtol=1e-5)
    train = np.concatenate([d["image"][:lo, ..., 1], d["image"][hi:, ..., 1]])
    mean_img = train[: cfg.data.max_examples].mean(0)  # the smoke config caps the training set
    mae_mean = [np.abs(mean_img - t)[m].mean() for t, m in zip(tgt, mask, strict=True)]
    np.testing.assert_allclose(final["mae_mean_image"], np.mean(mae_mean), rtol=1e-5)
    assert 0 <= final["mae"] <= 2 and np.isfinite(final["psnr"])


@pytest.mark.skipif(not _have("medmnist_pneumoniamnist"), reason="shared MedMNIST data missing")
def test_dcgan_trains_on_medmnist_and_sample_script_writes_outputs(tmp_path):
    cfg = dcgan_medmnist.get_config("smoke")
    final = loop.run(cfg, tmp_path / "run")
    for k in ("swd_mean", "swd_mean_real", "swd_mean_trivial", "sample_std"):
        assert np.isfinite(final[k]), k
    images = sorted(p.name for p in (tmp_path / "run" / "images").iterdir())
    assert "samples_000002.png" in images and "eval_samples_000004.png" in images
    out = tmp_path / "samples"
    cmd = [sys.executable, str(ROOT / "scripts" / "sample.py"), "--workdir", str(tmp_path / "run")]
    cmd += ["--num", "5", "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cpu_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    samples = np.load(out / "samples.npz")["samples"]
    assert samples.shape == (5, 28, 28, 1) and np.abs(samples).max() <= 1
    assert len(list(out.glob("sample_*.png"))) == 5 and (out / "grid.png").exists()
    # the same latents as the run's evaluation noise: identical to generating in-process
    trainer, state = loop.restore(cfg, tmp_path / "run", best=False)
    np.testing.assert_allclose(samples, trainer.task.generate(trainer, state, 5), atol=1e-5)
    before = (out / "samples.npz").read_bytes()
    again = subprocess.run(cmd, capture_output=True, text=True, env=cpu_env(), timeout=300)
    assert again.returncode != 0 and "--overwrite" in again.stderr
    assert (out / "samples.npz").read_bytes() == before


@pytest.mark.skipif(not _have("brats2015_deepmedic_3d"), reason="shared BraTS data missing")
def test_vox2vox_segmentation_runs_on_volumes_and_samples_nifti(tmp_path):
    import nibabel as nib

    from medjax.train.evaluate import sample_workdir

    cfg = vox2vox_brats.get_config("seg,smoke")
    final = loop.run(cfg, tmp_path / "run")
    for k in ("dice_WT", "dice_TC", "dice_ET", "dice_mean"):
        assert 0 <= final[k] <= 1, k
    # the whole-brain baseline by hand: Dice = 2 |T & brain| / (|T| + |brain|)
    from medjax.data.volumes import BRATS_REGIONS
    from medjax.train.tasks import pix2pix

    vols = pix2pix.Task(cfg).load_data().eval["data"]
    for region, classes in BRATS_REGIONS.items():
        dice = []
        for v in vols:
            brain, t = v["image"][..., -1] > 0.5, np.isin(v["label"], classes)
            dice.append(2 * (brain & t).sum() / (brain.sum() + t.sum()))
        np.testing.assert_allclose(final[f"dice_{region}_brain"], np.mean(dice), rtol=1e-5)
    written = sample_workdir(tmp_path / "run", tmp_path / "out", num=1)
    probs = np.load(written["npz"])["samples"]
    assert probs.ndim == 5 and probs.shape[-1] == 4
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-4)  # class probabilities
    img = nib.load(written["sample_0"])
    assert img.shape == probs.shape[1:4]
