"""medjax's one C file: the XLA FFI handler that runs oneDNN's convolutions without Python
(``medjax/models/_onednn_ffi.c``, a plain shared library that ``medjax.models.onednn`` loads
with ctypes). Everything else is in ``pyproject.toml``. The build is optional: without a C
compiler medjax installs all the same and runs those convolutions from its Python handler."""

import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux"):  # POSIX threads; oneDNN's wheel is Linux x86-64 only
    ext_modules.append(
        Extension(
            "medjax.models._onednn_ffi",
            sources=["medjax/models/_onednn_ffi.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra"],
            libraries=["pthread"],
            optional=True,
        )
    )

setup(ext_modules=ext_modules)
