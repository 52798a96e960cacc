"""The verifier-filtered sequence-level KD dataset: positives, negatives, pairs, manifest, atomic
write (the teacher's sampling: ``teachers.build_seqkd_dataset``, run by tests/eval/run_test.py)."""

from __future__ import annotations

import json
import os

import pytest

from distill_jax.data import seqkd


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
