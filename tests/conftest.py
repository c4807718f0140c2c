"""Test-session settings, applied before JAX starts its backend.

The suite compiles hundreds of small graphs and runs each only a few times, so XLA:CPU's
optimisation passes dominate its time (a tiny U-Net's init: 23 s with them, 2 s without, on the
2-core CI machine). As in the Flax examples' one-step tests, they are switched off; results are
the same up to float rounding. `MEDJAX_TEST_XLA_OPT=1` keeps XLA's defaults. Subprocesses that
tests start inherit the setting through `XLA_FLAGS`.
"""

import os

FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")

if os.environ.get("MEDJAX_TEST_XLA_OPT", "0") != "1":
    from medjax.train.platform import configure_xla

    configure_xla(FAST_COMPILE)
