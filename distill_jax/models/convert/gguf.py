"""GGUF files (llama.cpp) in: metadata -> HF config.json dict, tensors -> HF-named float32 arrays.

Pure NumPy on top of the ``gguf`` package (``GGUFReader`` + ``gguf.quants.dequantize``). What
llama.cpp's converter changed on the way in is undone here, so the result means what an HF
checkpoint means (the same fixes as transformers' GGUF loader):

* llama (and Mixtral, which is ``llama`` with ``expert_count``): q_proj / k_proj rows were
  permuted from HF's rotate-half RoPE layout to GPT-J's interleaved layout; permuted back.
* gemma3: every ``*norm.weight`` was stored as ``1 + w`` (Gemma's RMSNorm scales by ``1 + w``);
  1 is subtracted again.
* MoE experts are stored stacked (``ffn_{gate,up,down}_exps``, [E, out, in]); split into HF's
  per-expert names.
* qwen2moe's ``shared_expert_gate`` was flattened to [D]; reshaped back to [1, D].
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import gguf
import numpy as np

SUPPORTED_QUANT_TYPES: tuple[str, ...] = tuple(
    "F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q8_0 Q4_K Q5_K Q6_K".split()
)

# GGUF ``general.architecture`` -> (HF model_type, HF architecture class). A ``llama`` file with
# experts is read as Mixtral, as llama.cpp does.
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
    "qwen2moe": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
}
_MIXTRAL = ("mixtral", "MixtralForCausalLM")
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(ARCHITECTURES)

# ----------------------------------------------------------------------------- tensor names

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {  # blk.N.<gguf> -> model.layers.N.<hf>
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA3_NAMES = {  # sandwich norms: llama.cpp's ffn_norm is Gemma's pre-FFN norm
    **_BLOCK_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_QWEN_MOE_NAMES = {
    **_BLOCK_NAMES,
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
_MIXTRAL_NAMES = {**_BLOCK_NAMES, "ffn_gate_inp": "block_sparse_moe.gate"}
_QWEN_EXPERTS = {
    "gate": "mlp.experts.{e}.gate_proj",
    "up": "mlp.experts.{e}.up_proj",
    "down": "mlp.experts.{e}.down_proj",
}
_MIXTRAL_EXPERTS = {
    "gate": "block_sparse_moe.experts.{e}.w1",
    "up": "block_sparse_moe.experts.{e}.w3",
    "down": "block_sparse_moe.experts.{e}.w2",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+?)(?:\.(\d+))?\.(weight|bias)")
_EXPERTS_RE = re.compile(r"ffn_(gate|up|down)_exps")
_OLD_EXPERT_STEMS = ("ffn_gate", "ffn_up", "ffn_down")


def _names_for(model_type: str) -> tuple[dict[str, str], dict[str, str]]:
    """(block name table, expert name table) of one HF model_type."""
    if model_type == "gemma3_text":
        return _GEMMA3_NAMES, {}
    if model_type in ("qwen2_moe", "qwen3_moe"):
        return _QWEN_MOE_NAMES, _QWEN_EXPERTS
    if model_type == "mixtral":
        return _MIXTRAL_NAMES, _MIXTRAL_EXPERTS
    return _BLOCK_NAMES, {}


def _unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation (interleaved RoPE pairs -> HF rotate-half halves).

    llama.cpp viewed the HF rows as [n_head, 2, H/2] and swapped the last two axes; viewing the
    GGUF rows as [n_head, H/2, 2] and swapping back restores them.

    Args:
        w: [n_head * H, D] weight or [n_head * H] bias, GGUF row order.
        n_head: query heads for q_proj, key/value heads for k_proj.

    Returns:
        The same shape, HF row order.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _to_hf(name: str, w: np.ndarray, config: dict[str, Any], arch: str) -> dict[str, np.ndarray]:
    """HF name(s) and array(s) for one dequantised GGUF tensor.

    Args:
        name: GGUF tensor name, e.g. ``blk.3.attn_q.weight``.
        w: the dequantised tensor in NumPy order ([out, in] for linears, [E, out, in] experts).
        config: the HF config built from the same file.
        arch: the GGUF architecture.

    Returns:
        {HF name: float32 array}; several entries for stacked experts.

    Raises:
        ValueError: the tensor has no HF counterpart in this architecture.
    """
    model_type = config["model_type"]
    stem, _, kind = name.rpartition(".")
    if stem in _GLOBAL_NAMES:
        hf = f"{_GLOBAL_NAMES[stem]}.{kind}"
    elif (m := _BLOCK_RE.fullmatch(name)) is None:
        raise _unknown_tensor(name, arch)
    else:
        layer, short, expert, kind = m.groups()
        blocks, experts = _names_for(model_type)
        prefix = f"model.layers.{layer}."
        if (e := _EXPERTS_RE.fullmatch(short)) and experts and expert is None:
            pattern = prefix + experts[e.group(1)] + f".{kind}"
            return {pattern.format(e=i): w[i] for i in range(w.shape[0])}
        if expert is not None and model_type == "mixtral" and short in _OLD_EXPERT_STEMS:
            # Older Mixtral GGUFs store one tensor per expert: blk.N.ffn_gate.E.weight.
            proj = _MIXTRAL_EXPERTS[short.removeprefix("ffn_")].format(e=int(expert))
            return {f"{prefix}{proj}.{kind}": w}
        if expert is not None or short not in blocks:
            raise _unknown_tensor(name, arch)
        hf = f"{prefix}{blocks[short]}.{kind}"
        if arch == "llama" and short in ("attn_q", "attn_k"):
            heads = config["num_attention_heads" if short == "attn_q" else "num_key_value_heads"]
            w = _unpermute_rope_rows(w, heads)
        if short == "ffn_gate_inp_shexp":
            w = w.reshape(1, -1)
    if model_type == "gemma3_text" and name.endswith("norm.weight"):
        w = w - np.float32(1.0)
    return {hf: w}


def _unknown_tensor(name: str, arch: str) -> ValueError:
    return ValueError(
        f"GGUF tensor {name!r} has no Hugging Face counterpart in a {arch!r} model; read_gguf "
        "refuses to drop it. Is the file from a newer llama.cpp variant of this architecture?"
    )


# ----------------------------------------------------------------------------- dequantisation


def _check_quant_types(tensors: list[Any]) -> None:
    """Raise one ValueError naming the first tensor whose quant type is not supported."""
    for t in tensors:
        if t.tensor_type.name not in SUPPORTED_QUANT_TYPES:
            raise ValueError(
                f"GGUF tensor {t.name!r} has quantisation type {t.tensor_type.name}, which "
                f"read_gguf does not dequantise; supported: {', '.join(SUPPORTED_QUANT_TYPES)}. "
                "Use a GGUF quantised to one of these (e.g. Q4_K_M, Q8_0) or the HF checkpoint."
            )


def _numpy_shape(t: Any) -> tuple[int, ...]:
    """GGML lists dimensions innermost first; NumPy outermost first."""
    return tuple(int(n) for n in reversed(t.shape))


def _dequantize(t: Any) -> np.ndarray:
    """A GGUF tensor as a float32 array of NumPy shape, owning its memory (not a file view)."""
    w = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.array(w, dtype=np.float32).reshape(_numpy_shape(t))


# ----------------------------------------------------------------------------- metadata

# Tokenizer arrays (tokens, scores, merges) are large and not needed here.
_TOKEN_IDS = {"bos_token_id": "bos", "eos_token_id": "eos", "pad_token_id": "padding"}


def _read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """GGUF key -> Python value, for every key except the tokenizer's large arrays."""
    meta = {}
    for key, field in reader.fields.items():
        big = key.startswith("tokenizer.") and len(field.data) > 1
        if big or key == "tokenizer.chat_template":
            continue
        value = field.contents()
        if field.types == [gguf.GGUFValueType.FLOAT32]:
            # The shortest decimal that rounds to the same float32: 1e-05, not 9.99999974e-06,
            # which is what the HF config.json said before conversion.
            value = float(str(np.float32(value)))
        meta[key] = value
    return meta


def _rope_parameters(
    meta: dict[str, Any], arch: str, theta: float, head_dim: int, freqs: np.ndarray | None
) -> dict[str, Any]:
    """HF ``rope_parameters`` (transformers v5 form) from ``{arch}.rope.*`` keys.

    Raises:
        ValueError: a scaling type HF cannot express, or Llama-3 factors that do not fit.
    """
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if freqs is not None:
        return _llama3_rope_parameters(freqs, theta, head_dim)
    if kind == "none" or factor in (None, 1.0):
        return {"rope_type": "default", "rope_theta": theta}
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor), "rope_theta": theta}
    if kind == "yarn":
        rope = {"rope_type": "yarn", "factor": float(factor), "rope_theta": theta}
        extra = {
            "original_max_position_embeddings": "original_context_length",
            "beta_fast": "yarn_beta_fast",
            "beta_slow": "yarn_beta_slow",
        }
        for hf_key, key in extra.items():
            if f"{arch}.rope.scaling.{key}" in meta:
                rope[hf_key] = meta[f"{arch}.rope.scaling.{key}"]
        return rope
    raise ValueError(
        f"GGUF rope scaling type {kind!r} is not supported; supported: none, linear, yarn, "
        "and Llama-3 (rope_freqs.weight)."
    )


def _llama3_rope_parameters(divisors: np.ndarray, theta: float, head_dim: int) -> dict[str, Any]:
    """Llama-3 RoPE scaling from llama.cpp's ``rope_freqs.weight`` (per-frequency divisors).

    llama.cpp stores only the divisors; every Llama-3.x release uses low_freq_factor=1,
    high_freq_factor=4 and an 8192-token original context, so those are assumed and then checked
    against the stored divisors rather than trusted.

    Args:
        divisors: [H/2] float, inv_freq_default / inv_freq_scaled per rotary frequency.
        theta: RoPE base.
        head_dim: H.

    Raises:
        ValueError: the divisors are not Llama-3 divisors with those constants.
    """
    rope = {
        "rope_type": "llama3",
        "factor": float(divisors.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_theta": theta,
    }
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    ctx, low, high = 8192, 1.0, 4.0
    smooth = np.clip((ctx / wavelen - low) / (high - low), 0.0, 1.0)
    expected = 1.0 / ((1 - smooth) / rope["factor"] + smooth)
    if divisors.shape != expected.shape or not np.allclose(divisors, expected, rtol=1e-4):
        raise ValueError(
            "GGUF rope_freqs.weight does not match Llama-3 RoPE scaling with low_freq_factor=1, "
            "high_freq_factor=4, original context 8192; this scaling cannot be expressed as an "
            "HF config. Use the HF checkpoint instead."
        )
    return rope


def _gemma3_fields(
    meta: dict[str, Any],
    n_layers: int,
    hidden: int,
    n_heads: int,
    head_dim: int,
    rope_full: dict[str, Any],
) -> dict[str, Any]:
    """Gemma-3 keys llama.cpp hard-codes instead of storing (see llama-model.cpp, LLM_ARCH_GEMMA3).

    Sliding layers: the ``attention.sliding_window_pattern`` key if present (int period or one
    bool per layer), else llama.cpp's fixed period 6 (layers 5, 11, ... global). Query scale:
    1/sqrt(head_dim), except the 62-layer 27B which uses 1/sqrt(hidden / heads).
    """
    pattern = meta.get("gemma3.attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):
        sliding = [bool(p) for p in pattern]
    else:
        sliding = [(i + 1) % int(pattern) != 0 for i in range(n_layers)]
    local_theta = float(meta.get("gemma3.rope.freq_base_swa", 10_000.0))
    return {
        "sliding_window": int(meta["gemma3.attention.sliding_window"]),
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "query_pre_attn_scalar": hidden // n_heads if n_layers == 62 else head_dim,
        "rope_local_base_freq": local_theta,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
            "full_attention": rope_full,
        },
        "final_logit_softcapping": meta.get("gemma3.final_logit_softcapping"),
        "attn_logit_softcapping": meta.get("gemma3.attn_logit_softcapping"),
        "hidden_activation": "gelu_pytorch_tanh",
    }


def _first_expert_layer(shapes: dict[str, tuple[int, ...]], n_layers: int) -> tuple[int, int, int]:
    """(first MoE layer, E, F) from stacked ``ffn_gate_exps`` [E, F, D] or per-expert tensors."""
    for i in range(n_layers):
        if (shape := shapes.get(f"blk.{i}.ffn_gate_exps.weight")) is not None:
            return i, shape[0], shape[1]
        if (shape := shapes.get(f"blk.{i}.ffn_gate.0.weight")) is not None:
            per_expert = re.compile(rf"blk\.{i}\.ffn_gate\.\d+\.weight")
            return i, sum(1 for name in shapes if per_expert.fullmatch(name)), shape[0]
    raise ValueError("GGUF file has expert tensors but no layer with ffn_gate experts.")


def _moe_fields(
    meta: dict[str, Any],
    arch: str,
    model_type: str,
    shapes: dict[str, tuple[int, ...]],
    n_layers: int,
) -> dict[str, Any]:
    """Expert counts and sizes, read off the expert tensors' shapes (they cannot disagree)."""
    first, n_experts, moe_size = _first_expert_layer(shapes, n_layers)
    top_k = int(meta[f"{arch}.expert_used_count"])
    if model_type == "mixtral":
        return {
            "num_local_experts": n_experts,
            "num_experts_per_tok": top_k,
            "intermediate_size": moe_size,
            "sliding_window": None,
        }
    # qwen3moe renormalises the top-k weights in llama.cpp; qwen2moe does not.
    norm = meta.get(f"{arch}.expert_weights_norm", model_type == "qwen3_moe")
    f = {
        "num_experts": n_experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": moe_size,
        "norm_topk_prob": bool(norm),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(n_layers) if f"blk.{i}.ffn_gate.weight" in shapes],
    }
    if model_type == "qwen2_moe":
        f["shared_expert_intermediate_size"] = shapes[f"blk.{first}.ffn_gate_shexp.weight"][0]
    return f


def _dense_ffn_size(
    meta: dict[str, Any], arch: str, shapes: dict[str, tuple[int, ...]], n_layers: int
) -> int:
    """F of the dense FFN: the metadata key, else the first dense ffn_gate's rows, else 0."""
    if f"{arch}.feed_forward_length" in meta:
        return int(meta[f"{arch}.feed_forward_length"])
    dense = [shapes[k][0] for i in range(n_layers) if (k := f"blk.{i}.ffn_gate.weight") in shapes]
    return dense[0] if dense else 0


def _hf_config(
    meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], freqs: np.ndarray | None
) -> dict[str, Any]:
    """A transformers config.json dict from GGUF metadata and tensor shapes."""
    arch = meta["general.architecture"]
    get = lambda key, default=None: meta.get(f"{arch}.{key}", default)
    has_experts = "blk.0.ffn_gate_exps.weight" in shapes or "blk.0.ffn_gate.0.weight" in shapes
    model_type, hf_class = _MIXTRAL if arch == "llama" and has_experts else ARCHITECTURES[arch]
    n_layers, hidden, n_heads = (
        int(get("block_count")),
        int(get("embedding_length")),
        int(get("attention.head_count")),
    )
    n_kv = get("attention.head_count_kv", n_heads)
    head_dim = int(get("attention.key_length") or shapes["blk.0.attn_q.weight"][0] // n_heads)
    theta = float(get("rope.freq_base", 10_000.0))
    rope = _rope_parameters(meta, arch, theta, head_dim, freqs)
    cfg: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [hf_class],
        # The embedding's rows, not the tokenizer's length: they are what the weights mean.
        "vocab_size": shapes["token_embd.weight"][0],
        "hidden_size": hidden,
        "intermediate_size": _dense_ffn_size(meta, arch, shapes, n_layers),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv),
        "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "rope_theta": theta,
        "rope_parameters": rope,
        "tie_word_embeddings": "output.weight" not in shapes,
        "hidden_act": "silu",
    }
    for hf_key, short in _TOKEN_IDS.items():
        if f"tokenizer.ggml.{short}_token_id" in meta:
            cfg[hf_key] = int(meta[f"tokenizer.ggml.{short}_token_id"])
    bias = "blk.0.attn_q.bias" in shapes
    if model_type == "gemma3_text":
        del cfg["hidden_act"]
        cfg.update(_gemma3_fields(meta, n_layers, hidden, n_heads, head_dim, rope))
    elif model_type == "qwen2_moe":
        cfg.update(qkv_bias=bias, use_sliding_window=False)
    elif model_type == "qwen2":  # q/k/v biases are implied by the family in HF
        cfg.update(use_sliding_window=False)
    elif model_type in ("qwen3", "qwen3_moe"):
        cfg.update(attention_bias=bias, use_sliding_window=False)
    elif model_type == "llama":
        cfg.update(attention_bias=bias, mlp_bias="blk.0.ffn_gate.bias" in shapes)
    if has_experts:
        cfg.update(_moe_fields(meta, arch, model_type, shapes, n_layers))
    return cfg


# ----------------------------------------------------------------------------- entry point


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read a GGUF file as an HF checkpoint: (config.json dict, HF-named float32 tensors).

    Architectures: llama (incl. SmolLM2; with experts: Mixtral), qwen2, qwen3, gemma3
    (``gemma3_text``), qwen2moe, qwen3moe. Every tensor is dequantised to float32 in HF layout
    ([out, in] for linears, [D] for norms, [V, D] embedding); ``lm_head.weight`` is present only
    when the file has an untied ``output.weight``.

    Args:
        path: the ``.gguf`` file.

    Returns:
        (hf_config, tensors): hf_config has model_type, architectures, vocab_size, hidden_size,
        intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim,
        rms_norm_eps, rope_theta, rope_parameters, max_position_embeddings, tie_word_embeddings
        and the family's own keys (Gemma-3 sliding window and layer types, MoE sizes).

    Raises:
        ValueError: unsupported architecture or quantisation type, or a tensor with no HF name.
    """
    reader = gguf.GGUFReader(os.fspath(path))
    meta = _read_metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (llama with experts is read as Mixtral)."
        )
    _check_quant_types(reader.tensors)
    shapes = {t.name: _numpy_shape(t) for t in reader.tensors}
    by_name = {t.name: t for t in reader.tensors}
    freqs = _dequantize(by_name["rope_freqs.weight"]) if "rope_freqs.weight" in by_name else None
    config = _hf_config(meta, shapes, freqs)
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.name != "rope_freqs.weight":  # folded into rope_parameters above
            tensors.update(_to_hf(t.name, _dequantize(t), config, arch))
    return config, tensors
