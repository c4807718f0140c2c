"""Process-level settings (`medjax.train.platform`), checked in fresh subprocesses."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from medjax.train.platform import HOST_TUNABLES

# Numpy buffers (every page touched) after `configure` (configure_host_memory()), `exec`
# (exec_with_host_tunables(): the process restarts itself) or `none`, and glibc's own accounting
# of them (mallinfo2: `hblkhd` = bytes in mmap-served blocks, `fordblks` = free heap bytes) and the
# kernel's (/proc/self/smaps: anonymous memory on transparent huge pages): a live 64 MiB buffer,
# 128 MiB allocated by a second thread, and 1.1 GiB freed.
_PROBE = """
import ctypes, json, os, sys
import numpy as np
from medjax.train import platform

print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), flush=True)
mode = sys.argv[1]
applied = platform.configure_host_memory() if mode == "configure" else None
if mode == "exec":
    platform.exec_with_host_tunables()

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
before = libc.mallinfo2().hblkhd
x = np.ones(64 << 20, np.uint8)
mmapped = libc.mallinfo2().hblkhd - before
huge = sum(int(line.split()[1]) for line in open("/proc/self/smaps")
           if line.startswith("AnonHugePages:"))

# XLA:CPU allocates a step's buffers on its own threads: 128 MiB from a second thread.
import threading
found = {}
def worker():
    before = libc.mallinfo2().hblkhd
    y = np.ones(128 << 20, np.uint8)
    found["thread_mmapped"] = libc.mallinfo2().hblkhd - before
    found["thread_sum"] = int(y[::4096].sum())
t = threading.Thread(target=worker)
t.start()
t.join()

# 1.1 GiB freed: kept on the heap for reuse (mallinfo2: `fordblks` = free bytes in the heap),
# or given back to the system.
z = np.ones(1100 << 20, np.uint8)
del z
kept = libc.mallinfo2().fordblks
print(json.dumps({"applied": applied, "mmapped": mmapped, "huge_kib": huge, "pid": os.getpid(),
                  "argv": sys.argv[2:], "sum": int(x[::4096].sum()), "kept": kept, **found}))
"""

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc"
)


def _run(tmp_path, source: str, *args: str, **env: str) -> list[str]:
    """The output lines of `source` run as a script in a fresh interpreter, with `env` added to
    an environment without the scripts' malloc settings."""
    script = tmp_path / "probe.py"
    script.write_text(source)
    clean = {
        k: v for k, v in os.environ.items() if k not in ("MEDJAX_HOST_TUNED", "GLIBC_TUNABLES")
    }
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True, text=True, check=True, env={**clean, **env},
    ).stdout.strip().splitlines()  # fmt: skip


def _probe(tmp_path, mode: str, *args: str, **env: str) -> tuple[list[list[str]], dict]:
    """(the `start` lines: pid and GLIBC_TUNABLES at each start, the final record)."""
    out = _run(tmp_path, _PROBE, mode, *args, **env)
    starts = [line.split(" ", 2)[1:] for line in out if line.startswith("start")]
    return starts, json.loads(out[-1])


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "never"
    return text.split("[")[1].split("]")[0]


@glibc_only
def test_host_memory_serves_large_buffers_from_the_heap(tmp_path):
    _, control = _probe(tmp_path, "none")
    assert control["mmapped"] >= 64 << 20  # glibc's default: a fresh mmap for 64 MiB
    assert control["thread_mmapped"] >= 128 << 20  # and for another thread's 128 MiB
    assert control["kept"] < 256 << 20  # 1.1 GiB freed went back to the system
    _, configured = _probe(tmp_path, "configure")
    assert configured["applied"] is True
    assert configured["mmapped"] == 0  # from the heap, reused once freed
    assert configured["thread_mmapped"] == 0  # the thread allocates from the same heap
    assert configured["kept"] >= 1100 << 20  # never trimmed: kept for the next step
    assert configured["sum"] == control["sum"] == (64 << 20) // 4096  # the buffers are intact
    assert configured["thread_sum"] == control["thread_sum"] == (128 << 20) // 4096


@glibc_only
def test_host_memory_opt_out_keeps_the_system_allocator(tmp_path):
    _, out = _probe(tmp_path, "configure", MEDJAX_SYSTEM_MALLOC="1")
    assert out["applied"] is False and out["mmapped"] >= 64 << 20


@glibc_only
def test_exec_with_host_tunables_restarts_once_with_glibc_tunables(tmp_path):
    starts, res = _probe(tmp_path, "exec", "--flag", "a b", GLIBC_TUNABLES="glibc.malloc.perturb=0")
    assert len(starts) == 2 and starts[0][0] == starts[1][0]  # the same process, restarted once
    assert starts[0][1] == "glibc.malloc.perturb=0"
    assert starts[1][1].split(":") == [
        "glibc.malloc.mmap_max=0",
        "glibc.malloc.trim_threshold=18446744073709551615",
        "glibc.malloc.arena_max=1",
        "glibc.malloc.hugetlb=1",
        "glibc.malloc.perturb=0",  # the user's own tunables last: they win
    ]
    assert res["argv"] == ["--flag", "a b"] and res["pid"] == int(starts[0][0])
    # glibc read the tunables: no buffer served by mmap, 1.1 GiB freed kept on the heap
    assert res["mmapped"] == 0 and res["thread_mmapped"] == 0
    assert res["kept"] >= 1100 << 20
    glibc = tuple(int(v) for v in platform.libc_ver()[1].split(".")[:2])
    if glibc >= (2, 35) and _thp_mode() in ("madvise", "always"):
        assert res["huge_kib"] >= 2048  # malloc's memory on transparent huge pages


@glibc_only
def test_exec_with_host_tunables_opt_out(tmp_path):
    starts, res = _probe(tmp_path, "exec", MEDJAX_SYSTEM_MALLOC="1")
    assert len(starts) == 1 and res["mmapped"] >= 64 << 20


def test_readme_gives_the_scripts_tunables_for_a_notebook():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert "GLIBC_TUNABLES=" + ":".join(HOST_TUNABLES) in readme


# HeapGuard after configure_host_memory(): it settles on the resident size after its first
# call, then 1.1 GiB is allocated, touched and freed (kept on the heap, still resident), and
# the guard is called twice; then 1.1 GiB more is allocated and kept live (resident far above
# the bound whichever allocator runs) and the guard is called once more. Resident sizes from
# the kernel's /proc/self/status (VmRSS).
_GUARD_PROBE = """
import json, sys
import numpy as np
from medjax.train import platform

def vm_rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10

applied = platform.configure_host_memory()
guard = platform.HeapGuard(settle_steps=1, slack=1.5)
first = guard()
settled = vm_rss()
z = np.ones(1100 << 20, np.uint8)
del z
held = vm_rss()
trimmed = guard()
after = vm_rss()
again = guard()
y = np.ones(1100 << 20, np.uint8)
live = guard()
print(json.dumps({"applied": applied, "first": first, "settled": settled, "held": held,
                  "trimmed": trimmed, "after": after, "again": again, "live": live,
                  "trims": guard.trims, "sum": int(y[::4096].sum())}))
"""


def _guard_probe(tmp_path, **env: str) -> dict:
    return json.loads(_run(tmp_path, _GUARD_PROBE, **env)[-1])


@glibc_only
def test_heap_guard_gives_back_what_the_kept_heap_holds_beyond_its_bound(tmp_path):
    res = _guard_probe(tmp_path)
    assert res["applied"] is True and res["first"] is False  # the first call only settles
    assert res["held"] - res["settled"] >= 1000 << 20  # freed, yet still resident
    assert res["trimmed"] is True
    assert res["held"] - res["after"] >= 1000 << 20  # the free pages went back
    assert res["again"] is False  # nothing grew since
    assert res["live"] is True and res["trims"] == 2  # above the bound: it trims (frees none)
    assert res["sum"] == (1100 << 20) // 4096  # the live buffer is intact


@glibc_only
def test_heap_guard_opt_out_does_nothing(tmp_path):
    res = _guard_probe(tmp_path, MEDJAX_SYSTEM_MALLOC="1")
    assert res["applied"] is False and res["trimmed"] is False
    assert res["live"] is False and res["trims"] == 0  # even with 1.1 GiB above its bound


def test_heap_guard_bound_follows_the_working_set(monkeypatch):
    from medjax.train import platform as plat

    sizes = iter([100, 90, 150, 151, 120, 200, 179])
    monkeypatch.setattr(plat, "resident_bytes", lambda: next(sizes))
    guard = plat.HeapGuard(settle_steps=2, slack=1.5)
    trims = []
    guard._trim = trims.append
    assert guard() is False and guard() is False  # settles on max(100, 90) = 100
    assert guard.bound == 150
    assert guard() is False  # 150: at the bound
    assert guard() is True and trims == [0]  # 151: trimmed; 120 left -> bound 180
    assert guard.bound == 180
    assert guard() is True  # 200: trimmed; 179 left (a cache that grew) -> bound 268
    assert guard.working_set == 179 and guard.bound == 268 and guard.trims == 2
