"""The training loop end to end on the tiny configs: bad configs fail early, the exported
student loads, TensorBoard and metrics, on-policy runs against references built outside the
trainer, cached teachers, AdaSPEC with a reference (resume: resume_test.py; several processes:
tests/launch_test.py)."""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from ml_collections import config_dict
from trainer_runs import ALM_CONFIG, losses, tiny

import distill_jax as dj
from distill_jax import commands, experiment
from distill_jax.train import batch_sources, checkpoint, metrics
from distill_jax.train import step as step_lib


def _onpolicy(c, lmbda=0.5, prompt_len=24, max_new_tokens=40, prompt_chars=None):
    del c.data.seq_len
    c.data.long_completions = "truncate"
    if prompt_chars:
        c.data.prompt_chars = prompt_chars
    c.onpolicy = dict(lmbda=lmbda, prompt_len=prompt_len, max_new_tokens=max_new_tokens)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda c: c.data.update(global_batch_size=6), ValueError, "does not divide it"),
        (
            lambda c: c.teacher.config.update(vocab_size=200),
            ValueError,
            "vocabulary .200. differs .* smaller than the tokenizer's 259 ids",
        ),
        (
            lambda c: c.teacher.update(init="/no/such/teacher.gguf"),
            FileNotFoundError,
            "does not exist",
        ),
        (lambda c: c.losses.update(fkl={}), ValueError, "unknown kind 'fkl'"),
        (lambda c: c.teacher.update(kind="oracle"), ValueError, "teacher.kind='oracle'"),
        (
            lambda c: _onpolicy(c, lmbda=1.5),
            ValueError,
            r"lmbda=1.5 must be in \[0, 1\]",
        ),
        (
            lambda c: c.update(onpolicy=dict(lmbda=0.5, prompt_len=24, max_new_tokens=30)),
            ValueError,
            "data.seq_len=64 but on-policy rows hold prompt_len \\+ max_new_tokens = 54",
        ),
        (
            lambda c: _onpolicy(c, prompt_len=500, max_new_tokens=20, prompt_chars=20),
            ValueError,
            "cache of 520 positions, more than the model's max_position_embeddings=512",
        ),
        (
            lambda c: _onpolicy(c, prompt_len=4),
            ValueError,
            r"kjv\[\d+\]: the prompt has \d+ tokens, more than prompt_len=4",
        ),
    ],
)
def test_bad_configs_fail_before_compiling(tmp_path, change, error, match, caplog):
    c = tiny()
    with c.unlocked():
        change(c)
    with jax.log_compiles(True), pytest.raises(error, match=match):
        experiment.train(c, str(tmp_path))
    compiled = _compiled_functions(caplog)
    assert "step" not in compiled and "eval_step" not in compiled, compiled
    assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda c: c.teacher.update(kind="ema"), "config.bridge works with teacher.kind='online'"),
        (lambda c: c.bridge.update(coarsen="bytes"), "coarsen='bytes'"),
    ],
)
def test_bad_bridge_configs_fail_before_compiling(tmp_path, change, match, caplog):
    c = tiny(ALM_CONFIG)
    change(c)
    with jax.log_compiles(True), pytest.raises(ValueError, match=match):
        experiment.train(c, str(tmp_path))
    assert "step" not in _compiled_functions(caplog)


def test_alm_with_chunk_end_hidden_states_and_merged_chunks_trains(tmp_path):
    """The alm term's options in the trainer: a projector for different widths (64 -> 48 here),
    the hidden-state term logged and falling with the loss, chunks merged on device."""
    c = tiny(ALM_CONFIG, steps=6)
    c.student.config.hidden_size = 48
    c.losses.alm = dict(hidden_weight=0.5, hidden_kind="mse", merge_threshold=0.05)
    c.eval.every_steps = None
    experiment.train(c, str(tmp_path))
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    hidden = [r["train/alm/chunk_hidden"] for r in rows if "train/alm/chunk_hidden" in r]
    assert len(hidden) == 6 and all(np.isfinite(hidden))
    assert hidden[-1] < hidden[0]


def _compiled_functions(caplog) -> set[str]:
    """Names of the functions JAX compiled while ``jax.log_compiles`` was on."""
    return set(re.findall(r"Compiling jit\((\w+)\)", caplog.text))


def _tensorboard_scalars(logdir) -> dict[tuple[str, int], float]:
    """(tag, step) -> value, read back with TensorFlow's own event reader."""
    import tensorflow as tf

    out = {}
    for name in os.listdir(logdir):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(logdir, name)):
            for value in event.summary.value:
                out[(value.tag, event.step)] = value.simple_value
    return out


def test_export_tensorboard_and_progress_bar(tmp_path, caplog, capsys):
    c = tiny(steps=2)
    c.train.export = True
    with jax.log_compiles(True):
        experiment.train(c, str(tmp_path))
    assert {"step", "eval_step"} <= _compiled_functions(caplog)  # the check above can fail
    # The export equals the checkpointed student: same logits from the checkpoint's params.
    model = dj.models.from_pretrained(str(tmp_path / "export"))
    manager = ocp.CheckpointManager(str(tmp_path / "checkpoints"))
    restored = manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    graphdef, _ = nnx.split(experiment.build_model(c.student, "student", c.seed))
    reference = nnx.merge(graphdef, nnx.State(restored.state["params"]["student"]))
    ids = jnp.arange(40)[None] % 259
    np.testing.assert_allclose(model(ids), reference(ids), rtol=1e-5, atol=1e-5)
    assert "teacher" not in restored.state["params"]  # the teacher is never checkpointed
    # TensorBoard holds what metrics.jsonl holds.
    scalars = _tensorboard_scalars(tmp_path / "tensorboard")
    for step, loss in losses(tmp_path).items():
        np.testing.assert_allclose(scalars[("train/loss", step)], loss, rtol=1e-6)
    assert ("eval/perplexity", 2) in scalars and ("eval/agreement", 2) in scalars
    # The progress bar shows tokens/s and an ETA (tqdm's elapsed<remaining).
    err = capsys.readouterr().err
    assert re.search(r"distill: 100%.*2/2 \[\d\d:\d\d<\d\d:\d\d.*tok_s=[\d,]+", err), err[-300:]
    assert isinstance(c, config_dict.ConfigDict)


def test_cached_teacher_run_reads_the_cache_it_was_built_for(tmp_path):
    c = tiny(steps=3)
    with c.unlocked():
        c.teacher.update(cache_dir=str(tmp_path / "cache"), k=16, cache_dtype="float32")
    cache = commands.build_cache(c)
    assert cache.num_batches == 3 and cache.settings["k"] == 16
    c.teacher.kind = "cached"
    result = experiment.train(c, str(tmp_path / "run"))
    assert np.isfinite(result["nll"])
    logged = losses(tmp_path / "run")
    assert sorted(logged) == [1, 2, 3] and all(np.isfinite(list(logged.values())))
    # A run whose data differ from the cache's is refused, naming the setting.
    c.data.seq_len = 32
    with pytest.raises(ValueError, match="data: cache has"):
        experiment.train(c, str(tmp_path / "other"))


def _supervised_reference(c, make_batch, steps):
    """The KD loss curve of ``steps`` optimizer steps built from the library's parts, outside
    the trainer: ``make_batch(student_params, prompts, step)`` gives each step's batch."""
    from distill_jax import teachers
    from distill_jax.data import sources
    from distill_jax.train import objective
    from distill_jax.train import state as state_lib
    from distill_jax.train import step as step_lib

    tok = dj.data.load_tokenizer("byte")
    split = sources.split_corpus(experiment.load_examples(c.data), fraction=0.02, seed=0)
    batches = experiment.make_prompt_batches(c, split["train"], tok, seed=0)
    student = experiment.build_model(c.student, "student", 0)
    teacher = teachers.OnlineTeacher(experiment.build_model(c.teacher, "teacher", 1))
    spec = objective.LossSpec.from_config(c.losses, dict(c.loss_options, total_steps=steps))
    length = c.onpolicy.prompt_len + c.onpolicy.max_new_tokens
    tx, _ = state_lib.make_optimizer(c.optimizer, steps, c.data.global_batch_size * length)
    graphdef, params = teachers.split_model(student)
    state = state_lib.create(
        {"student": params, "loss": {}}, tx, objective.init_state(spec), seed=0
    )
    step_fn = jax.jit(
        step_lib.make_distill_step(
            student_graphdef=graphdef,
            teacher=teacher,
            spec=spec,
            tx=tx,
            vocab_mask=jnp.arange(264) < tok.vocab_size,
        )
    )
    losses = []
    for i in range(steps):
        batch = make_batch(state.params["student"], next(batches), i)
        state, metrics = step_fn(state, teacher.params(), batch)
        losses.append(float(metrics["loss"]))
    return losses, graphdef


def _train_rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "train/loss" in r]


def test_onpolicy_lambda_zero_is_supervised_kd_on_the_same_batches(tmp_path):
    from distill_jax.train import rollout

    c = tiny(steps=3, onpolicy=0.0)
    experiment.train(c, str(tmp_path))
    rows = _train_rows(tmp_path)
    assert [r["train/student_samples"] for r in rows] == [0.0, 0.0, 0.0]
    want, _ = _supervised_reference(
        c, lambda params, prompts, i: rollout.supervised_batch(prompts), 3
    )
    np.testing.assert_allclose([r["train/loss"] for r in rows], want, rtol=2e-5)


def test_onpolicy_lambda_one_trains_on_the_students_samples(tmp_path):
    """Every step's batch is the student's continuation of the prompts (sampled here with
    ``dj.models.generate`` from the current student, per-example keys), scored by the teacher."""
    from distill_jax.models import sampling
    from distill_jax.train import rollout

    c = tiny(steps=3, onpolicy=1.0)
    experiment.train(c, str(tmp_path))
    rows = _train_rows(tmp_path)
    assert [r["train/student_samples"] for r in rows] == [1.0, 1.0, 1.0]
    graph = {}

    def student_samples(params, prompts, i):
        model = nnx.merge(graph["g"], nnx.State(params))
        keys = sampling.example_keys(jax.random.key(4242), jnp.asarray(prompts["example_ids"]), i)
        gen = dj.models.generate(
            model,
            jnp.asarray(prompts["prompt_ids"]),
            prompt_mask=jnp.asarray(prompts["prompt_mask"]),
            max_new_tokens=16,
            rng=keys,
            temperature=1.0,
            eos_id=dj.data.load_tokenizer("byte").eos_id,
            vocab_limit=dj.data.load_tokenizer("byte").vocab_size,  # 259 of the model's 264
        )
        done = jnp.arange(16)[None] < gen.lengths[:, None]
        return sampling.sequence_batch(
            prompts["prompt_ids"], prompts["prompt_mask"], gen.tokens, done
        )

    from distill_jax import teachers

    graph["g"], _ = teachers.split_model(experiment.build_model(c.student, "student", 0))
    want, _ = _supervised_reference(c, student_samples, 3)
    np.testing.assert_allclose([r["train/loss"] for r in rows], want, rtol=2e-5)
    supervised, _ = _supervised_reference(
        c, lambda params, prompts, i: rollout.supervised_batch(prompts), 1
    )
    assert abs(supervised[0] - want[0]) > 1e-4  # the two kinds of batch differ


def test_cross_tokenizer_onpolicy_trains_on_the_students_samples(tmp_path):
    """tiny_alm with lambda = 1: each step's student rows are the prompt plus the student's own
    sample (drawn here again from the initial student for step 0), the teacher reads the text
    they spell in its tokenizer, and ALM is computed on the completion's chunks."""
    from distill_jax import teachers
    from distill_jax.data import sources
    from distill_jax.models import sampling

    c = tiny(ALM_CONFIG, steps=2, onpolicy=1.0)
    experiment.train(c, str(tmp_path))
    rows = _train_rows(tmp_path)
    assert [r["train/student_samples"] for r in rows] == [1.0, 1.0]
    assert all(np.isfinite(r["train/loss"]) for r in rows)
    # The first step's batch, rebuilt outside the trainer.
    tok = dj.data.load_tokenizer("byte")
    split = sources.split_corpus(experiment.load_examples(c.data), fraction=0.02, seed=0)
    prompts = next(experiment.make_prompt_batches(c, split["train"], tok, seed=0))
    student = experiment.build_model(c.student, "student", 0)
    graphdef, params = teachers.split_model(student)
    keys = sampling.example_keys(jax.random.key(4242), jnp.asarray(prompts["example_ids"]), 0)
    settings = sampling.RolloutSettings(24, 1.0, eos_id=tok.eos_id, vocab_limit=tok.vocab_size)
    tokens, mask = sampling.sample(
        graphdef,
        params,
        jnp.asarray(prompts["prompt_ids"]),
        jnp.asarray(prompts["prompt_mask"]),
        keys,
        settings,
    )
    collator = experiment.make_collator(c, tok, 64)
    batch = batch_sources.host_bridge_batch(collator, prompts, np.asarray(tokens), np.asarray(mask))
    # Every kept chunk holds completion tokens; the prompt's own positions carry no CE.
    for i in range(len(batch["input_ids"])):
        start = int(prompts["prompt_mask"][i].sum())
        chunks = batch["student_chunk"][i]
        for ch in set(chunks[chunks >= 0].tolist()):
            assert np.max(np.nonzero(chunks == ch)[0]) >= start
        assert not batch["loss_mask"][i, : start - 1].any()
    teacher = teachers.CrossTokenizerTeacher(
        experiment.build_model(c.teacher, "teacher", 1),
        teacher_boundary_mask=dj.bridges.boundary_vocab_mask(collator.teacher.tokenizer, 49152),
        student_boundary_mask=dj.bridges.boundary_vocab_mask(tok, 264),
        chunk_size=32,
    )
    from distill_jax.train import objective

    spec = objective.LossSpec.from_config(c.losses, dict(c.loss_options, total_steps=2))
    inputs = objective.LossInputs(
        student_hidden=student.forward(
            jnp.asarray(batch["input_ids"]),
            positions=jnp.asarray(batch["positions"]),
            segment_ids=jnp.asarray(batch["segment_ids"]),
            compute_logits=False,
        ).hidden,
        student_head=student.head_weights(),
        targets=jnp.asarray(batch["targets"]),
        mask=jnp.asarray(batch["loss_mask"]),
        **teacher.loss_inputs(teacher.params(), {k: jnp.asarray(v) for k, v in batch.items()}),
    )
    total, count, _ = objective.loss_fn(spec, inputs, {}, objective.init_state(spec), 0)
    assert float(total / count) == pytest.approx(rows[0]["train/loss"], rel=1e-4)


def test_adaspec_selection_with_a_reference_model_in_the_trainer(tmp_path):
    """config.reference runs a frozen reference beside the teacher; AdaSPEC keeps the requested
    share of tokens (those where the student lags the reference most)."""
    c = tiny(steps=2)
    c.reference = dict(init="random", config=dict(c.student.config))
    c.losses = dict(forward_kl=dict())
    c.loss_options.selection = dict(kind="adaspec", keep_ratio=0.25)
    experiment.train(c, str(tmp_path))
    rows = _train_rows(tmp_path)
    kept = [r["train/selection/kept"] for r in rows]
    assert all(k == pytest.approx(0.25, abs=0.02) for k in kept), kept
    c2 = tiny(steps=1)
    c2.reference = dict(init="random", config=dict(c.student.config, vocab_size=300))
    with pytest.raises(ValueError, match="reference model's vocabulary .300. differs"):
        experiment.train(c2, str(tmp_path / "bad"))


def test_a_bucket_workdir_keeps_every_metrics_row(tmp_path, monkeypatch):
    # Object stores cannot append: each flush writes one new part, never rewriting a file, and a
    # resumed run's parts follow the earlier ones (the local folder stands in for the bucket;
    # epath serves both).
    assert checkpoint._checkpoint_dir("gs://bucket/run") == "gs://bucket/run/checkpoints"
    assert checkpoint._checkpoint_dir("rel/run") == os.path.abspath("rel/run/checkpoints")
    monkeypatch.setattr(metrics, "is_local", lambda workdir: False)
    first = metrics.Logger(str(tmp_path), total=3, start=0, enabled=True)
    first.log(1, {"loss": 1.0})
    first.log(2, {"loss": 0.5})
    first.flush()
    parts = sorted(os.listdir(tmp_path / metrics.METRICS_PARTS))
    first.close()  # nothing new to write
    assert sorted(os.listdir(tmp_path / metrics.METRICS_PARTS)) == parts and len(parts) == 1
    resumed = metrics.Logger(str(tmp_path), total=3, start=2, enabled=True)
    resumed.log(3, {"loss": 0.25})
    resumed.close()
    assert len(os.listdir(tmp_path / metrics.METRICS_PARTS)) == 2
    assert not (tmp_path / "metrics.jsonl").exists()
    rows = metrics.read_metrics(str(tmp_path))
    assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.25)]


@pytest.fixture
def cpu_device_to_host_guard(monkeypatch):
    """Make jax.transfer_guard see device-to-host reads on the CPU backend too.

    XLA:CPU arrays already live in host memory, so the CPU never reports reading one as a
    transfer (TPUs and GPUs do). Under a "disallow" device-to-host guard, reading a jax.Array's
    value (float, bool, np.asarray, .item(), .tolist()) then fails here as it would there;
    explicit ``jax.device_get`` outside the guarded region is unaffected.
    """
    from jax._src import array
    from jax._src import config as jax_config

    def check():
        if jax_config.transfer_guard_device_to_host.value == "disallow":
            raise RuntimeError("Disallowed device-to-host transfer (the CPU stand-in guard)")

    def guarded(method):
        def run(self, *args, **kwargs):
            check()
            return method(self, *args, **kwargs)

        return run

    value = array.ArrayImpl._value
    monkeypatch.setattr(array.ArrayImpl, "_value", property(guarded(value.fget)))
    for name in ("__array__", "item", "tolist"):
        monkeypatch.setattr(array.ArrayImpl, name, guarded(getattr(array.ArrayImpl, name)))


def test_no_device_to_host_transfer_between_log_steps(
    tmp_path, monkeypatch, cpu_device_to_host_guard
):
    """The fixed-data loop runs under jax.transfer_guard("disallow") between log steps: metrics
    stay on the devices until a log step reads them back; the next batch is placed explicitly
    while the step runs."""
    c = tiny(steps=6)
    c.train.log_every_steps = 3
    c.train.checkpoint_every_steps = 6
    c.eval.every_steps = None
    experiment.train(c, str(tmp_path / "run"))
    rows = [r for r in metrics.read_metrics(str(tmp_path / "run")) if "train/loss" in r]
    assert [r["step"] for r in rows] == [3, 6]
    # The guard is really there: a step that reads its loss back on every call fails.
    jit_step = step_lib.jit_step

    def syncing(step_fn, **kw):
        jitted = jit_step(step_fn, **kw)

        def run(*args):
            state, metrics = jitted(*args)
            float(metrics["loss"])  # an implicit device -> host transfer
            return state, metrics

        return run

    monkeypatch.setattr(step_lib, "jit_step", syncing)
    with pytest.raises(RuntimeError, match="Disallowed device-to-host transfer"):
        experiment.train(c, str(tmp_path / "sync"))


def test_scanned_models_train_and_resume_exactly(tmp_path):
    """Both models scanned over their blocks (stacked parameters in the checkpoint): a run
    stopped at step 2 and resumed gives the uninterrupted run's losses, and the export is the
    per-layer HF layout."""
    c = tiny(steps=4)
    c.student.scan_layers = c.teacher.scan_layers = True
    c.teacher.config.num_layers = 4  # scanned as one block repeated 4 times
    c.train.export = True
    experiment.train(c, str(tmp_path / "straight"))
    first = tiny(steps=2)
    first.student.scan_layers = first.teacher.scan_layers = True
    first.teacher.config.num_layers = 4
    experiment.train(first, str(tmp_path / "resumed"))
    experiment.train(c, str(tmp_path / "resumed"))
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(straight) == [1, 2, 3, 4]
    assert all(resumed[s] == straight[s] for s in straight)  # bit for bit on CPU
    restored = ocp.CheckpointManager(str(tmp_path / "resumed" / "checkpoints")).restore(
        4, args=ocp.args.Composite(state=ocp.args.StandardRestore())
    )
    q = restored.state["params"]["student"]["layers"]["0"]["attn"]["q_proj"]
    assert q.shape == (1, 64, 4, 16)  # stacked: [L, D, N, H]
    model = dj.models.from_pretrained(str(tmp_path / "straight" / "export"))
    assert not model.scanned and model.config.num_layers == 1


@pytest.mark.parametrize("every_steps", [1, 2])
def test_ema_teacher_every_n_steps_from_the_config(tmp_path, every_steps):
    """``teacher.every_steps`` reaches the EMA teacher: after optimizer step 1 the checkpointed
    EMA is the initial student when N = 2, and has moved when N = 1."""
    from distill_jax import teachers

    c = tiny(steps=1, teacher="ema")
    c.teacher.every_steps = every_steps
    c.train.checkpoint_every_steps = 1
    c.optimizer.warmup_steps = 0  # step 1 moves the student
    experiment.train(c, str(tmp_path))
    manager = ocp.CheckpointManager(os.path.join(tmp_path, "checkpoints"))
    saved = manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    _, initial = teachers.split_model(experiment.build_model(c.student, "student", 0))
    ema, start = jax.tree.leaves(saved["ema"]), jax.tree.leaves(initial)
    assert len(ema) == len(start)
    same = all(np.array_equal(np.asarray(e), np.asarray(s)) for e, s in zip(ema, start))
    assert same == (every_steps == 2)


def test_one_tokenizer_padded_to_different_vocabulary_sizes_trains(tmp_path):
    """A teacher of 300 rows and a student of 264 share the byte tokenizer (259 ids): the
    trainer resizes the teacher's head to the student's rows and masks ids past 259."""
    c = tiny(steps=2)
    c.teacher.config.vocab_size = 300
    experiment.train(c, str(tmp_path))
    rows = _train_rows(tmp_path)
    assert len(rows) == 2 and all(np.isfinite(r["train/loss"]) for r in rows)


@pytest.mark.parametrize(
    "term,knobs",
    [
        ("hidden_mse", dict(layers="uniform")),
        ("hidden_cosine", dict(pairs=((0, 1),))),
        ("attention_relation", dict(student_layer=0, teacher_layer=1)),
        ("value_relation", dict(student_layer=0, teacher_layer=1)),
    ],
)
def test_feature_losses_train_with_the_teacher_supplying_its_features(tmp_path, term, knobs):
    """A 2-block online teacher supplies its hidden states / attention q/k/v to a 1-block
    student through a layer map; the feature term is positive, trains, and moves the student."""
    c = tiny(steps=3)
    c.losses = dict(forward_kl=dict(temperature=2.0, weight=0.5), **{term: dict(knobs, weight=1.0)})
    c.train.checkpoint_every_steps = 3
    experiment.train(c, str(tmp_path))
    rows = _train_rows(tmp_path)
    values = [r[f"train/loss/{term}"] for r in rows]
    assert len(values) == 3 and all(np.isfinite(v) and v > 0 for v in values), values
    assert all(np.isfinite(r["train/loss"]) for r in rows)


def test_tip_keeps_half_the_tokens_by_student_entropy_from_the_config(tmp_path):
    """loss_options.selection = tip with rule='entropy': TIP's 50 % of tokens by the student's
    entropy are kept (selection.tip_entropy_mask), the rest carry no loss."""
    c = tiny(steps=2)
    c.loss_options.selection = dict(kind="tip", rule="entropy", fraction=0.5)
    experiment.train(c, str(tmp_path))
    rows = _train_rows(tmp_path)
    kept = [r["train/selection/kept"] for r in rows]
    assert all(k == pytest.approx(0.5, abs=0.02) for k in kept), kept
    assert all(np.isfinite(r["train/loss"]) for r in rows)
