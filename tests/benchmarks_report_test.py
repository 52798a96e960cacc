"""benchmarks/report.py: it reads the tables the scripts really print, writes REPORT.md with the
same ratios and a plot of them, computes MFU from step.py's numbers, and reports a failing script.

Nothing here is timed: the tables come from the scripts' own printing functions fed with chosen
numbers, and the ratios are checked against those numbers divided by hand. One test runs the
quickest real script (alignment.py, 200 pieces) through report.py end to end.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import types
from pathlib import Path

import matplotlib.image
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
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
    """step.py's table for ours (0.5 s/step), ours_remat (0.8 s) and TRL (2 s), 200 TFLOP/step."""
    flops, peak = 200e12, 500e12  # peak: the float32 matmul step.py measured on the device
    common = dict(first_s=9.0, peak_rss=2**30, losses=[1.0, 0.9], load=0.5)
    rows = {
        "ours": dict(common, step=0.5, xla_flops=210e12, matmul_peak=peak, device=device),
        "ours_remat": dict(common, step=0.8, xla_flops=260e12, matmul_peak=peak, device=device),
        "trl": dict(common, step=2.0, xla_flops=None, matmul_peak=1e12),
    }
    args = types.SimpleNamespace(batch=8, seq_len=256, repeats=3, warmup=1, matmul_size=4096)
    return _printed(step._print_table, rows, flops, args, "random weights"), peak


def test_step_mfu_on_a_gpu_is_against_the_published_bf16_peak(tmp_path):
    stdout, _ = _step_stdout("gpu (NVIDIA H200)")
    machine = CPU | dict(platform="gpu", device_kind="NVIDIA H200")
    markdown = report.write_report([_run("step", stdout)], machine, tmp_path).read_text()
    mfu = next(t for t in _tables(markdown) if "MFU" in t.header)
    # TRL runs on the CPU: only our rows; 200 TFLOP / 0.5 s over H200's 989 TFLOP/s.
    assert mfu.column("implementation") == [step.LABELS["ours"], step.LABELS["ours_remat"]]
    assert mfu.column("MFU") == [f"{100 * 200 / 0.5 / 989:.1f} %", f"{100 * 200 / 0.8 / 989:.1f} %"]
    main = next(t for t in _tables(markdown) if "GFLOP/s" in t.header)
    assert report.step_mfu(main, "NVIDIA H200")[0]["mfu"] == pytest.approx(400 / 989, rel=1e-6)


def test_step_mfu_on_an_unknown_device_is_against_the_measured_matmul_peak(tmp_path):
    stdout, peak = _step_stdout("gpu (Some New GPU)")
    main = next(t for t in _tables(stdout) if "GFLOP/s" in t.header)
    got = report.step_mfu(main, "Some New GPU")
    assert [r["mfu"] for r in got] == [round(200e12 / 0.5 / peak, 2), round(200e12 / 0.8 / peak, 2)]
    assert "measured" in got[0]["basis"]
    # On a CPU the report adds no MFU (step.py's own peak columns are the CPU's figure).
    cpu = report.write_report([_run("step", stdout)], CPU | {"device_kind": "cpu"}, tmp_path)
    assert "MFU" not in cpu.read_text()


@pytest.mark.parametrize(
    "device_kind, tflops",
    [  # vendor datasheets / Cloud TPU pages (PEAK_BF16_TFLOPS); None: not listed, fall back
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H100 NVL", None),
        ("NVIDIA H200", 989),
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
