"""Process-level XLA settings, applied before JAX starts its backend."""

from __future__ import annotations

import os

# Measured on a 2-core x86 CPU (benchmarks/bench_layers.py): XLA's ynn fusion of individual
# convolutions slows the U-Net step; excluding it is exact and faster. Ignored off the CPU.
CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)


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
