"""Common-boundary chunks on real tokenizer pairs and generated text, against brute force.

Real tokenizers: SmolLM2 (byte-level BPE) and Gemma-3 (SentencePiece, byte fallback) from their
GGUFs, the byte tokenizer, and llama.cpp's vocab-only GGUFs (LLaMA SentencePiece with a dummy
prefix, Qwen2, GPT-2, Phi-3). The reference for the chunk boundaries is a brute-force scan over
every byte offset; the alignment under test uses sorted cumulative offsets.
"""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distill_jax as dj
from distill_jax.bridges import align, byteify
from distill_jax.data import load_tokenizer, sources

PIECES = [
    " ",
    "   ",
    "\n",
    "\n\n",
    "\t",
    "\r\n",
    "🚀",
    "😶‍🌫️",
    "👨‍👩‍👧",
    "日本語のテキスト",
    "中文",
    "한국어",
    "Ελληνικά",
    "naïve café",
    "def f(x):\n    return x**2  # c\n",
    "{'a': [1, 2]}",
    "12345",
    " the",
    "The",
    "<b>",
]
# Any character except U+2581, which SentencePiece vocabularies read as a space (documented in
# data.token_bytes.Tokenizer), surrogates, which are not text, and what SmolLM2's vocabulary cannot
# spell: it has no token for the bytes 0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xF1 and 0xF2 (the
# lead bytes of U+40000..U+BFFFF); see test_unspellable_character_is_a_clear_error.
SMOLLM2_UNSPELLABLE = "\x04\x06\x13\x14\x16\x1d"
CHARS = st.characters(
    codec="utf-8",
    exclude_characters="\u2581" + SMOLLM2_UNSPELLABLE,
    exclude_categories=("Cs",),
).filter(lambda c: not 0x40000 <= ord(c) < 0xC0000)
TEXTS = st.lists(st.one_of(st.sampled_from(PIECES), st.text(CHARS, max_size=12)), max_size=12).map(
    "".join
)


def _brute_force_boundaries(token_bytes: list[bytes]) -> set[int]:
    """Every byte offset k > 0 at which some token ends, by scanning tokens one by one."""
    out, k = set(), 0
    for data in token_bytes:
        k += len(data)
        out.add(k)
    out.discard(0)
    return out


def _check_chunks(t_bytes: list[bytes], s_bytes: list[bytes], chunks: np.ndarray) -> None:
    assert chunks.dtype == np.int32 and chunks.shape[1] == 4
    text = b"".join(t_bytes)
    assert text == b"".join(s_bytes)
    if not text:
        assert len(chunks) == 0
        return
    # The spans partition both sequences, in order.
    assert chunks[0, 0] == 0 and chunks[0, 2] == 0
    assert chunks[-1, 1] == len(t_bytes) and chunks[-1, 3] == len(s_bytes)
    np.testing.assert_array_equal(chunks[1:, 0], chunks[:-1, 1])
    np.testing.assert_array_equal(chunks[1:, 2], chunks[:-1, 3])
    ends, k = [], 0
    for t0, t1, s0, s1 in chunks:
        t_chunk, s_chunk = b"".join(t_bytes[t0:t1]), b"".join(s_bytes[s0:s1])
        assert t_chunk == s_chunk and t_chunk, (t0, t1, s0, s1)
        k += len(t_chunk)
        ends.append(k)
    # Chunk ends are exactly the common boundaries: the chunks are minimal.
    want = _brute_force_boundaries(t_bytes) & _brute_force_boundaries(s_bytes)
    assert ends == sorted(want)


PAIRS = [
    ("gemma3", "smollm2"),
    ("smollm2", "byte"),
    ("llama-spm", "qwen2"),
    ("phi-3", "gpt-2"),
    ("gemma3", "llama-spm"),
]


@pytest.mark.parametrize("teacher,student", PAIRS)
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=TEXTS)
def test_chunks_partition_both_sides_and_equal_the_brute_force_boundaries(
    tokenizers, teacher, student, text
):
    t_tok, s_tok = tokenizers[teacher], tokenizers[student]
    t_bytes = t_tok.text_bytes(t_tok.encode(text))
    s_bytes = s_tok.text_bytes(s_tok.encode(text))
    assert b"".join(t_bytes) == text.encode()
    chunks = dj.bridges.align_chunks(t_bytes, s_bytes)
    _check_chunks(t_bytes, s_bytes, chunks)
    # Swapping the sides swaps the spans.
    swapped = dj.bridges.align_chunks(s_bytes, t_bytes)
    np.testing.assert_array_equal(swapped, chunks[:, [2, 3, 0, 1]])


def test_real_pair_on_kjv_and_identical_tokenizers(tokenizers):
    with open(sources.kjv_path(), encoding="utf-8") as f:
        text = "\n".join(json.loads(next(f))["text"] for _ in range(40))
    g, s = tokenizers["gemma3"], tokenizers["smollm2"]
    g_bytes, s_bytes = g.text_bytes(g.encode(text)), s.text_bytes(s.encode(text))
    chunks = dj.bridges.align_chunks(g_bytes, s_bytes)
    _check_chunks(g_bytes, s_bytes, chunks)
    # Most KJV words are single tokens on both sides: chunks are mostly 1:1.
    one_to_one = np.mean((chunks[:, 1] - chunks[:, 0] == 1) & (chunks[:, 3] - chunks[:, 2] == 1))
    assert one_to_one > 0.7
    # The same tokenizer on both sides: one token per side per chunk.
    same = dj.bridges.align_chunks(s_bytes, s_bytes)
    np.testing.assert_array_equal(same[:, 0], np.arange(len(s_bytes)))
    np.testing.assert_array_equal(same, same[:, [2, 3, 0, 1]])


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(texts=st.lists(TEXTS, min_size=1, max_size=6), empties=st.booleans())
def test_align_batch_equals_align_chunks_per_example(tokenizers, texts, empties):
    g, s = tokenizers["gemma3"], tokenizers["smollm2"]
    t_batch = [g.text_bytes(g.encode(x)) for x in texts]
    s_batch = [s.text_bytes(s.encode(x)) for x in texts]
    if empties:  # tokens without bytes at the start and end of rows, and rows of only those
        t_batch = [[b"", *x] for x in t_batch]
        s_batch = [[*x, b"", b""] for x in s_batch]
    out = align.align_batch(t_batch, s_batch)
    for i, (a, b) in enumerate(zip(t_batch, s_batch)):
        want = align.align_chunks(a, b)
        rows = slice(out["chunk_offsets"][i], out["chunk_offsets"][i + 1])
        np.testing.assert_array_equal(out["chunks"][rows], want)
        for side, tokens in ((0, a), (1, b)):
            name = ("teacher", "student")[side]
            offsets = out[f"{name}_offsets"]
            got = out[f"{name}_chunk"][offsets[i] : offsets[i + 1]]
            np.testing.assert_array_equal(got, align.chunk_ids(want, len(tokens), side))


def test_align_batch_names_the_example_that_differs():
    with pytest.raises(ValueError, match="Example 1: .*differ from byte 1"):
        align.align_batch([[b"ab"], [b"cd"]], [[b"a", b"b"], [b"c", b"e"]])


def test_hand_case_with_empty_tokens():
    t = [b"", b"ab", b"c", b" d"]  # a special with no bytes joins the first chunk
    s = [b"a", b"bc", b" ", b"d", b""]
    np.testing.assert_array_equal(dj.bridges.align_chunks(t, s), [[0, 3, 0, 2], [3, 4, 2, 5]])


def test_word_chunks_merge_to_whitespace_starts(tokenizers):
    g, s = tokenizers["gemma3"], tokenizers["smollm2"]
    text = "Unbelievably, the naïve 日本語 code:\n\tx=1  y"
    g_bytes, s_bytes = g.text_bytes(g.encode(text)), s.text_bytes(s.encode(text))
    words = dj.bridges.word_chunks(dj.bridges.align_chunks(g_bytes, s_bytes), g_bytes)
    spelled = [b"".join(g_bytes[a:b]).decode() for a, b in words[:, :2]]
    assert "".join(spelled) == text
    # Every word starts with whitespace (except the first) and holds none after that.
    for k, w in enumerate(spelled):
        assert k == 0 or w[0].isspace()
        body = w.lstrip()
        assert not any(ch.isspace() for ch in body) or body == ""
    _check_merged(g_bytes, s_bytes, words)


def _check_merged(t_bytes, s_bytes, chunks):
    for t0, t1, s0, s1 in chunks:
        assert b"".join(t_bytes[t0:t1]) == b"".join(s_bytes[s0:s1])


def test_shared_special_roles_form_their_own_chunk(tokenizers):
    g, s = tokenizers["gemma3"], tokenizers["smollm2"]
    gv, sv = byteify.ByteView.of(g), byteify.ByteView.of(s)
    g_ids = [g.bos_id, g.special_token_id("<start_of_turn>"), *g.encode("user\nHi there")]
    g_ids += [g.special_token_id("<end_of_turn>")]
    s_ids = [s.special_token_id("<|im_start|>"), *s.encode("user\nHi there")]
    s_ids += [s.special_token_id("<|im_end|>")]
    t_bytes, t_valid, s_bytes, s_valid = byteify.byteify_pair(gv, g_ids, sv, s_ids)
    assert t_valid == [False] + [True] * (len(g_ids) - 1)  # Gemma's BOS has no counterpart
    assert all(s_valid)
    chunks = dj.bridges.align_chunks(t_bytes, s_bytes)
    _check_chunks(t_bytes, s_bytes, chunks)
    # <start_of_turn> / <|im_start|>: one chunk (with the unmatched BOS), and the end markers one.
    np.testing.assert_array_equal(chunks[0], [0, 2, 0, 1])
    np.testing.assert_array_equal(
        chunks[-1], [len(g_ids) - 1, len(g_ids), len(s_ids) - 1, len(s_ids)]
    )
    assert b"".join(t_bytes[2 : chunks[-1, 0]]) == b"user\nHi there"


def test_collator_chunk_ids_truncation_and_errors(tokenizers):
    g, s = tokenizers["gemma3"], tokenizers["smollm2"]
    collate = dj.bridges.ChunkCollator(g, s, teacher_len=12, student_len=10, teacher_bos=True)
    texts = ["In the beginning God created the heaven and the earth.", "Hi 🚀"]
    batch = collate(texts)
    assert batch["teacher_ids"].shape == (2, 12) and batch["student_chunk"].shape == (2, 10)
    for row, text in enumerate(texts):
        t_ids, s_ids, chunks, _, _ = collate.align(text)
        keep = chunks[(chunks[:, 1] <= 12) & (chunks[:, 3] <= 10)]
        assert batch["num_chunks"][row] == len(keep) > 0
        for side, ids, length in (("teacher", t_ids, 12), ("student", s_ids, 10)):
            got = batch[f"{side}_chunk"][row]
            n = min(len(ids), length)
            np.testing.assert_array_equal(batch[f"{side}_ids"][row, :n], ids[:n])
            # Chunk ids are non-decreasing over the kept tokens, -1 after them.
            valid = got[got >= 0]
            assert np.all(np.diff(valid) >= 0) and valid.max() == len(keep) - 1
        kept = b"".join(g.text_bytes(t_ids[: keep[-1, 1]]))
        assert batch["dropped_bytes"][row] == len(text.encode()) - len(kept)
    assert batch["teacher_chunk"][0, 0] == -1  # Gemma's BOS: no counterpart, masked
    assert batch["dropped_bytes"][1] == 0
    # A text with no common boundary inside the lengths is an error, not a silent drop.
    tiny = dj.bridges.ChunkCollator(g, s, teacher_len=1, student_len=1, teacher_bos=True)
    with pytest.raises(ValueError, match="no common token boundary within 1 teacher / 1 student"):
        tiny(["Unbelievable"])
    with pytest.raises(ValueError, match="coarsen='bytes'"):
        dj.bridges.ChunkCollator(g, s, teacher_len=8, student_len=8, coarsen="bytes")


def test_unspellable_character_is_a_clear_error(tokenizers):
    collate = dj.bridges.ChunkCollator(
        tokenizers["gemma3"], tokenizers["smollm2"], teacher_len=16, student_len=16
    )
    with pytest.raises(
        ValueError, match="SmolLM2.*" + re.escape("byte 2 (character '\\U00040000'")
    ):
        collate(["ab\U00040000cd"])
    with pytest.raises(ValueError, match="SmolLM2.*" + re.escape("byte 1 (character '\\x04'")):
        collate(["a\x04b"])


def test_different_texts_are_a_clear_error():
    with pytest.raises(ValueError, match="differ from byte 2 .teacher b'c' vs student b'x'"):
        dj.bridges.align_chunks([b"ab", b"c"], [b"a", b"bx"])


def test_normalising_tokenizer_is_refused_by_name(tmp_path):
    import sentencepiece as spm

    with open(sources.kjv_path(), encoding="utf-8") as f:
        verses = [json.loads(line)["text"] for line in f][:2000]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(verses),
        model_writer=proto,
        vocab_size=400,
        model_type="bpe",
        normalization_rule_name="nmt_nfkc",
        byte_fallback=True,
        minloglevel=2,
    )
    (tmp_path / "nfkc.model").write_bytes(proto.getvalue())
    tok = load_tokenizer(tmp_path / "nfkc.model")
    with pytest.raises(ValueError, match=r"nfkc.model.*changes the bytes of .*normaliser: "):
        byteify.check_byte_exact(tok)
    with pytest.raises(ValueError, match="byte-exact"):
        dj.bridges.ChunkCollator(tok, load_tokenizer("byte"), teacher_len=8, student_len=8)


def test_every_real_tokenizer_here_is_byte_exact(tokenizers):
    for tok in tokenizers.values():
        byteify.check_byte_exact(tok)
    roles = byteify.special_roles(tokenizers["gemma3"])
    assert roles[tokenizers["gemma3"].bos_id] == "bos"
    smol = tokenizers["smollm2"]
    assert byteify.special_roles(smol)[smol.special_token_id("<|im_start|>")] == "turn_start"
    assert align.chunk_ids(np.array([[0, 2, 0, 1]], np.int32), 3, 0).tolist() == [0, 0, -1]


def test_student_samples_are_aligned_to_the_teachers_retokenization(tokenizers):
    """On-policy cross-tokenizer rows: the student's own token sequence (not its tokenizer's
    split of the text) against the teacher's tokenization of the text those tokens spell; the
    prompt's chunks carry no loss and a trailing partial UTF-8 character is left out."""
    byte, smol = tokenizers["byte"], tokenizers["smollm2"]
    collator = align.ChunkCollator(smol, byte, teacher_len=40, student_len=80)
    prompt = byte.encode("In the beginning God")
    # The student's sample ends inside a character: the first byte of "é".
    sample = byte.encode(" created the heaven, café") + list("é".encode())[:1]
    out = collator.collate_student_ids([prompt + sample], [len(prompt)])
    text = "In the beginning God created the heaven, café"
    want = smol.encode(text)
    np.testing.assert_array_equal(out["teacher_ids"][0, : len(want)], want)
    t_chunk, s_chunk = out["teacher_chunk"][0], out["student_chunk"][0]
    t_bytes = smol.text_bytes(out["teacher_ids"][0, : len(want)].tolist())
    s_ids = prompt + sample
    chunks = sorted(set(s_chunk[s_chunk >= 0].tolist()))
    assert chunks == list(range(out["num_chunks"][0])) and len(chunks) > 0
    for c in chunks:
        tb = b"".join(b for b, k in zip(t_bytes, t_chunk) if k == c)
        sb = b"".join(byte.token_bytes(i) for i, k in zip(s_ids, s_chunk) if k == c)
        assert tb == sb and tb
        assert np.max(np.nonzero(s_chunk == c)[0]) >= len(prompt)  # a completion token in it
    assert s_chunk[len(s_ids) - 1] == -1  # the partial character
    assert np.all(s_chunk[: len(prompt) - 3] == -1)  # prompt-only chunks: no loss
    np.testing.assert_array_equal(out["student_ids"][0, : len(s_ids)], s_ids)


def test_a_sample_with_a_character_the_teacher_cannot_spell_stops_there(tokenizers):
    byte, smol = tokenizers["byte"], tokenizers["smollm2"]
    collator = align.ChunkCollator(smol, byte, teacher_len=40, student_len=80)
    prompt = byte.encode("And God said")
    sample = byte.encode(", Let there\x13 be light")  # SmolLM2 has no token for 0x13
    out = collator.collate_student_ids([prompt + sample], [len(prompt)])
    cut = len(prompt) + len(byte.encode(", Let there"))
    want = smol.encode("And God said, Let there")
    np.testing.assert_array_equal(out["teacher_ids"][0, : len(want)], want)
    assert out["teacher_segment"][0].sum() == len(want)
    s_chunk = out["student_chunk"][0]
    assert np.all(s_chunk[cut:] == -1) and np.any(s_chunk[len(prompt) : cut] >= 0)
