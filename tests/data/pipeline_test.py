"""The input iterator on real text: decodes back to the source, deterministic order, exact
resume in a fresh process, disjoint covering shards on 2 processes, clear errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from distill_jax import assets
from distill_jax.data import packing, pipeline, sources
from distill_jax.data.tokenizers import load_tokenizer

WORKER = os.path.join(os.path.dirname(__file__), "pipeline_worker.py")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(assets.smollm2_gguf_path())


def _segment_tokens(batch):
    """Each segment's token ids (inputs then the last target), in batch order."""
    out = []
    for r in range(batch["input_ids"].shape[0]):
        seg = batch["segment_ids"][r]
        for s in range(1, seg.max() + 1):
            w = seg == s
            out.append(np.append(batch["input_ids"][r][w], batch["targets"][r][w][-1]).tolist())
    return out


def test_batches_decode_back_to_the_chapters(tok):
    chapters = sources.kjv_chapters()[:12]
    texts = [t for _, t in chapters]
    it = pipeline.TokenBatches(
        texts,
        pipeline.text_encoder(tok),
        seq_len=2048,
        global_batch_size=2,
        num_epochs=1,
        shuffle=False,
        process_index=0,
        process_count=1,
    )
    decoded = []
    for batch in it:
        assert all(v.shape == (2, 2048) for v in batch.values())
        decoded += [tok.decode(ids[1:-1]) for ids in _segment_tokens(batch)]
    assert sorted(decoded) == sorted(texts)  # every chapter once, byte-exact


def test_order_is_seeded_and_epochs_cover_the_corpus():
    docs = [[i, i, i] for i in range(30)]  # 2 pairs each: one document fills a row of 2
    make = lambda seed: pipeline.TokenBatches(
        docs,
        lambda d: d,
        seq_len=2,
        global_batch_size=3,
        seed=seed,
        num_epochs=2,
        process_index=0,
        process_count=1,
    )
    first = [b["input_ids"][:, 0].tolist() for b in make(0)]
    again = [b["input_ids"][:, 0].tolist() for b in make(0)]
    other = [b["input_ids"][:, 0].tolist() for b in make(1)]
    assert first == again and first != other
    flat = sum(first, [])
    assert sorted(flat[:30]) == list(range(30)) and sorted(flat[30:]) == list(range(30))
    assert flat[:30] != flat[30:]  # each epoch has its own permutation


def test_resume_in_a_fresh_process_equals_never_stopping(tmp_path):
    state = tmp_path / "state.json"
    run = lambda *a: subprocess.run([sys.executable, WORKER, "resume", *a], check=True)
    run(str(tmp_path / "straight.npz"), str(tmp_path / "unused.json"), "9", "0")
    run(str(tmp_path / "part1.npz"), str(state), "4", "0")
    run(str(tmp_path / "part2.npz"), str(state), "0", "5", "restore")
    straight = np.load(tmp_path / "straight.npz")
    parts = [np.load(tmp_path / "part1.npz"), np.load(tmp_path / "part2.npz")]
    resumed = {
        f"{i}/{k.split('/')[1]}": parts[0][k] for k in parts[0] for i in [int(k.split("/")[0])]
    }
    resumed |= {f"{int(k.split('/')[0]) + 4}/{k.split('/')[1]}": parts[1][k] for k in parts[1]}
    assert sorted(resumed) == sorted(straight.files)
    for key in straight.files:
        np.testing.assert_array_equal(resumed[key], straight[key], err_msg=key)
    saved = json.loads(state.read_text())
    assert saved["config"]["seed"] == 3 and saved["emitted"] == 4


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_read_disjoint_shards_that_cover_the_data(tmp_path):
    prefix, port = str(tmp_path / "host"), str(_free_port())
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen([sys.executable, WORKER, "multihost", prefix, str(i), port], env=env)
        for i in range(2)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    out = [np.load(f"{prefix}{i}.npz") for i in range(2)]
    assert out[0]["devices"].tolist() == [4, 2]
    seen = [set(o["seen"].tolist()) for o in out]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(50))
    # The global batch is the two local batches stacked, process 0's rows first.
    for o in out:
        np.testing.assert_array_equal(
            o["full"], np.concatenate([out[0]["local"], out[1]["local"]], 1)
        )
    assert out[0]["local"].shape == out[1]["local"].shape == (12, 2, 16)


def test_state_of_other_settings_is_refused_by_name():
    docs = [[1, 2, 3]] * 10
    a = pipeline.TokenBatches(
        docs, lambda d: d, seq_len=8, global_batch_size=2, process_count=1, process_index=0
    )
    next(a)
    b = pipeline.TokenBatches(
        docs, lambda d: d, seq_len=8, global_batch_size=2, seed=5, process_count=1, process_index=0
    )
    with pytest.raises(ValueError, match="seed=0 but this iterator has seed=5"):
        b.set_state(a.get_state())


def test_bad_inputs_are_clear_errors(tok):
    with pytest.raises(ValueError, match="corpus is empty"):
        pipeline.TokenBatches([], lambda d: d, seq_len=8, global_batch_size=2)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        pipeline.TokenBatches(
            [[1, 2]], lambda d: d, seq_len=8, global_batch_size=4, process_count=3, process_index=0
        )
    long = pipeline.TokenBatches(
        ["word " * 400],
        pipeline.text_encoder(tok),
        seq_len=64,
        global_batch_size=1,
        name="kjv",
        process_index=0,
        process_count=1,
    )
    with pytest.raises(ValueError, match=r"kjv\[0\] has \d+ tokens.*long_documents='split'"):
        next(long)


def test_finite_iterator_pads_instead_of_dropping():
    docs = [[i, i + 1] for i in range(5)]  # 5 one-pair documents
    it = pipeline.TokenBatches(
        docs,
        lambda d: d,
        seq_len=1,
        global_batch_size=2,
        num_epochs=1,
        shuffle=False,
        process_index=0,
        process_count=1,
    )
    batches = list(it)
    assert len(batches) == 3
    assert batches[-1]["loss_mask"].tolist() == [[True], [False]]
    assert sorted(
        int(b["input_ids"][r, 0]) for b in batches for r in range(2) if b["segment_ids"][r, 0]
    ) == list(range(5))
    assert packing.FIELDS == tuple(batches[0])
