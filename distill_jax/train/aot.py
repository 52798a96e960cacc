r"""``--mode=compile``: the real train step compiled for a TPU topology, on any machine.

    python -m distill_jax.main --config configs/pod/llama8b_to_llama1b_v5e64.py --workdir DIR \
        --mode=compile [--topology=v5e-64] [--num_slices=2]

``experiment.compile.compile_check(config, topology)`` builds teacher and student abstractly
(``nnx.eval_shape``: no weights, data or tokenizer files; the architecture comes from each
block's ``config`` or its checkpoint's config.json / GGUF metadata), then ``compile_abstract``
lowers the step that ``train`` runs: the same ``train.build.build_step`` (teacher inside the
step, fused loss, optimizer, donation, micro-batches, remat) on a mesh of compile-only devices
of the topology (``topologies``), and compiles it with the TPU compiler (libtpu). A
cross-tokenizer teacher gets word-start masks of the right shapes (constants of the step; see
``experiment.build_teacher``); batch shapes come from ``data.seq_len``, ``bridge.teacher_len``
and ``data.global_batch_size``. With no tokenizer read, the step has no vocabulary mask: when
a tokenizer has fewer ids than the model has rows, the trainer's program differs by one [V]
select.

The report (``report_markdown``; DIR/compile_report.md and .json), all per chip:

* memory: each argument's bytes from its shard shape under its sharding, by category (student
  parameters, optimizer state, teacher parameters, other state, batch), checked against XLA's
  ``argument_size_in_bytes``; outputs that do not alias a donated input, temporaries and the
  program from ``memory_analysis()``; their total against the chip's HBM;
* FLOPs per step: the analytic model count (``model_flops``: 6 N_s T_s + 2 N_t T_t with N the
  weights a token multiplies by, plus causal attention) and XLA's ``cost_analysis`` flops, which
  count a while loop's body once;
* collectives by kind from the optimized HLO (``train/hlo.py``: loop bodies times their trip
  counts), the heaviest with the JAX operation behind each, and the largest temporaries;
* a roofline estimate: step time = max(compute, HBM traffic, ICI traffic) at the chip's published
  peaks (``topologies.CHIPS``) and the MFU it implies; HBM traffic is ``hlo.hbm_bytes`` (the
  operands and results of every top-level op of the optimized HLO, loop bodies times their trip
  counts; XLA's own "bytes accessed" counts a loop body once and is reported beside it).

A program that does not fit raises ``DoesNotFitError`` with one message naming the largest
arguments and temporaries and what to change; main.py exits non-zero with it.
"""

from __future__ import annotations

import json
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distill_jax import teachers, topologies
from distill_jax.models.config import ModelConfig
from distill_jax.train import hlo
from distill_jax.train import step as step_lib

GiB = topologies.GiB
_PRIVILEGED = teachers.SelfTeacher.FIELDS
STATE_CATEGORIES = {"student": "student parameters", "opt_state": "optimizer state"}


class DoesNotFitError(RuntimeError):
    """The step needs more memory per chip than the topology's chips have."""


# ------------------------------------------------------------------------------ building


def abstract_batch(c, shape: tuple[int, int], shardings: dict) -> dict:
    """ShapeDtypeStructs of a step batch: [B, L] int32 token fields (bool loss masks), a
    bridge's teacher fields [B, U] (U = bridge.teacher_len), privileged prompts [B, K, L], the
    rejected side of preference pairs [B, L] (``data.source="pairs"``)."""
    b, length = shape
    pairs = step_lib.PAIR_FIELDS if c.data.get("source") == "pairs" else ()
    shapes = {k: (b, length) for k in step_lib.BATCH_FIELDS + pairs}
    if c.get("bridge"):
        u = int(c.bridge.teacher_len)
        tokenizer_fields = teachers.CrossTokenizerTeacher.FIELDS + ("teacher_chunk",)
        shapes.update({k: (b, u) for k in tokenizer_fields})
        shapes.update(student_chunk=(b, length), dropped_bytes=(b,))
    if c.get("onpolicy") and c.data.get("privileged_contexts"):  # a self-teacher's K prompts
        shapes.update({k: (b, int(c.data.privileged_contexts), length) for k in _PRIVILEGED})
    return {
        k: jax.ShapeDtypeStruct(
            s, jnp.bool_ if k.endswith("loss_mask") else jnp.int32, sharding=shardings[k]
        )
        for k, s in shapes.items()
    }


def teacher_configs(teacher) -> list[ModelConfig]:
    """The ModelConfig of every model the teacher runs forward in the step."""
    if teacher is None or teacher.kind == "cached":
        return []
    if isinstance(teacher, teachers.WithReference):
        ref = nnx.merge(teacher.reference_graphdef, nnx.State(teacher.params()["reference"]))
        return teacher_configs(teacher.inner) + [ref.config]
    if hasattr(teacher, "graphdefs"):  # ensemble / composite
        return [
            nnx.merge(g, nnx.State(p)).config for g, p in zip(teacher.graphdefs, teacher.params())
        ]
    return [teacher.config]


# ------------------------------------------------------------------------------- memory


def per_chip_bytes(x) -> int:
    """Bytes one chip holds of a ShapeDtypeStruct under its sharding (its shard shape)."""
    shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    return math.prod(shard) * np.dtype(x.dtype).itemsize


def argument_bytes(args: tuple) -> tuple[dict[str, int], list[tuple[int, str, str]]]:
    """({category: per-chip bytes}, [(bytes, path, "dtype[shape] spec")] of every argument).

    Categories: student parameters, optimizer state, teacher parameters, batch, and other state
    (loss projectors and controllers, step, rng, an EMA teacher).
    """
    totals: dict[str, int] = {}
    leaves = []
    for i, (what, tree) in enumerate(zip(("state", "teacher", "batch"), args)):
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            keys = [str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path]
            if i == 0:
                category = next(
                    (STATE_CATEGORIES[k] for k in keys if k in STATE_CATEGORIES), "other state"
                )
            else:
                category = "teacher parameters" if i == 1 else "batch"
            size = per_chip_bytes(x)
            totals[category] = totals.get(category, 0) + size
            spec = tuple(x.sharding.spec) if x.sharding is not None else ()
            described = f"{jnp.dtype(x.dtype).name}{list(x.shape)} sharded {spec}"
            leaves.append((size, "/".join([what, *keys]), described))
    leaves.sort(key=lambda t: -t[0])
    return totals, leaves


# -------------------------------------------------------------------------------- FLOPs


def matmul_weights_per_token(cfg: ModelConfig) -> float:
    """N: the weights one token multiplies by in a forward pass (attention projections, the
    MLP or the router and its top-k experts, the LM head); embedding lookups are not matmuls."""
    d, h = cfg.hidden_size, cfg.head_dim
    attention = 2 * d * h * (cfg.num_heads + cfg.num_kv_heads)  # q, o; k, v
    total = d * cfg.vocab_size
    for i in range(cfg.num_layers):
        total += attention
        if cfg.is_moe(i):
            total += (
                d * cfg.experts_in(i) + cfg.num_experts_per_tok * 3 * d * cfg.moe_intermediate_size
            )
            if cfg.shared_expert_intermediate_size:
                total += 3 * d * cfg.shared_expert_intermediate_size + d
        else:
            total += 3 * d * cfg.intermediate_size
    return float(total)


def attention_flops_per_token(cfg: ModelConfig, length: int) -> float:
    """QK^T and AV of one token, causal: 4 N H x (keys it sees, averaged over positions; at
    most ``sliding_window`` on sliding layers)."""
    total = 0.0
    for i in range(cfg.num_layers):
        w = min(cfg.sliding_window or length, length) if cfg.is_sliding(i) else length
        visible = (w * (w + 1) / 2 + (length - w) * w) / length
        total += 4 * cfg.num_heads * cfg.head_dim * visible
    return total


def model_flops(facts: dict) -> dict[str, float]:
    """Model FLOPs per step (no rematerialisation): student 3 x forward (forward + backward),
    each teacher one forward; forward per token = 2 N + attention."""
    b, length = facts["shape"]
    tb, tl = facts.get("teacher_shape", facts["shape"])
    s = facts["student"]
    student = (
        3 * (2 * matmul_weights_per_token(s) + attention_flops_per_token(s, length)) * b * length
    )
    teacher = sum(
        (2 * matmul_weights_per_token(t) + attention_flops_per_token(t, tl)) * tb * tl
        for t in facts["teachers"]
    )
    return {"student": student, "teacher": teacher, "total": student + teacher}


# ------------------------------------------------------------------------------ compile


def compile_abstract(c, topo, mesh, built, args, facts, hlo_path=None, t0=None) -> dict:
    """Compile the abstract build of ``c``'s step (``experiment.compile.build_abstract``) for
    the topology ``topo`` and return the report (``report_markdown``).

    Args:
        c: the experiment config (the report's settings: micro-batches, remat).
        topo: ``topologies.parse``'s topology whose devices ``mesh`` holds.
        mesh, built, args, facts: ``build_abstract``'s results.
        hlo_path: where to write the optimized HLO text (per chip), if anywhere.
        t0: ``time.perf_counter()`` when the build started (the report's lowering time).

    Raises:
        DoesNotFitError: the arguments alone, or the compiled program, exceed a chip's HBM.
    """
    t0 = time.perf_counter() if t0 is None else t0
    categories, leaves = argument_bytes(args)
    hbm = topo.chip.hbm_bytes
    if sum(categories.values()) > hbm:
        raise DoesNotFitError(_does_not_fit(topo, categories, leaves, sum(categories.values())))
    lowered = built.jitted.lower(*args)
    t1 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # Unpartitioned HLO: global shapes, but the operations that made the largest values.
        values = hlo.largest_buffers(_unpartitioned_hlo(lowered))
        values = [(b, f"{s} (global)", o) for b, s, o in values]
        message = _does_not_fit(topo, categories, leaves, None, str(e), values)
        raise DoesNotFitError(message) from None
    t2 = time.perf_counter()
    text = compiled.as_text()
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(text)
    report = _report(c, topo, mesh, facts, categories, compiled, text)
    report["seconds"] = {"lower": t1 - t0, "compile": t2 - t1}
    if report["memory"]["total"] > hbm:
        big = [(b, s, o) for b, s, o in hlo.largest_buffers(text)]
        raise DoesNotFitError(
            _does_not_fit(topo, categories, leaves, report["memory"]["total"], temporaries=big)
        )
    return report


def _unpartitioned_hlo(lowered) -> str:
    """HLO text of the lowered step with op-name metadata (before XLA partitions it)."""
    computation = lowered.compiler_ir("hlo")
    try:
        from jaxlib import _hlo

        options = _hlo.HloPrintOptions.short_parsable()
        options.print_metadata = True
        return computation.get_hlo_module().to_string(options)
    except (ImportError, AttributeError):  # another jaxlib: shapes without op names
        return computation.as_hlo_text()


def _report(c, topo, mesh, facts, categories, compiled, text) -> dict:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = {k: categories.get(k, 0) for k in _ARGUMENT_CATEGORIES}
    memory["outputs not aliased"] = max(mem.output_size_in_bytes - mem.alias_size_in_bytes, 0)
    memory["temporaries"] = mem.temp_size_in_bytes
    memory["program"] = mem.generated_code_size_in_bytes
    memory["total"] = sum(memory.values())
    ops, unknown = hlo.collectives(text, topo.num_chips)
    loops = [k for k in re.findall(r"\bwhile\(", text)]
    flops = model_flops(facts)
    n = topo.num_chips
    remat = c.train.get("remat", False) in (True, "full")
    hardware = (flops["student"] * (4 / 3 if remat else 1) + flops["teacher"]) / n
    xla_flops = float(cost.get("flops", 0.0))
    collective = hlo.bytes_by_kind(ops)
    chip = topo.chip
    hbm_traffic, _ = hlo.hbm_bytes(text)
    times = {
        "compute": max(hardware, xla_flops) / chip.bf16_flops,
        "hbm": hbm_traffic / chip.hbm_bytes_per_s,
        "collectives": sum(v["traffic"] for v in collective.values()) / chip.ici_bytes_per_s,
    }
    step_s = max(times.values())
    b, length = facts["shape"]
    heavy = sorted(ops, key=lambda op: -op.bytes * op.count)[:5]
    return {
        "topology": topo.describe(),
        "chip": topo.chip.generation,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "batch": [b, length],
        "micro_batches": int(c.train.get("micro_batches", 1)),
        "remat": c.train.get("remat", False),
        "hbm_per_chip": chip.hbm_bytes,
        "memory": memory,
        "xla_argument_bytes": mem.argument_size_in_bytes,
        "flops": {
            **{f"model_{k}": v for k, v in flops.items()},
            "model_per_chip": flops["total"] / n,
            "hardware_estimate_per_chip": hardware,
            "xla_per_chip": xla_flops,
            "xla_bytes_accessed_per_chip": float(cost.get("bytes accessed", 0.0)),
            "hbm_bytes_per_chip": hbm_traffic,
            "while_loops": len(loops),
        },
        "collectives": collective,
        "unknown_trip_counts": unknown,
        "top_collectives": [
            {"kind": op.kind, "bytes": op.bytes, "count": op.count, "op_name": op.op_name}
            for op in heavy
        ],
        "largest_buffers": [
            {"bytes": b, "shape": shape, "op_name": name}
            for b, shape, name in hlo.largest_buffers(text, 5)
        ],
        "roofline_seconds": {**times, "step": step_s},
        "mfu": flops["total"] / n / (step_s * chip.bf16_flops) if step_s else 0.0,
        "tokens_per_second": b * length / step_s if step_s else 0.0,
    }


# ------------------------------------------------------------------------------- errors

_ADVICE = {
    "teacher parameters": "keep the teacher in bfloat16 (teacher.param_dtype='bfloat16'), shard "
    "it over more chips (a larger fsdp or tensor axis in config.mesh, or teacher.rules) or use a "
    "larger topology",
    "student parameters": "shard the student over more chips (larger fsdp or tensor axes in "
    "config.mesh) or use a larger topology",
    "temporaries": "turn on train.remat, raise train.micro_batches, or lower "
    "data.global_batch_size or data.seq_len",
}
_ADVICE["optimizer state"] = _ADVICE["student parameters"]
_ADVICE["batch"] = "lower data.global_batch_size or data.seq_len"


def _gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


def _does_not_fit(topo, categories, leaves, total=None, compiler_message="", temporaries=()) -> str:
    """One message: what is needed, the largest buffers, and what to change.

    Args:
        topo: the ``Topology``.
        categories, leaves: ``argument_bytes``.
        total: bytes per chip the compiled program needs, when known.
        compiler_message: XLA's RESOURCE_EXHAUSTED error, when compilation failed.
        temporaries: [(bytes, shape, op name)] of the largest values (``hlo.largest_buffers``).
    """
    hbm = _gib(topo.chip.hbm_bytes)
    parts = [f"The train step does not fit on {topo.describe()} with {hbm} of HBM per chip"]
    if total:
        parts[0] += f": it needs {_gib(total)} per chip"
    if compiler_message:
        first = compiler_message.strip().splitlines()[0].replace("RESOURCE_EXHAUSTED: ", "")
        parts.append(f"XLA: {first.strip().rstrip('.')}")
    arguments = sum(categories.values())
    ranked = sorted(categories.items(), key=lambda kv: -kv[1])
    shown = ", ".join(f"{k} {_gib(v)}" for k, v in ranked if v >= 0.005 * GiB)
    parts.append(f"arguments {_gib(arguments)} per chip" + (f" ({shown})" if shown else ""))
    if arguments >= 0.1 * topo.chip.hbm_bytes:
        top = ", ".join(f"{path} {_gib(b)} ({what})" for b, path, what in leaves[:3])
        parts.append(f"largest arguments: {top}")
    allocations = _compiler_allocations(compiler_message)
    if allocations:
        parts.append(f"largest temporaries (XLA): {allocations}")
    if temporaries and not allocations:
        big = ", ".join(f"{s} {_gib(b)} from {o or '?'}" for b, s, o in temporaries)
        parts.append(f"largest temporaries: {big}")
    worst = ranked[0][0] if ranked else "temporaries"
    if compiler_message or (total and total - arguments > arguments):
        worst = "temporaries"
    parts.append(f"to fit, {_ADVICE.get(worst, _ADVICE['temporaries'])}")
    return "; ".join(parts) + "."


def _compiler_allocations(message: str, n: int = 3) -> str:
    """The compiler's own list of its largest allocations (when its message has one)."""
    lines = message.splitlines()
    start = next((i for i, ln in enumerate(lines) if "argest program allocations" in ln), None)
    if start is None:
        return ""
    keep = [ln.strip() for ln in lines[start + 1 :] if re.search(r"Size:|Shape:|op_name", ln)]
    sizes = [i for i, ln in enumerate(keep) if "Size:" in ln]
    cut = sizes[n] if len(sizes) > n else len(keep)
    return " ".join(keep[:cut])


# ------------------------------------------------------------------------------- report


def report_markdown(report: dict, config_name: str = "") -> str:
    """The report as markdown tables (what main.py prints and writes to compile_report.md)."""
    m, f, r = report["memory"], report["flops"], report["roofline_seconds"]
    hbm = report["hbm_per_chip"]
    b, length = report["batch"]
    mesh = ", ".join(f"{k} {v}" for k, v in report["mesh"].items())
    seconds = report.get("seconds", {})
    lines = [
        f"### {config_name or 'train step'} on {report['topology']}",
        "",
        f"mesh ({mesh}); batch {b} x {length} = {b * length:,} tokens per step; micro_batches "
        f"{report['micro_batches']}; remat {report['remat']}; lowered in "
        f"{seconds.get('lower', 0):.1f} s, compiled in {seconds.get('compile', 0):.1f} s.",
        "",
        "| memory per chip | GiB | of HBM |",
        "|---|---:|---:|",
    ]
    for key, value in m.items():
        name = f"**{key}**" if key == "total" else key
        lines.append(f"| {name} | {value / GiB:.3f} | {100 * value / hbm:.1f} % |")
    args = sum(v for k, v in m.items() if k in _ARGUMENT_CATEGORIES)
    xla = report["xla_argument_bytes"]
    lines += [
        f"| HBM of a {report['chip']} chip | {hbm / GiB:.3f} | |",
        "",
        f"Arguments from shard shapes: {args / GiB:.3f} GiB; XLA argument_size_in_bytes: "
        f"{xla / GiB:.3f} GiB ({100 * (args - xla) / max(xla, 1):+.1f} %).",
        "",
        "| FLOPs per step | value |",
        "|---|---:|",
        f"| model FLOPs, analytic (student 3 x fwd, teacher fwd; causal attention) | "
        f"{f['model_total']:.3e} |",
        f"| of which student | {f['model_student']:.3e} |",
        f"| of which teacher | {f['model_teacher']:.3e} |",
        f"| model FLOPs per chip | {f['model_per_chip']:.3e} |",
        f"| hardware estimate per chip (with remat recompute) | "
        f"{f['hardware_estimate_per_chip']:.3e} |",
        f"| XLA cost_analysis flops per chip (each of {f['while_loops']} while-loop bodies "
        f"counted once) | {f['xla_per_chip']:.3e} |",
        "",
        "| collectives per chip per step (loop bodies x trip count) | ops | GiB | link GiB |",
        "|---|---:|---:|---:|",
    ]
    for kind, v in report["collectives"].items():
        lines.append(f"| {kind} | {v['ops']} | {v['bytes'] / GiB:.3f} | {v['traffic'] / GiB:.3f} |")
    for op in report.get("top_collectives", [])[:3]:
        total = op["bytes"] * op["count"]
        lines.append(
            f"| largest: {op['kind']} {op['bytes'] / GiB:.3f} GiB x {op['count']} from "
            f"`{_short(op['op_name'])}` | | {total / GiB:.3f} | |"
        )
    if report["unknown_trip_counts"]:
        lines.append(
            f"| loops of unknown trip count (counted once) | "
            f"{len(report['unknown_trip_counts'])} | | |"
        )
    lines += ["", "| largest temporaries per chip | GiB |", "|---|---:|"]
    for buf in report.get("largest_buffers", [])[:3]:
        lines.append(
            f"| {buf['shape']} from `{_short(buf['op_name'])}` | {buf['bytes'] / GiB:.3f} |"
        )
    lines += [
        "",
        "| roofline per step | seconds |",
        "|---|---:|",
        f"| compute (max of hardware estimate and XLA flops, at peak bf16) | {r['compute']:.4f} |",
        f"| HBM ({f['hbm_bytes_per_chip'] / GiB:,.1f} GiB moved: operands and results of the "
        f"top-level ops, loop bodies x trip count) | {r['hbm']:.4f} |",
        f"| collectives (link bytes / ICI bandwidth) | {r['collectives']:.4f} |",
        f"| **step time estimate** (the max) | {r['step']:.4f} |",
        f"| MFU at that step time (an upper bound: perfect overlap, no latency) | "
        f"{100 * report['mfu']:.1f} % |",
        f"| tokens per second (whole topology) | {report['tokens_per_second']:,.0f} |",
    ]
    return "\n".join(lines)


def _short(op_name: str, keep: int = 70) -> str:
    """An HLO op_name without the jit/while/closed_call wrappers, at most ``keep`` characters."""
    name = re.sub(r"(jit\(\w+\)|while|body|closed_call|cond|checkpoint)/", "", op_name or "?")
    return name if len(name) <= keep else "..." + name[-keep:]


_ARGUMENT_CATEGORIES = (
    "student parameters",
    "optimizer state",
    "teacher parameters",
    "other state",
    "batch",
)


def write_report(report: dict, workdir: str, config_name: str = "") -> str:
    """DIR/compile_report.json and .md; returns the markdown."""
    os.makedirs(workdir, exist_ok=True)
    text = report_markdown(report, config_name)
    with open(os.path.join(workdir, "compile_report.json"), "w") as f:
        json.dump({"config": config_name, **report}, f, indent=1, default=str)
    with open(os.path.join(workdir, "compile_report.md"), "w") as f:
        f.write(text + "\n")
    return text
