"""Tests of the GAN generators/discriminators and the classifier against independent references.

References: hand-computed sizes, receptive fields and parameter counts of the PyTorch
pytorch-CycleGAN-and-pix2pix models, numpy (``np.pad``, sliding-window convolution,
``np.linalg.svd``) and plain ``lax`` convolutions.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from medjax.models import (
    Classifier,
    DCGANDiscriminator,
    DCGANGenerator,
    PatchGAN,
    ResnetBlock,
    ResnetGenerator,
    UNetGenerator,
    dcgan_num_upsamples,
    patchgan_output_shape,
    patchgan_receptive_field,
    reflect_pad,
)
from tests.helpers import jit_grad, randn, random_variables

_rand = randn
_init = random_variables


def _apply(module: nn.Module, v, *args, **kwargs):
    """``module.apply`` under ``jit`` (one compilation instead of one per eager op)."""
    return jax.jit(lambda v, *a: module.apply(v, *a, **kwargs))(v, *args)


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _param_shapes(module: nn.Module, x_shape):
    v = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), jnp.zeros(x_shape))
    return v["params"]


# ------------------------------------------------------------------ numpy references


def _np_conv_full(x, k, stride=1):
    d = x.ndim - 2
    ks = k.shape[:d]
    win = np.lib.stride_tricks.sliding_window_view(x, ks, axis=tuple(range(1, d + 1)))
    win = win[(slice(None),) + (slice(None, None, stride),) * d]
    sp, kk = "pqr"[:d], "uvw"[:d]
    return np.einsum(f"b{sp}i{kk},{kk}io->b{sp}o", win, k, optimize=True)


def _np_instance_norm(x, eps=1e-5):
    axes = tuple(range(1, x.ndim - 1))
    mu = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    return (x - mu) / np.sqrt(var + eps)


# ------------------------------------------------------------------ DCGAN


def test_dcgan_num_upsamples_hand_values():
    assert dcgan_num_upsamples((28, 28)) == 2  # 28 -> 14 -> 7
    assert dcgan_num_upsamples((64, 64)) == 4  # 64 -> ... -> 4
    assert dcgan_num_upsamples((32, 32, 32)) == 3
    assert dcgan_num_upsamples((6, 6)) == 0
    assert dcgan_num_upsamples((28, 64)) == 2


@pytest.mark.parametrize(
    "d,shape,ups", [(2, (28, 28), 2), (2, (64, 64), 4), (3, (8, 8, 12), 1)], ids=str
)
def test_dcgan_generator_shapes_and_range(d, shape, ups):
    g = DCGANGenerator(shape, channels=2, latent_dim=8, base_features=16, min_features=4,
                       spatial_dims=d)  # fmt: skip
    z = _rand((3, 8))
    v = _init(g, z)
    ups_found = sorted(k for k in v["params"] if k.startswith("up") and "norm" not in k)
    assert ups_found == [f"up{i}" for i in range(1, ups + 1)]
    # channels halve per up-sampling down to min_features: 16 -> 8 -> 4 -> 4 -> 4
    for i in range(1, ups + 1):
        assert v["params"][f"up{i}"]["kernel"].shape[-1] == max(16 // 2**i, 4)
    y, upd = _apply(g, v, z, train=True, mutable=["batch_stats"])
    assert y.shape == (3, *shape, 2) and y.dtype == jnp.float32
    assert np.all(np.abs(np.asarray(y)) < 1)
    assert set(upd["batch_stats"]) == set(v["batch_stats"])


@pytest.mark.parametrize("d,shape", [(2, (28, 28)), (3, (8, 8, 8))], ids=str)
def test_dcgan_generator_transpose_head_is_the_last_up_sampling(d, shape):
    """head='transpose' (Radford et al.): the last up-sampling stage is the output layer, a
    kernel-4 stride-2 transposed convolution to `channels` with a bias and no norm, then tanh --
    checked against lax.conv_transpose on the stage before it."""
    g = DCGANGenerator(shape, channels=3, latent_dim=8, base_features=16, min_features=4,
                       head="transpose", spatial_dims=d)  # fmt: skip
    z = _rand((2, 8))
    v = _init(g, z)
    n = dcgan_num_upsamples(shape)
    assert "conv_out" not in v["params"]
    assert sorted(k for k in v["params"] if k.startswith("up") and "norm" not in k) == [
        *(f"up{i}" for i in range(1, n)), "up_out"]  # fmt: skip
    assert sorted(k for k in v["batch_stats"] if k.startswith("up_norm")) == [
        f"up_norm{i}" for i in range(1, n)]  # fmt: skip
    out = v["params"]["up_out"]
    assert out["kernel"].shape == (4,) * d + (max(16 // 2 ** (n - 1), 4), 3)
    y, state = g.apply(v, z, capture_intermediates=True, mutable=["intermediates"])
    last = state["intermediates"][f"up_norm{n - 1}" if n > 1 else "fc_norm"]["__call__"][0]
    h = jnp.maximum(last, 0)
    ref = lax.conv_transpose(h, out["kernel"], (2,) * d, "SAME",
                             dimension_numbers=(("NHWC", "HWIO", "NHWC") if d == 2 else
                                                ("NDHWC", "DHWIO", "NDHWC")))  # fmt: skip
    np.testing.assert_allclose(y, np.tanh(ref + out["bias"]), rtol=1e-4, atol=1e-5)
    assert y.shape == (2, *shape, 3)
    with pytest.raises(ValueError, match="'deconv'"):
        DCGANGenerator(shape, latent_dim=8, head="deconv", spatial_dims=d).init(
            jax.random.key(0), z)  # fmt: skip
    with pytest.raises(ValueError, match="num_upsamples >= 1"):
        DCGANGenerator(shape, latent_dim=8, head="transpose", num_upsamples=0,
                       spatial_dims=d).init(jax.random.key(0), z)  # fmt: skip


def test_dcgan_generator_bfloat16_output_is_float32():
    g = DCGANGenerator((8, 8), latent_dim=4, base_features=8, dtype=jnp.bfloat16)
    z = _rand((2, 4))
    y = _apply(g, _init(g, z), z)
    assert y.dtype == jnp.float32 and y.shape == (2, 8, 8, 1)


def test_dcgan_generator_invalid_shapes():
    z = _rand((1, 8))
    with pytest.raises(ValueError, match=r"\(28, 28\)"):
        DCGANGenerator((28, 28), latent_dim=8, num_upsamples=3).init(jax.random.key(0), z)
    with pytest.raises(ValueError, match=r"\(28, 28\)"):
        DCGANGenerator((28, 28), latent_dim=8, spatial_dims=3).init(jax.random.key(0), z)
    with pytest.raises(ValueError, match=r"\(1, 8\)"):
        DCGANGenerator((28, 28), latent_dim=16).init(jax.random.key(0), z)


@pytest.mark.parametrize("d,norm", [(2, "batch"), (2, "layer"), (3, "none"), (3, "batch")])
def test_dcgan_discriminator_logits_and_batch_independence(d, norm):
    m = DCGANDiscriminator(features=(4, 8), norm=norm, spatial_dims=d)
    x = _rand((3, *(7,) * d, 2))
    v = _init(m, x)
    y = _apply(m, v, x)
    assert y.shape == (3,) and y.dtype == jnp.float32
    # Training mode: batch norm couples the examples; layer norm / no norm (the WGAN-GP
    # choices) keep each logit a function of its own example only.
    x2 = x.at[1:].multiply(3.0)
    f = jax.jit(lambda x: m.apply(v, x, train=True, mutable=["batch_stats"])[0])
    y1, y2 = f(x), f(x2)
    coupled = not np.allclose(y1[0], y2[0], atol=1e-6)
    assert coupled == (norm == "batch")


# ------------------------------------------------------------------ spectral norm


def _power_iterate(module, v, x, steps=60):
    step = jax.jit(lambda v: module.apply(v, x, train=True, mutable=["batch_stats"])[1])
    for _ in range(steps):
        v = {"params": v["params"], **step(v)}
    return v


def _check_spectral(v, sn_names, expect):
    assert sorted(v["batch_stats"]) == sorted(sn_names)
    for sn, layer in zip(sn_names, expect, strict=True):
        w = np.asarray(v["params"][layer]["kernel"], np.float64)
        w = w.reshape(-1, w.shape[-1])
        sigma_np = np.linalg.svd(w, compute_uv=False)[0]
        sigma = float(v["batch_stats"][sn][f"{layer}/kernel/sigma"])
        np.testing.assert_allclose(sigma, sigma_np, rtol=1e-3)
        # the effective (normalised) kernel has largest singular value 1
        top = np.linalg.svd(w / sigma, compute_uv=False)[0]
        np.testing.assert_allclose(top, 1.0, rtol=1e-3)


def test_spectral_norm_dcgan_discriminator_vs_numpy_svd():
    m = DCGANDiscriminator(features=(4, 6), norm="none", spectral_norm=True)
    x = _rand((2, 8, 8, 3))
    v = _power_iterate(m, _init(m, x), x)
    _check_spectral(v, ["sn0", "sn1", "sn_fc"], ["conv0", "conv1", "fc"])


def test_spectral_norm_forward_uses_normalised_kernel():
    # One conv + dense: the output must equal the plain-lax computation with kernels divided
    # by their numpy largest singular values.
    m = DCGANDiscriminator(features=(5,), norm="none", spectral_norm=True)
    x = _rand((2, 6, 6, 3), 1)
    v = _power_iterate(m, _init(m, x), x)
    p = v["params"]
    k = np.asarray(p["conv0"]["kernel"], np.float64)
    k = k / np.linalg.svd(k.reshape(-1, 5), compute_uv=False)[0]
    h = lax.conv_general_dilated(
        x, jnp.asarray(k, jnp.float32), (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    h = nn.leaky_relu(h + p["conv0"]["bias"], 0.2).reshape(2, -1)
    wd = np.asarray(p["fc"]["kernel"])
    ref = h @ (wd / np.linalg.norm(wd)) + p["fc"]["bias"]
    np.testing.assert_allclose(_apply(m, v, x), np.asarray(ref)[:, 0], rtol=1e-4, atol=1e-5)


def test_spectral_norm_patchgan_3d_vs_numpy_svd():
    m = PatchGAN(features=3, num_layers=1, norm="instance", spectral_norm=True, spatial_dims=3)
    x = _rand((1, 6, 6, 6, 2))
    v = _power_iterate(m, _init(m, x), x)
    _check_spectral(v, ["sn0", "sn1", "sn2"], ["conv0", "conv1", "conv2"])


# ------------------------------------------------------------------ PatchGAN


def test_patchgan_receptive_field_hand_values():
    # Backwards r <- (r - 1) * s + k over [k4 s1, k4 s1, n x k4 s2]:
    # 1 -> 4 -> 7 -> 16 -> 34 -> 70 -> 142 -> 286 (pix2pix's 16/70/286 PatchGANs).
    assert patchgan_receptive_field(1) == 16
    assert patchgan_receptive_field(2) == 34
    assert patchgan_receptive_field(3) == 70
    assert patchgan_receptive_field(5) == 286


def test_patchgan_output_grid_256_is_30():
    # PyTorch: 256 -(k4 s2 p1)-> 128 -> 64 -> 32 -(k4 s1 p1)-> 31 -> 30.
    assert patchgan_output_shape((256, 256), 3) == (30, 30)
    m = PatchGAN()
    v = jax.eval_shape(lambda x: m.init(jax.random.key(0), x), jnp.zeros((1, 256, 256, 6)))
    y = jax.eval_shape(lambda v, x: m.apply(v, x), v, jnp.zeros((1, 256, 256, 6)))
    assert y.shape == (1, 30, 30, 1) and y.dtype == jnp.float32


@pytest.mark.parametrize(
    "d,layers,size,grid", [(2, 2, 20, (3, 2)), (3, 1, 7, (1, 1, 1))], ids=["2d", "3d"]
)
def test_patchgan_forward_shapes(d, layers, size, grid):
    # 2D (20, 17): 20 -> 10 -> 5 -> 4 -> 3 and 17 -> 8 -> 4 -> 3 -> 2 (floor at odd sizes).
    # 3D 7: 7 -> 3 -> 2 -> 1.
    spatial = (20, 17) if d == 2 else (size,) * 3
    m = PatchGAN(features=4, num_layers=layers, spatial_dims=d)
    x = _rand((2, *spatial, 3))
    y = _apply(m, _init(m, x), x)
    assert y.shape == (2, *grid, 1) and y.dtype == jnp.float32
    with pytest.raises(ValueError, match=r"\(5, 5\)"):
        PatchGAN(num_layers=2).init(jax.random.key(0), jnp.zeros((1, 5, 5, 1)))


@pytest.mark.parametrize(
    "d,layers,size,cell,start",
    # Cell o sees inputs [J*o - P, J*o - P + RF - 1]: jump J = 2**layers, offset
    # P = 1 + 2 + ... + 2**(layers-1) + 2 * 2**layers (each layer's padding 1 times the jump
    # before it): 2D 3 layers: J=8, P=23, cell 4 -> [9, 78]; 3D 1 layer: J=2, P=5, 5 -> [5, 20].
    [(2, 3, 96, 4, 9), (3, 1, 24, 5, 5)],
    ids=["2d_70", "3d_16"],
)
def test_patchgan_receptive_field_by_gradient_support(d, layers, size, cell, start):
    rf = patchgan_receptive_field(layers)
    # batch norm in eval mode acts per position, so locality is exact
    m = PatchGAN(features=2, num_layers=layers, norm="batch", spatial_dims=d)
    x = _rand((1, *(size,) * d, 1), 3)
    v = _init(m, x, seed=1)
    idx = (0, *(cell,) * d, 0)
    g = np.asarray(jit_grad(lambda x: m.apply(v, x)[idx])(x))[0, ..., 0]
    for ax in range(d):
        nz = np.nonzero(np.abs(g).sum(axis=tuple(a for a in range(d) if a != ax)))[0]
        assert nz[0] == start and nz[-1] - nz[0] + 1 == rf
    # the extreme cells reach the image border: their (clipped) support is shorter
    g0 = np.asarray(jit_grad(lambda x: m.apply(v, x)[(0,) * (d + 2)])(x))[0, ..., 0]
    nz0 = np.nonzero(np.abs(g0).sum(axis=tuple(range(1, d))))[0]
    offset = cell * 2**layers - start  # P above
    assert nz0[0] == 0 and nz0[-1] == rf - offset - 1


def test_patchgan_receptive_field_by_impulse():
    # One perturbed pixel p changes the cells o with 8o - 23 <= p <= 8o + 46: p = 48 -> o in
    # [1, 8] on each axis, 64 cells of the 10x10 grid.
    m = PatchGAN(features=2, num_layers=3, norm="batch")
    x = _rand((1, 96, 96, 1), 4)
    v = _init(m, x, seed=2)
    f = jax.jit(lambda x: m.apply(v, x))
    diff = np.abs(np.asarray(f(x.at[0, 48, 48, 0].add(10.0)) - f(x)))[0, ..., 0]
    changed = diff > 1e-4
    rows, cols = np.nonzero(changed)
    assert changed.sum() == 64
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (1, 8, 1, 8)


def test_patchgan_parameter_counts_match_pytorch():
    # pix2pix D: input_nc = 6 (condition + image), ndf = 64, n_layers = 3.
    # Batch norm: convs followed by BN have no bias; BN has scale + bias.
    batch = (
        (6 * 64 * 16 + 64)
        + (64 * 128 * 16 + 2 * 128)
        + (128 * 256 * 16 + 2 * 256)
        + (256 * 512 * 16 + 2 * 512)
        + (512 * 1 * 16 + 1)
    )
    assert batch == 2_768_705
    assert _count(_param_shapes(PatchGAN(64, 3, "batch"), (1, 32, 32, 6))) == batch
    # CycleGAN D: instance norm without affine, every conv with bias.
    inst = (
        (6 * 64 * 16 + 64)
        + (64 * 128 * 16 + 128)
        + (128 * 256 * 16 + 256)
        + (256 * 512 * 16 + 512)
        + (512 * 16 + 1)
    )
    assert _count(_param_shapes(PatchGAN(64, 3, "instance"), (1, 32, 32, 6))) == inst


# ------------------------------------------------------------------ ResNet generator


@pytest.mark.parametrize("d", [2, 3])
def test_reflect_pad_matches_numpy(d):
    x = _rand((2, *(4, 5, 6)[:d], 2))
    ref = np.pad(np.asarray(x), [(0, 0)] + [(3, 3)] * d + [(0, 0)], mode="reflect")
    np.testing.assert_array_equal(reflect_pad(x, 3), ref)
    with pytest.raises(ValueError, match=r"\(2, 4, 5"):
        reflect_pad(x, 4)


@pytest.mark.parametrize("d,pad", [(2, 3), (2, 1), (3, 2)])
def test_reflect_pad_gradient_is_its_transpose(d, pad):
    # the written-out VJP against the transpose built from numpy's index map: every padded
    # position's gradient goes to the input sample np.pad copied there
    shape = (2, *(4, 5, 6)[:d], 3)
    x = _rand(shape)
    dy = np.asarray(_rand(reflect_pad(x, pad).shape, 1), np.float64)
    spatial = int(np.prod(shape[1:-1]))
    index = np.pad(
        np.arange(spatial).reshape(shape[1:-1]), [(pad, pad)] * d, mode="reflect"
    ).ravel()
    want = np.zeros((shape[0], spatial, shape[-1]))
    np.add.at(want, (slice(None), index), dy.reshape(shape[0], -1, shape[-1]))
    got = jax.vjp(lambda x: reflect_pad(x, pad), x)[1](jnp.asarray(dy, jnp.float32))[0]
    np.testing.assert_allclose(got, want.reshape(shape), atol=1e-5)

    # differentiated again (a gradient penalty through it), against jnp.pad's own rules
    def penalty(pad_fn):
        def p(x):
            g = jax.grad(lambda x: jnp.sum(jnp.sin(pad_fn(x)) * dy))(x)
            return jnp.sum(g**2)

        return jax.grad(p)(x)

    plain = penalty(lambda x: jnp.pad(x, [(0, 0)] + [(pad, pad)] * d + [(0, 0)], mode="reflect"))
    np.testing.assert_allclose(penalty(lambda x: reflect_pad(x, pad)), plain, atol=1e-4)


@pytest.mark.parametrize("d", [2, 3])
def test_resnet_block_equals_hand_formula(d):
    spatial = (5, 6) if d == 2 else (3, 4, 5)
    x = _rand((2, *spatial, 3))
    blk = ResnetBlock(3, norm="instance", spatial_dims=d)
    v = _init(blk, x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    assert set(p) == {"conv0", "conv1"}  # affine-free instance norm: no norm params

    def conv(h, name):
        hp = np.pad(h, [(0, 0)] + [(1, 1)] * d + [(0, 0)], mode="reflect")
        return _np_conv_full(hp, p[name]["kernel"]) + p[name]["bias"]

    xn = np.asarray(x, np.float64)
    h = np.maximum(_np_instance_norm(conv(xn, "conv0")), 0)
    ref = xn + _np_instance_norm(conv(h, "conv1"))
    np.testing.assert_allclose(_apply(blk, v, x), ref, atol=1e-4)


@pytest.mark.parametrize("d,spatial", [(2, (16, 12)), (3, (8, 8, 8))], ids=["2d", "3d"])
def test_resnet_generator_shapes_and_range(d, spatial):
    g = ResnetGenerator(2, features=2, num_blocks=2, num_downsamples=2, spatial_dims=d)
    x = _rand((1, *spatial, 3))
    v = _init(g, x)
    y = _apply(g, v, x)
    assert y.shape == (1, *spatial, 2) and y.dtype == jnp.float32
    assert np.all(np.abs(np.asarray(y)) < 1)
    assert v["params"]["block1"]["conv0"]["kernel"].shape == (3,) * d + (8, 8)
    bad = (18, 16) if d == 2 else (8, 8, 6)
    with pytest.raises(ValueError, match=str(bad).replace("(", r"\(").replace(")", r"\)")):
        g.init(jax.random.key(0), jnp.zeros((1, *bad, 3)))


def test_resnet_generator_parameter_count():
    # pytorch-CycleGAN ResnetGenerator(3, 3, ngf=64, n_blocks=9), instance norm (affine=False,
    # so every conv has a bias): c7 in, two k3 s2 downs, 9 blocks of two k3 convs,
    # two ConvTranspose2d k3 ups, c7 out. (11,383,427 -- the figure one finds for "Flax
    # defaults" -- is this with an affine instance norm and no conv bias before the norms.)
    down_res = (
        (3 * 64 * 49 + 64)
        + (64 * 128 * 9 + 128)
        + (128 * 256 * 9 + 256)
        + 9 * 2 * (256 * 256 * 9 + 256)
        + (64 * 3 * 49 + 3)
    )
    pytorch = down_res + (256 * 128 * 9 + 128) + (128 * 64 * 9 + 64)
    assert pytorch == 11_378_179
    # medjax: the same with kernel-4 transposed convolutions.
    ours = down_res + (256 * 128 * 16 + 128) + (128 * 64 * 16 + 64)
    g = ResnetGenerator(3, features=64, num_blocks=9, norm="instance")
    assert _count(_param_shapes(g, (1, 64, 64, 3))) == ours == 11_664_899


# ------------------------------------------------------------------ U-Net generator


@pytest.mark.parametrize("d,spatial,downs", [(2, (16, 32), 4), (3, (8, 8, 8), 3)], ids=str)
def test_unet_generator_shapes_and_range(d, spatial, downs):
    g = UNetGenerator(2, features=4, max_features=8, num_downs=downs, spatial_dims=d)
    x = _rand((2, *spatial, 3))
    v = _init(g, x)
    y = _apply(g, v, x)
    assert y.shape == (2, *spatial, 2) and y.dtype == jnp.float32
    assert np.all(np.abs(np.asarray(y)) < 1)
    # channels: min(4 * 2**i, 8); decoder level i maps to level i-1's channels
    assert v["params"][f"down{downs - 1}"]["kernel"].shape[-1] == 8
    assert v["params"]["up1"]["kernel"].shape[-2:] == (16, 4)  # [skip 8, up 8] -> 4
    logits = _apply(UNetGenerator(2, 4, 8, downs, spatial_dims=d, final_activation="none"), v, x)
    np.testing.assert_allclose(np.tanh(logits), y, atol=1e-6)
    bad = (2, 12, 32, 3) if d == 2 else (2, 8, 8, 4, 3)
    with pytest.raises(ValueError, match=r"\(12, 32\)" if d == 2 else r"\(8, 8, 4\)"):
        g.init(jax.random.key(0), jnp.zeros(bad))


def test_unet_generator_dropout_only_when_training():
    kw = dict(features=4, max_features=8, num_downs=3, norm="instance", dropout_levels=1)
    g, g0 = UNetGenerator(1, dropout=0.5, **kw), UNetGenerator(1, dropout=0.0, **kw)
    x = _rand((1, 8, 8, 2))
    v = _init(g, x)
    f = jax.jit(lambda key: g.apply(v, x, train=True, rngs={"dropout": key}))
    f0 = jax.jit(lambda key: g0.apply(v, x, train=True, rngs={"dropout": key}))
    k0, k1 = jax.random.key(0), jax.random.key(1)
    # eval: dropout is the identity (the affine-free instance norm has no train mode, so the
    # dropout-free model gives the same function in both modes)
    np.testing.assert_allclose(_apply(g, v, x), f0(k0), atol=1e-3)
    # train: dropout active, driven by the 'dropout' rng
    np.testing.assert_array_equal(f(k0), f(k0))
    assert not np.allclose(f(k0), f(k1))
    assert not np.allclose(f(k0), f0(k0))


def test_unet_generator_parameter_count_pix2pix():
    # PyTorch UnetGenerator(3, 3, num_downs=8, ngf=64), batch norm: blocks (outer, inner)
    # = (3|64), (64, 128), (128, 256), (256, 512), 3 x (512, 512), innermost (512, 512).
    k = 16
    pytorch = (
        (3 * 64 * k) + (128 * 3 * k + 3)  # outermost: down without bias, up with
        + (64 * 128 * k + 256) + (256 * 64 * k + 128)
        + (128 * 256 * k + 512) + (512 * 128 * k + 256)
        + (256 * 512 * k + 1024) + (1024 * 256 * k + 512)
        + 3 * ((512 * 512 * k + 1024) + (1024 * 512 * k + 1024))
        + (512 * 512 * k) + (512 * 512 * k + 1024)  # innermost: down without norm
    )  # fmt: skip
    assert pytorch == 54_413_955
    # medjax adds a bias to the two norm-free down convolutions (first and innermost)
    g = UNetGenerator(3)
    assert _count(_param_shapes(g, (1, 256, 256, 3))) == pytorch + 64 + 512


# ------------------------------------------------------------------ classifier


@pytest.mark.parametrize("d,spatial", [(2, (16, 12)), (3, (8, 8, 6))], ids=["2d", "3d"])
def test_classifier_shapes_and_features(d, spatial):
    m = Classifier(5, features=(4, 6), spatial_dims=d, dtype=jnp.bfloat16)
    x = _rand((3, *spatial, 2))
    v = _init(m, x)
    logits, feats = _apply(m, v, x, return_features=True)
    assert logits.shape == (3, 5) and feats.shape == (3, 6)
    assert logits.dtype == jnp.float32 and feats.dtype == jnp.float32
    # features are the penultimate embedding: logits = features @ W + b
    head = v["params"]["head"]
    ref = np.asarray(feats) @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
    np.testing.assert_allclose(logits, ref, atol=0.05, rtol=0.02)  # bfloat16 head
    with pytest.raises(ValueError, match=r"\(1, 1, 8"):
        Classifier(2, features=(4, 4, 4), spatial_dims=d).init(
            jax.random.key(0), jnp.zeros((1, 1, *(8,) * (d - 1), 1))
        )
