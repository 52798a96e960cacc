"""The --mode=eval_gsm | eval_speculative | seqkd entry points on the tiny config (random models:
the numbers are checked for consistency, not quality)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest
from flax import nnx

from distill_jax import commands as run
from distill_jax import experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(arg):
    spec = importlib.util.spec_from_file_location(
        "tiny", os.path.join(ROOT, "configs", "tiny_kd.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arg)
    c.data.source, c.data.num_problems, c.data.held_out_fraction = "gsm", 60, 0.1
    c.onpolicy.prompt_len = 620
    c.teacher.config.max_position_embeddings = c.student.config.max_position_embeddings = 700
    return c


def test_eval_speculative_reports_consistent_numbers():
    c = _tiny("onpolicy=1.0")
    c.eval.speculative = dict(gamma=3, num_batches=1, max_new_tokens=12)
    out = run.eval_speculative(c)
    assert 0 < out["alpha"] < 1 and out["positions"] > 0
    assert 1 <= out["tokens_per_target_call"] <= 4  # at most gamma + 1 per target pass
    size = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
    student, teacher = (
        experiment.build_model(c.student, "s", 0),
        experiment.build_model(c.teacher, "t", 1),
    )
    want = size(student) / size(teacher)
    assert out["draft_cost_ratio"] == pytest.approx(want)  # 1 of the teacher's 2 blocks
    assert out["simulated_speedup"] == pytest.approx(
        out["expected_tokens_per_target_call"] / (3 * out["draft_cost_ratio"] + 1)
    )


def test_seqkd_and_eval_gsm_modes_from_the_command_line(tmp_path):
    c = _tiny("onpolicy=0.0")
    # The CLI: a config file that adds the seqkd / eval settings to the tiny config.
    path = tmp_path / "cfg.py"
    here = os.path.join(ROOT, "tests", "commands_test.py")
    seqkd = dict(
        out_dir=str(tmp_path / "data"),
        num_problems=3,
        n=2,
        max_new_tokens=8,
        prompt_len=620,
        tokenizer="byte",
    )
    gsm = dict(num_problems=2, n=2, ks=(1, 2), max_new_tokens=8, prompt_len=620)
    path.write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('t', {here!r})\n"
        "m = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(m)\n"
        "def get_config():\n"
        "    c = m._tiny('onpolicy=0.0')\n"
        f"    c.seqkd = {seqkd!r}\n"
        f"    c.eval.gsm = {gsm!r}\n"
        "    return c\n"
    )
    del c
    env = dict(os.environ, PYTHONPATH=ROOT)
    for mode in ("seqkd", "eval_gsm"):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "distill_jax.main",
                f"--config={path}",
                f"--workdir={tmp_path / 'w'}",
                f"--mode={mode}",
            ],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        if mode == "seqkd":
            assert result["samples"] == 6 and result["problems"] == 3
            assert sum(result["counts"][k] for k in ("positives", "negatives")) == 6
            assert os.path.exists(tmp_path / "data" / "manifest.json")
        else:
            assert result["problems"] == 2 and 0 <= result["pass@1"] <= result["pass@2"] <= 1


def test_sft_on_verified_traces_trains_on_the_completions_only(tmp_path):
    """The positives of a sequence-level KD dataset train a student through the trainer
    (teacher none, CE, lambda = 0): every counted token is a completion token."""
    import numpy as np

    from distill_jax.data import prompts as prompts_lib
    from distill_jax.data import seqkd
    from distill_jax.data.tokenizers import load_tokenizer

    problems = [{"question": f"{i} + {i}?", "solution": f"#### {2 * i}"} for i in range(12)]
    completions = [[f" {i} + {i} = {2 * i}. #### {2 * i}", " no idea"] for i in range(12)]
    pos, neg = seqkd.split_traces(problems, completions)
    seqkd.write_dataset(str(tmp_path / "ds"), pos, neg, {"teacher": "fixture"})
    c = _tiny("onpolicy=0.0,teacher='none',steps=2")
    c.data.source, c.data.paths = "jsonl", str(tmp_path / "ds" / "positives.jsonl")
    c.data.prompt_field, c.data.completion_field = "prompt", "completion"
    c.data.held_out_fraction = 0.2
    c.onpolicy.prompt_len, c.onpolicy.max_new_tokens = 40, 24
    c.losses = dict(ce=dict())
    experiment.train(c, str(tmp_path / "w"))
    rows = [json.loads(x) for x in open(tmp_path / "w" / "metrics.jsonl")]
    tokens = [r["train/tokens"] for r in rows if "train/tokens" in r]
    # The same batches from the data pipeline: their completion tokens (EOS included).
    from distill_jax.data import sources

    tok = load_tokenizer("byte")
    split = sources.split_corpus(experiment.load_examples(c.data), fraction=0.2, seed=0)
    batches = prompts_lib.PromptBatches(
        split["train"],
        tok,
        prompt_len=40,
        completion_len=24,
        global_batch_size=8,
        long_completions="truncate",
    )
    want = [float(np.sum(next(batches)["completion_mask"])) for _ in range(2)]
    assert tokens == want
