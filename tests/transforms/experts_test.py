"""Expert pruning and merging: identities, exactness properties, NAEE, HF/transformers parity."""

from __future__ import annotations

import hf_reference
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models
import torch

import distill_jax as dj
from distill_jax.transforms import experts as experts_lib

TINY = tiny_models.moe_arch(num_experts=8)


def _model(seed=0, **extra):
    return tiny_models.build("mixtral", TINY, seed, **extra)


def _ids(n=16, t=6, seed=0):
    return tiny_models.token_ids(n, t, seed)


def _logits(model, ids):
    return np.asarray(model(jnp.asarray(ids)))


def _top_k(model, ids):
    """[L, B, T, k] experts each token chose in each MoE layer."""
    out = model.forward(jnp.asarray(ids))
    k = model.config.num_experts_per_tok
    return np.stack([np.argsort(-np.asarray(lg), axis=-1)[..., :k] for lg in out.router_logits])


def test_keeping_every_expert_is_the_identity():
    model = _model()
    ids = _ids()
    stats = dj.transforms.calibrate(model, [ids])
    for criterion in ("frequency", "gate_mass", "ean", "reap", "output_norm", "max_activation"):
        plan = dj.transforms.rank_experts(stats, keep=8, criterion=criterion)
        params, config = dj.transforms.prune_experts(*dj.transforms.to_params(model), plan)
        assert config == model.config
        np.testing.assert_array_equal(
            _logits(dj.transforms.to_model(params, config), ids), _logits(model, ids)
        )


def test_pruning_experts_that_got_no_tokens_leaves_outputs_unchanged():
    model = _model(num_experts=6)
    pool = _ids(n=400, t=4, seed=1)
    chosen = _top_k(model, pool)  # [L, B, T, k]
    counts = [np.bincount(chosen[layer].ravel(), minlength=6) for layer in range(2)]
    unused = [int(np.argmin(c)) for c in counts]  # the least used expert of each layer
    rows = [
        b
        for b in range(len(pool))
        if all(unused[layer] not in chosen[layer, b] for layer in range(2))
    ]
    assert len(rows) >= 8, "the random pool should hold sequences avoiding those experts"
    calib = pool[rows]
    stats = dj.transforms.calibrate(model, [calib])
    for layer in range(2):
        assert stats["layers"][layer]["tokens_per_expert"][unused[layer]] == 0
    plan = dj.transforms.rank_experts(stats, keep=5, criterion="frequency")
    assert [set(range(6)) - set(plan["keep"][layer]) for layer in range(2)] == [
        {unused[0]},
        {unused[1]},
    ]
    params, config = dj.transforms.prune_experts(*dj.transforms.to_params(model), plan)
    pruned = dj.transforms.to_model(params, config)
    assert config.num_experts == 5
    n_before = dj.models.num_params(model)
    per_expert = 3 * 32 * 16 + 32  # gate, up, down and a router column
    assert dj.models.num_params(pruned) == n_before - 2 * per_expert
    np.testing.assert_allclose(_logits(pruned, calib), _logits(model, calib), rtol=1e-6, atol=1e-6)
    # Elsewhere outputs change (the test would notice a no-op).
    others = pool[[b for b in range(len(pool)) if b not in rows][:8]]
    assert np.abs(_logits(pruned, others) - _logits(model, others)).max() > 1e-3


def test_permutation_alignment_recovers_a_permuted_copy():
    rng = np.random.RandomState(0)
    ref = {
        "gate_proj": rng.randn(32, 16).astype(np.float32),
        "up_proj": rng.randn(32, 16).astype(np.float32),
        "down_proj": rng.randn(16, 32).astype(np.float32),
    }
    perm = rng.permutation(16)
    other = {
        "gate_proj": ref["gate_proj"][:, perm],
        "up_proj": ref["up_proj"][:, perm],
        "down_proj": ref["down_proj"][perm],
    }
    x = rng.randn(5, 32).astype(np.float32)

    def expert(w):
        g, u, d = (np.asarray(w[k], np.float64) for k in ("gate_proj", "up_proj", "down_proj"))
        a = x @ g
        return (a / (1 + np.exp(-a)) * (x @ u)) @ d

    np.testing.assert_allclose(expert(other), expert(ref), rtol=1e-6, atol=1e-6)
    aligned, found = dj.transforms.align_expert(ref, other)
    np.testing.assert_array_equal(perm[found], np.arange(16))
    for k in ref:
        np.testing.assert_array_equal(aligned[k], ref[k])


def _stats_and_params(model, ids):
    stats = dj.transforms.calibrate(model, [ids])
    return stats, *dj.transforms.to_params(model)


def test_merging_identical_experts():
    model = _model()
    block = model.layers[0].mlp
    # Experts 5, 6 are permuted copies of expert 1 (same function, hidden units reordered).
    perm = np.random.RandomState(3).permutation(16)
    for j in (5, 6):
        for name, axis in (("gate_proj", 1), ("up_proj", 1), ("down_proj", 0)):
            w = getattr(block, name)
            copy = np.take(np.asarray(w[...][1]), perm, axis=axis)
            w[...] = w[...].at[j].set(copy)
    ids = _ids()
    stats, params, config = _stats_and_params(model, ids)
    plan = dj.transforms.plan_merge(stats, keep=6, criterion="frequency")
    plan["groups"][0] = [[1, 5, 6], [0], [2], [3], [4], [7]]  # the group to test
    plan["groups"][1] = [[0, 1, 2], [3], [4], [5], [6], [7]]
    merged, new_config = dj.transforms.merge_experts(params, config, plan, router="dominant")
    assert new_config.num_experts == 6
    # A group of identical (up to permutation) experts merges to that expert, bitwise-close.
    got = merged["layers"][0]["mlp"]
    for name in ("gate_proj", "up_proj", "down_proj"):
        np.testing.assert_allclose(got[name][1], params["layers"][0]["mlp"][name][1], rtol=1e-6)
        for slot, j in ((0, 0), (2, 2), (5, 7)):  # singleton groups are unchanged
            np.testing.assert_array_equal(got[name][slot], params["layers"][0]["mlp"][name][j])
    np.testing.assert_array_equal(
        got["router"], np.asarray(params["layers"][0]["mlp"]["router"])[:, [0, 1, 2, 3, 4, 7]]
    )
    # Merged entries of a non-identical group, without alignment, lie within the members' range.
    members = np.asarray(params["layers"][1]["mlp"]["gate_proj"])[[0, 1, 2]]
    no_align, _ = dj.transforms.merge_experts(params, config, plan, align=False)
    w = np.asarray(no_align["layers"][1]["mlp"]["gate_proj"][0])
    assert np.all(w >= members.min(0) - 1e-6) and np.all(w <= members.max(0) + 1e-6)
    # With tied router slots, merging identical experts leaves every output unchanged.
    plan["groups"][1] = [[j] for j in range(8)]
    tied, tied_config = dj.transforms.merge_experts(params, config, plan, router="tie")
    assert tied_config == config
    np.testing.assert_allclose(
        _logits(dj.transforms.to_model(tied, tied_config), ids), _logits(model, ids), atol=2e-5
    )


def test_frequency_weighted_average():
    model = _model()
    ids = _ids()
    stats, params, config = _stats_and_params(model, ids)
    plan = dj.transforms.plan_merge(stats, keep=7, criterion="frequency")
    for block in (0, 1):
        plan["groups"][block] = [[0, 3]] + [[j] for j in (1, 2, 4, 5, 6, 7)]
    merged, _ = dj.transforms.merge_experts(params, config, plan, align=False)
    f = np.asarray(plan["weights"][0])
    up = np.asarray(params["layers"][0]["mlp"]["up_proj"], np.float64)
    want = (f[0] * up[0] + f[3] * up[3]) / (f[0] + f[3])
    np.testing.assert_allclose(merged["layers"][0]["mlp"]["up_proj"][0], want, rtol=1e-5)
    np.testing.assert_allclose(f, stats["layers"][0]["tokens_per_expert"] / stats["num_tokens"])


def test_plan_merge_grouping_and_partial_preservation():
    model = _model()
    ids = _ids(n=32)
    stats, params, config = _stats_and_params(model, ids)
    # rho = 1 is pruning by the ranking.
    plan = dj.transforms.plan_merge(stats, keep=4, criterion="reap", preserve_fraction=1.0)
    prune_plan = dj.transforms.rank_experts(stats, keep=4, criterion="reap")
    a, ca = dj.transforms.merge_experts(params, config, plan)
    b, cb = dj.transforms.prune_experts(params, config, prune_plan)
    assert ca == cb
    for block in (0, 1):
        for name in ("router", "gate_proj", "up_proj", "down_proj"):
            np.testing.assert_array_equal(
                a["layers"][block]["mlp"][name], b["layers"][block]["mlp"][name]
            )
    # rho = 0.5: the top 2 by REAP are preserved bitwise; the other 6 experts form 2 groups led
    # by the next-ranked ones, each member joining its most similar dominant by router logits.
    plan = dj.transforms.plan_merge(stats, keep=4, criterion="reap", preserve_fraction=0.5)
    reap = dj.transforms.expert_scores(stats, "reap")
    sims = dj.transforms.stats.router_similarity(stats)
    merged, _ = dj.transforms.merge_experts(params, config, plan)
    for block in (0, 1):
        order = list(np.argsort(-reap[block], kind="stable"))
        groups = plan["groups"][block]
        singletons = sorted(g[0] for g in groups if len(g) == 1 and g[0] in order[:2])
        assert singletons == sorted(order[:2])
        dominants = order[2:4]
        assert sorted(g[0] for g in groups if g[0] not in order[:2]) == sorted(dominants)
        for g in groups:
            for j in g[1:]:
                assert sims[block][j, g[0]] == max(sims[block][j, d] for d in dominants)
        assert sorted(j for g in groups for j in g) == list(range(8))
        slots = [g[0] for g in groups]
        for p in order[:2]:
            for name in ("gate_proj", "up_proj", "down_proj"):
                np.testing.assert_array_equal(
                    merged["layers"][block]["mlp"][name][slots.index(p)],
                    params["layers"][block]["mlp"][name][p],
                )


def test_naee_removes_a_planted_unused_expert():
    model = _model(num_layers=1, num_experts=4, num_experts_per_tok=1)
    ids = _ids(n=24)
    # Expert 2's router column is the mean of experts 0's and 1's: its logit never exceeds both,
    # so top-1 routing never picks it.
    router = model.layers[0].mlp.router
    router[...] = router[...].at[:, 2].set((router[...][:, 0] + router[...][:, 1]) / 2)
    stats = dj.transforms.calibrate(model, [ids])
    assert stats["layers"][0]["tokens_per_expert"][2] == 0
    exhaustive = dj.transforms.naee_plan(model, [ids], keep=3)
    greedy = dj.transforms.naee_plan(model, [ids], keep=3, max_subsets=1)
    assert exhaustive["keep"] == greedy["keep"] == {0: (0, 1, 3)}
    assert dj.transforms.rank_experts(stats, keep=3, criterion="frequency")["keep"] == {
        0: (0, 1, 3)
    }
    # Keep 2: the exhaustive search's choice has the smallest layer-output error of all pairs.
    best = dj.transforms.naee_plan(model, [ids], keep=2)["keep"][0]
    errors = {}
    for pair in ((0, 1), (0, 3), (1, 3), (0, 2), (1, 2), (2, 3)):
        plan = dict(exhaustive, keep={0: pair})
        pruned = dj.transforms.to_model(
            *dj.transforms.prune_experts(*dj.transforms.to_params(model), plan)
        )
        errors[pair] = np.linalg.norm(_moe_out(pruned, ids) - _moe_out(model, ids))
    assert errors[best] == pytest.approx(min(errors.values()), rel=1e-4)


def _moe_out(model, ids):
    x = experts_lib._moe_inputs(model, [ids])[0][None]
    y, _ = model.layers[0].mlp(x, jnp.ones(x.shape[:2], bool))
    return np.asarray(y, np.float64)


def test_bad_plans_fail_clearly():
    model = _model()
    stats = dj.transforms.calibrate(model, [_ids()])
    with pytest.raises(ValueError, match="fewer than num_experts_per_tok=2"):
        dj.transforms.rank_experts(stats, keep=1)
    with pytest.raises(ValueError, match="Unknown expert criterion 'popularity'"):
        dj.transforms.rank_experts(stats, keep=4, criterion="popularity")
    plan = dj.transforms.rank_experts(stats, keep=4)
    other = _model(num_experts=6)
    with pytest.raises(ValueError, match="another shape"):
        dj.transforms.prune_experts(*dj.transforms.to_params(other), plan)
    with pytest.raises(ValueError, match="fewer than num_experts_per_tok=2"):
        dj.transforms.rank_experts(stats, keep={0: 4, 1: 1})
    with pytest.raises(ValueError, match="Cannot keep 9 experts"):
        dj.transforms.rank_experts(stats, keep={0: 9, 1: 4})
    dense = dj.transforms.calibrate(
        dj.models.Transformer(dj.models.make_config("llama", **{**TINY, "num_experts": 0})),
        [_ids()],
    )
    with pytest.raises(ValueError, match="dense model"):
        dj.transforms.rank_experts(dense, keep=2)


# ------------------------------------------------------------------- transformers parity


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_pruned_model_exports_and_equals_the_same_slice_in_transformers(case, tmp_path):
    ref = hf_reference.build_reference(case, tmp_path / "ref")
    model = dj.models.from_pretrained(tmp_path / "ref")
    ids = np.random.RandomState(0).randint(0, 128, (2, 10))
    stats = dj.transforms.calibrate(model, [ids])
    plan = dj.transforms.rank_experts(stats, keep=3, criterion="reap")
    params, config = dj.transforms.prune_experts(*dj.transforms.to_params(model), plan)
    pruned = dj.transforms.to_model(params, config)
    ours = _logits(pruned, ids)
    # 1. Save, load in transformers: equal logits.
    dj.models.save_pretrained(pruned, tmp_path / "pruned")
    loaded = hf_reference.load_reference(tmp_path / "pruned")
    np.testing.assert_allclose(hf_reference.run_reference(loaded, ids).logits, ours, atol=1e-4)
    # 2. The same expert slice applied to the transformers model's tensors: equal logits.
    sd = ref.state_dict()
    cfg = hf_reference.hf_config(case)
    key = "num_local_experts" if case == "mixtral" else "num_experts"
    setattr(cfg, key, 3)
    sliced_model = type(ref)(cfg).eval()
    new_sd = {}
    for name, tensor in sd.items():
        parts = name.split(".")
        if "layers" in parts and ".mlp.gate.weight" in name or ".mlp.experts." in name:
            layer = int(parts[parts.index("layers") + 1])
            if layer in plan["keep"]:
                tensor = tensor[list(plan["keep"][layer])]
        new_sd[name] = tensor
    sliced_model.load_state_dict(new_sd)
    np.testing.assert_allclose(
        hf_reference.run_reference(sliced_model, ids).logits, ours, atol=1e-4
    )
    with torch.no_grad():
        assert not np.allclose(hf_reference.run_reference(ref, ids).logits, ours, atol=1e-3)


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe"])
def test_merged_model_exports_to_transformers(case, tmp_path):
    hf_reference.build_reference(case, tmp_path / "ref")
    model = dj.models.from_pretrained(tmp_path / "ref")
    ids = np.random.RandomState(1).randint(0, 128, (2, 10))
    stats = dj.transforms.calibrate(model, [ids])
    plan = dj.transforms.plan_merge(stats, keep=2, similarity="outputs", preserve_fraction=0.5)
    merged = dj.transforms.to_model(
        *dj.transforms.merge_experts(*dj.transforms.to_params(model), plan)
    )
    dj.models.save_pretrained(merged, tmp_path / "merged")
    loaded = hf_reference.load_reference(tmp_path / "merged")
    np.testing.assert_allclose(
        hf_reference.run_reference(loaded, ids).logits, _logits(merged, ids), atol=1e-4
    )


def test_per_layer_budgets(tmp_path):
    model = _model()
    ids = _ids(n=24)
    stats = dj.transforms.calibrate(model, [ids])
    params, config = dj.transforms.to_params(model)
    plan = dj.transforms.rank_experts(stats, keep={0: 3, 1: 6}, criterion="reap")
    assert [len(plan["keep"][b]) for b in (0, 1)] == [3, 6]
    pruned_params, pruned_config = dj.transforms.prune_experts(params, config, plan)
    assert pruned_config.experts_per_layer == (3, 6) and pruned_config.num_experts == 6
    for b in (0, 1):
        np.testing.assert_array_equal(
            pruned_params["layers"][b]["mlp"]["router"],
            np.asarray(params["layers"][b]["mlp"]["router"])[:, list(plan["keep"][b])],
        )
    pruned = dj.transforms.to_model(pruned_params, pruned_config)
    out = pruned.forward(jnp.asarray(ids))
    assert [lg.shape[-1] for lg in out.router_logits] == [3, 6]
    # Load balancing over layers of different sizes: the mean of each layer's Switch loss.
    want = 0.0
    for lg in out.router_logits:
        lg = np.asarray(lg, np.float64).reshape(-1, lg.shape[-1])
        p = np.exp(lg - lg.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        top = np.argsort(-p, axis=-1, kind="stable")[:, :2]
        f = np.bincount(top.ravel(), minlength=lg.shape[-1]) / len(lg)
        want += lg.shape[-1] * np.sum(f * p.mean(0)) / 2
    np.testing.assert_allclose(out.aux_loss, want, rtol=1e-5)
    # Statistics, plans and depth pruning follow the per-layer counts; export refuses clearly.
    again = dj.transforms.calibrate(pruned, [ids])
    assert again["shape"]["experts_per_layer"] == [3, 6]
    small = dj.transforms.rank_experts(again, keep=2, criterion="frequency")
    assert dj.transforms.prune_experts(pruned_params, pruned_config, small)[1].num_experts == 2
    assert dj.transforms.prune_blocks(pruned_params, pruned_config, [1])[1].experts_in(0) == 6
    with pytest.raises(ValueError, match=r"\[3, 6\] experts in different layers"):
        dj.models.save_pretrained(pruned, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_global_budget_keeps_the_best_normalised_scores_across_layers():
    model = _model(num_layers=3)
    stats = dj.transforms.calibrate(model, [_ids(n=24)])
    plan = dj.transforms.rank_experts(stats, keep=4, criterion="reap", global_budget=True)
    counts = {b: len(v) for b, v in plan["keep"].items()}
    assert sum(counts.values()) == 12 and min(counts.values()) >= 2
    scores = dj.transforms.expert_scores(stats, "reap")
    kept_norm, dropped_norm = [], []
    for b, row in enumerate(scores):
        norm = row / row.mean()
        protected = set(np.argsort(-row, kind="stable")[:2].tolist())
        for j in range(8):
            if j in protected:
                continue
            (kept_norm if j in plan["keep"][b] else dropped_norm).append(norm[j])
    assert min(kept_norm) >= max(dropped_norm)
