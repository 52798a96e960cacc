"""Shared fixtures of the bridge tests."""

from __future__ import annotations

import io
import json
import os

import pytest

from distill_jax import assets
from distill_jax.data import load_tokenizer, sources


@pytest.fixture(scope="session")
def tokenizers() -> dict:
    """The real tokenizers of the bridge tests, loaded once: SmolLM2 and Gemma-3 from their
    GGUFs, the byte tokenizer, and llama.cpp's vocab-only GGUFs of four other families."""
    vocab = assets.llama_cpp_vocab_dir()
    return {
        "smollm2": load_tokenizer(assets.smollm2_gguf_path()),
        "gemma3": load_tokenizer(assets.gemma3_gguf_path()),
        "byte": load_tokenizer("byte"),
        **{
            name: load_tokenizer(os.path.join(vocab, f"ggml-vocab-{name}.gguf"))
            for name in ("llama-spm", "qwen2", "gpt-2", "phi-3")
        },
    }


@pytest.fixture(scope="session")
def kjv_sentencepiece(tmp_path_factory):
    import sentencepiece as spm

    with open(sources.kjv_path(), encoding="utf-8") as f:
        verses = [json.loads(line)["text"] for line in f][::10]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(verses),
        model_writer=proto,
        vocab_size=800,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("spm") / "kjv.model"
    path.write_bytes(proto.getvalue())
    return load_tokenizer(path)
