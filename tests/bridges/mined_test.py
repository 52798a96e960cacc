"""MinED maps against a plain dynamic-programming Levenshtein distance and brute-force search.

Real vocabularies: SmolLM2 tokens without an exact Gemma-3 match searched in (subsets of) the
Gemma-3 vocabulary, GPT-2 against the byte tokenizer (where the nearest byte token has a closed
form), and identical vocabularies (identity map, mined forward KL = forward KL). The full
SmolLM2 -> Gemma-3 map takes seconds, so it is not built here.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from distill_jax.bridges import mined, vocab_map
from distill_jax.losses import forward_kl


@pytest.fixture(scope="module")
def smollm2_in_gemma3(tokenizers) -> tuple[list[bytes], list[bytes]]:
    """(queries: 40 random SmolLM2 tokens without an exact Gemma-3 match, the Gemma-3 bytes of
    its non-special ids)."""
    smollm2, gemma3 = tokenizers["smollm2"], tokenizers["gemma3"]
    exact = vocab_map.exact_match_map(smollm2, gemma3)
    unmatched = [v for v in np.flatnonzero(exact < 0) if v not in smollm2.special_ids]
    picked = np.random.default_rng(0).choice(unmatched, 40, replace=False)
    cands = [gemma3.token_bytes(w) for w in range(gemma3.vocab_size) if w not in gemma3.special_ids]
    return [smollm2.token_bytes(v) for v in picked], cands


def _levenshtein(a: bytes, b: bytes) -> int:
    """Textbook Wagner-Fischer, one row at a time."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def _brute_nearest(query: bytes, cands: list[bytes]) -> tuple[int, int]:
    dist = [_levenshtein(query, c) for c in cands]
    best = min(dist)
    return dist.index(best), best


def test_edit_distances_match_plain_dp():
    rng = np.random.default_rng(1)
    alphabet = np.frombuffer(b"ab c\xe2\x80", np.uint8)
    for n in (0, 1, 3, 7):
        query = bytes(rng.choice(alphabet, n))
        for m in (0, 1, 4, 9):
            rows = rng.choice(alphabet, (20, m)).astype(np.uint8)
            got = mined.edit_distances(query, rows)
            want = [_levenshtein(query, bytes(r)) for r in rows]
            np.testing.assert_array_equal(got, want)
    assert mined.edit_distances(b"kitten", np.frombuffer(b"sitting", np.uint8)[None])[0] == 3


def test_search_on_small_sets_with_empty_strings():
    cands = [b"", b"abc", b"b", b"xz", b"ab", b"ba"]
    queries = [b"ab", b"", b"xyz", b"a", b"bb", b"zzzz"]
    rng = np.random.default_rng(6)
    queries += [bytes(rng.choice(np.frombuffer(b"abxyz", np.uint8), n)) for n in range(8)] * 3
    want = [_brute_nearest(q, cands) for q in queries]
    pos, dist = mined.nearest_by_edit_distance(queries, cands, max_candidates=None)
    assert list(zip(pos, dist)) == want
    pos, dist = mined.nearest_by_edit_distance(queries, cands, max_candidates=1)
    assert (dist >= [d for _, d in want]).all()
    assert [cands[p] for p in pos[:3]] == [b"ab", b"", b"xz"]
    with pytest.raises(ValueError, match="max_candidates=0"):
        mined.nearest_by_edit_distance(queries, cands, max_candidates=0)


def test_exact_search_matches_brute_force_on_a_real_subset(smollm2_in_gemma3):
    queries, cands = smollm2_in_gemma3
    sub = [cands[i] for i in np.random.default_rng(2).choice(len(cands), 1500, replace=False)]
    sub += [q[:-1] for q in queries[:10]] + [q + b"s" for q in queries[10:20]]  # near ones
    pos, dist = mined.nearest_by_edit_distance(queries, sub, max_candidates=None)
    for q, p, d in zip(queries, pos, dist):
        assert (p, d) == _brute_nearest(q, sub), q


def test_heuristic_search_is_near_exact_on_full_gemma3(smollm2_in_gemma3):
    queries, cands = smollm2_in_gemma3
    exact_pos, exact = mined.nearest_by_edit_distance(queries, cands, max_candidates=None)
    pos, dist = mined.nearest_by_edit_distance(queries, cands, max_candidates=64)
    for q, p, d in zip(queries, pos, dist):  # the returned distance is the true one
        assert mined.edit_distances(q, np.frombuffer(cands[p], np.uint8)[None])[0] == d
    assert (dist >= exact).all()
    assert (dist == exact).mean() >= 0.95  # 40 / 40 when written; 249 / 250 on a larger sample
    assert (pos == exact_pos).mean() >= 0.85  # ties may resolve to another id
    assert np.bincount(exact)[1] >= 25  # most unmatched tokens are one edit away


def test_byte_teacher_nearest_is_the_lowest_shared_byte(tokenizers):
    # lev(s, single byte c) = len(s) - [c in s]: the nearest byte token is the lowest byte of s.
    gpt2, byte = tokenizers["gpt-2"], tokenizers["byte"]
    ids = np.random.default_rng(3).choice(50_000, 300, replace=False)
    queries = [gpt2.token_bytes(i) for i in ids]
    cands = [byte.token_bytes(i) for i in range(256)]
    pos, dist = mined.nearest_by_edit_distance(queries, cands, max_candidates=None)
    np.testing.assert_array_equal(pos, [min(q) for q in queries])
    np.testing.assert_array_equal(dist, [len(q) - 1 for q in queries])
    _, dist = mined.nearest_by_edit_distance(queries, cands)  # first or last byte: same distance
    np.testing.assert_array_equal(dist, [len(q) - 1 for q in queries])


def test_mined_map_on_a_real_pair(tokenizers):
    teacher, student = tokenizers["gpt-2"], tokenizers["byte"]
    got = mined.mined_map(teacher, student)
    assert got.dtype == np.int32 and got.shape == (student.vocab_size,)
    exact = vocab_map.exact_match_map(student, teacher)
    for v in range(256):  # GPT-2 spells every byte
        assert exact[v] >= 0 and got[v] == exact[v]
        assert teacher.token_bytes(got[v]) == student.token_bytes(v)
    # Specials: eos by role; pad and bos have no GPT-2 counterpart and go to its only special.
    assert all(got[v] == teacher.eos_id for v in student.special_ids)


@pytest.mark.parametrize("max_candidates", [None, 256])
def test_bytes_and_specials_missing_from_the_teacher(tokenizers, max_candidates):
    # SmolLM2 has no token for bytes 0x04, 0x06, ..., 0xFF and no pad or bos token.
    teacher, student = tokenizers["smollm2"], tokenizers["byte"]
    got = mined.mined_map(teacher, student, max_candidates=max_candidates)
    exact = vocab_map.exact_match_map(student, teacher)
    missing = [v for v in np.flatnonzero(exact < 0) if v < 256]
    assert len(missing) == 21
    short = [w for w in range(teacher.vocab_size) if len(teacher.token_bytes(w)) in (1, 2)]
    for v in missing:  # a one-byte query is one edit from any one-byte token: lengths <= 2
        q = student.token_bytes(v)
        best = min((_levenshtein(q, teacher.token_bytes(w)), w) for w in short)
        assert _levenshtein(q, teacher.token_bytes(got[v])) == best[0] == 1
        if max_candidates is None:
            assert got[v] == best[1]
    specials = sorted(teacher.special_ids)
    for v, text in ((256, b"<pad>"), (257, b"<bos>")):  # no role counterpart: nearest text
        best = min((_levenshtein(text, teacher.id_to_token(w).encode()), w) for w in specials)
        assert got[v] == best[1]
    assert got[258] == 0  # eos by role: <|endoftext|>
    assert (got[exact >= 0] == exact[exact >= 0]).all()


@pytest.mark.parametrize("name", ["smollm2", "byte", "gpt-2"])
def test_identical_vocabularies_identity_and_forward_kl(tokenizers, name):
    tok = tokenizers[name]
    got = mined.mined_map(tok, tok)
    np.testing.assert_array_equal(got, np.arange(tok.vocab_size))
    rng = np.random.default_rng(4)
    s = rng.normal(size=(2, 3, tok.vocab_size)).astype(np.float32)
    t = rng.normal(size=(2, 3, tok.vocab_size)).astype(np.float32)
    mask = np.array([[True, True, False], [True, False, True]])
    fn = jax.jit(lambda s, t: mined.mined_forward_kl(s, t, got, mask, temperature=2.0))
    want = jax.jit(lambda s, t: forward_kl(s, t, mask, temperature=2.0))(s, t)
    np.testing.assert_allclose(fn(s, t), want, rtol=1e-6, atol=1e-7)


def test_teacher_logits_reindexed_and_kl_matches_reference():
    rng = np.random.default_rng(5)
    t = rng.normal(size=(2, 3, 6)).astype(np.float32)
    s = rng.normal(size=(2, 3, 4)).astype(np.float32)
    m = np.array([5, 0, 0, 2], np.int32)
    got = jax.jit(mined.mined_teacher_logits)(t, m)
    np.testing.assert_array_equal(got, t[..., [5, 0, 0, 2]])
    z_t, z_s = np.float64(t[..., m]), np.float64(s)
    p = np.exp(z_t - np.logaddexp.reduce(z_t, -1, keepdims=True))
    logq = z_s - np.logaddexp.reduce(z_s, -1, keepdims=True)
    want = (p * (np.log(p) - logq)).sum(-1)
    np.testing.assert_allclose(jax.jit(mined.mined_forward_kl)(s, t, m), want, rtol=1e-5)
