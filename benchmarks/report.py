r"""Run every benchmark in ``benchmarks/`` and write one report: REPORT.md, PNG plots, raw logs.

    python benchmarks/report.py                      # every script, default sizes
    python benchmarks/report.py --quick              # smaller sizes: a smoke run of the whole set
    python benchmarks/report.py --only step,fused_loss --out /tmp/bench
    python benchmarks/report.py --only step --script_args "step=--pair llama8b_1b"  # GPU MFU

Options:

* ``--only a,b``: run these scripts only (names without ``.py``); default: every ``*.py`` here
  whose name does not start with ``_``, except this file, in alphabetical order.
* ``--quick``: pass each script its small-size flags: ``--quick`` where the script has it
  (compile, fused_loss, pod, step, transforms), else the sizes in ``QUICK_ARGS`` (forward, data,
  alignment).
* ``--script_args NAME=ARGS`` (repeatable): more flags for one script, e.g.
  ``step=--pair llama8b_1b`` (step.py's accelerator mode: our step on Llama-3.1-8B ->
  Llama-3.2-1B with random weights, and its MFU).
* ``--out DIR``: the report folder (default ``benchmarks/report/``, ignored by git). It receives
  ``REPORT.md``, one ``<script>_<k>.png`` per table that has ratio columns, and
  ``logs/<script>.stdout`` / ``.stderr``.
* ``--bench_dir DIR``: where to look for the scripts (default: this file's folder).

The scripts run one after the other, each in its own process with this Python, their output
shown live. REPORT.md holds, per script, its command, start time, wall time, exit status and
load average, then everything it printed: its markdown tables re-emitted as tables, its other
lines as text, and under each table with ratio columns (cells like ``0.79x``: ours against the
naive version or a peer) a bar plot of those columns, 1x marked. A script that fails is reported
as failed, with the end of its stderr, and the others still run; the exit status of this script
is then 1.

MFU: on a GPU or TPU, the step.py section gains the model FLOPs utilisation of our distill step.
With ``--pair`` step.py prints it itself (its ``MFU`` column, model FLOP/s over the device's
published dense bf16 peak, ``_measure.PEAK_BF16_TFLOPS``), and the report repeats those rows.
Otherwise it is computed here from the comparison table: each JAX row's achieved model FLOP/s
(its ``GFLOP/s (model)`` column, not measured again) over that published peak, or, for a device
not in the table, step.py's ``of own matmul peak`` column (the fraction of a float32 matmul
measured on the same device).
The machine (CPU, jax backend, device kind) is read in a short child process, so that this
process never holds the accelerator while the benchmarks run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import step as step_bench
from _measure import PEAK_BF16_TFLOPS, peak_bf16_flops  # noqa: F401 (re-exported)

BENCH_DIR = Path(__file__).resolve().parent
QUICK_ARGS = {  # scripts without --quick: their own size flags, small
    "forward": ["--batch", "1", "--seq_len", "64", "--repeats", "2"],
    "data": ["--chapters", "120", "--seq_len", "512", "--k", "16"],
    "alignment": ["--pieces", "200"],
}
_RATIO = re.compile(r"(\d[\d,]*(?:\.\d+)?)x")
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


@dataclasses.dataclass
class Table:
    """A markdown table as printed: header cells and rows of cells, all strings."""

    header: list[str]
    rows: list[list[str]]

    def column(self, name: str) -> list[str]:
        return [row[self.header.index(name)] for row in self.rows]


@dataclasses.dataclass
class Run:
    """One script's run: what it printed and how it ended."""

    name: str
    command: list[str]
    started: str  # ISO 8601, UTC
    wall_s: float
    returncode: int
    stdout: str
    stderr: str = ""
    load: float | None = None  # 1-minute load average when it ended


# ---------------------------------------------------------------------------------- run


def discover(bench_dir: Path) -> list[Path]:
    """The benchmark scripts of ``bench_dir``: ``*.py`` not starting with ``_``, not this one."""
    me = Path(__file__).name
    return sorted(p for p in bench_dir.glob("*.py") if not p.name.startswith("_") and p.name != me)


def quick_args(script: Path) -> list[str]:
    if script.stem in QUICK_ARGS:
        return QUICK_ARGS[script.stem]
    return ["--quick"] if '"--quick"' in script.read_text() else []


def _tee(stream, sink, lines: list[str]) -> None:
    for line in stream:
        sink.write(line)
        sink.flush()
        lines.append(line)


def run_script(script: Path, args: list[str]) -> Run:
    """Run one script with this Python, echoing its stdout and stderr as they come."""
    command = [sys.executable, str(script), *args]
    print(f"\n==> {' '.join(command)}", flush=True)
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),  # lines as they are printed, not at exit
    )
    out, err = [], []
    errors = threading.Thread(target=_tee, args=(proc.stderr, sys.stderr, err), daemon=True)
    errors.start()
    _tee(proc.stdout, sys.stdout, out)
    returncode = proc.wait()
    errors.join()
    wall = time.perf_counter() - t0
    print(f"<== {script.name}: exit {returncode}, {wall:.1f} s", flush=True)
    return Run(script.stem, command, started, wall, returncode, "".join(out), "".join(err), _load())


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


_PROBE = """import json, jax
d = jax.devices()[0]
print(json.dumps(dict(platform=d.platform, device_kind=d.device_kind,
                      device_count=jax.device_count(), jax=jax.__version__)))"""


def probe_machine() -> dict:
    """CPU, jax backend and device kind; jax is started in a child that exits at once."""
    machine = dict(cpu_count=os.cpu_count(), cpu_model=_cpu_model(), git=_git_revision())
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env)
    if out.returncode == 0:
        machine.update(json.loads(out.stdout.strip().splitlines()[-1]))
    else:
        machine.update(platform="unknown", device_kind="unknown", device_count=0, jax="?")
    return machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _git_revision() -> str:
    git = ["git", "-C", str(BENCH_DIR)]
    rev = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if rev.returncode:
        return "unknown"
    dirty = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True)
    return rev.stdout.strip() + (" + local changes" if dirty.stdout.strip() else "")


# -------------------------------------------------------------------------------- parse


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def parse_output(text: str) -> list[str | Table]:
    """A script's stdout as blocks in order: a Table per markdown table, a str per other line."""
    lines = text.splitlines()
    blocks: list[str | Table] = []
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        below = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if line.startswith("|") and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", below):
            table = Table(_cells(line), [])
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                cells = _cells(lines[i])
                table.rows.append(cells + [""] * (len(table.header) - len(cells)))
                i += 1
            blocks.append(table)
        else:
            blocks.append(lines[i].rstrip())
            i += 1
    return blocks


def ratio(cell: str) -> float | None:
    """``"0.79x"`` -> 0.79; anything else (``"-"``, empty) -> None."""
    m = _RATIO.fullmatch(cell.strip())
    return float(m.group(1).replace(",", "")) if m else None


def ratio_columns(table: Table) -> dict[str, list[float]]:
    """Columns whose every filled cell is a ratio (``1.5x``), as floats (nan where ``-``)."""
    out = {}
    for j, name in enumerate(table.header[1:], start=1):
        cells = [row[j] for row in table.rows]
        values = [ratio(c) for c in cells]
        filled = [c for c in cells if c not in ("", "-")]
        if filled and all(ratio(c) is not None for c in filled):
            out[name] = [math.nan if v is None else v for v in values]
    return out


def row_labels(table: Table) -> list[str]:
    """The fewest leading cells that tell the rows apart, e.g. ``V=49152, T=512, naive``."""
    ratios = ratio_columns(table)
    keys = [j for j, h in enumerate(table.header) if h not in ratios]
    for k in range(1, len(keys) + 1):
        labels = [
            ", ".join(
                f"{table.header[j]}={row[j]}" if _NUMBER.fullmatch(row[j]) else row[j]
                for j in keys[:k]
            )
            for row in table.rows
        ]
        if len(set(labels)) == len(labels):
            return labels
    return labels


# ---------------------------------------------------------------------------------- MFU

STEP_RATE, PAIR_RATE = "GFLOP/s (model)", "TFLOP/s (model)"  # step.py's model FLOP/s columns


def _number(cell: str) -> float | None:
    try:
        return float(cell.replace(",", "").rstrip("% "))
    except ValueError:
        return None


def step_mfu(table: Table, device_kind: str) -> list[dict]:
    """MFU of each JAX row of step.py's comparison table, from its model FLOP/s column."""
    impls = {label: impl for impl, label in step_bench.LABELS.items()}
    peak = peak_bf16_flops(device_kind)
    out = []
    for row in table.rows:
        impl = impls.get(row[0])
        if impl is None or step_bench._framework(impl) != "jax":
            continue  # TRL runs on the CPU even when a GPU is there
        rate = _number(row[table.header.index(STEP_RATE)])
        if rate is None:
            continue  # the row did not run
        achieved = rate * 1e9
        if peak:
            mfu = achieved / peak
            basis = f"published dense bf16 peak of {device_kind}, {peak / 1e12:,.1f} TFLOP/s"
        else:
            own = row[table.header.index("of own matmul peak")]
            mfu = float(own.rstrip("% ")) / 100
            basis = f"float32 matmul peak measured by step.py on {device_kind}"
        out.append(dict(label=row[0], achieved=achieved, mfu=mfu, basis=basis))
    return out


def pair_mfu(table: Table) -> list[dict]:
    """The rows of step.py's ``--pair`` table that ran, with the MFU it printed."""
    out = []
    for row in table.rows:
        cell = dict(zip(table.header, row))
        rate, mfu = _number(cell[PAIR_RATE]), _number(cell["MFU"])
        if rate is None:
            continue  # out of memory
        label = f"{cell['pair']}, batch {cell['batch']} x {cell['seq_len']}, remat {cell['remat']}"
        out.append(dict(label=label, achieved=rate * 1e12, mfu=None if mfu is None else mfu / 100))
    return out


def _step_tables(blocks: list[str | Table]) -> tuple[Table | None, Table | None]:
    """step.py's comparison table and its ``--pair`` table (either may be missing)."""
    tables = [b for b in blocks if isinstance(b, Table)]
    compare = next((t for t in tables if {"implementation", STEP_RATE} <= set(t.header)), None)
    pair = next((t for t in tables if {"pair", PAIR_RATE, "MFU"} <= set(t.header)), None)
    return compare, pair


# ------------------------------------------------------------------------------- write


def plot_ratios(table: Table, path: Path, title: str) -> None:
    """Grouped horizontal bars of the ratio columns, one group per row, a line at 1x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series, labels = ratio_columns(table), row_labels(table)
    n, m = len(labels), len(series)
    height = 0.8 / m
    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.32 * n * max(m, 2)))
    for k, (name, values) in enumerate(series.items()):
        ys = [i + (k - (m - 1) / 2) * height for i in range(n)]
        bars = ax.barh(ys, [0 if math.isnan(v) else v for v in values], height, label=name)
        ax.bar_label(bars, [("" if math.isnan(v) else f"{v:g}x") for v in values], padding=2)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(range(n), labels)
    ax.invert_yaxis()
    ax.set_xlabel("ratio (1x: the reference row)")
    ax.set_title(title, fontsize=10)
    ax.margins(x=0.15)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=min(m, 3))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _markdown(table: Table) -> list[str]:
    return [
        "| " + " | ".join(table.header) + " |",
        "|" + "---|" * len(table.header),
        *("| " + " | ".join(row) + " |" for row in table.rows),
    ]


def _machine_line(machine: dict) -> str:
    return (
        f"{machine['cpu_count']} CPU threads ({machine['cpu_model']}); jax {machine['jax']}, "
        f"backend {machine['platform']}, {machine['device_count']} x {machine['device_kind']}"
    )


def _mfu_lines(run: Run, blocks, machine: dict) -> list[str]:
    if run.name != "step" or machine["platform"] not in ("gpu", "tpu"):
        return []
    compare, pair = _step_tables(blocks)
    if compare is None and pair is None:
        return ["MFU: step.py printed no step table."]
    lines = [
        "### MFU of the distill step",
        "",
        "Model FLOPs (step.py's count, nothing recomputed) per second over the peak, the "
        "published dense bf16 one as MFU is usually quoted (the comparison rows run in float32 "
        "unless marked bf16).",
        "",
        "| implementation | TFLOP/s (model) | MFU | peak |",
        "|---|---|---|---|",
    ]
    kind = machine["device_kind"]
    rows = step_mfu(compare, kind) if compare is not None else []
    if pair is not None:
        peak = peak_bf16_flops(kind)
        basis = f"published dense bf16 peak of {kind}, {peak / 1e12:,.1f} TFLOP/s" if peak else "-"
        rows += [dict(r, basis=basis) for r in pair_mfu(pair)]
    for r in rows:
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
        lines.append(f"| {r['label']} | {r['achieved'] / 1e12:,.2f} | {mfu} | {r['basis']} |")
    return lines


def _section(run: Run, machine: dict, out_dir: Path) -> list[str]:
    status = "ok" if run.returncode == 0 else f"**FAILED** (exit {run.returncode})"
    load = f", load average {run.load:.1f} at the end" if run.load is not None else ""
    lines = [
        f"## {run.name}.py",
        "",
        f"`{' '.join(_display(run.command))}`: {status}; started {run.started}, "
        f"{run.wall_s:.1f} s{load}. Machine: {_machine_line(machine)}.",
        "",
    ]
    blocks = parse_output(run.stdout)
    k = 0
    for block in blocks:
        if isinstance(block, str):
            lines += [block, ""] if block.strip() else []
            continue
        k += 1
        lines += [*_markdown(block), ""]
        if ratio_columns(block):
            png = f"{run.name}_{k}.png"
            plot_ratios(block, out_dir / png, f"{run.name}.py, table {k}")
            lines += [f"![{run.name}.py, table {k}: ratios]({png})", ""]
    lines += _mfu_lines(run, blocks, machine)
    if run.returncode:
        tail = "\n".join(run.stderr.rstrip().splitlines()[-30:])
        lines += ["", "End of stderr:", "", "```", tail, "```", ""]
    return lines


def _display(command: list[str]) -> list[str]:
    """The command as typed at the repository root: ``python benchmarks/x.py ...``."""
    script = Path(command[1]).resolve()
    if script.is_relative_to(BENCH_DIR.parent):
        script = script.relative_to(BENCH_DIR.parent)
    return ["python", str(script), *command[2:]]


def write_report(runs: list[Run], machine: dict, out_dir: Path, quick: bool = False) -> Path:
    """Write ``out_dir/REPORT.md`` and its plots (replacing these scripts' earlier plots)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*_*.png"):  # this run's scripts' plots from an earlier run
        if re.fullmatch(rf"({'|'.join(re.escape(r.name) for r in runs)})_\d+\.png", old.name):
            old.unlink()
    date = runs[0].started if runs else "-"
    lines = [
        "# Benchmark report",
        "",
        f"Started {date}; git {machine['git']}; "
        f"{'quick (smaller sizes)' if quick else 'default sizes'}.  ",
        f"Machine: {_machine_line(machine)}.",
        "",
        "| script | status | wall time (s) | tables |",
        "|---|---|---|---|",
    ]
    for run in runs:
        n = sum(isinstance(b, Table) for b in parse_output(run.stdout))
        status = "ok" if run.returncode == 0 else f"FAILED (exit {run.returncode})"
        lines.append(f"| [{run.name}](#{run.name}py) | {status} | {run.wall_s:.1f} | {n} |")
    lines.append("")
    for run in runs:
        lines += _section(run, machine, out_dir)
    path = out_dir / "REPORT.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def _save_logs(run: Run, out_dir: Path) -> None:
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (logs / f"{run.name}.stdout").write_text(run.stdout)
    (logs / f"{run.name}.stderr").write_text(run.stderr)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated script names, e.g. step,data")
    p.add_argument("--quick", action="store_true", help="pass each script its small sizes")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "report", help="report folder")
    p.add_argument("--bench_dir", type=Path, default=BENCH_DIR, help="where the scripts are")
    p.add_argument(
        "--script_args",
        action="append",
        default=[],
        help='more flags for one script, NAME=ARGS, e.g. "step=--pair llama8b_1b" (repeatable)',
    )
    args = p.parse_args()
    extra = {}
    for item in args.script_args:
        name, sep, flags = item.partition("=")
        if not sep:
            p.error(f"--script_args {item!r}: expected NAME=ARGS")
        extra.setdefault(name, []).extend(shlex.split(flags))
    scripts = discover(args.bench_dir)
    if args.only:
        names = args.only.split(",")
        if unknown := set(names) - {s.stem for s in scripts}:
            p.error(f"--only: unknown {sorted(unknown)}; have {[s.stem for s in scripts]}")
        scripts = [s for s in scripts if s.stem in names]
    if unknown := set(extra) - {s.stem for s in scripts}:
        p.error(f"--script_args: {sorted(unknown)} not among the scripts to run")

    machine = probe_machine()
    print(f"Machine: {_machine_line(machine)}", flush=True)
    runs = []
    for script in scripts:
        flags = (quick_args(script) if args.quick else []) + extra.get(script.stem, [])
        run = run_script(script, flags)
        _save_logs(run, args.out)
        runs.append(run)
    path = write_report(runs, machine, args.out, quick=args.quick)
    failed = [r.name for r in runs if r.returncode]
    print(f"\nReport: {path}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
