"""Structural transforms as pure functions (params, config, stats) -> (params, config)."""

from distill_jax.transforms.depth import drop_layers, keep_layers_spec
