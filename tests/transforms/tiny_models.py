"""The tiny random models of the transforms tests: one architecture, varied per test file.

``TINY`` is the dense block every file starts from (vocabulary 96, width 32, 2 blocks of 4
query / 2 KV heads); ``moe_arch(num_experts)`` adds experts of width 16, top-2 routing.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

import distill_jax as dj

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=16)


def dense_arch(**changes) -> dict:
    """``TINY`` with ``changes``."""
    return {**TINY, **changes}


def moe_arch(num_experts: int, **changes) -> dict:
    """``TINY`` with ``num_experts`` experts (``MOE``) and ``changes``."""
    return {**TINY, **MOE, "num_experts": num_experts, **changes}


def build(family: str, arch: dict, seed: int = 0, **extra) -> dj.models.Transformer:
    """A random ``family`` model of ``arch`` updated by ``extra``."""
    config = dj.models.make_config(family, **{**arch, **extra})
    return dj.models.Transformer(config, rngs=nnx.Rngs(seed))


def token_ids(n: int, t: int, seed: int = 0) -> np.ndarray:
    """[n, t] int32 token ids, uniform over the tiny vocabulary."""
    return np.random.RandomState(seed).randint(0, TINY["vocab_size"], (n, t)).astype(np.int32)
