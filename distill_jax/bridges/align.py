r"""Host-side alignment of two tokenizations of one text: common-boundary chunks (NumPy).

A chunk is a minimal span of text whose start and end are token boundaries on both sides
(METHODS.md 6.2). With end offsets e_a(i) = sum_{k<=i} |a_k| and e_b(j) likewise, the chunk ends
are the common offsets {e_a} ∩ {e_b}; token i belongs to the first chunk whose end is >= e_a(i),
so a token with no bytes joins the chunk it touches (the one before it, or the first). This is
the two-pointer walk of tokenkit's ``get_alignment_indices`` and TRL GOLD's
``_align_by_byte_offsets``, computed with sorted offsets instead of a Python loop, O(n + m).

Per token the collator emits an int32 chunk id (-1: in no chunk) for each side. Device losses
sum per chunk with ``jax.ops.segment_sum``; no dense token x chunk matrix (tokenkit's [B, S, C]
booleans) is ever built.

Coarsenings: ``word_chunks`` merges minimal chunks into whole words (a chunk starting with
whitespace or a special placeholder starts a word); ``alm.merge_chunks_by_boundary_prob``
merges on device by the teacher's probability of a word boundary (METHODS.md 6.3).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from distill_jax.bridges import byteify

_WORD_START = frozenset(b" \t\n\r\xff")


def _ends(token_bytes: Sequence[bytes]) -> np.ndarray:
    return np.cumsum(np.fromiter(map(len, token_bytes), np.int64, len(token_bytes)))


def _check_same_text(teacher_token_bytes, student_token_bytes) -> None:
    a, b = b"".join(teacher_token_bytes), b"".join(student_token_bytes)
    if a != b:
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise ValueError(
            f"The two tokenizations spell different texts: they differ from byte {k} "
            f"(teacher {a[k : k + 16]!r} vs student {b[k : k + 16]!r}; lengths {len(a)} and "
            f"{len(b)}). Tokenize the same text on both sides with byte-exact tokenizers "
            "(bridges.byteify.check_byte_exact)."
        )


def _common_ends(ea: np.ndarray, eb: np.ndarray) -> np.ndarray:
    """Offsets > 0 in both non-decreasing arrays, ascending, once each (merge by searchsorted)."""
    if len(ea) == 0 or len(eb) == 0:
        return np.zeros(0, np.int64)
    hit = eb[np.minimum(np.searchsorted(eb, ea), len(eb) - 1)] == ea
    common = ea[hit & (ea > 0)]
    if len(common) > 1:  # tokens without bytes repeat an offset
        common = common[np.r_[True, common[1:] != common[:-1]]]
    return common


def align_chunks(
    teacher_token_bytes: Sequence[bytes], student_token_bytes: Sequence[bytes]
) -> np.ndarray:
    """Minimal common-boundary chunks of two tokenizations of the same bytes.

    Args:
        teacher_token_bytes: [U] bytes per teacher token (``b""`` for tokens with none).
        student_token_bytes: [T] bytes per student token; joined, the same bytes as the teacher's.

    Returns:
        [C, 4] int32 rows (t_start, t_end, s_start, s_end): half-open token spans of each chunk.
        The spans partition both sequences, in order, and the bytes of the two spans of a row are
        equal. Empty input gives [0, 4].

    Raises:
        ValueError: the joined bytes differ (names the first differing offset).
    """
    _check_same_text(teacher_token_bytes, student_token_bytes)
    ea, eb = _ends(teacher_token_bytes), _ends(student_token_bytes)
    ends = _common_ends(ea, eb)
    if len(ends) == 0:
        return np.zeros((0, 4), np.int32)
    # Token k of a side is in chunk searchsorted(ends, e(k)); chunk c spans the tokens whose
    # chunk is c: [searchsorted(chunk, c, left), searchsorted(chunk, c, right)).
    c = np.arange(len(ends))
    out = np.empty((len(ends), 4), np.int32)
    for col, e in ((0, ea), (2, eb)):
        chunk = np.searchsorted(ends, e, side="left")
        out[:, col] = np.searchsorted(chunk, c, side="left")
        out[:, col + 1] = np.searchsorted(chunk, c, side="right")
    return out


def align_batch(
    teacher_batch: Sequence[Sequence[bytes]], student_batch: Sequence[Sequence[bytes]]
) -> dict[str, np.ndarray]:
    """``align_chunks`` + ``chunk_ids`` for a whole batch in a fixed number of NumPy calls.

    The examples are laid end to end under keys ``example * M + local offset`` (M larger than any
    example's byte count), so one merge of the two sorted key arrays finds every example's chunk
    ends and one ``searchsorted`` gives every token its chunk: the cost is O(total tokens) with no
    per-example Python work beyond collecting token lengths.

    Args:
        teacher_batch: B lists of teacher token bytes; student_batch: B lists of student token
            bytes, example i spelling the same bytes on both sides.

    Returns:
        ``chunks`` [sum C_i, 4] int32 (example-local token spans, as ``align_chunks``),
        ``chunk_offsets`` [B + 1] (example i's chunks are rows offsets[i]:offsets[i + 1]),
        ``teacher_chunk`` [sum U_i] and ``student_chunk`` [sum T_i] int32 (example-local chunk
        id per token, -1 in an example without bytes), ``teacher_offsets``/``student_offsets``
        [B + 1] (example i's tokens).
    """
    if len(teacher_batch) != len(student_batch):
        raise ValueError(f"{len(teacher_batch)} teacher vs {len(student_batch)} student examples.")
    flat = lambda batch: [x for tokens in batch for x in tokens]  # noqa: E731
    ta, sa = flat(teacher_batch), flat(student_batch)
    sides = []
    for batch, tokens in ((teacher_batch, ta), (student_batch, sa)):
        counts = np.fromiter(map(len, batch), np.int64, len(batch))
        offsets = np.r_[0, np.cumsum(counts)]
        ex = np.repeat(np.arange(len(batch)), counts)
        ends = np.cumsum(np.fromiter(map(len, tokens), np.int64, len(tokens)))
        before = np.r_[0, ends][offsets[:-1]]  # bytes before each example
        totals = np.r_[0, ends][offsets[1:]] - before
        sides.append((offsets, ex, ends - before[ex], totals))
    (t_off, t_ex, t_local, t_tot), (s_off, s_ex, s_local, s_tot) = sides
    if not np.array_equal(t_tot, s_tot) or b"".join(ta) != b"".join(sa):
        for i, (x, y) in enumerate(zip(teacher_batch, student_batch)):
            try:
                _check_same_text(x, y)
            except ValueError as e:
                raise ValueError(f"Example {i}: {e}") from None
    m = int(t_tot.max(initial=0)) + 1
    t_key, s_key = t_ex * m + t_local, s_ex * m + s_local
    ends = _common_ends_keys(t_key, s_key, m)
    b = len(teacher_batch)
    ends_ex = ends // m
    chunk_offsets = np.searchsorted(ends_ex, np.arange(b + 1), side="left")
    out = {"chunk_offsets": chunk_offsets, "teacher_offsets": t_off, "student_offsets": s_off}
    g = np.arange(len(ends))
    chunks = np.empty((len(ends), 4), np.int32)
    has = chunk_offsets[1:] > chunk_offsets[:-1]  # an example without bytes has no chunk
    sides = ((0, "teacher", t_key, t_ex, t_off), (2, "student", s_key, s_ex, s_off))
    for col, side, key, ex, off in sides:
        chunk = np.searchsorted(ends, key, side="left")  # global chunk id, non-decreasing
        # Doubled ids; tokens of a chunkless example sit between its neighbours' chunks.
        twice = np.where(has[ex], 2 * chunk, 2 * chunk - 1)
        chunks[:, col] = np.searchsorted(twice, 2 * g, side="left") - off[ends_ex]
        chunks[:, col + 1] = np.searchsorted(twice, 2 * g, side="right") - off[ends_ex]
        out[f"{side}_chunk"] = np.where(has[ex], chunk - chunk_offsets[ex], -1).astype(np.int32)
    out["chunks"] = chunks
    return out


def _common_ends_keys(ta: np.ndarray, sa: np.ndarray, m: int) -> np.ndarray:
    """Keys present on both sides whose local offset is > 0, ascending, once each."""
    common = _common_ends(ta, sa)
    return common[common % m != 0]


def word_chunks(chunks: np.ndarray, teacher_token_bytes: Sequence[bytes]) -> np.ndarray:
    """Merge minimal chunks into words: a chunk whose first byte is whitespace or a special
    placeholder starts a new one (the ``space`` coarsening of tokenkit's collator).

    Both sides' spans of a chunk hold the same bytes, so the teacher's bytes decide for both.

    Args:
        chunks: [C, 4] from ``align_chunks``.
        teacher_token_bytes: the teacher bytes ``chunks`` was computed from.

    Returns:
        [C', 4] int32, C' <= C, each row the union of consecutive rows of ``chunks``.
    """
    if len(chunks) == 0:
        return chunks
    first_byte = [b"".join(teacher_token_bytes[a:b])[:1] for a, b in chunks[:, :2]]
    starts = np.array([k == 0 or (fb and fb[0] in _WORD_START) for k, fb in enumerate(first_byte)])
    first = np.flatnonzero(starts)
    last = np.r_[first[1:] - 1, len(chunks) - 1]
    return np.stack(
        [chunks[first, 0], chunks[last, 1], chunks[first, 2], chunks[last, 3]], axis=1
    ).astype(np.int32)


def chunk_ids(chunks: np.ndarray, length: int, side: int) -> np.ndarray:
    """[length] int32 chunk id of every token of one side (0 teacher, 1 student), -1 outside.

    Vectorised: chunk c covers tokens [start_c, end_c); ``np.repeat`` lays the ids out.
    """
    out = np.full(length, -1, np.int32)
    start, end = chunks[:, 2 * side], chunks[:, 2 * side + 1]
    sizes = end - start
    if sizes.sum() == 0:
        return out
    first = np.repeat(start - np.cumsum(sizes) + sizes, sizes)  # start_c - tokens before c
    out[first + np.arange(sizes.sum())] = np.repeat(np.arange(len(chunks), dtype=np.int32), sizes)
    return out


class ChunkCollator:
    """Texts -> token ids of both tokenizers and per-token chunk ids, fixed shapes.

    Each text is tokenized by both sides (``add_bos`` per side), byteified
    (``byteify.byteify_pair``), aligned, optionally coarsened to words, and cut to the sequence
    lengths: a chunk is kept only when its spans fit on both sides. Tokens outside kept chunks,
    and special tokens without a counterpart, get chunk id -1. Rows are padded with
    ``pad_id`` (segment id 0).

    Args:
        teacher, student: the two tokenizers (checked byte-exact here, once).
        teacher_len, student_len: U and T, the padded lengths of the two sides.
        coarsen: "none" (minimal chunks) or "words".
        teacher_bos, student_bos: whether each side starts with its BOS token.
    """

    def __init__(
        self,
        teacher,
        student,
        *,
        teacher_len: int,
        student_len: int,
        coarsen: str = "none",
        teacher_bos: bool = False,
        student_bos: bool = False,
    ):
        if coarsen not in ("none", "words"):
            raise ValueError(f"coarsen={coarsen!r}; use 'none' (minimal chunks) or 'words'.")
        self.teacher = byteify.ByteView.of(teacher)
        self.student = byteify.ByteView.of(student)
        self.teacher_len, self.student_len = teacher_len, student_len
        self.coarsen = coarsen
        self.teacher_bos, self.student_bos = teacher_bos, student_bos

    def align(self, text: str) -> tuple[list[int], list[int], np.ndarray, list[bool], list[bool]]:
        """(teacher ids, student ids, chunks [C, 4], teacher valid, student valid), untruncated."""
        t_ids = self.teacher.tokenizer.encode(text, add_bos=self.teacher_bos)
        s_ids = self.student.tokenizer.encode(text, add_bos=self.student_bos)
        t_bytes, t_valid, s_bytes, s_valid = byteify.byteify_pair(
            self.teacher, t_ids, self.student, s_ids
        )
        for view, ids in ((self.teacher, t_ids), (self.student, s_ids)):
            byteify.check_spelt(view.tokenizer, ids, text)
        chunks = align_chunks(t_bytes, s_bytes)
        if self.coarsen == "words":
            chunks = word_chunks(chunks, t_bytes)
        return t_ids, s_ids, chunks, t_valid, s_valid

    def align_student_ids(self, student_ids: Sequence[int]):
        """Like ``align`` for a given student token sequence (e.g. the student's own samples,
        which need not be how the student's tokenizer would split their text): the teacher
        tokenizes the text those tokens spell. The text ends before the first token whose bytes
        are not valid UTF-8 (a sample can stop inside a character) or spell a character the
        teacher's vocabulary cannot (SmolLM2 has no token for some control bytes); later
        tokens stay in the row without chunks (no loss).

        Returns:
            (teacher ids, the student ids aligned, chunks [C, 4], teacher valid, student valid,
            the text).
        """
        tok, teacher = self.student.tokenizer, self.teacher.tokenizer
        ids = list(student_ids)
        while True:
            while ids:  # the longest prefix of whole characters
                try:
                    text = b"".join(tok.text_bytes(ids)).decode("utf-8")
                    break
                except UnicodeDecodeError:
                    ids.pop()
            else:
                text = ""
            t_ids = teacher.encode(text, add_bos=self.teacher_bos)
            spelt = byteify.spelt_prefix(teacher, t_ids, text)
            if spelt == len(text.encode()):
                break
            # Keep the student tokens that lie wholly before the first unspellable byte.
            lengths = np.cumsum([len(b) for b in tok.text_bytes(ids)])
            ids = ids[: int(np.searchsorted(lengths, spelt, side="right"))]
        t_bytes, t_valid, s_bytes, s_valid = byteify.byteify_pair(
            self.teacher, t_ids, self.student, ids
        )
        chunks = align_chunks(t_bytes, s_bytes)
        if self.coarsen == "words":
            chunks = word_chunks(chunks, t_bytes)
        return t_ids, ids, chunks, t_valid, s_valid, text

    def collate_student_ids(
        self, rows: Sequence[Sequence[int]], loss_from: Sequence[int]
    ) -> dict[str, np.ndarray]:
        """``__call__``'s batch for given student token rows (prompt + completion), where the
        chunks that lie wholly inside the first ``loss_from[i]`` student tokens of row i (the
        prompt) get chunk id -1 on both sides: on-policy cross-tokenizer distillation scores the
        completion only."""
        b, u, t = len(rows), self.teacher_len, self.student_len
        out = self._empty(b)
        for row, ids in enumerate(rows):
            t_ids, s_ids, chunks, t_valid, s_valid, text = self.align_student_ids(ids)
            keep = chunks[(chunks[:, 1] <= u) & (chunks[:, 3] <= t)]
            keep = keep[keep[:, 3] > loss_from[row]]  # chunks with completion tokens
            # The whole row, incl. a tail past the spelt text (no bytes: never in a chunk).
            tail = [False] * (len(ids) - len(s_ids))
            self._fill(out, row, t_ids, list(ids), keep, t_valid, list(s_valid) + tail, text)
        return out

    def _empty(self, b: int) -> dict[str, np.ndarray]:
        u, t = self.teacher_len, self.student_len
        return {
            "teacher_ids": np.full((b, u), _pad(self.teacher.tokenizer), np.int32),
            "student_ids": np.full((b, t), _pad(self.student.tokenizer), np.int32),
            "teacher_chunk": np.full((b, u), -1, np.int32),
            "student_chunk": np.full((b, t), -1, np.int32),
            "teacher_segment": np.zeros((b, u), np.int32),
            "student_segment": np.zeros((b, t), np.int32),
            "num_chunks": np.zeros(b, np.int32),
            "dropped_bytes": np.zeros(b, np.int32),
        }

    def _fill(self, out, row, t_ids, s_ids, keep, t_valid, s_valid, text) -> None:
        """Write one row's ids, segments, the chunk ids of the ``keep`` chunks and the bytes of
        ``text`` past the last kept chunk."""
        u, t = self.teacher_len, self.student_len
        t_n, s_n = min(len(t_ids), u), min(len(s_ids), t)
        out["teacher_ids"][row, :t_n] = t_ids[:t_n]
        out["student_ids"][row, :s_n] = s_ids[:s_n]
        out["teacher_segment"][row, :t_n] = 1
        out["student_segment"][row, :s_n] = 1
        if len(keep) == 0:
            return
        for side, valid, n in (("teacher", t_valid, t_n), ("student", s_valid, s_n)):
            ids = chunk_ids(keep, n, 0 if side == "teacher" else 1)
            ids[~np.asarray(valid[:n], bool)] = -1
            out[f"{side}_chunk"][row, :n] = ids
        out["num_chunks"][row] = len(keep)
        kept = sum(len(x) for x in self.teacher.tokenizer.text_bytes(t_ids[: keep[-1, 1]]))
        out["dropped_bytes"][row] = len(text.encode()) - kept

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """A batch: ``teacher_ids`` [B, U], ``student_ids`` [B, T], ``teacher_chunk`` [B, U],
        ``student_chunk`` [B, T] (int32, -1 outside chunks), ``teacher_segment``/
        ``student_segment`` (1 on tokens, 0 on padding), ``num_chunks`` [B] and
        ``dropped_bytes`` [B] (text bytes past the last chunk that fits).

        Raises:
            ValueError: a text has no common boundary within the lengths (no chunk would fit).
        """
        b, u, t = len(texts), self.teacher_len, self.student_len
        out = self._empty(b)
        for row, text in enumerate(texts):
            if not text:  # an empty row (the end of an epoch): padding only, no chunks
                continue
            t_ids, s_ids, chunks, t_valid, s_valid = self.align(text)
            keep = chunks[(chunks[:, 1] <= u) & (chunks[:, 3] <= t)]
            if len(keep) == 0:
                raise ValueError(
                    f"Text {row} ({text[:40]!r}...) has no common token boundary within "
                    f"{u} teacher / {t} student tokens; raise teacher_len/student_len or "
                    "split the text."
                )
            self._fill(out, row, t_ids, s_ids, keep, t_valid, s_valid, text)
        return out


def _pad(tok) -> int:
    return tok.pad_id if tok.pad_id is not None else 0
