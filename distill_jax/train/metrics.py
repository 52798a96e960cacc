"""Metrics of a run: ``metrics.jsonl`` (or bucket parts), TensorBoard and the progress bar.

A run resumed from checkpoint step s (``Logger(..., start=s)``) first drops the rows and
TensorBoard events of steps after s (``truncate_after``), which the killed run logged and the
resumed one logs again: one row per step and kind, whatever the interruptions.
"""

from __future__ import annotations

import json
import os
import struct
import time

from etils import epath
from tqdm import tqdm


def is_local(workdir: str) -> bool:
    """False for a bucket URL such as ``gs://bucket/run``."""
    return "://" not in str(workdir)


class Logger:
    """metrics.jsonl + TensorBoard (process 0) + a tqdm bar with tokens/s and ETA.

    Rows are buffered and written by ``flush`` (the loop flushes at log, eval and checkpoint
    steps, never in between). A local workdir appends to ``metrics.jsonl``; a bucket (object
    stores cannot append) gets one new object ``metrics-parts/<first step>-<time>.jsonl`` per
    flush, never a rewrite: ``read_metrics`` joins them.
    """

    def __init__(self, workdir: str, total: int, start: int, enabled: bool):
        self.enabled = enabled
        self.workdir = workdir
        self.rows: list[dict] = []
        self.writer = None
        if enabled:
            truncate_after(workdir, start)
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(epath.Path(workdir) / "tensorboard"))
        self.bar = tqdm(total=total, initial=start, desc="distill", disable=not enabled)
        self.t0, self.tokens = time.perf_counter(), 0.0

    def log(self, step: int, metrics: dict, prefix: str = "train"):
        """Buffer one row of host values (floats); written by the next ``flush``."""
        if not self.enabled:
            return
        row = {"step": step, **{f"{prefix}/{k}": float(v) for k, v in metrics.items()}}
        self.rows.append(row)
        for k, v in row.items():
            if k != "step":
                self.writer.add_scalar(k, v, step)

    def flush(self):
        if not self.enabled or not self.rows:
            return
        text = "".join(json.dumps(row) + "\n" for row in self.rows)
        if is_local(self.workdir):
            with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as f:
                f.write(text)
        else:
            parts = epath.Path(self.workdir) / METRICS_PARTS
            parts.mkdir(parents=True, exist_ok=True)
            (parts / f"{self.rows[0]['step']:010d}-{time.time_ns()}.jsonl").write_text(text)
        self.rows = []
        self.writer.flush()

    def advance(self, steps: int, tokens: float, loss: float):
        """The bar moves by ``steps`` steps that trained on ``tokens`` tokens (host values)."""
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}")
        self.bar.update(steps)

    def close(self):
        self.flush()
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


METRICS_PARTS = "metrics-parts"


def _kept_rows(text: str, step: int) -> tuple[str, bool]:
    """(the JSON lines of ``text`` with step <= ``step``, whether any line was dropped); a line
    that does not parse (cut short by a kill mid-write) is dropped too."""
    kept, dropped = [], False
    for line in text.splitlines():
        try:
            keep = bool(line.strip()) and json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        kept += [line + "\n"] if keep else []
        dropped |= not keep and bool(line.strip())
    return "".join(kept), dropped


def _replace(path: epath.Path, data: bytes, workdir: epath.Path) -> None:
    """Rewrite ``path`` atomically: a temporary in the workdir (where no reader of metrics
    parts or event files looks), renamed over it."""
    tmp = workdir / f".rewrite-{os.getpid()}"
    tmp.write_bytes(data)
    tmp.replace(path)


def _kept_events(data: bytes, step: int) -> tuple[bytes, bool]:
    """(the TFRecord-framed TensorBoard events of ``data`` with step <= ``step``, plus the
    file-version header; whether any was dropped). Records are copied byte for byte (their
    CRCs stay valid); a record cut short by a kill ends the file."""
    from tensorboardX.proto import event_pb2

    kept, dropped, i = [], False, 0
    while i + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[i : i + 8])
        end = i + 12 + length + 4
        if end > len(data):
            return b"".join(kept), True
        event = event_pb2.Event.FromString(data[i + 12 : i + 12 + length])
        if event.HasField("file_version") or event.step <= step:
            kept.append(data[i:end])
        else:
            dropped = True
        i = end
    return b"".join(kept), dropped or i != len(data)


def truncate_after(workdir: str, step: int) -> None:
    """Drop the metrics rows (``metrics.jsonl`` or the bucket's parts) and TensorBoard events
    of steps after ``step``, each file rewritten atomically and only when something goes;
    ``step`` 0 (a fresh start) drops every row."""
    root = epath.Path(workdir)
    limit = step if step > 0 else -1
    files = [root / "metrics.jsonl"]
    if (root / METRICS_PARTS).exists():
        files += sorted((root / METRICS_PARTS).iterdir())
    for path in files:
        if path.exists():
            text, dropped = _kept_rows(path.read_text(), limit)
            if dropped:
                _replace(path, text.encode(), root)
    events = root / "tensorboard"
    for path in sorted(events.iterdir()) if events.exists() else []:
        data, dropped = _kept_events(path.read_bytes(), limit)
        if dropped:
            _replace(path, data, root)


def read_metrics(workdir: str) -> list[dict]:
    """Every metrics row of ``workdir`` in the order written: ``metrics.jsonl`` (local) and the
    ``metrics-parts`` objects of a bucket workdir."""
    root = epath.Path(workdir)
    texts = [(root / "metrics.jsonl").read_text()] if (root / "metrics.jsonl").exists() else []
    if (root / METRICS_PARTS).exists():
        texts += [p.read_text() for p in sorted((root / METRICS_PARTS).iterdir())]
    return [json.loads(line) for text in texts for line in text.splitlines() if line.strip()]
