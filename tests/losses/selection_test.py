"""Token selection (METHODS.md section 2) against hand-computed masks, float64 NumPy references
written here, the METHODS test lines (2.1-2.7), and properties (static shapes, no retrace,
invalid tokens never selected, controller state round trip)."""

from __future__ import annotations

import math

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import sharding
from distill_jax.losses import selection as sel

# ------------------------------------------------------------------- float64 NumPy references


def np_top_fraction(scores, mask, r, per_row=False):
    """Keep ceil(r n) valid tokens by score, ties by row-major position; plain Python sort."""
    scores, mask = np.asarray(scores, np.float64), np.asarray(mask, bool)
    groups = [(b,) for b in range(scores.shape[0])] if per_row else [()]
    out = np.zeros(scores.shape, bool)
    for g in groups:
        s, m, o = scores[g].reshape(-1), mask[g].reshape(-1), out[g].reshape(-1)
        idx = [i for i in range(s.size) if m[i]]
        k = math.ceil(round(r * len(idx), 9))
        for i in sorted(idx, key=lambda i: (-s[i], i))[:k]:
            o[i] = True
        out[g] = o.reshape(out[g].shape)
    return out


def np_idts(scores, selected, base, kappa):
    med = np.median(np.asarray(scores, np.float64)[selected])
    tau = base * np.exp(-kappa * np.tanh(np.log(scores / med)))
    return np.where(selected, tau, base)


def np_adakd(losses, ratio, *, decay, eps_l, eps_r, warmup, every, lo=0.1, hi=1.0):
    """The LATF controller of METHODS.md 2.2 in plain Python floats; returns the ratio path."""
    ema, ref, path = None, None, []
    for step, x in enumerate(losses, start=1):
        ema = x if ema is None else decay * ema + (1 - decay) * x
        if step > warmup:
            if ref is None:
                ref = ema
            elif (step - warmup - 1) % every == 0:
                if ema - ref > eps_l * abs(ref):
                    ratio, ref = min(hi, ratio * (1 + eps_r)), ema
                elif ref - ema > eps_l * abs(ref):
                    ratio, ref = max(lo, ratio * (1 - eps_r)), ema
        path.append(ratio)
    return np.array(path)


def _random_batch(seed, shape=(3, 11), ties=True):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, shape).astype(np.float32) if ties else rng.normal(size=shape)
    mask = rng.random(shape) < 0.7
    return scores.astype(np.float32), mask


RATIOS = [0.0, 0.1, 0.25, 0.5, 0.6, 0.9, 1.0]
KEYS = jax.random.split(jax.random.key(2), 2000)


def f32(x):
    # Inputs are built in NumPy: eager jnp ops would each compile and dominate the runtime.
    return np.asarray(x, np.float32)


# Compiled once at module level and reused with fixed shapes, so the file runs in seconds.
TOP = jax.jit(sel.top_fraction_mask, static_argnames="per_row")
QUANTILE = jax.jit(sel.masked_quantile)
TOP_K = jax.jit(sel.top_k_positions, static_argnums=2)


def _sum_grad(fn):
    """jit(value_and_grad(sum(fn(x, *rest)))) w.r.t. the first argument."""
    return jax.jit(jax.value_and_grad(lambda x, *rest: fn(x, *rest).sum()))


# ------------------------------------------------------------------ 2.1 shared selector, shapes

S = f32([[0.3, 0.1, 0.3, 0.9], [0.0, 0.5, -0.0, 0.2]])
M = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)  # 7 valid tokens; 0.9 is invalid


@pytest.mark.parametrize(
    "ratio, per_row, expected",
    [
        (0.2, False, [[1, 0, 0, 0], [0, 1, 0, 0]]),  # ceil(1.4) = 2: 0.5, first 0.3
        (0.5, False, [[1, 0, 1, 0], [0, 1, 0, 1]]),  # ceil(3.5) = 4
        (0.6, False, [[1, 1, 1, 0], [0, 1, 0, 1]]),  # ceil(4.2) = 5
        (0.75, False, [[1, 1, 1, 0], [1, 1, 0, 1]]),  # 6: 0.0 vs -0.0 tie -> earlier
        (1.0, False, [[1, 1, 1, 0], [1, 1, 1, 1]]),
        (0.5, True, [[1, 0, 1, 0], [0, 1, 0, 1]]),  # rows: ceil(1.5) = 2, ceil(2) = 2
        (0.25, True, [[1, 0, 0, 0], [0, 1, 0, 0]]),
    ],
)
def test_top_fraction_hand_cases(ratio, per_row, expected):
    got = TOP(S, M, ratio, per_row=per_row)
    np.testing.assert_array_equal(np.asarray(got), np.array(expected, bool))


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_fraction_matches_numpy(per_row, seed):
    scores, mask = _random_batch(seed)  # integer scores: many ties
    for r in RATIOS:
        expected = np_top_fraction(scores, mask, r, per_row)
        got = TOP(scores, mask, r, per_row=per_row)
        np.testing.assert_array_equal(np.asarray(got), expected, err_msg=str(r))


def test_ceil_is_robust_to_float32_products():
    # 0.6 * 10 is 6.0000002 in float32; a bare ceil would keep 7 tokens.
    scores, mask = f32(np.arange(10.0)[None]), np.ones((1, 10), bool)
    for r, k in [(0.6, 6), (0.7, 7), (0.3, 3), (0.1, 1), (0.61, 7)]:
        assert np.asarray(TOP(scores, mask, r)).sum() == k


def test_nan_and_infinite_scores_rank_within_the_valid_tokens():
    scores, mask = f32(np.zeros((3, 11))), np.zeros((3, 11), bool)
    scores[0, :5] = [np.nan, -np.inf, 1.0, np.inf, 5.0]
    mask[0, :4] = True  # 5.0 is invalid; NaN and -inf tie for last, broken by position
    np.testing.assert_array_equal(np.asarray(TOP(scores, mask, 0.5))[0, :5], [0, 0, 1, 1, 0])
    np.testing.assert_array_equal(np.asarray(TOP(scores, mask, 0.75))[0, :5], [1, 0, 1, 1, 0])
    np.testing.assert_array_equal(TOP(scores, mask, 1.0), mask)


def test_data_sharded_batch_selects_over_the_global_batch():
    # Under jit a batch sharded over devices is still one global array: the ranking and the
    # quantile see every valid token, exactly as on one device.
    mesh = sharding.make_mesh((("data", jax.device_count()),))  # Auto axes, as the trainer
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    scores, mask = _random_batch(17, shape=(jax.device_count(), 6), ties=True)
    fn = jax.jit(lambda s, m, r: (sel.top_fraction_mask(s, m, r), sel.masked_quantile(s, m, r)))
    sharded = fn(jax.device_put(scores, rows), jax.device_put(mask, rows), 0.3)
    np.testing.assert_array_equal(sharded[0], np_top_fraction(scores, mask, 0.3))
    np.testing.assert_allclose(float(sharded[1]), np.quantile(scores[mask], 0.3), rtol=1e-6)


TRACES = []


@jax.jit
def ALL_SELECTORS(scores, mask, ratio):
    """Every ratio-driven selector of the module on the same [B, T] statistics."""
    TRACES.append(1)  # a Python side effect: runs once per trace
    other = scores[::-1] * 0.5
    return {
        "top_fraction": sel.top_fraction_mask(scores, mask, ratio),
        "adakd": sel.adakd_token_mask(scores, mask, ratio),
        "tip": sel.tip_entropy_mask(scores, mask, ratio, per_row=True),
        "tip_sample": sel.tip_entropy_sample(jax.random.key(0), jnp.abs(scores), mask, ratio),
        "rho1": sel.rho1_token_mask(scores, other, mask, ratio),
        "adaspec": sel.adaspec_token_mask(scores, other, mask, ratio),
        "clip": sel.clip_per_token(scores, mask, quantile=ratio),
    }


def test_shapes_static_and_no_retrace_when_the_ratio_changes():
    scores, mask = _random_batch(3, ties=False)
    shapes = set()
    for r in RATIOS + [0.33, 0.77]:
        out = ALL_SELECTORS(scores, mask, np.float32(r))
        shapes.add(tuple((k, v.shape, v.dtype) for k, v in sorted(out.items())))
    assert len(TRACES) == 1 and ALL_SELECTORS._cache_size() == 1
    assert len(shapes) == 1


def test_invalid_tokens_never_selected():
    scores, mask = _random_batch(4, ties=False)
    scores = np.where(mask, scores, np.float32(1e9))  # invalid tokens carry the largest scores
    valid = np.asarray(mask)
    for r in RATIOS:
        for name, out in ALL_SELECTORS(scores, mask, np.float32(r)).items():
            out = np.asarray(out)
            if out.dtype == bool:
                assert not np.any(out & ~valid), (name, r)
                if r == 1.0:
                    np.testing.assert_array_equal(out, valid, err_msg=name)
            else:
                assert np.all(out[~valid] == 0), name
    assert len(TRACES) == 1


def test_all_masked_selects_nothing():
    z, none = f32(np.zeros((3, 11))), np.zeros((3, 11), bool)  # shapes compiled above
    assert not np.asarray(TOP(z, none, 1.0)).any()
    assert float(QUANTILE(z, none, 0.5)) == 0.0
    quads = jax.jit(sel.tip_quadrants)(z, z, none)
    assert not any(np.asarray(q).any() for q in quads)


def test_top_k_positions_hand_case():
    pos, valid = TOP_K(S, M, 4)  # row 0 has 3 valid tokens: one padded slot
    np.testing.assert_array_equal(pos, [[0, 2, 1, 3], [1, 3, 0, 2]])
    np.testing.assert_array_equal(valid, [[1, 1, 1, 0], [1, 1, 1, 1]])


@pytest.mark.parametrize("q", [0.0, 0.1, 0.25, 0.5, 0.9, 0.99, 1.0])
def test_masked_quantile_matches_numpy(q):
    scores, mask = _random_batch(5, ties=False)
    expected = np.quantile(np.asarray(scores, np.float64)[np.asarray(mask)], q)
    got = float(QUANTILE(scores, mask, q))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ 2.2 AdaKD

IDTS = jax.jit(sel.idts_temperatures, static_argnames=("base_temperature", "kappa"))


def test_idts_reference_values():
    # METHODS.md 2.2: s / median = 2 -> 0.697676, 0.5 -> 1.433329, median -> tau_base (kappa 0.6).
    scores, selected = f32(np.ones((3, 11))), np.zeros((3, 11), bool)
    scores[0, :3], selected[0, :3] = [1.0, 2.0, 0.5], True  # same shape as the test below
    tau = np.asarray(IDTS(scores, selected, base_temperature=2.0, kappa=0.6))
    np.testing.assert_allclose(tau[0, :3] / 2.0, [1.0, 0.697676, 1.433329], atol=1e-6)
    assert np.all(tau[~selected] == 2.0)


def test_idts_matches_numpy_and_bounds():
    rng = np.random.default_rng(6)
    scores = rng.gamma(1.0, size=(3, 11)).astype(np.float32)
    scores[0, :3] = [0.0, 1e-30, 1e30]  # extremes stay within the bounds
    selected = rng.random((3, 11)) < 0.8
    tau = IDTS(scores, selected, base_temperature=1.5, kappa=0.6)
    kappa, tau = 0.6, np.asarray(tau)
    assert np.all(tau >= 1.5 * np.exp(-kappa) * (1 - 1e-6))
    assert np.all(tau <= 1.5 * np.exp(kappa) * (1 + 1e-6))
    assert np.all(tau[~selected] == 1.5)
    with np.errstate(divide="ignore"):
        expected = np_idts(scores.astype(np.float64), selected, 1.5, kappa)
    np.testing.assert_allclose(tau, expected, rtol=1e-5)
    med = np.median(scores[selected])  # hard tokens (above the median) are sharpened
    assert np.all(tau[selected & (scores > med)] < 1.5)


def test_idts_is_constant_for_autodiff():
    _, g = _sum_grad(sel.idts_temperatures)(f32(np.ones((1, 3))), np.ones((1, 3), bool))
    np.testing.assert_array_equal(g, 0.0)


def test_adakd_review():
    selected = np.array([[1, 0, 0, 1]], bool)
    mask = np.array([[1, 1, 0, 1]], bool)
    review = jax.jit(jax.vmap(sel.adakd_review, in_axes=(0, None, None, None)))
    for p in (0.0, 1.0):
        out = np.asarray(review(KEYS, selected, mask, p))
        np.testing.assert_array_equal(out, np.broadcast_to(mask if p else selected, out.shape))
    reviewed = np.asarray(review(KEYS, selected, mask, 0.3)[:, 0, 1])  # True only on reviews
    assert abs(reviewed.mean() - 0.3) < 0.04


KNOBS = dict(ema_decay=0.99, eps_loss=0.1, eps_ratio=0.1, warmup_steps=10, update_every_steps=5)
UPDATE = jax.jit(lambda st, x: sel.adakd_update(st, x, **KNOBS))


def _run(state, losses):
    ratios = []
    for x in losses:
        state = UPDATE(state, np.float32(x))
        ratios.append(float(state.ratio))
    return state, np.array(ratios)


def test_adakd_controller_rises_to_one_and_falls_to_min():
    steps = np.arange(800)
    _, up = _run(sel.adakd_init(0.3), np.exp(0.02 * steps))  # rising loss EMA
    np.testing.assert_array_equal(up[:10], np.float32(0.3))  # warm-up: no change
    assert np.all(np.diff(up) >= 0) and up[-1] == 1.0
    _, down = _run(sel.adakd_init(1.0), 5.0 * np.exp(-0.02 * steps))  # falling loss EMA
    assert np.all(np.diff(down) <= 0)
    np.testing.assert_allclose(down[-1], 0.1, rtol=1e-6)
    assert UPDATE._cache_size() == 1  # ratio, EMA and step are traced: one compilation


def test_adakd_controller_matches_python_reference():
    rng = np.random.default_rng(7)
    losses = np.abs(2.0 + np.cumsum(rng.normal(0, 0.1, 300)))  # a random walk both ways
    _, got = _run(sel.adakd_init(0.5), losses)
    expected = np_adakd(losses, 0.5, decay=0.99, eps_l=0.1, eps_r=0.1, warmup=10, every=5)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert len(set(np.round(got, 6))) > 3  # the walk moved the ratio several times


def test_adakd_controller_skips_non_finite_losses():
    state, _ = _run(sel.adakd_init(0.5), [1.0, 2.0])
    after, _ = _run(state, [np.nan, np.inf])
    assert after.loss_ema == state.loss_ema and int(after.step) == 4


def test_adakd_state_round_trip():
    rng = np.random.default_rng(8)
    losses = np.abs(1.0 + np.cumsum(rng.normal(0, 0.1, 120)))
    state, _ = _run(sel.adakd_init(0.7), losses[:60])
    restored = flax.serialization.from_bytes(sel.adakd_init(), flax.serialization.to_bytes(state))
    rebuilt = jax.tree.map(jnp.asarray, jax.tree.map(np.asarray, state))  # host copy and back
    for other in (restored, rebuilt):
        assert isinstance(other, sel.AdaKDState)
        assert jax.tree.map(jax.typeof, other) == jax.tree.map(jax.typeof, state)
        a, ra = _run(state, losses[60:])
        b, rb = _run(other, losses[60:])
        np.testing.assert_array_equal(ra, rb)
        jax.tree.map(np.testing.assert_array_equal, a, b)


def test_adakd_fresh_state_serialises_nan_fields():
    state = flax.serialization.from_bytes(
        sel.adakd_init(), flax.serialization.to_bytes(sel.adakd_init(0.4))
    )
    assert np.isnan(state.loss_ema) and np.isnan(state.ref_ema) and state.ratio == np.float32(0.4)


# -------------------------------------------------------------------------------- 2.3 TIP


def test_tip_planted_quadrants():
    rng = np.random.default_rng(9)
    b, t = 4, 10
    mask = np.ones((b, t), bool)
    mask[:, -2:] = False  # 32 valid tokens, 8 per quadrant
    labels = np.full((b, t), -1)
    labels[mask] = rng.permutation(np.repeat(np.arange(4), 8))
    high_h, high_d = np.isin(labels, [0, 1]), np.isin(labels, [0, 2])
    h = np.where(high_h, rng.uniform(2, 3, (b, t)), rng.uniform(0, 1, (b, t)))
    d = np.where(high_d, rng.uniform(5, 9, (b, t)), rng.uniform(0, 0.5, (b, t)))
    h[~mask], d[~mask] = 100.0, 100.0  # garbage at invalid tokens must not move the medians
    quads_fn = jax.jit(sel.tip_quadrants)
    h, d = f32(h), f32(d)
    quads = quads_fn(h, d, mask)
    for i, got in enumerate(quads):
        np.testing.assert_array_equal(got, labels == i, err_msg=quads._fields[i])
    fixed = quads_fn(
        h, d, mask,
        entropy_threshold=1.5, divergence_threshold=2.0,
    )  # fmt: skip
    for i, got in enumerate(fixed):
        np.testing.assert_array_equal(got, labels == i, err_msg=fixed._fields[i])


def test_tip_keep_fraction_by_entropy():
    h, mask = _random_batch(10, ties=False)
    tip = jax.jit(sel.tip_entropy_mask, static_argnames="per_row")
    n_valid = np.asarray(mask).sum(1)
    for r in [0.1, 0.5, 0.9]:
        per_row = np.asarray(tip(h, mask, r, per_row=True))
        assert np.all(np.abs(per_row.sum(1) - r * n_valid) < 1)  # within one token per row
        np.testing.assert_array_equal(per_row, np_top_fraction(h, mask, r, per_row=True))
        np.testing.assert_array_equal(tip(h, mask, r), np_top_fraction(h, mask, r))


def test_tip_entropy_sampling_is_proportional_to_entropy():
    h = f32([[1.0, 3.0, 0.0, 9.0]])
    mask = np.array([[1, 1, 1, 0]], bool)
    sample = jax.jit(jax.vmap(sel.tip_entropy_sample, in_axes=(0, None, None, None)))
    picks = np.asarray(sample(KEYS, h, mask, 1 / 3)[:, 0])  # ceil(3 / 3) = 1 token per draw
    assert np.all(picks.sum(-1) == 1) and not picks[:, 2:].any()  # H = 0 and invalid: never
    np.testing.assert_allclose(picks[:, 1].mean(), 0.75, atol=0.04)  # 3 / (1 + 3)


# ----------------------------------------------------------------------------- 2.4 TSD-KD


def test_tsd_confidence_weights():
    hs = f32([[1.0, 2.0, 0.5, 3.0]])
    ht = f32([[1.0, 1.0, 1.5, 0.0]])
    mask = np.array([[1, 1, 1, 0]], bool)
    total, g = _sum_grad(sel.tsd_confidence_weights)(hs, ht, mask)
    w = jax.jit(sel.tsd_confidence_weights)(hs, ht, mask)
    expected = np.array([0.5, 1 / (1 + np.exp(-1.0)), 1 / (1 + np.exp(1.0)), 0.0])
    np.testing.assert_allclose(np.asarray(w[0]), expected, rtol=1e-6)
    np.testing.assert_allclose(float(total), expected.sum(), rtol=1e-6)
    np.testing.assert_array_equal(g, 0.0)  # stop-gradient


def test_tsd_entropy_penalty():
    h = f32(np.tile([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 50.0], (3, 1)))
    mask = np.zeros((3, 11), bool)
    mask[0, :10] = True  # one row of 0..9; rows 1-2 and the 50 are invalid
    # 0.1 quantile of 0..9 (linear) = 0.9: every valid token but the 0 is penalised.
    penalty_mask = jax.jit(sel.tsd_entropy_penalty_mask)
    keep = np.asarray(penalty_mask(h, mask))
    np.testing.assert_array_equal(keep[0], [0] + [1] * 9 + [0])
    assert not keep[1:].any()
    pen, grad = _sum_grad(sel.tsd_entropy_penalty)(h, mask)
    np.testing.assert_allclose(float(pen), 45.0)
    np.testing.assert_array_equal(grad, keep.astype(np.float32))
    hr, mr = _random_batch(11, ties=False)
    thr = np.quantile(np.asarray(hr, np.float64)[np.asarray(mr)], 0.1)
    np.testing.assert_array_equal(penalty_mask(hr, mr), np.asarray(mr) & (np.asarray(hr) >= thr))


# ------------------------------------------------------------------------------ 2.5 Rho-1

RHO1 = jax.jit(sel.rho1_token_mask)


def test_rho1_planted_high_excess_tokens_are_selected():
    rng = np.random.default_rng(12)
    ref = rng.uniform(1, 2, (2, 10))
    student = ref + rng.uniform(0, 0.1, (2, 10))
    planted = np.zeros((2, 10), bool)
    planted[0, [1, 7]] = planted[1, [0, 4, 9]] = True
    student[planted] += 3.0  # ceil(0.25 * 20) = 5 planted tokens
    s, r, mask = f32(student), f32(ref), np.ones((2, 10), bool)
    np.testing.assert_array_equal(RHO1(s, r, mask, 0.25), planted)
    score = jax.jit(sel.rho1_excess_loss)(s, r, mask)
    np.testing.assert_allclose(np.asarray(score), student - ref, rtol=1e-5)


def test_rho1_reference_equal_to_student_keeps_earliest_positions():
    ce = f32(np.random.default_rng(13).uniform(0, 5, (2, 10)))
    mask = np.ones((2, 10), bool)
    mask[0, [0, 3]] = False
    np.testing.assert_array_equal(jax.jit(sel.rho1_excess_loss)(ce, ce, mask), 0.0)
    got = np.asarray(RHO1(ce, ce, mask, 0.5))  # ceil(0.5 * 18) = 9 earliest valid tokens
    np.testing.assert_array_equal(got[0], [0, 1, 1, 0, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(got[1], [1] + [0] * 9)


# ---------------------------------------------------------------------------- 2.6 AdaSPEC

ADASPEC = jax.jit(sel.adaspec_token_mask)


@pytest.mark.parametrize("k", [0.1, 0.25, 0.4, 0.5, 0.8, 1.0])
def test_adaspec_kept_fraction_and_quantile_rule(k):
    rng = np.random.default_rng(14)
    draft = rng.uniform(0, 3, (4, 10))
    ref = rng.uniform(0, 1, (4, 10))
    mask = np.ones((4, 10), bool)
    got = np.asarray(ADASPEC(f32(draft), f32(ref), mask, k))
    assert got.sum() == round(k * 40)
    delta = draft - ref  # k n is an integer here, so the quantile rule keeps the same tokens
    np.testing.assert_array_equal(got, delta >= np.quantile(delta, 1 - k))


def test_adaspec_drops_tokens_where_the_reference_is_as_bad_first():
    draft = f32([[2.0, 2.0, 0.7, 5.0, 1.0, 4.1, 1.0, 0.0, 3.0, 2.5]] * 4)
    ref = f32([[0.1, 2.0, 0.2, 5.0, 0.1, 3.9, 1.0, 0.0, 0.5, 2.5]] * 4)
    # delta = [1.9, 0, 0.5, 0, 0.9, 0.2, 0, 0, 2.5, 0]: token 3 has the largest draft KL but the
    # reference is as bad there, so it goes with the other zero-delta tokens; 16 of 40 kept.
    got = ADASPEC(draft, ref, np.ones((4, 10), bool), 0.4)
    np.testing.assert_array_equal(got, [[1, 0, 1, 0, 1, 0, 0, 0, 1, 0]] * 4)


# ------------------------------------------------------------------- 2.7 divergence clipping

CLIP_CAP = _sum_grad(lambda x, m, c: sel.clip_per_token(x, m, cap=c))
CLIP_Q = _sum_grad(lambda x, m, q: sel.clip_per_token(x, m, quantile=q))
CLIP_Q_VALUES = jax.jit(lambda x, m, q: sel.clip_per_token(x, m, quantile=q))


def test_clip_fixed_cap_hand_case():
    x = f32([[0.5, 12.0, 10.0, 3.0]])
    mask = np.array([[1, 1, 1, 0]], bool)
    out, grad = CLIP_CAP(x, mask, 10.0)
    np.testing.assert_allclose(float(out), 0.5 + 10.0 + 10.0)
    np.testing.assert_array_equal(grad, [[1.0, 0.0, 1.0, 0.0]])  # l = c keeps its gradient


def test_clip_quantile_one_is_identity():
    x, mask = _random_batch(15, ties=False)
    x = np.abs(x)
    np.testing.assert_array_equal(CLIP_Q_VALUES(x, mask, 1.0), np.where(mask, x, 0.0))
    _, grad = CLIP_Q(x, mask, 1.0)
    np.testing.assert_array_equal(grad, mask.astype(np.float32))


@pytest.mark.parametrize("q", [0.9, 0.99])
def test_clip_quantile_clips_about_one_minus_q_with_zero_gradient(q):
    rng = np.random.default_rng(16)
    x = f32(rng.exponential(size=(8, 250)))
    mask = rng.random((8, 250)) < 0.95
    x_big = np.where(mask, x, np.float32(1e6))  # invalid values must not enter the quantile
    out, (_, grad) = CLIP_Q_VALUES(x_big, mask, q), CLIP_Q(x_big, mask, q)
    valid = np.asarray(mask)
    c = np.quantile(np.asarray(x, np.float64)[valid], q)
    clipped = valid & (np.asarray(x) > c)
    assert abs(clipped.sum() / valid.sum() - (1 - q)) <= 1 / valid.sum() + 1e-9
    np.testing.assert_array_equal(np.asarray(grad), (valid & ~clipped).astype(np.float32))
    expected = np.where(valid, np.minimum(np.asarray(x, np.float64), c), 0.0)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5)


def test_clip_requires_exactly_one_threshold():
    x = f32(np.ones((1, 3)))
    with pytest.raises(ValueError, match="exactly one"):
        sel.clip_per_token(x)
    with pytest.raises(ValueError, match="exactly one"):
        sel.clip_per_token(x, cap=1.0, quantile=0.5)
