"""Paired image-to-image translation: Pix2Pix (Isola et al. 2017, arXiv:1611.07004) in 2D and,
with `model.spatial_dims=3`, Vox2Vox (Cirillo et al. 2020, arXiv:2003.13653) in 3D.

Defaults follow the paper: a U-Net generator (`medjax.models.UNetGenerator`, dropout in the three
innermost decoder levels, tanh output), a conditional PatchGAN discriminator on the concatenation
(source, target) with 3 layers (70x70 receptive field in 2D), the non-saturating GAN loss halved
for D, L1 weight 100, Adam(2e-4, b1=0.5).

Two kinds of target (`config.target`):

* `"image"`: synthesis (e.g. FLAIR -> T1c). Images are in [-1, 1]; the reconstruction term is the
  L1 distance. Evaluation: MAE, PSNR and SSIM (`medjax.gan_metrics.translation_metrics`, data
  range 2) inside the mask (the brain; every pixel for image folders), beside two trivial
  baselines: the source itself (identity, when channel counts agree) and the mean training
  target.
* `"label"`: segmentation as translation (Vox2Vox's BraTS task). The generator outputs class
  logits; the discriminator sees (source, softmax) for fakes and (source, one-hot truth) for real
  pairs; the reconstruction term is Dice + cross-entropy (`medjax.losses.dice_ce_loss`) with
  weight `loss.recon_weight`. Evaluation: Dice and sensitivity per BraTS region, beside the
  trivial baseline that predicts the whole brain mask as every region (`_brain`).

Data (`config.data.source`, `medjax.data.image_sets.load_paired_images`): `pairs` (folders
`A/` and `B/` of files with matching names, as pytorch-CycleGAN-and-pix2pix's combine_A_and_B
input; 2D files or 3D NIfTI, any channels: `data.source_channels` / `data.target_channels`),
`aligned` (that repo's side-by-side `[A | B]` images), `brats_slices` (2D axial slices of
BraTS-layout folders), `tcia` (the co-registered TCIA exam), `brats_volumes` (3D: whole cases,
cropped to the brain, resampled to `data.spacing`, trained on `patch_size` patches, evaluated
on whole volumes by sliding window). Batches carry `image = [source, target, mask]` channels and
`label` (classes; zeros without).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax import gan_metrics, losses, metrics, parallel, visualize
from medjax.data import image_sets, io, transforms, volumes
from medjax.train import gan, task, translate
from medjax.train.gan import GANState
from medjax.train.state import step_key

FOLDER_SOURCES = ("pairs", "aligned")


def _mean_over_examples(rows: Iterable[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """NaN-skipping mean over all examples of per-batch metric rows `{name: [B]}`."""
    acc: dict[str, list[np.ndarray]] = {}
    for row in rows:
        for k, v in row.items():
            acc.setdefault(k, []).append(np.atleast_1d(np.asarray(v, np.float64)))
    return metrics.summarize_columns({k: np.concatenate(v) for k, v in acc.items()})


class Task(task.Task):
    """Conditional GAN `G: source -> target` with a conditional PatchGAN `D(source, target)`.

    Config: `target` ("image" | "label"), `model.generator` (`UNetGenerator` fields),
    `model.discriminator` (`PatchGAN` fields), `loss.{kind, recon_weight}`, `optimizer_g`,
    `optimizer_d`, `ema_decay`, `data.{source, source_modalities, target_modalities,
    source_channels, target_channels, ...}`, 3D: `patch_size`, `data.spacing`, `inference.*`.
    """

    progress_keys = ("d_loss", "g_gan", "g_recon")
    networks = {"g": "optimizer_g", "d": "optimizer_d"}
    picture_name = "translations"

    def __init__(self, config: Any):
        super().__init__(config)
        from medjax.models import PatchGAN, UNetGenerator

        self.target = str(config.get("target", "image"))
        if self.target not in ("image", "label"):
            raise ValueError(f"config.target={self.target!r} is not 'image' or 'label'")
        data = config.data
        self.folders = str(data.source) in FOLDER_SOURCES
        self.source_mods = tuple(str(m) for m in data.get("source_modalities") or ())
        self.target_mods = tuple(str(m) for m in data.get("target_modalities") or ())
        if self.folders:
            self.cs = int(data.get("source_channels") or 1)
            n_target = int(data.get("target_channels") or 1)
        else:
            if not self.source_mods:
                raise ValueError("config.data.source_modalities is empty")
            if self.target == "image" and not self.target_mods:
                raise ValueError("config.data.target_modalities is empty (target='image')")
            self.cs, n_target = len(self.source_mods), len(self.target_mods)
        self.dims = int(config.model.get("spatial_dims", 2))
        self.regions = dict(volumes.BRATS_REGIONS)
        self.num_classes = len(volumes.BRATS_CLASSES)
        if self.target == "label" and self.folders:
            raise ValueError("config.target='label' needs labelled BraTS data, not image folders")
        self.ct = n_target if self.target == "image" else self.num_classes
        gcfg = dict(config.model.generator)
        if self.target == "label":
            gcfg["final_activation"] = "none"
        self.generator = UNetGenerator(out_channels=self.ct, spatial_dims=self.dims, **gcfg)
        self.discriminator = PatchGAN(spatial_dims=self.dims, **dict(config.model.discriminator))
        self.loss_kind = gan.loss_kind(config)
        self.recon_weight = float(config.loss.recon_weight)
        self.ema_decay = float(config.get("ema_decay", 0.0))
        self.tx = gan.make_optimizers(config, self.networks, int(config.num_steps))
        self.patch_size = tuple(int(p) for p in (config.get("patch_size") or ()))
        self._preview: Any = None
        if self.target == "image":
            self.summary_keys = tuple(
                f"{m}{b}" for m in ("mae", "psnr", "ssim") for b in ("", "_identity", "_mean_image")
            )
        else:
            self.summary_keys = tuple(
                f"dice_{r}{b}" for r in (*self.regions, "mean") for b in ("", "_brain")
            )

    # -- data --------------------------------------------------------------------------------------
    @property
    def modalities(self) -> tuple[str, ...]:
        """Modalities read per case: the sources, then the image targets."""
        return self.source_mods + (self.target_mods if self.target == "image" else ())

    @property
    def volumetric(self) -> bool:
        return str(self.config.data.source) == "brats_volumes"

    def _pack(self, d: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`{"image": [N, *, source + target + mask], "label": [N, *]}` of a paired set."""
        source, target = np.asarray(d["source"], np.float32), np.asarray(d["target"], np.float32)
        if source.shape[-1] != self.cs or (self.target == "image" and target.shape[-1] != self.ct):
            raise ValueError(
                f"images have {source.shape[-1]} source and {target.shape[-1]} target channels; "
                f"the config expects {self.cs} and {self.ct} (data.source_channels / "
                "data.target_channels)"
            )
        if self.target == "label":
            target = target[..., :0]
        mask = np.asarray(d["mask"], np.float32)[..., None]
        return {
            "image": np.concatenate([source, target, mask], -1),
            "label": np.asarray(d["label"], np.int32),
        }

    def _listing(self, split: str, directory: str | Path | None = None) -> Any:
        return image_sets.list_paired_images(
            self.config.data, split, self.modalities, directory=directory, n_source=self.cs
        )

    def _load(self, split: str, directory: str | Path | None = None) -> Any:
        return self._prepared(self._listing(split, directory).read())

    def _owned_train(self) -> tuple[Any, np.ndarray, int]:
        """(this process's training pairs, prepared: only its data shards are read; their
        shards; the number of training pairs)."""
        d, shard_ids, n = task.owned_examples(self._listing("train"), self.config)
        return self._prepared(d), shard_ids, n

    def _prepared(self, d: Any) -> Any:
        if self.volumetric:
            return [
                {
                    **v,
                    **self._pack(
                        {
                            "source": v["image"][..., : self.cs],
                            "target": v["image"][..., self.cs :],
                            "mask": v["mask"],
                            "label": v["label"],
                        }
                    ),
                }
                for v in d
            ]
        return self._pack(d)

    def _eval_set(self, data: Any, train: Any) -> dict[str, Any]:
        """The scored pairs and the mean training target (over every process's shards)."""
        mean = None
        if self.target == "image" and not self.volumetric:
            t = train["image"][..., self.cs : self.cs + self.ct]
            total = parallel.process_sum(t.sum(0, keepdims=True, dtype=np.float64))
            mean = (total / parallel.process_sum(len(t))).astype(np.float32)
        return {"data": data, "train_target_mean": mean}

    def load_data(self) -> task.TaskData:
        train, shard_ids, n = self._owned_train()
        eval_set = self._eval_set(self._load("val"), train)
        self._preview = eval_set["data"]
        if not self.volumetric:
            return task.TaskData.from_arrays(
                train,
                eval_set,
                num_eval=len(eval_set["data"]["image"]),
                shard_ids=shard_ids,
                num_train=n,
            )
        return task.TaskData.from_patches(
            train,
            eval_set,
            patch_size=self.patch_size,
            fg_fraction=float(self.config.data.get("fg_fraction", 0.5)),
            image_pad=-1.0,
            num_eval=len(eval_set["data"]),
            shard_ids=shard_ids,
            num_train=n,
        )

    def load_eval(self, directory: str | Path | None, split: str) -> dict[str, Any]:
        image_2d = self.target == "image" and not self.volumetric
        train = self._owned_train()[0] if image_2d else None
        return self._eval_set(self._load(split, directory), train)

    def synthetic_batch(self, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Random `[source, target, mask]` images and BraTS labels of one global batch."""
        rng = np.random.default_rng(seed)
        spatial = self.patch_size or tuple(int(s) for s in self.config.data.image_size)
        n_img = self.cs + (self.ct if self.target == "image" else 0)
        image = rng.uniform(-1, 1, (batch_size, *spatial, n_img + 1)).astype(np.float32)
        image[..., -1] = rng.uniform(0, 1, (batch_size, *spatial)) > 0.3  # mask channel
        label = rng.integers(0, self.num_classes, (batch_size, *spatial)).astype(np.int32)
        return {"image": image, "label": label}

    # -- pure functions ----------------------------------------------------------------------------
    def split(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(source, target, mask) of a batch: the target is images or one-hot labels."""
        image = batch["image"]
        source = image[..., : self.cs]
        mask = image[..., -1] > 0.5
        if self.target == "image":
            target = image[..., self.cs : self.cs + self.ct]
        else:
            target = jax.nn.one_hot(batch["label"], self.num_classes, dtype=image.dtype)
        return source, target, mask

    def init(self, key: jax.Array, batch_spec: Mapping[str, Any]) -> GANState:
        kg, kd, base = jax.random.split(key, 3)
        spatial = self.patch_size or tuple(batch_spec["image"].shape[1:-1])
        src = jnp.zeros((1, *spatial, self.cs), jnp.float32)
        pair = jnp.zeros((1, *spatial, self.cs + self.ct), jnp.float32)
        pg, sg = gan.init_model(self.generator, kg, src)
        pd, sd = gan.init_model(self.discriminator, kd, pair)
        return gan.new_state(
            {"g": pg, "d": pd}, {"g": sg, "d": sd}, self.tx, base, ema_decay=self.ema_decay
        )

    def _as_target(self, out: jax.Array) -> jax.Array:
        """Generator output in target space: images as is, label logits -> probabilities."""
        out = gan.to_float32(out)
        return jax.nn.softmax(out, -1) if self.target == "label" else out

    def recon_loss(self, out: jax.Array, target: jax.Array, label: jax.Array | None) -> jax.Array:
        if self.target == "label":
            return jnp.mean(losses.dice_ce_loss(gan.to_float32(out), label))
        return jnp.mean(losses.l1_loss(out, target))

    def train_step(self, state: GANState, batch: Mapping[str, jax.Array]):
        k_drop, _ = jax.random.split(step_key(state))
        source, target, _ = self.split(batch)
        pg, pd = state.params["g"], state.params["d"]
        sg, sd = state.batch_stats["g"], state.batch_stats["d"]

        # Generator update: fool D on (source, G(source)) + recon_weight * reconstruction.
        def g_loss_fn(params_g):
            out, new_sg = gan.apply_model(
                self.generator, params_g, sg, source, train=True, key=k_drop
            )
            fake = self._as_target(out)
            logits, _ = gan.apply_model(
                self.discriminator, pd, sd, jnp.concatenate([source, fake], -1), train=True
            )
            g_gan = jnp.mean(losses.gan_generator_loss(logits, self.loss_kind))
            recon = self.recon_loss(out, target, batch["label"])
            return g_gan + self.recon_weight * recon, (new_sg, fake, g_gan, recon)

        (g_total, (new_sg, fake, g_gan, recon)), g_grads = jax.value_and_grad(
            g_loss_fn, has_aux=True
        )(pg)

        # Discriminator update on real pairs and the (detached) fakes of this step.
        fake = jax.lax.stop_gradient(fake)

        def d_loss_fn(params_d):
            real_l, fake_l, s = gan.discriminate(
                self.discriminator,
                params_d,
                sd,
                jnp.concatenate([source, target], -1),
                jnp.concatenate([source, fake], -1),
            )
            # Halved as in the paper, "to slow down the rate at which D learns relative to G".
            loss = 0.5 * jnp.mean(losses.gan_discriminator_loss(real_l, fake_l, self.loss_kind))
            return loss, s

        (d_loss, new_sd), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(pd)
        state = gan.apply_gradients(
            state,
            {"g": g_grads, "d": d_grads},
            self.tx,
            batch_stats={"g": new_sg, "d": new_sd},
            ema_decay=self.ema_decay,
        )
        return state, {
            "g_total": g_total,
            "g_gan": g_gan,
            "g_recon": recon,
            "d_loss": d_loss,
            "g_grad_norm": optax.tree.norm(g_grads),
            "d_grad_norm": optax.tree.norm(d_grads),
        }

    def predict(self, state: GANState, image: jax.Array) -> jax.Array:
        """Translation of `image` (its first source channels are used): images `[B, *, Ct]` in
        the tanh range, or class probabilities for label targets (float32)."""
        out, _ = gan.apply_model(
            self.generator, gan.generator_params(state), state.batch_stats["g"],
            image[..., : self.cs], train=False,
        )  # fmt: skip
        return self._as_target(out)

    # -- evaluation (host) -------------------------------------------------------------------------
    def _predictions(self, runner: task.Runner, state: GANState, data: Any):
        """(source, target, mask, label, prediction) per evaluation batch / volume."""
        if self.volumetric:
            for v in data:
                img = v["image"]
                pred = runner.sliding_window(state, img)
                yield (
                    img[None, ..., : self.cs],
                    img[None, ..., self.cs : -1],
                    img[None, ..., -1] > 0.5,
                    v["label"][None],
                    pred[None],
                )
            return
        img = data["image"]
        pred = runner.map_batches(state, img, "predict")
        yield img[..., : self.cs], img[..., self.cs : -1], img[..., -1] > 0.5, data["label"], pred

    def _image_metrics(self, pred, target, mask) -> dict[str, np.ndarray]:
        m = gan_metrics.translation_metrics(pred, target, mask, data_range=2.0)
        return {k: np.asarray(v, np.float64) for k, v in m.items()}

    def baselines(self, eval_set: dict[str, Any], cached: list[tuple]) -> dict[str, float]:
        """Trivial baselines over the `_predictions` tuples `cached`, computed once per
        evaluation set (they do not depend on the model). Image targets: identity (the source
        as the prediction; when channel counts agree) and mean image (the mean training target,
        per voxel). Label targets: `_brain`, every brain voxel predicted as every region (Dice
        `2|T| / (|brain| + |T|)`, sensitivity 1): the score of knowing only the brain mask."""
        return task.computed_once(eval_set, "baselines", lambda: self._baselines(eval_set, cached))

    def _baselines(self, eval_set: Mapping[str, Any], cached: list[tuple]) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.target == "label":
            rows = _mean_over_examples(
                self._region_metrics(dict.fromkeys(self.regions, mask), label)
                for _, _, mask, label, _ in cached
            )
            out.update({f"{k}_brain": v for k, v in rows.items()})
        if self.target == "image" and self.cs == self.ct:
            rows = _mean_over_examples(
                self._image_metrics(src, tgt, mask) for src, tgt, mask, _, _ in cached
            )
            out.update({f"{k}_identity": v for k, v in rows.items()})
        mean_img = eval_set.get("train_target_mean")
        if self.target == "image" and mean_img is not None:
            rows = _mean_over_examples(
                self._image_metrics(np.broadcast_to(mean_img, tgt.shape), tgt, mask)
                for _, tgt, mask, _, _ in cached
            )
            out.update({f"{k}_mean_image": v for k, v in rows.items()})
        return out

    def evaluate(
        self, runner: task.Runner, state: GANState, eval_set: Any, num_pictures: int = 4
    ) -> task.Evaluation:
        cached = list(self._predictions(runner, state, eval_set["data"]))
        panels = []
        for source, target, mask, label, pred in cached:
            if len(panels) < num_pictures:
                panels.extend(self.panels(source, target, mask, label, pred))
        summary = _mean_over_examples(
            self._image_metrics(pred, target, mask)
            if self.target == "image"
            else self._label_metrics(pred, label)
            for _, target, mask, label, pred in cached
        )
        summary.update(self.baselines(eval_set, cached))
        pictures = {"translations": visualize.grid(panels[:num_pictures], cols=1, uneven=True)}
        return task.Evaluation(summary, pictures=pictures if panels[:num_pictures] else {})

    def _label_metrics(self, probs: np.ndarray, label: np.ndarray) -> dict[str, np.ndarray]:
        pred = np.argmax(probs, -1)
        return self._region_metrics({n: np.isin(pred, c) for n, c in self.regions.items()}, label)

    def _region_metrics(
        self, preds: Mapping[str, np.ndarray], label: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Dice and sensitivity per region of boolean region predictions `{name: [B, *]}`."""
        out: dict[str, np.ndarray] = {}
        for name, classes in self.regions.items():
            scores = [
                metrics.region_scores(
                    preds[name][i].astype(np.int32),
                    np.isin(label[i], classes).astype(np.int32),
                    {name: (1,)},
                    metrics=("dice", "sensitivity"),
                )
                for i in range(len(label))
            ]
            out[f"dice_{name}"] = np.array([s[f"dice_{name}"] for s in scores])
            out[f"sensitivity_{name}"] = np.array([s[f"sensitivity_{name}"] for s in scores])
        out["dice_mean"] = np.mean([out[f"dice_{n}"] for n in self.regions], axis=0)
        return out

    def panels(self, source, target, mask, label, pred) -> list[np.ndarray]:
        """source | target | prediction strips (middle axial slice of volumes)."""
        out = []
        for i in range(len(source)):
            s, t, p, lab = source[i], target[i], pred[i], label[i]
            if s.ndim == 4:  # volume: the axial slice with the most brain
                z = int(np.argmax(mask[i].reshape(-1, mask[i].shape[-1]).sum(0)))
                s, t, p, lab = s[:, :, z], t[:, :, z] if t.size else t, p[:, :, z], lab[:, :, z]
            src = visualize.to_uint8(s[..., 0], lo=-1, hi=1)
            if self.target == "image":
                row = [src, visualize.to_uint8(t[..., 0], lo=-1, hi=1)]
                row.append(visualize.to_uint8(p[..., 0], lo=-1, hi=1))
            else:
                row = [
                    src,
                    visualize.overlay(s[..., 0], lab),
                    visualize.overlay(s[..., 0], p.argmax(-1)),
                ]
            out.append(visualize.hstack(row))
        return out

    def training_picture(self, runner: task.Runner, state: GANState) -> np.ndarray:
        """source | target | translation of the first `num_pictures` validation examples."""
        if self._preview is None:
            raise self.cannot("draw a training picture before load_data()")
        n = int(self.config.get("num_pictures", 4))
        preview = (
            self._preview[:1] if self.volumetric else {k: v[:n] for k, v in self._preview.items()}
        )
        panels = [p for row in self._predictions(runner, state, preview) for p in self.panels(*row)]
        return visualize.grid(panels[:n], cols=1, uneven=True)

    # -- samples and prediction files --------------------------------------------------------------
    def sample(
        self, runner: task.Runner, state: GANState, num: int, seed: int | None = None
    ) -> dict[str, np.ndarray]:
        """Translations of the first `num` validation inputs (`source`, `target` beside them)."""
        data = self._load("val")
        if self.volumetric:
            vols = data[:num]
            return {
                "samples": np.stack([runner.sliding_window(state, v["image"]) for v in vols]),
                "source": np.stack([v["image"][..., : self.cs] for v in vols]),
            }
        images = data["image"][:num]
        return {
            "samples": runner.map_batches(state, images, "predict"),
            "source": images[..., : self.cs],
            "target": images[..., self.cs : -1],
        }

    def predict_files(
        self,
        runner: task.Runner,
        state: GANState,
        inputs: Sequence[str | Path],
        out_dir: str | Path,
        *,
        overwrite: bool = False,
    ) -> list[Path]:
        """Translations of image files / folders, NIfTI volumes or DICOM series
        (`medjax.train.translate`); for `brats_volumes` runs, BraTS-layout dataset or case
        folders (their source modalities), written on each case's own grid."""
        label = self.target == "label"
        if self.volumetric:
            return self._predict_cases(runner, state, inputs, Path(out_dir), overwrite)
        if self.cs != 1 and not self.folders:
            raise self.cannot(
                "translate single files", f"the model reads {self.cs} source modalities"
            )
        size = tuple(int(s) for s in (self.config.data.get("image_size") or ()))
        batch = lambda x: runner.map_batches(state, x, "predict")  # noqa: E731
        whole = lambda v: runner.map_batches(state, v[None], "predict")[0]  # noqa: E731
        return translate.translate_files(
            inputs,
            out_dir,
            translate_2d=batch if self.dims == 2 else None,
            translate_volume=whole if self.dims == 3 else None,
            image_size=size,
            channels=self.cs,
            label_output=label,
            overwrite=overwrite,
        )

    def _predict_cases(self, runner, state, inputs, out_dir: Path, overwrite: bool) -> list[Path]:
        layout = str(self.config.data.get("layout", "deepmedic"))
        cases = []
        for path in (Path(p) for p in inputs):
            try:
                cases.extend(volumes.find_cases(path, layout, modalities=self.source_mods))
            except FileNotFoundError:
                found = [
                    c
                    for c in volumes.find_cases(path.parent, layout, modalities=self.source_mods)
                    if c.id == path.name
                ]
                if not found:
                    raise
                cases.extend(found)
        targets = [out_dir / f"{c.id}.nii.gz" for c in cases]
        io.refuse_existing(targets, overwrite, "prediction")
        written = []
        for case, target in zip(cases, targets, strict=True):
            prep = image_sets.prepare_volume_pair(case, self.config.data, self.source_mods)
            out = runner.sliding_window(state, prep["image"])
            full = transforms.to_original_grid(out, prep, 0.0 if self.target == "label" else -1.0)
            if self.target == "label":
                native = volumes.to_native(np.argmax(full, -1), prep["label_scheme"])
                written.append(
                    io.write_nifti(
                        target, native, prep["geometry"], dtype=np.uint8, overwrite=overwrite
                    )
                )
            else:
                vol = full[..., 0] if full.shape[-1] == 1 else full
                written.append(io.write_nifti(target, vol, prep["geometry"], overwrite=overwrite))
        return written
