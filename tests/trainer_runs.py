"""Running the trainer on the tiny configs, shared by the loop, resume and launch tests."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "tiny_kd.py")
ALM_CONFIG = os.path.join(ROOT, "configs", "tiny_alm.py")  # cross-tokenizer (bridges)
PAIRS_CONFIG = os.path.join(ROOT, "configs", "tiny_pairs.py")  # preference pairs (pair terms)


def tiny(config=CONFIG, **overrides):
    spec = importlib.util.spec_from_file_location("tiny_config", config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(",".join(f"{k}={v!r}" for k, v in overrides.items()) or None)


def cmd(workdir, *flags, config_arg="", config=CONFIG):
    return [
        sys.executable,
        "-m",
        "distill_jax.main",
        f"--config={config}{config_arg}",
        f"--workdir={workdir}",
        *flags,
    ]


def losses(workdir) -> dict[int, float]:
    """step -> train loss; a resumed run logs some steps again, the last entry counts."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "train/loss" in row:
                out[row["step"]] = row["train/loss"]
    return out


def wait_for_step(workdir, step, proc, timeout=300):
    path = os.path.join(workdir, "metrics.jsonl")
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"run ended early with {proc.returncode}")
        if os.path.exists(path) and max(losses(workdir), default=0) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached")


def checkpoint_params(workdir, step) -> list:
    """The student's parameter leaves saved in checkpoint ``step`` of ``workdir`` (NumPy)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")))
    args = ocp.args.Composite(state=ocp.args.StandardRestore())
    state = manager.restore(step, args=args).state
    return [np.asarray(x) for x in jax.tree.leaves(state["params"]["student"])]


def write_pairs(out_dir, num_problems=40, seed=0) -> str:
    """A seqkd dataset (``data.seqkd.write_dataset``) of small sums: per problem a worked answer
    and one with a wrong final number, sorted by the real verifier (``split_traces``) into a
    positive and a negative, so pairs.jsonl has one pair per problem. Returns ``out_dir``."""
    import random

    from distill_jax.data import load_tokenizer, seqkd

    rng = random.Random(seed)
    problems, completions = [], []
    for _ in range(num_problems):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        wrong = a + b + rng.choice([-10, -1, 1, 2, 10])
        problems.append({"question": f"What is {a} + {b}?", "solution": f"#### {a + b}"})
        completions.append([f" {a} + {b} = {a + b}. #### {a + b}", f" {a} + {b} = {wrong}."])
    positives, negatives = seqkd.split_traces(problems, completions)
    manifest = {"teacher": "fixture: sums", "tokenizer": load_tokenizer("byte").fingerprint}
    seqkd.write_dataset(str(out_dir), positives, negatives, manifest)
    return str(out_dir)
