r"""Preference pairs: (prompt, chosen, rejected) records as step batches, one pair per row.

What trains from them (``config.data.source="pairs"``): DPO with the teacher as reference
(LLaVA-MoD), REDI (Xu et al., 2025) and DistiLLM-2 (Ko et al., ICML 2025), the pair terms of
``train/pair_terms.py``, beside any token-level term on the chosen side (CE = SFT on the
positives, forward KL, ...). The records are the ``pairs.jsonl`` that ``--mode=seqkd`` writes
(``data.seqkd``): {"prompt", "chosen", "rejected", "problem"}, where *chosen* is a teacher trace
the verifier accepted and *rejected* a trace of the same teacher for the same problem that it
refused (teacher-positive vs teacher-negative, REDI's data). DistiLLM-2's paper pairs a teacher
response (chosen) with the *student's* own response (rejected) instead; any pairs.jsonl with the
same fields can be given.

A batch has the step's standard fields for the chosen side and the same fields prefixed
``rejected_`` for the rejected side, all [B, L] (L = ``seq_len``), row b of both sides being
the same pair, so micro-batching (rows a, a + A, ...) keeps pairs together:

    input_ids    [BOS] prompt, response, EOS, then padding              (right-padded to L)
    targets[j]   input_ids[j + 1] (0 at the last column)
    loss_mask[j] True where targets[j] is a response token (EOS included): the prompt and the
                 padding carry no loss
    segment_ids  1 on real tokens, 0 on padding;  positions  0, 1, ... on real tokens

Prompt and response are tokenized apart (``prompts.encode_example``), as for the positives of
sequence-level KD. A pair longer than L is an error unless ``long_pairs`` says "truncate" (keep
the first tokens of the response, as TRL's DPO trainer does) or "drop" (leave the pair out,
counted in ``PairBatches.dropped``); a prompt alone longer than L - 1 is always dropped or an
error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence

import numpy as np

from distill_jax.data import sources
from distill_jax.data.prompts import PromptTooLong, encode_example
from distill_jax.data.seqkd import file_sha256
from distill_jax.data.shuffled_rows import ShuffledRows

SIDE_FIELDS = ("input_ids", "targets", "positions", "segment_ids", "loss_mask")
FIELDS = SIDE_FIELDS + tuple(f"rejected_{k}" for k in SIDE_FIELDS)
RECORD_FIELDS = ("prompt", "chosen", "rejected")
LONG_PAIRS = ("error", "truncate", "drop")


def pairs_file(path: str) -> str:
    """``path`` itself, or ``path/pairs.jsonl`` for a seqkd output directory; checked to exist.

    Raises:
        FileNotFoundError: naming the path and how to write it.
    """
    file = os.path.join(path, "pairs.jsonl") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"data.path={path!r}: no pairs file at {file!r}; write one with --mode=seqkd "
            "(data.seqkd) or point data.path at a pairs.jsonl or the directory holding it."
        )
    return file


def read_pairs(path: str, *, bad_records: str = "error") -> tuple[list[dict], dict]:
    """(records, info) of a pairs.jsonl or a seqkd output directory; info = {"file", "sha256",
    "manifest" (None without one), "skipped" (``sources.LoadReport``)}.

    Every record is checked as it is read (``sources.read_jsonl``): "prompt" and "chosen" must be
    non-empty text and "rejected" text (a wrong trace may be empty); the first bad one stops the
    load naming file and line, or, with ``bad_records="skip"``, bad records are left out and
    counted.

    The manifest (``manifest.json`` beside the file, written by ``seqkd.write_dataset``) is
    checked against the file: its sha256 of pairs.jsonl must match, so a changed or truncated
    file is not trained on as if it were the dataset the manifest describes. Its tokenizer
    fingerprint (the sampling teacher's) is not required to equal the run's: the pairs are text,
    tokenized here by the student's tokenizer, and sequence-level data may come from a teacher
    with another tokenizer (METHODS.md 4.2). The file's hash identifies the data in the
    checkpointed iterator state instead (``PairBatches(fingerprint=...)``).

    Raises:
        FileNotFoundError: no such file (``pairs_file``).
        ValueError: the file holds no pairs, a record is bad (file:line), or the hash differs.
    """
    file = pairs_file(path)
    records, report = sources.read_jsonl(
        file,
        RECORD_FIELDS,
        bad_records=bad_records,
        blank_ok=("rejected",),
        whole=True,
        allow_empty=True,
    )
    if not records:
        raise ValueError(
            f"{file} holds no pairs (the verifier kept no problem with both a correct and a "
            "wrong trace); sample more traces per problem (seqkd.n) or more problems."
            + (f" All {report.skipped} records were bad: {report.first}." if report.skipped else "")
        )
    manifest, sha = None, file_sha256(file)
    manifest_path = os.path.join(os.path.dirname(os.path.abspath(file)), "manifest.json")
    if os.path.basename(file) == "pairs.jsonl" and os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        want = manifest.get("files", {}).get("pairs.jsonl")
        if want is not None and want != sha:
            raise ValueError(
                f"{file} differs from the pairs.jsonl that {manifest_path} describes (sha256); "
                "write the dataset again with --mode=seqkd, or copy an edited pairs file to a "
                "directory of its own."
            )
    return records, {"file": file, "sha256": sha, "manifest": manifest, "skipped": report}


def side_row(prompt: Sequence[int], response: Sequence[int], seq_len: int, pad: int) -> dict:
    """One side of a pair as step fields [L] (see the module docstring); len(prompt) +
    len(response) <= L."""
    ids = np.full(seq_len, pad, np.int32)
    n_p, n = len(prompt), len(prompt) + len(response)
    ids[:n] = list(prompt) + list(response)
    real = np.arange(seq_len) < n
    targets = np.zeros(seq_len, np.int32)
    targets[:-1] = ids[1:]
    loss_mask = np.zeros(seq_len, bool)
    loss_mask[max(n_p - 1, 0) : n - 1] = True  # predictions of response tokens 0 .. n - n_p - 1
    return dict(
        input_ids=ids,
        targets=np.where(real, targets, 0).astype(np.int32),
        positions=np.where(real, np.arange(seq_len), 0).astype(np.int32),
        segment_ids=real.astype(np.int32),
        loss_mask=loss_mask,
    )


def encode_pair(
    tokenizer, record: dict, *, seq_len: int, long_pairs: str = "error", where: str = "pair"
) -> dict | None:
    """Both sides of one record as a row of ``FIELDS`` ([L] each), or None when it is too
    long and ``long_pairs="drop"``."""
    row = {}
    for side in ("chosen", "rejected"):
        try:
            p, c = encode_example(
                tokenizer,
                record["prompt"],
                record[side],
                prompt_len=seq_len - 1,
                completion_len=10**9,
                where=f"{where} ({side})",
            )
        except PromptTooLong:  # the prompt alone leaves no room for a response token
            if long_pairs == "drop":
                return None
            raise
        if len(p) + len(c) > seq_len:
            if long_pairs == "drop":
                return None
            if long_pairs != "truncate":
                raise ValueError(
                    f"{where} ({side}): prompt + response are {len(p) + len(c)} tokens, more "
                    f"than data.seq_len={seq_len}; raise seq_len or set data.long_pairs to "
                    "'truncate' or 'drop'."
                )
            c = c[: seq_len - len(p)]
        fields = side_row(p, c, seq_len, _pad_id(tokenizer))
        prefix = "" if side == "chosen" else "rejected_"
        row.update({prefix + k: v for k, v in fields.items()})
    return row


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)


class PairBatches(ShuffledRows, Iterator[dict[str, np.ndarray]]):
    """This process's rows of shuffled pair batches, resumable (``get_state`` / ``set_state``).

    Args:
        records: pair records ({"prompt", "chosen", "rejected"}), e.g. from ``read_pairs``.
        tokenizer: a ``data.token_bytes.Tokenizer`` (the student's).
        seq_len: L, the length of every row of both sides.
        global_batch_size: pairs per step over all processes (divisible by the process count).
        seed: the order of every epoch; ``num_epochs`` None = forever (the last batch of a
            finite run repeats a row rather than change shape).
        long_pairs: "error", "truncate" or "drop" (module docstring).
        process_index, process_count: this process's block of every global batch.
        fingerprint: identifies the data in the checkpointed state (e.g. the manifest's hash).
    """

    kind = "pair"

    def __init__(
        self,
        records: Sequence[dict],
        tokenizer,
        *,
        seq_len: int,
        global_batch_size: int,
        seed: int = 0,
        num_epochs: int | None = None,
        long_pairs: str = "error",
        process_index: int = 0,
        process_count: int = 1,
        name: str = "pairs",
        fingerprint: str | None = None,
    ):
        if long_pairs not in LONG_PAIRS:
            raise ValueError(f"data.long_pairs={long_pairs!r}: use one of {LONG_PAIRS}.")
        if global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size={global_batch_size} is not divisible by the {process_count} "
                "processes."
            )
        rows = [
            encode_pair(tokenizer, r, seq_len=seq_len, long_pairs=long_pairs, where=f"{name}[{i}]")
            for i, r in enumerate(records)
        ]
        self.rows = [r for r in rows if r is not None]
        self.dropped = len(rows) - len(self.rows)
        if not self.rows:
            raise ValueError(
                f"{name}: no pairs to train on ({len(records)} records, {self.dropped} longer "
                f"than seq_len={seq_len} dropped)."
            )
        self.fields = FIELDS
        self._start(global_batch_size, process_index, process_count, seed, num_epochs)
        self.config = dict(
            seq_len=seq_len,
            global_batch_size=global_batch_size,
            seed=seed,
            pairs=len(records),
            dropped=self.dropped,
            long_pairs=long_pairs,
            fingerprint=fingerprint,
        )

    def __next__(self) -> dict[str, np.ndarray]:
        mine = self._next_ids()
        return {k: np.stack([self.rows[i][k] for i in mine]) for k in FIELDS}
