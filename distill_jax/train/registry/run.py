"""The run's own blocks: ``RUN_BLOCKS[block]`` maps each knob of ``config.train``,
``config.optimizer``, ``config.eval`` and ``config.data`` to its ``Knob`` (type, default, range
or choices, one-line doc), so that those blocks are checked by the same code as the loss terms
(``terms.check_blocks``) before anything loads: a misspelt knob names the valid ones, a value
out of range names the range, NaN and inf are refused everywhere.

``REQUIRED`` names the knobs a training run cannot do without; which block keys exist is this
file, nothing else (a key the trainer reads must be listed here, or every config setting it
fails).
"""

from __future__ import annotations

from distill_jax.data import packing, pairs
from distill_jax.train.registry.knobs import PROB, Knob, knob

BAD_RECORDS = ("error", "skip")
NONFINITE = ("stop", "skip")
REMAT = (False, True, "none", "full", "dots", "offload")

TRAIN_KNOBS: dict[str, Knob] = {
    "steps": knob(int, None, "optimizer steps of the run", low=1),
    "micro_batches": knob(int, 1, "gradient accumulation steps in one optimizer step", low=1),
    "remat": knob("any", False, "rematerialisation policy (models/scan.py)", choices=REMAT),
    "log_every_steps": knob(int, 1, "metrics come back from the devices every N steps", low=1),
    "checkpoint_every_steps": knob(int, 100, "save a checkpoint every N steps", low=1),
    "keep_checkpoints": knob(int, 3, "checkpoints kept on disk (the newest)", low=1),
    "export": knob(bool, False, "write workdir/export (HF format) at the end"),
    # The non-finite policy and the workdir lock (train/loop.py, train/checkpoint.py).
    "nonfinite": knob(
        str, "stop", "a non-finite step stops the run, or skips the update", choices=NONFINITE
    ),
    "max_skipped_steps": knob(
        int, 10, "with nonfinite='skip': the run stops after more skipped steps", low=0
    ),
    "force_unlock": knob(bool, False, "take over a workdir whose lock another run holds"),
}
OPTIMIZER_KNOBS: dict[str, Knob] = {
    "name": knob(str, "adamw", "the optax optimizer", choices=("adamw", "sgd")),
    "learning_rate": knob(float, 3e-4, "peak learning rate", low=0.0),
    "end_learning_rate_ratio": knob(float, 0.1, "final / peak learning rate", low=0.0),
    "schedule": knob(str, "cosine", "after the warmup", choices=("cosine", "linear", "constant")),
    "warmup_steps": knob(int, None, "linear warmup (one of the three warmup_* keys)", low=0),
    "warmup_tokens": knob(int, None, "linear warmup in tokens", low=0),
    "warmup_percent": knob(float, None, "linear warmup in % of the steps", low=0.0, high=100.0),
    "weight_decay": knob(float, 0.0, "decoupled weight decay of the matrices", low=0.0),
    "b1": knob(float, 0.9, "Adam's first-moment decay", **PROB),
    "b2": knob(float, 0.95, "Adam's second-moment decay", **PROB),
    "eps": knob(float, 1e-8, "Adam's epsilon", low=0.0),
    "momentum": knob(float, None, "SGD momentum", **PROB),
    "grad_clip_norm": knob(float, None, "clip the global gradient norm (None: off)", low=0.0),
}
EVAL_KNOBS: dict[str, Knob] = {
    "num_batches": knob(int, 4, "held-out batches per evaluation", low=1),
    "every_steps": knob(int, None, "evaluate every N steps (None: at the end only)", low=1),
    "at_start": knob(bool, True, "evaluate before the first step"),
    "acceptance": knob(bool, False, "speculative acceptance of the student as a draft"),
    "acceptance_temperature": knob(
        float, 1.0, "sampling temperature of the acceptance check", low=0.0
    ),
    "gsm": knob("any", None, "--mode=eval_gsm settings (commands.py)"),
    "speculative": knob("any", None, "--mode=eval_speculative settings (commands.py)"),
}
DATA_KNOBS: dict[str, Knob] = {
    "source": knob(
        str,
        None,
        "what is read",
        choices=("kjv", "botchan", "gsm", "text", "jsonl", "pairs"),
    ),
    "tokenizer": knob(str, "student", "'student', 'teacher', 'byte', 'asset:<name>' or a path"),
    "seq_len": knob(int, None, "tokens per row", low=1),
    "global_batch_size": knob(int, None, "rows per optimizer step over all devices", low=1),
    "held_out_fraction": knob(
        float, 0.02, "share of the corpus held out", low=0.0, high=1.0, open_low=True
    ),
    "split_seed": knob(int, 0, "fixes the held-out split"),
    "seed": knob(int, 0, "fixes the data order"),
    "num_shards": knob(int, None, "data streams (None: the process count)", low=1),
    "long_documents": knob(
        str, "split", "documents longer than a row", choices=packing.LONG_DOCUMENTS
    ),
    "bad_records": knob(
        str,
        "error",
        "a bad record (file:line) stops the load, or is skipped and counted",
        choices=BAD_RECORDS,
    ),
    # text / jsonl files
    "paths": knob("any", None, "a file, a glob or a list of them (text, jsonl)"),
    "field": knob(str, "text", "the text field of a jsonl document"),
    # prompts (config.onpolicy)
    "prompt_field": knob(str, "prompt", "the prompt field of a jsonl record"),
    "completion_field": knob(str, "completion", "the completion field of a jsonl record"),
    "prompt_chars": knob(int, 200, "text sources: characters of a document's prompt", low=1),
    "long_prompts": knob(str, "error", "prompts longer than prompt_len", choices=("error", "drop")),
    "long_completions": knob(
        str, "error", "completions longer than max_new_tokens", choices=("error", "truncate")
    ),
    "privileged_contexts": knob(int, None, "a self-teacher's privileged prompts per row", low=1),
    # gsm
    "num_problems": knob(int, 1000, "GSM-style problems generated", low=1),
    "gsm_seed": knob(int, 0, "seed of the GSM-style generator"),
    "gsm_held_out_fraction": knob(
        float, None, "held-out share of the GSM problems", low=0.0, high=1.0, open_low=True
    ),
    # preference pairs
    "path": knob(str, None, "a --mode=seqkd directory or a pairs.jsonl"),
    "long_pairs": knob(str, "error", "pairs longer than seq_len", choices=pairs.LONG_PAIRS),
}
RUN_BLOCKS: dict[str, dict[str, Knob]] = {
    "train": TRAIN_KNOBS,
    "optimizer": OPTIMIZER_KNOBS,
    "eval": EVAL_KNOBS,
    "data": DATA_KNOBS,
}
# Knobs a training run cannot do without (checked by experiment.checks.check_run).
REQUIRED = {"train": ("steps",), "data": ("source", "global_batch_size")}
