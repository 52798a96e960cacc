r"""Tokenizers with exact token bytes: GGUF, Hugging Face ``tokenizer.json``, SentencePiece, bytes.

Cross-tokenizer distillation compares two tokenizations of one text by their bytes, so every
tokenizer here knows the exact UTF-8 bytes each token contributes (``token_bytes``), and
``b"".join(map(tok.token_bytes, tok.encode(text))) == text.encode()`` for every text the
vocabulary can spell without normalising it (see ``Tokenizer`` for the two exceptions).

All tokenizers run on the Rust ``tokenizers`` library (pipelines: ``tokenizer_pipelines``; one
loader per format: ``tokenizer_files``; the ``Tokenizer`` and its byte table: ``token_bytes``):

- GGUF ``tokenizer.ggml.model == "gpt2"``: byte-level BPE with the file's merges, split first by
  the regex that ``tokenizer.ggml.pre`` names (the same table llama.cpp's ``llama-vocab.cpp``
  keeps; see ``tokenizer_pipelines._BYTE_LEVEL_PRE_TOKENIZERS``).
- GGUF ``"llama"``: SentencePiece BPE as llama.cpp runs it: spaces become "▁", adjacent symbols
  merge best-score-first, characters outside the vocabulary fall back to ``<0xNN>`` byte tokens,
  and user-defined pieces (Gemma's "\n\n", "<table>", runs of spaces) are matched whole first.
- A tiktoken rank file (``cl100k_base.tiktoken``: base64 token bytes and rank per line): byte-level
  BPE whose ids are the ranks, merges derived from the ranks, split by the regex of a named
  encoding (``load_tokenizer(path, encoding="o200k_base")``; see
  ``tokenizer_files.TIKTOKEN_ENCODINGS``).
- A SentencePiece ``.model`` file (Unigram or BPE), a Hugging Face directory with
  ``tokenizer.json``, and ``"byte"`` (256 byte tokens and three specials).

Control tokens (BOS, EOS, chat markers) are never produced from text: ``encode`` treats text as
text, ``add_bos`` is the one way to get BOS. Their ``token_bytes`` is ``b""``.
"""

from __future__ import annotations

import os

from distill_jax.data.token_bytes import Tokenizer
from distill_jax.data.tokenizer_files import (
    byte_tokenizer,
    gguf_tokenizer,
    hf_tokenizer,
    sentencepiece_model_tokenizer,
    tiktoken_tokenizer,
)

SUPPORTED_SPECS = (
    "a .gguf file (tokenizer.ggml.model 'gpt2' or 'llama')",
    "a Hugging Face directory with tokenizer.json",
    "a SentencePiece .model file",
    "a tiktoken rank file (.tiktoken)",
    "'byte'",
)


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
        return hf_tokenizer(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.model")):
        return sentencepiece_model_tokenizer(os.path.join(path, "tokenizer.model"))
    if os.path.isfile(path) and path.endswith(".gguf"):
        return gguf_tokenizer(path)
    if os.path.isfile(path) and path.endswith(".model"):
        return sentencepiece_model_tokenizer(path)
    problem = "does not exist" if not os.path.exists(path) else "is not a tokenizer this knows"
    raise ValueError(f"Tokenizer spec {path!r} {problem}; supported: {', '.join(SUPPORTED_SPECS)}.")
