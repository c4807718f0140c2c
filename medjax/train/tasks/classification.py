"""Image classification (MedMNIST-style) with a small N-D CNN (`medjax.models.Classifier`).

Cross-entropy, Adam, on-device flips / small affine / intensity augmentation; evaluation reports
accuracy, balanced accuracy and the ROC AUC of the positive class (binary tasks) on the validation
split. A finished run doubles as medjax's own feature extractor for GAN metrics: FID and KID in
`dcgan.py` / `wgan_gp.py` use the penultimate features of a classifier trained here on the same
real images (`feature_extractor(workdir)`), so nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax.data import transforms
from medjax.train.optim import make_optimizer, make_schedule


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve = P(score_pos > score_neg) + 0.5 P(tie) (Mann-Whitney U)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([pos, neg]))
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


class Task:
    """Classifier on `data.source="medmnist"` images (`[N, H, W, 1]` in [-1, 1], int labels).

    Config: `model` (`Classifier` fields), `data.{shared_folder, directory, image_size,
    num_classes}`, `optimizer`, `augment`.
    """

    progress_keys = ("loss",)
    summary_keys = ("accuracy", "balanced_accuracy", "auc", "loss")

    def __init__(self, config: Any):
        from medjax.models import Classifier

        self.config = config
        self.num_classes = int(config.data.num_classes)
        self.model = Classifier(num_classes=self.num_classes, **dict(config.model))
        self.schedule = make_schedule(config.optimizer, int(config.num_steps))
        self.tx = make_optimizer(config.optimizer, int(config.num_steps))
        aug = dict(config.augment)
        enabled = aug.pop("enabled", True)
        aug = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in aug.items()}
        self.augment = transforms.AugmentConfig(**aug) if enabled else None

    def load_data(self) -> dict[str, Any]:
        from medjax.data import image_sets
        from medjax.data.paths import data_dir

        cfg = self.config.data
        if str(cfg.source) != "medmnist":
            raise ValueError(f"config.data.source={cfg.source!r}: classification reads 'medmnist'")
        path = str(cfg.get("directory") or "") or data_dir(str(cfg.shared_folder))
        size = tuple(int(s) for s in (cfg.get("image_size") or ())) or None
        out = {}
        for split, name in (("train", "train"), ("eval", "val")):
            d = image_sets.load_medmnist(path, name, size=size)
            bad = sorted(set(np.unique(d["label"]).tolist()) - set(range(self.num_classes)))
            if bad:
                raise ValueError(
                    f"{path} ({name}): labels {bad} outside 0..{self.num_classes - 1} "
                    f"(config.data.num_classes={self.num_classes})"
                )
            cap = int(cfg.get("max_examples") or 0) or len(d["label"])
            out[split] = {"image": d["image"][:cap], "label": d["label"][:cap].astype(np.int32)}
        return out

    def init(self, key: jax.Array, batch: Mapping[str, Any]) -> TrainState:
        k_init, base = jax.random.split(key)
        x = jnp.zeros((1, *batch["image"].shape[1:]), jnp.float32)
        variables = self.model.init(k_init, x, train=False)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=variables["params"],
            batch_stats=variables.get("batch_stats", {}),
            opt_state=self.tx.init(variables["params"]),
            rng=jax.random.key_data(base),
        )

    def _variables(self, state: TrainState, params: Any = None) -> dict[str, Any]:
        params = state.params if params is None else params
        return {
            "params": params,
            **({"batch_stats": state.batch_stats} if state.batch_stats else {}),
        }

    def train_step(self, state: TrainState, batch: Mapping[str, jax.Array]):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        k_aug, k_drop = jax.random.split(key)
        image = batch["image"]
        if self.augment is not None:
            image, _ = transforms.augment_batch(k_aug, image, None, self.augment)

        def loss_fn(params):
            kw = {"rngs": {"dropout": k_drop}}
            if state.batch_stats:
                logits, upd = self.model.apply(
                    self._variables(state, params), image, train=True, mutable=["batch_stats"], **kw
                )
                stats = upd["batch_stats"]
            else:
                logits, stats = (
                    self.model.apply(self._variables(state, params), image, train=True, **kw),
                    {},
                )
            loss = optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), batch["label"]
            )
            return jnp.mean(loss), stats

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=stats,
            opt_state=opt_state,
        )
        return state, {"loss": loss, "learning_rate": self.schedule(state.step - 1)}

    def predict(self, state: TrainState, image: jax.Array) -> jax.Array:
        """Float32 logits `[B, num_classes]`."""
        return self.model.apply(self._variables(state), image, train=False).astype(jnp.float32)

    def features(self, state: TrainState, image: jax.Array) -> jax.Array:
        """Penultimate (global-average-pooled) features `[B, F]`, float32."""
        _, feats = self.model.apply(
            self._variables(state), image, train=False, return_features=True
        )
        return feats.astype(jnp.float32)

    def eval_step(self, state: TrainState, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        logits = self.predict(state, batch["image"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return {"logits": logits, "label": batch["label"], "loss": loss}

    def summarize(self, per_example: Mapping[str, np.ndarray]) -> dict[str, float]:
        logits, label = per_example["logits"], per_example["label"].astype(int)
        pred = logits.argmax(-1)
        recalls = [
            np.mean(pred[label == c] == c) for c in range(self.num_classes) if (label == c).any()
        ]
        out = {
            "accuracy": float(np.mean(pred == label)),
            "balanced_accuracy": float(np.mean(recalls)),
            "loss": float(np.mean(per_example["loss"])),
        }
        if self.num_classes == 2:
            probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), -1))[:, 1]
            out["auc"] = roc_auc(probs, label == 1)
        return out


def feature_extractor(workdir: str) -> Callable[[np.ndarray], np.ndarray]:
    """`images [N, H, W, C] -> features [N, F]` (numpy) from the best checkpoint of a
    classification run in `workdir` (its `config.json` decides the model)."""
    import json
    from pathlib import Path

    import ml_collections

    from medjax.train import loop

    path = Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: eval.classifier_workdir must be a medjax classification run"
        )
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
    if config.task != "classification":
        raise ValueError(f"{workdir} is a {config.task!r} run, not a classification run")
    shape = (1, *[int(s) for s in config.data.image_size], 1)
    spec = {"image": jax.ShapeDtypeStruct(shape, np.float32)}
    trainer, state = loop.restore(config, workdir, batch_spec=spec)

    def extract(images: np.ndarray) -> np.ndarray:
        return trainer.predict_all(state, images, method="features")

    return extract
