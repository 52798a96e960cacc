r"""Calibration statistics for structural transforms: one jitted (optionally sharded) pass.

``calibrate(model, batches)`` runs the model over calibration batches and returns sums from
which every ranking of ``experts``, ``depth`` and ``width`` is derived (METHODS.md 7.1, 7.7, 7.8).
All entries are sums (or maxima) over valid tokens / examples, so two passes over two halves of
the data merge exactly (``merge_stats``) and sharded batches reduce exactly.

Per MoE layer (N valid tokens; X_j = tokens with expert j in their top-k; f_j(x) the expert's
ungated output; g_j(x) its gate renormalised over the selected top-k, REAP's default):

    tokens_per_expert_j = |X_j|           (frequency freq_j = |X_j| / N, sum_j freq_j = k)
    gate_mass_j         = sum_{X_j} g_j
    ean_j               = sum_{X_j} ||f_j(x)||_2                        (EAN; mean = Minitron)
    reap_sum_j          = sum_{X_j} g_j(x) ||f_j(x)||_2                 (REAP = reap_sum / |X_j|)
    max_activation_j    = max_{X_j} max_d |f_j(x)_d|                    (super experts)
    router_gram         = sum_x l(x) l(x)^T  [E, E], l = router logits  (column similarity)
    output_sum          = sum_x f(x)         [E, D] over ALL tokens     (HC-SMoE representation)
    moe_input           = the layer's input rows [N, D] (only with moe_inputs=True: NAEE)

Everything is read from the model's own forward (``Transformer.forward(intermediates=...)``,
reduced per block inside the walk), so the loop and the scanned layouts give the same sums.

Dense parts (Minitron activation importance, a = sqrt(sum over examples of (mean_seq |x|)^2);
each example's mean is over its valid tokens):

    head_sq [L, N]    x = ||attention output of head n before o_proj||_2 per token
    ffn_sq  [L, F]    x = |input of the down projection| (dense FFN layers)
    embed_sq [D]      x = sum over layers of |output of the pre-attention and pre-MLP norms|
    block_cos [L]     sum of cos(h_in, h_out) of each block's residual stream (BI = 1 - mean)

Sources: REAP (Lasby et al., 2025) ``src/reap/pruning_metrics.py``; Minitron (Muralidharan et
al., 2024, arXiv:2407.14679) and NVIDIA Model-Optimizer ``mcore_minitron.py``; ShortGPT's block
influence (Men et al., 2024, arXiv:2403.03853).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distill_jax import sharding
from distill_jax.models.config import ModelConfig
from distill_jax.models.transformer import Transformer

_MAX_KEYS = ("max_activation",)
_CONCAT_KEYS = ("moe_input",)  # per-token rows: merged by concatenation
_MOE_INPUTS = contextvars.ContextVar("calibrate_moe_inputs", default=False)


@contextlib.contextmanager
def collecting_moe_inputs():
    """Inside this context ``calibrate`` also keeps every MoE block's input rows (NAEE's data).

    For callers that reach ``calibrate`` through a ``stats_fn(model)`` they do not write
    (``schedule.apply_once`` under the trainer): the rows are [N, D] float32 on the host per MoE
    block, N valid calibration tokens, so keep the calibration set small for large models.
    """
    token = _MOE_INPUTS.set(True)
    try:
        yield
    finally:
        _MOE_INPUTS.reset(token)


def shape_key(config: ModelConfig) -> dict[str, int]:
    """The model dimensions statistics depend on (checked before statistics are used)."""
    return dict(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        intermediate_size=config.intermediate_size,
        num_experts=config.num_experts,
        num_experts_per_tok=config.num_experts_per_tok,
        experts_per_layer=[config.experts_in(i) for i in range(config.num_layers)],
    )


def check_stats(stats: Mapping, config: ModelConfig) -> None:
    """One clear error when ``stats`` were collected on a model of another shape."""
    want, got = shape_key(config), dict(stats.get("shape", {}))
    if got != want:
        diff = {k: (got.get(k), want[k]) for k in want if got.get(k) != want[k]}
        raise ValueError(
            f"These statistics come from a model of another shape ({{field: (stats, model)}}: "
            f"{diff}); collect them with transforms.calibrate on this model."
        )


def _example_sq(x: jax.Array, w: jax.Array) -> jax.Array:
    """sum over examples of (mean over valid tokens of x)^2: x [B, T, C], w [B, T] -> [C]."""
    n = jnp.maximum(w.sum(1), 1.0)[:, None]
    mean = jnp.einsum("btc,bt->bc", x, w) / n
    has = (w.sum(1) > 0)[:, None]
    return jnp.sum(jnp.where(has, mean * mean, 0.0), axis=0)


# What the statistics read from each block's forward (``models.transformer.BLOCK_INTERMEDIATES``).
_INTERMEDIATES = (
    "input",
    "attn_input",
    "heads",
    "mlp_input",
    "mlp_hidden",
    "router_logits",
    "expert_outputs",
    "output",
)


def _moe_sums(logits, f, w, k) -> dict[str, jax.Array]:
    """logits [B, T, E] float32, f [B, T, E, D] ungated expert outputs, w [B, T] -> the sums."""
    e = logits.shape[-1]
    probs = jax.nn.softmax(logits, axis=-1)
    _, top_idx = jax.lax.top_k(probs, k)
    sel = jax.nn.one_hot(top_idx, e, dtype=jnp.float32).sum(-2)  # [B, T, E] 0/1
    g = probs * sel
    g = g / jnp.sum(g, axis=-1, keepdims=True)
    f = f.astype(jnp.float32)
    norm = jnp.linalg.norm(f, axis=-1)  # [B, T, E]
    ws = sel * w[..., None]
    return {
        "num_tokens": jnp.sum(w),
        "tokens_per_expert": ws.sum((0, 1)),
        "gate_mass": (ws * g).sum((0, 1)),
        "ean": (ws * norm).sum((0, 1)),
        "reap_sum": (ws * g * norm).sum((0, 1)),
        "max_activation": jnp.max(jnp.where(ws > 0, jnp.abs(f).max(-1), 0.0), axis=(0, 1)),
        "router_gram": jnp.einsum("bte,btf,bt->ef", logits, logits, w),
        "output_sum": jnp.einsum("bted,bt->ed", f, w),
    }


def _example_mean(x: jax.Array, w: jax.Array) -> jax.Array:
    """Per example, the mean over valid tokens: x [B, T, C], w [B, T] -> [B, C]."""
    return jnp.einsum("btc,bt->bc", x, w) / jnp.maximum(w.sum(1), 1.0)[:, None]


def _layer_sums(got: dict, w: jax.Array, k: int, moe_inputs: bool) -> dict[str, jax.Array]:
    """One block's sums from its intermediates (runs inside the model's walk, per block); with
    ``moe_inputs`` a MoE block also keeps its input [B, T, D] (``moe_input``)."""
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    heads = jnp.linalg.norm(f32(got["heads"]), axis=-1)  # [B, T, N]
    sums = {
        "head_sq": _example_sq(heads, w),
        # Minitron's embedding-channel activation, summed over layers by the caller.
        "embed_mean": _example_mean(jnp.abs(f32(got["attn_input"])) + jnp.abs(got["mlp_input"]), w),
    }
    if "router_logits" in got:
        sums.update(_moe_sums(got["router_logits"], got["expert_outputs"], w, k))
        if moe_inputs:
            sums["moe_input"] = got["mlp_input"].astype(jnp.float32)
    else:
        sums["ffn_sq"] = _example_sq(jnp.abs(f32(got["mlp_hidden"])), w)
    a, b = f32(got["input"]), f32(got["output"])
    cos = jnp.sum(a * b, -1) / jnp.maximum(
        jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-12
    )
    sums["block_cos"] = jnp.sum(cos * w)
    return sums


def _batch_stats(graphdef, moe_inputs, params, input_ids, positions, segment_ids):
    """The sums of one batch (the module docstring's table), reduced per block inside the
    model's own forward (loop or scan layout)."""
    model = nnx.merge(graphdef, params)
    w = (segment_ids != 0).astype(jnp.float32)
    out = model.forward(
        input_ids,
        positions=positions,
        segment_ids=segment_ids,
        compute_logits=False,
        intermediates=_INTERMEDIATES,
        reduce_intermediates=lambda got: _layer_sums(
            got, w, model.config.num_experts_per_tok, moe_inputs
        ),
    )
    layers = [dict(layer) for layer in out.intermediates]
    embed_mean = sum(layer.pop("embed_mean") for layer in layers)  # [B, D]
    has = (w.sum(1) > 0)[:, None]
    return {
        "num_tokens": jnp.sum(w),
        "num_examples": jnp.sum(w.sum(1) > 0).astype(jnp.float32),
        "embed_sq": jnp.sum(jnp.where(has, embed_mean * embed_mean, 0.0), axis=0),
        "layers": layers,
        "hidden": out.hidden,
    }


def merge_stats(a: Mapping, b: Mapping) -> dict:
    """Statistics of the union of two calibration sets (sums add, maxima take the max)."""
    if a["shape"] != b["shape"]:
        raise ValueError(f"Cannot merge statistics of shapes {a['shape']} and {b['shape']}.")

    def one(x, y, key):
        if isinstance(x, Mapping):
            return {k: one(x[k], y[k], k) for k in x}
        if isinstance(x, list | tuple):
            return [one(u, v, key) for u, v in zip(x, y)]
        if key in _CONCAT_KEYS:
            return np.concatenate([x, y])
        return np.maximum(x, y) if key in _MAX_KEYS else x + y

    out = {k: one(a[k], b[k], k) for k in a if k != "shape"}
    out["shape"] = dict(a["shape"])
    return out


def _as_batch(batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not isinstance(batch, Mapping):
        batch = {"input_ids": batch}
    ids = np.asarray(batch["input_ids"], np.int32)
    if ids.ndim != 2:
        raise ValueError(f"Calibration input_ids must be [B, T], got shape {ids.shape}.")
    seg = np.asarray(batch.get("segment_ids", np.ones_like(ids)), np.int32)
    pos = batch.get("positions")
    pos = (
        np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape) if pos is None else pos
    )
    return ids, np.asarray(pos, np.int32), seg


def calibrate(
    model: Transformer,
    batches: Iterable,
    *,
    mesh=None,
    rules=sharding.DEFAULT_RULES,
    moe_inputs: bool | None = None,
) -> dict:
    """Sum the statistics of the module docstring over ``batches``.

    Args:
        model: the model to measure (unchanged).
        batches: iterable of [B, T] int token arrays or dicts with ``input_ids`` and optional
            ``segment_ids`` (0 = padding, excluded everywhere) and ``positions``.
        mesh: optional mesh; the parameters are placed by ``rules`` and the batch is split over
            its batch axes (the result equals the unsharded one).
        moe_inputs: also keep every MoE block's input rows over the valid tokens,
            ``moe_input`` [N, D] (NAEE, ``experts.naee_plan``); None: as the enclosing
            ``collecting_moe_inputs()`` says (default off).

    Returns:
        {"shape": shape_key(config), "num_tokens", "num_examples", "embed_sq" [D],
         "layers": per block {"head_sq" [N], "block_cos", and "ffn_sq" [F] (dense) or the MoE
         sums}} as NumPy arrays.
    """
    moe_inputs = _MOE_INPUTS.get() if moe_inputs is None else bool(moe_inputs)
    graphdef, params = nnx.split(model, nnx.Param)
    fn = jax.jit(functools.partial(_batch_stats, graphdef, moe_inputs))
    total = None
    for batch in batches:
        ids, pos, seg = _as_batch(batch)
        args = (params, ids, pos, seg)
        if mesh is not None:
            shardings = sharding.state_shardings(params, mesh, rules)
            bs = sharding.batch_sharding(mesh, rules, shape=ids.shape)
            args = (jax.device_put(params, shardings),) + tuple(
                jax.device_put(a, bs) for a in (ids, pos, seg)
            )
            with sharding.use_mesh(mesh, rules):
                out = fn(*args)
        else:
            out = fn(*args)
        out.pop("hidden")
        out = jax.tree.map(np.asarray, out)
        valid = seg.reshape(-1) != 0
        for layer in out["layers"]:
            if "moe_input" in layer:
                layer["moe_input"] = layer["moe_input"].reshape(-1, layer["moe_input"].shape[-1])[
                    valid
                ]
        out["shape"] = shape_key(model.config)
        total = out if total is None else merge_stats(total, out)
    if total is None:
        raise ValueError("calibrate got no batches; pass at least one [B, T] token array.")
    return total


def calibration_hidden(model: Transformer, input_ids, positions=None, segment_ids=None):
    """The final hidden states of the statistics pass (equal to ``model.forward``'s)."""
    graphdef, params = nnx.split(model, nnx.Param)
    ids, pos, seg = _as_batch(
        dict(input_ids=input_ids, positions=positions, segment_ids=segment_ids)
        if positions is not None or segment_ids is not None
        else input_ids
    )
    fn = jax.jit(functools.partial(_batch_stats, graphdef, False))
    return fn(params, ids, pos, seg)["hidden"]


# ------------------------------------------------------------------------------ derived scores


def expert_scores(stats: Mapping, criterion: str) -> list[np.ndarray]:
    """Per MoE layer, [E_l] scores, higher = more important.

    criterion: "frequency" (|X_j| / N), "gate_mass", "ean" (sum of output norms), "reap"
    (mean over routed tokens of g ||f||), "output_norm" (mean ||f|| over routed tokens),
    "max_activation".
    """
    rows = []
    for layer in stats["layers"]:
        if "tokens_per_expert" not in layer:
            continue
        cnt = layer["tokens_per_expert"]
        safe = np.maximum(cnt, 1.0)
        rows.append(
            {
                "frequency": cnt / max(float(layer["num_tokens"]), 1.0),
                "gate_mass": layer["gate_mass"],
                "ean": layer["ean"],
                "reap": np.where(cnt > 0, layer["reap_sum"] / safe, 0.0),
                "output_norm": np.where(cnt > 0, layer["ean"] / safe, 0.0),
                "max_activation": layer["max_activation"],
            }.get(criterion)
        )
    if rows and rows[0] is None:
        raise ValueError(
            f"Unknown expert criterion {criterion!r}; use one of frequency, gate_mass, ean, "
            "reap, output_norm, max_activation (or naee via transforms.naee_plan)."
        )
    return [np.asarray(r, np.float64) for r in rows]


def block_importance(stats: Mapping) -> np.ndarray:
    """[L] BI_l = 1 - mean over valid tokens of cos(h_in, h_out) (ShortGPT / Minitron depth)."""
    n = max(float(stats["num_tokens"]), 1.0)
    return np.array([1.0 - float(layer["block_cos"]) / n for layer in stats["layers"]])


def head_importance(stats: Mapping) -> np.ndarray:
    """[L, N] Minitron head importance sqrt(sum over examples (mean_seq ||head out||)^2)."""
    return np.sqrt(np.stack([layer["head_sq"] for layer in stats["layers"]]))


def ffn_importance(stats: Mapping) -> np.ndarray:
    """[L, F] Minitron neuron importance of the dense FFN layers."""
    rows = [layer["ffn_sq"] for layer in stats["layers"] if "ffn_sq" in layer]
    if len(rows) != len(stats["layers"]):
        raise ValueError("FFN channel importance needs dense FFN blocks; this model has MoE ones.")
    return np.sqrt(np.stack(rows))


def embed_importance(stats: Mapping) -> np.ndarray:
    """[D] Minitron embedding-channel importance (pre-attention and pre-MLP norm outputs)."""
    return np.sqrt(np.asarray(stats["embed_sq"]))


def router_similarity(stats: Mapping) -> list[np.ndarray]:
    """Per MoE layer [E, E] cosine similarity of router-logit columns over calibration tokens."""
    out = []
    for layer in stats["layers"]:
        if "router_gram" in layer:
            g = np.asarray(layer["router_gram"], np.float64)
            d = np.sqrt(np.maximum(np.diag(g), 1e-30))
            out.append(g / d[:, None] / d[None, :])
    return out


def mean_outputs(stats: Mapping) -> list[np.ndarray]:
    """Per MoE layer [E, D] each expert's mean (ungated) output over ALL valid calibration
    tokens: HC-SMoE's expert representation."""
    return [
        np.asarray(layer["output_sum"], np.float64) / max(float(layer["num_tokens"]), 1.0)
        for layer in stats["layers"]
        if "output_sum" in layer
    ]


def output_similarity(stats: Mapping) -> list[np.ndarray]:
    """Per MoE layer [E, E] cosine similarity of mean expert outputs over all tokens (HC-SMoE's
    representation, compared by cosine for MC-SMoE's assignment)."""
    out = []
    for layer in stats["layers"]:
        if "output_sum" in layer:
            m = np.asarray(layer["output_sum"], np.float64)
            m = m / np.maximum(np.linalg.norm(m, axis=-1, keepdims=True), 1e-30)
            out.append(m @ m.T)
    return out
