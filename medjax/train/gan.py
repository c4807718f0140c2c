"""What the GAN tasks share: their train state, optimizers, EMA, and the latent-GAN base.

A GAN is pure functions over several parameter trees (`"g"`/`"d"`, or CycleGAN's
`{"g": {"ab", "ba"}, "d": {"a", "b"}}`). The state holds them side by side in dicts, so Orbax
saves one plain pytree and the loop's sharding rules map over it. "Detach" is
`jax.lax.stop_gradient`; alternating updates are separate `value_and_grad` calls inside one
jitted step.

`LatentGAN` is the generator-from-noise family (DCGAN, WGAN-GP, the class-conditional GAN):
the D / G updates, fixed-noise samples and the evaluation by distribution distances beside their
real-vs-real floor and a trivial baseline. Each task file subclasses it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax import gan_metrics, losses, parallel, visualize
from medjax.data import image_sets
from medjax.train import task
from medjax.train.optim import make_optimizer
from medjax.train.state import apply_model, init_model, step_key, to_float32

__all__ = [
    "GANState",
    "LatentGAN",
    "apply_gradients",
    "apply_model",
    "ema_update",
    "init_model",
    "loss_kind",
    "make_optimizers",
    "new_state",
    "to_float32",
]


def pixel_moments(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`gan_metrics.pixel_moments` of images of which each process holds its own part."""
    return gan_metrics.pixel_moments(images, total=parallel.process_sum)


@flax.struct.dataclass
class GANState:
    """Arrays only.

    - `step`: int32 generator steps taken.
    - `params`, `batch_stats`, `opt_state`: dicts keyed by network name (`batch_stats` holds
      batch-norm statistics and spectral-norm power-iteration vectors; `{}` for a network without).
    - `ema`: exponential moving averages of the params of the networks named in `ema_networks`
      (the generators; `{}` when disabled).
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


def new_state(
    params: dict[str, Any],
    batch_stats: dict[str, Any],
    tx: Mapping[str, optax.GradientTransformation],
    key: jax.Array,
    *,
    ema_decay: float = 0.0,
    ema_networks: Sequence[str] = ("g",),
    extra: dict[str, Any] | None = None,
) -> GANState:
    """Step 0: optimizer states from `tx[name].init`; the EMA of every network in
    `ema_networks` when `ema_decay > 0`."""
    return GANState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state={k: tx[k].init(v) for k, v in params.items()},
        ema={k: params[k] for k in ema_networks} if ema_decay > 0 else {},
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
    `batch_stats`, the EMA of every updated network that has one, and `step + 1` when
    `count_step` (a generator step; WGAN-GP's extra critic updates do not count)."""
    params, opt_state = dict(state.params), dict(state.opt_state)
    for name, g in grads.items():
        updates, opt_state[name] = tx[name].update(g, state.opt_state[name], params[name])
        params[name] = optax.apply_updates(params[name], updates)
    ema = dict(state.ema)
    if ema_decay > 0:
        for name in grads:
            if name in ema:
                ema[name] = ema_update(ema[name], params[name], ema_decay)
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


# Normalisations whose statistics are per example: a discriminator with one of them (and no
# state, such as spectral norm's power iteration) scores each example on its own.
PER_EXAMPLE_NORMS = ("instance", "layer", "group", "none")

# Whether `discriminate` may score the real and fake batches in one call (a switch for A/B runs).
JOINT_PASS = True


def discriminate(
    discriminator: Any, params: Any, stats: Any, real: jax.Array, fake: jax.Array
) -> tuple[jax.Array, jax.Array, Any]:
    """`(D(real), D(fake), new stats)` in training mode.

    A discriminator that scores each example on its own (its `norm` per example, no
    `batch_stats`: no batch norm, no spectral norm) sees the two batches as one, concatenated
    on the batch axis: the same logits and gradients (per example, up to float rounding) from
    half as many calls of each layer (Vox2Vox's step: fewer, larger oneDNN primitives and XLA
    operations, ``BENCHMARKS.md``). Otherwise two calls, the statistics threaded from the
    first to the second, as pytorch-CycleGAN-and-pix2pix does."""
    if JOINT_PASS and not stats and getattr(discriminator, "norm", None) in PER_EXAMPLE_NORMS:
        logits, stats = apply_model(
            discriminator, params, stats, jnp.concatenate([real, fake], 0), train=True
        )
        n = real.shape[0]
        return logits[:n], logits[n:], stats
    real_logits, stats = apply_model(discriminator, params, stats, real, train=True)
    fake_logits, stats = apply_model(discriminator, params, stats, fake, train=True)
    return real_logits, fake_logits, stats


def make_optimizers(
    config: Any, names: Mapping[str, str], num_steps: int
) -> dict[str, optax.GradientTransformation]:
    """One optax transform per network: `names` maps network -> config block
    (e.g. `{"g": "optimizer_g", "d": "optimizer_d"}`), see `medjax.train.optim`."""
    return {net: make_optimizer(config[block], num_steps) for net, block in names.items()}


def loss_kind(config: Any) -> str:
    """`config.loss.kind`, checked against `medjax.losses.GAN_LOSS_KINDS`."""
    kind = str(config.loss.kind)
    if kind not in losses.GAN_LOSS_KINDS:
        raise ValueError(f"config.loss.kind={kind!r} is not one of {losses.GAN_LOSS_KINDS}")
    return kind


def generator_params(state: GANState, name: str = "g") -> Any:
    """The EMA of network `name` when one is kept, else its params (samples, evaluation)."""
    return state.ema[name] if name in state.ema else state.params[name]


def axial_slices(x: np.ndarray) -> np.ndarray:
    """Volumes `[N, X, Y, Z, C]` -> every axial slice `[N * Z, X, Y, C]`; 2D images as they are."""
    if x.ndim == 5:
        return np.moveaxis(x, 3, 1).reshape(-1, *x.shape[1:3], x.shape[-1])
    return x


class LatentGAN(task.Task):
    """A generator of images from latent vectors, a discriminator, and their evaluation.

    Config: `model.generator` (`medjax.models.DCGANGenerator` fields), `model.discriminator`
    (`DCGANDiscriminator` fields), `loss.kind`, `optimizer_g`, `optimizer_d`, `ema_decay`,
    `data.*` (`medjax.data.image_sets.load_gan_images`), `eval.{num_samples,
    classifier_workdir}`, `num_pictures`.

    One jitted step = one discriminator update on a real batch and a fresh fake batch, then one
    generator update through the updated discriminator on the same fakes (one generator
    forward, as in the canonical PyTorch DCGAN). Subclasses change `d_loss` (WGAN-GP),
    `train_step` (n_critic) or condition both networks on labels (`conditional`).

    Evaluation, on a fixed set of latent vectors so numbers are comparable across steps:
    `swd_mean` (sliced Wasserstein distance on Laplacian-pyramid patches, Karras et al. 2018)
    between generated images and one random half of the validation images, beside
    `swd_mean_real` = the same distance from the OTHER half (the real-vs-real floor: same
    reference, same set size); with `eval.classifier_workdir` (a medjax classifier run on the
    same kind of images) also FID and KID on its penultimate features, each with its
    real-vs-real value. The trivial generator (`gan_metrics.pixel_gaussian` of the training
    images: every pixel drawn with its own mean and standard deviation) gives `_trivial`: a GAN
    should land between `_trivial` and `_real`.
    """

    progress_keys = ("d_loss", "g_loss")
    summary_keys = (
        "swd_mean", "swd_mean_real", "swd_mean_trivial",
        "fid", "fid_real", "fid_trivial", "kid", "kid_real", "kid_trivial",
    )  # fmt: skip
    networks = {"g": "optimizer_g", "d": "optimizer_d"}
    picture_name = "eval_samples"
    #: class-conditional: both networks see a label, batches carry "label"
    conditional = False

    def __init__(self, config: Any):
        super().__init__(config)
        from medjax.models import DCGANDiscriminator, DCGANGenerator

        self.spatial = tuple(int(s) for s in config.data.image_size)
        self.channels = int(config.data.channels)
        dims = len(self.spatial)
        gcfg, dcfg = dict(config.model.generator), dict(config.model.discriminator)
        self.latent_dim = int(gcfg.get("latent_dim", 128))
        self.num_classes = int(config.data.get("num_classes", 0) or 0) if self.conditional else 0
        if self.conditional:
            if self.num_classes < 2:
                raise ValueError("a class-conditional GAN needs config.data.num_classes >= 2")
            gcfg["num_classes"] = dcfg["num_classes"] = self.num_classes
        self.generator = DCGANGenerator(
            output_shape=self.spatial, channels=self.channels, spatial_dims=dims, **gcfg
        )
        self.discriminator = DCGANDiscriminator(spatial_dims=dims, **dcfg)
        self.loss_kind = loss_kind(config)
        self.ema_decay = float(config.get("ema_decay", 0.0))
        self.tx = make_optimizers(config, self.networks, int(config.num_steps))
        self._cache: dict[str, Any] = {}  # the classifier behind FID / KID, once restored

    # -- data --------------------------------------------------------------------------------------
    def _images(self, split: str, directory: str | Path | None = None) -> dict[str, np.ndarray]:
        d = image_sets.load_gan_images(self.config.data, split, directory=directory)
        return self._checked(d, split)

    def _checked(self, d: dict[str, np.ndarray], split: str) -> dict[str, np.ndarray]:
        x = d["image"]
        if x.shape[1:] != (*self.spatial, self.channels):
            raise ValueError(
                f"{split} images have shape {x.shape[1:]}, but config.data.image_size="
                f"{self.spatial} and data.channels={self.channels}"
            )
        out = {"image": x}
        if self.conditional:
            if "label" not in d:
                raise ValueError(
                    f"config.data.source={self.config.data.source!r} has no class labels; a "
                    "class-conditional GAN needs labelled images (medmnist, class_folders)"
                )
            out["label"] = d["label"].astype(np.int32)
            bad = sorted(set(np.unique(out["label"]).tolist()) - set(range(self.num_classes)))
            if bad:
                raise ValueError(f"{split} labels {bad} are outside 0..{self.num_classes - 1}")
        return out

    def _owned_train(self) -> tuple[dict[str, np.ndarray], np.ndarray, int, np.ndarray | None]:
        """(this process's training images (its data shards only are read), their shards, the
        number of training images, every training label when the source lists them)."""
        listing = image_sets.list_gan_images(self.config.data, "train")
        d, shard_ids, n = task.owned_examples(listing, self.config)
        return self._checked(d, "train"), shard_ids, n, listing.meta.get("label")

    def load_data(self) -> task.TaskData:
        train, shard_ids, n, all_labels = self._owned_train()
        weights = None
        if self.conditional and self.config.data.get("balance_classes"):
            labels = train["label"] if all_labels is None else np.asarray(all_labels, np.int64)
            counts = np.bincount(labels, minlength=self.num_classes)
            weights = 1.0 / counts[train["label"]]  # every class equally often in a batch
        return task.TaskData.from_arrays(
            train,
            self._eval_set(self._images("val"), train),
            sample_weights=weights,
            shard_ids=shard_ids,
            num_train=n,
        )

    def load_eval(self, directory: str | Path | None, split: str) -> dict[str, Any]:
        return self._eval_set(self._images(split, directory), self._owned_train()[0])

    def _eval_set(self, reference: dict[str, np.ndarray], train: dict[str, np.ndarray]):
        """The reference images and the pixel moments of the training images (over every
        process's shards: the trivial generator's)."""
        return {**reference, "train_moments": pixel_moments(train["image"])}

    def synthetic_batch(self, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        out = {
            "image": rng.uniform(-1, 1, (batch_size, *self.spatial, self.channels)).astype(
                np.float32
            )
        }
        if self.conditional:
            out["label"] = rng.integers(0, self.num_classes, batch_size).astype(np.int32)
        return out

    # -- pure functions ----------------------------------------------------------------------------
    def _g_args(self, z: jax.Array, y: jax.Array | None) -> tuple:
        return (z, y) if self.conditional else (z,)

    def init(self, key: jax.Array, batch_spec: Mapping[str, Any]) -> GANState:
        kg, kd, base = jax.random.split(key, 3)
        z = jnp.zeros((1, self.latent_dim), jnp.float32)
        x = jnp.zeros((1, *self.spatial, self.channels), jnp.float32)
        y = jnp.zeros((1,), jnp.int32) if self.conditional else None
        pg, sg = init_model(self.generator, kg, *self._g_args(z, y))
        pd, sd = init_model(self.discriminator, kd, *self._g_args(x, y))
        return new_state(
            {"g": pg, "d": pd}, {"g": sg, "d": sd}, self.tx, base, ema_decay=self.ema_decay
        )

    def latent(self, key: jax.Array, n: int) -> jax.Array:
        return jax.random.normal(key, (n, self.latent_dim), jnp.float32)

    def d_loss(
        self,
        params_d: Any,
        stats_d: Any,
        real: jax.Array,
        fake: jax.Array,
        key: jax.Array,
        y: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[Any, dict[str, jax.Array]]]:
        """Mean discriminator loss on one real and one (detached) fake batch."""
        real_logits, stats_d = apply_model(
            self.discriminator, params_d, stats_d, *self._g_args(real, y), train=True
        )
        fake_logits, stats_d = apply_model(
            self.discriminator, params_d, stats_d, *self._g_args(fake, y), train=True
        )
        loss = jnp.mean(losses.gan_discriminator_loss(real_logits, fake_logits, self.loss_kind))
        aux = {
            "d_real": jnp.mean(to_float32(real_logits)),
            "d_fake": jnp.mean(to_float32(fake_logits)),
        }
        return loss, (stats_d, aux)

    def discriminator_update(
        self, state: GANState, real: jax.Array, key: jax.Array, y: jax.Array | None = None
    ) -> tuple[GANState, dict[str, jax.Array]]:
        k_z, k_loss = jax.random.split(key)
        z = self.latent(k_z, real.shape[0])
        fake, _ = apply_model(
            self.generator, state.params["g"], state.batch_stats["g"], *self._g_args(z, y),
            train=True,
        )  # fmt: skip
        return self._d_update(state, real, jax.lax.stop_gradient(fake), k_loss, y)

    def _d_update(
        self, state: GANState, real: jax.Array, fake: jax.Array, k_loss: jax.Array, y: Any
    ) -> tuple[GANState, dict[str, jax.Array]]:
        """One discriminator update on `real` and the (detached) `fake` images."""
        (loss, (stats_d, aux)), grads = jax.value_and_grad(self.d_loss, has_aux=True)(
            state.params["d"], state.batch_stats["d"], real, fake, k_loss, y
        )
        state = apply_gradients(
            state, {"d": grads}, self.tx, batch_stats={"d": stats_d}, count_step=False
        )
        return state, {"d_loss": loss, "d_grad_norm": optax.tree.norm(grads), **aux}

    def generator_update(
        self, state: GANState, n: int, key: jax.Array, y: jax.Array | None = None
    ) -> tuple[GANState, dict[str, jax.Array]]:
        z = self.latent(key, n)

        def loss_fn(params_g):
            fake, stats_g = apply_model(
                self.generator, params_g, state.batch_stats["g"], *self._g_args(z, y), train=True
            )
            # D's statistics are not updated by the generator's pass (the D step owns them).
            logits, _ = apply_model(
                self.discriminator, state.params["d"], state.batch_stats["d"],
                *self._g_args(fake, y), train=True,
            )  # fmt: skip
            return jnp.mean(losses.gan_generator_loss(logits, self.loss_kind)), stats_g

        (loss, stats_g), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params["g"])
        state = apply_gradients(
            state, {"g": grads}, self.tx, batch_stats={"g": stats_g}, ema_decay=self.ema_decay
        )
        return state, {"g_loss": loss, "g_grad_norm": optax.tree.norm(grads)}

    def train_step(
        self, state: GANState, batch: Mapping[str, jax.Array]
    ) -> tuple[GANState, dict[str, jax.Array]]:
        """One D update on the real batch and this step's fakes, then one G update through the
        updated D on the SAME fakes, as the canonical DCGAN does (pytorch/examples `dcgan`): the
        generator runs forward once and its backward is the saved VJP of that pass."""
        k_z, k_loss = jax.random.split(step_key(state))
        real, y = batch["image"], batch.get("label")
        z = self.latent(k_z, real.shape[0])

        def generate(params_g: Any) -> tuple[jax.Array, Any]:
            return apply_model(
                self.generator, params_g, state.batch_stats["g"], *self._g_args(z, y), train=True
            )

        fake, g_vjp, stats_g = jax.vjp(generate, state.params["g"], has_aux=True)
        state, m_d = self._d_update(state, real, jax.lax.stop_gradient(fake), k_loss, y)

        def g_loss(images: jax.Array) -> jax.Array:
            # D's statistics are not updated by the generator's pass (the D step owns them).
            logits, _ = apply_model(
                self.discriminator, state.params["d"], state.batch_stats["d"],
                *self._g_args(images, y), train=True,
            )  # fmt: skip
            return jnp.mean(losses.gan_generator_loss(logits, self.loss_kind))

        loss, d_fake = jax.value_and_grad(g_loss)(fake)
        (grads,) = g_vjp(d_fake)
        state = apply_gradients(
            state, {"g": grads}, self.tx, batch_stats={"g": stats_g}, ema_decay=self.ema_decay
        )
        return state, {**m_d, "g_loss": loss, "g_grad_norm": optax.tree.norm(grads)}

    def predict(self, state: GANState, inputs: Any) -> jax.Array:
        """Generated images `[B, *spatial, C]` (float32, tanh range) for latents `z [B, latent]`
        (and `{"z", "label"}` for a conditional GAN), from the EMA generator when enabled."""
        z, y = (inputs["z"], inputs["label"]) if self.conditional else (inputs, None)
        out, _ = apply_model(
            self.generator, generator_params(state), state.batch_stats["g"],
            *self._g_args(z, y), train=False,
        )  # fmt: skip
        return to_float32(out)

    # -- host side ---------------------------------------------------------------------------------
    def fixed_latents(self, n: int, seed: int | None = None) -> np.ndarray:
        """The same `n` latent vectors at every evaluation (seeded by `config.seed` + 1)."""
        seed = int(self.config.seed) + 1 if seed is None else int(seed)
        return np.asarray(self.latent(jax.random.key(seed), n))

    def generate(
        self,
        runner: task.Runner,
        state: GANState,
        n: int,
        seed: int | None = None,
        labels: np.ndarray | None = None,
    ) -> np.ndarray:
        """`n` samples `[n, *spatial, C]` on the host from fixed latents (and `labels`)."""
        z = self.fixed_latents(n, seed)
        if self.conditional:
            y = np.arange(n) % self.num_classes if labels is None else np.asarray(labels)
            return runner.map_batches(state, {"z": z, "label": y.astype(np.int32)}, "predict")
        return runner.map_batches(state, z, "predict")

    def sample(
        self, runner: task.Runner, state: GANState, num: int, seed: int | None = None
    ) -> dict[str, np.ndarray]:
        """`num` samples from the latent seed `seed` (default: the evaluation noise)."""
        out = {"samples": self.generate(runner, state, num, seed)}
        if self.conditional:
            out["label"] = np.arange(num) % self.num_classes
        return out

    def training_picture(self, runner: task.Runner, state: GANState) -> np.ndarray:
        """The fixed-noise sample grid (RGB uint8)."""
        n = int(self.config.get("num_pictures", 64))
        return visualize.sample_grid(self.generate(runner, state, n), cols=8)

    def _features(self, runner: task.Runner):
        """Penultimate features of medjax's own classifier run (`eval.classifier_workdir`)."""
        workdir = str(self.config.eval.get("classifier_workdir") or "")
        if not workdir:
            return None
        if "features" not in self._cache:
            cls_runner, cls_state = runner.restore_run(workdir)
            self._cache["features"] = lambda x: cls_runner.map_batches(cls_state, x, "features")
            self._cache["classify"] = lambda x: cls_runner.map_batches(cls_state, x, "predict")
        return self._cache["features"]

    def distribution_metrics(
        self, runner: task.Runner, reference: np.ndarray, sets: Mapping[str, np.ndarray]
    ) -> dict[str, float]:
        """SWD (and FID/KID with a classifier) of each image set vs `reference`, keyed
        `<metric><suffix>` (`sets` maps a key suffix, e.g. "" or "_real", to images). Volumes
        are compared slice by slice (every axial slice)."""
        seed = int(self.config.seed)
        out: dict[str, float] = {}
        for suffix, x in sets.items():
            swd = gan_metrics.swd(axial_slices(x), axial_slices(reference), seed=seed)
            out.update({f"{k}{suffix}": float(v) for k, v in swd.items()})
        features = self._features(runner)
        if features is not None:
            f_ref = features(reference)
            mu2, s2 = gan_metrics.feature_statistics(f_ref)
            for suffix, x in sets.items():
                f = features(x)
                mu1, s1 = gan_metrics.feature_statistics(f)
                out[f"fid{suffix}"] = float(gan_metrics.frechet_distance(mu1, s1, mu2, s2))
                kid, kid_std = gan_metrics.kernel_inception_distance(f, f_ref, seed=seed)
                out[f"kid{suffix}"], out[f"kid_std{suffix}"] = float(kid), float(kid_std)
        return out

    def halves(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """(real sample A, reference B, half size): two seeded random halves of the evaluation
        images (at most `2 * eval.num_samples`)."""
        cap = int(self.config.eval.get("num_samples") or 0)
        if cap:
            images = images[: 2 * cap]
        if len(images) < 4:
            raise ValueError(
                f"GAN evaluation needs at least 4 evaluation images, got {len(images)}"
            )
        perm = np.random.default_rng(int(self.config.seed)).permutation(len(images))
        half = len(images) // 2
        return images[np.sort(perm[:half])], images[np.sort(perm[half : 2 * half])], half

    def evaluate(
        self, runner: task.Runner, state: GANState, eval_set: Any, num_pictures: int = 64
    ) -> task.Evaluation:
        """Distribution distances of `n` generated images to a held-out reference, beside the
        real-vs-real floor and the trivial generator (both computed once: they do not depend on
        the model)."""
        real_sample, reference, half = self.halves(eval_set["image"])

        def baselines() -> dict[str, float]:
            trivial = gan_metrics.pixel_gaussian(
                eval_set["train_moments"], half, seed=int(self.config.seed)
            )
            return self.distribution_metrics(
                runner, reference, {"_real": real_sample, "_trivial": trivial}
            )

        fake = self.generate(runner, state, half)
        summary = self.distribution_metrics(runner, reference, {"": fake})
        summary.update(task.computed_once(eval_set, "baselines", baselines))
        summary["sample_std"] = float(np.std(fake))  # collapse detector: 0 when all samples agree
        pictures = {"samples": self.training_picture(runner, state)} if num_pictures else {}
        return task.Evaluation(summary, pictures=pictures)
