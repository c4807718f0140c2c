"""Memory and speed of jitted sliding-window inference of a 3D U-Net over a whole volume.

Usage::

    python benchmarks/bench_sliding_window.py                  # BraTS-size 240x240x155x4, 96^3
    python benchmarks/bench_sliding_window.py --compile-only   # memory analysis only (no timing)
    python benchmarks/bench_sliding_window.py --quick          # tiny net + small volume (< 1 min)

For every volume (the given one and, unless ``--no-double``, one twice as long along
``--double-axis``) and every window batch, the inference function is jit-compiled with
``.lower(...).compile()`` and ``compiled.memory_analysis()`` is printed: XLA's argument, output
and temp (peak working set besides arguments/outputs) bytes. The U-Net applied to one window batch
alone is compiled too ("net temp"), so the table shows that temp = volume-sized accumulators +
(a window-batch term that grows with the window batch, not with the volume or the number of
windows). Wall time per volume is the median of ``--repeats`` calls after a warm-up call.
Random-initialised parameters and a random volume: speed and memory do not depend on values.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

from medjax.train.platform import configure_xla, exec_with_host_tunables

MiB = 2.0**20


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(",") if v.strip())


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", type=_ints, default=(240, 240, 155), help="volume spatial shape")
    p.add_argument("--channels", type=int, default=4, help="input channels (BraTS: 4)")
    p.add_argument("--window", type=_ints, default=(96, 96, 96))
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--window-batches", type=_ints, default=(1, 2, 4))
    p.add_argument("--features", type=_ints, default=(16, 32, 64, 128), help="UNet features")
    p.add_argument("--num-classes", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2, help="timed calls per case (median)")
    p.add_argument("--double-axis", type=int, default=-1, help="axis doubled for the 2nd volume")
    p.add_argument("--no-double", action="store_true", help="skip the 2x larger volume")
    p.add_argument("--compile-only", action="store_true", help="memory analysis, no timing")
    p.add_argument("--quick", action="store_true", help="tiny net, 48x48x31 volume, 24^3 window")
    p.add_argument("--no-xla-flags", action="store_true", help="skip medjax's CPU XLA flags")
    args = p.parse_args()
    if args.quick:
        args.shape, args.window, args.features = (48, 48, 31), (24, 24, 24), (8, 16)
        args.repeats = 1
    if len(args.shape) != len(args.window):
        p.error(f"--shape {args.shape} and --window {args.window} need the same length")
    return args


def main() -> None:
    args = _parse()
    if not args.no_xla_flags:
        configure_xla()
    import flax
    import jax
    import jax.numpy as jnp
    import numpy as np

    from medjax.inference import sliding_window_inference, window_starts
    from medjax.models import UNet

    print(
        f"machine: {platform.processor() or platform.machine()} x{os.cpu_count()} | "
        f"devices: {jax.devices()} | python {sys.version.split()[0]} | jax {jax.__version__} | "
        f"flax {flax.__version__}"
    )
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    nd, c_in, c_out = len(args.window), args.channels, args.num_classes
    model = UNet(num_classes=c_out, features=args.features, spatial_dims=nd)
    init_size = 2 ** (len(args.features) - 1)  # parameters do not depend on the spatial size
    # Shapes from eval_shape, values from numpy: flax's init compiles for ~30-60 s on 2 cores,
    # and speed/memory do not depend on the values (He-scaled kernels keep activations sane).
    abstract = jax.eval_shape(
        model.init, jax.random.key(0), jnp.zeros((1, *(init_size,) * nd, c_in))
    )
    rng = np.random.default_rng(0)

    def _init(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        if name == "bias" or leaf.ndim < 2:
            return jnp.zeros(leaf.shape, leaf.dtype)
        fan_in = math.prod(leaf.shape[:-1])
        w = rng.standard_normal(leaf.shape) * math.sqrt(2.0 / fan_in)
        return jnp.asarray(w, leaf.dtype)

    params = jax.tree_util.tree_map_with_path(_init, abstract)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(
        f"model: UNet features={args.features} spatial_dims={nd} classes={c_out} "
        f"({n_params / 1e6:.2f} M params) | window {args.window} overlap {args.overlap}"
    )

    shapes = [tuple(args.shape)]
    if not args.no_double:
        big = list(args.shape)
        big[args.double_axis] *= 2
        shapes.append(tuple(big))

    rows = []
    for shape in shapes:
        n_vox = math.prod(shape)
        n_win = len(window_starts(shape, args.window, args.overlap))
        print(
            f"\nvolume {shape}x{c_in}: {n_win} windows | volume-sized buffers: "
            f"input {n_vox * c_in * 4 / MiB:.1f} MiB, output accumulator "
            f"{n_vox * c_out * 4 / MiB:.1f} MiB, weight accumulator {n_vox * 4 / MiB:.1f} MiB, "
            f"output {n_vox * c_out * 4 / MiB:.1f} MiB",
            flush=True,
        )
        vol = jnp.asarray(
            np.random.default_rng(0).standard_normal((*shape, c_in), dtype=np.float32)
        )
        for wb in args.window_batches:
            infer = jax.jit(
                lambda p, v, wb=wb: sliding_window_inference(
                    lambda x: model.apply(p, x),
                    v,
                    args.window,
                    overlap=args.overlap,
                    window_batch=wb,
                )
            )
            t0 = time.perf_counter()
            compiled = infer.lower(params, vol).compile()
            t_compile = time.perf_counter() - t0
            ma = compiled.memory_analysis()
            net_spec = jax.ShapeDtypeStruct((wb, *args.window, c_in), jnp.float32)
            net_ma = jax.jit(model.apply).lower(params, net_spec).compile().memory_analysis()
            t_vol = float("nan")
            if not args.compile_only:
                jax.block_until_ready(compiled(params, vol))
                ts = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    jax.block_until_ready(compiled(params, vol))
                    ts.append(time.perf_counter() - t0)
                t_vol = statistics.median(ts)
            row = (
                shape,
                wb,
                n_win,
                t_compile,
                ma.argument_size_in_bytes / MiB,
                ma.output_size_in_bytes / MiB,
                ma.temp_size_in_bytes / MiB,
                net_ma.temp_size_in_bytes / MiB,
                (ma.temp_size_in_bytes - net_ma.temp_size_in_bytes) / MiB,
                t_vol,
            )
            rows.append(row)
            print(
                f"  window_batch {wb}: compile {t_compile:.1f} s | args "
                f"{row[4]:.1f} MiB, output {row[5]:.1f} MiB, temp {row[6]:.1f} MiB "
                f"(net alone on {wb} windows: temp {row[7]:.1f} MiB; difference {row[8]:.1f} MiB)"
                f" | {t_vol:.2f} s/volume",
                flush=True,
            )

    print(
        "\nvolume            wb  windows  compile_s  arg_MiB  out_MiB  temp_MiB  "
        "net_temp_MiB  temp-net_MiB  s/volume  windows/s"
    )
    for shape, wb, n_win, tc, arg, out, temp, net, diff, tv in rows:
        vs = "x".join(map(str, shape))
        print(
            f"{vs:<16s} {wb:3d} {n_win:8d} {tc:10.1f} {arg:8.1f} {out:8.1f} {temp:9.1f} "
            f"{net:13.1f} {diff:13.1f} {tv:9.2f} {n_win / tv:10.2f}"
        )


if __name__ == "__main__":
    exec_with_host_tunables()  # glibc malloc tunables: restarts this process once
    main()
