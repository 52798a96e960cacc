"""Architectures of public checkpoints, as ``models.make_config`` keyword arguments.

What a pod config compiles without any weights (``--mode=compile``) and what the accelerator
benchmark builds with random ones. Each entry is read off the model's public config.json on the
Hugging Face hub (named beside it); ``architecture(name, num_layers=2)`` changes fields, e.g.
for the reduced presets that CI compiles. Loading a real checkpoint reads its own config.json
instead (``models.from_pretrained``), so nothing here is needed to train from weights.
"""

from __future__ import annotations

from typing import Any

# Llama 3.1 / 3.2: RoPE with Llama-3 frequency scaling (only the factor differs).
_LLAMA3 = dict(
    family="llama",
    vocab_size=128256,
    num_kv_heads=8,
    rope_theta=500_000.0,
    rope_type="llama3",
    rope_low_freq_factor=1.0,
    rope_high_freq_factor=4.0,
    rope_original_max_position=8192,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
)

ARCHITECTURES: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-3.1-8B
    "llama-3.1-8b": dict(
        _LLAMA3,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        head_dim=128,
        rope_factor=8.0,
        tie_word_embeddings=False,
    ),
    # meta-llama/Llama-3.1-70B
    "llama-3.1-70b": dict(
        _LLAMA3,
        hidden_size=8192,
        intermediate_size=28672,
        num_layers=80,
        num_heads=64,
        head_dim=128,
        rope_factor=8.0,
        tie_word_embeddings=False,
    ),
    # meta-llama/Llama-3.2-1B
    "llama-3.2-1b": dict(
        _LLAMA3,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        head_dim=64,
        rope_factor=32.0,
        tie_word_embeddings=True,
    ),
    # Qwen/Qwen3-30B-A3B: every layer MoE (decoder_sparse_step 1, mlp_only_layers []), so
    # intermediate_size 6144 is unused.
    "qwen3-30b-a3b": dict(
        family="qwen3_moe",
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_layers=48,
        num_heads=32,
        num_kv_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        norm_topk_prob=True,
        router_aux_loss_coef=0.001,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        max_position_embeddings=40960,
        tie_word_embeddings=False,
    ),
    # google/gemma-3-12b-pt (text config): 5 sliding-window layers, then one global, 8 times.
    "gemma-3-12b": dict(
        family="gemma3",
        vocab_size=262208,
        hidden_size=3840,
        intermediate_size=15360,
        num_layers=48,
        num_heads=16,
        num_kv_heads=8,
        head_dim=256,
        query_pre_attn_scalar=256.0,
        sliding_window=1024,
        layer_types=(("sliding",) * 5 + ("full",)) * 8,
        rope_theta=1_000_000.0,
        rope_type="linear",
        rope_factor=8.0,
        local_rope_theta=10_000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=131072,
    ),
}


def architecture(name: str, **changes) -> dict[str, Any]:
    """``ARCHITECTURES[name]`` with ``changes``; a Gemma-3 ``num_layers`` change keeps the
    sliding/global pattern (the first ``num_layers`` layer types).

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}.")
    arch = dict(ARCHITECTURES[name])
    if "num_layers" in changes and "layer_types" in arch and "layer_types" not in changes:
        arch["layer_types"] = arch["layer_types"][: changes["num_layers"]]
    return {**arch, **changes}
