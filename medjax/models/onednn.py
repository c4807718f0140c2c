"""Convolutions on the CPU by oneDNN, called from inside XLA's program.

oneDNN (Intel's deep-learning kernel library, the one behind PyTorch's CPU convolutions) runs
3x3x3 convolutions about twice as fast as XLA:CPU's own on an AVX-512 CPU (forward, 2 x 64^3,
32 -> 32 channels: 83 against 181 ms for medjax's best XLA formulation; ``BENCHMARKS.md``).
This module calls its C API with :mod:`ctypes` from an XLA FFI handler (:func:`_execute`,
registered for the CPU platform), which receives XLA's own buffers, so nothing is copied and
the jitted step stays one XLA program. The same code runs unchanged where the library is
absent (GPUs, TPUs, other CPUs): :func:`applies` is then false and
:func:`medjax.models.layers.conv_nd` keeps its XLA formulations.

The library comes from PyPI (``pip install 'medjax[onednn]'``, part of ``medjax[train]``: the
``onednn-cpu-gomp`` wheel, oneDNN 3.2 built with GNU OpenMP). Its constants below are oneDNN
3.2's; another version is not loaded. ``MEDJAX_ONEDNN=0`` turns the route off.

XLA's calls run without Python where ``pip install`` could compile ``_onednn_ffi.c``
(``setup.py``; a C compiler and nothing else): Python builds each primitive, its memory objects
and packed arguments once and hands them to that library (:func:`_native`), whose FFI handler
then only sets the arrays' addresses, executes and waits: 2 us a call for a tiny convolution,
against 11 through the Python handler, whose own work took 80-190 us a call inside a step, on
its critical path. Steps in C: Vox2Vox 1.045x, the classifier 1.055x, DCGAN 1.03x as fast
(``BENCHMARKS.md``). Without the compiled library, or with
``MEDJAX_ONEDNN_NATIVE=0``, the same primitives run from :func:`_execute` through ctypes.

The convolution is bilinear, and its three oneDNN primitives (forward, backward data,
backward weights) are each other's transposes, so every one carries a VJP made of the other
two (:func:`conv`): gradients of gradients (a gradient penalty) work to any order. The
backward-weights primitive alone is :func:`conv_kernel_gradient` (the kernel gradient of a 1x1
convolution computed as a matrix product, ``medjax.models.layers.channel_matmul``).

A transposed convolution (:func:`conv_transpose`) is the backward-data primitive with the
kernel flipped and its channel axes swapped, so its kernel gradient is a backward-weights
result flipped and swapped back. The primitives read the kernel, and the weights primitive
writes that result, with the channel axes swapped by a strided memory descriptor, which leaves
XLA the spatial flips: a channel transpose by XLA copied the kernel column by column before
each call (pix2pix's 1 x 16^2, 1024 -> 256 layer, forward and both gradients: 29.5 against
32.8 ms) and was fused into each of the gradient's consumers, whose Adam updates of a 4 x 4 x
1024 x 512 kernel then read it column by column (31.6 against 5.3 ms).

A stride-1 convolution and its input gradient each have two exact forms: the forward
convolution is the backward-data primitive of the convolution that maps its output back onto
its input with the kernel flipped and its channel axes swapped, and the input gradient is that
convolution's forward primitive. oneDNN's kernels for the two differ by up to 3x (2 x 16^3,
256 -> 128: forward 113 ms, backward data 34 ms; 8 x 128^2, 32 -> 32: 5.5 against 7.6 ms the
other way round), so the first trace of each shape times both on scratch arrays and keeps the
faster, as cuDNN's benchmark mode does (:func:`_prefers_other`), and each primitive likewise
runs on the arrays' channels-last layouts or on oneDNN's own (:meth:`_OneDNN.plan`; the
backward-weights kernels take channels-last activations with the kernel in oneDNN's layout,
which spares reordering the two large arrays: 97 -> 78 ms at 2 x 64^3, 32 -> 32). The
choices are kept in a file per machine (:class:`_Choices`, ``MEDJAX_ONEDNN_CACHE``), so every
process makes the same ones and a resumed run stays bit for bit the uninterrupted one.
``MEDJAX_ONEDNN_AUTOTUNE=0`` times nothing: each primitive in its own form and layouts.

bfloat16 arrays (both operands) run as oneDNN's bfloat16 primitives, which accumulate in
float32 and round the result once, where this CPU has kernels for them
(:func:`bfloat16_kernels`). With Intel's AMX tiles (Sapphire Rapids and later) they are 4-10x
faster than the float32 ones (forward 8 x 128^2, 32 -> 32: 1.05 against 7.45 ms; 2 x 64^3:
9.6 against 84 ms), while XLA:CPU's own bfloat16 convolutions are no faster than its float32.
With AVX-512 BF16 and no AMX (AMD's Zen 4) the steps still run 1.1-2.0x faster than in
float32 (``BENCHMARKS.md``).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import importlib.metadata
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from medjax import ffi

Array = jax.Array

__all__ = [
    "applies",
    "available",
    "bfloat16_kernels",
    "conv",
    "conv_kernel_gradient",
    "enabled",
    "im2col_patches",
    "implementation",
]

_DISTRIBUTION = "onednn-cpu-gomp"
_VERSION = (3, 2)

# oneDNN 3.2's constants (dnnl_types.h, dnnl_common_types.h).
_DATA_TYPES = {"float32": 3, "bfloat16": 2}  # dnnl_data_type_t
_FILL = {"float32": (np.float32, 0.5), "bfloat16": (np.uint16, 0x3F00)}  # 0.5, bit for bit
_TAG_ANY = 1
_TAGS = {1: (15, 19), 2: (22, 28), 3: (33, 38)}  # spatial dims -> (nwc/nhwc/ndhwc, wio/hwio/dhwio)
_CPU = 1
_STREAM_IN_ORDER = 1
_FORWARD_TRAINING = 64
_CONVOLUTION_DIRECT = 1
_SCRATCHPAD_USER = 1
_QUERY_IMPL_INFO = 8
_QUERY_SCRATCHPAD = 136
# The weights primitive writing the kernel gradient with its channel axes swapped, [*k, Cout,
# Cin] (the gradient of a transposed convolution's kernel, :func:`conv_transpose`), and the
# forward and data primitives reading their kernel that way (a transposed convolution's kernel,
# flipped in space only): oneDNN's reorder of the kernel into its own layout reads the swapped
# strides, where XLA would write a channel-transposed copy first.
_SWAPPED = "weights_swapped"
_FORWARD_SWAPPED = "forward_swapped"
_DATA_SWAPPED = "data_swapped"
_KERNEL_SWAPPED = (_SWAPPED, _FORWARD_SWAPPED, _DATA_SWAPPED)
_QUERY = {  # (input/diff_input, weights/diff_weights, output/diff_output) memory descriptors
    "forward": (129, 131, 133),
    "data": (130, 131, 134),
    "weights": (129, 132, 134),
    _SWAPPED: (129, 132, 134),
    _FORWARD_SWAPPED: (129, 131, 133),
    _DATA_SWAPPED: (130, 131, 134),
}
_ARG = {  # execution arguments, same order
    "forward": (1, 33, 17),
    "data": (129, 33, 145),
    "weights": (1, 161, 145),
    _SWAPPED: (1, 161, 145),
    _FORWARD_SWAPPED: (1, 33, 17),
    _DATA_SWAPPED: (129, 33, 145),
}
_ARG_SCRATCHPAD = 80
_ARG_FROM, _ARG_TO = 1, 17
# which of the three each primitive writes, and what its two inputs are
_OUTPUT = {
    "forward": 2,
    "data": 0,
    "weights": 1,
    _SWAPPED: 1,
    _FORWARD_SWAPPED: 2,
    _DATA_SWAPPED: 0,
}
_INPUTS = {
    "forward": (0, 1),
    "data": (2, 1),
    "weights": (0, 2),
    _SWAPPED: (0, 2),
    _FORWARD_SWAPPED: (0, 1),
    _DATA_SWAPPED: (2, 1),
}

_H = ctypes.c_void_p
_Dims = ctypes.c_int64 * 12


class _ExecArg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_int), ("memory", _H)]


class _Version(ctypes.Structure):
    _fields_ = [
        ("major", ctypes.c_int),
        ("minor", ctypes.c_int),
        ("patch", ctypes.c_int),
        ("hash", ctypes.c_char_p),
        ("cpu_runtime", ctypes.c_uint),
        ("gpu_runtime", ctypes.c_uint),
    ]


def _library_path() -> Path | None:
    try:
        files = importlib.metadata.distribution(_DISTRIBUTION).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == "libdnnl.so.3":
            return Path(f.locate())
    return None


_NATIVE_LIBRARY = "_onednn_ffi"
_NATIVE_ABI = 1  # MEDJAX_ONEDNN_ABI in _onednn_ffi.c
# oneDNN's functions that the C library calls, in medjax_onednn_init's order
_NATIVE_CALLS = (
    "dnnl_memory_set_data_handle",
    "dnnl_primitive_execute",
    "dnnl_stream_wait",
    "dnnl_stream_create",
)


@functools.cache
def _native() -> ctypes.CDLL | None:
    """The compiled fast path (``_onednn_ffi.c``, built by ``setup.py`` where a C compiler
    exists): XLA's calls run their primitives from C, without Python or its lock. None where it
    was not built or ``MEDJAX_ONEDNN_NATIVE=0``; the primitives then run from Python."""
    if os.environ.get("MEDJAX_ONEDNN_NATIVE", "1") == "0":
        return None
    here = Path(__file__).parent
    for path in sorted(here.glob(f"{_NATIVE_LIBRARY}*.so")):
        try:
            lib = ctypes.CDLL(str(path))
            if lib.medjax_onednn_abi() != _NATIVE_ABI:  # built from another version: rebuild
                continue
        except (OSError, AttributeError):
            continue
        lib.medjax_onednn_add.restype = _H
        lib.medjax_onednn_add.argtypes = [_H, ctypes.c_int, _H, _H, ctypes.c_size_t, ctypes.c_int,
                                          _H, _H, _H]  # fmt: skip
        lib.medjax_onednn_bind.argtypes = [ctypes.c_int64, _H, ctypes.c_int, ctypes.c_int,
                                           ctypes.c_int]  # fmt: skip
        lib.medjax_onednn_run.argtypes = [_H, _H]
        lib.medjax_onednn_init.argtypes = [_H, ctypes.c_uint, _H, _H, _H, _H, _H]
        lib.medjax_onednn_skip.argtypes = [ctypes.c_int]
        lib.medjax_onednn_record.argtypes = [_H, ctypes.c_int64]
        lib.medjax_onednn_record.restype = ctypes.c_int64
        lib.medjax_onednn_scratch.argtypes = [ctypes.c_size_t, _H, _H]
        lib.medjax_onednn_scratch.restype = _H
        lib.medjax_onednn_plan_generation.argtypes = [_H]
        lib.medjax_onednn_plan_generation.restype = ctypes.c_uint64
        return lib
    return None


class _NativeCall(ctypes.Structure):  # Call in _onednn_ffi.c: benchmarks/breakdown.py's record
    _fields_ = [
        ("plan", _H),
        ("thread", ctypes.c_uint64),
        ("called", ctypes.c_double),
        ("began", ctypes.c_double),
        ("ended", ctypes.c_double),
    ]


class _NativeLock:
    """The C library's lock, held as ``with``: one primitive at a time, whether XLA's call
    runs it from C or Python runs it (timing, the first call)."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib

    def __enter__(self) -> None:
        self.lib.medjax_onednn_lock()  # ctypes releases the GIL while it waits

    def __exit__(self, *exc) -> None:
        self.lib.medjax_onednn_unlock()


class _OneDNN:
    """The loaded library, its CPU engine, one stream per thread and the cached primitives."""

    def __init__(self, lib: ctypes.CDLL, native: ctypes.CDLL | None):
        self.lib = lib
        lib.dnnl_primitive_desc_query_md.restype = _H
        lib.dnnl_memory_desc_get_size.restype = ctypes.c_size_t
        lib.dnnl_memory_desc_equal.restype = ctypes.c_int
        self.engine = _H()
        self._check(lib.dnnl_engine_create(ctypes.byref(self.engine), _CPU, 0), "engine")
        self._local = threading.local()
        self._lock = threading.Lock()
        self.native = native  # :func:`_native`
        self.handed: list[_Plan] = []  # the plans given to the C library
        # XLA's calls (traced from now on) and every run go through the Python handler and
        # ctypes even where the C library is built: for comparisons and tests
        self.from_python = False
        # one primitive at a time: each uses every core
        self._running = threading.Lock() if self.native is None else _NativeLock(self.native)
        if self.native is not None:
            address = ctypes.cast
            self.native.medjax_onednn_init(
                self.engine, _STREAM_IN_ORDER,
                *(address(getattr(lib, f), _H) for f in _NATIVE_CALLS),
                address(_HANDLER, _H),
            )  # fmt: skip
        # the reorders' and scratchpads' memory, shared by every plan (they take turns)
        self._scratch: np.ndarray | None = None
        self._scratch_address, self._scratch_size, self._scratch_generation = 0, 0, 0
        self._plans: dict[tuple, _Plan] = {}
        self._ids: dict[tuple, int] = {}
        self._keys: list[tuple] = []
        self._saved = _Choices(_choices_path())

    @property
    def in_c(self) -> bool:
        """Whether XLA's calls and every run go through the C library: built, loaded and not
        ``from_python``."""
        return self.native is not None and not self.from_python

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"oneDNN: {what} failed (dnnl_status_t {status})")

    def stream(self) -> _H:
        s = getattr(self._local, "stream", None)
        if s is None:
            s = _H()
            self._check(
                self.lib.dnnl_stream_create(ctypes.byref(s), self.engine, _STREAM_IN_ORDER),
                "stream",
            )
            self._local.stream = s
        return s

    def memory_desc(self, dims: Sequence[int], tag: int, dtype: str) -> _H:
        md = _H()
        self._check(
            self.lib.dnnl_memory_desc_create_with_tag(
                ctypes.byref(md), len(dims), _dims(dims), _DATA_TYPES[dtype], tag
            ),
            f"memory descriptor {tuple(dims)}",
        )
        return md

    def memory_desc_strided(self, dims: Sequence[int], strides: Sequence[int], dtype: str) -> _H:
        md = _H()
        self._check(
            self.lib.dnnl_memory_desc_create_with_strides(
                ctypes.byref(md), len(dims), _dims(dims), _DATA_TYPES[dtype], _dims(strides)
            ),
            f"memory descriptor {tuple(dims)} with strides {tuple(strides)}",
        )
        return md

    def memory(self, md: _H, address: int) -> _H:
        """oneDNN's view of the array at ``address`` (not a copy)."""
        mem = _H()
        self._check(
            self.lib.dnnl_memory_create(ctypes.byref(mem), md, self.engine, _H(address)), "memory"
        )
        return mem

    def primitive(self, pd: _H) -> _H:
        p = _H()
        self._check(self.lib.dnnl_primitive_create(ctypes.byref(p), pd), "primitive")
        return p

    def reorder(self, src: _H, dst: _H) -> _H:
        pd = _H()
        self._check(
            self.lib.dnnl_reorder_primitive_desc_create(
                ctypes.byref(pd), src, self.engine, dst, self.engine, None
            ),
            "reorder",
        )
        return self.primitive(pd)

    def scratch(self, size: int) -> tuple[int, int, int]:
        """The page-aligned address of at least ``size`` bytes of scratch memory, its
        generation, which changes when a larger call makes it move, and its size. One buffer
        serves every plan's reorders and scratchpad: the primitives run one at a time
        (``_running``, held by the caller). The C library's where it is built."""
        if self.native is not None:  # also when running from Python: one buffer, one count
            n, generation = ctypes.c_size_t(), ctypes.c_uint64()
            address = self.native.medjax_onednn_scratch(
                size, ctypes.byref(n), ctypes.byref(generation)
            )
            if not address:
                raise MemoryError(f"oneDNN's scratch memory: {size} bytes")
            return address, generation.value, n.value
        if size > self._scratch_size:
            keep: list = []
            self._scratch_address = _aligned(size, keep)
            self._scratch, self._scratch_size = keep[0], size
            self._scratch_generation += 1
        return self._scratch_address, self._scratch_generation, self._scratch_size

    def plan(self, key: tuple) -> _Plan:
        """The primitive for ``key`` = (kind, input, kernel and output shapes, strides, pads),
        built on first use: on the arrays' channels-last layouts (where oneDNN has no fast
        kernel for those, with the kernel alone in its own layout: :class:`_Plan`), or on the
        layouts oneDNN chooses for all three (with reorders) where that ran clearly faster
        (:func:`_autotune`; strided forward convolutions with many channels, e.g. 1 x 32^2,
        256 -> 512, k4 s2: 5.7 against 3.2 ms)."""
        with self._lock:
            plan = self._plans.get(key)
        if plan is None:
            plan = _Plan(self, *key)
            if _autotune():
                built: list[_Plan] = []  # oneDNN's layouts, built only to be timed or run

                def measure() -> bool:
                    built.append(_Plan(self, *key, layouts="any"))
                    return built[0].reordered != plan.reordered and _faster(plan, built[0])

                if self._saved.get("layouts", key, measure):
                    plan = built[0] if built else _Plan(self, *key, layouts="any")
            with self._lock:
                plan = self._plans.setdefault(key, plan)
        return plan

    def plan_id(self, key: tuple) -> int:
        """A number for ``key``, the attribute that an XLA call passes to :func:`_execute`."""
        with self._lock:
            if key not in self._ids:
                self._ids[key] = len(self._keys)
                self._keys.append(key)
            return self._ids[key]

    def key(self, plan_id: int) -> tuple:
        with self._lock:
            return self._keys[plan_id]

    def run(self, plan_id: int, pointers: Sequence[int]) -> None:
        """Runs a primitive for XLA. XLA's threads may call two at once, and each call starts
        an OpenMP team as large as the machine; two teams oversubscribe the cores, and
        oneDNN's bfloat16 kernels then slowed down 17x (WGAN-GP's critic, 64 x 8^2, 256 ->
        512, k4 s2, weights: 520 against 30 ms; its step 3670 against 1763 ms), so the
        calls take turns. (float32 steps were the same either way.)"""
        plan = self.plan(self.key(plan_id))
        with self._running:
            plan.run(pointers)

    def hand_over(self, plan_id: int) -> None:
        """XLA's calls for ``plan_id`` run from C from now on, where :func:`_native` is built."""
        if self.native is None:
            return
        key = self.key(plan_id)
        plan = self.plan(key)
        if plan._steps is None:
            plan._bind()
        (a, b), out = _INPUTS[key[0]], _OUTPUT[key[0]]
        if self.native.medjax_onednn_bind(plan_id, plan.handle, a, b, out) != 0:
            raise MemoryError(f"oneDNN: no memory to hand plan {plan_id} over to C")

    def prefers(self, key: tuple, other: tuple) -> bool:
        """Whether the primitive for ``other`` (the same convolution's other exact form), with
        the kernel's flip (:func:`_time_flip`), ran clearly faster than ``key``'s: timed once
        per ``key`` on this machine (:func:`_time_plans`), then kept (:class:`_Choices`)."""

        def measure() -> bool:
            return _faster(self.plan(key), self.plan(other), _time_flip(key[2], key[6]))

        return self._saved.get("forms", key, measure)


def _dims(values: Sequence[int]) -> _Dims:
    d = _Dims()
    for i, v in enumerate(values):
        d[i] = int(v)
    return d


_ALIGN = 4096


def _page_up(n: int) -> int:
    """``n`` rounded up to a whole number of pages (``_ALIGN`` bytes)."""
    return -(-n // _ALIGN) * _ALIGN


def _aligned(size: int, keep: list) -> int:
    """The address of ``size`` new bytes aligned to a page (oneDNN's blocked layouts and
    scratchpads expect aligned memory; numpy's heap gives 16 bytes); ``keep`` holds them."""
    buffer = np.empty(size + _ALIGN, np.uint8)
    keep.append(buffer)
    return _page_up(buffer.ctypes.data)


# How plans are built (:class:`_Plan`): 2 since the backward kernels take channels-last
# activations with the kernel alone in oneDNN's layout; 3 since keys name the dtype.
_PLANS = 3
_AUTOTUNE_ROUNDS = 3
_AUTOTUNE_MARGIN = 0.9  # an alternative (form, layouts) is kept only when >= 10 % faster


def _faster(own: _Plan, other: _Plan, extra: float = 0.0) -> bool:
    """Whether ``other`` (plus ``extra`` seconds) ran at least 10 % faster than ``own``."""
    t_own, t_other = _time_plans([own, other])
    return t_other + extra < _AUTOTUNE_MARGIN * t_own


def _choices_path() -> Path | None:
    """Where the timed choices are kept between processes: ``MEDJAX_ONEDNN_CACHE`` (a file;
    empty: nowhere), by default ``~/.cache/medjax/onednn-<version>-p<plans>-<cpu>-<cores>.json``
    (per CPU model and core count, so a home directory shared by different machines keeps each
    one's; per :data:`_PLANS`, so choices timed against plans built another way are not
    reused)."""
    value = os.environ.get("MEDJAX_ONEDNN_CACHE")
    if value is not None:
        return Path(value) if value else None
    cpu = "cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1]
                break
    slug = "-".join("".join(c if c.isalnum() else " " for c in cpu).split()).lower()
    try:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except RuntimeError:  # no home directory: choices stay per process
        return None
    version = ".".join(map(str, _VERSION))
    return base / "medjax" / f"onednn-{version}-p{_PLANS}-{slug}-{os.cpu_count()}.json"


class _Choices:
    """The timed choices (``forms``: a convolution as its other exact form; ``layouts``: a
    primitive on oneDNN's own layouts), kept in a JSON file so that every process on this
    machine makes the same ones: a run resumed from a checkpoint then computes bit for bit what
    the uninterrupted run would have (timings alone differ from process to process)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.lock = threading.Lock()
        self.known: dict[str, dict[str, bool]] = {"forms": {}, "layouts": {}}
        self._merge(self._read())

    def _read(self) -> dict:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):  # absent, unreadable or torn: time again
            return {}
        return data if isinstance(data, dict) else {}

    def _merge(self, data: dict) -> None:
        for kind, table in self.known.items():
            entries = data.get(kind)
            if isinstance(entries, dict):
                table.update({k: v for k, v in entries.items() if isinstance(v, bool)})

    def get(self, kind: str, key: tuple, measure: Callable[[], bool]) -> bool:
        """The kept choice for ``key``, or ``measure()``'s, then kept (the file is re-read and
        replaced atomically, so concurrent processes lose nothing but a timing)."""
        name = repr(key)
        with self.lock:
            if name in self.known[kind]:
                return self.known[kind][name]
        choice = bool(measure())
        with self.lock:
            self._merge(self._read())
            choice = self.known[kind].setdefault(name, choice)
            if self.path is not None:
                with contextlib.suppress(OSError):  # a read-only home: choices stay per process
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
                    tmp.write_text(json.dumps(self.known, indent=0, sort_keys=True))
                    os.replace(tmp, self.path)
        return choice


def _autotune() -> bool:
    """Whether primitives are chosen by timing them (``MEDJAX_ONEDNN_AUTOTUNE=0``: never)."""
    return os.environ.get("MEDJAX_ONEDNN_AUTOTUNE", "1") != "0"


def _time_plans(plans: Sequence[_Plan], rounds: int = _AUTOTUNE_ROUNDS) -> list[float]:
    """Each plan's fastest time (seconds) of ``rounds`` runs, the plans interleaved, after one
    untimed run each, on page-aligned scratch arrays of its shapes (filled with 0.5: no
    denormals, no NaNs)."""
    keep: list = []
    pointers = []
    for plan in plans:
        addresses = []
        kind, half = _FILL[plan.dtype]
        for shape in plan.shapes:
            n = int(np.prod(shape)) * np.dtype(kind).itemsize
            address = _aligned(n, keep)
            start = address - keep[-1].ctypes.data
            keep[-1][start : start + n].view(kind)[:] = half
            addresses.append(address)
        pointers.append(addresses)
        with plan.dnn._running:
            plan.run(addresses)
    best = [float("inf")] * len(plans)
    for _ in range(rounds):
        for i, plan in enumerate(plans):
            with plan.dnn._running:  # never beside a step's primitives
                t = time.perf_counter()
                plan.run(pointers[i])
                best[i] = min(best[i], time.perf_counter() - t)
    return best


def _time_flip(
    kernel_shape: Sequence[int], dtype: str = "float32", rounds: int = _AUTOTUNE_ROUNDS
) -> float:
    """The fastest of ``rounds`` copies (seconds) of a ``dtype`` kernel of this shape into its
    :func:`_flip`'s layout: what the other form adds to every use (a kernel of 4 x 4 x 256 x 512
    read at batch 1, 32^2, takes about as long to rearrange as to apply)."""
    kind, half = _FILL[dtype]
    k = np.full(tuple(kernel_shape), half, kind)
    flipped = np.swapaxes(np.flip(k, tuple(range(k.ndim - 2))), -1, -2)
    out = np.empty(flipped.shape, kind)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        np.copyto(out, flipped)
        best = min(best, time.perf_counter() - t)
    return best


def _generic(implementation: str) -> bool:
    """Whether oneDNN's implementation name is its GEMM or reference one (no direct kernel)."""
    return any(s in implementation for s in ("gemm", "ref"))


def _activation_dims(shape: Sequence[int]) -> tuple[int, ...]:
    return (shape[0], shape[-1], *shape[1:-1])  # [B, *S, C] -> oneDNN's (N, C, *S)


def _weight_dims(shape: Sequence[int]) -> tuple[int, ...]:
    return (shape[-1], shape[-2], *shape[:-2])  # [*k, Cin, Cout] -> oneDNN's (O, I, *k)


class _Plan:
    """One primitive (``kind`` of ``forward``, ``data``, ``weights``) for one geometry, with
    reorders between the arrays' plain channels-last layouts and the layouts it computes in.

    It first asks for the plain layouts. Where oneDNN then has only a GEMM or reference
    implementation (its backward passes on channels-last arrays), it asks again with the
    kernel in oneDNN's own layout and the two activations channels-last, then with all three
    in oneDNN's layouts (blocked ``nCdhw16c`` and the like), adding the reorders: 2 x 64^3,
    32 -> 32, backward weights 180 ms on channels-last arrays (GEMM), 97 ms on oneDNN's
    layouts (14 ms of it reordering the activations), 78 ms with only the kernel's layout
    oneDNN's. ``layouts="any"`` builds the last directly (:meth:`_OneDNN.plan` times the two)."""

    def __init__(
        self,
        dnn: _OneDNN,
        kind,
        in_shape,
        kernel_shape,
        out_shape,
        strides,
        pads,
        dtype,
        layouts="plain",
    ):
        self.dnn, self.kind, self.dtype = dnn, kind, dtype
        d = len(strides)
        act, wgt = _TAGS[d]
        dims = (_activation_dims(in_shape), _weight_dims(kernel_shape), _activation_dims(out_shape))
        tags = (act, wgt, act)
        self.user = [dnn.memory_desc(v, t, dtype) for v, t in zip(dims, tags, strict=True)]
        if kind in _KERNEL_SWAPPED:  # (O, I, *k) laid out as [*k, O, I]
            *ks, cin, cout = kernel_shape
            steps = [cin, 1] + [int(np.prod(ks[i + 1 :])) * cin * cout for i in range(d)]
            self.user[1] = dnn.memory_desc_strided(dims[1], steps, dtype)
        self.shapes = (tuple(in_shape), tuple(kernel_shape), tuple(out_shape))
        geometry = (
            _dims(strides),
            _dims([0] * d),
            _dims([p[0] for p in pads]),
            _dims([p[1] for p in pads]),
        )
        attr = _H()
        dnn._check(dnn.lib.dnnl_primitive_attr_create(ctypes.byref(attr)), "attributes")
        dnn._check(dnn.lib.dnnl_primitive_attr_set_scratchpad_mode(attr, _SCRATCHPAD_USER), "attr")
        self._keep = [attr]
        pd = None if layouts == "any" else self._descriptor(self.user, geometry, attr)
        if pd is not None and _generic(self.info(pd)):
            kernel_own = [self.user[0], dnn.memory_desc(dims[1], _TAG_ANY, dtype), self.user[2]]
            with contextlib.suppress(RuntimeError):  # none: all three in oneDNN's layouts next
                pd = self._descriptor(kernel_own, geometry, attr)
        if pd is None or _generic(self.info(pd)):
            any_mds = [dnn.memory_desc(v, _TAG_ANY, dtype) for v in dims]
            pd = self._descriptor(any_mds, geometry, attr)
        self.pd = pd
        self.info_str = self.info(pd)
        self.actual = [_H(dnn.lib.dnnl_primitive_desc_query_md(pd, q, 0)) for q in _QUERY[kind]]
        self.sizes = [dnn.lib.dnnl_memory_desc_get_size(m) for m in self.actual]
        self.reorders: list[_H | None] = []
        for i, (user, actual) in enumerate(zip(self.user, self.actual, strict=True)):
            if dnn.lib.dnnl_memory_desc_equal(user, actual):
                self.reorders.append(None)
            elif i == _OUTPUT[kind]:
                self.reorders.append(dnn.reorder(actual, user))
            else:
                self.reorders.append(dnn.reorder(user, actual))
        scratch = dnn.lib.dnnl_primitive_desc_query_md(pd, _QUERY_SCRATCHPAD, 0)
        self.scratch_md = _H(scratch) if scratch else None
        self.scratch_size = dnn.lib.dnnl_memory_desc_get_size(self.scratch_md) if scratch else 0
        self.primitive = dnn.primitive(pd)
        self._steps: list | None = None  # built at the first run (:meth:`_bind`)
        self.handle: int | None = None  # in the C library (:func:`_native`), once built

    @property
    def reordered(self) -> tuple[bool, bool, bool]:
        """Which of (input, kernel, output) it computes on in oneDNN's own layouts."""
        return tuple(r is not None for r in self.reorders)

    def info(self, pd: _H) -> str:
        s = ctypes.c_char_p()
        self.dnn.lib.dnnl_primitive_desc_query(pd, _QUERY_IMPL_INFO, 0, ctypes.byref(s))
        return (s.value or b"").decode()

    def _descriptor(self, mds, geometry, attr) -> _H:
        dnn, lib = self.dnn, self.dnn.lib
        fwd = _H()
        dnn._check(
            lib.dnnl_convolution_forward_primitive_desc_create(
                ctypes.byref(fwd), dnn.engine, _FORWARD_TRAINING, _CONVOLUTION_DIRECT,
                mds[0], mds[1], None, mds[2], *geometry, attr,
            ),
            f"convolution {self.shapes}",
        )  # fmt: skip
        self._keep.append(fwd)
        if self.kind in ("forward", _FORWARD_SWAPPED):
            return fwd
        pd = _H()
        if self.kind in ("data", _DATA_SWAPPED):
            status = lib.dnnl_convolution_backward_data_primitive_desc_create(
                ctypes.byref(pd), dnn.engine, _CONVOLUTION_DIRECT,
                mds[0], mds[1], mds[2], *geometry, fwd, attr,
            )  # fmt: skip
        else:
            status = lib.dnnl_convolution_backward_weights_primitive_desc_create(
                ctypes.byref(pd), dnn.engine, _CONVOLUTION_DIRECT,
                mds[0], mds[1], None, mds[2], *geometry, fwd, attr,
            )  # fmt: skip
        dnn._check(status, f"convolution {self.kind} {self.shapes}")
        self._keep.append(pd)
        return pd

    def _bind(self) -> None:
        """Builds what every call reuses: oneDNN's memory objects for the three arrays (their
        addresses set per call), for the reorders' inner arrays and the scratchpad (at fixed
        offsets into :meth:`_OneDNN.scratch`), and each execution's packed arguments. Built
        per call, they cost about half of the handler's Python time, and the Python inside a
        step runs several times slower than alone (Vox2Vox's 39 calls a step: 110 against 14
        us a call, ``BENCHMARKS.md``)."""
        dnn, kind = self.dnn, self.kind
        self._users = [dnn.memory(md, 0) for md in self.user]
        self._inner: list[tuple[_H, int]] = []  # (memory, offset into the scratch memory)
        offset = 0

        def inner(md: _H, size: int) -> _H:
            nonlocal offset
            memory = dnn.memory(md, 0)
            self._inner.append((memory, offset))
            offset += _page_up(size)
            return memory

        args, before, after = [], [], []
        for i, user in enumerate(self._users):
            reorder = self.reorders[i]
            if reorder is None:
                args.append((_ARG[kind][i], user))
                continue
            own = inner(self.actual[i], self.sizes[i])
            args.append((_ARG[kind][i], own))
            if i == _OUTPUT[kind]:
                after.append((reorder, [(_ARG_FROM, own), (_ARG_TO, user)]))
            else:
                before.append((reorder, [(_ARG_FROM, user), (_ARG_TO, own)]))
        if self.scratch_md is not None:
            args.append((_ARG_SCRATCHPAD, inner(self.scratch_md, self.scratch_size)))
        self._scratch_need, self._generation = offset, -1
        self._steps = [
            (primitive, len(a), (_ExecArg * len(a))(*(_ExecArg(k, m) for k, m in a)))
            for primitive, a in (*before, (self.primitive, args), *after)
        ]
        native = dnn.native
        if native is not None:  # the same objects, run from C from now on
            n, steps = len(self._inner), len(self._steps)
            self.handle = native.medjax_onednn_add(
                (_H * 3)(*self._users), n,
                (_H * n)(*(m for m, _ in self._inner)),
                (ctypes.c_size_t * n)(*(o for _, o in self._inner)),
                offset, steps,
                (_H * steps)(*(p for p, _, _ in self._steps)),
                (ctypes.c_int * steps)(*(k for _, k, _ in self._steps)),
                (_H * steps)(*(ctypes.cast(a, _H) for _, _, a in self._steps)),
            )  # fmt: skip
            if not self.handle:
                raise RuntimeError(f"oneDNN: could not hand {self.kind} {self.shapes} to C")
            dnn.handed.append(self)  # C points at its objects: they live as long as the process

    def generation(self) -> int:
        """The generation of the scratch memory (:meth:`_OneDNN.scratch`) that its reorders'
        arrays and scratchpad point into."""
        if self.dnn.in_c and self.handle:
            return self.dnn.native.medjax_onednn_plan_generation(self.handle)
        return self._generation

    def run(self, pointers: Sequence[int]) -> None:
        """Runs the primitive on XLA's buffers: ``pointers`` to the (input, kernel, output)
        arrays of the convolution, whichever of them this primitive reads or writes. The
        caller holds ``_OneDNN._running``."""
        dnn, lib = self.dnn, self.dnn.lib
        if self._steps is None:
            self._bind()
        if dnn.in_c:
            status = dnn.native.medjax_onednn_run(self.handle, (_H * 3)(*pointers))
            dnn._check(status, f"convolution {self.kind} {self.shapes}")
            return
        if self._scratch_need:
            base, generation, _ = dnn.scratch(self._scratch_need)
            if generation != self._generation:
                for memory, offset in self._inner:
                    dnn._check(lib.dnnl_memory_set_data_handle(memory, _H(base + offset)), "memory")
                self._generation = generation
        for memory, address in zip(self._users, pointers, strict=True):
            dnn._check(lib.dnnl_memory_set_data_handle(memory, _H(address)), "memory")
        stream = dnn.stream()
        for primitive, n, packed in self._steps:
            dnn._check(lib.dnnl_primitive_execute(primitive, stream, n, packed), "execute")
        dnn._check(lib.dnnl_stream_wait(stream), "stream wait")


# --------------------------------------------------------------------------------------
# The XLA FFI handler (:mod:`medjax.ffi`): XLA passes its buffers' addresses, so nothing is
# copied on the way in or out.
# --------------------------------------------------------------------------------------

_TARGET = "medjax_onednn_convolution"  # the C handler (:func:`_native`)
_TARGET_PYTHON = "medjax_onednn_convolution_python"


def _execute(frame: ffi.CallFrame) -> None:
    """Runs one oneDNN primitive for XLA: the call's attribute ``plan`` names it
    (:meth:`_OneDNN.plan_id`), its two operands and one result are the convolution's arrays."""
    plan_id = ctypes.c_int64.from_address(ffi.Scalar.from_address(frame.attrs.attrs[0]).value)
    operands = [ffi.Buffer.from_address(frame.args.items[i]).data for i in range(2)]
    result = ffi.Buffer.from_address(frame.rets.items[0]).data
    dnn = _load()
    assert dnn is not None
    kind = dnn.key(plan_id.value)[0]
    pointers: list[int] = [0, 0, 0]
    for i, p in zip(_INPUTS[kind], operands, strict=True):
        pointers[i] = p
    pointers[_OUTPUT[kind]] = result
    dnn.run(plan_id.value, pointers)


# Errors go back to XLA with the Python exception's message, never lost.
_HANDLER = ffi.handler(_execute, "medjax.models.onednn")


@functools.cache
def _load() -> _OneDNN | None:
    if os.environ.get("MEDJAX_ONEDNN", "1") == "0":
        return None
    path = _library_path()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:  # e.g. no libgomp.so.1 on this system
        return None
    lib.dnnl_version.restype = ctypes.POINTER(_Version)
    v = lib.dnnl_version().contents
    if (v.major, v.minor) != _VERSION:
        return None
    native = _native()
    if native is not None:
        handler = jax.ffi.pycapsule(native.medjax_onednn_handler)
        jax.ffi.register_ffi_target(_TARGET, handler, platform="cpu")
    jax.ffi.register_ffi_target(_TARGET_PYTHON, jax.ffi.pycapsule(_HANDLER), platform="cpu")
    return _OneDNN(lib, native)


_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("medjax_onednn", default=True)


@contextlib.contextmanager
def enabled(on: bool) -> Iterator[None]:
    """Inside ``with enabled(False):``, convolutions traced there keep XLA's formulations (the
    benchmark suite counts FLOPs that way: XLA's cost analysis does not see into a host
    callback). A function is traced once per jit object, so switch before its first call."""
    token = _ENABLED.set(on)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def available() -> bool:
    """Whether the oneDNN library is installed, loadable and not switched off."""
    return _load() is not None


def applies(x: Array, kernel: Array, strides: Sequence[int], pads: Sequence[tuple[int, int]]):
    """Whether :func:`conv` can take this convolution: oneDNN is :func:`available` and
    :func:`enabled`, the default backend is the CPU with one device (the handler does not
    partition: under a multi-device mesh XLA would gather the batch onto one device), both
    arrays float32 or both bfloat16 (where this CPU has oneDNN kernels for it:
    :func:`bfloat16_kernels`), 1-3 spatial dims and non-negative padding."""
    return (
        _ENABLED.get()
        and x.dtype == kernel.dtype
        and x.dtype.name in _DATA_TYPES
        and 1 <= x.ndim - 2 <= 3
        and all(p >= 0 for pp in pads for p in pp)
        and jax.default_backend() == "cpu"
        and jax.device_count() == 1
        and available()
        and (x.dtype != jnp.bfloat16 or bfloat16_kernels() is not None)
    )


@functools.cache
def bfloat16_kernels() -> str | None:
    """The ISA of oneDNN's bfloat16 convolution kernels on this CPU (``avx512_core_amx``:
    Intel's AMX tiles, Sapphire Rapids and later; ``avx512_core_bf16``), or None where it has
    only reference code for them (then :func:`applies` leaves bfloat16 to XLA)."""
    dnn = _load()
    if dnn is None:
        return None
    geometry = _geometry((1, 8, 8, 16), (3, 3, 16, 16), (1, 1), [(1, 1)] * 2, "bfloat16")
    try:
        name = _Plan(dnn, *_key("forward", geometry)).info_str
    except RuntimeError:  # no implementation at all
        return None
    return None if _generic(name) else name.rsplit(":", 1)[-1]


def implementation(kind: str, x_shape, kernel_shape, strides, pads, dtype="float32") -> str:
    """oneDNN's name for the kernel it runs (e.g. ``brgconv:avx512_core``), for benchmarks;
    where the convolution runs as its other exact form (:func:`_prefers_other`), that
    primitive's name and which it is."""
    dnn = _load()
    if dnn is None:
        raise RuntimeError("oneDNN is not available")
    geometry = _geometry(x_shape, kernel_shape, strides, pads, dtype)
    other = _other_form(kind, geometry)
    if other is not None and _prefers_other(kind, geometry, other):
        return f"{dnn.plan(_key(*other)).info_str} ({other[0]} primitive, flipped kernel)"
    return dnn.plan(_key(kind, geometry)).info_str


_LAYOUTS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}


def _geometry(x_shape, kernel_shape, strides, pads, dtype="float32") -> tuple:
    return (
        tuple(int(v) for v in x_shape),
        tuple(int(v) for v in kernel_shape),
        tuple(int(v) for v in strides),
        tuple((int(lo), int(hi)) for lo, hi in pads),
        jnp.dtype(dtype).name,
    )


def _key(kind: str, geometry: tuple) -> tuple:
    """(kind, input, kernel and output shapes, strides, pads, dtype): what names a primitive."""
    x_shape, kernel_shape, strides, pads, dtype = geometry
    out = lax.conv_general_shape_tuple(x_shape, kernel_shape, strides, pads, _LAYOUTS[len(strides)])
    return (kind, x_shape, kernel_shape, tuple(int(v) for v in out), strides, pads, dtype)


def _call(kind: str, a: Array, b: Array, geometry: tuple) -> Array:
    dnn = _load()
    assert dnn is not None  # applies() checked it
    key = _key(kind, geometry)
    shapes = key[1:4]  # input, kernel, output
    out_shape = shapes[_OUTPUT[kind]]
    if kind == _SWAPPED:
        out_shape = (*out_shape[:-2], out_shape[-1], out_shape[-2])
    if kind in (_FORWARD_SWAPPED, _DATA_SWAPPED):  # the kernel operand comes swapped
        w = shapes[1]
        assert b.shape == (*w[:-2], w[-1], w[-2]), (b.shape, w)
    result = jax.ShapeDtypeStruct(out_shape, key[6])
    dnn.plan(key)  # built (and its layouts chosen) now, not inside XLA's program
    plan_id = dnn.plan_id(key)
    dnn.hand_over(plan_id)
    target = _TARGET if dnn.in_c else _TARGET_PYTHON
    call = jax.ffi.ffi_call(target, result, vmap_method="sequential")
    return call(a, b, plan=np.int64(plan_id))


def _flip(kernel: Array) -> Array:
    """The kernel ``[*k, Cin, Cout]`` flipped in space with its channel axes swapped: the
    kernel of the convolution that maps the output back onto the input (its adjoint)."""
    return jnp.swapaxes(jnp.flip(kernel, tuple(range(kernel.ndim - 2))), -1, -2)


def _other_form(kind: str, geometry: tuple) -> tuple[str, tuple] | None:
    """The other primitive and geometry that compute a stride-1 ``forward`` or ``data``
    convolution, with :func:`_flip`'s kernel, or None. With ``y`` the output of ``geometry``'s
    convolution, the adjoint convolution maps ``y``'s shape onto ``x``'s with padding
    ``k - 1 - pad`` per side (so a padding larger than ``k - 1``, which crops, has none):
    ``forward(x, k)`` is its ``data(x, flip(k))`` and ``data(dy, k)`` its
    ``forward(dy, flip(k))``. Strided convolutions and the weights gradient have none."""
    x_shape, kernel_shape, strides, pads, dtype = geometry
    if kind == "weights" or any(s != 1 for s in strides):
        return None
    d = len(strides)
    back = tuple(
        (k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(kernel_shape[:d], pads, strict=True)
    )
    if any(p < 0 for pair in back for p in pair):
        return None
    y_shape = _key(kind, geometry)[3]
    w_shape = (*kernel_shape[:d], kernel_shape[-1], kernel_shape[-2])
    return ("data" if kind == "forward" else "forward"), (y_shape, w_shape, strides, back, dtype)


def _prefers_other(kind: str, geometry: tuple, other: tuple[str, tuple]) -> bool:
    """Whether ``kind`` on ``geometry`` runs as its ``other`` form: timed on this machine at
    the first trace (:meth:`_OneDNN.prefers`) unless ``MEDJAX_ONEDNN_AUTOTUNE=0``."""
    if not _autotune():
        return False
    dnn = _load()
    assert dnn is not None
    return dnn.prefers(_key(kind, geometry), _key(*other))


def _run(kind: str, a: Array, b: Array, geometry: tuple) -> Array:
    """``kind``'s convolution of ``a`` and the kernel ``b``, as whichever of its exact forms
    ran faster (:func:`_other_form`)."""
    other = _other_form(kind, geometry)
    if other is not None and _prefers_other(kind, geometry, other):
        return _call(other[0], a, _flip(b), other[1])
    return _call(kind, a, b, geometry)


# The three primitives, each with a VJP made of the other two.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _forward(x, kernel, geometry):
    return _run("forward", x, kernel, geometry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _data(dy, kernel, geometry):
    return _run("data", dy, kernel, geometry)


# bfloat16 strided 2D kernel gradients with at most this many output positions run as the
# weights primitive of a 1x1 convolution of the im2col patches, where oneDNN's bfloat16 kernels
# are AMX's: alone (2-core Xeon with AMX, ms), DCGAN's and WGAN-GP's critic layer 64 x 8^2, 256 ->
# 512, k4 s2 (1024 output positions): 8.4 against 16.7 for the strided primitive; at 64 x 16^2,
# 128 -> 256 (4096) the strided one wins, 6.3 against 12.1. In float32 they were level (19.1
# against 19.4). BENCHMARKS.md, session 46.
_IM2COL_WEIGHTS_MAX_POSITIONS = 1 << 10


def _im2col_weights_applies(geometry: tuple) -> bool:
    """Whether :func:`_weights` computes ``geometry``'s kernel gradient from the im2col patches
    (``_IM2COL_WEIGHTS_MAX_POSITIONS``)."""
    x_shape, kernel_shape, strides, pads, dtype = geometry
    out = _key("weights", geometry)[3]
    return (
        dtype == "bfloat16"
        and len(strides) == 2
        and any(st > 1 for st in strides)
        and int(np.prod(out[:-1])) <= _IM2COL_WEIGHTS_MAX_POSITIONS
        and bfloat16_kernels() == "avx512_core_amx"
    )


def im2col_patches(
    x: Array, ks: Sequence[int], strides: Sequence[int], pads: Sequence[tuple[int, int]]
) -> Array:
    """The im2col patches of ``x`` ``[B, *S, C]`` for a kernel of extents ``ks``: the
    ``prod(ks)`` shifted (and strided) views of the padded input stacked along the channels,
    ``[B, *O, prod(ks) * C]`` ordered ``(tap, c)`` as a kernel ``[*ks, C, Cout]`` reshapes to
    ``[prod(ks) * C, Cout]``. The convolution is then one matrix product with that kernel
    (:func:`medjax.models.layers.conv_im2col`) and its kernel gradient one with the output
    gradient (:func:`_weights_im2col`)."""
    xp = jnp.pad(x, [(0, 0), *pads, (0, 0)])
    out = [(n - k) // s + 1 for n, k, s in zip(xp.shape[1:-1], ks, strides, strict=True)]
    views = []
    for tap in np.ndindex(*ks):
        window = (
            slice(t, t + s * (o - 1) + 1, s) for t, o, s in zip(tap, out, strides, strict=True)
        )
        views.append(xp[(slice(None), *window)])
    return jnp.concatenate(views, axis=-1)


def _weights_im2col(x: Array, dy: Array, geometry: tuple) -> Array:
    """The kernel gradient of ``geometry``'s convolution as the weights primitive of the 1x1
    convolution of its :func:`im2col_patches` with ``dy``: the same sums of products."""
    _, kernel_shape, strides, pads, dtype = geometry
    patches = im2col_patches(x, kernel_shape[: len(strides)], strides, pads)
    rows, cout = int(np.prod(dy.shape[:-1])), dy.shape[-1]
    patches = patches.reshape(1, rows, 1, -1)
    one = _geometry(patches.shape, (1, 1, patches.shape[-1], cout), (1, 1), ((0, 0),) * 2, dtype)
    return _call("weights", patches, dy.reshape(1, rows, 1, cout), one).reshape(kernel_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _weights(x, dy, geometry):
    if _im2col_weights_applies(geometry):
        return _weights_im2col(x, dy, geometry)
    return _call("weights", x, dy, geometry)


def _forward_bwd(geometry, res, g):
    x, kernel = res
    return _data(g, kernel, geometry), _weights(x, g, geometry)


def _data_bwd(geometry, res, g):  # <data(dy, k), g> = <dy, forward(g, k)> = <k, weights(g, dy)>
    dy, kernel = res
    return _forward(g, kernel, geometry), _weights(g, dy, geometry)


def _weights_bwd(geometry, res, g):  # <weights(x, dy), g> = <x, data(dy, g)> = <dy, forward(x, g)>
    x, dy = res
    return _data(dy, g, geometry), _forward(x, g, geometry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _weights_swapped(x, dy, geometry):
    """:func:`_weights` with the channel axes of its result swapped, ``[*k, Cout, Cin]``, as
    oneDNN writes it (no transposition by XLA)."""
    return _call(_SWAPPED, x, dy, geometry)


def _weights_swapped_bwd(geometry, res, g):  # g is [*k, Cout, Cin]: the kernel comes swapped
    x, dy = res
    return _data_swapped(dy, g, geometry), _forward_swapped(x, g, geometry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _forward_swapped(x, kernel_swapped, geometry):
    """:func:`_forward` of the kernel whose channel axes are swapped, ``[*k, Cout, Cin]``."""
    return _call(_FORWARD_SWAPPED, x, kernel_swapped, geometry)


def _forward_swapped_bwd(geometry, res, g):
    x, kernel_swapped = res
    return _data_swapped(g, kernel_swapped, geometry), _weights_swapped(x, g, geometry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _data_swapped(dy, kernel_swapped, geometry):
    """:func:`_data` of the kernel whose channel axes are swapped, ``[*k, Cout, Cin]``."""
    return _call(_DATA_SWAPPED, dy, kernel_swapped, geometry)


def _data_swapped_bwd(geometry, res, g):
    dy, kernel_swapped = res
    return _forward_swapped(g, kernel_swapped, geometry), _weights_swapped(g, dy, geometry)


def _keeping_operands(primitive: Callable) -> Callable:
    """The forward rule of ``primitive``'s VJP: every backward rule above needs only the two
    operands (the convolution is bilinear), so they are the residuals."""

    def fwd(a, b, geometry):
        return primitive(a, b, geometry), (a, b)

    return fwd


for _primitive, _bwd in (
    (_forward, _forward_bwd),
    (_data, _data_bwd),
    (_weights, _weights_bwd),
    (_weights_swapped, _weights_swapped_bwd),
    (_forward_swapped, _forward_swapped_bwd),
    (_data_swapped, _data_swapped_bwd),
):
    _primitive.defvjp(_keeping_operands(_primitive), _bwd)
del _primitive, _bwd


def _transposed(x: Array, kernel: Array, geometry: tuple) -> Array:
    """:func:`conv_transpose`: the input gradient (:func:`_data`) of the convolution with the
    :func:`_flip` of ``kernel``, which oneDNN reads with its channel axes swapped
    (:func:`_data_swapped`), so XLA only flips it in space. Its kernel gradient is that
    convolution's weights gradient flipped back, which :func:`_weights_swapped` writes with the
    channel axes of ``kernel``. Through a channel transpose by XLA, the kernel was copied
    column by column before each call, and the gradient read channel-transposed in each of
    its consumers (Adam's updates of pix2pix's 4 x 4 x 1024 x 512 up-samplers, bfloat16: 31.6
    against 5.3 ms each, ``BENCHMARKS.md``)."""
    return _data_swapped(x, jnp.flip(kernel, tuple(range(kernel.ndim - 2))), geometry)


def conv(x: Array, kernel: Array, strides: Sequence[int], pads: Sequence[tuple[int, int]]) -> Array:
    """Cross-correlation of ``x`` ``[B, *S, Cin]`` with ``kernel`` ``[*k, Cin, Cout]`` (the
    semantics of :func:`jax.lax.conv_general_dilated` with channels-last dimension numbers),
    by oneDNN. Check :func:`applies` first."""
    return _forward(x, kernel, _geometry(x.shape, kernel.shape, strides, pads, x.dtype))


def conv_kernel_gradient(
    x: Array,
    dy: Array,
    kernel_shape: Sequence[int],
    strides: Sequence[int],
    pads: Sequence[tuple[int, int]],
) -> Array:
    """The gradient of ``sum(conv(x, kernel, strides, pads) * dy)`` with respect to ``kernel``
    (``kernel_shape``: ``[*k, Cin, Cout]``, the dtype of ``x``), by oneDNN's weights primitive
    alone: ``x`` ``[B, *S, Cin]`` and the output gradient ``dy`` ``[B, *O, Cout]`` of one dtype.
    Differentiable to any order (its VJP is the forward and data primitives). Check
    :func:`applies` first, with a kernel of ``x``'s dtype."""
    return _weights(x, dy, _geometry(x.shape, kernel_shape, strides, pads, x.dtype))


def conv_transpose(
    x: Array, kernel: Array, strides: Sequence[int], pads: Sequence[tuple[int, int]]
) -> Array:
    """Transposed convolution of ``x`` ``[B, *S, Cin]`` with ``kernel`` ``[*k, Cin, Cout]``
    (channels-last, the kernel's orientation of :func:`jax.lax.conv_transpose`), by oneDNN:
    the input gradient of the convolution with ``strides`` and ``pads`` whose output is
    ``x``, taken with the kernel flipped and its channel axes swapped. ``pads`` are that
    convolution's; the output is ``[B, *O, Cout]`` with ``O = (S - 1) * strides + k - pad_lo
    - pad_hi``. The k4 s2 up-sampler (``pads`` ``(1, 1)`` per axis) equals
    ``lax.conv_transpose(x, kernel, (2,) * d, 'SAME')``. Check :func:`applies` first."""
    d = x.ndim - 2
    w_shape = (*kernel.shape[:d], kernel.shape[-1], kernel.shape[-2])  # _flip(kernel)'s
    out = [
        (s - 1) * st + k - lo - hi
        for s, st, k, (lo, hi) in zip(x.shape[1:-1], strides, kernel.shape[:d], pads, strict=True)
    ]
    y_shape = (x.shape[0], *out, kernel.shape[-1])
    return _transposed(x, kernel, _geometry(y_shape, w_shape, strides, pads, x.dtype))
