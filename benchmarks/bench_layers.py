"""Times the fast exact layer formulations of ``medjax.models`` against the plain ops.

Usage::

    python benchmarks/bench_layers.py                 # default XLA flags
    python benchmarks/bench_layers.py --xla-flag      # + the YNN_FLAG below
    python benchmarks/bench_layers.py --full          # larger shapes (UNet2D [8,256,256,1]); slow

Every timing is the median wall time of ``--repeats`` calls of a jitted function after a
compile + warm-up call, with ``block_until_ready``. Not a test; prints a table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--xla-flag", action="store_true", help=f"append {YNN_FLAG} to XLA_FLAGS")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per case (median)")
    p.add_argument("--full", action="store_true", help="larger shapes (several minutes on 2 cores)")
    p.add_argument("--skip-unet", action="store_true", help="only the layer micro-benchmarks")
    return p.parse_args()


ARGS = _parse()
if ARGS.xla_flag:  # must happen before jax is imported
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + YNN_FLAG).strip()

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax import lax  # noqa: E402
from suite import cpu_name  # noqa: E402

from medjax.models import UNet, conv_nd  # noqa: E402
from medjax.models.layers import ConvTranspose4, StridedConv4, UpSample  # noqa: E402


def timeit(fn: Callable, *args, repeats: int = ARGS.repeats) -> float:
    """Median seconds of ``repeats`` calls of jitted ``fn`` after one warm-up call."""
    f = jax.jit(fn)
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def row(name: str, plain: float, fast: float, extra: str = "") -> None:
    print(
        f"{name:<44s} plain {plain * 1e3:9.1f} ms   fast {fast * 1e3:9.1f} ms   "
        f"speedup {plain / fast:5.2f}x {extra}",
        flush=True,
    )


def fwd_bwd(apply: Callable) -> Callable:
    """Forward + gradient w.r.t. parameters and input of sum(out^2)."""
    return jax.grad(lambda p, x: jnp.sum(apply(p, x) ** 2), argnums=(0, 1))


def bench_module(name: str, make: Callable[[bool], flax.linen.Module], x: jax.Array) -> None:
    fast_m, plain_m = make(True), make(False)
    v = fast_m.init(jax.random.key(0), x)
    tp = timeit(fwd_bwd(plain_m.apply), v, x)
    tf = timeit(fwd_bwd(fast_m.apply), v, x)
    err = float(jnp.max(jnp.abs(fast_m.apply(v, x) - plain_m.apply(v, x))))
    row(name + " fwd+bwd", tp, tf, f"(max |diff| {err:.1e})")


def depth_sum3(x: jax.Array, k: jax.Array) -> jax.Array:
    """Alternative 3x3x3 formulation: sum of three 2D convs over shifted depth views."""
    b, d, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
    out = 0.0
    for i in range(3):
        out = out + lax.conv_general_dilated(
            xp[:, i : i + d].reshape(b * d, h, w, c),
            k[i],
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
    return out.reshape(b, d, h, w, -1)


def _conv_plain(x: jax.Array, k: jax.Array) -> jax.Array:
    return conv_nd(x, k, 1, "SAME", fast=False)


def _conv_fast(x: jax.Array, k: jax.Array) -> jax.Array:
    return conv_nd(x, k, 1, "SAME", fast=True)


def _grad_sq(f: Callable) -> Callable:
    return jax.grad(lambda x, k: jnp.sum(f(x, k) ** 2), argnums=(0, 1))


def bench_conv3d(shapes: list[tuple[int, int, int, int]]) -> None:
    rng = np.random.default_rng(0)
    for b, s, cin, cout in shapes:
        x = jnp.asarray(rng.standard_normal((b, s, s, s, cin)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((3, 3, 3, cin, cout)) * 0.1, jnp.float32)
        tp, tf, ts = (timeit(_grad_sq(f), x, k) for f in (_conv_plain, _conv_fast, depth_sum3))
        row(
            f"conv 3x3x3 [{b},{s}^3,{cin}]->{cout} fwd+bwd",
            tp,
            tf,
            f"(alt. sum-of-3-2D-convs {ts * 1e3:.1f} ms)",
        )


def bench_unet(name: str, x: jax.Array, **kw) -> None:
    num_classes = 3
    labels = jnp.asarray(
        np.random.default_rng(1).integers(0, num_classes, x.shape[:-1]), dtype=jnp.int32
    )
    results = {}
    for fast in (False, True):
        model = UNet(num_classes, fast=fast, **kw)
        params = model.init(jax.random.key(0), x[:1])["params"]
        tx = optax.adam(1e-3)
        opt = tx.init(params)

        def step(params, opt, x, y, model=model, tx=tx):
            def loss_fn(p):
                logits = model.apply({"params": p}, x, train=True)
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

            loss, grads = jax.value_and_grad(loss_fn)(params)
            upd, opt = tx.update(grads, opt, params)
            return optax.apply_updates(params, upd), opt, loss

        results[fast] = timeit(step, params, opt, x, labels, repeats=max(ARGS.repeats // 2, 2))
    row(f"{name} train step", results[False], results[True])


def main() -> None:
    print("medjax layer benchmark (median wall time, jit, after warm-up)")
    print(f"python {sys.version.split()[0]}  jax {jax.__version__}  flax {flax.__version__}")
    print(f"backend {jax.default_backend()}  devices {jax.devices()}")
    print(f"cpu {cpu_name()}  cores {os.cpu_count()}  {platform.platform()}")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print()
    t0 = time.perf_counter()
    q = not ARGS.full
    rng = np.random.default_rng(0)
    rnd = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)

    s2 = 64 if q else 128
    bench_module(
        f"convT k2s2 2D [8,{s2}^2,64]->32", lambda f: UpSample(32, 2, fast=f), rnd(8, s2, s2, 64)
    )
    s3 = 16 if q else 32
    bench_module(
        f"convT k2s2 3D [2,{s3}^3,32]->16",
        lambda f: UpSample(16, 3, fast=f),
        rnd(2, s3, s3, s3, 32),
    )
    bench_conv3d([(2, 32, 16, 16), (2, 16, 64, 64)] if q else [(2, 64, 1, 16), (2, 32, 32, 32)])
    bench_module(
        f"conv k4s2 2D [8,{s2}^2,32]->64", lambda f: StridedConv4(64, 2, fast=f), rnd(8, s2, s2, 32)
    )
    bench_module(
        f"conv k4s2 3D [2,{s3 // 2}^3,16]->32",
        lambda f: StridedConv4(32, 3, fast=f),
        rnd(2, s3 // 2, s3 // 2, s3 // 2, 16),
    )
    bench_module(
        f"convT k4s2 2D [8,{s2 // 2}^2,64]->32",
        lambda f: ConvTranspose4(32, 2, fast=f),
        rnd(8, s2 // 2, s2 // 2, 64),
    )
    if not ARGS.skip_unet:
        s = 128 if q else 256
        b = 4 if q else 8
        bench_unet(
            f"UNet2D [{b},{s},{s},1] f=(32,64,128,256)",
            rnd(b, s, s, 1),
            features=(32, 64, 128, 256),
            spatial_dims=2,
        )
        s = 32 if q else 64
        bench_unet(
            f"UNet3D [2,{s},{s},{s},1] f=(8,16,32,64)",
            rnd(2, s, s, s, 1),
            features=(8, 16, 32, 64),
            spatial_dims=3,
        )
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
