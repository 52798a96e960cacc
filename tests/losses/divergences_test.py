"""Divergences against float64 NumPy formulas written here, METHODS.md reference values, and
properties (zero at equality, direction, masks, dtypes, extreme logits, finite differences)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import losses
from distill_jax.losses import divergences as dv

# ------------------------------------------------------------------- float64 NumPy references


def np_softmax(z, tau=1.0):
    z = np.asarray(z, np.float64) / tau
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _xlog(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a > 0, a * np.log(a / b), 0.0)


def np_kl(p, q):
    return _xlog(p, q).sum(-1)


def np_jsd(p, q, beta):
    if beta == 0:
        return np_kl(p, q)
    if beta == 1:
        return np_kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * np_kl(p, m) + (1 - beta) * np_kl(q, m)


def np_ab(p, q, a, b):
    s = a + b
    return (-1 / (a * b) * (p**a * q**b - a / s * p**s - b / s * q**s)).sum(-1)


def np_akl(p, q, mu):
    order = np.argsort(p, -1, kind="stable")
    ps, qs = np.take_along_axis(p, order, -1), np.take_along_axis(q, order, -1)
    tail = np.cumsum(ps, -1) < mu
    gap = np.abs(ps - qs)
    gh, gt = (gap * ~tail).sum(-1), (gap * tail).sum(-1)
    return gh / (gh + gt + 1e-12) * np_kl(p, q) + gt / (gh + gt + 1e-12) * np_kl(q, p)


def np_taid(p, q, t):
    zt = (1 - t) * np.log(q) + t * np.log(p)
    pt = np_softmax(zt)
    return -(pt * np.log(q)).sum(-1)


NP_REFS = {
    "forward_kl": lambda p, q: np_kl(p, q),
    "reverse_kl": lambda p, q: np_kl(q, p),
    "jsd": lambda p, q, beta=0.5: np_jsd(p, q, beta),
    "skew_kl": lambda p, q, alpha=0.1: np_kl(p, alpha * p + (1 - alpha) * q),
    "skew_reverse_kl": lambda p, q, alpha=0.1: np_kl(q, alpha * q + (1 - alpha) * p),
    "tvd": lambda p, q: 0.5 * np.abs(p - q).sum(-1),
    "hellinger": lambda p, q: np.sqrt(0.5 * ((np.sqrt(p) - np.sqrt(q)) ** 2).sum(-1)),
    "ab": lambda p, q, alpha=1.0, beta=1.0: np_ab(p, q, alpha, beta),
    "akl": lambda p, q, mu=0.5: np_akl(p, q, mu),
    "todi": lambda p, q: (
        (p / (p + q)) * p * np.log(p / q) + (q / (p + q)) * q * np.log(q / p)
    ).sum(-1),
    "taid": lambda p, q, t=0.4: np_taid(p, q, t),
}

# (name, knobs) grid: defaults plus the knob values the literature uses.
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.9}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("skew_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.3}),
    ("tvd", {}),
    ("hellinger", {}),
    ("ab", {"alpha": 0.5, "beta": 0.5}),
    ("ab", {"alpha": 1.0, "beta": 1.0}),
    ("ab", {"alpha": 0.2, "beta": 0.7}),
    ("akl", {"mu": 0.5}),
    ("todi", {}),
    ("taid", {"t": 0.4}),
    ("taid", {"t": 0.8}),
]
CASE_IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for n, kw in CASES]


def _logits(seed, shape=(2, 3, 11), scale=3.0):
    rng = np.random.default_rng(seed)
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def _jit(name, **knobs):
    return jax.jit(
        lambda s, t, m=None, tau=1.0: losses.divergence(name, s, t, m, temperature=tau, **knobs)
    )


# ---------------------------------------------------------------------- reference values


R_P, R_Q = np.array([0.7, 0.2, 0.1]), np.array([0.5, 0.3, 0.2])
Z_T, Z_S = np.array([2.0, 1.0, 0.0, -1.0]), np.array([1.0, 1.0, 0.0, 0.0])


@pytest.mark.parametrize(
    "name,knobs,expected",
    [  # METHODS.md section 1, reference pair R
        ("forward_kl", {}, 0.085123),
        ("reverse_kl", {}, 0.092033),
        ("tvd", {}, 0.2),
        ("hellinger", {}, 0.148397),
        ("jsd", {"beta": 0.5}, 0.021901),
        ("jsd", {"beta": 0.1}, 0.0076947),
        ("jsd", {"beta": 0.9}, 0.0081848),
        ("skew_kl", {"alpha": 0.1}, 0.069578),
        ("skew_reverse_kl", {"alpha": 0.1}, 0.072828),
        ("ab", {"alpha": 0.5, "beta": 0.5}, 0.088087),
        ("ab", {"alpha": 1.0, "beta": 1.0}, 0.03),
        ("ab", {"alpha": 1.0, "beta": 1e-6}, 0.085123),
        ("ab", {"alpha": 1e-6, "beta": 1.0}, 0.092033),
        ("akl", {"mu": 0.5}, 0.088578),
        ("todi", {}, 0.177156),
    ],
)
def test_reference_pair_values(name, knobs, expected):
    value = _jit(name, **knobs)(jnp.log(R_Q), jnp.log(R_P))
    np.testing.assert_allclose(float(value), expected, atol=2e-6)


def test_jsd_is_not_the_easydel_convention():
    # EasyDeL's mixture gives 0.065645 at beta=0.1 (METHODS.md 1.3); GKD/TRL gives 0.0076947.
    value = float(dv.jsd(jnp.log(R_Q), jnp.log(R_P), beta=0.1))
    assert abs(value - 0.0076947) < 1e-6 and abs(value - 0.065645) > 1e-2


def test_normalized_jsd_is_continuous_with_its_endpoints():
    s, t = jnp.log(R_Q), jnp.log(R_P)
    # float32 cancellation grows as beta -> 0; at 1e-3 the limit is still within 1e-3 relative.
    near0 = float(dv.jsd(s, t, beta=1e-3, normalize=True))
    near1 = float(dv.jsd(s, t, beta=1 - 1e-3, normalize=True))
    ref0 = np_jsd(R_P, R_Q, 1e-3) / (1e-3 * (1 - 1e-3))
    np.testing.assert_allclose(near0, ref0, rtol=1e-3)
    np.testing.assert_allclose(ref0, 0.085123, rtol=5e-3)
    np.testing.assert_allclose(near1, 0.092033, rtol=5e-3)


def test_temperature_reference_values_and_limit():
    s, t = jnp.asarray(Z_S), jnp.asarray(Z_T)
    np.testing.assert_allclose(float(dv.forward_kl(s, t)), 0.178075, atol=1e-6)
    np.testing.assert_allclose(4 * float(dv.forward_kl(s, t, temperature=2.0)), 0.226578, atol=1e-6)
    a, b = Z_T - Z_T.mean(), Z_S - Z_S.mean()
    limit = ((a - b) ** 2).sum() / (2 * len(a))  # = 0.25: tau^2 KL as tau -> inf
    np.testing.assert_allclose(limit, 0.25)
    np.testing.assert_allclose(
        1e4 * float(dv.forward_kl(s, t, temperature=100.0)), limit, rtol=2e-2
    )


def test_taid_reference_target_and_endpoints():
    s, t = jnp.asarray(Z_S), jnp.asarray(Z_T)
    pt = np_softmax(0.6 * np.log(np_softmax(Z_S)) + 0.4 * np.log(np_softmax(Z_T)))
    np.testing.assert_allclose(pt, [0.480258, 0.321926, 0.118430, 0.079386], atol=1e-6)
    q, p = np_softmax(Z_S), np_softmax(Z_T)
    np.testing.assert_allclose(float(dv.taid(s, t, t=1.0)), -(p * np.log(q)).sum(), rtol=1e-6)
    grad0 = jax.grad(lambda x: dv.taid(x, t, t=0.0))(s)
    np.testing.assert_allclose(grad0, 0.0, atol=1e-6)  # the target is the student itself


# ------------------------------------------------------------------ against NumPy, properties


@pytest.mark.parametrize("name,knobs", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_matches_numpy(name, knobs, tau):
    s, t = _logits(0), _logits(1)
    got = _jit(name, **knobs)(s, t, None, tau)
    want = NP_REFS[name](np_softmax(t, tau), np_softmax(s, tau), **knobs)
    assert got.shape == s.shape[:-1] and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,knobs", CASES, ids=CASE_IDS)
def test_zero_at_equality_and_nonnegative(name, knobs):
    s, t = _logits(2), _logits(3)
    f = _jit(name, **knobs)
    if name == "taid":  # cross-entropy form: H(p_t) at equality, and CE(p_t, q) >= H(p_t)
        np.testing.assert_allclose(f(s, s), losses.entropy(jnp.asarray(s)), rtol=1e-5)
        q = np_softmax(s)
        pt = np_softmax((1 - knobs["t"]) * np.log(q) + knobs["t"] * np.log(np_softmax(t)))
        assert np.all(np.asarray(f(s, t)) >= -(pt * np.log(pt)).sum(-1) - 1e-5)
        return
    np.testing.assert_allclose(f(s, s), 0.0, atol=2e-6)
    np.testing.assert_allclose(f(s, s + 5.0), 0.0, atol=2e-6)  # shift invariance
    assert np.all(np.asarray(f(s, t)) >= -1e-6)


def test_direction_of_kl():
    s, t = _logits(4), _logits(5)
    np.testing.assert_allclose(dv.forward_kl(s, t), dv.reverse_kl(t, s), rtol=1e-6)
    np.testing.assert_allclose(
        dv.forward_kl(s, t), NP_REFS["forward_kl"](np_softmax(t), np_softmax(s)), rtol=1e-5
    )
    assert not np.allclose(dv.forward_kl(s, t), dv.reverse_kl(s, t), rtol=1e-2)
    # TRL's endpoints: beta = 0 is forward KL (teacher || student), beta = 1 reverse.
    np.testing.assert_array_equal(dv.jsd(s, t, beta=0.0), dv.forward_kl(s, t))
    np.testing.assert_array_equal(dv.jsd(s, t, beta=1.0), dv.reverse_kl(s, t))


def test_scheduled_beta_equals_static_beta():
    s, t = _logits(6), _logits(7)
    traced = jax.jit(lambda b: dv.jsd(s, t, beta=b))
    for beta in (0.0, 0.25, 0.9, 1.0):
        np.testing.assert_allclose(traced(beta), dv.jsd(s, t, beta=beta), rtol=1e-6, atol=1e-7)


def test_closed_form_gradients_of_kl():
    s, t = _logits(8, (5, 9)), _logits(9, (5, 9))
    q, p = np_softmax(s), np_softmax(t)
    g_fkl = jax.grad(lambda x: dv.forward_kl(x, t).sum())(s)
    np.testing.assert_allclose(g_fkl, q - p, atol=1e-6)
    rkl = np_kl(q, p)[:, None]
    g_rkl = jax.grad(lambda x: dv.reverse_kl(x, t).sum())(s)
    np.testing.assert_allclose(g_rkl, q * (np.log(q) - np.log(p) - rkl), atol=1e-5)


def _frozen_reference(name, knobs, s0, t):
    """NumPy value as a function of student logits, with the stop-gradient parts fixed at s0."""
    p = np_softmax(t)
    q0 = np_softmax(s0)
    if name == "akl":
        order = np.argsort(p, -1)
        ps, qs = np.take_along_axis(p, order, -1), np.take_along_axis(q0, order, -1)
        tail = np.cumsum(ps, -1) < knobs["mu"]
        gh, gt = (np.abs(ps - qs) * ~tail).sum(-1), (np.abs(ps - qs) * tail).sum(-1)
        return lambda x: (
            gh / (gh + gt + 1e-12) * np_kl(p, np_softmax(x))
            + gt / (gh + gt + 1e-12) * np_kl(np_softmax(x), p)
        ).sum()
    if name == "todi":
        w = p / (p + q0)
        return lambda x: (w * _xlog(p, np_softmax(x)) + (1 - w) * _xlog(np_softmax(x), p)).sum()
    if name == "taid":
        pt = np_softmax((1 - knobs["t"]) * np.log(q0) + knobs["t"] * np.log(p))
        return lambda x: -(pt * np.log(np_softmax(x))).sum()
    return lambda x: NP_REFS[name](p, np_softmax(x), **knobs).sum()


@pytest.mark.parametrize("name,knobs", CASES, ids=CASE_IDS)
def test_gradient_equals_finite_differences(name, knobs):
    s, t = _logits(10, (3, 6), 1.5), _logits(11, (3, 6), 1.5)
    g = np.asarray(jax.jit(jax.grad(lambda x: losses.divergence(name, x, t, **knobs).sum()))(s))
    f = _frozen_reference(name, knobs, s.astype(np.float64), t)
    rng = np.random.default_rng(0)
    for _ in range(3):
        v = rng.standard_normal(s.shape)
        h = 1e-5
        fd = (f(s + h * v) - f(s - h * v)) / (2 * h)
        np.testing.assert_allclose((g * v).sum(), fd, rtol=2e-4, atol=1e-6)


# ------------------------------------------------------------------------ robustness


ALL = CASES + [("sinkhorn", {})]
ALL_IDS = CASE_IDS + ["sinkhorn"]


@pytest.mark.parametrize("name,knobs", ALL, ids=ALL_IDS)
def test_bf16_and_huge_logits_are_finite(name, knobs):
    s, t = _logits(12), _logits(13)
    f = _jit(name, **knobs)
    bf = f(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16))
    assert bf.dtype == jnp.float32
    np.testing.assert_allclose(bf, f(s, t), rtol=0.1, atol=0.05)  # bf16 rounds the inputs only
    big_s, big_t = np.sign(s) * 1e4, np.sign(t) * 1e4
    out = f(big_s, big_t)
    grad = jax.grad(lambda x: losses.divergence(name, x, big_t, **knobs).sum())(big_s)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("name,knobs", ALL, ids=ALL_IDS)
def test_masked_rows_and_padded_vocab(name, knobs):
    s, t = _logits(14), _logits(15)
    mask = np.ones(s.shape[:-1], bool)
    mask[0] = False  # a fully masked row
    mask[1, 1] = False
    vocab = np.ones(s.shape[-1] + 3, bool)
    vocab[-3:] = False  # three padded vocabulary rows
    pad = lambda x: np.concatenate([x, np.full(x.shape[:-1] + (3,), 7.0, np.float32)], -1)
    fn = lambda x, y, m: losses.divergence(name, x, y, m, vocab_mask=vocab, **knobs)
    out = jax.jit(fn)(pad(s), pad(t), mask)
    ref = jax.jit(lambda x, y, m: losses.divergence(name, x, y, m, **knobs))(s, t, mask)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-6)
    assert np.all(np.asarray(out)[~mask] == 0)
    grad = jax.grad(lambda x: fn(x, pad(t), mask).sum())(pad(s))
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[..., -3:] == 0)
    assert np.all(np.asarray(grad)[~mask] == 0)  # zero-count rows contribute nothing
    if name != "sinkhorn":  # masked positions do not change the others
        np.testing.assert_allclose(
            np.asarray(out)[mask], np.asarray(fn(pad(s), pad(t), None))[mask], rtol=1e-5
        )


def test_per_token_temperature_broadcasts():
    s, t = _logits(16), _logits(17)
    tau = np.array([[1.0, 2.0, 0.5], [3.0, 1.0, 1.5]], np.float32)
    got = dv.forward_kl(s, t, temperature=tau)
    want = np_kl(np_softmax(t, tau[..., None]), np_softmax(s, tau[..., None]))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="Unknown divergence 'kll'.*forward_kl"):
        losses.divergence("kll", jnp.zeros((2, 3)), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="same shape.*bridge"):
        dv.forward_kl(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="beta=1.5"):
        dv.jsd(jnp.zeros((2, 3)), jnp.zeros((2, 3)), beta=1.5)


# --------------------------------------------------------------------------------- Sinkhorn


def np_sinkhorn(cost, a, b, eps, iters):
    """Plain (not log-domain) Sinkhorn-Knopp in float64: P = diag(u) K diag(v), ending with a
    row update so that each student token carries exactly its mass."""
    k = np.exp(-cost / eps)
    v = np.ones_like(b)
    for _ in range(iters):
        u = a / (k @ v)
        v = b / (k.T @ u)
    u = a / (k @ v)
    return u[:, None] * k * v[None, :]


def test_sinkhorn_solver_reference_values():
    x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    cost = ((x[:, None] - x[None]) ** 2).sum(-1)
    a = np.full(3, 1 / 3)
    for eps, expected in ((1.0, 0.423487), (0.1, 6.05e-5)):
        log_plan = dv.sinkhorn_log_plan(
            jnp.asarray(cost[None], jnp.float32),
            jnp.log(jnp.asarray(a[None], jnp.float32)),
            jnp.log(jnp.asarray(a[None], jnp.float32)),
            epsilon=eps,
            num_iters=200,
        )
        plan = np.exp(np.asarray(log_plan[0], np.float64))
        np.testing.assert_allclose((plan * cost).sum(), expected, rtol=2e-3)
        np.testing.assert_allclose(plan.sum(1), a, atol=1e-6)
        np.testing.assert_allclose(plan.sum(0), a, atol=1e-6)
        np.testing.assert_allclose(plan, np_sinkhorn(cost, a, a, eps, 200), atol=1e-6)


@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_sinkhorn_matches_numpy(scope):
    s, t = _logits(18, (2, 4, 6)), _logits(19, (2, 4, 6))
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
    got = jax.jit(lambda x, y: dv.sinkhorn(x, y, mask, epsilon=0.05, num_iters=50, scope=scope))(
        s, t
    )
    q, p = np_softmax(s), np_softmax(t)
    groups = [(slice(None), mask)] if scope == "batch" else [(r, mask[r]) for r in range(2)]
    want = np.zeros(mask.shape)
    for rows, m in groups:
        qi = q[rows][m] if scope == "sequence" else q[mask]
        pj = p[rows][m] if scope == "sequence" else p[mask]
        cost = ((qi[:, None] - pj[None]) ** 2).sum(-1)
        n = len(qi)
        plan = np_sinkhorn(cost, np.full(n, 1 / n), np.full(n, 1 / n), 0.05, 50)
        if scope == "batch":
            want[mask] = n * (plan * cost).sum(1)
        else:
            want[rows][m] = n * (plan * cost).sum(1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    # Masked mean = the transport cost; permuting the tokens changes nothing.
    perm = np.random.default_rng(0).permutation(4)
    got_perm = dv.sinkhorn(
        s[:, perm], t[:, perm], mask[:, perm], epsilon=0.05, num_iters=50, scope=scope
    )
    np.testing.assert_allclose(np.asarray(got_perm), np.asarray(got)[:, perm], rtol=1e-4, atol=1e-7)


def test_sinkhorn_gradient_equals_finite_differences_and_is_nonnegative():
    s, t = _logits(20, (1, 5, 6), 1.5), _logits(21, (1, 5, 6), 1.5)
    eps, iters = 0.5, 100

    def np_total(x):  # float64 NumPy reference: the batch transport cost <P, C> times N
        q, p = np_softmax(x).reshape(-1, 6), np_softmax(t).reshape(-1, 6)
        cost = ((q[:, None] - p[None]) ** 2).sum(-1)
        n = len(q)
        plan = np_sinkhorn(cost, np.full(n, 1 / n), np.full(n, 1 / n), eps, iters)
        return n * (plan * cost).sum()

    loss = lambda x: dv.sinkhorn(x, t, epsilon=eps, num_iters=iters).sum()  # noqa: E731
    assert np.all(np.asarray(dv.sinkhorn(s, t, epsilon=eps, num_iters=iters)) >= 0)
    g = np.asarray(jax.jit(jax.grad(loss))(s))
    rng = np.random.default_rng(0)
    for _ in range(3):
        v = rng.standard_normal(s.shape)
        h = 1e-5
        fd = (np_total(s + h * v) - np_total(s - h * v)) / (2 * h)
        np.testing.assert_allclose((g * v).sum(), fd, rtol=2e-3, atol=1e-6)


def test_sinkhorn_vanishes_for_identical_separated_predictions():
    s = np.array([[[8.0, 0, 0], [0, 8.0, 0], [0, 0, 8.0]]], np.float32)
    loss = dv.sinkhorn(s, s, epsilon=1e-3, num_iters=200)
    assert float(loss.mean()) < 1e-4
    assert (
        float(dv.sinkhorn(s, s[:, ::-1], epsilon=1e-3, num_iters=200).mean()) < 1e-4
    )  # a permutation
    collapsed = np.broadcast_to(s[:, :1], s.shape)  # the teacher always predicts token 0
    assert float(dv.sinkhorn(s, collapsed, epsilon=1e-3, num_iters=200).mean()) > 0.1


# ------------------------------------------------------------------------------ TAID state


def test_taid_controller_follows_the_formula():
    rng = np.random.default_rng(0)
    total = 50
    losses_seq = np.abs(rng.standard_normal(total)) + np.linspace(3, 1, total)
    state = dv.taid_init(0.4)
    update = jax.jit(lambda st, j, k: dv.taid_update(st, j, k, total, alpha=0.05))
    t, mom, prev = 0.4, 0.0, None
    ts = []
    for step, j in enumerate(losses_seq, start=1):
        state = update(state, j, step)
        t_lin = 0.4 + 0.6 * step / total
        if prev is None:
            t = max(t_lin, t)
        else:
            mom = 0.99 * mom + 0.01 * (prev - j) / (prev + 1e-15)
            t = min(1.0, max(t_lin, t + 0.05 / (1 + np.exp(-mom)) * (1 - t)))
        prev = j
        ts.append(float(state.t))
        np.testing.assert_allclose(float(state.t), t, rtol=1e-5)
        assert t_lin - 1e-6 <= float(state.t) <= 1.0
    assert np.all(np.diff(ts) >= 0)
    linear = dv.taid_update(dv.taid_init(0.4), 1.0, 25, total, adaptive=False)
    np.testing.assert_allclose(float(linear.t), 0.7, rtol=1e-6)


# ----------------------------------------------------------------------------- MultiLevelOT


def np_multilevel_ot(s, t, mask, tau, k, eps, iters, w_tok, w_log, w_seq):
    """Float64 loops over the formula in ``multilevel_ot``'s docstring (METHODS.md 1.10 (ii))."""

    def standardised_probs(z):
        z = np.asarray(z, np.float64)
        z = (z - z.mean(-1, keepdims=True)) / (z.std(-1, ddof=1, keepdims=True) + 1e-4)
        return np_softmax(z, tau)

    def columns(x):
        order = np.argsort(-x[mask].sum(0), kind="stable")[:k]
        return x[..., order]

    xs, xt = columns(standardised_probs(s)), columns(standardised_probs(t))
    out = np.zeros(mask.shape)
    for b in range(mask.shape[0]):
        idx = np.flatnonzero(mask[b])
        n = len(idx)
        if n == 0:
            continue
        cost = np.abs(xs[b, idx][:, None] - xt[b, idx][None]).sum(-1)
        plan = np_sinkhorn(cost, np.full(n, 1 / n), np.full(n, 1 / n), eps, iters)
        for r, i in enumerate(idx):
            absolute = np.abs(xs[b, i] - xt[b, i]).sum()
            log_s = np.log(np_softmax(xs[b, i]))
            logarithmic = -(np_softmax(xt[b, i]) * log_s).sum()
            out[b, i] = (
                w_tok * absolute + w_log * logarithmic + w_seq * n * (plan[r] * cost[r]).sum()
            )
    return out


@pytest.mark.parametrize(
    "tau,k,weights", [(1.0, 5, (1.0, 0.1, 0.1)), (2.0, 11, (0.5, 1.0, 2.0)), (1.0, 1, (0, 0, 1))]
)
def test_multilevel_ot_matches_numpy(tau, k, weights):
    s, t = _logits(30, (2, 5, 11)), _logits(31, (2, 5, 11))
    mask = np.array([[1, 1, 1, 1, 0], [1, 0, 1, 1, 1]], bool)
    w_tok, w_log, w_seq = weights
    knobs = dict(top_k=k, epsilon=0.1, num_iters=30, token_weight=w_tok, log_weight=w_log)
    got = jax.jit(
        lambda x, y: dv.multilevel_ot(x, y, mask, temperature=tau, sequence_weight=w_seq, **knobs)
    )(s, t)
    want = np_multilevel_ot(s, t, mask, tau, k, 0.1, 30, w_tok, w_log, w_seq)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=1e-6)
    # Also reachable by name, like the other divergences.
    by_name = dv.divergence(
        "multilevel_ot", s, t, mask, temperature=tau, sequence_weight=w_seq, **knobs
    )
    np.testing.assert_allclose(np.asarray(by_name), np.asarray(got), rtol=1e-6)


def test_multilevel_ot_properties():
    s, t = _logits(32, (2, 4, 9)), _logits(33, (2, 4, 9))
    f = jax.jit(lambda x, y: dv.multilevel_ot(x, y, top_k=4))
    base = np.asarray(f(s, t))
    # Standardised logits: a positive affine map of either side's logits changes nothing.
    np.testing.assert_allclose(np.asarray(f(3.0 * s - 7.0, 0.5 * t + 2.0)), base, rtol=2e-4)
    # Mass-ordered columns: permuting one side's vocabulary changes nothing.
    perm = np.random.default_rng(1).permutation(9)
    np.testing.assert_allclose(np.asarray(f(s[..., perm], t)), base, rtol=2e-4, atol=1e-6)
    # The absolute term alone vanishes at equality; every term is non-negative.
    only_abs = dv.multilevel_ot(s, s, top_k=4, log_weight=0.0, sequence_weight=0.0)
    np.testing.assert_allclose(np.asarray(only_abs), 0.0, atol=1e-7)
    assert np.all(base >= 0)
    # Masked positions give 0 and carry no mass; the teacher gets no gradient.
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool)
    assert np.all(np.asarray(dv.multilevel_ot(s, t, mask, top_k=4))[~mask] == 0)
    g = jax.grad(lambda y: dv.multilevel_ot(s, y, top_k=4).sum())(t)
    assert np.all(np.asarray(g) == 0)
    assert np.all(np.isfinite(np.asarray(jax.grad(lambda x: f(x, t).sum())(s))))
    with pytest.raises(ValueError, match="top_k=20"):
        dv.multilevel_ot(s, t, top_k=20)
    with pytest.raises(ValueError, match="couples tokens"):
        dv.get_core("multilevel_ot")
