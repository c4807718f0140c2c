"""Unconditional image generation with a DCGAN (Radford et al. 2016, arXiv:1511.06434).

Defaults follow the paper: a transposed-convolution generator with batch norm and ReLU (tanh
output), a strided-convolution discriminator with LeakyReLU(0.2), Adam(2e-4, b1=0.5), the
non-saturating loss. `config.loss.kind` switches to LSGAN (Mao et al. 2017) or hinge (Lim & Ye
2017); `model.discriminator.spectral_norm` adds spectral normalisation (Miyato et al. 2018);
`ema_decay > 0` keeps an exponential moving average of the generator, used for samples and
evaluation. The models are N-D: `model.spatial_dims=3` with a 3-D `data.image_size` generates
volumes (shown as slice montages).

One jitted step = one discriminator update on a real batch and a fresh fake batch, then one
generator update (two `value_and_grad` calls). WGAN-GP (`wgan_gp.py`) subclasses this task.

Evaluation (`evaluate`), on a fixed set of latent vectors so numbers are comparable across steps:
`swd_mean` (sliced Wasserstein distance on Laplacian-pyramid patches, Karras et al. 2018, see
`medjax.gan_metrics`) between generated images and one random half of the validation images,
beside `swd_mean_real` = the same distance from the OTHER half of the validation images (the
real-vs-real floor: same reference, same set size); with `eval.classifier_workdir` (a
`classification` run of medjax on the same data) also FID and KID on that classifier's
penultimate features, each with its real-vs-real value. The same metrics of the trivial generator
(`gan_metrics.pixel_gaussian` of the training images: every pixel drawn independently with its
own mean and standard deviation) are reported with the suffix `_trivial`: a GAN should land
between `_trivial` (no spatial structure) and `_real` (the sampling noise floor). (Training
images are not used as the real sample: the classifier has seen them, so their features are not
distributed like unseen images'.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax import gan_metrics, losses, visualize
from medjax.train import gan
from medjax.train.gan import GANState


def load_images(data_cfg: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """`{"train": [N, *spatial, C], "val": [M, *spatial, C]}` float32 in [-1, 1].

    Sources: `medmnist` (a MedMNIST .npz file or folder; `image_size` upsamples), `brats_flair`
    (axial brain slices of the first of `modalities` from `directory` / `val_directory`, or the
    shared BraTS folders), `brats_patches` (3D: `patches_per_case` patches of `image_size`
    centred on random brain voxels of each case, scaled to [-1, 1] in the brain mask and
    resampled to `spacing`; a fixed seeded set, so every epoch sees the same patches).
    """
    from medjax.data import image_sets
    from medjax.data.paths import data_dir

    source = str(data_cfg.source)
    size = tuple(int(s) for s in (data_cfg.get("image_size") or ())) or None
    directory = str(data_cfg.get("directory") or "")
    if source == "medmnist":
        path = directory or data_dir(str(data_cfg.shared_folder))
        train = image_sets.load_medmnist(path, "train", size=size)["image"]
        val = image_sets.load_medmnist(path, "val", size=size)["image"]
    elif source == "brats_flair":
        from medjax.train.tasks.volume_segmentation import resolve_split_dir

        mods = tuple(data_cfg.get("modalities") or ("flair",))[:1]
        kw = dict(layout=str(data_cfg.get("layout", "deepmedic")), modalities=mods, size=size)
        train = image_sets.load_brats_slices(resolve_split_dir(data_cfg, "train"), **kw)["image"]
        val = image_sets.load_brats_slices(resolve_split_dir(data_cfg, "val"), **kw)["image"]
    elif source == "brats_patches":
        from medjax.train.tasks.volume_segmentation import resolve_split_dir

        train = brats_patches(resolve_split_dir(data_cfg, "train"), data_cfg, seed=0)
        val = brats_patches(resolve_split_dir(data_cfg, "val"), data_cfg, seed=1)
    else:
        raise ValueError(
            f"config.data.source={source!r} is not one of "
            "['brats_flair', 'brats_patches', 'medmnist']"
        )
    cap = int(data_cfg.get("max_examples") or 0)
    if cap:
        train, val = train[:cap], val[:cap]
    return {"train": np.asarray(train, np.float32), "val": np.asarray(val, np.float32)}


def brats_patches(directory: Any, data_cfg: Mapping[str, Any], seed: int) -> np.ndarray:
    """`[cases * patches_per_case, *image_size, 1]` brain-centred 3D patches of the first of
    `data_cfg.modalities` (see `load_images`), padded with -1 outside the volume."""
    from medjax.data import image_sets, patches, transforms, volumes

    size = tuple(int(s) for s in data_cfg.image_size)
    mods = tuple(data_cfg.get("modalities") or ("flair",))[:1]
    spacing = tuple(float(s) for s in (data_cfg.get("spacing") or ()))
    per_case = int(data_cfg.get("patches_per_case", 64))
    rng = np.random.default_rng(seed)
    layout = str(data_cfg.get("layout", "deepmedic"))
    out = []
    for case in volumes.find_cases(directory, layout, modalities=mods):
        ex = volumes.load_case(case, modalities=mods)
        image = image_sets.scale_to_unit_range(ex["image"], ex["mask"])
        mask = ex["mask"].astype(np.uint8)
        if spacing:
            image, _ = transforms.resample_to_spacing(image, ex["spacing"], spacing, order=1)
            mask, _ = transforms.resample_to_spacing(
                mask, ex["spacing"], spacing, order=0, shape=image.shape[:-1]
            )
        starts = patches.sample_patch_starts(
            rng, image.shape[:-1], size, fg_index=patches.foreground_index(mask),
            fg_fraction=1.0, n=per_case,
        )  # fmt: skip
        out.extend(patches.extract_patch(image, st, size, pad_value=-1.0) for st in starts)
    if not out:
        raise ValueError(f"no cases found in {directory} for config.data.source='brats_patches'")
    return np.stack(out).astype(np.float32)


class Task:
    """DCGAN generator and discriminator over one real image set.

    Config: `model.generator` (`medjax.models.DCGANGenerator` fields), `model.discriminator`
    (`DCGANDiscriminator` fields), `loss.kind`, `optimizer_g`, `optimizer_d`, `ema_decay`,
    `data.*` (see `load_images`), `eval.{num_samples, classifier_workdir}`, `num_pictures`.
    """

    progress_keys = ("d_loss", "g_loss")
    summary_keys = (
        "swd_mean", "swd_mean_real", "swd_mean_trivial",
        "fid", "fid_real", "fid_trivial", "kid", "kid_real", "kid_trivial",
    )  # fmt: skip
    networks = {"g": "optimizer_g", "d": "optimizer_d"}
    picture_name = "eval_samples"

    def __init__(self, config: Any):
        from medjax.models import DCGANDiscriminator, DCGANGenerator

        self.config = config
        self.spatial = tuple(int(s) for s in config.data.image_size)
        self.channels = int(config.data.channels)
        dims = len(self.spatial)
        gcfg, dcfg = dict(config.model.generator), dict(config.model.discriminator)
        self.latent_dim = int(gcfg.get("latent_dim", 128))
        self.generator = DCGANGenerator(
            output_shape=self.spatial, channels=self.channels, spatial_dims=dims, **gcfg
        )
        self.discriminator = DCGANDiscriminator(spatial_dims=dims, **dcfg)
        self.loss_kind = str(config.loss.kind)
        if self.loss_kind not in losses.GAN_LOSS_KINDS:
            raise ValueError(
                f"config.loss.kind={self.loss_kind!r} is not one of {losses.GAN_LOSS_KINDS}"
            )
        self.ema_decay = float(config.get("ema_decay", 0.0))
        self.tx = gan.make_optimizers(config, self.networks, int(config.num_steps))
        self._real_cache: dict[str, Any] = {}

    # -- data --------------------------------------------------------------------------------------
    def load_data(self) -> dict[str, Any]:
        images = load_images(self.config.data)
        for split, x in images.items():
            if x.shape[1:] != (*self.spatial, self.channels):
                raise ValueError(
                    f"{split} images have shape {x.shape[1:]}, but config.data.image_size="
                    f"{self.spatial} and data.channels={self.channels}"
                )
        return {"train": {"image": images["train"]}, "eval": {"image": images["val"]}}

    # -- pure functions ----------------------------------------------------------------------------
    def init(self, key: jax.Array, batch: Mapping[str, Any]) -> GANState:
        kg, kd, base = jax.random.split(key, 3)
        z = jnp.zeros((1, self.latent_dim), jnp.float32)
        x = jnp.zeros((1, *self.spatial, self.channels), jnp.float32)
        pg, sg = gan.init_model(self.generator, kg, z)
        pd, sd = gan.init_model(self.discriminator, kd, x)
        return gan.new_state(
            {"g": pg, "d": pd}, {"g": sg, "d": sd}, self.tx, base, ema_decay=self.ema_decay
        )

    def _latent(self, key: jax.Array, n: int) -> jax.Array:
        return jax.random.normal(key, (n, self.latent_dim), jnp.float32)

    def d_loss(
        self, params_d: Any, stats_d: Any, real: jax.Array, fake: jax.Array, key: jax.Array
    ) -> tuple[jax.Array, tuple[Any, dict[str, jax.Array]]]:
        """Mean discriminator loss on one real and one (detached) fake batch."""
        real_logits, stats_d = gan.apply_model(
            self.discriminator, params_d, stats_d, real, train=True
        )
        fake_logits, stats_d = gan.apply_model(
            self.discriminator, params_d, stats_d, fake, train=True
        )
        loss = jnp.mean(losses.gan_discriminator_loss(real_logits, fake_logits, self.loss_kind))
        aux = {
            "d_real": jnp.mean(gan.to_float32(real_logits)),
            "d_fake": jnp.mean(gan.to_float32(fake_logits)),
        }
        return loss, (stats_d, aux)

    def discriminator_update(
        self, state: GANState, real: jax.Array, key: jax.Array
    ) -> tuple[GANState, dict[str, jax.Array]]:
        k_z, k_loss = jax.random.split(key)
        z = self._latent(k_z, real.shape[0])
        fake, _ = gan.apply_model(
            self.generator, state.params["g"], state.batch_stats["g"], z, train=True
        )
        fake = jax.lax.stop_gradient(fake)
        (loss, (stats_d, aux)), grads = jax.value_and_grad(self.d_loss, has_aux=True)(
            state.params["d"], state.batch_stats["d"], real, fake, k_loss
        )
        state = gan.apply_gradients(
            state, {"d": grads}, self.tx, batch_stats={"d": stats_d}, count_step=False
        )
        return state, {"d_loss": loss, "d_grad_norm": optax.tree.norm(grads), **aux}

    def generator_update(
        self, state: GANState, n: int, key: jax.Array
    ) -> tuple[GANState, dict[str, jax.Array]]:
        z = self._latent(key, n)

        def loss_fn(params_g):
            fake, stats_g = gan.apply_model(
                self.generator, params_g, state.batch_stats["g"], z, train=True
            )
            # D's statistics are not updated by the generator's pass (the D step owns them).
            logits, _ = gan.apply_model(
                self.discriminator, state.params["d"], state.batch_stats["d"], fake, train=True
            )
            return jnp.mean(losses.gan_generator_loss(logits, self.loss_kind)), stats_g

        (loss, stats_g), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params["g"])
        state = gan.apply_gradients(
            state, {"g": grads}, self.tx, batch_stats={"g": stats_g}, ema_decay=self.ema_decay
        )
        return state, {"g_loss": loss, "g_grad_norm": optax.tree.norm(grads)}

    def train_step(
        self, state: GANState, batch: Mapping[str, jax.Array]
    ) -> tuple[GANState, dict[str, jax.Array]]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        k_d, k_g = jax.random.split(key)
        real = batch["image"]
        state, m_d = self.discriminator_update(state, real, k_d)
        state, m_g = self.generator_update(state, real.shape[0], k_g)
        return state, {**m_d, **m_g}

    def predict(self, state: GANState, z: jax.Array) -> jax.Array:
        """Generated images `[B, *spatial, C]` (float32, tanh range) for latents `z [B, latent]`
        (the EMA generator when enabled)."""
        params = state.ema["g"] if state.ema else state.params["g"]
        out, _ = gan.apply_model(self.generator, params, state.batch_stats["g"], z, train=False)
        return gan.to_float32(out)

    # -- host side ---------------------------------------------------------------------------------
    def fixed_latents(self, n: int, seed: int | None = None) -> np.ndarray:
        """The same `n` latent vectors at every evaluation (seeded by `config.seed` + 1)."""
        seed = int(self.config.seed) + 1 if seed is None else int(seed)
        return np.asarray(self._latent(jax.random.key(seed), n))

    def generate(
        self, trainer: Any, state: GANState, n: int, seed: int | None = None
    ) -> np.ndarray:
        """`n` samples `[n, *spatial, C]` on the host from fixed latents."""
        return trainer.predict_all(state, self.fixed_latents(n, seed))

    def samples(self, trainer: Any, state: GANState) -> np.ndarray:
        """The fixed-noise sample grid (RGB uint8)."""
        n = int(self.config.get("num_pictures", 64))
        return visualize.sample_grid(self.generate(trainer, state, n), cols=8)

    def _feature_fn(self):
        """Penultimate features of medjax's own classifier run (`eval.classifier_workdir`)."""
        workdir = str(self.config.eval.get("classifier_workdir") or "")
        if not workdir:
            return None
        if "features" not in self._real_cache:
            from medjax.train.tasks import classification

            self._real_cache["features"] = classification.feature_extractor(workdir)
        return self._real_cache["features"]

    def distribution_metrics(
        self, reference: np.ndarray, sets: Mapping[str, np.ndarray]
    ) -> dict[str, float]:
        """SWD (and FID/KID with a classifier) of each image set vs `reference`, keyed
        `<metric><suffix>` (`sets` maps a key suffix, e.g. "" or "_real", to images)."""

        def slices(x: np.ndarray) -> np.ndarray:  # volumes: every axial slice of every sample
            if x.ndim == 5:
                return np.moveaxis(x, 3, 1).reshape(-1, *x.shape[1:3], x.shape[-1])
            return x

        seed = int(self.config.seed)
        out: dict[str, float] = {}
        for suffix, x in sets.items():
            swd = gan_metrics.swd(slices(x), slices(reference), seed=seed)
            out.update({f"{k}{suffix}": float(v) for k, v in swd.items()})
        features = self._feature_fn()
        if features is not None:
            f_ref = features(reference)
            for suffix, x in sets.items():
                f = features(x)
                mu1, s1 = gan_metrics.feature_statistics(f)
                mu2, s2 = gan_metrics.feature_statistics(f_ref)
                out[f"fid{suffix}"] = float(gan_metrics.frechet_distance(mu1, s1, mu2, s2))
                kid, kid_std = gan_metrics.kernel_inception_distance(f, f_ref, seed=seed)
                out[f"kid{suffix}"], out[f"kid_std{suffix}"] = float(kid), float(kid_std)
        return out

    def evaluate(
        self, trainer: Any, state: GANState, data: Mapping[str, Any]
    ) -> tuple[dict[str, float], np.ndarray]:
        """Distribution distances of `n` generated images to a held-out reference, beside the
        real-vs-real floor: the validation images (at most `2 * eval.num_samples`) are split in
        two seeded random halves; half B is the reference, half A (`n` real images) and `n`
        generated images are each compared with it, so both numbers share reference and size.
        `n` images of the trivial generator of the training images (`_trivial`) likewise. The
        `_real` and `_trivial` values do not depend on the model: computed at the first call."""
        val = data["eval"]["image"]
        cap = int(self.config.eval.get("num_samples") or 0)
        if cap:
            val = val[: 2 * cap]
        if len(val) < 4:
            raise ValueError(f"GAN evaluation needs at least 4 validation images, got {len(val)}")
        seed = int(self.config.seed)
        perm = np.random.default_rng(seed).permutation(len(val))
        half = len(val) // 2
        real_sample, reference = val[np.sort(perm[:half])], val[np.sort(perm[half : 2 * half])]
        if "baselines" not in self._real_cache:
            trivial = gan_metrics.pixel_gaussian(data["train"]["image"], half, seed=seed)
            self._real_cache["baselines"] = self.distribution_metrics(
                reference, {"_real": real_sample, "_trivial": trivial}
            )
        fake = self.generate(trainer, state, half)
        summary = self.distribution_metrics(reference, {"": fake})
        summary.update(self._real_cache["baselines"])
        summary["sample_std"] = float(np.std(fake))  # collapse detector: 0 when all samples agree
        return summary, self.samples(trainer, state)
