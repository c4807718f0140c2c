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

Data: two domains from `data.source` (`brats_slices`: axial slices with `data.domain_a` /
`data.domain_b` modalities, e.g. FLAIR <-> T1c; `tcia`: two series of the TCIA exam). The pair
information is discarded for training: domain A comes from one random half of the training
slices and domain B from the other half (`image_sets.split_unpaired`), so no slice is seen in
both. It is used only to evaluate: validation slices translated A -> B are compared with their
true B (MAE, PSNR, SSIM inside the brain mask), and B -> A likewise, beside the identity
baseline (the untranslated input).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from medjax import losses, visualize
from medjax.train import gan
from medjax.train.gan import GANState


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


class Task:
    """Two generators and two discriminators over unpaired domains A and B.

    Config: `model.generator` (`ResnetGenerator` fields), `model.discriminator` (`PatchGAN`),
    `loss.{kind, cycle_weight, identity_weight}`, `pool_size`, `optimizer_g`, `optimizer_d`,
    `ema_decay`, `data.{source, domain_a, domain_b, image_size, ...}`.
    """

    progress_keys = ("d_loss", "g_gan", "g_cycle")
    summary_keys = tuple(
        f"{m}_{d}{b}"
        for d in ("ab", "ba")
        for m in ("mae", "psnr", "ssim")
        for b in ("", "_identity")
    )
    networks = {"g": "optimizer_g", "d": "optimizer_d"}
    picture_name = "translations"

    def __init__(self, config: Any):
        from medjax.models import PatchGAN, ResnetGenerator

        self.config = config
        self.dims = int(config.model.get("spatial_dims", 2))
        self.channels = 1
        self.g = ResnetGenerator(
            out_channels=self.channels, spatial_dims=self.dims, **dict(config.model.generator)
        )
        self.d = PatchGAN(spatial_dims=self.dims, **dict(config.model.discriminator))
        self.loss_kind = str(config.loss.kind)
        if self.loss_kind not in losses.GAN_LOSS_KINDS:
            raise ValueError(
                f"config.loss.kind={self.loss_kind!r} is not one of {losses.GAN_LOSS_KINDS}"
            )
        self.cycle_weight = float(config.loss.cycle_weight)
        self.identity_weight = float(config.loss.identity_weight)
        self.pool_size = int(config.get("pool_size", 50))
        self.ema_decay = float(config.get("ema_decay", 0.0))
        self.tx = gan.make_optimizers(config, self.networks, int(config.num_steps))
        self._baseline: dict[str, float] | None = None

    # -- data --------------------------------------------------------------------------------------
    def load_data(self) -> dict[str, Any]:
        from medjax.data import image_sets
        from medjax.train.tasks.volume_segmentation import resolve_split_dir

        cfg = self.config.data
        mods = (str(cfg.domain_a), str(cfg.domain_b))
        size = tuple(int(s) for s in (cfg.get("image_size") or ())) or None
        source = str(cfg.source)
        if source == "brats_slices":
            kw = dict(layout=str(cfg.get("layout", "deepmedic")), modalities=mods, size=size)
            train = image_sets.load_brats_slices(resolve_split_dir(cfg, "train"), **kw)
            val = image_sets.load_brats_slices(resolve_split_dir(cfg, "val"), **kw)
        elif source == "tcia":
            from medjax.data.paths import data_dir

            directory = str(cfg.get("directory") or "") or data_dir(str(cfg.shared_folder))
            d = image_sets.load_tcia_series(directory, mods, size=size)
            train, val = image_sets.split_slice_block(d, cfg.val_slices)
        else:
            raise ValueError(
                f"config.data.source={source!r} is not one of ['brats_slices', 'tcia']"
            )
        idx_a, idx_b = image_sets.split_unpaired(len(train["image"]), seed=int(self.config.seed))
        n = min(len(idx_a), len(idx_b))
        cap = int(cfg.get("max_examples") or 0)
        if cap:
            n = min(n, cap)
            val = {k: np.asarray(v)[:cap] for k, v in val.items()}
        images = np.asarray(train["image"], np.float32)
        arrays = {"a": images[idx_a[:n], ..., :1], "b": images[idx_b[:n], ..., 1:2]}
        val_arrays = {
            "image": np.asarray(val["image"], np.float32),
            "mask": np.asarray(val["mask"], bool),
        }
        return {"train": arrays, "eval": val_arrays}

    # -- pure functions ----------------------------------------------------------------------------
    def init(self, key: jax.Array, batch: Mapping[str, Any]) -> GANState:
        k1, k2, k3, k4, base = jax.random.split(key, 5)
        spatial = tuple(batch["a"].shape[1:-1])
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
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        k_a, k_b = jax.random.split(key)
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

    def predict(self, state: GANState, image: jax.Array) -> jax.Array:
        """`[B, *, 2]` (A, B) -> `[B, *, 2]` (G_ab(A), G_ba(B)), float32 (EMA when enabled)."""
        params = state.ema["g"] if state.ema else state.params["g"]
        stats = state.batch_stats["g"]
        ab, _ = gan.apply_model(self.g, params["ab"], stats["ab"], image[..., :1], train=False)
        ba, _ = gan.apply_model(self.g, params["ba"], stats["ba"], image[..., 1:2], train=False)
        return jnp.concatenate([gan.to_float32(ab), gan.to_float32(ba)], -1)

    # -- evaluation (host) -------------------------------------------------------------------------
    def _scores(self, pred: np.ndarray, image: np.ndarray, mask: np.ndarray) -> dict[str, float]:
        from medjax import gan_metrics

        out = {}
        for name, p, t in (
            ("ab", pred[..., :1], image[..., 1:2]),
            ("ba", pred[..., 1:2], image[..., :1]),
        ):
            m = gan_metrics.translation_metrics(p, t, mask, data_range=2.0)
            out.update({f"{k}_{name}": float(np.nanmean(np.asarray(v))) for k, v in m.items()})
        return out

    def evaluate(
        self, trainer: Any, state: GANState, data: Mapping[str, Any]
    ) -> tuple[dict[str, float], np.ndarray]:
        image, mask = data["eval"]["image"], data["eval"]["mask"]
        pred = trainer.predict_all(state, image)
        summary = self._scores(pred, image, mask)
        if self._baseline is None:  # the untranslated input as the prediction: A for B, B for A
            scores = self._scores(image[..., :2], image, mask)
            self._baseline = {f"{k}_identity": v for k, v in scores.items()}
        summary.update(self._baseline)
        n = int(self.config.get("num_pictures", 4))
        rows = []
        for i in np.linspace(0, len(image) - 1, min(n, len(image))).astype(int):
            to = lambda x: visualize.to_uint8(x, lo=-1, hi=1)  # noqa: E731
            rows.append(
                visualize.hstack(
                    [
                        to(image[i, ..., 0]),
                        to(pred[i, ..., 0]),
                        to(image[i, ..., 1]),
                        to(pred[i, ..., 1]),
                    ]
                )  # fmt: skip
            )
        return summary, visualize.grid(rows, cols=1)
