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
