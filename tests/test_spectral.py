"""Tests of databalance.spectral against THEORY.md's reference values, brute force and Monte Carlo."""

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from databalance import (
    balance_table,
    conditional_mean,
    misspecified_profile,
    spectrum,
    variance_decomposition,
    variance_profile,
)

P_A = np.array([[0.10, 0.05, 0.05], [0.05, 0.20, 0.05], [0.05, 0.05, 0.40]])
H_A = np.array([[1.0, 0, 2], [0, 3, 1], [2, 1, 0]])
SIGMA2_A = [1.4, 0.746667, 0.634330, 0.597818, 0.584795, 0.579983, 0.578183, 0.577507, 0.577253]


def brute_force_sigma2(P, h, k, start="x"):
    """THEORY §3 recipe on full m x l arrays: g <- h - P(h), then for j = k..1 subtract the
    conditional mean given X (odd j) or Y (even j)."""
    P = P / P.sum()
    p, q = P.sum(1), P.sum(0)
    g = h - (P * h).sum()
    for j in range(k, 0, -1):
        x_step = (j % 2 == 1) == (start == "x")
        if x_step:
            g = g - ((P * g).sum(1) / p)[:, None]
        else:
            g = g - ((P * g).sum(0) / q)[None, :]
    return (P * g**2).sum()


def brute_force_limit(P, h):
    """Weighted least squares of h on [1, indicators of x, indicators of y]."""
    P = P / P.sum()
    m, l = P.shape
    i, j = np.indices((m, l))
    X = np.column_stack([np.ones(m * l), np.eye(m)[i.ravel()], np.eye(l)[j.ravel()]])
    w = np.sqrt(P.ravel())
    coef, *_ = np.linalg.lstsq(X * w[:, None], h.ravel() * w, rcond=None)
    return (P.ravel() * (h.ravel() - X @ coef) ** 2).sum()


@st.composite
def tables_and_functions(draw, min_dim=1):
    m = draw(st.integers(min_dim, 6))
    l = draw(st.integers(min_dim, 6))
    P = draw(hnp.arrays(np.float64, (m, l), elements=st.floats(0.05, 5.0)))
    h = draw(hnp.arrays(np.float64, (m, l), elements=st.floats(-3, 3)))
    return P / P.sum(), h


# -- THEORY §6 reference numbers -------------------------------------------------------------------


def test_reference_case_a():
    spec = spectrum(P_A)
    np.testing.assert_allclose(spec.singular_values, [1, 0.613504, 0.353163], atol=1e-6)
    prof = variance_profile(P_A, H_A, max_steps=8)
    np.testing.assert_allclose(prof.sigma2, SIGMA2_A, atol=1e-6)
    np.testing.assert_allclose(prof.sigma2_limit, 0.577099, atol=1e-6)
    np.testing.assert_allclose(prof.reduction, SIGMA2_A[0] - np.array(SIGMA2_A), atol=1e-6)
    np.testing.assert_allclose(prof.predicted_mse(100), np.array(SIGMA2_A) / 100, atol=1e-8)


def test_reference_function_of_x_vanishes_at_odd_k():
    h = np.repeat(np.array([1.0, 0.0, -1.0])[:, None], 3, axis=1)
    prof = variance_profile(P_A, h, max_steps=6)
    np.testing.assert_allclose(prof.sigma2, [0.61, 0, 0.1122, 0, 0.0124981, 0, 0.00171773], atol=1e-7)


@pytest.mark.parametrize("s", [0.0, 0.3, 0.7, 0.95])
def test_two_by_two_closed_form(s):
    P = np.array([[1 + s, 1 - s], [1 - s, 1 + s]]) / 4
    h = np.array([[1.0, 0.0], [0.0, 0.0]])
    prof = variance_profile(P, h, max_steps=7)
    expected = [(1 + s) * (3 - s) / 16] + [(1 - s**2) * (1 + s ** (2 * (k - 1))) / 16 for k in range(1, 8)]
    np.testing.assert_allclose(prof.sigma2, expected, atol=1e-12)
    np.testing.assert_allclose(prof.sigma2_limit, (1 - s**2) / 16, atol=1e-10)
    np.testing.assert_allclose(spectrum(P).max_correlation, s, atol=1e-12)


def test_weak_dependence_50_by_50_table():
    i = np.arange(50)
    T = (i[:, None] + 1) * (i[None, :] + 1) + 25.0
    T = T / T.sum(axis=0, keepdims=True)
    from scipy.stats import binom

    w = 0.8 * binom.pmf(i, 49, 0.7) + 0.2 / 50
    P = T * w[None, :]
    spec = spectrum(P)
    np.testing.assert_allclose(spec.max_correlation, 0.0408645, atol=1e-6)
    assert np.all(spec.singular_values[2:] < 1e-10)  # rank 2
    h = np.outer(i / 49, i / 49)
    np.testing.assert_allclose(variance_profile(P, h, max_steps=4).sigma2,
                               [0.0400, 0.013100, 0.0017845, 0.0017641, 0.0017640], atol=5e-5)


def test_independence_gives_the_limit_from_k_2():
    p, q = np.array([0.2, 0.3, 0.5]), np.array([0.1, 0.6, 0.3])
    P = np.outer(p, q)
    prof = variance_profile(P, H_A, max_steps=6)
    np.testing.assert_allclose(prof.sigma2[2:], prof.sigma2_limit, atol=1e-12)
    np.testing.assert_allclose(spectrum(P).singular_values[1:], 0, atol=1e-12)


# -- properties ------------------------------------------------------------------------------------


@given(tables_and_functions(), st.sampled_from(["x", "y"]))
def test_recursion_matches_brute_force_and_closed_form(problem, start):
    P, h = problem
    prof = variance_profile(P, h, max_steps=6, start=start)
    brute = [brute_force_sigma2(P, h, k, start) for k in range(7)]
    np.testing.assert_allclose(prof.sigma2, brute, atol=1e-10, rtol=1e-9)
    dec = variance_decomposition(P, h, max_steps=6, start=start)
    np.testing.assert_allclose(dec.sigma2, brute, atol=1e-10, rtol=1e-9)
    limit = brute_force_limit(P, h)
    np.testing.assert_allclose(prof.sigma2_limit, limit, atol=1e-10)
    np.testing.assert_allclose(dec.sigma2_limit, limit, atol=1e-10)
    assert np.all(prof.sigma2 >= limit - 1e-10)


@given(tables_and_functions())
def test_first_step_is_expected_conditional_variance(problem):
    P, h = problem
    p = P.sum(1)
    cond_mean = (P * h).sum(1) / p
    expected = (P * (h - cond_mean[:, None]) ** 2).sum()
    np.testing.assert_allclose(variance_profile(P, h, max_steps=1).sigma2[1], expected, atol=1e-12)


@given(tables_and_functions(min_dim=2))
def test_spectrum_is_orthonormal_with_top_value_one(problem):
    P, _ = problem
    spec = spectrum(P)
    p, q = P.sum(1), P.sum(0)
    A, B = spec.x_functions, spec.y_functions
    np.testing.assert_allclose(spec.singular_values[0], 1, atol=1e-12)
    np.testing.assert_allclose(A[:, 0], 1, atol=1e-10)
    np.testing.assert_allclose(B[:, 0], 1, atol=1e-10)
    np.testing.assert_allclose(A.T @ (p[:, None] * A), np.eye(A.shape[1]), atol=1e-9)
    np.testing.assert_allclose(B.T @ (q[:, None] * B), np.eye(B.shape[1]), atol=1e-9)
    # E[beta_j(Y) | X] = s_j alpha_j(X)
    np.testing.assert_allclose(conditional_mean(P, given="x") @ B, A * spec.singular_values, atol=1e-9)
    np.testing.assert_allclose(conditional_mean(P, given="y") @ A, B * spec.singular_values, atol=1e-9)
    assert 0 <= spec.spectral_gap <= 1


@given(tables_and_functions(), st.sampled_from(["x", "y"]))
def test_sparse_equals_dense(problem, start):
    P, h = problem
    P = P.copy()
    P[P < 0.6 * P.max()] *= np.arange(P[P < 0.6 * P.max()].size) % 2  # some zeros
    if (P.sum(0) == 0).any() or (P.sum(1) == 0).any():
        P += np.eye(*P.shape) * 0.1  # keep the lines nonempty
        P[:, P.sum(0) == 0] = 0.1
        P[P.sum(1) == 0, :] = 0.1
    dense = variance_profile(P, h, max_steps=5, start=start)
    S = sp.csr_array(P)
    by_matrix = variance_profile(S, sp.csr_array(h), max_steps=5, start=start)
    rows, cols = S.nonzero()
    by_values = variance_profile(S, h[rows, cols], max_steps=5, start=start)
    np.testing.assert_allclose(by_values.sigma2, dense.sigma2, atol=1e-12)
    np.testing.assert_allclose(by_values.sigma2_limit, dense.sigma2_limit, atol=1e-9)
    # A sparse h is read on the table's support only.
    np.testing.assert_allclose(by_matrix.sigma2, dense.sigma2, atol=1e-12)


@given(tables_and_functions(), st.integers(0, 6))
def test_start_y_equals_transpose(problem, k):
    P, h = problem
    a = variance_profile(P, h, max_steps=k, start="y").sigma2
    b = variance_profile(P.T, h.T, max_steps=k, start="x").sigma2
    np.testing.assert_allclose(a, b, atol=1e-12)


def test_several_functions_at_once():
    hs = np.stack([H_A, H_A**2, np.ones((3, 3))], axis=-1)
    prof = variance_profile(P_A, hs, max_steps=4)
    assert prof.sigma2.shape == (5, 3) and prof.sigma2_limit.shape == (3,)
    np.testing.assert_allclose(prof.sigma2[:, 0], SIGMA2_A[:5], atol=1e-6)
    np.testing.assert_allclose(prof.sigma2[:, 2], 0, atol=1e-14)  # a constant has no variance
    dec = variance_decomposition(P_A, hs, max_steps=4)
    np.testing.assert_allclose(dec.sigma2, prof.sigma2, atol=1e-12)


def test_rectangular_closed_form_has_unpaired_directions():
    rng = np.random.default_rng(5)
    P = rng.gamma(2.0, size=(5, 2))
    h = rng.normal(size=(5, 2))
    dec = variance_decomposition(P, h, max_steps=4)
    assert dec.singular_values.shape == (5,) and np.all(dec.singular_values[2:] == 0)
    np.testing.assert_allclose(dec.sigma2, [brute_force_sigma2(P, h, k) for k in range(5)], atol=1e-12)
    # the unpaired X directions still carry variance removed by the first X-step
    assert np.abs(dec.x_coordinates[2:]).max() > 0


def test_disconnected_support_is_reported():
    P = np.array([[0.3, 0.2, 0.0], [0.1, 0.1, 0.0], [0.0, 0.0, 0.3]])
    spec = spectrum(P)
    assert spec.n_components == 2
    np.testing.assert_allclose(spec.max_correlation, 1.0, atol=1e-12)
    np.testing.assert_allclose(spec.x_functions[:, 0], 1.0)
    # The repeated s = 1 block is still an orthonormal, correctly paired basis.
    p, q = P.sum(1) / P.sum(), P.sum(0) / P.sum()
    A, B = spec.x_functions, spec.y_functions
    np.testing.assert_allclose(A.T @ (p[:, None] * A), np.eye(3), atol=1e-10)
    np.testing.assert_allclose(B.T @ (q[:, None] * B), np.eye(3), atol=1e-10)
    np.testing.assert_allclose(conditional_mean(P, given="x") @ B, A * spec.singular_values, atol=1e-10)
    np.testing.assert_allclose(conditional_mean(P, given="y") @ A, B * spec.singular_values, atol=1e-10)
    with pytest.raises(ValueError, match="disconnected"):
        variance_decomposition(P, np.ones((3, 3)), max_steps=2)
    h = np.arange(9.0).reshape(3, 3)
    prof = variance_profile(P, h, max_steps=4)
    np.testing.assert_allclose(prof.sigma2, [brute_force_sigma2(P, h, k) for k in range(5)], atol=1e-12)
    np.testing.assert_allclose(prof.sigma2_limit, brute_force_limit(P, h), atol=1e-9)


# -- sparse spectrum -------------------------------------------------------------------------------


def test_sparse_spectrum_matches_dense_top_triplets():
    rng = np.random.default_rng(0)
    P = rng.gamma(0.5, size=(60, 40)) * (rng.random((60, 40)) < 0.3)
    P[np.arange(60), np.arange(60) % 40] += 1.0
    dense = spectrum(P)
    sparse = spectrum(sp.csr_array(P), rank=6)
    np.testing.assert_allclose(sparse.singular_values, dense.singular_values[:6], atol=1e-9)
    for j in range(6):
        np.testing.assert_allclose(np.abs(sparse.x_functions[:, j]), np.abs(dense.x_functions[:, j]), atol=1e-6)
    np.testing.assert_allclose(sparse.x_functions[:, 0], 1.0, atol=1e-9)


# -- convergence rate ------------------------------------------------------------------------------


def test_ipf_rate_predicts_the_observed_decay():
    rng = np.random.default_rng(3)
    T = rng.gamma(2.0, size=(6, 5)) + np.eye(6, 5) * 3
    p_x, p_y = rng.dirichlet(np.full(6, 5.0)), rng.dirichlet(np.full(5, 5.0))
    res = balance_table(T, p_x, p_y, steps=40)
    limit = balance_table(T, p_x, p_y, tol=1e-14)
    rate = spectrum(limit.table).ipf_rate
    err = res.marginal_error.max(axis=1)
    # THEORY.md says s_2^2 per half-step; measured, it is s_2^2 per sweep (two half-steps).
    observed = err[22:32] / err[20:30]
    np.testing.assert_allclose(observed, rate, rtol=1e-3)
    predicted = spectrum(limit.table).predicted_steps(1e-10, initial_error=err[20])
    actual = 20 + int(np.argmax(err[20:] <= 1e-10)) if (err[20:] <= 1e-10).any() else None
    assert actual is not None and abs(predicted + 20 - actual) <= 2


# -- Monte Carlo -----------------------------------------------------------------------------------


def sample_tables(P, n, reps, rng):
    counts = rng.multinomial(n, P.ravel(), size=reps).reshape(reps, *P.shape).astype(float)
    ok = (counts.sum(2) > 0).all(1) & (counts.sum(1) > 0).all(1)
    return counts[ok] / n


def test_monte_carlo_nmse_matches_sigma2():
    rng = np.random.default_rng(2024)
    n, reps = 2000, 4000
    Pn = sample_tables(P_A, n, reps, rng)
    p, q = P_A.sum(1), P_A.sum(0)
    truth = (P_A * H_A).sum()
    sigma2 = variance_profile(P_A, H_A, max_steps=4).sigma2
    for k in range(5):
        tables = Pn if k == 0 else balance_table(Pn, p, q, steps=k).table
        err = (tables * H_A).sum(axis=(1, 2)) - truth
        nmse = n * np.mean(err**2)
        se = n * np.std(err**2, ddof=1) / np.sqrt(len(err))
        assert abs(nmse - sigma2[k]) < 3 * se, (k, nmse, sigma2[k], se)


def test_monte_carlo_misspecified_bias_and_variance():
    rng = np.random.default_rng(7)
    n, reps = 4000, 4000
    p_wrong = np.array([0.25, 0.3, 0.45])
    q_wrong = np.array([0.2, 0.35, 0.45])
    pred = misspecified_profile(P_A, H_A, p_wrong, q_wrong, max_steps=4)
    Pn = sample_tables(P_A, n, reps, rng)
    truth = (P_A * H_A).sum()
    assert abs(pred.bias[0]) < 1e-15
    for k in range(5):
        tables = Pn if k == 0 else balance_table(Pn, p_wrong, q_wrong, steps=k).table
        est = (tables * H_A).sum(axis=(1, 2))
        bias_se = est.std(ddof=1) / np.sqrt(len(est))
        assert abs(est.mean() - truth - pred.bias[k]) < 3 * bias_se + 2 / n, (k, est.mean() - truth, pred.bias[k])
        nvar = n * est.var(ddof=1)
        nvar_se = n * np.std((est - est.mean()) ** 2, ddof=1) / np.sqrt(len(est))
        assert abs(nvar - pred.variance[k]) < 3 * nvar_se, (k, nvar, pred.variance[k])
    # Wrong targets: the bias does not shrink, so at large n balancing hurts.
    assert pred.mse(10**6)[2] > pred.mse(10**6)[0]


def test_misspecified_reduces_to_correct_case():
    p, q = P_A.sum(1), P_A.sum(0)
    pred = misspecified_profile(P_A, H_A, p, q, max_steps=5)
    np.testing.assert_allclose(pred.bias, 0, atol=1e-14)
    np.testing.assert_allclose(pred.variance, SIGMA2_A[:6], atol=1e-6)


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: variance_profile([[1.0, 0.0], [0.0, 0.0]], np.ones((2, 2)), max_steps=2), ValueError,
         r"Row 1 of `table` is empty, so the conditional mean .* undefined"),
        (lambda: variance_profile([[1.0, 0.0], [1.0, 0.0]], np.ones((2, 2)), max_steps=2), ValueError,
         r"Column 1 of `table` is empty"),
        (lambda: variance_profile(P_A, np.ones((3, 2)), max_steps=2), ValueError,
         r"`h` has shape \(3, 2\) but `table` has shape \(3, 3\)"),
        (lambda: variance_profile(P_A, np.full((3, 3), np.nan), max_steps=2), ValueError, r"`h` contains NaN or inf"),
        (lambda: variance_profile(P_A, H_A, max_steps=-1), ValueError, r"`steps` must be >= 0"),
        (lambda: variance_profile(P_A, H_A, max_steps=None), TypeError, r"`max_steps` must be an integer"),
        (lambda: variance_profile(P_A, H_A, max_steps=2, start="z"), ValueError, r"`start` must be 'x' or 'y'"),
        (lambda: variance_profile(sp.csr_array(P_A), np.ones(4), max_steps=2), ValueError,
         r"values on its 9 nonzeros in CSR order"),
        (lambda: spectrum(sp.csr_array(P_A)), ValueError, r"`rank` is required for a sparse table"),
        (lambda: spectrum(sp.csr_array(P_A), rank=3), ValueError, r"`rank` must be < min\(m, l\) = 3"),
        (lambda: spectrum([[0.0, 0.0], [0.0, 0.0]]), ValueError, r"total mass 0"),
        (lambda: spectrum([[1.0, -1.0], [1.0, 1.0]]), ValueError, r"nonnegative"),
        (lambda: conditional_mean(P_A, given="z"), ValueError, r"`given` must be 'x' or 'y'"),
        (lambda: variance_decomposition(sp.csr_array(P_A), H_A, max_steps=2), TypeError, r"needs a dense table"),
    ],
)
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
