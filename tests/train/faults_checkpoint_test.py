"""Fault injection against the real trainer (issue 18, checkpoints and the workdir): a non-finite
state is never checkpointed (stop, and skip with its limit), keep_checkpoints=0 is refused, a
second run into a live workdir is refused while the first finishes, a dead run's lock and
unfinished saves are taken over, a SIGTERM during start-up exits 75, each corruption of the
newest checkpoint falls back to the previous step, and a SIGKILL/resume leaves one metrics row
per step (TensorBoard too)."""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from trainer_runs import checkpoint_params, cmd, losses, tiny, wait_for_step

from distill_jax import experiment, main
from distill_jax.train import integrity, loop, workdir_lock


def _env(tmp_path) -> dict:
    """Subprocesses share one persistent compilation cache (the test's time only)."""
    return {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }


def _steps(workdir) -> list[int]:
    return ocp.CheckpointManager(os.path.join(workdir, "checkpoints")).all_steps()


def _rows(workdir, key="train/loss") -> list[int]:
    """The steps of the metrics rows that carry ``key``, in file order."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f) if key in r]


def _quick(steps, **train):
    c = tiny(steps=steps)
    c.eval.every_steps = None
    c.train.update(train)
    return c


def _all_finite(workdir) -> bool:
    return all(np.isfinite(x).all() for s in _steps(workdir) for x in checkpoint_params(workdir, s))


# --- 1. non-finite state: stop (default) and skip


def test_nonfinite_parameters_are_never_checkpointed_and_the_rerun_finishes(tmp_path):
    # Adam with eps=0 divides 0 by 0 on embedding rows no token of the batch uses: the loss and
    # the gradient norm stay finite, only the updated parameters are NaN (what used to be saved
    # as "the last good checkpoint").
    experiment.train(_quick(2, checkpoint_every_steps=1), str(tmp_path))
    bad = _quick(5, checkpoint_every_steps=1)
    bad.optimizer.eps = 0.0
    with pytest.raises(
        loop.NonFiniteLossError,
        match=r"Non-finite parameters after the update at step 3; .* last finite checkpoint is "
        r"step 2: the same command resumes",
    ):
        experiment.train(bad, str(tmp_path))
    assert _steps(tmp_path) == [1, 2] and _all_finite(tmp_path)
    experiment.train(_quick(5, checkpoint_every_steps=1), str(tmp_path))  # cause fixed
    assert _steps(tmp_path)[-1] == 5 and _all_finite(tmp_path)
    assert _rows(tmp_path) == [1, 2, 3, 4, 5]  # step 3's failed attempt was never logged


def _tiny_step(skip_nonfinite):
    """(jitted step, state, teacher params, batch of every token id, batch of half the ids) of
    a 1-block student and 2-block teacher over 64 ids, optimized by Adam with eps=0 (0 / 0 on
    the embedding rows of ids that are not in the batch)."""
    import jax
    from flax import nnx

    import distill_jax as dj
    from distill_jax import teachers
    from distill_jax.train import objective
    from distill_jax.train import state as state_lib
    from distill_jax.train import step as step_lib

    arch = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2)
    model = lambda n, seed: dj.models.Transformer(  # noqa: E731
        dj.models.make_config("llama", num_layers=n, head_dim=8, **arch), rngs=nnx.Rngs(seed)
    )
    teacher = teachers.OnlineTeacher(model(2, 1))
    spec = objective.LossSpec.from_config(
        dict(forward_kl=dict(temperature=2.0), ce=dict(weight=0.5)), dict(head_chunk_tokens=8)
    )
    tx, _ = state_lib.make_optimizer(dict(learning_rate=1e-2, warmup_steps=0, eps=0.0), 10, 64)
    graphdef, params = teachers.split_model(model(1, 2))
    state = state_lib.create({"student": params, "loss": {}}, tx, {}, seed=0)
    step = step_lib.make_distill_step(
        student_graphdef=graphdef, teacher=teacher, spec=spec, tx=tx, skip_nonfinite=skip_nonfinite
    )
    rng = np.random.default_rng(0)
    every_id = rng.permutation(64).astype(np.int32).reshape(4, 16)

    def batch(ids):
        return dict(
            input_ids=ids,
            targets=np.roll(ids, 1),
            segment_ids=np.ones((4, 16), np.int32),
            positions=np.tile(np.arange(16, dtype=np.int32), (4, 1)),
            loss_mask=np.ones((4, 16), bool),
        )

    half = batch(every_id % 32)
    return jax.jit(step), state, teacher.params(), batch(every_id), half


def _same(a, b) -> bool:
    import jax

    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_the_step_reports_finiteness_and_skips_only_the_bad_update():
    import jax

    # A batch without ids 32..63 leaves their embedding rows without gradient: the update is
    # NaN there while the loss and the gradient norm are finite (the case a loss check misses).
    step, state, teacher, every, half = _tiny_step(skip_nonfinite=True)
    before = jax.tree.map(np.asarray, state)
    skipped, metrics = step(state, teacher, half)
    assert not metrics["finite"]
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
    assert int(skipped.step) == 1  # the step counter (and the data) move on ...
    assert _same(skipped.params, before.params) and _same(skipped.opt_state, before.opt_state)
    moved, metrics = step(skipped, teacher, every)  # ... and the next good batch trains
    assert metrics["finite"] and not _same(moved.params, before.params)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(moved.params))
    # Without skipping the update is applied: NaN parameters the loop must never save.
    step, state, teacher, every, half = _tiny_step(skip_nonfinite=False)
    applied, metrics = step(state, teacher, half)
    assert not metrics["finite"]
    assert not all(np.isfinite(x).all() for x in jax.tree.leaves(applied.params))


def test_skip_policy_counts_skipped_steps_and_stops_past_the_limit(tmp_path):
    # Adam with eps=0: every step's update is NaN, so every step is skipped.
    c = _quick(4, checkpoint_every_steps=1, nonfinite="skip", max_skipped_steps=4)
    c.optimizer.eps = 0.0
    run = str(tmp_path / "skip")
    experiment.train(c, run)  # four skipped steps are within the limit: the run finishes
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "train/loss" in r]
    assert [(r["step"], r["train/skipped_steps"]) for r in rows] == [(1, 1), (2, 2), (3, 3), (4, 4)]
    saved = [checkpoint_params(run, s) for s in _steps(run)]
    assert _steps(run)[-1] == 4 and _all_finite(run)
    assert all(_same(saved[0], p) for p in saved[1:])  # no update was applied
    meta = ocp.CheckpointManager(os.path.join(run, "checkpoints")).restore(
        4, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
    )
    assert meta.meta["skipped_steps"] == 4  # a resumed run goes on counting from here
    # Past the limit the run stops like the stop policy, naming the count and the checkpoint.
    c.train.max_skipped_steps = 2
    with pytest.raises(
        loop.NonFiniteLossError,
        match=r"at step 3 \(3 non-finite steps skipped, more than train.max_skipped_steps=2\)"
        r".*checkpoint is step 2",
    ):
        experiment.train(c, str(tmp_path / "limit"))


# --- 2. keep_checkpoints


def test_keep_checkpoints_zero_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(
        ValueError, match=r"config.train.keep_checkpoints=0: must be an integer >= 1"
    ):
        experiment.train(_quick(2, keep_checkpoints=0), str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")
    assert not os.path.exists(tmp_path / workdir_lock.LOCK_FILE)  # released on the error


# --- 3. the workdir lock


def test_a_second_run_is_refused_while_the_first_finishes_intact(tmp_path):
    work = tmp_path / "run"
    first = subprocess.Popen(cmd(work, config_arg=":steps=30"), env=_env(tmp_path))
    wait_for_step(work, 2, first)
    holder = json.loads((work / workdir_lock.LOCK_FILE).read_text())
    assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
    with pytest.raises(
        workdir_lock.WorkdirLockedError,
        match=rf"in use by pid {first.pid} on host .* delete .*\.lock or set "
        r"config.train.force_unlock=True",
    ):
        experiment.train(tiny(steps=30), str(work))
    assert first.wait(timeout=300) == 0
    assert _rows(work) == list(range(1, 31)) and _steps(work)[-1] == 30
    assert not integrity.verify(work / "checkpoints" / "30")
    assert not os.path.exists(work / workdir_lock.LOCK_FILE)


def test_a_dead_runs_lock_and_unfinished_saves_are_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / workdir_lock.LOCK_FILE
    lock.write_text(json.dumps(dict(host=socket.gethostname(), pid=dead.pid, started="then")))
    unfinished = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234567"
    (unfinished / "state").mkdir(parents=True)
    (unfinished / "state" / "part").write_bytes(b"half a save")
    with caplog.at_level(logging.WARNING):
        experiment.train(_quick(2), str(tmp_path))
    assert f"'pid': {dead.pid}" in caplog.text and "its process is gone" in caplog.text
    assert "Removed the unfinished checkpoints" in caplog.text
    assert not unfinished.exists() and _steps(tmp_path) == [2] and not lock.exists()


def test_another_hosts_lock_is_refused_unless_forced(tmp_path, caplog):
    lock = tmp_path / workdir_lock.LOCK_FILE
    lock.write_text(json.dumps(dict(host="elsewhere", pid=1, started="2020-01-01T00:00:00")))
    with pytest.raises(workdir_lock.WorkdirLockedError, match="pid 1 on host 'elsewhere'"):
        experiment.train(_quick(1), str(tmp_path))
    assert lock.exists()  # refused: nothing touched
    forced = _quick(1)
    forced.train.force_unlock = True
    with caplog.at_level(logging.WARNING):
        experiment.train(forced, str(tmp_path))
    assert "force_unlock" in caplog.text and not lock.exists()


# --- 5. SIGTERM before the first step


def test_sigterm_during_start_up_exits_75_with_nothing_lost(tmp_path):
    proc = subprocess.Popen(cmd(tmp_path, config_arg=":steps=4"), env=_env(tmp_path))
    lock = tmp_path / workdir_lock.LOCK_FILE
    t0 = time.time()
    while not lock.exists():  # taken first thing in experiment.train, before anything loads
        assert proc.poll() is None and time.time() - t0 < 120
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == main.EXIT_PREEMPTED
    assert not lock.exists()
    assert not os.path.exists(tmp_path / "metrics.jsonl") or not _rows(tmp_path)
    assert not glob.glob(str(tmp_path / "checkpoints" / "*"))


# --- 8. corrupt newest checkpoint: fall back to the newest intact step


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A finished 4-step run with checkpoints 2 and 4 (and its losses)."""
    work = tmp_path_factory.mktemp("base")
    experiment.train(_quick(4), str(work))
    assert _steps(work) == [2, 4]
    return work, losses(work)


def _largest_payload(step_dir) -> str:
    files = glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
    return max((f for f in files if os.path.isfile(f)), key=os.path.getsize)


def _truncate(step_dir):
    path = _largest_payload(step_dir)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return path, "bytes, .* at save"


def _delete_manifest(step_dir):
    path = os.path.join(step_dir, integrity.MANIFEST)
    os.remove(path)
    return path, "no checksum manifest"


def _flip_payload_bytes(step_dir):
    path = _largest_payload(step_dir)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        chunk = f.read(16)
        f.seek(-len(chunk), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in chunk))
    return path, "sha256 differs"


def _garbage_metadata(step_dir):
    path = os.path.join(step_dir, "_CHECKPOINT_METADATA")
    with open(path, "wb") as f:
        f.write(b"\x00\xffnot json{")
    return path, "sha256 differs|bytes, .* at save"


@pytest.mark.parametrize(
    "corrupt", [_truncate, _delete_manifest, _flip_payload_bytes, _garbage_metadata]
)
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_step(
    tmp_path, two_checkpoints, corrupt, caplog
):
    base, base_losses = two_checkpoints
    work = tmp_path / "run"
    shutil.copytree(base, work)
    damaged, problem = corrupt(str(work / "checkpoints" / "4"))
    with caplog.at_level(logging.WARNING):
        experiment.train(_quick(6), str(work))
    rel = os.path.relpath(damaged, work / "checkpoints" / "4")
    assert f"Checkpoint step 4 is corrupt ({work / 'checkpoints' / '4' / rel}: " in caplog.text
    assert "Resuming from step 2, the newest intact checkpoint." in caplog.text
    assert re.search(problem, caplog.text)
    kept = glob.glob(str(work / "checkpoints" / "corrupt-4-*"))
    assert len(kept) == 1  # renamed, kept for inspection, untouched by orbax's rotation
    if os.path.basename(damaged) != integrity.MANIFEST:  # the damage itself is kept
        original = os.path.join(base, "checkpoints", "4", rel)
        with open(os.path.join(kept[0], rel), "rb") as f, open(original, "rb") as g:
            assert f.read() != g.read()
    assert _steps(work) == [2, 4, 6]
    # Steps 3 and 4 were trained again from the intact step 2: the same losses, logged once.
    assert _rows(work) == [1, 2, 3, 4, 5, 6]
    assert losses(work)[3] == base_losses[3] and losses(work)[4] == base_losses[4]


# --- 9. one metrics row per step after a SIGKILL


def _event_steps(logdir, tag="train/loss") -> list[int]:
    """Steps of the TensorBoard scalar ``tag`` in every event file (TFRecord frames: length,
    its CRC, the Event, its CRC)."""
    from tensorboardX.proto import event_pb2

    steps = []
    for name in sorted(os.listdir(logdir)):
        data, i = open(os.path.join(logdir, name), "rb").read(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            steps += [event.step for v in event.summary.value if v.tag == tag]
            i += 12 + n + 4
    return steps


def test_sigkill_and_resume_leave_one_metrics_row_per_step(tmp_path):
    run = [*cmd(tmp_path, config_arg=":steps=16"), "--config.train.checkpoint_every_steps=6"]
    proc = subprocess.Popen(run, env=_env(tmp_path))
    wait_for_step(tmp_path, 8, proc)  # killed past checkpoint 6, before checkpoint 12
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(_rows(tmp_path)) > max(_steps(tmp_path), default=0)  # rows the rerun repeats
    subprocess.run(run, check=True, env=_env(tmp_path))
    assert _rows(tmp_path) == list(range(1, 17))
    assert _rows(tmp_path, "eval/nll") == [4, 8, 12, 16]
    assert sorted(_event_steps(tmp_path / "tensorboard")) == list(range(1, 17))
