"""What the GAN tasks share: their train state, model application, EMA and optimizers.

A GAN is pure functions over several parameter trees (`"g"`/`"d"`, or CycleGAN's
`"g_ab"`/`"g_ba"`/`"d_a"`/`"d_b"`). The state holds them side by side in dicts, so Orbax saves one
plain pytree and the loop's sharding rules map over it. "Detach" is `jax.lax.stop_gradient`;
alternating updates are separate `value_and_grad` calls inside one jitted step (see the tasks).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from medjax.train.optim import make_optimizer


@flax.struct.dataclass
class GANState:
    """Arrays only.

    - `step`: int32 generator steps taken.
    - `params`, `batch_stats`, `opt_state`: dicts keyed by network name (`batch_stats` holds
      batch-norm statistics and spectral-norm power-iteration vectors; `{}` for a network without).
    - `ema`: exponential moving averages of the generators' params (`{}` when disabled).
    - `rng`: raw base key data; the step key is `fold_in(key, step)`.
    - `extra`: task-specific arrays (CycleGAN's image pools).
    """

    step: jax.Array
    params: dict[str, Any]
    batch_stats: dict[str, Any]
    opt_state: dict[str, Any]
    ema: dict[str, Any]
    rng: jax.Array
    extra: dict[str, Any] = flax.struct.field(default_factory=dict)


def init_model(module: Any, key: jax.Array, *args: Any) -> tuple[Any, Any]:
    """(params, batch_stats or {}) of `module` for example inputs `args` (train=False)."""
    pkey, dkey = jax.random.split(key)
    variables = module.init({"params": pkey, "dropout": dkey}, *args, train=False)
    return variables["params"], variables.get("batch_stats", {})


def apply_model(
    module: Any,
    params: Any,
    stats: Any,
    *args: Any,
    train: bool,
    key: jax.Array | None = None,
) -> tuple[jax.Array, Any]:
    """`module(*args, train=train)` -> (output, new batch_stats).

    With `train=True` and a non-empty `stats` collection the statistics are updated (batch norm
    running averages, spectral-norm vectors) and returned; otherwise `stats` comes back unchanged.
    `key` feeds dropout.
    """
    variables = {"params": params, **({"batch_stats": stats} if stats else {})}
    rngs = {"dropout": key} if key is not None else None
    if train and stats:
        out, updates = module.apply(
            variables, *args, train=True, mutable=["batch_stats"], rngs=rngs
        )
        return out, updates["batch_stats"]
    return module.apply(variables, *args, train=train, rngs=rngs), stats


def new_state(
    params: dict[str, Any],
    batch_stats: dict[str, Any],
    tx: Mapping[str, optax.GradientTransformation],
    key: jax.Array,
    *,
    ema_decay: float = 0.0,
    extra: dict[str, Any] | None = None,
) -> GANState:
    """Step 0: optimizer states from `tx[name].init`, the EMA (of `params["g"]`) when enabled."""
    return GANState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state={k: tx[k].init(v) for k, v in params.items()},
        ema={"g": params["g"]} if ema_decay > 0 else {},
        rng=jax.random.key_data(key),
        extra=extra or {},
    )


def apply_gradients(
    state: GANState,
    grads: Mapping[str, Any],
    tx: Mapping[str, optax.GradientTransformation],
    *,
    batch_stats: Mapping[str, Any],
    ema_decay: float = 0.0,
    count_step: bool = True,
    extra: dict[str, Any] | None = None,
) -> GANState:
    """One optimizer update of each network in `grads` (others untouched), their new
    `batch_stats`, the generator EMA when `"g"` was updated, and `step + 1` when `count_step`
    (a generator step; WGAN-GP's extra critic updates do not count)."""
    params, opt_state = dict(state.params), dict(state.opt_state)
    for name, g in grads.items():
        updates, opt_state[name] = tx[name].update(g, state.opt_state[name], params[name])
        params[name] = optax.apply_updates(params[name], updates)
    ema = state.ema
    if ema_decay > 0 and "g" in grads:
        ema = {"g": ema_update(ema["g"], params["g"], ema_decay)}
    return state.replace(
        step=state.step + 1 if count_step else state.step,
        params=params,
        batch_stats={**state.batch_stats, **batch_stats},
        opt_state=opt_state,
        ema=ema,
        extra=state.extra if extra is None else extra,
    )


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    """`decay * ema + (1 - decay) * params`, leaf by leaf (Polyak averaging of a generator)."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def make_optimizers(
    config: Any, names: Mapping[str, str], num_steps: int
) -> dict[str, optax.GradientTransformation]:
    """One optax transform per network: `names` maps network -> config block
    (e.g. `{"g": "optimizer_g", "d": "optimizer_d"}`), see `medjax.train.optim`."""
    return {net: make_optimizer(config[block], num_steps) for net, block in names.items()}


def to_float32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def synthetic_batch(config: Any, batch_size: int, seed: int = 0) -> dict[str, Any]:
    """Random numpy data shaped like one global batch of a GAN-family task's real data (for
    benchmarks and step tests: speed and sharding do not depend on the values).

    dcgan / wgan_gp: `{"image"}`; cyclegan: `{"a", "b"}`; pix2pix: `{"image": [source, target,
    brain mask] channels, "label": BraTS classes}`; classification: `{"image", "label"}`.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    task = str(config.task)
    if task in ("dcgan", "wgan_gp", "cyclegan", "classification"):
        shape = (batch_size, *[int(s) for s in config.data.image_size], 1)
        if task == "cyclegan":
            return {k: rng.uniform(-1, 1, shape).astype(np.float32) for k in ("a", "b")}
        out = {"image": rng.uniform(-1, 1, shape).astype(np.float32)}
        if task == "classification":
            out["label"] = rng.integers(0, int(config.data.num_classes), batch_size).astype(
                np.int32
            )
        return out
    if task != "pix2pix":
        raise ValueError(f"synthetic_batch: config.task={task!r} is not a GAN-family task")
    patch = config.get("patch_size") or ()
    spatial = tuple(int(s) for s in (patch or config.data.image_size))
    channels = len(config.data.source_modalities) + len(config.data.get("target_modalities") or ())
    image = rng.uniform(-1, 1, (batch_size, *spatial, channels + 1)).astype(np.float32)
    image[..., -1] = rng.uniform(0, 1, (batch_size, *spatial)) > 0.3  # brain mask channel
    label = rng.integers(0, 4, (batch_size, *spatial)).astype(np.int32)
    return {"image": image, "label": label}
