r"""Chat templates as token ids plus a loss mask: ChatML (SmolLM2) and Gemma's turn format.

``encode_chat(tok, messages, "smollm2")`` gives the ids that the model's own Jinja template,
rendered and tokenised by transformers' ``apply_chat_template``, gives, and a mask that is 1
exactly on what the model must learn to say: each assistant turn's content and its end marker.
The role header, the newline after the end marker, system and user turns, BOS and a generation
prompt are 0.

    ChatML (SmolLM2):  <|im_start|>role\ncontent<|im_end|>\n   per message
    Gemma:             <bos><start_of_turn>user\ncontent<end_of_turn>\n<start_of_turn>model\n...

Markers are the real special ids (``Tokenizer.special_token_id``); text between two markers is
encoded as one piece, as transformers does (added tokens split the text first), so BPE merges
across "role\ncontent" are the same. A token that straddles the header and the content (a
content starting with "\n" after "model\n") counts as response, like transformers'
``return_assistant_tokens_mask``, which marks every token overlapping the assistant's text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from distill_jax.data.token_bytes import Tokenizer

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """The rules of one chat template.

    Attributes:
        turn_start, turn_end: special-token texts around each turn.
        roles: message role -> the name written after ``turn_start``.
        bos: the sequence starts with the tokenizer's BOS.
        default_system: system message put first when the conversation has none (SmolLM2).
        fold_system: a leading system message becomes ``system + "\n\n"`` in front of the first
            user content, and the rest must alternate user/assistant from a user turn (Gemma).
        strip: each content loses surrounding whitespace (Gemma's ``| trim``; not the system).
    """

    turn_start: str
    turn_end: str
    roles: Mapping[str, str]
    bos: bool = False
    default_system: str | None = None
    fold_system: bool = False
    strip: bool = False


_CHATML_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
CHAT_FORMATS = {
    "chatml": ChatFormat("<|im_start|>", "<|im_end|>", _CHATML_ROLES),
    # SmolLM2-Instruct's template (tokenizer.chat_template of its GGUF): ChatML, default system.
    "smollm2": ChatFormat(
        "<|im_start|>", "<|im_end|>", _CHATML_ROLES, default_system=SMOLLM2_SYSTEM
    ),
    # Gemma-3's template (google/gemma-3-*-it): BOS, "assistant" is "model", system folded in.
    "gemma": ChatFormat(
        "<start_of_turn>",
        "<end_of_turn>",
        {"user": "user", "assistant": "model"},
        bos=True,
        fold_system=True,
        strip=True,
    ),
}


class ChatEncoding(NamedTuple):
    """``ids`` [T] and ``loss_mask`` [T] (1 on response tokens, else 0), as int lists."""

    ids: list[int]
    loss_mask: list[int]


def encode_chat(
    tok: Tokenizer,
    messages: Sequence[Mapping[str, str]],
    chat_format: str = "chatml",
    *,
    add_generation_prompt: bool = False,
) -> ChatEncoding:
    """Token ids and loss mask of a conversation in one of ``CHAT_FORMATS``.

    Args:
        tok: a tokenizer whose vocabulary has the format's markers as special tokens.
        messages: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``.
        chat_format: a key of ``CHAT_FORMATS``.
        add_generation_prompt: end with the opening of an assistant turn (mask 0), to sample
            the response from.

    Returns:
        ``ChatEncoding(ids, loss_mask)``, both of length T.

    Raises:
        ValueError: unknown format, malformed messages or role order, or a tokenizer without
            the format's special tokens.
    """
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"Unknown chat format {chat_format!r}; supported: {sorted(CHAT_FORMATS)}.")
    fmt = CHAT_FORMATS[chat_format]
    turns = _turns(fmt, messages)
    start, end = (_marker(tok, chat_format, text) for text in (fmt.turn_start, fmt.turn_end))
    ids, mask = (tok.encode("", add_bos=True), [0]) if fmt.bos else ([], [])
    for role, content in turns:
        response = role == fmt.roles["assistant"]
        run_ids, run_mask = _encode_run(tok, f"{role}\n", content, response)
        newline = tok.encode("\n")
        ids += [start, *run_ids, end, *newline]
        mask += [0, *run_mask, int(response), *[0] * len(newline)]
    if add_generation_prompt:
        prompt = tok.encode(fmt.roles["assistant"] + "\n")
        ids += [start, *prompt]
        mask += [0] * (1 + len(prompt))
    return ChatEncoding(ids, mask)


def _marker(tok: Tokenizer, chat_format: str, text: str) -> int:
    try:
        return tok.special_token_id(text)
    except ValueError:
        raise ValueError(
            f"Chat format {chat_format!r} needs the special token {text!r}, which tokenizer "
            f"{tok.name!r} lacks; choose the format of this tokenizer's model."
        ) from None


def _turns(fmt: ChatFormat, messages: Sequence[Mapping[str, str]]) -> list[tuple[str, str]]:
    """``(role name, content)`` per turn, after the format's system and whitespace rules."""
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
            raise ValueError(f"Message {i} must be a mapping with a str 'content': {message!r}.")
        if message.get("role") not in (*fmt.roles, "system"):
            raise ValueError(f"Message {i} has role {message.get('role')!r}; use {[*fmt.roles]}.")
    messages = list(messages)
    if fmt.default_system is not None and messages and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": fmt.default_system})
    if not fmt.fold_system:
        return [(fmt.roles[m["role"]], m["content"]) for m in messages]
    prefix = ""
    if messages and messages[0]["role"] == "system":
        prefix, messages = messages[0]["content"] + "\n\n", messages[1:]
    turns = []
    for i, message in enumerate(messages):
        if message["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise ValueError(
                f"Message {i} (after a leading system message) is {message['role']!r}; this "
                "format needs user/assistant/user/... turns, optionally after one system message."
            )
        content = message["content"].strip() if fmt.strip else message["content"]
        turns.append((fmt.roles[message["role"]], (prefix if i == 0 else "") + content))
    return turns


def _encode_run(
    tok: Tokenizer, header: str, content: str, response: bool
) -> tuple[list[int], list[int]]:
    """Ids of ``header + content`` as one text, and 1 on the tokens overlapping ``content``.

    Token t covers bytes [e_{t-1}, e_t) of the run, e_t = sum_{s<=t} len(token_bytes(s)); it
    is response iff ``response`` and e_t > len(header) (in bytes, after any dummy-prefix space).
    """
    text = header + content
    ids = tok.encode(text)
    lengths = [len(tok.token_bytes(i)) for i in ids]
    offset = len(header.encode()) + sum(lengths) - len(text.encode())  # dummy-prefix space
    mask, end = [], 0
    for length in lengths:
        end += length
        mask.append(int(response and end > offset))
    return ids, mask
