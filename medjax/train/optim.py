"""Optimizers and learning-rate schedules from a config block (shared by every task)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from medjax import ffi

_OPTIMIZERS = ("adam", "adamw", "sgd")
_SCHEDULES = ("constant", "cosine", "linear_decay", "poly")


def make_schedule(cfg: Mapping[str, Any], num_steps: int) -> optax.Schedule:
    """`cfg.schedule`: constant | cosine | linear_decay | poly, after `warmup_steps` linear warm-up.

    linear_decay keeps the rate for `decay_start` steps then decays linearly to 0 (CycleGAN);
    poly is nnU-Net's `lr * (1 - t/T)^0.9`.
    """
    lr = float(cfg["learning_rate"])
    name = cfg.get("schedule", "constant")
    warmup = int(cfg.get("warmup_steps", 0))
    rest = max(num_steps - warmup, 1)
    if name == "constant":
        main = optax.constant_schedule(lr)
    elif name == "cosine":
        main = optax.cosine_decay_schedule(lr, rest, alpha=float(cfg.get("final_lr_fraction", 0.0)))
    elif name == "linear_decay":
        start = int(cfg.get("decay_start", rest // 2))
        main = optax.join_schedules(
            [optax.constant_schedule(lr), optax.linear_schedule(lr, 0.0, max(rest - start, 1))],
            [start],
        )
    elif name == "poly":
        main = optax.polynomial_schedule(lr, 0.0, power=0.9, transition_steps=rest)
    else:
        raise ValueError(f"config.optimizer.schedule={name!r} is not one of {_SCHEDULES}")
    if warmup:
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])
    return main


def make_optimizer(cfg: Mapping[str, Any], num_steps: int) -> optax.GradientTransformation:
    """adam | adamw | sgd (nesterov momentum) with optional global-norm clipping."""
    name = cfg.get("name", "adam")
    sched = make_schedule(cfg, num_steps)
    b1, b2 = float(cfg.get("b1", 0.9)), float(cfg.get("b2", 0.999))
    if name == "adam":  # optax.adam, its moments written once (scale_by_adam)
        opt = optax.chain(scale_by_adam(b1, b2), optax.scale_by_learning_rate(sched))
    elif name == "adamw":  # likewise optax.adamw
        wd = float(cfg.get("weight_decay", 1e-4))
        opt = optax.chain(
            scale_by_adam(b1, b2),
            optax.add_decayed_weights(wd),
            optax.scale_by_learning_rate(sched),
        )
    elif name == "sgd":
        opt = optax.sgd(sched, momentum=float(cfg.get("momentum", 0.99)), nesterov=True)
    else:
        raise ValueError(f"config.optimizer.name={name!r} is not one of {_OPTIMIZERS}")
    clip = cfg.get("grad_clip_norm")
    opt = optax.chain(optax.clip_by_global_norm(float(clip)), opt) if clip else opt
    # Replicas with their own learning rate (`config.replica_lr_scales`): every update above
    # is linear in the learning rate, so scaling the final update IS training at lr * scale.
    return optax.chain(opt, scale_by_replica()) if cfg.get("replica_scaled") else opt


# Moments of at least this many elements are materialized (`scale_by_adam`); below, the
# custom call costs more than the pass it saves (the classifier's step, every moment
# materialized: 1.020 times as long, one process, interleaved).
MATERIALIZE_MIN_SIZE = 1 << 17


def _materialized(tree: Any) -> Any:
    return jax.tree.map(
        lambda x: ffi.materialized(x) if x.size >= MATERIALIZE_MIN_SIZE else x, tree
    )


def scale_by_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
    """``optax.scale_by_adam(b1, b2, eps)``, the same arithmetic and state, with each new moment
    of at least ``MATERIALIZE_MIN_SIZE`` elements written once (:func:`medjax.ffi.materialized`).

    XLA:CPU otherwise recomputes the new moments inside the parameter's update from the old
    ones, and copies the old ``mu`` before its update overwrites it in place. pix2pix's 57.2 M
    parameters, Adam alone: 55 against 80 ms; its training step 6 % faster (one
    process, interleaved; ``BENCHMARKS.md``). On GPUs and TPUs the identity."""
    base = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

    def update(updates: Any, state: optax.ScaleByAdamState, params: Any = None):
        del params
        mu = _materialized(optax.tree.update_moment(updates, state.mu, b1, 1))
        nu = _materialized(optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2))
        count = optax.safe_increment(state.count)
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)
        updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
        return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(base.init, update)


class ReplicaScale(NamedTuple):
    """Optimizer state of `scale_by_replica`: the learning-rate factor of one replica."""

    scale: jax.Array


def scale_by_replica() -> optax.GradientTransformation:
    """Multiplies the updates by a factor held in the optimizer state (1 at init;
    `set_replica_scales` gives each replica its own)."""

    def init(params: Any) -> ReplicaScale:
        return ReplicaScale(jnp.ones((), jnp.float32))

    def update(updates: Any, state: ReplicaScale, params: Any = None) -> tuple[Any, ReplicaScale]:
        return jax.tree.map(lambda u: u * state.scale.astype(u.dtype), updates), state

    return optax.GradientTransformation(init, update)


def with_replica_scaling(config: Any) -> Any:
    """A copy of `config` whose optimizer blocks (`optimizer`, `optimizer_g`, ...) end in
    `scale_by_replica`."""
    config = copy.deepcopy(config)
    for key in list(config.keys()):
        if key.startswith("optimizer") and hasattr(config[key], "keys"):
            unlocked = getattr(config[key], "unlocked", contextlib.nullcontext)
            with unlocked():
                config[key]["replica_scaled"] = True
    return config


def set_replica_scales(state: Any, scales: Sequence[float]) -> Any:
    """`state` (stacked over replicas) with replica i's learning-rate factor `scales[i]` in
    every `ReplicaScale` of its optimizer states."""
    values = jnp.asarray(scales, jnp.float32)
    return jax.tree.map(
        lambda x: ReplicaScale(values) if isinstance(x, ReplicaScale) else x,
        state,
        is_leaf=lambda x: isinstance(x, ReplicaScale),
    )
