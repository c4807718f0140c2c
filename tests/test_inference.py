"""Sliding-window inference against hand-computed starts and a naive NumPy/SciPy blending loop."""

from __future__ import annotations

import functools
import itertools
import json
import math
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from scipy.signal import windows as sig_windows

from medjax.inference import (
    IMPORTANCE_FLOOR,
    gaussian_importance,
    sliding_window_inference,
    window_starts,
)
from tests.helpers import cpu_env

# ---------------------------------------------------------------- independent references


def ref_axis_starts(size: int, win: int, overlap: float) -> list[int]:
    """MONAI ``_get_scan_interval`` + ``dense_patch_slices`` for one axis, transcribed."""
    interval = int(win * (1 - overlap))
    interval = interval if interval > 0 else 1
    num = int(math.ceil(float(size) / interval))
    scan_dim = next((d for d in range(num) if d * interval + win >= size), None)
    num = scan_dim + 1 if scan_dim is not None else 1
    out = []
    for d in range(num):
        s = d * interval
        s -= max(s + win - size, 0)
        out.append(s)
    return sorted(set(out))


def ref_importance(win: tuple[int, ...], sigma_scale: float, mode: str) -> np.ndarray:
    if mode == "constant":
        return np.ones(win)
    m = np.ones(())
    for w in win:  # scipy's window is exp(-n^2 / (2 std^2)) with n centred at (w - 1) / 2
        m = np.multiply.outer(m, sig_windows.gaussian(w, std=sigma_scale * w, sym=True))
    return np.maximum(m / m.max(), IMPORTANCE_FLOOR)


def ref_sliding_window(fn, vol, win, overlap, sigma_scale=0.125, mode="gaussian", pad_value=0.0):
    """Loops over every window, one at a time, in float64."""
    vol = np.asarray(vol, np.float64)
    spatial = vol.shape[:-1]
    pads = []
    for s, w in zip(spatial, win, strict=True):
        diff = max(w - s, 0)
        pads.append((diff // 2, diff - diff // 2))
    vp = np.pad(vol, [*pads, (0, 0)], constant_values=pad_value)
    imp = ref_importance(win, sigma_scale, mode)[..., None]
    out = None
    wsum = np.zeros((*vp.shape[:-1], 1))
    per_axis = [ref_axis_starts(s, w, overlap) for s, w in zip(vp.shape[:-1], win, strict=True)]
    for start in itertools.product(*per_axis):
        sl = tuple(slice(a, a + w) for a, w in zip(start, win, strict=True))
        pred = np.asarray(fn(vp[sl][None]), np.float64)[0]
        if out is None:
            out = np.zeros((*vp.shape[:-1], pred.shape[-1]))
        out[sl] += pred * imp
        wsum[sl] += imp
    res = out / wsum
    crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(pads, spatial, strict=True))
    return res[crop]


def run(fn, vol, win, **kw):
    f = jax.jit(functools.partial(sliding_window_inference, fn, window=win, **kw))
    return np.asarray(f(jnp.asarray(vol, jnp.float32)))


def rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# Non-pointwise predict_fns: JAX versions and their NumPy twins.
MIX = np.array([[1.0, -0.5], [0.25, 2.0], [-1.0, 0.5]], np.float32)  # C_in=3 -> C_out=2


def mean_fn_jax(x):
    m = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)), keepdims=True)
    return jnp.broadcast_to(m @ MIX, (*x.shape[:-1], 2))


def mean_fn_np(x):
    m = x.mean(axis=tuple(range(1, x.ndim - 1)), keepdims=True)
    return np.broadcast_to(m @ MIX, (*x.shape[:-1], 2))


def _kernel(nd: int) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((3,) * nd + (3, 2)).astype(np.float32)


def conv_fn_jax(x):
    nd = x.ndim - 2
    k = jnp.asarray(_kernel(nd))
    sp = "DHW"[-nd:]
    dn = (f"N{sp}C", f"{sp}IO", f"N{sp}C")
    return jax.lax.conv_general_dilated(x, k, (1,) * nd, "SAME", dimension_numbers=dn)


def conv_fn_np(x):
    nd = x.ndim - 2
    k = _kernel(nd).astype(np.float64)
    out = np.zeros((*x.shape[:-1], k.shape[-1]))
    for b in range(x.shape[0]):
        for ci, co in itertools.product(range(k.shape[-2]), range(k.shape[-1])):
            out[b, ..., co] += ndimage.correlate(
                x[b, ..., ci], k[..., ci, co], mode="constant", cval=0.0
            )
    return out


# ---------------------------------------------------------------- window_starts


@pytest.mark.parametrize(
    "size,win,overlap,expected",
    [
        (10, 4, 0.5, [0, 2, 4, 6]),
        (9, 4, 0.5, [0, 2, 4, 5]),
        (10, 4, 0.0, [0, 4, 6]),
        (10, 4, 0.25, [0, 3, 6]),
        (8, 4, 0.0, [0, 4]),
        (4, 4, 0.5, [0]),
        (3, 4, 0.5, [0]),  # padded to the window
        (5, 4, 0.9, [0, 1]),  # stride int(0.4) -> 1
    ],
)
def test_window_starts_hand_computed(size, win, overlap, expected):
    assert window_starts((size,), (win,), overlap) == [(s,) for s in expected]
    assert ref_axis_starts(max(size, win), win, overlap) == expected


def test_window_starts_cartesian_product_last_axis_fastest():
    got = window_starts((9, 6), (4, 4), 0.5)
    assert got == [(a, b) for a in (0, 2, 4, 5) for b in (0, 2)]


@pytest.mark.parametrize("overlap", [-0.1, 1.0])
def test_window_starts_rejects_bad_overlap(overlap):
    with pytest.raises(ValueError, match="overlap"):
        window_starts((10,), (4,), overlap)


# ---------------------------------------------------------------- gaussian_importance


@pytest.mark.parametrize("win", [(7,), (8, 5), (6, 7, 9)])
def test_gaussian_importance_explicit_formula(win):
    sigma_scale = 0.125
    got = np.asarray(gaussian_importance(win, sigma_scale))
    grids = np.meshgrid(*[np.arange(w, dtype=np.float64) for w in win], indexing="ij")
    expo = sum(
        (g - (w - 1) / 2) ** 2 / (2 * (sigma_scale * w) ** 2)
        for g, w in zip(grids, win, strict=True)
    )
    want = np.exp(-expo)
    want = np.maximum(want / want.max(), IMPORTANCE_FLOOR)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
    centre = tuple(w // 2 for w in win)
    assert got[centre] == pytest.approx(1.0) and got.max() == pytest.approx(1.0)
    assert got.dtype == np.float32


def test_gaussian_importance_floor_keeps_every_voxel_positive():
    got = np.asarray(gaussian_importance((31, 31), sigma_scale=0.01))
    assert got.min() == pytest.approx(IMPORTANCE_FLOOR)
    assert got[15, 15] == 1.0


# ---------------------------------------------------------------- pointwise fns: exact identity


def affine(x):
    return 2.0 * x + 1.0


@pytest.mark.parametrize(
    "shape,win,overlap,wb,mode",
    [
        ((20, 17), (8, 6), 0.5, 1, "gaussian"),
        ((20, 17), (8, 6), 0.25, 3, "gaussian"),
        ((20, 17), (8, 6), 0.0, 3, "constant"),
        ((5, 17), (8, 6), 0.5, 3, "gaussian"),  # smaller than the window on axis 0
        ((20, 17, 13), (8, 6, 5), 0.5, 3, "gaussian"),
        ((20, 17, 13), (8, 6, 5), 0.25, 1, "constant"),
        ((20, 17, 13), (8, 6, 5), 0.0, 3, "gaussian"),
        ((20, 4, 13), (8, 6, 5), 0.5, 3, "gaussian"),  # padding on the middle axis
    ],
)
def test_pointwise_fn_is_reproduced(shape, win, overlap, wb, mode):
    vol = rand((*shape, 2))
    got = run(affine, vol, win, overlap=overlap, window_batch=wb, mode=mode)
    assert got.shape == vol.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, 2.0 * vol + 1.0, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- non-pointwise fns vs NumPy loop


@pytest.mark.parametrize(
    "fns,shape,win,overlap,wb,mode",
    [
        ((mean_fn_jax, mean_fn_np), (20, 17), (8, 6), 0.5, 3, "gaussian"),
        ((mean_fn_jax, mean_fn_np), (20, 17, 13), (8, 6, 5), 0.25, 3, "gaussian"),
        ((mean_fn_jax, mean_fn_np), (5, 17, 13), (8, 6, 5), 0.5, 2, "constant"),
        ((conv_fn_jax, conv_fn_np), (20, 17), (8, 6), 0.5, 3, "gaussian"),
        ((conv_fn_jax, conv_fn_np), (20, 17, 13), (8, 6, 5), 0.5, 4, "gaussian"),
        ((conv_fn_jax, conv_fn_np), (20, 4, 13), (8, 6, 5), 0.0, 1, "constant"),
    ],
)
def test_non_pointwise_fn_matches_numpy_loop(fns, shape, win, overlap, wb, mode):
    fn_jax, fn_np = fns
    vol = rand((*shape, 3), seed=1)
    got = run(fn_jax, vol, win, overlap=overlap, window_batch=wb, mode=mode, pad_value=0.5)
    want = ref_sliding_window(fn_np, vol, win, overlap, mode=mode, pad_value=0.5)
    assert got.shape == (*shape, 2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sigma_scale_is_used():
    vol = rand((20, 17, 3), seed=2)
    got = run(conv_fn_jax, vol, (8, 6), overlap=0.5, window_batch=2, sigma_scale=0.3)
    want = ref_sliding_window(conv_fn_np, vol, (8, 6), 0.5, sigma_scale=0.3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_result_does_not_depend_on_window_batch():
    vol = rand((20, 17, 13, 3), seed=3)
    a = run(conv_fn_jax, vol, (8, 6, 5), overlap=0.5, window_batch=1)
    b = run(conv_fn_jax, vol, (8, 6, 5), overlap=0.5, window_batch=5)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_predict_fn_traced_once_on_the_window_batch():
    seen = []

    def fn(x):
        seen.append(x.shape)
        return x[..., :1]

    vol = rand((20, 17, 2))
    n = len(window_starts((20, 17), (8, 6), 0.5))
    assert n == 4 * 5 and n % 3  # starts (0, 4, 8, 12) x (0, 3, 6, 9, 11); last group filled
    run(fn, vol, (8, 6), overlap=0.5, window_batch=3)
    assert seen[-1] == (3, 8, 6, 2) and len(seen) <= 2  # eval_shape + the scan body


# ---------------------------------------------------------------- errors


def test_bad_inputs_are_named():
    vol = jnp.zeros((10, 10, 1))
    with pytest.raises(ValueError, match="spatial axes"):
        sliding_window_inference(affine, vol, (4, 4, 4))
    with pytest.raises(ValueError, match="mode"):
        sliding_window_inference(affine, vol, (4, 4), mode="gauss")
    with pytest.raises(ValueError, match="window_batch"):
        sliding_window_inference(affine, vol, (4, 4), window_batch=0)
    with pytest.raises(ValueError, match="window"):
        sliding_window_inference(affine, vol, (4, 0))
    with pytest.raises(ValueError, match="predict_fn"):
        sliding_window_inference(lambda x: x[:, :2], vol, (4, 4))


# ---------------------------------------------------------------- 8 simulated devices

_SHARDED_SCRIPT = textwrap.dedent(
    """
    import functools, json
    import jax, jax.numpy as jnp, numpy as np
    from medjax.inference import sliding_window_inference
    from medjax.parallel import data_sharding, make_mesh

    assert jax.device_count() == 8, jax.devices()
    k = jnp.asarray(np.random.default_rng(0).standard_normal((3, 3, 3, 2, 3)), jnp.float32)

    def fn(x):
        dn = ("NDHWC", "DHWIO", "NDHWC")
        return jax.lax.conv_general_dilated(x, k, (1, 1, 1), "SAME", dimension_numbers=dn)

    vol = jnp.asarray(np.random.default_rng(1).standard_normal((20, 17, 13, 2)), jnp.float32)
    kw = dict(window=(8, 6, 5), overlap=0.5, window_batch=8)
    plain = jax.jit(functools.partial(sliding_window_inference, fn, **kw))(vol)
    sh = data_sharding(make_mesh())
    sharded = jax.jit(
        functools.partial(sliding_window_inference, fn, window_sharding=sh, **kw)
    )(vol)
    try:
        sliding_window_inference(fn, vol, (8, 6, 5), window_batch=4, window_sharding=sh)
        raised = ""
    except ValueError as e:
        raised = str(e)
    # The trainer spreads ANY window batch over the 8 devices (3 -> 8, padded with weight 0).
    import ml_collections
    from medjax.train.loop import Trainer

    class Conv:  # a task whose model is the convolution above, its state the kernel
        accumulates_gradients = False

        def predict(self, state, x):
            dn = ("NDHWC", "DHWIO", "NDHWC")
            return jax.lax.conv_general_dilated(x, state, (1, 1, 1), "SAME", dimension_numbers=dn)

    cfg = ml_collections.ConfigDict(
        {"seed": 0, "patch_size": (8, 6, 5), "inference": {"window_batch": 3, "overlap": 0.5}}
    )
    trainer = Trainer(cfg, task=Conv(), mesh=make_mesh())
    trainer.model_sh = trainer.rep
    via_trainer = trainer.sliding_window(k, np.asarray(vol))
    print(json.dumps({"diff": float(jnp.max(jnp.abs(plain - sharded))), "raised": raised,
                      "trainer_diff": float(np.max(np.abs(np.asarray(plain) - via_trainer)))}))
    """
)


def test_sharded_windows_equal_unsharded_on_8_cpu_devices():
    env = cpu_env(devices=8)
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["diff"] < 1e-5
    assert "multiple of the 8 devices" in report["raised"]
    assert report["trainer_diff"] < 1e-5
