"""NAEE, expert budgets and HC-SMoE from a ``student.prune`` stage: against NumPy / SciPy
references at the transform level, and through the trainer."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models

import distill_jax as dj
from distill_jax.transforms import experts as experts_lib
from distill_jax.transforms import schedule
from distill_jax.transforms import stats as stats_lib

TINY = tiny_models.moe_arch(num_experts=6)


def _model(family="mixtral", seed=0, **extra):
    return tiny_models.build(family, TINY, seed, **extra)


def _ids(n=8, t=6, seed=0):
    return tiny_models.token_ids(n, t, seed)


def _stats_fn(ids):
    return lambda m: dj.transforms.calibrate(m, [ids])


# ------------------------------------------------------------------------- NAEE reference


def _numpy_routed(x, mlp, allowed, k, normalize):
    """The MoE layer's routed output in float64 with only ``allowed`` experts: [N, D]."""
    p = {
        n: np.asarray(getattr(mlp, n)[...], np.float64)
        for n in ("router", "gate_proj", "up_proj", "down_proj")
    }
    logits = x @ p["router"]  # [N, E]
    logits = np.where(allowed[None], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(probs, top, -1)
    if normalize:
        w = w / w.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for slot in range(k):
        e = top[:, slot]
        g = np.einsum("nd,ndf->nf", x, p["gate_proj"][e])
        u = np.einsum("nd,ndf->nf", x, p["up_proj"][e])
        h = g / (1 + np.exp(-g)) * u
        out += w[:, slot : slot + 1] * np.einsum("nf,nfd->nd", h, p["down_proj"][e])
    return out


def _numpy_naee(model, x_by_block, budgets):
    """Brute force: per MoE block, the keep-set of the budget's size with the smallest
    ||Z - Z_S||_F (float64)."""
    c = model.config
    out = {}
    for block, n in budgets.items():
        x = np.asarray(x_by_block[block], np.float64)
        mlp = model.layers[block].mlp
        e = c.experts_in(block)
        full = _numpy_routed(x, mlp, np.ones(e, bool), c.num_experts_per_tok, c.norm_topk_prob)
        errors = {}
        for subset in itertools.combinations(range(e), n):
            allowed = np.isin(np.arange(e), subset)
            z = _numpy_routed(x, mlp, allowed, c.num_experts_per_tok, c.norm_topk_prob)
            errors[subset] = np.linalg.norm(z - full)
        out[block] = min(errors, key=errors.get)
    return out


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_naee_stage_equals_brute_force_enumeration_in_numpy(family):
    model = _model(family)  # mixtral renormalises the top-k, qwen2_moe does not
    ids = _ids()
    inputs = experts_lib._moe_inputs(model, [ids])  # the layers' inputs, from the forward
    # The inputs NAEE reads are the model's own MoE inputs: the block intermediate.
    out = model.forward(jnp.asarray(ids), intermediates=("mlp_input",))
    for block in (0, 1):
        np.testing.assert_allclose(
            inputs[block],
            np.asarray(out.intermediates[block]["mlp_input"]).reshape(-1, 32),
            rtol=1e-5,
            atol=1e-5,
        )
    want = _numpy_naee(model, inputs, {0: 4, 1: 3})
    stage = dict(kind="experts", criterion="naee", keep=[4, 3])
    pruned = schedule.apply_once(model, stage, _stats_fn(ids))
    assert pruned.config.experts_per_layer == (4, 3)
    plan = experts_lib.naee_plan(model, [ids], keep=[4, 3])
    assert plan["keep"] == want
    # The pruned model routes with exactly the kept experts' router columns and weights.
    for block in (0, 1):
        kept = list(want[block])
        np.testing.assert_array_equal(
            pruned.layers[block].mlp.router[...],
            np.asarray(model.layers[block].mlp.router[...])[:, kept],
        )
        np.testing.assert_array_equal(
            pruned.layers[block].mlp.down_proj[...],
            np.asarray(model.layers[block].mlp.down_proj[...])[kept],
        )


def test_naee_without_the_layer_inputs_and_in_a_progressive_schedule_fails_clearly():
    model = _model()
    stats = dj.transforms.calibrate(model, [_ids()])
    with pytest.raises(ValueError, match="moe_inputs=True"):
        experts_lib.naee_plan_from_stats(model, stats, keep=4)
    with pytest.raises(ValueError, match="one-shot"):
        schedule.check_schedule([dict(step=1, kind="experts", criterion="naee", keep=4)], 5)
    with pytest.raises(ValueError, match="own budget"):
        schedule.apply_once(
            model,
            dict(kind="experts", criterion="naee", keep=4, global_budget=True),
            _stats_fn(_ids()),
        )
    with pytest.raises(ValueError, match="2 MoE blocks"):
        experts_lib.naee_plan_from_stats(
            model, dj.transforms.calibrate(model, [_ids()], moe_inputs=True), keep=[4, 4, 4]
        )


def test_moe_inputs_merge_by_concatenation():
    model = _model()
    a, b = _ids(seed=1), _ids(seed=2)
    with stats_lib.collecting_moe_inputs():
        both = dj.transforms.calibrate(model, [a, b])
    halves = dj.transforms.merge_stats(
        dj.transforms.calibrate(model, [a], moe_inputs=True),
        dj.transforms.calibrate(model, [b], moe_inputs=True),
    )
    np.testing.assert_allclose(both["layers"][0]["moe_input"], halves["layers"][0]["moe_input"])
    assert both["layers"][0]["moe_input"].shape == (2 * 8 * 6, 32)
    assert "moe_input" not in dj.transforms.calibrate(model, [a])["layers"][0]


# ------------------------------------------------------------------------------- budgets


def test_budget_stages_per_layer_list_and_global_match_rank_experts():
    model = _model()
    ids = _ids()
    stats = dj.transforms.calibrate(model, [ids])
    reap = dj.transforms.expert_scores(stats, "reap")
    # Per-layer list.
    pruned = schedule.apply_once(
        model, dict(kind="experts", criterion="reap", keep=[5, 2]), _stats_fn(ids)
    )
    assert pruned.config.experts_per_layer == (5, 2)
    for block, n in ((0, 5), (1, 2)):
        kept = sorted(np.argsort(-reap[block], kind="stable")[:n])
        np.testing.assert_array_equal(
            pruned.layers[block].mlp.router[...],
            np.asarray(model.layers[block].mlp.router[...])[:, kept],
        )
    # Global budget: 2 x 3 experts in total, each layer at least top_k, the rest by the
    # highest mean-normalised scores over both layers (a NumPy recomputation).
    pruned = schedule.apply_once(
        model,
        dict(kind="experts", criterion="reap", keep=3, global_budget=True),
        _stats_fn(ids),
    )
    pool = []
    for block, row in enumerate(reap):
        order = np.argsort(-row, kind="stable")
        pool += [(-row[j] / row.mean(), block) for j in order[2:]]
    counts = [2, 2]
    for _, block in sorted(pool)[:2]:
        counts[block] += 1
    got = pruned.config.experts_per_layer or (pruned.config.num_experts,) * 2
    assert list(got) == counts and sum(got) == 6


# ------------------------------------------------------------------------------- HC-SMoE


def test_average_linkage_equals_scipy():
    hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
    rng = np.random.RandomState(0)
    for m, n in ((8, 3), (12, 5), (6, 1), (7, 7)):
        x = rng.randn(m, 5)
        got = experts_lib.average_linkage(x, n)
        labels = hierarchy.cut_tree(hierarchy.linkage(x, method="average"), n_clusters=n)[:, 0]
        want = sorted(sorted(np.flatnonzero(labels == c).tolist()) for c in set(labels))
        assert got == want


def test_hc_smoe_plan_clusters_mean_outputs_and_merges_by_frequency():
    hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
    model = _model()
    ids = _ids()
    stats = dj.transforms.calibrate(model, [ids])
    plan = dj.transforms.plan_merge(stats, 3, grouping="hc_smoe")
    # Reference: mean expert output over ALL tokens, recomputed from the layer inputs.
    inputs = experts_lib._moe_inputs(model, [ids])
    for block in (0, 1):
        f = np.asarray(model.layers[block].mlp.expert_outputs(inputs[block][None])[0], np.float64)
        means = f.mean(0)  # [E, D]
        labels = hierarchy.cut_tree(hierarchy.linkage(means, method="average"), n_clusters=3)
        want = sorted(sorted(np.flatnonzero(labels[:, 0] == c).tolist()) for c in range(3))
        groups = plan["groups"][block]
        assert sorted(sorted(g) for g in groups) == want
        for g in groups:  # the dominant is the member nearest the group's mean representation
            centre = means[g].mean(0)
            assert g[0] == g[int(np.argmin(np.linalg.norm(means[g] - centre, axis=-1)))]
    # Through the stage: 3 experts per layer, each the frequency-weighted average of its group.
    merged = schedule.apply_once(
        model, dict(kind="merge_experts", keep=3, grouping="hc_smoe"), _stats_fn(ids)
    )
    assert merged.config.num_experts == 3
    freq = dj.transforms.expert_scores(stats, "frequency")
    for block in (0, 1):
        for slot, g in enumerate(sorted(plan["groups"][block], key=lambda g: g[0])):
            w = freq[block][g] / freq[block][g].sum()
            for name in ("gate_proj", "up_proj", "down_proj"):
                want = np.einsum(
                    "g,g...->...", w, np.asarray(getattr(model.layers[block].mlp, name)[...])[g]
                )
                np.testing.assert_allclose(
                    getattr(merged.layers[block].mlp, name)[...][slot], want, rtol=1e-5, atol=1e-6
                )
    # MC-SMoE's assignment stays available under its own name; unknown groupings fail.
    assert dj.transforms.plan_merge(stats, 3)["grouping"] == "mc_smoe"
    with pytest.raises(ValueError, match="grouping='hc'"):
        dj.transforms.plan_merge(stats, 3, grouping="hc")


# ------------------------------------------------------------------------------- trainer


def test_naee_and_global_budget_stages_train_through_the_trainer(tmp_path, monkeypatch):
    from distill_jax import experiment

    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    spec = importlib.util.spec_from_file_location(
        "tiny", os.path.join(root, "configs", "tiny_kd.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("steps=3")
    c.student.config.update(
        family="mixtral",
        num_layers=2,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
    )
    c.student.prune = [
        dict(kind="experts", criterion="naee", keep=[5, 4]),
        dict(kind="experts", criterion="reap", keep=3, global_budget=True),
    ]
    c.calibration_batches = 1
    c.eval.num_batches = 1
    c.train.checkpoint_every_steps = 3
    configs = []
    apply_once = schedule.apply_once

    def recording(model, stage, stats_fn, tp=1):
        out = apply_once(model, stage, stats_fn, tp)
        configs.append(out.config)
        return out

    monkeypatch.setattr(schedule, "apply_once", recording)
    experiment.train(c, str(tmp_path))
    assert configs[0].experts_per_layer == (5, 4)
    counts = configs[1].experts_per_layer or (configs[1].num_experts,) * 2
    assert sum(counts) == 6 and all(2 <= n <= m for n, m in zip(counts, (5, 4)))
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))
