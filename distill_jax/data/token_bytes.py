r"""The ``Tokenizer``: text <-> ids with the exact UTF-8 bytes of every token, and its fingerprint.

Cross-tokenizer distillation compares two tokenizations of one text by their bytes, so every
tokenizer knows the exact bytes each token contributes (``token_bytes``), and
``b"".join(map(tok.token_bytes, tok.encode(text))) == text.encode()`` for every text the
vocabulary can spell without normalising it (see ``Tokenizer`` for the two exceptions).
``fingerprint`` hashes the pipeline and the byte table, so a cache can check it was written with
the same tokenizer.

How a vocabulary entry spells its bytes: byte-level BPE (GPT-2) writes each byte as one of 256
printable stand-in characters (``byte_to_unicode``, ``byte_level_bytes``); SentencePiece writes
a space as "▁" and an unspellable byte as ``<0xNN>`` (``sentencepiece_bytes``). The token types
are the ones SentencePiece's ``ModelProto`` and GGUF's ``tokenizer.ggml.token_type`` share.
The loaders of each file format: ``tokenizer_files``; ``load_tokenizer``: ``tokenizers``.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Sequence

import tokenizers

# Token types shared by SentencePiece's ModelProto and GGUF's tokenizer.ggml.token_type.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPACE = "\u2581"  # SentencePiece's visible space, "▁"


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


# ---------------------------------------------------------------------------------------------
# Token bytes of a vocabulary entry: byte-level stand-ins, SentencePiece's "▁" and <0xNN>
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


def byte_level_bytes(token: str, token_type: int = NORMAL) -> bytes:
    """Bytes of a byte-level token; user-defined ones are plain UTF-8, as llama.cpp reads them."""
    if token_type in (CONTROL, UNKNOWN, UNUSED):
        return b""
    inverse = _unicode_to_byte()
    if token_type == USER_DEFINED or not all(c in inverse for c in token):
        return token.encode()
    return bytes(inverse[c] for c in token)


def sentencepiece_bytes(piece: str, piece_type: int) -> bytes:
    if piece_type in (CONTROL, UNKNOWN, UNUSED):
        return b""
    if piece_type == BYTE:
        return bytes([int(piece[3:5], 16)])  # "<0xNN>"
    return piece.replace(SPACE, " ").encode()
