r"""Structural transforms as index plans, and progressive pruning schedules (METHODS.md 7.10).

Every pruning transform here is split into a *plan* (computed from calibration statistics: which
indices survive; JSON data) and an *application* that only slices. Because the application
depends on the indices alone, the same plan slices the student's parameters, its Adam moments
(``transform_state``: the optimizer state stays aligned with the parameters) and an EMA copy,
and a checkpoint that records the plans applied so far can be restored exactly: the trainer
replays them on the initial model's shapes and restores into the result.

A schedule is a list of stages ``{"step": s, "kind": ..., target}``: after optimizer step s the
student is calibrated, the stage is planned and applied, and the train step is compiled again for
the new shapes. Kinds and targets:

    blocks   keep_layers=n       (depth.rank_blocks: block importance)
    ffn      intermediate_size=F (width.ffn_plan)
    heads    num_heads=N [, num_kv_heads=K]
    embed    hidden_size=D
    experts  keep=E' [, criterion="reap", global_budget=False]  (experts.rank_experts)

``keep`` of an experts stage is an int (per layer), a fraction of each layer's E, a list of ints
(one per MoE block, in order) or {block: int}; ``global_budget=True`` keeps the same total but
distributes it across layers by score. In ``student.prune`` (one-shot) the criterion may also be
"naee": the keep-set that best reconstructs each layer's output (experts.naee_plan_from_stats).

Staged pruning reaches the target shape in steps with distillation in between; SlimQwen reports
that it beats one-shot pruning at equal tokens (arXiv:2605.08738); Minitron advises <= 1/3 of the
parameters per step (Muralidharan et al., 2024, arXiv:2407.14679).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax

from distill_jax.models import scan as scan_lib
from distill_jax.models.config import ModelConfig
from distill_jax.transforms import depth, experts, width

KINDS = ("blocks", "ffn", "heads", "embed", "experts")
# One-shot only (before training): value-dependent transforms whose results are not index plans.
ONCE_KINDS = KINDS + ("moefication", "upcycle", "merge_experts")


def make_plan(stage: Mapping, stats: Mapping, config: ModelConfig, tensor_parallel: int = 1):
    """The index plan of one stage for a model of ``config`` measured by ``stats``."""
    kind = stage.get("kind")
    tp = dict(tensor_parallel=tensor_parallel)
    if kind == "blocks":
        return {"kind": "blocks", "keep": list(depth.rank_blocks(stats, int(stage["keep_layers"])))}
    if kind == "ffn":
        return width.ffn_plan(stats, config, int(stage["intermediate_size"]), **tp)
    if kind == "heads":
        return width.head_plan(
            stats, config, int(stage["num_heads"]), num_kv_heads=stage.get("num_kv_heads"), **tp
        )
    if kind == "embed":
        return width.embed_plan(stats, config, int(stage["hidden_size"]), **tp)
    if kind == "experts":
        criterion = stage.get("criterion", "reap")
        if criterion == "naee":
            raise ValueError(
                "criterion='naee' searches keep-sets on the layers' inputs, which progressive "
                "schedules do not collect: use it in student.prune (one-shot, before training)."
            )
        plan = experts.rank_experts(
            stats,
            _keep(stage["keep"]),
            criterion,
            global_budget=bool(stage.get("global_budget", False)),
        )
        return {"kind": "experts", **{k: plan[k] for k in ("num_experts", "keep", "shape")}}
    raise ValueError(f"Unknown pruning stage kind {kind!r}; use one of {KINDS}.")


def _keep(keep):
    """An experts stage's ``keep`` from a config: int, fraction, list or {block: int}."""
    if isinstance(keep, Mapping):
        return {int(b): int(n) for b, n in keep.items()}
    if isinstance(keep, Sequence) and not isinstance(keep, str):
        return [int(n) for n in keep]
    return keep if isinstance(keep, float) and keep < 1 else int(keep)


def apply_plan(tree: dict, config: ModelConfig, plan: Mapping) -> tuple[dict, ModelConfig]:
    """Slice a parameter-shaped tree by an index plan; returns (tree, new config).

    A stacked tree (``config.scan_layers``) is sliced per layer and stacked again when the new
    blocks still repeat (else it stays per layer, with a warning: ``models.scan``).
    """
    scan = config.scan_layers
    tree = scan_lib.unstack_params(tree, config)
    tree, new_config = _apply_plan(tree, config.replace(scan_layers=False), plan)
    new_config = new_config.replace(scan_layers=scan)
    if scan:
        scan_lib.scannable(new_config)  # says so when the pruned blocks no longer repeat
    return scan_lib.stack_params(tree, new_config), new_config


def _apply_plan(tree: dict, config: ModelConfig, plan: Mapping) -> tuple[dict, ModelConfig]:
    kind = plan["kind"]
    if kind == "blocks":
        return depth.prune_blocks(tree, config, [int(i) for i in plan["keep"]])
    if kind in ("ffn", "heads", "embed"):
        return width.apply_width(tree, config, plan)
    if kind == "experts":
        return experts.prune_experts(tree, config, plan)
    raise ValueError(f"Unknown plan kind {kind!r}; use one of {KINDS}.")


def _is_student_slot(x) -> bool:
    return isinstance(x, dict) and "student" in x and "loss" in x


def transform_state(state, config: ModelConfig, plan: Mapping):
    """(TrainState with the student's parameters, every parameter-shaped optimizer slot and the
    EMA sliced by ``plan``, new student config). Step, rng and loss state are unchanged."""
    new_config = None

    def slot(x):
        nonlocal new_config
        if _is_student_slot(x):
            tree, new_config = apply_plan(x["student"], config, plan)
            return {**x, "student": tree}
        return x

    params = slot(state.params)
    opt_state = jax.tree.map(slot, state.opt_state, is_leaf=_is_student_slot)
    ema = apply_plan(state.ema, config, plan)[0] if state.ema is not None else None
    return state.replace(params=params, opt_state=opt_state, ema=ema), new_config


def apply_once(model, stage: Mapping, stats_fn, tensor_parallel: int = 1):
    """One stage of ``config.student.prune`` (before distillation) on a model: the plan kinds
    (``experts`` also with criterion="naee", knob ``max_subsets``), and ``moefication`` /
    ``upcycle`` (num_experts, top_k) and ``merge_experts`` (keep, grouping, criterion,
    similarity, preserve_fraction, router, align). ``stats_fn(model)`` calibrates."""
    from distill_jax.transforms import moefy, params
    from distill_jax.transforms import stats as stats_lib

    kind = stage.get("kind")
    p, config = params.to_params(model)
    if kind == "moefication":
        return params.to_model(
            *moefy.moefication(p, config, int(stage["num_experts"]), int(stage["top_k"]))
        )
    if kind == "upcycle":
        return params.to_model(
            *moefy.upcycle(p, config, int(stage["num_experts"]), int(stage["top_k"]))
        )
    if kind == "experts" and stage.get("criterion") == "naee":
        if stage.get("global_budget"):
            raise ValueError(
                "criterion='naee' searches each layer's keep-set for its own budget; give keep "
                "as an int or per-layer list, or use a scored criterion with global_budget."
            )
        with stats_lib.collecting_moe_inputs():  # NAEE reads every MoE block's inputs
            stats = stats_fn(model)
        plan = experts.naee_plan_from_stats(
            model, stats, _keep(stage["keep"]), max_subsets=int(stage.get("max_subsets", 2000))
        )
        return params.to_model(*experts.prune_experts(p, config, plan))
    stats = stats_fn(model)
    if kind == "merge_experts":
        grouping = stage.get("grouping", "mc_smoe")
        plan = experts.plan_merge(
            stats,
            _keep(stage["keep"]),
            grouping=grouping,
            criterion=stage.get("criterion", "frequency"),
            similarity=stage.get("similarity", "router_logits"),
            preserve_fraction=float(stage.get("preserve_fraction", 0.0)),
        )
        # HC-SMoE averages the members as they are; MC-SMoE aligns their hidden units first.
        align = bool(stage.get("align", grouping != "hc_smoe"))
        return params.to_model(
            *experts.merge_experts(
                p, config, plan, align=align, router=stage.get("router", "dominant")
            )
        )
    if kind not in KINDS:
        raise ValueError(f"student.prune kind {kind!r}: use one of {ONCE_KINDS}.")
    return params.to_model(*apply_plan(p, config, make_plan(stage, stats, config, tensor_parallel)))


def check_schedule(stages: Sequence[Mapping], total_steps: int) -> list[dict]:
    """Validate a schedule before anything is built: kinds, increasing steps inside the run."""
    out, last = [], 0
    for i, stage in enumerate(stages):
        stage = dict(stage)
        if stage.get("kind") not in KINDS:
            raise ValueError(f"prune_schedule[{i}].kind={stage.get('kind')!r}: use one of {KINDS}.")
        if stage.get("kind") == "experts" and stage.get("criterion") == "naee":
            raise ValueError(
                f"prune_schedule[{i}]: criterion='naee' is one-shot (it needs the layers' "
                "inputs); put the stage in student.prune."
            )
        step = int(stage.get("step", -1))
        if not last < step < total_steps:
            raise ValueError(
                f"prune_schedule[{i}].step={step}: stages need increasing steps in "
                f"(0, train.steps={total_steps}); give each stage a later step than the last."
            )
        last = step
        out.append(stage)
    return out


def replay(state_shapes, config: ModelConfig, plans: Sequence[Mapping]):
    """Abstract state and config after ``plans`` (for restoring a checkpoint taken after them)."""
    for plan in plans:
        new = []

        def run(s, p=plan, c=config, out=new):
            state, cfg = transform_state(s, c, p)
            out.append(cfg)
            return state

        state_shapes = jax.eval_shape(run, state_shapes)
        config = new[0]
    return state_shapes, config
