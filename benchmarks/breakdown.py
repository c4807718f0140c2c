"""Where one training step's time goes on the CPU: XLA's part, and oneDNN's convolutions in the
step against the same primitives alone.

    python benchmarks/breakdown.py vox2vox
    python benchmarks/breakdown.py cyclegan_256_b1 --dtype bfloat16 --rounds 3 --top 12
    python benchmarks/breakdown.py dcgan_64 --json build/bench/dcgan_breakdown.json

For one case of the suite (``suite.py --list``: the same config, overrides, synthetic batch,
XLA flags and malloc tunables), in one process, after compile and warm-up:

* **step**: the compiled training step as it runs;
* **XLA part**: the same step with oneDNN's primitives skipped, interleaved round by round with
  the real step. Their outputs keep what their buffers held, in practice the previous step's
  values, so XLA's part computes on data of the usual magnitudes: a timing, never a result (the
  real steps continue from its state). Zeroing those outputs instead made CycleGAN's bfloat16
  XLA part read 0.9-1.9 s against 0.8-1.0 s;
* **oneDNN in the step**: every primitive timed inside the FFI handler, after the lock that makes
  the calls take turns, and the time spent waiting for that lock;
* **alone**: each of those primitives timed on scratch arrays of its shapes with nothing else
  running (oneDNN's own autotuning timer), times its calls per step;
* **oneDNN busy / outside**: the wall time of each real step during which some primitive was
  running (the union of their intervals) and the rest, when only XLA's work ran, and how many
  of XLA's threads called oneDNN. Where the outside is about the XLA part alone, XLA's work
  ran in time of its own, not beside the primitives.

When the primitives take longer in the step than alone, they share the cores with XLA's work
running beside them on its other threads. The profiler's per-op durations in these steps were
off by up to 60x (``BENCHMARKS.md``, session 41), hence these measurements. A CPU with oneDNN
only (``medjax[onednn]``); not a test, prints a table.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite  # noqa: E402

from medjax.train.platform import configure_xla, exec_with_host_tunables  # noqa: E402


def busy_time(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """The length of the union of the ``(begin, end)`` intervals within ``[start, end]``."""
    total, reach = 0.0, start
    for a, b in sorted(intervals):
        a, b = max(a, reach), min(b, end)
        if b > a:
            total, reach = total + b - a, b
    return total


class Recorder:
    """Times every oneDNN primitive that XLA's calls run while :meth:`installed`: :meth:`step`
    runs one step and returns its calls as ``(plan, thread, called, began, ended)``
    (``time.perf_counter`` seconds; the lock that makes the calls take turns was taken between
    ``called`` and ``began``) with the step's own beginning and end, or with ``skip`` runs it
    with the primitives skipped (the XLA part's timing) and records nothing. The calls run
    from C where medjax's C handler is built (``onednn._native``; it records them there), else
    from the Python handler (its methods wrapped here)."""

    CAPACITY = 1 << 16

    def __init__(self) -> None:
        self.calls: list[tuple[Any, int, float, float, float]] = []
        self.skip = False
        self._record: Any = None  # the C library's record, allocated once

    @contextlib.contextmanager
    def installed(self) -> Iterator[Recorder]:
        from medjax.models import onednn

        dnn = onednn._load()
        assert dnn is not None
        if dnn.in_c:
            yield self
            return
        plan_run, handler_run = onednn._Plan.run, onednn._OneDNN.run
        local = threading.local()  # this thread's call: its plan and run's times

        def timed_plan_run(plan, pointers) -> None:
            if self.skip:
                return
            local.began = time.perf_counter()
            plan_run(plan, pointers)
            local.ended, local.plan = time.perf_counter(), plan

        def timed_handler_run(dnn, plan_id, pointers) -> None:
            called = time.perf_counter()
            handler_run(dnn, plan_id, pointers)
            if not self.skip:
                ident = threading.get_ident()
                self.calls.append((local.plan, ident, called, local.began, local.ended))

        onednn._Plan.run, onednn._OneDNN.run = timed_plan_run, timed_handler_run
        try:
            yield self
        finally:
            onednn._Plan.run, onednn._OneDNN.run = plan_run, handler_run

    def step(self, step: Callable[[], None], skip: bool) -> tuple[list[tuple], float, float]:
        """Runs ``step`` once: its calls (none with ``skip``) and when it began and ended; the
        recording's own set-up and read-back lie outside those times."""
        from medjax.models import onednn

        dnn = onednn._load()
        self.skip, self.calls = skip, []
        if not dnn.in_c:
            return self.calls, *self._timed(step)
        if skip:
            dnn.native.medjax_onednn_skip(1)
            try:
                return [], *self._timed(step)
            finally:
                dnn.native.medjax_onednn_skip(0)
        if self._record is None:
            self._record = (onednn._NativeCall * self.CAPACITY)()
        dnn.native.medjax_onednn_record(self._record, self.CAPACITY)
        times = self._timed(step)
        n = dnn.native.medjax_onednn_record(None, 0)
        plans = {plan.handle: plan for plan in dnn.handed}
        calls = [(plans[c.plan], c.thread, c.called, c.began, c.ended) for c in self._record[:n]]
        return calls, *times

    @staticmethod
    def _timed(step: Callable[[], None]) -> tuple[float, float]:
        begin = time.perf_counter()
        step()
        return begin, time.perf_counter()


def breakdown(step: Callable[[], None], rounds: int, warmup: int = 2) -> dict:
    """The measurements above for a compiled ``step`` (times in seconds; ``plans``: one row
    per primitive, slowest in the step first)."""
    from medjax.models import onednn

    for _ in range(warmup):
        step()
    recorder = Recorder()
    full, xla, busy, threads = [], [], [], []
    inside: dict[Any, list[float]] = collections.defaultdict(list)
    waits: list[float] = []
    with recorder.installed():
        for _ in range(rounds):
            _, t, end = recorder.step(step, skip=True)
            xla.append(end - t)
            calls, t, end = recorder.step(step, skip=False)
            full.append(end - t)
            for plan, _, called, began, ended in calls:
                inside[plan].append(ended - began)
                waits.append(began - called)
            busy.append(busy_time([(c[3], c[4]) for c in calls], t, end))
            threads.append(len({c[1] for c in calls}))
    plans = []
    for plan, times in inside.items():
        alone = onednn._time_plans([plan], rounds=5)[0]
        calls = len(times) / rounds
        plans.append(
            {
                "kind": plan.kind,
                "shapes": [list(s) for s in plan.shapes],
                "dtype": plan.dtype,
                "calls_per_step": calls,
                "in_step_s": sum(times) / rounds,
                "median_call_s": statistics.median(times),
                "alone_call_s": alone,
                "alone_s": alone * calls,
            }
        )
    plans.sort(key=lambda r: -r["in_step_s"])
    return {
        "rounds": rounds,
        "handler": "C" if onednn._load().in_c else "Python",
        "step_s": statistics.median(full),
        "xla_part_s": statistics.median(xla),
        "onednn_calls_per_step": sum(len(v) for v in inside.values()) / rounds,
        "onednn_in_step_s": sum(r["in_step_s"] for r in plans),
        "onednn_alone_s": sum(r["alone_s"] for r in plans),
        "lock_wait_s": sum(waits) / rounds,
        "onednn_busy_s": statistics.median(busy),
        "outside_onednn_s": statistics.median(s - b for s, b in zip(full, busy, strict=True)),
        "calling_threads": max(threads),
        "plans": plans,
    }


def report(name: str, dtype: str, r: dict, top: int) -> str:
    ms = 1e3
    lines = [
        f"{name} ({dtype}), {r['rounds']} rounds, oneDNN called from {r['handler']}:",
        f"  step {r['step_s'] * ms:.1f} ms; XLA part (oneDNN skipped) "
        f"{r['xla_part_s'] * ms:.1f} ms (medians)",
        f"  oneDNN: {r['onednn_calls_per_step']:.0f} calls a step, {r['onednn_in_step_s'] * ms:.1f}"
        f" ms a step in the step (lock wait {r['lock_wait_s'] * ms:.1f} ms; means), the same"
        f" primitives alone {r['onednn_alone_s'] * ms:.1f} ms",
        f"  the step's wall time: some primitive running {r['onednn_busy_s'] * ms:.1f} ms, none"
        f" {r['outside_onednn_s'] * ms:.1f} ms (medians); oneDNN called from"
        f" {r['calling_threads']} of XLA's threads",
        "",
        "| primitive | input, kernel, output | calls | in step (ms a step) | per call (median) "
        "| alone (fastest of 5) |",
        "|---|---|---|---|---|---|",
    ]
    for p in r["plans"][:top]:
        shapes = ", ".join("x".join(map(str, s)) for s in p["shapes"])
        lines.append(
            f"| {p['kind']} {p['dtype']} | {shapes} | {p['calls_per_step']:.0f} | "
            f"{p['in_step_s'] * ms:.2f} | {p['median_call_s'] * ms:.2f} | "
            f"{p['alone_call_s'] * ms:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("case", help="a case of benchmarks/suite.py (--list there)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--rounds", type=int, default=10, help="timed rounds (one step of each kind)")
    p.add_argument("--top", type=int, default=15, help="primitives listed")
    p.add_argument("--json", default="", help="write the measurements here")
    args = p.parse_args()
    names = {c.name: c for c in suite.CASES}
    if args.case not in names:
        sys.exit(f"unknown case {args.case!r}; one of {', '.join(names)}")
    configure_xla()
    from medjax.models import onednn

    if not onednn.available():
        sys.exit("oneDNN is not available here (pip install 'medjax[onednn]'; MEDJAX_ONEDNN)")
    step = suite.medjax_step(names[args.case], 1, args.dtype)[0]
    result = breakdown(step, args.rounds)
    print(report(args.case, args.dtype, result, args.top))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"case": args.case, "dtype": args.dtype, **result}))


if __name__ == "__main__":
    exec_with_host_tunables()  # the suite's glibc malloc tunables: restarts this process once
    main()
