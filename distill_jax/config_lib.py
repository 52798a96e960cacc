"""Config helpers: ``parse_arg`` for ``file.py:key=value`` presets and durations in steps."""

from __future__ import annotations

import ast
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ml_collections as mlc


def parse_arg(arg: str | None, **defaults) -> mlc.ConfigDict:
    """``"smoke=True,steps=5"`` -> ConfigDict over ``defaults``; unknown keys are an error.

    Values are Python literals (``True``, ``5``, ``0.1``, ``'x'``); anything else stays a string.
    """
    import ml_collections as mlc  # configs need it; the train step (to_steps) does not

    out = mlc.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"Unknown config argument {key!r}; known: {sorted(defaults)}.")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        out[key] = type(defaults[key])(parsed) if defaults[key] is not None else parsed
    return out


def to_steps(spec: dict, name: str, *, total_steps: int, tokens_per_step: int) -> int:
    """A duration ``<name>_steps``, ``<name>_tokens`` or ``<name>_percent`` (of total) in steps.

    Exactly one of the three keys may be set; none gives 0.
    """
    keys = [k for k in (f"{name}_steps", f"{name}_tokens", f"{name}_percent") if spec.get(k)]
    if len(keys) > 1:
        raise ValueError(f"Give one of {name}_steps, {name}_tokens, {name}_percent, not {keys}.")
    if not keys:
        return 0
    key, value = keys[0], spec[keys[0]]
    if key.endswith("_steps"):
        return int(value)
    if key.endswith("_tokens"):
        return -(-int(value) // tokens_per_step)
    return round(total_steps * float(value) / 100)
