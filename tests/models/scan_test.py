"""Scan over layers (``models.scan``) against the Python loop over blocks, the reference.

The loop is itself checked against transformers (transformer_test.py); here every family, built
with a repeating block pattern, must give the loop's logits, hidden states, router outputs and
gradients when its blocks are stacked and scanned, under every remat policy; HF checkpoints load
into and export from the stacked layout; KV-cache decoding, the transforms and a sharded train
step are unchanged; and blocks that do not repeat fall back to the loop, saying so.
"""

from __future__ import annotations

import logging

import hf_reference
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import distill_jax as dj
from distill_jax import sharding, teachers
from distill_jax.models import scan
from distill_jax.models.transformer import to_looped, to_scanned
from distill_jax.train import objective
from distill_jax.train import state as state_lib
from distill_jax.train import step as step_lib
from distill_jax.transforms import params as transform_params
from distill_jax.transforms import schedule, stats, width

TINY = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=2, head_dim=8
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
# One config per family, each with blocks that repeat with a period > 1 where the family allows
# it: Gemma-3's sliding/sliding/full pattern, MoE every other block, sliding windows in Qwen2.
FAMILIES = {
    "llama": dict(num_layers=4),
    "qwen2": dict(
        num_layers=4, layer_types=("sliding", "full") * 2, sliding_window=4, attention_bias=True
    ),
    "qwen3": dict(num_layers=3),
    "gemma3": dict(
        num_layers=6,
        layer_types=("sliding", "sliding", "full") * 2,
        sliding_window=4,
        query_pre_attn_scalar=12,
        final_logit_softcapping=5.0,
    ),
    "mixtral": dict(num_layers=2, **MOE),
    "qwen2_moe": dict(
        num_layers=4, moe_layers=(False, True) * 2, shared_expert_intermediate_size=24, **MOE
    ),
    "qwen3_moe": dict(num_layers=4, **MOE),
}
PERIODS = {"llama": 1, "qwen2": 2, "qwen3": 1, "gemma3": 3, "mixtral": 1, "qwen2_moe": 2}
B, T = 2, 12


def _config(family, **changes):
    return dj.models.make_config(family, **{**TINY, **FAMILIES[family], **changes})


def _pair(family, seed=3, **changes):
    """(loop model, scanned model) with the same random weights."""
    c = _config(family, **changes)
    loop = dj.models.Transformer(c, rngs=nnx.Rngs(seed))
    scanned = dj.models.Transformer(c.replace(scan_layers=True), rngs=nnx.Rngs(seed))
    return loop, scanned


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, TINY["vocab_size"], (B, T)).astype(np.int32)
    # Row 0: two packed documents; row 1: one document and padding (segment 0).
    seg = np.array([[1] * 7 + [2] * 5, [1] * 9 + [0] * 3], np.int32)
    pos = np.array([list(range(7)) + list(range(5)), list(range(9)) + [0] * 3], np.int32)
    return ids, pos, seg


@jax.jit
def _outputs(graphdef, state, ids, pos, seg):
    model = nnx.merge(graphdef, state)
    return model.forward(
        ids,
        positions=pos,
        segment_ids=seg,
        output_hidden_states=True,
        output_attention_qkv=True,
    )


def _run(model, batch):
    return jax.tree.map(np.asarray, _outputs(*nnx.split(model), *batch))


def _close(a, b, tol=1e-5, what=""):
    for i, (x, y) in enumerate(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        scale = max(1.0, float(np.abs(y).max()))
        assert np.abs(x - y).max() <= tol * scale, f"{what} leaf {i}: {np.abs(x - y).max()}"


def _per_layer(tree, config):
    return scan.unstack_params(tree, config)


# ------------------------------------------------------------------------------- structure


@pytest.mark.parametrize("family", sorted(PERIODS))
def test_period_is_the_repeating_block_pattern(family):
    c = _config(family)
    assert scan.period(c) == PERIODS[family]
    model = dj.models.Transformer(c.replace(scan_layers=True), rngs=nnx.Rngs(0))
    assert model.scanned and len(model.layers) == PERIODS[family]
    q = model.layers[0].attn.q_proj
    assert q.shape == (c.num_layers // PERIODS[family], 32, 4, 8)
    assert q.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "head_dim")


def test_blocks_that_do_not_repeat_fall_back_to_the_loop_and_say_so(caplog):
    c = _config("qwen3_moe", experts_per_layer=(4, 3, 4, 4))  # non-uniform expert pruning
    assert scan.period(c) == 4
    with caplog.at_level(logging.WARNING, logger="distill_jax"):
        model = dj.models.Transformer(c.replace(scan_layers=True), rngs=nnx.Rngs(0))
    assert not model.scanned and len(model.layers) == 4
    assert "do not repeat" in caplog.text and "Python loop" in caplog.text
    ref = dj.models.Transformer(c, rngs=nnx.Rngs(0))
    _close(_run(model, _batch()).logits, _run(ref, _batch()).logits, 0.0)


def test_stack_and_unstack_are_inverse_and_order_blocks_by_group():
    c = _config("gemma3")  # period 3, two groups
    tree = {i: {"w": np.full((2,), i, np.float32)} for i in range(6)}
    stacked = scan.stack_layers(tree, c)
    assert sorted(stacked) == [0, 1, 2]
    np.testing.assert_array_equal(stacked[1]["w"][:, 0], [1, 4])  # block g * 3 + 1
    back = scan.unstack_layers(stacked, c)
    assert all(np.array_equal(back[i]["w"], tree[i]["w"]) for i in range(6))


# ------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_scanned_outputs_equal_the_loop(family):
    loop, scanned = _pair(family)
    a, b = _run(loop, _batch()), _run(scanned, _batch())
    _close(b.logits, a.logits, 1e-5, "logits")
    _close(b.hidden_states, a.hidden_states, 1e-5, "hidden states")
    _close(b.attention_qkv, a.attention_qkv, 1e-5, "qkv")
    _close(b.router_logits, a.router_logits, 1e-5, "router logits")
    _close(b.router_stats, a.router_stats, 1e-5, "router stats")
    _close(b.aux_loss, a.aux_loss, 1e-5, "aux loss")
    # The same initialisation: scanning is a layout, not another model.
    params = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
    params["layers"] = scan.unstack_layers(params["layers"], scanned.config)
    _close(params, nnx.to_pure_dict(nnx.state(loop, nnx.Param)), 0.0, "params")


def _grads(model, batch, remat):
    ids, pos, seg = batch

    def loss(m):
        out = m.forward(ids, positions=pos, segment_ids=seg, remat=remat)
        return jnp.sum(out.logits * jnp.cos(out.logits)) + out.aux_loss

    grads = nnx.grad(loss)(model)
    return _per_layer(nnx.to_pure_dict(grads), model.config)


@pytest.mark.parametrize("family", ["gemma3", "qwen2_moe"])
def test_scanned_gradients_equal_the_loop_under_every_remat_policy(family):
    loop, scanned = _pair(family)
    ref = _grads(loop, _batch(1), "none")
    for policy in ("none", "full", "dots"):
        _close(_grads(scanned, _batch(1), policy), ref, 1e-5, f"grads ({policy})")
    _close(_grads(loop, _batch(1), "dots"), ref, 1e-5, "loop grads (dots)")


def test_remat_policy_names():
    assert scan.remat_policy("none", "cpu") is None and scan.remat_policy(False, "cpu") is None
    assert scan.remat_policy(True, "cpu") is jax.checkpoint_policies.nothing_saveable
    assert scan.remat_policy("offload", "tpu") is not None
    with pytest.raises(ValueError, match="pinned host memory"):
        scan.remat_policy("offload", "cpu")
    with pytest.raises(ValueError, match="choose one of"):
        scan.remat_policy("some", "cpu")


def test_kv_cache_sampling_is_unchanged():
    loop, scanned = _pair("gemma3")
    prompt = jnp.asarray(_batch(2)[0][:, :5])
    mask = jnp.asarray([[1] * 5, [0, 0, 1, 1, 1]], bool)  # left padding
    a = dj.models.generate(loop, prompt, max_new_tokens=6, prompt_mask=mask, return_logits=True)
    b = dj.models.generate(scanned, prompt, max_new_tokens=6, prompt_mask=mask, return_logits=True)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    _close(b.logits, a.logits, 1e-5, "sampled logits")


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    "case, overrides",
    [
        ("llama_tied", dict(num_hidden_layers=3)),
        ("qwen2_moe", {}),  # dense / sparse blocks alternate: period 2
        (
            "gemma3",
            dict(
                num_hidden_layers=6,
                layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
            ),
        ),
    ],
)
def test_hf_checkpoints_load_scanned_and_export_from_it(case, overrides, tmp_path):
    ref = hf_reference.build_reference(case, tmp_path / "in", **overrides)
    model = dj.models.from_pretrained(tmp_path / "in", scan_layers=True)
    assert model.scanned and len(model.layers) < model.config.num_layers
    ids = _batch(3)[0] % ref.config.vocab_size
    want = hf_reference.run_reference(ref, ids).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), want, atol=1e-4, rtol=0)
    dj.models.save_pretrained(model, tmp_path / "out")
    back = hf_reference.run_reference(hf_reference.load_reference(tmp_path / "out"), ids)
    np.testing.assert_allclose(back.logits.numpy(), want, atol=1e-5, rtol=0)


def test_to_scanned_and_to_looped_round_trip():
    loop, _ = _pair("qwen2_moe")
    scanned = to_scanned(loop)
    assert scanned.scanned and scanned.config.scan_layers
    back = to_looped(scanned)
    assert not back.scanned and not back.config.scan_layers
    _close(nnx.to_pure_dict(nnx.state(back)), nnx.to_pure_dict(nnx.state(loop)), 0.0)


# ---------------------------------------------------------------------------- transforms


def test_calibration_and_plans_on_a_scanned_model_equal_the_loop():
    loop, scanned = _pair("qwen2_moe")
    ids, pos, seg = _batch(4)
    batch = [dict(input_ids=ids, positions=pos, segment_ids=seg)]
    a, b = stats.calibrate(loop, batch), stats.calibrate(scanned, batch)
    _close([b["layers"], b["embed_sq"]], [a["layers"], a["embed_sq"]], 1e-5, "stats")
    # An index plan slices the stacked tree exactly as it slices the per-layer one.
    plan = width.head_plan(a, loop.config, 2)
    p_loop, c_loop = schedule.apply_plan(*transform_params.to_params(loop), plan)
    tree = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
    p_scan, c_scan = schedule.apply_plan(tree, scanned.config, plan)
    assert c_scan == c_loop.replace(scan_layers=True)
    _close(scan.unstack_params(p_scan, c_scan), p_loop, 0.0, "sliced params")
    # Expert pruning to different counts per layer leaves the blocks unlike: back to per layer.
    e_plan = {"kind": "experts", "keep": {"1": [0, 1, 2], "3": [0, 1]}, "num_experts": 4}
    e_plan["shape"] = stats.shape_key(loop.config)
    p_e, c_e = schedule.apply_plan(tree, scanned.config, e_plan)
    assert c_e.experts_per_layer == (0, 3, 0, 2) and not scan.is_stacked(c_e)
    assert sorted(p_e["layers"]) == [0, 1, 2, 3]


# ------------------------------------------------------------------------------ training


def _step_state(model, spec, tx):
    graphdef, params = teachers.split_model(model)
    state = state_lib.create(
        {"student": params, "loss": {}}, tx, objective.init_state(spec), seed=0
    )
    return graphdef, state


def test_sharded_scanned_train_step_equals_the_unsharded_loop():
    spec = objective.LossSpec.from_config(
        dict(forward_kl=dict(temperature=2.0), ce=dict(weight=0.5)), dict(head_chunk_tokens=8)
    )
    # SGD, so that the update is the gradient itself (Adam's first step divides by |g|).
    tx, _ = state_lib.make_optimizer(
        dict(name="sgd", learning_rate=1.0, schedule="constant", warmup_steps=0), 10, 128
    )
    t_loop, t_scan = _pair("gemma3", seed=4)
    s_loop, s_scan = _pair("gemma3")
    ids, pos, seg = _batch(5)
    rng = np.random.default_rng(5)
    batch = dict(
        input_ids=np.tile(ids, (4, 1)),
        positions=np.tile(pos, (4, 1)),
        segment_ids=np.tile(seg, (4, 1)),
        targets=rng.integers(0, 96, (8, T)).astype(np.int32),
        loss_mask=np.tile(seg != 0, (4, 1)),
    )
    results = []
    for student, teacher_model, mesh_axes in (
        (s_loop, t_loop, None),
        (s_scan, t_scan, (("data", 2), ("fsdp", 4), ("tensor", 1), ("expert", 1))),
    ):
        teacher = teachers.OnlineTeacher(teacher_model)
        graphdef, state = _step_state(student, spec, tx)
        step = step_lib.make_distill_step(
            student_graphdef=graphdef, teacher=teacher, spec=spec, tx=tx, remat="full"
        )
        if mesh_axes is None:
            state, metrics = jax.jit(step)(state, teacher.params(), batch)
        else:
            mesh = sharding.make_mesh(mesh_axes)
            rules = sharding.DEFAULT_RULES
            st_sh = step_lib.state_shardings(
                state, mesh, rules, sharding.param_logical_axes(student)
            )
            b_sh = {k: sharding.batch_sharding(mesh, rules) for k in batch}
            fn = step_lib.jit_step(
                step,
                state_sharding=st_sh,
                teacher_sharding=teacher.shardings(mesh, rules),
                batch_sharding=b_sh,
            )
            with sharding.use_mesh(mesh, rules):
                state, metrics = fn(jax.device_put(state, st_sh), teacher.params(), batch)
            q = st_sh.params["student"]["layers"][0]["attn"]["q_proj"]
            assert q.spec[0] is None and q.spec[1] == "fsdp"  # layers whole, embed over fsdp
        tree = _per_layer(jax.device_get(state.params["student"]), student.config)
        assert float(metrics["grad_norm"]) > 0.1  # the update moved the parameters
        results.append((float(metrics["loss"]), tree))
    (loss_a, a), (loss_b, b) = results
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
    _close(b, a, 1e-5, "updated params")


# --------------------------------------------------------------------------- intermediates


@pytest.mark.parametrize("family", ["gemma3", "qwen2_moe"])
def test_scanned_block_intermediates_equal_the_loop(family):
    loop, scanned = _pair(family)
    names = tuple(dj.models.transformer.BLOCK_INTERMEDIATES)

    @jax.jit
    def run(graphdef, state, ids, pos, seg):
        out = nnx.merge(graphdef, state).forward(
            ids, positions=pos, segment_ids=seg, intermediates=names
        )
        return out.intermediates

    a = run(*nnx.split(loop), *_batch())
    b = run(*nnx.split(scanned), *_batch())
    assert [sorted(x) for x in a] == [sorted(x) for x in b]
    _close(b, a, 1e-5, "intermediates")


def _scan_outputs(model, **kw) -> list[tuple[int, ...]]:
    """Shapes of the per-group arrays the forward's lax.scan returns beside its carry."""
    graphdef, state = nnx.split(model)
    ids, pos, seg = _batch()
    jaxpr = jax.make_jaxpr(
        lambda st: nnx.merge(graphdef, st).forward(ids, compute_logits=False, **kw).hidden
    )(state)
    (eqn,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    return [v.aval.shape for v in eqn.outvars[eqn.params["num_carry"] :]]


@pytest.mark.parametrize("remat", ["none", "full"])
def test_a_forward_without_intermediates_keeps_no_per_block_arrays(remat):
    """The fused-loss path: nothing but the residual stream leaves the scanned blocks."""
    _, scanned = _pair("llama")
    assert _scan_outputs(scanned, remat=remat) == []
    assert _scan_outputs(scanned, remat=remat, output_hidden_states=True) == [(4, B, T, 32)]
    reduced = _scan_outputs(
        scanned,
        intermediates=("expert_outputs", "mlp_hidden"),
        reduce_intermediates=lambda got: got["mlp_hidden"].sum(),
    )
    assert reduced == [(4,)]  # a reducer keeps its result only, not the [B, T, F] arrays
    with pytest.raises(ValueError, match="Unknown block intermediates \\['hiden'\\]"):
        scanned.forward(_batch()[0], intermediates=("hiden",))
