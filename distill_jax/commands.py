r"""The modes of ``distill_jax.main`` besides train and compile (``--mode=...``), built from a
config through ``distill_jax.experiment``.

    python -m distill_jax.main --config <file> --workdir /tmp/c --mode=cache  # teacher.cache_dir
    python -m distill_jax.main --config configs/smollm2_draft_distillspec.py --workdir /tmp/ds \
        --mode=eval_speculative        # alpha, greedy match, measured tokens per target call
    python -m distill_jax.main --config configs/smollm2_seqkd.py --workdir /tmp/sk --mode=eval_gsm
    python -m distill_jax.main --config configs/smollm2_seqkd.py --workdir /tmp/sk --mode=seqkd

* ``cache``: ``config.teacher``'s top-k for the first ``train.steps`` training batches, written
  to ``teacher.cache_dir``; a run with ``teacher.kind='cached'`` reads it.
* ``eval_gsm``: pass@k, cons@n and per-sample accuracy of ``config.eval.gsm.model`` ("student" or
  "teacher") on held-out GSM-style problems (the held-out split of the config's problems, never
  trained on).
* ``eval_speculative``: the student as a draft for the teacher (target): DistillSpec's alpha on
  held-out prompts, and real speculative sampling on some of them: accepted tokens, tokens per
  target call, and the simulated speed-up tau / (gamma c + 1) with c = the draft's share of the
  target's parameters (a FLOP proxy).
* ``seqkd``: the teacher samples n traces for the training problems, a verifier keeps the correct
  ones (``data.seqkd``), and the dataset with its manifest goes to ``config.seqkd.out_dir``.

A workdir with an ``export`` (a finished run with ``train.export=True``) supplies the student.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import experiment, teachers
from distill_jax.data import sources, teacher_cache
from distill_jax.eval import gsm, speculative


def build_cache(config) -> teacher_cache.TeacherCache:
    """Write ``config.teacher``'s top-k for the first ``train.steps`` training batches to
    ``teacher.cache_dir`` (``--mode=cache``); a run with ``teacher.kind='cached'`` reads it."""
    c, t = config, config.teacher
    experiment.check_run(c)  # the run's blocks, before the data and the teacher load
    _, tokenizer, batches = experiment.training_data(c)
    model = experiment.build_model(t, "teacher", int(c.get("seed", 0)) + 1)
    v = model.config.vocab_size
    return teachers.build_teacher_cache(
        t.cache_dir,
        model,
        batches,
        num_batches=c.train.steps,
        k=t.get("k", 64),
        tokenizer_fingerprint=tokenizer.fingerprint,
        temperature=t.get("cache_temperature", 1.0),
        dtype=t.get("cache_dtype", "bfloat16"),
        data_settings=batches.streams[0].config,
        vocab_mask=jnp.arange(v) < tokenizer.vocab_size if tokenizer.vocab_size < v else None,
    )


def _student(c, workdir: str | None):
    """The trained student (workdir/export) if there is one, else ``config.student``."""
    export = os.path.join(workdir, "export") if workdir else None
    if export and os.path.isdir(export):
        from distill_jax.models.convert import from_pretrained

        return from_pretrained(export), export
    return experiment.build_model(c.student, "student", int(c.get("seed", 0))), "config.student"


def _gsm_split(c) -> dict:
    """The train / held-out split of the config's GSM problems; ``data.gsm_held_out_fraction``
    pins it when the training data is something else (e.g. the verified traces as JSONL), so
    evaluation never sees a problem the teacher answered for the training set."""
    problems = sources.gsm_problems(
        c.data.get("num_problems", 1000), seed=c.data.get("gsm_seed", 0)
    )
    fraction = c.data.get("gsm_held_out_fraction", c.data.get("held_out_fraction", 0.02))
    return sources.split_corpus(problems, fraction=fraction, seed=c.data.get("split_seed", 0))


def eval_gsm(c, workdir: str | None = None) -> dict:
    g = dict(c.eval.get("gsm") or {})
    which = g.pop("model", "student")
    if which == "teacher":
        seed = int(c.get("seed", 0))
        model, name = experiment.build_model(c.teacher, "teacher", seed + 1), "teacher"
    else:
        model, name = _student(c, workdir)
    tokenizer = experiment.tokenizer_from_spec(c, c.data.get("tokenizer", "student"))
    problems = _gsm_split(c)["validation"][: g.pop("num_problems", 16)]
    ks = tuple(g.pop("ks", (1,)))
    result = gsm.evaluate(model, tokenizer, problems, ks=ks, **g)
    return {"model": name, **result}


def eval_speculative(c, workdir: str | None = None) -> dict:
    s = dict(c.eval.get("speculative") or {})
    seed = int(c.get("seed", 0))
    target = experiment.build_model(c.teacher, "teacher", seed + 1)
    draft, name = _student(c, workdir)
    tokenizer = experiment.tokenizer_from_spec(c, c.data.get("tokenizer", "student"))
    split, _, _ = experiment.training_data(c)
    temperature = s.get("temperature", 1.0)
    new = s.get("max_new_tokens", c.onpolicy.max_new_tokens)
    batches = list(
        experiment.make_prompt_batches(c, split["validation"], tokenizer, num_epochs=1, seed=0)
    )[: s.get("num_batches", 2)]
    kw = dict(max_new_tokens=new, temperature=temperature, eos_id=tokenizer.eos_id, seed=seed)
    alpha = speculative.acceptance(target, draft, batches, **kw)
    on_target = speculative.acceptance(target, draft, batches, prefixes="target", **kw)
    gamma = int(s.get("gamma", 4))
    b = batches[0]
    out = speculative.speculative_generate(
        target,
        draft,
        jnp.asarray(b["prompt_ids"]),
        prompt_mask=jnp.asarray(b["prompt_mask"]),
        gamma=gamma,
        max_new_tokens=new,
        rng=jax.random.split(jax.random.key(seed), b["prompt_ids"].shape[0]),
        temperature=temperature,
        eos_id=tokenizer.eos_id,
    )
    calls = float(np.sum(out.target_calls))
    tokens = float(np.sum(out.lengths))
    size = lambda m: sum(int(np.size(x)) for x in jax.tree.leaves(teachers.split_model(m)[1]))  # noqa: E731
    cost = size(draft) / size(target)
    measured_alpha = float(np.sum(out.accepted) / max(np.sum(out.drafted), 1))
    return {
        "draft": name,
        "alpha": alpha["alpha"],
        "alpha_on_target_prefixes": on_target["alpha"],
        "greedy_match": alpha["greedy_match"],
        "positions": alpha["positions"],
        "gamma": gamma,
        "accepted_fraction": measured_alpha,
        "tokens_per_target_call": tokens / max(calls, 1.0),
        "expected_tokens_per_target_call": float(
            speculative.block_efficiency(on_target["alpha"], gamma)
        ),
        "draft_cost_ratio": cost,
        "simulated_speedup": float(speculative.speedup(on_target["alpha"], gamma, cost)),
    }


def seqkd(c, workdir: str | None = None) -> dict:
    k = dict(c.seqkd)
    out_dir = k.pop("out_dir")
    seed = int(c.get("seed", 0))
    model = experiment.build_model(c.teacher, "teacher", seed + 1)
    tokenizer = experiment.tokenizer_from_spec(c, k.pop("tokenizer", "teacher"))
    problems = _gsm_split(c)["train"][: k.pop("num_problems", 64)]
    teacher_name = str(c.teacher.get("init"))
    return teachers.build_seqkd_dataset(
        model, tokenizer, problems, out_dir, teacher=teacher_name, seed=seed, **k
    )
