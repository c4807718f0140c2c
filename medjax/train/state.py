"""Train states and model application shared by every task.

A state is arrays only, so Orbax saves one plain pytree and the sharding rules map over it:
`TrainState` for one network (segmentation, classification, denoising, ...); the GAN tasks keep
several networks side by side in `medjax.train.gan.GANState`. Both are applied with
`apply_model`, the one batch-norm-aware `module.apply`.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Everything that changes while one network trains.

    - `step`: int32, updates applied;
    - `params`, `batch_stats` (batch-norm statistics / spectral-norm vectors, `{}` without);
    - `opt_state`: the optax state;
    - `rng`: raw key data of the run's base key; step keys are `fold_in(key, step)`.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


def init_model(module: Any, key: jax.Array, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """(params, batch_stats or {}) of `module` for example inputs `args` (train=False)."""
    pkey, dkey = jax.random.split(key)
    variables = module.init({"params": pkey, "dropout": dkey}, *args, train=False, **kwargs)
    return variables["params"], variables.get("batch_stats", {})


def new_train_state(
    module: Any, tx: optax.GradientTransformation, key: jax.Array, *args: Any
) -> TrainState:
    """Step 0 of one network: parameters from `module.init` on example inputs `args`."""
    k_init, base = jax.random.split(key)
    params, stats = init_model(module, k_init, *args)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=stats,
        opt_state=tx.init(params),
        rng=jax.random.key_data(base),
    )


def step_key(state: Any) -> jax.Array:
    """The PRNG key of the state's current step: `fold_in(base key, step)`."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def apply_model(
    module: Any,
    params: Any,
    stats: Any,
    *args: Any,
    train: bool,
    key: jax.Array | None = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """`module(*args, train=train, **kwargs)` -> (output, new batch_stats).

    With `train=True` and a non-empty `stats` collection the statistics are updated (batch-norm
    running averages, spectral-norm vectors) and returned; otherwise `stats` comes back
    unchanged. `key` feeds dropout.
    """
    variables = {"params": params, **({"batch_stats": stats} if stats else {})}
    rngs = {"dropout": key} if key is not None else None
    if train and stats:
        out, updates = module.apply(
            variables, *args, train=True, mutable=["batch_stats"], rngs=rngs, **kwargs
        )
        return out, updates["batch_stats"]
    return module.apply(variables, *args, train=train, rngs=rngs, **kwargs), stats


def to_float32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)
