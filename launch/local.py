r"""Run one config as N JAX processes on this machine (coordinator on 127.0.0.1).

    python launch/local.py --num_processes=2 --devices_per_process=2 \
        --config=configs/tiny_kd.py:steps=4 --workdir=/tmp/tiny2 [--dry_run]

This is what a multi-host pod does, on one machine: every process runs ``python -m
distill_jax.main`` with ``--coordinator_address=127.0.0.1:<port> --num_processes=N
--process_id=i``, sees its own ``devices_per_process`` CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count``), reads its own rows of each batch and
joins the others in one global mesh of N x devices_per_process devices. The loss curve equals a
single process over the same number of devices (``tests/launch_test.py``). If one process fails
the others are stopped; the exit status is the first failure's (75: preempted, run again).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import common
from absl import app, flags

NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "Processes to start.")
DEVICES = flags.DEFINE_integer("devices_per_process", 1, "CPU devices each process sees.")
PORT = flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1 (0: a free one).")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(args, workdir, n, port) -> list[list[str]]:
    """The N command lines (process i of n)."""
    return [
        common.main_command(
            args,
            workdir,
            f"--coordinator_address=127.0.0.1:{port}",
            f"--num_processes={n}",
            f"--process_id={i}",
            python=sys.executable,
        )
        for i in range(n)
    ]


def run(cmds: list[list[str]], env: dict) -> int:
    """Start all, wait; on the first failure stop the rest. Returns the exit status."""
    procs = [subprocess.Popen(cmd, env=env) for cmd in cmds]
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                for p in procs:
                    p.wait()
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        return max(p.wait() for p in procs) or 1


def main(argv):
    del argv
    n, d = NUM_PROCESSES.value, DEVICES.value
    if n < 1 or d < 1:
        raise app.UsageError("--num_processes and --devices_per_process must be >= 1.")
    common.check_fits(common.CONFIG.value, devices=n * d, processes=n)
    port = PORT.value or free_port()
    xla = f"--xla_force_host_platform_device_count={d}"
    cmds = commands(common.config_args(), common.WORKDIR.value, n, port)
    if common.DRY_RUN.value:
        for cmd in cmds:
            print(f"JAX_PLATFORMS=cpu XLA_FLAGS={xla} {common.join(cmd)} &")
        print("wait")
        return 0
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla}
    return run(cmds, env)


if __name__ == "__main__":
    app.run(main)
