"""Chat templates against independent references: ids and prompt/response loss masks.

References for the ids:
- SmolLM2: the chat template embedded in its GGUF (``tokenizer.chat_template``), rendered and
  tokenised by transformers' ``apply_chat_template`` on transformers' own GGUF tokenizer.
- Gemma: the Gemma-3-270M base GGUF carries no template, so two real ones stand in. Without a
  system message, Gemma's template as llama.cpp ships it (``models/templates/
  google-gemma-2-2b-it.jinja``; Gemma-3's renders the same for text turns), through transformers.
  With one, the expected output of llama.cpp's built-in Gemma format in its own test
  (``tests/test-chat-template.cpp``, "google/gemma-7b-it"), which folds the system message into
  the first user turn as Gemma-3's template does, tokenised by transformers.
The masks are checked by decoding: the masked tokens between end markers spell each assistant
content exactly, and small hand-checked cases pin the straddling-token rule.
"""

from __future__ import annotations

import json
import os
import random
import re

import pytest
from tokenizers import pre_tokenizers

import distill_jax.data as dj_data
from distill_jax import assets
from distill_jax.data import sources

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the references load from local files only


def _transformers_gguf_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def _rendered_ids(reference, messages, add_generation_prompt: bool) -> list[int]:
    out = reference.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt
    )
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def conversations() -> list[list[dict[str, str]]]:
    """Real text: KJV verses as user/assistant turns, 1-3 exchanges, some with a system turn."""
    with open(sources.kjv_path(), encoding="utf-8") as f:
        verses = [json.loads(line)["text"] for line in f]
    rng = random.Random(0)
    result = []
    for k in range(24):
        turns = [
            {"role": role, "content": rng.choice(verses)}
            for _ in range(1 + k % 3)
            for role in ("user", "assistant")
        ]
        if k % 2:
            turns.insert(0, {"role": "system", "content": rng.choice(verses)})
        result.append(turns)
    return result


def _masked_pieces(tok, encoding, end_id: int) -> list[str]:
    """Text of the masked tokens, cut after each masked end marker."""
    pieces, current = [], []
    for token_id, masked in zip(*encoding):
        if masked and token_id == end_id:
            pieces.append(tok.decode(current))
            current = []
        elif masked:
            current.append(token_id)
    assert not current, "masked tokens after the last end marker"
    return pieces


def _assert_mask_spells_responses(tok, encoding, messages, end_text: str, strip=False) -> None:
    end_id = tok.special_token_id(end_text)
    responses = [m["content"] for m in messages if m["role"] == "assistant"]
    if strip:
        responses = [r.strip() for r in responses]
    assert _masked_pieces(tok, encoding, end_id) == responses
    assert sum(encoding.loss_mask) == sum(1 for i, m in zip(*encoding) if m and i == end_id) + sum(
        len(tok.encode(r)) for r in responses
    )  # no straddling in these texts


# --- SmolLM2: ChatML with its default system message -----------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    return dj_data.load_tokenizer(assets.smollm2_gguf_path())


@pytest.fixture(scope="module")
def smollm2_reference():
    """transformers' GGUF tokenizer with SmolLM2's pre-tokenizer (see tokenizers_test.py)."""
    reference = _transformers_gguf_tokenizer(assets.smollm2_gguf_path())
    reference.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    assert "<|im_start|>" in reference.chat_template  # the GGUF's own template
    return reference


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_smollm2_matches_its_gguf_template(
    smollm2, smollm2_reference, conversations, add_generation_prompt
):
    for messages in conversations:
        encoding = dj_data.encode_chat(
            smollm2, messages, "smollm2", add_generation_prompt=add_generation_prompt
        )
        assert encoding.ids == _rendered_ids(smollm2_reference, messages, add_generation_prompt)
        assert len(encoding.loss_mask) == len(encoding.ids)
        _assert_mask_spells_responses(smollm2, encoding, messages, "<|im_end|>")


def test_smollm2_mask_by_hand(smollm2, smollm2_reference):
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3"},
        {"role": "assistant", "content": "\n6 \n"},  # "\n" joins the header's: "\n\n"
    ]
    encoding = dj_data.encode_chat(smollm2, messages, "smollm2")
    assert encoding.ids == _rendered_ids(smollm2_reference, messages, False)
    start, end = smollm2.special_token_id("<|im_start|>"), smollm2.special_token_id("<|im_end|>")
    assert (start, end) == (1, 2)
    masked = [smollm2.decode([i]) for i, m in zip(*encoding) if m]
    assert masked == ["4", "", "\n\n", "6", " \n", ""]
    assert encoding.ids[-1] == smollm2.encode("\n")[0] and encoding.loss_mask[-1] == 0
    assert encoding.loss_mask[encoding.ids.index(end)] == 0  # the system turn's end marker


def test_chatml_keeps_a_given_system_message(smollm2, smollm2_reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chatml = dj_data.encode_chat(smollm2, messages, "chatml", add_generation_prompt=True)
    assert chatml == dj_data.encode_chat(smollm2, messages, "smollm2", add_generation_prompt=True)
    assert chatml.ids == _rendered_ids(smollm2_reference, messages, True)
    assert not any(chatml.loss_mask)
    prompt = [1, *smollm2.encode("assistant\n")]  # <|im_start|>assistant\n
    assert chatml.ids[-len(prompt) :] == prompt


# --- Gemma-3: BOS, user/model turns, system folded into the first user turn ------------------


@pytest.fixture(scope="module")
def gemma3():
    return dj_data.load_tokenizer(assets.gemma3_gguf_path())


@pytest.fixture(scope="module")
def gemma3_reference():
    return _transformers_gguf_tokenizer(assets.gemma3_gguf_path())


@pytest.fixture(scope="module")
def llama_cpp_dir() -> str:
    return assets.llama_cpp_vocab_dir()


@pytest.mark.slow
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_gemma_matches_gemma_template(
    gemma3, gemma3_reference, llama_cpp_dir, conversations, add_generation_prompt
):
    with open(os.path.join(llama_cpp_dir, "google-gemma-2-2b-it.jinja"), encoding="utf-8") as f:
        gemma3_reference.chat_template = f.read()
    padded = [{"role": "user", "content": "  Hi\n"}, {"role": "assistant", "content": " A \n"}]
    for messages in [[m for m in c if m["role"] != "system"] for c in conversations] + [padded]:
        encoding = dj_data.encode_chat(
            gemma3, messages, "gemma", add_generation_prompt=add_generation_prompt
        )
        assert encoding.ids == _rendered_ids(gemma3_reference, messages, add_generation_prompt)
        assert encoding.ids[0] == gemma3.bos_id and encoding.loss_mask[0] == 0
        _assert_mask_spells_responses(gemma3, encoding, messages, "<end_of_turn>", strip=True)


def _llama_cpp_expected_output(llama_cpp_dir: str, template_name: str) -> str:
    """``.expected_output`` of the named case in llama.cpp's tests/test-chat-template.cpp."""
    with open(os.path.join(llama_cpp_dir, "test-chat-template.cpp"), encoding="utf-8") as f:
        source = f.read()
    case = source[source.index(f'/* .name= */ "{template_name}"') :]
    literal = re.search(r'\.expected_output= \*/\s*"((?:[^"\\]|\\.)*)"', case).group(1)
    return literal.encode().decode("unicode_escape")


@pytest.mark.slow
def test_gemma_folds_the_system_message_like_llama_cpp(gemma3, gemma3_reference, llama_cpp_dir):
    conversation = [  # llama.cpp's test conversation (main_automated_tests)
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there"},
        {"role": "user", "content": "Who are you"},
        {"role": "assistant", "content": "   I am an assistant   "},
        {"role": "user", "content": "Another question"},
    ]
    expected = _llama_cpp_expected_output(llama_cpp_dir, "google/gemma-7b-it")
    assert expected.startswith("<start_of_turn>user\nYou are a helpful assistant\n\nHello")
    reference = [gemma3.bos_id, *gemma3_reference.encode(expected, add_special_tokens=False)]
    encoding = dj_data.encode_chat(gemma3, conversation, "gemma", add_generation_prompt=True)
    assert encoding.ids == reference
    _assert_mask_spells_responses(gemma3, encoding, conversation, "<end_of_turn>", strip=True)
    start, end = (gemma3.special_token_id(t) for t in ("<start_of_turn>", "<end_of_turn>"))
    assert (start, end) == (105, 106)
    model_header = [start, *gemma3.encode("model\n")]
    assert encoding.ids[-len(model_header) :] == model_header and not any(encoding.loss_mask[-3:])


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "chat_format, messages, match",
    [
        ("vicuna", [], r"Unknown chat format 'vicuna'; supported: \['chatml', 'gemma'"),
        ("chatml", [{"role": "tool", "content": "x"}], r"role 'tool'; use \['system', 'user'"),
        ("chatml", [{"role": "user", "content": 3}], r"mapping with a str 'content'"),
        ("chatml", ["hi"], r"Message 0 must be a mapping"),
        ("gemma", [{"role": "assistant", "content": "x"}], r"needs user/assistant/user"),
        (
            "gemma",
            [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
            r"Message 1 \(after a leading system message\) is 'system'",
        ),
    ],
)
def test_chat_mistakes_are_clear_errors(smollm2, chat_format, messages, match):
    with pytest.raises(ValueError, match=match):
        dj_data.encode_chat(smollm2, messages, chat_format)


def test_format_of_another_tokenizer_is_a_clear_error(smollm2):
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match=r"needs the special token '<start_of_turn>'.*lacks"):
        dj_data.encode_chat(smollm2, messages, "gemma")
    with pytest.raises(ValueError, match=r"needs the special token '<\|im_start\|>'"):
        dj_data.encode_chat(dj_data.load_tokenizer("byte"), messages, "chatml")
    with pytest.raises(ValueError, match=r"has no special token 'Hi'"):
        smollm2.special_token_id("Hi")
