"""GSM answer extraction, pass@k, majority vote (METHODS.md 9.4-9.5 reference values), the
verifier-filtered sequence-level KD dataset, and sampling answers from a real tokenizer."""

from __future__ import annotations

import json
import math
import os

import pytest
from flax import nnx

import distill_jax as dj
from distill_jax.data import seqkd
from distill_jax.eval import gsm


@pytest.mark.parametrize(
    "text,want",
    [
        ("so the total is 34.\n#### 1,234", 1234.0),
        ("#### $18.00.", 18.0),
        ("#### -3.5", -3.5),
        ("42", 42.0),
    ],
)
def test_reference_extraction(text, want):
    assert gsm.extract_reference(text) == want


@pytest.mark.parametrize(
    "text,mode,want",
    [
        ("He pays 3 * 6 = 18 dollars, so $18.00.", "flexible", 18.0),
        ("The answer is 1,234.", "strict", 1234.0),
        ("blah #### -7", "strict", -7.0),
        ("so 5 apples and 7 pears", "strict", None),
        ("so 5 apples and 7 pears", "flexible", 7.0),
        (r"thus \boxed{0.25} in all, 3 left", "flexible", 0.25),
        ("no number here", "flexible", None),
    ],
)
def test_answer_extraction(text, mode, want):
    assert gsm.extract_answer(text, mode) == want


def test_is_correct_compares_numbers():
    assert gsm.is_correct(18.0, gsm.extract_reference("#### 18"))
    assert not gsm.is_correct(None, 18.0)
    assert not gsm.is_correct(18.01, 18.0)


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


def test_the_verifier_keeps_exactly_the_traces_with_matching_answers(tmp_path):
    problems = [
        {"question": "2 + 2?", "solution": "2 + 2 = 4\n#### 4", "answer": "4"},
        {"question": "3 * 3?", "solution": "#### 9", "answer": "9"},
    ]
    completions = [["It is 4.", "It is 5.", "2 + 2 = 4 #### 4"], ["I think 6", "9"]]
    pos, neg = seqkd.split_traces(problems, completions)
    assert [(r["problem"], r["sample"]) for r in pos] == [(0, 0), (0, 2), (1, 1)]
    assert [(r["problem"], r["sample"]) for r in neg] == [(0, 1), (1, 0)]
    manifest = seqkd.write_dataset(str(tmp_path / "ds"), pos, neg, {"teacher": "fixture"})
    assert manifest["pass_rate"] == pytest.approx(3 / 5)
    assert manifest["counts"] == {"positives": 3, "negatives": 2, "pairs": 2}
    rows = [json.loads(x) for x in open(tmp_path / "ds" / "positives.jsonl")]
    assert rows[0]["prompt"] == "Question: 2 + 2?\nAnswer:" and rows[0]["completion"] == "It is 4."
    pairs = [json.loads(x) for x in open(tmp_path / "ds" / "pairs.jsonl")]
    assert pairs[0] == {
        "prompt": rows[0]["prompt"],
        "chosen": "It is 4.",
        "rejected": "It is 5.",
        "problem": 0,
    }
    with pytest.raises(FileExistsError, match="already holds a dataset"):
        seqkd.write_dataset(str(tmp_path / "ds"), pos, neg, {})
    assert sorted(os.listdir(tmp_path)) == ["ds"]  # no temporary directory left behind


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
