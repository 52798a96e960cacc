r"""Packing tokenized documents into fixed-length rows with segment ids and positions.

A document of tokens t_0 .. t_{n-1} becomes n - 1 next-token pairs (input t_i, target t_{i+1},
loss mask m_{i+1}, position i). Pairs of several documents share a row of ``seq_len`` slots;
each document is one segment (ids 1, 2, ... within the row, 0 = padding) whose positions start
at 0, which is what ``Transformer.forward(positions=..., segment_ids=...)`` needs to keep the
documents apart. Every row has the same fields and shapes:

    input_ids [L] int32, targets [L] int32, segment_ids [L] int32, positions [L] int32,
    loss_mask [L] bool (False on padding, on the prompt of chat examples, ...)

Placement is first-fit over a window of ``open_rows`` rows, in document order, so the result
depends only on the input order (deterministic, resumable). A document longer than a row is an
error unless ``long_documents`` says what to do: ``"split"`` into row-sized windows (each its own
segment, positions restarting) or ``"truncate"`` to the first ``seq_len`` pairs. Nothing is
dropped or cut silently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

FIELDS = ("input_ids", "targets", "segment_ids", "positions", "loss_mask")
LONG_DOCUMENTS = ("error", "split", "truncate")


def document_pairs(tokens, loss_mask=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs [n-1], targets [n-1], mask [n-1]) of one document's tokens [n].

    Args:
        tokens: [n] int token ids (BOS/EOS included as the caller wants them).
        loss_mask: [n] bool or None; entry i says whether token i is trained on as a target
            (None: all tokens). The mask of the first token is unused: nothing predicts it.
    """
    tokens = np.asarray(tokens, np.int32)
    mask = np.ones(len(tokens), bool) if loss_mask is None else np.asarray(loss_mask, bool)
    if mask.shape != tokens.shape:
        raise ValueError(f"loss_mask {mask.shape} must have the tokens' shape {tokens.shape}.")
    return tokens[:-1], tokens[1:], mask[1:]


@dataclasses.dataclass(eq=False)
class _Row:
    """A row being filled: its segments' pairs, concatenated at emission."""

    pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    used: int = 0


def _emit(row: _Row, seq_len: int) -> dict[str, np.ndarray]:
    out = {k: np.zeros(seq_len, np.int32) for k in FIELDS[:-1]}
    out["loss_mask"] = np.zeros(seq_len, bool)
    start = 0
    for seg, (inputs, targets, mask) in enumerate(row.pieces, start=1):
        end = start + len(inputs)
        out["input_ids"][start:end] = inputs
        out["targets"][start:end] = targets
        out["loss_mask"][start:end] = mask
        out["segment_ids"][start:end] = seg
        out["positions"][start:end] = np.arange(len(inputs), dtype=np.int32)
        start = end
    return out


class Packer:
    """First-fit packing over a window of open rows; its state is plain data (``get_state``).

    Args:
        seq_len: L, slots per row.
        open_rows: rows kept open for first-fit; when a document fits none and the window is
            full, the oldest open row is emitted.
        long_documents: "error", "split" or "truncate" (module docstring).
    """

    def __init__(self, seq_len: int, *, open_rows: int = 8, long_documents: str = "error"):
        if seq_len < 1 or open_rows < 1:
            raise ValueError(f"seq_len={seq_len} and open_rows={open_rows} must be >= 1.")
        if long_documents not in LONG_DOCUMENTS:
            raise ValueError(f"long_documents={long_documents!r}: choose one of {LONG_DOCUMENTS}.")
        self.seq_len, self.open_rows, self.long_documents = seq_len, open_rows, long_documents
        self._rows: list[_Row] = []

    def _pieces(self, pairs, name: str):
        inputs, targets, mask = pairs
        n, cap = len(inputs), self.seq_len
        if n <= cap:
            return [pairs] if n else []
        if self.long_documents == "error":
            raise ValueError(
                f"Document {name} has {n + 1} tokens ({n} next-token pairs) and does not fit a "
                f"row of seq_len={cap}; set long_documents='split' (row-sized windows) or "
                "'truncate', or raise seq_len."
            )
        if self.long_documents == "truncate":
            return [(inputs[:cap], targets[:cap], mask[:cap])]
        return [
            (inputs[i : i + cap], targets[i : i + cap], mask[i : i + cap]) for i in range(0, n, cap)
        ]

    def add(self, pairs, name: str = "") -> list[dict[str, np.ndarray]]:
        """Place one document's pairs (``document_pairs``); returns the rows this completes."""
        done = []
        for piece in self._pieces(pairs, name or "?"):
            n = len(piece[0])
            row = next((r for r in self._rows if r.used + n <= self.seq_len), None)
            if row is None:
                if len(self._rows) == self.open_rows:
                    done.append(_emit(self._rows.pop(0), self.seq_len))
                row = _Row([])
                self._rows.append(row)
            row.pieces.append(piece)
            row.used += n
            if row.used == self.seq_len:
                self._rows.remove(row)
                done.append(_emit(row, self.seq_len))
        return done

    def flush(self) -> list[dict[str, np.ndarray]]:
        """Emit every open row (padded), oldest first."""
        rows, self._rows = self._rows, []
        return [_emit(r, self.seq_len) for r in rows]

    def get_state(self) -> dict:
        """The open rows as JSON-ready lists (restored by ``set_state``)."""
        return {
            "rows": [
                [[p[0].tolist(), p[1].tolist(), p[2].astype(int).tolist()] for p in r.pieces]
                for r in self._rows
            ]
        }

    def set_state(self, state: dict) -> None:
        self._rows = []
        for pieces in state["rows"]:
            arrays = [
                (np.asarray(a, np.int32), np.asarray(b, np.int32), np.asarray(m, bool))
                for a, b, m in pieces
            ]
            self._rows.append(_Row(arrays, sum(len(p[0]) for p in arrays)))


def pack(
    documents: Iterable, seq_len: int, *, open_rows: int = 8, long_documents: str = "error"
) -> list[dict[str, np.ndarray]]:
    """Pack token lists (or (tokens, loss_mask) pairs) into rows; the last rows padded.

    Returns:
        A list of rows, each a dict of ``FIELDS`` arrays of shape [seq_len].
    """
    packer = Packer(seq_len, open_rows=open_rows, long_documents=long_documents)
    rows = []
    for i, doc in enumerate(documents):
        tokens, mask = doc if isinstance(doc, tuple) else (doc, None)
        rows += packer.add(document_pairs(tokens, mask), name=f"#{i}")
    return rows + packer.flush()


def stack_rows(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """[rows] -> {field: [B, L]}."""
    return {k: np.stack([r[k] for r in rows]) for k in FIELDS}


def empty_rows(n: int, seq_len: int) -> list[dict[str, np.ndarray]]:
    """n padding rows (segment 0, no loss): fill a last batch without dropping or faking data."""
    return [_emit(_Row([]), seq_len) for _ in range(n)]
