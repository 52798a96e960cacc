r"""MoEfied SmolLM2 -> half its experts (REAP, frequency or merging) -> distil from dense SmolLM2.

The student is real SmolLM2-135M whose 30 FFNs are split into 8 experts of 192 neurons with a
top-2 router (``transforms.moefication``, Zhang et al., 2022), then reduced to 4 experts per layer
by one of (``method`` preset):

* ``reap``: keep the 4 experts of highest REAP saliency (mean gate x output norm over routed
  tokens; Lasby et al., 2025);
* ``frequency``: keep the 4 most often routed experts;
* ``merge``: merge 8 -> 4 (MC-SMoE: dominants by frequency, members join the most similar by
  router logits, SwiGLU permutation alignment, frequency-weighted averages).

Then the pruned MoE is distilled from the dense SmolLM2-135M (forward KL + a little CE) on KJV
text. The run prints held-out perplexity before distillation (MoEfied and pruned) and after.

    python -m distill_jax.main --config configs/moe_prune_distill.py:method=reap \
        --workdir /tmp/moe_reap

Presets: method (reap | frequency | merge), steps, smoke.
"""

import ml_collections as mlc

from distill_jax import config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, method="reap", steps=20, smoke=False)
    if arg.method not in ("reap", "frequency", "merge"):
        raise ValueError(f"method={arg.method!r}: choose reap, frequency or merge.")
    reduce = (
        dict(kind="merge_experts", keep=4, criterion="frequency", similarity="router_logits")
        if arg.method == "merge"
        else dict(kind="experts", keep=4, criterion=arg.method)
    )
    c = mlc.ConfigDict()
    c.seed = 0
    c.teacher = dict(kind="online", init="asset:smollm2", dtype="bfloat16", param_dtype="bfloat16")
    c.student = dict(
        init="asset:smollm2",
        prune=[dict(kind="moefication", num_experts=8, top_k=2), reduce],
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
    c.losses = dict(forward_kl=dict(temperature=1.0, weight=0.9), ce=dict(weight=0.1))
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
