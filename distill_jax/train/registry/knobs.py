"""The registry's two types: ``Knob`` (one typed knob) and ``Entry`` (one registered name),
and the knobs several families share."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any


@dataclasses.dataclass(frozen=True)
class Knob:
    """One typed knob: ``kind`` in float | int | bool | str | "seq" | "any"; ``default`` (None:
    optional); a range ``low``/``high`` (``open_low``: strictly above ``low``) or ``choices``;
    ``schedule``: a number that may be a schedule dict; ``to_fn``: passed to the term's function."""

    kind: Any
    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    choices: tuple | None = None
    schedule: bool = False
    to_fn: bool = True

    def describe(self) -> str:
        if self.choices is not None:
            return f"one of {list(self.choices)}"
        name = {
            float: "a number",
            int: "an integer",
            bool: "True or False",
            str: "a string",
            "seq": "a list",
            "any": "anything",
        }[self.kind]
        if self.low is not None and self.high is not None:
            return f"{name} in {'(' if self.open_low else '['}{self.low}, {self.high}]"
        if self.low is not None:
            return f"{name} {'>' if self.open_low else '>='} {self.low}"
        return name + ("" if self.high is None else f" <= {self.high}")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One registered name: its function, typed knobs and what it needs from the config."""

    name: str
    family: str  # "logit" | "feature" | "bridge" | "pair" | "selection" | "teacher"
    fn: Callable | None
    doc: str
    knobs: Mapping[str, Knob]
    needs: frozenset = frozenset()
    supplies: frozenset = frozenset()  # teachers: what the terms may read from them
    tau_squared: bool = False  # logit terms: multiplied by tau^2 (loss_options.temperature_squared)
    alpha: str = "alpha"  # logit terms: scaled by loss_options.alpha or by 1 - alpha ("ce")
    # bridge and pair terms: their parts, each its own normaliser group ("": the term itself,
    # else "<label>/<part>")
    parts: tuple = ("",)


def knob(kind, default, doc, **kw) -> Knob:
    """A Knob (keyword arguments as the dataclass)."""
    return Knob(kind, default, doc, **kw)


def entry(name, family, fn, doc, knobs, needs=(), **kw) -> Entry:
    """An Entry with read-only knobs and ``needs`` as a frozenset."""
    return Entry(name, family, fn, doc, MappingProxyType(knobs), frozenset(needs), **kw)


# Knobs and ranges several families share.
WEIGHT = knob(
    float, 1.0, "the term's weight in the loss; 0 keeps it as a metric", low=0.0, schedule=True
)
TEMPERATURE = knob(
    float, 1.0, "softmax temperature tau of both sides", low=0.0, open_low=True, schedule=True
)
UNIT = dict(low=0.0, high=1.0, schedule=True)  # a term knob in [0, 1], may be a schedule
PROB = dict(low=0.0, high=1.0)
