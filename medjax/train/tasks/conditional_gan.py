"""Class-conditional image generation: samples of a chosen class on demand (e.g. normal vs
pneumonia chest X-rays).

The DCGAN recipe (`medjax.train.gan.LatentGAN`) with both networks conditioned on the label: the
generator concatenates a learned class embedding to the latent vector (Mirza & Osindero 2014,
arXiv:1411.1784) and the discriminator is a projection discriminator (Miyato & Koyama 2018,
"cGANs with Projection Discriminator", arXiv:1802.05637): `D(x, y) = psi(phi(x)) + <V y, phi(x)>`.
Real batches carry their labels; fakes are drawn with the labels of the real batch. With
`data.balance_classes` the real batches are drawn class-balanced (each image with probability
inversely proportional to its class size), so a minority class is trained as often as the
majority one.

Data: any labelled image set (`data.source` "medmnist" or "class_folders"), `data.num_classes`
and `data.class_names`. Evaluation, per class `c`, on fixed latent vectors:

* `swd_mean_<c>`: SWD of generated class-`c` images to one half of the validation images of
  class `c`, beside `swd_mean_<c>_real` (the other half: the floor) and `swd_mean_<c>_trivial`
  (the per-pixel Gaussian of the training images of class `c`);
* with `eval.classifier_workdir` (a medjax classifier of the same classes), `accuracy_<c>`: the
  fraction of generated class-`c` images the classifier calls `c`, beside `accuracy_<c>_real` on
  the real half: does the generator make the class it is asked for?

`swd_mean`, `class_accuracy` and their `_real` / `_trivial` values average over the classes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medjax import gan_metrics, visualize
from medjax.train import gan, task


class Task(gan.LatentGAN):
    """Class-conditional DCGAN with a projection discriminator (see the module docstring)."""

    conditional = True
    picture_name = "eval_samples_by_class"

    def __init__(self, config: Any):
        super().__init__(config)
        names = tuple(str(n) for n in (config.data.get("class_names") or ()))
        self.class_names = names or tuple(f"class{c}" for c in range(self.num_classes))
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"config.data.class_names {self.class_names} must name the "
                f"{self.num_classes} classes of config.data.num_classes"
            )
        per_class = [
            f"{m}_{c}{b}"
            for c in self.class_names
            for m in ("swd_mean", "accuracy")
            for b in ("", "_real")
        ]
        self.summary_keys = (
            "swd_mean", "swd_mean_real", "swd_mean_trivial", "class_accuracy",
            "class_accuracy_real", *per_class,
        )  # fmt: skip

    def training_picture(self, runner: task.Runner, state: gan.GANState) -> np.ndarray:
        """One row of (up to 8) fixed-noise samples per class, the same latents in every row."""
        n = max(1, min(8, int(self.config.get("num_pictures", 64)) // self.num_classes))
        rows = [
            self.generate(runner, state, n, labels=np.full(n, c)) for c in range(self.num_classes)
        ]
        return visualize.sample_grid(np.concatenate(rows), cols=n)

    def evaluate(
        self, runner: task.Runner, state: gan.GANState, eval_set: Any, num_pictures: int = 64
    ) -> task.Evaluation:
        seed = int(self.config.seed)
        labels, images = np.asarray(eval_set["label"]), eval_set["image"]
        classify = self._cache["classify"] if self._features(runner) is not None else None

        def swd(x: np.ndarray, reference: np.ndarray) -> float:
            s = gan_metrics.swd(gan.axial_slices(x), gan.axial_slices(reference), seed=seed)
            return float(s["swd_mean"])

        def called(x: np.ndarray, c: int) -> float:
            return float(np.mean(classify(x).argmax(-1) == c))

        def baselines() -> dict[str, float]:  # per class: real-vs-real, trivial, real accuracy
            out: dict[str, float] = {}
            for c, name in enumerate(self.class_names):
                real_sample, reference, half = self.halves(images[labels == c])
                moments = eval_set["train_moments_by_class"][c]
                trivial = gan_metrics.pixel_gaussian(moments, half, seed=seed)
                out[f"swd_mean_{name}_real"] = swd(real_sample, reference)
                out[f"swd_mean_{name}_trivial"] = swd(trivial, reference)
                if classify is not None:
                    out[f"accuracy_{name}_real"] = called(real_sample, c)
            return out

        summary: dict[str, float] = {}
        for c, name in enumerate(self.class_names):
            _, reference, half = self.halves(images[labels == c])
            fake = self.generate(runner, state, half, labels=np.full(half, c))
            summary[f"swd_mean_{name}"] = swd(fake, reference)
            if classify is not None:
                summary[f"accuracy_{name}"] = called(fake, c)
        summary.update(task.computed_once(eval_set, "class_baselines", baselines))
        for prefix in ("swd_mean", "accuracy"):
            out = "class_accuracy" if prefix == "accuracy" else prefix
            for suffix in ("", "_real", "_trivial"):
                vals = [summary.get(f"{prefix}_{n}{suffix}") for n in self.class_names]
                if all(v is not None for v in vals):
                    summary[f"{out}{suffix}"] = float(np.mean(vals))
        pictures = {"by_class": self.training_picture(runner, state)} if num_pictures else {}
        return task.Evaluation(summary, pictures=pictures)

    def _eval_set(self, reference: dict[str, np.ndarray], train: dict[str, np.ndarray]):
        x, y = train["image"], train["label"]
        by_class = [gan.pixel_moments(x[y == c]) for c in range(self.num_classes)]
        return {**reference, "train_moments_by_class": by_class}
