r"""Training regimes as batch sources: where each step's device batch comes from.

Every source has the same small interface, which is all ``train/loop.py`` knows of a regime:

* ``next(state, step) -> (batch, extra)``: the step's batch on the mesh and extra host metrics
  (e.g. ``student_samples``: 1.0 when the batch is the student's own samples);
* ``host_free``: True when ``next`` never reads device values back, so the loop runs it under
  ``jax.transfer_guard("disallow")`` and calls ``prefetch()`` (read and place the next batch)
  while the step runs;
* ``get_state()`` / ``set_state(saved)``: JSON state checkpointed with the student (the data
  iterator's position, a replay threshold); ``arrays()`` / ``set_arrays(tree)``: device arrays
  checkpointed beside it (a replay buffer), None when there are none;
* ``eval_batch(local)``: a held-out host batch of the same data on the mesh, teacher-free (the
  dataset's completions on-policy); ``after_eval(result)``: what a regime learns from an eval.

The regimes: ``FixedSource`` (packed documents, or a ``bridges.BridgeBatches`` cross-tokenizer
stream that is collated on the host), ``CachedTeacherSource`` (fixed data + the offline
teacher's cache entry), ``PairsSource`` (preference pairs: the chosen and rejected side of one
pair per row, for DPO, REDI and DistiLLM-2), ``OnPolicySource`` (GKD: student samples with
probability lambda, else the dataset's completions or the teacher's samples, with DistiLLM's
replay buffer) and ``BridgeSource`` (on-policy cross-tokenizer: the student's samples
re-tokenized for the teacher).
The sampling coin, the keys and the buffer are fixed by (seed, step) or checkpointed, so resume
stays exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from distill_jax import sharding, teachers
from distill_jax.bridges import batches as bridge_batches
from distill_jax.train import rollout
from distill_jax.train import step as step_lib


def to_device(local: dict, shardings: dict) -> dict:
    """This process's rows [B_local, ...] -> global arrays [B, ...] on the mesh."""
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in local.items()}


def _local_rows(*arrays) -> list[np.ndarray]:
    """This process's block of rows of global [B, ...] arrays, as NumPy."""
    out = []
    for x in arrays:
        full = np.asarray(multihost_utils.process_allgather(x, tiled=True))
        n = full.shape[0] // jax.process_count()
        out.append(full[jax.process_index() * n : (jax.process_index() + 1) * n])
    return out


def host_bridge_batch(collator, prompts: dict, tokens, token_mask) -> dict:
    """A cross-tokenizer step batch for prompts + completions in the student's tokens (its own
    samples or the dataset's): the teacher re-tokenizes the text they spell, the collator aligns
    the two, and only chunks with completion tokens carry the loss (on-policy ALM).

    Args:
        prompts: this process's ``data.prompts`` batch (NumPy).
        tokens, token_mask: [B_local, N] completions and their valid tokens (NumPy).
    """
    rows, starts = [], []
    for pid, pm, tok, tm in zip(prompts["prompt_ids"], prompts["prompt_mask"], tokens, token_mask):
        prompt = [int(x) for x in pid[np.asarray(pm, bool)]]
        rows.append(prompt + [int(x) for x in tok[np.asarray(tm, bool)]])
        starts.append(len(prompt))
    batch = bridge_batches.to_step_batch(collator.collate_student_ids(rows, starts))
    for i, start in enumerate(starts):  # the student's own terms (e.g. CE) skip the prompt too
        batch["loss_mask"][i, : max(start - 1, 0)] = False
    return batch


def prompt_shardings(mesh, rules, fields) -> dict:
    """Shardings of a ``data.prompts`` batch's fields: [B] ids, [B, K, L] privileged prompts,
    [B, L] the rest."""
    axes = {"example_ids": ("batch",), "privileged_ids": ("batch", None, "length")}
    axes["privileged_mask"] = axes["privileged_ids"]
    return {
        k: sharding.named_sharding(mesh, axes.get(k, ("batch", "length")), rules) for k in fields
    }


class _Prefetch:
    """Fixed-data batches one step ahead: the next batch is read, collated and placed on the
    devices (``jax.make_array_from_process_local_data``) while the current step runs.

    ``state()`` is the data iterator's state as of the steps dispatched so far (before the
    prefetched batch), which is what a checkpoint of those steps must hold.
    """

    def __init__(self, iterator, read, place):
        self.iterator, self.read, self.place = iterator, read, place
        self.pending = None  # (iterator state before the batch, device batch)

    def fill(self):
        state = self.iterator.get_state()
        local = self.read()
        # The one intended host -> device copy. Across processes JAX assembles the global array
        # with a device_put that a "disallow" guard would refuse; reads back stay disallowed.
        with jax.transfer_guard_host_to_device("allow"):
            self.pending = (state, self.place(local))

    def next(self):
        if self.pending is None:
            self.fill()
        (_, batch), self.pending = self.pending, None
        return batch

    def state(self) -> dict:
        return self.pending[0] if self.pending is not None else self.iterator.get_state()


class FixedSource:
    """Fixed data: each step's batch is the next one of a host iterator (packed documents, or a
    cross-tokenizer ``BridgeBatches`` stream), prefetched one step ahead; nothing comes back
    from the devices."""

    host_free = True

    def __init__(self, batches, shardings: dict):
        self.batches, self.shardings = batches, shardings
        self._prefetch = _Prefetch(batches, self._read, self._place)

    def _read(self) -> dict:
        return next(self.batches)

    def _place(self, local: dict) -> dict:
        return to_device(local, self.shardings)

    def next(self, state, step: int) -> tuple[dict, dict]:
        del state, step
        return self._prefetch.next(), {}

    def prefetch(self) -> None:
        self._prefetch.fill()

    def get_state(self) -> dict:
        return self._prefetch.state()

    def set_state(self, saved: dict) -> None:
        self.batches.set_state(saved)

    def arrays(self):
        return None

    def set_arrays(self, arrays) -> None:
        del arrays

    def eval_batch(self, local: dict) -> dict:
        return self._place(local)

    def after_eval(self, result: dict) -> None:
        del result


class CachedTeacherSource(FixedSource):
    """Fixed data with an offline teacher: each batch carries this process's entry of the
    teacher cache (top-k ids and log-probabilities) for the batch just read."""

    def __init__(self, batches, shardings: dict, teacher: teachers.CachedTeacher):
        super().__init__(batches, shardings)
        self.teacher = teacher

    def _read(self) -> dict:
        local = next(self.batches)
        return self.teacher.host_batch(local, self.batches.batches_emitted - 1)


class PairsSource(FixedSource):
    """Preference pairs (``data.pairs.PairBatches``, ``config.data.source="pairs"``): each row
    is one (prompt, chosen, rejected) pair, the chosen side in the standard fields and the
    rejected side in ``rejected_*`` fields of the same [B, L] shape, prefetched like fixed data;
    the iterator's position is checkpointed, so resume is exact. Held-out batches are pairs
    too; the evaluation reads their chosen side."""

    def __init__(self, batches, shardings: dict):
        missing = [k for k in step_lib.PAIR_FIELDS if k not in shardings]
        if missing:
            raise ValueError(f"PairsSource needs batch shardings for {missing} (train.build).")
        super().__init__(batches, shardings)


class _PromptSource:
    """Shared by the generation-based sources: prompt batches read each step (not prefetched:
    the batch is made from samples, which the host reads back)."""

    host_free = False

    def __init__(self, prompts, prompt_shardings: dict, *, seed: int, lmbda: float):
        self.prompts, self.prompt_shardings = prompts, prompt_shardings
        self.seed, self.lmbda = seed, float(lmbda)

    def prefetch(self) -> None:
        pass

    def arrays(self):
        return None

    def set_arrays(self, arrays) -> None:
        del arrays

    def get_state(self) -> dict:
        return self.prompts.get_state()

    def set_state(self, saved: dict) -> None:
        self.prompts.set_state(saved)

    def after_eval(self, result: dict) -> None:
        del result


class OnPolicySource(_PromptSource):
    """GKD: the student's samples with probability lambda (fixed by (seed, step)), else the
    dataset's completions or, with ``teacher_rollout`` (SeqKD), the teacher's samples; with a
    replay buffer (DistiLLM) a student step replays a stored sample unless a fresh-sample coin
    at the adaptive threshold says otherwise. A self-teacher's privileged prompts are added to
    every batch."""

    def __init__(
        self,
        prompts,
        prompt_shardings: dict,
        *,
        seed: int,
        lmbda: float,
        student_rollout,
        supervised,
        teacher_rollout=None,
        teacher=None,
        teacher_params=None,
        add_privileged=None,
        replay: rollout.ReplayBuffer | None = None,
        init_threshold: float = 0.2,
        loss_eps: float = 0.1,
    ):
        super().__init__(prompts, prompt_shardings, seed=seed, lmbda=lmbda)
        self.student_rollout, self.supervised = student_rollout, supervised
        self.teacher_rollout, self.teacher, self.teacher_params = (
            teacher_rollout,
            teacher,
            teacher_params,
        )
        self.add_privileged = add_privileged
        self.sample_key = jax.random.key(seed + 4242)
        self.replay, self.loss_eps = replay, loss_eps
        self.threshold = float(init_threshold) if replay is not None else 1.0
        self.previous_loss = None

    def next(self, state, step: int) -> tuple[dict, dict]:
        prompts = to_device(next(self.prompts), self.prompt_shardings)
        batch, student_samples = self._sequences(state, prompts, step)
        return self._privileged(batch, prompts), {"student_samples": student_samples}

    def _sequences(self, state, prompts: dict, step: int) -> tuple[dict, float]:
        if not rollout.use_student_samples(self.seed, step, self.lmbda):
            if self.teacher_rollout is not None:
                params = teachers.target_params(self.teacher, self.teacher_params)
                return self.teacher_rollout(params, prompts, self.sample_key, step), 0.0
            return self.supervised(prompts), 0.0
        buf = self.replay
        if (
            buf is not None
            and int(buf.filled)
            and not rollout.use_fresh_samples(self.seed, step, self.threshold)
        ):
            slot = rollout.replay_slot(self.seed, step, int(buf.filled))
            return rollout.replay_get(buf, slot), 1.0
        batch = self.student_rollout(state.params["student"], prompts, self.sample_key, step)
        if buf is not None:
            self.replay = rollout.replay_add(buf, batch)
        return batch, 1.0

    def _privileged(self, batch: dict, prompts: dict) -> dict:
        if self.add_privileged is None:
            return batch
        return self.add_privileged(batch, prompts["privileged_ids"], prompts["privileged_mask"])

    def eval_batch(self, local: dict) -> dict:
        prompts = to_device(local, self.prompt_shardings)
        return self._privileged(self.supervised(prompts), prompts)

    def get_state(self) -> dict:
        if self.replay is None:
            return self.prompts.get_state()
        return {
            "prompts": self.prompts.get_state(),
            "replay_threshold": self.threshold,
            "replay_previous_loss": self.previous_loss,
        }

    def set_state(self, saved: dict) -> None:
        if self.replay is None:
            return self.prompts.set_state(saved)
        self.prompts.set_state(saved["prompts"])
        self.threshold = saved["replay_threshold"]
        self.previous_loss = saved["replay_previous_loss"]

    def arrays(self):
        return self.replay

    def set_arrays(self, arrays) -> None:
        self.replay = arrays

    def after_eval(self, result: dict) -> None:
        """DistiLLM: fresh samples become likelier when the held-out loss rises."""
        if self.replay is None:
            return
        self.threshold = rollout.replay_threshold(
            self.threshold, self.previous_loss, result["nll"], eps=self.loss_eps
        )
        self.previous_loss = result["nll"]


def replay_buffer(mesh, rules, shape: tuple[int, int], capacity: int) -> rollout.ReplayBuffer:
    """An empty replay buffer of ``capacity`` step batches [B, L], rows sharded over batch."""
    example = {
        k: jnp.zeros(shape, jnp.bool_ if k == "loss_mask" else jnp.int32)
        for k in step_lib.BATCH_FIELDS
    }
    buffer = rollout.replay_init(example, capacity)
    replicated = sharding.named_sharding(mesh, (), rules)
    batch_rows = sharding.named_sharding(mesh, (None, "batch", "length"), rules)
    return jax.device_put(
        buffer,
        rollout.ReplayBuffer({k: batch_rows for k in buffer.batches}, replicated, replicated),
    )


class BridgeSource(_PromptSource):
    """On-policy across tokenizers: with probability lambda the student's samples, else the
    dataset's completions, re-tokenized for the teacher and aligned on the host
    (``host_bridge_batch``)."""

    def __init__(
        self,
        prompts,
        prompt_shardings: dict,
        batch_shardings: dict,
        *,
        seed: int,
        lmbda: float,
        collator,
        student_sample,
    ):
        super().__init__(prompts, prompt_shardings, seed=seed, lmbda=lmbda)
        self.batch_shardings, self.collator = batch_shardings, collator
        self.student_sample = student_sample  # (params, prompts, rng, step) -> tokens, mask
        self.sample_key = jax.random.key(seed + 4242)

    def next(self, state, step: int) -> tuple[dict, dict]:
        local = next(self.prompts)
        if rollout.use_student_samples(self.seed, step, self.lmbda):
            prompts = to_device(local, self.prompt_shardings)
            params = state.params["student"]
            tokens, mask = self.student_sample(params, prompts, self.sample_key, step)
            batch = host_bridge_batch(self.collator, local, *_local_rows(tokens, mask))
            return to_device(batch, self.batch_shardings), {"student_samples": 1.0}
        return self.eval_batch(local), {"student_samples": 0.0}

    def eval_batch(self, local: dict) -> dict:
        comp = (local["completion_ids"], local["completion_mask"])
        return to_device(host_bridge_batch(self.collator, local, *comp), self.batch_shardings)
