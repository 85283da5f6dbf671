"""Tests of databalance.variance against the reference values of the theory page, brute force,
finite differences of the population map and Monte Carlo."""

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

from databalance import (
    balance_margins,
    balance_table,
    misspecified_profile,
    spectrum,
    variance_decomposition,
    variance_profile,
)

from .strategies import tables_and_functions

P_A = np.array([[0.10, 0.05, 0.05], [0.05, 0.20, 0.05], [0.05, 0.05, 0.40]])
H_A = np.array([[1.0, 0, 2], [0, 3, 1], [2, 1, 0]])
SIGMA2_A = [1.4, 0.746667, 0.634330, 0.597818, 0.584795, 0.579983, 0.578183, 0.577507, 0.577253]


def brute_force_sigma2(P, h, k, start="x"):
    """The recipe on full m x l arrays: g <- h - P(h), then for j = k..1 subtract the conditional
    mean given X (odd j) or Y (even j)."""
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


def finite_difference_variance(P, h, p_x, p_y, k, start="x", eps=1e-6):
    """Var_P of the influence function of Q -> (balance Q with p_x, p_y for k half-steps)(h), by
    central differences of that population map at P along delta_cell - P (no use of the L_j chain)."""
    def phi(Q):
        return (balance_table(Q, p_x, p_y, steps=k, start=start).table * h).sum()

    psi = np.zeros_like(P)
    for cell in np.ndindex(P.shape):
        direction = -P.copy()
        direction[cell] += 1.0
        psi[cell] = (phi(P + eps * direction) - phi(P - eps * direction)) / (2 * eps)
    return (P * psi**2).sum() - (P * psi).sum() ** 2


# -- reference numbers (theory page) ---------------------------------------------------------------


def test_reference_case_a():
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


def test_weak_dependence_50_by_50_table():
    i = np.arange(50)
    T = (i[:, None] + 1) * (i[None, :] + 1) + 25.0
    T = T / T.sum(axis=0, keepdims=True)
    from scipy.stats import binom

    w = 0.8 * binom.pmf(i, 49, 0.7) + 0.2 / 50
    h = np.outer(i / 49, i / 49)
    np.testing.assert_allclose(variance_profile(T * w[None, :], h, max_steps=4).sigma2,
                               [0.0400, 0.013100, 0.0017845, 0.0017641, 0.0017640], atol=5e-5)


def test_independence_gives_the_limit_from_k_2():
    P = np.outer([0.2, 0.3, 0.5], [0.1, 0.6, 0.3])
    prof = variance_profile(P, H_A, max_steps=6)
    np.testing.assert_allclose(prof.sigma2[2:], prof.sigma2_limit, atol=1e-12)


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


def _with_zeros(P):
    P = P.copy()
    P[P < 0.6 * P.max()] *= np.arange(P[P < 0.6 * P.max()].size) % 2
    if (P.sum(0) == 0).any() or (P.sum(1) == 0).any():
        P += np.eye(*P.shape) * 0.1  # keep the lines nonempty
        P[:, P.sum(0) == 0] = 0.1
        P[P.sum(1) == 0, :] = 0.1
    return P


@given(tables_and_functions(), st.sampled_from(["x", "y"]))
def test_sparse_equals_dense(problem, start):
    P, h = problem
    P = _with_zeros(P)
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
    mis = misspecified_profile(P_A, hs, P_A.sum(1), P_A.sum(0), max_steps=4)
    np.testing.assert_allclose(mis.variance, prof.sigma2, atol=1e-12)
    assert mis.bias.shape == (5, 3)


def test_rectangular_closed_form_has_unpaired_directions():
    rng = np.random.default_rng(5)
    P = rng.gamma(2.0, size=(5, 2))
    h = rng.normal(size=(5, 2))
    dec = variance_decomposition(P, h, max_steps=4)
    assert dec.singular_values.shape == (5,) and np.all(dec.singular_values[2:] == 0)
    np.testing.assert_allclose(dec.sigma2, [brute_force_sigma2(P, h, k) for k in range(5)], atol=1e-12)
    # the unpaired X directions still carry variance removed by the first X-step
    assert np.abs(dec.x_coordinates[2:]).max() > 0


def test_disconnected_support():
    P = np.array([[0.3, 0.2, 0.0], [0.1, 0.1, 0.0], [0.0, 0.0, 0.3]])
    h = np.arange(9.0).reshape(3, 3)
    prof = variance_profile(P, h, max_steps=4)
    np.testing.assert_allclose(prof.sigma2, [brute_force_sigma2(P, h, k) for k in range(5)], atol=1e-12)
    np.testing.assert_allclose(prof.sigma2_limit, brute_force_limit(P, h), atol=1e-9)


# -- h given per stored entry of a sparse table ---------------------------------------------------


def _scrambled_csr(P, seed):
    """A CSR matrix equal to P whose column indices are stored in a shuffled order within rows."""
    rng = np.random.default_rng(seed)
    S = sp.csr_array(P)
    order = np.concatenate([lo + rng.permutation(hi - lo) for lo, hi in zip(S.indptr[:-1], S.indptr[1:], strict=True)])
    U = sp.csr_array((S.data[order], S.indices[order], S.indptr.copy()), shape=S.shape)
    assert not U.has_sorted_indices
    return U


def _stored_cells(S):
    """(rows, cols) of the stored entries, in storage order."""
    if S.format == "coo":
        return S.row, S.col
    outer = np.repeat(np.arange(len(S.indptr) - 1), np.diff(S.indptr))
    return (outer, S.indices) if S.format == "csr" else (S.indices, outer)


def test_per_entry_h_follows_the_storage_order_of_unsorted_csr():
    # Regression: h was read in a sorted copy's order, silently misaligned with the user's.
    rng = np.random.default_rng(11)
    P = _with_zeros(rng.gamma(1.0, size=(6, 7)))
    h = rng.normal(size=(6, 7, 2))
    dense = variance_profile(P, h, max_steps=5)
    U = _scrambled_csr(P, seed=3)
    rows, cols = _stored_cells(U)
    for start in ("x", "y"):
        got = variance_profile(U, h[rows, cols], max_steps=5, start=start)
        want = dense if start == "x" else variance_profile(P, h, max_steps=5, start="y")
        np.testing.assert_allclose(got.sigma2, want.sigma2, atol=1e-12)
        np.testing.assert_allclose(got.sigma2_limit, want.sigma2_limit, atol=1e-9)
    np.testing.assert_array_equal(U.indices, _scrambled_csr(P, seed=3).indices)  # input not mutated


@pytest.mark.parametrize("fmt", ["csc", "coo"])
def test_per_entry_h_follows_the_storage_order_of_other_formats(fmt):
    rng = np.random.default_rng(12)
    P = _with_zeros(rng.gamma(1.0, size=(5, 4)))
    h = rng.normal(size=(5, 4))
    S = sp.csc_array(P) if fmt == "csc" else sp.coo_array(P)
    if fmt == "coo":  # a COO table stored in a shuffled order
        perm = rng.permutation(S.nnz)
        S = sp.coo_array((S.data[perm], (S.row[perm], S.col[perm])), shape=S.shape)
    rows, cols = _stored_cells(S)
    got = variance_profile(S, h[rows, cols], max_steps=4)
    np.testing.assert_allclose(got.sigma2, variance_profile(P, h, max_steps=4).sigma2, atol=1e-12)


def test_explicit_zeros_are_stored_entries():
    S = sp.csr_array((np.array([1.0, 0.0, 2.0, 3.0]), np.array([0, 1, 0, 1]), np.array([0, 2, 4])), shape=(2, 2))
    h = np.array([1.0, 100.0, 0.0, 2.0])  # 100 sits on the stored zero: no mass, no effect
    dense = variance_profile([[1.0, 0.0], [2.0, 3.0]], [[1.0, 7.0], [0.0, 2.0]], max_steps=3)
    np.testing.assert_allclose(variance_profile(S, h, max_steps=3).sigma2, dense.sigma2, atol=1e-12)


# -- overflow and rounding -------------------------------------------------------------------------


@pytest.mark.parametrize("c", [1e150, 1e-150, 2.0**300])
def test_variances_scale_with_the_square_of_h(c):
    # Quadratic in h: sigma^2(c h) = c^2 sigma^2(h), also where h^2 alone would overflow or underflow.
    ref = variance_profile(P_A, H_A, max_steps=4)
    prof = variance_profile(P_A, H_A * c, max_steps=4)
    np.testing.assert_allclose(prof.sigma2 / c**2, ref.sigma2, rtol=1e-12)
    np.testing.assert_allclose(prof.sigma2_limit / c**2, ref.sigma2_limit, rtol=1e-9)
    dec = variance_decomposition(P_A, H_A * c, max_steps=4)
    np.testing.assert_allclose(dec.sigma2 / c**2, ref.sigma2, rtol=1e-12)
    np.testing.assert_allclose(dec.x_coordinates / c, variance_decomposition(P_A, H_A, max_steps=4).x_coordinates,
                               rtol=1e-12, atol=1e-12)
    p_x, p_y = [0.3, 0.3, 0.4], [0.2, 0.3, 0.5]
    mis_ref = misspecified_profile(P_A, H_A, p_x, p_y, max_steps=3)
    mis = misspecified_profile(P_A, H_A * c, p_x, p_y, max_steps=3)
    np.testing.assert_allclose(mis.variance / c**2, mis_ref.variance, rtol=1e-12)
    np.testing.assert_allclose(mis.bias / c, mis_ref.bias, rtol=1e-12, atol=1e-12)


def test_overflow_gives_inf_never_nan():
    # Regression: h * 1e200 gave NaN (inf - inf) instead of the true value 1.4e400 = inf.
    h = np.stack([H_A * 1e200, H_A, np.full((3, 3), 1e300)], axis=-1)
    prof = variance_profile(P_A, h, max_steps=4)
    assert np.all(np.isposinf(prof.sigma2[:, 0])) and np.isposinf(prof.sigma2_limit[0])
    np.testing.assert_allclose(prof.sigma2[:, 1], SIGMA2_A[:5], atol=1e-6)  # other functions unaffected
    assert np.all(prof.sigma2[:, 2] == 0)  # a huge constant still has no variance
    dec = variance_decomposition(P_A, h, max_steps=4)
    assert np.all(np.isposinf(dec.sigma2[:, 0])) and not np.isnan(dec.sigma2).any()
    mis = misspecified_profile(P_A, h, [0.0, 0.5, 0.5], [0.2, 0.3, 0.5], max_steps=4)
    assert np.all(np.isposinf(mis.variance[:, 0])) and not np.isnan(mis.variance).any()
    assert np.all(np.isfinite(mis.bias))
    S = sp.csr_array(P_A)
    rows, cols = S.nonzero()
    assert np.all(np.isposinf(variance_profile(S, H_A[rows, cols] * 1e200, max_steps=4).sigma2))


@pytest.mark.parametrize("seed", range(4))
def test_additive_functions_never_get_negative_variance(seed):
    # Regression: sigma_k^2 and sigma_inf^2 of about -1e-16 for an additive h (true value 0).
    rng = np.random.default_rng(seed)
    m, l = rng.integers(2, 7, size=2)
    P = rng.gamma(1.0, size=(m, l))
    h = rng.normal(size=m)[:, None] + rng.normal(size=l)[None, :]
    prof = variance_profile(P, h, max_steps=400)
    assert np.all(prof.sigma2 >= 0) and prof.sigma2_limit >= 0
    assert prof.sigma2[-1] < 1e-12 and prof.sigma2_limit < 1e-12
    dec = variance_decomposition(P, h, max_steps=60)
    assert np.all(dec.sigma2 >= 0) and dec.sigma2_limit >= 0
    mis = misspecified_profile(P, h, P.sum(1) / P.sum(), P.sum(0) / P.sum(), max_steps=40)
    assert np.all(mis.variance >= 0)


# -- misspecified marginals ------------------------------------------------------------------------


def test_zero_target_gives_the_finite_delta_method_variance():
    # Regression: a zero entry in p_x gave NaN (0/0 on the row it empties) from k = 3 on.
    p_x, p_y = np.array([0.0, 0.5, 0.5]), P_A.sum(0)
    prof = misspecified_profile(P_A, H_A, p_x, p_y, max_steps=5)
    assert np.all(np.isfinite(prof.variance)) and np.all(np.isfinite(prof.bias))
    np.testing.assert_allclose(prof.variance[3], 0.9476, atol=1e-4)
    for k in range(1, 6):
        np.testing.assert_allclose(prof.variance[k], finite_difference_variance(P_A, H_A, p_x, p_y, k),
                                   rtol=1e-6)
        bias = (balance_table(P_A, p_x, p_y, steps=k).table * H_A).sum() - (P_A * H_A).sum()
        np.testing.assert_allclose(prof.bias[k], bias, atol=1e-12)


@pytest.mark.parametrize("seed, start", [(0, "x"), (1, "y"), (2, "x")])
def test_misspecified_variance_is_the_derivative_of_the_population_map(seed, start):
    rng = np.random.default_rng(seed)
    m, l = 4, 3
    P = rng.gamma(2.0, size=(m, l))
    P /= P.sum()
    h = rng.normal(size=(m, l))
    p_x, p_y = rng.dirichlet(np.ones(m)), rng.dirichlet(np.ones(l))
    p_x[1], p_y[2] = 0.0, 0.0  # zero targets on both sides
    p_x, p_y = p_x / p_x.sum(), p_y / p_y.sum()
    prof = misspecified_profile(P, h, p_x, p_y, max_steps=4, start=start)
    fd = [finite_difference_variance(P, h, p_x, p_y, k, start=start) for k in range(1, 5)]
    np.testing.assert_allclose(prof.variance[1:], fd, rtol=1e-6)


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
    for start in ("x", "y"):
        pred = misspecified_profile(P_A, H_A, p, q, max_steps=5, start=start)
        np.testing.assert_allclose(pred.bias, 0, atol=1e-14)
        np.testing.assert_allclose(pred.variance, variance_profile(P_A, H_A, max_steps=5, start=start).sigma2,
                                   atol=1e-12)


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


def test_spectral_gap_sets_the_decay_of_sigma2():
    # sigma_k^2 - sigma_inf^2 decays like s_2^(2k): same-parity ratios tend to s_2^4.
    prof = variance_profile(P_A, H_A, max_steps=40)
    excess = prof.sigma2 - prof.sigma2_limit
    s2 = spectrum(P_A).max_correlation
    np.testing.assert_allclose(excess[22] / excess[20], s2**4, rtol=1e-3)


# -- errors ----------------------------------------------------------------------------------------

_S = sp.csr_array(P_A)
_DUPLICATED = sp.coo_array((np.array([0.5, 0.5, 1.0, 1.0]), (np.array([0, 0, 1, 1]), np.array([0, 0, 1, 0]))),
                           shape=(2, 2))


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: variance_profile([[1.0, 0.0], [0.0, 0.0]], np.ones((2, 2)), max_steps=2), ValueError,
         r"Row 1 of `table` is empty, so the conditional mean .* undefined"),
        (lambda: variance_profile([[1.0, 0.0], [1.0, 0.0]], np.ones((2, 2)), max_steps=2), ValueError,
         r"Column 1 of `table` is empty"),
        (lambda: variance_profile(P_A, np.ones((3, 2)), max_steps=2), ValueError,
         r"`h` has shape \(3, 2\) but `table` has shape \(3, 3\)"),
        (lambda: variance_profile(P_A, np.ones((3, 3, 2, 2)), max_steps=2), ValueError,
         r"`h` has shape \(3, 3, 2, 2\) but `table` has shape \(3, 3\)"),
        (lambda: variance_profile(P_A, np.full((3, 3), np.nan), max_steps=2), ValueError,
         r"`h` contains NaN or inf, first at index \(0, 0\)"),
        (lambda: variance_profile(P_A, H_A + 1j, max_steps=2), TypeError,
         r"`h` must hold real numbers; got dtype complex128"),
        (lambda: variance_profile(P_A, np.full((3, 3), "a"), max_steps=2), TypeError, r"`h` must hold real numbers"),
        (lambda: variance_profile(P_A, np.ma.masked_array(H_A, mask=H_A > 1), max_steps=2), TypeError,
         r"`h` is a masked array"),
        (lambda: variance_profile(P_A, [[1, 2, 3], [1, 2], [1, 2, 3]], max_steps=2), ValueError,
         r"`h` could not be read as an array: its rows have different lengths"),
        (lambda: variance_profile(P_A, sp.csr_array(H_A), max_steps=2), TypeError,
         r"`h` is sparse but `table` is dense"),
        (lambda: variance_profile(P_A, H_A, max_steps=-1), ValueError, r"`max_steps` must be >= 0 .*; got -1"),
        (lambda: variance_profile(P_A, H_A, max_steps=None), TypeError, r"`max_steps` must be an integer >= 0"),
        (lambda: variance_profile(P_A, H_A, max_steps=True), TypeError, r"`max_steps` must be an integer >= 0"),
        (lambda: variance_profile(P_A, H_A, max_steps=2.0), TypeError, r"`max_steps` must be an integer >= 0"),
        (lambda: variance_profile(P_A, H_A, max_steps=2, start="z"), ValueError,
         r"`start` must be 'x' \(the first step fixes the row marginal\) or 'y'"),
        (lambda: variance_profile(P_A, H_A, max_steps=2).predicted_mse(0), ValueError,
         r"`n` must be a positive integer"),
        # sparse tables
        (lambda: variance_profile(_S, np.ones(4), max_steps=2), ValueError,
         r"`h` has shape \(4,\).* values on its 9 stored entries in the order of `table.data`"),
        (lambda: variance_profile(_S, np.ones(9) + 0j, max_steps=2), TypeError,
         r"`h` must hold real numbers; got dtype complex128"),
        (lambda: variance_profile(_S, sp.csr_array(H_A + 1j), max_steps=2), TypeError,
         r"`h` must hold real numbers; got dtype complex128"),
        (lambda: variance_profile(_S, sp.csr_array(np.ones((2, 3))), max_steps=2), ValueError,
         r"`h` has shape \(2, 3\) but `table` has shape \(3, 3\)"),
        (lambda: variance_profile(_S, np.r_[np.ones(8), np.inf], max_steps=2), ValueError,
         r"`h` contains NaN or inf, first at index \(8,\)"),
        (lambda: variance_profile(_DUPLICATED, np.ones(4), max_steps=2), ValueError,
         r"`table` stores entry \(0, 0\) more than once.*`table.sum_duplicates\(\)`"),
        (lambda: variance_profile(sp.lil_array(P_A), np.ones(9), max_steps=2), TypeError,
         r"`table` is in LIL format.*`table = table.tocsr\(\)`"),
        # the closed form
        (lambda: variance_decomposition(_S, H_A, max_steps=2), TypeError, r"needs a dense table"),
        (lambda: variance_decomposition(np.eye(2), np.ones((2, 2)), max_steps=2), ValueError,
         r"support graph of `table` is disconnected"),
        (lambda: variance_decomposition(P_A, H_A, max_steps=-2), ValueError, r"`max_steps` must be >= 0"),
        (lambda: variance_decomposition(P_A, H_A, max_steps=2, start=1), ValueError, r"`start` must be 'x'"),
        (lambda: variance_decomposition(P_A, H_A + 1j, max_steps=2), TypeError, r"`h` must hold real numbers"),
        # misspecified targets
        (lambda: misspecified_profile(_S, H_A, [1, 1, 1], [1, 1, 1], max_steps=2), TypeError,
         r"misspecified_profile needs a dense table"),
        (lambda: misspecified_profile(P_A, H_A, [0.5, 0.5], [0.2, 0.3, 0.5], max_steps=2), ValueError,
         r"`p_x` has shape \(2,\) but the table has 3 rows"),
        (lambda: misspecified_profile(P_A, H_A, [0.2, 0.3, 0.5], [-0.2, 0.7, 0.5], max_steps=2), ValueError,
         r"`p_y` must be nonnegative; found -0.2"),
        (lambda: misspecified_profile(P_A, H_A, [0.2, 0.3, 0.5], [0.2, 0.3, 0.6], max_steps=2), ValueError,
         r"The totals of `p_x` .* and `p_y` .* differ"),
        (lambda: misspecified_profile(P_A, H_A, [0, 0, 0], [0, 0, 0], max_steps=2), ValueError, r"total mass 0"),
        (lambda: misspecified_profile([[0.5, 0.0], [0.25, 0.25]], np.ones((2, 2)), [0.5, 0.5], [0.0, 1.0],
                                      max_steps=2), ValueError, r"Row 0 of `table` .* no rescaling can reach `p_x`"),
        (lambda: misspecified_profile(P_A, H_A, [1, 1, 1], [1, 1, 1], max_steps=-1), ValueError,
         r"`max_steps` must be >= 0"),
        (lambda: misspecified_profile(P_A, H_A, [1, 1, 1], [1, 1, 1], max_steps=2, start="z"), ValueError,
         r"`start` must be 'x'"),
        (lambda: misspecified_profile(P_A, np.ones(3), [1, 1, 1], [1, 1, 1], max_steps=2), ValueError,
         r"`h` has shape \(3,\)"),
        (lambda: misspecified_profile(P_A, H_A, [1, 1, 1], [1, 1, 1], max_steps=2).mse(-5), ValueError,
         r"`n` must be a positive integer"),
    ],
)
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_start_message_is_balance_tables():
    with pytest.raises(ValueError) as expected:
        balance_table(P_A, P_A.sum(1), P_A.sum(0), start="z")
    for call in (lambda: variance_profile(P_A, H_A, max_steps=2, start="z"),
                 lambda: variance_decomposition(P_A, H_A, max_steps=2, start="z"),
                 lambda: misspecified_profile(P_A, H_A, P_A.sum(1), P_A.sum(0), max_steps=2, start="z")):
        with pytest.raises(ValueError) as got:
            call()
        assert str(got.value) == str(expected.value)


# -- many margins ----------------------------------------------------------------------------------


def brute_force_margins_sigma2(P, h, margins, k):
    """The recipe on the full N-d array: g <- h - P(h), then for step j = k..1 subtract the
    conditional mean given margin (j - 1) mod K's variables, summing P * g over the other axes."""
    P = P / P.sum()
    g = h - (P * h).sum()
    for j in range(k, 0, -1):
        axes = margins[(j - 1) % len(margins)]
        axes = tuple(a % P.ndim for a in ((axes,) if np.ndim(axes) == 0 else axes))
        others = tuple(a for a in range(P.ndim) if a not in axes)
        num, den = (P * g).sum(axis=others, keepdims=True), P.sum(axis=others, keepdims=True)
        g = g - np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return (P * g**2).sum()


def brute_force_margins_limit(P, h, margins):
    """Weighted least squares of h on the dense indicators of every margin's categories."""
    P = P / P.sum()
    idx = np.indices(P.shape)
    columns = [np.ones(P.size)]
    for axes in margins:
        axes = (axes,) if np.ndim(axes) == 0 else axes
        codes = np.ravel_multi_index(tuple(idx[a].ravel() for a in axes), [P.shape[a] for a in axes])
        columns.append(np.eye(codes.max() + 1)[codes])
    X = np.column_stack(columns)
    w = np.sqrt(P.ravel())
    coef, *_ = np.linalg.lstsq(X * w[:, None], h.ravel() * w, rcond=None)
    return (P.ravel() * (h.ravel() - X @ coef) ** 2).sum()


def margin_targets(P, margins):
    """{margin: P's marginal table over its axes} for balance_margins."""
    out = {}
    for key in margins:
        axes = (key,) if np.ndim(key) == 0 else key
        out[key] = P.sum(axis=tuple(a for a in range(P.ndim) if a not in axes))
    return out


MARGIN_CASES = [
    ((3, 4, 2), [(0, 1), 2], False),
    ((2, 3, 2, 2), [(0, 1), 2, 3], False),
    ((3, 2, 4), [(2, 0), 1], False),  # a joint margin with its axes in reverse order
    ((2, 3, 4), [1, (0, 2), (2, 1)], False),  # overlapping margins
    ((3, 3, 3), [0, 1, 2], True),  # zeros, possibly empty categories
    ((2, 2, 3), [-1, 0, (1, -1)], True),  # negative axes
    ((5,), [0], False),
]


@pytest.mark.parametrize("shape, margins, zeros", MARGIN_CASES)
def test_margins_match_brute_force(shape, margins, zeros):
    rng = np.random.default_rng(sum(shape))
    P = rng.gamma(1.5, size=shape)
    if zeros:
        P[rng.random(shape) < 0.25] = 0.0
    h = rng.normal(size=shape)
    prof = variance_profile(P, h, max_steps=8, margins=margins)
    brute = [brute_force_margins_sigma2(P, h, margins, k) for k in range(9)]
    np.testing.assert_allclose(prof.sigma2, brute, atol=1e-12, rtol=1e-10)
    limit = brute_force_margins_limit(P, h, margins)
    np.testing.assert_allclose(prof.sigma2_limit, limit, atol=1e-11)
    assert np.all(prof.sigma2 >= prof.sigma2_limit - 1e-12)
    assert prof.start is None and len(prof.margins) == len(margins)


@given(tables_and_functions(), st.sampled_from(["x", "y"]))
def test_two_margins_equal_the_two_way_profile(problem, start):
    P, h = problem
    two_way = variance_profile(P, h, max_steps=7, start=start)
    margins = [0, 1] if start == "x" else [(1,), (0,)]
    many = variance_profile(P, h, max_steps=7, margins=margins)
    np.testing.assert_allclose(many.sigma2, two_way.sigma2, atol=1e-12, rtol=1e-10)
    np.testing.assert_allclose(many.sigma2_limit, two_way.sigma2_limit, atol=1e-10)
    np.testing.assert_allclose(many.sweep_rate, spectrum(P).ipf_rate, atol=1e-10)
    np.testing.assert_allclose(two_way.sweep_rate, spectrum(P).ipf_rate, atol=1e-10)


def test_two_margins_reference_case_a():
    prof = variance_profile(P_A, H_A, max_steps=8, margins=[0, 1])
    np.testing.assert_allclose(prof.sigma2, SIGMA2_A, atol=1e-6)
    np.testing.assert_allclose(prof.sigma2_limit, 0.577099, atol=1e-6)


def test_sparse_two_way_sweep_rate():
    S = sp.csr_array(P_A)
    rows, cols = S.nonzero()
    np.testing.assert_allclose(variance_profile(S, H_A[rows, cols], max_steps=2).sweep_rate,
                               spectrum(P_A).ipf_rate, rtol=1e-10)


def test_joint_margin_axis_order_does_not_matter():
    rng = np.random.default_rng(1)
    P, h = rng.gamma(2.0, size=(2, 3, 4)), rng.normal(size=(2, 3, 4))
    ref = variance_profile(P, h, max_steps=6, margins=[(0, 2), 1])
    for margins in ([(2, 0), 1], [(-1, 0), (-2,)], [(0, -1), 1]):
        prof = variance_profile(P, h, max_steps=6, margins=margins)
        np.testing.assert_allclose(prof.sigma2, ref.sigma2, atol=1e-14)
        np.testing.assert_allclose(prof.sigma2_limit, ref.sigma2_limit, atol=1e-12)
        assert prof.margins == ((0, 2), (1,))
    # the cycle order does matter for finite k, not for the limit or the rate
    other = variance_profile(P, h, max_steps=6, margins=[1, (0, 2)])
    assert abs(other.sigma2[1] - ref.sigma2[1]) > 1e-3
    np.testing.assert_allclose(other.sigma2_limit, ref.sigma2_limit, atol=1e-12)
    np.testing.assert_allclose(other.sweep_rate, ref.sweep_rate, atol=1e-12)


def test_margins_several_functions_at_once():
    rng = np.random.default_rng(2)
    P = rng.gamma(2.0, size=(3, 2, 4))
    hs = rng.normal(size=(3, 2, 4, 3))
    hs[..., 2] = 7.0  # a constant has no variance
    margins = [(0, 1), 2, (1, 2)]
    prof = variance_profile(P, hs, max_steps=5, margins=margins)
    assert prof.sigma2.shape == (6, 3) and prof.sigma2_limit.shape == (3,)
    for j in range(2):
        single = variance_profile(P, hs[..., j], max_steps=5, margins=margins)
        np.testing.assert_allclose(prof.sigma2[:, j], single.sigma2, atol=1e-14)
        np.testing.assert_allclose(prof.sigma2_limit[j], single.sigma2_limit, atol=1e-12)
    np.testing.assert_allclose(prof.sigma2[:, 2], 0, atol=1e-25)
    assert prof.sigma2_limit[2] < 1e-25


def test_function_of_one_margin_vanishes_right_after_its_step():
    rng = np.random.default_rng(3)
    P = rng.gamma(2.0, size=(2, 3, 2, 3))
    h = np.broadcast_to(rng.normal(size=(2, 1, 2, 1)), P.shape)  # a function of axes 0 and 2
    margins = [3, (0, 2), 1]
    prof = variance_profile(P, h, max_steps=9, margins=margins)
    # step k fixes margin (k - 1) mod 3, so (0, 2) is fixed at k = 2, 5, 8
    np.testing.assert_allclose(prof.sigma2[[2, 5, 8]], 0, atol=1e-14)
    assert np.all(prof.sigma2[[1, 3, 4, 6, 7]] > 1e-6)
    assert prof.sigma2_limit < 1e-14


def test_margins_variances_scale_with_the_square_of_h():
    rng = np.random.default_rng(4)
    P, h = rng.gamma(2.0, size=(2, 3, 2)), rng.normal(size=(2, 3, 2))
    ref = variance_profile(P, h, max_steps=4, margins=[(0, 1), 2])
    for c in (1e150, 1e-150):
        prof = variance_profile(P, h * c, max_steps=4, margins=[(0, 1), 2])
        np.testing.assert_allclose(prof.sigma2 / c**2, ref.sigma2, rtol=1e-12)
        np.testing.assert_allclose(prof.sigma2_limit / c**2, ref.sigma2_limit, rtol=1e-9)
    huge = variance_profile(P, h * 1e200, max_steps=4, margins=[(0, 1), 2])
    assert np.all(np.isposinf(huge.sigma2)) and np.isposinf(huge.sigma2_limit)


def test_margins_long_profile_stops_early_and_agrees():
    rng = np.random.default_rng(5)
    P, h = rng.gamma(2.0, size=(3, 3, 2)), rng.normal(size=(3, 3, 2))
    prof = variance_profile(P, h, max_steps=300, margins=[0, 1, 2])
    np.testing.assert_allclose(prof.sigma2[-3:], prof.sigma2_limit, rtol=1e-8)
    np.testing.assert_allclose(prof.sigma2[40], brute_force_margins_sigma2(P, h, [0, 1, 2], 40), rtol=1e-10)


def test_sweep_rate_sets_the_decay_of_errors_and_of_sigma2():
    rng = np.random.default_rng(6)
    shape, margins = (3, 4, 3), [(0, 1), 2, (1, 2)]
    P = rng.gamma(2.0, size=shape)
    P /= P.sum()
    Q = P * np.exp(0.3 * rng.normal(size=shape))  # a start whose limit is near P
    targets = margin_targets(P, margins)
    res = balance_margins(Q, targets, tol=1e-13)
    h = rng.normal(size=shape)
    prof = variance_profile(res.table, h, max_steps=60, margins=margins)
    rate = prof.sweep_rate
    assert 0.05 < rate < 0.9
    K = len(margins)
    # marginal errors: geometric mean of the per-sweep ratio over a few late sweeps
    errors = res.marginal_error.sum(axis=1)
    end = len(errors) - 1
    late = [i for i in range(K, end + 1) if errors[i] > 1e-11]
    i0, i1 = late[-1] - 3 * K, late[-1]
    np.testing.assert_allclose((errors[i1] / errors[i0]) ** (1 / 3), rate, rtol=0.05)
    excess = prof.sigma2 - prof.sigma2_limit
    np.testing.assert_allclose((excess[31] / excess[19]) ** (1 / 4), rate**2, rtol=0.02)


def test_monte_carlo_nmse_matches_sigma2_with_three_margins():
    # A 2 x 2 x 3 x 2 table raked to a joint margin (0, 1) and one-way margins 2 and 3.
    rng = np.random.default_rng(99)
    P = rng.gamma(6.0, size=(2, 2, 3, 2))
    P /= P.sum()
    h = rng.normal(size=P.shape)
    margins = [(0, 1), 2, 3]
    targets = margin_targets(P, margins)
    n, reps, max_k = 2000, 700, 3  # about 2000 calls of balance_margins: ~3 s
    sigma2 = variance_profile(P, h, max_steps=max_k, margins=margins).sigma2
    counts = rng.multinomial(n, P.ravel(), size=reps).reshape(reps, *P.shape) / n
    truth = (P * h).sum()
    err = np.empty((max_k + 1, reps))
    for r in range(reps):
        err[0, r] = (counts[r] * h).sum() - truth
        for k in range(1, max_k + 1):
            err[k, r] = (balance_margins(counts[r], targets, steps=k).table * h).sum() - truth
    for k in range(max_k + 1):
        nmse = n * np.mean(err[k] ** 2)
        se = n * np.std(err[k] ** 2, ddof=1) / np.sqrt(reps)
        assert abs(nmse - sigma2[k]) < 3 * se, (k, nmse, sigma2[k], se)
    assert sigma2[3] < 0.9 * sigma2[0]  # balancing helps here: the test has something to detect


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: variance_profile(np.ones((2, 3, 2)), np.ones((2, 3, 2)), max_steps=2, margins=[0, 3]), ValueError,
         r"`margins` entry 3 names an axis outside 0..2 \(`table` has 3\)"),
        (lambda: variance_profile(np.ones((2, 3, 2)), np.ones((2, 3, 2)), max_steps=2, margins=[(0, -3), 1]),
         ValueError, r"`margins` entry \(0, -3\) repeats an axis"),
        (lambda: variance_profile(np.ones((2, 3, 2)), np.ones((2, 3, 2)), max_steps=2, margins=[(0, 1), (1, 0)]),
         ValueError, r"`margins` names the axes \(0, 1\) twice"),
        (lambda: variance_profile(np.ones((2, 3, 2)), np.ones((2, 3, 2)), max_steps=2, margins=[]), ValueError,
         r"`margins` is empty"),
        (lambda: variance_profile(np.ones((2, 3, 2)), np.ones((2, 3, 2)), max_steps=2, margins={0: 1}), TypeError,
         r"`margins` must be a sequence of axes"),
        (lambda: variance_profile(np.ones((2, 3, 2)), np.ones((2, 3, 2)), max_steps=2, margins=3), TypeError,
         r"`margins` must be a sequence of axes"),
        (lambda: variance_profile(np.ones((2, 3, 2)), np.ones((2, 3, 2)), max_steps=2, margins=[(0, 1.0)]),
         TypeError, r"`margins` entry \(0, 1.0\) must be an axis \(int\) or a nonempty tuple"),
        (lambda: variance_profile(np.ones((2, 3, 2)), np.ones((2, 3, 2)), max_steps=2, margins=[()]), TypeError,
         r"`margins` entry \(\) must be an axis"),
        (lambda: variance_profile(np.ones((2, 3, 2)), np.ones((2, 3)), max_steps=2, margins=[0, 1]), ValueError,
         r"`h` has shape \(2, 3\) but `table` has shape \(2, 3, 2\).*\+ \(d,\) for d functions"),
        (lambda: variance_profile(np.ones((2, 3, 2)), np.ones((2, 3, 3)), max_steps=2, margins=[0, 1]), ValueError,
         r"`h` has shape \(2, 3, 3\) but `table` has shape \(2, 3, 2\)"),
        (lambda: variance_profile(np.ones((2, 3, 2)), np.ones((2, 3, 2, 1, 1)), max_steps=2, margins=[0]),
         ValueError, r"`h` has shape \(2, 3, 2, 1, 1\)"),
        (lambda: variance_profile(np.ones((2, 3)), np.full((2, 3), np.inf), max_steps=2, margins=[0, 1]),
         ValueError, r"`h` contains NaN or inf, first at index \(0, 0\)"),
        (lambda: variance_profile(np.ones((2, 3)), np.ones((2, 3)) + 1j, max_steps=2, margins=[0, 1]), TypeError,
         r"`h` must hold real numbers"),
        (lambda: variance_profile(np.ones((2, 3)), sp.csr_array(np.ones((2, 3))), max_steps=2, margins=[0, 1]),
         TypeError, r"`h` is sparse but `table` is dense"),
        (lambda: variance_profile(-np.ones((2, 3)), np.ones((2, 3)), max_steps=2, margins=[0, 1]), ValueError,
         r"`table` must be nonnegative; found -1.0 at index \(0, 0\)"),
        (lambda: variance_profile(np.full((2, 3), np.inf), np.ones((2, 3)), max_steps=2, margins=[0, 1]), ValueError,
         r"`table` contains inf, first at index \(0, 0\)"),
        (lambda: variance_profile(np.zeros((2, 3)), np.ones((2, 3)), max_steps=2, margins=[0, 1]), ValueError,
         r"`table` has total mass 0"),
        (lambda: variance_profile(sp.csr_array(np.ones((2, 3))), np.ones(6), max_steps=2, margins=[0, 1]), TypeError,
         r"`table` is a scipy.sparse matrix; with `margins` give a dense array"),
        (lambda: variance_profile(np.ones((2, 3)), np.ones((2, 3)), max_steps=2, margins=[0, 1], start="y"),
         ValueError, r"`start` \('y'\) applies to a two-way table without `margins`.*reorder `margins`"),
        (lambda: variance_profile(np.ones((2, 3)), np.ones((2, 3)), max_steps=2, margins=[0, 1], start="z"),
         ValueError, r"`start` must be 'x'"),
        (lambda: variance_profile(np.ones((2, 3)), np.ones((2, 3)), max_steps=-1, margins=[0, 1]), ValueError,
         r"`max_steps` must be >= 0"),
    ],
)
def test_margins_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# -- progress and short reprs ----------------------------------------------------------------------


@pytest.mark.parametrize("margins", [None, [0, 1], [1, (0, 1), 0]])
@pytest.mark.parametrize("max_steps", [0, 1, 2, 7, 400])
def test_progress_reports_every_sigma2_once_in_growing_counts(margins, max_steps):
    rng = np.random.default_rng(3)
    P, h = rng.random((5, 6)) + 0.05, rng.normal(size=(5, 6, 2))
    calls = []
    prof = variance_profile(P, h, max_steps=max_steps, margins=margins,
                            progress=lambda done, values: calls.append((done, np.array(values))))
    done = [d for d, _ in calls]
    assert done == sorted(set(done)) and (done[-1] if done else 0) == max_steps
    # Each reported value is one of the profile's sigma_k^2 (k >= 1), before the scale is undone
    # (h is of order 1 here, so there is none).
    for _, values in calls:
        assert np.any(np.all(np.isclose(prof.sigma2[1:], values, rtol=0, atol=0), axis=1))
    silent = variance_profile(P, h, max_steps=max_steps, margins=margins)
    np.testing.assert_array_equal(prof.sigma2, silent.sigma2)


def test_progress_true_draws_on_stderr_and_bad_progress_is_a_type_error(capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tqdm", None)  # no tqdm: the plain line
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    variance_profile(P_A, H_A, max_steps=20, progress=True)
    err = capsys.readouterr().err
    assert "variance_profile: sigma_k^2 known: step" in err and err.endswith("\n")
    for bad in ("yes", 1, [print]):
        with pytest.raises(TypeError, match=r"`progress` must be True, False or a callable f\(step, errors\); got"):
            variance_profile(P_A, H_A, max_steps=3, progress=bad)


def short_repr(obj, *facts):
    text = repr(obj)
    assert len(text.splitlines()) <= 3 and len(text) <= 300 and "array(" not in text, text
    for fact in facts:
        assert fact in text, (fact, text)


def test_result_reprs_are_short():
    rng = np.random.default_rng(4)
    P = rng.random((60, 70))
    H = rng.normal(size=(60, 70, 6))
    short_repr(variance_profile(P_A, H_A, max_steps=8), "k = 0..8", "start='x'", "1 function",
               "sigma_0^2 1.4", "sigma_8^2 0.5773")
    short_repr(variance_profile(P, H, max_steps=200, start="y"), "k = 0..200", "6 functions", ", ...]")
    short_repr(variance_profile(rng.random((2, 3, 4)), rng.normal(size=(2, 3, 4)), max_steps=5, margins=[2, (0, 1)]),
               "margins [(2,), (0, 1)]")
    short_repr(variance_decomposition(P, H[..., 0], max_steps=50), "k = 0..50", "70 directions", "s_2 = ",
               "sigma_inf^2")
    short_repr(misspecified_profile(np.array([[.3, .2], [.1, .4]]), [[1, 0], [0, 0]], [.6, .4], [.4, .6],
                                    max_steps=4), "k = 0..4", "bias at k = 4 0.03103", "variance at k = 0 0.21")
