"""Hugging Face checkpoints in and out: config.json <-> ModelConfig, safetensors <-> parameters.

One table (``weight_map``) lists, for a config, every parameter path of our Transformer with the HF
tensor name(s) it comes from and how the layout changes; loading and saving both read it, so the
two directions cannot drift apart. HF linears are [out, in]; ours are [in, out] with heads split.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from distill_jax.models.config import FAMILIES, ModelConfig, make_config
from distill_jax.models.convert.tensor_files import read_safetensors, write_safetensors
from distill_jax.models.transformer import Transformer

# HF model_type -> (our family, HF architecture class name).
MODEL_TYPES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma3_text": ("gemma3", "Gemma3ForCausalLM"),
    "mixtral": ("mixtral", "MixtralForCausalLM"),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
}
_FAMILY_TO_TYPE = {family: mt for mt, (family, _) in MODEL_TYPES.items()}
SUPPORTED_ARCHITECTURES = tuple(arch for _, arch in MODEL_TYPES.values())

# HF defaults that differ between families when a config.json leaves the key out.
_TIED_DEFAULT = {"gemma3": True}


# ----------------------------------------------------------------------------- config


def _rope_fields(rope: dict[str, Any] | None) -> dict[str, Any]:
    """HF rope_parameters / rope_scaling dict -> our rope_* fields."""
    if not rope:
        return {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    out: dict[str, Any] = {"rope_type": kind}
    if "rope_theta" in rope:
        out["rope_theta"] = float(rope["rope_theta"])
    if kind in ("linear", "llama3"):
        out["rope_factor"] = float(rope["factor"])
    if kind == "llama3":
        out["rope_low_freq_factor"] = float(rope["low_freq_factor"])
        out["rope_high_freq_factor"] = float(rope["high_freq_factor"])
        out["rope_original_max_position"] = int(rope["original_max_position_embeddings"])
    return out


def config_from_hf(hf: dict[str, Any], **overrides) -> ModelConfig:
    """ModelConfig from a transformers config.json dict (v4 or v5 key names).

    Raises:
        ValueError: the model type is not supported (the message lists the supported ones).
    """
    mt = hf.get("model_type")
    if mt == "gemma3" and "text_config" in hf:
        hf = {**hf["text_config"], "model_type": "gemma3_text"}
        mt = "gemma3_text"
    if mt not in MODEL_TYPES:
        arch = (hf.get("architectures") or [mt])[0]
        raise ValueError(
            f"Unsupported architecture {arch!r} (model_type {mt!r}); supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    family = MODEL_TYPES[mt][0]
    heads = hf["num_attention_heads"]
    f: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf.get("intermediate_size", 0),
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=hf.get("tie_word_embeddings", _TIED_DEFAULT.get(family, False)),
        hidden_act=_activation(hf.get("hidden_activation") or hf.get("hidden_act", "silu")),
    )
    if "attention_bias" in hf or "qkv_bias" in hf:
        f["attention_bias"] = bool(hf.get("qkv_bias", hf.get("attention_bias")))
    if "rope_theta" in hf:
        f["rope_theta"] = float(hf["rope_theta"])
    rope = hf.get("rope_parameters") or hf.get("rope_scaling")
    if family == "gemma3":
        f.update(_gemma3_fields(hf, rope))
    else:
        f.update(_rope_fields(rope))
        f.update(_sliding_fields(hf))
    if family in ("mixtral", "qwen2_moe", "qwen3_moe"):
        f.update(_moe_fields(hf, family))
    f.update(overrides)
    return make_config(family, **f)


def _activation(name: str) -> str:
    table = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
    if name not in table:
        raise ValueError(f"Unsupported activation {name!r}; supported: {sorted(table)}.")
    return table[name]


def _layer_types(types: list[str]) -> tuple[str, ...]:
    return tuple("sliding" if t == "sliding_attention" else "full" for t in types)


def _sliding_fields(hf: dict[str, Any]) -> dict[str, Any]:
    window = hf.get("sliding_window")
    if not window or hf.get("use_sliding_window") is False:
        return {}
    n = hf["num_hidden_layers"]
    types = _layer_types(hf["layer_types"]) if hf.get("layer_types") else ("sliding",) * n
    return {"sliding_window": window, "layer_types": types} if "sliding" in types else {}


def _gemma3_fields(hf: dict[str, Any], rope: dict[str, Any] | None) -> dict[str, Any]:
    f: dict[str, Any] = dict(
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
        sliding_window=hf.get("sliding_window", 4096),
        final_logit_softcapping=hf.get("final_logit_softcapping"),
        # attn_logit_softcapping is left out: transformers' Gemma3 attention never applies it
        # (Gemma 3 replaced it with q/k norm), so reading it would change such a config's logits.
    )
    n = hf["num_hidden_layers"]
    pattern = hf.get("sliding_window_pattern", 6)
    types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)
    ]
    f["layer_types"] = _layer_types(types)
    if rope and "full_attention" in rope:  # v5: one rope dict per layer type
        f.update(_rope_fields(rope["full_attention"]))
        local = rope.get("sliding_attention") or {}
        f["local_rope_theta"] = float(local.get("rope_theta", 10_000.0))
    else:
        f.update(_rope_fields(rope))
        f["local_rope_theta"] = float(hf.get("rope_local_base_freq", 10_000.0))
    return f


def _moe_fields(hf: dict[str, Any], family: str) -> dict[str, Any]:
    n = hf["num_hidden_layers"]
    f: dict[str, Any] = dict(
        num_experts=hf.get("num_local_experts") or hf.get("num_experts"),
        num_experts_per_tok=hf["num_experts_per_tok"],
        router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.0),
    )
    if family == "mixtral":
        f["moe_intermediate_size"] = hf["intermediate_size"]
        f["norm_topk_prob"] = True
        return f
    f["moe_intermediate_size"] = hf["moe_intermediate_size"]
    f["norm_topk_prob"] = hf.get("norm_topk_prob", FAMILIES[family]["norm_topk_prob"])
    if family == "qwen2_moe":
        f["shared_expert_intermediate_size"] = hf.get("shared_expert_intermediate_size", 0)
    only_dense, step = set(hf.get("mlp_only_layers") or ()), hf.get("decoder_sparse_step", 1)
    f["moe_layers"] = tuple(i not in only_dense and (i + 1) % step == 0 for i in range(n))
    return f


def config_to_hf(c: ModelConfig) -> dict[str, Any]:
    """A transformers config.json dict for ``c`` (v4 key names, which v5 also reads)."""
    mt = _FAMILY_TO_TYPE[c.family]
    # Knobs that we apply and transformers' classes do not: refuse an export with other logits.
    final_cap = None if c.family == "gemma3" else c.final_logit_softcapping
    for name, value in (
        ("attn_logit_softcapping", c.attn_logit_softcapping),
        ("final_logit_softcapping", final_cap),
    ):
        if value:
            raise ValueError(
                f"transformers' {MODEL_TYPES[mt][1]} does not apply {name}, so the exported model "
                f"would compute different logits; set {name}=None before exporting."
            )
    counts = {c.experts_in(i) for i in range(c.num_layers) if c.is_moe(i)}
    if len(counts) > 1:
        raise ValueError(
            f"This model has {sorted(counts)} experts in different layers (experts_per_layer) and "
            "transformers has one num_experts per model; prune the same number of experts in every "
            "layer to export, or keep it in distill_jax's own checkpoints."
        )
    num_experts = counts.pop() if counts else c.num_experts
    hf: dict[str, Any] = dict(
        model_type=mt,
        architectures=[MODEL_TYPES[mt][1]],
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings,
        rope_theta=c.rope_theta,
        torch_dtype=c.param_dtype,
    )
    act = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}[c.hidden_act]
    hf["hidden_activation" if c.family == "gemma3" else "hidden_act"] = act
    if c.rope_type != "default":
        hf["rope_scaling"] = {"rope_type": c.rope_type, "factor": c.rope_factor}
        if c.rope_type == "llama3":
            hf["rope_scaling"].update(
                low_freq_factor=c.rope_low_freq_factor,
                high_freq_factor=c.rope_high_freq_factor,
                original_max_position_embeddings=c.rope_original_max_position,
            )
    if c.family in ("llama", "qwen2", "qwen3", "qwen3_moe"):
        hf["attention_bias"] = c.attention_bias
    if c.layer_types:
        hf["layer_types"] = [t + "_attention" for t in c.layer_types]
        hf["sliding_window"] = c.sliding_window
        if c.family in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"):
            hf["use_sliding_window"] = True
    if c.family == "gemma3":
        hf.update(
            query_pre_attn_scalar=c.query_pre_attn_scalar,
            rope_local_base_freq=c.local_rope_theta,
            final_logit_softcapping=c.final_logit_softcapping,
        )
    if c.num_experts:
        hf.update(
            num_experts_per_tok=c.num_experts_per_tok,
            router_aux_loss_coef=c.router_aux_loss_coef,
        )
        if c.family == "mixtral":
            hf.update(num_local_experts=num_experts, intermediate_size=c.moe_intermediate_size)
        else:
            hf.update(
                num_experts=num_experts,
                moe_intermediate_size=c.moe_intermediate_size,
                norm_topk_prob=c.norm_topk_prob,
                decoder_sparse_step=1,
                mlp_only_layers=[i for i in range(c.num_layers) if not c.is_moe(i)],
            )
            if c.family == "qwen2_moe":
                hf["shared_expert_intermediate_size"] = c.shared_expert_intermediate_size
                hf["qkv_bias"] = c.attention_bias
    return hf


# ----------------------------------------------------------------------------- weights

# A layout change: (to ours from HF, to HF from ours); ``shape`` is our parameter's shape.
Layout = tuple[Callable[..., np.ndarray], Callable[..., np.ndarray]]

_COPY: Layout = (lambda w, shape: w.reshape(shape), lambda p: p)
_LINEAR: Layout = (lambda w, shape: w.T.reshape(shape), lambda p: p.reshape(-1, p.shape[-1]).T)
_OUT: Layout = (  # o_proj: HF [D, N*H] <-> ours [N, H, D]
    lambda w, shape: w.T.reshape(shape),
    lambda p: p.reshape(-1, p.shape[-1]).T,
)
_IN_HEADS: Layout = (  # q/k/v: HF [N*H, D] <-> ours [D, N, H]
    lambda w, shape: w.T.reshape(shape),
    lambda p: p.reshape(p.shape[0], -1).T,
)
_BIAS: Layout = (lambda w, shape: w.reshape(shape), lambda p: p.reshape(-1))
_STACK_LINEAR: Layout = (  # experts: E x HF [out, in] <-> ours [E, in, out]
    lambda ws, shape: np.stack([w.T for w in ws]).reshape(shape),
    lambda p: [e.T for e in p],
)


def weight_map(c: ModelConfig) -> list[tuple[tuple, str | list[str], Layout]]:
    """(our parameter path, HF tensor name or names, layout) for every parameter of ``c``."""
    entries: list[tuple[tuple, str | list[str], Layout]] = [
        (("embed",), "model.embed_tokens.weight", _COPY),
        (("final_norm", "scale"), "model.norm.weight", _COPY),
    ]
    if not c.tie_word_embeddings:
        entries.append((("lm_head",), "lm_head.weight", _LINEAR))
    for i in range(c.num_layers):
        ours, hf = ("layers", i), f"model.layers.{i}."
        a, ha = ours + ("attn",), hf + "self_attn."
        entries += [
            (ours + ("attn_norm", "scale"), hf + "input_layernorm.weight", _COPY),
            (a + ("q_proj",), ha + "q_proj.weight", _IN_HEADS),
            (a + ("k_proj",), ha + "k_proj.weight", _IN_HEADS),
            (a + ("v_proj",), ha + "v_proj.weight", _IN_HEADS),
            (a + ("o_proj",), ha + "o_proj.weight", _OUT),
        ]
        if c.attention_bias:
            entries += [(a + (f"{x}_bias",), ha + f"{x}_proj.bias", _BIAS) for x in "qkv"]
        if c.qk_norm:
            entries += [
                (a + ("q_norm", "scale"), ha + "q_norm.weight", _COPY),
                (a + ("k_norm", "scale"), ha + "k_norm.weight", _COPY),
            ]
        if c.sandwich_norms:
            entries += [
                (ours + ("post_attn_norm", "scale"), hf + "post_attention_layernorm.weight", _COPY),
                (ours + ("mlp_norm", "scale"), hf + "pre_feedforward_layernorm.weight", _COPY),
                (
                    ours + ("post_mlp_norm", "scale"),
                    hf + "post_feedforward_layernorm.weight",
                    _COPY,
                ),
            ]
        else:
            entries.append(
                (ours + ("mlp_norm", "scale"), hf + "post_attention_layernorm.weight", _COPY)
            )
        entries += _ffn_entries(c, i, ours + ("mlp",))
    return entries


def _ffn_entries(c: ModelConfig, i: int, ours: tuple) -> list:
    hf = f"model.layers.{i}.mlp."
    if not c.is_moe(i):
        return [
            (ours + (f"{x}_proj",), hf + f"{x}_proj.weight", _LINEAR)
            for x in ("gate", "up", "down")
        ]
    experts = range(c.experts_in(i))
    if c.family == "mixtral":
        hf = f"model.layers.{i}.block_sparse_moe."
        names = {"gate": "w1", "up": "w3", "down": "w2"}
        entries = [(ours + ("router",), hf + "gate.weight", _LINEAR)]
        for ours_name, hf_name in names.items():
            tensors = [hf + f"experts.{e}.{hf_name}.weight" for e in experts]
            entries.append((ours + (f"{ours_name}_proj",), tensors, _STACK_LINEAR))
        return entries
    entries = [(ours + ("router",), hf + "gate.weight", _LINEAR)]
    for x in ("gate", "up", "down"):
        tensors = [hf + f"experts.{e}.{x}_proj.weight" for e in experts]
        entries.append((ours + (f"{x}_proj",), tensors, _STACK_LINEAR))
    if c.shared_expert_intermediate_size:
        s = ours + ("shared_expert",)
        entries += [
            (s + (f"{x}_proj",), hf + f"shared_expert.{x}_proj.weight", _LINEAR)
            for x in ("gate", "up", "down")
        ]
        entries.append((ours + ("shared_expert_gate",), hf + "shared_expert_gate.weight", _LINEAR))
    return entries


# Tensors some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def model_from_tensors(config: ModelConfig, tensors: dict[str, np.ndarray]) -> Transformer:
    """Build a Transformer for ``config`` holding the HF-named ``tensors``.

    Raises:
        ValueError: a tensor is missing, left over, or has a shape that disagrees with the config.
    """
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    used: set[str] = set()
    for path, names, (to_ours, to_hf) in weight_map(config):
        var = flat[path]
        shape, dtype = var.get_value().shape, var.get_value().dtype
        listed = names if isinstance(names, list) else [names]
        missing = [n for n in listed if n not in tensors]
        if missing:
            raise ValueError(
                f"Checkpoint is missing {missing[0]} (and {len(missing) - 1} more) needed by a "
                f"{config.family} model with this config; is the config.json from another model?"
            )
        used.update(listed)
        arrays = [np.asarray(tensors[n], np.float32) for n in listed]
        source = arrays if isinstance(names, list) else arrays[0]
        expected = int(np.prod(shape))
        got = sum(a.size for a in arrays)
        if got != expected:
            raise ValueError(
                f"Checkpoint tensor {listed[0]} has shape {arrays[0].shape}, which does not fit "
                f"parameter {'/'.join(map(str, path))} of shape {shape} that the config implies; "
                "the checkpoint and its config.json disagree."
            )
        value = to_ours(source, shape)
        # Equal sizes can still be a different layout (a transposed matrix): mapping back to HF
        # must give the shapes the checkpoint has.
        back = to_hf(value)
        for name, array, want in zip(listed, arrays, back if isinstance(names, list) else [back]):
            if array.shape != want.shape:
                raise ValueError(
                    f"Checkpoint tensor {name} has shape {array.shape} where the config implies "
                    f"{want.shape}; the checkpoint and its config.json disagree."
                )
        flat[path] = var.replace(jax.numpy.asarray(value, dtype))
    extra = sorted(n for n in tensors if n not in used and not n.endswith(_IGNORED_SUFFIXES))
    if config.tie_word_embeddings:
        extra = [n for n in extra if n != "lm_head.weight"]
    if extra:
        raise ValueError(
            f"Checkpoint has {len(extra)} tensors this {config.family} config does not use, e.g. "
            f"{extra[:3]}; the checkpoint and its config.json disagree."
        )
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def tensors_from_model(model: Transformer, dtype: str | None = None) -> dict[str, np.ndarray]:
    """HF-named numpy tensors of ``model`` (the inverse of ``model_from_tensors``)."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out: dict[str, np.ndarray] = {}
    for path, names, (_, to_hf) in weight_map(model.config):
        value = np.asarray(jax.device_get(flat[path].get_value()))
        if dtype is not None:
            value = value.astype(dtype)
        converted = to_hf(value)
        if isinstance(names, list):
            out.update({n: np.ascontiguousarray(w) for n, w in zip(names, converted)})
        else:
            out[names] = np.ascontiguousarray(converted)
    return out


# ----------------------------------------------------------------------------- files


def read_hf_dir(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json dict, HF-named tensors) of a directory with one or sharded safetensors files."""
    path = os.fspath(path)
    with open(os.path.join(path, "config.json")) as f:
        hf_config = json.load(f)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"{path} has no model.safetensors or model.safetensors.index.json; convert .bin "
            "checkpoints to safetensors first."
        )
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        tensors.update(read_safetensors(os.path.join(path, name)))
    return hf_config, tensors


def save_hf_dir(
    model: Transformer,
    out_dir: str | os.PathLike,
    dtype: str | None = None,
    max_shard_bytes: int = 2 * 1024**3,
) -> None:
    """Write config.json and safetensors (sharded with an index when over ``max_shard_bytes``)."""
    out_dir = os.fspath(out_dir)
    config = config_to_hf(model.config)  # refuses what transformers cannot load, before writing
    os.makedirs(out_dir, exist_ok=True)
    if dtype is not None:
        config["torch_dtype"] = dtype
    tensors = tensors_from_model(model, dtype)
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        if current and size + tensors[name].nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += tensors[name].nbytes
    shards.append(current)
    if len(shards) == 1:
        write_safetensors(os.path.join(out_dir, "model.safetensors"), shards[0])
    else:
        weight_map_json = {}
        for k, shard in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(out_dir, fname), shard)
            weight_map_json.update({n: fname for n in shard})
        total = sum(t.nbytes for t in tensors.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(
                {"metadata": {"total_size": total}, "weight_map": weight_map_json}, f, indent=1
            )
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
