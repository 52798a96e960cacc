r"""One run per workdir: ``workdir/.lock`` holds the running process's host, pid and start time.

``acquire(workdir)`` (process 0 of a run; ``loop.guard`` pairs it with ``release`` in a
``finally``) creates the lock atomically: its JSON is written to a private file first and
hard-linked into place, which fails when a lock exists, so no run ever sees a half-written one.
A second run into the same workdir gets ``WorkdirLockedError`` naming the holder and the ways
out. ``release`` removes the lock if it is still this run's.

A lock whose process is gone is stale and is taken over with a warning: same host and no
process with that pid, or one that started at another time (the pid was reused). A lock of
another host cannot be checked from here (no liveness probe across hosts): it is refused, and
the message says how to override it once that run is known to be dead (delete the file, or
``train.force_unlock=True``). On a bucket workdir (``gs://...``) the lock is best effort:
object stores have no exclusive create, so two runs started in the same instant can both pass.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import uuid

from etils import epath

from distill_jax.train.metrics import is_local

LOCK_FILE = ".lock"
log = logging.getLogger(__name__)


class WorkdirLockedError(RuntimeError):
    """Another run holds the workdir's lock."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (clock ticks after boot; Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def this_process() -> dict:
    """The lock's contents for this process: host, pid, start time and a unique token."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "process_start": _process_start(pid),
        "token": uuid.uuid4().hex,
    }


def is_stale(holder: dict) -> bool:
    """The holder ran on this host and its process is gone (or its pid now names a process
    that started at another time)."""
    if holder.get("host") != socket.gethostname():
        return False
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    recorded, now = holder.get("process_start"), _process_start(pid)
    return recorded is not None and now is not None and recorded != now


def _read(path: epath.Path) -> dict | None:
    """The lock's holder, or None when the file is gone or not a lock's JSON."""
    try:
        holder = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _create(path: epath.Path, me: dict) -> bool:
    """Create the lock holding ``me``; False when a lock exists."""
    text = json.dumps(me)
    if not is_local(str(path)):
        if path.exists():
            return False
        path.write_text(text)
        return True
    private = f"{path}.{me['pid']}.{me['token']}"
    with open(private, "x") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(private, path)  # atomic, and fails when the lock exists
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: an exclusive create instead
        return _create_exclusive(path, text)
    finally:
        os.remove(private)


def _create_exclusive(path: epath.Path, text: str) -> bool:
    """Create ``path`` with O_EXCL (atomic; a reader may briefly see it empty); False when it
    exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True


def _take_over(path: epath.Path, holder: dict | None) -> bool:
    """Remove a stale lock whose contents are ``holder``; False when another run replaced it
    in between (its lock is left in place)."""
    if not is_local(str(path)):
        path.unlink(missing_ok=True)
        return True
    aside = f"{path}.stale.{os.getpid()}.{uuid.uuid4().hex}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True
    if _read(epath.Path(aside)) != holder:  # a new run locked it after we read the old one
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
        os.remove(aside)
        return False
    os.remove(aside)
    return True


def refusal(path, holder: dict | None) -> str:
    """The message for a workdir locked by ``holder``."""
    who = (
        f"pid {holder.get('pid')} on host {holder.get('host')!r} since {holder.get('started')}"
        if holder
        else "a run whose lock file is unreadable"
    )
    return (
        f"The workdir is in use by {who} (lock file {path}). Wait for that run to end or use "
        f"another --workdir; if that run is dead, delete {path} or set "
        "config.train.force_unlock=True."
    )


def acquire(workdir: str, *, force: bool = False) -> dict:
    """Lock ``workdir`` for this process; returns the lock's contents (``release`` takes them).

    Raises:
        WorkdirLockedError: another live run holds it (and ``force`` is False).
    """
    path = epath.Path(workdir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    me = this_process()
    for _ in range(3):  # a lock that disappears between our attempts is simply retried
        if _create(path, me):
            return me
        holder = _read(path)
        if holder is None and not path.exists():  # released in between: try again
            continue
        stale = holder is not None and is_stale(holder)
        if not (force or stale):
            raise WorkdirLockedError(refusal(path, holder))
        if _take_over(path, holder):
            why = "force_unlock" if force and not stale else "its process is gone"
            log.warning("Taking over the lock of %s (%s): %s.", workdir, why, holder)
    raise WorkdirLockedError(refusal(path, _read(path)))


def release(workdir: str, me: dict) -> None:
    """Remove the lock if it still is ``me``'s (a forced takeover may have replaced it)."""
    path = epath.Path(workdir) / LOCK_FILE
    if _read(path) == me:
        path.unlink(missing_ok=True)
