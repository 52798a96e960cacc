"""ModelConfig: every architectural knob of the decoder LMs distill_jax builds.

A family (Llama, Qwen2, Qwen3, Gemma3, Mixtral, Qwen2-MoE, Qwen3-MoE) is a set of defaults for these
fields (``FAMILIES``) plus a weight-name map in ``convert/hf.py``; there is one ``Transformer``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Defaults that make a family what it is; anything not listed takes the dataclass default.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(),
    "qwen2": dict(attention_bias=True, rope_theta=1_000_000.0),
    "qwen3": dict(qk_norm=True, rope_theta=1_000_000.0),
    "gemma3": dict(
        qk_norm=True,
        norm_offset=1.0,
        sandwich_norms=True,
        embed_scale=True,
        hidden_act="gelu_tanh",
        rope_theta=1_000_000.0,
        local_rope_theta=10_000.0,
        tie_word_embeddings=True,
    ),
    "mixtral": dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, rope_theta=1e6),
    "qwen2_moe": dict(attention_bias=True, norm_topk_prob=False, rope_theta=1_000_000.0),
    "qwen3_moe": dict(qk_norm=True, norm_topk_prob=True, rope_theta=1_000_000.0),
}

ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
LAYER_TYPES = ("full", "sliding")
ATTENTION_IMPLS = ("auto", "reference", "splash", "cudnn")
MOE_IMPLS = ("auto", "dense", "grouped")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only LM. Frozen and hashable, so it can be a static jit argument.

    Shapes use the legend V vocab, D hidden_size, F intermediate_size, L num_layers, N num_heads,
    K num_kv_heads, H head_dim, E num_experts.
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    # Attention.
    attention_bias: bool = False  # bias on q, k, v (Qwen2)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k (Qwen3, Gemma3)
    query_pre_attn_scalar: float | None = None  # scores scaled by this**-0.5; None: head_dim
    attn_logit_softcapping: float | None = None
    layer_types: tuple[str, ...] = ()  # "full" / "sliding" per layer; () = all full
    sliding_window: int | None = None  # a key is visible while q_pos - k_pos < sliding_window
    # RoPE (full-attention layers; sliding layers use local_rope_theta with no scaling when set).
    rope_theta: float = 10_000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_position: int = 8192  # llama3
    local_rope_theta: float | None = None
    # Gemma-style numerics.
    norm_offset: float = 0.0  # RMSNorm scale is (norm_offset + w); Gemma stores w around 0
    sandwich_norms: bool = False  # extra norms after attention and around the MLP (Gemma3)
    embed_scale: bool = False  # multiply embeddings by sqrt(D) (Gemma)
    final_logit_softcapping: float | None = None
    # Mixture of experts.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # >0: shared expert with a sigmoid gate (Qwen2-MoE)
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities to sum to one
    moe_layers: tuple[bool, ...] = ()  # per layer; () = every layer is MoE when num_experts > 0
    # Per-layer expert counts after non-uniform expert pruning (0 on dense layers); () = every
    # MoE layer has num_experts. transformers has one count per model: such models do not export.
    experts_per_layer: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.0
    # Numerics: parameters stored in param_dtype, matmuls run in dtype, softmax/norms in float32.
    dtype: str = "float32"
    param_dtype: str = "float32"
    # Execution, not architecture: how the same weights are computed (never written to
    # config.json). attention_impl: "auto" picks by the platform of the mesh in use (splash on
    # TPU, cudnn on GPU, reference on CPU). moe_impl: "grouped" sorts tokens by expert and runs
    # grouped matmuls; "dense" runs every expert on every token. scan_layers: lax.scan over
    # (repeating groups of) blocks whose parameters are stacked on a leading "layers" axis.
    attention_impl: str = "auto"
    moe_impl: str = "auto"
    scan_layers: bool = False
    # Expert-parallel all-to-all capacity per (source, destination) device pair as a multiple of
    # the even share of assignments (``models.moe``); None = dropless (worst case) buffers.
    moe_capacity_factor: float | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(
                f"Unknown model family {self.family!r}; supported families: {sorted(FAMILIES)}."
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not one of {ACTIVATIONS}.")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"attention_impl={self.attention_impl!r} is not one of {ATTENTION_IMPLS}."
            )
        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl={self.moe_impl!r} is not one of {MOE_IMPLS}.")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope_type={self.rope_type!r} is not supported; use one of {ROPE_TYPES}."
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads}."
            )
        if self.layer_types:
            if len(self.layer_types) != self.num_layers or set(self.layer_types) - set(LAYER_TYPES):
                raise ValueError(
                    f"layer_types must list one of {LAYER_TYPES} per layer ({self.num_layers}), "
                    f"got {self.layer_types}."
                )
            if "sliding" in self.layer_types and not self.sliding_window:
                raise ValueError("Sliding-window layers need sliding_window > 0.")
        if self.moe_layers and len(self.moe_layers) != self.num_layers:
            raise ValueError(f"moe_layers needs one flag per layer ({self.num_layers}).")
        if self.experts_per_layer:
            if len(self.experts_per_layer) != self.num_layers:
                raise ValueError(
                    f"experts_per_layer needs one count per layer ({self.num_layers})."
                )
            small = [
                i
                for i in range(self.num_layers)
                if self.is_moe(i) and self.experts_per_layer[i] < self.num_experts_per_tok
            ]
            if small:
                raise ValueError(
                    f"experts_per_layer gives blocks {small} fewer experts than "
                    f"num_experts_per_tok={self.num_experts_per_tok}."
                )
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                f"[1, num_experts={self.num_experts}]."
            )

    def experts_in(self, layer: int) -> int:
        """Number of experts of block ``layer`` (0 for a dense block)."""
        if not self.is_moe(layer):
            return 0
        return self.experts_per_layer[layer] if self.experts_per_layer else self.num_experts

    @property
    def attention_scale(self) -> float:
        """Scores are q k^T times this: query_pre_attn_scalar^-1/2 (Gemma) or head_dim^-1/2."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def is_sliding(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == "sliding"

    def attention_layers(self) -> tuple[tuple[float, float | None, int | None], ...]:
        """Per layer: (score scale, logit softcap, sliding window or None), as ``Attention``
        computes its probabilities (feature losses rebuild them from q and k)."""
        return tuple(
            (
                self.attention_scale,
                self.attn_logit_softcapping,
                self.sliding_window if self.is_sliding(i) else None,
            )
            for i in range(self.num_layers)
        )

    def is_moe(self, layer: int) -> bool:
        if not self.num_experts:
            return False
        return self.moe_layers[layer] if self.moe_layers else True

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe(i) for i in range(self.num_layers))

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def make_config(family: str, **fields) -> ModelConfig:
    """A ModelConfig of ``family`` with its defaults (``FAMILIES``) overridden by ``fields``."""
    if family not in FAMILIES:
        raise ValueError(
            f"Unknown model family {family!r}; supported families: {sorted(FAMILIES)}."
        )
    return ModelConfig(family=family, **{**FAMILIES[family], **fields})
