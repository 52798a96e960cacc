r"""On-policy rollouts in the mesh: the step batch of a model's own samples (METHODS.md 4.2-4.5).

Sampling itself (``RolloutSettings``, ``example_keys``, ``sample``, ``sequence_batch``) lives in
``models.sampling``, shared with eval; this module turns it into the trainer's regimes.

* ``make_rollout``: params + prompt batch -> the step batch of the model's own samples
  (``sampling.sample`` then ``sampling.sequence_batch``), one jitted program whose outputs stay
  on the mesh with the step's batch shardings.
* ``supervised_batch`` / ``with_privileged``: the step batch of a prompt batch's own completions,
  and the teacher's view of it under privileged prompts (self-distillation).
* On-policy GKD (Agarwal et al., ICLR 2024, "On-Policy Distillation of Language Models"):
  ``use_student_samples`` draws the lambda coin of each step from (seed, step), so a resumed run
  makes the same choices; lambda = 0 is supervised KD on the dataset completions, lambda = 1
  always trains on the student's samples (TRL ``GKDTrainer``'s ``lmbda``).
* Replay (DistiLLM, Ko et al., ICML 2024, ``distillm/buffer.py``): ``ReplayBuffer`` keeps the last
  K sampled batches on the mesh (fixed shapes, checkpointed); ``replay_threshold`` is the adaptive
  probability of sampling fresh instead of replaying.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from distill_jax.models import sampling


def supervised_batch(prompts: dict) -> dict:
    """``sampling.sequence_batch`` of a ``data.prompts`` batch's own (dataset) completions."""
    return sampling.sequence_batch(
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
        batch: a ``sampling.sequence_batch`` [B, P + N].
        privileged_ids, privileged_mask: [B, K, P].

    Returns:
        batch plus teacher_input_ids, teacher_positions, teacher_segment_ids [B, K, P + N].
    """
    p = privileged_ids.shape[-1]
    completion = batch["input_ids"][:, p:]
    real = batch["segment_ids"][:, p:] > 0
    views = [
        sampling.sequence_batch(privileged_ids[:, k], privileged_mask[:, k], completion, real)
        for k in range(privileged_ids.shape[1])
    ]
    stack = lambda key: jnp.stack([v[key] for v in views], axis=1)  # noqa: E731
    return dict(
        batch,
        teacher_input_ids=stack("input_ids"),
        teacher_positions=stack("positions"),
        teacher_segment_ids=stack("segment_ids"),
    )


def sample_prompts(graphdef, params, prompts: dict, rng, step, settings: sampling.RolloutSettings):
    """``sampling.sample`` for a ``data.prompts`` batch at ``step``, with the keys of
    ``sampling.example_keys``:
    (tokens [B, N], mask [B, N])."""
    keys = sampling.example_keys(rng, prompts["example_ids"], step)
    return sampling.sample(
        graphdef, params, prompts["prompt_ids"], prompts["prompt_mask"], keys, settings
    )


def make_rollout(graphdef, settings: sampling.RolloutSettings, *, out_shardings=None):
    """jit(params, prompts, rng, step) -> the step batch of the model's samples for ``prompts``
    (a ``data.prompts`` batch on the mesh); the result keeps ``out_shardings`` (the step's)."""

    def rollout(params, prompts, rng, step):
        tokens, mask = sample_prompts(graphdef, params, prompts, rng, step, settings)
        return sampling.sequence_batch(prompts["prompt_ids"], prompts["prompt_mask"], tokens, mask)

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
