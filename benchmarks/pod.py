r"""The compile table of every pod config: the real train step compiled for its TPU topology.

    python benchmarks/pod.py [--reduced] [--naive] [--only llama8b,qwen3]
    python benchmarks/pod.py --quick   # the reduced presets (2 blocks, small topologies)

Each ``configs/pod/*.py`` runs through ``python -m distill_jax.main --mode=compile`` in its own
process (``distill_jax/train/aot.py``: teacher and student built abstractly, the trainer's own
sharded step lowered and compiled by libtpu for the config's topology, on this CPU machine), and
its ``compile_report.json`` is summarised in one row: per chip the student (parameters + AdamW
state), the teacher and the temporaries against the chip's HBM; model FLOPs; collective bytes by
kind (loop bodies times their trip counts); the roofline step time, what bounds it and the MFU it
implies (an upper bound: perfect overlap); the compile's wall time and the host's peak RSS.

``--naive`` adds, for each config, the program as it was before issue 16 (Python loop over the
blocks, reference attention with [B, K, G, T, S] float32 scores, dense MoE that runs every
expert on every token; ``scan_layers=False, attention_impl=reference, moe_impl=dense``) and the
ratios of the optimised row to it. At full size the naive 70B -> 8B program does not compile on
a 24 GiB host, so ``--naive`` is meant for ``--reduced``. Rows are interleaved by config (each
config's optimised row, then its naive row) and run once each: a compile's outputs are
deterministic, only its wall time is noisy (the 1-minute load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POD_DIR = os.path.join(ROOT, "configs", "pod")
GiB = 2**30
NAIVE = (
    "student.scan_layers=False",
    "teacher.scan_layers=False",
    "student.attention_impl=reference",
    "teacher.attention_impl=reference",
    "student.moe_impl=dense",
    "teacher.moe_impl=dense",
)
KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def configs(only: str | None) -> list[str]:
    names = sorted(f[:-3] for f in os.listdir(POD_DIR) if f.endswith(".py"))
    if only:
        keys = only.split(",")
        names = [n for n in names if any(k in n for k in keys)]
    return names


def compile_row(name: str, reduced: bool, naive: bool, workdir: str) -> dict:
    """Run one compile in its own process; its report plus wall time, peak RSS, load."""
    config = os.path.join(POD_DIR, f"{name}.py") + (":reduced=True" if reduced else "")
    cmd = [sys.executable, "-m", "distill_jax.main", f"--config={config}"]
    cmd += [f"--workdir={workdir}", "--mode=compile"]
    if naive:
        cmd += [f"--config.{o}" for o in NAIVE if _has_key(name, o.split("=")[0])]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _, err = proc.communicate()
    row = dict(config=name, naive=naive, wall_s=time.perf_counter() - t0, load=os.getloadavg()[0])
    path = os.path.join(workdir, "compile_report.json")
    if proc.returncode != 0 or not os.path.exists(path):
        lines = [ln for ln in err.splitlines() if ln.startswith("error: ")] or err.splitlines()
        row["error"] = (lines[-1] if lines else f"exit {proc.returncode}")[:300]
        return row
    with open(path) as f:
        row["report"] = json.load(f)
    return row


def _has_key(name: str, dotted: str) -> bool:
    """Whether pod config ``name`` has the key (moe_impl only exists where there is an MoE)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(POD_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    node = module.get_config()
    for part in dotted.split("."):
        if part not in node:
            return False
        node = node[part]
    return True


def _peak_rss_kib() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


def summarise(row: dict) -> dict:
    """The table's cells of one compile report."""
    if "error" in row:
        return {"config": _label(row), "error": row["error"]}
    r = row["report"]
    m, hbm = r["memory"], r["hbm_per_chip"]
    b, t = r["batch"]
    coll = {k: r["collectives"].get(k, {}).get("bytes", 0) / GiB for k in KINDS}
    roof = r["roofline_seconds"]
    bound = max(("compute", "hbm", "collectives"), key=lambda k: roof[k])
    return {
        "config": _label(row),
        "topology": r["topology"],
        "mesh": " x ".join(f"{k} {v}" for k, v in r["mesh"].items() if v > 1) or "1 chip",
        "tokens": f"{b} x {t}",
        "student": (m["student parameters"] + m["optimizer state"]) / GiB,
        "teacher": m["teacher parameters"] / GiB,
        "temporaries": m.get("temporaries", 0) / GiB,
        "total": m["total"] / GiB,
        "hbm": hbm / GiB,
        "model_flops": r["flops"]["model_per_chip"],
        **coll,
        "step_s": roof["step"],
        "bound": bound,
        "mfu": r["mfu"],
        "compile_s": r.get("seconds", {}).get("compile", float("nan")),
        "wall_s": row["wall_s"],
        "load": row["load"],
    }


def _label(row: dict) -> str:
    return row["config"] + (" (naive)" if row["naive"] else "")


def print_table(cells: list[dict]) -> None:
    head = (
        "| config | topology | mesh | batch x length | student + Adam GiB | teacher GiB | "
        "temporaries GiB | total GiB | of HBM | model FLOPs/chip | all-gather GiB | "
        "reduce-scatter GiB | all-reduce GiB | all-to-all GiB | permute GiB | roofline step (s) "
        "| bound | MFU (bound) | XLA compile (s) | wall (s) | load avg (1 min) |"
    )
    print(head)
    print("|" + "---|" * head.count(" | ") + "---|")
    for c in cells:
        if "error" in c:
            print(f"| {c['config']} | error: {c['error']} |" + " |" * (head.count(" | ") - 1))
            continue
        print(
            f"| {c['config']} | {c['topology']} | {c['mesh']} | {c['tokens']} | "
            f"{c['student']:.2f} | {c['teacher']:.2f} | {c['temporaries']:.2f} | "
            f"{c['total']:.2f} | {100 * c['total'] / c['hbm']:.0f} % of {c['hbm']:.0f} | "
            f"{c['model_flops']:.3e} | {c['all-gather']:.2f} | {c['reduce-scatter']:.2f} | "
            f"{c['all-reduce']:.2f} | {c['all-to-all']:.2f} | {c['collective-permute']:.2f} | "
            f"{c['step_s']:.3f} | {c['bound']} | {100 * c['mfu']:.0f} % | {c['compile_s']:.0f} | "
            f"{c['wall_s']:.0f} | {c['load']:.1f} |"
        )


def print_ratios(cells: list[dict]) -> None:
    """Optimised over naive, per config: memory, roofline step time, compile time."""
    by = {c["config"]: c for c in cells if "error" not in c}
    pairs = [(k, by[k], by.get(k + " (naive)")) for k in by if not k.endswith("(naive)")]
    pairs = [p for p in pairs if p[2] is not None]
    if not pairs:
        return
    print(
        "\n| config | temporaries vs naive | total memory vs naive | roofline step vs naive "
        "| XLA compile vs naive |"
    )
    print("|---|---|---|---|---|")

    def ratio(opt, naive, key):
        return opt[key] / naive[key] if naive[key] else float("nan")

    for name, opt, naive in pairs:
        print(
            f"| {name} | {ratio(opt, naive, 'temporaries'):.2f}x | "
            f"{ratio(opt, naive, 'total'):.2f}x | {ratio(opt, naive, 'step_s'):.2f}x | "
            f"{ratio(opt, naive, 'compile_s'):.2f}x |"
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reduced", action="store_true", help="each config's :reduced preset")
    p.add_argument("--naive", action="store_true", help="also the pre-issue-16 program")
    p.add_argument("--only", help="comma-separated substrings of config names")
    p.add_argument("--quick", action="store_true", help="= --reduced")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    reduced = args.reduced or args.quick
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in configs(args.only):
            for naive in (False, True) if args.naive else (False,):
                workdir = os.path.join(tmp, f"{name}{'_naive' if naive else ''}")
                print(f"compiling {name}{' (naive)' if naive else ''} ...", file=sys.stderr)
                rows.append(compile_row(name, reduced, naive, workdir))
    cells = [summarise(r) for r in rows]
    preset = "reduced presets (2 blocks, small topologies)" if reduced else "full size"
    print(f"\nPod configs ({preset}), compiled by libtpu on this CPU machine; per chip:\n")
    print_table(cells)
    print_ratios(cells)
    print(f"\nHost peak RSS of the largest compile: {_peak_rss_kib() / 2**20:.1f} GiB")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 1 if any("error" in c for c in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
