"""The config schema: the type and range of every key a shipped config has, checked once at
start-up, before anything is written to a work directory.

`validate(config)` collects every problem (one line each, naming the key, the value and what was
expected) and raises one `ConfigError` listing them all. Rules are keyed by dotted key patterns
(`fnmatch`: `optimizer*.learning_rate` covers `optimizer`, `optimizer_g` and `optimizer_d`), not
by task: a new task's keys get rules here the first time a config uses them, and
`tests/train/test_schema.py` fails for a shipped key that has none. A key without a rule (a
user's own config) is only checked to be a plain value (number, string, bool or a sequence).

Choices that the code itself defines (activations, GAN losses, dtypes) come from the modules that
define them, so the schema never goes stale.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from medjax.errors import ConfigError

__all__ = ["COMPUTE_DTYPES", "RULES", "ConfigError", "flatten", "problems", "rule_for", "validate"]


Check = Callable[[Any], str | None]  # None when fine, else what was expected


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


@dataclass(frozen=True)
class Int:
    lo: int | None = None
    hi: int | None = None

    def __call__(self, v: Any) -> str | None:
        if not _is_int(v):
            return "an integer"
        if (self.lo is not None and v < self.lo) or (self.hi is not None and v > self.hi):
            return _range("an integer", self.lo, self.hi)
        return None


@dataclass(frozen=True)
class Float:
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo < v instead of lo <= v
    hi_open: bool = False

    def __call__(self, v: Any) -> str | None:
        bad = not _is_num(v)
        if not bad and self.lo is not None:
            bad = v <= self.lo if self.lo_open else v < self.lo
        if not bad and self.hi is not None:
            bad = v >= self.hi if self.hi_open else v > self.hi
        if bad:
            lo = None if self.lo is None else f"{self.lo:g}"
            hi = None if self.hi is None else f"{self.hi:g}"
            lo_op, hi_op = ("<" if self.lo_open else "<="), ("<" if self.hi_open else "<=")
            if lo is None and hi is None:
                return "a finite number"
            parts = [p for p in (lo and f"{lo} {lo_op}", "x", hi and f"{hi_op} {hi}") if p]
            return "a finite number " + " ".join(parts)
        return None


def _range(what: str, lo: Any, hi: Any) -> str:
    if lo is not None and hi is not None:
        return f"{what} in [{lo}, {hi}]"
    return f"{what} >= {lo}" if lo is not None else f"{what} <= {hi}"


@dataclass(frozen=True)
class Bool:
    def __call__(self, v: Any) -> str | None:
        return None if isinstance(v, bool) else "true or false"


@dataclass(frozen=True)
class Str:
    choices: Callable[[], Sequence[str]] | Sequence[str] | None = None

    def __call__(self, v: Any) -> str | None:
        if not isinstance(v, str):
            return "a string"
        if self.choices is not None:
            options = list(self.choices() if callable(self.choices) else self.choices)
            if v not in options:
                near = difflib.get_close_matches(v, options, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                return f"one of {options}{hint}"
        return None


@dataclass(frozen=True)
class Seq:
    item: Check
    lengths: tuple[int, ...] | None = None  # allowed lengths (None: any)

    def __call__(self, v: Any) -> str | None:
        lens = "" if self.lengths is None else f" of length {' or '.join(map(str, self.lengths))}"
        # the item rule's own "expected ..." text: what it says of a value no rule accepts
        what = f"a sequence{lens} whose items are each {self.item(object()) or 'a value'}"
        if not isinstance(v, (list, tuple)):
            return what
        if self.lengths is not None and len(v) not in self.lengths:
            return what
        return what if any(self.item(x) for x in v) else None


@dataclass(frozen=True)
class Either:
    options: tuple[Check, ...]

    def __call__(self, v: Any) -> str | None:
        errors = [c(v) for c in self.options]
        return None if any(e is None for e in errors) else " or ".join(e for e in errors if e)


def _activations() -> list[str]:
    from medjax.models.layers import ACTIVATIONS

    return sorted(ACTIVATIONS)


def _generator_heads() -> tuple[str, ...]:
    from medjax.models.dcgan import GENERATOR_HEADS

    return GENERATOR_HEADS


def _gan_losses() -> tuple[str, ...]:
    from medjax.losses import GAN_LOSS_KINDS

    return GAN_LOSS_KINDS


def _window_modes() -> tuple[str, ...]:
    from medjax.inference import WINDOW_MODES

    return WINDOW_MODES


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")  # what medjax trains in
POS, NONNEG = Int(1), Int(0)
FRACTION, PROB = Float(0, 1, hi_open=True), Float(0, 1)
SIZE = Seq(Int(1), (0, 2, 3))  # () or a 2D / 3D size
NAMES = Seq(Str())
WEIGHT = Float(0)

RULES: dict[str, Check] = {
    # -- what runs ---------------------------------------------------------------------------
    "task": Str(),
    "seed": Int(0),
    "num_steps": POS,
    "batch_size": POS,
    "eval_batch_size": POS,
    "grad_accum_steps": POS,
    "log_every": POS,
    "eval_every": POS,
    "checkpoint_every": POS,
    "keep_checkpoints": POS,
    "sample_every": NONNEG,
    "num_pictures": NONNEG,
    "best_metric": Str(),
    "best_mode": Str(("max", "min")),
    "tensorboard": Bool(),
    "nonfinite": Str(("stop", "skip")),
    # -- scale -------------------------------------------------------------------------------
    "num_devices": NONNEG,
    "fsdp": POS,
    "replicas": POS,
    "replica_lr_scales": Seq(Float(0, lo_open=True)),
    "replica_mode": Str(("auto", "vmap", "unroll")),
    # -- sizes and task options --------------------------------------------------------------
    "crop_size": SIZE,
    "patch_size": SIZE,
    "ema_decay": FRACTION,
    "n_critic": POS,
    "pool_size": NONNEG,
    "predict_direction": Str(("ab", "ba")),
    "target": Str(),
    # -- augmentation ------------------------------------------------------------------------
    "augment.enabled": Bool(),
    "augment.flip_axes": Seq(Int(0, 2)),
    "augment.rot90": Bool(),
    "augment.*_prob": PROB,
    "augment.rotate_deg": Float(0, 180),
    "augment.scale_range": Seq(Float(0, lo_open=True), (2,)),
    "augment.translate_frac": Float(0, 0.5),
    "augment.intensity_scale": Float(0, 1),
    "augment.intensity_shift": Float(0),
    "augment.gamma_range": Seq(Float(0, lo_open=True), (2,)),
    # -- data --------------------------------------------------------------------------------
    "data.source": Str(),
    "data.layout": Str(),
    "data.backend": Str(),
    "data.directory": Str(),
    "data.val_directory": Str(),
    "data.shared_folder": Str(),
    "data.train_split": Str(),
    "data.val_split": Str(),
    "data.tfds_*": Str(),
    "data.images": Str(),
    "data.masks": Str(),
    "data.image_suffix": Str(),
    "data.mask_suffix": Str(),
    "data.domain_*": Str(),
    "data.region": Str(),
    "data.normalize": Str(),
    "data.modalities": NAMES,
    "data.source_modalities": NAMES,
    "data.target_modalities": NAMES,
    "data.class_names": NAMES,
    "data.label_values": Seq(Seq(Int(), (2,))),  # (stored value, class) pairs
    "data.num_classes": NONNEG,
    "data.channels": NONNEG,
    "data.source_channels": POS,
    "data.target_channels": POS,
    "data.spatial_dims": Int(2, 3),
    "data.image_size": SIZE,
    "data.slice_crop": SIZE,
    "data.spacing": Seq(Float(0, lo_open=True), (0, 3)),
    "data.scale": Float(0, lo_open=True),
    "data.clip_percentiles": Seq(Float(0, 100), (0, 2)),
    "data.crop_margin": NONNEG,
    "data.mask_threshold": Float(),
    "data.brain_mask": Str(("file", "nonzero")),
    "data.fg_fraction": PROB,
    "data.balance_classes": Bool(),
    "data.patches_per_case": POS,
    "data.max_examples": NONNEG,
    "data.shards": NONNEG,
    "data.val_ids": Seq(Either((Str(), Int()))),
    "data.val_slices": Seq(Int(0), (0, 2)),
    "data.val_gap": NONNEG,
    "data.val_fraction": FRACTION,
    # -- evaluation and inference ------------------------------------------------------------
    "eval.classifier_workdir": Str(),
    "eval.num_samples": NONNEG,
    "inference.mode": Str(_window_modes),
    "inference.overlap": FRACTION,
    "inference.sigma_scale": Float(0, lo_open=True),
    "inference.window": SIZE,
    "inference.window_batch": POS,
    # -- losses ------------------------------------------------------------------------------
    "loss.name": Str(),
    "loss.kind": Str(_gan_losses),
    "loss.include_background": Bool(),
    "loss.*_weight": WEIGHT,
    # -- models ------------------------------------------------------------------------------
    "model*.dtype": Str(COMPUTE_DTYPES),
    "model.spatial_dims": Int(2, 3),
    "model.features": Seq(POS),
    "model.norm": Str(),
    "model.activation": Str(_activations),
    "model.residual": Bool(),
    "model.attention_gates": Bool(),
    "model*.dropout": FRACTION,
    "model.discriminator.features": Either((POS, Seq(POS))),
    "model.discriminator.norm": Str(),
    "model.discriminator.num_layers": POS,
    "model.discriminator.spectral_norm": Bool(),
    "model.generator.features": POS,
    "model.generator.base_features": POS,
    "model.generator.max_features": POS,
    "model.generator.latent_dim": POS,
    "model.generator.num_blocks": NONNEG,
    "model.generator.num_downs": POS,
    "model.generator.norm": Str(),
    "model.generator.head": Str(_generator_heads),
    # -- optimizers (optimizer, optimizer_g, optimizer_d) -----------------------------------
    "optimizer*.name": Str(),
    "optimizer*.schedule": Str(),
    "optimizer*.learning_rate": Float(0, lo_open=True),
    "optimizer*.warmup_steps": NONNEG,
    "optimizer*.decay_start": NONNEG,
    "optimizer*.grad_clip_norm": WEIGHT,
    "optimizer*.b1": FRACTION,
    "optimizer*.b2": FRACTION,
    "optimizer*.weight_decay": WEIGHT,
}


def rule_for(key: str) -> Check | None:
    """The rule of a dotted key: an exact entry first, else the first matching pattern."""
    if key in RULES:
        return RULES[key]
    for pattern, check in RULES.items():
        if any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(key, pattern):
            return check
    return None


def _plain(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return not isinstance(v, float) or math.isfinite(v)
    return isinstance(v, (list, tuple)) and all(_plain(x) for x in v)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A config (`ConfigDict` or nested dicts, e.g. a loaded `config.json`) as
    `{"dotted.key": value}` over its leaves."""
    out = {}
    for k in node.keys():
        v = node[k]
        if isinstance(v, Mapping) or hasattr(v, "keys"):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def problems(config: Any) -> list[str]:
    """Every problem of `config`, one line each (empty when it is valid)."""
    found = []
    values = flatten(config)
    for key, v in values.items():
        check = rule_for(key)
        why = check(v) if check is not None else (None if _plain(v) else "a plain value")
        if why:
            found.append(f"config.{key}={v!r}: expected {why}")
    # relations between keys
    get = values.get
    bs, accum = get("batch_size"), get("grad_accum_steps", 1)
    if _is_int(bs) and _is_int(accum) and bs > 0 and accum > 0 and bs % accum:
        found.append(
            f"config.grad_accum_steps={accum}: must divide config.batch_size={bs} "
            "(each micro-batch is batch_size / grad_accum_steps)"
        )
    replicas, scales = get("replicas", 1), get("replica_lr_scales") or ()
    if _is_int(replicas) and isinstance(scales, (list, tuple)) and scales:
        if len(scales) != replicas:
            found.append(
                f"config.replica_lr_scales has {len(scales)} entries for config.replicas={replicas}"
            )
    return found


def validate(config: Any) -> None:
    """Raises `ConfigError` listing every invalid key of `config` (types, ranges, relations)."""
    found = problems(config)
    if found:
        raise ConfigError(found)
