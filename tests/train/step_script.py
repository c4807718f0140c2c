"""Run by tests/train/test_every_task.py in a fresh process with 8 simulated CPU devices.

For every task module (discovered) the first shipped config whose task can make a synthetic
batch, plus a few variants: build the smoke config, make one synthetic global batch
(`task.synthetic_batch`), and take two compiled train steps from the same initial state on
1 device (the reference) and on each other setting:

* `fsdp_replicas`: 8 devices, parameters and optimizer state sharded over a 4 x 2 mesh
  (`config.fsdp=2`) and 2 replicas vmapped in one step (`config.replicas=2`), each fed the
  batch split over all 8 devices; replica 0 (the run's own seed) is compared. Data
  parallelism, sharded parameters and vmapped replicas at once: one 8-device compile per task
  instead of one for each (they were a third of this script's time, all of it compilation);
* `accum`: 1 device, 4 micro-batches accumulated (tasks whose `train_step` accumulates; without
  dropout and with instance instead of batch norm, so that the full batch is the same function);
* `bf16`: 1 device, every network's `dtype` bfloat16 (parameters stay float32).

For one task, plain data parallelism with replicated parameters is checked on its own by
`test_loop.test_one_and_eight_devices_agree`, and each replica against its run alone by
`test_replicas`.

Prints one JSON line: per entry and setting, the step metrics, the largest parameter difference
from the reference after the first step, the parameter dtypes, and the largest learning rate.

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


def _bf16(node) -> None:
    for k in list(node.keys()):
        if k == "dtype":
            node[k] = "bfloat16"
        elif hasattr(node[k], "keys"):
            _bf16(node[k])


def settings(cfg) -> dict:
    """setting name -> config (the reference "1" first)."""
    out = {}
    for name in ("1", "fsdp_replicas", "accum", "bf16"):
        c = cfg.copy_and_resolve_references()
        c.num_devices = 1
        if name == "fsdp_replicas":
            c.num_devices, c.fsdp = 8, 2
            c.replicas, c.replica_mode = 2, "vmap"
        if name == "accum":
            if not loop.get_task(c).accumulates_gradients:
                continue
            c.grad_accum_steps = 4
        if name == "bf16":
            _bf16(c.model)
        out[name] = c
    if "accum" in out:  # the reference of the accumulation: the same deterministic model
        for c in out.values():
            if "dropout" in c.model:
                c.model.dropout = 0.0
            if c.model.get("norm") == "batch":
                c.model.norm = "instance"
    return out


def main(group: int, groups: int) -> None:
    assert jax.device_count() == 8, jax.devices()
    report = {}
    for i, (name, cfg) in enumerate(sorted(entries().items())):
        if i % groups != group:
            continue
        t0 = time.perf_counter()
        batch = loop.Trainer(cfg).task.synthetic_batch(cfg.batch_size)
        res = {}
        for setting, c in settings(cfg).items():
            trainer = loop.Trainer(c)
            spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
            state = trainer.init_state(spec)
            host = batch
            if trainer.replicas > 1:
                host = {k: np.stack([v] * trainer.replicas) for k, v in batch.items()}
            gbatch = {k: jax.device_put(v, trainer.data_sh) for k, v in host.items()}

            def first(m):  # replica 0's metrics
                return {k: float(np.asarray(v).reshape(-1)[0]) for k, v in m.items()}

            metrics = []
            state, m = trainer.train_step(state, gbatch)
            metrics.append(first(m))
            params = trainer.replica(state, 0).params
            p1 = [np.asarray(x, np.float64) for x in jax.tree.leaves(params)]
            dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(params)})
            state, m = trainer.train_step(state, gbatch)
            metrics.append(first(m))
            res[setting] = {"metrics": metrics, "params": p1, "step": trainer.step_of(state),
                            "dtypes": dtypes}  # fmt: skip
        ref = res.pop("1")
        report[name] = {"reference": ref["metrics"], "lr": learning_rate(cfg), "settings": {}}
        for setting, r in res.items():
            pairs = zip(ref["params"], r["params"], strict=True)
            report[name]["settings"][setting] = {
                "metrics": r["metrics"],
                "steps": [ref["step"], r["step"]],
                "max_param_diff": max(float(np.max(np.abs(a - b))) for a, b in pairs),
                "finite": all(np.isfinite(p).all() for p in r["params"]),
                "dtypes": r["dtypes"],
            }
        print(name, f"done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
