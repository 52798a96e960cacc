"""Attention kernels against the reference attention and a NumPy float64 attention.

Splash runs on CPU in Pallas interpret mode; the cuDNN path is checked by running its exact
``jax.nn.dot_product_attention`` arguments with ``implementation="xla"``; a TPU v5e topology built
on this machine compiles the Transformer with ``attention_impl="auto"`` (splash). Kernels use
index-based causality, so padding tokens (segment 0, positions all 0) may differ from the
reference: outputs are compared on real tokens, and padding outputs must be finite.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

import distill_jax as dj
from distill_jax import sharding
from distill_jax.models import attention_kernels as ak
from distill_jax.models.attention import attention_mask

ATOL = 2e-6  # float32
B, H = 2, 32


def _layout(kind: str, t: int):
    """positions, segment_ids [B, T] int32 of a batch of the given kind."""
    positions = np.zeros((B, t), np.int32)
    segments = np.zeros((B, t), np.int32)
    for row in range(B):
        if kind == "single":
            lengths, left_pad = (t,), 0
        elif kind == "packed":  # segments restart positions; the rest of the row is padding
            lengths, left_pad = ((t // 2, t // 4, t // 8), (t // 3, t // 3))[row], 0
        elif kind == "left_pad":  # a left-padded prompt batch (sampling.prompt_layout)
            lengths, left_pad = (t - 37 * row,), 37 * row
        start = left_pad
        for seg, n in enumerate(lengths, start=1):
            positions[row, start : start + n] = np.arange(n)
            segments[row, start : start + n] = seg
            start += n
    return positions, segments


def _qkv(t, n, k, dtype=np.float32, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    q = spread * rng.normal(size=(B, t, n, H))
    kk = spread * rng.normal(size=(B, t, k, H))
    v = rng.normal(size=(B, t, k, H))
    return tuple(jnp.asarray(x, dtype) for x in (q, kk, v))


def numpy_attention(q, k, v, positions, segments, *, scale, window=None, softcap=None):
    """Float64 attention with the position-based mask of ``attention.attention_mask``."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)  # [B, T, N, H]
    scores = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if softcap:
        scores = np.tanh(scores / softcap) * softcap
    delta = positions[:, :, None] - positions[:, None, :]
    visible = (segments[:, :, None] == segments[:, None, :]) & (delta >= 0)
    if window:
        visible &= delta < window
    scores = np.where(visible[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", probs, v)


@jax.jit(static_argnames=("scale", "window", "softcap"))
def _reference(q, k, v, positions, segments, *, scale, window=None, softcap=None):
    mask = attention_mask(positions, segments, positions, segments, window)
    return ak.reference_attention(q, k, v, mask, scale=scale, softcap=softcap)


@jax.jit(static_argnames=("scale", "window", "softcap", "block_size"))
def _splash(q, k, v, segments, *, scale, window=None, softcap=None, block_size=None):
    return ak.splash_attention(
        q,
        k,
        v,
        segments,
        scale=scale,
        sliding_window=window,
        softcap=softcap,
        block_size=block_size,
    )


@jax.jit(static_argnames=("scale", "window"))
def _cudnn_as_xla(q, k, v, segments, *, scale, window=None):
    return ak.cudnn_attention(
        q, k, v, segments, scale=scale, sliding_window=window, implementation="xla"
    )


def _assert_real_tokens_close(ours, ref, segments, atol):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    real = np.asarray(segments) != 0
    assert np.isfinite(ours).all()
    err = np.abs(ours - ref)[real].max()
    assert err <= atol, f"max abs error on real tokens {err:.3g} > {atol}"


# (name, T, N, K, layout kind, window, softcap, block size)
CASES = [
    ("causal", 256, 4, 4, "single", None, None, 128),
    ("window", 256, 4, 4, "packed", 48, None, 128),
    ("gqa", 256, 4, 2, "packed", None, None, 128),
    ("mqa", 256, 4, 1, "packed", None, None, None),
    ("softcap", 256, 4, 2, "packed", None, 5.0, 128),
    ("left_pad_window", 256, 2, 1, "left_pad", 64, None, 128),
    ("unaligned_length", 200, 4, 2, "packed", 40, None, None),  # padded to 256 inside
]
CASE_IDS = [c[0] for c in CASES]
# jax.nn.dot_product_attention has no soft-cap (resolve_impl never picks cudnn with one).
CUDNN_CASES = [c for c in CASES if not c[6]]


@pytest.mark.parametrize("name,t,n,k,kind,window,softcap,block", CASES, ids=CASE_IDS)
def test_splash_equals_reference(name, t, n, k, kind, window, softcap, block):
    positions, segments = _layout(kind, t)
    q, kk, v = _qkv(t, n, k, spread=3.0 if softcap else 1.0)
    kw = dict(scale=H**-0.5, window=window, softcap=softcap)
    ref = _reference(q, kk, v, positions, segments, **kw)
    exact = numpy_attention(q, kk, v, positions, segments, **kw)
    ours = _splash(q, kk, v, segments, block_size=block, **kw)
    assert ours.shape == q.shape and ours.dtype == q.dtype
    _assert_real_tokens_close(ours, ref, segments, ATOL)
    _assert_real_tokens_close(ours, exact, segments, ATOL)
    np.testing.assert_allclose(np.asarray(ref), exact, atol=ATOL, rtol=0)  # all tokens


@pytest.mark.parametrize(
    "name,t,n,k,kind,window,softcap,block", CUDNN_CASES, ids=[c[0] for c in CUDNN_CASES]
)
def test_cudnn_arguments_equal_reference_under_xla(name, t, n, k, kind, window, softcap, block):
    positions, segments = _layout(kind, t)
    q, kk, v = _qkv(t, n, k)
    kw = dict(scale=H**-0.5, window=window)
    ref = _reference(q, kk, v, positions, segments, **kw)
    ours = _cudnn_as_xla(q, kk, v, segments, **kw)
    assert ours.shape == q.shape and ours.dtype == q.dtype
    _assert_real_tokens_close(ours, ref, segments, ATOL)


def test_cudnn_arguments():
    q, kk, v = _qkv(8, 4, 2)
    segments = jnp.asarray([[1, 1, 1, 2, 2, 0, 0, 0]] * B, jnp.int32)
    args = ak.cudnn_arguments(q, kk, v, segments, scale=0.5, sliding_window=3)
    assert args["is_causal"] is True and args["scale"] == 0.5
    assert args["local_window_size"] == (2, 0)  # keys with 0 <= t - s <= 2
    assert args["mask"].shape == (B, 1, 8, 8) and args["mask"].dtype == jnp.bool_
    assert bool(args["mask"][0, 0, 4, 3]) and not bool(args["mask"][0, 0, 3, 2])
    assert ak.cudnn_arguments(q, kk, v, segments, scale=1.0)["local_window_size"] is None


def test_kernels_bfloat16_within_bfloat16_tolerance():
    positions, segments = _layout("packed", 256)
    q, kk, v = _qkv(256, 4, 2, dtype=jnp.bfloat16)
    kw = dict(scale=H**-0.5, window=48)
    exact = numpy_attention(q, kk, v, positions, segments, **kw)
    ref = _reference(q, kk, v, positions, segments, **kw)
    _assert_real_tokens_close(ref, exact, segments, 2e-2)
    for ours in (
        _splash(q, kk, v, segments, block_size=128, **kw),
        _cudnn_as_xla(q, kk, v, segments, **kw),
    ):
        assert ours.dtype == jnp.bfloat16
        # The reference rounds the probabilities to bfloat16; splash keeps them in float32.
        _assert_real_tokens_close(ours, exact, segments, 2e-2)
        _assert_real_tokens_close(ours, ref, segments, 2e-2)


@pytest.mark.parametrize(
    "window,softcap,dtype,rtol",
    [(None, None, jnp.float32, 2e-6), (48, 5.0, jnp.float32, 2e-6), (48, None, jnp.bfloat16, 2e-2)],
)
def test_splash_gradients_equal_reference(window, softcap, dtype, rtol):
    """d/d(q, k, v) of a loss that weights real tokens only (padding carries no loss).

    Errors are relative to the largest gradient entry (about 10 here).
    """
    positions, segments = _layout("packed", 256)
    q, kk, v = _qkv(256, 4, 2, dtype=dtype, spread=2.0)
    weights = np.random.default_rng(1).normal(size=q.shape) * (segments != 0)[..., None, None]
    kw = dict(scale=H**-0.5, window=window, softcap=softcap)

    def loss(fn):
        return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * weights), argnums=(0, 1, 2)))

    grads = loss(lambda q, k, v: _splash(q, k, v, segments, block_size=128, **kw))(q, kk, v)
    ref = loss(lambda q, k, v: _reference(q, k, v, positions, segments, **kw))(q, kk, v)
    for name, ours, theirs in zip("qkv", grads, ref):
        assert ours.dtype == dtype
        ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
        err = np.abs(ours - theirs).max() / np.abs(theirs).max()
        assert err <= rtol, f"d{name}: max error {err:.3g} of the largest entry"


# Tiny models: Llama (full attention) and Gemma3 (sliding + full layers, query scale).
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
)
FAMILY_KW = {
    "llama": dict(),
    "gemma3": dict(layer_types=("sliding", "full"), sliding_window=24, query_pre_attn_scalar=16),
}


def _tiny_models(family):
    """{impl: Transformer} for "reference" and "splash", with the same parameters."""
    models = {}
    for impl in ("reference", "splash"):
        config = dj.models.make_config(family, **TINY, **FAMILY_KW[family], attention_impl=impl)
        models[impl] = dj.models.Transformer(config, rngs=nnx.Rngs(0))
    return models


@jax.jit
def _logits_and_qkv(graphdef, state, ids, positions, segments):
    model = nnx.merge(graphdef, state)
    out = model.forward(ids, positions=positions, segment_ids=segments, output_attention_qkv=True)
    return out.logits, out.attention_qkv


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_transformer_splash_equals_reference(family):
    positions, segments = _layout("packed", 128)
    ids = np.random.default_rng(0).integers(0, TINY["vocab_size"], (B, 128)).astype(np.int32)
    outs = {
        impl: _logits_and_qkv(*nnx.split(model), ids, positions, segments)
        for impl, model in _tiny_models(family).items()
    }
    (ours, our_qkv), (ref, ref_qkv) = outs["splash"], outs["reference"]
    _assert_real_tokens_close(ours, ref, segments, 1e-5)
    assert len(our_qkv) == TINY["num_layers"]
    for a, b in zip(our_qkv, ref_qkv):  # output_attention_qkv still returns every layer's q, k, v
        for name in "qkv":
            _assert_real_tokens_close(a[name], b[name], segments, 1e-5)


def test_decoding_with_a_cache_uses_the_reference():
    """attention_impl only affects the no-cache path: generation is identical."""
    prompt = np.random.default_rng(0).integers(0, TINY["vocab_size"], (B, 6)).astype(np.int32)
    gens = [
        dj.models.generate(model, prompt, max_new_tokens=3, return_logits=True)
        for model in _tiny_models("gemma3").values()
    ]
    np.testing.assert_array_equal(np.asarray(gens[0].logits), np.asarray(gens[1].logits))


@pytest.mark.parametrize("n,k", [(4, 2), (4, 1)], ids=["kv_heads_split", "kv_heads_repeated"])
def test_splash_under_mesh_equals_unsharded_reference(n, k):
    """Batch over data+fsdp (2 x 2), heads over tensor (2): the kernel runs in a shard_map.

    With one kv head the tensor axis cannot split the kv heads: k, v are repeated per q head.
    """
    t, b = 256, 4
    mesh = sharding.make_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)))
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(b, t, n, H)), jnp.float32)
    kk, v = (jnp.asarray(rng.normal(size=(b, t, k, H)), jnp.float32) for _ in range(2))
    positions, segments = (np.concatenate([x, x]) for x in _layout("packed", t))
    kw = dict(scale=H**-0.5, window=40, softcap=None)
    ref = _reference(q, kk, v, positions, segments, **kw)
    rules = sharding.DEFAULT_RULES
    heads = sharding.named_sharding(mesh, ("batch", "length", "heads", "head_dim"), rules)
    kv_axis = "kv_heads" if k % 2 == 0 else None  # one kv head: replicated over tensor
    kv = sharding.named_sharding(mesh, ("batch", "length", kv_axis, "head_dim"), rules)
    with sharding.use_mesh(mesh, rules):
        q_s, k_s, v_s = jax.device_put(q, heads), jax.device_put(kk, kv), jax.device_put(v, kv)
        seg_s = jax.device_put(segments, sharding.batch_sharding(mesh))
        fn = jax.jit(
            lambda q, k, v, s: ak.splash_attention(
                q, k, v, s, scale=kw["scale"], sliding_window=40, block_size=128
            )
        )
        text = fn.lower(q_s, k_s, v_s, seg_s).as_text()
        ours = fn(q_s, k_s, v_s, seg_s)
    assert "manual" in text  # the kernel runs in a shard_map (sdy.manual_computation)
    _assert_real_tokens_close(ours, ref, segments, ATOL)


def test_transformer_splash_under_mesh_equals_unsharded_reference():
    """A sharded tiny Gemma3 (parameters by the default rules) with splash in a shard_map."""
    mesh = sharding.make_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)))
    positions, segments = (np.concatenate([x, x]) for x in _layout("packed", 128))
    ids = np.random.default_rng(0).integers(0, TINY["vocab_size"], segments.shape)
    ids = ids.astype(np.int32)
    models = _tiny_models("gemma3")
    ref, _ = _logits_and_qkv(*nnx.split(models["reference"]), ids, positions, segments)
    with sharding.use_mesh(mesh):
        model = sharding.shard_model(models["splash"], mesh)
        place = sharding.batch_sharding(mesh)
        args = [jax.device_put(x, place) for x in (ids, positions, segments)]
        ours, _ = _logits_and_qkv(*nnx.split(model), *args)
    _assert_real_tokens_close(ours, ref, segments, 1e-5)


@pytest.mark.parametrize(
    "impl,platform,softcap,dtype,expected",
    [
        ("auto", "tpu", None, "float32", "splash"),
        ("auto", "gpu", None, "bfloat16", "cudnn"),
        ("auto", "gpu", 50.0, "bfloat16", "reference"),  # no soft-cap in the cuDNN API
        ("auto", "gpu", None, "float32", "reference"),  # no float32 cuDNN flash attention
        ("auto", "cpu", None, "bfloat16", "reference"),
        ("reference", "tpu", None, "bfloat16", "reference"),
        ("splash", "cpu", None, "float32", "splash"),
        ("cudnn", "gpu", None, "float16", "cudnn"),
    ],
)
def test_resolve_impl(impl, platform, softcap, dtype, expected):
    assert ak.resolve_impl(impl, softcap=softcap, dtype=dtype, platform=platform) == expected


@pytest.mark.parametrize(
    "impl,platform,softcap,dtype,match",
    [
        ("cudnn", "cpu", None, "bfloat16", "needs a GPU"),
        ("cudnn", "tpu", None, "bfloat16", "needs a GPU"),
        ("cudnn", "gpu", 50.0, "bfloat16", "soft-cap"),
        ("cudnn", "gpu", None, "float32", "bfloat16 or float16"),
        ("splash", "gpu", None, "bfloat16", "TPU"),
        ("flash", "cpu", None, "bfloat16", "not one of"),
    ],
)
def test_resolve_impl_errors(impl, platform, softcap, dtype, match):
    with pytest.raises(ValueError, match=match):
        ak.resolve_impl(impl, softcap=softcap, dtype=dtype, platform=platform)


def test_cudnn_on_cpu_raises_before_compilation():
    config = dj.models.make_config("llama", **TINY, attention_impl="cudnn")
    model = dj.models.Transformer(config, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="attention_impl='cudnn' needs a GPU"):
        jax.eval_shape(lambda: model(jnp.zeros((1, 8), jnp.int32)))


@pytest.mark.parametrize(
    "t,block,expected",
    [
        (256, None, (256, 256)),
        (200, None, (256, 256)),
        (640, None, (640, 128)),
        (1000, None, (1024, 512)),
        (256, 128, (256, 128)),
        (12, None, (128, 128)),
    ],
)
def test_splash_layout(t, block, expected):
    assert ak.splash_layout(t, block) == expected


def test_tpu_aot_compile_picks_splash():
    """Compile a tiny Llama's forward and backward for a 4-chip TPU v5e (libtpu, no TPU)."""
    pytest.importorskip("libtpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server on this machine
    # Compiling needs no TPU, so another process holding libtpu's lockfile must not stop it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(
        platform="tpu",
        topology_name="v5e:2x2",
        chip_config_name="default",
        chips_per_host_bounds=(2, 2, 1),
        num_slices=1,
    )
    mesh = sharding.make_mesh((("data", 2), ("tensor", 2)), devices=topo.devices)
    rules = sharding.DEFAULT_RULES
    config = dj.models.make_config("llama", **TINY, dtype="bfloat16", attention_impl="auto")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: dj.models.Transformer(config)))
    shardings = sharding.state_shardings(state, mesh, rules)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
    tokens = jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=sharding.batch_sharding(mesh))

    def loss(state, ids, segments):
        model = nnx.merge(graphdef, state)
        return model.forward(ids, segment_ids=segments).logits.mean()

    with sharding.use_mesh(mesh, rules):
        assert ak.resolve_impl(config.attention_impl) == "splash"
        forward = jax.jit(loss).lower(abstract, tokens, tokens).compile()
        backward = jax.jit(jax.grad(loss)).lower(abstract, tokens, tokens).compile()
    assert "tpu_custom_call" in forward.as_text()
    assert "splash_mha_fwd" in forward.as_text()
    assert "splash_mha_dkv" in backward.as_text()
    assert isinstance(forward.output_shardings, NamedSharding) or forward.output_shardings
