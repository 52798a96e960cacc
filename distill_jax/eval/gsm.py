r"""Answer-checked math: pass@k and majority vote of GSM-style answers (METHODS.md 9.4-9.5).

* Answers are read by ``data.answers`` (``extract_reference``, ``extract_answer`` in ``strict``
  or ``flexible`` mode, ``is_correct``, ``cut_at_stop``), beside the problems they belong to.
* pass@k from n samples with c correct: 1 - C(n - c, k) / C(n, k), computed as the product
  1 - prod_{i = n - c + 1}^{n} (1 - k / i) (Chen et al., 2021, "Evaluating Large Language Models
  Trained on Code"); cons@n: the majority-voted answer's accuracy (DeepSeek-R1 report).
* ``sample_answers`` / ``evaluate``: n sampled completions per problem from a model (KV cache,
  one key per problem and sample), cut at a stop string, then scored.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.data import answers as answers_lib
from distill_jax.data import prompts as prompts_lib
from distill_jax.models import sampling


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` of ``n`` samples correct."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass@k needs 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}.")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got n={n}.")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority_vote(answers: Sequence[float | None]) -> float | None:
    """The most frequent extracted answer (ties: the one seen first); None if none parsed."""
    valid = [round(a, 6) for a in answers if a is not None]
    if not valid:
        return None
    counts = collections.Counter(valid)
    best = max(counts.values())
    return next(a for a in valid if counts[a] == best)


def score(
    completions: Sequence[Sequence[str]],
    references: Sequence[str],
    *,
    ks: Sequence[int] = (1,),
    mode: str = "flexible",
) -> dict:
    """pass@k (mean over problems), cons@n (majority vote) and the per-sample accuracy.

    Args:
        completions: per problem, its n sampled completions (n equal for all problems).
        references: per problem, the reference solution or answer.
    """
    if len(completions) != len(references) or not completions:
        raise ValueError("score needs one list of completions per reference (and at least one).")
    out = {f"pass@{k}": 0.0 for k in ks}
    majority = correct = total = 0
    for samples, ref in zip(completions, references):
        r = answers_lib.extract_reference(ref)
        answers = [answers_lib.extract_answer(answers_lib.cut_at_stop(s), mode) for s in samples]
        c = sum(answers_lib.is_correct(a, r) for a in answers)
        for k in ks:
            out[f"pass@{k}"] += pass_at_k(len(samples), c, k)
        majority += answers_lib.is_correct(majority_vote(answers), r)
        correct, total = correct + c, total + len(samples)
    n = len(references)
    out = {k: v / n for k, v in out.items()}
    out.update(
        {
            f"cons@{len(completions[0])}": majority / n,
            "sample_accuracy": correct / max(total, 1),
            "problems": n,
        }
    )
    return out


def sample_answers(
    model,
    tokenizer,
    questions: Sequence[str],
    *,
    n: int = 1,
    max_new_tokens: int = 256,
    prompt_len: int = 256,
    temperature: float = 0.6,
    top_p: float = 0.95,
    batch_size: int = 8,
    seed: int = 0,
    prompt_format: str = answers_lib.PROMPT_FORMAT,
) -> list[list[str]]:
    """``n`` completions per question (decoded, cut at the stop strings), sampled with the KV
    cache; sample j of question i uses the key fold_in(fold_in(key(seed), j), i), so the result
    does not depend on the batch size.

    Raises:
        ValueError: a prompt longer than ``prompt_len`` tokens; prompt + new tokens beyond the
            model's positions.
    """
    settings = sampling.RolloutSettings(max_new_tokens, temperature, 0, top_p, tokenizer.eos_id)
    sampling.check_settings(settings, model.config, prompt_len)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    rows = []
    for i, q in enumerate(questions):
        p, _ = prompts_lib.encode_example(
            tokenizer,
            prompt_format.format(question=q),
            "",
            prompt_len=prompt_len,
            completion_len=max_new_tokens + 1,
            where=f"question {i}",
        )
        rows.append(prompts_lib.pad_prompt(p, prompt_len, pad))
    jobs = [(i, j) for j in range(n) for i in range(len(questions))]
    out: list[list[str]] = [[""] * n for _ in questions]
    base = jax.random.key(seed)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # static batch shape
        ids = np.stack([rows[i][0] for i, _ in chunk])
        mask = np.stack([rows[i][1] for i, _ in chunk])
        keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(base, j), i) for i, j in chunk])
        gen = sampling.generate(
            model,
            jnp.asarray(ids),
            prompt_mask=jnp.asarray(mask),
            max_new_tokens=max_new_tokens,
            rng=keys,
            temperature=temperature,
            top_p=top_p,
            eos_id=tokenizer.eos_id,
            vocab_limit=tokenizer.vocab_size,
        )
        tokens, lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
        for (i, j), t, length in zip(chunk, tokens, lengths):
            t = t[:length]
            if tokenizer.eos_id is not None and len(t) and t[-1] == tokenizer.eos_id:
                t = t[:-1]
            out[i][j] = answers_lib.cut_at_stop(tokenizer.decode(t.tolist()))
    return out


def evaluate(
    model, tokenizer, problems: Sequence[dict], *, n: int = 1, ks=(1,), mode="flexible", **kw
) -> dict:
    """Sample ``n`` answers per problem ({"question", "solution" or "answer"}) and score them."""
    if any(k > n for k in ks):
        raise ValueError(f"pass@k with k={max(ks)} needs n >= k samples per problem (n={n}).")
    completions = sample_answers(model, tokenizer, [p["question"] for p in problems], n=n, **kw)
    refs = [p.get("solution") or p["answer"] for p in problems]
    result = score(completions, refs, ks=ks, mode=mode)
    result["n"] = n
    result["examples"] = [
        {"question": p["question"], "completion": c[0]} for p, c in zip(problems[:3], completions)
    ]
    return result
