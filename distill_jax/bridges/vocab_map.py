r"""Exact-match vocabulary maps between tokenizers, and padded vocabulary sizes (METHODS.md 6.8).

Two tokenizers often share many tokens byte for byte (" the", "\n", digits). The host side,
``exact_match_map``, maps every teacher id to the student id with identical token bytes (special
tokens: the student id with the same role, ``byteify.special_roles``, or the same text), or -1.
The device side, ``mapped_kl``, is a KL divergence on the common part: teacher and student
distributions are both coarsened onto the matched student ids plus one remainder bucket holding
the unmatched mass of each side, and compared there (the "vocabulary intersection" side path of
tokenkit and the matched half of trl's GOLD hybrid loss, ``uld_use_hybrid_loss``). ``coverage``
is the matched teacher mass, the number to log next to it: a KL on a small matched mass says
little.

One tokenizer trained at two padded sizes (Qwen2.5's 151936 vs 152064 embedding rows) is a
different case: ids past the true vocabulary mean nothing and must be masked to -inf on both
sides, by explicit config (``padded_vocab_mask``) after ``check_same_tokenizer_padding`` has
confirmed the two really are one vocabulary. Nothing here pads or truncates silently.

Sources: bminixhofer/tokenkit (pads vocabularies to a multiple of 64 with a -inf mask; exact
vocabulary overlap), huggingface/trl ``trl/experimental/gold/gold_trainer.py`` (GOLD hybrid:
exact string matches get a divergence, the rest sorted L1); user reports on mismatched padded
sizes: trl #2215, torchtune #2119.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.bridges.byteify import special_roles
from distill_jax.data.token_bytes import Tokenizer
from distill_jax.losses.tokens import NEG_INF, apply_mask, log_probs, xlogy_ratio

# ---------------------------------------------------------------------------- host: the map


def _bytes_index(tok: Tokenizer) -> dict[bytes, int]:
    """{token bytes: lowest id spelling them} over the non-special ids with non-empty bytes."""
    index: dict[bytes, int] = {}
    for i in range(tok.vocab_size):
        data = tok.token_bytes(i)
        if data and i not in tok.special_ids:
            index.setdefault(data, i)  # ids ascend, so the first one kept is the lowest
    return index


def _special_index(tok: Tokenizer) -> dict[tuple[str, str], int]:
    """{("role", role) or ("text", vocabulary text): lowest special id with it}."""
    roles = special_roles(tok)
    index: dict[tuple[str, str], int] = {}
    for i in sorted(tok.special_ids):
        if i in roles:
            index.setdefault(("role", roles[i]), i)
        index.setdefault(("text", tok.id_to_token(i)), i)
    return index


def exact_match_map(teacher_tok: Tokenizer, student_tok: Tokenizer) -> np.ndarray:
    r"""For each teacher id, the student id spelling the same bytes (specials: role), or -1.

    map[w] = min {v : bytes_S(v) = bytes_T(w) != b""} for a non-special teacher id w. A special
    teacher id (its bytes are empty) maps to the lowest special student id of the same role
    (``byteify.special_roles``: bos, eos, turn_start, ...), or failing that of the same
    vocabulary text ("<repo_name>"). -1 when no such v exists. Several student ids with the same
    bytes (SentencePiece vocabularies hold both a piece "\n" and the byte token <0x0A>) resolve
    to the lowest id, so the map is a function and the same tokenizer on both sides maps every
    id to the lowest id with its bytes (the identity when no two ids share bytes). Bytes are
    ``Tokenizer.token_bytes`` (METHODS.md 6.1: "▁" is a space, <0xNN> is byte NN), so
    SentencePiece and byte-level BPE vocabularies match on what the tokens spell.

    O(V + W) dictionary look-ups.

    Args:
        teacher_tok: the teacher tokenizer (W ids).
        student_tok: the student tokenizer (V ids).

    Returns:
        [W] int32 student ids, -1 where unmatched.
    """
    by_bytes, specials = _bytes_index(student_tok), _special_index(student_tok)
    teacher_roles = special_roles(teacher_tok)
    out = []
    for w in range(teacher_tok.vocab_size):
        if w in teacher_tok.special_ids:
            v = specials.get(("role", teacher_roles.get(w)), -1)
            out.append(v if v >= 0 else specials.get(("text", teacher_tok.id_to_token(w)), -1))
        else:
            out.append(by_bytes.get(teacher_tok.token_bytes(w), -1))  # b"" is never a key
    return np.asarray(out, np.int32)


# ---------------------------------------------------------------------------- device: the loss


def coverage(teacher_probs: jax.Array, vocab_map: jax.Array | np.ndarray) -> jax.Array:
    """Matched teacher mass sum_{w : map[w] >= 0} p_w.

    Args:
        teacher_probs: [..., W] probabilities.
        vocab_map: [W] int, from ``exact_match_map``.

    Returns:
        [...] float, in [0, 1] for a distribution.
    """
    return jnp.sum(jnp.where(jnp.asarray(vocab_map) >= 0, teacher_probs, 0.0), axis=-1)


def _teacher_on_student_ids(logp: jax.Array, vocab_map: jax.Array, v: int) -> jax.Array:
    """[..., W] teacher log-probs -> [..., V + 1]: log of the teacher mass on each student id
    (summed over the teacher ids mapped to it), and at index V the unmatched teacher mass.

    A log-sum-exp per student id, done as a scatter-max then a scatter-add of exp(logp - max),
    so matched masses keep full float32 precision however small they are.
    """
    idx = jnp.where(vocab_map >= 0, vocab_map, v)  # [W], unmatched -> the bucket
    shape = logp.shape[:-1] + (v + 1,)
    top = jnp.full(shape, NEG_INF, logp.dtype).at[..., idx].max(logp)  # [..., V + 1]
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    mass = jnp.zeros(shape, logp.dtype).at[..., idx].add(jnp.exp(logp - top[..., idx]))
    return jnp.where(mass > 0, top + jnp.log(jnp.where(mass > 0, mass, 1.0)), NEG_INF)


def _student_with_bucket(logq: jax.Array, vocab_map: jax.Array) -> jax.Array:
    """[..., V] student log-probs -> [..., V + 1]: the ids some teacher id maps to keep their
    log-prob, the others are -inf and their mass is gathered at index V."""
    v = logq.shape[-1]
    idx = jnp.where(vocab_map >= 0, vocab_map, v)
    hit = jnp.zeros(v + 1, bool).at[idx].set(True)[:v]  # [V]
    rest = jax.nn.logsumexp(jnp.where(hit, NEG_INF, logq), axis=-1, keepdims=True)
    return jnp.concatenate([jnp.where(hit, logq, NEG_INF), rest], axis=-1)


def mapped_kl(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    vocab_map: jax.Array | np.ndarray,
    mask: jax.Array | None = None,
    temperature: float | jax.Array = 1.0,
    *,
    student_vocab_mask: jax.Array | None = None,
    teacher_vocab_mask: jax.Array | None = None,
) -> jax.Array:
    r"""Per-token KL(p' || q') on matched student ids plus one remainder bucket (METHODS.md 6.8).

    p = softmax(z_t / tau) over W teacher ids, q = softmax(z_s / tau) over V student ids, M the
    set of student ids some teacher id maps to. Both are coarsened onto M + {rest}:

        p'_v = sum_{w : map[w] = v} p_w (v in M),   p'_rest = sum_{w : map[w] = -1} p_w,
        q'_v = q_v (v in M),                         q'_rest = sum_{v not in M} q_v,
        KL = sum_{v in M + {rest}} p'_v (log p'_v - log q'_v),   0 log 0 = 0.

    A proper KL between two distributions on the same support: >= 0, and 0 iff p' = q'. With
    the identity map (same tokenizer) it is ``forward_kl``. Everything is computed from float32
    log-probs (``log_probs``, ``xlogy_ratio``); +inf where p'_v > 0 = q'_v. Padded student rows
    join the remainder bucket unless ``student_vocab_mask`` removes them. Cf. tokenkit's
    vocabulary-intersection side loss and the matched part of trl GOLD's hybrid loss.

    Args:
        student_logits: [..., V] float.
        teacher_logits: [..., W] float, treated as constant.
        vocab_map: [W] int in [-1, V), from ``exact_match_map`` (pad it with -1 for padded
            teacher rows).
        mask: [...] bool or None; masked positions give 0.
        temperature: tau > 0, scalar or [...], on both sides.
        student_vocab_mask: [V] bool or None; False rows (padding) get log-prob -inf.
        teacher_vocab_mask: [W] bool or None, likewise.

    Returns:
        [...] float32, not reduced.
    """
    if np.shape(vocab_map) != teacher_logits.shape[-1:]:
        raise ValueError(
            f"vocab_map has shape {np.shape(vocab_map)} but the teacher logits have "
            f"{teacher_logits.shape[-1]} columns; pad the map with -1 for padded teacher rows "
            "(and mask them with teacher_vocab_mask=padded_vocab_mask(...))."
        )
    vmap_ = jnp.asarray(vocab_map, jnp.int32)
    logq = log_probs(student_logits, temperature, student_vocab_mask)  # [..., V]
    logp = jax.lax.stop_gradient(log_probs(teacher_logits, temperature, teacher_vocab_mask))
    logp_s = _teacher_on_student_ids(logp, vmap_, logq.shape[-1])  # [..., V + 1]
    logq_s = _student_with_bucket(logq, vmap_)  # [..., V + 1]
    return apply_mask(jnp.sum(xlogy_ratio(logp_s, logq_s), axis=-1), mask)


# ---------------------------------------------------------------------------- padded sizes


def padded_vocab_mask(true_size: int, padded_size: int) -> np.ndarray:
    """[padded_size] bool: True on the real ids [0, true_size), False on the padding rows.

    For one tokenizer under two embedding sizes (e.g. 151936 vs 152064): pass the result as
    ``vocab_mask`` to the divergences (logits of padded rows become -inf, as tokenkit does), or
    as ``student_vocab_mask`` / ``teacher_vocab_mask`` to ``mapped_kl``. A divergence with the
    padded rows masked equals the one on logits truncated to ``true_size``.

    Raises:
        ValueError: true_size is not in [1, padded_size].
    """
    if not 0 < true_size <= padded_size:
        raise ValueError(
            f"padded_vocab_mask: the true vocabulary size {true_size} must be in "
            f"[1, padded size {padded_size}]."
        )
    return np.arange(padded_size) < true_size


def check_same_tokenizer_padding(teacher_tok: Tokenizer, student_tok: Tokenizer) -> int:
    """Check that teacher and student use one vocabulary (differing at most in padded rows).

    Same vocabulary: equal ``vocab_size``, equal ``token_bytes`` for every id and equal
    special ids. Then only the models' padded sizes can differ, which ``padded_vocab_mask``
    handles; otherwise a cross-tokenizer bridge is needed.

    Returns:
        The shared true vocabulary size.

    Raises:
        ValueError: naming both tokenizers and the first difference.
    """
    t, s = teacher_tok, student_tok
    if t.vocab_size != s.vocab_size:
        why = f"vocab sizes {t.vocab_size} vs {s.vocab_size}"
    elif t.special_ids != s.special_ids:
        why = f"special ids differ ({sorted(t.special_ids ^ s.special_ids)[:5]} ...)"
    else:
        diff = (i for i in range(t.vocab_size) if t.token_bytes(i) != s.token_bytes(i))
        first = next(diff, None)
        if first is None:
            return t.vocab_size
        why = f"id {first} is {t.token_bytes(first)!r} vs {s.token_bytes(first)!r}"
    raise ValueError(
        f"Teacher tokenizer {t.name!r} and student tokenizer {s.name!r} are not the same "
        f"vocabulary ({why}); padded-vocabulary masking only applies to one tokenizer at two "
        "padded sizes. Use a cross-tokenizer bridge: exact_match_map + mapped_kl, uld_loss, "
        "mined_map or ALM (distill_jax.bridges)."
    )
