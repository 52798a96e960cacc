r"""The ``tokenizers`` (Rust) pipelines that reproduce llama.cpp's and SentencePiece's tokenizers.

- ``byte_level_tokenizer``: byte-level BPE with a vocabulary's merges, split first by the regex
  that GGUF's ``tokenizer.ggml.pre`` names (the same table llama.cpp's ``llama-vocab.cpp``
  keeps; see ``_BYTE_LEVEL_PRE_TOKENIZERS``); ``regex_split`` builds such splits.
- ``sentencepiece_tokenizer``: SentencePiece BPE as llama.cpp runs it (spaces become "▁",
  adjacent symbols merge best-score-first, characters outside the vocabulary fall back to
  ``<0xNN>`` byte tokens, user-defined pieces matched whole first) or Unigram.

Both take a vocabulary as lists (pieces, types, scores or merges), whatever file it came from
(``tokenizer_files``), and return a ``token_bytes.Tokenizer``.
"""

from __future__ import annotations

from collections.abc import Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from distill_jax.data.token_bytes import (
    BYTE,
    CONTROL,
    NORMAL,
    SPACE,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    Tokenizer,
    byte_level_bytes,
    sentencepiece_bytes,
)

# ---------------------------------------------------------------------------------------------
# Byte-level BPE (GPT-2 style): every token is spelt in a 256-character stand-in for the bytes
# ---------------------------------------------------------------------------------------------

# The original regexes of the models' tokenizer.json files; llama.cpp (src/llama-vocab.cpp) keeps
# the same table under the names GGUF's `tokenizer.ggml.pre` uses. GPT-2's own regex is built
# into pre_tokenizers.ByteLevel(use_regex=True).
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
_QWEN35_REGEX = (  # Qwen2's, with combining marks (\p{M}) inside words
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_split()])


def regex_split(*regexes: str):
    """Split by each regex in turn (isolating matches), as llama.cpp's ``regex_exprs`` lists do."""

    def build() -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence(
            [
                *(pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in regexes),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    return build


# llama.cpp's multi-regex pre-tokenizers (src/llama-vocab.cpp), applied one after another; each
# matches the model's tokenizer.json (a Sequence of Splits). "$" is Oniguruma's end of line, the
# same as end of piece here because "[\r\n]" has already isolated every newline.
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_DEEPSEEK_LETTERS = (  # written as escapes: several of these are NFC-unstable Greek letters
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293"
    "\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a"
    "\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556"
    "\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b"
    "\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d"
    "\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
    "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4"
    "\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
    "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184"
    "\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b"
    "\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17"
    "\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943"
)
_DEEPSEEK_LLM_REGEXES = (
    "[\r\n]",
    r"\s?[" + _DEEPSEEK_LETTERS + "]+",
    r"\s?[!-/:-~" + "\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    r"\s+$",
    _CJK,
    r"\p{N}+",
)
_DEEPSEEK_CODER_REGEXES = ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}")
_FALCON_REGEXES = (
    r"[\p{P}\$\+<=>\^~\|`]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    "[0-9][0-9][0-9]",
)


# tokenizer.ggml.pre -> (pre-tokenizer, ignore_merges). ignore_merges: a word that is itself in
# the vocabulary is one token, whatever the merges say (Llama-3; llama.cpp sets it likewise).
_BYTE_LEVEL_PRE_TOKENIZERS = {
    **{name: (_gpt2_split, False) for name in ("gpt-2", "phi-2", "mpt", "olmo", "roberta-bpe")},
    **{
        name: (_digits_then_gpt2_split, False)
        for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "minerva-7b")
    },
    **{
        name: (regex_split(LLAMA3_REGEX), True)
        for name in ("llama3", "llama-v3", "llama-bpe", "falcon3")
    },
    **{name: (regex_split(LLAMA3_REGEX), False) for name in ("dbrx", "smaug-bpe")},
    **{
        name: (regex_split(_QWEN2_REGEX), False)
        for name in ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez")
    },
    "qwen35": (regex_split(_QWEN35_REGEX), False),
    "deepseek-llm": (regex_split(*_DEEPSEEK_LLM_REGEXES), False),
    "deepseek-coder": (regex_split(*_DEEPSEEK_CODER_REGEXES), False),
    "falcon": (regex_split(*_FALCON_REGEXES), False),
}


def byte_level_tokenizer(
    tokens: Sequence[str],
    types: Sequence[int],
    merges: Sequence[tuple[str, str]],
    pre: str,
    specials: dict[str, int | None],
    name: str,
) -> Tokenizer:
    """Byte-level BPE from a vocabulary spelt with ``byte_to_unicode``, its merges, a pre name."""
    if pre not in _BYTE_LEVEL_PRE_TOKENIZERS:
        raise ValueError(
            f"{name}: byte-level BPE with pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not "
            f"supported; supported: {sorted(_BYTE_LEVEL_PRE_TOKENIZERS)}."
        )
    split, ignore_merges = _BYTE_LEVEL_PRE_TOKENIZERS[pre]
    vocab = {token: i for i, token in enumerate(tokens)}
    model = models.BPE(vocab, list(merges), ignore_merges=ignore_merges)
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = split()
    backend.decoder = decoders.ByteLevel()
    _add_control_and_user_tokens(backend, tokens, types)
    table = [byte_level_bytes(token, token_type) for token, token_type in zip(tokens, types)]
    special_ids = [i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN, UNUSED)]
    return Tokenizer(backend, table, special_ids=special_ids, name=name, **specials)


def _add_control_and_user_tokens(
    backend: tokenizers.Tokenizer, tokens: Sequence[str], types: Sequence[int]
) -> None:
    """Control tokens as special added tokens; user-defined ones matched whole in raw text."""
    control = [s for s, t in zip(tokens, types) if t == CONTROL and s]
    user = [s for s, t in zip(tokens, types) if t == USER_DEFINED and s]
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in control])
    backend.add_tokens([AddedToken(s, special=False, normalized=False) for s in user])


# ---------------------------------------------------------------------------------------------
# SentencePiece vocabularies: "▁" is a space, <0xNN> is a byte
# ---------------------------------------------------------------------------------------------


def _merges_by_score(
    pieces: Sequence[str], scores: Sequence[float], types: Sequence[int]
) -> list[tuple[str, str]]:
    """SentencePiece BPE as merges: every split of a normal piece into two normal pieces.

    SentencePiece (and llama.cpp) repeatedly joins the adjacent pair whose concatenation is the
    highest-scoring piece; as ``tokenizers`` merges, a pair's rank is its piece's score order
    (ties by id). User-defined pieces are matched whole before merging, so they take no part.
    """
    normal = {p: i for i, (p, t) in enumerate(zip(pieces, types)) if t == NORMAL}
    order = sorted(normal.values(), key=lambda i: (-scores[i], i))
    merges = []
    for i in order:
        piece = pieces[i]
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                merges.append((left, right))
    return merges


def sentencepiece_tokenizer(
    pieces: Sequence[str],
    scores: Sequence[float],
    types: Sequence[int],
    *,
    unigram: bool,
    prefix_space: bool,
    specials: dict[str, int | None],
    name: str,
    normalizer_steps: Sequence[normalizers.Normalizer] = (),
) -> Tokenizer:
    """A SentencePiece model (BPE by score, or Unigram) with byte fallback if it has byte pieces."""
    # User-defined pieces are matched whole in the raw text, where their "▁" is a space (GGUF
    # files already spell them so), as llama.cpp does.
    pieces = [p.replace(SPACE, " ") if t == USER_DEFINED else p for p, t in zip(pieces, types)]
    byte_fallback = BYTE in types
    unk = next((i for i, t in enumerate(types) if t == UNKNOWN), None)
    if unigram:
        # SentencePiece never matches control, unknown, unused or byte pieces against text, but
        # tokenizers' Unigram would: the first three get a raw space (never in normalised text)
        # in front, byte pieces (looked up by name for byte fallback) a score no real
        # segmentation prefers.
        pieces = [" " + p if t in (CONTROL, UNKNOWN, UNUSED) else p for p, t in zip(pieces, types)]
        floor = min(s for s, t in zip(scores, types) if t == NORMAL) - 1e3
        scores = [floor if t == BYTE else s for s, t in zip(scores, types)]
        model = models.Unigram(list(zip(pieces, scores)), unk, byte_fallback)
    else:
        vocab = {piece: i for i, piece in enumerate(pieces)}
        model = models.BPE(
            vocab,
            _merges_by_score(pieces, scores, types),
            unk_token=None if unk is None else pieces[unk],
            fuse_unk=True,
            byte_fallback=byte_fallback,
        )
    backend = tokenizers.Tokenizer(model)
    # The normaliser runs on each stretch of text between pieces matched in the raw text, so
    # llama.cpp's dummy-prefix space goes before every such stretch.
    prefix = [normalizers.Prepend(SPACE)] if prefix_space else []
    backend.normalizer = normalizers.Sequence(
        [*normalizer_steps, *prefix, normalizers.Replace(" ", SPACE)]
    )
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    _add_control_and_user_tokens(backend, pieces, types)
    table = [sentencepiece_bytes(p, t) for p, t in zip(pieces, types)]
    special_ids = [i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN, UNUSED)]
    user_ids = [i for i, t in enumerate(types) if t == USER_DEFINED]
    return Tokenizer(
        backend,
        table,
        special_ids=special_ids,
        prefix_space=prefix_space,
        prefix_after=user_ids,
        name=name,
        **specials,
    )
