"""XLA FFI handlers written in Python for the CPU, and :func:`materialized`.

XLA's FFI (``xla/ffi/api/c_api.h`` of jaxlib 0.10, API version 0.3) calls a handler with the
addresses of XLA's own buffers, so nothing is copied on the way in or out (a host callback
copied every operand and result: 5.6 ms of a 20 ms 2D convolution at 8 x 128^2 x 32). The
structures below are the fields of that C API that medjax's handlers read, for :mod:`ctypes`;
:func:`handler` wraps a Python function as one. Two handlers use them: oneDNN's convolutions
(:mod:`medjax.models.onednn`) and :func:`materialized`'s, which does nothing.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import jax

Array = jax.Array

API_VERSION = (0, 3)
EXTENSION_METADATA = 1
STAGE_EXECUTE = 3
ERROR_INTERNAL = 13

_H = ctypes.c_void_p


class Extension(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("type", ctypes.c_int), ("next", _H)]


class ApiVersion(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", _H),
        ("major", ctypes.c_int),
        ("minor", ctypes.c_int),
    ]


class Metadata(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("api_version", ApiVersion),
        ("traits", ctypes.c_uint32),
        ("state_type_id", ctypes.c_int64),
    ]


class MetadataExtension(ctypes.Structure):
    _fields_ = [("base", Extension), ("metadata", ctypes.POINTER(Metadata))]


class Buffer(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", _H),
        ("dtype", ctypes.c_int),
        ("data", _H),
        ("rank", ctypes.c_int64),
        ("dims", ctypes.POINTER(ctypes.c_int64)),
    ]


class List(ctypes.Structure):  # XLA_FFI_Args and XLA_FFI_Rets
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", _H),
        ("size", ctypes.c_int64),
        ("types", ctypes.POINTER(ctypes.c_int)),
        ("items", ctypes.POINTER(_H)),
    ]


class Attrs(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", _H),
        ("size", ctypes.c_int64),
        ("types", ctypes.POINTER(ctypes.c_int)),
        ("names", ctypes.POINTER(_H)),
        ("attrs", ctypes.POINTER(_H)),
    ]


class Scalar(ctypes.Structure):
    _fields_ = [("dtype", ctypes.c_int), ("value", _H)]


class CallFrame(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", _H),
        ("api", _H),
        ("ctx", _H),
        ("stage", ctypes.c_int),
        ("args", List),
        ("rets", List),
        ("attrs", Attrs),
        ("future", _H),
    ]


class ErrorArgs(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", _H),
        ("message", ctypes.c_char_p),
        ("errc", ctypes.c_int),
    ]


class Api(ctypes.Structure):  # the fields up to XLA_FFI_Error_Create
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", _H),
        ("api_version", ApiVersion),
        ("internal_api", _H),
        ("error_create", ctypes.CFUNCTYPE(_H, ctypes.POINTER(ErrorArgs))),
    ]


def handler(execute: Callable[[CallFrame], None], name: str) -> Callable:
    """A ctypes function pointer that XLA can call as an FFI handler: it answers XLA's metadata
    query (API version 0.3, no traits), calls ``execute(frame)`` at the execute stage only, and
    hands any exception back to XLA as an error whose message starts with ``name``. Keep the
    returned object alive as long as the handler is registered."""

    def run(frame_pointer) -> int | None:
        frame = frame_pointer.contents
        try:
            if frame.extension_start:
                if Extension.from_address(frame.extension_start).type == EXTENSION_METADATA:
                    meta = MetadataExtension.from_address(frame.extension_start).metadata.contents
                    meta.api_version = ApiVersion(ctypes.sizeof(ApiVersion), None, *API_VERSION)
                    meta.traits = 0
                    return None
            if frame.stage == STAGE_EXECUTE:
                execute(frame)
            return None
        except BaseException as e:  # noqa: BLE001 - every error goes back to XLA, never lost
            api = Api.from_address(frame.api)
            message = f"{name}: {type(e).__name__}: {e}".encode()
            args = ErrorArgs(ctypes.sizeof(ErrorArgs), None, message, ERROR_INTERNAL)
            return api.error_create(ctypes.byref(args))

    return ctypes.CFUNCTYPE(_H, ctypes.POINTER(CallFrame))(run)


# --------------------------------------------------------------------------------------
# materialized: an array that XLA:CPU writes once and reads, instead of recomputing it
# --------------------------------------------------------------------------------------

_MATERIALIZED = "medjax_materialized"


def _materialize(frame: CallFrame) -> None:
    """The result is the operand's buffer (``input_output_aliases``): nothing to do."""
    src, dst = (Buffer.from_address(f.items[0]).data for f in (frame.args, frame.rets))
    if src != dst:  # XLA honours the alias (copying the operand first where it must)
        raise RuntimeError("the result does not alias the operand's buffer")


_MATERIALIZE_HANDLER = handler(_materialize, "medjax.ffi.materialized")


@functools.cache
def _registered() -> bool:
    jax.ffi.register_ffi_target(
        _MATERIALIZED, jax.ffi.pycapsule(_MATERIALIZE_HANDLER), platform="cpu"
    )
    return True


def materializes() -> bool:
    """Whether :func:`materialized` does anything here: on the CPU backend with one device (a
    custom call is not partitioned: under a multi-device mesh XLA would gather its operand).
    Elsewhere XLA's fusion writes an elementwise result once for all its consumers (GPUs'
    multi-output fusion), and :func:`materialized` returns its argument."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1


@jax.custom_jvp
def materialized(x: Array) -> Array:
    """``x``, which XLA:CPU then computes once, writes out and reads back in every consumer.

    XLA:CPU fuses a cheap elementwise result into each of its consumers, recomputing it there,
    and has no multi-output loop fusion. Adam's new first moment ``mu' = b1 mu + (1 - b1) g``
    is an output of the step and an input of the parameter's update: the update recomputes it
    from the old ``mu``, so XLA copies the old ``mu`` before ``mu'`` overwrites it in place.
    Passed through this identity (a custom call whose result aliases its operand and whose
    handler does nothing), ``mu'`` is written once and the update reads it (pix2pix's Adam over
    57.2 M parameters: 55 against 80 ms alone; ``BENCHMARKS.md``). An optimization barrier
    does not do this: XLA:CPU removes barriers before fusion. Differentiable (the identity's
    derivative), batched by ``vmap`` as one call, and the identity itself where
    :func:`materializes` is false.
    """
    if not materializes() or not _registered():
        return x
    call = jax.ffi.ffi_call(
        _MATERIALIZED,
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        input_output_aliases={0: 0},
        vmap_method="broadcast_all",
    )
    return call(x)


@materialized.defjvp
def _materialized_jvp(primals, tangents):
    return materialized(primals[0]), tangents[0]
