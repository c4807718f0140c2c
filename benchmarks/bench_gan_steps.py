"""Compiled train-step speed of every shipped config whose task can make a synthetic batch
(every task: segmentation, volumes, classification, the GANs; no input pipeline).

    python benchmarks/bench_gan_steps.py                    # every config at its own sizes
    python benchmarks/bench_gan_steps.py --only dcgan_medmnist,cyclegan_brats --steps 20
    python benchmarks/bench_gan_steps.py --quick            # smoke sizes (seconds, a CPU check)

Configs are discovered in `medjax/configs/` (plus the argument variants in VARIANTS). For each:
parameter count, compile time of the jitted step (`loop.Trainer.train_step`, state donated,
batch sharded over every visible device), median step time over `--steps` calls after one
warm-up, examples per second, and XLA's temp memory of the compiled step. Data are random
(`task.synthetic_batch`, part of the task contract): speed does not depend on values. Needs
neither TensorFlow nor the datasets, so it runs on any accelerator box with jax/flax/optax/orbax.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time

from suite import compiled_step, cpu_name

from medjax.train.platform import configure_xla, exec_with_host_tunables

VARIANTS = (("dcgan_medmnist", "64"), ("vox2vox_brats", "seg"))


def discovered() -> list[tuple[str, str]]:
    from pathlib import Path

    from medjax import configs

    names = sorted(
        p.stem
        for p in Path(configs.__file__).parent.glob("*.py")
        if p.stem not in ("__init__", "common")
    )
    return [(n, "") for n in names] + list(VARIANTS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated config names")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="smoke sizes")
    p.add_argument("--bf16", action="store_true", help="model.generator/discriminator dtype bf16")
    args = p.parse_args()
    configure_xla()
    import flax
    import jax

    from medjax.train import task

    dev = jax.devices()
    print(
        f"machine: {cpu_name()} x{os.cpu_count()} | devices: "
        f"{len(dev)} x {dev[0].device_kind} | python {sys.version.split()[0]} | "
        f"jax {jax.__version__} | flax {flax.__version__}",
        flush=True,
    )
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    print(f"{'config':28s} {'params':>11s} {'batch':>6s} {'compile s':>9s} {'step ms':>9s} "
          f"{'img/s':>9s} {'temp MiB':>9s}")  # fmt: skip
    for name, arg in discovered():
        if only and name not in only:
            continue
        cfg = importlib.import_module(f"medjax.configs.{name}").get_config(
            ",".join(a for a in (arg, "smoke" if args.quick else "") if a)
        )
        if args.bf16:
            nets = [k for k in ("generator", "discriminator") if k in cfg.model]
            for block in [cfg.model[k] for k in nets] or [cfg.model]:
                block.dtype = "bfloat16"
        n_dev = len(dev)
        gb = int(cfg.batch_size)
        gb = max(n_dev, gb - gb % n_dev)
        if cfg.task == "wgan_gp":
            gb = max(gb - gb % (n_dev * cfg.n_critic), n_dev * cfg.n_critic)
        cfg.batch_size = gb
        try:
            compiled, state, batch, facts = compiled_step(cfg)
        except (task.TaskCannot, FileNotFoundError, ValueError) as exc:
            print(f"{name:28s} skipped: {exc}", flush=True)
            continue
        n_params, t_compile, temp = facts["params"], facts["compile_s"], facts["temp_mib"]
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, m = compiled(state, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        label = f"{name}{':' + arg if arg else ''}"
        print(
            f"{label:28s} {n_params:11,d} {gb:6d} {t_compile:9.1f} {med * 1e3:9.1f} "
            f"{gb / med:9.1f} {temp:9.0f}",
            flush=True,
        )


if __name__ == "__main__":
    exec_with_host_tunables()  # glibc malloc tunables: restarts this process once
    main()
