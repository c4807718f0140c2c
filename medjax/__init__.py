"""medjax: fast U-Net and GAN experiments on medical images in JAX.

`medjax.models`, `medjax.losses` and `medjax.metrics` need only jax/flax/optax/numpy/scipy;
`medjax.data` adds the readers and tf.data pipelines; the `train` sub-package the trainer.
"""

__version__ = "0.1.0"
