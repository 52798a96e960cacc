r"""Minitron on SmolLM2-135M: prune width and depth to about half the parameters, then distil
from the unpruned model.

Muralidharan et al., 2024, "Compact Language Models via Pruning and Knowledge Distillation"
(arXiv:2407.14679): rank FFN neurons and attention heads by activation importance and blocks by
block importance on calibration text (``transforms.calibrate``), slice (``transforms.width``,
``transforms.depth``), then recover with logit distillation from the original model. Here:
FFN 1536 -> 1024 neurons, 9 -> 6 query heads (2 per KV group), 30 -> 18 blocks by block
importance: 134.5M -> 71.9M parameters (53 %). Teacher: the real SmolLM2-135M (bf16 in the
step); text: KJV.

    python -m distill_jax.main --config configs/smollm2_minitron.py --workdir /tmp/minitron
    python -m distill_jax.main --config configs/smollm2_minitron.py:ce_only=True --workdir /tmp/mce

The run prints held-out perplexity and agreement before distillation (the pruned student) and
after. Presets: ce_only (the same pruned start trained on next tokens only), steps, smoke.
"""

import ml_collections as mlc

from distill_jax import config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, ce_only=False, steps=40, smoke=False)
    c = mlc.ConfigDict()
    c.seed = 0
    c.teacher = dict(
        kind="none" if arg.ce_only else "online",
        init="asset:smollm2",
        dtype="bfloat16",
        param_dtype="bfloat16",
    )
    c.student = dict(
        init="asset:smollm2",
        prune=[  # one shot, in this order, each ranked on fresh calibration statistics
            dict(kind="ffn", intermediate_size=1024),
            dict(kind="heads", num_heads=6),
            dict(kind="blocks", keep_layers=18),
        ],
    )
    c.calibration_batches = 2 if arg.smoke else 8
    c.data = dict(
        source="kjv",
        tokenizer="student",
        seq_len=128,
        global_batch_size=8,
        held_out_fraction=0.02,
        long_documents="split",
        seed=0,
    )
    c.losses = (
        dict(ce=dict())
        if arg.ce_only
        else dict(forward_kl=dict(temperature=1.0, weight=0.9), ce=dict(weight=0.1))
    )
    c.loss_options = dict()
    c.optimizer = dict(
        learning_rate=1e-3, warmup_steps=4, weight_decay=0.0, grad_clip_norm=1.0, b2=0.99
    )
    c.train = dict(
        steps=3 if arg.smoke else arg.steps,
        micro_batches=1,
        remat="none",  # none | full | dots | offload (models.scan.remat_policy)
        log_every_steps=1,
        checkpoint_every_steps=20,
        keep_checkpoints=1,
        export=False,
    )
    c.eval = dict(num_batches=4, every_steps=None, at_start=True)
    c.mesh = (("data", 1), ("fsdp", -1), ("tensor", 1), ("expert", 1))
    return c
