r"""Prompt / completion batches: what generation-based distillation trains on.

On-policy distillation (GKD), DistillSpec and sequence-level KD need the prompt apart from the
completion: the student continues the prompt, the teacher scores the continuation. Every batch
has static shapes, prompts left-padded to P tokens and completions right-padded to N tokens, so
that all rows start their completions at column P (what ``models.sampling.sequence_batch`` and the
KV cache rely on):

    prompt_ids [B, P]       prompt_mask [B, P]       (True on real tokens, padding on the left)
    completion_ids [B, N]   completion_mask [B, N]   (the dataset's completion, EOS included)
    example_ids [B]         the example's index in the corpus (per-example sampling seeds)
    privileged_ids [B, K, P], privileged_mask [B, K, P]   (only when examples carry them)
                            K privileged prompts of the same example (self-distillation: the
                            question with its reference solution, demonstrations, ...)

Prompts longer than P are an error (never silently cut) unless ``long_prompts="drop"`` says to
leave those examples out (their number is ``PromptBatches.dropped`` and in the data state);
completions longer than N are an error unless ``long_completions="truncate"`` says to keep their
first N tokens (what TRL's GKD trainer does with ``max_length``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from distill_jax.data.shuffled_rows import ShuffledRows

FIELDS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "example_ids")


class PromptTooLong(ValueError):
    """A prompt has more tokens than the prompt part of the cache (``long_prompts="drop"`` skips
    such examples)."""


def encode_example(
    tokenizer,
    prompt: str,
    completion: str,
    *,
    prompt_len: int,
    completion_len: int,
    add_bos: bool = True,
    long_completions: str = "error",
    where: str = "example",
) -> tuple[list[int], list[int]]:
    """(prompt ids with BOS, completion ids with EOS), checked against the static lengths.

    Raises:
        PromptTooLong: the prompt has more than ``prompt_len`` tokens.
        ValueError: the completion has more than ``completion_len`` tokens with
            ``long_completions="error"``.
    """
    p = tokenizer.encode(prompt, add_bos=add_bos and tokenizer.bos_id is not None)
    c = tokenizer.encode(completion) if completion else []
    if tokenizer.eos_id is not None:
        c = c + [tokenizer.eos_id]
    if len(p) > prompt_len:
        raise PromptTooLong(
            f"{where}: the prompt has {len(p)} tokens, more than prompt_len={prompt_len} (the "
            "prompt part of the KV cache); raise prompt_len or set data.long_prompts='drop'."
        )
    if len(c) > completion_len:
        if long_completions != "truncate":
            raise ValueError(
                f"{where}: the completion has {len(c)} tokens, more than completion_len="
                f"{completion_len}; raise completion_len or set long_completions='truncate'."
            )
        c = c[:completion_len]
    return p, c


def pad_prompt(prompt: Sequence[int], prompt_len: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [P] int32, mask [P] bool) of a prompt left-padded to P."""
    ids = np.full(prompt_len, pad, np.int32)
    mask = np.zeros(prompt_len, bool)
    if len(prompt):
        ids[-len(prompt) :], mask[-len(prompt) :] = prompt, True
    return ids, mask


def pad_example(
    prompt: Sequence[int], completion: Sequence[int], prompt_len: int, completion_len: int, pad: int
) -> dict[str, np.ndarray]:
    """One row: the prompt left-padded to P, the completion right-padded to N."""
    pi, pm = pad_prompt(prompt, prompt_len, pad)
    ci = np.full(completion_len, pad, np.int32)
    cm = np.zeros(completion_len, bool)
    ci[: len(completion)], cm[: len(completion)] = completion, True
    return dict(prompt_ids=pi, prompt_mask=pm, completion_ids=ci, completion_mask=cm)


class PromptBatches(ShuffledRows, Iterator[dict[str, np.ndarray]]):
    """This process's rows of shuffled prompt / completion batches, resumable.

    Args:
        examples: a sequence of (prompt text, completion text), or of (prompt, completion,
            [K privileged prompts]) with the same K for every example.
        tokenizer: a ``data.token_bytes.Tokenizer`` (the student's).
        prompt_len, completion_len: P and N.
        global_batch_size: rows per step over all processes (divisible by the process count).
        seed: the order of every epoch; ``num_epochs`` None = forever.
        long_completions: "error" or "truncate" (see the module docstring).
        long_prompts: "error" or "drop".
        process_index, process_count: this process's block of every global batch.
    """

    kind = "prompt"

    def __init__(
        self,
        examples: Sequence[tuple[str, str]],
        tokenizer,
        *,
        prompt_len: int,
        completion_len: int,
        global_batch_size: int,
        seed: int = 0,
        num_epochs: int | None = None,
        long_completions: str = "error",
        long_prompts: str = "error",
        process_index: int = 0,
        process_count: int = 1,
        name: str = "data",
    ):
        if not examples:
            raise ValueError(f"{name}: no prompt / completion examples.")
        if global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size={global_batch_size} is not divisible by the {process_count} "
                "processes."
            )
        if long_completions not in ("error", "truncate"):
            raise ValueError(f"long_completions={long_completions!r}: use 'error' or 'truncate'.")
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
        self.rows = []
        ks = {len(e[2]) if len(e) > 2 else 0 for e in examples}
        if len(ks) != 1:
            raise ValueError(f"{name}: every example needs the same number of privileged prompts.")
        self.fields = FIELDS + (("privileged_ids", "privileged_mask") if ks.pop() else ())
        if long_prompts not in ("error", "drop"):
            raise ValueError(f"long_prompts={long_prompts!r}: use 'error' or 'drop'.")
        self.dropped = 0
        for i, example in enumerate(examples):
            prompt, completion = example[0], example[1]
            where = f"{name}[{i}]"
            kw = dict(prompt_len=prompt_len, completion_len=completion_len)
            try:
                p, c = encode_example(
                    tokenizer,
                    prompt,
                    completion,
                    long_completions=long_completions,
                    where=where,
                    **kw,
                )
                privileged = [
                    encode_example(tokenizer, x, "", where=f"{where} privileged", **kw)[0]
                    for x in (example[2] if len(example) > 2 else ())
                ]
            except PromptTooLong:
                if long_prompts != "drop":
                    raise
                self.dropped += 1
                continue
            row = pad_example(p, c, prompt_len, completion_len, pad)
            if privileged:
                ids, masks = zip(*(pad_prompt(x, prompt_len, pad) for x in privileged))
                row["privileged_ids"], row["privileged_mask"] = np.stack(ids), np.stack(masks)
            self.rows.append(row)
        if not self.rows:
            raise ValueError(f"{name}: every prompt is longer than prompt_len={prompt_len}.")
        self._start(global_batch_size, process_index, process_count, seed, num_epochs)
        self.config = dict(
            prompt_len=prompt_len,
            completion_len=completion_len,
            global_batch_size=global_batch_size,
            seed=seed,
            examples=len(examples),
            long_completions=long_completions,
            long_prompts=long_prompts,
            dropped=self.dropped,
        )

    def __next__(self) -> dict[str, np.ndarray]:
        mine = self._next_ids()
        batch = {
            k: np.stack([self.rows[i][k] for i in mine]) for k in self.fields if k != "example_ids"
        }
        batch["example_ids"] = np.asarray(mine, np.int32)
        return batch
