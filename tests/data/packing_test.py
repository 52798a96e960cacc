"""Packing: hand-laid rows, every next-token pair exactly once, long documents, state."""

from __future__ import annotations

import numpy as np
import pytest

from distill_jax.data import packing


def _segments(rows):
    """Reassemble (inputs, targets, mask) per segment from packed rows, independently."""
    out = []
    for r in rows:
        for seg in range(1, r["segment_ids"].max() + 1):
            where = r["segment_ids"] == seg
            assert np.array_equal(r["positions"][where], np.arange(where.sum()))
            assert np.all(np.diff(np.flatnonzero(where)) == 1)  # contiguous
            out.append((r["input_ids"][where], r["targets"][where], r["loss_mask"][where]))
        pad = r["segment_ids"] == 0
        assert not r["loss_mask"][pad].any() and np.all(r["positions"][pad] == 0)
    return out


def test_hand_laid_rows():
    docs = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12], [13, 14, 15]]  # 3, 1, 5, 2 pairs
    rows = packing.pack(docs, seq_len=6, open_rows=2)
    # first fit: row A = doc0 (3) + doc1 (1); doc2 (5) opens row B; doc3 (2) fits row A -> full.
    assert len(rows) == 2
    a, b = rows
    np.testing.assert_array_equal(a["input_ids"], [1, 2, 3, 5, 13, 14])
    np.testing.assert_array_equal(a["targets"], [2, 3, 4, 6, 14, 15])
    np.testing.assert_array_equal(a["segment_ids"], [1, 1, 1, 2, 3, 3])
    np.testing.assert_array_equal(a["positions"], [0, 1, 2, 0, 0, 1])
    np.testing.assert_array_equal(b["input_ids"], [7, 8, 9, 10, 11, 0])
    np.testing.assert_array_equal(b["segment_ids"], [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(b["loss_mask"], [1, 1, 1, 1, 1, 0])


@pytest.mark.parametrize("open_rows", [1, 3, 8])
def test_every_pair_exactly_once_with_masks(open_rows):
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(60):
        n = int(rng.integers(2, 30))
        docs.append((rng.integers(0, 1000, n).tolist(), rng.random(n) > 0.3))
    rows = packing.pack(docs, seq_len=32, open_rows=open_rows)
    assert all(r[k].shape == (32,) for r in rows for k in packing.FIELDS)
    got = sorted(tuple(map(tuple, s)) for s in _segments(rows))
    want = sorted((tuple(t[:-1]), tuple(t[1:]), tuple(np.asarray(m)[1:])) for t, m in docs)
    assert got == want


def test_long_documents_error_split_truncate():
    docs = [[1, 2, 3], list(range(100, 112))]  # the second has 11 pairs > seq_len 4
    with pytest.raises(ValueError, match=r"#1 has 12 tokens.*long_documents='split'"):
        packing.pack(docs, seq_len=4)
    split = _segments(packing.pack(docs, seq_len=4, long_documents="split"))
    pieces = [s[0].tolist() for s in split if s[0][0] >= 100]
    assert sorted(pieces) == [[100, 101, 102, 103], [104, 105, 106, 107], [108, 109, 110]]
    truncated = _segments(packing.pack(docs, seq_len=4, long_documents="truncate"))
    assert [s[0].tolist() for s in truncated if s[0][0] >= 100] == [[100, 101, 102, 103]]
    with pytest.raises(ValueError, match="long_documents='cut'"):
        packing.Packer(4, long_documents="cut")


def test_packer_state_round_trip():
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 50, int(rng.integers(2, 9))).tolist() for _ in range(30)]
    straight = packing.Packer(10, open_rows=3)
    rows_a = []
    for d in docs:
        rows_a += straight.add(packing.document_pairs(d))
    rows_a += straight.flush()
    first = packing.Packer(10, open_rows=3)
    rows_b = []
    for d in docs[:13]:
        rows_b += first.add(packing.document_pairs(d))
    resumed = packing.Packer(10, open_rows=3)
    resumed.set_state(first.get_state())
    for d in docs[13:]:
        rows_b += resumed.add(packing.document_pairs(d))
    rows_b += resumed.flush()
    assert len(rows_a) == len(rows_b)
    for a, b in zip(rows_a, rows_b):
        for k in packing.FIELDS:
            np.testing.assert_array_equal(a[k], b[k])
