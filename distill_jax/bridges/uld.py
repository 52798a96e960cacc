r"""ULD: the Universal Logit Distillation loss across tokenizers (METHODS.md 6.5).

Boizard et al., "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss"
(arXiv:2402.12030, 2024); reference code: Nicolas-BZRD/llm-recipes
``models/distillation_model.py`` (``DistillationLoss``).

ULD needs no vocabulary map: at each position it compares the two next-token distributions as
sorted probability vectors,

    l = sum_i |sort(q)_i - sort(p)_i|,

both sorted in descending order and the shorter one (the smaller vocabulary) padded with zeros
(the paper derives it as a closed form of a Wasserstein distance between the two distributions
under a uniform transport cost). l does not change when either vocabulary is permuted, is 0 when
the distributions are equal up to a relabelling, and is at most sum q + sum p = 2.

Positions are paired by index among the valid positions of each row (the reference aligns the
first answer token of each side and truncates to the shorter answer): the k-th valid student
position is paired with the k-th valid teacher position, for k < min(#valid student, #valid
teacher). The paper's total loss is CE + lambda * mean l with lambda = 1.5 (``distil_factor``);
here only l is computed, per pair, and the caller reduces it with ``masked_sum_and_count`` and
weights it in the objective (train/objective.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from distill_jax.losses.tokens import apply_mask, log_probs


def first_valid_positions(mask: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
    """The first ``length`` valid positions of each row, in order, at a static shape.

    A stable argsort of ``~mask`` lists the valid positions first, in their original order;
    the first ``length`` entries are kept (entries past the row's valid count point at invalid
    positions and must be masked by the caller).

    Args:
        mask: [B, S] bool.
        length: static, <= S.

    Returns:
        (positions [B, length] int32, valid counts [B] int32).
    """
    mask = mask.astype(bool)
    order = jnp.argsort(~mask, axis=-1, stable=True)[:, :length]  # [B, length]
    return order.astype(jnp.int32), jnp.sum(mask, axis=-1, dtype=jnp.int32)


def sorted_l1(logq: jax.Array, logp: jax.Array) -> jax.Array:
    r"""sum_i |sort(q)_i - sort(p)_i| over the last axis, the smaller vocabulary zero-padded.

    Sorting both ascending and zero-padding the shorter at the front pairs the same entries as
    the paper's descending sort with zeros at the end (the padding zeros are the smallest).

    Args:
        logq: [..., V] student log-probs.
        logp: [..., W] teacher log-probs (V and W may differ).

    Returns:
        [...] float32 in [0, 2].
    """
    q = jnp.sort(jnp.exp(logq), axis=-1)  # ascending
    p = jnp.sort(jnp.exp(logp), axis=-1)
    size = max(q.shape[-1], p.shape[-1])
    pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(size - x.shape[-1], 0)])  # noqa: E731
    return jnp.sum(jnp.abs(pad(q) - pad(p)), axis=-1)


def uld_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    student_mask: jax.Array,
    teacher_mask: jax.Array,
    *,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    r"""Per-pair ULD distance between index-paired valid positions (Boizard et al., 2024).

    q_k = softmax(z_s[s_k] / tau_s), p_k = softmax(z_t[t_k] / tau_t), where s_k and t_k are the
    k-th valid student and teacher positions of the row; l_k = ``sorted_l1``(q_k, p_k) for
    k < n = min(#valid student, #valid teacher), 0 beyond.

    Args:
        student_logits: [B, T, V] float.
        teacher_logits: [B, U, W] float, treated as constant.
        student_mask: [B, T] bool, the student positions to distil (e.g. answer tokens).
        teacher_mask: [B, U] bool, the teacher positions, in the same order.
        student_temperature: tau_s > 0.
        teacher_temperature: tau_t > 0.

    Returns:
        (l [B, L] float32, pair_mask [B, L] bool) with L = min(T, U): pair k of each row is
        valid iff k < n; reduce with ``masked_sum_and_count(l, pair_mask)``.
    """
    length = min(student_logits.shape[1], teacher_logits.shape[1])
    s_pos, s_count = first_valid_positions(student_mask, length)  # [B, L], [B]
    t_pos, t_count = first_valid_positions(teacher_mask, length)
    pair_mask = jnp.arange(length) < jnp.minimum(s_count, t_count)[:, None]  # [B, L]
    s = jnp.take_along_axis(student_logits, s_pos[..., None], axis=1)  # [B, L, V]
    t = jnp.take_along_axis(teacher_logits, t_pos[..., None], axis=1)  # [B, L, W]
    logq = log_probs(s, student_temperature)
    logp = jax.lax.stop_gradient(log_probs(t, teacher_temperature))
    return apply_mask(sorted_l1(logq, logp), pair_mask), pair_mask
