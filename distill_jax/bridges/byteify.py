r"""Token ids -> the exact bytes they contribute, with special tokens given roles.

Cross-tokenizer distillation compares two tokenizations of one text by their bytes (METHODS.md
6.1). The bytes of each token come from ``Tokenizer.token_bytes`` (byte-level BPE: the GPT-2
byte alphabet undone; SentencePiece: "▁" is a space and ``<0xNN>`` is byte NN). Two things
remain for a pair of tokenizers, both handled here:

- Special tokens have no bytes. A per-family table (``SPECIAL_ROLES``) names the role of each
  (``bos``, ``eos``, ``turn_start``, ``turn_end``, ...). When a sequence pair holds a role the
  same number of times on both sides, each occurrence becomes a placeholder of equal bytes on
  both sides (``placeholder(role)``: 0xFF, the role, 0xFF; 0xFF never occurs in UTF-8 text), so
  the pair closes exactly one chunk of its own. Otherwise the role's tokens stay empty and are
  masked on both sides: they join a neighbouring chunk and their log-probs are left out.
- A SentencePiece "dummy prefix" (``Tokenizer.prefix_space``) adds a space to the text that the
  other side does not see; ``Tokenizer.text_bytes`` removes it, as ``decode`` does.

A tokenizer whose pipeline normalises text (NFKC, lower-casing, collapsing spaces) cannot be
aligned byte-exactly: ``check_byte_exact`` refuses it, naming the normaliser.

Source: bminixhofer/tokenkit ``tokenkit/byteify.py`` and ``docs/byteification.md`` (the byte
alphabet, removing normalisers); the role table and placeholders follow METHODS.md 6.2 step 1.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

from distill_jax.data.token_bytes import Tokenizer

# Token text -> role, across the families we load. Roles, not texts, are matched across sides.
SPECIAL_ROLES: dict[str, str] = {
    "<s>": "bos",
    "<bos>": "bos",
    "<|begin_of_text|>": "bos",
    "<|startoftext|>": "bos",
    "</s>": "eos",
    "<eos>": "eos",
    "<|end_of_text|>": "eos",
    "<|endoftext|>": "eos",
    "<pad>": "pad",
    "<|pad|>": "pad",
    "<|im_start|>": "turn_start",  # ChatML (SmolLM2, Qwen)
    "<start_of_turn>": "turn_start",  # Gemma
    "<|start_header_id|>": "turn_start",  # Llama 3
    "<|im_end|>": "turn_end",
    "<end_of_turn>": "turn_end",
    "<|eot_id|>": "turn_end",
    "<|end_header_id|>": "header_end",
}

# Texts a byte-exact pipeline must keep as they are: compatibility characters (NFKC folds
# them), a combining accent (NFC composes it), capitals, and whitespace runs.
_PROBES = ("ﬁ ① Ａ ²", "e\u0301", "Capital LETTERS", "a  b\t\tc\n\n d", "\u00a0x\u3000y")


def placeholder(role: str) -> bytes:
    """The bytes both sides give an occurrence of a shared special role."""
    return b"\xff" + role.encode() + b"\xff"


def special_roles(tok: Tokenizer) -> dict[int, str]:
    """{special id: role} for the special tokens of ``tok`` that ``SPECIAL_ROLES`` knows.

    Ids named by ``bos_id``/``eos_id``/``pad_id`` whose text is not in the table get those roles.
    """
    roles = {}
    for token_id in tok.special_ids:
        role = SPECIAL_ROLES.get(tok.id_to_token(token_id))
        if role is not None:
            roles[token_id] = role
    for role, token_id in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id)):
        if token_id is not None and token_id not in roles:
            roles[token_id] = role
    return roles


def check_byte_exact(tok: Tokenizer) -> None:
    """Raise unless joined token bytes reproduce the text for texts a normaliser would change.

    Raises:
        ValueError: naming the tokenizer, its normaliser and the first text it changed.
    """
    for text in _PROBES:
        got = b"".join(tok.text_bytes(tok.encode(text)))
        if got != text.encode():
            raise ValueError(
                f"Tokenizer {tok.name!r} changes the bytes of {text!r} to {got!r} (normaliser: "
                f"{tok.normalizer_name()}); cross-tokenizer alignment needs byte-exact "
                "tokenizers: load it without the normaliser (e.g. an HF tokenizer.json with "
                '"normalizer": null) or use a GGUF/byte-level version of it.'
            )


def spelt_prefix(tok: Tokenizer, ids: Sequence[int], text: str) -> int:
    """How many leading UTF-8 bytes of ``text`` the tokens ``ids`` reproduce exactly."""
    data, want = b"".join(tok.text_bytes(ids)), text.encode()
    if data == want:
        return len(want)
    return next(
        (i for i, (x, y) in enumerate(zip(data, want)) if x != y), min(len(data), len(want))
    )


def check_spelt(tok: Tokenizer, ids: Sequence[int], text: str) -> None:
    """Raise unless the text bytes of ``ids`` are exactly ``text``'s UTF-8 bytes.

    A byte-level vocabulary without some of the 256 byte tokens (SmolLM2 has no 0xF1, 0xF2 and
    a few control bytes) drops characters it cannot spell, as its reference tokenizer does;
    aligning what is left against the other side would pair the wrong bytes.

    Raises:
        ValueError: naming the tokenizer and the first character it did not reproduce.
    """
    data, want = b"".join(tok.text_bytes(ids)), text.encode()
    if data == want:
        return
    k = next((i for i, (x, y) in enumerate(zip(data, want)) if x != y), min(len(data), len(want)))
    start = min(k, len(want) - 1)
    while start > 0 and want[start] & 0xC0 == 0x80:  # back to the character's first byte
        start -= 1
    char = want[start:].decode()[:1]
    raise ValueError(
        f"Tokenizer {tok.name!r} does not reproduce the text from byte {k} (character "
        f"{char!r}: its vocabulary cannot spell it, or a normaliser changed it); remove such "
        "characters from the corpus or use a tokenizer with byte fallback."
    )


@dataclasses.dataclass(frozen=True)
class ByteView:
    """One tokenizer, seen as bytes: per-token text bytes and special roles."""

    tokenizer: Tokenizer
    roles: dict[int, str]

    @classmethod
    def of(cls, tok: Tokenizer) -> ByteView:
        """Check ``tok`` is byte-exact and collect its special roles."""
        check_byte_exact(tok)
        return cls(tok, special_roles(tok))

    def role_counts(self, ids: Sequence[int]) -> collections.Counter:
        return collections.Counter(self.roles[i] for i in ids if i in self.roles)


def byteify_pair(
    teacher: ByteView,
    teacher_ids: Sequence[int],
    student: ByteView,
    student_ids: Sequence[int],
) -> tuple[list[bytes], list[bool], list[bytes], list[bool]]:
    """Bytes and validity of every token of a teacher/student tokenization of one text.

    Returns:
        (teacher_bytes [U], teacher_valid [U], student_bytes [T], student_valid [T]): a token is
        invalid when it is a special token without a counterpart on the other side (its bytes
        are then ``b""``). Shared roles carry ``placeholder(role)`` on both sides.
    """
    t_counts, s_counts = teacher.role_counts(teacher_ids), student.role_counts(student_ids)
    shared = {r for r in t_counts if t_counts[r] == s_counts.get(r, 0)}
    t_bytes, t_valid = _side_bytes(teacher, teacher_ids, shared)
    s_bytes, s_valid = _side_bytes(student, student_ids, shared)
    return t_bytes, t_valid, s_bytes, s_valid


def _side_bytes(view: ByteView, ids: Sequence[int], shared: set[str]):
    data = view.tokenizer.text_bytes(ids)
    valid = [True] * len(data)
    for k, token_id in enumerate(ids):
        if token_id in view.tokenizer.special_ids:
            role = view.roles.get(token_id)
            if role in shared:
                data[k] = placeholder(role)
            else:
                valid[k] = False
    return data, valid
