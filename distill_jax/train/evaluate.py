"""Held-out evaluation of the student: NLL and perplexity, and against the teacher top-1
agreement, KL(p || q) and the teacher's own perplexity (per common-boundary chunk across
tokenizers); DistillSpec's acceptance rate on-policy; the before/after table of a run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distill_jax import teachers
from distill_jax.bridges import alm as bridge_alm
from distill_jax.eval import speculative
from distill_jax.losses import fused
from distill_jax.train.metrics import read_metrics
from distill_jax.transforms import params as transform_params


class Evaluator:
    """``evaluator(state, graphdef, student_config) -> dict`` of held-out means.

    Args:
        teacher, teacher_params: the run's teacher (None: NLL only) and its placed parameters.
        vocab_mask: [V] bool or None.
        source: the batch source; its ``eval_batch`` puts a held-out host batch on the mesh.
        held_out: () -> this process's held-out host batches (the same every call).
        acceptance: None, or ``speculative.acceptance`` keywords (max_new_tokens, temperature,
            eos_id, seed): also the student's acceptance rate as a draft for the teacher.
    """

    def __init__(self, teacher, teacher_params, vocab_mask, source, held_out, acceptance=None):
        self.teacher, self.teacher_params, self.vocab_mask = teacher, teacher_params, vocab_mask
        self.source, self.held_out, self.acceptance = source, held_out, acceptance
        self.eval_fns = {}  # graphdef -> jitted sums (pruning changes the student's graph)

    def __call__(self, state, graphdef, student_config) -> dict:
        if graphdef not in self.eval_fns:
            self.eval_fns[graphdef] = make_eval_fn(graphdef, self.teacher, self.vocab_mask)
        eval_fn = self.eval_fns[graphdef]
        batches = self.held_out()
        totals = None
        for local in batches:
            batch = self.source.eval_batch(local)
            sums = eval_fn(state.params["student"], self.teacher_params, state, batch)
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        out = summarize_eval(totals)
        if self.acceptance is not None:
            out.update(self.acceptance_eval(state, student_config, batches))
        return out

    def acceptance_eval(self, state, student_config, batches) -> dict:
        """DistillSpec's alpha of the student as a draft for the teacher (held-out prompts)."""
        teacher = self.teacher
        if teacher is None or teacher.kind != "online":
            raise ValueError("eval.acceptance needs an online teacher (the target model).")
        draft = transform_params.to_model(jax.device_get(state.params["student"]), student_config)
        target = transform_params.to_model(
            jax.device_get(teachers.target_params(teacher, self.teacher_params)), teacher.config
        )
        a = speculative.acceptance(target, draft, batches, **self.acceptance)
        return {"acceptance": a["alpha"], "greedy_match": a["greedy_match"]}


def before_after_table(workdir: str) -> str:
    """A markdown table of the held-out eval at step 0 and at the last eval of ``workdir``'s
    metrics (perplexity, NLL, teacher agreement and KL, the teacher's perplexity), or ""."""
    evals = {}
    for row in read_metrics(workdir):
        if "eval/nll" in row:
            evals[row["step"]] = {k.split("/", 1)[1]: v for k, v in row.items() if "/" in k}
    if 0 not in evals or len(evals) < 2:
        return ""
    names = ("perplexity", "nll", "agreement", "kl", "acceptance", "greedy_match")
    keys = [k for k in names if k in evals[0]]
    lines = ["| held-out | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    if "teacher_perplexity" in evals[0]:
        t = evals[0]
        lines.append(f"| teacher | {t['teacher_perplexity']:.2f} | {t['teacher_nll']:.4f} |")
    for step in (0, max(evals)):
        name = "student before training" if step == 0 else f"student after {step} steps"
        lines.append(f"| {name} | " + " | ".join(f"{evals[step][k]:.4g}" for k in keys) + " |")
    return "\n".join(lines)


def make_eval_fn(graphdef, teacher, vocab_mask):
    """Held-out sums: student NLL, and vs the teacher top-1 agreement and KL(p || q) at tau 1."""

    @jax.jit
    def eval_step(student_params, teacher_params, state, batch):
        student = nnx.merge(graphdef, nnx.State(student_params))
        out = student.forward(
            batch["input_ids"],
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
            compute_logits=False,
        )
        mask = batch["loss_mask"]
        common = dict(mask=mask, targets=batch["targets"], vocab_mask=vocab_mask)
        if teacher is not None and teacher.kind == "bridge":
            return _bridge_eval_sums(student, out.hidden, teacher, teacher_params, batch, common)
        if teacher is None or teacher.kind == "cached":  # no teacher forward: CE only
            total, count, metrics = fused.fused_distill_loss(
                out.hidden,
                student.head_weights(),
                terms={"ce": {}},
                **common,
            )
            return {"nll": metrics["loss/ce"][0], "tokens": count}
        t_inputs = teacher.loss_inputs(teacher_params, batch, state)
        kw = {
            k: t_inputs[k]
            for k in ("teacher_hidden", "teacher_head", "teacher_softcap", "teacher_combine")
            if k in t_inputs
        }
        _, count, metrics = fused.fused_distill_loss(
            out.hidden,
            student.head_weights(),
            terms={"ce": {}, "kl": {"divergence": "forward_kl"}},
            student_softcap=student.config.final_logit_softcapping,
            **kw,
            **common,
        )
        sums = {
            "nll": metrics["loss/ce"][0],
            "kl": metrics["loss/kl"][0],
            "agreement": metrics["agreement"][0],
            "tokens": count,
        }
        if not isinstance(kw["teacher_hidden"], tuple):  # one teacher: its own perplexity
            _, _, t_metrics = fused.fused_distill_loss(
                kw["teacher_hidden"],
                kw["teacher_head"],
                terms={"ce": {}},
                student_softcap=kw.get("teacher_softcap"),
                **common,
            )
            sums["teacher_nll"] = t_metrics["loss/ce"][0]
        return sums

    return eval_step


def _bridge_eval_sums(student, hidden, teacher, teacher_params, batch, common) -> dict:
    """Held-out sums of a cross-tokenizer run: student NLL per student token, and per chunk
    both models' log-likelihoods, |LP_T - LP_S| and the ALM binary KL at tau_b = 100."""
    _, count, metrics = fused.fused_distill_loss(
        hidden, student.head_weights(), terms={"ce": {}}, **common
    )
    t = teacher.loss_inputs(teacher_params, batch)
    s_lp, s_lpb = bridge_alm.token_and_boundary_logprobs(
        hidden,
        student.head_weights(),
        batch["targets"],
        t["student_boundary_mask"],
        softcap=student.config.final_logit_softcapping,
    )
    c = batch["student_chunk"].shape[1]
    lt = bridge_alm.chunk_logprobs(
        t["teacher_token_logprobs"], t["teacher_chunk"], c, t["teacher_boundary_logprobs"]
    )
    ls = bridge_alm.chunk_logprobs(s_lp, t["student_chunk"], c, s_lpb)
    valid = bridge_alm.chunk_mask(t["teacher_chunk"], t["student_chunk"], c)
    kl = bridge_alm.binary_distance(lt, ls, temperature=100.0, kind="binary_kl")
    chunk_sum = lambda x: jnp.sum(jnp.where(valid, x, 0.0))  # noqa: E731
    return {
        "nll": metrics["loss/ce"][0],
        "tokens": count,
        "chunks": jnp.sum(valid.astype(jnp.float32)),
        "chunk_lp_gap": chunk_sum(jnp.abs(lt - ls)),
        "chunk_alm": chunk_sum(kl),
        "teacher_chunk_nll": chunk_sum(-lt),
        "student_chunk_nll": chunk_sum(-ls),
    }


def summarize_eval(totals: dict) -> dict:
    """Sums -> means: perplexity exp(NLL), KL, top-1 agreement per held-out token, and the
    teacher's own perplexity where there is one teacher."""
    n = max(float(totals["tokens"]), 1.0)
    out = {"nll": float(totals["nll"]) / n, "tokens": n}
    out["perplexity"] = float(np.exp(out["nll"]))
    for k in ("kl", "agreement", "teacher_nll"):
        if k in totals:
            out[k] = float(totals[k]) / n
    if "chunks" in totals:  # per common-boundary chunk (cross-tokenizer runs)
        chunks = max(float(totals["chunks"]), 1.0)
        out["chunks"] = chunks
        for k in ("chunk_lp_gap", "chunk_alm", "teacher_chunk_nll", "student_chunk_nll"):
            out[k] = float(totals[k]) / chunks
    if "teacher_nll" in out:
        out["teacher_perplexity"] = float(np.exp(out["teacher_nll"]))
    return out
