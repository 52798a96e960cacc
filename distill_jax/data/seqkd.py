r"""Sequence-level KD datasets: teacher traces checked by a verifier (METHODS.md 4.2, 4.6).

Sequence-level KD (Kim & Rush, 2016, "Sequence-Level Knowledge Distillation") trains the student
with plain cross-entropy on the teacher's generations instead of the reference text; rejection
sampling keeps only traces whose final answer the verifier accepts (the recipe of the DeepSeek-R1
distilled models). The rejected traces are kept as negatives: REDI (Xu et al., 2025, "Harnessing
Negative Signals: Reinforcement Distillation from Teacher Data for LLM Reasoning") trains on
(positive, negative) pairs of one prompt after SFT on the positives.

This module holds the dataset's format: ``split_traces`` (the verifier, ``data.answers``),
``preference_pairs`` and ``write_dataset``; ``teachers.build_seqkd_dataset`` samples the
teacher's traces and writes them. ``write_dataset`` writes, atomically (a temporary directory
renamed at the end):

    positives.jsonl  {"prompt", "completion", "answer", "reference", "problem", "sample"}
    negatives.jsonl  the same fields, for traces the verifier rejected
    pairs.jsonl      {"prompt", "chosen", "rejected", "problem"} for REDI / DPO
    manifest.json    teacher, tokenizer fingerprint, sampling settings, problems, samples,
                     pass rate, counts, and the sha256 of each file

The positives train a student through the trainer as a ``jsonl`` source with
``prompt_field="prompt"``, ``completion_field="completion"`` (``config.onpolicy`` with
``lmbda=0``: loss on the completion only); the pairs through ``data.source="pairs"``
(``data.pairs``) with the pair terms ``redi``, ``dpo`` and ``distillm2``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence

from distill_jax.data import answers


def file_sha256(path: str) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split_traces(
    problems: Sequence[dict], completions: Sequence[Sequence[str]], *, mode: str = "flexible"
) -> tuple[list[dict], list[dict]]:
    """(positives, negatives): each trace with its extracted answer, labelled by the verifier
    (the answer equals the reference's final number)."""
    positives, negatives = [], []
    for i, (problem, samples) in enumerate(zip(problems, completions)):
        ref = answers.extract_reference(problem.get("solution") or problem["answer"])
        for j, text in enumerate(samples):
            answer = answers.extract_answer(text, mode)
            record = {
                "prompt": answers.PROMPT_FORMAT.format(question=problem["question"]),
                "completion": text,
                "answer": answer,
                "reference": ref,
                "problem": i,
                "sample": j,
            }
            (positives if answers.is_correct(answer, ref) else negatives).append(record)
    return positives, negatives


def preference_pairs(positives: Sequence[dict], negatives: Sequence[dict]) -> list[dict]:
    """One (chosen, rejected) pair per problem that has both, the k-th positive with the k-th
    negative (as many pairs as the smaller side has)."""
    by_problem: dict[int, tuple[list, list]] = {}
    for r in positives:
        by_problem.setdefault(r["problem"], ([], []))[0].append(r)
    for r in negatives:
        by_problem.setdefault(r["problem"], ([], []))[1].append(r)
    pairs = []
    for problem, (pos, neg) in sorted(by_problem.items()):
        for p, n in zip(pos, neg):
            pairs.append(
                {
                    "prompt": p["prompt"],
                    "chosen": p["completion"],
                    "rejected": n["completion"],
                    "problem": problem,
                }
            )
    return pairs


def write_dataset(
    out_dir: str, positives: list[dict], negatives: list[dict], manifest: dict
) -> dict:
    """Write the three JSONL files and the manifest (with counts, pass rate and hashes) to
    ``out_dir`` atomically; refuses to overwrite an existing dataset. Returns the manifest."""
    if os.path.exists(os.path.join(out_dir, "manifest.json")):
        raise FileExistsError(
            f"{out_dir} already holds a dataset (manifest.json); choose another directory or "
            "delete it."
        )
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".seqkd-", dir=parent)
    try:
        files = {
            "positives.jsonl": positives,
            "negatives.jsonl": negatives,
            "pairs.jsonl": preference_pairs(positives, negatives),
        }
        for name, rows in files.items():
            with open(os.path.join(tmp, name), "w") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        total = len(positives) + len(negatives)
        manifest = dict(
            manifest,
            counts={name[:-6]: len(rows) for name, rows in files.items()},
            pass_rate=len(positives) / max(total, 1),
            problems_with_a_positive=len({r["problem"] for r in positives}),
            files={name: file_sha256(os.path.join(tmp, name)) for name in files},
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
        if os.path.isdir(out_dir) and not os.listdir(out_dir):
            os.rmdir(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
