"""Shared test helpers."""

from __future__ import annotations

import os


def cpu_env(devices: int | None = None, **extra: str) -> dict[str, str]:
    """Environment for a subprocess that runs JAX on the CPU, optionally as `devices`
    simulated devices (XLA's host-platform device count)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    if devices:
        flag = f"--xla_force_host_platform_device_count={devices}"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    return env


def tiny_demo_config(num_steps: int = 8, eval_every: int = 4, **changes):
    """The smoke demo config made tiny (30 slices, a log row every step, a checkpoint every 2
    steps, all kept); `changes` set dotted keys (`**{"model.features": (4, 8)}`)."""
    from medjax.configs import mni152_demo

    c = mni152_demo.get_config("smoke")
    c.num_steps = num_steps
    c.log_every = 1
    c.eval_every = eval_every
    c.checkpoint_every = 2
    c.keep_checkpoints = 5
    c.data.max_examples = 30
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = c
        for part in parents:
            node = node[part]
        node[leaf] = value
    return c


def randn(shape, seed=0):
    """A float32 standard-normal array from numpy (no `jax.random` kernel to compile)."""
    import jax.numpy as jnp
    import numpy as np

    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def jit_grad(fn, argnums=0):
    """``jax.grad(fn, argnums)`` compiled as one program. Op by op, each of a fast formulation's
    many small operations compiles on its own: a 3D overlap-add's gradient took 4.8 s eagerly
    against 0.3 s jitted (2-core EPYC)."""
    import jax

    return jax.jit(jax.grad(fn, argnums))


def random_variables(module, *args, seed: int = 0, **kwargs):
    """Variables of a Flax ``module`` filled from numpy (``jax.random`` compiles slowly on CPU).

    Kernels ~ N(0, 1/fan_in), biases/offsets small, scales ~1, batch statistics
    ``mean=0, var=1``, spectral-norm ``u`` ~ N(0, 1).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    shapes = jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a, **kwargs), *args)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "mean":
            return jnp.zeros(leaf.shape, leaf.dtype)
        if name == "var":
            return jnp.ones(leaf.shape, leaf.dtype)
        z = rng.standard_normal(leaf.shape)
        if name == "kernel":
            z = z / np.sqrt(np.prod(leaf.shape[:-1]))
        elif name == "scale":
            z = 1.0 + 0.1 * z
        elif not name.endswith(("/u", "/sigma")):
            z = 0.1 * z
        return jnp.asarray(z, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def tcia_pair_splits(size=(64, 64)):
    """T1 -> T2 slice pairs of the shared TCIA exam: `{"train", "val"}` (validation: slices
    14-17) of `{"source", "target"}` in [-1, 1]; skips the test without the shared data."""
    import pytest

    from medjax.data import image_sets
    from medjax.data.paths import data_dir

    try:
        folder = data_dir("brain_tumor_progression_pgbm001")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    d = image_sets.load_tcia_series(folder, ("t1pre", "t2"), size=size)
    train, val = image_sets.split_slice_block(d, (14, 18))
    return {
        s: {"source": x["image"][..., :1], "target": x["image"][..., 1:]}
        for s, x in (("train", train), ("val", val))
    }
