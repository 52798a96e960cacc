"""Token sampling (greedy, temperature, top-k, nucleus/top-p) and KV-cached generation.

Top-p follows Holtzman et al., 2020 ("The Curious Case of Neural Text Degeneration",
arXiv:1904.09751): keep the smallest set of most-probable tokens whose mass reaches p. Filters
apply in the order of transformers' ``generate``: temperature, then top-k, then top-p.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from distill_jax.models import cache as cache_lib

_NEG = -jnp.inf


def filter_logits(
    logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
    """Logits divided by the temperature with tokens outside top-k / top-p set to -inf.

    Args:
        logits: [B, V] float.
        temperature: > 0.
        top_k: keep the k largest (0 = all).
        top_p: keep the smallest most-probable set with mass >= top_p (1.0 = all).

    Returns:
        [B, V] float32.
    """
    x = logits.astype(jnp.float32) / temperature
    if top_k and top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, top_k)[0][..., -1:]  # [B, 1]
        x = jnp.where(x < kth, _NEG, x)
    if top_p < 1.0:
        order = jnp.argsort(-x, axis=-1)
        sorted_probs = jax.nn.softmax(jnp.take_along_axis(x, order, axis=-1), axis=-1)
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep_sorted = mass_before < top_p  # the first token is always kept
        keep = (
            jnp.zeros_like(keep_sorted).at[jnp.arange(x.shape[0])[:, None], order].set(keep_sorted)
        )
        x = jnp.where(keep, x, _NEG)
    return x


def sample_logits(
    logits: jax.Array,
    rng: jax.Array,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> jax.Array:
    """Next tokens [B] int32 from logits [B, V]; temperature 0 is greedy (argmax).

    ``rng`` is one key for the batch, or [B] keys (one per row: a row's draw then does not depend
    on which other rows share its batch).
    """
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    if jnp.ndim(rng) == 1:
        return jax.vmap(lambda k, r: jax.random.categorical(k, r))(rng, x).astype(jnp.int32)
    return jax.random.categorical(rng, x, axis=-1).astype(jnp.int32)


@struct.dataclass
class Generation:
    """tokens [B, N] (eos_id repeated after an end token); logits [B, N, V] float32 of the model
    for each generated token (before filtering) or None; lengths [B] tokens up to and incl. eos."""

    tokens: jax.Array
    logits: jax.Array | None
    lengths: jax.Array


def prompt_layout(prompt_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Positions and segment ids of a left-padded prompt batch.

    Args:
        prompt_mask: [B, P] bool, True on real tokens (padding on the left).

    Returns:
        positions [B, P] int32 (0 at the first real token), segment_ids [B, P] int32 (0 = pad).
    """
    m = prompt_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0), m


def generate(
    model: nnx.Module,
    prompt_ids: jax.Array,
    *,
    max_new_tokens: int,
    prompt_mask: jax.Array | None = None,
    rng: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    return_logits: bool = False,
    vocab_limit: int | None = None,
) -> Generation:
    """Sample ``max_new_tokens`` continuations with a KV cache, in one jitted program.

    Step i draws with ``jax.random.fold_in(rng, i)``, so a run is reproducible from its seed and
    equals sampling by repeated full forward passes with the same keys.

    Args:
        model: a Transformer.
        prompt_ids: [B, P] int; rows of different lengths are left-padded.
        max_new_tokens: N, the number of tokens to generate (static).
        prompt_mask: [B, P] bool, True on real tokens; default all True.
        rng: a PRNG key, or [B] keys (one per row), needed when temperature > 0.
        temperature, top_k, top_p: see ``sample_logits``.
        eos_id: once a row emits it, the row keeps emitting it.
        return_logits: also return the model's logits for every generated token.
        vocab_limit: never emit ids >= this (a model vocabulary padded beyond the tokenizer's).

    Returns:
        Generation.
    """
    b, p = prompt_ids.shape
    cache_lib.check_length(model.config, p + max_new_tokens)
    if prompt_mask is None:
        prompt_mask = jnp.ones((b, p), bool)
    if rng is None:
        if temperature > 0:
            raise ValueError("Sampling with temperature > 0 needs an rng key.")
        rng = jax.random.key(0)
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef,
        state,
        jnp.asarray(prompt_ids, jnp.int32),
        jnp.asarray(prompt_mask, bool),
        rng,
        max_new_tokens=max_new_tokens,
        sampling=(float(temperature), int(top_k), float(top_p)),
        eos_id=eos_id,
        return_logits=return_logits,
        vocab_limit=vocab_limit,
    )


def _fold(rng: jax.Array, step) -> jax.Array:
    """fold_in for one key or for [B] keys."""
    if jnp.ndim(rng) == 1:
        return jax.vmap(lambda k: jax.random.fold_in(k, step))(rng)
    return jax.random.fold_in(rng, step)


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "max_new_tokens",
        "sampling",
        "eos_id",
        "return_logits",
        "vocab_limit",
    ),
)
def _generate(
    graphdef,
    state,
    prompt_ids,
    prompt_mask,
    rng,
    *,
    max_new_tokens,
    sampling,
    eos_id,
    return_logits,
    vocab_limit=None,
):
    return decode(
        nnx.merge(graphdef, state),
        prompt_ids,
        prompt_mask,
        rng,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        eos_id=eos_id,
        return_logits=return_logits,
        vocab_limit=vocab_limit,
    )


def decode(
    model,
    prompt_ids,
    prompt_mask,
    rng,
    *,
    max_new_tokens: int,
    sampling: tuple[float, int, float],
    eos_id: int | None,
    return_logits: bool = False,
    vocab_limit: int | None = None,
) -> Generation:
    """The traceable body of ``generate`` (call it inside a jitted function, e.g. a train step).

    Args:
        model: a Transformer (merged inside the trace).
        prompt_ids, prompt_mask: [B, P].
        rng: one key, or [B] keys (one per row); step i uses ``fold_in(key, i)``.
        max_new_tokens, eos_id, return_logits, vocab_limit: see ``generate``.
        sampling: (temperature, top_k, top_p).
    """
    temperature, top_k, top_p = sampling
    b, p = prompt_ids.shape
    positions, segments = prompt_layout(prompt_mask)
    cache = cache_lib.init_cache(model.config, b, p + max_new_tokens)
    out = model.forward(prompt_ids, positions=positions, segment_ids=segments, cache=cache)
    cache, logits = out.cache, out.logits[:, -1]  # [B, V]

    def pick(step, logits, done):
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, _NEG)
        tok = sample_logits(
            logits,
            _fold(rng, step),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
        )
        if eos_id is not None:
            tok = jnp.where(done, eos_id, tok)
            done = done | (tok == eos_id)
        return tok, done

    first, done = pick(0, logits, jnp.zeros((b,), bool))
    last_pos = positions[:, -1]

    def step(carry, i):
        cache, tok, done, pos = carry
        out = model.forward(
            tok[:, None],
            positions=pos[:, None] + 1,
            segment_ids=jnp.ones((b, 1), jnp.int32),
            cache=cache,
        )
        logits = out.logits[:, 0]
        new_tok, new_done = pick(i, logits, done)
        return (out.cache, new_tok, new_done, pos + 1), (new_tok, logits, done)

    (_, _, _, _), (toks, step_logits, done_before) = jax.lax.scan(
        step, (cache, first, done, last_pos), jnp.arange(1, max_new_tokens)
    )
    tokens = jnp.concatenate([first[:, None], toks.T], axis=1)  # [B, N]
    all_logits = None
    if return_logits:
        all_logits = jnp.concatenate([logits[:, None], step_logits.transpose(1, 0, 2)], axis=1)
    if eos_id is None:
        lengths = jnp.full((b,), max_new_tokens, jnp.int32)
    else:
        # A token counts while no earlier token of its row was eos.
        before = jnp.concatenate([jnp.zeros((b, 1), bool), done_before.T], axis=1)
        lengths = jnp.sum(~before, axis=1).astype(jnp.int32)
    return Generation(tokens=tokens, logits=all_logits, lengths=lengths)
