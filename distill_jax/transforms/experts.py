r"""MoE expert pruning and merging as plan + apply (METHODS.md 7.2-7.6).

A *plan* is small printable data computed from calibration statistics (``stats.calibrate``);
applying it to ``(params, config)`` (``params.to_params``) returns new ``(params, config)``:

    plan = rank_experts(stats, keep=4, criterion="reap")     # {"keep": {layer: experts}, ...}
    params, config = prune_experts(params, config, plan)

Pruning keeps, in every MoE layer, the ``keep`` experts with the highest score (frequency, gate
mass, EAN, REAP, output norm, max activation; ``naee_plan`` searches for the keep-set that
best reconstructs each layer's output on calibration tokens, Lu et al., 2024, "Not All Experts
are Equal", ACL) and slices the router's columns and the experts' leading axis. Tokens whose
top-k avoided the pruned experts keep their outputs exactly when the kept gates do not depend
on the pruned logits: ``norm_topk_prob=True`` (Mixtral, Qwen3-MoE). With softmax over all E and
no renormalisation (Qwen2-MoE) the kept gates grow: the router's normaliser lost the pruned
terms (REAP, Lasby et al., 2025; vLLM llm-compressor's REAP modifier).

Merging groups experts and averages each group with frequency weights, W = sum_i f_i W_i /
sum_i f_i for gate, up and down, after aligning every member's SwiGLU hidden units to the group's
dominant expert (a permutation found by the Hungarian algorithm on weight distances; REAP's
``permute.py``, MC-SMoE, Li et al., 2024, "Merge, Then Compress", ICLR). Grouping, ``plan_merge``:
"mc_smoe", dominant experts are the highest-ranked and every other expert joins its most similar
dominant by router-logit column cosine (MC-SMoE) or mean-output cosine; "hc_smoe", average-linkage
hierarchical clustering of the experts' mean outputs over all calibration tokens (HC-SMoE, Chen
et al., 2025, ICML), merged without alignment in ``student.prune`` as the paper does. Partial
preservation (SlimQwen, arXiv:2605.08738): the top ``preserve_fraction`` of
the budget stays bitwise intact and only the rest is merged. Router semantics, explicitly:

* ``router="dominant"``: E' experts remain; a merged expert is routed by its dominant's router
  column (the others' columns are dropped). Real compression; routing changes where a token
  had chosen two members of one group.
* ``router="tie"``: all E router columns and expert slots remain and every member slot holds its
  group's merged weights (REAP's "tie"): a token choosing two members gets their gates added on
  the merged expert. Same parameter count, exportable, no routing change.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from distill_jax.models import moe as moe_lib
from distill_jax.models.config import ModelConfig
from distill_jax.models.transformer import to_looped
from distill_jax.transforms import stats as stats_lib
from distill_jax.transforms.params import moe_layers

_EXPERT_KEYS = ("gate_proj", "up_proj", "down_proj")


def _budget(keep, num_experts: int, top_k: int) -> int:
    """Experts to keep per layer from an int or a fraction of E; at least top_k, at most E."""
    n = int(round(keep * num_experts)) if isinstance(keep, float) and keep < 1 else int(keep)
    if n < top_k:
        raise ValueError(
            f"Keeping {n} experts per layer is fewer than num_experts_per_tok={top_k}: every "
            f"token routes to {top_k} experts. Keep at least {top_k} (or lower the top-k first)."
        )
    if n > num_experts:
        raise ValueError(f"Cannot keep {n} experts per layer: the model has {num_experts}.")
    return n


def _check_moe(config: ModelConfig) -> tuple[int, ...]:
    layers = moe_layers(config)
    if not layers:
        raise ValueError(f"{config.family} model has no MoE layers; expert transforms need one.")
    return layers


def _layer_budgets(keep, sizes: Mapping[int, int], top_k: int, scores, global_budget: bool):
    """{block: experts to keep} from ``keep``: an int, a fraction, {block: int}, or a list of
    ints in MoE-block order."""
    if isinstance(keep, Sequence) and not isinstance(keep, str):
        if len(keep) != len(sizes):
            raise ValueError(
                f"keep lists {len(keep)} budgets; the model has {len(sizes)} MoE blocks "
                f"{sorted(sizes)}: give one per MoE block, in order."
            )
        keep = dict(zip(sorted(sizes), keep))
    if isinstance(keep, Mapping):
        keep = {int(b): n for b, n in keep.items()}
        if sorted(keep) != sorted(sizes):
            raise ValueError(
                f"keep lists blocks {sorted(keep)}; the MoE blocks are {sorted(sizes)}."
            )
        return {b: _budget(keep[b], sizes[b], top_k) for b in sizes}
    per = {b: _budget(keep, e, top_k) for b, e in sizes.items()}
    if not global_budget:
        return per
    if scores is None:
        raise ValueError("A global expert budget needs per-expert scores (rank_experts).")
    # One threshold for all layers: every layer keeps its top_k, the rest of the total budget
    # goes to the highest scores overall, each layer's scores divided by its mean first.
    total = sum(per.values())
    pool = []
    for (b, e), row in zip(sizes.items(), scores):
        order = np.lexsort((np.arange(e), -row))
        norm = row / max(float(np.mean(row)), 1e-30)
        pool += [(-norm[j], b, int(j)) for j in order[top_k:]]
    out = {b: top_k for b in sizes}
    for _, b, _ in sorted(pool)[: total - top_k * len(sizes)]:
        out[b] += 1
    return out


def rank_experts(stats: Mapping, keep, criterion: str = "reap", *, global_budget=False) -> dict:
    """A pruning plan keeping the highest-scoring experts of every MoE layer.

    Args:
        stats: ``transforms.calibrate`` output of the model to prune.
        keep: experts per layer (int), a fraction of each layer's E (float < 1), or per-layer
            budgets {block: int}.
        criterion: a ``stats.expert_scores`` criterion; ties keep the lower index.
        global_budget: with an int or fraction, keep the same total but let layers differ:
            every layer keeps its top_k, the remaining budget goes to the highest scores
            overall (each layer's scores divided by their mean); non-uniform budgets.

    Returns:
        {"criterion", "num_experts": [E_l per block], "top_k", "shape",
         "keep": {block index: sorted kept expert indices}, "scores": {block: [E_l] scores}}.
    """
    shape = stats["shape"]
    k = shape["num_experts_per_tok"]
    if not shape["num_experts"]:
        raise ValueError("These statistics are of a dense model; expert plans need an MoE model.")
    blocks = [i for i, layer in enumerate(stats["layers"]) if "tokens_per_expert" in layer]
    sizes = {b: len(stats["layers"][b]["tokens_per_expert"]) for b in blocks}
    scores = stats_lib.expert_scores(stats, criterion)
    budgets = _layer_budgets(keep, sizes, k, scores, global_budget)
    kept = {}
    for row, block in zip(scores, blocks):
        order = np.lexsort((np.arange(len(row)), -row))  # score descending, then index ascending
        kept[block] = tuple(sorted(int(j) for j in order[: budgets[block]]))
    return {
        "criterion": criterion,
        "num_experts": [sizes[b] for b in blocks],
        "top_k": k,
        "shape": dict(shape),
        "keep": kept,
        "scores": {b: [round(float(s), 6) for s in row] for b, row in zip(blocks, scores)},
    }


def _with_expert_counts(config: ModelConfig, counts: Mapping[int, int]) -> ModelConfig:
    """``config`` whose MoE block b has counts[b] experts (one num_experts when all agree)."""
    values = set(counts.values())
    if len(values) == 1:
        return config.replace(num_experts=values.pop(), experts_per_layer=())
    per = tuple(counts.get(i, 0) for i in range(config.num_layers))
    return config.replace(num_experts=max(per), experts_per_layer=per)


def _check_plan(plan: Mapping, config: ModelConfig) -> list[tuple[int, tuple[int, ...]]]:
    layers = _check_moe(config)
    if plan.get("shape") is not None:
        stats_lib.check_stats({"shape": plan["shape"]}, config)
    keep = {int(b): tuple(int(j) for j in v) for b, v in plan["keep"].items()}
    if sorted(keep) != list(layers):
        raise ValueError(f"The plan covers blocks {sorted(keep)}; the MoE blocks are {layers}.")
    for b, v in keep.items():
        e = config.experts_in(b)
        _budget(len(v), e, config.num_experts_per_tok)
        if len(set(v)) != len(v) or min(v) < 0 or max(v) >= e:
            raise ValueError(f"Block {b}: kept experts {v} must be distinct indices < {e}.")
    return sorted(keep.items())


def prune_experts(params: dict, config: ModelConfig, plan: Mapping) -> tuple[dict, ModelConfig]:
    """Keep ``plan["keep"][block]`` experts of every MoE block: router columns and the leading
    expert axis of gate/up [E, D, F] and down [E, F, D] are sliced in sorted order; shared
    experts, attention and dense blocks are unchanged. Different counts per layer give a config
    with ``experts_per_layer`` (runs and trains; transformers cannot load it). ``params`` is
    not modified."""
    out = {**params, "layers": dict(params["layers"])}
    keep = _check_plan(plan, config)
    for block, kept in keep:
        idx = np.asarray(sorted(kept))
        mlp = dict(out["layers"][block]["mlp"])
        mlp["router"] = jnp.asarray(mlp["router"])[:, idx]
        for name in _EXPERT_KEYS:
            mlp[name] = jnp.asarray(mlp[name])[idx]
        out["layers"][block] = {**out["layers"][block], "mlp": mlp}
    return out, _with_expert_counts(config, {b: len(v) for b, v in keep})


# ------------------------------------------------------------------------------------- NAEE


def _routed_output(logits, outputs, allowed, k, normalize):
    """MoE output (routed part) with experts outside ``allowed`` [E] bool removed and tokens
    re-routed among the rest: logits [N, E], outputs [N, E, D] -> [N, D]."""
    masked = jnp.where(allowed, logits, -jnp.inf)
    combine, _ = moe_lib.route(masked[None], k, normalize)
    return jnp.einsum("ne,ned->nd", combine[0], outputs)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _subset_errors(logits, outputs, full, masks, k, normalize):
    """||Z - Z_S||_F for each keep-set mask [S, E] -> [S]."""
    z = jax.vmap(lambda a: _routed_output(logits, outputs, a, k, normalize))(masks)
    return jnp.sqrt(jnp.sum((z - full[None]) ** 2, axis=(1, 2)))


def naee_plan(model, batches, keep, *, max_subsets: int = 2000) -> dict:
    """NAEE plan from calibration batches: ``naee_plan_from_stats`` of
    ``stats.calibrate(model, batches, moe_inputs=True)``."""
    return naee_plan_from_stats(
        model, stats_lib.calibrate(model, batches, moe_inputs=True), keep, max_subsets=max_subsets
    )


def naee_plan_from_stats(model, stats: Mapping, keep, *, max_subsets: int = 2000) -> dict:
    """NAEE plan: per MoE layer, the keep-set minimising ||Z - Z_S||_F on calibration tokens.

    Lu et al., 2024, "Not All Experts are Equal" (ACL), layer-wise expert pruning. Z is the
    layer's routed output with all experts, Z_S with only the experts in S (the dropped logits
    set to -inf and tokens re-routed). Every keep-set is tried when there are at most
    ``max_subsets`` of them (C(E, keep)); otherwise experts are removed greedily, one at a time,
    each time the one whose removal raises the error least. Layer inputs are the unpruned
    model's (``moe_input`` of ``stats.calibrate(..., moe_inputs=True)``: the paper's
    ``layerwise_pruning``; its ``progressive_pruning`` recomputes them after each layer).

    Args:
        model: the model ``stats`` were collected on.
        stats: ``calibrate`` output with ``moe_input`` rows for every MoE block.
        keep: experts per layer (int), a fraction of E (float < 1), per-layer budgets (a list
            in MoE-block order or {block: int}).
        max_subsets: the exhaustive search's limit.

    Returns:
        {"criterion": "naee", "num_experts", "top_k", "shape", "keep": {block: kept experts},
         "errors": {block: ||Z - Z_S||_F of the kept set}}.
    """
    model = to_looped(model)  # blocks addressed one by one
    c = model.config
    blocks = _check_moe(c)
    stats_lib.check_stats(stats, c)
    if any("moe_input" not in stats["layers"][b] for b in blocks):
        raise ValueError(
            "NAEE needs every MoE block's inputs: collect the statistics with "
            "calibrate(..., moe_inputs=True) (or inside stats.collecting_moe_inputs())."
        )
    k, norm = c.num_experts_per_tok, c.norm_topk_prob
    sizes = {b: c.experts_in(b) for b in blocks}
    budgets = _layer_budgets(keep, sizes, k, None, False)
    kept, errs = {}, {}
    for block in blocks:
        mlp = model.layers[block].mlp
        x = jnp.asarray(stats["layers"][block]["moe_input"], c.dtype)[None]  # [1, N, D]
        logits = mlp.router_logits(x)[0]
        outs = mlp.expert_outputs(x)[0].astype(jnp.float32)
        e, n = sizes[block], budgets[block]
        full = _routed_output(logits, outs, jnp.ones(e, bool), k, norm)
        errors = lambda masks, lg=logits, o=outs, z=full: np.asarray(
            _subset_errors(lg, o, z, jnp.asarray(masks), k, norm)
        )
        if math.comb(e, n) <= max_subsets:
            subsets = list(itertools.combinations(range(e), n))
            masks = np.zeros((len(subsets), e), bool)
            for i, sub in enumerate(subsets):
                masks[i, list(sub)] = True
            err = errors(masks)
            kept[block] = tuple(subsets[int(np.argmin(err))])
            errs[block] = float(np.min(err))
        else:
            alive = list(range(e))
            while len(alive) > n:
                masks = np.zeros((len(alive), e), bool)
                for i, drop in enumerate(alive):
                    masks[i, [j for j in alive if j != drop]] = True
                err = errors(masks)
                alive.remove(alive[int(np.argmin(err))])
                errs[block] = float(np.min(err))
            errs.setdefault(block, 0.0)
            kept[block] = tuple(alive)
    return {
        "criterion": "naee",
        "num_experts": [sizes[b] for b in blocks],
        "top_k": k,
        "shape": stats_lib.shape_key(c),
        "keep": kept,
        "errors": {b: round(v, 6) for b, v in errs.items()},
    }


def _moe_inputs(model, batches) -> dict[int, jax.Array]:
    """{MoE block: [N, D] inputs of its MoE FFN over the valid calibration tokens}, read from
    the model's own forward (``calibrate(..., moe_inputs=True)``)."""
    stats = stats_lib.calibrate(model, batches, moe_inputs=True)
    return {
        i: jnp.asarray(layer["moe_input"])
        for i, layer in enumerate(stats["layers"])
        if "moe_input" in layer
    }


# ---------------------------------------------------------------------------------- merging


def align_expert(ref: Mapping, other: Mapping) -> tuple[dict, np.ndarray]:
    """Permute ``other``'s hidden units to match ``ref``'s (METHODS.md 7.5).

    Args:
        ref, other: {"gate_proj": [D, F], "up_proj": [D, F], "down_proj": [F, D]}.

    Returns:
        (other with gate/up columns and down rows permuted, perm [F]) minimising
        sum_m ||g_ref[:, m] - g[:, perm m]||^2 + ||u_ref[:, m] - u[:, perm m]||^2
        + ||d_ref[m] - d[perm m]||^2 (an exact assignment problem; the expert's function is
        unchanged by the permutation).
    """
    g0, u0, d0 = (np.asarray(ref[k], np.float64) for k in _EXPERT_KEYS)
    g1, u1, d1 = (np.asarray(other[k], np.float64) for k in _EXPERT_KEYS)

    def sq(a, b):  # [F, X], [F, X] -> [F, F] squared distances of rows
        return (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T

    cost = sq(g0.T, g1.T) + sq(u0.T, u1.T) + sq(d0, d1)
    _, perm = scipy.optimize.linear_sum_assignment(cost)
    out = {
        "gate_proj": jnp.asarray(other["gate_proj"])[:, perm],
        "up_proj": jnp.asarray(other["up_proj"])[:, perm],
        "down_proj": jnp.asarray(other["down_proj"])[perm],
    }
    return out, perm


MERGE_GROUPINGS = ("mc_smoe", "hc_smoe")


def average_linkage(points, n_clusters: int) -> list[list[int]]:
    """Agglomerative clustering of the rows of ``points`` [M, X] into ``n_clusters`` with
    average linkage (UPGMA) on Euclidean distances: repeatedly merge the two clusters with the
    smallest mean pairwise distance between their members (ties: the pair of lowest first
    members). Same merges as ``scipy.cluster.hierarchy.linkage(points, "average")``.

    Returns:
        The clusters as sorted member lists, ordered by their first member.
    """
    x = np.asarray(points, np.float64)
    m = len(x)
    if not 1 <= n_clusters <= m:
        raise ValueError(f"Cannot cluster {m} points into {n_clusters} clusters.")
    d = np.sqrt(np.sum((x[:, None] - x[None]) ** 2, axis=-1))  # [M, M]
    clusters = [[i] for i in range(m)]
    while len(clusters) > n_clusters:
        best = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                dist = d[np.ix_(clusters[a], clusters[b])].mean()
                if best is None or dist < best[0]:
                    best = (dist, a, b)
        _, a, b = best
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
    return sorted(clusters)


def _hc_smoe_groups(rest: list[int], n: int, means: np.ndarray) -> list[list[int]]:
    """HC-SMoE: ``rest`` clustered into n groups by average linkage on the experts' mean
    outputs; each group's dominant (listed first: its router column and alignment reference) is
    the member nearest the group's mean representation."""
    if n == 0:
        return []
    out = []
    for members in average_linkage(means[rest], n):
        group = [rest[i] for i in members]
        centre = means[group].mean(0)
        dom = group[int(np.argmin(np.linalg.norm(means[group] - centre, axis=-1)))]
        out.append([dom] + [j for j in group if j != dom])
    return out


def _mc_smoe_groups(rest: list[int], n: int, sim: np.ndarray) -> list[list[int]]:
    """MC-SMoE: the first n of ``rest`` (ranked) are dominants; every other expert joins the
    dominant it is most similar to."""
    dominants = rest[:n]
    members = {d: [d] for d in dominants}
    if dominants:
        for j in rest[n:]:
            best = max(dominants, key=lambda d: (sim[j, d], -d))
            members[best].append(j)
    return [members[d] for d in dominants]


def plan_merge(
    stats: Mapping,
    keep,
    *,
    grouping: str = "mc_smoe",
    criterion: str = "frequency",
    similarity: str = "router_logits",
    preserve_fraction: float = 0.0,
) -> dict:
    """A merging plan: per MoE layer, ``keep`` groups of experts.

    The top round(preserve_fraction * keep) experts by ``criterion`` are singleton groups
    (preserved intact); the others are grouped into the remaining budget by ``grouping``:

    * "mc_smoe" (MC-SMoE, Li et al., 2024): the next-ranked experts are the dominants and every
      other expert joins the dominant it is most similar to (``similarity``: "router_logits",
      MC-SMoE's router-logit columns, or "outputs", cosine of the mean expert outputs).
    * "hc_smoe" (HC-SMoE, Chen et al., 2025, ICML; wazenmai/HC-SMoE ``clustering.py``): each
      expert is represented by its mean output over all calibration tokens and the experts are
      clustered by average-linkage hierarchical clustering (Euclidean) into the budget; the
      dominant of a group is the member nearest its mean representation. ``similarity`` is
      not used.

    Both merge each group with frequency weights (``merge_experts``). preserve_fraction = 1 is
    pruning by the ranking; 0 is pure merging.

    Returns:
        {"num_experts", "top_k", "shape", "groups": {block: [[dominant, member, ...], ...]},
         "weights": {block: [E] frequencies}, ...}.
    """
    if not 0.0 <= preserve_fraction <= 1.0:
        raise ValueError(f"preserve_fraction={preserve_fraction} must be in [0, 1].")
    if grouping not in MERGE_GROUPINGS:
        raise ValueError(f"grouping={grouping!r}: use one of {MERGE_GROUPINGS}.")
    shape = stats["shape"]
    k = shape["num_experts_per_tok"]
    if not shape["num_experts"]:
        raise ValueError("These statistics are of a dense model; expert plans need an MoE model.")
    scores = stats_lib.expert_scores(stats, criterion)
    freqs = stats_lib.expert_scores(stats, "frequency")
    sims = {
        "router_logits": stats_lib.router_similarity,
        "outputs": stats_lib.output_similarity,
    }.get(similarity)
    if sims is None:
        raise ValueError(f"similarity={similarity!r}: use 'router_logits' or 'outputs'.")
    sims = sims(stats) if grouping == "mc_smoe" else stats_lib.mean_outputs(stats)
    blocks = [i for i, layer in enumerate(stats["layers"]) if "tokens_per_expert" in layer]
    groups, weights = {}, {}
    sizes = {b: len(stats["layers"][b]["tokens_per_expert"]) for b in blocks}
    budgets = _layer_budgets(keep, sizes, k, scores, False)
    for row, freq, sim, block in zip(scores, freqs, sims, blocks):
        e, n = sizes[block], budgets[block]
        n_keep = int(round(preserve_fraction * n))
        order = [int(j) for j in np.lexsort((np.arange(e), -row))]
        preserved, rest = order[:n_keep], order[n_keep:]
        make = _mc_smoe_groups if grouping == "mc_smoe" else _hc_smoe_groups
        layer_groups = [[p] for p in preserved] + make(rest, n - n_keep, sim)
        groups[block] = sorted(layer_groups, key=lambda g: g[0])
        weights[block] = [float(f) for f in freq]
    return {
        "grouping": grouping,
        "criterion": criterion,
        "similarity": similarity if grouping == "mc_smoe" else "mean_outputs",
        "preserve_fraction": preserve_fraction,
        "num_experts": [sizes[b] for b in blocks],
        "top_k": k,
        "shape": dict(shape),
        "groups": groups,
        "weights": weights,
    }


def _merge_group(experts: Mapping, group, weights, align: bool) -> dict:
    """Frequency-weighted average of the group's experts, aligned to its first (dominant)."""
    d = group[0]
    ref = {k: experts[k][d] for k in _EXPERT_KEYS}
    if len(group) == 1:
        return ref
    w = np.asarray([weights[j] for j in group], np.float64)
    w = w / w.sum() if w.sum() > 0 else np.full(len(group), 1.0 / len(group))
    acc = {k: np.asarray(ref[k], np.float64) * w[0] for k in _EXPERT_KEYS}
    for wi, j in zip(w[1:], group[1:]):
        other = {k: experts[k][j] for k in _EXPERT_KEYS}
        if align:
            other, _ = align_expert(ref, other)
        for k in _EXPERT_KEYS:
            acc[k] += wi * np.asarray(other[k], np.float64)
    return {k: jnp.asarray(acc[k], experts[k].dtype) for k in _EXPERT_KEYS}


def merge_experts(
    params: dict,
    config: ModelConfig,
    plan: Mapping,
    *,
    align: bool = True,
    router: str = "dominant",
) -> tuple[dict, ModelConfig]:
    """Merge every group of ``plan`` (``plan_merge``) into one expert (module docstring).

    Args:
        align: permutation-align members to the dominant before averaging.
        router: "dominant" (E' = number of groups experts, each routed by its dominant's
            column) or "tie" (E slots kept, members share the merged weights).
    """
    if router not in ("dominant", "tie"):
        raise ValueError(f"router={router!r}: use 'dominant' or 'tie'.")
    blocks = _check_moe(config)
    stats_lib.check_stats({"shape": plan["shape"]}, config)
    groups = {  # slots in the order of each group's dominant (first) expert
        int(b): sorted(([int(j) for j in g] for g in v), key=lambda g: g[0])
        for b, v in plan["groups"].items()
    }
    if sorted(groups) != list(blocks):
        raise ValueError(f"The plan covers blocks {sorted(groups)}; the MoE blocks are {blocks}.")
    out = {**params, "layers": dict(params["layers"])}
    counts = {}
    for block, layer_groups in groups.items():
        mlp = dict(out["layers"][block]["mlp"])
        experts = {k: jnp.asarray(mlp[k]) for k in _EXPERT_KEYS}
        merged = [_merge_group(experts, g, plan["weights"][block], align) for g in layer_groups]
        if router == "dominant":
            _budget(len(layer_groups), config.experts_in(block), config.num_experts_per_tok)
            counts[block] = len(layer_groups)
            for k in _EXPERT_KEYS:
                mlp[k] = jnp.stack([m[k] for m in merged])
            mlp["router"] = jnp.asarray(mlp["router"])[:, [g[0] for g in layer_groups]]
        else:
            covered = sorted(j for g in layer_groups for j in g)
            if covered != list(range(config.experts_in(block))):
                raise ValueError(
                    f"router='tie' keeps every expert slot, so every expert must be in a group; "
                    f"block {block} groups cover {covered}. Use router='dominant' to drop experts."
                )
            for k in _EXPERT_KEYS:
                slots = list(experts[k])
                for g, m in zip(layer_groups, merged):
                    for j in g:
                        slots[j] = m[k]
                mlp[k] = jnp.stack(slots)
        out["layers"][block] = {**out["layers"][block], "mlp": mlp}
    if router == "tie":
        return out, config
    return out, _with_expert_counts(config, counts)
