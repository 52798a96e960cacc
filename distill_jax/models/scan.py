r"""Scan over layers: blocks with stacked parameters, run by ``jax.lax.scan``, and remat policies.

A Python loop over L blocks unrolls L copies of the block into the compiled program, so tracing and
compiling grow with depth (80 blocks: a program about 24 times larger). Scanning traces one block
(or one group of blocks) and runs it L times over parameters stacked on a leading ``layers`` axis,
as MaxText's ``scan_layers`` and big_vision's ``nn.scan`` do.

Blocks that differ (Gemma-3's five sliding-window layers then one global layer, MoE layers every
other block, per-layer expert counts after non-uniform pruning) cannot share one body. They are
grouped by their *period* p: the smallest divisor of L such that block i and block i mod p are
built alike. The scan body is then the p blocks of one group, unrolled, and the parameters of the
j-th block of every group are stacked: ``layers[j]`` holds [L / p, ...] arrays, block i = g p + j
lives at ``layers[j][g]``. A model whose period is L itself (nothing repeats) keeps the loop.

The stacked layout is a pure pytree transform of the per-layer one (``stack_layers`` /
``unstack_layers``), so loading, export, transforms and checkpoints of other layouts convert
through it (``transformer.to_scanned`` / ``to_looped``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.models.config import ModelConfig

log = logging.getLogger("distill_jax")

REMAT_POLICIES = ("none", "full", "dots", "offload")


def block_signature(config: ModelConfig, layer: int) -> tuple:
    """What makes block ``layer`` compile differently: attention kind, FFN kind, expert count."""
    return (config.is_sliding(layer), config.is_moe(layer), config.experts_in(layer))


def period(config: ModelConfig) -> int:
    """The smallest p dividing L such that block i is built like block i mod p, for every i."""
    n = config.num_layers
    sig = [block_signature(config, i) for i in range(n)]
    for p in range(1, n + 1):
        if n % p == 0 and all(sig[i] == sig[i % p] for i in range(n)):
            return p
    return n


def scannable(config: ModelConfig, *, warn: bool = True) -> bool:
    """Whether the blocks repeat (period < L, or a single block); logs why not when ``warn``."""
    p = period(config)
    if p < config.num_layers or config.num_layers == 1:
        return True
    if warn:
        log.warning(
            "scan_layers: the %d blocks of this %s model do not repeat (block kinds %s), so "
            "they run as a Python loop (compile time grows with depth).",
            config.num_layers,
            config.family,
            sorted({block_signature(config, i) for i in range(config.num_layers)}),
        )
    return False


def stack_layers(layers: dict, config: ModelConfig) -> dict:
    """Per-layer tree {i: subtree} -> stacked {j: subtree of [L / p, ...] arrays}.

    Works on any tree shaped like the parameters (parameters, optimizer moments, gradients).
    """
    n, p = config.num_layers, period(config)
    _check_keys(layers, n, "per-layer")
    return {
        j: jax.tree.map(lambda *xs: stack_arrays(xs), *[layers[i] for i in range(j, n, p)])
        for j in range(p)
    }


def unstack_layers(stacked: dict, config: ModelConfig) -> dict:
    """Stacked {j: [L / p, ...] subtree} -> per-layer {i: subtree}; inverse of ``stack_layers``."""
    n, p = config.num_layers, period(config)
    _check_keys(stacked, p, "stacked")
    return {i: jax.tree.map(lambda x, g=i // p: x[g], stacked[i % p]) for i in range(n)}


def stack_arrays(xs):
    """Stack equal-shaped leaves on a new axis 0 (NumPy stays NumPy, shapes stay abstract)."""
    if isinstance(xs[0], jax.ShapeDtypeStruct):
        x = xs[0]
        return jax.ShapeDtypeStruct((len(xs), *x.shape), x.dtype)
    if all(isinstance(x, np.ndarray) for x in xs):
        return np.stack(xs)
    return jnp.stack(xs)


def is_stacked(config: ModelConfig) -> bool:
    """Whether a model of ``config`` keeps its blocks stacked (scan_layers and blocks repeat)."""
    return config.scan_layers and scannable(config, warn=False)


def unstack_params(tree: dict, config: ModelConfig) -> dict:
    """A parameter-shaped tree (``{"layers": ..., ...}``) in the per-layer layout."""
    if not is_stacked(config):
        return tree
    return {**tree, "layers": unstack_layers(tree["layers"], config)}


def stack_params(tree: dict, config: ModelConfig) -> dict:
    """A per-layer parameter-shaped tree in the layout of a model of ``config``."""
    if not is_stacked(config):
        return tree
    return {**tree, "layers": stack_layers(tree["layers"], config)}


def _check_keys(tree: dict, n: int, what: str) -> None:
    keys = sorted(int(k) for k in tree)
    if keys != list(range(n)):
        raise ValueError(f"Expected {what} layers 0..{n - 1}, got keys {keys[:8]}.")


def gather_layers(per_group: list, config: ModelConfig) -> list:
    """Outputs of a scan over groups -> one per block in model order.

    Args:
        per_group: p pytrees (one per position j in the group), each with a leading [L / p] axis.

    Returns:
        L pytrees, block i = g p + j taken from ``per_group[j]`` at index g.
    """
    p = len(per_group)
    return [
        jax.tree.map(lambda x, g=i // p: x[g], per_group[i % p]) for i in range(config.num_layers)
    ]


def remat_policy(name: str | bool | None, platform: str) -> Callable | None:
    """The ``jax.checkpoint`` policy of a policy name, or None for no rematerialisation.

    * "none" (or False / None): keep every activation of the forward pass.
    * "full" (or True): keep only each block's (or scanned group's) input; recompute the rest in
      the backward pass (activation memory of one block instead of L).
    * "dots": also keep the results of matmuls with the weights (no batch dimensions); recompute
      the cheap elementwise ops and the attention (MaxText's "minimal").
    * "offload": like "dots" but the kept matmul results go to pinned host memory (TPU, GPU).

    Raises:
        ValueError: unknown name, or "offload" on a platform without host memory spaces.
    """
    if name in (None, False, "none"):
        return None
    if name in (True, "full"):
        return jax.checkpoint_policies.nothing_saveable
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if name == "offload":
        if platform == "cpu":
            raise ValueError(
                "remat policy 'offload' moves activations to pinned host memory, which TPUs and "
                "GPUs have and the CPU backend does not; use 'dots' or 'full' on CPU."
            )
        return jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    raise ValueError(f"remat policy {name!r}: choose one of {REMAT_POLICIES}.")
