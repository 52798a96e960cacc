r"""Tiny random teacher -> tinier random student on preference pairs: DPO with the teacher as
reference, REDI (with SFT on the positives) or DistiLLM-2, the trainer's test config for the
pair terms (``train/pair_terms.py``).

    python -m distill_jax.main --config configs/tiny_pairs.py:path=/tmp/sk,loss=dpo \
        --workdir /tmp/tiny_pairs

``path`` is what ``--mode=seqkd`` writes (``config.seqkd.out_dir``, e.g. of
configs/smollm2_seqkd.py) or a pairs.jsonl: {"prompt", "chosen", "rejected"} per line, chosen a
teacher trace the verifier accepted and rejected one it refused (tests/trainer_runs.py writes a
small one with ``data.seqkd.write_dataset``). Rows are bytes (the byte tokenizer), so prompt +
response must fit ``seq_len`` (96) bytes unless ``long_pairs`` says "truncate" or "drop". Seconds
on a CPU. Presets: path, loss (dpo | redi | distillm2), steps, micro_batches, teacher
(online | ema | none; none works with redi only).
"""

import ml_collections as mlc

from distill_jax import config_lib

LOSSES = {
    "dpo": dict(dpo=dict(beta=0.5)),
    "redi": dict(redi=dict(c_pos=1.0, c_neg=0.8), ce=dict(weight=1.0)),  # + SFT on positives
    "distillm2": dict(distillm2=dict(b=1.0, base_alpha=0.1, min_alpha=0.01)),
}


def get_config(arg=None):
    arg = config_lib.parse_arg(
        arg, path="", loss="dpo", steps=3, micro_batches=1, teacher="online", long_pairs="error"
    )
    if arg.loss not in LOSSES:
        raise ValueError(f"tiny_pairs: loss={arg.loss!r}; choose one of {sorted(LOSSES)}.")
    c = mlc.ConfigDict()
    c.seed = 0
    arch = dict(
        family="llama",
        vocab_size=264,  # the byte tokenizer has 259 ids: 5 padded rows exercise the vocab mask
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=512,
    )
    c.teacher = dict(kind=arg.teacher, init="random", config=dict(arch, num_layers=2))
    if arg.teacher == "ema":
        c.teacher.decay = 0.9
    c.student = dict(init="random", config=dict(arch, num_layers=1))
    c.data = dict(
        source="pairs",
        path=arg.path,
        tokenizer="byte",
        seq_len=96,
        global_batch_size=8,
        held_out_fraction=0.1,
        long_pairs=arg.long_pairs,
        seed=0,
    )
    c.losses = LOSSES[arg.loss]
    c.loss_options = dict(head_chunk_tokens=32)
    c.optimizer = dict(learning_rate=3e-3, warmup_steps=0, weight_decay=0.01, grad_clip_norm=1.0)
    c.train = dict(
        steps=arg.steps,
        micro_batches=arg.micro_batches,
        log_every_steps=1,
        checkpoint_every_steps=2,
        keep_checkpoints=3,
        export=False,
    )
    c.eval = dict(num_batches=1, every_steps=None, at_start=False)
    c.mesh = (("data", 1), ("fsdp", -1), ("tensor", 1), ("expert", 1))
    return c
