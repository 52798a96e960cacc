r"""Tiny random teacher -> tinier random student on KJV bytes: the trainer's test config.

    python -m distill_jax.main --config configs/tiny_kd.py:steps=8 --workdir /tmp/tiny

Seconds on a CPU. Presets: steps, teacher (online | ema | none), micro_batches, prune (a
2-block student pruned progressively while it is distilled: FFN 128 -> 96 after step 3, 4 -> 2
query heads after step 5, 2 -> 1 blocks after step 7), onpolicy = lambda (GKD: the first ~20
characters of a chapter are the prompt, the student continues it for 16 bytes with probability
lambda, else the chapter's next bytes; generalized JSD), replay = capacity of DistiLLM's buffer,
cache = a teacher cache directory (teacher.kind='cached'; write it with --mode=cache first).
"""

import ml_collections as mlc

from distill_jax import config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(
        arg,
        steps=8,
        teacher="online",
        micro_batches=1,
        prune=False,
        onpolicy=-1.0,
        replay=0,
        cache="",
    )
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
    if arg.teacher in ("ema", "self"):  # knobs are checked per teacher kind
        c.teacher.decay = 0.9
    if arg.cache:  # the offline teacher: top-16 of the same model, written by --mode=cache
        c.teacher.update(kind="cached", cache_dir=arg.cache, k=16, cache_dtype="float32")
    c.student = dict(init="random", config=dict(arch, num_layers=2 if arg.prune else 1))
    if arg.prune:
        c.prune_schedule = [
            dict(step=3, kind="ffn", intermediate_size=96),
            dict(step=5, kind="heads", num_heads=2),
            dict(step=7, kind="blocks", keep_layers=1),
        ]
        c.calibration_batches = 2
    c.data = dict(
        source="kjv",
        tokenizer="byte",
        seq_len=64,
        global_batch_size=8,
        held_out_fraction=0.02,
        num_shards=2,
        seed=0,
    )
    kd = dict(forward_kl=dict(temperature=2.0, weight=0.5), ce=dict(weight=0.5))
    c.losses = dict(ce=dict()) if arg.teacher == "none" else kd
    if arg.onpolicy >= 0:
        del c.data.seq_len  # rows are prompt_len + max_new_tokens
        c.data.prompt_chars = 20
        c.data.long_completions = "truncate"
        c.onpolicy = dict(lmbda=arg.onpolicy, prompt_len=24, max_new_tokens=16, temperature=1.0)
        if arg.replay:
            c.onpolicy.replay = dict(capacity=arg.replay, init_threshold=0.5, loss_eps=0.0)
        c.losses = dict(jsd=dict(beta=0.5))
    c.loss_options = dict(head_chunk_tokens=32)
    c.optimizer = dict(learning_rate=3e-3, warmup_steps=2, weight_decay=0.01, grad_clip_norm=1.0)
    c.train = dict(
        steps=arg.steps,
        micro_batches=arg.micro_batches,
        log_every_steps=1,
        checkpoint_every_steps=2,
        keep_checkpoints=3,
        export=False,
    )
    c.eval = dict(num_batches=2, every_steps=4, at_start=False)
    c.mesh = (("data", 1), ("fsdp", -1), ("tensor", 1), ("expert", 1))
    return c
