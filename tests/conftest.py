"""Test-session settings, applied before JAX starts its backend.

The suite compiles hundreds of small graphs and runs each only a few times, so XLA:CPU's
optimisation passes dominate its time (a tiny U-Net's init: 23 s with them, 2 s without, on the
2-core CI machine). As in the Flax examples' one-step tests, they are switched off; results are
the same up to float rounding. `MEDJAX_TEST_XLA_OPT=1` keeps XLA's defaults.

Many tests compile the same computation again: a resumed run, a relaunched or killed process, a
second host, the same smoke config in another test. JAX's persistent compilation cache
(`build/test-xla-cache`, shared by the xdist workers) serves those from disk: the CycleGAN smoke
step compiles in 18 s and loads from the cache in 4.6 s (2-core EPYC). Its key holds the jaxlib
version, the XLA flags and the devices, so an entry is only reused for the same executable.
`MEDJAX_TEST_XLA_CACHE=0` switches it off; `JAX_COMPILATION_CACHE_DIR` moves it.

Subprocesses that tests start inherit both settings through the environment.
"""

import os
from pathlib import Path

FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
CACHE = {  # environment variable -> (value, type of the JAX option)
    "JAX_COMPILATION_CACHE_DIR": (str(Path(__file__).parents[1] / "build" / "test-xla-cache"), str),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": ("0.3", float),  # not every eager op's kernel
    # A size bound turns on eviction and, with it, a file lock around every read and write, so
    # that workers and subprocesses never see each other's half-written entries.
    "JAX_COMPILATION_CACHE_MAX_SIZE": (str(4 << 30), int),
}

if os.environ.get("MEDJAX_TEST_XLA_OPT", "0") != "1":
    from medjax.train.platform import configure_xla

    configure_xla(FAST_COMPILE)

if os.environ.get("MEDJAX_TEST_XLA_CACHE", "1") != "0":
    import jax

    for name, (value, kind) in CACHE.items():
        jax.config.update(name.lower(), kind(os.environ.setdefault(name, value)))
