r"""Checkpoint integrity: a checksum manifest sealed into each step, checked before a resume.

orbax commits a step directory (``checkpoints/<step>``) by renaming it into place; after that
(``Checkpoints`` waits for the asynchronous save) ``write_manifest`` records every file under it,
relative path -> size and sha256, in ``checksums.json``. The manifest is written last, under a
temporary name and renamed, so a step with a manifest is one whose save finished.

On a restart ``fall_back_to_intact`` checks the newest step against its manifest (``verify``): a
file missing, of another size or with another checksum, an unreadable manifest, or none at all
while an older step is sealed. A corrupt step is renamed ``corrupt-<step>-<UTC time>`` beside
the others (``quarantine``): kept for inspection, never deleted, and not a step name to orbax
(which neither restores nor rotates it away). The next older step is checked the same way. A
newest step without a manifest is used (with a warning) only when no older step is sealed:
checkpoints written before manifests existed, or ``keep_checkpoints=1`` killed in the seconds
between orbax's commit and the manifest.

``remove_stale_temporaries`` removes what a dead run's unfinished saves left behind (orbax's
``*.orbax-checkpoint-tmp*`` directories, a manifest's temporary file); call it only while holding
the workdir lock (``train/workdir_lock.py``), when no other run can be saving.
"""

from __future__ import annotations

import datetime
import hashlib
import json

from etils import epath

MANIFEST = "checksums.json"
_TEMPORARY = ".orbax-checkpoint-tmp"
_MANIFEST_TMP = MANIFEST + ".tmp-"
_CHUNK_BYTES = 8 << 20


def file_sha256(path: epath.Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _files_under(folder: epath.Path, prefix: str = "") -> list[str]:
    """Relative paths of every file under ``folder`` (``iterdir`` walk: epath has no
    recursive glob on buckets)."""
    names = []
    for path in folder.iterdir():
        rel = f"{prefix}{path.name}"
        names += _files_under(path, rel + "/") if path.is_dir() else [rel]
    return names


def _payload_files(step_dir: epath.Path) -> list[str]:
    """Relative paths of the files of a step directory, the manifest and its temporaries
    excluded, sorted."""
    names = _files_under(step_dir)
    return sorted(n for n in names if n != MANIFEST and not n.startswith(_MANIFEST_TMP))


def write_manifest(step_dir) -> None:
    """Seal a committed step: ``checksums.json`` with every file's size and sha256, written
    under a temporary name and renamed (atomic on a local disk)."""
    step_dir = epath.Path(step_dir)
    files = {
        rel: {"bytes": (step_dir / rel).stat().length, "sha256": file_sha256(step_dir / rel)}
        for rel in _payload_files(step_dir)
    }
    tmp = step_dir / f"{_MANIFEST_TMP}{datetime.datetime.now().timestamp():.6f}"
    tmp.write_text(json.dumps({"format": 1, "files": files}, indent=1))
    tmp.replace(step_dir / MANIFEST)


def is_sealed(step_dir) -> bool:
    """The step directory has its manifest (its save finished)."""
    return (epath.Path(step_dir) / MANIFEST).exists()


def verify(step_dir) -> list[str]:
    """What is wrong with a step directory against its manifest, one line per problem naming
    the path ([] when intact)."""
    step_dir = epath.Path(step_dir)
    manifest = step_dir / MANIFEST
    if not manifest.exists():
        return [f"{manifest}: no checksum manifest (its save never finished, or it was removed)"]
    try:
        files = json.loads(manifest.read_text())["files"]
        expected = {rel: (int(v["bytes"]), str(v["sha256"])) for rel, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return [f"{manifest}: unreadable checksum manifest ({type(e).__name__}: {e})"]
    problems = []
    for rel, (size, sha) in sorted(expected.items()):
        path = step_dir / rel
        if not path.exists():
            problems.append(f"{path}: missing")
        elif path.stat().length != size:
            problems.append(f"{path}: {path.stat().length} bytes, {size} at save (truncated?)")
        elif file_sha256(path) != sha:
            problems.append(f"{path}: sha256 differs from the one recorded at save")
    return problems


def quarantine(step_dir, now: datetime.datetime | None = None) -> epath.Path:
    """Rename a corrupt step directory to ``corrupt-<step>-<UTC time>`` beside it (kept for
    inspection; orbax does not read it as a step). Returns the new path."""
    step_dir = epath.Path(step_dir)
    now = now or datetime.datetime.now(datetime.UTC)
    target = step_dir.parent / f"corrupt-{step_dir.name}-{now:%Y%m%dT%H%M%S%fZ}"
    step_dir.rename(target)
    return target


def step_dirs(checkpoint_dir) -> list[epath.Path]:
    """The step directories of ``checkpoint_dir`` (names that are integers), newest first."""
    root = epath.Path(checkpoint_dir)
    if not root.exists():
        return []
    steps = [p for p in root.iterdir() if p.name.isdigit() and p.is_dir()]
    return sorted(steps, key=lambda p: int(p.name), reverse=True)


def fall_back_to_intact(checkpoint_dir) -> list[str]:
    """Quarantine corrupt steps, newest first, until the newest step is intact; returns the
    warnings to show (each corrupt step with its problems and new name, then the step the run
    will resume from)."""
    steps = step_dirs(checkpoint_dir)
    warnings: list[str] = []
    for i, step_dir in enumerate(steps):
        problems = verify(step_dir)
        if not problems:
            break
        older_sealed = any(is_sealed(p) for p in steps[i + 1 :])
        if not is_sealed(step_dir) and not older_sealed:
            warnings.append(
                f"Checkpoint step {step_dir.name} has no checksum manifest and no older step "
                f"has one: resuming from it unverified ({step_dir})."
            )
            return warnings
        kept = quarantine(step_dir)
        more = f"; and {len(problems) - 3} more" if problems[3:] else ""
        shown = "; ".join(problems[:3]) + more
        warnings.append(
            f"Checkpoint step {step_dir.name} is corrupt ({shown}); it is kept for inspection "
            f"as {kept}."
        )
    if warnings:
        intact = next((p for p in steps if p.exists()), None)
        warnings.append(
            f"Resuming from step {intact.name}, the newest intact checkpoint."
            if intact is not None
            else "No intact checkpoint is left: training starts again from step 0."
        )
    return warnings


def remove_stale_temporaries(checkpoint_dir) -> list[str]:
    """Remove the unfinished saves of a dead run: ``*.orbax-checkpoint-tmp*`` directories of
    ``checkpoint_dir`` and manifest temporaries inside its steps. Returns the removed paths.
    Only while holding the workdir lock."""
    root = epath.Path(checkpoint_dir)
    if not root.exists():
        return []
    removed = []
    for path in sorted(root.iterdir()):
        if _TEMPORARY in path.name:
            path.rmtree() if path.is_dir() else path.unlink()
            removed.append(str(path))
        elif path.name.isdigit() and path.is_dir():
            for tmp in sorted(path.glob(_MANIFEST_TMP + "*")):
                tmp.unlink()
                removed.append(str(tmp))
    return removed
