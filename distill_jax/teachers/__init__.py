r"""Teachers: what the student learns from, each turned into loss inputs inside the train step.

Every teacher answers ``loss_inputs(teacher_params, batch, state) -> dict`` of
``train.objective.LossInputs`` fields, computed under ``stop_gradient`` inside the jitted step
(METHODS.md section 3):

* ``OnlineTeacher``: a frozen model run on the batch; its final hidden states and head go to the
  fused loss, so its [B, T, V] logits never exist either. Its parameters are a separate argument
  of the step with their own shardings and dtype (e.g. bfloat16), never donated, never
  checkpointed with the student.
* ``CachedTeacher``: top-k from an offline ``data.teacher_cache``; ``host_batch`` adds the cached
  arrays of batch i to the batch on the host, checking that the cache was written for it.
* ``EnsembleTeacher``: several frozen models of one vocabulary, probability averaging
  p = sum_j w_j p_j (e.g. multi-teacher KD).
* ``CompositeTeacher``: logits z_a + alpha (z_b - z_c), with a scalar alpha (e.g. a fine-tuned
  teacher a, the base b it came from and a reference c: a task-vector teacher [design]) or
  AlignDistil's per-token alpha_t (an anchor a, a DPO model b, a reverse-DPO model c).
* ``CrossTokenizerTeacher`` (``teachers/cross_tokenizer.py``): an online teacher with another
  tokenizer; it scores the batch's ``teacher_ids`` and feeds the bridge terms (ALM, ULD, MinED,
  DSKD; config.bridge).
* ``EMATeacher``: an exponential moving average of the student itself (mean teacher, Tarvainen &
  Valpola, 2017), theta_T <- d theta_T + (1 - d) theta_S after every optimizer step; its
  parameters live in ``TrainState.ema`` and are checkpointed, because resume needs them.
* ``SelfTeacher``: self-distillation with a privileged context (OPSD, SD-Zero, UniSD): the
  student's own current weights, its EMA, or a frozen copy of its initial weights read the
  batch's ``teacher_input_ids`` [B, K, L] (K contexts, e.g. the question with its reference
  solution), whose completions sit at the same columns as the student's (``train.rollout``);
  with K > 1 the contexts' probabilities are averaged and ``agreement_weights`` down-weights
  tokens on which they disagree (UniSD).
* ``WithReference``: any of these plus a frozen reference model (Rho-1, AdaSPEC selection).

Offline teachers (``teachers/offline.py``, re-exported here) run once, before training, and
write what the data pipeline reads back: ``build_teacher_cache`` (top-k per batch, the format of
``data.teacher_cache``) and ``build_seqkd_dataset`` (verified traces, the format of
``data.seqkd``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distill_jax import sharding
from distill_jax.bridges import alm
from distill_jax.data import teacher_cache
from distill_jax.losses import composite, topk


def _forward(graphdef, params, batch, hidden_states: bool):
    """(final hidden [B, T, D], head [D, V], per-layer hidden states or None), constants."""
    model = nnx.merge(graphdef, nnx.State(params))
    out = model.forward(
        batch["input_ids"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        compute_logits=False,
        output_hidden_states=hidden_states,
    )
    hs = out.hidden_states if hidden_states else None
    return jax.lax.stop_gradient((out.hidden, model.head_weights(), hs))


def _forward_features(graphdef, params, batch, hidden_states: bool, qkv: bool) -> dict:
    """The teacher's loss inputs from one forward, constants: final hidden [B, T, D] and head
    [D, V], and for feature terms its per-layer hidden states (L + 1 arrays) and attention
    q/k/v (one dict per layer), else None."""
    model = nnx.merge(graphdef, nnx.State(params))
    out = model.forward(
        batch["input_ids"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        compute_logits=False,
        output_hidden_states=hidden_states,
        output_attention_qkv=qkv,
    )
    return jax.lax.stop_gradient(
        dict(
            teacher_hidden=out.hidden,
            teacher_head=model.head_weights(),
            teacher_hidden_states=out.hidden_states if hidden_states else None,
            teacher_qkv=out.attention_qkv if qkv else None,
        )
    )


def _statics(config, qkv: bool) -> dict:
    """Static loss inputs of a model teacher: its final softcap and, with q/k/v, its per-layer
    attention settings (``ModelConfig.attention_layers``)."""
    attention = config.attention_layers() if qkv else None
    return dict(teacher_softcap=config.final_logit_softcapping, teacher_attention=attention)


def split_model(model) -> tuple[Any, dict]:
    """(graphdef, pure-dict parameters) of an nnx model."""
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(params)


def ema_update(ema, student_params, decay: float, every_steps: int = 1, step=None):
    """theta_T <- d theta_T + (1 - d) theta_S, leaf by leaf, in the EMA's dtype; with
    ``every_steps`` N > 1 only after optimizer steps ``step`` that N divides, theta_T unchanged
    otherwise (UniSD's EMA every N steps; METHODS.md 3.4)."""
    new = jax.tree.map(
        lambda t, s: (decay * t + (1 - decay) * s).astype(t.dtype), ema, student_params
    )
    if every_steps == 1:
        return new
    now = jnp.asarray(step) % every_steps == 0
    return jax.tree.map(lambda n, t: jnp.where(now, n, t), new, ema)


def _check_every(every_steps) -> int:
    if int(every_steps) != every_steps or every_steps < 1:
        raise ValueError(f"EMA teacher: every_steps={every_steps} must be an integer >= 1.")
    return int(every_steps)


class OnlineTeacher:
    """A frozen model run inside the step.

    Args:
        model: the teacher (``models.Transformer``), already in its compute dtype.
        hidden_states: also return per-layer hidden states (hidden_mse / hidden_cosine).
        qkv: also return per-layer attention q/k/v (attention / value relations).
    """

    kind = "online"

    def __init__(self, model, *, hidden_states: bool = False, qkv: bool = False):
        self.config = model.config
        self.vocab_size = model.config.vocab_size
        self.graphdef, self._params = split_model(model)
        self.param_axes = sharding.param_logical_axes(model)
        self.hidden_states, self.qkv = hidden_states, qkv

    def params(self):
        return self._params

    def shardings(self, mesh, rules):
        return sharding.tree_shardings(self._params, mesh, rules, self.param_axes)

    def host_batch(self, batch: dict, index: int) -> dict:
        return batch

    def loss_inputs(self, params, batch, state=None) -> dict:
        out = _forward_features(self.graphdef, params, batch, self.hidden_states, self.qkv)
        return dict(out, **_statics(self.config, self.qkv))


class _MultiTeacher:
    """Several frozen models whose logits are combined per chunk by the fused loss."""

    def __init__(self, models: Sequence, combine: tuple[str, tuple[float, ...]]):
        vocab = {m.config.vocab_size for m in models}
        if len(vocab) != 1:
            raise ValueError(
                f"{self.kind} teacher: the models' vocabularies differ ({sorted(vocab)}); "
                "combining them needs one vocabulary (cross-vocabulary ensembles: bridges)."
            )
        self.vocab_size = vocab.pop()
        parts = [split_model(m) for m in models]
        self.graphdefs = tuple(g for g, _ in parts)
        self._params = tuple(p for _, p in parts)
        self.param_axes = tuple(sharding.param_logical_axes(m) for m in models)
        self.softcaps = tuple(m.config.final_logit_softcapping for m in models)
        self.combine = combine

    def params(self):
        return self._params

    def shardings(self, mesh, rules):
        return tuple(
            sharding.tree_shardings(p, mesh, rules, a)
            for p, a in zip(self._params, self.param_axes)
        )

    def host_batch(self, batch: dict, index: int) -> dict:
        return batch

    def loss_inputs(self, params, batch, state=None) -> dict:
        outs = [_forward(g, p, batch, False) for g, p in zip(self.graphdefs, params)]
        return dict(
            teacher_hidden=tuple(h for h, _, _ in outs),
            teacher_head=tuple(w for _, w, _ in outs),
            teacher_softcap=self.softcaps,
            teacher_combine=self.combine,
        )


class EnsembleTeacher(_MultiTeacher):
    """p = sum_j w_j softmax(z_j) over models of one vocabulary (weights normalised to 1)."""

    kind = "ensemble"

    def __init__(self, models: Sequence, weights: Sequence[float] | None = None):
        w = np.ones(len(models)) if weights is None else np.asarray(weights, np.float64)
        if len(w) != len(models) or np.any(w <= 0):
            raise ValueError(f"ensemble: need one positive weight per model, got {weights}.")
        super().__init__(models, ("probs", tuple(float(x) for x in w / w.sum())))


class CompositeTeacher(_MultiTeacher):
    """z = z_a + alpha (z_b - z_c) over three models of one vocabulary (METHODS.md 3.6).

    ``alpha_rule="constant"``: one scalar ``alpha`` for every token (a task-vector teacher).
    ``alpha_rule="token_adaptive"``: AlignDistil's per-token alpha_t = min(alpha_scale /
    TV(p_b, p_c), alpha_max), with b the DPO and c the reverse-DPO model and a the anchor
    (``losses.composite.token_adaptive_alpha``; constants [unverified]). Computed per token chunk
    inside the fused loss, so no [B, T, V] array is formed.

    Args:
        model_a, model_b, model_c: the three models (one vocabulary).
        alpha: the scalar alpha of the constant rule.
        alpha_rule: "constant" or "token_adaptive".
        alpha_scale, alpha_max: the token-adaptive rule's numerator (> 0) and cap (>= 0).
    """

    kind = "composite"
    ALPHA_RULES = ("constant", "token_adaptive")

    def __init__(
        self,
        model_a,
        model_b,
        model_c,
        *,
        alpha: float = 1.0,
        alpha_rule: str = "constant",
        alpha_scale: float = 0.1,
        alpha_max: float = 5.0,
    ):
        if alpha_rule == "constant":
            combine = ("logits", (1.0, alpha, -alpha))
        elif alpha_rule == "token_adaptive":
            if alpha_scale <= 0 or alpha_max < 0:
                raise ValueError(
                    f"composite teacher: alpha_scale={alpha_scale} must be > 0 and "
                    f"alpha_max={alpha_max} >= 0."
                )
            combine = (composite.ADAPTIVE, (float(alpha_scale), float(alpha_max)))
        else:
            raise ValueError(
                f"composite teacher: alpha_rule={alpha_rule!r}; choose one of {self.ALPHA_RULES}."
            )
        super().__init__((model_a, model_b, model_c), combine)


class EMATeacher:
    """The student's exponential moving average; its parameters are ``TrainState.ema``,
    updated after every ``every_steps``-th optimizer step (1: every step)."""

    kind = "ema"

    def __init__(
        self,
        student,
        *,
        decay: float = 0.999,
        every_steps: int = 1,
        hidden_states: bool = False,
        qkv: bool = False,
    ):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA teacher: decay={decay} must be in [0, 1).")
        self.config = student.config
        self.vocab_size = student.config.vocab_size
        self.graphdef, _ = split_model(student)
        self.decay, self.every_steps = decay, _check_every(every_steps)
        self.hidden_states, self.qkv = hidden_states, qkv

    def params(self):
        return None  # read from the train state

    def shardings(self, mesh, rules):
        return None

    def host_batch(self, batch: dict, index: int) -> dict:
        return batch

    def loss_inputs(self, params, batch, state) -> dict:
        out = _forward_features(self.graphdef, state.ema, batch, self.hidden_states, self.qkv)
        return dict(out, **_statics(self.config, self.qkv))

    def update(self, ema, student_params, step):
        """theta_T <- d theta_T + (1 - d) theta_S after optimizer step ``step`` (when
        ``every_steps`` divides it)."""
        return ema_update(ema, student_params, self.decay, self.every_steps, step)


class CachedTeacher:
    """Top-k from a ``data.teacher_cache.TeacherCache``; batch i gets cache entry i.

    Args:
        cache: the opened cache (``check`` it against the run's settings first).
    """

    kind = "cached"
    FIELDS = ("ids", "logprobs", "log_normalizer", "log_tail")

    def __init__(self, cache, *, vocab_size: int):
        self.cache = cache
        self.vocab_size = vocab_size
        self.temperature = float(cache.settings["temperature"])

    def params(self):
        return None

    def shardings(self, mesh, rules):
        return None

    def host_batch(self, batch: dict, index: int) -> dict:
        sparse = self.cache.get(index, batch)
        return {**batch, **{f"teacher/{k}": np.asarray(getattr(sparse, k)) for k in self.FIELDS}}

    def loss_inputs(self, params, batch, state=None) -> dict:
        sparse = topk.SparseTeacher(
            *(batch[f"teacher/{k}"] for k in self.FIELDS), jnp.asarray(self.temperature)
        )
        return dict(sparse_teacher=jax.lax.stop_gradient(sparse))


class WithReference:
    """A teacher plus a frozen reference model run on the same batch, for the selection rules
    that compare the student with a reference: Rho-1 (excess loss over a reference LM; Lin et
    al., 2024) and AdaSPEC (tokens where the draft lags a reference draft; Hu et al., 2025). The
    reference's final hidden states and head become ``reference_hidden`` / ``reference_head``.

    Args:
        teacher: the teacher it wraps (its ``kind``, ``config`` and the rest are the teacher's).
        reference: the reference model (the student's vocabulary).
    """

    def __init__(self, teacher, reference):
        if reference.config.vocab_size != teacher.vocab_size:
            raise ValueError(
                f"The reference model's vocabulary ({reference.config.vocab_size}) differs from "
                f"the teacher's ({teacher.vocab_size}); use a reference of the student's family."
            )
        self.inner = teacher
        self.reference_graphdef, self._reference = split_model(reference)
        self.reference_axes = sharding.param_logical_axes(reference)

    def __getattr__(self, name):  # kind, config, vocab_size, graphdef, ... are the teacher's
        return getattr(self.inner, name)

    def params(self):
        return {"teacher": self.inner.params(), "reference": self._reference}

    def shardings(self, mesh, rules):
        return {
            "teacher": self.inner.shardings(mesh, rules),
            "reference": sharding.tree_shardings(self._reference, mesh, rules, self.reference_axes),
        }

    def host_batch(self, batch: dict, index: int) -> dict:
        return self.inner.host_batch(batch, index)

    def loss_inputs(self, params, batch, state=None) -> dict:
        hidden, head, _ = _forward(self.reference_graphdef, params["reference"], batch, False)
        out = self.inner.loss_inputs(params["teacher"], batch, state)
        return dict(out, reference_hidden=hidden, reference_head=head)


class PaddedVocabTeacher:
    """A teacher whose model pads one shared tokenizer to another vocabulary size than the
    student's (e.g. 152,064 vs 151,936 rows): its head [D_t, V_t] is cut to, or zero-padded to,
    the student's V columns, so both distributions live on the same ids. Ids the tokenizer never
    emits are masked in the loss (the step's ``vocab_mask``, ``bridges.padded_vocab_mask``), so
    the result equals a teacher whose head had the student's size (METHODS.md 6.8 (a)).

    Args:
        teacher: any single-vocabulary teacher (its ``kind``, ``config``, ... are kept).
        vocab_size: the student's V.
    """

    def __init__(self, teacher, vocab_size: int):
        if teacher.kind in ("cached", "ema", "self"):
            raise ValueError(
                f"teacher.kind={teacher.kind!r} with {teacher.vocab_size} vocabulary rows for a "
                f"student of {vocab_size}: only model-backed teachers (online, ensemble, "
                "composite) can be resized; write the cache with the student's vocabulary size."
            )
        self.inner, self.vocab_size = teacher, int(vocab_size)

    def __getattr__(self, name):  # kind, config, graphdef, params, shardings, ... of the teacher
        return getattr(self.inner, name)

    def loss_inputs(self, params, batch, state=None) -> dict:
        out = self.inner.loss_inputs(params, batch, state)
        head = out["teacher_head"]
        fit = lambda w: _resize_columns(w, self.vocab_size)  # noqa: E731
        out["teacher_head"] = tuple(map(fit, head)) if isinstance(head, tuple) else fit(head)
        return out


def _resize_columns(w: jax.Array, v: int) -> jax.Array:
    """[D, V_t] -> [D, v]: the first v columns, or zero columns appended."""
    if w.shape[-1] >= v:
        return w[..., :v]
    return jnp.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, v - w.shape[-1])])


def target_params(teacher, params):
    """The teacher's own parameters inside ``params`` (without a ``WithReference`` reference)."""
    return params["teacher"] if isinstance(teacher, WithReference) else params


# ------------------------------------------------------------------------ self-distillation


def agreement_weights(
    logprobs: jax.Array, mask: jax.Array, *, gamma: float, level: str = "token"
) -> jax.Array:
    """UniSD's multi-context agreement weights [B, T] (METHODS.md 3.7).

    Args:
        logprobs: [K, B, T] log p_T(y_t | context k) of the sampled / target token.
        mask: [B, T] valid tokens.
        gamma: strength; 0 gives all-ones weights.
        level: "token": d = Var_k(lp_k), d~ = min(d / quantile_0.95(d over valid tokens), 10),
            w = max(1 / (1 + gamma d~), 0.01); "sequence": s_k = masked mean of lp_k per row,
            w = exp(-gamma Var_k(s_k)) for every token of the row.
    """
    from distill_jax.losses import selection

    m = mask.astype(jnp.float32)
    # Var_k computed after subtracting context 0, so identical contexts give exactly 0 (and w 1).
    var = lambda x: jnp.var(x - x[:1], axis=0)  # noqa: E731
    if level == "token":
        d = var(logprobs)
        q = selection.masked_quantile(d, mask, 0.95)
        d_norm = jnp.minimum(d / jnp.maximum(q, 1e-12), 10.0)
        return jnp.maximum(1.0 / (1.0 + gamma * d_norm), 0.01) * m
    if level == "sequence":
        s = jnp.sum(logprobs * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)  # [K, B]
        return jnp.exp(-gamma * var(s))[:, None] * m
    raise ValueError(f"agreement level={level!r}: use 'token' or 'sequence'.")


class SelfTeacher:
    """The student as its own teacher on privileged contexts.

    Args:
        student: the student model (its graph; parameters come from the train state).
        source: "student" (the current weights under stop_gradient: OPSD), "ema" (an EMA of
            the student in ``TrainState.ema``), or "initial" (a frozen copy of the weights the
            run starts from: OPSD's recommended fixed teacher).
        decay: the EMA decay (source "ema").
        every_steps: update the EMA after every N-th optimizer step (source "ema").
        agreement_gamma: UniSD agreement strength (K > 1 contexts), None = off.
        agreement_level: "token" or "sequence".
    """

    FIELDS = ("teacher_input_ids", "teacher_positions", "teacher_segment_ids")

    def __init__(
        self,
        student,
        *,
        source: str = "student",
        decay: float = 0.999,
        every_steps: int = 1,
        agreement_gamma: float | None = None,
        agreement_level: str = "token",
        chunk_size: int = 128,
    ):
        if source not in ("student", "ema", "initial"):
            raise ValueError(f"teacher.source={source!r}: use 'student', 'ema' or 'initial'.")
        if source == "ema" and not 0 <= decay < 1:
            raise ValueError(f"self teacher: decay={decay} must be in [0, 1).")
        self.kind = "ema" if source == "ema" else "self"
        self.source, self.decay = source, decay
        self.every_steps = _check_every(every_steps)
        self.config = student.config
        self.vocab_size = student.config.vocab_size
        self.graphdef, params = split_model(student)
        self._params = params if source == "initial" else None
        self.param_axes = sharding.param_logical_axes(student)
        self.agreement_gamma, self.agreement_level = agreement_gamma, agreement_level
        self.chunk_size = chunk_size

    def params(self):
        return self._params

    def shardings(self, mesh, rules):
        if self._params is None:
            return None
        return sharding.tree_shardings(self._params, mesh, rules, self.param_axes)

    def host_batch(self, batch: dict, index: int) -> dict:
        return batch

    def _weights(self, params, state):
        if self.source == "initial":
            return params
        if self.source == "ema":
            return state.ema
        return jax.lax.stop_gradient(state.params["student"])

    def loss_inputs(self, params, batch, state) -> dict:
        weights = self._weights(params, state)
        if "teacher_input_ids" in batch:
            contexts = [
                dict(
                    input_ids=batch["teacher_input_ids"][:, k],
                    positions=batch["teacher_positions"][:, k],
                    segment_ids=batch["teacher_segment_ids"][:, k],
                )
                for k in range(batch["teacher_input_ids"].shape[1])
            ]
        else:  # no privileged context: the student's own batch
            contexts = [batch]
        outs = [_forward(self.graphdef, weights, ctx, False) for ctx in contexts]
        cap = self.config.final_logit_softcapping
        if len(outs) == 1:
            out = dict(teacher_hidden=outs[0][0], teacher_head=outs[0][1], teacher_softcap=cap)
        else:  # the contexts' probabilities averaged
            k = len(outs)
            out = dict(
                teacher_hidden=tuple(h for h, _, _ in outs),
                teacher_head=tuple(w for _, w, _ in outs),
                teacher_softcap=(cap,) * k,
                teacher_combine=("probs", (1.0 / k,) * k),
            )
        if self.agreement_gamma is not None and len(outs) > 1:
            lp = jnp.stack(
                [
                    alm.token_and_boundary_logprobs(
                        h, w, batch["targets"], softcap=cap, chunk_size=self.chunk_size
                    )[0]
                    for h, w, _ in outs
                ]
            )
            out["token_weights"] = jax.lax.stop_gradient(
                agreement_weights(
                    lp, batch["loss_mask"], gamma=self.agreement_gamma, level=self.agreement_level
                )
            )
        return out

    def update(self, ema, student_params, step):
        """theta_T <- d theta_T + (1 - d) theta_S (source "ema"), when ``every_steps`` divides
        the optimizer step ``step``."""
        return ema_update(ema, student_params, self.decay, self.every_steps, step)


from distill_jax.teachers.cross_tokenizer import CrossTokenizerTeacher  # noqa: E402
from distill_jax.teachers.offline import (  # noqa: E402
    build_seqkd_dataset,
    build_teacher_cache,
    model_fingerprint,
)
