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
- A SentencePiece ``.model`` file (Unigram or BPE), a Hugging Face directory with
  ``tokenizer.json``, and ``"byte"`` (256 byte tokens and three specials).

Control tokens (BOS, EOS, chat markers) are never produced from text: ``encode`` treats text as
text, ``add_bos`` is the one way to get BOS. Their ``token_bytes`` is ``b""``.
"""

from __future__ import annotations

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
    its joined token bytes start with that space, which ``decode`` removes again.

    Attributes:
        vocab_size: number of ids, ``0 .. vocab_size - 1``.
        bos_id, eos_id, pad_id: special ids, None where the tokenizer has none.
        special_ids: ids whose ``token_bytes`` is ``b""`` (control, unknown, unused tokens).
        prefix_space: whether ``encode`` puts a space before the text (see above).
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

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes ``token_id`` contributes to the text (``b""`` for special tokens)."""
        return self._token_bytes[token_id]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``: their bytes joined and read as UTF-8 (see the class docstring)."""
        data = b"".join(map(self._token_bytes.__getitem__, ids))
        if self.prefix_space and data.startswith(b" "):
            data = data[1:]
        return data.decode("utf-8", errors="replace")

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


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """The tokenizer that ``spec`` names.

    Args:
        spec: ``"byte"``; a ``.gguf`` file (its embedded tokenizer); a directory holding a
            Hugging Face ``tokenizer.json`` (plus ``tokenizer_config.json`` for BOS/EOS/PAD)
            or else a SentencePiece ``tokenizer.model``; or a SentencePiece ``.model`` file.

    Returns:
        A ``Tokenizer``.

    Raises:
        ValueError: the spec is none of these, or the file describes a tokenizer this module
            cannot reproduce exactly (the message lists what is supported).
    """
    if isinstance(spec, str) and spec == "byte":
        return byte_tokenizer()
    path = os.fspath(spec)
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


def _regex_split(regex: str):
    def build() -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    return build


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
    # files already spell them so).
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
    # llama.cpp puts the dummy-prefix space before every stretch of text between matched pieces.
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
    return Tokenizer(
        backend,
        table,
        special_ids=special_ids,
        prefix_space=prefix_space,
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
