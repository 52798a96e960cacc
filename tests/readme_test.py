"""Every command in README.md runs as written on this machine.

The fast ones run: the Python blocks (except those marked ``<!-- readme_test: slow -->``, which
must import and compile), the trainer on the tiny configs and the launchers (``launch/local.py``
with ``--dry_run``: tests/launch_test.py runs it for real). Workdirs and output
folders under /tmp/ are moved into pytest's tmp_path. The slow ones (real-model training and
``make demo/test/bench``) are checked instead: the config loads with their overrides as main.py
loads it, the mode exists, the make target exists, a benchmark's flags are its own.
"""

import ast
import os
import re
import shlex
import subprocess
import sys

import pytest
from absl import flags
from main_flags import parse_main_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "README.md")) as f:
    README = f.read()
SLOW_MARK = "<!-- readme_test: slow -->"


def _blocks(lang: str) -> list[tuple[str, bool]]:
    """(source, marked slow) of every ```lang fenced block."""
    out = []
    for m in re.finditer(rf"(^[^\n]*\n)?```{lang}\n(.*?)^```", README, re.M | re.S):
        out.append((m.group(2), SLOW_MARK in (m.group(1) or "")))
    return out


def _commands() -> list[list[str]]:
    cmds = []
    for source, _ in _blocks("bash"):
        for line in source.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                cmds.append(words)
    for inline in re.findall(r"`((?:python|make) [^`<]+)`", README):  # in prose and tables
        words = shlex.split(inline)
        if words not in cmds:
            cmds.append(words)
    return cmds


COMMANDS = _commands()
PYTHON_BLOCKS = _blocks("python")


def _is_fast(words: list[str]) -> bool:
    """The trainer on a tiny random config and the launchers take seconds; the rest minutes."""
    if words[0] == "python" and words[1:3] == ["-m", "distill_jax.main"]:
        return "configs/tiny_" in " ".join(words)
    return words[0] == "python" and words[1].startswith("launch/")


def _in_tmp(text: str, tmp_path) -> str:
    return text.replace("/tmp/", f"{tmp_path}/")


def _run(words, tmp_path, timeout=900):
    words = [sys.executable if w == "python" else _in_tmp(w, tmp_path) for w in words]
    out = subprocess.run(words, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{shlex.join(words)}\n{out.stderr[-3000:]}"
    return out.stdout


def test_the_readme_has_its_commands():
    assert any(c[:2] == ["make", "demo"] for c in COMMANDS)
    assert any(c[:2] == ["make", "test"] for c in COMMANDS)
    assert sum(_is_fast(c) for c in COMMANDS) >= 4 and len(PYTHON_BLOCKS) >= 5
    for c in COMMANDS:  # every command is one this test knows how to run or check
        assert c[0] in ("make", "python"), c


@pytest.mark.slow
@pytest.mark.parametrize(
    "words", [c for c in COMMANDS if _is_fast(c)], ids=lambda c: " ".join(c)[:60]
)
def test_fast_command_runs_as_written(words, tmp_path):
    if words[1] == "launch/local.py" and "--dry_run" not in words:
        # tests/launch_test.py runs this launcher for real on the same tiny config and compares
        # the 2-process loss curve with one process; here its printed commands must be right.
        words = [*words, "--dry_run"]
    out = _run(words, tmp_path)
    if "--dry_run" in words:
        assert "distill_jax.main" in out
    else:
        workdir = next(
            w.split("=", 1)[1] for w in _workdir_pairs(words) if w.startswith("--workdir=")
        )
        assert os.path.exists(os.path.join(_in_tmp(workdir, tmp_path), "metrics.jsonl"))


def _workdir_pairs(words):
    """``--flag value`` -> ``--flag=value`` (absl accepts both; the check wants one form)."""
    out, i = [], 0
    while i < len(words):
        w = words[i]
        if w in ("--config", "--workdir") and i + 1 < len(words):
            out.append(f"{w}={words[i + 1]}")
            i += 2
        else:
            out.append(w)
            i += 1
    return out


@pytest.mark.parametrize(
    "words", [c for c in COMMANDS if not _is_fast(c)], ids=lambda c: " ".join(c)[:60]
)
def test_slow_command_is_well_formed(words, monkeypatch):
    monkeypatch.chdir(ROOT)
    if words[0] == "make":
        with open(os.path.join(ROOT, "Makefile")) as f:
            assert re.search(rf"^{re.escape(words[1])}:", f.read(), re.M), words
    elif words[1:3] == ["-m", "distill_jax.main"]:
        fv = parse_main_flags(_workdir_pairs(words[3:]))
        assert fv.workdir and fv.config is not None
        if fv.mode is not None:
            assert fv.mode in flags.FLAGS["mode"].parser.enum_values
        for override in [w for w in words if w.startswith("--config.")]:
            path, value = override[len("--config.") :].split("=", 1)
            got = fv.config
            for key in path.split("."):
                got = got[key]
            assert str(got) == value or got == type(got)(value), override
    else:  # a benchmark script: it exists and takes the flags given
        script = os.path.join(ROOT, words[1])
        with open(script) as f:
            source = f.read()
        for w in words[2:]:
            if w.startswith("--"):
                assert f'"{w.split("=", 1)[0]}"' in source, (w, script)


@pytest.mark.slow
@pytest.mark.parametrize(
    "source",
    [s for s, slow in PYTHON_BLOCKS if not slow],
    ids=lambda s: s.strip().splitlines()[-1][:50],
)
def test_python_block_runs_as_written(source, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(_in_tmp(source, tmp_path))
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("source", [s for s, slow in PYTHON_BLOCKS if slow])
def test_slow_python_block_compiles_and_imports(source, tmp_path):
    tree = ast.parse(source)
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    script = tmp_path / "imports.py"
    script.write_text(ast.unparse(ast.Module(body=imports, type_ignores=[])))
    subprocess.run([sys.executable, str(script)], cwd=tmp_path, check=True)
