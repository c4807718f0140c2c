"""Unpaired image-to-image translation: CycleGAN (Zhu et al. 2017, arXiv:1703.10593).

Defaults follow the paper and its reference implementation (pytorch-CycleGAN-and-pix2pix):
two ResNet generators `G_ab`, `G_ba` (9 residual blocks at 256 px, 6 at 128 px; reflection padding,
instance norm), two 70x70 PatchGAN discriminators with instance norm, the least-squares GAN loss
(Mao et al. 2017), cycle-consistency weight 10, identity weight 0.5 (times the cycle weight),
Adam(2e-4, b1=0.5) with the learning rate constant for the first half and decayed linearly to 0
over the second (`optimizer_*.schedule="linear_decay"`), and an image history pool of 50 fakes per
direction (Shrivastava et al. 2017) that the discriminators see instead of the latest fakes half of
the time. The pools are device arrays in the train state (`extra`), so they survive checkpoints
and the step stays one pure jitted function.

Data (`medjax.data.image_sets.load_unpaired_images`): two domains from `data.source`:
`unpaired` (pytorch-CycleGAN-and-pix2pix's `trainA/ trainB/ testA/ testB/` folders, 2D files or
3D NIfTI with `model.spatial_dims=3`, `data.channels` channels; each domain drawn in its own
order), `brats_slices` (axial slices with `data.domain_a` / `data.domain_b` modalities, e.g.
FLAIR <-> T1c) or `tcia` (two series of the TCIA exam). For the paired sources the pairing is
discarded for training: domain A comes from one random half of the training slices and domain B
from the other half (`image_sets.split_unpaired`), so no slice is seen in both.

Evaluation: translated A is compared with B and translated B with A by the sliced Wasserstein
distance (`swd_ab`, `swd_ba`, beside the untranslated input `_identity`); when the evaluation
pairs are aligned (the paired sources, or test folders with matching file names) also MAE, PSNR
and SSIM inside the mask (brain, or every pixel), beside the identity baseline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from medjax import losses, visualize
from medjax.data import image_sets
from medjax.train import gan, task, translate
from medjax.train.gan import GANState
from medjax.train.state import step_key


def pool_query(
    pool: jax.Array, count: jax.Array, images: jax.Array, key: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The image history pool of Shrivastava et al. 2017, as in pytorch-CycleGAN-and-pix2pix.

    For each image of the batch in turn: while the pool holds fewer than `P = len(pool)` images
    the image is stored and returned; afterwards, with probability 1/2 a uniformly chosen stored
    image is returned and replaced by the new one, otherwise the new image is returned.
    `count` is how many slots are filled. Returns (images for D, new pool, new count). `P = 0`
    returns `images` unchanged.
    """
    size = pool.shape[0]
    if size == 0:
        return images, pool, count

    def one(carry, xs):
        pool, count = carry
        img, k = xs
        k_use, k_idx = jax.random.split(k)
        not_full = count < size
        swap = jnp.logical_and(~not_full, jax.random.uniform(k_use) > 0.5)
        idx = jnp.where(not_full, count, jax.random.randint(k_idx, (), 0, size))
        old = pool[idx]
        out = jnp.where(swap, old, img)
        pool = pool.at[idx].set(jnp.where(not_full | swap, img, old))
        return (pool, count + not_full.astype(count.dtype)), out

    keys = jax.random.split(key, images.shape[0])
    (pool, count), out = jax.lax.scan(one, (pool, count), (images.astype(pool.dtype), keys))
    return out.astype(images.dtype), pool, count


class Task(task.Task):
    """Two generators and two discriminators over unpaired domains A and B.

    Config: `model.generator` (`ResnetGenerator` fields), `model.discriminator` (`PatchGAN`),
    `model.spatial_dims`, `loss.{kind, cycle_weight, identity_weight}`, `pool_size`,
    `optimizer_g`, `optimizer_d`, `ema_decay`, `data.{source, domain_a, domain_b, channels,
    image_size, ...}`.
    """

    progress_keys = ("d_loss", "g_gan", "g_cycle")
    summary_keys = tuple(
        f"{m}_{d}{b}"
        for d in ("ab", "ba")
        for m in ("mae", "psnr", "ssim", "swd")
        for b in ("", "_identity")
    )
    networks = {"g": "optimizer_g", "d": "optimizer_d"}
    picture_name = "translations"

    def __init__(self, config: Any):
        super().__init__(config)
        from medjax.models import PatchGAN, ResnetGenerator

        self.dims = int(config.model.get("spatial_dims", 2))
        self.channels = int(config.data.get("channels") or 1)
        self.g = ResnetGenerator(
            out_channels=self.channels, spatial_dims=self.dims, **dict(config.model.generator)
        )
        self.d = PatchGAN(spatial_dims=self.dims, **dict(config.model.discriminator))
        self.loss_kind = gan.loss_kind(config)
        self.cycle_weight = float(config.loss.cycle_weight)
        self.identity_weight = float(config.loss.identity_weight)
        self.pool_size = int(config.get("pool_size", 50))
        self.ema_decay = float(config.get("ema_decay", 0.0))
        self.tx = gan.make_optimizers(config, self.networks, int(config.num_steps))
        self._preview: dict[str, Any] | None = None

    # -- data --------------------------------------------------------------------------------------
    def _load(self, split: str, directory: str | Path | None = None) -> dict[str, Any]:
        d = image_sets.load_unpaired_images(self.config.data, split, directory=directory)
        return self._check(d)

    def _check(self, d: dict[str, Any]) -> dict[str, Any]:
        for k in ("a", "b"):
            if d[k].shape[-1] != self.channels or d[k].ndim != self.dims + 2:
                raise ValueError(
                    f"domain {k.upper()} images have shape {d[k].shape[1:]}; the config expects "
                    f"{self.dims}D images with data.channels={self.channels}"
                )
        return d

    def load_data(self) -> task.TaskData:
        """Each domain is its own set of data shards: a process reads its own images of each."""
        domains = image_sets.list_unpaired_images(self.config.data, "train")
        train, shard_ids = {}, {}
        for k in ("a", "b"):
            d, shard_ids[k], _ = task.owned_examples(domains[k], self.config)
            train[k] = d["image"]
        self._check(train)
        val = self._load("val")
        self._preview = val
        return task.TaskData.from_arrays(
            train,
            val,
            num_eval=len(val["a"]),
            independent=True,
            shard_ids=shard_ids,
            num_train=max(len(domains["a"]), len(domains["b"])),
        )

    def load_eval(self, directory: str | Path | None, split: str) -> dict[str, Any]:
        return self._load(split, directory)

    def synthetic_batch(self, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        shape = (batch_size, *[int(s) for s in self.config.data.image_size], self.channels)
        return {k: rng.uniform(-1, 1, shape).astype(np.float32) for k in ("a", "b")}

    # -- pure functions ----------------------------------------------------------------------------
    def init(self, key: jax.Array, batch_spec: Mapping[str, Any]) -> GANState:
        k1, k2, k3, k4, base = jax.random.split(key, 5)
        spatial = tuple(batch_spec["a"].shape[1:-1])
        x = jnp.zeros((1, *spatial, self.channels), jnp.float32)
        p_ab, s_ab = gan.init_model(self.g, k1, x)
        p_ba, s_ba = gan.init_model(self.g, k2, x)
        p_da, s_da = gan.init_model(self.d, k3, x)
        p_db, s_db = gan.init_model(self.d, k4, x)
        pool = jnp.zeros((self.pool_size, *spatial, self.channels), jnp.float32)
        return gan.new_state(
            {"g": {"ab": p_ab, "ba": p_ba}, "d": {"a": p_da, "b": p_db}},
            {"g": {"ab": s_ab, "ba": s_ba}, "d": {"a": s_da, "b": s_db}},
            self.tx,
            base,
            ema_decay=self.ema_decay,
            extra={
                "pool_a": pool,
                "pool_b": pool,
                "count_a": jnp.zeros((), jnp.int32),
                "count_b": jnp.zeros((), jnp.int32),
            },
        )

    def train_step(self, state: GANState, batch: Mapping[str, jax.Array]):
        k_a, k_b = jax.random.split(step_key(state))
        a, b = batch["a"], batch["b"]
        pd, sd, sg = state.params["d"], state.batch_stats["d"], state.batch_stats["g"]

        def g(params, stats, name, x):
            return gan.apply_model(self.g, params[name], stats[name], x, train=True)

        def g_loss_fn(pg):
            st = dict(sg)
            fake_b, st["ab"] = g(pg, st, "ab", a)
            rec_a, st["ba"] = g(pg, st, "ba", fake_b)
            fake_a, st["ba"] = g(pg, st, "ba", b)
            rec_b, st["ab"] = g(pg, st, "ab", fake_a)
            l_b, _ = gan.apply_model(self.d, pd["b"], sd["b"], fake_b, train=True)
            l_a, _ = gan.apply_model(self.d, pd["a"], sd["a"], fake_a, train=True)
            g_gan = jnp.mean(losses.gan_generator_loss(l_b, self.loss_kind)) + jnp.mean(
                losses.gan_generator_loss(l_a, self.loss_kind)
            )
            cycle = jnp.mean(losses.l1_loss(rec_a, a)) + jnp.mean(losses.l1_loss(rec_b, b))
            total = g_gan + self.cycle_weight * cycle
            ident = jnp.zeros((), jnp.float32)
            if self.identity_weight > 0:  # G_ab(b) ~ b and G_ba(a) ~ a (keeps intensities)
                idt_b, st["ab"] = g(pg, st, "ab", b)
                idt_a, st["ba"] = g(pg, st, "ba", a)
                ident = jnp.mean(losses.l1_loss(idt_b, b)) + jnp.mean(losses.l1_loss(idt_a, a))
                total = total + self.cycle_weight * self.identity_weight * ident
            return total, (st, fake_a, fake_b, g_gan, cycle, ident)

        (g_total, (new_sg, fake_a, fake_b, g_gan, cycle, ident)), g_grads = jax.value_and_grad(
            g_loss_fn, has_aux=True
        )(state.params["g"])

        extra = dict(state.extra)
        fake_a, extra["pool_a"], extra["count_a"] = pool_query(
            extra["pool_a"], extra["count_a"], jax.lax.stop_gradient(fake_a), k_a
        )
        fake_b, extra["pool_b"], extra["count_b"] = pool_query(
            extra["pool_b"], extra["count_b"], jax.lax.stop_gradient(fake_b), k_b
        )

        def d_loss_fn(params_d):
            st = dict(sd)
            total = jnp.zeros((), jnp.float32)
            for name, real, fake in (("a", a, fake_a), ("b", b, fake_b)):
                real_l, st[name] = gan.apply_model(
                    self.d, params_d[name], st[name], real, train=True
                )
                fake_l, st[name] = gan.apply_model(
                    self.d, params_d[name], st[name], fake, train=True
                )
                total = total + 0.5 * jnp.mean(
                    losses.gan_discriminator_loss(real_l, fake_l, self.loss_kind)
                )
            return total, st

        (d_loss, new_sd), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(pd)
        state = gan.apply_gradients(
            state,
            {"g": g_grads, "d": d_grads},
            self.tx,
            batch_stats={"g": new_sg, "d": new_sd},
            ema_decay=self.ema_decay,
            extra=extra,
        )
        return state, {
            "g_total": g_total,
            "g_gan": g_gan,
            "g_cycle": cycle,
            "g_identity": ident,
            "d_loss": d_loss,
        }

    def _translate(self, state: GANState, image: jax.Array, direction: str) -> jax.Array:
        params = gan.generator_params(state)
        out, _ = gan.apply_model(
            self.g, params[direction], state.batch_stats["g"][direction], image, train=False
        )
        return gan.to_float32(out)

    def predict(self, state: GANState, image: jax.Array) -> jax.Array:
        """G_ab: domain A images `[B, *, C]` -> domain B, float32 (EMA when enabled)."""
        return self._translate(state, image, "ab")

    def predict_ba(self, state: GANState, image: jax.Array) -> jax.Array:
        """G_ba: domain B images -> domain A."""
        return self._translate(state, image, "ba")

    # -- evaluation (host) -------------------------------------------------------------------------
    def _scores(self, eval_set: Mapping[str, Any], ab: np.ndarray, ba: np.ndarray) -> dict:
        """Per direction: SWD of the translations to the real other domain; MAE / PSNR / SSIM
        against the aligned partner when the evaluation pairs are aligned."""
        from medjax import gan_metrics

        out: dict[str, float] = {}
        seed = int(self.config.seed)
        for name, pred, real in (("ab", ab, eval_set["b"]), ("ba", ba, eval_set["a"])):
            swd = gan_metrics.swd(gan.axial_slices(pred), gan.axial_slices(real), seed=seed)
            out[f"swd_{name}"] = float(swd["swd_mean"])
            if eval_set.get("paired"):
                m = gan_metrics.translation_metrics(pred, real, eval_set["mask"], data_range=2.0)
                out.update({f"{k}_{name}": float(np.nanmean(np.asarray(v))) for k, v in m.items()})
        return out

    def evaluate(
        self, runner: task.Runner, state: GANState, eval_set: Any, num_pictures: int = 4
    ) -> task.Evaluation:
        a, b = eval_set["a"], eval_set["b"]
        ab = runner.map_batches(state, a, "predict")
        ba = runner.map_batches(state, b, "predict_ba")
        summary = self._scores(eval_set, ab, ba)
        identity = lambda: {f"{k}_identity": v for k, v in self._scores(eval_set, a, b).items()}  # noqa: E731
        summary.update(task.computed_once(eval_set, "identity", identity))  # input as output
        picture = self._picture(a, ab, b, ba, num_pictures)
        return task.Evaluation(summary, pictures={"translations": picture} if num_pictures else {})

    @staticmethod
    def _picture(a, ab, b, ba, n: int) -> np.ndarray:
        """Rows A | G_ab(A) | B | G_ba(B) of `n` evaluation examples spread over the set."""

        def to(x: np.ndarray) -> np.ndarray:  # a volume shows its middle axial slice
            x = x[:, :, x.shape[2] // 2] if x.ndim == 4 else x
            return visualize.to_uint8(x[..., 0], lo=-1, hi=1)

        m = min(len(a), len(b))
        rows = [
            visualize.hstack([to(a[i]), to(ab[i]), to(b[i]), to(ba[i])])
            for i in np.linspace(0, m - 1, max(1, min(n, m))).astype(int)
        ]
        return visualize.grid(rows, cols=1)

    def training_picture(self, runner: task.Runner, state: GANState) -> np.ndarray:
        """The evaluation picture on the first `num_pictures` validation images."""
        if self._preview is None:
            raise self.cannot("draw a training picture before load_data()")
        n = int(self.config.get("num_pictures", 4))
        a, b = self._preview["a"][:n], self._preview["b"][:n]
        ab = runner.map_batches(state, a, "predict")
        ba = runner.map_batches(state, b, "predict_ba")
        return self._picture(a, ab, b, ba, n)

    def sample(
        self, runner: task.Runner, state: GANState, num: int, seed: int | None = None
    ) -> dict[str, np.ndarray]:
        """The first `num` validation images of domain A translated to B (`source` beside)."""
        a = self._load("val")["a"][:num]
        return {"samples": runner.map_batches(state, a, "predict"), "source": a}

    def predict_files(
        self,
        runner: task.Runner,
        state: GANState,
        inputs: Sequence[str | Path],
        out_dir: str | Path,
        *,
        overwrite: bool = False,
    ) -> list[Path]:
        """Domain A files (images, NIfTI volumes, DICOM series) translated to domain B
        (`medjax.train.translate`); `config.predict_direction="ba"` translates B to A."""
        method = (
            "predict_ba" if str(self.config.get("predict_direction", "ab")) == "ba" else "predict"
        )
        size = tuple(int(s) for s in (self.config.data.get("image_size") or ()))
        fn = lambda x: runner.map_batches(state, x, method)  # noqa: E731
        volume_fn = None
        if self.dims == 3:  # whole volumes resized to image_size, as in training
            volume_fn = lambda v: runner.map_batches(state, v[None], method)[0]  # noqa: E731
        return translate.translate_files(
            inputs,
            out_dir,
            translate_2d=fn if self.dims == 2 else None,
            translate_volume=volume_fn,
            image_size=size,
            channels=self.channels,
            overwrite=overwrite,
        )
