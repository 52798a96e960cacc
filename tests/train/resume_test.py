"""Exact resume after SIGKILL in every regime (same-tokenizer, cross-tokenizer, progressive
pruning, on-policy with replay, preference pairs with DistiLLM-2's anchor state, cross-tokenizer
on-policy, an offline teacher cache), SIGTERM checkpoints and exit status, a non-finite loss
keeps the last good checkpoint."""

from __future__ import annotations

import functools
import os
import random
import re
import signal
import subprocess
import threading

import orbax.checkpoint as ocp
import pytest
from trainer_runs import (
    ALM_CONFIG,
    CONFIG,
    PAIRS_CONFIG,
    cmd,
    losses,
    tiny,
    wait_for_step,
    write_pairs,
)

from distill_jax import commands, experiment, main
from distill_jax.train import loop


@pytest.mark.parametrize(
    "config,extra",
    [
        (CONFIG, ""),
        (ALM_CONFIG, ""),
        (CONFIG, ",prune=True"),
        (CONFIG, ",onpolicy=0.5,replay=2"),
        (PAIRS_CONFIG, ",loss='distillm2'"),
        (ALM_CONFIG, ",onpolicy=1.0"),
        (CONFIG, ",cache="),
    ],
    ids=[
        "kd",
        "cross_tokenizer_alm",
        "progressive_pruning",
        "onpolicy_replay",
        "pairs",
        "cross_tokenizer_onpolicy",
        "cached_teacher",
    ],
)
def test_sigkill_and_resume_give_the_uninterrupted_loss_curve(tmp_path, config, extra):
    steps = 12 if config == CONFIG else 8
    if config == PAIRS_CONFIG:  # 36 training pairs: 8 steps of 8 cross an epoch
        extra += f",path={write_pairs(tmp_path / 'seqkd')}"
    if extra == ",cache=":  # the offline teacher's cache, written once for both runs
        extra += repr(str(tmp_path / "cache"))
        commands.build_cache(tiny(steps=steps, cache=str(tmp_path / "cache")))
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run = functools.partial(cmd, config_arg=f":steps={steps}{extra}", config=config)
    # The three processes run the same programs: JAX's persistent compilation cache lets the
    # second and third load what the first compiled (the test's time, not what it checks).
    env = {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    subprocess.run(run(straight), check=True, env=env)
    # With pruning stages after steps 3, 5 and 7 and checkpoints every 2 steps, a kill in 4..9
    # resumes from a checkpoint of an already pruned student.
    kill_at = random.Random(os.getpid()).randint(4 if extra else 3, steps - 3)
    proc = subprocess.Popen(run(broken), env=env)
    wait_for_step(broken, kill_at, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(run(broken), check=True, env=env)
    want, got = losses(straight), losses(broken)
    assert sorted(want) == sorted(got) == list(range(1, steps + 1))
    assert got == want, f"killed at step >= {kill_at}"  # bit-exact on CPU


def test_sigterm_leaves_a_checkpoint_of_the_current_step(tmp_path):
    proc = subprocess.Popen(cmd(tmp_path, config_arg=":steps=500"))
    wait_for_step(tmp_path, 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == main.EXIT_PREEMPTED  # "run me again": launchers restart
    last_logged = max(losses(tmp_path))
    manager = ocp.CheckpointManager(str(tmp_path / "checkpoints"))
    assert manager.latest_step() == last_logged < 500


def test_sigterm_on_a_checkpoint_step_saves_it_once(tmp_path):
    # Every step is a checkpoint step, so the SIGTERM always lands on one (it once saved twice).
    c = tiny(steps=500)
    c.train.checkpoint_every_steps = 1
    c.eval.every_steps = None

    def terminate():
        wait_for_step(tmp_path, 2, proc=None)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate, daemon=True).start()
    result = experiment.train(c, str(tmp_path))
    manager = ocp.CheckpointManager(str(tmp_path / "checkpoints"))
    assert manager.latest_step() == result["stopped_at"] == max(losses(tmp_path)) < 500


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    c = tiny(steps=30)
    c.optimizer.learning_rate = 1e30  # diverges within a few steps
    c.optimizer.grad_clip_norm = None
    c.train.checkpoint_every_steps = 1
    c.eval.every_steps = None
    with pytest.raises(
        loop.NonFiniteLossError, match=r"at step (\d+).*checkpoint is step (\d+)"
    ) as e:
        experiment.train(c, str(tmp_path))
    bad, good = (int(x) for x in re.search(r"at step (\d+).*step (\d+)", str(e.value)).groups())
    assert good == bad - 1
    assert ocp.CheckpointManager(str(tmp_path / "checkpoints")).latest_step() == good
