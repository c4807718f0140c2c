"""Tests of medjax.models.layers against independent references (plain lax/Linen ops, numpy)."""

from __future__ import annotations

import itertools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from medjax.models import layers, onednn
from medjax.models.layers import (
    AttentionGate,
    BatchNorm,
    Conv,
    ConvNormAct,
    ConvTranspose4,
    DownSample,
    InstanceNorm,
    Norm,
    ResidualBlock,
    StridedConv4,
    UpSample,
    add_bias,
    conv_im2col,
    conv_nd,
    conv_overlap_add,
    conv_space_to_depth,
    conv_stride_phases,
    conv_transpose4_overlap_add,
    conv_transpose4_shuffle,
    conv_winograd,
    depth_to_space,
    get_activation,
    instance_norm,
    match_spatial,
    max_pool,
    normalize,
    second_order_convolutions,
    space_to_depth,
    winograd_convolutions,
)
from tests.helpers import jit_grad, randn, random_variables

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _xla_formulations():
    """These tests check medjax's XLA formulations of the layers, so the route to oneDNN is
    off here; tests/models/test_onednn.py checks that route."""
    with onednn.enabled(False):
        yield


_rand = randn
_init = random_variables
_grad = jit_grad


@pytest.fixture
def no_im2col(monkeypatch):
    """Turn conv_nd's im2col route off, so that small test shapes take the routes that larger
    convolutions take."""
    monkeypatch.setattr(layers, "_IM2COL_MAX_POSITIONS", 0)
    monkeypatch.setattr(layers, "_IM2COL_MAX_STRIDED_EXTENT", 0)


def _dn(d):
    sp = "DHW"[-d:]
    return ("N" + sp + "C", sp + "IO", "N" + sp + "C")


def _assert_same_fn(
    fast: nn.Module, plain: nn.Module, x: jax.Array, grads: bool = False, grad_scale: bool = False
):
    """Same params -> same outputs (and gradients w.r.t. params and input). With `grad_scale`
    the gradients' tolerance grows with their magnitude: float32 rounding of sums over tens of
    thousands of outputs per kernel entry (a 3D input of 16^3 and more)."""
    v = _init(fast, x)
    y_fast, y_plain = fast.apply(v, x), plain.apply(v, x)
    assert y_fast.shape == y_plain.shape
    np.testing.assert_allclose(y_fast, y_plain, atol=ATOL, rtol=1e-5)
    if grads:
        w = _rand(y_plain.shape, 7)

        def loss(m):
            return lambda v, x: jnp.sum(m.apply(v, x) * w)

        g_fast = _grad(loss(fast), argnums=(0, 1))(v, x)
        g_plain = _grad(loss(plain), argnums=(0, 1))(v, x)
        for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_plain), strict=True):
            atol = 1e-4 * (max(1.0, float(np.max(np.abs(b)))) if grad_scale else 1.0)
            np.testing.assert_allclose(a, b, atol=atol, rtol=1e-5)
    return v, y_fast


# ------------------------------------------------------------------ fast formulations


@pytest.mark.parametrize("d,spatial", [(2, (5, 7)), (3, (3, 4, 5))])
def test_upsample_equals_linen_conv_transpose(d, spatial):
    x = _rand((2, *spatial, 3))
    plain = nn.ConvTranspose(4, (2,) * d, strides=(2,) * d, padding="SAME")
    v, y = _assert_same_fn(UpSample(4, d), plain, x, grads=True)
    assert y.shape == (2, *(2 * s for s in spatial), 4)
    assert v["params"]["kernel"].shape == (2,) * d + (3, 4)
    # and equal to the module's own plain path
    np.testing.assert_allclose(UpSample(4, d, fast=False).apply(v, x), y, atol=ATOL, rtol=1e-5)


def test_upsample_hand_computation_1d():
    # Flax/lax transposed conv with kernel 2, stride 2: out[2i + r] = x[i] @ K[1 - r] + b.
    x = _rand((1, 3, 2))
    m = UpSample(3, spatial_dims=1)
    v = {"params": {"kernel": _rand((2, 2, 3), 2), "bias": _rand((3,), 4)}}
    y = np.asarray(m.apply(v, x))
    k, b, xn = np.asarray(v["params"]["kernel"]), np.asarray(v["params"]["bias"]), np.asarray(x)
    ref = np.zeros((1, 6, 3), np.float32)
    for i in range(3):
        for r in range(2):
            ref[0, 2 * i + r] = xn[0, i] @ k[1 - r] + b
    np.testing.assert_allclose(y, ref, atol=ATOL)


@pytest.mark.parametrize(
    "d,spatial,ksize,stride",
    [
        (2, (7, 6), 3, 1),
        (2, (7, 6), 3, 2),
        (2, (7, 6), 1, 1),
        (2, (7, 6), 1, 2),
        (3, (5, 6, 7), 3, 1),
        (3, (5, 6, 7), 3, 2),
        (3, (5, 6, 7), 1, 1),
        (3, (5, 6, 7), 2, 2),
        (3, (4, 5, 3), (3, 1, 3), (2, 1, 1)),
    ],
)
def test_conv_equals_linen_conv(d, spatial, ksize, stride):
    x = _rand((2, *spatial, 3))
    ks = (ksize,) * d if isinstance(ksize, int) else ksize
    st = (stride,) * d if isinstance(stride, int) else stride
    plain = nn.Conv(4, ks, strides=st, padding="SAME")
    v, _ = _assert_same_fn(Conv(4, ksize, stride, d), plain, x, grads=(d == 3 and ks[0] == 3))
    assert v["params"]["kernel"].shape == ks + (3, 4)


@pytest.mark.parametrize("padding", ["SAME", "VALID", [(2, 0), (1, 1), (0, 2)]])
def test_conv_nd_depth_fold_equals_lax(padding):
    x = _rand((2, 6, 5, 4, 3))
    k = _rand((3, 3, 3, 3, 5), 1)
    for strides in [(1, 1, 1), (2, 1, 2)]:
        ref = lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=_dn(3))
        got = conv_nd(x, k, strides, padding, fast=True)
        np.testing.assert_allclose(got, ref, atol=ATOL, rtol=1e-5)


def test_conv_nd_depth_fold_gradient():
    x = _rand((1, 5, 4, 6, 2))
    k = _rand((3, 3, 3, 2, 3), 1)
    w = _rand((1, 5, 4, 6, 3), 2)

    def loss(fast):
        return lambda x, k: jnp.sum(conv_nd(x, k, 1, "SAME", fast=fast) * w)

    for a, b in zip(_grad(loss(True), (0, 1))(x, k), _grad(loss(False), (0, 1))(x, k), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("d,spatial", [(2, (8, 6)), (2, (7, 9)), (3, (4, 5, 6))])
def test_strided_conv4_equals_linen_conv(d, spatial):
    x = _rand((2, *spatial, 3))
    plain = nn.Conv(5, (4,) * d, strides=(2,) * d, padding="SAME")
    v, y = _assert_same_fn(StridedConv4(5, d), plain, x, grads=True)
    assert y.shape == (2, *(-(-s // 2) for s in spatial), 5)
    assert v["params"]["kernel"].shape == (4,) * d + (3, 5)


def test_strided_conv4_is_pytorch_k4_s2_p1_for_even_sizes():
    x = _rand((2, 8, 10, 3))
    m = StridedConv4(4, 2, use_bias=False)
    v = _init(m, x)
    ref = lax.conv_general_dilated(
        x, v["params"]["kernel"], (2, 2), [(1, 1), (1, 1)], dimension_numbers=_dn(2)
    )
    np.testing.assert_allclose(m.apply(v, x), ref, atol=ATOL, rtol=1e-5)


# Every route of layers._conv_transpose4_route: (batch, spatial, Cin, Cout, route).
CT4_CASES = [
    (2, (5, 6), 3, 4, "overlap_add"),  # few output channels
    (2, (5, 6), 64, 16, "overlap_add"),  # a wide input
    (2, (5, 6), 3, 20, "subpixel"),
    (1, (16, 17), 3, 16, "shuffle"),  # batch <= 2, every extent >= 16
    (3, (16, 17), 3, 16, "subpixel"),
    (2, (3, 4, 5), 3, 4, "overlap_add"),
    (2, (3, 4, 5), 64, 16, "overlap_add"),
    (2, (3, 4, 5), 3, 20, "overlap_add"),  # 3D, at most 256 input positions
    (2, (5, 6, 7), 3, 20, "subpixel"),
    (2, (16, 16, 17), 2, 16, "shuffle"),
    # at most 16 input positions: the overlap-add's products batched over the taps
    (1, (2, 2), 8, 20, "overlap_add"),
    (4, (2, 2), 8, 20, "overlap_add"),
    (2, (2, 2, 2), 3, 20, "overlap_add"),
    (1, (4, 5), 8, 20, "subpixel"),  # 20 positions
]


@pytest.mark.parametrize("batch,spatial,cin,cout,route", CT4_CASES)
def test_conv_transpose4_equals_linen_conv_transpose(batch, spatial, cin, cout, route):
    d = len(spatial)
    assert layers._conv_transpose4_route((batch, *spatial, cin), cout) == route
    x = _rand((batch, *spatial, cin))
    plain = nn.ConvTranspose(cout, (4,) * d, strides=(2,) * d, padding="SAME")
    v, y = _assert_same_fn(
        ConvTranspose4(cout, d), plain, x, grads=True, grad_scale=d == 3 and route == "shuffle"
    )
    assert y.shape == (batch, *(2 * s for s in spatial), cout)
    assert v["params"]["kernel"].shape == (4,) * d + (cin, cout)


@pytest.mark.parametrize("d,stride", [(1, 2), (2, 2), (3, 2), (2, 3)])
def test_kernel_phases_are_the_strided_slices_with_one_concatenation_as_gradient(d, stride):
    k = np.asarray(_rand((*(2 * stride,) * d, 3, 2)))
    phases = layers._kernel_phases(jnp.asarray(k), stride)
    want = [k[tuple(slice(r, None, stride) for r in ph)] for ph in np.ndindex(*(stride,) * d)]
    assert len(phases) == len(want)
    for a, b in zip(phases, want, strict=True):
        np.testing.assert_array_equal(a, b)
    # the kernel gradient: each phase's cotangent lands on its own taps, once
    ws = [_rand(w.shape, i) for i, w in enumerate(want)]
    g = _grad(
        lambda k: sum(
            jnp.sum(p * w) for p, w in zip(layers._kernel_phases(k, stride), ws, strict=True)
        )
    )(jnp.asarray(k))
    ref = np.zeros_like(k)
    for ph, w in zip(np.ndindex(*(stride,) * d), ws, strict=True):
        ref[tuple(slice(r, None, stride) for r in ph)] = w
    np.testing.assert_array_equal(g, ref)
    graph = str(jax.make_jaxpr(jax.grad(lambda k: jnp.sum(layers._kernel_phases(k, stride)[0])))(k))
    assert "concatenate" in graph and " pad" not in graph


@pytest.mark.parametrize("fn", [conv_transpose4_overlap_add, conv_transpose4_shuffle])
@pytest.mark.parametrize("d,spatial", [(1, (5,)), (2, (3, 4)), (3, (2, 3, 3))])
def test_conv_transpose4_formulations_equal_lax(d, spatial, fn):
    x = _rand((2, *spatial, 3))
    k = _rand((4,) * d + (3, 2), 1)
    w = _rand((2, *(2 * s for s in spatial), 2), 2)

    def ref(x, k):
        return lax.conv_transpose(x, k, (2,) * d, "SAME", dimension_numbers=_dn(d))

    np.testing.assert_allclose(fn(x, k), ref(x, k), atol=ATOL, rtol=1e-5)
    got = _grad(lambda x, k: jnp.sum(fn(x, k) * w), (0, 1))(x, k)
    want = _grad(lambda x, k: jnp.sum(ref(x, k) * w), (0, 1))(x, k)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize(
    "spatial,ks,pads",
    [
        ((17, 16), (3, 3), [(1, 1), (1, 1)]),
        ((17, 16), (4, 4), [(1, 2), (2, 1)]),  # PatchGAN's k4 s1 p1 (asymmetric here)
    ],
)
def test_conv_nd_pads_small_batches_before_the_convolution(batch, spatial, ks, pads):
    x, k = _rand((batch, *spatial, 4)), _rand((*ks, 4, 5), 1)
    _assert_conv_and_grads(lambda x, k: conv_nd(x, k, 1, pads), x, k, (1, 1), pads)
    graph = str(jax.make_jaxpr(lambda x, k: conv_nd(x, k, 1, pads))(x, k))
    padded_inside = "padding=((0, 0), (0, 0))" not in graph
    assert "conv_general_dilated" in graph
    assert padded_inside == (batch > 2), graph


def _assert_conv_and_grads(fn, x, k, strides, pads):
    """`fn(x, k)` equals lax's convolution, and so do its gradients w.r.t. input and kernel."""

    def ref(x, k):
        return lax.conv_general_dilated(x, k, strides, pads, dimension_numbers=_dn(x.ndim - 2))

    w = _rand(ref(x, k).shape, 2)
    np.testing.assert_allclose(fn(x, k), ref(x, k), atol=1e-4, rtol=1e-5)
    got = _grad(lambda x, k: jnp.sum(fn(x, k) * w), (0, 1))(x, k)
    want = _grad(lambda x, k: jnp.sum(ref(x, k) * w), (0, 1))(x, k)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    "spatial,ks,stride,pads",
    [
        ((8, 8), (4, 4), 2, [(1, 1), (1, 1)]),  # PyTorch's k4 s2 p1 (pix2pix, PatchGAN)
        ((7, 9), (4, 2), 2, [(1, 2), (0, 1)]),  # odd sizes: the high end is cropped
        ((9, 9), (2, 2), 2, [(0, 0), (0, 0)]),
        ((10, 11), (6, 3), 3, [(2, 2), (1, 0)]),
        ((6, 5, 7), (4, 2, 4), 2, [(1, 1), (0, 1), (1, 2)]),  # 3D: folded in all three axes
        ((11,), (4,), 2, [(1, 2)]),
    ],
)
def test_strided_convolution_by_space_to_depth_equals_lax(spatial, ks, stride, pads):
    x = _rand((2, *spatial, 3))
    k = _rand((*ks, 3, 5), 1)
    strides = (stride,) * len(ks)
    _assert_conv_and_grads(
        lambda x, k: conv_space_to_depth(x, k, stride, pads), x, k, strides, pads
    )
    _assert_conv_and_grads(lambda x, k: conv_nd(x, k, stride, pads), x, k, strides, pads)
    # conv_nd routes it there: no strided convolution is left in its graph
    graph = str(jax.make_jaxpr(lambda x, k: conv_nd(x, k, stride, pads))(x, k))
    assert f"window_strides=({stride}," not in graph, graph


@pytest.mark.parametrize(
    "ks,stride,folded",
    [
        ((4, 4, 4), 2, True),  # Vox2Vox's and the 3D PatchGAN's k4 s2 p1
        ((2, 2, 2), 2, True),
        ((3, 3, 3), 2, False),  # not a multiple of the stride: the depth stack
        ((4, 4, 4), 1, False),
    ],
)
def test_strided_3d_convolutions_fold_all_three_axes(monkeypatch, ks, stride, folded):
    # traced on abstract shapes (nothing is computed): a strided 3D convolution whose kernel
    # extents are multiples of the stride is ONE 3D space-to-depth and a stride-1 3D one, not
    # the depth stack's views of the input followed by a 2D space-to-depth
    calls, original = [], layers.conv_space_to_depth

    def spy(x, kernel, s, pads):
        calls.append((x.shape, kernel.shape, s))
        return original(x, kernel, s, pads)

    monkeypatch.setattr(layers, "conv_space_to_depth", spy)
    # oneDNN's strided 3D route off (no 3D entry in either table): XLA's formulations
    monkeypatch.setattr(layers, "_ONEDNN_STRIDED_MIN_POSITIONS", {2: 1 << 10})
    monkeypatch.setattr(layers, "_ONEDNN_STRIDED_MIN_POSITIONS_AMX", {2: 1 << 12})
    x = jax.ShapeDtypeStruct((2, 24, 24, 24, 16), jnp.float32)
    k = jax.ShapeDtypeStruct((*ks, 16, 32), jnp.float32)
    graph = str(jax.make_jaxpr(lambda x, k: conv_nd(x, k, stride, [(1, 1)] * 3))(x, k))
    assert calls == ([((2, 24, 24, 24, 16), (*ks, 16, 32), 2)] if folded else [])
    assert ("window_strides=(2," in graph) == (not folded and stride == 2)


@pytest.mark.parametrize(
    "shape,ks,stride,pads",
    [
        ((1, 17, 16, 4), (3, 3), 2, [(1, 1), (1, 1)]),  # CycleGAN's down-sampler
        ((2, 9, 8, 3), (3, 5), 2, [(1, 1), (2, 0)]),
        ((1, 10, 11, 3), (5, 4), 3, [(2, 1), (0, 2)]),  # a phase of 1 tap, a 4-tap axis
        ((1, 6, 7, 5, 3), (3, 3, 3), 2, [(1, 1), (0, 1), (1, 0)]),  # 3D, depth-stacked
        ((1, 12, 3), (2,), 3, [(0, 1)]),  # kernel below the stride: phase 2 has no tap
    ],
)
def test_strided_convolution_by_phases_equals_lax(no_im2col, shape, ks, stride, pads):
    x, k = _rand(shape), _rand((*ks, shape[-1], 5), 1)
    strides = (stride,) * len(ks)
    _assert_conv_and_grads(lambda x, k: conv_stride_phases(x, k, stride, pads), x, k, strides, pads)
    # conv_nd takes this route up to batch 2 (no strided convolution left), XLA's beyond; a 3D
    # kernel is first depth-stacked into a 2D one of batch x depth rows, which decide there
    for batch in (shape[0], 3) if len(ks) < 3 else ():
        xb = _rand((batch, *shape[1:]))
        _assert_conv_and_grads(lambda x, k: conv_nd(x, k, stride, pads), xb, k, strides, pads)
        graph = str(jax.make_jaxpr(lambda x, k: conv_nd(x, k, stride, pads))(xb, k))
        assert (f"window_strides=({stride}," in graph) == (batch > 2), (batch, graph)


@pytest.mark.parametrize(
    "shape,ks,stride,pads",
    [
        ((1, 4, 4, 6), (2, 2), 1, [(1, 0), (0, 1)]),
        ((2, 3, 5, 6), (3, 3), 1, [(1, 1), (1, 1)]),
        ((1, 2, 3, 4, 6), (3, 2, 3), 1, [(1, 1), (0, 1), (2, 0)]),
        ((1, 8, 8, 6), (4, 4), 2, [(1, 1), (1, 1)]),  # PyTorch's k4 s2 p1
        ((2, 7, 9, 3), (3, 2), 3, [(1, 0), (2, 1)]),  # odd sizes, asymmetric padding
        ((1, 6, 5, 7, 2), (4, 2, 3), 2, [(1, 1), (0, 1), (1, 0)]),
        ((2, 11, 3), (4,), 2, [(1, 2)]),
    ],
)
def test_conv_im2col_equals_lax(shape, ks, stride, pads):
    x = _rand(shape)
    k = _rand((*ks, shape[-1], 7), 1)
    strides = (stride,) * len(ks)
    _assert_conv_and_grads(lambda x, k: conv_im2col(x, k, pads, stride), x, k, strides, pads)
    # conv_nd takes it up to 256 output positions (batch x spatial): no convolution op, and
    # the kernel is read as it is (no transpose of it, or of anything); stride 1 takes XLA's
    # convolution beyond
    graph = str(jax.make_jaxpr(lambda x, k: conv_nd(x, k, stride, pads))(x, k))
    assert "conv_general_dilated" not in graph and "transpose" not in graph, graph
    _assert_conv_and_grads(lambda x, k: conv_nd(x, k, stride, pads), x, k, strides, pads)
    if stride == 1:
        xb = _rand((64, *shape[1:]))
        graph = str(jax.make_jaxpr(lambda x, k: conv_nd(x, k, 1, pads))(xb, k))
        assert "conv_general_dilated" in graph, graph
        _assert_conv_and_grads(lambda x, k: conv_nd(x, k, 1, pads), xb, k, strides, pads)


@pytest.mark.parametrize(
    "shape,ks,stride,pads,used",
    [
        # pix2pix's innermost down-sampler (k4 s2 p1 on 2 x 2): the centre 2 x 2 taps
        ((1, 2, 2, 6), (4, 4), 2, [(1, 1), (1, 1)], [(1, 2), (1, 2)]),
        ((2, 2, 2, 2, 3), (4, 4, 4), 2, [(1, 1)] * 3, [(1, 2)] * 3),
        ((2, 2, 9, 3), (4, 4), 2, [(1, 1), (1, 1)], [(1, 2), (0, 3)]),  # one axis only
        ((2, 1, 1, 5), (3, 3), 1, [(1, 1), (1, 1)], [(1, 1), (1, 1)]),  # 3x3 'SAME' on 1 x 1
        ((1, 3, 4), (5,), 1, [(3, 0)], [(2, 4)]),  # 2 outputs: taps 0, 1 only meet padding
    ],
)
def test_conv_nd_drops_taps_that_only_meet_padding(shape, ks, stride, pads, used):
    d = len(ks)
    assert layers._used_taps(shape[1:-1], ks, (stride,) * d, pads) == used  # by hand
    x = _rand(shape)
    k = _rand((*ks, shape[-1], 7), 1)
    fn = jax.jit(lambda x, k: conv_nd(x, k, stride, pads))
    _assert_conv_and_grads(fn, x, k, (stride,) * d, pads)
    # the convolution that runs has the used taps' kernel
    graph = str(jax.make_jaxpr(lambda x, k: conv_nd(x, k, stride, pads))(x, k))
    cut = "x".join(str(b - a + 1) for a, b in used)
    assert re.search(rf"f32\[{cut.replace('x', ',')},{shape[-1]},7\]", graph), graph


def test_conv_nd_keeps_every_tap_that_meets_the_input():
    for spatial, ks, stride, pads in [
        ((4, 4), (4, 4), 2, [(1, 1), (1, 1)]),  # every tap meets the input at some output
        ((1, 1), (1, 1), 1, [(0, 0), (0, 0)]),
        ((3,), (3,), 1, [(-1, 1)]),  # cropping: left to the routes
    ]:
        assert layers._used_taps(spatial, ks, (stride,) * len(ks), pads) is None


@pytest.mark.parametrize("batch,spatial,cin,cout", [(1, (1, 1), 6, 5), (3, (1, 1, 1), 4, 6)])
def test_conv_transpose4_of_one_position_equals_linen_conv_transpose(batch, spatial, cin, cout):
    # pix2pix's innermost up-sampler: one product with the kernel's centre taps
    d = len(spatial)
    x = _rand((batch, *spatial, cin))
    plain = nn.ConvTranspose(cout, (4,) * d, strides=(2,) * d, padding="SAME")
    v, y = _assert_same_fn(ConvTranspose4(cout, d), plain, x, grads=True)
    assert y.shape == (batch, *(2,) * d, cout)
    graph = str(jax.make_jaxpr(lambda v, x: ConvTranspose4(cout, d).apply(v, x))(v, x))
    assert "conv" not in graph.replace("convert", ""), graph
    g = _grad(lambda v: jnp.sum(ConvTranspose4(cout, d).apply(v, x) ** 2))(v)
    g = np.array(g["params"]["kernel"])
    assert np.all(g[(slice(1, 3),) * d] != 0)
    g[(slice(1, 3),) * d] = 0.0
    np.testing.assert_array_equal(g, 0.0)  # the outer taps get no gradient


@pytest.mark.parametrize("shape", [(1, 3, 4, 5), (2, 2, 2, 2, 5)])
def test_conv_overlap_add_of_a_tiny_input_equals_lax(shape):
    # at most 16 input positions: the products batched over the taps
    d = len(shape) - 2
    ks, pads = (3,) * d, [(1, 1)] * d
    x, k = _rand(shape), _rand((*ks, 5, 3), 1)
    _assert_conv_and_grads(lambda x, k: conv_overlap_add(x, k, pads), x, k, (1,) * d, pads)
    graph = str(jax.make_jaxpr(lambda x, k: conv_overlap_add(x, k, pads))(x, k))
    assert "dimension_numbers=(([2], [1]), ([0], [0]))" in graph, graph


@pytest.mark.parametrize(
    "shape,ks,stride,pads,im2col",
    [
        ((1, 16, 16, 512), (4, 4), 2, [(1, 1)] * 2, True),  # 8^2 = 64 output positions
        ((4, 8, 8, 8), (3, 3), 1, [(1, 1)] * 2, True),  # 256 positions
        ((5, 8, 8, 8), (3, 3), 1, [(1, 1)] * 2, False),  # 320
        ((64, 4, 4, 8), (3, 3), 1, [(1, 1)] * 2, False),  # stride 1: extents do not count
        ((64, 8, 8, 256), (4, 4), 2, [(1, 1)] * 2, True),  # DCGAN's 8^2 -> 4^2: extents 4
        ((64, 16, 16, 128), (4, 4), 2, [(1, 1)] * 2, False),  # extents 8
        ((1, 64, 64, 128), (4, 4), 2, [(1, 1)] * 2, False),  # 32^2 = 1024 positions
        ((2, 8, 8, 8, 4), (4, 4, 4), 2, [(1, 1)] * 3, True),  # 3D, 2 x 4^3 = 128 positions
        ((1, 4, 4, 8), (3, 3), 1, [(-1, 1), (0, 0)], False),  # a cropping (negative) pad
    ],
)
def test_im2col_route_is_taken_for_small_outputs(shape, ks, stride, pads, im2col):
    strides = (stride,) * len(ks)
    assert layers._im2col_is_faster(jnp.zeros(shape), ks, strides, pads) == im2col


@pytest.mark.parametrize(
    "ks,pads",
    [
        ((3, 3), [(1, 1), (1, 1)]),
        ((7, 7), [(3, 3), (3, 3)]),
        ((4, 4), [(0, 0), (0, 0)]),
        ((4, 3), [(1, 2), (2, 0)]),
        ((3, 3, 3), [(1, 1), (0, 0), (2, 1)]),
    ],
)
def test_conv_overlap_add_equals_lax(ks, pads):
    d = len(ks)
    x = _rand((2, *(12,) * d, 5))  # outputs above conv_im2col's size
    k = _rand((*ks, 5, 3), 1)

    def ref(x, k):
        return lax.conv_general_dilated(x, k, (1,) * d, pads, dimension_numbers=_dn(d))

    w = _rand(ref(x, k).shape, 2)
    np.testing.assert_allclose(conv_overlap_add(x, k, pads), ref(x, k), atol=1e-4, rtol=1e-5)
    # conv_nd takes this route (no convolution op in its graph) for these 3 output channels up
    # to 16 taps, XLA's convolution beyond; a 3D kernel is first depth-stacked into a 2D one,
    # whose in-plane taps decide
    graph = str(jax.make_jaxpr(lambda x, k: conv_nd(x, k, 1, pads))(x, k))
    assert ("conv_general_dilated" not in graph) == (np.prod(ks[-2:]) <= 16), graph
    np.testing.assert_allclose(conv_nd(x, k, 1, pads), ref(x, k), atol=1e-4, rtol=1e-5)
    got = _grad(lambda x, k: jnp.sum(conv_overlap_add(x, k, pads) * w), (0, 1))(x, k)
    want = _grad(lambda x, k: jnp.sum(ref(x, k) * w), (0, 1))(x, k)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (2, 7, 9, 3), (1, 5, 4, 7, 2)])
def test_max_pool_values_and_gradients_equal_linen(shape, dtype):
    # Ties included (values rounded to halves): the gradient of each window must go to its
    # first maximum, exactly as XLA's select_and_scatter routes it.
    d = len(shape) - 2
    x = (jnp.round(_rand(shape) * 2) / 2).astype(dtype)

    def ref(v):
        return nn.max_pool(v, (2,) * d, strides=(2,) * d, padding="VALID")

    np.testing.assert_array_equal(max_pool(x, 2), ref(x))
    w = _rand(ref(x).shape, 1).astype(dtype)
    got = _grad(lambda v: jnp.sum(max_pool(v, 2) * w))(x)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, _grad(lambda v: jnp.sum(ref(v) * w))(x))
    t = _rand(shape, 2).astype(dtype)
    np.testing.assert_array_equal(jax.jvp(lambda v: max_pool(v, 2), (x,), (t,))[1],
                                  jax.jvp(ref, (x,), (t,))[1])  # fmt: skip


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(4, 16, 16, 8), (3, 5, 7, 6), (2, 3, 4, 5, 3)])
def test_add_bias_gradients_equal_float64_sums(shape, dtype):
    # the bias gradient is the output gradient summed over every axis but the last, computed
    # in float32 for a bfloat16 output (never rounded to bfloat16): numpy's float64 sum is exact
    y = randn(shape).astype(dtype)
    bias = randn(shape[-1:], 1)
    g = randn(shape, 2).astype(dtype)
    out, vjp = jax.vjp(add_bias, y, bias)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, y + bias.astype(dtype))
    dy, dbias = vjp(g)
    assert (dy.dtype, dbias.dtype) == (dtype, jnp.float32)
    np.testing.assert_array_equal(dy, g)
    want = np.asarray(g, np.float64).reshape(-1, shape[-1]).sum(0)
    np.testing.assert_allclose(dbias, want, rtol=1e-6, atol=1e-5)


def test_max_pool_hand_computed_tie():
    # one 2x2 window [[1, 3], [3, 2]]: max 3, its gradient goes to the first 3 (row-major)
    x = jnp.asarray([[1.0, 3.0], [3.0, 2.0]]).reshape(1, 2, 2, 1)
    g = _grad(lambda v: jnp.sum(max_pool(v, 2)))(x)
    np.testing.assert_array_equal(g.reshape(2, 2), [[0.0, 1.0], [0.0, 0.0]])


def _correlate_f64(x, k, pads):
    """2D cross-correlation in float64 (numpy), summed tap by tap: the rounding-free reference."""
    xp = np.pad(np.asarray(x, np.float64), [(0, 0), *pads, (0, 0)])
    kh, kw = k.shape[:2]
    ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    k = np.asarray(k, np.float64)
    return sum(
        np.einsum("bhwc,cd->bhwd", xp[:, i : i + ho, j : j + wo], k[i, j])
        for i, j in np.ndindex(kh, kw)
    )


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (7, 3), (1, 1, 6)])
def test_channel_matmul_derivatives_equal_dot(shape):
    # its kernel gradient is a product batched over row blocks (7 x 3 rows of (7, 3): a prime
    # count, one block); values, gradients and a gradient penalty's second derivatives agree
    # with jnp.dot's
    x, k = _rand(shape), _rand((shape[-1], 5), 1)
    w = _rand(shape[:-1] + (5,), 2)
    np.testing.assert_allclose(layers.channel_matmul(x, k), jnp.dot(x, k), atol=ATOL, rtol=1e-6)

    def grads(f):
        first = _grad(lambda x, k: jnp.sum(f(x, k) * w), (0, 1))(x, k)

        def penalty(x, k):
            g = _grad(lambda x: jnp.sum(jnp.tanh(f(x, k))))(x)
            return jnp.sum(g**2)

        return (*first, *_grad(penalty, (0, 1))(x, k))

    for a, b in zip(grads(layers.channel_matmul), grads(jnp.dot), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def _fold_large_route(monkeypatch, positions=1, channels=1):
    """Lower the large depth-fold route's thresholds so that small test shapes take it."""
    monkeypatch.setattr(layers, "_FOLD_LARGE_MIN_POSITIONS", positions)
    monkeypatch.setattr(layers, "_FOLD_LARGE_MIN_CHANNELS", channels)


@pytest.mark.parametrize(
    "shape,ks,padding",
    [
        ((2, 6, 5, 7, 3), (3, 3, 3), "SAME"),
        ((1, 5, 6, 4, 2), (3, 2, 3), "SAME"),  # even in-plane extent: asymmetric 'SAME'
        ((2, 5, 4, 6, 3), (2, 3, 3), "VALID"),
        ((1, 4, 5, 5, 2), (3, 3, 3), [(2, 0), (0, 2), (1, 0)]),
        ((1, 3, 4, 4, 8), (2, 2, 2), [(0, 0), (1, 1), (0, 1)]),  # Vox2Vox's kernel-2 form
    ],
)
def test_conv_nd_large_depth_fold_equals_lax(no_im2col, monkeypatch, shape, ks, padding):
    # the output-stacked forward and the matrix-product kernel gradient (route thresholds
    # lowered): values and both gradients against lax's native 3D convolution
    _fold_large_route(monkeypatch)
    x, k = _rand(shape), _rand((*ks, shape[-1], 5), 1)

    def fast(x, k):
        return conv_nd(x, k, 1, padding)

    def plain(x, k):
        return lax.conv_general_dilated(x, k, (1, 1, 1), padding, dimension_numbers=_dn(3))

    assert _custom_vjp_calls(fast, x, k) == 1
    y = plain(x, k)
    np.testing.assert_allclose(fast(x, k), y, atol=ATOL, rtol=1e-5)
    w = _rand(y.shape, 2)
    got = _grad(lambda x, k: jnp.sum(fast(x, k) * w), (0, 1))(x, k)
    ref = _grad(lambda x, k: jnp.sum(plain(x, k) * w), (0, 1))(x, k)
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


def test_conv_nd_large_depth_fold_second_derivatives_equal_lax(monkeypatch):
    _fold_large_route(monkeypatch)
    x, k = _rand((1, 4, 5, 4, 3)), _rand((3, 3, 3, 3, 4), 1)

    def penalty(conv):
        def p(x, k):
            g = _grad(lambda x: jnp.sum(jnp.sin(conv(x, k))))(x)
            return jnp.sum(g**2)

        return _grad(p, (0, 1))(x, k)

    got = penalty(lambda x, k: conv_nd(x, k, 1, "SAME"))
    ref = penalty(
        lambda x, k: lax.conv_general_dilated(x, k, (1,) * 3, "SAME", dimension_numbers=_dn(3))
    )
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4 * float(np.max(np.abs(b))), rtol=0)


@pytest.mark.parametrize(
    "shape,cin,strides,dtype,routed",
    [
        ((2, 64, 64, 64), 32, 1, jnp.float32, True),  # U-Net 3D's 64^3 level
        ((1, 64, 64, 64), 64, 1, jnp.float32, True),  # 2^18 output positions
        ((2, 48, 48, 48), 32, 1, jnp.float32, False),  # 221184 positions
        ((2, 64, 64, 64), 2, 1, jnp.float32, False),  # 6 stacked input channels
        ((2, 64, 64, 64), 32, 2, jnp.float32, False),  # strided
        ((2, 64, 64, 64), 32, 1, jnp.bfloat16, False),
    ],
)
def test_conv_nd_routes_large_3d_convolutions(shape, cin, strides, dtype, routed):
    # the default thresholds, traced on abstract shapes (nothing is computed)
    x = jax.ShapeDtypeStruct((*shape, cin), dtype)
    k = jax.ShapeDtypeStruct((3, 3, 3, cin, 32), dtype)
    graph = str(jax.make_jaxpr(lambda x, k: conv_nd(x, k, strides, "SAME"))(x, k))
    assert ("custom_vjp_call[" in graph) == routed


def test_large_3d_route_is_cpu_only(monkeypatch):
    # the U-Net 3D shape that the CPU routes (above) keeps the depth-stacked form elsewhere
    x = jax.ShapeDtypeStruct((2, 64, 64, 64, 32), jnp.float32)
    k = jax.ShapeDtypeStruct((3, 3, 3, 32, 32), jnp.float32)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    graph = str(jax.make_jaxpr(lambda x, k: conv_nd(x, k, 1, "SAME"))(x, k))
    assert "custom_vjp_call[" not in graph and "conv_general_dilated" in graph


@pytest.mark.parametrize(
    "shape,pads",
    [
        ((2, 16, 16, 8), [(1, 1), (1, 1)]),
        ((1, 17, 23, 6), [(1, 1), (1, 1)]),  # output extents not multiples of the 4x4 tile
        ((2, 9, 8, 5), [(0, 2), (2, 0)]),  # asymmetric padding
        ((1, 6, 7, 4), [(0, 0), (0, 0)]),  # 'VALID': one partial tile per axis
        ((1, 3, 3, 3), [(2, 2), (2, 2)]),
    ],
)
@pytest.mark.parametrize("r", [3, 4])
def test_conv_winograd_equals_direct_convolution(shape, pads, r):
    x, k = _rand(shape), _rand((r, r, shape[-1], 7), 1)
    y = conv_winograd(x, k, pads)
    want = _correlate_f64(x, k, pads)
    assert y.shape == want.shape
    # Winograd's F(4x4, 3x3) and F(3x3, 4x4) are exact up to float32 rounding, which their
    # transforms (entries up to 8 and 1/24) make about 10x a direct convolution's: both stay
    # below 1e-5 of the output scale
    scale = np.max(np.abs(want))
    assert np.max(np.abs(y - want)) <= 1e-5 * scale

    def direct(x, k):
        return lax.conv_general_dilated(x, k, (1, 1), pads, dimension_numbers=_dn(2))

    assert np.max(np.abs(direct(x, k) - want)) <= 1e-5 * scale
    # gradients (the transposed transforms): against lax's, within the same relative rounding
    w = _rand(want.shape, 2)
    got = _grad(lambda x, k: jnp.sum(conv_winograd(x, k, pads) * w), (0, 1))(x, k)
    ref = _grad(lambda x, k: jnp.sum(direct(x, k) * w), (0, 1))(x, k)
    for a, b in zip(got, ref, strict=True):
        assert np.max(np.abs(a - b)) <= 3e-5 * np.max(np.abs(b))


def test_conv_winograd_rejects_other_kernels_and_negative_padding():
    x = _rand((1, 8, 8, 4))
    with pytest.raises(ValueError, match=r"3x3 or 4x4 kernel.*\(5, 5, 4, 2\)"):
        conv_winograd(x, _rand((5, 5, 4, 2)), [(2, 2), (2, 2)])
    with pytest.raises(ValueError, match=r"paddings >= 0"):
        conv_winograd(x, _rand((3, 3, 4, 2)), [(-1, 1), (1, 1)])


@pytest.mark.parametrize("r", [3, 4])
def test_conv_winograd_second_derivatives_equal_lax(r):
    # the transforms carry their transposes as VJPs, and those carry the transforms: a gradient
    # penalty (the input gradient differentiated again) agrees with lax's convolution
    x, k = _rand((1, 9, 10, 4)), _rand((r, r, 4, 5), 1)
    pads = [(1, 1), (0, 2)]

    def penalty(conv):
        def p(x, k):
            g = _grad(lambda x: jnp.sum(jnp.sin(conv(x, k))))(x)
            return jnp.sum(g**2)

        return _grad(p, (0, 1))(x, k)

    got = penalty(lambda x, k: conv_winograd(x, k, pads))
    ref = penalty(
        lambda x, k: lax.conv_general_dilated(x, k, (1, 1), pads, dimension_numbers=_dn(2))
    )
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4 * float(np.max(np.abs(b))), rtol=0)


@pytest.mark.parametrize(
    "shape,r,cout,dtype,routed",
    [
        ((1, 64, 64, 128), 3, 128, jnp.float32, True),  # 256 tiles of 4x4, 128 channels in, out
        ((2, 32, 34, 128), 3, 130, jnp.float32, True),  # 144 tiles, one partial per row
        ((1, 32, 60, 128), 3, 128, jnp.float32, False),  # 120 tiles
        ((8, 16, 16, 128), 3, 128, jnp.float32, False),  # 128 tiles, but 16^2 outputs
        ((1, 64, 64, 64), 3, 128, jnp.float32, False),  # 64 input channels
        ((1, 64, 64, 128), 3, 64, jnp.float32, False),
        ((1, 64, 64, 128), 3, 128, jnp.bfloat16, False),  # float32 only
        # 4x4 kernels, 'SAME' (pads 1 / 2): 3x3 output tiles
        ((1, 31, 31, 256), 4, 512, jnp.float32, True),  # pix2pix's PatchGAN layer: 121 tiles
        ((1, 30, 30, 256), 4, 512, jnp.float32, False),  # 30^2 outputs, 100 tiles
        ((1, 31, 31, 128), 4, 64, jnp.float32, False),  # 64 output channels
    ],
)
def test_conv_nd_routes_wide_3x3_and_4x4_convolutions_to_winograd(shape, r, cout, dtype, routed):
    x, k = _rand(shape).astype(dtype), (_rand((r, r, shape[-1], cout), 1) / 30).astype(dtype)

    def f(x, k):
        return conv_nd(x, k, 1, "SAME")

    graph = str(jax.make_jaxpr(f)(x, k))
    assert ("conv_general_dilated" not in graph) == routed, graph
    with winograd_convolutions(False):  # the switch: XLA's convolution again (a new trace)
        assert "conv_general_dilated" in str(jax.make_jaxpr(lambda x, k: f(x, k))(x, k))
    if routed:
        # 9 x 128 (3x3) or 16 x 256 (4x4) products per output: Winograd's rounding grows
        # with the sum's length
        want = _correlate_f64(x, k, [(1, 1), (1, 1)] if r == 3 else [(1, 2), (1, 2)])
        assert np.max(np.abs(f(x, k) - want)) <= 3e-5 * np.max(np.abs(want))


def _custom_vjp_calls(fn, *args) -> int:
    """How many custom-VJP calls (the second-order convolutions) `fn` traces to."""
    return str(jax.make_jaxpr(fn)(*args)).count("custom_vjp_call[")


def _penalty_grads(m: nn.Module, v, x):
    """d/d(params, x) of the WGAN-GP-style penalty ||d sum(tanh(m(x))) / dx||^2: second
    derivatives of the layer (its VJP differentiated again)."""

    def penalty(v, x):
        with second_order_convolutions():
            g = _grad(lambda x: jnp.sum(jnp.tanh(m.apply(v, x))))(x)
        return jnp.sum(g**2)

    return _grad(penalty, argnums=(0, 1))(v, x), _custom_vjp_calls(penalty, v, x)


@pytest.mark.parametrize(
    "layer,plain,n_custom",
    [
        (StridedConv4(5, 2), nn.Conv(5, (4, 4), strides=(2, 2), padding="SAME"), 2),
        (ConvTranspose4(16, 2), nn.ConvTranspose(16, (4, 4), strides=(2, 2), padding="SAME"), 8),
        (StridedConv4(5, 3), nn.Conv(5, (4, 4, 4), strides=(2, 2, 2), padding="SAME"), 2),
        (
            ConvTranspose4(16, 3),
            nn.ConvTranspose(16, (4,) * 3, strides=(2,) * 3, padding="SAME"),
            16,
        ),
        # few output channels: one matrix product + overlap-add, no custom VJP needed
        (ConvTranspose4(4, 2), nn.ConvTranspose(4, (4, 4), strides=(2, 2), padding="SAME"), 0),
        (StridedConv4(3, 2), nn.Conv(3, (4, 4), strides=(2, 2), padding="SAME"), 2),
    ],
)
def test_fast_layers_second_derivatives_equal_linen(no_im2col, layer, plain, n_custom):
    # Inside second_order_convolutions the fast layers' kernel-2 convolutions have their own
    # VJP (written with ordinary convolutions, so a gradient penalty's second derivatives stay
    # fast); differentiated twice they must agree with Linen's strided / transposed conv.
    d = layer.spatial_dims
    x = _rand((2, *(6,) * d, 3))
    v = _init(layer, x)
    got, traced = _penalty_grads(layer, v, x)
    ref, _ = _penalty_grads(plain, v, x)
    # the fast layer really runs the custom-VJP convolutions (StridedConv4: one; ConvTranspose4
    # with sub-pixel phases: one per phase), each traced twice (the forward and its input
    # gradient, which is the same convolution), and only inside the context: a plain forward
    # traces none
    assert traced == n_custom
    assert _custom_vjp_calls(layer.apply, v, x) == 0
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "layer,plain,shape",
    [
        (StridedConv4(5, 2), nn.Conv(5, (4, 4), strides=(2, 2), padding="SAME"), (2, 8, 8, 3)),
        # 1024 output positions, every extent 4 (a WGAN-GP critic's last strided layer)
        (StridedConv4(5, 2), nn.Conv(5, (4, 4), strides=(2, 2), padding="SAME"), (64, 8, 8, 3)),
        (
            StridedConv4(5, 3),
            nn.Conv(5, (4,) * 3, strides=(2,) * 3, padding="SAME"),
            (1, 4, 6, 4, 3),
        ),
        # 16 input positions: the transposed convolution's products batched over the taps
        (
            ConvTranspose4(16, 2),
            nn.ConvTranspose(16, (4, 4), strides=(2, 2), padding="SAME"),
            (4, 2, 2, 3),
        ),
    ],
)
def test_small_convolutions_second_derivatives_equal_linen(layer, plain, shape):
    # the im2col and tap-batched routes are matrix products, slices and pads: a gradient
    # penalty's second derivatives through them, with no custom VJP, against Linen's
    x = _rand(shape)
    v = _init(layer, x)
    got, traced = _penalty_grads(layer, v, x)
    ref, _ = _penalty_grads(plain, v, x)
    assert traced == 0
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)


def test_conv_transpose4_of_a_tiny_input_reads_the_kernel_as_it_is():
    x = _rand((1, 2, 2, 8))
    m = ConvTranspose4(20, 2, use_bias=False)
    v = _init(m, x)
    grad = _grad(lambda v: jnp.sum(m.apply(v, x) ** 2))
    graph = str(jax.make_jaxpr(grad)(v))
    # one matrix product batched over the 16 taps ([T, positions, Cin] x [T, Cin, Cout])
    assert "dimension_numbers=(([2], [1]), ([0], [0]))" in graph, graph
    # and the compiled forward + backward transposes nothing of the kernel's size (the
    # sub-pixel form transposes the kernel's phases and their gradients: five such arrays)
    hlo = jax.jit(grad).lower(v).compile().as_text()
    shapes = re.findall(r"= f32\[([\d,]+)\]\{[^}]*\} transpose\(", hlo)
    kernel_size = v["params"]["kernel"].size
    assert kernel_size not in [np.prod([int(n) for n in s_.split(",")]) for s_ in shapes], hlo


@pytest.mark.parametrize("pads", [[(0, 0), (0, 0)], [(1, 0), (0, 1)], [(1, 1), (1, 1)]])
@pytest.mark.parametrize("ks", [(2, 2), (1, 2), (2, 1)])
def test_conv_nd_small_kernel_derivatives_equal_lax(ks, pads):
    x = _rand((2, 5, 4, 3))
    k = _rand((*ks, 3, 4), 1)
    w = _rand((2, 5 + sum(pads[0]) - ks[0] + 1, 4 + sum(pads[1]) - ks[1] + 1, 4), 2)

    def f(fast):
        def loss(x, k):
            with second_order_convolutions():
                return jnp.sum(jnp.sin(conv_nd(x, k, 1, pads, fast=fast)) * w)

        return loss

    def penalty(fast):
        return lambda x, k: jnp.sum(_grad(f(fast), (0, 1))(x, k)[0] ** 2)

    for fn in (f, penalty):
        got, ref = _grad(fn(True), (0, 1))(x, k), _grad(fn(False), (0, 1))(x, k)
        for a, b in zip(got, ref, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    # the custom-VJP convolution is taken exactly when every padding is at most k - 1 (a wider
    # one falls back to XLA's own rules)
    routed = all(p <= kk - 1 for kk, pp in zip(ks, pads, strict=True) for p in pp)
    n_custom = _custom_vjp_calls(penalty(True), x, k)
    assert n_custom > 0 if routed else n_custom == 0
    assert _custom_vjp_calls(penalty(False), x, k) == 0


def test_conv_transpose4_hand_scatter_2d():
    # Scatter definition: every input pixel i adds x[i] @ K[j] at output 2i + 2 - j (per axis),
    # cropped to [0, 2n) -- lax's 'SAME' transposed convolution, written as loops.
    h, w, cin, cout = 3, 4, 2, 3
    x = np.asarray(_rand((1, h, w, cin)))
    k = np.asarray(_rand((4, 4, cin, cout), 1))
    ref = np.zeros((1, 2 * h, 2 * w, cout), np.float32)
    for i, j, a, b in itertools.product(range(h), range(w), range(4), range(4)):
        oi, oj = 2 * i + 2 - a, 2 * j + 2 - b
        if 0 <= oi < 2 * h and 0 <= oj < 2 * w:
            ref[0, oi, oj] += x[0, i, j] @ k[a, b]
    m = ConvTranspose4(cout, 2, use_bias=False)
    y = m.apply({"params": {"kernel": jnp.asarray(k)}}, jnp.asarray(x))
    np.testing.assert_allclose(y, ref, atol=ATOL, rtol=1e-5)


def test_space_depth_roundtrip_and_layout():
    x = _rand((2, 4, 6, 3))
    s = space_to_depth(x, 2)
    assert s.shape == (2, 2, 3, 12)
    # channel (p_h, p_w, c): block (1, 2), p = (1, 0), c = 2
    assert s[1, 1, 2, (1 * 2 + 0) * 3 + 2] == x[1, 3, 4, 2]
    np.testing.assert_array_equal(depth_to_space(s, 2), x)
    x3 = _rand((1, 2, 4, 2, 5))
    np.testing.assert_array_equal(depth_to_space(space_to_depth(x3, 2), 2), x3)


def test_match_spatial_pads_edge_and_crops():
    x = jnp.arange(12.0).reshape(1, 3, 4, 1)
    y = match_spatial(x, (4, 3))
    assert y.shape == (1, 4, 3, 1)
    np.testing.assert_array_equal(y[0, :3, :, 0], x[0, :, :3, 0])
    np.testing.assert_array_equal(y[0, 3, :, 0], x[0, 2, :3, 0])  # replicated last row


# ------------------------------------------------------------------ blocks


@pytest.mark.parametrize("norm", ["instance", "group", "batch"])
def test_conv_before_norm_has_no_bias(norm):
    x = _rand((2, 6, 6, 3))
    v = _init(ConvNormAct(8, norm=norm), x)
    assert set(v["params"]["conv"]) == {"kernel"}
    assert v["params"]["conv"]["kernel"].shape == (3, 3, 3, 8)


def test_conv_without_norm_has_bias():
    x = _rand((2, 5, 5, 5, 3))
    v = _init(ConvNormAct(8, spatial_dims=3, norm="none"), x)
    assert set(v["params"]["conv"]) == {"kernel", "bias"}
    assert v["params"]["conv"]["kernel"].shape == (3, 3, 3, 3, 8)
    assert "norm" not in v["params"]


def test_conv_norm_act_equals_manual_composition():
    x = _rand((2, 7, 5, 3))
    m = ConvNormAct(4, norm="instance", activation="relu")
    v = _init(m, x)
    y = lax.conv_general_dilated(
        x, v["params"]["conv"]["kernel"], (1, 1), "SAME", dimension_numbers=_dn(2)
    )
    mu = y.mean(axis=(1, 2), keepdims=True)
    var = y.var(axis=(1, 2), keepdims=True)
    nv = v["params"]["norm"]["norm"]
    ref = jnp.maximum((y - mu) / jnp.sqrt(var + 1e-5) * nv["scale"] + nv["bias"], 0.0)
    np.testing.assert_allclose(m.apply(v, x), ref, atol=1e-4)


def _numpy_instance_norm(x, scale, bias, eps=1e-5):
    # the textbook two-pass formula in float64
    x = np.asarray(x, np.float64)
    axes = tuple(range(1, x.ndim - 1))
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


_LEAKY = get_activation("leaky_relu")


@pytest.mark.parametrize(
    "shape,activation",
    [
        ((2, 6, 5, 4), _LEAKY),
        ((2, 4, 3, 5, 3), nn.relu),
        ((3, 7, 2), None),
        ((2, 5, 5, 4), nn.gelu),
    ],
)
def test_instance_norm_equals_flax_and_numpy_with_gradients(shape, activation):
    x = _rand(shape) * 3 + 1.5
    c = shape[-1]
    p = {"scale": _rand((c,)) + 1.0, "bias": _rand((c,)) * 0.3}
    act = activation or (lambda v: v)

    def ours(x, p):
        return InstanceNorm().apply({"params": p}, x, activation)

    def flax_ref(x, p):
        return act(nn.InstanceNorm().apply({"params": p}, x))

    want = np.asarray(act(jnp.asarray(_numpy_instance_norm(x, p["scale"], p["bias"]), jnp.float32)))
    np.testing.assert_allclose(ours(x, p), want, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(ours(x, p), flax_ref(x, p), atol=2e-5, rtol=1e-5)
    w = _rand(shape)

    def loss(f):
        return lambda x, p: jnp.sum(f(x, p) * w)

    got, ref = _grad(loss(ours), (0, 1))(x, p), _grad(loss(flax_ref), (0, 1))(x, p)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)

    # second derivatives (a gradient penalty through the norm) equal autodiff of flax's
    def penalty(f):
        return lambda x, p: jnp.sum(_grad(loss(f))(x, p) ** 2)

    got, ref = _grad(penalty(ours), (0, 1))(x, p), _grad(penalty(flax_ref), (0, 1))(x, p)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-3, rtol=1e-3)


def test_instance_norm_module_has_flax_parameters_and_dtypes():
    x = _rand((2, 5, 5, 3))
    key = jax.random.PRNGKey(0)
    ours, theirs = InstanceNorm().init(key, x), nn.InstanceNorm().init(key, x)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), ours) == jax.tree.map(
        lambda a: (a.shape, a.dtype), theirs
    )
    np.testing.assert_array_equal(ours["params"]["scale"], theirs["params"]["scale"])
    np.testing.assert_array_equal(ours["params"]["bias"], theirs["params"]["bias"])
    assert not InstanceNorm(use_scale=False, use_bias=False).init(key, x)
    # affine-free: zero mean and unit variance per sample and channel
    y = InstanceNorm(use_scale=False, use_bias=False).apply({}, x)
    np.testing.assert_allclose(y.mean(axis=(1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=(1, 2)), 1.0, rtol=1e-3)
    # bfloat16 input and result, statistics in float32, parameter gradients in float32
    xb = x.astype(jnp.bfloat16)
    yb = instance_norm(xb, activation=nn.relu)
    assert yb.dtype == jnp.bfloat16
    ref = np.maximum(_numpy_instance_norm(np.asarray(xb, np.float32), 1.0, 0.0), 0.0)
    np.testing.assert_allclose(np.asarray(yb, np.float32), ref, atol=3e-2, rtol=1e-2)
    g = _grad(lambda s: jnp.sum(instance_norm(xb, s, None, activation=nn.relu)))(jnp.ones(3))
    assert g.dtype == jnp.float32
    assert _grad(lambda v: jnp.sum(instance_norm(v) ** 2))(xb).dtype == jnp.bfloat16


def test_conv_norm_act_instance_equals_linen_composition():
    # ConvNormAct (fused norm + activation) against Linen's Conv -> InstanceNorm -> LeakyReLU
    # with the same parameters: values and every gradient
    x = _rand((2, 9, 9, 3))
    m = ConvNormAct(5, spatial_dims=2, norm="instance", activation="leaky_relu", fast=False)
    v = _init(m, x)

    def linen(v, x):
        y = nn.Conv(5, (3, 3), padding="SAME", use_bias=False).apply(
            {"params": v["params"]["conv"]}, x
        )
        y = nn.InstanceNorm().apply({"params": v["params"]["norm"]["norm"]}, y)
        return nn.leaky_relu(y, 0.01)

    np.testing.assert_allclose(m.apply(v, x), linen(v, x), atol=1e-5, rtol=1e-5)
    w = _rand((2, 9, 9, 5))
    got = _grad(lambda v, x: jnp.sum(m.apply(v, x) * w), (0, 1))(v, x)
    want = _grad(lambda v, x: jnp.sum(linen(v, x) * w), (0, 1))(v, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_batch_norm_uses_batch_stats():
    x = _rand((4, 5, 5, 2)) * 3 + 1
    m = Norm("batch")
    v = _init(m, x)
    assert "batch_stats" in v
    y, upd = m.apply(v, x, train=True, mutable=["batch_stats"])
    scale, bias = v["params"]["norm"]["scale"], v["params"]["norm"]["bias"]
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), bias, atol=1e-5)
    np.testing.assert_allclose(y.std(axis=(0, 1, 2)), jnp.abs(scale), rtol=1e-3)
    mean = upd["batch_stats"]["norm"]["mean"]
    np.testing.assert_allclose(mean, 0.1 * x.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
    # eval uses the running statistics (here mean 0, var 1): affine map of x
    ref = x / np.sqrt(1 + 1e-5) * scale + bias
    np.testing.assert_allclose(m.apply(v, x, train=False), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "shape,activation",
    [((6, 5, 4, 3), nn.relu), ((3, 4, 3, 5, 2), _LEAKY), ((8, 5), None)],
)
def test_batch_norm_equals_flax_batch_norm_with_gradients(shape, activation):
    # the variables, values, running averages and gradients of Linen's BatchNorm + activation
    x = _rand(shape) * 2.5 - 1.0
    c = shape[-1]
    act = activation or (lambda v: v)
    ours, theirs = BatchNorm(), nn.BatchNorm(momentum=0.9)
    key = jax.random.PRNGKey(0)
    v, vf = ours.init(key, x), theirs.init(key, x, use_running_average=False)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), v) == jax.tree.map(
        lambda a: (a.shape, a.dtype), vf
    )
    params = {"scale": _rand((c,)) + 1.0, "bias": _rand((c,)) * 0.3}
    stats = {"mean": _rand((c,)) * 0.2, "var": jnp.abs(_rand((c,))) + 0.5}

    def run(train):
        def f(x, p):
            y, upd = ours.apply(
                {"params": p, "batch_stats": stats}, x, train=train, activation=activation,
                mutable=["batch_stats"],
            )  # fmt: skip
            return y, upd["batch_stats"]

        def g(x, p):
            y, upd = theirs.apply(
                {"params": p, "batch_stats": stats}, x, use_running_average=not train,
                mutable=["batch_stats"],
            )  # fmt: skip
            return act(y), upd["batch_stats"]

        return f, g

    for train in (True, False):
        f, g = run(train)
        (y, new), (yf, newf) = f(x, params), g(x, params)
        np.testing.assert_allclose(y, yf, atol=2e-5, rtol=1e-5)
        for name in ("mean", "var"):
            np.testing.assert_allclose(new[name], newf[name], atol=1e-6, rtol=1e-5)
        w = _rand(y.shape)
        got = _grad(lambda x, p, f=f, w=w: jnp.sum(f(x, p)[0] * w), (0, 1))(x, params)
        want = _grad(lambda x, p, g=g, w=w: jnp.sum(g(x, p)[0] * w), (0, 1))(x, params)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)
    # the batch statistics by the textbook two-pass formula
    axes = tuple(range(x.ndim - 1))
    mean = np.asarray(x, np.float64).mean(axes)
    var = ((np.asarray(x, np.float64) - mean) ** 2).mean(axes)
    new = run(True)[0](x, params)[1]
    np.testing.assert_allclose(new["mean"], 0.9 * stats["mean"] + 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(new["var"], 0.9 * stats["var"] + 0.1 * var, rtol=1e-5)


def test_normalize_gradients_through_its_statistics_and_second_order():
    # normalize returns the statistics too; gradients through all three outputs and a gradient
    # penalty through the output equal autodiff of the textbook formula
    x = _rand((4, 5, 3, 3)) * 2 + 0.5
    s, b = _rand((3,)) + 1.0, _rand((3,))

    def textbook(x, s, b, axes):
        mu = x.mean(axes, keepdims=True)
        var = ((x - mu) ** 2).mean(axes, keepdims=True)
        y = jnp.tanh((x - mu) / jnp.sqrt(var + 1e-5) * s + b)
        return y, mu.squeeze(axes), var.squeeze(axes)

    for axes in ((1, 2), (0, 1, 2)):
        outs = normalize(x, s, b, axes, activation=jnp.tanh)
        for a, want in zip(outs, textbook(x, s, b, axes), strict=True):
            np.testing.assert_allclose(a, want, atol=2e-5, rtol=1e-5)
        ws = [_rand(o.shape) for o in outs]

        def loss(f, axes=axes, ws=ws):
            return lambda x, s, b: sum(
                jnp.sum(o * w) for o, w in zip(f(x, s, b, axes), ws, strict=True)
            )

        ours = lambda x, s, b, axes: normalize(x, s, b, axes, activation=jnp.tanh)  # noqa: E731
        got, want = _grad(loss(ours), (0, 1, 2))(x, s, b), _grad(loss(textbook), (0, 1, 2))(x, s, b)
        for a, c in zip(got, want, strict=True):
            np.testing.assert_allclose(a, c, atol=5e-5, rtol=1e-4)

        def penalty(f, axes=axes, w=ws[0]):
            return lambda x: jnp.sum(_grad(lambda x: jnp.sum(f(x, s, b, axes)[0] * w))(x) ** 2)

        np.testing.assert_allclose(
            _grad(penalty(ours))(x), _grad(penalty(textbook))(x), atol=1e-3, rtol=1e-3
        )
        # the mean alone: d mean / d x = 1 / n for every element it averages
        wm = ws[1]
        n = np.prod([x.shape[a] for a in axes])
        got = _grad(lambda x, wm=wm, axes=axes: jnp.sum(normalize(x, s, b, axes)[1] * wm))(x)
        np.testing.assert_allclose(got, np.broadcast_to(np.expand_dims(wm, axes), x.shape) / n)


def test_batch_norm_bfloat16_result_with_float32_statistics():
    x = (_rand((16, 6, 6, 4)) * 3 + 1).astype(jnp.bfloat16)
    m = BatchNorm()
    v = m.init(jax.random.PRNGKey(0), x)
    y, upd = m.apply(v, x, train=True, activation=nn.relu, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16 and upd["batch_stats"]["mean"].dtype == jnp.float32
    xf = np.asarray(x, np.float64)
    ref = np.maximum((xf - xf.mean((0, 1, 2))) / np.sqrt(xf.var((0, 1, 2)) + 1e-5), 0.0)
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=3e-2, rtol=1e-2)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * xf.mean((0, 1, 2)), rtol=1e-5)
    g = _grad(lambda p: jnp.sum(m.apply({**v, "params": p}, x, train=True, mutable=True)[0]))
    assert jax.tree.leaves(g(v["params"]))[0].dtype == jnp.float32


def test_group_norm_groups_divide_channels():
    x = _rand((1, 4, 4, 12))
    v = _init(Norm("group"), x)
    p = v["params"]["norm"]
    y = (Norm("group").apply(v, x) - p["bias"]) / p["scale"]
    # 12 channels -> 6 groups of 2: each group normalised over space and its 2 channels
    g = np.asarray(y).reshape(1, 4, 4, 6, 2)
    np.testing.assert_allclose(g.mean(axis=(1, 2, 4)), 0.0, atol=1e-5)


def test_unknown_names_raise():
    with pytest.raises(ValueError):
        get_activation("swish2")
    with pytest.raises(ValueError):
        _init(Norm("layer"), _rand((1, 4, 4, 2)))


@pytest.mark.parametrize("d", [2, 3])
def test_residual_block(d):
    x = _rand((2,) + (5,) * d + (3,))
    m = ResidualBlock(6, spatial_dims=d)
    v = _init(m, x)
    assert "shortcut" in v["params"]
    assert m.apply(v, x).shape == (2,) + (5,) * d + (6,)
    # identity shortcut when channels match: zeroing the last norm's scale and bias leaves
    # act(x)
    m2 = ResidualBlock(3, spatial_dims=d, activation="relu")
    v2 = _init(m2, x)
    assert "shortcut" not in v2["params"]
    p = jax.tree.map(lambda a: a, v2["params"])
    p["conv1"]["norm"]["norm"]["scale"] = jnp.zeros(3)
    p["conv1"]["norm"]["norm"]["bias"] = jnp.zeros(3)
    np.testing.assert_allclose(m2.apply({"params": p}, x), jnp.maximum(x, 0), atol=1e-6)


@pytest.mark.parametrize("mode", ["maxpool", "conv"])
def test_downsample(mode):
    x = _rand((1, 7, 6, 3))
    m = DownSample(mode, features=5 if mode == "conv" else None)
    v = _init(m, x)
    y = m.apply(v, x)
    if mode == "maxpool":
        ref = np.asarray(x)[:, :6, :6].reshape(1, 3, 2, 3, 2, 3).max(axis=(2, 4))
        np.testing.assert_array_equal(y, ref)
    else:
        assert y.shape == (1, 4, 3, 5)


@pytest.mark.parametrize("d,spatial,coarse", [(2, (9, 8), (4, 4)), (3, (5, 6, 4), (2, 3, 2))])
def test_attention_gate(d, spatial, coarse):
    x = _rand((2, *spatial, 4))
    g = _rand((2, *coarse, 6), 1)
    m = AttentionGate(spatial_dims=d)
    v = _init(m, x, g)
    y, st = m.apply(v, x, g, mutable=["intermediates"])
    assert y.shape == x.shape
    alpha = st["intermediates"]["alpha"][0]
    assert alpha.shape == (2, *spatial, 1)
    assert float(alpha.min()) > 0.0 and float(alpha.max()) < 1.0
    # the output only depends on x * alpha: a zero skip gives norm(0) = the norm's offset
    y0 = m.apply(v, jnp.zeros_like(x), g)
    offset = v["params"]["out_norm"]["norm"]["bias"]
    np.testing.assert_allclose(y0, jnp.broadcast_to(offset, y0.shape), atol=1e-6)


def test_bf16_compute_dtype():
    x = _rand((1, 6, 6, 6, 2))
    for m in [
        ConvNormAct(4, spatial_dims=3, dtype=jnp.bfloat16),
        UpSample(4, 3, dtype=jnp.bfloat16),
    ]:
        v = _init(m, x)
        assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(v))
        y = m.apply(v, x)
        assert y.dtype == jnp.bfloat16
        assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
