"""WGAN-GP (Gulrajani et al. 2017, "Improved Training of Wasserstein GANs", arXiv:1704.00028).

The latent GAN (`medjax.train.gan.LatentGAN`, as the DCGAN task) with the paper's critic recipe:

* a critic without batch norm (`model.discriminator.norm` must be "none" or "layer": the gradient
  penalty is per example, which batch norm breaks); the Wasserstein loss `D(fake) - D(real)`;
* the gradient penalty `lambda * (||grad_x D(x_hat)||_2 - 1)^2` at random interpolates
  `x_hat = eps * real + (1 - eps) * fake`, computed in float32 (`medjax.losses.gradient_penalty`);
* `n_critic` critic updates per generator update INSIDE one compiled step (`platform.scan`: a
  `lax.scan`, unrolled on the CPU, where XLA runs convolution gradients inside a loop far
  slower), each on its own real batch: the loop's global batch holds
  `n_critic * (batch_size / n_critic)` real images, i.e. `batch_size` counts every real image
  one step consumes;
* Adam(1e-4, b1=0.0, b2=0.9) for both networks (the paper's defaults, set in the configs).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from medjax import losses
from medjax.train import gan, platform
from medjax.train.gan import GANState
from medjax.train.state import step_key


class Task(gan.LatentGAN):
    """Latent generator + norm-free critic trained with the WGAN-GP objective.

    Extra config: `loss.gp_weight` (lambda, 10), `n_critic` (5).
    """

    progress_keys = ("d_loss", "g_loss", "gp")

    def __init__(self, config: Any):
        super().__init__(config)
        norm = str(config.model.discriminator.get("norm", "none"))
        if norm not in ("none", "layer"):
            raise ValueError(
                f"config.model.discriminator.norm={norm!r}: the WGAN-GP critic must not use "
                "batch statistics (the penalty is per example); use 'none' or 'layer'"
            )
        if self.loss_kind != "wasserstein":
            raise ValueError(f"config.loss.kind={self.loss_kind!r}: WGAN-GP needs 'wasserstein'")
        self.gp_weight = float(config.loss.get("gp_weight", 10.0))
        self.n_critic = int(config.get("n_critic", 5))
        if int(config.batch_size) % self.n_critic:
            raise ValueError(
                f"config.batch_size={config.batch_size} must be a multiple of "
                f"config.n_critic={self.n_critic} (it holds n_critic critic batches)"
            )

    def d_loss(self, params_d, stats_d, real, fake, key, y=None):
        def critic(x):
            return gan.apply_model(self.discriminator, params_d, stats_d, x, train=True)[0]

        real_logits, fake_logits = critic(real), critic(fake)
        wdist = jnp.mean(losses.gan_discriminator_loss(real_logits, fake_logits, "wasserstein"))
        gp = jnp.mean(losses.gradient_penalty(critic, real, fake, key=key))
        aux = {
            "d_real": jnp.mean(gan.to_float32(real_logits)),
            "d_fake": jnp.mean(gan.to_float32(fake_logits)),
            "gp": gp,
            "wasserstein_estimate": -wdist,
        }
        return wdist + self.gp_weight * gp, (stats_d, aux)

    def train_step(
        self, state: GANState, batch: Mapping[str, jax.Array]
    ) -> tuple[GANState, dict[str, jax.Array]]:
        k_d, k_g = jax.random.split(step_key(state))
        real = batch["image"]
        b = real.shape[0] // self.n_critic
        # Rows (i * n_critic + j) -> critic step j: a reshape that keeps the leading (sharded)
        # axis whole, so every device feeds every critic step with its own rows.
        chunks = jnp.moveaxis(real.reshape(b, self.n_critic, *real.shape[1:]), 1, 0)
        keys = jax.random.split(k_d, self.n_critic)

        def critic_step(st, xs):
            x, k = xs
            return self.discriminator_update(st, x, k)

        state, m_d = platform.scan(critic_step, state, (chunks, keys))
        m_d = jax.tree.map(jnp.mean, m_d)
        state, m_g = self.generator_update(state, b, k_g)
        return state, {**m_d, **m_g}
