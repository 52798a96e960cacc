r"""Tokenizers with exact token bytes: GGUF, Hugging Face ``tokenizer.json``, SentencePiece, bytes.

Cross-tokenizer distillation compares two tokenizations of one text by their bytes, so every
tokenizer here knows the exact UTF-8 bytes each token contributes (``token_bytes``), and
``b"".join(map(tok.token_bytes, tok.encode(text))) == text.encode()`` for every text the
vocabulary can spell without normalising it (see ``Tokenizer`` for the two exceptions).

All tokenizers run on the Rust ``tokenizers`` library; this module only builds its pipeline:

- GGUF ``tokenizer.ggml.model == "gpt2"``: byte-level BPE with the file's merges, split first by
  the regex that ``tokenizer.ggml.pre`` names (the same table llama.cpp's ``llama-vocab.cpp``
  keeps; see ``_BYTE_LEVEL_PRE_TOKENIZERS``).
- GGUF ``"llama"``: SentencePiece BPE as llama.cpp runs it: spaces become "▁", adjacent symbols
  merge best-score-first, characters outside the vocabulary fall back to ``<0xNN>`` byte tokens,
  and user-defined pieces (Gemma's "\n\n", "<table>", runs of spaces) are matched whole first.
- A tiktoken rank file (``cl100k_base.tiktoken``: base64 token bytes and rank per line): byte-level
  BPE whose ids are the ranks, merges derived from the ranks, split by the regex of a named
  encoding (``load_tokenizer(path, encoding="o200k_base")``; see ``TIKTOKEN_ENCODINGS``).
- A SentencePiece ``.model`` file (Unigram or BPE), a Hugging Face directory with
  ``tokenizer.json``, and ``"byte"`` (256 byte tokens and three specials).

Control tokens (BOS, EOS, chat markers) are never produced from text: ``encode`` treats text as
text, ``add_bos`` is the one way to get BOS. Their ``token_bytes`` is ``b""``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import mmap
import os
import struct
from collections.abc import Iterable, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

SUPPORTED_SPECS = (
    "a .gguf file (tokenizer.ggml.model 'gpt2' or 'llama')",
    "a Hugging Face directory with tokenizer.json",
    "a SentencePiece .model file",
    "a tiktoken rank file (.tiktoken)",
    "'byte'",
)

# Token types shared by SentencePiece's ModelProto and GGUF's tokenizer.ggml.token_type.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_SPACE = "\u2581"  # SentencePiece's visible space, "▁"


# ---------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------


class Tokenizer:
    """Text <-> token ids, with the exact bytes of every token.

    ``decode(ids)`` is the concatenation of ``token_bytes`` read as UTF-8 (invalid sequences, as
    from a truncated multi-byte character, become U+FFFD), minus the dummy-prefix space below.

    Two things make ``encode`` lossy, both inherited from the reference tokenizers: normalisation
    that a SentencePiece ``.model`` file asks for (NFKC, collapsing spaces), and U+2581 "▁" in the
    text of a SentencePiece vocabulary, which is the same token as a space and comes back as one.
    A tokenizer with ``prefix_space`` (LLaMA-2 style "dummy prefix") encodes ``" " + text``;
    its joined token bytes start with that space, which ``decode`` removes again. A GGUF
    SentencePiece tokenizer does as llama.cpp: each stretch of text after a user-defined piece
    (Phi-3's "</s>") gets its own space, and ``decode`` removes each. ``decode`` also drops the
    space after every special id, since each ``encode`` call adds one (``[bos, *encode(t)]``).

    Attributes:
        vocab_size: number of ids, ``0 .. vocab_size - 1``.
        bos_id, eos_id, pad_id: special ids, None where the tokenizer has none.
        special_ids: ids whose ``token_bytes`` is ``b""`` (control, unknown, unused tokens).
        prefix_space: whether ``encode`` puts a space before the text (see above).
        prefix_after: ids after which ``encode`` starts a new space-prefixed stretch.
        name: where the tokenizer came from, for messages.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        token_bytes: Sequence[bytes],
        *,
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int | None,
        special_ids: Iterable[int],
        prefix_space: bool = False,
        prefix_after: Iterable[int] = (),
        name: str = "",
    ):
        backend_size = backend.get_vocab_size(with_added_tokens=True)
        if backend_size != len(token_bytes):
            raise ValueError(
                f"Tokenizer {name!r}: the pipeline has {backend_size} ids but the byte table "
                f"{len(token_bytes)}; the vocabulary has duplicate or missing tokens."
            )
        backend.encode_special_tokens = True  # text that spells "<bos>" stays text
        self._backend = backend
        self._token_bytes = tuple(token_bytes)
        self.vocab_size = len(self._token_bytes)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.special_ids = frozenset(special_ids)
        self.prefix_space = prefix_space
        self._stretch_starts = self.special_ids | frozenset(prefix_after)
        self.name = name

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``, with ``bos_id`` first if ``add_bos``."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        return self._with_bos(ids) if add_bos else ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """``[encode(t, add_bos) for t in texts]``, computed in parallel threads."""
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
        return [self._with_bos(e.ids) if add_bos else e.ids for e in encodings]

    def _with_bos(self, ids: list[int]) -> list[int]:
        if self.bos_id is None:
            raise ValueError(f"Tokenizer {self.name!r} has no BOS token; call with add_bos=False.")
        return [self.bos_id, *ids]

    def special_token_id(self, text: str) -> int:
        """The id of the special token spelt ``text`` (``"<|im_start|>"``), never from ``encode``.

        Raises:
            ValueError: the vocabulary has no special token ``text``.
        """
        token_id = self._backend.token_to_id(text)
        if token_id is None or token_id not in self.special_ids:
            raise ValueError(f"Tokenizer {self.name!r} has no special token {text!r}.")
        return token_id

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes ``token_id`` contributes to the text (``b""`` for special tokens)."""
        return self._token_bytes[token_id]

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of ``token_id`` as the pipeline spells it ("<bos>", "Ġthe")."""
        return self._backend.id_to_token(token_id)

    def normalizer_name(self) -> str:
        """The pipeline's text normaliser, for messages ("none" when there is none)."""
        return repr(self._backend.normalizer) if self._backend.normalizer else "none"

    def text_bytes(self, ids: Iterable[int]) -> list[bytes]:
        """The bytes each of ``ids`` contributes to the decoded text: ``token_bytes``, less the
        dummy-prefix spaces that ``encode`` added (see the class docstring)."""
        if self.prefix_space:
            return list(self._without_dummy_prefix(ids))
        return [self._token_bytes[i] for i in ids]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``: their bytes joined and read as UTF-8 (see the class docstring)."""
        return b"".join(self.text_bytes(ids)).decode("utf-8", errors="replace")

    def _without_dummy_prefix(self, ids: Iterable[int]) -> Iterable[bytes]:
        """Token bytes, less the leading space of each stretch that ``encode`` prefixed."""
        stretch_start = True
        for i in ids:
            data = self._token_bytes[i]
            if i in self._stretch_starts:
                stretch_start = True
            elif stretch_start and data:
                data = data[1:] if data.startswith(b" ") else data
                stretch_start = False
            yield data

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 (hex) of the pipeline and the byte table, for caches to check they match.

        The same tokenizer loaded twice gives the same value; a changed vocabulary, merge list,
        pre-tokenizer or byte table gives another.
        """
        digest = hashlib.sha256(self._backend.to_str().encode())
        for data in self._token_bytes:
            digest.update(len(data).to_bytes(4, "little") + data)
        return digest.hexdigest()


def load_tokenizer(
    spec: str | os.PathLike,
    *,
    encoding: str | None = None,
    special_tokens: dict[str, int] | None = None,
) -> Tokenizer:
    """The tokenizer that ``spec`` names.

    Args:
        spec: ``"byte"``; a ``.gguf`` file (its embedded tokenizer); a directory holding a
            Hugging Face ``tokenizer.json`` (plus ``tokenizer_config.json`` for BOS/EOS/PAD)
            or else a SentencePiece ``tokenizer.model``; a SentencePiece ``.model`` file; or a
            tiktoken rank file ``*.tiktoken`` (see ``tiktoken_tokenizer``).
        encoding: tiktoken rank files only: the encoding whose split regex (and default special
            tokens) to use, one of ``TIKTOKEN_ENCODINGS``. Default: the file's name when it is
            one (``o200k_base.tiktoken``), else ``"cl100k_base"``.
        special_tokens: tiktoken rank files only: ``{text: id}``, replacing the encoding's.

    Returns:
        A ``Tokenizer``.

    Raises:
        ValueError: the spec is none of these, or the file describes a tokenizer this module
            cannot reproduce exactly (the message lists what is supported).
    """
    path = os.fspath(spec)
    if not path.endswith(".tiktoken") and (encoding is not None or special_tokens is not None):
        raise ValueError(
            f"Tokenizer spec {path!r}: encoding= and special_tokens= apply to tiktoken rank "
            "files (*.tiktoken) only."
        )
    if isinstance(spec, str) and spec == "byte":
        return byte_tokenizer()
    if os.path.isfile(path) and path.endswith(".tiktoken"):
        return tiktoken_tokenizer(path, encoding=encoding, special_tokens=special_tokens)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json")):
        return _hf_tokenizer(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.model")):
        return _sentencepiece_model_tokenizer(os.path.join(path, "tokenizer.model"))
    if os.path.isfile(path) and path.endswith(".gguf"):
        return _gguf_tokenizer(path)
    if os.path.isfile(path) and path.endswith(".model"):
        return _sentencepiece_model_tokenizer(path)
    problem = "does not exist" if not os.path.exists(path) else "is not a tokenizer this knows"
    raise ValueError(f"Tokenizer spec {path!r} {problem}; supported: {', '.join(SUPPORTED_SPECS)}.")


# ---------------------------------------------------------------------------------------------
# Byte-level BPE (GPT-2 style): every token is spelt in a 256-character stand-in for the bytes
# ---------------------------------------------------------------------------------------------


@functools.cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (Radford et al., 2019, ``encoder.py``).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, ...) are
    mapped, in order, to U+0100 onwards, so that a space is spelt "Ġ" (U+0120).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    others = (b for b in range(256) if b not in table)
    table.update((b, chr(0x100 + i)) for i, b in enumerate(others))
    return dict(sorted(table.items()))


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def _byte_level_bytes(token: str, token_type: int = _NORMAL) -> bytes:
    """Bytes of a byte-level token; user-defined ones are plain UTF-8, as llama.cpp reads them."""
    if token_type in (_CONTROL, _UNKNOWN, _UNUSED):
        return b""
    inverse = _unicode_to_byte()
    if token_type == _USER_DEFINED or not all(c in inverse for c in token):
        return token.encode()
    return bytes(inverse[c] for c in token)


# The original regexes of the models' tokenizer.json files; llama.cpp (src/llama-vocab.cpp) keeps
# the same table under the names GGUF's `tokenizer.ggml.pre` uses. GPT-2's own regex is built
# into pre_tokenizers.ByteLevel(use_regex=True).
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
_QWEN35_REGEX = (  # Qwen2's, with combining marks (\p{M}) inside words
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_split()])


def _regex_split(*regexes: str):
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
        name: (_regex_split(_LLAMA3_REGEX), True)
        for name in ("llama3", "llama-v3", "llama-bpe", "falcon3")
    },
    **{name: (_regex_split(_LLAMA3_REGEX), False) for name in ("dbrx", "smaug-bpe")},
    **{
        name: (_regex_split(_QWEN2_REGEX), False)
        for name in ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez")
    },
    "qwen35": (_regex_split(_QWEN35_REGEX), False),
    "deepseek-llm": (_regex_split(*_DEEPSEEK_LLM_REGEXES), False),
    "deepseek-coder": (_regex_split(*_DEEPSEEK_CODER_REGEXES), False),
    "falcon": (_regex_split(*_FALCON_REGEXES), False),
}


def _byte_level_tokenizer(
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
    table = [_byte_level_bytes(token, token_type) for token, token_type in zip(tokens, types)]
    special_ids = [i for i, t in enumerate(types) if t in (_CONTROL, _UNKNOWN, _UNUSED)]
    return Tokenizer(backend, table, special_ids=special_ids, name=name, **specials)


def _add_control_and_user_tokens(
    backend: tokenizers.Tokenizer, tokens: Sequence[str], types: Sequence[int]
) -> None:
    """Control tokens as special added tokens; user-defined ones matched whole in raw text."""
    control = [s for s, t in zip(tokens, types) if t == _CONTROL and s]
    user = [s for s, t in zip(tokens, types) if t == _USER_DEFINED and s]
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in control])
    backend.add_tokens([AddedToken(s, special=False, normalized=False) for s in user])


# ---------------------------------------------------------------------------------------------
# SentencePiece vocabularies: "▁" is a space, <0xNN> is a byte
# ---------------------------------------------------------------------------------------------


def _sentencepiece_bytes(piece: str, piece_type: int) -> bytes:
    if piece_type in (_CONTROL, _UNKNOWN, _UNUSED):
        return b""
    if piece_type == _BYTE:
        return bytes([int(piece[3:5], 16)])  # "<0xNN>"
    return piece.replace(_SPACE, " ").encode()


def _merges_by_score(
    pieces: Sequence[str], scores: Sequence[float], types: Sequence[int]
) -> list[tuple[str, str]]:
    """SentencePiece BPE as merges: every split of a normal piece into two normal pieces.

    SentencePiece (and llama.cpp) repeatedly joins the adjacent pair whose concatenation is the
    highest-scoring piece; as ``tokenizers`` merges, a pair's rank is its piece's score order
    (ties by id). User-defined pieces are matched whole before merging, so they take no part.
    """
    normal = {p: i for i, (p, t) in enumerate(zip(pieces, types)) if t == _NORMAL}
    order = sorted(normal.values(), key=lambda i: (-scores[i], i))
    merges = []
    for i in order:
        piece = pieces[i]
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                merges.append((left, right))
    return merges


def _sentencepiece_tokenizer(
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
    pieces = [p.replace(_SPACE, " ") if t == _USER_DEFINED else p for p, t in zip(pieces, types)]
    byte_fallback = _BYTE in types
    unk = next((i for i, t in enumerate(types) if t == _UNKNOWN), None)
    if unigram:
        # SentencePiece never matches control, unknown, unused or byte pieces against text, but
        # tokenizers' Unigram would: the first three get a raw space (never in normalised text)
        # in front, byte pieces (looked up by name for byte fallback) a score no real
        # segmentation prefers.
        pieces = [
            " " + p if t in (_CONTROL, _UNKNOWN, _UNUSED) else p for p, t in zip(pieces, types)
        ]
        floor = min(s for s, t in zip(scores, types) if t == _NORMAL) - 1e3
        scores = [floor if t == _BYTE else s for s, t in zip(scores, types)]
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
    prefix = [normalizers.Prepend(_SPACE)] if prefix_space else []
    backend.normalizer = normalizers.Sequence(
        [*normalizer_steps, *prefix, normalizers.Replace(" ", _SPACE)]
    )
    backend.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    _add_control_and_user_tokens(backend, pieces, types)
    table = [_sentencepiece_bytes(p, t) for p, t in zip(pieces, types)]
    special_ids = [i for i, t in enumerate(types) if t in (_CONTROL, _UNKNOWN, _UNUSED)]
    user_ids = [i for i, t in enumerate(types) if t == _USER_DEFINED]
    return Tokenizer(
        backend,
        table,
        special_ids=special_ids,
        prefix_space=prefix_space,
        prefix_after=user_ids,
        name=name,
        **specials,
    )


# ---------------------------------------------------------------------------------------------
# GGUF: the tokenizer that llama.cpp runs, read from the file's metadata
# ---------------------------------------------------------------------------------------------

# GGUF value type -> struct format (little-endian); 8 is a string, 9 an array.
_GGUF_SCALARS = {
    **{0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?"},
    **{10: "Q", 11: "q", 12: "d"},
}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: str) -> dict:
    """Every key/value of a GGUF file's header (not the tensors), as Python values.

    ``gguf.GGUFReader`` also indexes every tensor and every array element, which takes ~10 s for
    a 262k-token vocabulary; this reads only the metadata (GGUF v2/v3, little-endian).
    """
    with open(path, "rb") as f:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        if data[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (no 'GGUF' magic).")
        version, _, n_kv = struct.unpack_from("<IQQ", data, 4)
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3).")
        offset, metadata = 24, {}
        for _ in range(n_kv):
            key, offset = _gguf_string(data, offset)
            (value_type,) = struct.unpack_from("<I", data, offset)
            metadata[key], offset = _gguf_value(data, offset + 4, value_type)
        return metadata
    finally:
        data.close()


def _gguf_string(data, offset: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", data, offset)
    start = offset + 8
    return data[start : start + length].decode("utf-8", errors="surrogateescape"), start + length


def _gguf_value(data, offset: int, value_type: int):
    if value_type == _GGUF_STRING:
        return _gguf_string(data, offset)
    if value_type in _GGUF_SCALARS:
        fmt = "<" + _GGUF_SCALARS[value_type]
        return struct.unpack_from(fmt, data, offset)[0], offset + struct.calcsize(fmt)
    if value_type != _GGUF_ARRAY:
        raise ValueError(f"unknown GGUF value type {value_type}")
    item_type, count = struct.unpack_from("<IQ", data, offset)
    offset += 12
    if item_type in _GGUF_SCALARS:
        fmt = f"<{count}{_GGUF_SCALARS[item_type]}"
        return list(struct.unpack_from(fmt, data, offset)), offset + struct.calcsize(fmt)
    values = []
    for _ in range(count):
        value, offset = _gguf_value(data, offset, item_type)
        values.append(value)
    return values, offset


_GGUF_MODELS = ("gpt2 (byte-level BPE)", "llama (SentencePiece BPE)")


def _gguf_tokenizer(path: str) -> Tokenizer:
    """The tokenizer embedded in a GGUF file, as llama.cpp reads it."""
    meta = read_gguf_metadata(path)
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise ValueError(f"{path} has no embedded tokenizer (no tokenizer.ggml.model key).")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    specials = {
        f"{name}_id": meta.get(f"tokenizer.ggml.{key}_token_id")
        for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))
    }
    name = os.path.basename(path)
    if kind == "gpt2":
        if "tokenizer.ggml.merges" not in meta:
            raise ValueError(f"{path}: byte-level BPE without tokenizer.ggml.merges.")
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        pre = meta.get("tokenizer.ggml.pre", "default")
        return _byte_level_tokenizer(tokens, types, merges, pre, specials, name)
    if kind == "llama":
        return _sentencepiece_tokenizer(
            tokens,
            meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens),
            types,
            unigram=False,
            prefix_space=meta.get("tokenizer.ggml.add_space_prefix", True),  # llama.cpp default
            specials=specials,
            name=name,
        )
    raise ValueError(
        f"{path}: GGUF tokenizer model {kind!r} (tokenizer.ggml.model) is not supported; "
        f"supported: {', '.join(_GGUF_MODELS)}."
    )


# ---------------------------------------------------------------------------------------------
# SentencePiece .model files and Hugging Face tokenizer.json directories
# ---------------------------------------------------------------------------------------------

_UNIGRAM, _BPE = 1, 2  # sentencepiece TrainerSpec.ModelType


def _sentencepiece_model_tokenizer(path: str) -> Tokenizer:
    """A SentencePiece ``ModelProto`` (Unigram or BPE) with its normaliser."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    model_type, spec = proto.trainer_spec.model_type, proto.normalizer_spec
    if model_type not in (_UNIGRAM, _BPE):
        raise ValueError(
            f"{path}: SentencePiece model type {model_type} is not supported; "
            "supported: UNIGRAM (1), BPE (2)."
        )
    if not spec.escape_whitespaces or proto.trainer_spec.treat_whitespace_as_suffix:
        raise ValueError(
            f"{path}: SentencePiece models that do not mark spaces as a '▁' prefix are not "
            "supported (escape_whitespaces must be on, treat_whitespace_as_suffix off)."
        )
    pieces = [p.piece for p in proto.pieces]
    types = [p.type for p in proto.pieces]
    if _USER_DEFINED in types and (spec.add_dummy_prefix or spec.remove_extra_whitespaces):
        # SentencePiece finds user-defined pieces in the normalised text; here they split the
        # raw text first, which agrees only when normalising adds or drops no spaces.
        raise ValueError(
            f"{path}: SentencePiece models with user-defined pieces are supported only with "
            "add_dummy_prefix and remove_extra_whitespaces off (as Gemma's)."
        )
    scores = [p.score for p in proto.pieces]
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [
            normalizers.Replace(Regex(r"\A +| +\z"), ""),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    specials = {
        f"{name}_id": (i if i >= 0 else None)
        for name, i in (
            ("bos", proto.trainer_spec.bos_id),
            ("eos", proto.trainer_spec.eos_id),
            ("pad", proto.trainer_spec.pad_id),
        )
    }
    return _sentencepiece_tokenizer(
        pieces,
        scores,
        types,
        unigram=model_type == _UNIGRAM,
        prefix_space=spec.add_dummy_prefix,
        specials=specials,
        name=os.path.basename(path),
        normalizer_steps=steps,
    )


def _json_types(node) -> set[str]:
    """Every ``"type"`` value anywhere in a tokenizer.json component."""
    if isinstance(node, dict):
        found = {node["type"]} if isinstance(node.get("type"), str) else set()
        return found.union(*(_json_types(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_json_types(v) for v in node))
    return set()


def _hf_tokenizer(directory: str) -> Tokenizer:
    """A Hugging Face ``tokenizer.json`` whose vocabulary is byte-level or SentencePiece-style."""
    path = os.path.join(directory, "tokenizer.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    backend = tokenizers.Tokenizer.from_file(path)
    pipeline = {k: _json_types(config.get(k)) for k in ("normalizer", "pre_tokenizer", "decoder")}
    byte_level = "ByteLevel" in pipeline["pre_tokenizer"] | pipeline["decoder"]
    decoder = json.dumps(config.get("decoder"), ensure_ascii=False)
    spm = _SPACE in decoder or "Metaspace" in pipeline["decoder"]
    if not byte_level and not spm:
        raise ValueError(
            f"{path}: only byte-level (GPT-2 style) and SentencePiece-style ('▁', <0xNN>) "
            "vocabularies have exact token bytes; this one is neither (e.g. WordPiece)."
        )
    added = {t["id"]: t for t in config.get("added_tokens", [])}
    special_ids = {i for i, t in added.items() if t["special"]}
    unk = config["model"].get("unk_token", config["model"].get("unk_id"))
    unk = backend.token_to_id(unk) if isinstance(unk, str) else unk
    if unk is not None:
        special_ids.add(unk)
    byte_fallback = bool(config["model"].get("byte_fallback"))
    table = []
    for i in range(backend.get_vocab_size(with_added_tokens=True)):
        token = backend.id_to_token(i)
        if i in special_ids:
            table.append(b"")
        elif i in added:
            table.append(token.encode())
        elif byte_level:
            table.append(_byte_level_bytes(token))
        elif byte_fallback and len(token) == 6 and token.startswith("<0x") and token[-1] == ">":
            table.append(bytes([int(token[3:5], 16)]))
        else:
            table.append(token.replace(_SPACE, " ").encode())
    prefix_space = not byte_level and (
        "Prepend" in pipeline["normalizer"]
        or any(
            n.get("prepend_scheme") in ("always", "first") or n.get("add_prefix_space")
            for n in _json_nodes(config.get("pre_tokenizer"), "Metaspace")
        )
    )
    return Tokenizer(
        backend,
        table,
        special_ids=special_ids,
        prefix_space=bool(prefix_space),
        name=os.path.basename(os.path.normpath(directory)),
        **_hf_special_ids(directory, backend),
    )


def _json_nodes(node, type_name: str) -> list[dict]:
    if isinstance(node, dict):
        own = [node] if node.get("type") == type_name else []
        return own + [n for v in node.values() for n in _json_nodes(v, type_name)]
    if isinstance(node, list):
        return [n for v in node for n in _json_nodes(v, type_name)]
    return []


def _hf_special_ids(directory: str, backend: tokenizers.Tokenizer) -> dict[str, int | None]:
    """bos/eos/pad ids named in tokenizer_config.json (or special_tokens_map.json)."""
    named = {}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        path = os.path.join(directory, file)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                named.update({k: v for k, v in json.load(f).items() if v is not None})
    ids = {}
    for name in ("bos", "eos", "pad"):
        token = named.get(f"{name}_token")
        token = token.get("content") if isinstance(token, dict) else token
        ids[f"{name}_id"] = backend.token_to_id(token) if isinstance(token, str) else None
    return ids


# ---------------------------------------------------------------------------------------------
# tiktoken rank files: one "<base64 token bytes> <rank>" per line; the ranks are the ids
# ---------------------------------------------------------------------------------------------

# The split regexes of tiktoken's encodings (tiktoken_ext/openai_public.py), in the original
# forms that tiktoken documents as equivalent to its faster ones: Oniguruma, which `tokenizers`
# runs, reads "{1,3}+" as a repeated group rather than a possessive quantifier, and "$" as the
# end of a line. cl100k_base's is Llama-3's (which took it over).
_R50K_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_O200K_REGEX = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)
_CL100K_SPECIALS = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}
# encoding name -> (split regex, special tokens), as tiktoken 0.14 defines them.
TIKTOKEN_ENCODINGS = {
    "gpt2": (_R50K_REGEX, {"<|endoftext|>": 50256}),
    "r50k_base": (_R50K_REGEX, {"<|endoftext|>": 50256}),
    "p50k_base": (_R50K_REGEX, {"<|endoftext|>": 50256}),
    "cl100k_base": (_LLAMA3_REGEX, _CL100K_SPECIALS),
    "o200k_base": (_O200K_REGEX, {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}),
}


def read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """``{token bytes: rank}`` of a tiktoken rank file, as ``tiktoken.load.load_tiktoken_bpe``.

    Raises:
        ValueError: a line is not ``<base64> <integer>``, or a token or rank appears twice.
    """
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                token, rank = base64.b64decode(token, validate=True), int(rank)
            except (ValueError, binascii.Error):
                raise ValueError(
                    f"{path}, line {number}: {line[:60]!r} is not '<base64 token> <rank>'; "
                    "a tiktoken rank file has one such pair per line."
                ) from None
            if token in ranks:
                raise ValueError(f"{path}, line {number}: token {token!r} appears twice.")
            ranks[token] = rank
    if len(set(ranks.values())) != len(ranks):
        raise ValueError(f"{path}: two tokens share a rank; ranks must be distinct ids.")
    return ranks


def _tiktoken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """BPE merges equivalent to tiktoken's rank-greedy BPE (transformers' TikTokenConverter).

    tiktoken repeatedly joins the adjacent pair whose concatenation has the lowest rank. As
    merges: every split of each token into two tokens, ordered by the token's rank (the splits
    of one token by the ranks of their halves).
    """
    merges = []
    for token in sorted(ranks, key=ranks.__getitem__):
        halves = [(token[:k], token[k:]) for k in range(1, len(token))]
        halves = [(a, b) for a, b in halves if a in ranks and b in ranks]
        merges += sorted(halves, key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
    return merges


def tiktoken_tokenizer(
    path: str,
    *,
    encoding: str | None = None,
    special_tokens: dict[str, int] | None = None,
) -> Tokenizer:
    """A tiktoken rank file as byte-level BPE: ids are the ranks, ``token_bytes`` the file's.

    A word (a match of the split regex) that is itself a token is that token, as in tiktoken
    (``ignore_merges``); otherwise the merges of ``_tiktoken_merges`` apply. Ids that neither
    the file nor the special tokens use (cl100k_base: 100256, 100261-100275) are placeholder
    specials ``<|unused_ID|>``, so that ``vocab_size`` is tiktoken's ``n_vocab``.

    Args:
        path: the rank file.
        encoding: a name in ``TIKTOKEN_ENCODINGS`` (see ``load_tokenizer`` for the default).
        special_tokens: ``{text: id}``; default: the encoding's.

    Raises:
        ValueError: unknown encoding, a malformed file, a file without all 256 single bytes, or
            a special id that the file already uses.
    """
    stem = os.path.basename(path).removesuffix(".tiktoken")
    encoding = encoding or (stem if stem in TIKTOKEN_ENCODINGS else "cl100k_base")
    if encoding not in TIKTOKEN_ENCODINGS:
        raise ValueError(
            f"{path}: unknown tiktoken encoding {encoding!r}; supported: "
            f"{', '.join(TIKTOKEN_ENCODINGS)} (pass encoding=...)."
        )
    regex, default_specials = TIKTOKEN_ENCODINGS[encoding]
    specials = dict(default_specials if special_tokens is None else special_tokens)
    ranks = read_tiktoken_ranks(path)
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} single bytes (first {missing[0]:#04x}) have no token; "
            "byte-level BPE needs all 256."
        )
    clash = sorted(set(specials.values()) & set(ranks.values()))
    if clash:
        raise ValueError(
            f"{path}: special token id {clash[0]} is a rank of the file; pass special_tokens= "
            "with free ids."
        )
    spell = byte_to_unicode()
    tokens = ["".join(map(spell.__getitem__, token)) for token in ranks]
    vocab = dict(zip(tokens, ranks.values()))
    vocab.update(specials)
    size = max(vocab.values()) + 1
    unused = {f"<|unused_{i}|>": i for i in sorted(set(range(size)) - set(vocab.values()))}
    vocab.update(unused)
    merges = [
        ("".join(map(spell.__getitem__, a)), "".join(map(spell.__getitem__, b)))
        for a, b in _tiktoken_merges(ranks)
    ]
    backend = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=True))
    backend.pre_tokenizer = _regex_split(regex)()
    backend.decoder = decoders.ByteLevel()
    control = sorted({**specials, **unused}.items(), key=lambda item: item[1])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, _ in control])
    table = [b""] * size
    for token, rank in ranks.items():
        table[rank] = token
    return Tokenizer(
        backend,
        table,
        bos_id=None,
        eos_id=specials.get("<|endoftext|>"),
        pad_id=None,
        special_ids=[i for _, i in control],
        name=f"{os.path.basename(path)} ({encoding})",
    )


# ---------------------------------------------------------------------------------------------
# Bytes
# ---------------------------------------------------------------------------------------------

BYTE_SPECIALS = ("<pad>", "<bos>", "<eos>")


def byte_tokenizer() -> Tokenizer:
    """Ids 0..255 are the bytes themselves; 256, 257, 258 are ``<pad>``, ``<bos>``, ``<eos>``."""
    chars = byte_to_unicode()
    vocab = {chars[b]: b for b in range(256)}
    vocab.update({s: 256 + i for i, s in enumerate(BYTE_SPECIALS)})
    backend = tokenizers.Tokenizer(models.BPE(vocab, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(s, special=True, normalized=False) for s in BYTE_SPECIALS]
    )
    table = [bytes([b]) for b in range(256)] + [b""] * len(BYTE_SPECIALS)
    pad, bos, eos = range(256, 256 + len(BYTE_SPECIALS))
    return Tokenizer(
        backend,
        table,
        bos_id=bos,
        eos_id=eos,
        pad_id=pad,
        special_ids=(pad, bos, eos),
        name="byte",
    )
