"""distill_jax: distil large language models in JAX, from one CPU to a TPU pod."""

from distill_jax import bridges, losses, models, sharding, transforms

__version__ = "0.1.0"
