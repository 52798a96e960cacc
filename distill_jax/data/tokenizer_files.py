r"""Tokenizer loaders, one per file format; each returns a ``token_bytes.Tokenizer``.

- GGUF (``tokenizer.ggml.model`` "gpt2": byte-level BPE; "llama": SentencePiece BPE), read from
  the file's metadata as llama.cpp reads it (``read_gguf_metadata``).
- A SentencePiece ``.model`` file (Unigram or BPE, with its normaliser) and a Hugging Face
  directory with ``tokenizer.json`` (byte-level or SentencePiece-style vocabularies).
- A tiktoken rank file (``cl100k_base.tiktoken``: base64 token bytes and rank per line):
  byte-level BPE whose ids are the ranks, merges derived from the ranks, split by the regex of a
  named encoding (see ``TIKTOKEN_ENCODINGS``).
- ``byte_tokenizer``: 256 byte tokens and three specials.

``tokenizers.load_tokenizer`` picks the loader from the spec.
"""

from __future__ import annotations

import base64
import binascii
import json
import mmap
import os
import struct

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from distill_jax.data.token_bytes import (
    NORMAL,
    SPACE,
    USER_DEFINED,
    Tokenizer,
    byte_level_bytes,
    byte_to_unicode,
)
from distill_jax.data.tokenizer_pipelines import (
    LLAMA3_REGEX,
    byte_level_tokenizer,
    regex_split,
    sentencepiece_tokenizer,
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


def gguf_tokenizer(path: str) -> Tokenizer:
    """The tokenizer embedded in a GGUF file, as llama.cpp reads it."""
    meta = read_gguf_metadata(path)
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise ValueError(f"{path} has no embedded tokenizer (no tokenizer.ggml.model key).")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
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
        return byte_level_tokenizer(tokens, types, merges, pre, specials, name)
    if kind == "llama":
        return sentencepiece_tokenizer(
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


def sentencepiece_model_tokenizer(path: str) -> Tokenizer:
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
    if USER_DEFINED in types and (spec.add_dummy_prefix or spec.remove_extra_whitespaces):
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
    return sentencepiece_tokenizer(
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


def hf_tokenizer(directory: str) -> Tokenizer:
    """A Hugging Face ``tokenizer.json`` whose vocabulary is byte-level or SentencePiece-style."""
    path = os.path.join(directory, "tokenizer.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    backend = tokenizers.Tokenizer.from_file(path)
    pipeline = {k: _json_types(config.get(k)) for k in ("normalizer", "pre_tokenizer", "decoder")}
    byte_level = "ByteLevel" in pipeline["pre_tokenizer"] | pipeline["decoder"]
    decoder = json.dumps(config.get("decoder"), ensure_ascii=False)
    spm = SPACE in decoder or "Metaspace" in pipeline["decoder"]
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
            table.append(byte_level_bytes(token))
        elif byte_fallback and len(token) == 6 and token.startswith("<0x") and token[-1] == ">":
            table.append(bytes([int(token[3:5], 16)]))
        else:
            table.append(token.replace(SPACE, " ").encode())
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
    "cl100k_base": (LLAMA3_REGEX, _CL100K_SPECIALS),
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
    backend.pre_tokenizer = regex_split(regex)()
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
