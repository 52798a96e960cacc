"""Next-byte distributions from token LMs, against brute-force enumeration of whole generations.

The toy LM's next-token distribution depends on its prefix (a random table keyed by the last
token) and puts all mass on EOS once the text reaches ``CAP`` bytes, so it generates finitely
many token sequences: the brute force lists every complete generation with its probability and
reads P(stream starts with x) = sum of the generations whose text starts with x, with no cover
encodings, tries or log-space tricks. The byte vocabulary and a tiny random Transformer check
that a byte-level LM comes back as its own next-token distribution.
"""

from __future__ import annotations

import collections
import functools
import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import distill_jax as dj
from distill_jax.bridges import byte_lm
from distill_jax.data import load_tokenizer

# Multi-byte tokens, tokens that are prefixes of others (a < ab < abc, b < ba < bab, c < ca), a
# duplicate (ids 3 and 8 both spell "ab"), and two specials (9: EOS, 10: another byte-less id).
TOY_BYTES = [b"a", b"b", b"c", b"ab", b"abc", b"ba", b"bab", b"ca", b"ab", b"", b""]
EOS, CAP = 9, 5
ALPHABET = b"abc"


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    top = np.max(x[np.isfinite(x)])
    return x - top - np.log(np.sum(np.exp(x - top)))


def _table_lm(token_bytes, seed, *, cap=None, eos=None):
    """log p(next | prefix): a random table row chosen by the last token, or all EOS at the cap."""
    v = len(token_bytes)
    table = np.random.default_rng(seed).normal(size=(v + 1, v)) * 1.5  # row v: empty prefix

    def lm(ids):
        if cap is not None and sum(len(token_bytes[i]) for i in ids) >= cap:
            return np.where(np.arange(v) == eos, 0.0, -np.inf)
        logits = table[ids[-1] if ids else v].copy()
        if ids and token_bytes[ids[-1]] == b"c":  # "c" is never followed by a token starting "c"
            logits[[i for i, b in enumerate(token_bytes) if b.startswith(b"c")]] = -np.inf
        return _log_softmax(logits)

    return lm


TOY_LM = _table_lm(TOY_BYTES, 0, cap=CAP, eos=EOS)


@functools.cache
def _generations():
    """{text: probability} over every complete generation of the toy LM (depth-first)."""
    texts = collections.defaultdict(float)
    stack = [((), b"", 1.0)]
    while stack:
        ids, text, prob = stack.pop()
        p = np.exp(TOY_LM(ids))
        for token in np.flatnonzero(p):
            if TOY_BYTES[token]:
                stack.append(((*ids, int(token)), text + TOY_BYTES[token], prob * p[token]))
            else:  # a byte-less token ends the text
                texts[text] += prob * p[token]
    return dict(texts)


def _brute_starts_with(x):
    return sum(p for text, p in _generations().items() if text.startswith(x))


def _brute_next_byte(x):
    """[257] P(b | x) and P(end | x), as ratios of enumerated probabilities."""
    joint = np.zeros(257)
    for text, p in _generations().items():
        if text.startswith(x):
            joint[text[len(x)] if len(text) > len(x) else 256] += p
    return joint / _brute_starts_with(x)


def _strings(max_len):
    return [bytes(s) for n in range(max_len + 1) for s in itertools.product(ALPHABET, repeat=n)]


STRINGS = _strings(4) + [b"ababc", b"abcab", b"babab", b"cabca", b"abcabca", b"d", b"ad"]


def test_generations_are_a_distribution():
    np.testing.assert_allclose(sum(_generations().values()), 1.0, atol=1e-12)
    assert max(map(len, _generations())) > CAP  # the last token may pass the cap


def test_prefix_logprob_matches_enumeration():
    index = byte_lm.TokenIndex.of(TOY_BYTES)
    zero = 0
    for x in STRINGS:
        want = _brute_starts_with(x)
        got = byte_lm.byte_prefix_logprob(TOY_LM, index, x)
        if want == 0:
            zero += 1
            assert got == -np.inf, x
        else:
            np.testing.assert_allclose(np.exp(got), want, rtol=1e-10, atol=0, err_msg=repr(x))
    assert zero >= 3  # "cc", "d", "ad" at least
    assert byte_lm.byte_prefix_logprob(TOY_LM, TOY_BYTES, b"") == 0.0


def test_next_byte_matches_enumeration_and_sums_to_one():
    index = byte_lm.TokenIndex.of(TOY_BYTES)
    for x in STRINGS:
        if _brute_starts_with(x) == 0:
            continue
        got = byte_lm.next_byte_logprobs(TOY_LM, index, x)
        assert got.shape == (257,)
        np.testing.assert_allclose(np.exp(got), _brute_next_byte(x), atol=1e-12, err_msg=repr(x))
        np.testing.assert_allclose(np.exp(got).sum(), 1.0, atol=1e-12)


@pytest.mark.parametrize("x", [b"abcab", b"babca", b"cabab", b"aaaa", b"abcabc"])
def test_chain_rule(x):
    assert _brute_starts_with(x) > 0
    index = byte_lm.TokenIndex.of(TOY_BYTES)
    steps = [byte_lm.next_byte_logprobs(TOY_LM, index, x[:i])[x[i]] for i in range(len(x))]
    log_px = byte_lm.byte_prefix_logprob(TOY_LM, index, x)
    np.testing.assert_allclose(sum(steps), log_px, rtol=1e-12)
    np.testing.assert_allclose(np.exp(log_px), _brute_starts_with(x), rtol=1e-10)
    end = byte_lm.next_byte_logprobs(TOY_LM, index, x)[byte_lm.END_OF_TEXT]
    np.testing.assert_allclose(np.exp(log_px + end), _generations().get(x, 0.0), atol=1e-15)


def test_each_token_path_is_scored_once():
    calls = collections.Counter()

    def counting_lm(ids):
        calls[ids] += 1
        return TOY_LM(ids)

    byte_lm.next_byte_logprobs(counting_lm, TOY_BYTES, b"ababab")
    assert max(calls.values()) == 1
    # Every segmentation of every prefix "ababab"[:j], j <= 6, with "ab" spelt two ways.
    assert len(calls) > 20


def test_continuations_match_a_scan_of_the_vocabulary():
    vocab = [b"a", b"a\xff", b"a\xff\xff", b"b", b"\xff", b"\xff\x00", b"ab", b"", b"\xffa", b"a"]
    index = byte_lm.TokenIndex.of(vocab)
    for s in [b"", b"a", b"a\xff", b"\xff", b"\xff\xff", b"b", b"ab", b"c"]:
        ids, slots = index.continuations(s)
        want = {i: (v[len(s)] if len(v) > len(s) else 256) for i, v in enumerate(vocab)}
        want = {i: slot for i, slot in want.items() if vocab[i].startswith(s)}
        assert dict(zip(ids.tolist(), slots.tolist())) == want, s
        assert len(ids) == len(want)
        spelt = {(i, len(v)) for i, v in enumerate(vocab) if v and s.startswith(v)}
        assert set(index.spelling_prefixes(s)) == spelt


def test_impossible_prefix_raises():
    with pytest.raises(ValueError, match="probability 0"):
        byte_lm.next_byte_logprobs(TOY_LM, TOY_BYTES, b"cc")


def test_max_paths_prunes_to_a_lower_bound_that_stays_normalised():
    x = b"ababab"
    exact = byte_lm.byte_prefix_logprob(TOY_LM, TOY_BYTES, x)
    assert byte_lm.byte_prefix_logprob(TOY_LM, TOY_BYTES, x, max_paths=10_000) == exact
    pruned = byte_lm.byte_prefix_logprob(TOY_LM, TOY_BYTES, x, max_paths=1)
    assert pruned < exact
    nxt = byte_lm.next_byte_logprobs(TOY_LM, TOY_BYTES, x, max_paths=1)
    np.testing.assert_allclose(np.exp(nxt).sum(), 1.0, atol=1e-12)
    with pytest.raises(ValueError, match="max_paths"):
        byte_lm.byte_prefix_logprob(TOY_LM, TOY_BYTES, x, max_paths=0)


def test_lm_must_return_logprobs_of_the_vocabulary():
    with pytest.raises(ValueError, match="log_softmax"):
        byte_lm.next_byte_logprobs(lambda ids: np.ones(len(TOY_BYTES)), TOY_BYTES, b"a")
    with pytest.raises(ValueError, match="shape"):
        byte_lm.next_byte_logprobs(lambda ids: np.zeros(3), TOY_BYTES, b"a")


def _own_distribution(logp):
    """A byte-vocabulary LM's next-token log-probs as [257]: bytes, then all specials summed."""
    return np.concatenate([logp[:256], [np.logaddexp.reduce(logp[256:])]])


def test_byte_vocabulary_returns_its_own_next_token_distribution():
    tok = load_tokenizer("byte")
    token_bytes = [tok.token_bytes(i) for i in range(tok.vocab_size)]
    lm = _table_lm(token_bytes, 1)
    for x in [b"", b"h", b"hi \xff\x00", b"\xff", b"a\xff\xff"]:
        got = byte_lm.next_byte_logprobs(lm, token_bytes, x)
        np.testing.assert_allclose(got, _own_distribution(lm(tuple(x))), atol=1e-12)


def test_ensemble():
    byte_bytes = [bytes([b]) for b in range(256)] + [b""]
    byte_model = _table_lm(byte_bytes, 2)
    members = [(TOY_LM, TOY_BYTES), (byte_model, byte_bytes)]
    x = b"abca"
    one = byte_lm.ensemble_next_byte_logprobs(members[:1], x)
    np.testing.assert_allclose(one, byte_lm.next_byte_logprobs(TOY_LM, TOY_BYTES, x), atol=1e-12)
    got = byte_lm.ensemble_next_byte_logprobs(members, x, [0.25, 0.75])
    want = 0.25 * _brute_next_byte(x) + 0.75 * np.exp(_own_distribution(byte_model(tuple(x))))
    np.testing.assert_allclose(np.exp(got), want, atol=1e-12)
    np.testing.assert_allclose(np.exp(got).sum(), 1.0, atol=1e-12)
    # A member of weight 0 is not run, so a prefix it cannot spell is fine.
    only_bytes = byte_lm.ensemble_next_byte_logprobs(members, b"xyz", [0.0, 1.0])
    np.testing.assert_allclose(only_bytes, _own_distribution(byte_model(tuple(b"xyz"))))
    for bad in ([0.5, 0.6], [1.5, -0.5], [1.0], [np.nan, 1.0]):
        with pytest.raises(ValueError, match="weights"):
            byte_lm.ensemble_next_byte_logprobs(members, x, bad)
    with pytest.raises(ValueError, match="at least one"):
        byte_lm.ensemble_next_byte_logprobs([], x)


def test_transformer_on_the_byte_tokenizer():
    tok = load_tokenizer("byte")
    config = dj.models.make_config(
        "llama",
        vocab_size=259,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
    )
    model = dj.models.Transformer(config, rngs=nnx.Rngs(0))
    lm = byte_lm.jax_lm(model, bos_id=tok.bos_id, bucket=16)
    token_bytes = [tok.token_bytes(i) for i in range(tok.vocab_size)]
    text = "héllo"
    x = b"".join(tok.text_bytes(tok.encode(text)))
    assert x == text.encode()
    logits = np.asarray(model(jnp.asarray([[tok.bos_id, *x]]))[0])  # [1 + len(x), V]
    for k in (0, 3, len(x)):
        got = byte_lm.next_byte_logprobs(lm, token_bytes, x[:k])
        want = _own_distribution(_log_softmax(logits[k]))
        np.testing.assert_allclose(got, want, atol=2e-5)
        np.testing.assert_allclose(np.exp(got).sum(), 1.0, atol=1e-5)
