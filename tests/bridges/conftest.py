"""Shared fixtures of the bridge tests."""

from __future__ import annotations

import io
import json

import pytest

from distill_jax.data import load_tokenizer, sources


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
