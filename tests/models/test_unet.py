"""Behavioural tests of medjax.models.unet.UNet (shapes, dtypes, norms, equivalence, training)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medjax.models import UNet, UNet2D, UNet3D


def _rand(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _init(module: nn.Module, *args, seed: int = 0, **kwargs):
    """Variables filled from numpy (``jax.random`` compiles slowly on this CPU).

    Kernels ~ N(0, 1/fan_in) (LeCun), biases/offsets 0, scales 1, batch stats mean 0 var 1.
    """
    shapes = jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a, **kwargs), *args)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("var", "scale"):
            return jnp.ones(leaf.shape, leaf.dtype)
        if name == "kernel":
            z = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
            return jnp.asarray(z, leaf.dtype)
        return jnp.zeros(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


CASES = [
    # (spatial_dims, input spatial shape, extra kwargs)
    (2, (19, 23), {}),
    (2, (17, 16), {"norm": "group", "residual": True}),
    (2, (13, 21), {"norm": "none", "attention_gates": True, "activation": "gelu"}),
    (2, (16, 15), {"norm": "batch", "activation": "relu", "downsample": "conv"}),
    (3, (11, 9, 13), {}),
    (3, (9, 12, 11), {"residual": True, "attention_gates": True, "activation": "silu"}),
    (3, (10, 9, 11), {"norm": "batch", "activation": "elu", "downsample": "conv"}),
]


@pytest.mark.parametrize("d,spatial,kw", CASES)
def test_output_shape_and_dtype(d, spatial, kw):
    x = _rand((2, *spatial, 2))
    model = UNet(3, features=(4, 8, 8), spatial_dims=d, **kw)
    v = _init(model, x)
    if kw.get("norm") == "batch":
        y, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
        # running statistics moved away from their initial values
        moved = jax.tree.map(
            lambda a, b: bool(jnp.any(a != b)), upd["batch_stats"], v["batch_stats"]
        )
        assert all(jax.tree.leaves(moved))
    else:
        y = jax.jit(lambda v, x: model.apply(v, x, train=True))(v, x)
    assert y.shape == (2, *spatial, 3)
    assert y.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y)))


def test_conventional_param_shapes_and_no_bias_before_norm():
    x = _rand((1, 9, 8, 7, 1))
    model = UNet3D(2, features=(4, 6))
    p = _init(model, x)["params"]
    assert p["enc0"]["conv0"]["conv"]["kernel"].shape == (3, 3, 3, 1, 4)
    assert "bias" not in p["enc0"]["conv0"]["conv"]
    assert p["up0"]["kernel"].shape == (2, 2, 2, 6, 4)
    assert p["dec0"]["conv0"]["conv"]["kernel"].shape == (3, 3, 3, 8, 4)
    assert p["head"]["kernel"].shape == (1, 1, 1, 4, 2)
    assert p["head"]["bias"].shape == (2,)


def test_fast_equals_plain_formulation():
    # Same parameters, fast=True (folded 3D convs, pixel-shuffle up-sampling, 1x1 as matmul)
    # vs fast=False (plain lax convolutions): same logits.
    x = _rand((1, 9, 10, 11, 2))
    kw = dict(features=(4, 8, 8), attention_gates=True)
    v = _init(UNet3D(3, **kw), x)
    y_fast = jax.jit(UNet3D(3, fast=True, **kw).apply)(v, x)
    y_plain = jax.jit(UNet3D(3, fast=False, **kw).apply)(v, x)
    np.testing.assert_allclose(y_fast, y_plain, atol=1e-4, rtol=1e-4)


def test_bf16_compute_dtype():
    x = _rand((1, 20, 18, 1))
    model = UNet2D(2, features=(4, 8, 8), dtype=jnp.bfloat16, attention_gates=True)
    v = _init(model, x)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(v))
    y = jax.jit(model.apply)(v, x)
    assert y.dtype == jnp.float32 and y.shape == (1, 20, 18, 2)
    y32 = jax.jit(UNet2D(2, features=(4, 8, 8), attention_gates=True).apply)(v, x)
    # bf16 compute approximates the float32 result
    assert float(jnp.max(jnp.abs(y - y32))) < 0.1 * float(jnp.max(jnp.abs(y32))) + 0.05


def test_batch_norm_eval_is_deterministic_per_sample():
    # eval mode uses running statistics: a sample's output doesn't depend on the batch
    x = _rand((2, 12, 12, 1))
    model = UNet2D(2, features=(4, 8), norm="batch")
    v = _init(model, x)
    apply = jax.jit(model.apply)
    np.testing.assert_allclose(apply(v, x)[:1], apply(v, x[:1]), atol=1e-5)


def test_too_small_input_raises():
    with pytest.raises(ValueError):
        _init(UNet2D(2, features=(4, 4, 4, 4)), jnp.zeros((1, 6, 6, 1)))


def test_overfits_one_example():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 16, 16, 1)), jnp.float32)
    yy, xx = np.mgrid[:16, :16]
    labels = jnp.asarray(((yy - 7) ** 2 + (xx - 9) ** 2 < 20).astype(np.int32) + (xx > 12))[None]
    model = UNet2D(3, features=(8, 16))
    params = _init(model, x)["params"]
    tx = optax.adam(1e-2)
    opt = tx.init(params)

    def loss_fn(p):
        logits = model.apply({"params": p}, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(p, o):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    losses = []
    for _ in range(30):
        params, opt, loss = step(params, opt)
        losses.append(float(loss))
    assert losses[-1] < 0.2 * losses[0], losses
    pred = jnp.argmax(model.apply({"params": params}, x), axis=-1)
    assert float(jnp.mean(pred == labels)) > 0.95
