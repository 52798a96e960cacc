"""Preference pairs as step batches (``data.pairs``): rows written out by hand for the byte
tokenizer (loss on the response tokens only), the pairs.jsonl and manifest that
``seqkd.write_dataset`` writes, errors that name the file, long pairs, resumable order, and
process blocks that add up to the global batch."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from trainer_runs import write_pairs

from distill_jax.data import load_tokenizer, pairs, seqkd

PAD, BOS, EOS = 256, 257, 258  # the byte tokenizer's specials


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("byte")


def test_a_row_puts_the_loss_on_the_response_tokens_only(tok):
    row = pairs.encode_pair(tok, {"prompt": "Q?", "chosen": "ab", "rejected": "c"}, seq_len=8)
    q, qm, a, b, c = map(ord, "Q?abc")
    np.testing.assert_array_equal(row["input_ids"], [BOS, q, qm, a, b, EOS, PAD, PAD])
    np.testing.assert_array_equal(row["targets"], [q, qm, a, b, EOS, PAD, 0, 0])
    # column j predicts input_ids[j + 1]: the predictions of "a", "b" and EOS carry the loss
    np.testing.assert_array_equal(row["loss_mask"], [0, 0, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 3, 4, 5, 0, 0])
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(row["rejected_input_ids"], [BOS, q, qm, c, EOS, PAD, PAD, PAD])
    np.testing.assert_array_equal(row["rejected_loss_mask"], [0, 0, 1, 1, 0, 0, 0, 0])
    assert set(row) == set(pairs.FIELDS)


def test_long_pairs_fail_truncate_or_drop(tok):
    rec = {"prompt": "Q?", "chosen": "abcdefgh", "rejected": "c"}
    with pytest.raises(ValueError, match=r"pair \(chosen\): prompt \+ response are 12 tokens"):
        pairs.encode_pair(tok, rec, seq_len=8)
    assert pairs.encode_pair(tok, rec, seq_len=8, long_pairs="drop") is None
    row = pairs.encode_pair(tok, rec, seq_len=8, long_pairs="truncate")
    np.testing.assert_array_equal(row["input_ids"], [BOS, *b"Q?abcde"])  # no EOS: cut
    np.testing.assert_array_equal(row["loss_mask"], [0, 0, 1, 1, 1, 1, 1, 0])  # a..e
    long_prompt = {"prompt": "x" * 9, "chosen": "a", "rejected": "b"}
    assert pairs.encode_pair(tok, long_prompt, seq_len=8, long_pairs="drop") is None
    with pytest.raises(ValueError, match="more than prompt_len=7"):
        pairs.encode_pair(tok, long_prompt, seq_len=8, long_pairs="truncate")


def test_reads_what_seqkd_writes_from_the_directory_or_the_file(tmp_path):
    out = write_pairs(tmp_path / "sk", num_problems=6)
    lines = [json.loads(x) for x in open(os.path.join(out, "pairs.jsonl"))]
    records, info = pairs.read_pairs(out)
    assert records == lines and len(records) == 6
    assert info["manifest"]["counts"]["pairs"] == 6
    assert info["file"] == os.path.join(out, "pairs.jsonl")
    again, info2 = pairs.read_pairs(os.path.join(out, "pairs.jsonl"))
    assert again == records and info2["sha256"] == info["manifest"]["files"]["pairs.jsonl"]


def test_missing_empty_and_edited_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path='/no/where'.*--mode=seqkd"):
        pairs.read_pairs("/no/where")
    pos = [{"prompt": "Q", "completion": "A", "problem": 0, "sample": 0}]
    seqkd.write_dataset(str(tmp_path / "empty"), pos, [], {"teacher": "fixture"})
    file = str(tmp_path / "empty" / "pairs.jsonl")
    with pytest.raises(ValueError, match=re.escape(f"{file} holds no pairs")):
        pairs.read_pairs(str(tmp_path / "empty"))
    out = write_pairs(tmp_path / "sk", num_problems=3)
    with open(os.path.join(out, "pairs.jsonl"), "a") as f:
        f.write(json.dumps({"prompt": "Q", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(ValueError, match="differs from the pairs.jsonl that .*manifest.json"):
        pairs.read_pairs(out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Q", "chosen": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: no field 'rejected'"):
        pairs.read_pairs(str(bad))


def _records(n):
    return [
        {"prompt": f"Question {i}:", "chosen": f" yes {i}", "rejected": f" no {i * 7}"}
        for i in range(n)
    ]


def test_batches_keep_pairs_together_resume_and_split_by_process(tok):
    kw = dict(seq_len=24, global_batch_size=4, seed=3)
    it = pairs.PairBatches(_records(10), tok, **kw)
    first = [next(it) for _ in range(3)]  # 12 rows: crosses the 10-pair epoch
    for batch in first:
        assert all(batch[k].shape == (4, 24) for k in pairs.FIELDS)
        for b in range(4):  # both sides of a row are one record's: the same prompt prefix
            n = int(np.argmax(batch["loss_mask"][b])) + 1
            np.testing.assert_array_equal(
                batch["input_ids"][b, :n], batch["rejected_input_ids"][b, :n]
            )
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint holds
    rest = [next(it) for _ in range(2)]
    resumed = pairs.PairBatches(_records(10), tok, **kw)
    resumed.set_state(state)
    for want in rest:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in pairs.FIELDS)
    halves = [
        pairs.PairBatches(_records(10), tok, process_index=i, process_count=2, **kw)
        for i in range(2)
    ]
    whole = pairs.PairBatches(_records(10), tok, **kw)
    for _ in range(3):
        a, b, w = next(halves[0]), next(halves[1]), next(whole)
        np.testing.assert_array_equal(np.concatenate([a["targets"], b["targets"]]), w["targets"])
    other = pairs.PairBatches(_records(10), tok, **dict(kw, seed=4))
    with pytest.raises(ValueError, match="saved data state is of other pair batches"):
        other.set_state(state)


def test_a_finite_run_repeats_a_row_rather_than_change_shape(tok):
    it = pairs.PairBatches(_records(5), tok, seq_len=24, global_batch_size=4, num_epochs=1)
    a, b = next(it), next(it)
    assert b["input_ids"].shape == (4, 24)
    np.testing.assert_array_equal(b["input_ids"][1], b["input_ids"][3])  # row 5 of 5, repeated
    rows = {tuple(r) for r in np.concatenate([a["input_ids"], b["input_ids"]])}
    assert len(rows) == 5
    with pytest.raises(StopIteration):
        next(it)
