r"""Config -> typed terms: ``config.losses``, ``loss_options`` and ``teacher`` checked against
the registry (``train/registry/``) before any model or data loads.

    validate(config) -> (terms, options, selection)   the whole config, needs included
    parse_term(label, raw) -> Term       one ``config.losses`` entry
    parse_options(loss_options) -> (options with defaults, selection rule as a Term)
    parse_teacher(teacher) -> Entry      the ``TEACHERS`` entry, knobs checked against its kind's
    check_knobs(where, raw, knobs) -> dict   names, types and ranges; defaults filled in
    check_layers(terms, L_s, L_t)        feature terms' layer indices against known depths
    check_blocks(config) -> {block: knobs}   ``train``, ``optimizer``, ``eval``, ``data``
                                         against ``registry.RUN_BLOCKS``

A ``Term`` is (label, entry, knobs): the metric label ``loss/<label>``, the registry entry and
every knob of the entry with its default filled in and its value checked. Errors name the term,
the knob and the fix: an unknown knob lists the valid ones (and the new name of a renamed one),
a value out of range names the range, an unmet need (hidden states from a teacher that has none,
a bridge term without ``config.bridge``, a pair loss without pairs) names what to set.
``objective.loss_spec(config)`` calls ``validate``; the trainer calls that first.

Following a knob: ``config.losses.forward_kl.temperature`` -> ``parse_term`` ->
``Term.knobs["temperature"]`` -> ``objective._fused_terms`` (schedule, alpha, tau^2) ->
``fused.fused_distill_loss(terms=...)`` -> ``divergences.log_probs(z, tau)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from distill_jax.train.registry import (
    LOSS_TERMS,
    OPTIONS,
    RENAMED,
    RUN_BLOCKS,
    SELECTIONS,
    TEACHERS,
    Entry,
    Knob,
)

_SCHEDULE_KEYS = ("schedule", "start", "end", "steps", "warmup_steps")


@dataclasses.dataclass(frozen=True)
class Term:
    """One parsed term of ``config.losses``: its label (metric ``loss/<label>``), registry entry
    and knobs (every knob of the entry, defaults filled in, values checked)."""

    label: str
    entry: Entry
    knobs: Mapping[str, Any]

    @property
    def kind(self) -> str:
        return self.entry.name

    @property
    def weight(self):
        return self.knobs["weight"]

    def fn_knobs(self) -> dict:
        """The knobs the term's function takes (None: use the function's own default)."""
        return {k: v for k, v in self.knobs.items() if self.entry.knobs[k].to_fn and v is not None}


# ----------------------------------------------------------------------------- checking


def to_dict(x) -> dict:
    if x is None:
        return {}
    return x.to_dict() if hasattr(x, "to_dict") else dict(x)


def _unknown(where: str, names, knobs: Mapping[str, Knob], renamed: Mapping[str, str]) -> None:
    for name in sorted(names):
        if name in renamed:
            raise ValueError(f"{where}: {name!r} was renamed; use {renamed[name]!r}.")
        close = difflib.get_close_matches(name, list(knobs), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{where}: unknown knob {name!r}{hint}; valid knobs: {sorted(knobs)}.")


def _check_value(where: str, name: str, knob: Knob, value) -> None:
    if value is None:
        if knob.default is not None and knob.kind != "any":
            raise ValueError(f"{where}.{name}=None: must be {knob.describe()}.")
        return
    if knob.schedule and isinstance(value, Mapping):
        spec = to_dict(value)
        bad = set(spec) - set(_SCHEDULE_KEYS)
        if bad or "start" not in spec:
            raise ValueError(
                f"{where}.{name}: a schedule is dict(schedule, start, end, steps, warmup_steps); "
                f"got keys {sorted(spec)}."
            )
        for k in ("start", "end"):
            if k in spec:
                _check_value(
                    where, f"{name}.{k}", dataclasses.replace(knob, schedule=False), spec[k]
                )
        return
    kind = knob.kind
    ok = {
        float: isinstance(value, int | float) and not isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        str: isinstance(value, str),
        "seq": isinstance(value, list | tuple),
        "any": True,
    }[kind]
    if not ok:
        raise ValueError(f"{where}.{name}={value!r}: must be {knob.describe()}.")
    if kind in (float, int) and not math.isfinite(value):  # NaN passes every comparison
        raise ValueError(f"{where}.{name}={value!r}: not finite; use {knob.describe()}.")
    if knob.choices is not None and value not in knob.choices:
        raise ValueError(f"{where}.{name}={value!r}: must be {knob.describe()}.")
    if kind in (float, int) and (
        (knob.low is not None and (value < knob.low or (knob.open_low and value == knob.low)))
        or (knob.high is not None and value > knob.high)
    ):
        raise ValueError(f"{where}.{name}={value!r}: must be {knob.describe()}.")


def check_knobs(where: str, raw: Mapping, knobs: Mapping[str, Knob], renamed=None) -> dict:
    """``raw`` checked against ``knobs`` (names, types, ranges); every default filled in."""
    raw = to_dict(raw)
    _unknown(where, set(raw) - set(knobs), knobs, renamed or {})
    for name, value in raw.items():
        _check_value(where, name, knobs[name], value)
    return {name: raw.get(name, knob.default) for name, knob in knobs.items()}


def check_blocks(config) -> dict[str, dict]:
    """Each of ``config.train``, ``optimizer``, ``eval`` and ``data`` that the config has,
    checked against its table in ``registry.RUN_BLOCKS`` (names, types, ranges; NaN and inf
    refused); returns {block: knobs with defaults filled in}."""
    out = {}
    for block, knobs in RUN_BLOCKS.items():
        raw = _has(config, block)
        if raw is not None:
            out[block] = check_knobs(f"config.{block}", raw, knobs)
    return out


def parse_term(label: str, raw: Mapping) -> Term:
    """One ``config.losses`` entry -> Term; errors name the term, the knob and the fix."""
    raw = to_dict(raw)
    name = raw.pop("divergence", label)
    entry = LOSS_TERMS.get(name)
    if entry is None or entry.family == "selection":
        logit = sorted(k for k, e in LOSS_TERMS.items() if e.family == "logit")
        other = sorted(k for k, e in LOSS_TERMS.items() if e.family != "logit")
        raise ValueError(
            f"Loss term {label!r}: unknown kind {name!r}; choose a logit term {logit}, one of "
            f"{other}, or set 'divergence' for a custom label."
        )
    if entry.family != "logit" and label != name:
        raise ValueError(
            f"Loss term {label!r}: a {entry.family} term is labelled by its name {name!r}."
        )
    where = f"Loss term {label!r}" if label == name else f"Loss term {label!r} ({name})"
    knobs = check_knobs(where, raw, entry.knobs, RENAMED.get(name))
    return Term(label, entry, MappingProxyType(knobs))


def parse_options(options: Mapping | None) -> tuple[dict, Term]:
    """``config.loss_options`` -> (options with defaults, the selection rule as a Term)."""
    opts = check_knobs("loss_options", options or {}, OPTIONS, RENAMED["loss_options"])
    sel = to_dict(opts["selection"] or {"kind": "none"})
    kind = sel.pop("kind", "none")
    if kind not in SELECTIONS:
        raise ValueError(
            f"loss_options.selection.kind={kind!r}: choose one of {tuple(SELECTIONS)}."
        )
    where = f"loss_options.selection (kind={kind!r})"
    knobs = check_knobs(where, sel, SELECTIONS[kind].knobs)
    opts["selection"] = dict(knobs, kind=kind)
    return opts, Term(kind, SELECTIONS[kind], MappingProxyType(knobs))


def parse_teacher(teacher: Mapping | None) -> Entry:
    """``config.teacher`` -> its TEACHERS entry, with its knobs checked against that kind's
    knobs (a knob of another kind, e.g. ``decay`` on a cached teacher, names both)."""
    t = to_dict(teacher)
    kind = t.get("kind", "online")
    if kind not in TEACHERS:
        raise ValueError(f"teacher.kind={kind!r}: choose one of {tuple(TEACHERS)}.")
    entry, where = TEACHERS[kind], f"teacher (kind={kind!r})"
    knobs = {k: v for k, v in t.items() if k != "kind"}
    for name in sorted(set(knobs) - set(entry.knobs)):
        owners = [k for k, e in TEACHERS.items() if name in e.knobs]
        if owners:
            raise ValueError(
                f"{where}: {name!r} is a knob of teacher.kind {owners}, not of {kind!r}; "
                f"remove it or change the kind. Valid knobs of {kind!r}: {sorted(entry.knobs)}."
            )
    _unknown(where, set(knobs) - set(entry.knobs), entry.knobs, RENAMED["teacher"])
    for name, value in knobs.items():
        _check_value("teacher", name, entry.knobs[name], value)
    if kind == "cached" and not t.get("cache_dir"):
        raise ValueError("teacher.kind='cached' needs teacher.cache_dir (written by --mode=cache).")
    return entry


def _block_range(n: int | None, side: str) -> str:
    return f"[0, {n if n is not None else 'L_' + side[0]})"


def check_layers(terms, student_layers: int | None, teacher_layers: int | None) -> None:
    """Feature terms' layer knobs against the models' depths L_s, L_t (blocks, after
    ``keep_layers`` and depth pruning), known from the config before any model loads
    (``experiment.checks.loss_spec``); None: that depth is not known, its side is not checked.

    Explicit ``pairs`` are (student_layer, teacher_layer) block indices in [0, L_s) x [0, L_t)
    (``features.layer_map``); ``layers="all"`` needs L_s = L_t; a relation term's
    ``student_layer`` is in [-L_s, L_s) and ``teacher_layer`` in [-L_t, L_t) (an index into the
    per-block q/k/v; negative counts from the last block). Errors name the term, the knob and
    the valid range.
    """
    depth = {"student": student_layers, "teacher": teacher_layers}
    for term in terms:
        where, k = f"Loss term {term.label!r}", term.knobs
        if k.get("pairs") is not None:
            _check_pairs(where, k["pairs"], student_layers, teacher_layers)
        elif k.get("layers") == "all" and _differ(student_layers, teacher_layers):
            raise ValueError(
                f"{where}.layers='all' pairs equal blocks but the student has {student_layers} "
                f"and the teacher {teacher_layers}; use layers='uniform' or explicit pairs."
            )
        for side, n in depth.items():
            value = k.get(f"{side}_layer")
            if value is not None and n is not None and not -n <= value < n:
                raise ValueError(
                    f"{where}.{side}_layer={value}: the {side} has {n} blocks; use an index in "
                    f"[-{n}, {n}) (negative counts from the last block)."
                )


def _differ(a: int | None, b: int | None) -> bool:
    return a is not None and b is not None and a != b


def _check_pairs(where: str, pairs, student_layers, teacher_layers) -> None:
    valid = f"{_block_range(student_layers, 'student')} x {_block_range(teacher_layers, 'teacher')}"
    if not pairs:
        raise ValueError(f"{where}.pairs is empty; give (student_layer, teacher_layer) pairs.")
    for i, pair in enumerate(pairs):
        ok = isinstance(pair, list | tuple) and len(pair) == 2
        if not ok or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
            raise ValueError(
                f"{where}.pairs[{i}]={pair!r}: each pair is (student_layer, teacher_layer), two "
                f"block indices in {valid}."
            )
        for value, n in zip(pair, (student_layers, teacher_layers)):
            if n is not None and not 0 <= value < n:
                raise ValueError(
                    f"{where}.pairs[{i}]={tuple(pair)} is outside {valid} (student blocks x "
                    f"teacher blocks); use block indices in that range."
                )


def _has(config, key: str):
    return config.get(key) if hasattr(config, "get") else getattr(config, key, None)


def check_needs(terms, selection: Term, teacher: Entry, config, options: Mapping) -> None:
    """Every term's and the selection rule's ``needs`` met by the config; errors name the fix."""
    data = to_dict(_has(config, "data"))
    have = set(teacher.supplies)
    bridge = bool(_has(config, "bridge"))
    # A cross-tokenizer teacher gives the bridge terms its own-token outputs, the MinED map and
    # both embeddings; it has no distribution over the student's vocabulary.
    have |= {"bridge", "mined_map", "embeddings"} if bridge else set()
    have |= {"reference"} if _has(config, "reference") else set()
    have |= {"pairs"} if data.get("source") == "pairs" else set()
    have |= {"total_steps"} if options.get("total_steps") else set()
    fixes = {
        "teacher": f"teacher.kind={teacher.name!r} gives no teacher distribution; use 'online' "
        "(or another teacher kind), or only teacher-free terms (ce)",
        "hidden_states": f"teacher.kind={teacher.name!r} cannot supply hidden states; use a "
        "teacher that runs a model on the batch: 'online' or 'ema'",
        "qkv": f"teacher.kind={teacher.name!r} cannot supply attention q/k/v; use 'online' or "
        "'ema'",
        "final_hidden": f"teacher.kind={teacher.name!r} cannot supply one model's final hidden "
        "states (its dense logits); use 'online' or 'ema'",
        "bridge": "it needs config.bridge (a cross-tokenizer teacher); set config.bridge",
        "reference": "it needs config.reference (a frozen reference model); set config.reference",
        "pairs": "it needs preference pairs; set config.data.source='pairs' (the pairs.jsonl "
        "that --mode=seqkd writes)",
        "total_steps": "it needs loss_options.total_steps (its linear t schedule; set from "
        "train.steps by the trainer)",
    }
    for term in terms if bridge else ():
        if term.entry.family in ("logit", "feature") and "teacher" in term.entry.needs:
            raise ValueError(
                f"Loss term {term.label!r} compares the teacher and the student on one "
                "tokenization, but config.bridge gives a teacher with another tokenizer; use a "
                "bridge term (alm, uld, mined or dskd; mix them with ce) or drop config.bridge."
            )
    for term in list(terms) + [selection]:
        what = (
            f"loss_options.selection.kind={term.kind!r}"
            if term.entry.family == "selection"
            else f"Loss term {term.label!r}"
        )
        for need in sorted(term.entry.needs - have):
            raise ValueError(f"{what}: {fixes[need]}.")


def validate(config) -> tuple[list[Term], dict, Term]:
    """Check ``config.losses``, ``config.loss_options`` and ``config.teacher`` against the
    registry before anything loads; returns (terms, options, selection).

    ``loss_options.total_steps`` is taken from ``config.train.steps`` when not set; the run's
    blocks (``check_blocks``) are checked first.
    """
    check_blocks(config)
    options = to_dict(_has(config, "loss_options"))
    train = to_dict(_has(config, "train"))
    if options.get("total_steps") is None and train.get("steps"):
        options["total_steps"] = int(train["steps"])
    options, selection = parse_options(options)
    terms = [parse_term(label, raw) for label, raw in to_dict(_has(config, "losses")).items()]
    teacher = parse_teacher(_has(config, "teacher") or {"kind": "none"})
    check_needs(terms, selection, teacher, config, options)
    return terms, options, selection
