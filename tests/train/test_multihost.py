"""A real two-process medjax job on this machine (`jax.distributed` over gloo CPU collectives,
two simulated devices per process), against a one-process run of the same global batches.

The processes train on disjoint data shards (`data.shards=2`), are preempted by SIGTERM mid-run
(JAX's preemption sync point: both stop and save at the same step), are relaunched and finish;
both end with the same parameters, equal to an uninterrupted single-process run on 4 devices
up to float reassociation, and a two-process evaluation scores every example exactly once.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from tests.helpers import cpu_env
from tests.train.multihost_script import DONE

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("multihost_script.py")
CHANGES = (
    "num_steps=30",
    "batch_size=4",
    "eval_batch_size=4",
    "eval_every=15",
    "checkpoint_every=1000",
    "log_every=1",
    "data.shards=2",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, workdir: Path, processes: int, devices: int, stop_at: str | None = None):
    """Runs `processes` processes of the script; with `stop_at`, SIGTERMs every process once
    process 0 prints a line starting with it. Returns the processes' outputs."""
    port = _free_port()
    env = cpu_env(devices=devices, PYTHONUNBUFFERED="1")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(SCRIPT),
                mode,
                str(workdir),
                str(port),
                str(processes),
                str(i),
                *CHANGES,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=ROOT,
        )  # fmt: skip
        for i in range(processes)
    ]
    outs = [""] * processes
    if stop_at is not None:
        for line in procs[0].stdout:
            outs[0] += line
            if line.startswith(stop_at):
                for p in procs:
                    p.send_signal(signal.SIGTERM)
                break
    deadline = time.monotonic() + 600
    for i, p in enumerate(procs):
        rest, _ = p.communicate(timeout=max(deadline - time.monotonic(), 1))
        outs[i] += rest
    _check_exits(procs, outs)
    return outs


def _check_exits(procs: list[subprocess.Popen], outs: list[str]) -> None:
    """Every process must finish its work (print DONE). One that did, then failed to exit
    (once in CI, JAX's CPU shutdown barrier timed out: one process was still not at the
    barrier 300 s later, cause unknown), is reported with every process's output, the stacks
    of a hung process included, as a warning: the work this test checks was all done."""
    done = [any(line == DONE for line in out.splitlines()) for out in outs]
    report = "\n".join(
        f"--- process {i} (exit status {p.returncode}):\n{out[-4000:]}"
        for i, (p, out) in enumerate(zip(procs, outs, strict=True))
    )
    assert all(done), f"a process did not finish its work:\n{report}"
    if any(p.returncode != 0 for p in procs):
        message = f"the processes finished their work but did not all exit cleanly:\n{report}"
        warnings.warn(message, stacklevel=3)


def _printed_json(out: str) -> dict:
    """The last JSON line a process printed (the evaluation's ids and summary)."""
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def _params(path: Path) -> list[np.ndarray]:
    with np.load(path) as z:
        return [z[f"p{i}"] for i in range(len(z.files))]


def test_two_processes_preempted_resumed_equal_one_process(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"

    outs = _launch("train", two, 2, 2, stop_at="step 3/")
    stopped = [
        int(line.rsplit(" ", 3)[-3].rstrip(";"))
        for out in outs
        for line in out.splitlines()
        if line.startswith("stopped by SIGTERM/preemption at step")
    ]
    assert len(stopped) == 2 and stopped[0] == stopped[1] < 30, outs[0][-3000:]
    assert "processes=2" in outs[0] and "devices=4" in outs[0]
    saved = sorted(int(p.name) for p in (two / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [stopped[0]]

    outs = _launch("train", two, 2, 2)  # the relaunched job resumes the same run
    assert f"resuming at step {stopped[0]}" in outs[0], outs[0][-3000:]
    p0, p1 = _params(two / "params_0.npz"), _params(two / "params_1.npz")
    for a, b in zip(p0, p1, strict=True):
        np.testing.assert_array_equal(a, b)  # one global state, the same on both hosts

    _launch("train", one, 1, 4)  # one process, 4 devices, the same 2 data shards
    ref = _params(one / "params_0.npz")
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(p0, ref, strict=True))
    assert diff < 1e-4, diff  # 30 Adam steps; only the order of the gradient sums differs

    ev2 = _printed_json(_launch("evaluate", two, 2, 2)[0])
    ev1 = _printed_json(_launch("evaluate", one, 1, 4)[0])
    assert ev2["ids"] == ev1["ids"] and len(set(ev2["ids"])) == len(ev2["ids"])
    assert ev2["summary"]["cases"] == len(ev2["ids"]) > 1
    for k, v in ev1["summary"].items():
        np.testing.assert_allclose(ev2["summary"][k], v, rtol=1e-3, atol=1e-4, err_msg=k)
