"""The registry against the README and the trainer.

* Every config label in the README's Methods table names a registered entry (or a knob of one, a
  pruning stage, a ``--mode``), and every registered loss term, selection rule, teacher kind and
  regime appears in the table.
* Every registered loss term, selection rule, teacher kind and regime trains 3 steps from a tiny
  config through ``experiment.train`` (what ``python -m distill_jax.main`` runs): every logged
  loss is finite and the student's parameters move between the first and the last checkpoint
  (weight decay off, so only gradients move them). A term that is a constant of the student
  (``teacher_entropy``) must leave them exactly where they were instead.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from trainer_runs import ALM_CONFIG, CONFIG, PAIRS_CONFIG, checkpoint_params, tiny, write_pairs

from distill_jax import commands, experiment, main
from distill_jax.train import registry
from distill_jax.transforms import schedule

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NO_GRADIENT = {"teacher_entropy"}  # a statistic: constant in the student's parameters


# ---------------------------------------------------------------------- the README's table


def _methods_rows() -> list[list[str]]:
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("\n## Methods\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| method | config |"), rows[0]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows[1:]]


def _labels() -> list[str]:
    out = []
    for cells in _methods_rows():
        config = cells[1]
        found = re.findall(r"`([^`]+)`", config)
        assert found or config.startswith("library"), f"config cell without a label: {cells}"
        out += found
    return out


def _entry_and_knobs(family: str, name: str):
    tables = {
        "losses": registry.LOSS_TERMS,
        "selection": registry.SELECTIONS,
        "teacher": registry.TEACHERS,
        "regime": registry.REGIMES,
    }
    if family in tables:
        entry = tables[family].get(name)
        return entry, None if entry is None else entry.knobs
    if family == "loss_options":
        return registry.OPTIONS.get(name), {}
    if family == "prune":
        return (name if name in schedule.ONCE_KINDS else None), {}
    if family == "prune_schedule":
        return (name if name in schedule.KINDS else None), {}
    if family == "mode":
        return (name if name in main.MODES else None), {}
    return None, None


def test_every_config_label_of_the_methods_table_exists():
    bad = []
    for label in _labels():
        family, name, *knob = label.split(".")
        entry, knobs = _entry_and_knobs(family, name)
        if entry is None or (knob and knob[0] not in knobs):
            bad.append(label)
    assert not bad, f"README Methods labels that name nothing registered: {bad}"


def test_every_registered_name_is_in_the_methods_table():
    labels = set(_labels())
    families = {
        "losses": registry.LOSS_TERMS,
        "selection": registry.SELECTIONS,
        "teacher": registry.TEACHERS,
        "regime": registry.REGIMES,
    }
    missing = [
        f"{f}.{n}" for f, table in families.items() for n in table if f"{f}.{n}" not in labels
    ]
    assert not missing, f"Registered names without a README Methods row: {missing}"


# ------------------------------------------------------------------------ 3 trainer steps


def _base(config=None, **overrides):
    c = tiny(config or CONFIG, steps=3, **overrides)
    c.optimizer.weight_decay = 0.0
    c.train.checkpoint_every_steps = 1
    c.train.keep_checkpoints = 3
    c.eval.at_start = False
    c.eval.num_batches = 1
    return c


def _loss_config(name: str, tmp_path):
    entry = registry.LOSS_TERMS[name]
    if entry.family == "bridge":
        c = _base(ALM_CONFIG)
        c.losses = {name: {}, "ce": dict(weight=0.0)}
        return c
    if entry.family in ("logit", "feature"):
        c = _base()
        if name == "ce":
            c.teacher = dict(kind="none")
        c.losses = {name: {}} if name == "ce" else {name: {}, "ce": dict(weight=0.0)}
        return c
    if entry.family == "pair":  # the pairs.jsonl --mode=seqkd writes, one tiny_pairs preset each
        c = _base(PAIRS_CONFIG, path=write_pairs(tmp_path / "pairs"), loss=name)
        c.losses = {name: dict(c.losses[name])}  # the term alone (redi's preset adds CE)
        return c
    raise AssertionError(f"No 3-step recipe for the {entry.family} term {name!r}; add one here.")


def _selection_config(kind: str, tmp_path):
    c = _base()
    c.losses = dict(forward_kl=dict(temperature=2.0))
    c.loss_options.selection = dict(kind=kind)
    if "reference" in registry.SELECTIONS[kind].needs:
        c.reference = dict(init="random", config=dict(c.student.config))
    return c


def _teacher_config(kind: str, tmp_path):
    c = _base()
    model = dict(init="random", config=dict(c.teacher.config))
    if kind in ("ensemble", "composite"):
        models = [dict(model, config=dict(model["config"], num_layers=n)) for n in (1, 2, 2)]
        c.teacher = dict(kind=kind, models=models[: 2 if kind == "ensemble" else 3])
    elif kind == "cached":
        c.teacher.update(cache_dir=str(tmp_path / "cache"), k=16, cache_dtype="float32")
        commands.build_cache(c)
        c.teacher.kind = "cached"
    elif kind == "none":
        c.teacher = dict(kind="none")
        c.losses = dict(ce={})
    elif kind == "self":  # the student reading a privileged context (GSM question + solution)
        c = _base(onpolicy=1.0)
        c.optimizer.weight_decay = 0.0
        c.student.config.max_position_embeddings = 2100
        c.teacher = dict(kind="self", source="student")
        c.data.source, c.data.num_problems, c.data.privileged_contexts = "gsm", 40, 1
        c.data.held_out_fraction = 0.1
        c.onpolicy.prompt_len = 2000
    elif kind != "online":
        c.teacher.kind = kind
    return c


def _regime_config(name: str, tmp_path):
    if name == "cached":
        return _teacher_config("cached", tmp_path)
    if name == "onpolicy":
        c = _base(onpolicy=0.5)
    elif name == "bridge":
        c = _base(ALM_CONFIG)
    elif name == "bridge_onpolicy":
        c = _base(ALM_CONFIG, onpolicy=1.0)
    elif name == "fixed":
        c = _base()
    elif name == "pairs":
        c = _base(PAIRS_CONFIG, path=write_pairs(tmp_path / "pairs"), loss="redi")
    else:
        raise AssertionError(f"No 3-step recipe for the regime {name!r}; add one here.")
    c.optimizer.weight_decay = 0.0
    assert registry.regime_of(c) == name
    return c


CASES = [
    *(("losses", n) for n in registry.LOSS_TERMS),
    *(("selection", k) for k in registry.SELECTIONS),
    *(("teacher", k) for k in registry.TEACHERS),
    *(("regime", n) for n in registry.REGIMES),
]
RECIPES = {
    "losses": _loss_config,
    "selection": _selection_config,
    "teacher": _teacher_config,
    "regime": _regime_config,
}


@pytest.mark.parametrize("family,name", CASES, ids=[f"{f}.{n}" for f, n in CASES])
def test_every_registered_name_trains_three_steps(tmp_path, family, name):
    c = RECIPES[family](name, tmp_path)
    workdir = str(tmp_path / "run")
    experiment.train(c, workdir)
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    losses = {k: v for r in train for k, v in r.items() if k.startswith("train/loss")}
    assert losses and all(np.isfinite(v) for v in losses.values()), losses
    if family == "losses":
        assert any(k.startswith(f"train/loss/{name}") for k in losses), sorted(losses)
    first, last = checkpoint_params(workdir, 1), checkpoint_params(workdir, 3)
    moved = any(not np.array_equal(a, b) for a, b in zip(first, last))
    if family == "losses" and name in NO_GRADIENT:
        assert not moved and all(r["train/grad_norm"] == 0 for r in train)
    else:
        assert moved, "the student's parameters did not move"


def test_every_teacher_kind_has_one_builder():
    from distill_jax.experiment import models

    assert set(models.TEACHER_BUILDERS) == set(registry.TEACHERS)
