"""pass@k, majority vote (METHODS.md 9.4-9.5 reference values) and sampling answers from a real
tokenizer (answer extraction: tests/data/answers_test.py)."""

from __future__ import annotations

import math

import pytest
from flax import nnx

import distill_jax as dj
from distill_jax.eval import gsm


@pytest.mark.parametrize(
    "n,c,k,want", [(10, 3, 1, 0.3), (10, 3, 5, 0.916667), (5, 2, 2, 0.7), (10, 0, 5, 0.0)]
)
def test_pass_at_k_reference_values(n, c, k, want):
    assert gsm.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-6)
    assert gsm.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_majority_vote_and_score():
    assert gsm.majority_vote([3.0, None, 5.0, 5.0, 3.0]) == 3.0  # tie: the first seen
    assert gsm.majority_vote([None, None]) is None
    completions = [["#### 4", "it is 5", "4"], ["1", "2", "3"]]
    out = gsm.score(completions, ["#### 4", "#### 9"], ks=(1, 2))
    assert out["pass@1"] == pytest.approx((2 / 3 + 0) / 2)
    assert out["pass@2"] == pytest.approx((1.0 + 0) / 2)
    assert out["cons@3"] == 0.5 and out["sample_accuracy"] == pytest.approx(2 / 6)
    # The model starting the next question does not count: the text is cut at the stop string.
    assert gsm.score([["#### 4\nQuestion: 1 + 1 = 2"]], ["#### 4"])["pass@1"] == 1.0


def test_sampled_answers_do_not_depend_on_the_batch_size_and_fit_the_model():
    tok = dj.data.load_tokenizer("byte")
    config = dj.models.make_config(
        "llama",
        vocab_size=264,
        hidden_size=32,
        intermediate_size=48,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        max_position_embeddings=128,
    )
    model = dj.models.Transformer(config, rngs=nnx.Rngs(0))
    questions = ["1 + 1?", "What is 2 times 3?", "7?"]
    a = gsm.sample_answers(
        model, tok, questions, n=2, max_new_tokens=8, prompt_len=40, batch_size=4
    )
    b = gsm.sample_answers(
        model, tok, questions, n=2, max_new_tokens=8, prompt_len=40, batch_size=2
    )
    assert a == b and len(a) == 3 and all(len(s) == 2 for s in a)
    assert a[0][0] != a[0][1] or a[1][0] != a[1][1]  # the samples of a question differ
    with pytest.raises(
        ValueError, match="question 0: the prompt has 25 tokens, more than prompt_len=20"
    ):
        gsm.sample_answers(model, tok, questions, max_new_tokens=8, prompt_len=20)
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        gsm.sample_answers(model, tok, questions, max_new_tokens=100, prompt_len=40)
