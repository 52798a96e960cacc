"""Pair terms in the trainer: DPO with the teacher as reference, REDI (+ CE) and DistiLLM-2 train
from the pairs.jsonl that ``data.seqkd.write_dataset`` writes, through ``experiment.train``; the
first step's loss equals a float64 NumPy reference computed from the models' dense logits on the
first batch (resume: resume_test.py). Bad pair configs fail before any model loads."""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from trainer_runs import CONFIG, PAIRS_CONFIG, tiny, write_pairs

from distill_jax import experiment, teachers
from distill_jax.data import seqkd
from distill_jax.train import objective

SEQKD_CONFIG = os.path.join(os.path.dirname(PAIRS_CONFIG), "smollm2_seqkd.py")
BYTE_VOCAB = 259  # ids the byte tokenizer uses; rows 259..263 of the models are padding


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("seqkd") / "sums")


# ------------------------------------------------------------------------ NumPy reference


def _log_softmax64(logits) -> np.ndarray:
    z = np.asarray(logits, np.float64).copy()
    z[..., BYTE_VOCAB:] = -np.inf
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _reference(c, *, with_teacher: bool):
    """The trainer's first batch and float64 log-softmax of each model on each side."""
    exp = experiment.build(c)
    batch = next(exp.train_batches)
    models = {"student": exp.student}
    if with_teacher:
        t = exp.teacher
        models["teacher"] = nnx.merge(t.graphdef, nnx.State(t.params()))
    out = {}
    for side, prefix in (("chosen", ""), ("rejected", "rejected_")):
        ids, pos, seg = (batch[prefix + k] for k in ("input_ids", "positions", "segment_ids"))
        for who, model in models.items():
            out[side, who] = _log_softmax64(model(ids, positions=pos, segment_ids=seg))
        out[side, "targets"] = batch[prefix + "targets"]
        out[side, "mask"] = batch[prefix + "loss_mask"].astype(np.float64)
    return out


def _token_lp(logp, targets, mask):
    return np.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask  # [B, T]


def _seq(ref, side, who):
    return _token_lp(ref[side, who], ref[side, "targets"], ref[side, "mask"]).sum(-1)  # [B]


def _kl(log_a, log_b, mask):
    """sum_v a (log a - log b) per token, a = exp(log_a); [B, T]."""
    a = np.exp(log_a)
    live = a > 0  # 0 log 0 = 0 on the padded vocabulary rows
    terms = np.where(live, a * (np.where(live, log_a, 0.0) - np.where(live, log_b, 0.0)), 0.0)
    return terms.sum(-1) * mask


def _metrics(workdir) -> dict[int, dict]:
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r for r in rows if "train/loss" in r}


def _student_moved(c, workdir, step) -> bool:
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    saved = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    _, initial = teachers.split_model(experiment.build_model(c.student, "student", c.seed))
    after, before = jax.tree.leaves(saved.state["params"]["student"]), jax.tree.leaves(initial)
    return any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(after, before))


def _check_run(c, workdir, steps=3):
    m = _metrics(workdir)
    assert sorted(m) == list(range(1, steps + 1))
    assert all(np.isfinite(r["train/loss"]) for r in m.values())
    assert _student_moved(c, workdir, steps)
    return m


# ---------------------------------------------------------------------------- the terms


def test_dpo_with_the_teacher_as_reference_trains_and_matches_numpy(pairs_dir, tmp_path):
    """Step 1's loss is the mean over pairs of -log sigmoid(beta margin), margin from the
    student's and the teacher's summed response log-probs; two micro-batches change nothing."""
    c = tiny(PAIRS_CONFIG, path=pairs_dir, loss="dpo", micro_batches=2)
    ref = _reference(c, with_teacher=True)
    experiment.train(c, str(tmp_path))
    m = _check_run(c, tmp_path)
    margin = (_seq(ref, "chosen", "student") - _seq(ref, "chosen", "teacher")) - (
        _seq(ref, "rejected", "student") - _seq(ref, "rejected", "teacher")
    )
    beta = c.losses.dpo.beta
    want = np.mean(np.log1p(np.exp(-beta * margin)))  # -log sigmoid(x) = log(1 + e^-x)
    np.testing.assert_allclose(m[1]["train/loss"], want, rtol=2e-5)
    np.testing.assert_allclose(m[1]["train/dpo/margin"], margin.mean(), rtol=1e-4, atol=1e-4)
    assert m[1]["train/dpo/accuracy"] == np.mean(margin > 0)


def test_redi_beside_sft_on_the_positives_trains_and_matches_numpy(pairs_dir, tmp_path):
    """REDI needs no teacher; CE on the chosen side (per chosen token) and REDI (per pair) are
    two normaliser groups, each exact under two micro-batches."""
    c = tiny(PAIRS_CONFIG, path=pairs_dir, loss="redi", teacher="none", micro_batches=2)
    ref = _reference(c, with_teacher=False)
    experiment.train(c, str(tmp_path))
    m = _check_run(c, tmp_path)
    n_w, n_l = ref["chosen", "mask"].sum(-1), ref["rejected", "mask"].sum(-1)
    k = c.losses.redi
    redi = -k.c_pos * _seq(ref, "chosen", "student") / n_w + k.c_neg * (
        _seq(ref, "rejected", "student") / n_l
    )
    ce = -_seq(ref, "chosen", "student").sum() / n_w.sum()
    np.testing.assert_allclose(m[1]["train/loss/redi"], redi.mean(), rtol=2e-5)
    np.testing.assert_allclose(m[1]["train/loss/ce"], ce, rtol=2e-5)
    np.testing.assert_allclose(m[1]["train/loss"], redi.mean() + ce, rtol=2e-5)


def test_distillm2_trains_matches_numpy_and_anchors_its_skew(pairs_dir, tmp_path):
    """Step 1 (skew a_0 for every pair): (2 - b) KL(p || a p + (1 - a) q) per chosen token +
    b KL(q || a q + (1 - a) p) per rejected token, b from its schedule; the anchor gaps in the
    checkpointed loss state are step 1's batch-mean probability gaps, and the skews of later
    steps stay in [min_alpha, base_alpha]."""
    c = tiny(PAIRS_CONFIG, path=pairs_dir, loss="distillm2")
    b = dict(schedule="linear", start=1.0, end=1.5, steps=3)  # the paper's curriculum, shorter
    c.losses = dict(distillm2=dict(c.losses.distillm2.to_dict(), b=b))
    ref = _reference(c, with_teacher=True)
    experiment.train(c, str(tmp_path))
    m = _check_run(c, tmp_path)
    a = c.losses.distillm2.base_alpha
    p, q = ref["chosen", "teacher"], ref["chosen", "student"]
    skl = _kl(p, np.logaddexp(np.log(a) + p, np.log1p(-a) + q), ref["chosen", "mask"])
    p, q = ref["rejected", "teacher"], ref["rejected", "student"]
    srkl = _kl(q, np.logaddexp(np.log(a) + q, np.log1p(-a) + p), ref["rejected", "mask"])
    skl_mean = skl.sum() / ref["chosen", "mask"].sum()
    srkl_mean = srkl.sum() / ref["rejected", "mask"].sum()
    np.testing.assert_allclose(m[1]["train/loss/distillm2/on_chosen"], skl_mean, rtol=1e-4)
    np.testing.assert_allclose(m[1]["train/loss/distillm2/on_rejected"], srkl_mean, rtol=1e-4)
    np.testing.assert_allclose(m[1]["train/loss"], (2 - 1.0) * skl_mean + 1.0 * srkl_mean, 1e-4)
    mean_lp = lambda side, who: _seq(ref, side, who) / ref[side, "mask"].sum(-1)  # noqa: E731
    gap_c = np.exp(mean_lp("chosen", "teacher")) - np.exp(mean_lp("chosen", "student"))
    gap_r = np.exp(mean_lp("rejected", "student")) - np.exp(mean_lp("rejected", "teacher"))
    np.testing.assert_allclose(m[1]["train/distillm2/gap_chosen"], gap_c.mean(), atol=1e-6)
    np.testing.assert_allclose(m[1]["train/distillm2/gap_rejected"], gap_r.mean(), atol=1e-6)
    manager = ocp.CheckpointManager(os.path.join(tmp_path, "checkpoints"))
    state = manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    anchors = state["loss_state"]["distillm2"]
    assert int(anchors["anchored"]) == 1
    np.testing.assert_allclose(anchors["anchor_chosen"], m[1]["train/distillm2/gap_chosen"])
    np.testing.assert_allclose(anchors["anchor_rejected"], m[1]["train/distillm2/gap_rejected"])
    assert m[1]["train/distillm2/alpha_chosen"] == pytest.approx(a)
    for s in (2, 3):
        for side in ("chosen", "rejected"):
            assert 0.01 - 1e-6 <= m[s][f"train/distillm2/alpha_{side}"] <= a + 1e-6


def test_pairs_without_a_pair_term_train_ce_on_the_chosen_side(pairs_dir, tmp_path):
    c = tiny(PAIRS_CONFIG, path=pairs_dir, teacher="none", steps=1)
    c.losses = dict(ce=dict())
    ref = _reference(c, with_teacher=False)
    result = experiment.train(c, str(tmp_path))
    ce = -_seq(ref, "chosen", "student").sum() / ref["chosen", "mask"].sum()
    np.testing.assert_allclose(_metrics(tmp_path)[1]["train/loss"], ce, rtol=2e-5)
    assert np.isfinite(result["nll"])  # held-out pairs evaluate on their chosen side


def test_pair_groups():
    spec = objective.LossSpec.from_config(dict(redi={}, ce={}))
    assert spec.groups() == ("tokens", "redi")
    spec = objective.LossSpec.from_config(dict(distillm2={}, dpo=dict(weight=0.0)))
    assert spec.groups() == ("distillm2/on_chosen", "distillm2/on_rejected")
    assert spec.pairs_need_teacher()


# -------------------------------------------------------------------- bad configs, early


def _kd_with(**losses):
    c = tiny(CONFIG)
    c.losses = losses
    return c


@pytest.mark.parametrize(
    "make,error,match",
    [
        (
            lambda d: _kd_with(dpo={}),
            ValueError,
            "Loss term 'dpo': it needs preference pairs; set config.data.source='pairs'",
        ),
        (
            lambda d: tiny(PAIRS_CONFIG, path=d, loss="dpo", teacher="none"),
            ValueError,
            "Loss term 'dpo': teacher.kind='none' gives no teacher",
        ),
        (
            lambda d: tiny(PAIRS_CONFIG, path="/no/such/seqkd", loss="redi"),
            FileNotFoundError,
            "data.path='/no/such/seqkd': no pairs file at '/no/such/seqkd'.*--mode=seqkd",
        ),
        (
            lambda d: tiny(PAIRS_CONFIG, loss="redi"),
            ValueError,
            "data.source='pairs' needs data.path",
        ),
        (
            lambda d: _with(tiny(PAIRS_CONFIG, path=d), teacher=dict(kind="cached", cache_dir="x")),
            ValueError,
            "data.source='pairs' with teacher.kind='cached'",
        ),
        (
            lambda d: _with(
                tiny(PAIRS_CONFIG, path=d, loss="distillm2"),
                teacher=dict(kind="ensemble", models=[dict(init="random")] * 2),
            ),
            ValueError,
            r"\['distillm2'\] read one teacher model's log-probs.*'ensemble'",
        ),
        (
            lambda d: _with(
                tiny(PAIRS_CONFIG, path=d),
                losses=dict(distillm2=dict(base_alpha=0.05, min_alpha=0.1)),
            ),
            ValueError,
            "min_alpha=0.1 is above base_alpha=0.05",
        ),
        (
            lambda d: _with(
                tiny(PAIRS_CONFIG, path=d),
                onpolicy=dict(lmbda=0.0, prompt_len=80, max_new_tokens=16),
            ),
            ValueError,
            "data.source='pairs' with config.onpolicy",
        ),
    ],
)
def test_bad_pair_configs_fail_before_any_model_loads(pairs_dir, make, error, match, monkeypatch):
    def no_models(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(experiment, "build_model", no_models)
    with pytest.raises(error, match=match):
        experiment.build(make(pairs_dir))


def _with(c, **blocks):
    with c.unlocked():
        for key, value in blocks.items():
            c[key] = value
    return c


def test_an_empty_pairs_file_names_it(tmp_path):
    positives = [{"prompt": "Q", "completion": "A", "problem": 0, "sample": 0}]
    seqkd.write_dataset(str(tmp_path / "ds"), positives, [], {"teacher": "fixture"})
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}/ds/pairs.jsonl holds no pairs")):
        experiment.build(tiny(PAIRS_CONFIG, path=str(tmp_path / "ds"), loss="redi"))


@pytest.mark.parametrize("pairs", ["redi", "dpo", "distillm2"])
def test_the_smollm2_seqkd_config_trains_on_its_pairs(pairs):
    c = tiny(SEQKD_CONFIG, dataset="/tmp/smollm2_seqkd", pairs=pairs)
    spec = experiment.loss_spec(c)
    experiment.check_pairs(c, spec)  # nothing loads: a seqkd output directory is all it needs
    assert c.data.source == "pairs" and c.data.path == "/tmp/smollm2_seqkd"
    assert "onpolicy" not in c and pairs in spec.pair_terms
