"""Token sampling (greedy, temperature, top-k, nucleus/top-p), KV-cached generation and rollouts.

Top-p follows Holtzman et al., 2020 ("The Curious Case of Neural Text Degeneration",
arXiv:1904.09751): keep the smallest set of most-probable tokens whose mass reaches p. Filters
apply in the order of transformers' ``generate``: temperature, then top-k, then top-p.

Rollouts (used by the trainer's on-policy regimes and by eval):

* ``sample``: batched sampling with the KV cache (``decode``), traceable inside a jitted
  function, static shapes [B, P] -> [B, N]; EOS ends a row (later tokens are masked),
  temperature / top-k / top-p (``RolloutSettings``, checked by ``check_settings``), one PRNG key
  per example (``example_keys``), so a row's sample does not depend on the other rows of its
  batch or on how the batch is sharded.
* ``sequence_batch``: prompt + completion -> the step's batch fields [B, P + N], loss on the
  completion tokens only (prompt, padding and everything after the first EOS masked).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

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


# --- rollouts: static settings, one key per example, the step batch of prompt + completion ---


class RolloutSettings(NamedTuple):
    """Static sampling settings: N new tokens, temperature (0 = greedy), top-k, top-p, EOS id,
    and vocab_limit (the tokenizer's size where the model's vocabulary is padded beyond it:
    padded ids are never sampled)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_id: int | None = None
    vocab_limit: int | None = None


def check_settings(settings: RolloutSettings, config, prompt_len: int) -> None:
    """Raise before compiling when the settings cannot work for a model of ``config``."""
    if settings.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={settings.max_new_tokens}: sample at least one token.")
    if settings.temperature < 0:
        raise ValueError(f"temperature={settings.temperature} must be >= 0 (0 = greedy).")
    if not 0 < settings.top_p <= 1:
        raise ValueError(f"top_p={settings.top_p} must be in (0, 1].")
    total = prompt_len + settings.max_new_tokens
    if total > config.max_position_embeddings:
        raise ValueError(
            f"Prompts of {prompt_len} tokens plus {settings.max_new_tokens} new tokens need a "
            f"cache of {total} positions, more than the model's max_position_embeddings="
            f"{config.max_position_embeddings}; shorten prompt_len or max_new_tokens."
        )


def example_keys(rng: jax.Array, example_ids: jax.Array, step) -> jax.Array:
    """[B] keys: ``fold_in(fold_in(rng, step), example_id)``, one stream per example and step."""
    base = jax.random.fold_in(rng, step)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(example_ids)


def sample(graphdef, params, prompt_ids, prompt_mask, keys, settings: RolloutSettings):
    """Completions of a left-padded prompt batch, traceable (no gradient flows into params).

    Args:
        graphdef, params: ``teachers.split_model`` of the model (pure-dict parameters).
        prompt_ids, prompt_mask: [B, P] (padding on the left).
        keys: [B] PRNG keys (``example_keys``).
        settings: ``RolloutSettings``.

    Returns:
        (tokens [B, N] int32, mask [B, N] bool): mask is True up to and including the first EOS.
    """
    model = nnx.merge(graphdef, nnx.State(jax.lax.stop_gradient(params)))
    gen = decode(
        model,
        prompt_ids,
        prompt_mask,
        keys,
        max_new_tokens=settings.max_new_tokens,
        sampling=(float(settings.temperature), int(settings.top_k), float(settings.top_p)),
        eos_id=settings.eos_id,
        vocab_limit=settings.vocab_limit,
    )
    mask = jnp.arange(settings.max_new_tokens)[None, :] < gen.lengths[:, None]
    return gen.tokens, mask


def sequence_batch(prompt_ids, prompt_mask, completion_ids, completion_mask) -> dict:
    """The train step's batch for prompt + completion, loss on the completion only.

    Column P + i holds completion token i, so the prediction of token i is at column P + i - 1:

        input_ids  = [prompt, completion]                              [B, P + N]
        targets[j] = input_ids[j + 1]                                  (0 at the last column)
        loss_mask[j] = completion_mask[j + 1 - P]   for j >= P - 1, else False
        segment_ids  = 1 on real prompt and completion tokens, 0 on padding
        positions    = running count of real tokens - 1 (the prompt's first real token is 0)

    Args:
        prompt_ids, prompt_mask: [B, P], left-padded.
        completion_ids, completion_mask: [B, N], True up to and including EOS.
    """
    b, p = prompt_ids.shape
    ids = jnp.concatenate([prompt_ids, completion_ids], axis=1).astype(jnp.int32)
    real = jnp.concatenate([prompt_mask, completion_mask], axis=1)
    positions = jnp.maximum(jnp.cumsum(real.astype(jnp.int32), axis=1) - 1, 0)
    targets = jnp.concatenate([ids[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
    loss_mask = jnp.concatenate(
        [jnp.zeros((b, p - 1), bool), completion_mask, jnp.zeros((b, 1), bool)], axis=1
    )
    return dict(
        input_ids=ids,
        targets=targets,
        segment_ids=real.astype(jnp.int32),
        positions=positions.astype(jnp.int32),
        loss_mask=loss_mask,
    )
