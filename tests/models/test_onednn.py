"""oneDNN's convolutions (medjax.models.onednn) against lax's convolution: values, gradients,
gradients of gradients, and the route that medjax.models.layers.conv_nd takes to them."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import sys

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from medjax.models import layers, onednn
from medjax.models.layers import Conv, conv_nd, winograd_convolutions
from tests.helpers import jit_grad, randn

pytestmark = pytest.mark.skipif(
    not onednn.available(), reason="oneDNN (the onednn-cpu-gomp wheel) is not installed"
)


def _dn(d):
    sp = "DHW"[-d:]
    return ("N" + sp + "C", sp + "IO", "N" + sp + "C")


def _lax(strides, pads):
    def conv(x, k):
        return lax.conv_general_dilated(
            x, k, strides, pads, dimension_numbers=_dn(x.ndim - 2), precision="highest"
        )

    return conv


CASES = [
    # shape, kernel extents, strides, pads
    ((2, 7, 8, 9, 3), (3, 3, 3), (1, 1, 1), [(1, 1)] * 3),
    ((1, 6, 5, 7, 2), (3, 2, 3), (1, 1, 1), [(0, 2), (1, 0), (2, 1)]),  # asymmetric
    ((2, 8, 8, 8, 2), (4, 4, 4), (2, 2, 2), [(1, 1)] * 3),  # PyTorch's k4 s2 p1
    ((2, 9, 7, 8, 3), (3, 3, 3), (2, 1, 2), [(0, 0)] * 3),  # 'VALID', mixed strides
    ((3, 9, 10, 5), (4, 5), (2, 3), [(1, 1), (1, 2)]),
    ((2, 11, 3), (3,), (1,), [(2, 0)]),
]


def _assert_gradients_equal(ours, ref, x, k, y_shape):
    w = randn(y_shape, 2)
    got = jit_grad(lambda x, k: jnp.sum(ours(x, k) * w), (0, 1))(x, k)
    want = jax.grad(lambda x, k: jnp.sum(ref(x, k) * w), (0, 1))(x, k)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


def _penalty_grads(conv, x, k):
    # a WGAN-GP critic's penalty: the input gradient, differentiated again
    def penalty(x, k):
        g = jax.grad(lambda x: jnp.sum(jnp.tanh(conv(x, k))))(x)
        return jnp.sum(g**2)

    return jax.grad(penalty, (0, 1))(x, k)


def _assert_penalty_grads_equal(ours, ref, x, k):
    got = jax.jit(lambda x, k: _penalty_grads(ours, x, k))(x, k)
    want = _penalty_grads(ref, x, k)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4 * float(np.max(np.abs(b))), rtol=0)


def _values_equal_lax(shape, ks, strides, pads):
    """(x, k, lax's convolution, oneDNN's, lax's output), oneDNN's output checked against it."""
    x, k = randn(shape), randn((*ks, shape[-1], 4), 1)
    ref = _lax(strides, pads)

    def ours(x, k):
        return onednn.conv(x, k, strides, pads)

    y = ref(x, k)
    np.testing.assert_allclose(jax.jit(ours)(x, k), y, atol=1e-5, rtol=1e-5)
    return x, k, ref, ours, y


@pytest.mark.parametrize("shape,ks,strides,pads", CASES)
def test_convolution_and_its_gradients_equal_lax(shape, ks, strides, pads):
    x, k, ref, ours, y = _values_equal_lax(shape, ks, strides, pads)
    _assert_gradients_equal(ours, ref, x, k, y.shape)


@pytest.mark.parametrize("shape,ks,strides,pads", [CASES[0], CASES[2], CASES[4]])
def test_gradient_penalty_second_derivatives_equal_lax(shape, ks, strides, pads):
    # a WGAN-GP critic's penalty: the input gradient, differentiated again (each primitive's
    # VJP is made of the other two)
    x, k = randn(shape), randn((*ks, shape[-1], 3), 1)
    ours = lambda x, k: onednn.conv(x, k, strides, pads)  # noqa: E731
    _assert_penalty_grads_equal(ours, _lax(strides, pads), x, k)


@pytest.mark.parametrize("shape,ks,strides,pads", [CASES[1], CASES[2], CASES[4], CASES[5]])
def test_conv_kernel_gradient_equals_lax(shape, ks, strides, pads):
    # the public weights primitive: d/dkernel of sum(conv(x, kernel) * dy), against lax's
    # convolution differentiated by JAX (asymmetric padding, strides, 2D, 1D)
    x, k = randn(shape), randn((*ks, shape[-1], 4), 1)
    dy = randn(_lax(strides, pads)(x, k).shape, 2)
    want = jax.grad(lambda k: jnp.sum(_lax(strides, pads)(x, k) * dy))(k)
    got = jax.jit(lambda x, dy: onednn.conv_kernel_gradient(x, dy, k.shape, strides, pads))(x, dy)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)


def test_hand_computed_1d():
    # [1, 2, 3, 4] with kernel [1, 0, -1], one zero on each side: x[i-1] - x[i+1]
    x = jnp.asarray([1.0, 2.0, 3.0, 4.0]).reshape(1, 4, 1)
    k = jnp.asarray([1.0, 0.0, -1.0]).reshape(3, 1, 1)
    y = onednn.conv(x, k, (1,), [(1, 1)])
    np.testing.assert_array_equal(np.asarray(y).ravel(), [-2.0, -2.0, -2.0, 3.0])


def test_vmap_over_a_batch_of_kernels():
    x, ks = randn((2, 6, 6, 6, 2)), randn((3, 3, 3, 3, 2, 4), 1)
    got = jax.vmap(lambda k: onednn.conv(x, k, (1, 1, 1), [(1, 1)] * 3))(ks)
    want = jnp.stack([_lax((1, 1, 1), [(1, 1)] * 3)(x, k) for k in ks])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def _assert_module_equals(fast, plain, params, x, atol=1e-4, rtol=1e-5):
    """``fast`` (on a oneDNN route) against ``plain`` with the same parameters: values, and the
    gradients of a nonlinear loss with respect to the parameters and the input."""

    def loss(module):
        return lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))

    np.testing.assert_allclose(fast.apply(params, x), plain.apply(params, x), atol=1e-5, rtol=1e-5)
    got = jit_grad(loss(fast), (0, 1))(params, x)
    want = jax.grad(loss(plain), (0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=atol, rtol=rtol)


def _graph(fn, *shapes, dtype=jnp.float32):
    args = [jax.ShapeDtypeStruct(s, dtype) for s in shapes]
    return str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize(
    "shape,cin,strides,dtype,routed",
    [
        ((2, 64, 64, 64), 32, 1, jnp.float32, True),  # U-Net 3D's levels
        ((2, 16, 16, 16), 128, 1, jnp.float32, True),  # 2^13 positions
        ((1, 8, 8, 8), 256, 1, jnp.float32, True),  # 2^9 positions, stride 1
        ((1, 4, 8, 8), 256, 1, jnp.float32, True),  # 3D: 2^8 positions, from 200
        ((2, 4, 4, 4), 256, 1, jnp.float32, "AMX"),  # 3D: 2^7 positions, from 100 on AMX
        ((1, 4, 4, 4), 256, 1, jnp.float32, False),  # 3D: 2^6 positions
        ((2, 64, 64, 64), 32, 2, jnp.float32, True),  # k3 s2 3D: its depth-stacked 2D form
        ((2, 64, 64, 64), 32, 1, jnp.bfloat16, "bf16"),  # bfloat16: where the CPU has kernels
        ((1, 4, 8, 8), 256, 1, jnp.bfloat16, "bf16"),  # ... at any size
        ((4, 16, 16, 16), 3, 2, jnp.bfloat16, "bf16"),  # ... and strided 3D too
        ((2, 6, 6, 6), 64, 2, jnp.float32, "no AMX"),  # strided 3D (54 positions)
        ((2, 12, 12, 12), 32, 2, jnp.float32, True),  # strided 3D (432 positions)
        ((2, 48, 48, 48), 2, 2, jnp.float32, False),  # strided 3D, < 8 input channels
        ((8, 128, 128), 32, 1, jnp.float32, True),  # U-Net 2D's levels
        ((8, 16, 16), 256, 1, jnp.float32, True),  # 2^11 positions, stride 1
        ((2, 16, 8), 256, 1, jnp.float32, False),  # 2^8 positions
        ((64, 32, 32), 64, 2, jnp.float32, True),  # strided 2D (DCGAN)
        ((4, 128, 128), 3, 2, jnp.float32, False),  # strided 2D, < 8 input channels
        ((64, 8, 8), 256, 2, jnp.float32, "no AMX"),  # strided 2D, 2^10 positions
        ((32, 8, 8), 256, 2, jnp.float32, False),  # strided 2D, 2^9 positions
        ((4, 2048), 8, 1, jnp.float32, False),  # 1D (2^13 positions)
    ],
)
def test_conv_nd_routes_2d_and_3d_convolutions_to_onednn(shape, cin, strides, dtype, routed):
    if routed == "bf16":
        routed = onednn.bfloat16_kernels() is not None
    elif routed == "no AMX":  # the EPYC's thresholds, not the AMX Xeon's
        routed = not layers._amx()
    elif routed == "AMX":  # the AMX Xeon's thresholds, not the EPYC's
        routed = layers._amx()
    ks = (3,) * len(shape[1:])
    graph = _graph(
        lambda x, k: conv_nd(x, k, strides, "SAME"), (*shape, cin), (*ks, cin, 32), dtype=dtype
    )
    assert ("ffi_call" in graph) == routed


@pytest.mark.parametrize("direct", [False, True])
def test_a_k4_s2_3d_convolution_on_onednn(monkeypatch, direct):
    # Vox2Vox's and the 3D PatchGAN's 2 x 24^3, 16 -> 32. Without oneDNN's strided 3D route
    # (both tables without 3D), oneDNN convolves the input folded in all three axes ([2, 13, 13,
    # 13, 8 x 16]) with the kernel [2, 2, 2, 128, 32], not a depth-stacked 2D form ([2 x 12, 13,
    # 13, 4 x 4 x 16]); with it, one strided oneDNN convolution of the input as it is
    table = {3: 1} if direct else {}
    monkeypatch.setattr(layers, "_ONEDNN_STRIDED_MIN_POSITIONS", table)
    monkeypatch.setattr(layers, "_ONEDNN_STRIDED_MIN_POSITIONS_AMX", table)
    graph = _graph(
        lambda x, k: conv_nd(x, k, 2, [(1, 1)] * 3), (2, 24, 24, 24, 16), (4, 4, 4, 16, 32)
    )
    assert "ffi_call" in graph
    assert ("f32[2,13,13,13,128]" in graph and "f32[2,2,2,128,32]" in graph) == (not direct)
    assert "f32[24,13,13,256]" not in graph
    x, k = randn((2, 24, 24, 24, 16)), 0.05 * randn((4, 4, 4, 16, 32), 1)
    ours, ref = jax.jit(lambda x, k: conv_nd(x, k, 2, [(1, 1)] * 3)), _lax((2,) * 3, [(1, 1)] * 3)
    np.testing.assert_allclose(ours(x, k), ref(x, k), atol=1e-4, rtol=1e-5)
    w = randn((2, 12, 12, 12, 32), 2)
    got = jit_grad(lambda x, k: jnp.sum(ours(x, k) * w), (0, 1))(x, k)
    want = jax.grad(lambda x, k: jnp.sum(ref(x, k) * w), (0, 1))(x, k)
    for a, b in zip(got, want, strict=True):  # the kernel's sums over 3456 positions: ~80
        np.testing.assert_allclose(a, b, atol=1e-5 * float(np.max(np.abs(b))), rtol=0)


@pytest.mark.parametrize(
    "shape,cout,routed",
    [
        ((1, 31, 31), 1, False),  # the PatchGAN's last layer: < 8 outputs, < 2^12 positions
        ((1, 31, 31), 8, True),
        ((1, 64, 64), 3, True),  # CycleGAN's output layer: 2^12 positions
    ],
)
def test_stride_1_convolutions_with_few_outputs_need_more_positions(shape, cout, routed):
    graph = _graph(lambda x, k: conv_nd(x, k, 1, "SAME"), (*shape, 64), (4, 4, 64, cout))
    assert ("ffi_call" in graph) == routed


@pytest.mark.parametrize(
    "shape,cout,dtype,least,routed",
    [
        ((2, 9, 7, 5), 3, jnp.float32, 1, True),  # a U-Net head's 1x1 convolution, 2D
        ((2, 4, 5, 3, 4), 2, jnp.float32, 1, True),  # ... 3D
        ((2, 9, 7, 5), 3, jnp.float32, 127, False),  # 126 rows: below the threshold
        ((8, 128, 128, 32), 3, jnp.float32, None, True),  # U-Net 2D's head: 2^17 rows
        ((2, 8, 8, 8, 128), 512, jnp.float32, None, False),  # an up-sampler's, 2^10 rows
        ((2, 9, 7, 5), 3, jnp.bfloat16, None, "bf16"),  # bfloat16: any size
        ((63, 5), 3, jnp.float32, 1, False),  # no spatial axis (a dense layer's)
    ],
)
def test_a_1x1_kernel_gradient_runs_on_onednn(monkeypatch, shape, cout, dtype, least, routed):
    # channel_matmul's kernel gradient, x^T dy over the rows, by oneDNN's weights primitive for
    # the 1x1 convolution from _ONEDNN_1X1_KERNEL_GRADIENT_MIN_ROWS rows (every one in bfloat16)
    if least is not None:
        monkeypatch.setattr(layers, "_ONEDNN_1X1_KERNEL_GRADIENT_MIN_ROWS", least)
    if routed == "bf16":
        routed = onednn.bfloat16_kernels() is not None
    cin = shape[-1]

    def kernel_gradient(x, k, w):
        return jax.grad(lambda k: jnp.sum(layers.channel_matmul(x, k) * w))(k)

    graph = _graph(kernel_gradient, shape, (cin, cout), (*shape[:-1], cout), dtype=dtype)
    assert ("ffi_call" in graph) == routed
    if max(shape) > 64 or (dtype == jnp.bfloat16 and not routed):
        return  # the graph is what these cases test (and XLA's bfloat16 product rounds as it may)
    x, k, w = randn(shape), randn((cin, cout), 1), randn((*shape[:-1], cout), 2)
    x, k, w = x.astype(dtype), k.astype(dtype), w.astype(dtype)
    want = np.einsum(  # the sum over the rows, in float64
        "rc,rd->cd",
        np.asarray(x, np.float64).reshape(-1, cin),
        np.asarray(w, np.float64).reshape(-1, cout),
    )
    got = np.asarray(jax.jit(kernel_gradient)(x, k, w), np.float64)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2  # bfloat16: the result is rounded once
    np.testing.assert_allclose(got, want, atol=tol * float(np.max(np.abs(want))), rtol=0)
    if dtype == jnp.float32:  # a gradient penalty's second derivatives, against jnp.dot's
        _assert_penalty_grads_equal(layers.channel_matmul, jnp.dot, x, k)


TRANSPOSE_CASES = [
    # shape, kernel extents, strides, pads of the convolution whose input gradient it is
    ((2, 5, 6, 3), (4, 4), (2, 2), [(1, 1), (1, 1)]),  # ConvTranspose4's
    ((1, 4, 5, 2), (3, 2), (3, 2), [(0, 2), (1, 0)]),
    ((2, 3, 4, 3, 2), (4, 4, 4), (2, 2, 2), [(1, 1)] * 3),
    ((3, 7, 2), (3,), (2,), [(1, 1)]),
]


def _conv_transpose_reference(strides, pads, y_shape):
    """The input gradient of lax's convolution (output ``y_shape`` -> the input ``x``) with the
    flipped, channel-swapped kernel: what :func:`onednn.conv_transpose` computes."""

    def ref(x, k):
        d = k.ndim - 2
        w = jnp.swapaxes(jnp.flip(k, tuple(range(d))), -1, -2)
        _, vjp = jax.vjp(lambda y: _lax(strides, pads)(y, w), jnp.zeros(y_shape))
        return vjp(x)[0]

    return ref


@pytest.mark.parametrize("shape,ks,strides,pads", TRANSPOSE_CASES)
def test_conv_transpose_is_the_adjoint_of_the_convolution(shape, ks, strides, pads):
    # onednn.conv_transpose(x, k) is the input gradient of lax's strided convolution with the
    # flipped, channel-swapped kernel, and lax.conv_transpose where lax's 'SAME' means the
    # same padding (k4 s2 p1); values and gradients
    x, k = randn(shape), randn((*ks, shape[-1], 4), 1)
    out = zip(shape[1:-1], strides, ks, pads, strict=True)
    y_shape = (shape[0], *((s - 1) * st + kk - lo - hi for s, st, kk, (lo, hi) in out), 4)
    ref = _conv_transpose_reference(strides, pads, y_shape)

    def ours(x, k):
        return onednn.conv_transpose(x, k, strides, pads)

    y = ref(x, k)
    assert y.shape == y_shape
    np.testing.assert_allclose(jax.jit(ours)(x, k), y, atol=1e-5, rtol=1e-5)
    if ks == (4, 4) and strides == (2, 2):
        np.testing.assert_allclose(
            ours(x, k),
            lax.conv_transpose(x, k, strides, "SAME", dimension_numbers=_dn(2)),
            atol=1e-5,
            rtol=1e-5,
        )
    g = randn(y.shape, 2)
    got = jit_grad(lambda x, k: jnp.sum(ours(x, k) * g), (0, 1))(x, k)
    want = jax.grad(lambda x, k: jnp.sum(ref(x, k) * g), (0, 1))(x, k)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


def _ffi_outputs(jaxpr) -> list[tuple[int, ...]]:
    """The output shapes of every ffi_call in ``jaxpr`` and its sub-jaxprs."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "ffi_call":
            shapes += [tuple(v.aval.shape) for v in eqn.outvars]
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            shapes += _ffi_outputs(sub)
    return shapes


@pytest.mark.parametrize("shape,ks,strides,pads", TRANSPOSE_CASES)
def test_conv_transpose_kernel_gradient_is_written_in_the_kernels_layout(shape, ks, strides, pads):
    # oneDNN writes the kernel gradient as [*k, Cin, Cout], the kernel's own layout: XLA is left
    # the spatial flip, and no consumer (Adam's updates) reads it through a channel transpose.
    # Its second derivatives (through the swapped primitive's own VJP) equal the reference's.
    x, k = randn(shape), randn((*ks, shape[-1], 4), 1)
    assert shape[-1] != 4  # so that the two layouts have different shapes

    def ours(x, k):
        return onednn.conv_transpose(x, k, strides, pads)

    ref = _conv_transpose_reference(strides, pads, jax.eval_shape(ours, x, k).shape)
    grad = jax.grad(lambda k: jnp.sum(jnp.sin(ours(x, k))))
    outputs = _ffi_outputs(jax.make_jaxpr(grad)(k).jaxpr)
    assert k.shape in outputs and (*ks, 4, shape[-1]) not in outputs, outputs

    def penalty(conv):  # the kernel gradient's norm, differentiated again
        def p(x, k):
            g = jax.grad(lambda k: jnp.sum(jnp.sin(conv(x, k))), argnums=0)(k)
            return jnp.sum(g**2)

        return p

    got = jit_grad(penalty(ours), (0, 1))(x, k)
    want = jax.grad(penalty(ref), (0, 1))(x, k)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4 * float(np.max(np.abs(b))), rtol=0)


@pytest.mark.parametrize("shape", [(1, 64, 64, 3), (2, 16, 8, 8, 3)])
def test_conv_transpose4_on_the_onednn_route_equals_linen(monkeypatch, shape):
    # a large ConvTranspose4 (2^14 output positions, the threshold here) takes oneDNN's route
    # and equals Linen's ConvTranspose with the same parameters; one with half the positions
    # does not
    import flax.linen as nn

    monkeypatch.setattr(layers, "_ONEDNN_TRANSPOSE_MIN_POSITIONS", {2: 1 << 14, 3: 1 << 14})
    monkeypatch.setattr(layers, "_ONEDNN_TRANSPOSE_MIN_POSITIONS_AMX", {2: 1 << 14, 3: 1 << 14})
    d = len(shape) - 2
    x = randn(shape)
    fast = layers.ConvTranspose4(8, spatial_dims=d)
    plain = nn.ConvTranspose(8, (4,) * d, strides=(2,) * d, padding="SAME")
    params = plain.init(jax.random.PRNGKey(0), x)
    assert "ffi_call" in str(jax.make_jaxpr(lambda p: fast.apply(p, x))(params))
    small = randn((shape[0], shape[1] // 2, *shape[2:]))
    assert "ffi_call" not in str(jax.make_jaxpr(lambda p: fast.apply(p, small))(params))
    _assert_module_equals(fast, plain, params, x, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("amx", [False, True])
def test_strided_and_transposed_routes_take_the_thresholds_of_the_cpu_class(monkeypatch, amx):
    # the AMX Xeon's thresholds where oneDNN's bfloat16 kernels are AMX's, the EPYC's elsewhere:
    # a strided 2D convolution with 2^10 output positions of extent 4 (DCGAN's critic: im2col
    # on AMX), a strided 3D one with 54, a 2D ConvTranspose4 from inputs of extent 4 (DCGAN's
    # generator), the forward of a 3D one with 3456 and a 3D UpSample with 2^16 go to oneDNN
    # only on the latter; strided 2D ones with 2^10 positions of extent 32 (pix2pix's) or
    # 2^12, a strided 3D one with 3456 (Vox2Vox's) and a 2D ConvTranspose4 with 2^14 on both
    monkeypatch.setattr(layers, "_amx", lambda: amx)

    def routed(fn, *shapes):
        return "ffi_call" in _graph(fn, *shapes)

    strided = lambda x, k: conv_nd(x, k, 2, "SAME")  # noqa: E731
    assert routed(strided, (64, 8, 8, 256), (4, 4, 256, 32)) == (not amx)
    assert routed(strided, (64, 16, 16, 256), (4, 4, 256, 32))
    assert routed(strided, (1, 64, 64, 128), (4, 4, 128, 32))
    assert routed(strided, (2, 6, 6, 6, 64), (4, 4, 4, 64, 32)) == (not amx)
    assert routed(strided, (2, 24, 24, 24, 16), (4, 4, 4, 16, 32))
    # a stride-1 3D one with 128 output positions: from 100 on AMX, from 200 elsewhere
    stride_1 = lambda x, k: conv_nd(x, k, 1, "SAME")  # noqa: E731
    assert routed(stride_1, (2, 4, 4, 4, 256), (3, 3, 3, 256, 32)) == amx
    # < 8 input channels: the space-to-depth form ([2, 25, 25, 25, 8 x 2]) on both
    assert "f32[2,25,25,25,16]" in _graph(strided, (2, 48, 48, 48, 2), (4, 4, 4, 2, 16))
    calls, original = [], onednn.conv_transpose

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(onednn, "conv_transpose", spy)
    for shape in [(64, 4, 4, 32), (64, 8, 8, 32), (2, 6, 6, 6, 32)]:
        up = layers.ConvTranspose4(16, spatial_dims=len(shape) - 2)
        x = jax.ShapeDtypeStruct(shape, jnp.float32)
        jax.make_jaxpr(up.apply)(jax.eval_shape(up.init, jax.random.PRNGKey(0), x), x)
    # a 3D UpSample with 2^16 output positions likewise; one with 2^19 on both, with 2^13 on
    # neither
    for shape in [(2, 16, 16, 16, 8), (2, 32, 32, 32, 8), (2, 8, 8, 8, 8)]:
        up3 = layers.UpSample(4, spatial_dims=3)
        x3 = jax.ShapeDtypeStruct(shape, jnp.float32)
        jax.make_jaxpr(up3.apply)(jax.eval_shape(up3.init, jax.random.PRNGKey(0), x3), x3)
    epyc_only = {(64, 4, 4, 32), (2, 6, 6, 6, 32), (2, 16, 16, 16, 8)}
    assert set(calls) == {(64, 8, 8, 32), (2, 32, 32, 32, 8)} | (set() if amx else epyc_only)


def _onednn_calls(fn, *args) -> int:
    """How many oneDNN calls the compiled ``fn`` makes (XLA has removed those whose results
    nothing uses)."""
    return jax.jit(fn).lower(*args).compile().as_text().count(f'"{onednn._TARGET}')


@pytest.mark.parametrize(
    "shape,features,forward_calls",
    [
        ((1, 64, 64, 3), 3, 0),  # 2D, 48 tap columns: the overlap-add, no oneDNN call
        ((2, 16, 8, 8, 3), 1, 0),  # 3D, 64 tap columns: the overlap-add
        ((2, 16, 8, 8, 3), 5, 1),  # 320 tap columns: the shuffle's one convolution
    ],
)
def test_conv_transpose4_with_few_outputs_runs_its_gradients_on_onednn(
    shape, features, forward_calls
):
    # fewer than 8 output channels on the oneDNN route: the forward is an XLA formulation
    # (oneDNN's transposed-convolution kernel is slow there), the gradients are oneDNN's (its
    # strided convolution for the input, its weights gradient for the kernel); values and
    # gradients equal Linen's ConvTranspose
    import flax.linen as nn

    d = len(shape) - 2
    x = randn(shape)
    fast = layers.ConvTranspose4(features, spatial_dims=d)
    plain = nn.ConvTranspose(features, (4,) * d, strides=(2,) * d, padding="SAME")
    params = plain.init(jax.random.PRNGKey(0), x)
    assert _onednn_calls(fast.apply, params, x) == forward_calls
    grads = jax.grad(lambda p, x: jnp.sum(jnp.sin(fast.apply(p, x))), (0, 1))
    assert _onednn_calls(grads, params, x) == forward_calls + 2
    _assert_module_equals(fast, plain, params, x, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("amx", [False, True])
def test_mid_sized_3d_conv_transpose4_on_amx_runs_only_its_gradients_on_onednn(monkeypatch, amx):
    # on the AMX Xeon a float32 3D ConvTranspose4 with 2^11 to 2^14 output positions (Vox2Vox's
    # 2 x 6^3, 128 -> 32: 3456) computes its forward as the overlap-add and its gradients by
    # oneDNN; elsewhere oneDNN computes all three (from 2^10). Values and gradients equal
    # Linen's ConvTranspose either way
    import flax.linen as nn

    monkeypatch.setattr(layers, "_amx", lambda: amx)
    x = randn((2, 6, 6, 6, 24))
    fast = layers.ConvTranspose4(16, spatial_dims=3)
    plain = nn.ConvTranspose(16, (4,) * 3, strides=(2,) * 3, padding="SAME")
    params = plain.init(jax.random.PRNGKey(0), x)
    forward_calls = 0 if amx else 1
    assert _onednn_calls(fast.apply, params, x) == forward_calls
    grads = jax.grad(lambda p, x: jnp.sum(jnp.sin(fast.apply(p, x))), (0, 1))
    assert _onednn_calls(grads, params, x) == forward_calls + 2
    _assert_module_equals(fast, plain, params, x, atol=1e-3, rtol=1e-4)


def test_winograd_convolutions_stay_off_the_onednn_route():
    # CycleGAN's residual-block convolution (1 x 64^2, 256 -> 256, 3x3) is Winograd's, not
    # oneDNN's; with Winograd switched off it goes to oneDNN
    shapes = ((1, 64, 64, 256), (3, 3, 256, 256))
    assert "ffi_call" not in _graph(lambda x, k: conv_nd(x, k), *shapes)
    with winograd_convolutions(False):
        assert "ffi_call" in _graph(lambda x, k: conv_nd(x, k), *shapes)


def test_conv_nd_keeps_xla_when_switched_off_and_off_the_cpu(monkeypatch):
    big3d = ((2, 64, 64, 64, 32), (3, 3, 3, 32, 32))
    with onednn.enabled(False):
        assert "ffi_call" not in _graph(lambda x, k: conv_nd(x, k), *big3d)
    assert "ffi_call" in _graph(lambda x, k: conv_nd(x, k), *big3d)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert "ffi_call" not in _graph(lambda x, k: conv_nd(x, k), *big3d)


def test_a_3d_conv_module_on_the_route_equals_the_plain_one(monkeypatch):
    # a whole fast Conv (parameters, 'SAME' padding, bias) on the route equals `fast=False`
    monkeypatch.setattr(layers, "_ONEDNN_STRIDE_1_MIN_POSITIONS", 1)
    monkeypatch.setattr(layers, "_ONEDNN_MIN_POSITIONS", 1)  # 4 outputs: the few-outputs rule
    x = randn((2, 6, 7, 5, 3))
    fast, plain = Conv(4, 3, spatial_dims=3), Conv(4, 3, spatial_dims=3, fast=False)
    params = plain.init(jax.random.PRNGKey(0), x)
    assert "ffi_call" in str(jax.make_jaxpr(lambda p: fast.apply(p, x))(params))
    _assert_module_equals(fast, plain, params, x)


def test_implementation_names_the_kernel():
    name = onednn.implementation(
        "forward", (1, 8, 8, 8, 16), (3, 3, 3, 16, 16), (1,) * 3, [(1, 1)] * 3
    )
    assert name and "ref" not in name


@pytest.fixture(params=["C", "Python"])
def handler(request, monkeypatch):
    """XLA's calls go to the C handler (``_onednn_ffi.c``, where it is built) or to Python's."""
    dnn = onednn._load()
    if request.param == "C" and dnn.native is None:
        pytest.skip("the C handler (medjax/models/_onednn_ffi.c) is not built here")
    if request.param == "Python":
        monkeypatch.setattr(dnn, "from_python", True)
    return request.param


def _targets(fn, *args) -> list[str]:
    text = jax.jit(fn).lower(*args).compile().as_text()
    return sorted(set(re.findall(r'custom_call_target="(medjax_onednn_[a-z_]+)"', text)))


@pytest.mark.parametrize("shape,ks,strides,pads", [CASES[0], CASES[2], CASES[4]])
def test_both_handlers_compute_the_convolution_and_its_gradients(handler, shape, ks, strides, pads):
    # the same primitives, run from C or from Python, against lax (reorders into oneDNN's
    # layouts and scratchpads included: the kernel gradient of a 3D convolution uses both)
    x, k, ref, ours, y = _values_equal_lax(shape, ks, strides, pads)
    _assert_gradients_equal(ours, ref, x, k, y.shape)
    want = onednn._TARGET if handler == "C" else onednn._TARGET_PYTHON
    assert _targets(ours, x, k) == [want]


def test_the_c_handler_is_built_where_a_c_compiler_is():
    # `pip install` builds it (setup.py) and skips it quietly where the build fails: this is
    # where a failing build shows
    if not sys.platform.startswith("linux") or not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler here: the Python handler runs the primitives")
    if os.environ.get("MEDJAX_ONEDNN_NATIVE", "1") == "0":
        pytest.skip("MEDJAX_ONEDNN_NATIVE=0")
    assert onednn._native() is not None, "medjax/models/_onednn_ffi.c was not built or loaded"


def test_a_call_the_c_handler_does_not_know_goes_to_python(monkeypatch):
    # a plan never handed over to C (here: hand-over switched off) runs from the Python handler
    dnn = onednn._load()
    if dnn.native is None:
        pytest.skip("the C handler is not built here")
    ran = []
    run = onednn._OneDNN.run

    def spy(self, plan_id, pointers):
        ran.append(plan_id)
        run(self, plan_id, pointers)

    monkeypatch.setattr(onednn._OneDNN, "hand_over", lambda self, plan_id: None)
    monkeypatch.setattr(onednn._OneDNN, "run", spy)
    x, k = randn((1, 7, 9, 3)), randn((3, 3, 3, 5), 1)  # a geometry of this test only
    pads = [(1, 1), (1, 1)]
    got = jax.jit(lambda x, k: onednn.conv(x, k, (1, 1), pads))(x, k)
    np.testing.assert_allclose(got, _lax((1, 1), pads)(x, k), atol=1e-5, rtol=1e-5)
    assert ran


def test_a_failing_primitive_in_the_c_handler_is_an_error_naming_onednns_status():
    # a primitive whose memory objects are missing: oneDNN refuses to take the arrays'
    # addresses, and the call fails with its status instead of returning an unwritten output
    dnn = onednn._load()
    if dnn.native is None:
        pytest.skip("the C handler is not built here")
    none = (ctypes.c_void_p * 3)()
    handle = dnn.native.medjax_onednn_add(none, 0, None, None, 0, 0, None, None, None)
    plan_id = dnn.plan_id(("forward", (1, 3, 1), (1, 1, 1), (1, 3, 1), "a plan with no memory"))
    assert dnn.native.medjax_onednn_bind(plan_id, handle, 0, 1, 2) == 0
    call = jax.ffi.ffi_call(onednn._TARGET, jax.ShapeDtypeStruct((1, 3, 1), jnp.float32))
    x, k = jnp.ones((1, 3, 1)), jnp.ones((1, 1, 1))
    with pytest.raises(Exception, match=r"oneDNN failed running a convolution \(dnnl_status_t"):
        jax.block_until_ready(jax.jit(lambda x, k: call(x, k, plan=np.int64(plan_id)))(x, k))


def test_an_error_inside_onednn_reaches_the_caller(monkeypatch):
    # the Python FFI handler hands an exception back to XLA as an error with its message: the
    # call fails, it never returns an unwritten output
    def fail(self, plan_id, pointers):
        raise ValueError("the primitive failed")

    monkeypatch.setattr(onednn._load(), "from_python", True)
    monkeypatch.setattr(onednn._OneDNN, "run", fail)
    x, k = randn((1, 5, 5, 5, 2)), randn((3, 3, 3, 2, 2), 1)
    with pytest.raises(Exception, match="ValueError: the primitive failed"):
        jax.block_until_ready(jax.jit(lambda x, k: onednn.conv(x, k, (1,) * 3, [(1, 1)] * 3))(x, k))


STRIDE_1_CASES = [CASES[0], CASES[1], CASES[5], ((2, 9, 8, 3), (4, 4), (1, 1), [(1, 2), (2, 1)])]


@pytest.mark.parametrize("other", [True, False])
@pytest.mark.parametrize("shape,ks,strides,pads", STRIDE_1_CASES)
def test_stride_1_convolutions_in_either_exact_form_equal_lax(
    monkeypatch, shape, ks, strides, pads, other
):
    # the forward convolution as the adjoint convolution's backward-data primitive (and the
    # input gradient as its forward primitive), or each as its own: values, gradients and a
    # gradient penalty's second derivatives against lax
    monkeypatch.setattr(onednn, "_prefers_other", lambda kind, geometry, alt: other)
    calls = []  # (primitive, the input shape of the convolution it belongs to)
    call = onednn._call

    def record(kind, a, b, geometry):
        calls.append((kind, geometry[0]))
        return call(kind, a, b, geometry)

    monkeypatch.setattr(onednn, "_call", record)
    x, k, ref, ours, y = _values_equal_lax(shape, ks, strides, pads)
    # the forward convolution of x, or the backward data of the adjoint one (input: y's shape)
    assert calls == ([("data", y.shape)] if other else [("forward", x.shape)])
    _assert_gradients_equal(ours, ref, x, k, y.shape)
    # the backward pass: the input gradient in the same form, the weights gradient as it is
    own = {("forward", x.shape), ("data", x.shape), ("weights", x.shape)}
    assert set(calls[1:]) == (
        {("data", y.shape), ("forward", y.shape), ("weights", x.shape)} if other else own
    )

    _assert_penalty_grads_equal(ours, ref, x, k)


def test_the_other_form_of_a_convolution_hand_computed():
    # x [2, 11, 3], k3 -> 4 channels, padding (2, 0): y [2, 11, 4]; the adjoint convolution maps
    # y back onto x with the kernel [3, 4, 3] and padding (3 - 1 - 2, 3 - 1 - 0) = (0, 2)
    geometry = onednn._geometry((2, 11, 3), (3, 3, 4), (1,), [(2, 0)])
    want = ((2, 11, 4), (3, 4, 3), (1,), ((0, 2),), "float32")
    assert onednn._other_form("forward", geometry) == ("data", want)
    assert onednn._other_form("data", geometry) == ("forward", want)
    assert onednn._other_form("weights", geometry) is None
    # none for a strided convolution, nor for a padding larger than k - 1 (it would crop)
    assert (
        onednn._other_form("forward", onednn._geometry((2, 11, 3), (3, 3, 4), (2,), [(1, 1)]))
        is None
    )
    assert (
        onednn._other_form("forward", onednn._geometry((2, 11, 3), (3, 3, 4), (1,), [(3, 0)]))
        is None
    )


def test_the_faster_form_is_timed_once_and_kept(monkeypatch):
    dnn = onednn._load()
    monkeypatch.setattr(dnn, "_saved", onednn._Choices(None))  # nothing kept from other runs
    a = onednn._geometry((1, 9, 9, 2), (3, 3, 2, 5), (1, 1), [(1, 1)] * 2)
    b = onednn._geometry((1, 9, 9, 3), (3, 3, 3, 5), (1, 1), [(1, 1)] * 2)
    for kind, geometry in [("forward", a), ("data", b)]:  # built (and their layouts chosen)
        dnn.plan(onednn._key(kind, geometry))
        dnn.plan(onednn._key(*onednn._other_form(kind, geometry)))
    timed = []

    def fake_times(plans):
        timed.append([p.kind for p in plans])
        return times[plans[0].shapes]

    monkeypatch.setattr(onednn, "_time_plans", fake_times)
    times = {dnn.plan(onednn._key("forward", a)).shapes: [2.0, 1.0]}  # the other form 2x faster
    times[dnn.plan(onednn._key("data", b)).shapes] = [1.0, 0.95]  # within the 10 % margin
    assert onednn._prefers_other("forward", a, onednn._other_form("forward", a))
    assert onednn._prefers_other("forward", a, onednn._other_form("forward", a))
    assert timed == [["forward", "data"]]  # timed once: own form first, then the other
    assert not onednn._prefers_other("data", b, onednn._other_form("data", b))
    assert "(data primitive, flipped kernel)" in onednn.implementation("forward", *a)
    assert "flipped" not in onednn.implementation("data", *b)
    monkeypatch.setenv("MEDJAX_ONEDNN_AUTOTUNE", "0")
    assert not onednn._prefers_other("forward", a, onednn._other_form("forward", a))
    assert len(timed) == 2


def test_timing_runs_the_primitives(monkeypatch):
    # one untimed run of each plan, then the plans interleaved for the timed rounds, each on
    # page-aligned scratch arrays of its own shapes
    dnn = onednn._load()
    geometry = onednn._geometry((1, 9, 9, 2), (3, 3, 2, 5), (1, 1), [(1, 1)] * 2)
    other = onednn._other_form("forward", geometry)
    plans = [dnn.plan(onednn._key("forward", geometry)), dnn.plan(onednn._key(*other))]
    runs = []
    run = onednn._Plan.run

    def record(plan, pointers):
        runs.append((plans.index(plan), [p % onednn._ALIGN for p in pointers]))
        return run(plan, pointers)

    monkeypatch.setattr(onednn._Plan, "run", record)
    times = onednn._time_plans(plans, rounds=3)
    assert [i for i, _ in runs] == [0, 1] * 4
    assert all(offsets == [0, 0, 0] for _, offsets in runs)
    assert len(times) == 2 and all(0 < t < 1 for t in times)


def test_a_plan_follows_each_calls_arrays_and_the_moved_scratch_memory(handler):
    # a plan's memory objects are built once and pointed at each call's arrays; the scratch
    # memory of the reorders and scratchpads moves when a larger call needs more, and the
    # plans built before point their inner arrays at the new one
    dnn = onednn._load()
    shape, ks, strides, pads = (2, 12, 10, 32), (4, 4), (2, 2), [(1, 1)] * 2

    def grads(conv):
        return jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.sin(conv(x, k))), (0, 1)))

    ours = grads(lambda x, k: onednn.conv(x, k, strides, pads))
    ref = grads(_lax(strides, pads))
    key = onednn._key("data", onednn._geometry(shape, (*ks, 32, 64), strides, pads))
    for seed in range(3):
        if seed == 2:
            with dnn._running:
                _, generation, size = dnn.scratch(0)
                dnn.scratch(size + onednn._ALIGN)
                assert dnn.scratch(0)[1] == generation + 1
        x, k = randn(shape, seed), randn((*ks, 32, 64), seed + 10)
        for a, b in zip(ours(x, k), ref(x, k), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)
    plan = dnn.plan(key)  # the input gradient: its kernel reordered, with a scratchpad
    with dnn._running:
        assert plan._scratch_need > 0 and plan.generation() == dnn.scratch(0)[1]


@pytest.mark.parametrize("blocked_faster", [True, False])
def test_a_primitive_runs_on_the_layouts_that_timed_faster(monkeypatch, blocked_faster):
    # a strided forward convolution with 32 -> 64 channels: oneDNN's own layouts (blocked, with
    # reorders of the arrays) or the arrays' channels-last ones, whichever timed faster; both
    # equal lax
    dnn = onednn._load()
    monkeypatch.setattr(dnn, "_plans", {})
    monkeypatch.setattr(dnn, "_saved", onednn._Choices(None))
    timed = []

    def fake_times(plans):
        timed.append([any(p.reordered) for p in plans])
        return [2.0, 1.0] if blocked_faster else [1.0, 2.0]

    monkeypatch.setattr(onednn, "_time_plans", fake_times)
    shape, ks, strides, pads = (2, 12, 10, 32), (4, 4), (2, 2), [(1, 1)] * 2
    x, k = randn(shape), randn((*ks, 32, 64), 1)
    y = jax.jit(lambda x, k: onednn.conv(x, k, strides, pads))(x, k)
    np.testing.assert_allclose(y, _lax(strides, pads)(x, k), atol=1e-4, rtol=1e-5)
    assert timed == [[False, True]]  # channels-last first, then oneDNN's layouts
    key = onednn._key("forward", onednn._geometry(shape, k.shape, strides, pads))
    assert any(dnn.plan(key).reordered) == blocked_faster
    monkeypatch.setattr(dnn, "_plans", {})  # built again from the kept choice, not timed
    assert any(dnn.plan(key).reordered) == blocked_faster and len(timed) == 1
    monkeypatch.setattr(dnn, "_plans", {})
    monkeypatch.setattr(dnn, "_saved", onednn._Choices(None))
    monkeypatch.setenv("MEDJAX_ONEDNN_AUTOTUNE", "0")
    assert not any(dnn.plan(key).reordered)
    assert len(timed) == 1


@pytest.mark.parametrize("all_own_faster", [True, False])
def test_backward_weights_keep_the_activations_channels_last(monkeypatch, all_own_faster):
    # oneDNN's backward-weights kernels want their kernel in oneDNN's own layout; asked for
    # channels-last activations and that kernel layout, the plan reorders the kernel alone (not
    # the two activation-sized arrays), or all three where that timed faster; the kernel
    # gradient equals lax's either way
    dnn = onednn._load()
    monkeypatch.setattr(dnn, "_plans", {})
    monkeypatch.setattr(dnn, "_saved", onednn._Choices(None))
    shape, ks, strides, pads = (2, 6, 7, 5, 16), (3, 3, 3), (1, 1, 1), [(1, 1)] * 3
    key = onednn._key("weights", onednn._geometry(shape, (*ks, 16, 32), strides, pads))
    if "avx512_core" not in onednn._Plan(dnn, *key, layouts="any").info_str:
        pytest.skip("oneDNN's channels-last backward-weights kernel checked on AVX-512 only")
    plain = onednn._Plan(dnn, *key)
    assert not onednn._generic(plain.info_str), plain.info_str
    assert plain.reordered == (False, True, False)
    timed = []

    def fake_times(plans):
        timed.append([p.reordered for p in plans])
        return [2.0, 1.0] if all_own_faster else [1.0, 2.0]

    monkeypatch.setattr(onednn, "_time_plans", fake_times)
    monkeypatch.setattr(dnn, "_plans", {})
    assert dnn.plan(key).reordered == ((True,) * 3 if all_own_faster else (False, True, False))
    assert timed == [[(False, True, False), (True, True, True)]]
    x, k = randn(shape), randn((*ks, 16, 32), 1)
    _assert_gradients_equal(
        lambda x, k: onednn.conv(x, k, strides, pads), _lax(strides, pads), x, k, (2, 6, 7, 5, 32)
    )


@pytest.mark.parametrize("flip_s,want", [(0.5, True), (1.0, False)])
def test_the_other_form_pays_for_its_kernel_flip(monkeypatch, flip_s, want):
    # the other form takes 1.0 s against 2.0 s for its own; the kernel's flip adds flip_s, and
    # the other form needs to stay 10 % faster with it
    dnn = onednn._load()
    monkeypatch.setattr(dnn, "_saved", onednn._Choices(None))
    geometry = onednn._geometry((1, 9, 9, 2), (3, 3, 2, 5), (1, 1), [(1, 1)] * 2)
    other = onednn._other_form("forward", geometry)
    dnn.plan(onednn._key("forward", geometry))
    dnn.plan(onednn._key(*other))
    monkeypatch.setattr(onednn, "_time_plans", lambda plans: [2.0, 1.0])
    monkeypatch.setattr(onednn, "_time_flip", lambda kernel_shape, dtype: flip_s)
    assert onednn._prefers_other("forward", geometry, other) == want


@pytest.mark.parametrize("shape,routed", [((2, 32, 16, 6), True), ((1, 8, 16, 6), False)])
def test_an_upsample_on_the_onednn_route_equals_linen(shape, routed):
    # a 2D UpSample with 2^10 output positions or more runs as oneDNN's transposed convolution
    # and equals Linen's ConvTranspose (k2 s2 'SAME') with the same parameters; values and
    # gradients; a smaller one and a 3D one keep the 1x1 convolution + depth-to-space
    import flax.linen as nn

    x = randn(shape)
    fast = layers.UpSample(5)
    plain = nn.ConvTranspose(5, (2, 2), strides=(2, 2), padding="SAME")
    params = plain.init(jax.random.PRNGKey(0), x)
    assert ("ffi_call" in str(jax.make_jaxpr(lambda p: fast.apply(p, x))(params))) == routed
    _assert_module_equals(fast, plain, params, x)
    if routed:
        x3 = randn((2, 8, 8, 8, 3))  # 3D, 2^13 output positions
        up3 = layers.UpSample(4, spatial_dims=3)
        p3 = up3.init(jax.random.PRNGKey(1), x3)
        assert "ffi_call" not in str(jax.make_jaxpr(lambda p: up3.apply(p, x3))(p3))


def test_a_3d_upsample_on_the_onednn_route_equals_linen(monkeypatch):
    # where the CPU has no AMX a 3D UpSample with 2^15 output positions or more runs as
    # oneDNN's transposed convolution: values and gradients equal Linen's ConvTranspose
    import flax.linen as nn

    monkeypatch.setattr(layers, "_amx", lambda: False)
    x = randn((2, 16, 16, 16, 3))
    fast = layers.UpSample(5, spatial_dims=3)
    plain = nn.ConvTranspose(5, (2, 2, 2), strides=(2, 2, 2), padding="SAME")
    params = plain.init(jax.random.PRNGKey(0), x)
    assert "ffi_call" in str(jax.make_jaxpr(lambda p: fast.apply(p, x))(params))
    # the kernel gradient sums 2^13 positions (magnitudes ~20)
    _assert_module_equals(fast, plain, params, x, atol=1e-3, rtol=1e-4)


def test_timed_choices_are_kept_for_the_next_process(tmp_path, monkeypatch):
    # a choice is timed once, written to the file, and a new process (a new _Choices on the
    # same file) takes it without timing; two writers keep each other's; a torn file is
    # ignored; the default file is per oneDNN version, CPU model and core count
    path = tmp_path / "choices.json"
    key_a, key_b = ("forward", (1, 9, 9, 2)), ("data", (1, 9, 9, 3))
    first, second = onednn._Choices(path), onednn._Choices(path)
    assert first.get("forms", key_a, lambda: True) is True
    assert second.get("layouts", key_b, lambda: False) is False
    later = onednn._Choices(path)
    assert later.get("forms", key_a, lambda: pytest.fail("timed again")) is True
    assert later.get("layouts", key_b, lambda: pytest.fail("timed again")) is False
    assert later.get("forms", key_b, lambda: False) is False  # a new key: timed
    path.write_text('{"forms": {')
    assert onednn._Choices(path).get("forms", key_a, lambda: False) is False
    monkeypatch.setenv("MEDJAX_ONEDNN_CACHE", str(tmp_path / "x.json"))
    assert onednn._choices_path() == tmp_path / "x.json"
    monkeypatch.setenv("MEDJAX_ONEDNN_CACHE", "")
    assert onednn._choices_path() is None
    monkeypatch.delenv("MEDJAX_ONEDNN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    default = onednn._choices_path()
    assert default.parent == tmp_path / "medjax" and default.name.startswith("onednn-3.2-")


needs_bfloat16 = pytest.mark.skipif(
    onednn.bfloat16_kernels() is None, reason="oneDNN has no bfloat16 kernels on this CPU"
)


@needs_bfloat16
@pytest.mark.parametrize("shape,ks,strides,pads", CASES[:5])
def test_bfloat16_convolution_and_its_gradients_equal_float32_on_the_same_values(
    shape, ks, strides, pads
):
    # bfloat16 in and out, float32 accumulation: lax's float32 convolution of the same
    # (bfloat16-exact) values, rounded once to bfloat16, is the reference.
    x = randn(shape).astype(jnp.bfloat16)
    k = (randn((*ks, shape[-1], 4), 1) / np.sqrt(np.prod(ks) * shape[-1])).astype(jnp.bfloat16)
    ref = _lax(strides, pads)

    def f32(fn):
        return lambda x, k: fn(x.astype(jnp.float32), k.astype(jnp.float32))

    def ours(x, k):
        return onednn.conv(x, k, strides, pads)

    y = jax.jit(ours)(x, k)
    want = f32(ref)(x, k)
    assert y.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(y.astype(jnp.float32), want, atol=2**-8 * scale, rtol=2**-8)
    w = randn(want.shape, 2).astype(jnp.bfloat16)
    got = jit_grad(lambda x, k: jnp.sum(ours(x, k).astype(jnp.float32) * w), (0, 1))(x, k)
    exact = jax.grad(lambda x, k: jnp.sum(f32(ref)(x, k) * w), (0, 1))(x, k)
    for a, b in zip(got, exact, strict=True):
        assert a.dtype == jnp.bfloat16
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(a.astype(jnp.float32), b, atol=2**-7 * scale, rtol=2**-7)


@needs_bfloat16
def test_bfloat16_primitives_are_kept_apart_from_float32_ones():
    dnn = onednn._load()
    geometry = [(1, 8, 8, 16), (3, 3, 16, 16), (1, 1), [(1, 1)] * 2]
    f32 = dnn.plan(onednn._key("forward", onednn._geometry(*geometry)))
    bf16 = dnn.plan(onednn._key("forward", onednn._geometry(*geometry, "bfloat16")))
    assert (f32.dtype, bf16.dtype) == ("float32", "bfloat16")
    assert f32 is not bf16
    assert onednn.bfloat16_kernels() in bf16.info_str


def test_mixed_dtypes_stay_off_the_route():
    x = jnp.zeros((2, 16, 16, 16, 8), jnp.bfloat16)
    k = jnp.zeros((3, 3, 3, 8, 8), jnp.float32)
    assert not onednn.applies(x, k, (1, 1, 1), [(1, 1)] * 3)
    assert onednn.applies(x.astype(jnp.float32), k, (1, 1, 1), [(1, 1)] * 3)


def test_primitives_called_from_two_threads_take_turns(monkeypatch):
    # each primitive's OpenMP team uses every core: two at once would oversubscribe them
    import threading
    import time

    dnn = onednn._load()
    running, most = [0], [0]
    guard = threading.Lock()

    class Slow:
        def run(self, pointers):
            with guard:
                running[0] += 1
                most[0] = max(most[0], running[0])
            time.sleep(0.05)
            with guard:
                running[0] -= 1

    monkeypatch.setattr(dnn, "key", lambda plan_id: ("forward",))
    monkeypatch.setattr(dnn, "plan", lambda key: Slow())
    threads = [threading.Thread(target=dnn.run, args=(0, [0, 0, 0])) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1


@pytest.mark.parametrize("shape,ks,strides,pads", TRANSPOSE_CASES)
def test_conv_transpose_reads_its_kernel_with_swapped_channels_without_a_transpose(
    shape, ks, strides, pads
):
    # oneDNN reads the flipped kernel with its channel axes swapped through strides: the
    # forward and both gradients trace no transpose of a kernel-sized array (only the spatial
    # flips are XLA's), and the input gradient equals the reference's.
    x, k = randn(shape), randn((*ks, shape[-1], 4), 1)

    def ours(x, k):
        return onednn.conv_transpose(x, k, strides, pads)

    loss = lambda x, k: jnp.sum(jnp.sin(ours(x, k)))  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, (0, 1)))(x, k).jaxpr
    kernel_sizes = {k.size}
    transposes = [
        e
        for e in jaxpr.eqns
        if e.primitive.name == "transpose" and e.outvars[0].aval.size in kernel_sizes
    ]
    assert not transposes, transposes
    ref = _conv_transpose_reference(strides, pads, jax.eval_shape(ours, x, k).shape)
    got = jax.grad(lambda x: jnp.sum(jnp.sin(ours(x, k))))(x)
    want = jax.grad(lambda x: jnp.sum(jnp.sin(ref(x, k))))(x)
    np.testing.assert_allclose(got, want, atol=1e-4 * float(np.max(np.abs(want))), rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_strided_kernel_gradient_from_im2col_patches_equals_lax(dtype):
    # the kernel gradient of a k4 s2 convolution as the weights primitive of the 1x1
    # convolution of its im2col patches: the same sums of products as lax's kernel gradient
    if dtype == "bfloat16" and onednn.bfloat16_kernels() is None:
        pytest.skip("no oneDNN bfloat16 kernels on this CPU")
    x, dy = randn((16, 8, 8, 24)), randn((16, 4, 4, 40), 1)
    kernel = (4, 4, 24, 40)
    pads = ((1, 1), (1, 1))
    geometry = onednn._geometry(x.shape, kernel, (2, 2), pads, dtype)
    got = jax.jit(lambda x, dy: onednn._weights_im2col(x, dy, geometry))(
        x.astype(dtype), dy.astype(dtype)
    )
    want = jax.grad(
        lambda k: jnp.sum(
            lax.conv_general_dilated(x, k, (2, 2), pads, dimension_numbers=_dn(2)) * dy
        )
    )(jnp.zeros(kernel, jnp.float32))
    tol = 1e-5 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(
        np.asarray(got, np.float32), want, atol=tol * float(np.max(np.abs(want))), rtol=0
    )


def test_im2col_kernel_gradient_route_is_bfloat16_2d_strided_small_outputs_on_amx(monkeypatch):
    def geometry(shape, dtype="bfloat16", strides=(2, 2)):
        pads = ((1, 1),) * len(strides)
        kernel = (4,) * len(strides) + (shape[-1], 8)
        return onednn._geometry(shape, kernel, strides, pads, dtype)

    monkeypatch.setattr(onednn, "bfloat16_kernels", lambda: "avx512_core_amx")
    applies = onednn._im2col_weights_applies
    assert applies(geometry((64, 8, 8, 256)))  # 1024 output positions
    assert not applies(geometry((64, 16, 16, 128)))  # 4096
    assert not applies(geometry((64, 8, 8, 256), "float32"))
    assert not applies(geometry((2, 8, 8, 8, 16), strides=(2, 2, 2)))  # 3D
    assert not applies(
        onednn._geometry((64, 8, 8, 8), (3, 3, 8, 8), (1, 1), ((1, 1),) * 2, "bfloat16")
    )
    monkeypatch.setattr(onednn, "bfloat16_kernels", lambda: "avx512_core_bf16")
    assert not applies(geometry((64, 8, 8, 256)))
