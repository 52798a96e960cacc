"""Tiny random transformers (PyTorch) models of every family we support, built locally (no hub).

Each case is a transformers config class plus keyword arguments. ``build_reference`` makes the
model, randomises every parameter (norm weights and biases included: transformers initialises
those to constants, under which a wrong norm offset or a dropped bias would go unnoticed) and saves
it with ``save_pretrained``. Attention is "eager" so that softcapping and sliding windows follow the
reference code path exactly.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import transformers

_TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
)
_MOE = dict(num_experts=4, num_experts_per_tok=2)

# name -> (transformers config class, its keyword arguments).
CASES: dict[str, tuple[str, dict]] = {
    # SmolLM2-style: tied embeddings.
    "llama_tied": ("LlamaConfig", dict(_TINY, tie_word_embeddings=True)),
    # Untied, with Llama 3.1 RoPE scaling whose wavelength thresholds fall inside head_dim=8, so
    # the kept, smoothed and scaled branches are all used.
    "llama": (
        "LlamaConfig",
        dict(
            _TINY,
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10_000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
    # qkv bias; sliding window on the layers from max_window_layers on.
    "qwen2": (
        "Qwen2Config",
        dict(_TINY, use_sliding_window=True, sliding_window=4, max_window_layers=1),
    ),
    "qwen3": ("Qwen3Config", dict(_TINY, num_hidden_layers=3)),
    # Alternating sliding/full layers with a window shorter than the test sequences, a query scale
    # other than head_dim, and distinct RoPE bases for the two layer kinds.
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            _TINY,
            num_hidden_layers=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            sliding_window=4,
            query_pre_attn_scalar=16,
            rope_parameters={
                "full_attention": dict(rope_type="default", rope_theta=50_000.0),
                "sliding_attention": dict(rope_type="default", rope_theta=500.0),
            },
        ),
    ),
    # Linear RoPE scaling on the full layers only and final logit softcapping. The attention
    # softcap is one that transformers' Gemma3 ignores, and so must we.
    "gemma3_linear": (
        "Gemma3TextConfig",
        dict(
            _TINY,
            num_hidden_layers=3,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            sliding_window=4,
            query_pre_attn_scalar=12,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=4.0,
            rope_parameters={
                "full_attention": dict(rope_type="linear", factor=4.0, rope_theta=1_000_000.0),
                "sliding_attention": dict(rope_type="default", rope_theta=10_000.0),
            },
        ),
    ),
    "mixtral": ("MixtralConfig", dict(_TINY, num_local_experts=4, num_experts_per_tok=2)),
    # Shared expert, no renormalisation of the top-k, and dense layers from decoder_sparse_step=2
    # (layers 1 and 3 are sparse) and mlp_only_layers.
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            _TINY,
            **_MOE,
            num_hidden_layers=4,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            norm_topk_prob=False,
            decoder_sparse_step=2,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            _TINY,
            **_MOE,
            num_hidden_layers=3,
            moe_intermediate_size=16,
            norm_topk_prob=True,
            mlp_only_layers=[1],
        ),
    ),
}
MOE_CASES = ("mixtral", "qwen2_moe", "qwen3_moe")


def hf_config(case: str, **overrides) -> transformers.PreTrainedConfig:
    cls, kwargs = CASES[case]
    return getattr(transformers, cls)(**{**kwargs, **overrides})


def build_reference(
    case: str, out_dir: str | os.PathLike, *, seed: int = 0, noise: float = 0.1, **overrides
) -> transformers.PreTrainedModel:
    """A random transformers model of ``case`` (eval mode, float32), saved to ``out_dir``;
    ``overrides`` change the case's config arguments (e.g. more layers).

    Every parameter gets N(0, noise^2) added, so constant-initialised ones (norm weights, biases)
    differ per channel and the 0.02-std matrices become large enough to matter.
    """
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        hf_config(case, **overrides), attn_implementation="eager", dtype=torch.float32
    )
    with torch.no_grad():
        for p in model.parameters():  # tied parameters are listed once
            p.add_(noise * torch.randn_like(p))
    model.eval()
    model.save_pretrained(out_dir)
    return model


def load_reference(path: str | os.PathLike) -> transformers.PreTrainedModel:
    """transformers' own loading of a saved directory; fails on missing or unexpected tensors."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise AssertionError(f"transformers could not load {path} cleanly: {problems}")
    return model.eval()


def run_reference(model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, **kw):
    """transformers forward pass on numpy ids [B, T]; returns its output object."""
    ids = torch.as_tensor(np.asarray(input_ids, np.int64))
    mask = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask, np.int64))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw)
