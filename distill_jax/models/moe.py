"""Sparse mixture-of-experts FFN with top-k softmax routing.

Mixtral (Jiang et al., 2024, arXiv:2401.04088): softmax over E router logits, keep the top-k,
renormalise.
Qwen2-MoE / Qwen3-MoE: same, renormalising only when ``norm_topk_prob``; Qwen2-MoE adds a shared
expert whose output is scaled by sigmoid(x w_gate). The load-balancing loss is Switch Transformer's
(Fedus et al., 2021, eqs. 4-6) computed over all MoE layers at once, as transformers does.

Two ways to compute the same function (``ModelConfig.moe_impl``; "auto" is "grouped" on TPU and
GPU, "dense" on CPU, where XLA lowers ``ragged_dot`` to a masked product over every expert):

* "dense": every expert runs on every token and the combine weights are zero off the top-k. Exact,
  static shapes, sharded by GSPMD; E/k times the FLOPs of the routed computation.
* "grouped" (dropless, as MegaBlocks, Gale et al., 2022, arXiv:2211.15841): the N*k (token, expert)
  assignments are sorted by expert and ``jax.lax.ragged_dot`` runs gate, up and down on each
  expert's contiguous rows; outputs are weighted by the routing weights and summed per token.
  Under ``sharding.use_mesh`` this runs in a ``jax.shard_map`` (``grouped_moe_sharded``) so each
  data shard sorts only its own tokens. Which path runs there (``ShardedLayout.mode``):

  - "local": the experts axis is not sharded (size 1): every device holds all experts, gathers
    the layer's weights (FSDP) and groups its own tokens.
  - "all_to_all" (expert parallelism): the experts are split over mesh axes that also shard the
    batch. Each device sends every assignment to the device owning its expert through a fixed
    [P, C, D] buffer and ``jax.lax.all_to_all``, runs its E/P experts with ragged_dot and sends
    the outputs back with the reverse all-to-all. (``jax.lax.ragged_all_to_all`` would avoid
    the padding but XLA:CPU does not implement it, so it could not be tested here.)
  - "psum": the experts are split over mesh axes that do NOT shard the batch (e.g. a decode batch
    too small to split): tokens are replicated there, each device runs its own experts on all of
    its tokens (the others masked out) and the outputs are summed over those axes.

  The F dimension of the experts stays sharded over the rules' "mlp" axes when they do not shard
  the batch (tensor parallelism); the partial down projections are summed at the end.

Memory of the all-to-all path. P = expert-parallel shards, N_l = tokens per device, E_l = E / P.
Dropless capacity per (source, destination) pair is C = N_l * min(k, E_l) rows (a token's k
experts are distinct, so at most min(k, E_l) of them live on one device). The send and receive
buffers then hold P * C rows of D each, P * min(k, E_l) / k times the N_l * k assignment rows,
and the expert side's ragged_dot runs over those P * C rows (intermediates [P * C, F]). With
``capacity_factor`` c the capacity is C = min(dropless, ceil(c * N_l * k / P)); assignments past
it are dropped (padding tokens' first), their output is zero, and the count of dropped
assignments of valid tokens is reported as ``dropped_assignments`` in the router statistics.

On CPU, XLA lowers ragged_dot to a masked dense product over all groups, so "grouped" is exact
there but not faster; the savings are on TPU (native ragged dot) and GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from distill_jax.models.layers import activation, param
from distill_jax.models.mlp import MLP
from distill_jax.sharding import Rules, current_mesh, current_platform, shard

# ----------------------------------------------------------------------------- routing


def top_k_weights(router_logits: jax.Array, k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """Top-k softmax routing weights: w = top-k of softmax(logits), / sum(w) when ``normalize``.

    Args:
        router_logits: [..., E] float32.
        k: experts per token.
        normalize: divide the kept probabilities by their sum.

    Returns:
        (weights [..., k] float32, top_idx [..., k] int32), in decreasing weight order.
    """
    probs = jax.nn.softmax(router_logits, axis=-1)
    top_p, top_idx = jax.lax.top_k(probs, k)
    if normalize:
        top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    return top_p, top_idx


def route(router_logits: jax.Array, k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """Top-k softmax routing as a dense combine matrix.

    Args:
        router_logits: [B, T, E] float32.
        k: experts per token.
        normalize: divide the kept probabilities by their sum.

    Returns:
        (combine [B, T, E] float32 with k non-zeros per token, top_idx [B, T, k] int32).
    """
    top_p, top_idx = top_k_weights(router_logits, k, normalize)
    onehot = jax.nn.one_hot(top_idx, router_logits.shape[-1], dtype=jnp.float32)  # [B, T, k, E]
    return jnp.einsum("btke,btk->bte", onehot, top_p), top_idx


def router_stats(router_logits, top_idx, combine, valid) -> dict[str, jax.Array]:
    """Per-layer sums over valid tokens (divide at logging time; sums stay exact across shards).

    Returns:
        tokens_per_expert [E] (top-k assignments), gate_mass [E] (sum of combine weights),
        router_prob_sum [E] (sum of full softmax probabilities), num_tokens [] (valid tokens).
    """
    e = router_logits.shape[-1]
    w = valid.astype(jnp.float32)
    onehot = jax.nn.one_hot(top_idx, e, dtype=jnp.float32).sum(-2)  # [B, T, E]
    probs = jax.nn.softmax(router_logits, axis=-1)
    return {
        "tokens_per_expert": jnp.einsum("bte,bt->e", onehot, w),
        "gate_mass": jnp.einsum("bte,bt->e", combine, w),
        "router_prob_sum": jnp.einsum("bte,bt->e", probs, w),
        "num_tokens": jnp.sum(w),
    }


def load_balancing_loss(stats: list[dict[str, jax.Array]]) -> jax.Array:
    """E * sum_e f_e * P_e over all MoE layers' tokens (Switch Transformer; transformers' form).

    f_e = top-k assignments to e / rows and P_e = mean router probability of e, both taken over
    the concatenation of every MoE layer's valid tokens; so sum_e f_e = k. Layers with different
    numbers of experts (after non-uniform pruning) cannot be concatenated: then the loss is the
    mean over layers of each layer's E_l * sum_e f_e P_e.
    """
    sizes = {s["tokens_per_expert"].shape[0] for s in stats}
    if len(sizes) > 1:
        return sum(load_balancing_loss([s]) for s in stats) / len(stats)
    num_experts = sizes.pop()
    rows = sum(s["num_tokens"] for s in stats)
    f = sum(s["tokens_per_expert"] for s in stats) / rows
    p = sum(s["router_prob_sum"] for s in stats) / rows
    return num_experts * jnp.sum(f * p)


# ----------------------------------------------------------------------------- grouped compute


def grouped_ffn(x, rows, groups, experts, act: str) -> jax.Array:
    """Each row's expert FFN, down_g(act(x W_gate_g) * (x W_up_g)), by grouped matmuls.

    Rows are sorted by group so each expert's rows are contiguous, ``jax.lax.ragged_dot`` runs
    the three projections with the per-group row counts, and the outputs are put back in order.

    Args:
        x: [M, D] source rows.
        rows: [R] int, the row of ``x`` each assignment reads.
        groups: [R] int in [0, G]: the expert of each assignment; G means none (output zero).
        experts: (w_gate [G, D, F], w_up [G, D, F], w_down [G, F, D]) in x's dtype.
        act: activation name (``layers.activation``).

    Returns:
        [R, D] in x's dtype.
    """
    w_gate, w_up, w_down = experts
    g = w_gate.shape[0]
    order = jnp.argsort(groups)  # [R] stable: rows of one group keep their order
    sizes = jnp.bincount(groups, length=g).astype(jnp.int32)  # [G]; the sentinel G is dropped
    xs = x[rows[order]]  # [R, D] grouped by expert
    # 16-bit operands: products are exact in float32 accumulation at any precision, and TPU's
    # ragged-dot kernel fails to compile for bf16 at "highest" (a global default in tests).
    precision = jax.lax.Precision.DEFAULT if x.dtype.itemsize < 4 else None
    dot = functools.partial(jax.lax.ragged_dot, group_sizes=sizes, precision=precision)
    gate, up = dot(xs, w_gate), dot(xs, w_up)  # [R, F]
    ys = dot(activation(act)(gate) * up, w_down)  # [R, D]
    ys = jnp.where((groups[order] < g)[:, None], ys, 0)  # rows past the groups are undefined
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    return ys[inverse]


def _combine(outputs: jax.Array, weights: jax.Array) -> jax.Array:
    """y_n = sum_j w_nj * out_nj in float32: outputs [N, k, D], weights [N, k] -> [N, D]."""
    return jnp.einsum("nkd,nk->nd", outputs.astype(jnp.float32), weights)


def grouped_moe(x, top_idx, weights, experts, act: str, first_expert=0) -> jax.Array:
    """Routed MoE output sum_j w_nj * FFN_{e_nj}(x_n) over the experts held here.

    Args:
        x: [N, D].
        top_idx: [N, k] int, global expert ids.
        weights: [N, k] float32 routing weights.
        experts: (w_gate, w_up [E_l, D, F], w_down [E_l, F, D]): experts first_expert ..
            first_expert + E_l - 1.
        act: activation name.
        first_expert: global id of the first expert held here (int or traced scalar); the
            assignments to other experts contribute zero.

    Returns:
        [N, D] float32.
    """
    n, k = top_idx.shape
    g = experts[0].shape[0]
    local = top_idx.reshape(-1) - first_expert  # [N*k]
    local = jnp.where((local >= 0) & (local < g), local, g)
    rows = jnp.arange(n * k, dtype=jnp.int32) // k
    out = grouped_ffn(x, rows, local, experts, act)  # [N*k, D]
    return _combine(out.reshape(n, k, -1), weights)


def dropless_capacity(tokens: int, k: int, local_experts: int) -> int:
    """Rows one device may send another with nothing dropped: tokens * min(k, E_l)."""
    return tokens * min(k, local_experts)


def expert_parallel_moe(
    x, top_idx, weights, valid, experts, act: str, axes, capacity: int
) -> tuple[jax.Array, jax.Array]:
    """Routed MoE output with experts split over ``axes`` and all-to-all dispatch (in shard_map).

    Device p of the P devices along ``axes`` holds experts p*E_l .. (p+1)*E_l - 1. Assignments
    are sorted by destination (valid tokens first), packed into a [P, C] buffer (slot (p, c) is
    the c-th assignment for device p), exchanged with ``all_to_all``, computed by ``grouped_ffn``
    on the local experts and returned by the reverse ``all_to_all``.

    Args:
        x: [N, D] this device's tokens.
        top_idx: [N, k] int global expert ids; weights: [N, k] float32; valid: [N] bool.
        experts: (w_gate, w_up [E_l, D, F], w_down [E_l, F, D]): this device's experts.
        act: activation name.
        axes: the mesh axes the experts are split over (all of them also split the batch).
        capacity: C, rows per (source, destination) pair; ``dropless_capacity`` drops nothing.

    Returns:
        ([N, D] float32, number of dropped assignments of valid tokens [] int32).
    """
    n, k = top_idx.shape
    el, d = experts[0].shape[0], x.shape[-1]
    p = jax.lax.axis_size(axes)
    a = n * k
    expert = top_idx.reshape(-1)  # [A]
    dest = expert // el  # [A]
    padding = jnp.repeat(~valid, k)  # [A]
    order = jnp.argsort(dest * 2 + padding)  # [A] by destination, valid tokens first
    counts = jnp.bincount(dest, length=p)  # [P]
    starts = jnp.cumsum(counts) - counts  # [P]
    slot = jnp.arange(capacity)  # [C]
    filled = slot[None] < counts[:, None]  # [P, C]
    src = order[jnp.minimum(starts[:, None] + slot[None], a - 1)]  # [P, C] assignment ids
    send_x = jnp.where(filled[..., None], x[src // k], 0)  # [P, C, D]
    send_e = jnp.where(filled, expert[src] % el, el)  # [P, C] local expert at the destination
    recv_x = jax.lax.all_to_all(send_x, axes, 0, 0, tiled=True)  # [P, C, D] by source
    recv_e = jax.lax.all_to_all(send_e, axes, 0, 0, tiled=True)
    rows = jnp.arange(p * capacity, dtype=jnp.int32)
    out = grouped_ffn(recv_x.reshape(-1, d), rows, recv_e.reshape(-1), experts, act)
    back = jax.lax.all_to_all(out.reshape(p, capacity, d), axes, 0, 0, tiled=True)  # by dest
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(a, dtype=order.dtype)) - starts[dest]
    kept = rank < capacity  # [A]
    out = jnp.where(kept[:, None], back[dest, jnp.minimum(rank, capacity - 1)], 0)  # [A, D]
    dropped = jnp.sum(~kept & ~padding).astype(jnp.int32)
    return _combine(out.reshape(n, k, d), weights), dropped


# ----------------------------------------------------------------------------- sharded layout


def _rule_axes(mesh, rules: Rules, name: str) -> tuple[str, ...]:
    """Mesh axes the rules map logical axis ``name`` to, restricted to the mesh."""
    target = dict(rules).get(name)
    axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    return tuple(a for a in axes if a in mesh.shape)


def _size(mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in axes)


@dataclasses.dataclass(frozen=True)
class ShardedLayout:
    """How ``grouped_moe_sharded`` lays one MoE layer out on a mesh.

    batch: mesh axes splitting the batch (the rules' "batch" axes, longest prefix dividing B).
    experts: mesh axes (size > 1) splitting the experts (the rules' "experts" axes).
    mlp: mesh axes (size > 1) splitting F (the rules' "mlp" axes not used by batch or experts).
    mode: "local", "all_to_all" or "psum" (module docstring).
    """

    batch: tuple[str, ...]
    experts: tuple[str, ...]
    mlp: tuple[str, ...]
    mode: str


def sharded_layout(mesh, rules: Rules, batch: int, num_experts: int, ffn: int) -> ShardedLayout:
    """The layout of a [B, T, D] MoE input with ``num_experts`` experts of width ``ffn``.

    Raises:
        ValueError: the expert axes do not divide the experts, or shard the batch only partly.
    """
    batch_axes = _rule_axes(mesh, rules, "batch")
    while batch % _size(mesh, batch_axes):
        batch_axes = batch_axes[:-1]
    experts = tuple(a for a in _rule_axes(mesh, rules, "experts") if mesh.shape[a] > 1)
    if num_experts % _size(mesh, experts):
        raise ValueError(
            f"{num_experts} experts cannot be split over mesh axes {experts} of size "
            f"{_size(mesh, experts)}; change the mesh or the rules' 'experts' entry."
        )
    used = set(batch_axes) | set(experts)
    mlp = tuple(a for a in _rule_axes(mesh, rules, "mlp") if a not in used and mesh.shape[a] > 1)
    if ffn % _size(mesh, mlp):
        mlp = ()
    overlap = set(experts) & set(batch_axes)
    if not experts:
        mode = "local"
    elif overlap == set(experts):
        mode = "all_to_all"
    elif not overlap:
        mode = "psum"
    else:
        raise ValueError(
            f"The experts are split over {experts} but the batch only over {batch_axes}; expert "
            "parallelism needs every expert axis to split the batch too (or none of them)."
        )
    return ShardedLayout(batch_axes, experts, mlp, mode)


def grouped_moe_sharded(
    x, top_idx, weights, valid, experts, act: str, mesh, rules: Rules, capacity_factor=None
) -> tuple[jax.Array, jax.Array]:
    """``grouped_moe`` on a mesh: each data shard groups its own tokens (``jax.shard_map``).

    Args:
        x: [B, T, D]; top_idx: [B, T, k] int; weights: [B, T, k] float32; valid: [B, T] bool.
        experts: (w_gate, w_up [E, D, F], w_down [E, F, D]) in x's dtype (resharded to the
            layout inside).
        act: activation name.
        mesh, rules: from ``sharding.current_mesh()``.
        capacity_factor: None for dropless; else the all-to-all capacity per (source,
            destination) pair is ceil(capacity_factor * N_l * k / P) rows (module docstring).

    Returns:
        ([B, T, D] in x's dtype, dropped assignments of valid tokens [] int32).
    """
    b, t, d = x.shape
    k = top_idx.shape[-1]
    e, f = experts[0].shape[0], experts[0].shape[-1]
    lay = sharded_layout(mesh, rules, b, e, f)
    n_local = b // _size(mesh, lay.batch) * t
    e_local = e // _size(mesh, lay.experts)
    capacity = dropless_capacity(n_local, k, e_local)
    if capacity_factor is not None:
        p = _size(mesh, lay.experts)
        capacity = min(capacity, max(1, math.ceil(capacity_factor * n_local * k / p)))

    def body(x, top_idx, weights, valid, experts):
        bl = x.shape[0]
        xs, idx, ws = x.reshape(-1, d), top_idx.reshape(-1, k), weights.reshape(-1, k)
        dropped = jnp.zeros((), jnp.int32)
        if lay.mode == "all_to_all":
            y, dropped = expert_parallel_moe(
                xs, idx, ws, valid.reshape(-1), experts, act, lay.experts, capacity
            )
            dropped = jax.lax.psum(dropped, lay.batch)
        elif lay.mode == "psum":
            first = jax.lax.axis_index(lay.experts) * e_local
            y = grouped_moe(xs, idx, ws, experts, act, first)
        else:
            y = grouped_moe(xs, idx, ws, experts, act)
        y = y.astype(x.dtype)
        reduce = lay.mlp + (lay.experts if lay.mode == "psum" else ())
        if reduce:
            y = jax.lax.psum(y, reduce)
        return y.reshape(bl, t, d), dropped

    tokens = PartitionSpec(lay.batch or None)
    e_axes, f_axes = lay.experts or None, lay.mlp or None
    experts_spec = (
        PartitionSpec(e_axes, None, f_axes),  # gate [E, D, F]
        PartitionSpec(e_axes, None, f_axes),  # up [E, D, F]
        PartitionSpec(e_axes, f_axes, None),  # down [E, F, D]
    )
    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(tokens,) * 4 + (experts_spec,),
        out_specs=(tokens, PartitionSpec()),
    )
    return fn(x, top_idx, weights, valid, tuple(experts))


# ----------------------------------------------------------------------------- module


def resolve_impl(impl: str) -> str:
    """The MoE path, "dense" or "grouped", of ``ModelConfig.moe_impl``.

    "auto" goes by the platform of the mesh in use (``sharding.current_platform``): grouped on
    TPU and GPU; dense on CPU, where XLA runs ragged_dot as a masked product over all experts
    (k times the dense FLOPs).
    """
    if impl != "auto":
        return impl
    return "dense" if current_platform() == "cpu" else "grouped"


class MoE(nnx.Module):
    """router [D, E]; experts gate, up [E, D, F], down [E, F, D]; optional shared expert.

    ``capacity_factor`` (None: dropless) only affects the expert-parallel all-to-all path.
    """

    def __init__(
        self,
        config,
        *,
        rngs: nnx.Rngs,
        num_experts: int | None = None,
        capacity_factor: float | None = None,
    ):
        c = config
        e = num_experts or c.num_experts
        d, f, pd = c.hidden_size, c.moe_intermediate_size, c.param_dtype
        self.k, self.normalize, self.act, self.dtype = (
            c.num_experts_per_tok,
            c.norm_topk_prob,
            c.hidden_act,
            c.dtype,
        )
        self.impl = c.moe_impl
        self.capacity_factor = capacity_factor
        self.router = param(rngs, (d, e), ("embed", None), pd)
        self.gate_proj = param(rngs, (e, d, f), ("experts", "embed", "mlp"), pd)
        self.up_proj = param(rngs, (e, d, f), ("experts", "embed", "mlp"), pd)
        self.down_proj = param(rngs, (e, f, d), ("experts", "mlp", "embed"), pd)
        if c.shared_expert_intermediate_size:
            self.shared_expert = MLP(
                d,
                c.shared_expert_intermediate_size,
                act=c.hidden_act,
                dtype=c.dtype,
                param_dtype=pd,
                rngs=rngs,
            )
            self.shared_expert_gate = param(rngs, (d, 1), ("embed", None), pd)
        else:
            self.shared_expert = self.shared_expert_gate = None

    def router_logits(self, x: jax.Array) -> jax.Array:
        """[B, T, D] -> [B, T, E] float32."""
        return jnp.einsum(
            "btd,de->bte",
            x,
            self.router[...].astype(self.dtype),
            preferred_element_type=jnp.float32,
        )

    def expert_outputs(self, x: jax.Array) -> jax.Array:
        """Every expert's output on every token, ungated: [B, T, D] -> [B, T, E, D]."""
        w_gate, w_up, w_down = self._experts()
        gate = jnp.einsum("btd,edf->btef", x, w_gate)
        up = jnp.einsum("btd,edf->btef", x, w_up)
        h = shard(activation(self.act)(gate) * up, ("batch", "length", "experts", "mlp"))
        return jnp.einsum("btef,efd->bted", h, w_down)

    def shared_output(self, x: jax.Array) -> jax.Array:
        """The gated shared expert's output [B, T, D] (zeros without one)."""
        if self.shared_expert is None:
            return jnp.zeros_like(x)
        g = jnp.einsum("btd,do->bto", x, self.shared_expert_gate[...].astype(self.dtype))
        return jax.nn.sigmoid(g) * self.shared_expert(x)

    def _experts(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """gate, up [E, D, F], down [E, F, D] cast to the compute dtype."""
        return tuple(
            w[...].astype(self.dtype) for w in (self.gate_proj, self.up_proj, self.down_proj)
        )

    def dense_routed(self, x: jax.Array, combine: jax.Array) -> jax.Array:
        """sum_e combine_e * FFN_e(x) with every expert on every token: [B, T, D]."""
        w_gate, w_up, w_down = self._experts()
        gate = jnp.einsum("btd,edf->btef", x, w_gate)
        up = jnp.einsum("btd,edf->btef", x, w_up)
        h = activation(self.act)(gate) * up * combine.astype(self.dtype)[..., None]
        h = shard(h, ("batch", "length", "experts", "mlp"))  # [B, T, E, F]
        return jnp.einsum("btef,efd->btd", h, w_down)

    def grouped_routed(self, x, top_idx, weights, valid) -> tuple[jax.Array, jax.Array]:
        """sum_j w_j * FFN_{e_j}(x) over the top-k only: ([B, T, D], dropped assignments [])."""
        ctx = current_mesh()
        if ctx is not None:
            mesh, rules = ctx
            experts, cf = self._experts(), self.capacity_factor
            return grouped_moe_sharded(
                x, top_idx, weights, valid, experts, self.act, mesh, rules, cf
            )
        b, t, d = x.shape
        xs, idx, ws = x.reshape(b * t, d), top_idx.reshape(b * t, -1), weights.reshape(b * t, -1)
        y = grouped_moe(xs, idx, ws, self._experts(), self.act)
        return y.astype(x.dtype).reshape(b, t, d), jnp.zeros((), jnp.int32)

    def __call__(self, x: jax.Array, valid: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x [B, T, D], valid [B, T] bool -> ([B, T, D], router statistics of this layer).

        The statistics are ``router_stats`` plus ``router_logits`` [B, T, E] float32, and
        ``dropped_assignments`` [] when a capacity factor is set.
        """
        logits = self.router_logits(x)
        weights, top_idx = top_k_weights(logits, self.k, self.normalize)
        onehot = jax.nn.one_hot(top_idx, logits.shape[-1], dtype=jnp.float32)  # [B, T, k, E]
        combine = jnp.einsum("btke,btk->bte", onehot, weights)
        dropped = None
        if resolve_impl(self.impl) == "dense":
            y = self.dense_routed(x, combine)
        else:
            y, dropped = self.grouped_routed(x, top_idx, weights, valid)
        if self.shared_expert is not None:
            y = y + self.shared_output(x)
        stats = router_stats(logits, top_idx, combine, valid)
        stats["router_logits"] = logits
        if self.capacity_factor is not None:
            stats["dropped_assignments"] = dropped if dropped is not None else jnp.zeros((), int)
        return y, stats
