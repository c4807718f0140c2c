"""Run by tests/train/test_every_task.py in a fresh process with 8 simulated CPU devices.

For every task module (discovered) the first shipped config whose task can make a synthetic
batch, plus a few variants: build the smoke config, make one synthetic global batch
(`task.synthetic_batch`), and take two compiled train steps on a 1-device and on an 8-device
mesh from the same initial state. Prints one JSON line: per entry, the step metrics on each
mesh, the largest parameter difference after the first step and the largest learning rate.

    python tests/train/step_script.py GROUP NUM_GROUPS
"""

import importlib
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from medjax.train import loop, task

B = 8  # global batch: one row per simulated device
CONFIGS = sorted(
    p.stem
    for p in (Path(loop.__file__).parents[1] / "configs").glob("*.py")
    if p.stem not in ("__init__", "common")
)
VARIANTS = {
    "dcgan_hinge_sn_ema": ("dcgan_medmnist", "hinge,sn,ema"),
    "vox2vox_segmentation": ("vox2vox_brats", "seg"),
}


def smoke(name: str, arg: str = ""):
    c = importlib.import_module(f"medjax.configs.{name}").get_config(
        ",".join(x for x in ("smoke", arg) if x)
    )
    c.batch_size = B * int(c.get("n_critic", 1))
    return c


def entries() -> dict:
    """task or variant name -> config (one per task, discovered)."""
    out = {}
    for name in loop.task_names():
        for cfg_name in CONFIGS:
            c = smoke(cfg_name)
            if c.task != name:
                continue
            try:
                loop.get_task(c).synthetic_batch(2)
            except (task.TaskCannot, FileNotFoundError, ValueError):
                continue
            out[name] = c
            break
        else:
            raise SystemExit(f"no shipped config of task {name!r} can make a synthetic batch")
    out.update({k: smoke(*v) for k, v in VARIANTS.items()})
    return out


def learning_rate(cfg) -> float:
    blocks = [cfg[k] for k in ("optimizer", "optimizer_g", "optimizer_d") if k in cfg]
    return max(float(b.learning_rate) for b in blocks)


def main(group: int, groups: int) -> None:
    assert jax.device_count() == 8, jax.devices()
    report = {}
    for i, (name, cfg) in enumerate(sorted(entries().items())):
        if i % groups != group:
            continue
        t0 = time.perf_counter()
        batch = loop.Trainer(cfg).task.synthetic_batch(cfg.batch_size)
        res = {}
        for n in (1, 8):
            cfg.num_devices = n
            trainer = loop.Trainer(cfg)
            spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
            state = trainer.init_state(spec)
            gbatch = {k: jax.device_put(v, trainer.data_sh) for k, v in batch.items()}
            metrics = []
            state, m = trainer.train_step(state, gbatch)
            metrics.append({k: float(v) for k, v in m.items()})
            p1 = [np.asarray(x, np.float64) for x in jax.tree.leaves(state.params)]
            state, m = trainer.train_step(state, gbatch)
            metrics.append({k: float(v) for k, v in m.items()})
            res[n] = {"metrics": metrics, "params": p1, "step": int(state.step)}
        pairs = zip(res[1]["params"], res[8]["params"], strict=True)
        report[name] = {
            "metrics_1": res[1]["metrics"],
            "metrics_8": res[8]["metrics"],
            "steps": [res[1]["step"], res[8]["step"]],
            "max_param_diff": max(float(np.max(np.abs(a - b))) for a, b in pairs),
            "finite": all(np.isfinite(p).all() for p in res[8]["params"]),
            "lr": learning_rate(cfg),
        }
        print(name, f"done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
