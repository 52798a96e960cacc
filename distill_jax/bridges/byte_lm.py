r"""Exact next-byte distributions from a token LM, and ensembles of LMs with different vocabularies.

A token LM generates tokens t_1, t_2, ...; its byte stream is the concatenation of their bytes,
ended by the first token that has no bytes (EOS or any other special token). For a byte string
x = x_1..x_n the probability that the stream starts with x is (Byte-Token Representation Lemma)

    P(x) = sum over cover encodings (t_1..t_k) of  prod_i p(t_i | t_<i),

where a cover encoding is a token sequence whose first k - 1 tokens spell a prefix of x shorter
than n and whose last token reaches (or passes) the end of x while agreeing with it:
bytes(t_1..t_k) starts with x. Each stream that starts with x has exactly one such first k, so
the events are disjoint and the sum is exact over *all* tokenizations, canonical or not. Then

    P(b | x) = P(x b) / P(x)   for bytes b,        P(END | x) = P(stream == x) / P(x),

and the 257 numbers sum to 1 (``next_byte_logprobs``; slot ``END_OF_TEXT = 256`` is the mass of
a byte-less token at a boundary exactly at the end of x). METHODS.md 6.9.

The search walks token-boundary positions j = 0..n: ``paths[j]`` maps every token sequence that
spells x[:j] exactly (a tuple of ids) to its log-probability, one LM call per sequence; tokens
that are prefixes of x[j:] extend a path to a later boundary (dict lookups of x[j:j+L]), tokens
that start with x[j:] cover x (a range of a sorted byte table, ``TokenIndex``). One walk gives
log P(x) and all 257 joints log P(x b), since a path at j < n contributes P(x b) through tokens
passing the end of x and a path at n through every token.

Cost: one LM call per token sequence spelling some x[:j], j < n (``byte_prefix_logprob``) or
j <= n (``next_byte_logprobs``), plus O(max token length + matching tokens) host work per call.
For a byte vocabulary that is n (+1) calls; for a BPE vocabulary the number of segmentations of
x grows exponentially in n (all single bytes plus merges give Fibonacci-like growth), so exact
results are for short strings, or wrap ``lm`` with ``functools.lru_cache`` to share calls across
prefixes. ``max_paths=k`` keeps the k most probable paths at each boundary j < n: at most
k * (n + max token length) calls, P(x) becomes a lower bound, and the next-byte distribution is
that of the kept paths (still normalised, as every path at n is kept).

The stream is what the token bytes spell: for a tokenizer with a SentencePiece dummy prefix
(``Tokenizer.prefix_space``) it starts with that space, so condition on ``b" " + text``.

Ensembles (METHODS.md 6.10): next-byte distributions share one support whatever the vocabulary,
so teachers with different tokenizers average there, per byte.

Sources: Phan et al., "Exact Byte-Level Probabilities from Tokenized Language Models for
FIM-Tasks and Model Ensembles" (arXiv:2410.09303): the lemma, cover encodings, byte-level
ensembles; Hayase et al. 2025, "Sampling from Your Language Model One Byte at a Time": the same
conversion for byte-wise sampling with a pruned cover set. Written from the papers' definitions.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import math
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LM = Callable[[tuple[int, ...]], np.ndarray]  # prefix ids -> [V] log p(next token | prefix)
END_OF_TEXT = 256  # slot of "the byte stream ends here" in a [257] next-byte distribution
_NUM_SLOTS = 257


# ---------------------------------------------------------------------------------------------
# The vocabulary as bytes
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenIndex:
    """A vocabulary's token bytes, sorted for prefix queries (build once with ``of``).

    Attributes:
        vocab_size: V, the length of the LM's log-prob vectors.
        sorted_bytes: the V token byte strings, ascending (``b""`` of specials first).
        sorted_ids: [V] int64, the id of each entry of ``sorted_bytes``.
        first_slot: [V] int64, ``sorted_bytes[k][0]``, or ``END_OF_TEXT`` for ``b""``.
        ids_of: non-empty bytes -> [m] int64 ids spelling them (duplicates allowed).
        max_len: the longest token, in bytes.
    """

    vocab_size: int
    sorted_bytes: tuple[bytes, ...]
    sorted_ids: np.ndarray
    first_slot: np.ndarray
    ids_of: dict[bytes, np.ndarray]
    max_len: int

    @classmethod
    def of(cls, token_bytes: Sequence[bytes]) -> TokenIndex:
        """Index ``token_bytes[i]``, the bytes of id i (``b""``: a special that ends the stream)."""
        order = sorted(range(len(token_bytes)), key=token_bytes.__getitem__)
        sorted_bytes = tuple(bytes(token_bytes[i]) for i in order)
        grouped: dict[bytes, list[int]] = {}
        for i, data in enumerate(token_bytes):
            if data:
                grouped.setdefault(bytes(data), []).append(i)
        return cls(
            vocab_size=len(token_bytes),
            sorted_bytes=sorted_bytes,
            sorted_ids=np.asarray(order, np.int64),
            first_slot=np.asarray([b[0] if b else END_OF_TEXT for b in sorted_bytes], np.int64),
            ids_of={b: np.asarray(ids, np.int64) for b, ids in grouped.items()},
            max_len=max((len(b) for b in sorted_bytes), default=0),
        )

    def spelling_prefixes(self, s: bytes) -> list[tuple[int, int]]:
        """(id, length) of every non-empty token whose bytes are a prefix of ``s``."""
        found = []
        for length in range(1, min(self.max_len, len(s)) + 1):
            for token in self.ids_of.get(s[:length], ()):
                found.append((int(token), length))
        return found

    def continuations(self, s: bytes) -> tuple[np.ndarray, np.ndarray]:
        """Tokens whose bytes start with ``s``, and the slot each gives the byte after ``s``.

        Returns:
            (ids [K] int64, slots [K] int64): slot ``bytes[len(s)]`` for a token passing the end
            of ``s``, ``END_OF_TEXT`` for a token equal to ``s`` (for ``s = b""``: specials).
        """
        if not s:
            return self.sorted_ids, self.first_slot
        lo = bisect.bisect_left(self.sorted_bytes, s)
        successor = _successor(s)
        hi = (
            len(self.sorted_bytes)
            if successor is None
            else bisect.bisect_left(self.sorted_bytes, successor, lo)
        )
        n = len(s)
        slots = [b[n] if len(b) > n else END_OF_TEXT for b in self.sorted_bytes[lo:hi]]
        return self.sorted_ids[lo:hi], np.asarray(slots, np.int64)


def _successor(s: bytes) -> bytes | None:
    """The least byte string above every string that starts with ``s`` (None: there is none)."""
    s = s.rstrip(b"\xff")
    return s[:-1] + bytes([s[-1] + 1]) if s else None


def _as_index(token_bytes: Sequence[bytes] | TokenIndex) -> TokenIndex:
    return token_bytes if isinstance(token_bytes, TokenIndex) else TokenIndex.of(token_bytes)


# ---------------------------------------------------------------------------------------------
# Log-space helpers (float64; -inf is a probability of exactly 0)
# ---------------------------------------------------------------------------------------------


def _logsumexp(x: np.ndarray, axis: int | None = None) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.size == 0:
        return np.float64(-np.inf)
    top = np.max(x, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(x - top), axis=axis, keepdims=True)) + top
    return out.reshape(()) if axis is None else np.squeeze(out, axis=axis)


def _slot_logsumexp(values: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """[257] log sum_{k: slots[k] = s} exp(values[k]) for every slot s."""
    top = np.full(_NUM_SLOTS, -np.inf)
    np.maximum.at(top, slots, values)
    top = np.where(np.isfinite(top), top, 0.0)
    total = np.bincount(slots, weights=np.exp(values - top[slots]), minlength=_NUM_SLOTS)
    with np.errstate(divide="ignore"):
        return np.log(total) + top


def _next_token_logprobs(lm: LM, ids: tuple[int, ...], vocab_size: int) -> np.ndarray:
    logp = np.asarray(lm(ids), np.float64)
    if logp.shape != (vocab_size,):
        raise ValueError(
            f"The LM returned shape {logp.shape} for prefix {ids}; expected ({vocab_size},), one "
            "log-prob per token of the vocabulary given as token_bytes."
        )
    total = float(_logsumexp(logp))
    if not abs(total) < 1e-3:
        raise ValueError(
            f"The LM's next-token log-probs for prefix {ids} have log-sum-exp {total:.3g}, not 0: "
            "return log-probabilities (log_softmax of the logits), not logits."
        )
    return logp


# ---------------------------------------------------------------------------------------------
# The cover search
# ---------------------------------------------------------------------------------------------


def _token_paths(
    lm: LM, index: TokenIndex, prefix: bytes, *, last: int, max_paths: int | None
) -> Iterator[tuple[int, float, np.ndarray]]:
    """(j, log P(path), log p(. | path) [V]) for every token path spelling prefix[:j], j <= last.

    Paths are memoised per boundary as {ids: log-prob}; each is extended by the tokens that are
    prefixes of prefix[j:], and paths of probability 0 are dropped. ``max_paths`` prunes the
    paths at boundaries j < len(prefix) to the most probable ones.
    """
    n = len(prefix)
    paths: list[dict[tuple[int, ...], float]] = [{} for _ in range(n + 1)]
    paths[0][()] = 0.0
    for j in range(last + 1):
        here, paths[j] = paths[j], {}
        if max_paths is not None and j < n and len(here) > max_paths:
            here = dict(heapq.nlargest(max_paths, here.items(), key=lambda item: item[1]))
        extensions = index.spelling_prefixes(prefix[j:])
        for ids, path_logprob in here.items():
            logp = _next_token_logprobs(lm, ids, index.vocab_size)
            for token, length in extensions:
                if logp[token] > -np.inf:
                    paths[j + length][(*ids, token)] = path_logprob + logp[token]
            yield j, path_logprob, logp


def _check_max_paths(max_paths: int | None) -> None:
    if max_paths is not None and max_paths < 1:
        raise ValueError(f"max_paths must be None (exact) or >= 1, got {max_paths}.")


def byte_prefix_logprob(
    lm: LM,
    token_bytes: Sequence[bytes] | TokenIndex,
    prefix: bytes,
    *,
    max_paths: int | None = None,
) -> float:
    r"""log P(the LM's byte stream starts with ``prefix``), summed over all cover encodings.

    P(x) = sum_{j < n} sum_{paths t_1..t_m spelling x[:j]} P(t_1..t_m)
           * sum_{t: bytes(t) starts with x[j:]} p(t | t_1..t_m);   P(b"") = 1.
    Phan et al. (arXiv:2410.09303), Byte-Token Representation Lemma. Cost: see the module.

    Args:
        lm: prefix ids -> [V] next-token log-probs (host side; ``jax_lm`` wraps a Transformer).
        token_bytes: [V] bytes of each id (``b""`` for specials, which end the stream), or a
            ``TokenIndex`` of them (build it once when calling repeatedly).
        prefix: the byte string x (n bytes).
        max_paths: None for the exact sum; k keeps the k most probable token paths at each
            boundary (a lower bound).

    Returns:
        float, <= 0; -inf when no token sequence of nonzero probability spells ``prefix``.
    """
    _check_max_paths(max_paths)
    index, n = _as_index(token_bytes), len(prefix)
    if n == 0:
        return 0.0
    covers, terms = {}, []
    for j, path_logprob, logp in _token_paths(lm, index, prefix, last=n - 1, max_paths=max_paths):
        if j not in covers:
            covers[j] = index.continuations(prefix[j:])[0]
        terms.append(path_logprob + _logsumexp(logp[covers[j]]))
    return float(_logsumexp(np.asarray(terms)))


def _prefix_and_joint_logprobs(
    lm: LM, index: TokenIndex, prefix: bytes, max_paths: int | None
) -> tuple[float, np.ndarray]:
    """(log P(x), [257] log P(x b) for each byte b, then log P(stream == x)) from one walk."""
    n = len(prefix)
    slots_at, covers, joints = {}, [], []
    for j, path_logprob, logp in _token_paths(lm, index, prefix, last=n, max_paths=max_paths):
        if j not in slots_at:
            slots_at[j] = index.continuations(prefix[j:])
        ids, slots = slots_at[j]
        per_slot = path_logprob + _slot_logsumexp(logp[ids], slots)  # [257]
        if j < n:  # tokens ending exactly at n cover x; they reach the end as paths at n
            covers.append(_logsumexp(per_slot))
            per_slot[END_OF_TEXT] = -np.inf
        joints.append(per_slot)
    log_prefix = float(_logsumexp(np.asarray(covers))) if n else 0.0
    return log_prefix, _logsumexp(np.stack(joints), axis=0)


def next_byte_logprobs(
    lm: LM,
    token_bytes: Sequence[bytes] | TokenIndex,
    prefix: bytes,
    *,
    max_paths: int | None = None,
) -> np.ndarray:
    r"""log P(next byte | the stream starts with ``prefix``), with the end of text as slot 256.

    log P(b | x) = log P(x b) - log P(x) for b in 0..255, and
    log P(END | x) = log P(stream == x) - log P(x) (a byte-less token right at the end of x).
    The 257 probabilities sum to 1 (for a normalised LM; P(x) comes from the covers of x, the
    numerators from the paths that reach or pass the end of x). For a distribution over bytes
    only, drop slot 256 and renormalise. Phan et al. (arXiv:2410.09303); Hayase et al. 2025.

    Args:
        lm, token_bytes, max_paths: as in ``byte_prefix_logprob``.
        prefix: the byte string x conditioned on.

    Returns:
        [257] float64 log-probs: bytes 0..255, then ``END_OF_TEXT``.

    Raises:
        ValueError: P(prefix) = 0 under the LM (no next-byte distribution exists).
    """
    _check_max_paths(max_paths)
    log_prefix, joint = _prefix_and_joint_logprobs(lm, _as_index(token_bytes), prefix, max_paths)
    if log_prefix == -np.inf:
        raise ValueError(
            f"The LM gives the byte prefix {prefix[-32:]!r} (last 32 bytes shown) probability 0: "
            "no token sequence of nonzero probability spells it, so it has no next byte."
        )
    return joint - log_prefix


# ---------------------------------------------------------------------------------------------
# Ensembles of LMs with different vocabularies
# ---------------------------------------------------------------------------------------------


def _checked_weights(weights: Sequence[float] | None, num_members: int) -> np.ndarray:
    if num_members == 0:
        raise ValueError("An ensemble needs at least one member.")
    if weights is None:
        return np.full(num_members, 1.0 / num_members)
    w = np.asarray(weights, np.float64)
    if w.shape != (num_members,):
        raise ValueError(f"Got weights of shape {w.shape} for {num_members} members.")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or not math.isclose(w.sum(), 1.0, abs_tol=1e-6):
        raise ValueError(f"Ensemble weights must be >= 0 and sum to 1, got {w.tolist()}.")
    return w


def ensemble_next_byte_logprobs(
    members: Sequence[tuple[LM, Sequence[bytes] | TokenIndex]],
    prefix: bytes,
    weights: Sequence[float] | None = None,
    *,
    max_paths: int | None = None,
) -> np.ndarray:
    r"""Weighted average of the members' next-byte distributions, whatever their vocabularies.

    P(b | x) = sum_i w_i P_i(b | x) over b in 0..255 and END (sum_i w_i = 1, w_i >= 0): a
    per-step mixture, as in Phan et al. (arXiv:2410.09303) byte-level ensembles; METHODS.md 6.10.
    Members of weight 0 are not run.

    Args:
        members: (lm, token_bytes or TokenIndex) per teacher, as in ``next_byte_logprobs``.
        prefix: the byte string conditioned on.
        weights: [M] or None for uniform.
        max_paths: as in ``byte_prefix_logprob``, for every member.

    Returns:
        [257] float64 log-probs (bytes 0..255, then ``END_OF_TEXT``).

    Raises:
        ValueError: no members, weights of the wrong length, negative, or not summing to 1;
            a weighted member gives ``prefix`` probability 0.
    """
    w = _checked_weights(weights, len(members))
    terms = [
        math.log(w_i) + next_byte_logprobs(lm, token_bytes, prefix, max_paths=max_paths)
        for (lm, token_bytes), w_i in zip(members, w)
        if w_i > 0
    ]
    return _logsumexp(np.stack(terms), axis=0)


# ---------------------------------------------------------------------------------------------
# A distill_jax Transformer as an LM
# ---------------------------------------------------------------------------------------------


def jax_lm(model, bos_id: int, *, bucket: int = 64) -> LM:
    """Wrap a distill_jax ``Transformer`` as an ``LM``: ids -> log_softmax of the next logits.

    Each call runs ``[bos_id, *ids]`` right-padded to a multiple of ``bucket`` (the padding is a
    separate segment, so causal outputs are unchanged and lengths share compilations). No KV
    cache: one full forward pass per call, on the parameters ``model`` has now.

    Returns:
        A function (prefix ids) -> [V] float64 log-probs of the token after the prefix.
    """
    graphdef, state = nnx.split(model)

    @jax.jit
    def logprobs(state, ids, segment_ids, position):
        logits = nnx.merge(graphdef, state)(ids, segment_ids=segment_ids)  # [1, T, V]
        return jax.nn.log_softmax(logits[0, position].astype(jnp.float32))  # [V]

    def lm(prefix_ids: tuple[int, ...]) -> np.ndarray:
        length = 1 + len(prefix_ids)
        padded = bucket * -(-length // bucket)
        ids = np.full((1, padded), bos_id, np.int32)
        ids[0, :length] = (bos_id, *prefix_ids)
        segment_ids = (np.arange(padded) < length).astype(np.int32)[None]  # [1, T], 0 = padding
        return np.asarray(logprobs(state, ids, segment_ids, length - 1), np.float64)

    return lm
