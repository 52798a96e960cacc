r"""Speculative decoding: exact speculative sampling, acceptance and speed-up (METHODS.md 8.1-8.3).

Speculative sampling (Leviathan et al., 2023, "Fast Inference from Transformers via Speculative
Decoding"; Chen et al., 2023, "Accelerating LLM Decoding with Speculative Sampling"): a draft q
proposes gamma tokens x_1..x_gamma; the target p scores all gamma + 1 prefixes in one pass;
x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection a token is
drawn from the residual norm(max(0, p_i - q_i)) and the round ends; if all gamma are accepted a
bonus token comes from p_{gamma+1}. Every emitted token is distributed exactly as the target's
sampling distribution. Greedy decoding is the special case of one-hot p and q (accept iff the
argmaxes agree), so greedy speculative output equals greedy target output token for token.

* ``verify``: one round's accept / resample for a batch (pure).
* ``speculative_generate``: the whole loop with a KV cache for each model; rejected tokens'
  cache slots are emptied (their positions hidden from attention), so rows that accept different
  numbers of tokens share one static-shape program.
* ``acceptance``: the expected acceptance beta = sum_v min(p_v, q_v) = 1 - TVD(p, q) at the
  draft's own sampled prefixes, averaged over positions (alpha, DistillSpec's measure), plus the
  greedy match rate.
* ``block_efficiency`` / ``speedup``: tokens per target call (1 - alpha^(gamma+1)) / (1 - alpha)
  and the simulated wall-clock ratio tau / (gamma c + 1) for a draft/target cost ratio c.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from distill_jax.models import cache as cache_lib
from distill_jax.models import sampling


def check_pair(target_config, draft_config, gamma: int) -> None:
    """Raise before compiling when the draft cannot serve the target."""
    if int(gamma) != gamma or gamma < 1:
        raise ValueError(f"gamma={gamma}: the draft must propose at least one token (gamma >= 1).")
    if target_config.vocab_size != draft_config.vocab_size:
        raise ValueError(
            f"The draft's vocabulary ({draft_config.vocab_size}) differs from the target's "
            f"({target_config.vocab_size}); speculative sampling compares their distributions "
            "token by token, so use a draft with the target's tokenizer (a cross-tokenizer "
            "bridge cannot make the acceptance test exact)."
        )


def probabilities(logits, *, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """The sampling distribution [..., V] of logits: softmax after temperature / top-k / top-p,
    or the one-hot argmax at temperature 0."""
    if temperature == 0.0:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    shape = logits.shape
    x = sampling.filter_logits(
        logits.reshape(-1, shape[-1]), temperature=temperature, top_k=top_k, top_p=top_p
    )
    return jax.nn.softmax(x, axis=-1).reshape(shape)


def verify(p, q, draft_tokens, key):
    """Accept a prefix of the draft and pick the next token, per row (Leviathan et al. Alg. 1).

    Args:
        p: [B, G + 1, V] target distributions at the G + 1 prefixes (the last: after all drafts).
        q: [B, G, V] draft distributions the draft tokens were drawn from.
        draft_tokens: [B, G] int.
        key: one PRNG key or [B] keys.

    Returns:
        (accepted [B] int32 in 0..G, next_token [B] int32): the first ``accepted`` draft tokens
        stand, then ``next_token`` (from the residual at the first rejection, else the bonus).
    """
    b, g = draft_tokens.shape
    keys = key if jnp.ndim(key) == 1 else jax.random.split(key, b)
    u_keys, r_keys = jax.vmap(lambda k: tuple(jax.random.split(k)))(keys)
    u = jax.vmap(lambda k: jax.random.uniform(k, (g,)))(u_keys)  # [B, G]
    take = lambda d: jnp.take_along_axis(d, draft_tokens[..., None], axis=-1)[..., 0]
    p_x, q_x = take(p[:, :g]), take(q)  # [B, G]
    ok = u * q_x < p_x  # u < p/q without dividing; q_x > 0 for a token drawn from q
    accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)  # leading accepts
    rows = jnp.arange(b)
    p_n = p[rows, accepted]  # [B, V]
    q_n = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)[rows, accepted]  # 0 for bonus
    residual = jnp.maximum(p_n - q_n, 0.0)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    # mass is 0 only where p_n == q_n, where rejection has probability 0: fall back to p_n.
    dist = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p_n)
    logd = jnp.where(dist > 0, jnp.log(jnp.where(dist > 0, dist, 1.0)), -jnp.inf)
    nxt = jax.vmap(jax.random.categorical)(r_keys, logd)
    return accepted.astype(jnp.int32), nxt.astype(jnp.int32)


@struct.dataclass
class SpeculativeOutput:
    """tokens [B, N] (EOS repeated after the end); lengths [B]; target_calls [B] rounds in which
    the row was still generating (plus the prefill's first token); accepted [B] draft tokens
    accepted; drafted [B] draft tokens proposed."""

    tokens: jax.Array
    lengths: jax.Array
    target_calls: jax.Array
    accepted: jax.Array
    drafted: jax.Array


def speculative_generate(
    target,
    draft,
    prompt_ids,
    *,
    gamma: int,
    max_new_tokens: int,
    prompt_mask=None,
    rng=None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
) -> SpeculativeOutput:
    """Sample ``max_new_tokens`` tokens from ``target`` with ``draft`` proposing ``gamma`` a round.

    Args:
        target, draft: Transformers with the same vocabulary.
        prompt_ids: [B, P], left-padded; prompt_mask [B, P] (default all real).
        gamma: draft tokens per round (>= 1).
        rng: a PRNG key or [B] keys (one per row); needed when temperature > 0.
        temperature, top_k, top_p: the sampling distribution (both models use the same filters).
        eos_id: a row ends at it.

    Raises:
        ValueError: gamma < 1; different vocabularies; prompt + new tokens beyond the target's or
            the draft's positions.
    """
    check_pair(target.config, draft.config, gamma)
    b, p = prompt_ids.shape
    for model, what in ((target, "target"), (draft, "draft")):
        if p + max_new_tokens + gamma > model.config.max_position_embeddings:
            raise ValueError(
                f"Prompts of {p} tokens + {max_new_tokens} new tokens + gamma={gamma} exceed the "
                f"{what}'s max_position_embeddings={model.config.max_position_embeddings}; "
                "shorten the prompt or max_new_tokens."
            )
    if prompt_mask is None:
        prompt_mask = jnp.ones((b, p), bool)
    if rng is None:
        if temperature > 0:
            raise ValueError("Speculative sampling with temperature > 0 needs an rng key.")
        rng = jax.random.key(0)
    tg, ts = nnx.split(target)
    dg, ds = nnx.split(draft)
    return _speculative(
        tg,
        ts,
        dg,
        ds,
        jnp.asarray(prompt_ids, jnp.int32),
        jnp.asarray(prompt_mask, bool),
        rng,
        gamma=int(gamma),
        max_new_tokens=int(max_new_tokens),
        sampling_args=(float(temperature), int(top_k), float(top_p)),
        eos_id=eos_id,
    )


@functools.partial(
    jax.jit,
    static_argnames=("tg", "dg", "gamma", "max_new_tokens", "sampling_args", "eos_id"),
)
def _speculative(
    tg, ts, dg, ds, prompt_ids, prompt_mask, rng, *, gamma, max_new_tokens, sampling_args, eos_id
):
    target, draft = nnx.merge(tg, ts), nnx.merge(dg, ds)
    temperature, top_k, top_p = sampling_args
    dist = functools.partial(probabilities, temperature=temperature, top_k=top_k, top_p=top_p)
    b, p = prompt_ids.shape
    g, n = gamma, max_new_tokens
    slots = p + n * (g + 1)  # worst case: one token per round, g + 1 slots written per round
    positions, segments = sampling.prompt_layout(prompt_mask)
    keys = rng if jnp.ndim(rng) == 1 else jax.random.split(rng, b)
    row_key = lambda i, j: jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, i), j))(keys)

    def prefill(model):
        cache = cache_lib.init_cache(model.config, b, slots, check=False)
        out = model.forward(prompt_ids, positions=positions, segment_ids=segments, cache=cache)
        return out.cache, out.logits[:, -1]

    t_cache, t_logits = prefill(target)
    d_cache, _ = prefill(draft)
    first = jax.vmap(jax.random.categorical)(row_key(0, 0), jnp.log(dist(t_logits))).astype(
        jnp.int32
    )
    out = jnp.zeros((b, n + g + 1), jnp.int32).at[:, 0].set(first)
    done0 = jnp.zeros((b,), bool) if eos_id is None else first == eos_id
    ones = jnp.ones((b, 1), jnp.int32)

    def round_(carry):
        t_cache, d_cache, tok, pos, count, done, calls, acc, drafted, r, buf = carry
        active = (count < n) & ~done
        # Draft: feed tok, x_1, ..., x_g (the last only fills the cache), sample x_1..x_g.
        d_start = d_cache.index

        def draft_step(c, i):
            cache, cur = c
            o = draft.forward(
                cur[:, None], positions=(pos + i)[:, None], segment_ids=ones, cache=cache
            )
            qd = dist(o.logits[:, 0])
            x = jax.vmap(jax.random.categorical)(row_key(r, 1 + i), jnp.log(qd)).astype(jnp.int32)
            return (o.cache, x), (x, qd)

        (d_cache, last), (xs, qs) = jax.lax.scan(draft_step, (d_cache, tok), jnp.arange(g))
        d_cache = draft.forward(
            last[:, None], positions=(pos + g)[:, None], segment_ids=ones, cache=d_cache
        ).cache
        xs, qs = xs.T, jnp.swapaxes(qs, 0, 1)  # [B, G], [B, G, V]
        # Target: one pass over tok, x_1..x_g.
        t_start = t_cache.index
        feed = jnp.concatenate([tok[:, None], xs], axis=1)
        o = target.forward(
            feed,
            positions=pos[:, None] + jnp.arange(g + 1)[None],
            segment_ids=jnp.ones((b, g + 1), jnp.int32),
            cache=t_cache,
        )
        t_cache = o.cache
        n_acc, nxt = verify(dist(o.logits), qs, xs, row_key(r, g + 1))
        # Empty the slots of rejected drafts (slot start + 1 + j holds x_{j+1}).
        j = jnp.arange(t_cache.max_length)[None]

        def clear(cache, start):
            rel = j - start - 1
            return cache_lib.clear_slots(cache, (rel >= n_acc[:, None]) & (rel < g))

        t_cache, d_cache = clear(t_cache, t_start), clear(d_cache, d_start)
        # Emit x_1..x_acc, then nxt, at this row's write offset.
        k = jnp.arange(g + 1)[None]
        vals = jnp.where(k < n_acc[:, None], jnp.concatenate([xs, xs[:, :1]], axis=1), nxt[:, None])
        write = active[:, None] & (k <= n_acc[:, None])
        idx = count[:, None] + k
        rows = jnp.arange(b)[:, None]
        buf = buf.at[rows, idx].set(jnp.where(write, vals, buf[rows, idx]))
        if eos_id is not None:
            done = done | (active & jnp.any(write & (vals == eos_id), axis=1))
        emitted = jnp.where(active, n_acc + 1, 0)
        return (
            t_cache,
            d_cache,
            jnp.where(active, nxt, tok),
            pos + emitted,
            count + emitted,
            done,
            calls + active,
            acc + jnp.where(active, n_acc, 0),
            drafted + jnp.where(active, g, 0),
            r + 1,
            buf,
        )

    def cond(carry):
        count, done = carry[4], carry[5]
        return jnp.any((count < n) & ~done)

    init = (
        t_cache,
        d_cache,
        first,
        positions[:, -1] + 1,
        jnp.ones((b,), jnp.int32),
        done0,
        jnp.ones((b,), jnp.int32),
        jnp.zeros((b,), jnp.int32),
        jnp.zeros((b,), jnp.int32),
        jnp.ones((), jnp.int32),
        out,
    )
    carry = jax.lax.while_loop(cond, round_, init)
    tokens = carry[10][:, :n]
    if eos_id is None:
        lengths = jnp.full((b,), n, jnp.int32)
    else:
        is_eos = tokens == eos_id
        after = jnp.cumsum(is_eos, axis=1) - is_eos > 0  # strictly after the first EOS
        tokens = jnp.where(after, eos_id, tokens)
        lengths = jnp.sum(~after, axis=1).astype(jnp.int32)
    return SpeculativeOutput(
        tokens=tokens, lengths=lengths, target_calls=carry[6], accepted=carry[7], drafted=carry[8]
    )


# ------------------------------------------------------------------------------- measures


def acceptance_rate(p, q, mask=None) -> jax.Array:
    """alpha = masked mean over positions of beta = sum_v min(p_v, q_v) = 1 - TVD(p, q).

    Args:
        p, q: [..., V] target and draft distributions; mask [...] (default all).
    """
    beta = jnp.sum(jnp.minimum(p, q), axis=-1)
    if mask is None:
        return jnp.mean(beta)
    m = mask.astype(jnp.float32)
    return jnp.sum(beta * m) / jnp.maximum(jnp.sum(m), 1.0)


def block_efficiency(alpha, gamma: int):
    """Expected tokens per target call with i.i.d. acceptance alpha: (1 - a^(g+1)) / (1 - a)."""
    alpha = np.asarray(alpha, np.float64)
    safe = np.where(alpha < 1, alpha, 0.0)
    tau = (1 - safe ** (gamma + 1)) / (1 - safe)
    return np.where(alpha < 1, tau, gamma + 1.0)


def speedup(alpha, gamma: int, cost_ratio: float):
    """Simulated wall-clock speed-up tau / (gamma c + 1), c = draft / target cost per token."""
    return block_efficiency(alpha, gamma) / (gamma * cost_ratio + 1.0)


@functools.partial(jax.jit, static_argnames=("tg", "dg", "settings"))
def _acceptance_sums(tg, ts, dg, ds, prompt_ids, prompt_mask, keys, settings):
    target, draft = nnx.merge(tg, ts), nnx.merge(dg, nnx.State(ds))
    tokens, mask = sampling.sample(dg, ds, prompt_ids, prompt_mask, keys, settings)
    batch = sampling.sequence_batch(prompt_ids, prompt_mask, tokens, mask)
    kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
    t_logits = target(batch["input_ids"], **kw)
    d_logits = draft(batch["input_ids"], **kw)
    temp = settings.temperature
    pd = functools.partial(
        probabilities, temperature=temp, top_k=settings.top_k, top_p=settings.top_p
    )
    m = batch["loss_mask"].astype(jnp.float32)
    beta = jnp.sum(jnp.minimum(pd(t_logits), pd(d_logits)), axis=-1)
    greedy = (jnp.argmax(t_logits, -1) == jnp.argmax(d_logits, -1)).astype(jnp.float32)
    return jnp.sum(beta * m), jnp.sum(greedy * m), jnp.sum(m)


def acceptance(
    target,
    draft,
    prompt_batches,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    seed: int = 0,
    prefixes: str = "draft",
) -> dict:
    """DistillSpec's acceptance measure over prompt batches (``data.prompts`` batches).

    One model samples completions of every prompt; at each completion position,
    beta = sum_v min(p_v, q_v) for the sampling distributions p (target) and q (draft), and the
    greedy match [argmax p == argmax q]. ``prefixes="draft"`` samples with the draft
    (DistillSpec's alpha, what its on-policy training optimises); ``prefixes="target"`` with the
    target: the prefixes speculative decoding actually drafts from (its output follows the
    target), so this alpha predicts the measured acceptance of ``speculative_generate``.

    Returns:
        {"alpha": mean beta, "greedy_match": mean match, "positions": count}.
    """
    check_pair(target.config, draft.config, 1)
    if prefixes not in ("draft", "target"):
        raise ValueError(f"prefixes={prefixes!r}: use 'draft' or 'target'.")
    if prefixes == "target":  # beta and the greedy match are symmetric in the two models
        target, draft = draft, target
    settings = sampling.RolloutSettings(max_new_tokens, temperature, top_k, top_p, eos_id)
    tg, ts = nnx.split(target)
    dg, ds = nnx.split(draft, nnx.Param)
    ds = nnx.to_pure_dict(ds)
    alpha = greedy = count = 0.0
    for i, batch in enumerate(prompt_batches):
        sampling.check_settings(settings, draft.config, batch["prompt_ids"].shape[1])
        sampling.check_settings(settings, target.config, batch["prompt_ids"].shape[1])
        keys = sampling.example_keys(jax.random.key(seed), jnp.asarray(batch["example_ids"]), i)
        a, g, c = _acceptance_sums(
            tg,
            ts,
            dg,
            ds,
            jnp.asarray(batch["prompt_ids"]),
            jnp.asarray(batch["prompt_mask"]),
            keys,
            settings,
        )
        alpha, greedy, count = alpha + float(a), greedy + float(g), count + float(c)
    return {
        "alpha": alpha / max(count, 1.0),
        "greedy_match": greedy / max(count, 1.0),
        "positions": int(count),
    }
