"""The medjax benchmark suite: every model's training step beside its PyTorch reference, in one
run on one machine, printed as one table (markdown) and saved as JSON.

    make bench                                   # = python benchmarks/suite.py
    python benchmarks/suite.py --only unet2d_128,dcgan_64 --rounds 12
    python benchmarks/suite.py --no-torch        # medjax alone (no `bench` extra needed)
    python benchmarks/suite.py --json bench.json --markdown bench.md

For every case: the medjax step (`loop.Trainer.train_step` of the shipped config, with the
overrides listed, state donated, batch on every visible device; random data from the task
contract's `synthetic_batch`; on-device augmentation off so both sides do the same work) and,
where one exists, the PyTorch reference step (`benchmarks/torch_reference.py`: MONAI
`BasicUNet`, the canonical DCGAN, pytorch-CycleGAN-and-pix2pix's networks) at the same shapes,
batch and optimizer, with `torch.set_num_threads(<cores>)`, in a process of its own
(`TorchProcess`: one process shares one OpenMP runtime between medjax's oneDNN convolutions and
PyTorch's, which slowed PyTorch's steps by up to 45 %). The two are timed INTERLEAVED (a turn
of medjax steps, a turn of torch steps, `--rounds` times), so both see the same machine state,
after an interleaved warm-up that runs until both sides' step times settle (`--warmup-max`,
`--warmup-tol`); the table gives medians. A turn is one step, or, where a step takes under a
second, 3 back to back of which the last 2 are timed (`--consecutive`): as in a training loop,
each timed step follows a step of its own side, not a pause while the other side ran.
`ratio` = torch time / medjax time (> 1: medjax is faster). Every case runs in a new Python
process, as a training run has its process to itself (`--same-process` keeps them in one: a
case timed after a large one then runs slower).

Also: compile time, XLA's memory of the compiled step (arguments + temporaries), FLOPs per step
(XLA's cost analysis; torch's `FlopCounterMode`) and the achieved FLOP/s as a fraction of the
machine's measured peak (a large matrix product in the compute dtype through XLA, `--peak-size`).

On a GPU (JAX's default backend) both sides compute in bfloat16 by default (`--dtype`):
medjax's model dtype, PyTorch's `torch.autocast` on CUDA with cuDNN's benchmark mode; float32
parameters and Adam on both. Set `XLA_PYTHON_CLIENT_PREALLOCATE=false` there so that JAX and
PyTorch share the card. `unet3d_128` (4 x 128^3) runs on accelerators only, unless named.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from medjax.train.platform import (
    HeapGuard,
    configure_xla,
    exec_with_host_tunables,
    host_tunables_applied,
)

MiB = 2.0**20


@dataclasses.dataclass(frozen=True)
class Case:
    """One model: a shipped config (+ arguments, overrides) and its PyTorch reference (a function
    of the medjax config and the step's facts, or None)."""

    name: str
    what: str
    config: str
    overrides: dict[str, Any]
    torch: Callable[..., Any] | None = None
    arg: str = ""
    max_rounds: int = 0  # a cap on --rounds for the slowest steps (0: none)
    apart: bool = False  # time the two sides one after the other, each in its own process
    accelerator: bool = False  # a size for GPUs and TPUs: run there (or when --only names it)

    def capped(self, rounds: int) -> int:
        """`rounds`, capped by `max_rounds` for the slowest steps."""
        return min(rounds, self.max_rounds or rounds)


def _unet(cfg, facts, features=(32, 32, 64, 128, 256)):
    import torch_reference as tr

    spatial, channels, classes = facts["example_shape"]
    return tr.unet_step(len(spatial), facts["batch"], tuple(spatial), channels, classes, features)


def _dcgan(cfg, facts):
    import torch_reference as tr

    return tr.dcgan_step(facts["batch"], int(cfg.data.channels))


def _pix2pix(cfg, facts):
    import torch_reference as tr

    return tr.pix2pix_step(
        facts["batch"],
        int(cfg.data.image_size[0]),
        int(cfg.data.source_channels),
        int(cfg.model.generator.num_downs),
    )


def _cyclegan(cfg, facts):
    import torch_reference as tr

    return tr.cyclegan_step(
        facts["batch"],
        int(cfg.data.image_size[0]),
        int(cfg.data.channels),
        int(cfg.model.generator.num_blocks),
    )


def _wgan_gp(cfg, facts):
    import torch_reference as tr

    n = int(cfg.n_critic)
    g = cfg.model.generator
    return tr.wgan_gp_step(
        facts["batch"] // n, int(cfg.data.channels), n, int(g.latent_dim),
        int(g.base_features) // 8, int(cfg.model.discriminator.features[0]),
        float(cfg.loss.gp_weight),
    )  # fmt: skip


def _vox2vox(cfg, facts):
    import torch_reference as tr

    g, d = cfg.model.generator, cfg.model.discriminator
    return tr.pix2pix_step(
        facts["batch"], tuple(cfg.patch_size), len(cfg.data.source_modalities),
        int(g.num_downs), target_channels=len(cfg.data.target_modalities),
        ngf=int(g.features), ndf=int(d.features), norm=str(g.norm),
        recon_weight=float(cfg.loss.recon_weight),
    )  # fmt: skip


def _classifier(cfg, facts):
    import torch_reference as tr

    spatial, channels, classes = facts["example_shape"]
    m = cfg.model
    return tr.classifier_step(
        facts["batch"], tuple(spatial), channels, classes, tuple(m.features), float(m.dropout)
    )


NO_AUG = {"augment.enabled": False}
# The DCGAN generator's output layer as in the paper and the PyTorch reference: the last
# up-sampling to the image channels (not one more up-sampling stage and a 3x3 convolution).
PAPER_HEAD = {"model.generator.head": "transpose"}
UNET2D = {**NO_AUG, "model.features": (32, 32, 64, 128, 256), "data.channels": 1,
          "data.num_classes": 3, "crop_size": (), "batch_size": 8}  # fmt: skip
CASES = (
    Case("unet2d_128", "U-Net 2D, 8 x 128^2", "segmentation_folder",
         {**UNET2D, "data.image_size": (128, 128)}, _unet),
    Case("unet2d_256", "U-Net 2D, 8 x 256^2", "segmentation_folder",
         {**UNET2D, "data.image_size": (256, 256)}, _unet),
    Case("unet3d_64", "U-Net 3D, 2 x 64^3", "unet3d_brats",
         {**NO_AUG, "model.features": (32, 32, 64, 128, 256), "patch_size": (64, 64, 64),
          "batch_size": 2}, _unet),
    Case("unet3d_128", "U-Net 3D, 4 x 128^3", "unet3d_brats",
         {**NO_AUG, "model.features": (32, 32, 64, 128, 256), "patch_size": (128, 128, 128),
          "batch_size": 4}, _unet, accelerator=True),
    Case("dcgan_64", "DCGAN 64^2, batch 64 (D + G)", "dcgan_medmnist",
         {"data.channels": 3, "model.generator.base_features": 512, "batch_size": 64,
          "model.generator.latent_dim": 100, **PAPER_HEAD}, _dcgan, "64"),
    Case("wgan_gp_64", "WGAN-GP 64^2, 5 x 64 critic + G", "wgan_gp_medmnist", PAPER_HEAD,
         _wgan_gp, "64", 3),
    Case("pix2pix_256", "pix2pix 256^2, batch 1", "pix2pix_folder",
         {"data.image_size": (256, 256), "model.generator.num_downs": 8, "batch_size": 1,
          "data.channels": 3, "data.source_channels": 3, "data.target_channels": 3},
         _pix2pix),
    Case("cyclegan_256_b1", "CycleGAN 256^2, batch 1", "cyclegan_folder",
         {"data.image_size": (256, 256), "model.generator.num_blocks": 9, "batch_size": 1,
          "data.channels": 3}, _cyclegan),
    Case("cyclegan_256_b4", "CycleGAN 256^2, batch 4", "cyclegan_folder",
         {"data.image_size": (256, 256), "model.generator.num_blocks": 9, "batch_size": 4,
          "data.channels": 3}, _cyclegan, "", 4, apart=True),
    Case("vox2vox", "Vox2Vox (3D pix2pix), its config", "vox2vox_brats", {}, _vox2vox),
    Case("classifier", "classifier 28^2, batch 64", "classifier_medmnist", {**NO_AUG}, _classifier),
)  # fmt: skip


def _set(cfg: Any, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    if leaf not in node:
        raise KeyError(f"{key!r} is not a key of the config")
    node[leaf] = value


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measured_peak(n: int, dtype: str = "float32") -> float:
    """FLOP/s of an n x n x n matrix product in `dtype` through XLA: the fastest of 20 calls.
    A peak is the best rate the machine reaches; on a shared virtual machine the median of 5
    calls at start-up varied from run to run (2-core AMD EPYC: 126 to 198 GFLOP/s, against
    196 to 214 for the fastest of 20; BENCHMARKS.md)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(f(a, a))
    ts = []
    for _ in range(20):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, a))
        ts.append(time.perf_counter() - t0)
    return 2.0 * n**3 / min(ts)


def _flops(compiled: Any) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def compiled_step(cfg: Any) -> tuple[Any, Any, dict, dict]:
    """(compiled step, initial state, device batch, facts) of `cfg`'s training step on the task
    contract's synthetic batch (`cfg.batch_size` rows, placed on the data sharding)."""
    import jax
    import numpy as np

    from medjax.models import onednn
    from medjax.train import loop

    trainer = loop.Trainer(cfg)
    gb = int(cfg.batch_size)
    batch = trainer.task.synthetic_batch(gb)
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    state = trainer.init_state(spec)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    batch = {k: jax.device_put(v, trainer.data_sh) for k, v in batch.items()}
    t0 = time.perf_counter()
    compiled = trainer.train_step.lower(state, batch).compile()
    t_compile = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    # XLA's cost analysis does not see into oneDNN's FFI calls (medjax.models.onednn): count
    # the step's FLOPs on a lowering of the same step with XLA's convolutions (a new jit,
    # traced without them).
    with onednn.enabled(False):
        flops = _flops(loop.Trainer(cfg).train_step.lower(state, batch))
    if not math.isfinite(flops):  # no cost analysis of a lowering (jax 0.11 on a GPU)
        flops = _flops(compiled)
    try:
        shape = trainer.task.example_shape()
    except Exception:  # noqa: BLE001 - a task without a segmentation-style shape
        shape = None
    facts = {
        "batch": gb,
        "params": n_params,
        "compile_s": t_compile,
        "memory_mib": (mem.temp_size_in_bytes + mem.argument_size_in_bytes) / MiB
        if mem
        else float("nan"),
        "temp_mib": mem.temp_size_in_bytes / MiB if mem else float("nan"),
        "flops": flops,
        "example_shape": shape,
    }
    return compiled, state, batch, facts


def set_compute_dtype(cfg: Any, dtype: str) -> None:
    """Every compute `dtype` of `cfg.model` (the model's, or its generator's and
    discriminator's) set to `dtype`; parameters and the optimizer stay float32."""
    stack = [cfg.model]
    while stack:
        node = stack.pop()
        for k in node:
            if k == "dtype":
                node[k] = dtype
            elif hasattr(node[k], "keys"):
                stack.append(node[k])


def medjax_step(case: Case, devices: int, dtype: str = "float32"):
    """(step() -> None, facts, config) of the case's compiled medjax training step, computing
    in `dtype`."""
    import jax

    cfg = importlib.import_module(f"medjax.configs.{case.config}").get_config(case.arg or None)
    for k, v in case.overrides.items():
        _set(cfg, k, v)
    set_compute_dtype(cfg, dtype)
    gb = int(cfg.batch_size)
    if gb % devices:
        cfg.batch_size = max(devices, gb - gb % devices)
    compiled, state, batch, facts = compiled_step(cfg)
    holder = {"state": state}
    # As in the training loop: a step dispatched the moment the previous one is ready may get
    # its temporaries before XLA:CPU freed the previous ones, and the kept heap grows.
    heap_guard = HeapGuard()

    def step() -> None:
        holder["state"], m = compiled(holder["state"], batch)
        jax.block_until_ready(m)
        heap_guard()

    step()  # warm-up
    return step, facts, cfg


# `--consecutive 0` (auto): steps shorter than this run back to back, this many per turn.
AUTO_CONSECUTIVE, AUTO_CONSECUTIVE_BELOW_S = 3, 1.0


def turns(consecutive: int) -> str:
    """What a turn of `--consecutive` is, in words."""
    if consecutive == 1:
        return "one step per side"
    k = consecutive if consecutive > 1 else AUTO_CONSECUTIVE
    text = f"{k} steps per side back to back (the last {k - 1} timed)"
    return (
        text
        if consecutive > 1
        else f"{text} where a step is under {AUTO_CONSECUTIVE_BELOW_S:g} s, else one"
    )


def timed_interleaved(
    steps: list[Callable[[], Any]], rounds: int, consecutive: int = 1
) -> list[list[float]]:
    """`rounds` rounds of each step in turn: their times (s) per step and round. A step that
    returns a float has timed itself (`TorchProcess.run`: the step in its process, without
    the message that asked for it); otherwise the call is timed here.

    With `consecutive` k > 1 each side runs k steps back to back per round, and the round's
    time is the mean of its last k - 1: steps that follow a step of their own, as in a training
    loop. The first step of each turn follows the other side's steps, a pause of a step's
    length for this process; medjax's small steps are slower after one (the classifier's 68 ->
    84 ms after 85 ms asleep, with oneDNN's convolutions; BENCHMARKS.md)."""
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(rounds):
        for i, fn in enumerate(steps):
            turn = []
            for _ in range(max(1, consecutive)):
                t0 = time.perf_counter()
                own = fn()
                turn.append(own if isinstance(own, float) else time.perf_counter() - t0)
            times[i].append(statistics.fmean(turn[1:] or turn))
    return times


class TorchProcess:
    """A PyTorch reference in a process of its own (spawned), built there by `build(*args)` (an
    object with `run()`, and `params` and `flops` where it counts them) and stepped on request:
    `run()` returns the seconds the step took there. `setup` configures PyTorch first
    (`threads`, `device`, `autocast`: a dtype name or None); None leaves it alone.

    Why not in medjax's process: oneDNN (medjax's convolutions) and PyTorch's CPU build both
    use GNU OpenMP, and one process loads one libgomp.so.1. oneDNN runs from XLA's threads,
    each of which starts its own OpenMP team; once the runtime manages more threads than
    there are cores, it cuts every thread's spin-wait before sleeping from ~300000 polls to
    100, and PyTorch's many short parallel regions then wait on wake-ups: its Vox2Vox step
    took 103-105 ms after one medjax step had run in its process, 72-77 ms in a fresh one
    (U-Net 2D 8 x 128^2 442-482 against 409-419, the classifier 76-80 against 63-66; 2-core
    Xeon, BENCHMARKS.md). Apart, each side keeps its own runtime and they still alternate."""

    def __init__(self, build: Callable[..., Any], *args: Any, setup: dict | None = None):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, build, args, setup), daemon=True)
        self._proc.start()
        child.close()
        try:
            reply = self._reply()
        except BaseException:
            self.close()
            raise
        self.params, self.flops = reply["params"], reply["flops"]

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def _reply(self) -> Any:
        try:
            reply = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            raise RuntimeError(f"the PyTorch process exited (code {self._proc.exitcode})") from None
        if isinstance(reply, dict) and "error" in reply:
            raise RuntimeError(f"in the PyTorch process:\n{reply['error']}")
        return reply

    def run(self) -> float:
        self._conn.send("run")
        return self._reply()

    def close(self) -> None:
        if self._proc.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send("stop")
            self._proc.join(30)
        if self._proc.is_alive():
            self._proc.kill()
        self._conn.close()

    def __enter__(self) -> TorchProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve(conn: Any, build: Callable[..., Any], args: tuple, setup: dict | None) -> None:
    """`TorchProcess`'s process: set PyTorch up, build the step, report what it counts, then
    run it on every "run" until "stop", reporting the seconds each took (or the error)."""
    try:
        if setup is not None:
            _torch_setup(setup)
        ref = build(*args)
        conn.send({"params": getattr(ref, "params", None), "flops": getattr(ref, "flops", None)})
        while conn.recv() == "run":
            t0 = time.perf_counter()
            ref.run()
            conn.send(time.perf_counter() - t0)
    except Exception:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


def _torch_setup(setup: dict) -> None:
    import torch
    import torch_reference

    torch.set_num_threads(setup["threads"])
    device, autocast = setup["device"], setup["autocast"]
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("PyTorch has no CUDA device here (JAX has a GPU): use --no-torch")
    if device != "cpu" or autocast:
        torch_reference.use(device, getattr(torch, autocast) if autocast else None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated case names")
    p.add_argument("--rounds", type=int, default=10, help="interleaved timed steps per side")
    p.add_argument("--no-torch", action="store_true", help="medjax alone")
    p.add_argument(
        "--consecutive",
        type=int,
        default=0,
        help="steps each side runs back to back per round; with k > 1 a round's time is the "
        f"mean of the last k - 1 (steps after a step of their own, as in training). 0: {turns(0)}",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="compute dtype of both sides (auto: float32 on the CPU, bfloat16 on GPUs and TPUs: "
        "medjax's model dtype, PyTorch's autocast); the peak is a matrix product in it",
    )
    p.add_argument(
        "--peak-size", type=int, default=0, help="peak matrix size (0: 2048 on CPU, 8192 else)"
    )
    p.add_argument(
        "--warmup-max", type=int, default=8, help="most interleaved warm-up rounds per case"
    )
    p.add_argument(
        "--warmup-tol",
        type=float,
        default=0.2,
        help="warm-up ends when each side's last two steps are within this fraction of its "
        "fastest warm-up step",
    )
    p.add_argument(
        "--same-process",
        action="store_true",
        help="time every case in this process (by default each case runs in a new one)",
    )
    p.add_argument(
        "--side", default="both", choices=("both", "medjax", "torch"), help=argparse.SUPPRESS
    )
    p.add_argument("--peak-gflops", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--row-json", default="", help=argparse.SUPPRESS)  # one case's row, then exit
    p.add_argument("--json", default="", help="write the results here")
    p.add_argument("--markdown", default="", help="write the table here")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument(
        "--section",
        default="steps,data,inference",
        help="comma-separated: steps (training steps beside PyTorch), data (every shipped "
        "config's input pipeline on its real data), inference (sliding window on a BraTS-size "
        "volume beside MONAI)",
    )
    p.add_argument("--data-seconds", type=float, default=15.0, help="time per data measurement")
    p.add_argument("--configs", default="", help="data section: only these shipped configs")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="CONFIG:KEY=VALUE",
        help="data section: a config override, e.g. segmentation_folder:data.directory=/data/x "
        "(repeatable; VALUE is a Python literal or a string)",
    )
    args = p.parse_args()
    sections = {s.strip() for s in args.section.split(",") if s.strip()}
    if sections - {"steps", "data", "inference"}:
        sys.exit(f"unknown sections {sorted(sections - {'steps', 'data', 'inference'})}")
    if args.list:
        for c in CASES:
            print(f"{c.name:18s} {c.what}  ({c.config}{':' + c.arg if c.arg else ''})")
        return
    configure_xla()
    import flax
    import jax

    accelerator = jax.default_backend() != "cpu"
    if args.dtype == "auto":
        args.dtype = "bfloat16" if accelerator else "float32"
    # PyTorch runs in processes of its own (TorchProcess) set up by this; never imported here
    torch_setup = None
    if not args.no_torch:
        missing = [m for m in ("torch", "monai") if importlib.util.find_spec(m) is None]
        if missing:
            sys.exit(f"no {', '.join(missing)}: install the bench extra (pip install -e "
                     "'.[bench]') or --no-torch")  # fmt: skip
        if accelerator and jax.default_backend() != "gpu":
            sys.exit(f"PyTorch has no device for JAX's {jax.default_backend()}: use --no-torch")
        torch_setup = {
            "threads": os.cpu_count() or 1,
            "device": "cuda" if accelerator else "cpu",
            "autocast": "bfloat16" if args.dtype == "bfloat16" else None,
        }
    dev = jax.devices()
    machine = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "devices": f"{len(dev)} x {dev[0].device_kind}",
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "flax": flax.__version__,
        "dtype": args.dtype,
        "torch": importlib.metadata.version("torch") if torch_setup else None,
        "monai": importlib.metadata.version("monai") if torch_setup else None,
        "torch_threads": torch_setup["threads"] if torch_setup else None,
        "torch_device": torch_setup["device"] if torch_setup else None,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        # process-wide (exec_with_host_tunables): PyTorch's steps get the same allocator
        "host_malloc": (
            f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')}"
            if host_tunables_applied()
            else "system"
        ),
    }
    where = (
        "every case in one process"
        if args.same_process
        else "a new process per case, PyTorch's step in a process of its own beside it (a case "
        "marked apart: the two sides one after the other)"
    )
    machine["harness"] = (
        f"{where}, interleaved warm-up until settled (at most {args.warmup_max} rounds, last two "
        f"steps within {args.warmup_tol:.0%} of the fastest), {args.rounds} timed rounds of "
        f"{turns(args.consecutive)}"
    )
    peak_size = args.peak_size or (8192 if accelerator else 2048)
    peak = args.peak_gflops * 1e9 if args.peak_gflops else measured_peak(peak_size, args.dtype)
    machine["peak_gflops"] = peak / 1e9
    if not args.row_json:
        print(" | ".join(f"{k} {v}" for k, v in machine.items() if v is not None), flush=True)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - {c.name for c in CASES}
    if unknown:
        sys.exit(f"unknown cases {sorted(unknown)}; --list shows them")
    rows = []
    for case in CASES if "steps" in sections else ():
        if (only and case.name not in only) or (not only and case.accelerator and not accelerator):
            continue
        if args.same_process:
            row = step_row(case, args, torch_setup, len(dev), peak)
        else:
            row = step_row_in_fresh_process(case, args, peak)
        if args.row_json:
            with open(args.row_json, "w") as f:
                json.dump(row, f, default=str)
            return
        rows.append(row)
        print(_line(row), flush=True)
    data = data_section(args) if "data" in sections else []
    infer = inference_section(torch_setup, args.rounds) if "inference" in sections else []
    table = markdown(machine, rows) + data_markdown(data) + inference_markdown(infer)
    print("\n" + table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows, "data": data, "inference": infer}, f,
                      indent=1, default=str)  # fmt: skip
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")


def settle(
    steps: list[Callable[[], Any]],
    max_rounds: int,
    tol: float,
    min_rounds: int = 2,
    consecutive: int = 1,
) -> list[list[float]]:
    """Interleaved warm-up rounds until every side has settled: its last two steps within `tol`
    of its fastest warm-up step (at least `min_rounds`, at most `max_rounds` rounds). Returns
    the warm-up times per side.

    A new process's first steps are slow while its heap grows: on the 2-core AMD EPYC virtual
    machine, two of U-Net 2D 128^2's first six medjax steps took 2.3-2.7 s against 0.6 s settled
    (first-touch faults of 164-181 huge pages each, 2.7-3.3 s of system time), and in other
    processes none did, or other steps.
    """
    times: list[list[float]] = [[] for _ in steps]
    for r in range(max(max_rounds, min_rounds)):
        for side, t in zip(times, timed_interleaved(steps, 1, consecutive), strict=True):
            side.extend(t)
        if r + 1 >= min_rounds and all(max(t[-2:]) <= (1 + tol) * min(t) for t in times):
            break
    return times


def step_row(case: Case, args: Any, torch_setup: dict | None, devices: int, peak: float) -> dict:
    """One case's row: its medjax step in this process and (with `torch_setup`, `TorchProcess`'s
    setup) its PyTorch reference in a process of its own, warmed up until they settle
    (`settle`), then timed interleaved for `args.rounds` rounds. `args.side` "medjax" or
    "torch" times that side alone."""
    step, facts, cfg = medjax_step(case, devices, args.dtype)
    sides: dict[str, Callable[[], Any]] = {}
    if args.side != "torch":
        sides["medjax"] = step
    with contextlib.ExitStack() as stack:
        ref = None
        if torch_setup is not None and case.torch is not None and args.side != "medjax":
            ref = stack.enter_context(TorchProcess(case.torch, cfg, facts, setup=torch_setup))
            sides["torch"] = ref.run
        steps = list(sides.values())
        k = args.consecutive
        warm = settle(steps, case.capped(args.warmup_max), args.warmup_tol, consecutive=max(k, 1))
        if k < 1:  # auto: back to back where a step is short, as the pause costs those most
            k = AUTO_CONSECUTIVE if min(min(w) for w in warm) < AUTO_CONSECUTIVE_BELOW_S else 1
        times = timed_interleaved(steps, case.capped(args.rounds), k)
    row = {
        "case": case.name,
        "what": case.what,
        "config": case.config + (":" + case.arg if case.arg else ""),
        "overrides": {
            k: list(v) if isinstance(v, tuple) else v for k, v in case.overrides.items()
        },  # fmt: skip
        "batch": facts["batch"],
        "consecutive": k,
        "medjax_params": facts["params"],
        "compile_s": facts["compile_s"],
        "memory_mib": facts["memory_mib"],
        "medjax_gflop": facts["flops"] / 1e9,
    }
    if ref is not None:
        row.update(torch_params=ref.params, torch_gflop=ref.flops / 1e9)
    for name, w, t in zip(sides, warm, times, strict=True):
        row.update({f"{name}_s": statistics.median(t), f"warmup_{name}_s": w, f"timed_{name}_s": t})
    return with_rates(row, peak)


def with_rates(row: dict, peak: float) -> dict:
    """`row` with the rates of its measured step times: examples/s, fraction of `peak` FLOP/s,
    and the ratio (PyTorch time / medjax time) when both sides were timed."""
    if "medjax_s" in row:
        row["medjax_ex_per_s"] = row["batch"] / row["medjax_s"]
        row["medjax_peak_frac"] = row["medjax_gflop"] * 1e9 / row["medjax_s"] / peak
    if "torch_s" in row:
        row["torch_peak_frac"] = row["torch_gflop"] * 1e9 / row["torch_s"] / peak
    if "medjax_s" in row and "torch_s" in row:
        row["ratio"] = row["torch_s"] / row["medjax_s"]
        if not row.get("sides_apart"):
            row["ratio_rounds"] = paired_ratio(row["timed_medjax_s"], row["timed_torch_s"])
    return row


def paired_ratio(medjax_s: list[float], torch_s: list[float]) -> dict:
    """The ratio round by round (each torch step over the medjax step timed just before it):
    its median and quartiles. A burst of load on a shared machine slows both steps of a round
    alike, so this ratio moves less than the two medians do (step times on a noisy 2-core VM
    doubled for seconds at a time; BENCHMARKS.md)."""
    r = sorted(t / m for m, t in zip(medjax_s, torch_s, strict=True))
    q1, med, q3 = statistics.quantiles(r, n=4, method="inclusive") if len(r) > 1 else r * 3
    return {"median": med, "q1": q1, "q3": q3, "min": r[0], "max": r[-1]}


def step_row_in_fresh_process(case: Case, args: Any, peak: float) -> dict:
    """`step_row` in a new Python process (this script with `--same-process --row-json`), as a
    training run has its process to itself. In one process a case timed after a large one ran
    slower: the classifier's medjax step 99-102 ms fresh, 138-150 ms after U-Net 2D at 256^2
    (PyTorch's 97-101 -> 109-118 ms; 2-core AMD EPYC, BENCHMARKS.md). A case marked `apart`
    times its two sides one after the other, each in a process of its own: together they do
    not fit the memory of a 24 GB machine (CycleGAN 256^2 at batch 4 was killed at 23.8 GB)."""
    import subprocess
    import tempfile

    def run(side: str) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "row.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--only", case.name, "--section",
                   "steps", "--rounds", str(args.rounds), "--warmup-max", str(args.warmup_max),
                   "--warmup-tol", repr(args.warmup_tol), "--same-process", "--row-json", out,
                   "--consecutive", str(args.consecutive),
                   "--peak-gflops", repr(peak / 1e9), "--side", side,
                   "--dtype", args.dtype]  # fmt: skip
            if args.no_torch:
                cmd.append("--no-torch")
            subprocess.run(cmd, check=True)
            with open(out) as f:
                return json.load(f)

    if not case.apart or args.no_torch or case.torch is None:
        return run(args.side)
    return merged_sides(run("medjax"), run("torch"), peak)


def merged_sides(medjax_row: dict, torch_row: dict, peak: float) -> dict:
    """One row from a case's two sides timed in separate processes."""
    row = {**medjax_row, **{k: v for k, v in torch_row.items() if "torch" in k}}
    row["sides_apart"] = True
    return with_rates(row, peak)


def shipped_configs() -> list[str]:
    """The config modules shipped in `medjax.configs` (those with a `get_config`)."""
    import pkgutil

    import medjax.configs

    names = []
    for m in pkgutil.iter_modules(medjax.configs.__path__):
        if hasattr(importlib.import_module(f"medjax.configs.{m.name}"), "get_config"):
            names.append(m.name)
    return sorted(names)


def data_section(args) -> list[dict]:
    """Every shipped config on its default (real, shared) data: the input pipeline alone, the
    step alone and both as the loop runs them (`bench_train_step.measure`). The generic
    `segmentation_folder` reads Kvasir-SEG's images/ and masks/; the other configs that need a
    user's data directory (`--set NAME:data.directory=...`) are listed with the reason they
    were not run."""
    import ast

    import bench_train_step

    wanted = {c.strip() for c in args.configs.split(",") if c.strip()}
    overrides: dict[str, dict[str, Any]] = {}
    for item in args.set:
        name, _, kv = item.partition(":")
        key, eq, value = kv.partition("=")
        if not eq:
            sys.exit(f"--set {item!r}: expected CONFIG:KEY=VALUE")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # a plain string (a path)
        overrides.setdefault(name, {})[key] = value
    from medjax.data import paths

    try:  # the generic 2D folder reader on a shared dataset in its layout (images/, masks/)
        kvasir = str(paths.data_dir("kvasir_seg_polyps"))
        defaults = {"segmentation_folder": {"data.directory": kvasir, "data.channels": 3,
                                            "data.mask_threshold": 127}}  # fmt: skip
    except FileNotFoundError:
        defaults = {}
    rows = []
    for name in shipped_configs():
        if wanted and name not in wanted:
            continue
        cfg = importlib.import_module(f"medjax.configs.{name}").get_config(None)
        for key, value in {**defaults.get(name, {}), **overrides.get(name, {})}.items():
            _set(cfg, key, value)
        # Only a config that names no data location may be skipped; any other error is raised.
        needs_dir = not cfg.data.get("directory") and not cfg.data.get("shared_folder")
        try:
            r = bench_train_step.measure(cfg, steps=30, seconds=args.data_seconds)
        except (FileNotFoundError, ValueError) as exc:
            if not needs_dir:
                raise
            reason = str(exc).strip().splitlines()[0][:160]
            rows.append({"config": name, "skipped": reason})
            print(f"data {name:24s} not run: {reason}", flush=True)
            continue
        r["config"] = name
        rows.append(r)
        print(
            f"data {name:24s} pipeline {1 / r['pipeline_s']:7.1f} batches/s  step "
            f"{r['step_s'] * 1e3:8.1f} ms  loop {r['loop_s'] * 1e3:8.1f} ms  waits "
            f"{r['wait_frac']:5.1%}",
            flush=True,
        )
    return rows


def data_markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    lines = [
        "\n\nInput pipeline of every shipped config on its real data (step alone vs. as the loop "
        "runs it; wait = the share of a loop step spent waiting for data: on one CPU process, "
        "blocked fetching the next batch between steps):\n",
        "| config | task | batch | pipeline alone | step alone | loop step | wait |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['config']} | not run: {r['skipped']} | | | | | |")
            continue
        lines.append(
            f"| {r['config']} | {r['task']} | {r['batch']} | {1 / r['pipeline_s']:.1f} batches/s "
            f"({r['batch'] / r['pipeline_s']:.0f} ex/s) | {r['step_s'] * 1e3:.0f} ms | "
            f"{r['loop_s'] * 1e3:.0f} ms | {r['wait_frac']:.1%} |"
        )
    return "\n".join(lines)


BRATS_VOLUME = (240, 240, 155)


def inference_section(
    torch_setup: dict | None, rounds: int, features=(16, 16, 32, 64, 128)
) -> list[dict]:
    """Gaussian-blended sliding-window inference of a 3D U-Net over one BraTS-size volume
    (240 x 240 x 155, 4 modalities -> 4 classes; 96^3 windows, overlap 0.5, 2 windows per
    call): `medjax.inference.sliding_window_inference` (jitted, the windows in one compiled
    loop) beside MONAI's `sliding_window_inference` with `BasicUNet` (in a `TorchProcess` set up
    by `torch_setup`), timed interleaved."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from medjax.inference import sliding_window_inference, window_starts
    from medjax.models import UNet

    window, wb, c_in, c_out = (96, 96, 96), 2, 4, 4
    model = UNet(num_classes=c_out, features=features, spatial_dims=3)
    params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 16, c_in)))
    vol = jnp.asarray(np.random.default_rng(0).standard_normal((*BRATS_VOLUME, c_in), np.float32))
    infer = jax.jit(
        lambda p, v: sliding_window_inference(
            lambda x: model.apply(p, x), v, window, overlap=0.5, window_batch=wb
        )
    )
    t0 = time.perf_counter()
    compiled = infer.lower(params, vol).compile()
    t_compile = time.perf_counter() - t0
    jax.block_until_ready(compiled(params, vol))
    steps = [lambda: jax.block_until_ready(compiled(params, vol))]
    with contextlib.ExitStack() as stack:
        if torch_setup is not None:
            ref = TorchProcess(
                _monai_inference, features, c_in, c_out, window, wb, setup=torch_setup
            )
            steps.append(stack.enter_context(ref).run)
            ref.run()
        times = timed_interleaved(steps, max(1, min(rounds, 3)))
    n_win = len(window_starts(BRATS_VOLUME, window, 0.5))
    row = {
        "volume": BRATS_VOLUME,
        "window": window,
        "windows": n_win,
        "window_batch": wb,
        "features": features,
        "compile_s": t_compile,
        "medjax_s": statistics.median(times[0]),
    }
    if torch_setup is not None:
        row["torch_s"] = statistics.median(times[1])
        row["ratio"] = row["torch_s"] / row["medjax_s"]
    print(
        f"inference {n_win} windows: medjax {row['medjax_s']:.1f} s/volume"
        + (f", MONAI {row['torch_s']:.1f} s, ratio {row['ratio']:.2f}" if torch_setup else ""),
        flush=True,
    )
    return [row]


def _monai_inference(features, c_in: int, c_out: int, window, window_batch: int) -> Any:
    """MONAI's Gaussian-blended `sliding_window_inference` with `BasicUNet` over one random
    BraTS-size volume (`TorchProcess` builds it in its process)."""
    import types

    import torch
    from monai.inferers import sliding_window_inference as monai_swi
    from monai.networks.nets import BasicUNet

    net = BasicUNet(3, c_in, c_out, features=tuple(features) + (features[0],)).eval()
    tv = torch.randn(1, c_in, *BRATS_VOLUME)

    def run() -> None:
        with torch.no_grad():
            monai_swi(tv, window, window_batch, net, overlap=0.5, mode="gaussian",
                      sigma_scale=0.125)  # fmt: skip

    return types.SimpleNamespace(run=run)


def inference_markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    lines = [
        "\n\nSliding-window inference, one BraTS-size volume (4 channels, Gaussian blending):\n",
        "| volume | U-Net features | windows (96^3, overlap 0.5) | window batch | compile | "
        "medjax | MONAI | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        torch_s = f"{r['torch_s']:.1f} s | **{r['ratio']:.2f}**" if "ratio" in r else "- | -"
        lines.append(
            f"| {'x'.join(map(str, r['volume']))} | {r['features']} | {r['windows']} | "
            f"{r['window_batch']} | {r['compile_s']:.1f} s | {r['medjax_s']:.1f} s | {torch_s} |"
        )
    return "\n".join(lines)


def _line(r: dict) -> str:
    ref = (
        f" | torch {r['torch_s'] * 1e3:8.1f} ms  {r['torch_gflop']:8.1f} GFLOP"
        f"  ratio {r['ratio']:.2f}, per round {per_round(r)}"
        if "ratio" in r
        else ""
    )
    return (
        f"{r['case']:16s} medjax {r['medjax_s'] * 1e3:8.1f} ms  compile {r['compile_s']:5.1f} s"
        f"  {r['memory_mib']:7.0f} MiB  {r['medjax_gflop']:8.1f} GFLOP"
        f"  {r['medjax_peak_frac']:5.1%} of peak{ref}  warm-up {len(r['warmup_medjax_s'])}"
    )


def per_round(row: dict) -> str:
    """The table's cell for `paired_ratio` (none for two steps timed apart)."""
    q = row.get("ratio_rounds")
    return f"{q['median']:.2f} ({q['q1']:.2f}-{q['q3']:.2f})" if q else "-"


def _ms(seconds: float) -> str:
    """A step time in ms, to three figures from 10 ms down (accelerators' steps)."""
    ms = seconds * 1e3
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.1f} ms" if ms >= 10 else f"{ms:.2f} ms"


def markdown(machine: dict, rows: list[dict]) -> str:
    head = (
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['devices']}; "
        f"jax {machine['jax']}, flax {machine['flax']}"
        + (
            f", torch {machine['torch']} ("
            + (
                f"{machine['torch_threads']} threads"
                if machine.get("torch_device", "cpu") == "cpu"
                else machine["torch_device"]
            )
            + f"), monai "
            f"{machine['monai']}"
            if machine.get("torch")
            else ""
        )  # fmt: skip
        + f". Host malloc: {machine['host_malloc']}"
        + (f". Harness: {machine['harness']}" if machine.get("harness") else "")
        + f". Compute dtype {machine.get('dtype', 'float32')}; measured "
        f"{machine.get('dtype', 'float32')} GEMM peak {machine['peak_gflops']:.1f} GFLOP/s.\n\n"
    )
    if not rows:
        return head.rstrip()
    cols = ("model | batch | medjax step | ex/s | compile | XLA memory | GFLOP/step (medjax / "
            "torch) | % of peak (medjax / torch) | PyTorch step | ratio | ratio per round "
            "(median, quartiles)")  # fmt: skip
    lines = [f"| {cols} |", "|" + "---|" * (cols.count("|") + 1)]
    for r in rows:
        has = "ratio" in r
        what = r["what"] + (" (the two steps timed apart)" if r.get("sides_apart") else "")
        if r.get("consecutive", 1) > 1:
            what += f" [{r['consecutive']} back to back]"
        lines.append(
            f"| {what} | {r['batch']} | {_ms(r['medjax_s'])} | "
            f"{r['medjax_ex_per_s']:.1f} | {r['compile_s']:.1f} s | {r['memory_mib']:.0f} MiB | "
            f"{r['medjax_gflop']:.1f} / {r['torch_gflop']:.1f} | " if has else
            f"| {what} | {r['batch']} | {_ms(r['medjax_s'])} | "
            f"{r['medjax_ex_per_s']:.1f} | {r['compile_s']:.1f} s | {r['memory_mib']:.0f} MiB | "
            f"{r['medjax_gflop']:.1f} / - | "
        )  # fmt: skip
        lines[-1] += (
            f"{r['medjax_peak_frac']:.0%} / {r['torch_peak_frac']:.0%} | "
            f"{_ms(r['torch_s'])} | **{r['ratio']:.2f}** | {per_round(r)} |"
            if has
            else f"{r['medjax_peak_frac']:.0%} / - | - | - | - |"
        )
    return head + "\n".join(lines)


if __name__ == "__main__":
    exec_with_host_tunables()  # glibc malloc tunables: restarts this process once
    main()
