"""Process-level settings (`medjax.train.platform`), checked in fresh subprocesses."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

# glibc's own accounting (mallinfo2: `hblkhd` = bytes in mmap-served blocks) of one live 64 MiB
# numpy buffer, after configure_host_memory() or without it.
_PROBE = """
import ctypes, json, sys
import numpy as np
from medjax.train.platform import configure_host_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = configure_host_memory() if sys.argv[1] == "1" else None
before = libc.mallinfo2().hblkhd
x = np.ones(16 << 20, np.float32)  # 64 MiB
during = libc.mallinfo2().hblkhd
print(json.dumps({"applied": applied, "mmapped": during - before, "sum": float(x[::4096].sum())}))
"""


def _probe(apply: bool, **env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, "1" if apply else "0"],
        capture_output=True, text=True, check=True, env={**os.environ, **env},
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc"
)


@glibc_only
def test_host_memory_serves_large_buffers_from_the_heap():
    control = _probe(False)
    assert control["mmapped"] >= 64 << 20  # glibc's default: a fresh mmap for 64 MiB
    configured = _probe(True)
    assert configured["applied"] is True
    assert configured["mmapped"] == 0  # from the heap, reused once freed
    assert configured["sum"] == control["sum"] == 4096.0


@glibc_only
def test_host_memory_opt_out_keeps_the_system_allocator():
    out = _probe(True, MEDJAX_SYSTEM_MALLOC="1")
    assert out["applied"] is False and out["mmapped"] >= 64 << 20


_RESTART = """
import ctypes, json, os, sys
import numpy as np
from medjax.train.platform import exec_with_host_tunables

print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), flush=True)
exec_with_host_tunables()

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
x = np.ones(64 << 20, np.uint8)  # 64 MiB, every page touched
huge = sum(int(line.split()[1]) for line in open("/proc/self/smaps")
           if line.startswith("AnonHugePages:"))
print(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], "mmapped": libc.mallinfo2().hblkhd,
                  "huge_kib": huge}))
"""


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "never"
    return text.split("[")[1].split("]")[0]


@glibc_only
def test_exec_with_host_tunables_restarts_once_with_glibc_tunables(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(_RESTART)
    env = {k: v for k, v in os.environ.items() if k not in ("MEDJAX_HOST_TUNED", "GLIBC_TUNABLES")}
    out = subprocess.run(
        [sys.executable, str(script), "--flag", "a b"],
        capture_output=True, text=True, check=True,
        env={**env, "GLIBC_TUNABLES": "glibc.malloc.arena_max=4"},
    ).stdout.strip().splitlines()  # fmt: skip
    starts = [line.split(" ", 2) for line in out if line.startswith("start")]
    assert len(starts) == 2 and starts[0][1] == starts[1][1]  # the same process, restarted once
    assert starts[0][2] == "glibc.malloc.arena_max=4"
    assert starts[1][2].split(":") == [
        "glibc.malloc.mmap_max=0",
        "glibc.malloc.trim_threshold=1073741824",
        "glibc.malloc.hugetlb=1",
        "glibc.malloc.arena_max=4",  # the user's own tunables last: they win
    ]
    res = json.loads(out[-1])
    assert res["argv"] == ["--flag", "a b"] and res["pid"] == int(starts[0][1])
    assert res["mmapped"] == 0  # glibc read the tunables: 64 MiB from the heap, not mmap
    glibc = tuple(int(v) for v in platform.libc_ver()[1].split(".")[:2])
    if glibc >= (2, 35) and _thp_mode() in ("madvise", "always"):
        assert res["huge_kib"] >= 2048  # malloc's memory on transparent huge pages


@glibc_only
def test_exec_with_host_tunables_opt_out(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(_RESTART)
    env = {k: v for k, v in os.environ.items() if k not in ("MEDJAX_HOST_TUNED", "GLIBC_TUNABLES")}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, check=True,
        env={**env, "MEDJAX_SYSTEM_MALLOC": "1"},
    ).stdout.strip().splitlines()  # fmt: skip
    assert sum(line.startswith("start") for line in out) == 1
    assert json.loads(out[-1])["mmapped"] >= 64 << 20
