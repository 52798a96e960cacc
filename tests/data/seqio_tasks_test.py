"""seqio Tasks and Mixtures over real corpora, tokenized by SmolLM2's tokenizer, packed by seqio.

The key check: packed KJV rows decode back to the chapters as read from kjv.jsonl directly.
GSM examples are compared with reasoning-gym's own output.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import seqio  # noqa: E402  (the "data" extra, always installed by make)
import tensorflow as tf  # noqa: E402

from distill_jax import assets  # noqa: E402
from distill_jax.data import seqio_tasks, sources  # noqa: E402
from distill_jax.data.tokenizers import load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(assets.smollm2_gguf_path())


def _kjv_chapters_from_jsonl() -> list[str]:
    """The reference: verses of each chapter joined by spaces, read straight from the file."""
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(sources.kjv_path(), encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
    return [" ".join(verses) for verses in chapters.values()]


def test_vocabulary_adapts_the_tokenizer(tok):
    vocab = seqio_tasks.TokenizerVocabulary(tok)
    texts = ["In the beginning God created", "", "naïve café, 12 ÷ 4 = 3"]
    assert vocab.vocab_size == tok.vocab_size == 49152 and vocab.eos_id == tok.eos_id
    assert vocab.encode_tf(tf.constant(texts[0])).numpy().tolist() == tok.encode(texts[0])
    ragged = vocab.encode_tf(tf.constant(texts))
    assert ragged.to_list() == [tok.encode(t) for t in texts]
    dense = tf.ragged.constant([[*tok.encode(t), tok.eos_id, 17] for t in texts]).to_tensor()
    assert [t.decode() for t in vocab.decode_tf(dense).numpy()] == texts  # stops at EOS
    assert vocab.decode_tf(tf.constant(tok.encode(texts[2]))).numpy().decode() == texts[2]
    assert vocab.decode([*tok.encode(texts[0]), 0, 0]) == texts[0]  # 0 is padding
    again = seqio_tasks.TokenizerVocabulary(assets.smollm2_gguf_path())
    assert again == vocab and hash(again) == hash(vocab)
    assert seqio_tasks.TokenizerVocabulary("byte") != vocab


def test_vocabulary_refuses_text_that_encodes_to_the_padding_id():
    vocab = seqio_tasks.TokenizerVocabulary("byte")
    assert vocab.encode("ab") == [97, 98]
    with pytest.raises(ValueError, match="id 0, which seqio reserves for padding"):
        vocab.encode("a\x00b")


def _check_packed_row(row: dict, length: int) -> list[np.ndarray]:
    """Asserts LMFeatureConverter's invariants on one row; returns its segments' tokens."""
    assert all(v.shape == (length,) and v.dtype == np.int32 for v in row.values())
    targets, inputs = row["decoder_target_tokens"], row["decoder_input_tokens"]
    segment_ids, positions = row["decoder_segment_ids"], row["decoder_positions"]
    used = np.count_nonzero(segment_ids)
    assert used > 0 and not segment_ids[used:].any() and not targets[used:].any()
    assert segment_ids[0] == 1 and set(np.diff(segment_ids[:used])) <= {0, 1}
    np.testing.assert_array_equal(row["decoder_loss_weights"], segment_ids > 0)
    segments = []
    for segment in range(1, segment_ids.max() + 1):
        (where,) = np.nonzero(segment_ids == segment)
        np.testing.assert_array_equal(positions[where], np.arange(len(where)))
        assert inputs[where[0]] == 0  # each segment starts afresh
        np.testing.assert_array_equal(inputs[where[1:]], targets[where[:-1]])
        segments.append(targets[where])
    return segments


def test_kjv_task_packs_to_rows_that_decode_to_the_source_chapters(tok):
    length = 128
    task = seqio_tasks.register_kjv_task(tok, name="test.kjv")
    assert seqio_tasks.register_kjv_task(tok, name="test.kjv") is seqio.get_mixture_or_task(
        "test.kjv"
    )  # registering twice replaces the Task, no duplicate error
    assert task.splits == ("train", "validation")
    dataset = task.get_dataset({"targets": length}, split="validation", shuffle=False)
    packed = seqio.LMFeatureConverter(pack=True)(dataset, {"targets": length})
    rows = list(packed.as_numpy_iterator())
    segments = [s for row in rows for s in _check_packed_row(row, length)]
    assert any(len(s) < length for s in segments) and max(map(len, segments)) == length

    # A document's pieces are consecutive: all but its last are full rows' worth, only the
    # last ends with EOS; each piece decodes to the next slice of the chapter.
    documents, current = [], []
    for tokens in segments:
        assert np.count_nonzero(tokens == tok.eos_id) <= 1
        current.append(tok.decode(tokens[tokens != tok.eos_id].tolist()))
        if tokens[-1] == tok.eos_id:
            documents.append("".join(current))
            current = []
        else:
            assert len(tokens) == length
    assert not current
    chapters = _kjv_chapters_from_jsonl()
    _, held_out = sources.held_out_split(chapters, fraction=0.02, seed=0)
    assert len(held_out) == 24 and documents == held_out
    n_tokens = sum(len(s) for s in segments)
    assert n_tokens == sum(len(tok.encode(c)) + 1 for c in held_out)  # nothing dropped


def test_gsm_task_has_question_inputs_and_solution_targets(tok):
    import reasoning_gym

    task = seqio_tasks.register_gsm_task(tok, name="test.gsm", num_problems=200, generator_seed=3)
    generated = reasoning_gym.create_dataset("gsm_symbolic", size=400, seed=3)
    distinct = {}  # reasoning-gym repeats a question in the first 200; the repeat is skipped
    for item in generated:
        distinct.setdefault(item["question"], item)
    reference = list(distinct.values())[:200]
    assert len(reference) == 200 and reference[-1]["metadata"]["source_index"] == 200
    _, held_out = sources.held_out_split(reference, fraction=0.02, seed=0)
    lengths = {"inputs": 256, "targets": 256}
    examples = list(
        task.get_dataset(lengths, split="validation", shuffle=False).as_numpy_iterator()
    )
    assert len(examples) == len(held_out) == 4
    for example, problem in zip(examples, held_out, strict=True):
        assert tok.decode(example["inputs"].tolist()) == problem["question"]
        assert example["targets"][-1] == tok.eos_id and tok.eos_id not in example["inputs"]
        assert tok.decode(example["targets"][:-1].tolist()) == problem["metadata"]["answer_cot"]

    packed = seqio.PrefixLMFeatureConverter(pack=True)(
        task.get_dataset(lengths, split="validation", shuffle=False), lengths
    )
    row = next(packed.as_numpy_iterator())
    first = examples[0]
    n_in, n_out = len(first["inputs"]), len(first["targets"])
    np.testing.assert_array_equal(
        row["decoder_target_tokens"][: n_in + n_out],
        np.concatenate([first["inputs"], first["targets"]]),
    )
    np.testing.assert_array_equal(row["decoder_loss_weights"][:n_in], 0)  # no loss on prompt
    np.testing.assert_array_equal(row["decoder_loss_weights"][n_in : n_in + n_out], 1)


def test_over_long_pairs_raise_instead_of_being_cut(tok):
    task = seqio_tasks.register_gsm_task(tok, name="test.gsm_short", num_problems=50)
    dataset = task.get_dataset({"inputs": 8, "targets": 256}, split="validation", shuffle=False)
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"inputs.* is longer than sequence_length.* = 8 tokens",
    ):
        list(dataset.as_numpy_iterator())


def test_mixture_samples_tasks_at_their_rates(tok, tmp_path):
    records = [f"Record {i}: the quick brown fox jumps over the lazy dog." for i in range(200)]
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in records))
    seqio_tasks.register_kjv_task(tok, name="test.mix_kjv")
    seqio_tasks.register_jsonl_task("test.mix_records", path, tok, fraction=0.1)
    mixture = seqio_tasks.register_mixture("test.mix", {"test.mix_kjv": 3, "test.mix_records": 1})
    mixture = seqio_tasks.register_mixture("test.mix", {"test.mix_kjv": 3, "test.mix_records": 1})
    assert mixture is seqio.get_mixture_or_task("test.mix")
    dataset = mixture.get_dataset({"targets": 64}, split="validation", shuffle=False, seed=0)
    texts = [tok.decode(ex["targets"].tolist()) for ex in dataset.take(400).as_numpy_iterator()]
    kjv_text = " ".join(_kjv_chapters_from_jsonl())
    from_records = [t in records for t in texts]
    assert all(t in kjv_text for t, r in zip(texts, from_records) if not r)
    assert 0.15 < np.mean(from_records) < 0.35  # rate 1 / (3 + 1)


def test_bad_inputs_fail_at_registration(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        seqio_tasks.register_text_files_task("test.missing", tmp_path / "missing.txt", tok)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.txt.*holds no documents"):
        seqio_tasks.register_text_files_task("test.empty", tmp_path / "empty.txt", tok)
    (tmp_path / "one.txt").write_text("a single paragraph\n")
    with pytest.raises(ValueError, match="needs at least 2"):
        seqio_tasks.register_text_files_task("test.one", tmp_path / "one.txt", tok)
    with pytest.raises(ValueError, match="'solution' or 'answer'"):
        seqio_tasks.register_gsm_task(tok, target="cot")
