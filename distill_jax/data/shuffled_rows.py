"""``ShuffledRows``: the resumable order shared by the prompt and pair batch iterators.

Every epoch is a fresh permutation of the rows, fixed by (seed, epoch); a global batch takes
the next ``global_batch_size`` rows of it (crossing into the next epoch when one ends) and each
process keeps its block of them. The position is the iterator's whole state, so a checkpoint of
``get_state()`` resumes the exact order. With ``num_epochs`` set, the last batch repeats its
last row rather than change shape, and the next raises StopIteration.
"""

from __future__ import annotations

import numpy as np


class ShuffledRows:
    """Base of ``prompts.PromptBatches`` and ``pairs.PairBatches``: subclasses fill ``rows``
    and ``config`` (the settings the saved state must match) and call ``_start``."""

    kind = "rows"  # named in the error of a state saved for other data

    def _start(self, global_batch_size, process_index, process_count, seed, num_epochs):
        self.global_batch_size = global_batch_size
        self.local = global_batch_size // process_count
        self.process_index = process_index
        self.seed, self.num_epochs = seed, num_epochs
        self.epoch, self.position, self.emitted = 0, 0, 0

    @property
    def batches_emitted(self) -> int:
        return self.emitted

    def _next_ids(self) -> list[int]:
        """This process's row ids of the next global batch (advances the position)."""
        ids: list[int] = []
        while len(ids) < self.global_batch_size:
            if self.num_epochs is not None and self.epoch >= self.num_epochs:
                if not ids:
                    raise StopIteration
                ids.append(ids[-1])  # the last batch repeats a row rather than change shape
                continue
            order = np.random.default_rng((self.seed, self.epoch)).permutation(len(self.rows))
            take = order[self.position : self.position + self.global_batch_size - len(ids)]
            ids.extend(int(i) for i in take)
            self.position += len(take)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        self.emitted += 1
        return ids[self.process_index * self.local : (self.process_index + 1) * self.local]

    def get_state(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "emitted": self.emitted,
            "config": self.config,
        }

    def set_state(self, state: dict) -> None:
        if state.get("config") != self.config:
            raise ValueError(
                f"The saved data state is of other {self.kind} batches ({state.get('config')} "
                f"vs {self.config}); use a new workdir for changed data settings."
            )
        self.epoch, self.position, self.emitted = (
            state["epoch"],
            state["position"],
            state["emitted"],
        )
