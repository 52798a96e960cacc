r"""Generation inside the mesh for on-policy and sequence-level distillation (METHODS.md 4.2-4.5).

* ``sample``: batched sampling with the KV cache (``models.sampling.decode``), traceable inside a
  jitted function, static shapes [B, P] -> [B, N]; EOS ends a row (later tokens are masked),
  temperature / top-k / top-p, one PRNG key per example (``example_keys``), so a row's sample does
  not depend on the other rows of its batch or on how the batch is sharded.
* ``sequence_batch``: prompt + completion -> the step's batch fields [B, P + N], loss on the
  completion tokens only (prompt, padding and everything after the first EOS masked).
* ``make_rollout``: params + prompt batch -> the step batch of the model's own samples, one
  jitted program whose outputs stay on the mesh with the step's batch shardings.
* On-policy GKD (Agarwal et al., ICLR 2024, "On-Policy Distillation of Language Models"):
  ``use_student_samples`` draws the lambda coin of each step from (seed, step), so a resumed run
  makes the same choices; lambda = 0 is supervised KD on the dataset completions, lambda = 1
  always trains on the student's samples (TRL ``GKDTrainer``'s ``lmbda``).
* Replay (DistiLLM, Ko et al., ICML 2024, ``distillm/buffer.py``): ``ReplayBuffer`` keeps the last
  K sampled batches on the mesh (fixed shapes, checkpointed); ``replay_threshold`` is the adaptive
  probability of sampling fresh instead of replaying.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from distill_jax.models import sampling


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
    gen = sampling.decode(
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


def supervised_batch(prompts: dict) -> dict:
    """``sequence_batch`` of a ``data.prompts`` batch's own (dataset) completions."""
    return sequence_batch(
        prompts["prompt_ids"],
        prompts["prompt_mask"],
        prompts["completion_ids"],
        prompts["completion_mask"],
    )


def with_privileged(batch: dict, privileged_ids, privileged_mask) -> dict:
    """Add the teacher's view of ``batch`` under K privileged prompts (self-distillation).

    The completion (columns P.. of ``batch``) follows each privileged prompt, left-padded to the
    same P, so completion token i sits at column P + i in every context and the teacher's
    prediction at column j is for the same token as the student's: the two contexts are aligned
    by construction, whatever their lengths (OPSD gathers at per-example offsets instead).

    Args:
        batch: a ``sequence_batch`` [B, P + N].
        privileged_ids, privileged_mask: [B, K, P].

    Returns:
        batch plus teacher_input_ids, teacher_positions, teacher_segment_ids [B, K, P + N].
    """
    p = privileged_ids.shape[-1]
    completion = batch["input_ids"][:, p:]
    real = batch["segment_ids"][:, p:] > 0
    views = [
        sequence_batch(privileged_ids[:, k], privileged_mask[:, k], completion, real)
        for k in range(privileged_ids.shape[1])
    ]
    stack = lambda key: jnp.stack([v[key] for v in views], axis=1)  # noqa: E731
    return dict(
        batch,
        teacher_input_ids=stack("input_ids"),
        teacher_positions=stack("positions"),
        teacher_segment_ids=stack("segment_ids"),
    )


def sample_prompts(graphdef, params, prompts: dict, rng, step, settings: RolloutSettings):
    """``sample`` for a ``data.prompts`` batch at ``step``, with the keys of ``example_keys``:
    (tokens [B, N], mask [B, N])."""
    keys = example_keys(rng, prompts["example_ids"], step)
    return sample(graphdef, params, prompts["prompt_ids"], prompts["prompt_mask"], keys, settings)


def make_rollout(graphdef, settings: RolloutSettings, *, out_shardings=None):
    """jit(params, prompts, rng, step) -> the step batch of the model's samples for ``prompts``
    (a ``data.prompts`` batch on the mesh); the result keeps ``out_shardings`` (the step's)."""

    def rollout(params, prompts, rng, step):
        tokens, mask = sample_prompts(graphdef, params, prompts, rng, step, settings)
        return sequence_batch(prompts["prompt_ids"], prompts["prompt_mask"], tokens, mask)

    return jax.jit(rollout, out_shardings=out_shardings)


def use_student_samples(seed: int, step: int, lmbda: float) -> bool:
    """The GKD coin of step ``step``: True with probability lambda, fixed by (seed, step)."""
    if not 0.0 <= lmbda <= 1.0:
        raise ValueError(f"onpolicy.lmbda={lmbda} must be in [0, 1].")
    return bool(np.random.default_rng((seed, step, 0x6B64)).random() < lmbda)


# ------------------------------------------------------------------------------------ replay


@struct.dataclass
class ReplayBuffer:
    """The last K sampled step batches, as [K, B, L] arrays on the mesh (fixed shapes, so the
    buffer is checkpointed with orbax like the train state); ``filled`` <= K slots hold data,
    ``next`` is the slot the next batch overwrites."""

    batches: dict
    filled: jax.Array
    next: jax.Array

    @property
    def capacity(self) -> int:
        return int(jax.tree.leaves(self.batches)[0].shape[0])


def replay_init(example_batch: dict, capacity: int) -> ReplayBuffer:
    """An empty buffer of ``capacity`` batches shaped like ``example_batch`` ({k: [B, L]})."""
    if capacity < 1:
        raise ValueError(f"onpolicy.replay.capacity={capacity} must be >= 1.")
    batches = {
        k: jnp.zeros((capacity, *jnp.shape(v)), jnp.asarray(v).dtype)
        for k, v in example_batch.items()
    }
    return ReplayBuffer(batches, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def replay_add(buffer: ReplayBuffer, batch: dict) -> ReplayBuffer:
    """Write ``batch`` into slot ``next`` (overwriting the oldest once full)."""
    k = buffer.capacity
    batches = {
        name: jax.lax.dynamic_update_index_in_dim(buffer.batches[name], batch[name], buffer.next, 0)
        for name in buffer.batches
    }
    return ReplayBuffer(batches, jnp.minimum(buffer.filled + 1, k), (buffer.next + 1) % k)


def replay_get(buffer: ReplayBuffer, slot) -> dict:
    """The batch in ``slot``."""
    return {k: jax.lax.dynamic_index_in_dim(v, slot, 0, False) for k, v in buffer.batches.items()}


def replay_slot(seed: int, step: int, filled: int) -> int:
    """Which of the ``filled`` slots step ``step`` replays (uniform, fixed by (seed, step))."""
    return int(np.random.default_rng((seed, step, 0x5E91)).integers(filled))


def use_fresh_samples(seed: int, step: int, threshold: float) -> bool:
    """DistiLLM's choice: sample fresh with probability ``threshold``, else replay."""
    return bool(np.random.default_rng((seed, step, 0xF5E5)).random() < threshold)


def replay_threshold(
    threshold: float, previous_loss: float | None, loss: float, *, eps: float, step_up: float = 0.1
) -> float:
    """DistiLLM's adaptive off-policy schedule: the probability of fresh samples rises by
    ``step_up`` (at most to 1) whenever the validation loss grew by more than ``eps``.

    Args:
        threshold: the current probability of sampling fresh.
        previous_loss: the validation loss at the previous evaluation (None at the first).
        loss: the validation loss now.
    """
    if previous_loss is not None and loss - previous_loss > eps:
        return min(1.0, threshold + step_up)
    return threshold
