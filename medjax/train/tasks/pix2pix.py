"""Paired image-to-image translation: Pix2Pix (Isola et al. 2017, arXiv:1611.07004) in 2D and,
with `model.spatial_dims=3`, Vox2Vox (Cirillo et al. 2020, arXiv:2003.13653) in 3D.

Defaults follow the paper: a U-Net generator (`medjax.models.UNetGenerator`, dropout in the three
innermost decoder levels, tanh output), a conditional PatchGAN discriminator on the concatenation
(source, target) with 3 layers (70x70 receptive field in 2D), the non-saturating GAN loss halved
for D, L1 weight 100, Adam(2e-4, b1=0.5).

Two kinds of target (`config.target`):

* `"image"`: modality synthesis (e.g. FLAIR -> T1c). Images are scaled to [-1, 1] per case inside
  the brain mask; the reconstruction term is the L1 distance. Evaluation: MAE, PSNR and SSIM
  (`medjax.gan_metrics.translation_metrics`, data range 2) inside the brain mask, beside two
  trivial baselines: the source itself (identity) and the mean training target.
* `"label"`: segmentation as translation (Vox2Vox's BraTS task). The generator outputs class
  logits; the discriminator sees (source, softmax) for fakes and (source, one-hot truth) for real
  pairs; the reconstruction term is Dice + cross-entropy (`medjax.losses.dice_ce_loss`) with
  weight `loss.recon_weight`. Evaluation: Dice and sensitivity per BraTS region, beside the
  trivial baseline that predicts the whole brain mask as every region (`_brain`).

Data (`config.data.source`): `brats_slices` (2D axial slices of BraTS-layout folders),
`tcia` (the co-registered TCIA Brain-Tumor-Progression exam; validation = a block of slices),
`brats_volumes` (3D: whole cases, cropped to the brain, resampled to `data.spacing`, trained on
`patch_size` patches, evaluated on whole validation volumes by sliding window).
Batches carry `image = [source channels, target channels, brain mask]` and `label` (BraTS classes).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax import losses, metrics, visualize
from medjax.train import gan
from medjax.train.gan import GANState


class Task:
    """Conditional GAN `G: source -> target` with a conditional PatchGAN `D(source, target)`.

    Config: `target` ("image" | "label"), `model.generator` (`UNetGenerator` fields),
    `model.discriminator` (`PatchGAN` fields), `loss.{kind, recon_weight}`, `optimizer_g`,
    `optimizer_d`, `ema_decay`, `data.{source, source_modalities, target_modalities, ...}`,
    3D: `patch_size`, `data.spacing`, `inference.*`.
    """

    progress_keys = ("d_loss", "g_gan", "g_recon")
    networks = {"g": "optimizer_g", "d": "optimizer_d"}
    picture_name = "translations"

    def __init__(self, config: Any):
        from medjax.data import volumes
        from medjax.models import PatchGAN, UNetGenerator

        self.config = config
        self.target = str(config.get("target", "image"))
        if self.target not in ("image", "label"):
            raise ValueError(f"config.target={self.target!r} is not 'image' or 'label'")
        data = config.data
        self.source_mods = tuple(str(m) for m in data.source_modalities)
        self.target_mods = tuple(str(m) for m in data.get("target_modalities") or ())
        if self.target == "image" and not self.target_mods:
            raise ValueError("config.data.target_modalities is empty (target='image')")
        self.dims = int(config.model.get("spatial_dims", 2))
        self.cs = len(self.source_mods)
        self.regions = dict(volumes.BRATS_REGIONS)
        self.num_classes = len(volumes.BRATS_CLASSES)
        self.ct = len(self.target_mods) if self.target == "image" else self.num_classes
        gcfg = dict(config.model.generator)
        if self.target == "label":
            gcfg["final_activation"] = "none"
        self.generator = UNetGenerator(out_channels=self.ct, spatial_dims=self.dims, **gcfg)
        self.discriminator = PatchGAN(spatial_dims=self.dims, **dict(config.model.discriminator))
        self.loss_kind = str(config.loss.kind)
        if self.loss_kind not in losses.GAN_LOSS_KINDS:
            raise ValueError(
                f"config.loss.kind={self.loss_kind!r} is not one of {losses.GAN_LOSS_KINDS}"
            )
        self.recon_weight = float(config.loss.recon_weight)
        self.ema_decay = float(config.get("ema_decay", 0.0))
        self.tx = gan.make_optimizers(config, self.networks, int(config.num_steps))
        self.patch_size = tuple(int(p) for p in (config.get("patch_size") or ()))
        self._baselines: dict[str, float] | None = None
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

    def _stack(self, d: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`{"image": [N, *, modalities + mask], "label": [N, *]}` from an image_sets dict."""
        mask = np.asarray(d["mask"], np.float32)[..., None]
        return {
            "image": np.concatenate([np.asarray(d["image"], np.float32), mask], -1),
            "label": np.asarray(d["label"], np.int32),
        }

    def load_data(self) -> dict[str, Any]:
        from medjax.data import image_sets
        from medjax.train.tasks.volume_segmentation import resolve_split_dir

        cfg = self.config.data
        source = str(cfg.source)
        size = tuple(int(s) for s in (cfg.get("image_size") or ())) or None
        cap = int(cfg.get("max_examples") or 0)
        if source == "brats_volumes":
            return self._load_volumes()
        if source == "brats_slices":
            kw = dict(layout=str(cfg.get("layout", "deepmedic")), modalities=self.modalities)
            kw["size"] = size
            train = image_sets.load_brats_slices(resolve_split_dir(cfg, "train"), **kw)
            val = image_sets.load_brats_slices(resolve_split_dir(cfg, "val"), **kw)
            train, val = self._stack(train), self._stack(val)
        elif source == "tcia":
            from medjax.data.paths import data_dir

            directory = str(cfg.get("directory") or "") or data_dir(str(cfg.shared_folder))
            d = self._stack(image_sets.load_tcia_series(directory, self.modalities, size=size))
            train, val = image_sets.split_slice_block(d, cfg.val_slices)
        else:
            raise ValueError(
                f"config.data.source={source!r} is not one of "
                "['brats_slices', 'brats_volumes', 'tcia']"
            )
        if cap:
            train = {k: v[:cap] for k, v in train.items()}
            val = {k: v[:cap] for k, v in val.items()}
        for split, d in (("train", train), ("validation", val)):
            if not len(d["label"]):
                raise ValueError(f"the {split} split of config.data.source={source!r} is empty")
        return {"train": train, "eval": val}

    def _load_volumes(self) -> dict[str, Any]:
        """3D: whole cases scaled to [-1, 1] in the brain mask, cropped and resampled."""
        from medjax.data import image_sets, transforms, volumes
        from medjax.train.tasks.volume_segmentation import resolve_split_dir

        cfg = self.config.data

        def prepare(case: Any) -> dict[str, Any]:
            ex = volumes.load_case(case, modalities=self.modalities)
            image = image_sets.scale_to_unit_range(ex["image"], ex["mask"])
            image = np.concatenate([image, ex["mask"][..., None].astype(np.float32)], -1)
            bbox = transforms.foreground_bbox(ex["mask"], margin=int(cfg.get("crop_margin", 4)))
            image = transforms.crop_to_bbox(image, bbox)
            label = transforms.crop_to_bbox(ex["label"], bbox)
            spacing = tuple(float(s) for s in ex["spacing"])
            target = tuple(float(s) for s in (cfg.get("spacing") or ()))
            if target:
                image, spacing = transforms.resample_to_spacing(image, spacing, target, order=1)
                label, _ = transforms.resample_to_spacing(
                    label, ex["spacing"], target, order=0, shape=image.shape[:-1]
                )
                image[..., -1] = image[..., -1] > 0.5
            return {
                "id": ex["id"],
                "image": image.astype(np.float32),
                "label": label.astype(np.int32),
            }

        def read(which: str) -> list[dict[str, Any]]:
            found = volumes.find_cases(
                resolve_split_dir(cfg, which), str(cfg.get("layout", "deepmedic")),
                modalities=self.modalities,
            )  # fmt: skip
            if cfg.get("max_examples"):
                found = found[: int(cfg.max_examples)]
            if not found:
                raise ValueError(f"no {which} cases for config.data.source='brats_volumes'")
            return [prepare(c) for c in found]

        return {"train_volumes": read("train"), "eval_volumes": read("val")}

    def batch_spec(self, global_batch_size: int) -> dict[str, jax.ShapeDtypeStruct] | None:
        """Patch batch shapes (3D); None for 2D runs (shapes come from the in-memory arrays)."""
        if not self.patch_size:
            return None
        channels = len(self.modalities) + 1
        return {
            "image": jax.ShapeDtypeStruct(
                (global_batch_size, *self.patch_size, channels), np.float32
            ),
            "label": jax.ShapeDtypeStruct((global_batch_size, *self.patch_size), np.int32),
        }

    def make_train_iter(self, data: Mapping[str, Any], **kw: Any) -> Iterator[dict[str, jax.Array]]:
        """In-memory slices (2D) or patches of the volumes (3D), a pure function of (seed, step)."""
        from medjax.data import patches, pipeline

        if "train_volumes" not in data:
            return pipeline.make_train_iter(data["train"], **kw)
        return patches.make_patch_train_iter(
            data["train_volumes"],
            patch_size=self.patch_size,
            fg_fraction=float(self.config.data.get("fg_fraction", 0.5)),
            image_pad=-1.0,
            **kw,
        )

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

    def init(self, key: jax.Array, batch: Mapping[str, Any]) -> GANState:
        kg, kd, base = jax.random.split(key, 3)
        spatial = self.patch_size or tuple(batch["image"].shape[1:-1])
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
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        k_drop, _ = jax.random.split(key)
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
            real_l, s = gan.apply_model(
                self.discriminator, params_d, sd, jnp.concatenate([source, target], -1), train=True
            )
            fake_l, s = gan.apply_model(
                self.discriminator, params_d, s, jnp.concatenate([source, fake], -1), train=True
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
        params = state.ema["g"] if state.ema else state.params["g"]
        out, _ = gan.apply_model(
            self.generator, params, state.batch_stats["g"], image[..., : self.cs], train=False
        )
        return self._as_target(out)

    # -- evaluation (host) -------------------------------------------------------------------------
    def _predictions(self, trainer: Any, state: GANState, data: Mapping[str, Any]):
        """(source, target, mask, label, prediction) per validation example / volume."""
        if "eval_volumes" in data:
            for v in data["eval_volumes"]:
                pred = trainer.sliding_window(state, v["image"])
                img = v["image"]
                yield (
                    img[None, ..., : self.cs],
                    img[None, ..., self.cs : -1],
                    img[None, ..., -1] > 0.5,
                    v["label"][None],
                    pred[None],
                )
            return
        arrays = data["eval"]
        pred = trainer.predict_all(state, arrays["image"])
        img = arrays["image"]
        yield img[..., : self.cs], img[..., self.cs : -1], img[..., -1] > 0.5, arrays["label"], pred

    def _image_metrics(self, pred, target, mask) -> dict[str, np.ndarray]:
        from medjax import gan_metrics

        m = gan_metrics.translation_metrics(pred, target, mask, data_range=2.0)
        return {k: np.asarray(v, np.float64) for k, v in m.items()}

    def baselines(self, data: Mapping[str, Any], cached: list[tuple]) -> dict[str, float]:
        """Trivial baselines over the `_predictions` tuples `cached`, computed once (they do not
        depend on the model). Image targets: identity (the source as the prediction; when
        channel counts agree) and mean image (the mean training target, per voxel). Label
        targets: `_brain`, every brain voxel predicted as every region (Dice
        `2|T| / (|brain| + |T|)`, sensitivity 1): the score of knowing only the brain mask."""
        if self._baselines is not None:
            return self._baselines
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
        if self.target == "image" and "train" in data:
            mean_img = data["train"]["image"][..., self.cs : -1].mean(0, keepdims=True)
            rows = _mean_over_examples(
                self._image_metrics(np.broadcast_to(mean_img, tgt.shape), tgt, mask)
                for _, tgt, mask, _, _ in cached
            )
            out.update({f"{k}_mean_image": v for k, v in rows.items()})
        self._baselines = out
        return out

    def evaluate(
        self, trainer: Any, state: GANState, data: Mapping[str, Any]
    ) -> tuple[dict[str, float], np.ndarray]:
        cached = list(self._predictions(trainer, state, data))
        n = int(self.config.get("num_pictures", 4))
        panels = []
        for source, target, mask, label, pred in cached:
            if len(panels) < n:
                panels.extend(self.panels(source, target, mask, label, pred))
        summary = _mean_over_examples(
            self._image_metrics(pred, target, mask)
            if self.target == "image"
            else self._label_metrics(pred, label)
            for _, target, mask, label, pred in cached
        )
        summary.update(self.baselines(data, cached))
        return summary, visualize.grid(panels[:n], cols=1, uneven=True)

    def _label_metrics(self, probs: np.ndarray, label: np.ndarray) -> dict[str, np.ndarray]:
        pred = np.argmax(probs, -1)
        return self._region_metrics({n: np.isin(pred, c) for n, c in self.regions.items()}, label)

    def _region_metrics(
        self, preds: Mapping[str, np.ndarray], label: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Dice and sensitivity per region of boolean region predictions `{name: [B, *]}`."""
        out: dict[str, np.ndarray] = {}
        for name, classes in self.regions.items():
            p = jnp.asarray(preds[name], jnp.int32)
            t = jnp.asarray(np.isin(label, classes), jnp.int32)
            m = metrics.segmentation_metrics(p, t, 2)
            out[f"dice_{name}"] = np.asarray(m["dice"])[:, 1]
            out[f"sensitivity_{name}"] = np.asarray(m["sensitivity"])[:, 1]
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


def _mean_over_examples(rows: Iterable[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """NaN-skipping mean over all examples of per-batch metric rows `{name: [B]}`."""
    acc: dict[str, list[np.ndarray]] = {}
    for row in rows:
        for k, v in row.items():
            acc.setdefault(k, []).append(np.asarray(v))
    return {k: float(np.nanmean(np.concatenate(v))) for k, v in acc.items()}
