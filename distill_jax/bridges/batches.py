r"""Cross-tokenizer training batches: documents -> text pieces -> both tokenizations + chunk ids.

The same text goes to the teacher and the student, each with its own tokenizer; the collator
(``align.ChunkCollator``) aligns them. One row holds one text piece (no packing: the two sides
would pack differently). Documents longer than ``piece_bytes`` are cut at whitespace into pieces
of at most that many bytes, so no text is dropped; a piece that still does not fit the token
lengths loses its tail chunks, which each batch reports (``dropped_bytes``).

Order and resume follow ``data.pipeline.TokenBatches``: a seeded permutation of the pieces per
epoch, this process's share ``order[process_index::process_count]``, and a JSON state (epoch,
position, batches emitted) from which a resumed run reads exactly the batches an uninterrupted
run would.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from distill_jax.bridges.align import ChunkCollator

STATE_VERSION = 1


def split_text(text: str, max_bytes: int) -> list[str]:
    """Cut ``text`` before whitespace into pieces of at most ``max_bytes`` UTF-8 bytes (a word
    longer than that is cut at a character boundary). ``"".join(pieces) == text``."""
    pieces, start, last_space = [], 0, None
    size = 0
    for i, ch in enumerate(text):
        n = len(ch.encode())
        if ch.isspace() and i > start:
            last_space = i
        if size + n > max_bytes and i > start:
            cut = last_space if last_space is not None and last_space > start else i
            pieces.append(text[start:cut])
            start, last_space = cut, None
            size = len(text[start:i].encode())
        size += n
    if start < len(text):
        pieces.append(text[start:])
    return pieces


class BridgeBatches(Iterator[dict[str, np.ndarray]]):
    """Batches of ``ChunkCollator`` output over text pieces of ``documents``.

    Each batch has the student fields of ``data.packing`` (``input_ids``, ``targets``,
    ``segment_ids``, ``positions``, ``loss_mask``: one segment per row, targets the next token)
    plus ``teacher_ids``, ``teacher_positions``, ``teacher_segment_ids``, ``teacher_chunk``,
    ``student_chunk`` [B, U or T] and ``dropped_bytes`` [B].

    Args:
        documents: texts.
        collator: the teacher/student ``ChunkCollator``.
        global_batch_size: rows per step over all processes.
        piece_bytes: the longest text piece (default: 3 bytes per student position).
        seed, num_epochs, process_index, process_count: as in ``TokenBatches``.
    """

    def __init__(
        self,
        documents: Sequence[str],
        collator: ChunkCollator,
        *,
        global_batch_size: int,
        piece_bytes: int | None = None,
        seed: int = 0,
        num_epochs: int | None = None,
        process_index: int = 0,
        process_count: int = 1,
        name: str = "data",
    ):
        if global_batch_size % process_count:
            raise ValueError(
                f"{name}: global_batch_size={global_batch_size} is not divisible by the "
                f"{process_count} processes."
            )
        piece_bytes = piece_bytes or 3 * collator.student_len
        self.pieces = [p for doc in documents for p in split_text(doc, piece_bytes)]
        if not self.pieces:
            raise ValueError(f"{name}: the corpus is empty; check the source path or filter.")
        self.collator, self.name = collator, name
        self.local_batch_size = global_batch_size // process_count
        self.config = dict(
            global_batch_size=global_batch_size,
            piece_bytes=piece_bytes,
            seed=seed,
            num_epochs=num_epochs,
            process_index=process_index,
            process_count=process_count,
            num_pieces=len(self.pieces),
            teacher_len=collator.teacher_len,
            student_len=collator.student_len,
            coarsen=collator.coarsen,
        )
        self._epoch, self._position, self._emitted = 0, 0, 0
        self._order = self._shard_order(0)

    def _shard_order(self, epoch: int) -> np.ndarray:
        c = self.config
        order = np.random.default_rng((c["seed"], epoch)).permutation(c["num_pieces"])
        return order[c["process_index"] :: c["process_count"]]

    @property
    def batches_emitted(self) -> int:
        return self._emitted

    def _next_texts(self) -> list[str]:
        texts = []
        while len(texts) < self.local_batch_size:
            if self._position >= len(self._order):
                self._epoch += 1
                self._position = 0
                if (
                    self.config["num_epochs"] is not None
                    and self._epoch >= self.config["num_epochs"]
                ):
                    break
                self._order = self._shard_order(self._epoch)
            texts.append(self.pieces[int(self._order[self._position])])
            self._position += 1
        return texts

    def __next__(self) -> dict[str, np.ndarray]:
        texts = self._next_texts()
        if not texts:
            raise StopIteration
        texts += [""] * (self.local_batch_size - len(texts))  # empty rows carry no chunk
        self._emitted += 1
        return to_step_batch(self.collator(texts))

    def get_state(self) -> dict:
        return {
            "version": STATE_VERSION,
            "config": dict(self.config),
            "epoch": self._epoch,
            "position": self._position,
            "emitted": self._emitted,
        }

    def set_state(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{self.name}: data state version {state.get('version')} is unknown.")
        for key, value in self.config.items():
            if state["config"].get(key) != value:
                raise ValueError(
                    f"{self.name}: the saved data state has {key}={state['config'].get(key)!r} "
                    f"but this iterator has {key}={value!r}; resume with the run's settings."
                )
        self._epoch, self._position, self._emitted = (
            state["epoch"],
            state["position"],
            state["emitted"],
        )
        self._order = self._shard_order(self._epoch)


def to_step_batch(collated: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Collator output -> the train step's field names (student fields as ``data.packing``)."""
    s_ids, s_seg = collated["student_ids"], collated["student_segment"]
    t_ids, t_seg = collated["teacher_ids"], collated["teacher_segment"]
    positions = lambda seg: np.where(seg > 0, np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)  # noqa: E731
    targets = np.concatenate([s_ids[:, 1:], np.zeros_like(s_ids[:, :1])], axis=1)
    loss_mask = (s_seg > 0) & np.concatenate(
        [s_seg[:, 1:] > 0, np.zeros_like(s_seg[:, :1], bool)], 1
    )
    return {
        "input_ids": s_ids,
        "targets": targets.astype(np.int32),
        "segment_ids": s_seg,
        "positions": positions(s_seg),
        "loss_mask": loss_mask,
        "teacher_ids": t_ids,
        "teacher_positions": positions(t_seg),
        "teacher_segment_ids": t_seg,
        "teacher_chunk": collated["teacher_chunk"],
        "student_chunk": collated["student_chunk"],
        "dropped_bytes": collated["dropped_bytes"],
    }
