"""Process-level XLA settings, applied before JAX starts its backend."""

from __future__ import annotations

import os

# Measured on 2-core x86 CPUs; both are exact (the same operations) and ignored off the CPU.
# * XLA's ynn fusion of individual convolutions slows the U-Net step (benchmarks/bench_layers.py).
# * Region-based copy insertion: the default analysis copied the parameters and Adam moments at
#   the start of every GAN step (97 state copies, 457 MB, in pix2pix 256^2; 52 in DCGAN) because
#   it could not order the moment update before its recomputation inside the parameter update;
#   with it none are left. pix2pix 2.28 / 2.08 -> 2.09 / 1.84 s per step, DCGAN 2.55 -> 2.45 s,
#   Vox2Vox 299 -> 290 ms, classifier 213 / 201 -> 191 / 177 ms, U-Net 2D unchanged (2-core
#   AMD EPYC, separate processes alternated, medians; BENCHMARKS.md).
CPU_FLAGS = (
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
    "--xla_cpu_copy_insertion_use_region_analysis=true",
)


def configure_xla(extra: tuple[str, ...] = CPU_FLAGS) -> None:
    """Adds `extra` XLA flags (unless the user already set that flag) to `XLA_FLAGS`.

    Must run before the first JAX computation; a no-op for flags already present.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow is only the input pipeline
    current = os.environ.get("XLA_FLAGS", "")
    have = {f.split("=")[0] for f in current.split()}
    add = [f for f in extra if f.split("=")[0] not in have]
    if add:
        os.environ["XLA_FLAGS"] = " ".join([current, *add]).strip()


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# The largest 64-bit size_t: a trim threshold that is never reached (mallopt's -1).
_NEVER_TRIM = (1 << 64) - 1
# The same settings as glibc tunables, read when a process starts, plus transparent huge pages
# for malloc's memory (glibc >= 2.35; older versions ignore the name).
HOST_TUNABLES = (
    "glibc.malloc.mmap_max=0",
    f"glibc.malloc.trim_threshold={_NEVER_TRIM}",
    "glibc.malloc.arena_max=1",
    "glibc.malloc.hugetlb=1",
)
_TUNED = "MEDJAX_HOST_TUNED"  # set in the restarted process


def _may_tune_malloc() -> bool:
    import platform

    return (
        os.environ.get("MEDJAX_SYSTEM_MALLOC", "0") != "1"
        and platform.system() == "Linux"
        and platform.libc_ver()[0] == "glibc"
    )


def configure_host_memory() -> bool:
    """Keeps every host allocation on glibc's heap, reused, instead of fresh ``mmap`` regions.

    XLA:CPU allocates each execution's buffers (a training step's temporaries: 0.3-2 GiB for
    the U-Net steps) anew on every call, on its own threads. By default glibc serves an
    allocation above its mmap threshold (128 KiB, rising to at most 32 MiB as such blocks are
    freed) with a fresh ``mmap``, and one above 64 MiB made by any thread but the main one
    always so (a thread's arena cannot hold it); it returns them with ``munmap`` when freed,
    and gives back the top of the heap once more than 128 KiB of it is free. So every step
    page-faults its buffers again, at a few GB/s. In a virtual machine whose balloon reports
    free pages to the host (free page reporting, as in Firecracker), the host reclaims memory
    freed for about two seconds, and faulting it back in costs far more: the U-Net 2D step
    after a 2 s pause took 1.0 s instead of 0.49 s, and every U-Net 3D step, 4-6 s long, paid
    it. The settings: no ``mmap`` (``M_MMAP_MAX = 0``), one arena for all threads
    (``M_ARENA_MAX = 1``, so large blocks from XLA's threads come from the heap too) and no
    trimming (``M_TRIM_THRESHOLD = -1``). Freed memory is then kept and reused, so a process
    holds its peak host memory until it exits, as a caching allocator does.

    Linux with glibc only (elsewhere, and with ``MEDJAX_SYSTEM_MALLOC=1``, nothing changes);
    process-wide, so a PyTorch step in the same process gets the same allocator. Returns
    whether the settings were applied. It is for a process that cannot restart (a notebook),
    and must come before JAX starts its threads (an arena a thread already has stays its
    own): the scripts restart instead, with the same settings as tunables plus transparent
    huge pages (:func:`exec_with_host_tunables`). Measured: ``BENCHMARKS.md``.
    """
    if not _may_tune_malloc():
        return False
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    settings = ((_M_MMAP_MAX, 0), (_M_ARENA_MAX, 1), (_M_TRIM_THRESHOLD, -1))
    return all([bool(mallopt(param, value)) for param, value in settings])  # every one applied


def host_tunables_applied() -> bool:
    """Whether this process was restarted by :func:`exec_with_host_tunables`."""
    return os.environ.get(_TUNED) == "1"


def exec_with_host_tunables() -> None:
    """Restarts the running program once, first thing, with glibc's malloc tunables set.

    The same interpreter, arguments (``sys.orig_argv``) and process id, with
    :data:`HOST_TUNABLES` added in front of ``GLIBC_TUNABLES`` (a user's own values there win):
    :func:`configure_host_memory`'s settings, plus ``glibc.malloc.hugetlb=1``, which lets the
    kernel back malloc's memory with transparent huge pages where THP is in ``madvise`` mode.
    glibc reads tunables only when a process starts, hence the restart, and tunables hold from
    the first thread on (the one arena included). The U-Net 2D step, 8 x 128^2: 643-695 ms with
    the heap alone, 516-589 ms with huge pages too (separate processes, alternated;
    ``BENCHMARKS.md``). The scripts' entry points call it; it returns without
    doing anything in the restarted process, with ``MEDJAX_SYSTEM_MALLOC=1``, or off
    Linux/glibc. Never call it from a process that must not be replaced (a notebook, a test
    runner): use :func:`configure_host_memory` there.
    """
    import sys

    if host_tunables_applied() or not _may_tune_malloc():
        return
    user = os.environ.get("GLIBC_TUNABLES", "")
    env = {**os.environ, _TUNED: "1", "GLIBC_TUNABLES": ":".join([*HOST_TUNABLES, user]).strip(":")}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def resident_bytes() -> int:
    """This process's resident memory in bytes (Linux: ``/proc/self/statm``), 0 elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class HeapGuard:
    """Gives the heap's free pages back when a process holds far more than its steps need.

    Call it after each finished training step on the CPU. With :func:`configure_host_memory`'s
    settings nothing freed is ever given back, which is the point, but XLA:CPU allocates a
    step's temporaries (one block: 2591 MiB for CycleGAN 256^2 at batch 1, 9150 MiB at batch 4)
    when the step is dispatched, and frees them on its own thread just after the step's
    outputs are ready. A step dispatched in that moment gets a second block; the first one's
    space, freed a moment later, is split by smaller allocations before the next step asks
    for it, and the heap grows by a block again. Dispatching each step as soon as the
    previous one was ready, CycleGAN 256^2 at batch 1 went from 3920 MiB resident to 11656
    MiB in 20 steps (at batch 4, 10723 -> 19601 MiB in 9 steps, on a 23 GiB machine;
    ``BENCHMARKS.md``).
    The training loop dispatches a step only after the previous one finished and the next
    batch was fetched, which leaves the moment to the freeing thread; this guard bounds what
    is left: the largest resident size over the first `settle_steps` calls is the process's
    working set, and whenever the resident size exceeds `slack` times it, ``malloc_trim(0)``
    returns every free page inside the heap to the system (the heap's layout stays; a page
    given back is faulted in again when it is next used). A process whose memory grows for
    other reasons (a dataset cached in memory) raises the bound to `slack` times what it holds
    after a trim, so it trims again only after a further growth of that size. Linux with glibc
    only; elsewhere, and with ``MEDJAX_SYSTEM_MALLOC=1``, it does nothing.
    """

    def __init__(self, settle_steps: int = 1, slack: float = 1.5):
        self.settle_steps, self.slack = settle_steps, slack
        self.calls = self.trims = 0
        self.working_set = 0
        self._trim = _libc_function("malloc_trim") if _may_tune_malloc() else None

    @property
    def bound(self) -> int:
        """The resident size above which it trims (bytes)."""
        return int(self.slack * self.working_set)

    def __call__(self) -> bool:
        """Checks the resident size; returns whether it gave free pages back."""
        if self._trim is None:
            return False
        self.calls += 1
        resident = resident_bytes()
        if self.calls <= self.settle_steps:
            self.working_set = max(self.working_set, resident)
            return False
        if resident <= self.bound:
            return False
        self._trim(0)
        self.trims += 1
        self.working_set = max(self.working_set, resident_bytes())
        return True


def _libc_function(name: str):
    """The C library's function `name` (by :mod:`ctypes`), or None where it has none."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return getattr(libc, name, None)


def scan(f, init, xs):
    """`jax.lax.scan(f, init, xs)`, unrolled when the default backend is the CPU.

    XLA:CPU runs the backward convolutions inside a rolled loop (a while loop) far below their
    usual speed: the gradients of a U-Net 2D over two micro-batches take 28.5 s in a
    `lax.scan` and 0.52 s unrolled, and a WGAN-GP step with its 5 critic updates 12.9 s against
    0.8 s (2-core Xeon, jaxlib 0.10.2; `BENCHMARKS.md`). Accelerators keep the rolled loop, whose
    memory is that of one iteration. Use it for the short loops of a training step (critic
    updates, gradient-accumulation micro-batches); the result is the same either way.
    """
    import jax

    return jax.lax.scan(f, init, xs, unroll=jax.default_backend() == "cpu")
