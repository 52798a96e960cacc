r"""The cross-tokenizer teacher (``bridges``): a frozen model reading the same text in its own
tokens, giving the bridge loss terms (``train/bridge_terms.py``: ALM, ULD, MinED, DSKD) what they
need of it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distill_jax.bridges import alm
from distill_jax.teachers import OnlineTeacher, _forward


class CrossTokenizerTeacher(OnlineTeacher):
    """A frozen model with its own tokenizer (``bridges``): it reads the batch's ``teacher_ids``
    (the same text in its tokens) and gives the bridge terms, on its own tokens: per-token
    next-token and word-boundary log-probs (ALM), its final hidden states, head, targets and
    scored positions (ULD, MinED, DSKD, ALM's chunk-end term), both sides' chunk ids
    (``bridges.align.ChunkCollator``), and on request the MinED map and its embeddings of its
    input and target ids (DSKD).

    Args:
        model: the teacher.
        teacher_boundary_mask, student_boundary_mask: [W], [V] bool word-start sets
            (``bridges.boundary_vocab_mask``) of the two tokenizers.
        chunk_size: positions per step of the chunked log-prob walk (no [B, U, W] logits).
        mined_map: [V] int student id -> teacher id (``bridges.mined_map``), or None.
        embeddings: also give the teacher's embeddings of its input and target ids.
    """

    kind = "bridge"
    FIELDS = ("teacher_ids", "teacher_positions", "teacher_segment_ids")
    CHUNK_FIELDS = ("teacher_chunk", "student_chunk")

    def __init__(
        self,
        model,
        *,
        teacher_boundary_mask,
        student_boundary_mask,
        chunk_size=128,
        mined_map=None,
        embeddings: bool = False,
    ):
        super().__init__(model)
        self.teacher_boundary_mask = np.asarray(teacher_boundary_mask, bool)
        self.student_boundary_mask = np.asarray(student_boundary_mask, bool)
        self.chunk_size = chunk_size
        self.mined_map = None if mined_map is None else np.asarray(mined_map, np.int32)
        self.embeddings = embeddings

    def loss_inputs(self, params, batch, state=None) -> dict:
        ids, seg = batch["teacher_ids"], batch["teacher_segment_ids"]
        teacher_batch = dict(input_ids=ids, positions=batch["teacher_positions"], segment_ids=seg)
        hidden, head, _ = _forward(self.graphdef, params, teacher_batch, False)
        targets = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
        # A position is scored when its next token is in the same text (bridges.batches).
        scored = (seg > 0) & jnp.concatenate([seg[:, 1:] > 0, jnp.zeros_like(seg[:, :1], bool)], 1)
        lp, lpb = alm.token_and_boundary_logprobs(
            hidden,
            head,
            targets,
            jnp.asarray(self.teacher_boundary_mask),
            softcap=self.config.final_logit_softcapping,
            chunk_size=self.chunk_size,
        )
        out = dict(
            teacher_token_logprobs=lp,
            teacher_boundary_logprobs=lpb,
            teacher_chunk=batch["teacher_chunk"],
            student_chunk=batch["student_chunk"],
            student_boundary_mask=jnp.asarray(self.student_boundary_mask),
            teacher_token_hidden=hidden,
            teacher_token_head=head,
            teacher_token_mask=scored,
            teacher_targets=targets,
            teacher_softcap=self.config.final_logit_softcapping,
        )
        if self.mined_map is not None:
            out["mined_map"] = jnp.asarray(self.mined_map)
        if self.embeddings:
            model = nnx.merge(self.graphdef, nnx.State(params))
            out["teacher_token_embeddings"] = (model.embed_tokens(ids), model.embed_tokens(targets))
        static = ("teacher_softcap",)
        return {k: v if k in static else jax.lax.stop_gradient(v) for k, v in out.items()}
