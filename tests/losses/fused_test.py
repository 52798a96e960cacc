"""Fused (chunked) head + loss equals the unfused computation, value and gradient, for every
divergence and top-k semantics; exact accumulation; no [B, T, V] buffer; sharded == unsharded."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from distill_jax import sharding
from distill_jax.losses import composite, fused, topk
from distill_jax.losses import divergences as dv
from distill_jax.losses import preference as pf
from distill_jax.losses.tokens import cross_entropy, entropy

B, T, D, DT, V = 2, 11, 8, 6, 29


def _inputs(seed=0, t=T, v=V):
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    mask = jnp.asarray(rng.random((B, t)) > 0.25).at[0, 0].set(True)
    targets = jnp.asarray(rng.integers(0, v, (B, t)), jnp.int32)
    return f(B, t, D), f(D, v) * 0.7, f(B, t, DT), f(DT, v) * 0.7, mask, targets


KNOBS = {
    "forward_kl": {},
    "reverse_kl": {},
    "jsd": {"beta": 0.3},
    "skew_kl": {"alpha": 0.1},
    "skew_reverse_kl": {"alpha": 0.1},
    "tvd": {},
    "hellinger": {},
    "ab": {"alpha": 0.5, "beta": 0.3},
    "akl": {"mu": 0.5},
    "todi": {},
    "taid": {"t": 0.6},
    "sinkhorn": {"epsilon": 0.1, "num_iters": 10},
    "multilevel_ot": {"top_k": 7, "epsilon": 0.1, "num_iters": 10, "log_weight": 0.5},
}
assert set(KNOBS) == set(dv.DIVERGENCES)  # every divergence is covered


def _dense_loss(name, knobs, tau, mask, ht, wt):
    def loss(hs, ws):
        values = dv.divergence(name, hs @ ws, ht @ wt, mask, temperature=tau, **knobs)
        return jnp.sum(values)

    return loss


def _assert_close(a, b, tol=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, np.abs(b).max()))


@pytest.mark.parametrize("name", sorted(KNOBS))
@pytest.mark.parametrize("implementation", fused.IMPLEMENTATIONS)
def test_fused_equals_unfused_for_every_divergence(name, implementation):
    hs, ws, ht, wt, mask, _ = _inputs()
    tau = 2.0
    knobs = KNOBS[name]

    def fused_loss(hs, ws):
        total, count, metrics = fused.fused_distill_loss(
            hs,
            ws,
            teacher_hidden=ht,
            teacher_head=wt,
            mask=mask,
            terms={name: dict(temperature=tau, **knobs)},
            chunk_size=4,
            vocab_block=8,
            implementation=implementation,
        )
        return total, (count, metrics)

    (value, (count, metrics)), grads = jax.jit(
        jax.value_and_grad(fused_loss, argnums=(0, 1), has_aux=True)
    )(hs, ws)
    dense = _dense_loss(name, knobs, tau, mask, ht, wt)
    ref_value, ref_grads = jax.value_and_grad(dense, argnums=(0, 1))(hs, ws)
    _assert_close(value, ref_value)
    for g, r in zip(grads, ref_grads):
        _assert_close(g, r)
    assert float(count) == float(mask.sum())
    _assert_close(metrics[f"loss/{name}"][0], ref_value)


@pytest.mark.parametrize("chunk_size", [1, 7, T])
def test_chunk_sizes_and_all_terms_together(chunk_size):
    """CE + tempered KL + a scheduled-beta JSD + per-token temperatures, weights and softcaps."""
    hs, ws, ht, wt, mask, targets = _inputs(1)
    rng = np.random.default_rng(3)
    tau_tok = jnp.asarray(0.5 + rng.random((B, T)), jnp.float32)
    weights = jnp.asarray(rng.random((B, T)), jnp.float32)
    beta = jnp.asarray(0.25)  # traced: a schedule
    terms = {
        "forward_kl": {"weight": 4.0, "temperature": 2.0},
        "ce": {"weight": 0.5},
        "jsd": {"beta": beta, "weight": 0.3},
        "idts": {"divergence": "reverse_kl", "temperature": tau_tok, "weight": 1.5},
    }
    cap_s, cap_t = 5.0, 7.0

    def fused_loss(hs, ws):
        return fused.fused_distill_loss(
            hs,
            ws,
            teacher_hidden=ht,
            teacher_head=wt,
            mask=mask,
            weights=weights,
            targets=targets,
            terms=terms,
            student_softcap=cap_s,
            teacher_softcap=cap_t,
            chunk_size=chunk_size,
        )[0]

    def dense_loss(hs, ws):
        zs = jnp.tanh(hs @ ws / cap_s) * cap_s
        zt = jnp.tanh(ht @ wt / cap_t) * cap_t
        m = mask * weights
        per = (
            4.0 * dv.forward_kl(zs, zt, temperature=2.0)
            + 0.5 * cross_entropy(zs, targets)
            + 0.3 * dv.jsd(zs, zt, beta=0.25)
            + 1.5 * dv.reverse_kl(zs, zt, temperature=tau_tok)
        )
        return jnp.sum(per * m)

    value, grads = jax.jit(jax.value_and_grad(fused_loss, argnums=(0, 1)))(hs, ws)
    ref, ref_grads = jax.value_and_grad(dense_loss, argnums=(0, 1))(hs, ws)
    _assert_close(value, ref)
    for g, r in zip(grads, ref_grads):
        _assert_close(g, r)


@pytest.mark.parametrize("semantics", topk.SEMANTICS)
@pytest.mark.parametrize("implementation", fused.IMPLEMENTATIONS)
def test_fused_sparse_teacher_equals_unfused(semantics, implementation):
    hs, ws, ht, wt, mask, _ = _inputs(2)
    sparse = topk.sparse_teacher(ht @ wt, 5, temperature=1.0)
    names = ["forward_kl"] if semantics == "renorm_teacher" else ["forward_kl", "tvd", "jsd"]
    terms = {n: {"temperature": 2.0, "semantics": semantics} for n in names}

    def fused_loss(hs, ws):
        out = fused.fused_distill_loss(
            hs,
            ws,
            sparse_teacher=sparse,
            mask=mask,
            terms=terms,
            chunk_size=3,
            implementation=implementation,
        )
        return out[0], out[2]

    def dense_loss(hs, ws):
        return sum(
            jnp.sum(
                topk.topk_divergence(n, hs @ ws, sparse, mask, semantics=semantics, temperature=2.0)
            )
            for n in names
        )

    (value, metrics), grads = jax.jit(jax.value_and_grad(fused_loss, argnums=(0, 1), has_aux=True))(
        hs, ws
    )
    ref, ref_grads = jax.value_and_grad(dense_loss, argnums=(0, 1))(hs, ws)
    _assert_close(value, ref)
    for g, r in zip(grads, ref_grads):
        _assert_close(g, r)
    mass = topk.captured_mass(hs @ ws, sparse, mask)["topk/teacher_mass"]
    _assert_close(metrics["topk/teacher_mass"][0], mass[0])


def test_two_micro_batches_with_global_count_equal_one_batch():
    hs, ws, ht, wt, mask, _ = _inputs(4)
    mask = mask.at[0, 5:].set(False)  # unequal valid counts in the two halves
    run = lambda sl, m: fused.fused_distill_loss(
        hs[sl], ws, teacher_hidden=ht[sl], teacher_head=wt, mask=m[sl], chunk_size=4
    )
    s1, c1, _ = run(slice(0, 1), mask)
    s2, c2, _ = run(slice(1, 2), mask)
    s, c, _ = run(slice(0, 2), mask)
    _assert_close((s1 + s2) / (c1 + c2), s / c)
    assert float(c1) != float(c2)  # a per-micro-batch mean would differ (TRL #4719)
    assert abs(float(s1 / c1 + s2 / c2) / 2 - float(s / c)) > 1e-4


def test_temperature_squared_clip_and_entropies():
    hs, ws, ht, wt, mask, _ = _inputs(8)
    tau_tok = jnp.asarray(1 + np.random.default_rng(1).random((B, T)), jnp.float32)
    cap = 0.2
    terms = {
        "kd": {"divergence": "forward_kl", "temperature": tau_tok, "temperature_squared": True},
        "clipped": {"divergence": "reverse_kl", "clip": jnp.asarray(cap)},
        "hs": {"divergence": "student_entropy", "temperature": 2.0, "weight": 0.1},
    }
    got = jax.jit(
        jax.value_and_grad(
            lambda hs, ws: fused.fused_distill_loss(
                hs, ws, teacher_hidden=ht, teacher_head=wt, mask=mask, terms=terms, chunk_size=4
            )[0],
            argnums=(0, 1),
        )
    )(hs, ws)

    def dense(hs, ws):
        zs, zt = hs @ ws, ht @ wt
        rkl = dv.reverse_kl(zs, zt)
        per = (
            tau_tok**2 * dv.forward_kl(zs, zt, temperature=tau_tok)
            + jnp.where(rkl > cap, jax.lax.stop_gradient(cap), rkl)
            + 0.1 * entropy(zs, temperature=2.0)
        )
        return jnp.sum(per * mask)

    ref = jax.value_and_grad(dense, argnums=(0, 1))(hs, ws)
    _assert_close(got[0], ref[0])
    for g, r in zip(got[1], ref[1]):
        _assert_close(g, r)
    values = fused.fused_per_token(
        hs,
        ws,
        teacher_hidden=ht,
        teacher_head=wt,
        mask=mask,
        terms={"teacher_entropy": {}, "clipped": {"divergence": "reverse_kl", "clip": cap}},
    )
    _assert_close(values["teacher_entropy"], entropy(ht @ wt, mask))
    clipped = np.asarray(values["clipped"])
    assert clipped.max() <= cap + 1e-7 and (clipped == np.float32(cap)).any()


def test_per_token_values_equal_unfused():
    hs, ws, ht, wt, mask, targets = _inputs(5)
    out = jax.jit(
        lambda hs, ws: fused.fused_per_token(
            hs,
            ws,
            teacher_hidden=ht,
            teacher_head=wt,
            mask=mask,
            targets=targets,
            terms={"hellinger": {}, "reverse_kl": {"temperature": 2.0}, "ce": {}},
            chunk_size=4,
        )
    )(hs, ws)
    zs, zt = hs @ ws, ht @ wt
    _assert_close(out["hellinger"], dv.hellinger(zs, zt, mask))
    _assert_close(out["reverse_kl"], dv.reverse_kl(zs, zt, mask, temperature=2.0))
    _assert_close(out["ce"], cross_entropy(zs, targets, mask))


def _temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_no_batch_by_length_by_vocab_buffer():
    t, v = 256, 4096
    hs, ws, ht, wt, mask, _ = _inputs(6, t=t, v=v)
    full = B * t * v * 4  # one [B, T, V] float32 array

    def loss(implementation):
        return lambda hs, ws: fused.fused_distill_loss(
            hs,
            ws,
            teacher_hidden=ht,
            teacher_head=wt,
            mask=mask,
            chunk_size=16,
            implementation=implementation,
        )[0]

    for implementation in fused.IMPLEMENTATIONS:
        grad = jax.grad(loss(implementation), argnums=(0, 1))
        assert _temp_bytes(grad, hs, ws) < full / 2, implementation
    naive = jax.grad(_dense_loss("forward_kl", {}, 1.0, mask, ht, wt), argnums=(0, 1))
    assert _temp_bytes(naive, hs, ws) > 2 * full  # the check can fail: naive is far above


@pytest.mark.parametrize("implementation", fused.IMPLEMENTATIONS)
@pytest.mark.parametrize("sparse", [False, True])
def test_vocab_sharded_equals_unsharded(implementation, sparse):
    v = 32
    hs, ws, ht, wt, mask, targets = _inputs(7, t=12, v=v)
    mesh = sharding.make_mesh((("data", 2), ("fsdp", 1), ("tensor", 4), ("expert", 1)))
    teacher = (
        dict(sparse_teacher=topk.sparse_teacher(ht @ wt, 4))
        if sparse
        else dict(teacher_hidden=ht, teacher_head=wt)
    )
    terms = {"forward_kl": {"temperature": 2.0}, "ce": {"weight": 0.5}}

    def loss(hs, ws, teacher):
        out = fused.fused_distill_loss(
            hs,
            ws,
            mask=mask,
            targets=targets,
            terms=terms,
            chunk_size=5,
            implementation=implementation,
            **teacher,
        )
        return out[0], out[2]

    grad_fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    (ref, ref_metrics), ref_grads = jax.jit(grad_fn)(hs, ws, teacher)
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec)))
    hs_s, ws_s = put(hs, ("data",)), put(ws, (None, "tensor"))
    if not sparse:
        teacher = dict(teacher_hidden=put(ht, ("data",)), teacher_head=put(wt, (None, "tensor")))
    with sharding.use_mesh(mesh):
        (value, metrics), grads = jax.jit(grad_fn)(hs_s, ws_s, teacher)
    assert grads[1].sharding.spec == PartitionSpec(None, "tensor")
    _assert_close(value, ref)
    for g, r in zip(grads, ref_grads):
        _assert_close(g, r)
    for k in ref_metrics:
        _assert_close(metrics[k][0], ref_metrics[k][0])


def test_bad_inputs_are_clear_errors():
    hs, ws, ht, wt, mask, _ = _inputs()
    kw = dict(teacher_hidden=ht, teacher_head=wt)
    with pytest.raises(ValueError, match="V=29.*bridge"):
        fused.fused_distill_loss(hs, ws, teacher_hidden=ht, teacher_head=wt[:, :20])
    with pytest.raises(ValueError, match="exactly one teacher"):
        fused.fused_distill_loss(hs, ws, **kw, sparse_teacher=topk.sparse_teacher(ht @ wt, 2))
    with pytest.raises(ValueError, match=r"\['forward_kl'\] need a teacher"):
        fused.fused_distill_loss(hs, ws)
    with pytest.raises(ValueError, match="needs targets"):
        fused.fused_distill_loss(hs, ws, **kw, terms={"ce": {}})
    with pytest.raises(ValueError, match="unknown divergence 'fkl'"):
        fused.fused_distill_loss(hs, ws, **kw, terms={"fkl": {}})
    with pytest.raises(ValueError, match="does not match hidden width"):
        fused.fused_distill_loss(hs, ws.T, **kw)
    with pytest.raises(ValueError, match="per-token temperature must have shape"):
        fused.fused_distill_loss(hs, ws, **kw, terms={"tvd": {"temperature": jnp.ones((3, 3))}})


@pytest.mark.parametrize("implementation", fused.IMPLEMENTATIONS)
def test_ensemble_and_composite_teachers(implementation):
    hs, ws, ht, wt, mask, _ = _inputs(9)
    rng = np.random.default_rng(11)
    ht2 = jnp.asarray(rng.standard_normal((B, T, 5)), jnp.float32)
    wt2 = jnp.asarray(rng.standard_normal((5, V)) * 0.7, jnp.float32)
    ht3 = jnp.asarray(rng.standard_normal((B, T, 4)), jnp.float32)
    wt3 = jnp.asarray(rng.standard_normal((4, V)) * 0.7, jnp.float32)
    za, zb, zc = ht @ wt, ht2 @ wt2, ht3 @ wt3
    p_avg = 0.25 * jax.nn.softmax(za) + 0.75 * jax.nn.softmax(zb)  # probability averaging
    cases = [
        (("probs", (0.25, 0.75)), (ht, ht2), (wt, wt2), jnp.log(p_avg)),
        (("logits", (1.0, 0.5, -0.5)), (ht, ht2, ht3), (wt, wt2, wt3), za + 0.5 * (zb - zc)),
    ]
    for combine, hidden, heads, z_ref in cases:
        f = lambda hs, ws, h=hidden, w=heads, c=combine: fused.fused_distill_loss(
            hs,
            ws,
            teacher_hidden=h,
            teacher_head=w,
            teacher_combine=c,
            mask=mask,
            temperature=2.0,
            chunk_size=4,
            implementation=implementation,
        )[0]
        ref = lambda hs, ws, z=z_ref: jnp.sum(dv.forward_kl(hs @ ws, z, mask, temperature=2.0))
        value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(hs, ws)
        ref_value, ref_grads = jax.value_and_grad(ref, argnums=(0, 1))(hs, ws)
        _assert_close(value, ref_value)
        for g, r in zip(grads, ref_grads):
            _assert_close(g, r)
    with pytest.raises(ValueError, match="Several teachers need teacher_combine"):
        fused.fused_distill_loss(hs, ws, teacher_hidden=(ht, ht2), teacher_head=(wt, wt2))


def np_aligndistil_logits(za, zb, zc, scale, max_alpha):
    """float64 reference: alpha_t = min(scale / (TV + 1e-6), max_alpha) and the composite."""
    za, zb, zc = (np.asarray(z, np.float64) for z in (za, zb, zc))

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    tv = 0.5 * np.abs(softmax(zb) - softmax(zc)).sum(-1)
    alpha = np.minimum(scale / (tv + 1e-6), max_alpha)
    return za + alpha[..., None] * (zb - zc), alpha


@pytest.mark.parametrize("implementation", fused.IMPLEMENTATIONS)
def test_composite_teacher_with_token_adaptive_alpha(implementation):
    hs, ws, ht, wt, mask, _ = _inputs(9)
    rng = np.random.default_rng(12)
    ht2 = jnp.asarray(rng.standard_normal((B, T, 5)), jnp.float32)
    wt2 = jnp.asarray(rng.standard_normal((5, V)) * 0.7, jnp.float32)
    ht3 = jnp.asarray(rng.standard_normal((B, T, 4)), jnp.float32)
    wt3 = jnp.asarray(rng.standard_normal((4, V)) * 0.7, jnp.float32)
    za, zb, zc = ht @ wt, ht2 @ wt2, ht3 @ wt3
    z_ref, alpha = np_aligndistil_logits(za, zb, zc, 0.2, 1.5)
    assert 0 < alpha.min() and alpha.max() <= 1.5 and alpha.min() < 1.5  # both regimes occur
    np.testing.assert_allclose(
        np.asarray(composite.token_adaptive_alpha(zb, zc, scale=0.2, max_alpha=1.5)),
        alpha,
        rtol=1e-5,
    )
    f = lambda hs, ws: fused.fused_distill_loss(
        hs,
        ws,
        teacher_hidden=(ht, ht2, ht3),
        teacher_head=(wt, wt2, wt3),
        teacher_combine=("aligndistil", (0.2, 1.5)),
        mask=mask,
        temperature=2.0,
        chunk_size=4,
        implementation=implementation,
    )[0]
    z_ref = jnp.asarray(z_ref, jnp.float32)
    ref = lambda hs, ws: jnp.sum(dv.forward_kl(hs @ ws, z_ref, mask, temperature=2.0))
    value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(hs, ws)
    ref_value, ref_grads = jax.value_and_grad(ref, argnums=(0, 1))(hs, ws)
    _assert_close(value, ref_value)
    for g, r in zip(grads, ref_grads):
        _assert_close(g, r)
    with pytest.raises(ValueError, match="needs three teachers"):
        fused.fused_distill_loss(
            hs,
            ws,
            teacher_hidden=(ht, ht2),
            teacher_head=(wt, wt2),
            teacher_combine=("aligndistil", (0.2, 1.5)),
        )


def test_composite_logits_limits():
    rng = np.random.default_rng(3)
    za, zb, zc = (jnp.asarray(rng.standard_normal((2, 3, 6)), jnp.float32) for _ in range(3))
    np.testing.assert_allclose(composite.composite_logits(za, zb, zc, 0.0), za)  # alpha = 0 -> a
    np.testing.assert_allclose(composite.composite_logits(za, zb, za, 1.0), zb, atol=1e-6)  # c = a
    per_token = jnp.full((2, 3), 0.5)
    np.testing.assert_allclose(
        composite.composite_logits(za, zb, zc, per_token),
        composite.composite_logits(za, zb, zc, 0.5),
        rtol=1e-6,
    )
    # Equal b and c: TV = 0, alpha_t sits at the cap; the rule is constant for autodiff.
    np.testing.assert_allclose(composite.token_adaptive_alpha(zb, zb, max_alpha=3.0), 3.0)
    g = jax.grad(lambda x: composite.token_adaptive_alpha(x, zc).sum())(zb)
    assert np.all(np.asarray(g) == 0)


@pytest.mark.parametrize("implementation", fused.IMPLEMENTATIONS)
def test_listmle_term_equals_unfused(implementation):
    hs, ws, ht, wt, mask, _ = _inputs(13)
    vocab_mask = jnp.arange(V) < V - 3  # padded vocabulary rows never enter the list
    knobs = {"k": 5, "normalization": "prefix"}

    def fused_loss(hs, ws):
        return fused.fused_distill_loss(
            hs,
            ws,
            teacher_hidden=ht,
            teacher_head=wt,
            mask=mask,
            vocab_mask=vocab_mask,
            terms={"listmle": dict(temperature=2.0, **knobs)},
            chunk_size=4,
            implementation=implementation,
        )[0]

    def dense(hs, ws):
        zs = jnp.where(vocab_mask, hs @ ws, -jnp.inf)
        zt = jnp.where(vocab_mask, ht @ wt, -jnp.inf)
        return jnp.sum(pf.listmle(zs, zt, mask, temperature=2.0, **knobs))

    value, grads = jax.jit(jax.value_and_grad(fused_loss, argnums=(0, 1)))(hs, ws)
    ref_value, ref_grads = jax.value_and_grad(dense, argnums=(0, 1))(hs, ws)
    _assert_close(value, ref_value)
    for g, r in zip(grads, ref_grads):
        _assert_close(g, r)
