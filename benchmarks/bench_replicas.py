"""Many seeds in one program: N replicas in one compiled step against N separate models.

    python benchmarks/bench_replicas.py [--config mni152_demo] [--arg ""] [--replicas 4 8]
        [--modes vmap unroll] [--steps 10] [--batch-size 0]

For each N and `replica_mode` (vmap, unroll): the compiled step of `config.replicas = N` (one
program, one batch per replica) against N sequential steps of the one-model program (what N
separate runs do, each on its own batch), on the same real batches of the config's data
(`task.load_data`), after a warm-up. Prints the machine, compile times, the median time of one
step of all N models both ways, and the ratio (> 1: the one program is faster). Data loading
is not included.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

from medjax.train.platform import configure_xla, exec_with_host_tunables


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="mni152_demo", help="a shipped config name or a path")
    p.add_argument("--arg", default=None)
    p.add_argument("--replicas", type=int, nargs="+", default=[4, 8])
    p.add_argument("--modes", nargs="+", default=["vmap", "unroll"], choices=["vmap", "unroll"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=0)
    args = p.parse_args()
    configure_xla()
    import jax
    import numpy as np

    sys.path.insert(0, os.path.dirname(__file__))
    from bench_train_step import load_config

    from medjax.train import loop

    base = load_config(args.config, args.arg)
    if args.batch_size:
        base.batch_size = args.batch_size
    b = int(base.batch_size)
    print(
        f"machine: {platform.processor() or platform.machine()} x{os.cpu_count()} | "
        f"devices: {jax.devices()} | jax {jax.__version__} | config {args.config} "
        f"{args.arg or ''} | batch {b} per model"
    )

    def timed(trainer, batches, steps):
        drop = 1 if trainer.replicas > 1 else 0  # the replica axis
        spec = {k: jax.ShapeDtypeStruct(v.shape[drop:], v.dtype) for k, v in batches[0].items()}
        state = trainer.init_state(spec)
        dev = [{k: jax.device_put(v, trainer.data_sh) for k, v in x.items()} for x in batches]
        t0 = time.perf_counter()
        state, m = trainer.train_step(state, dev[0])
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            state, m = trainer.train_step(state, dev[i % len(dev)])
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        return compile_s, statistics.median(times)

    one = loop.Trainer(base)
    data = one.task.load_data()  # real batches of the config's own data
    it = data.make_train_iter(
        global_batch_size=b, mesh=one.mesh, seed=0, num_steps=max(args.replicas)
    )
    singles = [jax.tree.map(np.asarray, x) for x in it]
    c1, t1 = timed(one, singles[:1], args.steps)
    print(f"one model: compile {c1:.1f} s, step {t1 * 1e3:.1f} ms")
    print(
        "| replicas | mode | N separate steps (s) | one program's step (s) | ratio | compile (s) |"
    )
    print("|---|---|---|---|---|---|")
    for n in args.replicas:
        for mode in args.modes:
            cfg = base.copy_and_resolve_references()
            cfg.replicas = n
            cfg.replica_mode = mode
            trainer = loop.Trainer(cfg)
            stacked = {k: np.stack([s[k] for s in singles[:n]]) for k in singles[0]}
            cn, tn = timed(trainer, [stacked], args.steps)
            print(f"| {n} | {mode} | {n * t1:.3f} | {tn:.3f} | {n * t1 / tn:.2f} | {cn:.1f} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    exec_with_host_tunables()  # glibc malloc tunables: restarts this process once
    main()
