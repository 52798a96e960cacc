r"""The input iterator: deterministic, resumable, per-process batches of packed rows.

Order. Each epoch e permutes the document indices with ``np.random.default_rng((seed, e))``
(the same permutation on every process); process p of P takes every P-th index of it, so each
process reads (and tokenizes) only its own shard, the shards are disjoint and together cover the
corpus. Documents are packed in that order (``packing.Packer``) and emitted as local batches of
``global_batch_size / P`` rows; ``global_batch`` places them on the mesh with
``jax.make_array_from_process_local_data``. Epochs follow each other without a flush, so rows
never end half empty at an epoch boundary.

Resume. ``get_state()`` is a small JSON-ready dict (epoch, position in the shard, the packer's
open rows, rows packed but not yet emitted, and the settings it belongs to); a fresh iterator
given it by ``set_state`` yields exactly the batches the original would have yielded next.
A state from other settings (seed, batch size, process count, corpus size, ...) is refused with
the differing field named.

A finite iterator (``num_epochs``) pads its last batch with empty rows (loss mask 0) rather
than dropping the rest; ``num_batches`` makes every process yield the same number of batches
(empty ones once its shard is exhausted), which multi-host evaluation needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from distill_jax import sharding
from distill_jax.data import packing

STATE_VERSION = 1


def text_encoder(tokenizer, *, add_bos: bool = True, add_eos: bool = True) -> Callable:
    """text -> token ids with BOS first and EOS last (where the tokenizer has them)."""

    def encode(text: str) -> list[int]:
        ids = tokenizer.encode(text, add_bos=add_bos and tokenizer.bos_id is not None)
        return ids + [tokenizer.eos_id] if add_eos and tokenizer.eos_id is not None else ids

    return encode


class TokenBatches(Iterator[dict[str, np.ndarray]]):
    """Packed batches {field: [B_local, L]} of ``packing.FIELDS`` over a document sequence.

    Args:
        documents: a random-access sequence of documents (whatever ``encode`` takes).
        encode: document -> token ids, or (token ids, loss mask) (e.g. chat examples).
        seq_len: L.
        global_batch_size: rows per step over all processes; divisible by the process count.
        seed: fixes the order; shuffle=False keeps the corpus order (still sharded).
        num_epochs: None = repeat forever.
        num_batches: stop after exactly this many batches (padding with empty batches).
        process_index, process_count: default ``jax.process_index()`` / ``jax.process_count()``.
        open_rows, long_documents: see ``packing.Packer``.
        name: used in messages ("kjv[17] has 900 tokens ...").
    """

    def __init__(
        self,
        documents: Sequence[Any],
        encode: Callable[[Any], Any],
        *,
        seq_len: int,
        global_batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        num_batches: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        open_rows: int = 8,
        long_documents: str = "error",
        name: str = "data",
    ):
        p = jax.process_index() if process_index is None else process_index
        n = jax.process_count() if process_count is None else process_count
        if len(documents) == 0:
            raise ValueError(f"{name}: the corpus is empty; check the source path or filter.")
        if global_batch_size % n:
            raise ValueError(
                f"{name}: global_batch_size={global_batch_size} is not divisible by the "
                f"{n} processes; use a multiple of {n}."
            )
        self.documents, self.encode, self.name = documents, encode, name
        self.local_batch_size = global_batch_size // n
        self.config = dict(
            seq_len=seq_len,
            global_batch_size=global_batch_size,
            seed=seed,
            shuffle=shuffle,
            num_epochs=num_epochs,
            num_batches=num_batches,
            process_index=p,
            process_count=n,
            open_rows=open_rows,
            long_documents=long_documents,
            num_documents=len(documents),
        )
        self._packer = packing.Packer(seq_len, open_rows=open_rows, long_documents=long_documents)
        self._epoch, self._position, self._emitted, self._finished = 0, 0, 0, False
        self._ready: list[dict[str, np.ndarray]] = []
        self._order = self._shard_order(0)

    # ------------------------------------------------------------------------------ order

    def _shard_order(self, epoch: int) -> np.ndarray:
        c = self.config
        n = c["num_documents"]
        order = (
            np.random.default_rng((c["seed"], epoch)).permutation(n)
            if c["shuffle"]
            else np.arange(n)
        )
        return order[c["process_index"] :: c["process_count"]]

    def _read_one(self) -> bool:
        """Tokenize and pack the next document of this shard; False once the data is done."""
        c = self.config
        while self._position >= len(self._order):
            self._epoch += 1
            self._position = 0
            if c["num_epochs"] is not None and self._epoch >= c["num_epochs"]:
                self._ready += self._packer.flush()
                self._finished = True
                return False
            self._order = self._shard_order(self._epoch)
        index = int(self._order[self._position])
        self._position += 1
        encoded = self.encode(self.documents[index])
        tokens, mask = encoded if isinstance(encoded, tuple) else (encoded, None)
        pairs = packing.document_pairs(tokens, mask)
        self._ready += self._packer.add(pairs, name=f"{self.name}[{index}]")
        return True

    def __next__(self) -> dict[str, np.ndarray]:
        c, b = self.config, self.local_batch_size
        if c["num_batches"] is not None and self._emitted >= c["num_batches"]:
            raise StopIteration
        while len(self._ready) < b and not self._finished and self._read_one():
            pass
        if not self._ready and self._finished and c["num_batches"] is None:
            raise StopIteration
        rows, self._ready = self._ready[:b], self._ready[b:]
        rows += packing.empty_rows(b - len(rows), c["seq_len"])
        self._emitted += 1
        return packing.stack_rows(rows)

    # ------------------------------------------------------------------------------ state

    def get_state(self) -> dict:
        """Everything needed to continue exactly here, as JSON-ready data."""
        return {
            "version": STATE_VERSION,
            "config": dict(self.config),
            "epoch": self._epoch,
            "position": self._position,
            "emitted": self._emitted,
            "finished": self._finished,
            "packer": self._packer.get_state(),
            "ready": [
                {k: r[k].astype(np.int64).tolist() for k in packing.FIELDS} for r in self._ready
            ],
        }

    def set_state(self, state: dict) -> None:
        """Continue from ``get_state()`` output; refuses a state of other settings."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{self.name}: data state version {state.get('version')} is unknown.")
        for key, value in self.config.items():
            saved = state["config"].get(key)
            if saved != value:
                raise ValueError(
                    f"{self.name}: the saved data state has {key}={saved!r} but this iterator has "
                    f"{key}={value!r}; resume with the settings of the checkpointed run."
                )
        self._epoch, self._position = state["epoch"], state["position"]
        self._emitted, self._finished = state["emitted"], state["finished"]
        self._order = self._shard_order(self._epoch)
        self._packer.set_state(state["packer"])
        dtypes = {k: (bool if k == "loss_mask" else np.int32) for k in packing.FIELDS}
        self._ready = [
            {k: np.asarray(r[k], dtypes[k]) for k in packing.FIELDS} for r in state["ready"]
        ]


def global_batch(
    local: dict[str, np.ndarray], mesh, rules: sharding.Rules = sharding.DEFAULT_RULES
) -> dict[str, jax.Array]:
    """Assemble the processes' local batches [B_local, L] into global arrays [B, L] on ``mesh``.

    The batch axis is sharded by the rules' ``batch`` entry (data + fsdp by default); each
    process contributes only its rows.

    Raises:
        ValueError: the global batch is not divisible by the mesh's batch axes.
    """
    out = {}
    for key, value in local.items():
        shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
        spec = sharding.batch_sharding(mesh, rules, shape=shape)
        out[key] = jax.make_array_from_process_local_data(spec, value, shape)
    return out


class ShardedTokenBatches(Iterator[dict[str, np.ndarray]]):
    """This process's share of ``num_shards`` data streams, concatenated along the batch.

    The corpus is read as ``num_shards`` independent streams (``TokenBatches`` with shard s of
    S); process p of P owns shards p S/P ... (p + 1) S/P - 1. The global batch is the streams'
    batches in shard order whatever P is, so a run on one process and a run on P processes
    see the same global batches (S fixed in the config, divisible by P).

    Args:
        num_shards: S (None: the process count).
        global_batch_size: rows per step over all shards; divisible by S.
        **kwargs: as for ``TokenBatches`` (documents, encode, seq_len, seed, ...).
    """

    def __init__(
        self,
        documents,
        encode,
        *,
        global_batch_size: int,
        num_shards: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        **kwargs,
    ):
        p = jax.process_index() if process_index is None else process_index
        n = jax.process_count() if process_count is None else process_count
        s = n if num_shards is None else num_shards
        if s % n:
            raise ValueError(
                f"data.num_shards={s} must be a multiple of the {n} processes (each process "
                "reads whole shards)."
            )
        if global_batch_size % s:
            raise ValueError(
                f"global_batch_size={global_batch_size} is not divisible by data.num_shards={s}."
            )
        per = s // n
        self.streams = [
            TokenBatches(
                documents,
                encode,
                global_batch_size=global_batch_size,
                process_index=shard,
                process_count=s,
                **kwargs,
            )
            for shard in range(p * per, (p + 1) * per)
        ]
        self.local_batch_size = global_batch_size // n

    @property
    def batches_emitted(self) -> int:
        """Batches yielded so far (the index of a batch in a teacher cache)."""
        return self.streams[0]._emitted

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(stream) for stream in self.streams]
        return {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}

    def get_state(self) -> dict:
        return {"streams": [stream.get_state() for stream in self.streams]}

    def set_state(self, state: dict) -> None:
        if len(state["streams"]) != len(self.streams):
            raise ValueError(
                f"The saved data state has {len(state['streams'])} streams for this process, "
                f"this run {len(self.streams)}: process count or data.num_shards changed."
            )
        for stream, saved in zip(self.streams, state["streams"]):
            stream.set_state(saved)
