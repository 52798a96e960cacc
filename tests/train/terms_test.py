"""The registry and config validation: every config validates; every mistake is one ValueError
naming the term, the knob and the fix, raised before any model or data loads."""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
from types import MappingProxyType

import ml_collections as mlc
import pytest

from distill_jax.losses import divergences, fused
from distill_jax.train import objective, registry, terms

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
CONFIGS += sorted(glob.glob(os.path.join(ROOT, "configs", "pod", "*.py")))


def _load(path: str, arg=None) -> mlc.ConfigDict:
    spec = importlib.util.spec_from_file_location("config_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _tiny(**changes) -> mlc.ConfigDict:
    c = _load(os.path.join(ROOT, "configs", "tiny_kd.py"))
    with c.unlocked():
        for key, value in changes.items():
            c[key] = value
    return c


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_config_validates(path):
    assert len(CONFIGS) >= 12
    spec = objective.loss_spec(_load(path))
    assert spec.logit_terms or spec.bridge_terms or spec.pair_terms


@pytest.mark.parametrize("arg", ["teacher=none", "teacher=ema", "onpolicy=0.5", "teacher=self"])
def test_tiny_kd_variants_validate(arg):
    objective.loss_spec(_load(os.path.join(ROOT, "configs", "tiny_kd.py"), arg))


def test_registry_covers_every_kind_and_every_knob_is_typed_and_documented():
    assert set(divergences.CORES) | set(fused.EXTRA_KINDS) <= set(registry.LOSS_TERMS)
    assert {"hidden_mse", "hidden_cosine", "attention_relation", "value_relation", "alm"} <= set(
        registry.LOSS_TERMS
    )
    assert set(registry.SELECTIONS) == {"none", "adakd", "tsd", "tip", "clip", "rho1", "adaspec"}
    assert set(registry.TEACHERS) == {
        "online",
        "cached",
        "ensemble",
        "composite",
        "ema",
        "self",
        "none",
    }
    entries = [*registry.LOSS_TERMS.values(), *registry.SELECTIONS.values()]
    entries += list(registry.TEACHERS.values())
    for entry in entries:
        assert entry.doc and (entry.fn is not None or entry.name == "none"), entry.name
        for name, knob in {**entry.knobs, **registry.OPTIONS}.items():
            assert knob.doc, (entry.name, name)
            terms._check_value(entry.name, name, knob, knob.default)  # defaults are valid


def test_a_term_is_typed_and_carries_its_defaults():
    c = _tiny(losses=dict(kd=dict(divergence="jsd", temperature=2.0)))
    (term,) = objective.loss_spec(c).logit_terms.values()
    assert isinstance(term, terms.Term) and term.entry is registry.LOSS_TERMS["jsd"]
    assert (term.label, term.kind, term.knobs["temperature"], term.knobs["beta"]) == (
        "kd",
        "jsd",
        2.0,
        0.5,
    )


@pytest.mark.parametrize(
    "losses,options,match",
    [
        (
            dict(forward_kl=dict(temprature=2.0)),
            {},
            r"Loss term 'forward_kl': unknown knob 'temprature' \(did you mean 'temperature'\?\); "
            r"valid knobs: \[.*'temperature'.*\]",
        ),
        (dict(kd=dict(divergence="jsd", betta=0.1)), {}, r"'kd' \(jsd\): unknown knob 'betta'"),
        (dict(forward_kl=dict(temperature="hot")), {}, r"temperature='hot': must be a number > 0"),
        (dict(forward_kl=dict(temperature=0.0)), {}, r"temperature=0.0: must be a number > 0"),
        (dict(forward_kl=dict(weight=-1.0)), {}, r"weight=-1.0: must be a number >= 0"),
        (dict(jsd=dict(beta=1.5)), {}, r"beta=1.5: must be a number in \[0.0, 1.0\]"),
        (dict(sinkhorn=dict(scope="row")), {}, r"scope='row': must be one of \['batch'"),
        (
            dict(forward_kl=dict(temperature=dict(schedule="linear", start=-1.0, end=1.0))),
            {},
            r"temperature.start=-1.0: must be a number > 0",
        ),
        (dict(fkl=dict()), {}, "unknown kind 'fkl'"),
        (dict(forward_kl=dict()), dict(alpah=0.5), r"loss_options: unknown knob 'alpah'"),
        (
            dict(forward_kl=dict()),
            dict(selection=dict(kind="tip", kepp=("high_entropy",))),
            r"loss_options.selection \(kind='tip'\): unknown knob 'kepp'",
        ),
        (
            dict(forward_kl=dict()),
            dict(selection=dict(kind="adakd", min_ratio=2.0)),
            r"min_ratio=2.0: must be a number in \[0.0, 1.0\]",
        ),
    ],
)
def test_knob_mistakes_name_the_term_the_knob_and_the_range(losses, options, match):
    with pytest.raises(ValueError, match=match):
        objective.loss_spec(_tiny(losses=losses, loss_options=options))


@pytest.mark.parametrize(
    "where,old,new",
    [
        ("loss_options", "chunk_size", "head_chunk_tokens"),
        ("alm", "chunk_size", "student_logprob_chunk_tokens"),
        ("teacher", "logprob_chunk_size", "logprob_chunk_tokens"),
    ],
)
def test_old_chunk_knob_names_name_the_new_one(where, old, new):
    c = _load(os.path.join(ROOT, "configs", "tiny_alm.py"))
    with c.unlocked():
        if where == "alm":
            c.losses.alm[old] = 32
        else:
            c[where][old] = 32
    with pytest.raises(ValueError, match=f"'{old}' was renamed; use '{new}'"):
        objective.loss_spec(c)


@pytest.mark.parametrize("kind", ["cached", "none", "ensemble"])
def test_feature_term_with_a_teacher_without_hidden_states_names_the_fix(kind):
    teacher = dict(kind=kind, cache_dir="/no/such/cache") if kind == "cached" else dict(kind=kind)
    for label, what in [("hidden_mse", "hidden states"), ("value_relation", "attention q/k/v")]:
        c = _tiny(teacher=teacher, losses={label: dict(weight=0.1)})
        with pytest.raises(ValueError, match=f"cannot supply {what}; use .*'online'"):
            objective.loss_spec(c)
    objective.loss_spec(_tiny(losses=dict(hidden_cosine=dict(), ce=dict())))  # online: fine


def test_unmet_needs_name_the_fix():
    with pytest.raises(ValueError, match="'forward_kl'.*teacher.kind='none' gives no teacher"):
        objective.loss_spec(_tiny(teacher=dict(kind="none"), losses=dict(forward_kl=dict())))
    with pytest.raises(ValueError, match="'alm': it needs config.bridge.*set config.bridge"):
        objective.loss_spec(_tiny(losses=dict(alm=dict())))
    with pytest.raises(ValueError, match="kind='rho1'.*set config.reference"):
        objective.loss_spec(_tiny(loss_options=dict(selection=dict(kind="rho1"))))
    with pytest.raises(ValueError, match="teacher.kind='cached' needs teacher.cache_dir"):
        objective.loss_spec(_tiny(teacher=dict(kind="cached")))


def test_a_pair_loss_without_pairs_names_the_fix(monkeypatch):
    pair = dataclasses.replace(
        registry.LOSS_TERMS["ce"],
        name="pair_test",
        needs=frozenset({"pairs"}),
        knobs=MappingProxyType({"weight": registry.WEIGHT}),
    )
    monkeypatch.setitem(registry.LOSS_TERMS, "pair_test", pair)
    c = _tiny(losses=dict(pair_test=dict()))
    with pytest.raises(ValueError, match="needs preference pairs; set config.data.source='pairs'"):
        objective.loss_spec(c)
    with c.unlocked():
        c.data.source = "pairs"
    objective.loss_spec(c)


def test_teacher_knobs_are_checked_and_nothing_is_loaded():
    c = _load(os.path.join(ROOT, "configs", "tiny_kd.py"), "teacher=ema")
    with c.unlocked():
        c.teacher.init = "/no/such/teacher.gguf"  # validation reads no file
        c.teacher.decya = 0.5
    with pytest.raises(ValueError, match=r"unknown knob 'decya' \(did you mean 'decay'\?\)"):
        objective.loss_spec(c)
    with pytest.raises(ValueError, match=r"teacher.kind='oracle': choose one of"):
        objective.loss_spec(_tiny(teacher=dict(kind="oracle")))
    with pytest.raises(ValueError, match=r"teacher.decay=1.5: must be a number in \[0.0, 1.0\]"):
        objective.loss_spec(_tiny(teacher=dict(kind="ema", decay=1.5)))


@pytest.mark.parametrize(
    "teacher,knob,owners",
    [
        (dict(kind="cached", cache_dir="/no/such/cache", decay=0.9), "decay", ["ema", "self"]),
        (dict(kind="online", k=16), "k", ["cached"]),
        (dict(kind="ema", source="initial"), "source", ["self"]),
        (
            dict(kind="ensemble", models=[], init="random"),
            "init",
            ["online", "cached", "ema", "self", "none"],
        ),
    ],
)
def test_teacher_knobs_are_checked_against_their_own_kind(teacher, knob, owners):
    """A knob of another teacher kind fails, naming the kinds it belongs to and the valid
    knobs of the configured kind (not the union of every kind's knobs)."""
    kind = teacher["kind"]
    valid = sorted(registry.TEACHERS[kind].knobs)
    assert knob not in valid
    with pytest.raises(ValueError) as e:
        objective.loss_spec(_tiny(teacher=teacher))
    assert str(e.value) == (
        f"teacher (kind={kind!r}): {knob!r} is a knob of teacher.kind {owners}, not of "
        f"{kind!r}; remove it or change the kind. Valid knobs of {kind!r}: {valid}."
    )
