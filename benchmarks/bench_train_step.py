"""Measured training speed of a config: input pipeline alone, compiled step alone, both together.

    python benchmarks/bench_train_step.py [--config isbi2012] [--arg smoke] [--steps 30]

Any task: the data come from the task contract (`task.load_data()`: its training iterator and
batch shapes), so this measures exactly what `scripts/train.py` runs. Prints the machine,
versions, compile time, steps/s and examples/s for each part (nnU-Net style: the step is
measured apart from data loading, so a slow input pipeline is visible) and the share of a loop
step spent waiting for data. `benchmarks/suite.py --section data` runs `measure` on every
shipped config.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import time

from medjax.train.platform import HeapGuard, configure_xla, exec_with_host_tunables


def load_config(path: str, arg: str | None):
    from medjax.train.cli import config_path

    path = config_path(path)
    spec = importlib.util.spec_from_file_location("bench_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def measure(cfg, steps: int = 30, seconds: float = 0.0) -> dict:
    """Input pipeline alone, compiled step alone and both as the training loop runs them (in
    `loop.run`'s order; the pipeline's threads make the next batches while a step runs), for `cfg`'s
    task on its real data. `seconds` > 0 caps each part near that long (at least 3 steps).
    `wait_frac` = the share of a loop step spent waiting for data (0 when the pipeline keeps
    up): on one CPU process, where the loop fetches between steps, the time blocked in
    `next`."""
    import jax

    from medjax.train import loop

    trainer = loop.Trainer(cfg)
    t0 = time.perf_counter()
    data = trainer.task.load_data()
    t_load = time.perf_counter() - t0
    gb = int(cfg.batch_size)
    it = data.make_train_iter(global_batch_size=gb, mesh=trainer.mesh, seed=0)
    b = next(it)
    state = trainer.init_state(data.batch_spec(gb))
    t0 = time.perf_counter()
    compiled = trainer.train_step.lower(state, b).compile()
    t_compile = time.perf_counter() - t0
    state, m = compiled(state, b)
    jax.block_until_ready(m)
    times = []
    while len(times) < steps and (not seconds or len(times) < 3 or sum(times) < seconds):
        t0 = time.perf_counter()
        state, m = compiled(state, b)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    t_step = statistics.median(times)
    n = len(times)

    t0 = time.perf_counter()
    for _ in range(n):
        b = next(it)
    jax.block_until_ready(b)
    t_pipe = (time.perf_counter() - t0) / n

    # As `loop.run` steps: on one CPU process, wait for the previous step, fetch, dispatch;
    # elsewhere one step in flight. The wait is the time blocked in `next` (the batch not made
    # yet, and its transfer to the mesh); with a step in flight, only the part by which the
    # loop's step exceeds the step alone (the device idles only then).
    one_at_a_time = trainer.steps_one_at_a_time
    heap_guard, prev, fetching = HeapGuard(), None, 0.0
    t0 = time.perf_counter()
    for _ in range(n):
        if one_at_a_time and prev is not None:
            jax.block_until_ready(prev)
            heap_guard()
        t1 = time.perf_counter()
        batch = next(it)
        fetching += time.perf_counter() - t1
        state, m = compiled(state, batch)
        if not one_at_a_time and prev is not None:
            jax.block_until_ready(prev)
        prev = m
    jax.block_until_ready(m)
    t_loop = (time.perf_counter() - t0) / n
    waited = fetching / n if one_at_a_time else max(0.0, t_loop - t_step)
    return {
        "task": str(cfg.task),
        "batch": gb,
        "example": {k: tuple(v.shape) for k, v in data.example_spec.items()},
        "num_train": data.num_train,
        "load_s": t_load,
        "compile_s": t_compile,
        "steps": n,
        "step_s": t_step,
        "step_min_s": min(times),
        "pipeline_s": t_pipe,
        "loop_s": t_loop,
        "wait_frac": waited / t_loop,
        "progress": {k: float(m[k]) for k in trainer.task.progress_keys if k in m},
    }


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
    import tensorflow as tf

    cfg = load_config(args.config, args.arg)
    if args.batch_size:
        cfg.batch_size = args.batch_size
    print(
        f"machine: {platform.processor() or platform.machine()} x{os.cpu_count()} | "
        f"devices: {jax.devices()} | python {sys.version.split()[0]} | jax {jax.__version__} | "
        f"flax {flax.__version__} | tf {tf.__version__}"
    )
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    r = measure(cfg, args.steps)
    gb = r["batch"]
    print(
        f"config: {args.config} task={r['task']} batch={gb} example={r['example']} "
        f"train={r['num_train']} (loaded in {r['load_s']:.1f} s)"
    )
    print(f"train step compile: {r['compile_s']:.1f} s")
    print(
        f"input pipeline alone: {1 / r['pipeline_s']:8.1f} batches/s "
        f"({gb / r['pipeline_s']:.0f} examples/s)"
    )
    print(
        f"train step alone:     {1 / r['step_s']:8.2f} steps/s  median {r['step_s'] * 1e3:.1f} ms "
        f"(min {r['step_min_s'] * 1e3:.1f}) = {gb / r['step_s']:.1f} examples/s"
    )
    print(
        f"pipeline + step:      {1 / r['loop_s']:8.2f} steps/s = {gb / r['loop_s']:.1f} "
        f"examples/s; waiting for data {100 * r['wait_frac']:.1f} % of the step"
    )
    print("final", " ".join(f"{k} {v:.4f}" for k, v in r["progress"].items()))


if __name__ == "__main__":
    exec_with_host_tunables()  # glibc malloc tunables: restarts this process once
    main()
