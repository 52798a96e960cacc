"""launch/: the local N-process run equals one process; every launcher's --dry_run prints
well-formed commands whose main.py flags load the same config; bad launches fail before
anything starts."""

import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from main_flags import parse_main_flags as _main_flags
from trainer_runs import CONFIG, ROOT, cmd, losses

from distill_jax import main as entry

SMOL = os.path.join(ROOT, "configs", "smollm2_layerdrop_kd.py")


def _launch(script, *args, check=True):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_two_local_processes_equal_one(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    single, multi = tmp_path / "single", tmp_path / "multi"
    subprocess.run(cmd(single, config_arg=":steps=4"), check=True, env=env, cwd=ROOT)
    _launch(
        "local.py",
        "--num_processes=2",
        "--devices_per_process=2",
        f"--config={CONFIG}:steps=4",
        f"--workdir={multi}",
    )
    want, got = losses(single), losses(multi)
    assert sorted(got) == [1, 2, 3, 4]
    np.testing.assert_allclose(
        [got[k] for k in sorted(got)], [want[k] for k in sorted(want)], rtol=1e-5
    )


def test_local_dry_run_prints_one_command_per_process(tmp_path):
    out = _launch(
        "local.py",
        "--num_processes=4",
        "--devices_per_process=2",
        "--port=4321",
        "--config=configs/tiny_kd.py:steps=7",
        "--config.optimizer.learning_rate=0.003",
        f"--workdir={tmp_path}",
        "--dry_run",
    ).stdout
    subprocess.run(["bash", "-n"], input=out, text=True, check=True)
    lines = out.strip().splitlines()
    assert lines[-1] == "wait" and len(lines) == 5
    for i, line in enumerate(lines[:4]):
        words = shlex.split(line.removesuffix(" &"))
        env = dict(w.split("=", 1) for w in words[:2])
        assert env == {
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        }
        assert words[2:5] == [sys.executable, "-m", "distill_jax.main"]
        fv = _main_flags(words[5:])
        assert (fv.num_processes, fv.process_id) == (4, i)
        assert fv.coordinator_address == "127.0.0.1:4321" and fv.workdir == str(tmp_path)
        assert fv.config.train.steps == 7 and fv.config.optimizer.learning_rate == 0.003


def _pinned(name):
    with open(os.path.join(ROOT, "setup.py")) as f:
        return re.search(rf'"{name}==([^"]+)"', f.read()).group(1)


def _makefile_assets():
    with open(os.path.join(ROOT, "Makefile")) as f:
        text = f.read().replace("\\\n", " ")
    return re.search(r"^ASSETS := (.*)$", text, re.M).group(1).split()


@pytest.mark.parametrize("queued", [True, False])
def test_tpu_pod_dry_run(queued):
    args = [
        "--name=kd-pod",
        "--zone=us-west4-a",
        "--project=my-proj",
        "--accelerator_type=v4-32",
        "--config=configs/smollm2_layerdrop_kd.py",
        "--workdir=gs://bucket/kd",
        "--config.train.steps=2000",
        "--config.data.global_batch_size=32",
        "--spot",
        "--dry_run",
    ]
    out = _launch("tpu_pod.py", *args, *([] if queued else ["--noqueued"])).stdout
    subprocess.run(["bash", "-n"], input=out, text=True, check=True)
    assert out.startswith("# v4-32: 16 devices on 4 workers")  # v4: 2 cores per chip, 4 chips/host
    cmds = [shlex.split(ln) for ln in out.splitlines() if ln and not ln.startswith("#")]
    gcloud = [c for c in cmds if c[0] == "gcloud"]
    assert len(gcloud) == len(cmds) - 1  # and the wheel build
    for c in gcloud:
        assert c[:3] == ["gcloud", "compute", "tpus"]
        assert "--zone=us-west4-a" in c and "--project=my-proj" in c
    kind = "queued-resources" if queued else "tpu-vm"
    create = next(c for c in gcloud if c[4] == "create")
    assert create[3] == kind and "--accelerator-type=v4-32" in create and "--spot" in create
    version = "--runtime-version=" if queued else "--version="
    assert version + "tpu-ubuntu2204-base" in create
    (wheel,) = [c for c in cmds if c[0] != "gcloud"]
    assert wheel[1:4] == ["-m", "pip", "wheel"] and wheel[-1] == ROOT
    ssh = {
        next(w for w in c if w.startswith("--command=")).split("=", 1)[1]: c
        for c in gcloud
        if c[4] == "ssh"
    }
    for c in ssh.values():
        assert c[5] == "kd-pod" and "--worker=all" in c
    (scp,) = [c for c in gcloud if c[4] == "scp"]
    copied = [os.path.basename(p) for p in scp[5:7]]
    assert copied[1] == "smollm2_layerdrop_kd.py" and scp[7] == "kd-pod:distill_jax_run/"
    install = next(cmd for cmd in ssh if "pip install" in cmd)
    steps = [shlex.split(s) for s in install.split(" && ")]
    assert f"jax[tpu]=={_pinned('jax')}" in steps[0]
    assert steps[1][-1] == f"distill_jax_run/{copied[0]}[gcs]"
    assert steps[2][-len(_makefile_assets()) :] == _makefile_assets()
    train = next(cmd for cmd in ssh if "distill_jax.main" in cmd)
    cd, run = train.split(" && ")
    assert cd == "cd distill_jax_run"
    words = shlex.split(run)
    assert words[:3] == ["python3", "-m", "distill_jax.main"]
    fv = _main_flags(words[3:], config_dir=os.path.join(ROOT, "configs"))
    assert fv.distributed and fv.workdir == "gs://bucket/kd"
    assert fv.config.train.steps == 2000 and fv.config.data.global_batch_size == 32
    assert words[3] == "--config=smollm2_layerdrop_kd.py"  # the copy on the worker
    assert "--format=value(state.state)" in out or "--format=value(state)" in out


def test_tpu_pod_dry_run_with_compile_check():
    args = ["--name=kd-pod", "--zone=us-west4-a", "--accelerator_type=v5p-128"]
    args += [f"--config={SMOL}", "--workdir=gs://bucket/kd", "--check", "--dry_run"]
    out = _launch("tpu_pod.py", *args, "--config.data.global_batch_size=64").stdout
    subprocess.run(["bash", "-n"], input=out, text=True, check=True)
    lines = [ln for ln in out.splitlines() if ln and not ln.startswith("# v5p")]
    assert lines[0].startswith("# 0. compile the train step for this slice here")
    check = shlex.split(lines[1])  # before anything is created
    assert check[:3] == [sys.executable, "-m", "distill_jax.main"]
    fv = _main_flags(check[3:])
    assert fv.mode == "compile" and fv.topology == "v5p-128" and fv.workdir == "compile_check"
    assert fv.config.data.global_batch_size == 64
    assert lines[2].startswith("# 1. create the slice")


@pytest.mark.parametrize(
    "accelerator,devices,hosts",
    # Cloud TPU docs: v5e/v6e count chips (multi-host slices: 4 chips per host, up to 8 on one
    # host); v3 counts TensorCores, one JAX device each, 8 per host.
    [("v5litepod-8", 8, 1), ("v5litepod-16", 16, 4), ("v3-32", 32, 4), ("v6e-64", 64, 16)],
)
def test_tpu_slice_sizes(accelerator, devices, hosts):
    out = _launch(
        "tpu_pod.py",
        "--name=p",
        "--zone=z",
        f"--accelerator_type={accelerator}",
        f"--config={SMOL}",
        "--config.data.global_batch_size=64",
        "--workdir=gs://b/kd",
        "--dry_run",
    ).stdout
    assert out.startswith(f"# {accelerator}: {devices} devices on {hosts} workers")


def test_slurm_dry_run():
    out = _launch(
        "slurm_gpu.py",
        "--nodes=4",
        "--gpus_per_node=8",
        "--partition=gpu",
        f"--config={SMOL}",
        "--workdir=/shared/runs/kd",
        "--config.data.global_batch_size=64",
        "--config.train.steps=300",
        "--dry_run",
    ).stdout
    script, submit = out.split("# submit:\n")
    assert submit.strip() == "sbatch /shared/runs/kd/distill_jax.sbatch"
    body = script.split("\n", 1)[1]
    subprocess.run(["bash", "-n"], input=body, text=True, check=True)
    sbatch = dict(
        ln.split(" ", 1)[1].lstrip("-").split("=", 1)
        for ln in body.splitlines()
        if ln.startswith("#SBATCH") and "=" in ln
    )
    assert sbatch["nodes"] == "4" and sbatch["ntasks-per-node"] == "1"
    assert sbatch["gpus-per-node"] == "8" and sbatch["signal"].startswith("TERM@")
    assert "#SBATCH --requeue" in body
    assert f'-eq {entry.EXIT_PREEMPTED} ]; then scontrol requeue "$SLURM_JOB_ID"' in body
    (srun,) = [ln for ln in body.splitlines() if ln.startswith("srun")]
    task = shlex.split(srun)[-1]
    words = shlex.split(task)
    assert words[:4] == ["exec", "python", "-m", "distill_jax.main"]
    assert words[-3:] == [
        "--coordinator_address=$COORDINATOR",
        "--num_processes=$SLURM_NTASKS",
        "--process_id=$SLURM_PROCID",
    ]
    fv = _main_flags([w for w in words[4:] if "$" not in w])
    assert fv.workdir == "/shared/runs/kd" and fv.config.train.steps == 300
    assert fv.config.data.global_batch_size == 64


@pytest.mark.parametrize(
    "script,args,message",
    [
        ("tpu_pod.py", ["--workdir=/tmp/kd"], "a pod's workers share no disk"),
        (
            "tpu_pod.py",
            ["--workdir=gs://b/kd", "--config.data.global_batch_size=12"],
            "global_batch_size=12 does not split over 16 batch shards",
        ),
        ("tpu_pod.py", ["--workdir=gs://b/kd", "--config.train.stepz=3"], 'Did you mean "steps"'),
        ("slurm_gpu.py", ["--workdir=/tmp/kd"], "node-local"),
        (
            "slurm_gpu.py",
            ["--workdir=/shared/kd", "--nodes=3", "--config.data.global_batch_size=16"],
            "global_batch_size=16 does not split over 3 processes",
        ),
    ],
)
def test_bad_launches_fail_before_anything_runs(script, args, message):
    common = [f"--config={SMOL}", "--dry_run"]
    extra = ["--name=p", "--zone=z", "--accelerator_type=v5litepod-16"]
    out = _launch(script, *common, *(extra if script == "tpu_pod.py" else []), *args, check=False)
    assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]
    assert "gcloud" not in out.stdout and "sbatch" not in out.stdout


def test_bad_accelerator_type():
    out = _launch(
        "tpu_pod.py",
        "--name=p",
        "--zone=z",
        "--accelerator_type=v9-8",
        f"--config={SMOL}",
        "--workdir=gs://b/kd",
        "--dry_run",
        check=False,
    )
    assert out.returncode != 0 and "expected <generation>-<size>" in out.stderr


@pytest.mark.parametrize(
    "flag,value,says",
    [
        ("--job_name", "kd\ntouch /tmp/pwned", "a newline"),
        ("--time", "24:00:00\nrm -rf ~", "a newline"),
        ("--partition", "gpu;reboot", "the character ';'"),
        ("--account", "$(id)", "the character '$'"),
        ("--workdir", "/shared/kd\necho hi", "a newline"),
        ("--workdir", "/shared/my runs/kd", "the character ' '"),
        ("--time", "tomorrow", "a value of another form"),
    ],
)
def test_slurm_refuses_values_that_would_break_a_directive_line(flag, value, says):
    """Values written unquoted into #SBATCH lines: a newline (a new shell line) or a shell
    metacharacter is refused naming the flag, before any script is written or printed."""
    args = {"--workdir": "/shared/runs/kd", flag: value}
    out = _launch(
        "slurm_gpu.py",
        f"--config={SMOL}",
        "--dry_run",
        "--config.data.global_batch_size=64",
        *(f"{k}={v}" for k, v in args.items()),
        check=False,
    )
    assert out.returncode != 0, out.stdout
    assert f"{flag}={value!r} goes into an #SBATCH line and holds {says}" in out.stderr
    assert "#SBATCH" not in out.stdout and "sbatch" not in out.stdout


def test_slurm_quotes_everything_else():
    """A config override with a newline and shell metacharacters reaches main.py as one
    argument, exactly: the script stays valid bash and nothing of it is run by the shell."""
    tricky = "x\n$(touch /tmp/pwned); `id` 'q' \"d\""
    out = _launch(
        "slurm_gpu.py",
        f"--config={SMOL}",
        "--workdir=/shared/runs/kd",
        "--partition=gpu,debug",
        "--time=2-12:00:00",
        "--config.data.global_batch_size=64",
        f"--config.data.tokenizer={tricky}",
        "--dry_run",
    ).stdout
    body = out.split("# submit:\n")[0].split("\n", 1)[1]
    subprocess.run(["bash", "-n"], input=body, text=True, check=True)
    assert "#SBATCH --partition=gpu,debug" in body and "#SBATCH --time=2-12:00:00" in body
    (srun,) = [ln for ln in shlex.split(body, comments=True) if ln.startswith("exec ")]
    words = shlex.split(srun)
    assert f"--config.data.tokenizer={tricky}" in words


@pytest.mark.parametrize(
    "flag,value", [("--name", "p\nrm -rf /"), ("--zone", "z;id"), ("--workdir", "gs://b/k d")]
)
def test_tpu_pod_refuses_names_with_newlines_or_metacharacters(flag, value):
    args = {"--name": "p", "--zone": "z", "--workdir": "gs://b/kd", flag: value}
    out = _launch(
        "tpu_pod.py",
        "--accelerator_type=v5litepod-16",
        f"--config={SMOL}",
        "--config.data.global_batch_size=64",
        "--dry_run",
        *(f"{k}={v}" for k, v in args.items()),
        check=False,
    )
    assert out.returncode != 0 and f"{flag}={value!r} goes into" in out.stderr, out.stderr[-2000:]
    assert "gcloud" not in out.stdout
