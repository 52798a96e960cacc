r"""Attention kernels for the no-cache path (training, scoring): reference, splash, cuDNN.

All three compute, per query head n (kv head n // G, G = N / K),

    out[t] = sum_s softmax_s(where(visible[t, s], cap(scale * q[t] . k[s]), -inf)) v[s],
    cap(x) = c * tanh(x / c) when a soft-cap c is set, else x,

with softmax in float32. ``reference_attention`` takes ``visible`` from
``models.attention.attention_mask`` (same segment, q_pos >= k_pos, q_pos - k_pos < window, by the
``positions`` array). The kernels take segment ids only and use **index-based** causality: key s
is visible from query t iff seg[t] == seg[s], t >= s and (with a window W) t - s < W. The two agree
whenever positions increase by one per token within each segment, which holds for every batch
distill_jax builds: packed rows restart positions at 0 per segment (``data.packing``) and a
left-padded prompt numbers its real tokens 0, 1, ... (``sampling.prompt_layout``). Padding
(segment 0) is the exception: its positions are all 0, so the reference lets a padding token see
every padding token while the kernels let it see the padding tokens before it. Padding outputs
therefore differ (both finite, no empty row), but no real token ever sees padding, so every
non-padding output, the logits of real tokens and every masked loss are the same.

Choosing: ``resolve_impl`` maps ``ModelConfig.attention_impl`` to one of ``IMPLS`` by the platform
of the mesh in use (``sharding.current_platform``): TPU -> splash, GPU -> cudnn, CPU -> reference.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from distill_jax import sharding

IMPLS = ("reference", "splash", "cudnn")
AUTO_IMPL = {"tpu": "splash", "gpu": "cudnn", "cpu": "reference"}
# Splash tiles the sequence in blocks of a multiple of 128 lanes (TPU vregs are 8 x 128); the
# largest of these that divides the padded length is used, forward and backward.
SPLASH_BLOCKS = (512, 256, 128)
SPLASH_LANES = 128
_PAD_SEGMENT = -1  # segment id of the keys splash pads on; real segments are >= 0


def _cudnn_unsupported(softcap, dtype) -> str | None:
    """Why cuDNN attention cannot run this layer, or None."""
    if softcap:
        return "it has no attn_logit_softcapping (jax.nn.dot_product_attention has no soft-cap)"
    if dtype is not None and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return f"it needs bfloat16 or float16 q, k, v, not {jnp.dtype(dtype).name} (set dtype)"
    return None


def resolve_impl(
    impl: str, *, softcap: float | None = None, dtype=None, platform: str | None = None
) -> str:
    """The attention implementation to run: "reference", "splash" or "cudnn".

    "auto" picks by platform (``AUTO_IMPL``), except that on GPU it gets the reference where cuDNN
    cannot run the layer: a soft-capped model (``attn_logit_softcapping``;
    ``jax.nn.dot_product_attention`` has no soft-cap) or a compute dtype other than bfloat16 /
    float16 (cuDNN flash attention has no float32). An explicit "splash" runs on TPU, or on CPU
    in Pallas interpret mode.

    Args:
        impl: ``ModelConfig.attention_impl``: "auto", "reference", "splash" or "cudnn".
        softcap: the model's attention logit soft-cap, or None.
        dtype: the compute dtype of q, k, v (``ModelConfig.dtype``), or None (not checked).
        platform: "cpu", "gpu" or "tpu"; default ``sharding.current_platform()``.

    Raises:
        ValueError: unknown ``impl``; "cudnn" off GPU, with a soft-cap or in float32; "splash"
            on GPU.
    """
    platform = platform or sharding.current_platform()
    if impl == "auto":
        impl = AUTO_IMPL.get(platform, "reference")
        return "reference" if impl == "cudnn" and _cudnn_unsupported(softcap, dtype) else impl
    if impl not in IMPLS:
        raise ValueError(f"attention_impl={impl!r} is not one of {('auto',) + IMPLS}.")
    if impl == "cudnn" and platform != "gpu":
        raise ValueError(
            f"attention_impl='cudnn' needs a GPU but the platform is {platform!r}; use 'auto' "
            "(or 'reference', or 'splash' on TPU)."
        )
    if impl == "cudnn" and (why := _cudnn_unsupported(softcap, dtype)):
        raise ValueError(f"attention_impl='cudnn' cannot run this model: {why}; use 'auto'.")
    if impl == "splash" and platform == "gpu":
        raise ValueError(
            "attention_impl='splash' is a TPU Pallas kernel and does not run on GPU; use 'auto' "
            "or 'cudnn'."
        )
    return impl


def reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    scale: float,
    softcap: float | None = None,
    dtype=None,
) -> jax.Array:
    """Grouped-query attention with an explicit mask, scores and softmax in float32.

    Args:
        q: [B, T, N, H].
        k, v: [B, S, K, H], N a multiple of K.
        mask: [B, T, S] bool, True where the query sees the key (no empty row).
        scale: multiplies q . k.
        softcap: c for c * tanh(scores / c), or None.
        dtype: of the probabilities multiplying v; default v's dtype.

    Returns:
        [B, T, N, H].
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * scale
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype or v.dtype)  # [B, K, G, T, S]
    return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, n, h)


def splash_layout(t: int, block_size: int | None = None) -> tuple[int, int]:
    """(padded length, block size) of splash attention over ``t`` positions.

    The length is padded up to a multiple of 128; the block is ``block_size`` if given (a
    multiple of 128 dividing the padded length), else the largest of 512, 256, 128 that divides it.
    """
    padded = -(-t // SPLASH_LANES) * SPLASH_LANES
    if block_size is None:
        block_size = next(b for b in SPLASH_BLOCKS if padded % b == 0)
    if block_size % SPLASH_LANES or padded % block_size:
        raise ValueError(
            f"Splash block size {block_size} must be a multiple of {SPLASH_LANES} dividing the "
            f"padded length {padded}."
        )
    return padded, block_size


def _splash_kernel(heads: int, length: int, block: int, window, softcap, interpret: bool):
    """A splash MHA kernel on one example: q [N, T, H], k, v [K, T, H], segment ids [T]."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash  # TPU (Pallas) only

    if window and window < length:
        # LocalMask keeps q - left <= k <= q + right, i.e. 0 <= q - k <= W - 1.
        mask = splash.LocalMask((length, length), window_size=(window - 1, 0), offset=0)
    else:
        mask = splash.CausalMask((length, length))
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        use_fused_bwd_kernel=True,
    )
    return splash.make_splash_mha(
        splash.MultiHeadMask([mask] * heads),
        block_sizes=sizes,
        attn_logits_soft_cap=float(softcap) if softcap else None,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )


def _with_matmul_precision(fn, precision: str):
    """``fn(q, k, v, segment_ids)`` with its matmuls traced under ``precision``, forward and
    backward (a custom VJP, since JAX traces the backward pass after ``fn`` has returned).

    Mosaic rejects a float32 contract precision on 16-bit operands ("Bad lhs type"), which is what
    ``jax_default_matmul_precision="highest"`` asks of splash's bfloat16 matmuls; "default" is
    exact there (bfloat16 products, float32 accumulation).
    """

    @jax.custom_vjp
    def call(q, k, v, segment_ids):
        with jax.default_matmul_precision(precision):
            return fn(q, k, v, segment_ids)

    def call_fwd(q, k, v, segment_ids):
        with jax.default_matmul_precision(precision):
            return jax.vjp(lambda q, k, v: fn(q, k, v, segment_ids), q, k, v)

    def call_bwd(vjp, grad):
        with jax.default_matmul_precision(precision):
            return (*vjp(grad), None)

    call.defvjp(call_fwd, call_bwd)
    return call


def _segment_ids(seg):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    return splash.SegmentIds(q=seg, kv=seg)


def _splash_local(q, k, v, segment_ids, *, scale, window, softcap, block_size, interpret):
    """Splash attention on arrays that are whole along T (one shard, or the unsharded arrays)."""
    _, t, n, _ = q.shape
    length, block = splash_layout(t, block_size)
    pad = length - t
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)  # splash has no scale argument
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).swapaxes(1, 2) for x in (q, k, v))
    # Padded keys form their own segment, so no real query sees them.
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=_PAD_SEGMENT)

    def one(q, k, v, seg):  # q [N, T', H], k, v [K, T', H], seg [T']
        # Built where it is called: its mask tables must not be closed over from another trace.
        kernel = _splash_kernel(n, length, block, window, softcap, interpret)
        return kernel(q, k, v, _segment_ids(seg))

    batched = jax.vmap(one)
    if jnp.dtype(q.dtype).itemsize < 4:
        batched = _with_matmul_precision(batched, "default")
    out = batched(q, k, v, segment_ids)  # [B, N, T', H]
    return out.swapaxes(1, 2)[:, :t]  # [B, T, N, H]


def _activation_spec(mesh, rules, logical_axes, shape) -> PartitionSpec:
    """PartitionSpec of an activation: the rules' mesh axes that the mesh has and that divide."""
    out = []
    for entry, size in zip(sharding.logical_to_spec(logical_axes, rules), shape):
        names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        names = tuple(a for a in names if a in mesh.shape)
        if not names or size % math.prod(mesh.shape[a] for a in names):
            out.append(None)
        else:
            out.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*out)


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    block_size: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Causal self-attention by the Pallas TPU splash kernel (flash attention with block sparsity).

    Masking is index-based (module docstring): key s is visible from query t iff
    seg[t] == seg[s], t >= s and, with a window W, t - s < W. T is padded internally to
    ``splash_layout(T)`` (zeros in a segment of their own) and the output sliced back.

    Under ``sharding.use_mesh`` the kernel, which GSPMD cannot partition, runs in a
    ``jax.shard_map``: batch over the rules' "batch" mesh axes, query heads over the "heads" axes
    and kv heads over the "kv_heads" axes, each where the mesh divides it (else replicated), T
    and H whole. When the kv heads cannot be split like the query heads (the mesh does not divide
    K, or the rules give kv_heads other axes), k and v are repeated to one head per query head
    first, which costs G times their memory in this layer; choosing tensor parallelism at most
    num_kv_heads avoids it.

    Args:
        q: [B, T, N, H].
        k, v: [B, T, K, H], N a multiple of K; the same dtype as q.
        segment_ids: [B, T] int, >= 0 (0 = padding).
        scale: multiplies q . k (applied to q before the kernel).
        sliding_window: W, or None for full causal attention.
        softcap: c for c * tanh(scores / c), or None.
        block_size: override of ``splash_layout``'s block choice (tests).
        interpret: run Pallas in interpret mode; default: when the platform is the CPU.

    Returns:
        [B, T, N, H] in q's dtype.
    """
    if interpret is None:
        interpret = sharding.current_platform() == "cpu"
    local = functools.partial(
        _splash_local,
        scale=scale,
        window=sliding_window,
        softcap=softcap,
        block_size=block_size,
        interpret=interpret,
    )
    ctx = sharding.current_mesh()
    if ctx is None:
        return local(q, k, v, segment_ids)
    mesh, rules = ctx
    q_spec = _activation_spec(mesh, rules, ("batch", None, "heads", None), q.shape)
    kv_spec = _activation_spec(mesh, rules, ("batch", None, "kv_heads", None), k.shape)
    if q_spec[2] is None:
        kv_spec = q_spec
    elif kv_spec[2] != q_spec[2]:
        groups = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)  # [B, T, N, H]
        kv_spec = q_spec
    seg_spec = PartitionSpec(q_spec[0], None)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
        out_specs=q_spec,
        check_vma=False,  # pallas_call carries no varying-axes types
    )(q, k, v, segment_ids)


def cudnn_arguments(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
) -> dict:
    """Keyword arguments of ``jax.nn.dot_product_attention`` for packed causal self-attention.

    The API has no segment ids (its ``query_seq_lengths`` / ``key_value_seq_lengths`` describe
    one sequence per row), so packing goes in the boolean ``mask`` [B, 1, T, T] (same segment;
    cuDNN receives it as an additive bias), causality in ``is_causal`` and the window in
    ``local_window_size=(W - 1, 0)``: the API keeps keys with t - left <= s <= t + right, i.e.
    0 <= t - s <= W - 1, and cuDNN gets sliding_window_length = W. Only ``implementation``
    differs between the GPU kernel ("cudnn") and the XLA check on CPU ("xla").

    Args:
        q: [B, T, N, H].
        k, v: [B, T, K, H].
        segment_ids: [B, T] int.
        scale: multiplies q . k.
        sliding_window: W, or None.

    Returns:
        {"query", "key", "value", "mask", "scale", "is_causal", "local_window_size"}.
    """
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, T]
    return dict(
        query=q,
        key=k,
        value=v,
        mask=same[:, None],  # [B, 1, T, T], broadcast over heads
        scale=float(scale),
        is_causal=True,
        local_window_size=(sliding_window - 1, 0) if sliding_window else None,
    )


def cudnn_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    implementation: str | None = "cudnn",
) -> jax.Array:
    """``jax.nn.dot_product_attention(**cudnn_arguments(...), implementation=implementation)``.

    cuDNN flash attention (NVIDIA); "xla" runs the same arguments anywhere (tests).

    Returns:
        [B, T, N, H] in q's dtype.
    """
    args = cudnn_arguments(q, k, v, segment_ids, scale=scale, sliding_window=sliding_window)
    return jax.nn.dot_product_attention(**args, implementation=implementation)


def self_attention(
    impl: str,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """Causal self-attention (T == S, no cache) by a kernel, index-based masking.

    Args:
        impl: "splash" (``splash_attention``) or "cudnn" (``cudnn_attention``), as returned by
            ``resolve_impl``.
        q: [B, T, N, H].
        k, v: [B, T, K, H].
        segment_ids: [B, T] int (0 = padding).
        scale, sliding_window, softcap: as in ``reference_attention`` / ``attention_mask``.

    Returns:
        [B, T, N, H] in q's dtype.
    """
    if impl == "splash":
        return splash_attention(
            q, k, v, segment_ids, scale=scale, sliding_window=sliding_window, softcap=softcap
        )
    if impl == "cudnn":
        if softcap:
            raise ValueError("The cudnn attention kernel has no soft-cap; use 'reference'.")
        return cudnn_attention(q, k, v, segment_ids, scale=scale, sliding_window=sliding_window)
    raise ValueError(f"No attention kernel {impl!r}; kernels are 'splash' and 'cudnn'.")
