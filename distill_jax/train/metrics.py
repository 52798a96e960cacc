"""Metrics of a run: ``metrics.jsonl`` (or bucket parts), TensorBoard and the progress bar."""

from __future__ import annotations

import json
import os
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


def read_metrics(workdir: str) -> list[dict]:
    """Every metrics row of ``workdir`` in the order written: ``metrics.jsonl`` (local) and the
    ``metrics-parts`` objects of a bucket workdir."""
    root = epath.Path(workdir)
    texts = [(root / "metrics.jsonl").read_text()] if (root / "metrics.jsonl").exists() else []
    if (root / METRICS_PARTS).exists():
        texts += [p.read_text() for p in sorted((root / METRICS_PARTS).iterdir())]
    return [json.loads(line) for text in texts for line in text.splitlines() if line.strip()]
