r"""GSM-style answers: the prompt format and the final number of a reference or a model's output.

* References end with "#### <number>" (GSM8K, reasoning-gym ``gsm_symbolic``, as
  ``sources.gsm_problems`` returns them): the number after the last "####", without commas,
  "$", whitespace or a trailing period.
* Model outputs: ``strict`` accepts "#### N" or "The answer is N"; ``flexible`` (default) takes
  ``\boxed{N}`` when present, else the last number in the text. Numbers compare with
  |a - b| < 1e-6 (lm-evaluation-harness's gsm8k task does the same two extractions).
* ``cut_at_stop``: a sampled completion ends where the model starts the next question.

Used by the verifier of sequence-level KD datasets (``seqkd``) and by the evaluation
(``eval.gsm``: pass@k, cons@n).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_NUMBER = r"-?\$?\s*\d[\d,]*(?:\.\d+)?|-?\$?\s*\.\d+"
PROMPT_FORMAT = "Question: {question}\nAnswer:"
STOP = ("\nQuestion:",)


def _to_number(text: str) -> float | None:
    t = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        return float(t)
    except ValueError:
        return None


def extract_reference(solution: str) -> float | None:
    """The number after the last "####" of a reference solution (None if there is none)."""
    if "####" not in solution:
        return _to_number(solution)
    return _to_number(solution.rsplit("####", 1)[1])


def extract_answer(text: str, mode: str = "flexible") -> float | None:
    """The final answer of a model's output.

    Args:
        text: the completion.
        mode: "strict" ("#### N" or "The answer is N") or "flexible" (``\\boxed{N}``, else the
            last number).
    """
    if mode not in ("strict", "flexible"):
        raise ValueError(f"mode={mode!r}: use 'strict' or 'flexible'.")
    strict = re.findall(rf"(?:####|[Tt]he answer is:?)\s*({_NUMBER})", text)
    if mode == "strict":
        return _to_number(strict[-1]) if strict else None
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if boxed:
        value = _to_number(boxed[-1])
        if value is not None:
            return value
    numbers = re.findall(_NUMBER, text)
    return _to_number(numbers[-1]) if numbers else None


def is_correct(answer: float | None, reference: float | None) -> bool:
    return answer is not None and reference is not None and abs(answer - reference) < 1e-6


def cut_at_stop(text: str, stop: Sequence[str] = STOP) -> str:
    """The text before the first stop string (the model starting the next question)."""
    for s in stop:
        i = text.find(s)
        if i >= 0:
            text = text[:i]
    return text
