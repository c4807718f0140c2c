"""Measured training speed of a config: input pipeline alone, compiled step alone, both together.

    python benchmarks/bench_train_step.py [--config isbi2012] [--arg smoke] [--steps 30]

Any task: the data come from the task contract (`task.load_data()`: its training iterator and
batch shapes), so this measures exactly what `scripts/train.py` runs. Prints the machine,
versions, compile time, steps/s and examples/s for each part (nnU-Net style: the step is
measured apart from data loading, so a slow input pipeline is visible).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import time

from medjax.train.platform import configure_xla


def load_config(path: str, arg: str | None):
    from medjax.train.cli import config_path

    path = config_path(path)
    spec = importlib.util.spec_from_file_location("bench_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="mni152_demo", help="a shipped config name or a path")
    p.add_argument("--arg", default=None)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=0)
    p.add_argument("--no-xla-flags", action="store_true", help="skip medjax's CPU XLA flags")
    args = p.parse_args()
    if not args.no_xla_flags:
        configure_xla()
    import flax
    import jax
    import numpy as np
    import tensorflow as tf

    from medjax.train import loop

    cfg = load_config(args.config, args.arg)
    if args.batch_size:
        cfg.batch_size = args.batch_size
    print(
        f"machine: {platform.processor() or platform.machine()} x{os.cpu_count()} | "
        f"devices: {jax.devices()} | python {sys.version.split()[0]} | jax {jax.__version__} | "
        f"flax {flax.__version__} | tf {tf.__version__}"
    )
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    trainer = loop.Trainer(cfg)
    data = trainer.task.load_data()
    gb = int(cfg.batch_size)
    shapes = {k: tuple(v.shape) for k, v in data.example_spec.items()}
    print(
        f"config: {args.config} task={cfg.task} batch={gb} example={shapes} train={data.num_train}"
    )

    def make_iter():
        return data.make_train_iter(global_batch_size=gb, mesh=trainer.mesh, seed=0)

    it = make_iter()
    next(it)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        b = next(it)
    jax.block_until_ready(b)
    dt = time.perf_counter() - t0
    print(
        f"input pipeline alone: {args.steps / dt:8.1f} batches/s "
        f"({gb * args.steps / dt:.0f} examples/s)"
    )

    state = trainer.init_state(data.batch_spec(gb))
    t0 = time.perf_counter()
    compiled = trainer.train_step.lower(state, b).compile()
    print(f"train step compile: {time.perf_counter() - t0:.1f} s")
    state, m = compiled(state, b)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = compiled(state, b)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(
        f"train step alone:     {1 / med:8.2f} steps/s  median {med * 1e3:.1f} ms "
        f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}) = {gb / med:.1f} examples/s"
    )

    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, m = compiled(state, next(it))
    jax.block_until_ready(m)
    dt = time.perf_counter() - t0
    print(
        f"pipeline + step:      {args.steps / dt:8.2f} steps/s = "
        f"{gb * args.steps / dt:.1f} examples/s"
    )
    shown = {k: float(np.asarray(m[k])) for k in trainer.task.progress_keys}
    print("final", " ".join(f"{k} {v:.4f}" for k, v in shown.items()))


if __name__ == "__main__":
    main()
