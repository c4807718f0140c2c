"""The benchmark suite's own machinery (no timing targets: those live in the printed numbers)."""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
import types
from pathlib import Path

import pytest

from medjax.configs import classifier_medmnist

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_train_step  # noqa: E402
import breakdown  # noqa: E402
import suite  # noqa: E402


def test_data_section_lists_every_shipped_config():
    files = {
        p.stem
        for p in (BENCH.parent / "medjax" / "configs").glob("*.py")
        if "def get_config" in p.read_text()
    }
    assert set(suite.shipped_configs()) == files
    assert {"mni152_demo", "wgan_gp_medmnist", "vox2vox_brats"} <= files


def test_measure_runs_the_loop_pattern_on_real_data():
    cfg = classifier_medmnist.get_config("smoke")
    r = bench_train_step.measure(cfg, steps=3)
    assert r["steps"] == 3 and r["batch"] == int(cfg.batch_size)
    assert r["num_train"] > 0 and r["example"]["image"][-1] == 1
    for key in ("pipeline_s", "step_s", "loop_s", "compile_s"):
        assert r[key] > 0, key
    assert 0.0 <= r["wait_frac"] < 1.0
    assert r["progress"] and all(math.isfinite(v) for v in r["progress"].values())


def test_measure_steps_as_the_loop_does_and_counts_the_time_blocked_fetching(monkeypatch):
    # every batch's transfer to the mesh (in the main thread, inside `next`) takes 60 ms more:
    # on one CPU process the loop fetches only after the previous step finished, so it waits
    # that long per step, and that is what wait_frac counts
    import jax

    from medjax import parallel

    slow, events = 0.06, []
    real_batch, real_wait = parallel.global_batch, jax.block_until_ready

    def global_batch(*args, **kwargs):
        events.append("fetch")
        time.sleep(slow)
        return real_batch(*args, **kwargs)

    def block_until_ready(x):
        events.append("wait")
        return real_wait(x)

    monkeypatch.setattr(parallel, "global_batch", global_batch)
    monkeypatch.setattr(jax, "block_until_ready", block_until_ready)
    cfg = classifier_medmnist.get_config("smoke")
    r = bench_train_step.measure(cfg, steps=4)
    n = r["steps"]
    # the timed loop: fetch, dispatch, (wait for it, fetch, dispatch) n - 1 times, wait
    assert events[-2 * n :] == ["fetch", "wait"] * n
    # at least the added 60 ms a step, and not much more (the batch itself is small)
    assert slow <= r["wait_frac"] * r["loop_s"] < 2 * slow


def test_config_overrides_are_checked():
    cfg = classifier_medmnist.get_config("smoke")
    suite._set(cfg, "data.max_examples", 7)
    assert cfg.data.max_examples == 7
    with pytest.raises(KeyError, match="not a key"):
        suite._set(cfg, "data.nosuch", 1)


def _scripted(monkeypatch, *durations):
    """Steps whose times (s) follow `durations`, one list per side, on a fake clock."""
    clock = [0.0]
    monkeypatch.setattr(suite.time, "perf_counter", lambda: clock[0])

    def step(ts):
        it = iter(ts)
        return lambda: clock.__setitem__(0, clock[0] + next(it))

    return [step(ts) for ts in durations]


def test_warm_up_runs_until_every_side_settles(monkeypatch):
    # (times exact in binary, so the fake clock adds them exactly)
    # medjax: a first-touch spike, then settled; torch: settled at once. Round 2's medjax pair
    # (2, 0.5) is 4x the fastest, round 3's (0.5, 0.5625) within 20 % of 0.5: three rounds.
    steps = _scripted(monkeypatch, [2.0, 0.5, 0.5625, 9.0], [0.75, 0.625, 0.625, 9.0])
    warm = suite.settle(steps, max_rounds=8, tol=0.2)
    assert warm == [[2.0, 0.5, 0.5625], [0.75, 0.625, 0.625]]
    # (0.5625, 0.5) is 1.125x the fastest: settled after the two rounds every warm-up runs
    warm = suite.settle(_scripted(monkeypatch, [0.5625, 0.5, 9.0])[:1], max_rounds=8, tol=0.2)
    assert warm == [[0.5625, 0.5]]


def test_warm_up_stops_at_its_cap_when_a_side_never_settles(monkeypatch):
    steps = _scripted(monkeypatch, [1.0, 2.0] * 5, [1.0] * 10)
    warm = suite.settle(steps, max_rounds=5, tol=0.2)
    assert warm == [[1.0, 2.0, 1.0, 2.0, 1.0], [1.0] * 5]


def test_consecutive_steps_time_the_ones_after_a_step_of_their_own(monkeypatch):
    # each side runs 3 steps per turn; a round's time is the mean of its last 2 (the first
    # follows the other side's turn): medjax (4, 1, 2) then (4, 0.5, 0.5), torch (8, 2, 2) twice
    steps = _scripted(monkeypatch, [4.0, 1.0, 2.0, 4.0, 0.5, 0.5], [8.0, 2.0, 2.0] * 2)
    assert suite.timed_interleaved(steps, 2, consecutive=3) == [[1.5, 0.5], [2.0, 2.0]]
    steps = _scripted(monkeypatch, [4.0, 1.0], [8.0, 2.0])  # one step per turn: each counts
    assert suite.timed_interleaved(steps, 2) == [[4.0, 1.0], [8.0, 2.0]]


def test_a_case_is_timed_in_a_new_process_and_its_row_comes_back():
    case = next(c for c in suite.CASES if c.name == "classifier")
    args = argparse.Namespace(
        rounds=1, no_torch=True, warmup_max=2, warmup_tol=0.2, side="both", dtype="float32",
        consecutive=0,
    )  # fmt: skip
    row = suite.step_row_in_fresh_process(case, args, peak=1e11)
    assert row["case"] == "classifier" and row["batch"] == 64
    assert row["medjax_s"] > 0 and row["medjax_gflop"] > 0
    assert row["medjax_peak_frac"] == pytest.approx(
        row["medjax_gflop"] * 1e9 / row["medjax_s"] / 1e11
    )
    assert len(row["warmup_medjax_s"]) == 2 and row["timed_medjax_s"] == [row["medjax_s"]]
    assert row["consecutive"] == suite.AUTO_CONSECUTIVE  # auto: a step well under a second
    assert "ratio" not in row  # no PyTorch side without torch


def test_sides_timed_apart_merge_into_one_row():
    common = {"case": "x", "batch": 4, "medjax_gflop": 2.0, "torch_gflop": 3.0}
    jax_row = {**common, "medjax_s": 0.5, "timed_medjax_s": [0.5]}
    torch_row = {**common, "torch_s": 2.0, "timed_torch_s": [2.0], "torch_params": 7}
    row = suite.merged_sides(jax_row, torch_row, peak=1e10)
    assert row["ratio"] == 4.0 and row["sides_apart"] and row["torch_params"] == 7
    assert row["medjax_ex_per_s"] == 8.0  # 4 examples / 0.5 s
    assert row["medjax_peak_frac"] == pytest.approx(0.4)  # 2 GFLOP / 0.5 s / 10 GFLOP/s
    assert row["torch_peak_frac"] == pytest.approx(0.15)  # 3 GFLOP / 2 s / 10 GFLOP/s
    assert row["timed_medjax_s"] == [0.5] and row["timed_torch_s"] == [2.0]
    assert "ratio_rounds" not in row and suite.per_round(row) == "-"  # nothing to pair


def test_the_ratio_per_round_pairs_each_torch_step_with_its_medjax_step():
    # a burst slows round 2's two steps alike: the medians' ratio moves, the paired one less
    row = {"case": "x", "batch": 2, "medjax_gflop": 1.0, "torch_gflop": 1.0}
    row.update(timed_medjax_s=[1.0, 4.0, 1.0, 2.0, 1.0], timed_torch_s=[1.5, 8.0, 1.25, 2.5, 1.5])
    row.update(medjax_s=1.0, torch_s=1.5)  # the medians
    row = suite.with_rates(row, peak=1e10)
    # ratios per round 1.5, 2, 1.25, 1.25, 1.5 -> sorted 1.25 1.25 1.5 1.5 2
    assert row["ratio_rounds"] == {"median": 1.5, "q1": 1.25, "q3": 1.5, "min": 1.25, "max": 2.0}
    assert suite.per_round(row) == "1.50 (1.25-1.50)"
    machine = {"cpu": "c", "cores": 2, "devices": "1 x cpu", "jax": "j", "flax": "f"}
    machine.update(host_malloc="glibc", peak_gflops=10.0)
    table = suite.markdown(machine, [row | {"what": "x", "compile_s": 1.0, "memory_mib": 1.0}])
    assert table.splitlines()[-1].endswith("| **1.50** | 1.50 (1.25-1.50) |")


def test_the_compute_dtype_reaches_every_network_of_a_config():
    from medjax.configs import pix2pix_folder, unet3d_brats

    gan, unet = pix2pix_folder.get_config(), unet3d_brats.get_config()
    for cfg in (gan, unet):
        suite.set_compute_dtype(cfg, "bfloat16")
    expected_gan, expected_unet = pix2pix_folder.get_config(), unet3d_brats.get_config()
    expected_gan.model.generator.dtype = expected_gan.model.discriminator.dtype = "bfloat16"
    expected_unet.model.dtype = "bfloat16"  # and nothing else changed
    assert gan.to_dict() == expected_gan.to_dict() and unet.to_dict() == expected_unet.to_dict()


def test_step_times_keep_three_figures():
    assert [suite._ms(s) for s in (1.2345, 0.01234, 0.003304)] == ["1234 ms", "12.3 ms", "3.30 ms"]


def test_the_reference_runs_in_a_process_of_its_own_and_times_itself():
    # (a stand-in for a PyTorch step: the process machinery needs no torch)
    build = functools.partial(
        types.SimpleNamespace, run=functools.partial(time.sleep, 0.05), params=3, flops=2.0
    )
    with suite.TorchProcess(build) as ref:
        assert ref.pid != os.getpid()
        assert (ref.params, ref.flops) == (3, 2.0)
        times = suite.timed_interleaved([ref.run, lambda: 0.25], 2)
    assert all(0.05 <= t < 1.0 for t in times[0]) and times[1] == [0.25, 0.25]
    assert not ref._proc.is_alive()


def test_an_error_in_the_reference_process_is_raised_here_with_its_traceback():
    with pytest.raises(RuntimeError, match="in the PyTorch process:(.|\n)*ValueError"):
        suite.TorchProcess(functools.partial(int, "not a number"))


def test_busy_time_is_the_length_of_the_union_of_intervals_within_the_window():
    # hand-computed: [0, 3) and [5, 6) cover 4 s; [5.5, 5.8) lies inside [5, 6)
    intervals = [(1.0, 3.0), (0.0, 2.0), (5.5, 5.8), (5.0, 6.0)]
    assert breakdown.busy_time(intervals, 0.0, 10.0) == pytest.approx(4.0)
    assert breakdown.busy_time(intervals, 1.5, 5.25) == pytest.approx(1.5 + 0.25)
    assert breakdown.busy_time([], 0.0, 1.0) == 0.0
    assert breakdown.busy_time([(2.0, 3.0)], 0.0, 1.0) == 0.0


@pytest.mark.parametrize("handler", ["C", "Python"])
def test_breakdown_times_each_onednn_call_of_the_step_and_restores_the_handler(
    monkeypatch, handler
):
    import jax
    import jax.numpy as jnp

    from medjax.models import onednn

    if not onednn.available():
        pytest.skip("oneDNN (the onednn-cpu-gomp wheel) is not installed")
    dnn = onednn._load()
    if handler == "C" and dnn.native is None:
        pytest.skip("the C handler (medjax/models/_onednn_ffi.c) is not built here")
    monkeypatch.setattr(dnn, "from_python", handler == "Python")
    pads = [(1, 1), (1, 1)]

    def loss(x, k):
        return jnp.sum(onednn.conv(jnp.tanh(onednn.conv(x, k, (1, 1), pads)), k, (1, 1), pads))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    x = jnp.ones((2, 16, 16, 8), jnp.float32)
    k = jnp.full((3, 3, 8, 8), 0.01, jnp.float32)
    # the independent count: the FFI calls in XLA's compiled program (two forwards, and each
    # convolution's input and kernel gradients, less the first's unused input gradient)
    target = onednn._TARGET if handler == "C" else onednn._TARGET_PYTHON
    calls = grad.lower(x, k).compile().as_text().count(f'custom_call_target="{target}"')
    assert calls == 5
    plan_run, handler_run = onednn._Plan.run, onednn._OneDNN.run

    def step():
        jax.block_until_ready(grad(x, k))

    result = breakdown.breakdown(step, rounds=2, warmup=1)
    assert result["handler"] == handler
    assert (onednn._Plan.run, onednn._OneDNN.run) == (plan_run, handler_run)
    assert result["onednn_calls_per_step"] == calls
    assert sum(p["calls_per_step"] for p in result["plans"]) == calls
    assert {p["kind"] for p in result["plans"]} <= {"forward", "data", "weights"}
    assert all(p["alone_call_s"] > 0 and p["in_step_s"] > 0 for p in result["plans"])
    assert result["step_s"] > 0 and result["xla_part_s"] > 0 and result["lock_wait_s"] >= 0
    # the primitives ran inside the steps, so their union is a part of the step's wall time and
    # at most their summed times (over two rounds a median is the mean)
    assert 0 < result["onednn_busy_s"] <= result["step_s"]
    assert result["onednn_busy_s"] <= result["onednn_in_step_s"] * (1 + 1e-9)
    assert result["outside_onednn_s"] >= 0 and result["calling_threads"] >= 1
    text = breakdown.report("toy", "float32", result, top=3)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + min(3, len(result["plans"]))  # the header, a row per primitive

    # skipped primitives are not run: the C library records none of a skipped step's calls (it
    # returns before it records), a spy on the Python handler's primitives sees none; both see
    # every one of the real step's, and the recorder returns only the real step's
    ran = []
    if handler == "C":
        record = (onednn._NativeCall * 16)()

        def recorded(skip: bool) -> int:
            dnn.native.medjax_onednn_skip(int(skip))
            dnn.native.medjax_onednn_record(record, 16)
            step()
            dnn.native.medjax_onednn_skip(0)
            return dnn.native.medjax_onednn_record(None, 0)

        assert recorded(skip=True) == 0 and recorded(skip=False) == calls
    else:

        def spy(plan, pointers):
            ran.append(plan.kind)
            plan_run(plan, pointers)

        monkeypatch.setattr(onednn._Plan, "run", spy)
    recorder = breakdown.Recorder()
    with recorder.installed():
        skipped, begin, end = recorder.step(step, skip=True)
        assert skipped == [] and not ran and begin < end
        real, begin, end = recorder.step(step, skip=False)
    assert len(ran) == (calls if handler == "Python" else 0)
    assert len(real) == calls and {c[0].kind for c in real} <= {"forward", "data", "weights"}
    assert all(begin <= called <= began <= ended <= end for _, _, called, began, ended in real)
