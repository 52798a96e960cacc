r"""Dense FFN -> mixture of experts (METHODS.md 7.9).

* ``upcycle``: sparse upcycling (Komatsuzaki et al., 2023, "Sparse Upcycling", ICLR): every dense
  FFN becomes E identical experts plus a new router. With the top-k gates renormalised
  (``norm_topk_prob=True``) the selected gates sum to one, so the upcycled model's output equals
  the dense model's for any router; training (KD + load balancing) then lets experts diverge.
* ``moefication``: MoEfication (Zhang et al., 2022, "MoEfication: Transformer Feed-forward Layers
  are Mixtures of Experts", ACL Findings): the F neurons of each FFN are split into E groups of F/E
  by balanced k-means on their (normalised) gate and up weight vectors; expert e is the FFN
  restricted to group e, and the sum over all groups is the dense FFN. The router's column e
  is the mean gate vector of group e times ``router_scale`` (a token's logit is then its mean
  gate pre-activation over the group: groups likely to fire rank first). Each expert's down
  projection is multiplied by k, so with near-uniform renormalised gates (1/k each) the k
  selected groups add up as in the dense FFN; with k = E and a zero router the output equals
  the dense FFN exactly.

Dense families map to their MoE counterparts (llama -> mixtral, qwen3 -> qwen3_moe, qwen2 ->
qwen2_moe without a shared expert) so the result saves and loads as a transformers model.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from distill_jax.models.config import ModelConfig

MOE_FAMILY = {"llama": "mixtral", "qwen3": "qwen3_moe", "qwen2": "qwen2_moe"}


def _moe_config(config: ModelConfig, num_experts: int, top_k: int, expert_size: int):
    if config.num_experts:
        raise ValueError("The model is already a mixture of experts.")
    if config.family not in MOE_FAMILY:
        raise ValueError(
            f"No MoE family for {config.family!r}; supported dense families: {sorted(MOE_FAMILY)}."
        )
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}].")
    return config.replace(
        family=MOE_FAMILY[config.family],
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=expert_size,
        norm_topk_prob=True,
        moe_layers=(),
    )


def upcycle(
    params: dict,
    config: ModelConfig,
    num_experts: int,
    top_k: int,
    *,
    router_std: float = 0.0,
    seed: int = 0,
) -> tuple[dict, ModelConfig]:
    """Every dense FFN -> ``num_experts`` copies of it; router N(0, router_std^2) (0: zeros)."""
    new_config = _moe_config(config, num_experts, top_k, config.intermediate_size)
    rng = np.random.default_rng(seed)
    layers = {}
    for i, layer in params["layers"].items():
        mlp = layer["mlp"]
        d = np.shape(mlp["gate_proj"])[0]
        router = (
            rng.normal(0.0, router_std, (d, num_experts))
            if router_std
            else np.zeros((d, num_experts))
        )
        copy = lambda w: jnp.broadcast_to(jnp.asarray(w), (num_experts, *np.shape(w)))
        layers[i] = {
            **layer,
            "mlp": {
                "router": jnp.asarray(router, jnp.asarray(mlp["gate_proj"]).dtype),
                "gate_proj": copy(mlp["gate_proj"]),
                "up_proj": copy(mlp["up_proj"]),
                "down_proj": copy(mlp["down_proj"]),
            },
        }
    return {**params, "layers": layers}, new_config


def balanced_kmeans(x: np.ndarray, k: int, *, iters: int = 20, seed: int = 0) -> np.ndarray:
    """Partition the rows of x [n, d] into k clusters of exactly n / k rows.

    Lloyd iterations whose assignment step is capacity-constrained: (row, cluster) pairs are
    taken in order of increasing distance, each row once, each cluster up to n / k rows.

    Returns:
        [n] int cluster labels.
    """
    n = x.shape[0]
    if n % k:
        raise ValueError(f"{n} neurons do not split into {k} equal experts; pick E dividing {n}.")
    cap = n // k
    rng = np.random.default_rng(seed)
    centroids = x[rng.choice(n, k, replace=False)]
    labels = np.zeros(n, np.int64)
    for _ in range(iters):
        dist = ((x[:, None, :] - centroids[None]) ** 2).sum(-1)  # [n, k]
        order = np.argsort(dist, axis=None, kind="stable")
        labels[:] = -1
        fill = np.zeros(k, np.int64)
        for flat in order:
            i, c = divmod(int(flat), k)
            if labels[i] < 0 and fill[c] < cap:
                labels[i] = c
                fill[c] += 1
        new = np.stack([x[labels == c].mean(0) for c in range(k)])
        if np.allclose(new, centroids):
            break
        centroids = new
    return labels


def moefication(
    params: dict,
    config: ModelConfig,
    num_experts: int,
    top_k: int,
    *,
    router_scale: float = 0.1,
    iters: int = 20,
    seed: int = 0,
) -> tuple[dict, ModelConfig]:
    """Split every dense FFN into ``num_experts`` neuron groups (module docstring)."""
    f = config.intermediate_size
    if f % num_experts:
        raise ValueError(
            f"intermediate_size={f} does not split into {num_experts} equal experts; pick a "
            f"number of experts that divides {f}."
        )
    new_config = _moe_config(config, num_experts, top_k, f // num_experts)
    layers = {}
    for i, layer in params["layers"].items():
        mlp = layer["mlp"]
        gate, up, down = (np.asarray(mlp[k]) for k in ("gate_proj", "up_proj", "down_proj"))
        feats = np.concatenate([gate.T, up.T], axis=1).astype(np.float64)  # [F, 2D]
        feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
        labels = balanced_kmeans(feats, num_experts, iters=iters, seed=seed + int(i))
        groups = [np.flatnonzero(labels == e) for e in range(num_experts)]
        layers[i] = {
            **layer,
            "mlp": {
                "router": jnp.asarray(
                    np.stack([gate[:, g].mean(1) for g in groups], axis=1) * router_scale,
                    gate.dtype,
                ),
                "gate_proj": jnp.asarray(np.stack([gate[:, g] for g in groups])),
                "up_proj": jnp.asarray(np.stack([up[:, g] for g in groups])),
                "down_proj": jnp.asarray(np.stack([down[g] * top_k for g in groups])),
            },
        }
    return {**params, "layers": layers}, new_config
