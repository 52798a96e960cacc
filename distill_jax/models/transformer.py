"""The decoder LM: embed -> L x (attention, FFN or MoE) -> norm -> head.

``model(input_ids)`` gives logits [B, T, V]. ``model.forward(...)`` gives a ``ModelOutput`` with the
final hidden states (the fused-loss path skips the head), per-layer hidden states, per-layer
attention q/k/v (for attention-relation losses), MoE router statistics and load-balancing loss, the
updated KV cache, and any of the blocks' named intermediates (``BLOCK_INTERMEDIATES``).

The block walk is written once, in ``Block.__call__``: the feature losses (hidden states, q/k/v),
the calibration statistics (``transforms.stats``) and NAEE (``transforms.experts``) all read what
they need from the model's own forward by naming intermediates, in the loop and the scanned
layouts alike. A name that is not requested is not computed or returned, so the default forward
keeps nothing beyond the residual stream (and the router statistics of MoE blocks).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from distill_jax.models import cache as cache_lib
from distill_jax.models import moe as moe_lib
from distill_jax.models import scan as scan_lib
from distill_jax.models.attention import Attention
from distill_jax.models.cache import KVCache
from distill_jax.models.config import ModelConfig
from distill_jax.models.layers import RMSNorm, param
from distill_jax.models.mlp import MLP
from distill_jax.sharding import current_platform as platform
from distill_jax.sharding import shard


@struct.dataclass
class ModelOutput:
    """logits [B,T,V] or None; hidden [B,T,D] (after the final norm); hidden_states: L+1 arrays
    [B,T,D] (embeddings, then each block's output) or None; router_stats: one dict per MoE layer;
    router_logits: one [B,T,E] per MoE layer; aux_loss: [] load-balancing loss (0 for dense);
    attention_qkv: one {"q": [B,T,N,H], "k": [B,T,K,H], "v": [B,T,K,H]} per layer (q and k after
    q/k norm and RoPE: what the scores are computed from) or None; intermediates: one entry per
    block (a dict of the requested ``BLOCK_INTERMEDIATES``, or what ``reduce_intermediates`` made
    of it) or None."""

    logits: jax.Array | None
    hidden: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    router_stats: tuple[dict[str, jax.Array], ...] = ()
    router_logits: tuple[jax.Array, ...] = ()
    aux_loss: jax.Array | None = None
    cache: KVCache | None = None
    attention_qkv: tuple[dict[str, jax.Array], ...] | None = None
    intermediates: tuple | None = None


# Name -> what ``Block.__call__`` returns under it when asked (B batch, T positions, D width, N
# heads, H head dim, F FFN width, E experts). MoE-only and dense-only names are absent from the
# other kind of block.
BLOCK_INTERMEDIATES = {
    "input": "[B,T,D] the block's input (residual stream)",
    "attn_input": "[B,T,D] attn_norm(input)",
    "qkv": '{"q": [B,T,N,H], "k", "v": [B,T,K,H]} (q, k after q/k norm and RoPE)',
    "heads": "[B,T,N,H] per-head attention outputs before o_proj",
    "mlp_input": "[B,T,D] mlp_norm(input + attention): the FFN / MoE input",
    "mlp_hidden": "[B,T,F] dense FFN only: the down projection's input",
    "router_logits": "[B,T,E] float32, MoE only",
    "expert_outputs": "[B,T,E,D] MoE only: every expert's ungated output on every token",
    "output": "[B,T,D] the block's output (residual stream)",
}


def check_intermediates(names) -> frozenset[str]:
    """The requested names as a frozenset; unknown names fail naming the valid ones."""
    names = frozenset(names)
    bad = sorted(names - set(BLOCK_INTERMEDIATES))
    if bad:
        raise ValueError(
            f"Unknown block intermediates {bad}; choose from {list(BLOCK_INTERMEDIATES)}."
        )
    return names


class Block(nnx.Module):
    """Pre-norm residual block; with sandwich norms (Gemma3) each sublayer output is normed too."""

    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        c = config
        norm = dict(eps=c.rms_norm_eps, offset=c.norm_offset, dtype=c.param_dtype)
        self.attn_norm = RMSNorm(c.hidden_size, **norm)
        self.attn = Attention(c, layer, rngs=rngs)
        self.mlp_norm = RMSNorm(c.hidden_size, **norm)
        if c.sandwich_norms:
            self.post_attn_norm = RMSNorm(c.hidden_size, **norm)
            self.post_mlp_norm = RMSNorm(c.hidden_size, **norm)
        else:
            self.post_attn_norm = self.post_mlp_norm = None
        if c.is_moe(layer):
            self.mlp = moe_lib.MoE(
                c,
                rngs=rngs,
                num_experts=c.experts_in(layer),
                capacity_factor=c.moe_capacity_factor,
            )
        else:
            self.mlp = MLP(
                c.hidden_size,
                c.intermediate_size,
                act=c.hidden_act,
                dtype=c.dtype,
                param_dtype=c.param_dtype,
                rngs=rngs,
            )
        self.layer = layer

    def __call__(self, x, positions, segment_ids, cache=None, *, slot=None, want=frozenset()):
        """One block.

        Args:
            x: [B, T, D] residual stream; positions, segment_ids: [B, T] int.
            cache: a KVCache or None; slot: the block's index in it (default: its layer).
            want: names of ``BLOCK_INTERMEDIATES`` to return.

        Returns:
            (output [B, T, D], cache, MoE router statistics or None, {name: intermediate}).
        """
        slot = self.layer if slot is None else slot
        got = {"input": x}
        a_in = self.attn_norm(x)
        got["attn_input"] = a_in
        heads, cache, got["qkv"] = self.attn.attend(
            a_in, positions, segment_ids, cache, slot, "qkv" in want
        )
        got["heads"] = heads
        h = self.attn.project_out(heads)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = got["mlp_input"] = self.mlp_norm(x)
        stats = None
        if isinstance(self.mlp, moe_lib.MoE):
            h, stats = self.mlp(h, segment_ids != 0)
            got["router_logits"] = stats["router_logits"]
            if "expert_outputs" in want:
                got["expert_outputs"] = self.mlp.expert_outputs(got["mlp_input"])
        else:
            hid = got["mlp_hidden"] = self.mlp.hidden(h)
            h = self.mlp.down(hid)
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        x = got["output"] = shard(x + h, ("batch", "length", "embed"))
        return x, cache, stats, {k: v for k, v in got.items() if k in want}


@dataclasses.dataclass(frozen=True)
class Walk:
    """What every block of one forward pass gets: the token layout, the intermediates to
    compute (``want``), what to keep of them (``keep``: {name: array} -> pytree, applied right
    after the block) and the remat policy."""

    positions: jax.Array
    segment_ids: jax.Array
    want: frozenset[str]
    keep: Callable[[dict], Any]
    policy: Callable | None

    def run(self, block: Block, x: jax.Array):
        """One block without a cache: (output, MoE stats or None, keep(intermediates))."""
        x, _, stats, got = block(x, self.positions, self.segment_ids, want=self.want)
        return x, stats, self.keep(got)


class Transformer(nnx.Module):
    """Decoder-only LM for every family in ``config.FAMILIES``.

    Parameters: embed [V, D]; layers[i] (Block); final_norm [D]; lm_head [D, V] unless tied.
    With ``config.scan_layers`` (and blocks that repeat, ``models.scan``), ``layers[j]`` is the
    j-th block of each repeating group with parameters stacked to [L / p, ...]: block g p + j is
    ``layers[j][g]``, and the forward pass is a ``lax.scan`` over the groups.
    """

    @property
    def scanned(self) -> bool:
        """Whether the blocks' parameters are stacked and run by ``lax.scan``."""
        return self.config.scan_layers and scan_lib.scannable(self.config, warn=False)

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        c = self.config = config
        self.embed = param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), c.param_dtype)
        blocks = [Block(c, i, rngs=rngs) for i in range(c.num_layers)]
        if c.scan_layers and scan_lib.scannable(c):
            blocks = _stack_blocks(blocks, c)
        self.layers = nnx.List(blocks)
        self.final_norm = RMSNorm(
            c.hidden_size, eps=c.rms_norm_eps, offset=c.norm_offset, dtype=c.param_dtype
        )
        if c.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = param(
                rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"), c.param_dtype
            )

    def head_weights(self) -> jax.Array:
        """The output projection [D, V] (the transposed embedding when tied)."""
        return self.embed[...].T if self.lm_head is None else self.lm_head[...]

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """[B, T, D] final hidden -> [B, T, V] float32 logits, with final softcapping if any."""
        c = self.config
        logits = jnp.einsum(
            "btd,dv->btv",
            hidden,
            self.head_weights().astype(c.dtype),
            preferred_element_type=jnp.float32,
        )
        if c.final_logit_softcapping:
            cap = c.final_logit_softcapping
            logits = jnp.tanh(logits / cap) * cap
        return shard(logits, ("batch", "length", "vocab"))

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """[B, T] ids -> [B, T, D] block-0 input: the embedding rows, times sqrt(D) with
        ``embed_scale`` (Gemma; the scale rounded to the parameter dtype, as transformers does)."""
        c = self.config
        x = jnp.take(self.embed[...], input_ids, axis=0).astype(c.dtype)  # [B, T, D]
        if c.embed_scale:
            x = x * jnp.asarray(math.sqrt(c.hidden_size), c.param_dtype).astype(c.dtype)
        return shard(x, ("batch", "length", "embed"))

    def forward(
        self,
        input_ids: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        compute_logits: bool = True,
        output_hidden_states: bool = False,
        output_attention_qkv: bool = False,
        intermediates: Sequence[str] = (),
        reduce_intermediates: Callable[[dict], Any] | None = None,
        remat: str | bool = False,
    ) -> ModelOutput:
        """Run the model.

        Args:
            input_ids: [B, T] int.
            positions: [B, T] int, position of each token in its sequence (default 0..T-1).
            segment_ids: [B, T] int; tokens attend within their segment only, 0 marks padding
                (default all 1). Packed rows carry several segments with positions restarting.
            cache: a KVCache to read and extend (decoding); the new tokens go at ``cache.index``.
            compute_logits: False skips the head (logits=None): the fused-loss path.
            output_hidden_states: also return the embeddings and every block's output.
            output_attention_qkv: also return every layer's attention q, k, v (for MiniLM
                relations and attention transfer, ``losses.features``); with a cache, k and v
                are those of the new tokens only.
            intermediates: names of ``BLOCK_INTERMEDIATES`` to return per block in
                ``ModelOutput.intermediates``.
            reduce_intermediates: applied to each block's {name: array} inside the walk (inside
                the scan body for a stacked model), so only its result is kept per block:
                calibration sums instead of [B, T, E, D] expert outputs. Must not depend on
                the block index (it sees the requested names present in that block).
            remat: rematerialisation policy of each block (each scanned group) in the backward
                pass: "none"/False, "full"/True (activation memory of one block instead of L),
                "dots" or "offload" (``models.scan.remat_policy``); ignored with a cache.

        Returns:
            ModelOutput.
        """
        c = self.config
        want = check_intermediates(intermediates)
        b, t = input_ids.shape
        cache_lib.check_length(c, t)  # a cache's slots may outnumber positions (speculative)
        if positions is None:
            start = 0 if cache is None else cache.index
            positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        x = embedded = self.embed_tokens(input_ids)
        # Decoding with a cache has no backward pass: nothing to rematerialise.
        policy = None if cache is not None else scan_lib.remat_policy(remat, platform())
        # Per block: the output (hidden states), q/k/v, and the caller's names (reduced or not).
        extra = {"output"} if output_hidden_states else set()
        extra |= {"qkv"} if output_attention_qkv else set()

        def keep(got):
            own = {k: got[k] for k in extra}
            if want:
                asked = {k: v for k, v in got.items() if k in want}
                own["asked"] = reduce_intermediates(asked) if reduce_intermediates else asked
            return own

        walk = Walk(positions, segment_ids, frozenset(want | extra), keep, policy)
        if self.scanned and cache is None:
            x, per_layer = self._scan_blocks(x, walk)
        else:
            x, per_layer, cache = self._loop_blocks(x, walk, cache)
        stats = [dict(s) for s, _ in per_layer if s is not None]
        router_logits = [s.pop("router_logits") for s in stats]
        kept = [k for _, k in per_layer]
        if cache is not None:
            cache = cache.replace(
                positions=cache_lib.write(cache.positions, positions, cache.index),
                segment_ids=cache_lib.write(cache.segment_ids, segment_ids, cache.index),
                index=cache.index + t,
            )
        hidden = self.final_norm(x)
        aux = moe_lib.load_balancing_loss(stats) if stats else jnp.zeros(())
        return ModelOutput(
            logits=self.logits_from_hidden(hidden) if compute_logits else None,
            hidden=hidden,
            hidden_states=(
                (embedded, *(k["output"] for k in kept)) if output_hidden_states else None
            ),
            router_stats=tuple(stats),
            router_logits=tuple(router_logits),
            aux_loss=aux,
            cache=cache,
            attention_qkv=tuple(k["qkv"] for k in kept) if output_attention_qkv else None,
            intermediates=tuple(k["asked"] for k in kept) if want else None,
        )

    def _loop_blocks(self, x, walk: Walk, cache):
        """The blocks one after the other (a stacked model's blocks sliced out one by one).

        Returns:
            (x, per block (MoE stats or None, walk.keep of its intermediates), cache).
        """
        per_layer = []
        for i, block in enumerate(self.blocks()):
            if walk.policy is not None:  # recompute the block in the backward pass
                run = nnx.remat(
                    lambda blk, x, p, s: dataclasses.replace(walk, positions=p, segment_ids=s).run(
                        blk, x
                    ),
                    policy=walk.policy,
                )
                x, stats, kept = run(block, x, walk.positions, walk.segment_ids)
            else:
                x, cache, stats, got = block(
                    x, walk.positions, walk.segment_ids, cache, slot=i, want=walk.want
                )
                kept = walk.keep(got)
            per_layer.append((stats, kept))
        return x, per_layer, cache

    def _scan_blocks(self, x, walk: Walk):
        """``lax.scan`` over the groups of a stacked model; the body runs one group's p blocks.

        Returns:
            (x, per block (MoE stats or None, walk.keep of its intermediates)) in model order.
        """
        graphdef, state = nnx.split(self.layers)

        def body(x, group_state):
            outs = []
            for block in nnx.merge(graphdef, group_state):
                x, stats, kept = walk.run(block, x)
                outs.append((stats, kept))
            return x, outs

        if walk.policy is not None:
            body = jax.checkpoint(body, policy=walk.policy, prevent_cse=False)
        x, outs = jax.lax.scan(body, x, state)
        return x, scan_lib.gather_layers(outs, self.config)

    def blocks(self) -> list[Block]:
        """The L blocks in order; for a stacked model, block g p + j is sliced out of
        ``layers[j]`` (inside jit this is a slice of each stacked parameter)."""
        if not self.scanned:
            return list(self.layers)
        p = len(self.layers)
        split = [nnx.split(block) for block in self.layers]
        out = []
        for i in range(self.config.num_layers):
            graphdef, state = split[i % p]
            out.append(nnx.merge(graphdef, jax.tree.map(lambda a, g=i // p: a[g], state)))
        return out

    def __call__(self, input_ids, *, positions=None, segment_ids=None, return_hidden=False):
        """Logits [B, T, V] float32, or final hidden states [B, T, D] with return_hidden=True."""
        out = self.forward(
            input_ids,
            positions=positions,
            segment_ids=segment_ids,
            compute_logits=not return_hidden,
        )
        return out.hidden if return_hidden else out.logits


def _stack_blocks(blocks: list[Block], config: ModelConfig) -> list[Block]:
    """L blocks -> p blocks whose parameters are the group members' stacked on a "layers" axis."""
    p = scan_lib.period(config)
    out = []
    for j in range(p):
        members = blocks[j::p]
        graphdef, _ = nnx.split(members[0])
        state = jax.tree.map(
            lambda *xs: scan_lib.stack_arrays(xs), *[nnx.state(m) for m in members]
        )
        for var in jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable)):
            axes = var.get_metadata().get("out_sharding") or (None,) * (var.get_value().ndim - 1)
            var.set_metadata("out_sharding", ("layers", *axes))
        out.append(nnx.merge(graphdef, state))
    return out


def _with_params(config: ModelConfig, params: dict) -> Transformer:
    """A Transformer of ``config`` holding the pure-dict ``params`` (no initialisation)."""
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


def to_scanned(model: Transformer) -> Transformer:
    """The same model with stacked blocks run by ``lax.scan`` (``config.scan_layers``).

    A model whose blocks do not repeat is returned as it is, with a warning (``models.scan``).
    """
    c = model.config
    if model.scanned or not scan_lib.scannable(c):
        return model
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params["layers"] = scan_lib.stack_layers(params["layers"], c)
    return _with_params(c.replace(scan_layers=True), params)


def to_looped(model: Transformer) -> Transformer:
    """The same model with one parameter set per block (``config.scan_layers=False``): the
    layout that loading, export and the transforms address as ``layers[i]``."""
    c = model.config
    if not model.scanned:
        return (
            model
            if not c.scan_layers
            else _with_params(
                c.replace(scan_layers=False), nnx.to_pure_dict(nnx.state(model, nnx.Param))
            )
        )
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params["layers"] = scan_lib.unstack_layers(params["layers"], c)
    return _with_params(c.replace(scan_layers=False), params)


def num_params(model: nnx.Module) -> int:
    """Number of parameters (tied embeddings counted once)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
