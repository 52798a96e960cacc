"""benchmarks/report.py: it reads the tables the scripts really print, writes REPORT.md with the
same ratios and a plot of them, computes MFU from step.py's numbers, and reports a failing script.
Also the pieces of the scripts that are logic rather than timing: step.py's median over rounds,
its ``--pair`` mode's FLOP count and batch doubling, compile.py's target verdict.

Nothing here is timed: the tables come from the scripts' own printing functions fed with chosen
numbers, and the ratios are checked against those numbers divided by hand. One test runs the
quickest real script (alignment.py, 200 pieces) through report.py end to end.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import matplotlib.image
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import _step_pair  # noqa: E402
import compile as compile_bench  # noqa: E402
import fused_loss  # noqa: E402
import report  # noqa: E402
import step  # noqa: E402

CPU = dict(
    cpu_count=2, cpu_model="test CPU", git="abc1234", jax="0", device_count=1, platform="cpu"
)


def _printed(fn, *args) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn(*args)
    return buf.getvalue()


def _run(name: str, stdout: str, returncode: int = 0, stderr: str = "") -> report.Run:
    command = [sys.executable, str(BENCH / f"{name}.py")]
    return report.Run(name, command, "2026-12-03T12:00:00+00:00", 12.5, returncode, stdout, stderr)


def _tables(markdown: str) -> list[report.Table]:
    return [b for b in report.parse_output(markdown) if isinstance(b, report.Table)]


# fused_loss.py rows at two sizes: (V, T, impl) -> step seconds and XLA bytes.
FUSED = {
    (49152, 512, "naive"): (2.0, 800),
    (49152, 512, "custom_vjp"): (1.5, 100),
    (49152, 512, "remat"): (2.5, 50),
    (262144, 2048, "naive"): (40.0, 16000),
    (262144, 2048, "custom_vjp"): (31.6, 2000),
}


def _fused_stdout() -> str:
    rows = {
        key: dict(
            step_s=s,
            first_s=3.0,
            xla_bytes=mib * 2**20,
            peak_rss=(1000 + mib) * 2**20,
            loss=1.25,
            grad_norm=2.5,
            platform="cpu",
            device="cpu",
        )
        for key, (s, mib) in FUSED.items()
    }
    return _printed(fused_loss._print_table, rows, types.SimpleNamespace(chunk_size=0, repeats=3))


def test_fused_loss_ratios_reach_the_report_and_its_plot(tmp_path):
    path = report.write_report(
        [_run("fused_loss", _fused_stdout())], CPU | {"device_kind": "cpu"}, tmp_path
    )
    markdown = path.read_text()
    summary, table = _tables(markdown)
    assert summary.column("status") == ["ok"] and summary.column("tables") == ["1"]

    # The ratios, divided by hand from the numbers fed in, and from the report's own columns.
    expect_time = [s / FUSED[(v, t, "naive")][0] for (v, t, _), (s, _) in FUSED.items()]
    expect_xla = [m / FUSED[(v, t, "naive")][1] for (v, t, _), (_, m) in FUSED.items()]
    assert table.column("time vs naive") == [f"{r:.2f}x" for r in expect_time]
    assert table.column("XLA vs naive") == [f"{r:.2f}x" for r in expect_xla]
    steps = [float(x) for x in table.column("step (s)")]
    naive = {(r[0], r[1]): float(r[3]) for r in table.rows if r[2] == "naive"}
    for row, s in zip(table.rows, steps):
        assert report.ratio(row[4]) == pytest.approx(s / naive[(row[0], row[1])], abs=0.005)

    # What is plotted: every ratio column, rows told apart by V, T and implementation.
    series = report.ratio_columns(table)
    assert list(series) == ["time vs naive", "XLA vs naive", "RSS vs naive"]
    assert series["time vs naive"] == pytest.approx([round(r, 2) for r in expect_time])
    assert report.row_labels(table)[:2] == [
        "V=49152, T=512, naive",
        "V=49152, T=512, fused (custom_vjp)",
    ]
    png = re.search(r"!\[[^]]*\]\(([^)]+\.png)\)", markdown).group(1)
    assert png == "fused_loss_1.png"
    image = matplotlib.image.imread(tmp_path / png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def _step_stdout(device: str) -> tuple[str, float]:
    """step.py's table for ours (0.5 s/step), ours_remat (0.8 s), ours_bf16 (did not run),
    TRL (2 s) and TRL compiled (did not run), 200 TFLOP/step."""
    flops, peak = 200e12, 500e12  # peak: the float32 matmul step.py measured on the device
    common = dict(first_s=9.0, peak_rss=2**30, losses=[1.0, 0.9], loads=[0.5, 0.7])
    common.update(failed_rounds=0)
    rows = {
        "ours": dict(common, step=0.5, per_round=[0.5, 0.6], matmul_peak=peak, device=device),
        "ours_remat": dict(common, step=0.8, per_round=[0.8, 0.8], matmul_peak=peak, device=device),
        "ours_bf16": dict(error="exit 1: JaxRuntimeError: something", loads=[0.4, 0.6]),
        "trl": dict(common, step=2.0, per_round=[2.0, 2.1], matmul_peak=1e12),
        "trl_compile": dict(error="BackendCompilerFailed: no C++ compiler", loads=[0.5, 0.5]),
    }
    args = types.SimpleNamespace(
        batch=8, seq_len=256, repeats=3, warmup=1, matmul_size=4096, rounds=2
    )
    return _printed(step._print_table, rows, flops, args, "random weights"), peak


def test_step_table_rows_that_did_not_run_say_why():
    stdout, _ = _step_stdout("cpu (cpu)")
    table = next(t for t in _tables(stdout) if report.STEP_RATE in t.header)
    assert table.column("implementation") == [
        step.LABELS[i] for i in ("ours", "ours_remat", "ours_bf16", "trl", "trl_compile")
    ]
    assert table.column("tokens/s vs TRL") == ["4.00x", "2.50x", "-", "1.00x", "-"]
    assert table.column("step (s)")[2] == "did not run" and table.column("load avg (1 min)")[2]
    assert table.column("step per round (s)")[0] == "0.50 / 0.60"
    assert "no C++ compiler" in stdout and "Target: ours >= 1.5x the tokens/s of" in stdout
    assert list(report.ratio_columns(table)) == ["tokens/s vs TRL"]


def test_step_rounds_are_interleaved_medians():
    runs = [  # three rounds of one row: per-round medians 3, 1, 2 (after 1 warm-up step)
        dict(times=[9, 3, 3, 4], losses=[1.0, 0.5], first_s=9, peak_rss=5, matmul_peak=1, load=1),
        dict(times=[9, 1, 1, 2], losses=[1.0, 0.5], first_s=8, peak_rss=7, matmul_peak=2, load=2),
        dict(times=[9, 2, 2, 2], losses=[1.0, 0.5], first_s=7, peak_rss=6, matmul_peak=3, load=3),
    ]
    row = step.aggregate(runs, warmup=1)
    assert row["per_round"] == [3, 1, 2] and row["step"] == 2 and row["first_s"] == 8
    assert row["peak_rss"] == 7 and row["matmul_peak"] == 3 and row["loads"] == [1, 2, 3]
    failed = step.aggregate([dict(error="boom", load=1.0), runs[0]], warmup=1)
    assert failed["failed_rounds"] == 1 and failed["step"] == 3
    assert step.aggregate([dict(error="boom", load=1.0)], warmup=1)["error"] == "boom"


def test_step_mfu_on_a_gpu_is_against_the_published_bf16_peak(tmp_path):
    stdout, _ = _step_stdout("gpu (NVIDIA H200)")
    machine = CPU | dict(platform="gpu", device_kind="NVIDIA H200")
    markdown = report.write_report([_run("step", stdout)], machine, tmp_path).read_text()
    mfu = next(t for t in _tables(markdown) if "MFU" in t.header)
    # TRL runs on the CPU, ours_bf16 did not run: two rows; 200 TFLOP / 0.5 s over 989.4.
    assert mfu.column("implementation") == [step.LABELS["ours"], step.LABELS["ours_remat"]]
    assert mfu.column("MFU") == [
        f"{100 * 200 / 0.5 / 989.4:.1f} %",
        f"{100 * 200 / 0.8 / 989.4:.1f} %",
    ]
    assert mfu.column("TFLOP/s (model)") == ["400.00", "250.00"]
    main = next(t for t in _tables(markdown) if report.STEP_RATE in t.header)
    assert report.step_mfu(main, "NVIDIA H200")[0]["mfu"] == pytest.approx(400 / 989.4, rel=1e-6)


def test_step_mfu_on_an_unknown_device_is_against_the_measured_matmul_peak(tmp_path):
    stdout, peak = _step_stdout("gpu (Some New GPU)")
    main = next(t for t in _tables(stdout) if report.STEP_RATE in t.header)
    got = report.step_mfu(main, "Some New GPU")
    assert [r["mfu"] for r in got] == [round(200e12 / 0.5 / peak, 2), round(200e12 / 0.8 / peak, 2)]
    assert "measured" in got[0]["basis"]
    # On a CPU the report adds no MFU (step.py's own peak columns are the CPU's figure).
    cpu = report.write_report([_run("step", stdout)], CPU | {"device_kind": "cpu"}, tmp_path)
    assert "MFU" not in cpu.read_text()


def _pair_result(peak: float | None) -> dict:
    """step.py --pair's result: batch 8 fits (0.5 s/step), batch 16 runs out of memory."""
    ok = dict(
        batch=8,
        seq_len=2048,
        remat="full",
        chunk_size=512,
        compile_s=60.0,
        step_s=0.5,
        step_times=[0.6, 0.5, 0.5],
        tokens_per_s=8 * 2048 / 0.5,
        model_flops=200e12,
        model_flops_per_s=400e12,
        losses=[11.9, 11.8],
        peak_bytes=80 * 2**30,
        xla_temp_bytes=30 * 2**30,
    )
    oom = dict(batch=16, seq_len=2048, remat="full", oom="RESOURCE_EXHAUSTED: Out of memory")
    return dict(
        pair="llama8b_1b",
        title="Llama-3.1-8B -> Llama-3.2-1B",
        tiny=False,
        device="gpu (NVIDIA H200)",
        jax="0.11.2",
        flax="0",
        peak_bf16_flops=peak,
        teacher_params=8.03e9,
        student_params=1.24e9,
        ce=0.0,
        attention="auto -> cudnn",
        warmup=2,
        repeats=5,
        init_s=3.0,
        formula="B T [...]",
        rows=[ok, oom],
        largest_batch={"full": dict(batch=8, stopped_by="16 ran out of memory")},
    )


def test_pair_table_mfu_reaches_the_report(tmp_path):
    stdout = _printed(_step_pair.print_table, _pair_result(989.4e12))
    table = next(t for t in _tables(stdout) if "MFU" in t.header)
    assert table.column("MFU") == [f"{100 * 400 / 989.4:.1f} %", "-"]
    assert table.column("step (s)") == ["0.500", "out of memory"]
    assert "Largest global batch that fit, remat full: 8" in stdout
    machine = CPU | dict(platform="gpu", device_kind="NVIDIA H200")
    markdown = report.write_report([_run("step", stdout)], machine, tmp_path).read_text()
    mfu = _tables(markdown)[-1]
    assert mfu.column("implementation") == ["llama8b_1b, batch 8 x 2048, remat full"]
    assert mfu.column("MFU") == [f"{100 * 400 / 989.4:.1f} %"]
    assert "989.4 TFLOP/s" in mfu.column("peak")[0]
    # A device without a published peak: the rate, no MFU.
    stdout = _printed(_step_pair.print_table, _pair_result(None))
    assert next(t for t in _tables(stdout) if "MFU" in t.header).column("MFU") == ["-", "-"]


def test_pair_flops_by_hand():
    """Llama-3.1-8B / 3.2-1B matmul weights from their configs, and the step's model FLOPs."""
    teacher, student = _step_pair.configs("llama8b_1b", tiny=False)
    # 8B: 32 x (q 4096^2 + k, v 4096 x 1024 + o 4096^2 + 3 x 4096 x 14336) + head 4096 x 128256
    p_t = 32 * (2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336) + 4096 * 128256
    p_s = 16 * (2 * 2048**2 + 2 * 2048 * 512 + 3 * 2048 * 8192) + 2048 * 128256
    assert _step_pair.matmul_params(teacher) == p_t == 7_504_658_432
    assert _step_pair.matmul_params(student) == p_s == 1_235_746_816
    # All parameters (embeddings, norms): the published 8.03 B and 1.24 B (tied embedding).
    from flax import nnx

    from distill_jax import models

    count = lambda c: models.num_params(nnx.eval_shape(lambda: models.Transformer(c)))
    assert count(teacher) == p_t + 128256 * 4096 + 65 * 4096 == 8_030_261_248
    assert count(student) == p_s + 33 * 2048 == 1_235_814_400
    b, t = 8, 2048
    attention = lambda layers, heads, dim: 2 * layers * t * heads * dim
    want = b * t * (2 * p_t + attention(32, 32, 128) + 3 * (2 * p_s + attention(16, 32, 64)))
    assert _step_pair.model_flops(teacher, student, b, t) == want
    assert teacher.rope_factor == 8 and student.rope_factor == 32 and student.tie_word_embeddings
    assert teacher.scan_layers and student.param_dtype == "float32"


def test_find_max_batch_doubles_until_out_of_memory(monkeypatch):
    def fits(limit):
        return lambda b: dict(batch=b) if b <= limit else dict(batch=b, oom="out of memory")

    rows = _step_pair.batch_sizes(2, None, fits(16))
    assert [r["batch"] for r in rows] == [2, 4, 8, 16, 32] and "oom" in rows[-1]
    assert [r["batch"] for r in _step_pair.batch_sizes(2, 8, fits(64))] == [2, 4, 8]

    # try_row turns an out-of-memory error (compile or run) into a row; other errors propagate.
    setup = types.SimpleNamespace(args=types.SimpleNamespace(seq_len=128))

    def run_row(setup, batch, remat):
        if batch > 4:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 GiB.")
        if remat == "bad":
            raise ValueError("not a memory problem")
        return dict(batch=batch)

    monkeypatch.setattr(_step_pair, "run_row", run_row)
    assert _step_pair.try_row(setup, 4, "full") == dict(batch=4)
    assert "RESOURCE_EXHAUSTED" in _step_pair.try_row(setup, 8, "full")["oom"]
    with pytest.raises(ValueError, match="not a memory problem"):
        _step_pair.try_row(setup, 2, "bad")


def _compile_results(scan_80_total: float) -> dict:
    """compile.py's measurements: loop grows with depth, scan stays flat (or not)."""
    totals = {(8, "loop"): 10.0, (80, "loop"): 40.0, (8, "scan"): 8.0, (80, "scan"): scan_80_total}
    out = {}
    for key, total in totals.items():

        def run(f, total=total, blocks=key[0]):
            return dict(
                build=0.1,
                trace=0.1 * total,
                lower=0.1 * total,
                compile=0.8 * total * f,
                total=total * f,
                stablehlo_chars=2048 * blocks,
                hlo_ops=100 * blocks,
                load=1.0,
            )

        out[key] = [run(1.0), run(1.1), run(0.9)]  # median: the middle one
    return out


@pytest.mark.parametrize("scan_80, verdict", [(11.6, "PASS"), (12.8, "FAIL")])
def test_compile_table_ratios_and_target(scan_80, verdict):
    stdout = _printed(compile_bench._print_table, _compile_results(scan_80), [8, 80], 3, set())
    table = _tables(stdout)[0]
    assert table.column("layout") == ["loop", "loop", "scan", "scan"]
    assert table.column("total vs 8 blocks") == ["1.00x", "4.00x", "1.00x", f"{scan_80 / 8:.2f}x"]
    assert table.column("total (s)")[1] == "40.00"
    assert list(report.ratio_columns(table)) == ["total vs 8 blocks", "XLA compile vs 8 blocks"]
    assert f"{scan_80 / 8:.2f}x (XLA compile alone {scan_80 / 8:.2f}x) -> {verdict}" in stdout
    skipped = _printed(
        compile_bench._print_table,
        {k: v for k, v in _compile_results(scan_80).items() if k != (80, "loop")},
        [8, 80],
        3,
        {(80, "loop")},
    )
    assert "skipped (--max_loop_blocks)" in _tables(skipped)[0].column("build (s)")


@pytest.mark.parametrize(
    "device_kind, tflops",
    [  # vendor datasheets / Cloud TPU pages (PEAK_BF16_TFLOPS); None: not listed, fall back
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H100 NVL", None),
        ("NVIDIA H200", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA L4", 121),
        ("NVIDIA L40S", None),
        ("TPU v4", 275),
        ("TPU v5 lite", 197),
        ("TPU v5", 459),
        ("TPU v6 lite", 918),
    ],
)
def test_published_peaks(device_kind, tflops):
    peak = report.peak_bf16_flops(device_kind)
    assert peak == (tflops and tflops * 1e12)


def test_a_failing_script_is_reported_and_sets_the_exit_status(tmp_path, monkeypatch, capsys):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "_helper.py").write_text("raise SystemExit('a helper is not a benchmark')\n")
    (bench / "fine.py").write_text("print('all good')\n")
    (bench / "broken.py").write_text(
        "import sys\nprint('half a table')\nprint('cannot go on', file=sys.stderr)\nsys.exit(3)\n"
    )
    assert [p.name for p in report.discover(bench)] == ["broken.py", "fine.py"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "fine_7.png").write_bytes(b"a plot from an earlier run")
    (out / "photo.png").write_bytes(b"not ours")
    monkeypatch.setattr(report, "probe_machine", lambda: CPU | {"device_kind": "cpu"})
    monkeypatch.setattr(sys, "argv", ["report.py", "--bench_dir", str(bench), "--out", str(out)])
    assert report.main() == 1
    assert "cannot go on" in capsys.readouterr().err  # stderr is echoed live
    markdown = (out / "REPORT.md").read_text()
    summary = _tables(markdown)[0]
    assert summary.column("status") == ["FAILED (exit 3)", "ok"]
    assert "half a table" in markdown and "cannot go on" in markdown
    assert (out / "logs" / "fine.stdout").read_text() == "all good\n"
    assert not (out / "fine_7.png").exists() and (out / "photo.png").exists()

    monkeypatch.setattr(sys, "argv", [*sys.argv, "--only", "fine"])
    assert report.main() == 0
    assert _tables((out / "REPORT.md").read_text())[0].column("status") == ["ok"]


@pytest.mark.slow
def test_alignment_end_to_end(tmp_path, monkeypatch, capsys):
    """The real alignment.py (200 pieces, a few seconds) through report.py."""
    monkeypatch.setattr(report, "probe_machine", lambda: CPU | {"device_kind": "cpu"})
    argv = ["report.py", "--only", "alignment", "--quick", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    assert report.main() == 0, capsys.readouterr().err[-2000:]
    markdown = (tmp_path / "REPORT.md").read_text()
    assert "`python benchmarks/alignment.py --pieces 200`: ok" in markdown
    table = next(t for t in _tables(markdown) if "tokens/s" in t.header)
    rates = [float(x.replace(",", "")) for x in table.column("tokens/s")]
    for cell, rate in zip(table.column("vs two-pointer + dense"), rates):
        assert report.ratio(cell) == pytest.approx(rate / rates[0], abs=0.051)
    assert (tmp_path / "alignment_1.png").stat().st_size > 1000
    assert (tmp_path / "logs" / "alignment.stdout").read_text() in capsys.readouterr().out


def _script(args: list[str], tmp_path) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_pair_mode_runs_end_to_end_at_cpu_size(tmp_path):
    """step.py --pair llama8b_1b --tiny: the accelerator mode's whole path, one remat per row;
    the second row is skipped by --budget_s (judged by the first row's time)."""
    out = tmp_path / "pair.json"
    args = [str(BENCH / "step.py"), "--pair", "llama8b_1b", "--tiny", "--warmup", "1"]
    args += ["--repeats", "2", "--remat", "full,dots", "--budget_s", "1", "--out", str(out)]
    stdout = _script(args, tmp_path)
    table = next(t for t in _tables(stdout) if "MFU" in t.header)
    assert table.column("remat") == ["full", "dots"]
    assert table.column("step (s)")[1] == "skipped (--budget_s)"
    result = json.loads(out.read_text())
    row = result["rows"][0]
    assert row["losses"][0] > 0 and row["step_s"] > 0 and row["chunk_size"] == 64
    assert row["model_flops"] == _step_pair.model_flops(
        *_step_pair.configs("llama8b_1b", tiny=True), 2, 128
    )


@pytest.mark.slow
def test_compile_script_runs_end_to_end(tmp_path):
    """compile.py at depths 2 and 4, one round: four fresh processes, one table."""
    stdout = _script([str(BENCH / "compile.py"), "--depths", "2,4", "--rounds", "1"], tmp_path)
    table = _tables(stdout)[0]
    assert table.column("blocks (teacher / student)") == ["2 / 1", "4 / 2"] * 2
    assert table.column("total vs 2 blocks")[0] == "1.00x"
    # Scan: one block traced whatever the depth, so the program does not grow.
    kib = [int(x.replace(",", "")) for x in table.column("StableHLO (KiB)")]
    assert kib[1] > kib[0] and kib[3] == pytest.approx(kib[2], rel=0.02)
    assert "Target: not measured" in stdout
