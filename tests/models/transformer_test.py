"""Our Transformer against transformers (PyTorch), the reference, for tiny random configs of every
family: logits, packed sequences, hidden states, MoE router outputs and load-balancing loss, HF
checkpoints in both directions (single file and sharded), and the errors bad inputs must raise.

Each case's model is compiled once (``_forward`` returns everything the tests compare) and every
batch has the same shape [2, 12], so one compilation serves the unpacked, padded and packed batches.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import hf_reference
import jax
import numpy as np
import pytest
import torch
from flax import nnx

import distill_jax as dj
from distill_jax.models.convert import hf as hf_convert

ATOL = 1e-4  # float32, 'highest' matmul precision on both sides; observed errors are ~1e-6
B, T = 2, 12
# Segment lengths of the two packed rows; the rest of each row is padding (segment 0).
PACKING = ((6, 3, 2), (8, 2))
# The padded batch: row 1 keeps its first 9 tokens.
PADDED_LENGTHS = (12, 9)


_BACKEND_COMPILES: list[str] = []  # one entry per XLA compilation anywhere in the process


def _record_compile(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _BACKEND_COMPILES.append(event)


jax.monitoring.register_event_duration_secs_listener(_record_compile)


@jax.jit
def _forward(graphdef, state, ids, positions, segment_ids):
    """Everything the tests compare, from one compilation per model: (ModelOutput, hidden)."""
    model = nnx.merge(graphdef, state)
    out = model.forward(
        ids, positions=positions, segment_ids=segment_ids, output_hidden_states=True
    )
    hidden = model(ids, positions=positions, segment_ids=segment_ids, return_hidden=True)
    return out, hidden


def _run(model, ids, positions=None, segment_ids=None):
    if positions is None:
        positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
    if segment_ids is None:
        segment_ids = np.ones(ids.shape, np.int32)
    out, hidden = _forward(*nnx.split(model), ids, positions, segment_ids)
    return jax.tree.map(np.asarray, out), np.asarray(hidden)


def _packed_layout(lengths_per_row, t):
    """positions, segment_ids [B, T] for rows of consecutive segments followed by padding."""
    positions = np.zeros((len(lengths_per_row), t), np.int32)
    segments = np.zeros((len(lengths_per_row), t), np.int32)
    for row, lengths in enumerate(lengths_per_row):
        start = 0
        for seg, n in enumerate(lengths, start=1):
            positions[row, start : start + n] = np.arange(n)
            segments[row, start : start + n] = seg
            start += n
    return positions, segments


def _params(model) -> dict:
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=str(k))


@dataclasses.dataclass
class Case:
    name: str
    path: str  # the transformers-saved checkpoint
    reference: torch.nn.Module
    model: dj.models.Transformer
    ids: np.ndarray  # [B, T]
    ours: object  # ModelOutput of ids, unpacked
    hidden: np.ndarray  # model(ids, return_hidden=True)
    ref: object  # transformers output of ids
    packed_ids: np.ndarray
    packed_positions: np.ndarray
    packed_segments: np.ndarray
    packed: object  # ModelOutput of the packed batch
    compilations: int  # new compilations of _forward for the runs above

    @property
    def is_moe(self) -> bool:
        return self.model.config.num_experts > 0


_BUILT: dict[str, Case] = {}


def _build(name: str, tmp_path_factory) -> Case:
    if name in _BUILT:
        return _BUILT[name]
    path = str(tmp_path_factory.mktemp(name))
    reference = hf_reference.build_reference(name, path)
    model = dj.models.from_pretrained(path)
    rng = np.random.default_rng(0)
    v = model.config.vocab_size
    ids = rng.integers(0, v, (B, T)).astype(np.int32)
    packed_ids = rng.integers(0, v, (B, T)).astype(np.int32)
    positions, segments = _packed_layout(PACKING, T)
    before = _forward._cache_size()
    ours, hidden = _run(model, ids)
    packed, _ = _run(model, packed_ids, positions, segments)
    kw = dict(output_hidden_states=True)
    if model.config.num_experts:
        kw["output_router_logits"] = True
    ref = hf_reference.run_reference(reference, ids, **kw)
    _BUILT[name] = Case(
        name=name,
        path=path,
        reference=reference,
        model=model,
        ids=ids,
        ours=ours,
        hidden=hidden,
        ref=ref,
        packed_ids=packed_ids,
        packed_positions=positions,
        packed_segments=segments,
        packed=packed,
        compilations=_forward._cache_size() - before,
    )
    return _BUILT[name]


@pytest.fixture(scope="module", params=list(hf_reference.CASES))
def case(request, tmp_path_factory) -> Case:
    return _build(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=hf_reference.MOE_CASES)
def moe_case(request, tmp_path_factory) -> Case:
    return _build(request.param, tmp_path_factory)


def _close(ours, ref, atol=ATOL, **kw):
    ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref
    np.testing.assert_allclose(np.asarray(ours), ref, atol=atol, rtol=0, **kw)


# ----------------------------------------------------------------------------- logits


def test_logits_match_transformers(case):
    assert case.ours.logits.shape == (B, T, case.model.config.vocab_size)
    assert case.ours.logits.dtype == np.float32
    _close(case.ours.logits, case.ref.logits)


def test_compiles_once(case):
    """The unpacked and packed batches share one compilation; a reload hits the same cache."""
    assert case.compilations <= 1
    reloaded = dj.models.from_pretrained(case.path)
    before = _forward._cache_size()
    _run(reloaded, case.ids)
    assert _forward._cache_size() == before


def test_packed_segments_equal_separate_sequences(case):
    """Each packed segment's logits equal transformers run on that segment alone."""
    start_of = {}
    for row, lengths in enumerate(PACKING):
        start = 0
        for n in lengths:
            start_of[row, start] = n
            start += n
    for (row, start), n in start_of.items():
        segment = case.packed_ids[row : row + 1, start : start + n]
        ref = hf_reference.run_reference(case.reference, segment).logits[0]
        _close(case.packed.logits[row, start : start + n], ref, err_msg=f"row {row} at {start}")


def test_padding_does_not_change_other_tokens(case):
    pad = case.packed_segments == 0
    assert pad.any()
    other_ids = np.where(pad, (case.packed_ids + 7) % case.model.config.vocab_size, case.packed_ids)
    out, _ = _run(case.model, other_ids, case.packed_positions, case.packed_segments)
    np.testing.assert_array_equal(out.logits[~pad], case.packed.logits[~pad])


def test_right_padding_matches_attention_mask(case):
    """Segment id 0 on right padding equals transformers' attention_mask on the valid tokens."""
    mask = np.arange(T)[None, :] < np.asarray(PADDED_LENGTHS)[:, None]
    out, _ = _run(case.model, case.ids, None, mask.astype(np.int32))
    ref = hf_reference.run_reference(case.reference, case.ids, mask.astype(np.int64))
    _close(out.logits[mask], ref.logits.numpy()[mask])


# ----------------------------------------------------------------------------- hidden states


def test_hidden_states_match_transformers(case):
    """Ours: embeddings, then each block's output before the final norm; ``hidden`` after it.
    transformers: the same, except that its last entry is after the final norm."""
    layers = case.model.config.num_layers
    ours, ref = case.ours.hidden_states, case.ref.hidden_states
    assert len(ours) == len(ref) == layers + 1
    for i in range(layers):
        _close(ours[i], ref[i], err_msg=f"hidden state {i}")
    _close(case.ours.hidden, ref[-1], err_msg="final hidden")
    captured = []
    hook = case.reference.model.layers[-1].register_forward_hook(
        lambda module, args, out: captured.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        hf_reference.run_reference(case.reference, case.ids)
    finally:
        hook.remove()
    _close(ours[-1], captured[0], err_msg="last block output (before the final norm)")


def test_return_hidden_times_head_is_logits(case):
    np.testing.assert_array_equal(case.hidden, case.ours.hidden)
    logits = case.hidden.astype(np.float64) @ np.asarray(case.model.head_weights(), np.float64)
    cap = case.model.config.final_logit_softcapping
    if cap:
        logits = np.tanh(logits / cap) * cap
    _close(case.ours.logits, logits, atol=1e-5)


# ----------------------------------------------------------------------------- checkpoints


def test_save_pretrained_loads_in_transformers(case, tmp_path):
    dj.models.save_pretrained(case.model, tmp_path)
    reloaded = hf_reference.load_reference(tmp_path)
    _close(case.ours.logits, hf_reference.run_reference(reloaded, case.ids).logits)
    ours_again = dj.models.from_pretrained(tmp_path)
    assert ours_again.config == case.model.config
    _assert_same_params(ours_again, case.model)


def test_sharded_save_loads_in_transformers(case, tmp_path):
    hf_convert.save_hf_dir(case.model, tmp_path, max_shard_bytes=20_000)
    with open(tmp_path / "model.safetensors.index.json") as f:
        shards = set(json.load(f)["weight_map"].values())
    assert len(shards) > 1
    assert sorted(shards) == sorted(p.name for p in tmp_path.glob("*.safetensors"))
    reloaded = hf_reference.load_reference(tmp_path)
    _close(case.ours.logits, hf_reference.run_reference(reloaded, case.ids).logits)
    _assert_same_params(dj.models.from_pretrained(tmp_path), case.model)


def test_loads_transformers_sharded_checkpoint(case, tmp_path):
    case.reference.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    _assert_same_params(dj.models.from_pretrained(tmp_path), case.model)


# ----------------------------------------------------------------------------- MoE


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _numpy_router_stats(router_logits, valid, k, normalize):
    """Slow float64 reference of moe.router_stats for one layer."""
    probs = _softmax(router_logits)  # [B, T, E]
    top = np.argsort(-probs, axis=-1)[..., :k]  # [B, T, k]
    chosen = np.zeros_like(probs)
    np.put_along_axis(chosen, top, 1.0, axis=-1)
    combine = chosen * probs
    if normalize:
        combine /= combine.sum(-1, keepdims=True)
    w = valid.astype(np.float64)[..., None]
    return {
        "tokens_per_expert": (chosen * w).sum((0, 1)),
        "gate_mass": (combine * w).sum((0, 1)),
        "router_prob_sum": (probs * w).sum((0, 1)),
        "num_tokens": valid.sum(),
    }


def _numpy_aux_loss(router_logits, valid, k):
    """Switch Transformer loss over all MoE layers' valid tokens (transformers' form)."""
    stats = [_numpy_router_stats(r, valid, k, False) for r in router_logits]
    rows = sum(s["num_tokens"] for s in stats)
    f = sum(s["tokens_per_expert"] for s in stats) / rows
    p = sum(s["router_prob_sum"] for s in stats) / rows
    return len(f) * np.sum(f * p)


def test_moe_router_logits_and_aux_loss_match_transformers(moe_case):
    c = moe_case.model.config
    ours, ref = moe_case.ours, moe_case.ref
    assert len(ours.router_logits) == len(ref.router_logits) == c.num_moe_layers
    for i, (a, b) in enumerate(zip(ours.router_logits, ref.router_logits)):
        _close(a.reshape(-1, c.num_experts), b, err_msg=f"router logits of MoE layer {i}")
    np.testing.assert_allclose(ours.aux_loss, ref.aux_loss.item(), rtol=1e-5)


@pytest.mark.parametrize("impl", ["dense", "grouped"])
def test_moe_logits_of_both_dispatch_paths_match_transformers(moe_case, impl):
    """The default on CPU is dense (``moe.resolve_impl``); TPU and GPU run the grouped path."""
    model = dj.models.from_pretrained(moe_case.path, moe_impl=impl)
    out, _ = _run(model, moe_case.ids)
    _close(out.logits, moe_case.ref.logits)
    np.testing.assert_allclose(out.aux_loss, moe_case.ref.aux_loss.item(), rtol=1e-5)


def test_moe_aux_loss_with_padding_matches_transformers(moe_case):
    mask = np.arange(T)[None, :] < np.asarray(PADDED_LENGTHS)[:, None]
    out, _ = _run(moe_case.model, moe_case.ids, None, mask.astype(np.int32))
    ref = hf_reference.run_reference(
        moe_case.reference, moe_case.ids, mask.astype(np.int64), output_router_logits=True
    )
    np.testing.assert_allclose(out.aux_loss, ref.aux_loss.item(), rtol=1e-5)
    k = moe_case.model.config.num_experts_per_tok
    np.testing.assert_allclose(out.aux_loss, _numpy_aux_loss(out.router_logits, mask, k), rtol=1e-5)


def test_moe_router_stats_match_numpy(moe_case):
    """On the packed batch (with padding): sums over valid tokens only."""
    c = moe_case.model.config
    valid = moe_case.packed_segments != 0
    n_valid = valid.sum()
    out = moe_case.packed
    assert len(out.router_stats) == c.num_moe_layers
    for logits, stats in zip(out.router_logits, out.router_stats):
        expected = _numpy_router_stats(logits, valid, c.num_experts_per_tok, c.norm_topk_prob)
        for key, value in expected.items():
            np.testing.assert_allclose(stats[key], value, rtol=1e-5, atol=1e-5, err_msg=key)
        np.testing.assert_allclose(
            stats["tokens_per_expert"].sum(), c.num_experts_per_tok * n_valid
        )
        np.testing.assert_allclose(stats["router_prob_sum"].sum(), n_valid, rtol=1e-5)
        if c.norm_topk_prob:
            np.testing.assert_allclose(stats["gate_mass"].sum(), n_valid, rtol=1e-5)
        else:
            assert stats["gate_mass"].sum() < n_valid
    np.testing.assert_allclose(
        out.aux_loss, _numpy_aux_loss(out.router_logits, valid, c.num_experts_per_tok), rtol=1e-5
    )


# ----------------------------------------------------------------------------- bad inputs


def _copy_checkpoint(case: Case, tmp_path, **config_changes) -> str:
    path = str(tmp_path / "ckpt")
    shutil.copytree(case.path, path)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config.update(config_changes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


@pytest.mark.parametrize(
    "changes, named",
    [
        (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "GPT2LMHeadModel"),
        (dict(model_type="mamba", architectures=None), "mamba"),
    ],
)
def test_unknown_architecture_lists_supported(tmp_path, tmp_path_factory, changes, named):
    path = _copy_checkpoint(_build("llama_tied", tmp_path_factory), tmp_path, **changes)
    with pytest.raises(ValueError, match=named) as error:
        dj.models.from_pretrained(path)
    for arch in hf_convert.SUPPORTED_ARCHITECTURES:
        assert arch in str(error.value)


@pytest.mark.parametrize(
    "name, changes, tensor",
    [
        ("llama_tied", dict(hidden_size=48), "model.embed_tokens.weight"),
        ("llama_tied", dict(intermediate_size=64), "model.layers.0.mlp.gate_proj.weight"),
        ("qwen3_moe", dict(moe_intermediate_size=24), "model.layers.0.mlp.experts.0.gate_proj"),
        ("gemma3", dict(num_key_value_heads=1), "model.layers.0.self_attn.k_proj.weight"),
    ],
)
def test_checkpoint_disagreeing_with_config_names_the_tensor(
    tmp_path, tmp_path_factory, name, changes, tensor
):
    path = _copy_checkpoint(_build(name, tmp_path_factory), tmp_path, **changes)
    with pytest.raises(ValueError, match=tensor.replace(".", r"\.")):
        dj.models.from_pretrained(path)


def test_transposed_tensor_of_same_size_is_rejected(tmp_path_factory):
    """A tensor with the right number of elements but the wrong layout must not load."""
    case = _build("llama_tied", tmp_path_factory)
    _, tensors = hf_convert.read_hf_dir(case.path)
    name = "model.layers.1.mlp.down_proj.weight"
    tensors = {**tensors, name: np.ascontiguousarray(tensors[name].T)}
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        hf_convert.model_from_tensors(case.model.config, tensors)


def test_too_long_input_raises_before_compiling(tmp_path_factory):
    model = _build("llama_tied", tmp_path_factory).model
    n = model.config.max_position_embeddings + 1
    ids = np.zeros((1, n), np.int32)
    before = len(_BACKEND_COMPILES)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        _run(model, ids)
    assert len(_BACKEND_COMPILES) == before
    _run(model, ids[:, 1:])  # the longest input that fits compiles: the counter sees compilations
    assert len(_BACKEND_COMPILES) > before
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(ids)


@pytest.mark.parametrize(
    "family, knob", [("llama", "attn_logit_softcapping"), ("qwen2", "final_logit_softcapping")]
)
def test_export_refuses_knobs_transformers_ignores(tmp_path, family, knob):
    config = dj.models.make_config(
        family,
        vocab_size=16,
        hidden_size=8,
        intermediate_size=8,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
        **{knob: 30.0},
    )
    with pytest.raises(ValueError, match=knob):
        dj.models.save_pretrained(dj.models.Transformer(config), tmp_path)
