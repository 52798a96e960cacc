"""Fault injection, issue 18's input cases (one test per case, against ``experiment.train`` or
the real command line): bad values refused before anything loads or compiles (4), a bad data
record named by file and line or skipped and counted (6), a short or reshaped teacher cache
refused at start (7), masked rows with +-inf logits keep every gradient finite (10), and launcher
values that would break a directive line refused (11). Unit tests of each live beside their
code (tests/train/terms_test.py, tests/data/sources_test.py, tests/losses/masked_rows_test.py,
tests/launch_test.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trainer_runs import ROOT, cmd, losses, tiny

from distill_jax import commands, experiment
from distill_jax.data import sources
from distill_jax.losses import divergences, fused
from distill_jax.train import registry


def _compiled(caplog) -> set[str]:
    """Names of the functions JAX compiled while ``jax.log_compiles`` was on."""
    return set(re.findall(r"Compiling jit\((\w+)\)", caplog.text))


def _refused_before_compiling(c, workdir, match, caplog, error=ValueError):
    """``experiment.train(c)`` raises ``error`` matching ``match`` and compiles no step."""
    with jax.log_compiles(True), pytest.raises(error, match=match):
        experiment.train(c, str(workdir))
    compiled = _compiled(caplog)
    assert "step" not in compiled and "eval_step" not in compiled, compiled
    assert not os.path.isdir(os.path.join(workdir, "checkpoints"))


# ------------------------------------------------------------------ 4: bad values, one schema


def _replace(block, key: str, value) -> None:
    """Set ``block[key]`` to a value of another type (a ConfigDict keeps a field's type)."""
    del block[key]
    block[key] = value


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda c: c.losses.forward_kl.update(temperature=-1.0), r"temperature=-1.0: must be"),
        (lambda c: c.losses.forward_kl.update(temperature=0.0), r"temperature=0.0: must be .* > 0"),
        (
            lambda c: _replace(c.losses, "forward_kl", dict(temperature=dict(start=0.0, end=2.0))),
            r"temperature.start=0.0: must be a number > 0",
        ),
        (
            lambda c: c.optimizer.update(learning_rate=float("nan")),
            r"config.optimizer.learning_rate=nan: not finite",
        ),
        (lambda c: c.train.update(steps=0), r"config.train.steps=0: must be an integer >= 1"),
        (lambda c: c.train.update(steps=-3), r"config.train.steps=-3: must be an integer >= 1"),
        (
            lambda c: c.train.update(checkpoint_every_steps=0),
            r"checkpoint_every_steps=0: must be an integer >= 1",
        ),
        (lambda c: c.train.update(keep_checkpoints=0), r"keep_checkpoints=0: must be"),
        (lambda c: c.eval.update(every_steps=0), r"config.eval.every_steps=0: must be"),
        (
            lambda c: c.data.update(global_batch_size=0),
            r"config.data.global_batch_size=0: must be an integer >= 1",
        ),
        (
            lambda c: c.data.update(global_batch_size=12),
            r"global_batch_size=12 is split over 8 devices .* which does not divide it",
        ),
        (lambda c: c.train.update(micro_batches=3), r"not divisible by train.micro_batches=3"),
        (
            lambda c: c.losses.forward_kl.update(temperatur=2.0),
            r"'forward_kl': unknown knob 'temperatur' \(did you mean 'temperature'\?\)",
        ),
        (
            lambda c: c.train.update(stpes=4),
            r"config.train: unknown knob 'stpes' \(did you mean 'steps'\?\); valid knobs: \[",
        ),
        (lambda c: c.train.update(nonfinite="ignore"), r"nonfinite='ignore': must be one of"),
    ],
)
def test_bad_values_are_refused_before_any_model_or_data_loads(tmp_path, change, match, caplog):
    """Each value from the issue (and its neighbours) fails with one message naming the knob and
    its valid range before compilation; the data file and the teacher's weights do not exist, so
    the error also shows that nothing was loaded yet."""
    c = tiny()
    with c.unlocked():
        change(c)
        c.data.update(source="text", paths=str(tmp_path / "no_such_corpus.txt"))
        c.teacher.update(init=str(tmp_path / "no_such_teacher.gguf"))
    _refused_before_compiling(c, tmp_path / "run", match, caplog)


@pytest.mark.parametrize(
    "override,match",
    [
        ("--config.optimizer.learning_rate=nan", "learning_rate=nan: not finite"),
        ("--config.losses.forward_kl.temperature=0.0", "temperature=0.0: must be a number > 0"),
        ("--config.train.steps=0", "config.train.steps=0: must be an integer >= 1"),
    ],
)
def test_bad_values_on_the_command_line_exit_before_compiling(tmp_path, override, match):
    workdir = tmp_path / "run"
    env = dict(os.environ, JAX_LOG_COMPILES="1")
    out = subprocess.run(
        cmd(workdir, override), capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
    )
    assert out.returncode not in (0, 75), out.stderr[-2000:]
    assert match in out.stderr, out.stderr[-2000:]
    assert "Compiling" not in out.stderr and not (workdir / "checkpoints").exists()


def test_every_config_knob_of_the_run_blocks_is_typed_and_documented():
    for block, knobs in registry.RUN_BLOCKS.items():
        for name, knob in knobs.items():
            assert knob.doc, (block, name)
    assert registry.RUN_BLOCKS["train"]["nonfinite"].choices == ("stop", "skip")
    assert registry.RUN_BLOCKS["train"]["max_skipped_steps"].low == 0
    assert registry.RUN_BLOCKS["train"]["force_unlock"].kind is bool


# ------------------------------------------------------------ 6: a bad record, file and line


def _jsonl_with_a_lone_surrogate(path) -> str:
    """KJV chapters as JSON lines; line 3 holds ``"\\ud800"``, which json.loads accepts."""
    chapters = [text for _, text in sources.kjv_chapters()[:40]]
    lines = [json.dumps({"text": t}) for t in chapters]
    lines[2] = '{"text": "In the beginning \\ud800 was the Word"}'
    assert json.loads(lines[2])["text"][17] == "\ud800"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_a_lone_surrogate_is_named_by_file_and_line_or_skipped_and_counted(tmp_path, caplog):
    path = _jsonl_with_a_lone_surrogate(tmp_path / "corpus.jsonl")
    c = tiny(steps=2)
    with c.unlocked():
        c.data.update(source="jsonl", paths=path)
        c.teacher.update(init=str(tmp_path / "no_such_teacher.gguf"))
    where = re.escape(f"{path}:3: field 'text' holds a lone surrogate '\\ud800'")
    _refused_before_compiling(c, tmp_path / "run", where + ".*data.bad_records='skip'", caplog)
    c = tiny(steps=2)
    with c.unlocked():
        c.data.update(source="jsonl", paths=path, bad_records="skip")
    with caplog.at_level("WARNING", logger="distill_jax"):
        result = experiment.train(c, str(tmp_path / "skip"))
    assert np.isfinite(result["nll"]) and sorted(losses(tmp_path / "skip")) == [1, 2]
    skipped = r"left out 1 bad record\(s\) of .*corpus\.jsonl.*the first: .*:3: "
    assert re.search(skipped, caplog.text), caplog.text[-2000:]


# ------------------------------------------------------------------ 7: a short teacher cache


def test_a_short_or_reshaped_teacher_cache_is_refused_at_start(tmp_path, caplog):
    c = tiny(steps=2, cache=str(tmp_path / "cache"))
    with c.unlocked():
        c.teacher.kind = "online"  # --mode=cache writes the online teacher's top-k
    cache = commands.build_cache(c)
    assert cache.num_batches == 2
    c = tiny(steps=5, cache=str(tmp_path / "cache"))
    message = (
        f"The teacher cache in {str(tmp_path / 'cache')!r} holds 2 batches but train.steps=5 "
        "reads 5 (one per step); rebuild it with --mode=cache --config.train.steps=5"
    )
    _refused_before_compiling(c, tmp_path / "run", re.escape(message), caplog)
    c = tiny(steps=2, cache=str(tmp_path / "cache"))
    with c.unlocked():
        c.teacher.k = 8
    _refused_before_compiling(c, tmp_path / "run", r"teacher.k=8 but the cache has 16", caplog)
    # A shard whose arrays disagree with the manifest (K = 8 where it says 16).
    shard = os.path.join(tmp_path / "cache", cache.manifest["shards"]["0"][0]["file"])
    with np.load(shard) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["ids"], arrays["logprobs"] = arrays["ids"][..., :8], arrays["logprobs"][..., :8]
    np.savez(shard, **arrays)
    c = tiny(steps=2, cache=str(tmp_path / "cache"))
    match = re.escape(f"{shard}: ids has shape (2, 8, 64, 8) but the manifest says (2, 8, 64, 16)")
    _refused_before_compiling(c, tmp_path / "run", match, caplog)


# ------------------------------------------------- 10: +-inf in a masked row, every logit term


LOGIT_KNOBS = {"multilevel_ot": {"top_k": 4}, "taid": {"t": 0.5}}


@pytest.mark.parametrize(
    "name",
    sorted(
        k
        for k, e in registry.LOSS_TERMS.items()
        if e.family == "logit" and k in set(divergences.CORES) | set(fused.EXTRA_KINDS)
    ),
)
def test_masked_rows_with_infinite_logits_keep_every_gradient_finite(name):
    """Every registered logit term through the fused head+loss (the trainer's path): a fully
    masked row whose hidden states are +-inf on the student's or the teacher's side (so its
    logits are +-inf or NaN) gives the loss and the gradients of the batch without that row."""
    rng = np.random.default_rng(0)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    hs, ws, ht, wt = f(2, 5, 8), f(8, 11), f(2, 5, 6), f(6, 11)
    mask = jnp.asarray([[True] * 5, [False] * 5])
    targets = jnp.asarray(rng.integers(0, 11, (2, 5)), jnp.int32)
    term = {"ce": {}} if name == "ce" else {name: dict(LOGIT_KNOBS.get(name, {}), temperature=2.0)}

    def loss(h_s, w_s, h_t):
        total, count, _ = fused.fused_distill_loss(
            h_s, w_s, teacher_hidden=h_t, teacher_head=wt, mask=mask, targets=targets, terms=term
        )
        return total / count

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    clean = grad(hs, ws, ht)
    for value in (-jnp.inf, jnp.inf):
        for bad in ((hs.at[1].set(value), ht), (hs, ht.at[1].set(value))):
            got = grad(bad[0], ws, bad[1])
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(clean)):
                assert np.all(np.isfinite(a)), (name, value)
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# ------------------------------------------------- 11: a newline in an #SBATCH directive value


def test_slurm_launcher_refuses_a_newline_in_a_directive_value(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "launch", "slurm_gpu.py"),
            f"--config={os.path.join(ROOT, 'configs', 'tiny_kd.py')}",
            "--workdir=/shared/runs/kd",
            "--nodes=1",
            "--gpus_per_node=1",
            "--job_name=kd\nrm -rf ~",
            f"--script={tmp_path / 'job.sbatch'}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode != 0
    assert "--job_name='kd\\nrm -rf ~' goes into an #SBATCH line and holds a newline" in out.stderr
    assert not (tmp_path / "job.sbatch").exists()
