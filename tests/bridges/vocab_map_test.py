"""Exact-match vocabulary maps and the mapped KL against sorted-search and float64 references.

Real tokenizers: SmolLM2 (byte-level BPE), Gemma-3 (SentencePiece with byte fallback, so some
ids share bytes), the byte tokenizer, and llama.cpp's vocab-only GGUFs (Qwen2, GPT-2, LLaMA
SentencePiece). The map reference looks every teacher token up by binary search in the sorted
(bytes, id) list of the student; the loss reference coarsens float64 probabilities with loops.
"""

from __future__ import annotations

import bisect
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import assets
from distill_jax.bridges import byteify, vocab_map
from distill_jax.data import load_tokenizer
from distill_jax.losses import forward_kl

TEXT = (
    "The quick brown fox jumps over the lazy dog. Distillation transfers what a large teacher "
    "knows to a small student; when the two models use different tokenizers, their next-token "
    "distributions live on different vocabularies.\n\n"
    "def softmax(x):\n    e = np.exp(x - x.max())\n    return e / e.sum()\n\n"
    "Les modèles de langue apprennent à prédire le mot suivant. 日本語のテキストも少し。 🚀\n"
)
_fkl = jax.jit(forward_kl)


# ------------------------------------------------------------------------------ references


def _ref_exact_map(teacher, student) -> np.ndarray:
    """Binary search in the sorted (bytes, id) list; specials by role, then by text."""
    pairs = sorted(
        (student.token_bytes(v), v)
        for v in range(student.vocab_size)
        if v not in student.special_ids and student.token_bytes(v)
    )
    keys = [b for b, _ in pairs]
    s_roles, t_roles = byteify.special_roles(student), byteify.special_roles(teacher)
    s_special = sorted(student.special_ids)
    out = np.full(teacher.vocab_size, -1, np.int64)
    for w in range(teacher.vocab_size):
        if w in teacher.special_ids:
            same_role = [v for v in s_special if w in t_roles and s_roles.get(v) == t_roles[w]]
            same_text = [v for v in s_special if student.id_to_token(v) == teacher.id_to_token(w)]
            out[w] = (same_role or same_text or [-1])[0]
        else:
            data = teacher.token_bytes(w)
            k = bisect.bisect_left(keys, data)
            out[w] = pairs[k][1] if k < len(keys) and keys[k] == data else -1
    return out


def _softmax64(x, tau):
    z = np.asarray(x, np.float64) / tau
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _ref_coarsen(s, t, vmap, tau):
    """Float64 p' and q' on (sorted image of the map) + [rest], with loops, per position."""
    q, p = _softmax64(s, tau), _softmax64(t, tau)
    image = sorted({int(v) for v in vmap if v >= 0})
    slot = {v: k for k, v in enumerate(image)}
    rest = [v for v in range(q.shape[-1]) if v not in slot]
    p2 = np.zeros(p.shape[:-1] + (len(image) + 1,))
    for w, v in enumerate(vmap):
        p2[..., slot[int(v)] if v >= 0 else len(image)] += p[..., w]
    q2 = np.concatenate([q[..., image], q[..., rest].sum(-1, keepdims=True)], -1)
    return p2, q2, image, rest


def _ref_mapped_kl(s, t, vmap, tau):
    p2, q2, _, _ = _ref_coarsen(s, t, vmap, tau)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p2 > 0, p2 * np.log(p2 / q2), 0.0).sum(-1)


def _ref_mapped_kl_grad(s, t, vmap, tau):
    """d KL / d z_s: (q_v - p'_v) / tau on the image, (q_v - p'_rest q_v / q'_rest) / tau else."""
    q = _softmax64(s, tau)
    p2, q2, image, rest = _ref_coarsen(s, t, vmap, tau)
    g = np.array(q)
    g[..., image] -= p2[..., :-1]
    g[..., rest] -= p2[..., -1:] * q[..., rest] / q2[..., -1:]
    return g / tau


# ------------------------------------------------------------------------------ the map


@pytest.mark.parametrize("name", ["smollm2", "qwen2", "gpt-2", "byte"])
def test_same_tokenizer_is_identity(tokenizers, name):
    tok = tokenizers[name]
    np.testing.assert_array_equal(
        vocab_map.exact_match_map(tok, tok), np.arange(tok.vocab_size, dtype=np.int32)
    )


@pytest.mark.parametrize("name", ["gemma3", "llama-spm"])
def test_same_tokenizer_with_duplicate_bytes_maps_to_lowest_id(tokenizers, name):
    tok = tokenizers[name]
    got = vocab_map.exact_match_map(tok, tok)
    lowest = {}
    for i in range(tok.vocab_size):
        key = ("special", tok.id_to_token(i)) if i in tok.special_ids else tok.token_bytes(i)
        lowest.setdefault(key, i)
    want = [
        lowest[("special", tok.id_to_token(i)) if i in tok.special_ids else tok.token_bytes(i)]
        for i in range(tok.vocab_size)
    ]
    np.testing.assert_array_equal(got, want)
    dup = got != np.arange(tok.vocab_size)
    assert 50 < dup.sum() < 200  # byte-fallback tokens <0xNN> duplicating a piece
    assert all(tok.token_bytes(i) == tok.token_bytes(got[i]) for i in np.flatnonzero(dup))


# (teacher, student, matched teacher ids in [lo, hi], unigram coverage of TEXT in [lo, hi]),
# bounds around the values measured when this test was written: 46256, 0.866 / 46148, 0.918 /
# 42257, 0.771 (Qwen2 splits code and punctuation runs GPT-2 lacks) / 42257, 1.0.
REAL_PAIRS = [
    ("gemma3", "smollm2", (46_000, 46_500), (0.80, 0.92)),
    ("smollm2", "gemma3", (46_000, 46_300), (0.85, 0.97)),
    ("qwen2", "gpt-2", (42_000, 42_500), (0.70, 0.85)),
    ("gpt-2", "qwen2", (42_000, 42_500), (0.99, 1.0 + 1e-6)),
]


@pytest.mark.parametrize("teacher,student,n_matched,text_coverage", REAL_PAIRS)
def test_real_pairs_match_reference_and_bytes(
    tokenizers, teacher, student, n_matched, text_coverage
):
    t, s = tokenizers[teacher], tokenizers[student]
    got = vocab_map.exact_match_map(t, s)
    assert got.dtype == np.int32 and got.shape == (t.vocab_size,)
    np.testing.assert_array_equal(got, _ref_exact_map(t, s))
    t_roles, s_roles = byteify.special_roles(t), byteify.special_roles(s)
    for w in np.flatnonzero(got >= 0):
        v = got[w]
        if w in t.special_ids:
            assert v in s.special_ids
            assert s_roles.get(v) == t_roles.get(w) or s.id_to_token(v) == t.id_to_token(w)
        else:
            assert t.token_bytes(w) == s.token_bytes(v) != b""
    lo, hi = n_matched
    assert lo <= (got >= 0).sum() <= hi
    # Coverage of the teacher's unigram distribution on a mixed text; uniform -> id fraction.
    counts = np.bincount(t.encode(TEXT), minlength=t.vocab_size).astype(np.float32)
    cov = float(vocab_map.coverage(jnp.asarray(counts / counts.sum()), got))
    assert text_coverage[0] <= cov <= text_coverage[1], cov
    uniform = np.full((1, t.vocab_size), 1.0 / t.vocab_size, np.float32)
    np.testing.assert_allclose(vocab_map.coverage(uniform, got), [(got >= 0).mean()], rtol=1e-5)


def test_shared_specials_match_by_role(tokenizers):
    got = vocab_map.exact_match_map(tokenizers["gemma3"], tokenizers["smollm2"])
    # Gemma <eos> 1 -> SmolLM2 <|endoftext|> 0; <start_of_turn> 105 -> <|im_start|> 1.
    assert (got[1], got[105], got[106]) == (0, 1, 2)
    assert got[2] == -1  # SmolLM2 has no BOS token of its own


# ------------------------------------------------------------------------------ the loss


def _synthetic(seed, shape=(2, 3), v=7, w=9):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=shape + (v,)).astype(np.float32) * 2
    t = rng.normal(size=shape + (w,)).astype(np.float32) * 2
    # teacher 0 and 1 share student 3 (duplicate bytes), 2 and 5 unmatched, students 0, 6 unhit.
    vmap = np.array([3, 3, -1, 1, 2, 4, 5, -1, 4], np.int32)
    return s, t, vmap


@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
def test_mapped_kl_matches_float64_reference(tau):
    s, t, vmap = _synthetic(0)
    mask = np.array([[True, False, True], [True, True, True]])
    fn = jax.jit(lambda s, t, m: vocab_map.mapped_kl(s, t, vmap, m, tau))
    got = fn(s, t, mask)
    assert got.dtype == jnp.float32 and got.shape == (2, 3)
    want = np.where(mask, _ref_mapped_kl(s, t, vmap, tau), 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert (np.asarray(got) >= 0).all()
    grad = jax.jit(jax.grad(lambda s: vocab_map.mapped_kl(s, t, vmap, None, tau).sum()))(s)
    np.testing.assert_allclose(grad, _ref_mapped_kl_grad(s, t, vmap, tau), atol=1e-5)


def test_mapped_kl_on_a_real_pair_matches_reference(tokenizers):
    t_tok, s_tok = tokenizers["smollm2"], tokenizers["gemma3"]
    vmap = vocab_map.exact_match_map(t_tok, s_tok)
    rng = np.random.default_rng(1)
    s = rng.normal(size=(1, 2, s_tok.vocab_size)).astype(np.float32) * 3
    t = rng.normal(size=(1, 2, t_tok.vocab_size)).astype(np.float32) * 3
    got = jax.jit(lambda s, t: vocab_map.mapped_kl(s, t, vmap))(s, t)
    np.testing.assert_allclose(got, _ref_mapped_kl(s, t, vmap, 1.0), rtol=1e-4)


def test_identity_map_is_forward_kl_and_zero_on_itself():
    rng = np.random.default_rng(2)
    s = rng.normal(size=(2, 4, 11)).astype(np.float32)
    t = rng.normal(size=(2, 4, 11)).astype(np.float32)
    ident = np.arange(11, dtype=np.int32)
    fn = jax.jit(lambda s, t: vocab_map.mapped_kl(s, t, ident, temperature=1.5))
    np.testing.assert_allclose(fn(s, t), _fkl(s, t, temperature=1.5), rtol=1e-5, atol=1e-7)
    zero, grad = jax.jit(jax.value_and_grad(lambda x: fn(x, s).sum()))(s)
    assert abs(float(zero)) < 1e-5
    assert np.isfinite(grad).all() and np.abs(grad).max() < 1e-6


def test_masked_student_entries_give_finite_gradients():
    s, t, vmap = _synthetic(3)
    student_vocab_mask = np.array([True, True, True, True, True, False, True])
    # student 5 is in the image (teacher 6 maps to it) but masked: p' > 0 = q' -> +inf;
    # unmap teacher 6 so the masked id only takes part in the remainder bucket.
    vmap = np.where(vmap == 5, -1, vmap).astype(np.int32)
    fn = jax.jit(lambda s: vocab_map.mapped_kl(s, t, vmap, student_vocab_mask=student_vocab_mask))
    value, grad = jax.jit(jax.value_and_grad(lambda s: fn(s).sum()))(s)
    assert np.isfinite(value) and np.isfinite(grad).all()
    assert (np.asarray(grad)[..., 5] == 0).all()
    unmasked = np.where(student_vocab_mask, s, -np.inf)
    np.testing.assert_allclose(fn(s), _ref_mapped_kl(unmasked, t, vmap, 1.0), rtol=1e-5)


def test_map_shape_must_match_teacher_vocab():
    s, t, vmap = _synthetic(4)
    with pytest.raises(ValueError, match="pad the map with -1"):
        vocab_map.mapped_kl(s, t, vmap[:-1])


# ------------------------------------------------------------------------------ padded sizes


def test_padding_only_pair_is_identity_and_masked_kl_equals_truncated(tokenizers):
    vocab = assets.llama_cpp_vocab_dir()
    student = load_tokenizer(os.path.join(vocab, "ggml-vocab-qwen2.gguf"))  # a second load
    teacher = tokenizers["qwen2"]
    true = vocab_map.check_same_tokenizer_padding(teacher, student)
    assert true == 151_936
    vmap = vocab_map.exact_match_map(teacher, student)
    np.testing.assert_array_equal(vmap, np.arange(true))
    t_pad, s_pad = 152_064, 151_936  # Qwen2.5-7B vs Qwen2.5-0.5B embedding rows
    rng = np.random.default_rng(5)
    s = rng.normal(size=(2, 2, s_pad)).astype(np.float32)
    t = rng.normal(size=(2, 2, t_pad)).astype(np.float32)
    t[..., true:] += 30.0  # garbage in the padded rows must not leak into the loss
    truncated = _fkl(s[..., :true], t[..., :true])
    padded_map = np.pad(vmap, (0, t_pad - true), constant_values=-1)
    masked = jax.jit(
        lambda s, t: vocab_map.mapped_kl(
            s, t, padded_map, teacher_vocab_mask=vocab_map.padded_vocab_mask(true, t_pad)
        )
    )(s, t)
    np.testing.assert_allclose(masked, truncated, rtol=1e-5)
    # Both sides padded to the same size: the plain divergence with vocab_mask.
    s_same = np.pad(s, ((0, 0), (0, 0), (0, t_pad - s_pad)), constant_values=5.0)
    same = _fkl(s_same, t, vocab_mask=vocab_map.padded_vocab_mask(true, t_pad))
    np.testing.assert_allclose(same, truncated, rtol=1e-5)


def test_padded_vocab_mask_and_refusals(tokenizers):
    np.testing.assert_array_equal(vocab_map.padded_vocab_mask(3, 5), [1, 1, 1, 0, 0])
    with pytest.raises(ValueError, match="true vocabulary size 6"):
        vocab_map.padded_vocab_mask(6, 5)
    smollm2, gemma3 = tokenizers["smollm2"], tokenizers["gemma3"]
    with pytest.raises(ValueError) as err:
        vocab_map.check_same_tokenizer_padding(gemma3, smollm2)
    assert gemma3.name in str(err.value) and smollm2.name in str(err.value)
    assert "vocab sizes 262144 vs 49152" in str(err.value)
    assert vocab_map.check_same_tokenizer_padding(smollm2, smollm2) == 49_152


class _RotatedBytes:
    """The byte tokenizer's size and specials, with ids 0..255 spelling the next byte."""

    def __init__(self, byte):
        self.name, self.vocab_size, self.special_ids = "rotated", byte.vocab_size, byte.special_ids
        self._byte = byte

    def token_bytes(self, i):
        return self._byte.token_bytes((i + 1) % 256 if i < 256 else i)


def test_same_size_other_vocabulary_is_refused(tokenizers):
    with pytest.raises(ValueError, match=r"'byte'.*'rotated'.*id 0 is b'\\x00' vs b'\\x01'"):
        vocab_map.check_same_tokenizer_padding(
            tokenizers["byte"], _RotatedBytes(tokenizers["byte"])
        )
