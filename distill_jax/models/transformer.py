"""The decoder LM: embed -> L x (attention, FFN or MoE) -> norm -> head.

``model(input_ids)`` gives logits [B, T, V]. ``model.forward(...)`` gives a ``ModelOutput`` with the
final hidden states (the fused-loss path skips the head), per-layer hidden states, per-layer
attention q/k/v (for attention-relation losses), MoE router statistics and load-balancing loss, and
the updated KV cache.
"""

from __future__ import annotations

import math

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
    q/k norm and RoPE: what the scores are computed from) or None."""

    logits: jax.Array | None
    hidden: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    router_stats: tuple[dict[str, jax.Array], ...] = ()
    router_logits: tuple[jax.Array, ...] = ()
    aux_loss: jax.Array | None = None
    cache: KVCache | None = None
    attention_qkv: tuple[dict[str, jax.Array], ...] | None = None


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

    def __call__(self, x, positions, segment_ids, cache=None, output_qkv=False, slot=None):
        """One block; ``slot`` is the block's index in the KV cache (default: its layer)."""
        slot = self.layer if slot is None else slot
        h, cache, qkv = self.attn(
            self.attn_norm(x), positions, segment_ids, cache, slot, output_qkv
        )
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp_norm(x)
        stats = None
        if isinstance(self.mlp, moe_lib.MoE):
            h, stats = self.mlp(h, segment_ids != 0)
        else:
            h = self.mlp(h)
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return shard(x + h, ("batch", "length", "embed")), stats, cache, qkv


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
            remat: rematerialisation policy of each block (each scanned group) in the backward
                pass: "none"/False, "full"/True (activation memory of one block instead of L),
                "dots" or "offload" (``models.scan.remat_policy``); ignored with a cache.

        Returns:
            ModelOutput.
        """
        c = self.config
        b, t = input_ids.shape
        cache_lib.check_length(c, t)  # a cache's slots may outnumber positions (speculative)
        if positions is None:
            start = 0 if cache is None else cache.index
            positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        x = jnp.take(self.embed[...], input_ids, axis=0).astype(c.dtype)  # [B, T, D]
        if c.embed_scale:
            x = x * jnp.asarray(math.sqrt(c.hidden_size), c.param_dtype).astype(c.dtype)
        x = shard(x, ("batch", "length", "embed"))
        embedded = x
        # Decoding with a cache has no backward pass: nothing to rematerialise.
        policy = None if cache is not None else scan_lib.remat_policy(remat, platform())
        if self.scanned and cache is None:
            x, per_layer = self._scan_blocks(
                x, positions, segment_ids, output_hidden_states, output_attention_qkv, policy
            )
        else:
            x, per_layer, cache = self._loop_blocks(
                x, positions, segment_ids, cache, output_hidden_states, output_attention_qkv, policy
            )
        stats, router_logits = [], []
        for _, layer_stats, _ in per_layer:
            if layer_stats is not None:
                layer_stats = dict(layer_stats)
                router_logits.append(layer_stats.pop("router_logits"))
                stats.append(layer_stats)
        hidden_states = [embedded] + [h for h, _, _ in per_layer] if output_hidden_states else None
        qkvs = [qkv for _, _, qkv in per_layer]
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
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            router_stats=tuple(stats),
            router_logits=tuple(router_logits),
            aux_loss=aux,
            cache=cache,
            attention_qkv=tuple(qkvs) if output_attention_qkv else None,
        )

    def _loop_blocks(self, x, positions, segment_ids, cache, want_hidden, want_qkv, policy):
        """The blocks one after the other (a stacked model's blocks sliced out one by one).

        Returns:
            (x, per block (output or None, MoE stats or None, qkv or None), cache).
        """
        per_layer = []
        for i, block in enumerate(self.blocks()):
            if policy is not None:  # recompute the block in the backward pass
                run = nnx.remat(lambda blk, x, p, s: blk(x, p, s, None, want_qkv), policy=policy)
                x, stats, _, qkv = run(block, x, positions, segment_ids)
            else:
                x, stats, cache, qkv = block(x, positions, segment_ids, cache, want_qkv, slot=i)
            per_layer.append((x if want_hidden else None, stats, qkv))
        return x, per_layer, cache

    def _scan_blocks(self, x, positions, segment_ids, want_hidden, want_qkv, policy):
        """``lax.scan`` over the groups of a stacked model; the body runs one group's p blocks.

        Returns:
            (x, per block (output or None, MoE stats or None, qkv or None)) in model order.
        """
        graphdef, state = nnx.split(self.layers)

        def body(x, group_state):
            outs = []
            for block in nnx.merge(graphdef, group_state):
                x, stats, _, qkv = block(x, positions, segment_ids, None, want_qkv)
                outs.append((x if want_hidden else None, stats, qkv))
            return x, outs

        if policy is not None:
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
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
