"""Process-level settings (`medjax.train.platform`), checked in fresh subprocesses."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

# One live 64 MiB numpy buffer (every page touched) after `configure` (configure_host_memory()),
# `exec` (exec_with_host_tunables(): the process restarts itself) or `none`, and glibc's own
# accounting of it (mallinfo2: `hblkhd` = bytes in mmap-served blocks) and the kernel's
# (/proc/self/smaps: anonymous memory on transparent huge pages).
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
print(json.dumps({"applied": applied, "mmapped": mmapped, "huge_kib": huge, "pid": os.getpid(),
                  "argv": sys.argv[2:], "sum": int(x[::4096].sum())}))
"""

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc"
)


def _probe(tmp_path, mode: str, *args: str, **env: str) -> tuple[list[list[str]], dict]:
    """(the `start` lines: pid and GLIBC_TUNABLES at each start, the final record)."""
    script = tmp_path / "probe.py"
    script.write_text(_PROBE)
    clean = {
        k: v for k, v in os.environ.items() if k not in ("MEDJAX_HOST_TUNED", "GLIBC_TUNABLES")
    }
    out = subprocess.run(
        [sys.executable, str(script), mode, *args],
        capture_output=True, text=True, check=True, env={**clean, **env},
    ).stdout.strip().splitlines()  # fmt: skip
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
    _, configured = _probe(tmp_path, "configure")
    assert configured["applied"] is True
    assert configured["mmapped"] == 0  # from the heap, reused once freed
    assert configured["sum"] == control["sum"] == (64 << 20) // 4096  # the buffer is intact


@glibc_only
def test_host_memory_opt_out_keeps_the_system_allocator(tmp_path):
    _, out = _probe(tmp_path, "configure", MEDJAX_SYSTEM_MALLOC="1")
    assert out["applied"] is False and out["mmapped"] >= 64 << 20


@glibc_only
def test_exec_with_host_tunables_restarts_once_with_glibc_tunables(tmp_path):
    starts, res = _probe(
        tmp_path, "exec", "--flag", "a b", GLIBC_TUNABLES="glibc.malloc.arena_max=4"
    )
    assert len(starts) == 2 and starts[0][0] == starts[1][0]  # the same process, restarted once
    assert starts[0][1] == "glibc.malloc.arena_max=4"
    assert starts[1][1].split(":") == [
        "glibc.malloc.mmap_max=0",
        "glibc.malloc.trim_threshold=1073741824",
        "glibc.malloc.hugetlb=1",
        "glibc.malloc.arena_max=4",  # the user's own tunables last: they win
    ]
    assert res["argv"] == ["--flag", "a b"] and res["pid"] == int(starts[0][0])
    assert res["mmapped"] == 0  # glibc read the tunables: 64 MiB from the heap, not mmap
    glibc = tuple(int(v) for v in platform.libc_ver()[1].split(".")[:2])
    if glibc >= (2, 35) and _thp_mode() in ("madvise", "always"):
        assert res["huge_kib"] >= 2048  # malloc's memory on transparent huge pages


@glibc_only
def test_exec_with_host_tunables_opt_out(tmp_path):
    starts, res = _probe(tmp_path, "exec", MEDJAX_SYSTEM_MALLOC="1")
    assert len(starts) == 1 and res["mmapped"] >= 64 << 20
