"""Tests of databalance.balance: properties, independent references, errors, scale."""

import itertools
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

from databalance import (
    ConvergenceWarning,
    InfeasibleError,
    balance_logits,
    balance_table,
    iterate_balance,
)

from .strategies import patterned_tables, positive_tables, supports_with_targets


def paper_loop(table, p_x, p_y, k):
    """The paper's loop: normalise the whole table, then alternately rescale rows and columns."""
    P = table / table.sum()
    for i in range(k):
        if i % 2 == 0:
            P = P * (p_x / P.sum(axis=1))[:, None]
        else:
            P = P * (p_y / P.sum(axis=0))[None, :]
    return P


def rng_problem(seed, m=5, l=4):
    rng = np.random.default_rng(seed)
    T = rng.gamma(1.0, size=(m, l))
    p_x, p_y = rng.dirichlet(np.ones(m)), rng.dirichlet(np.ones(l))
    return T, p_x, p_y


# -- exact k steps ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_k_steps_match_the_papers_loop(seed, k):
    T, p_x, p_y = rng_problem(seed)
    res = balance_table(T, p_x, p_y, steps=k)
    assert res.status == "completed" and res.steps == k and not res.converged
    # The paper normalises first; balancing is invariant to that for k >= 1.
    np.testing.assert_allclose(res.table, paper_loop(T, p_x, p_y, k), rtol=1e-12, atol=1e-15)


@given(positive_tables())
def test_fixed_marginal_exact_after_each_step(problem):
    T, p_x, p_y = problem
    for it in itertools.islice(iterate_balance(T, p_x, p_y), 1, 7):
        out = it.table
        if it.steps % 2:
            np.testing.assert_allclose(out.sum(axis=1), p_x, rtol=1e-12, atol=1e-15)
        else:
            np.testing.assert_allclose(out.sum(axis=0), p_y, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(it.marginal_error[-1], [
            np.abs(out.sum(axis=1) - p_x).sum(), np.abs(out.sum(axis=0) - p_y).sum()], atol=1e-13)


def test_steps_zero_returns_the_input_and_its_errors():
    T, p_x, p_y = rng_problem(0)
    res = balance_table(T, p_x, p_y, steps=0)
    np.testing.assert_array_equal(res.table, T)
    assert res.marginal_error.shape == (1, 2)
    np.testing.assert_allclose(res.marginal_error[0, 0], np.abs(T.sum(1) - p_x).sum() / p_x.sum())


# -- properties ------------------------------------------------------------------------------------


@given(positive_tables(), st.floats(1e-3, 1e3))
def test_invariant_to_scaling_the_input(problem, c):
    T, p_x, p_y = problem
    a = balance_table(T, p_x, p_y, steps=5).table
    b = balance_table(c * T, p_x, p_y, steps=5).table
    np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-15)


@given(positive_tables())
def test_idempotent_on_balanced_tables(problem):
    T, p_x, p_y = problem
    once = balance_table(T, p_x, p_y)
    twice = balance_table(once.table, p_x, p_y)
    assert twice.converged and twice.steps <= 1
    np.testing.assert_allclose(twice.table, once.table, rtol=1e-9, atol=1e-14)


@given(positive_tables(), st.integers(0, 6))
def test_transpose_symmetry(problem, k):
    T, p_x, p_y = problem
    a = balance_table(T, p_x, p_y, steps=k, start="x")
    b = balance_table(T.T, p_y, p_x, steps=k, start="y")
    np.testing.assert_allclose(a.table, b.table.T, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(a.marginal_error, b.marginal_error[:, ::-1], atol=1e-13)


@given(patterned_tables(), st.sampled_from(["x", "y"]))
def test_dense_sparse_log_agree(problem, start):
    T, p_x, p_y = problem
    for k in (1, 2, 5, None):
        dense = balance_table(T, p_x, p_y, steps=k, start=start)
        sparse = balance_table(sp.csr_array(T), p_x, p_y, steps=k, start=start)
        with np.errstate(divide="ignore"):
            log = balance_logits(np.log(T), p_x, p_y, steps=k, start=start)
        assert sp.issparse(sparse.table)
        np.testing.assert_allclose(sparse.table.toarray(), dense.table, rtol=1e-9, atol=1e-13)
        np.testing.assert_allclose(log.table, dense.table, rtol=1e-9, atol=1e-13)
        assert dense.steps == sparse.steps


@given(patterned_tables())
def test_limit_is_the_kl_projection(problem):
    T, p_x, p_y = problem
    res = balance_table(T, p_x, p_y, tol=1e-12, max_steps=100_000)
    out = res.table
    assert res.converged and res.feasible
    np.testing.assert_allclose(out, res.row_scaling[:, None] * T * res.col_scaling[None, :])
    np.testing.assert_allclose(out.sum(1), p_x, atol=1e-11)
    np.testing.assert_allclose(out.sum(0), p_y, atol=1e-11)
    assert np.all(out[T == 0] == 0)
    # log(out / T) on the support is additive: f(x) + g(y), so a least-squares fit is exact.
    i, j = np.nonzero(T)
    design = np.zeros((len(i), T.shape[0] + T.shape[1]))
    design[np.arange(len(i)), i] = 1
    design[np.arange(len(i)), T.shape[0] + j] = 1
    resid = np.log(out[i, j] / T[i, j])
    coef, *_ = np.linalg.lstsq(design, resid, rcond=None)
    np.testing.assert_allclose(design @ coef, resid, atol=1e-8)


@given(positive_tables(max_batch=2), st.sampled_from([2, 3, None]))
def test_batch_equals_loop(problem, k):
    T, p_x, p_y = problem
    res = balance_table(T, p_x, p_y, steps=k, tol=1e-12)
    lres = balance_logits(np.log(T), p_x, p_y, steps=k, tol=1e-12)
    for b in np.ndindex(*T.shape[:-2]):
        one = balance_table(T[b], p_x[b], p_y[b], steps=res.steps)
        np.testing.assert_allclose(res.table[b], one.table, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(res.marginal_error[b], one.marginal_error, atol=1e-14)
        np.testing.assert_allclose(lres.table[b], one.table, rtol=1e-9, atol=1e-14)


def test_batch_with_shared_marginals():
    T = np.random.default_rng(1).gamma(1.0, size=(4, 3, 5))
    res = balance_table(T, np.full(3, 1 / 3), np.full(5, 0.2), tol=1e-12)
    np.testing.assert_allclose(res.table.sum(-1), 1 / 3, atol=1e-11)
    np.testing.assert_allclose(res.table.sum(-2), 0.2, atol=1e-11)


# -- against POT -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_converged_matches_pot_sinkhorn(seed):
    ot = pytest.importorskip("ot")
    rng = np.random.default_rng(seed)
    m, l = 30, 20
    M = rng.random((m, l))
    reg = 0.5
    a, b = rng.dirichlet(np.ones(m)), rng.dirichlet(np.ones(l))
    plan = ot.sinkhorn(a, b, M, reg, stopThr=1e-14, numItermax=100_000)
    ours = balance_table(np.exp(-M / reg), a, b, tol=1e-13)
    np.testing.assert_allclose(ours.table, plan, rtol=1e-8, atol=1e-15)
    log = balance_logits(-M / reg, a, b, tol=1e-13)
    np.testing.assert_allclose(log.table, plan, rtol=1e-8, atol=1e-15)


# -- sparse ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo", "lil", "dok", "bsr", "dia"])
@pytest.mark.parametrize("kind", [sp.csr_array, sp.csr_matrix])
def test_sparse_formats_keep_pattern_and_type(fmt, kind):
    T, p_x, p_y = rng_problem(3, 6, 6)
    T[T < 0.5] = 0
    T += np.eye(6)
    S = kind(T).asformat(fmt)
    res = balance_table(S, T.sum(1) / T.sum(), T.sum(0) / T.sum(), steps=4)
    out = res.table
    assert sp.issparse(out) and out.format == fmt
    assert sp.isspmatrix(out) == sp.isspmatrix(S)
    np.testing.assert_array_equal(out.toarray() != 0, T != 0)
    np.testing.assert_allclose(out.toarray(), balance_table(T, T.sum(1) / T.sum(), T.sum(0) / T.sum(),
                                                             steps=4).table, rtol=1e-12)


def test_huge_sparse_table_is_never_densified():
    # 10^6 x 10^6 (8 TB dense) with 3 * 10^6 nonzeros on the first 500 000 rows and columns.
    n, live, nnz = 10**6, 500_000, 3 * 10**6
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.integers(0, live, nnz - live), np.arange(live)])
    cols = np.concatenate([rng.integers(0, live, nnz - live), np.arange(live)])
    T = sp.csr_array((rng.random(nnz) + 0.1, (rows, cols)), shape=(n, n))
    p = np.zeros(n)
    p[:live] = 1 / live
    res = balance_table(T, p, p, steps=6)
    out = res.table
    assert sp.issparse(out) and out.nnz == T.nnz
    np.testing.assert_allclose(out.sum(axis=0), p, atol=1e-15)
    assert res.marginal_error[-1, 0] < res.marginal_error[1, 1]


# -- log domain ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_logits_spanning_1e4_converge_exactly(dtype):
    # Row and column effects of size 1e4 plus an interaction: the balanced table is moderate but
    # exp(logits) spans e^{+-2e4}, far beyond float64.
    rng = np.random.default_rng(0)
    m, l = 40, 30
    noise = rng.normal(0, 3, (m, l))
    L = (rng.uniform(-1e4, 1e4, (m, 1)) + rng.uniform(-1e4, 1e4, (1, l)) + noise).astype(dtype)
    p_x, p_y = rng.dirichlet(np.ones(m)), rng.dirichlet(np.ones(l))
    res = balance_logits(L, p_x, p_y)
    assert res.converged and res.log_table.dtype == dtype
    assert np.isfinite(res.log_table).all()
    out = np.exp(res.log_table.astype(np.float64))
    tol = 1e-9 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(out.sum(1), p_x, atol=tol)
    np.testing.assert_allclose(out.sum(0), p_y, atol=tol)
    # The same limit as balancing the interaction alone (the KL projection ignores additive terms).
    # float32 rounds the logits themselves at ~1e4 * 6e-8 = 6e-4, which the limit inherits.
    ref = balance_table(np.exp(noise), p_x, p_y)
    np.testing.assert_allclose(out, ref.table, rtol=1e-6 if dtype == np.float64 else 5e-3, atol=1e-9)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_logits_spanning_1e4_k_steps_and_honest_status(dtype):
    rng = np.random.default_rng(0)
    L = rng.uniform(-1e4, 1e4, size=(40, 30)).astype(dtype)
    p_x, p_y = np.full(40, 1 / 40), np.full(30, 1 / 30)
    # Effectively zero temperature: convergence takes far more than 500 half-steps (an exact
    # log-sum-exp loop still has marginal error 0.08 after 4000). The run must say so.
    with pytest.warns(ConvergenceWarning):
        res = balance_logits(L, p_x, p_y, max_steps=500)
    assert not res.converged and not np.isnan(res.log_table).any()
    assert np.isfinite(res.marginal_error[1:]).all()
    for k in (1, 2, 3):
        direct = L.astype(np.float64)
        for i in range(k):
            axis = 1 if i % 2 == 0 else 0
            target = np.log(p_x)[:, None] if axis == 1 else np.log(p_y)[None, :]
            direct = direct - _lse(direct, axis) + target
        got = balance_logits(L, p_x, p_y, steps=k).log_table
        assert not np.isnan(got).any()
        big = direct > np.log(1e-30)  # entries carrying mass; tinier ones may differ in float32
        rtol = 1e-9 if dtype == np.float64 else 1e-4
        np.testing.assert_allclose(np.exp(got[big]), np.exp(direct[big]), rtol=rtol)


def _lse(a, axis):
    peak = a.max(axis=axis, keepdims=True)
    return np.log(np.exp(a - peak).sum(axis=axis, keepdims=True)) + peak


@given(st.sampled_from([np.float32, np.float64]), st.integers(1, 3), st.integers(1, 70), st.integers(1, 9),
       st.sampled_from([-1, -2]), st.booleans(), st.integers(0, 2**32 - 1))
def test_one_addition_when_one_potential_is_zero(dtype, batch, m, l, axis, representable, seed):
    """The first exponentiation adds one potential in the logits' dtype: bit for bit the float64
    sum rounded to that dtype (with -inf, -0.0 and +0.0 entries), and the float64 sum when the
    potential is not exact in the dtype."""
    from databalance._kernels.log import _chunk_sum, add_potentials, one_addend, row_chunks

    rng = np.random.default_rng(seed)
    L = (rng.standard_normal((batch, m, l)) * 10.0 ** rng.integers(-3, 8)).astype(dtype)
    L.flat[rng.integers(0, L.size, 3)] = [-np.inf, -0.0, 0.0]
    centre = -np.max(np.where(np.isneginf(L), 0.0, L), axis=axis).astype(np.float64)
    if not representable:
        centre += 1e-9 * (np.abs(centre) + 1.0)
    zero = np.zeros((batch, l if axis == -1 else m))
    f, g = (centre, zero) if axis == -1 else (zero, centre)
    expected = np.empty_like(L)
    for b, rows in row_chunks(L):
        expected[b][rows] = _chunk_sum(L, f, g, b, rows)
    assert (one_addend(L, f, g, L.dtype) is not None) == (representable or dtype == np.float64)
    np.testing.assert_array_equal(add_potentials(L, f, g, out=np.empty_like(L)), expected)  # -0.0 == 0.0
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(add_potentials(L, f, g, out=np.empty_like(L), fn=np.exp), np.exp(expected))


def test_neg_inf_logits_are_structural_zeros():
    L = np.array([[0.0, -np.inf, 1.0], [2.0, 0.5, -np.inf], [-np.inf, 1.0, 0.0]])
    res = balance_logits(L, [0.2, 0.3, 0.5], [0.4, 0.4, 0.2])
    assert res.converged
    assert np.isneginf(res.log_table[np.isneginf(L)]).all()
    np.testing.assert_allclose(res.table.sum(1), [0.2, 0.3, 0.5], atol=1e-10)


def test_batched_clip_logits_float32():
    rng = np.random.default_rng(0)
    L = (rng.standard_normal((3, 8, 16)) @ rng.standard_normal((3, 16, 8)) / 0.07).astype(np.float32)
    u = np.full(8, 1 / 8, dtype=np.float32)
    for k in (1, 2):
        res = balance_logits(L, u, u, steps=k)
        assert res.log_table.dtype == np.float32 and res.log_table.shape == L.shape
        for b in range(3):
            one = balance_logits(L[b], u, u, steps=k)
            np.testing.assert_allclose(res.log_table[b], one.log_table, rtol=1e-5, atol=1e-4)


# -- dtypes, mutation ------------------------------------------------------------------------------


def test_float32_in_float32_out_and_no_mutation():
    T, p_x, p_y = rng_problem(0)
    T32 = T.astype(np.float32)
    keep = T32.copy()
    res = balance_table(T32, p_x, p_y)
    assert res.table.dtype == np.float32 and res.row_scaling.dtype == np.float32
    assert res.converged
    np.testing.assert_array_equal(T32, keep)
    S = sp.csr_array(T)
    data = S.data.copy()
    balance_table(S, p_x, p_y)
    np.testing.assert_array_equal(S.data, data)


def test_integer_counts_are_accepted():
    res = balance_table(np.array([[3, 1], [2, 4]]), [1, 1], [1, 1])
    assert res.table.dtype == np.float64 and res.converged


# -- honest status ---------------------------------------------------------------------------------


def test_max_steps_warns_and_is_not_converged():
    T, p_x, p_y = rng_problem(0)
    with pytest.warns(ConvergenceWarning, match="max_steps.*or pass `acceleration='auto'`"):
        res = balance_table(T, p_x, p_y, max_steps=3)
    assert res.status == "max_steps" and not res.converged and res.steps == 3
    with pytest.warns(ConvergenceWarning, match="max_steps.*or pass `acceleration='auto'`"):
        balance_logits(np.log(T), p_x, p_y, max_steps=3)
    with pytest.warns(ConvergenceWarning, match="Raise `max_steps`.$"):  # already accelerated: no such advice
        balance_table(T, p_x, p_y, max_steps=3, acceleration="auto")


def test_unreachable_tolerance_stalls_with_a_warning():
    T, p_x, p_y = rng_problem(0, 50, 40)
    with pytest.warns(ConvergenceWarning, match="stalled"):
        res = balance_table(T, p_x, p_y, tol=1e-300)
    assert res.status == "stalled" and not res.converged


def test_steps_k_emits_no_warning():
    T, p_x, p_y = rng_problem(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        balance_table(T, p_x, p_y, steps=50)


def test_infeasible_pattern_raises_for_convergence_and_runs_for_k():
    T = np.diag([0.5, 0.5])
    with pytest.raises(InfeasibleError, match=r"rows \[0\] need total mass 0.7 .* columns \[0\]"):
        balance_table(T, [0.7, 0.3], [0.3, 0.7])
    res = balance_table(T, [0.7, 0.3], [0.3, 0.7], steps=5)
    assert res.status == "completed" and not res.feasible and not np.isnan(res.table).any()
    np.testing.assert_allclose(res.table.sum(), 1.0)  # no mass lost


def test_float32_targets_whose_totals_differ_by_rounding_are_feasible():
    # 1/6 and 1/5 in float32 total 1 + 3.0e-8 and 1 + 1.5e-8: the max-flow once read that
    # difference (tens of grid units) as a deficit and raised InfeasibleError.
    rng = np.random.default_rng(0)
    L = rng.normal(size=(6, 5))
    L[0, 0] = -np.inf
    p, q = np.full(6, 1 / 6, np.float32), np.full(5, 0.2, np.float32)
    for res in (balance_logits(L, p, q), balance_table(np.exp(L), p, q)):
        assert res.status == "converged" and res.feasible
        np.testing.assert_allclose(res.table.sum(axis=0), q, rtol=1e-7)


def test_infeasible_block_pattern_found_in_larger_table():
    T = np.ones((4, 4))
    T[:2, 2:] = 0  # rows 0, 1 reach only columns 0, 1
    with pytest.raises(InfeasibleError, match=r"rows \[0, 1\] .* columns \[0, 1\]"):
        balance_table(T, [0.3, 0.3, 0.2, 0.2], [0.25, 0.25, 0.25, 0.25])
    assert balance_table(T, [0.2, 0.2, 0.3, 0.3], [0.25] * 4).converged  # slack: interior solution


def test_boundary_feasible_pattern_is_never_called_converged():
    # Rows 0, 1 exactly fill columns 0, 1, so rows 2, 3 must be driven to zero there: the limit
    # exists but is not diag(u) T diag(v) with finite scalings, and IPF creeps (error ~ 1/k).
    T = np.ones((4, 4))
    T[:2, 2:] = 0
    with pytest.warns(ConvergenceWarning):
        res = balance_table(T, [0.25] * 4, [0.25] * 4, max_steps=2000)
    assert not res.converged and res.feasible
    assert 1e-6 < res.marginal_error[-1].max() < 1e-2


def test_zero_rows_with_zero_targets_stay_zero():
    T = np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [3.0, 1.0, 0.0]])
    res = balance_table(T, [0.5, 0.0, 0.5], [0.6, 0.4, 0.0])
    assert res.converged
    assert np.all(res.table[1] == 0) and np.all(res.table[:, 2] == 0)


def test_positive_entries_with_zero_target_are_emptied():
    T = np.ones((3, 3))
    res = balance_table(T, [0.5, 0.5, 0.0], [1 / 3] * 3)
    assert res.converged and np.all(res.table[2] == 0)


# -- errors ----------------------------------------------------------------------------------------

P = [0.5, 0.5]


@pytest.mark.parametrize(
    "table, p_x, p_y, kwargs, exc, match",
    [
        ([[1.0, np.nan], [1.0, 1.0]], P, P, {}, ValueError, r"`table` contains NaN, first at index \(0, 1\)"),
        ([[1.0, 1.0], [np.inf, 1.0]], P, P, {}, ValueError, r"infinite value, first at index \(1, 0\)"),
        ([[1.0, 1.0], [1.0, -2.0]], P, P, {}, ValueError, r"nonnegative; found .*-2.0.* at index \(1, 1\)"),
        ([["a", "b"], ["c", "d"]], P, P, {}, TypeError, r"`table` has dtype .* not a real number"),
        ([[1 + 1j, 1], [1, 1]], P, P, {}, TypeError, r"`table` has dtype complex128"),
        ([1.0, 2.0], P, P, {}, ValueError, r"`table` must have at least 2 dimensions"),
        ([[1.0, 1.0], [1.0, 1.0]], [0.3, 0.3, 0.4], P, {}, ValueError,
         r"`p_x` has shape \(3,\) but the table has 2 rows"),
        ([[1.0, 1.0], [1.0, 1.0]], P, [1.0], {}, ValueError, r"`p_y` has shape \(1,\) but the table has 2 columns"),
        ([[1.0, 1.0], [1.0, 1.0]], [-0.5, 1.5], P, {}, ValueError, r"`p_x` must be nonnegative; found .*-0.5"),
        ([[1.0, 1.0], [1.0, 1.0]], P, [0.5, 0.6], {}, ValueError, r"totals of `p_x` \(1.0\) and `p_y` \(1.1\) differ"),
        ([[1.0, 1.0], [1.0, 1.0]], P, P, {"steps": -1}, ValueError, r"`steps` must be >= 0"),
        ([[1.0, 1.0], [1.0, 1.0]], P, P, {"steps": 1.5}, TypeError, r"`steps` must be an integer"),
        ([[1.0, 1.0], [1.0, 1.0]], P, P, {"start": "z"}, ValueError, r"`start` must be 'x' .* got 'z'"),
        ([[1.0, 1.0], [1.0, 1.0]], P, P, {"tol": -1.0}, ValueError, r"`tol` must be a positive"),
        ([[1.0, 1.0], [1.0, 1.0]], P, P, {"max_steps": 0}, ValueError, r"`max_steps` must be a positive"),
        ([[1.0, 1.0], [0.0, 0.0]], [0.9, 0.1], P, {}, ValueError,
         r"Row 1 of `table` is empty but `p_x\[1\]` = 0.1 > 0: no rescaling can reach `p_x`. Merge"),
        ([[1.0, 0.0], [1.0, 0.0]], P, [0.9, 0.1], {}, ValueError, r"Column 1 of `table` is empty but `p_y\[1\]`"),
        ([[1.0, 1.0], [0.0, 1.0]], P, [1.0, 0.0], {}, ValueError,
         r"Row 1 of `table` has mass only where `p_y` is 0 but `p_x\[1\]` = 0.5"),
    ],
)
def test_errors(table, p_x, p_y, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        balance_table(np.array(table), p_x, p_y, **kwargs)


def test_missing_mass_is_checked_only_for_steps_that_need_it():
    T = np.array([[1.0, 1.0], [0.0, 1.0]])
    res = balance_table(T, P, [1.0, 0.0], steps=1)  # one row step is well defined
    assert res.steps == 1
    with pytest.raises(ValueError, match="has mass only where"):
        balance_table(T, P, [1.0, 0.0], steps=3)


def test_sparse_errors_name_row_and_column():
    S = sp.csr_array(np.array([[1.0, 0.0], [0.0, -1.0]]))
    with pytest.raises(ValueError, match=r"found -1.0 at index \(1, 1\)"):
        balance_table(S, P, P)
    with pytest.raises(ValueError, match="must be 2-D"):
        balance_table(sp.coo_array(np.ones(3)), P, P)


@pytest.mark.parametrize(
    "logits, match",
    [
        ([[0.0, np.nan], [0.0, 0.0]], r"`logits` contains NaN, first at index \(0, 1\)"),
        ([[0.0, np.inf], [0.0, 0.0]], r"`logits` contains \+inf, first at index \(0, 1\)"),
        ([[0.0, 0.0], [-np.inf, -np.inf]], r"Row 1 of `logits` is empty but `p_x\[1\]`"),
    ],
)
def test_logit_errors(logits, match):
    with pytest.raises(ValueError, match=match):
        balance_logits(np.array(logits), P, P)


def test_batch_totals_mismatch_names_the_problem():
    T = np.ones((2, 2, 2))
    with pytest.raises(ValueError, match=r"batch index \(1,\)"):
        balance_table(T, [[0.5, 0.5], [0.5, 0.5]], [[0.5, 0.5], [0.5, 0.9]])


def test_large_supports_check_feasibility_after_deferral(monkeypatch):
    import databalance.balance as balance_module

    monkeypatch.setattr(balance_module, "FEASIBILITY_EAGER_SIZE", 1)
    T = sp.csr_array(np.diag([0.5, 0.5]))
    with pytest.raises(InfeasibleError, match=r"rows \[0\]"):
        balance_table(T, [0.7, 0.3], [0.3, 0.7])
    assert balance_table(T, [0.5, 0.5], [0.5, 0.5]).feasible


# -- hardening: scale, honesty of the status, formats, messages, memory -----------------------------

A = np.array([[0.10, 0.05, 0.05], [0.05, 0.20, 0.05], [0.05, 0.05, 0.40]])
SHIFTED = (np.array([0.6, 0.3, 0.1]), np.array([0.1, 0.3, 0.6]))


@pytest.mark.parametrize("scale", [1e-310, 1e-320, 1e-200, 1e200, 1e300])
@pytest.mark.parametrize("sparse", [False, True])
def test_tables_of_extreme_scale_balance_correctly(scale, sparse):
    reference = balance_table(A, *SHIFTED).table
    T = A * scale
    res = balance_table(sp.csr_array(T) if sparse else T, *SHIFTED)
    out = res.table.toarray() if sparse else res.table
    assert res.converged and np.isfinite(res.row_scaling).all() and np.isfinite(res.col_scaling).all()
    # Subnormal inputs carry fewer digits: 1e-320 keeps about 3.
    np.testing.assert_allclose(out, reference, rtol=1e-12 if scale >= 1e-300 else 1e-2)


def test_float32_tables_below_1e_38_and_targets_near_1e308():
    res = balance_table((A * 1e-39).astype(np.float32), *SHIFTED)
    assert res.converged and res.table.dtype == np.float32
    np.testing.assert_allclose(res.table, balance_table(A, *SHIFTED).table, rtol=1e-3)
    big = 1e308 / 1.5
    res = balance_table(A, SHIFTED[0] * big, SHIFTED[1] * big)
    assert res.converged
    np.testing.assert_allclose(res.table.sum(axis=1) / big, SHIFTED[0], rtol=1e-10)
    with pytest.raises(ValueError, match="total of `p_x` or `p_y` overflows"):
        balance_table(A, [1e308, 1e308, 1.0], [1e308, 1e308, 1.0])


def test_nan_is_never_reported_as_convergence(monkeypatch):
    from databalance._kernels import DenseKernel

    real = DenseKernel.sums

    def poisoned(self, j, state):
        out = real(self, j, state)
        return out * np.nan if state.steps >= 3 else out

    monkeypatch.setattr(DenseKernel, "sums", poisoned)
    with pytest.warns(ConvergenceWarning, match="failed"):
        res = balance_table(A, *SHIFTED)
    assert res.status == "failed" and not res.converged and np.isnan(res.marginal_error[-1]).any()


def _true_errors(table, p_x, p_y):
    return [np.abs(table.sum(axis=1) - p_x).sum(), np.abs(table.sum(axis=0) - p_y).sum()]


@pytest.mark.parametrize("logits, targets", [
    (np.array([[1e300, 0.0], [0.0, 1e300]]), ([0.5, 0.5], [0.5, 0.5])),
    (np.log(A) + 1e15, SHIFTED),
])
def test_logits_report_the_errors_of_what_they_return(logits, targets):
    with pytest.warns(ConvergenceWarning, match="potentials are rounded"):
        res = balance_logits(logits, *targets)
    assert not res.converged and res.status == "stalled"
    np.testing.assert_allclose(res.marginal_error[-1], _true_errors(res.table, *targets), rtol=1e-6)
    assert res.marginal_error[-1].max() > 1e-3


def test_logits_of_moderate_size_still_converge_and_report_true_errors():
    rng = np.random.default_rng(0)
    L = rng.uniform(-1e4, 1e4, size=(30, 1)) + rng.uniform(-1e4, 1e4, size=(1, 20)) + rng.normal(size=(30, 20))
    p_x, p_y = np.full(30, 1 / 30), np.full(20, 1 / 20)
    res = balance_logits(L, p_x, p_y)
    assert res.converged
    np.testing.assert_allclose(res.marginal_error[-1], _true_errors(res.table, p_x, p_y), atol=1e-12)


def test_tolerance_below_float_resolution_stalls_with_real_errors():
    T, p_x, p_y = rng_problem(0)
    with pytest.warns(ConvergenceWarning, match="stalled"):
        res = balance_table(T, p_x, p_y, tol=1e-300)
    assert res.status == "stalled"
    assert res.marginal_error[-1].max() > 0
    np.testing.assert_allclose(res.marginal_error[-1], _true_errors(res.table, p_x, p_y), atol=1e-15)


def test_float32_logits_give_float32_tables_and_float64_potentials():
    # float32 potentials would round shifts of size 1e4 by ~1e-3: the result keeps them in float64.
    rng = np.random.default_rng(1)
    L = (rng.normal(scale=1e4, size=(6, 1)) + rng.normal(scale=1e4, size=(1, 5)) + rng.normal(size=(6, 5)))
    res = balance_logits(L.astype(np.float32), np.full(6, 1 / 6), np.full(5, 0.2))
    assert res.converged
    assert res.table.dtype == res.log_table.dtype == np.float32
    assert res.row_potential.dtype == res.col_potential.dtype == np.float64


def test_masked_ragged_and_odd_options_are_refused_by_name():
    masked = np.ma.masked_array(np.ones((2, 2)), mask=[[0, 1], [0, 0]])
    with pytest.raises(TypeError, match=r"`table` is a masked array.*filled\(0\)"):
        balance_table(masked, P, P)
    with pytest.raises(TypeError, match="`p_x` is a masked array"):
        balance_table(np.ones((2, 2)), np.ma.masked_array(P, mask=[0, 1]), P)
    with pytest.raises(ValueError, match="`table` could not be read as an array: its rows have different"):
        balance_table([[1.0, 2.0], [3.0]], P, P)
    with pytest.raises(ValueError, match="`p_y` could not be read as an array"):
        balance_table(np.ones((2, 2)), P, [[0.5], [0.2, 0.3]])
    with pytest.raises(ValueError, match=r"`start` must be 'x' .* got array"):
        balance_table(np.ones((2, 2)), P, P, start=np.array(["x", "y"]))
    with pytest.raises(ValueError, match="`logits` could not be read"):
        balance_logits([[1.0, 2.0], [3.0]], P, P)


def test_errors_are_importable_where_the_balancing_api_lives():
    from databalance.balance import ConvergenceWarning as CW
    from databalance.balance import InfeasibleError as IE

    assert IE is InfeasibleError and CW is ConvergenceWarning and issubclass(IE, ValueError)


def test_infeasible_logits_name_logits():
    L = np.where(np.eye(2) > 0, 0.0, -np.inf)
    with pytest.raises(InfeasibleError, match="zero pattern of `logits`"):
        balance_logits(L, [0.7, 0.3], [0.3, 0.7])
    assert not balance_logits(L, [0.7, 0.3], [0.3, 0.7], steps=3).feasible


def test_log_results_keep_one_buffer_that_becomes_the_table():
    """The result holds the iteration's buffer (one array the size of the logits, nothing else of
    the kernel); reading ``table`` scales it in place: no second exponentiation, no new array."""
    import gc
    import tracemalloc

    L = np.random.default_rng(2).normal(size=(1000, 1000))
    p = np.full(1000, 1e-3)
    _ = balance_logits(L, p, p, steps=4).table  # imports and JIT caches first
    tracemalloc.start()
    try:
        res = balance_logits(L, p, p, steps=4)
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        table = res.table
        extra = tracemalloc.get_traced_memory()[1] - retained
    finally:
        tracemalloc.stop()
    assert res.steps == 4
    assert L.nbytes <= retained < 1.1 * L.nbytes  # the buffer, potentials and errors
    assert extra < 0.1 * L.nbytes  # scaled in place, a block of rows at a time
    assert not any(callable(v) for v in vars(res).values())
    np.testing.assert_allclose(table, np.exp(res.log_table), rtol=1e-13)
    assert res.table is table


@given(supports_with_targets())
def test_feasibility_agrees_with_an_independent_linear_program(problem):
    from scipy.optimize import linprog

    T, p_x, p_y = problem
    m, l = T.shape
    cells = np.argwhere(T > 0)
    # Largest mass a table on the support can carry within both targets; feasible iff it is 1.
    A_ub = np.zeros((m + l, len(cells)))
    A_ub[cells[:, 0], np.arange(len(cells))] = 1
    A_ub[m + cells[:, 1], np.arange(len(cells))] = 1
    lp = linprog(-np.ones(len(cells)), A_ub=A_ub, b_ub=np.concatenate([p_x, p_y]), bounds=(0, None),
                 method="highs")
    deficit = 1 + lp.fun
    feasible = balance_table(T, p_x, p_y, steps=0).feasible
    if deficit < 1e-12:
        assert feasible
    elif deficit > 1e-7:
        assert not feasible
        with pytest.raises(InfeasibleError):
            balance_table(T, p_x, p_y)


# -- reprs and progress ----------------------------------------------------------------------------


def test_reprs_are_one_short_line():
    rng = np.random.default_rng(0)
    results = [
        balance_table(rng.random((3000, 300)), np.full(3000, 1 / 3000), np.full(300, 1 / 300)),
        balance_table(sp.csr_array(rng.random((50, 40))), np.full(50, 0.02), np.full(40, 0.025), steps=3),
        balance_logits(rng.normal(size=(4, 30, 30)), np.full(30, 1 / 30), np.full(30, 1 / 30)),
    ]
    for res in results:
        text = repr(res)
        assert "\n" not in text and len(text) < 200 and f"status='{res.status}'" in text
        assert f"steps={res.steps}" in text and "shape" in text
    assert "final errors [" in repr(results[0]) and "(3000, 300)" in repr(results[0])


def test_progress_callback_hears_every_step_and_bad_progress_is_refused(capsys):
    T, p_x, p_y = rng_problem(1)
    seen = []
    res = balance_table(T, p_x, p_y, progress=lambda k, errors: seen.append((k, errors.copy())))
    assert [k for k, _ in seen] == list(range(res.steps + 1))
    np.testing.assert_array_equal(np.array([e for _, e in seen]), res.marginal_error)
    balance_table(T, p_x, p_y, progress=True)  # tqdm if installed, else one line on stderr
    err = capsys.readouterr().err
    assert "balance_table" in err or err == ""
    with pytest.raises(TypeError, match="`progress` must be True, False or a callable"):
        balance_table(T, p_x, p_y, progress="yes")
    with pytest.raises(TypeError, match="`progress` must be"):
        balance_logits(np.log(T), p_x, p_y, progress=1)


def test_plain_progress_line_without_tqdm(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name.startswith("tqdm"):
            raise ImportError("no tqdm")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    T, p_x, p_y = rng_problem(2)
    res = balance_table(T, p_x, p_y, progress=True)
    err = capsys.readouterr().err
    assert err.endswith("\n") and f"balance_table: step {res.steps}, largest error" in err


def test_progress_bar_through_tqdm(capsys):
    pytest.importorskip("tqdm")
    T, p_x, p_y = rng_problem(3)
    balance_table(T, p_x, p_y, progress=True)
    assert "step" in capsys.readouterr().err  # tqdm draws on stderr


# -- red-team regressions ------------------------------------------------------------------------------


def test_a_plateau_at_a_large_error_is_not_a_stall():
    # Entries spanning 120 orders of magnitude: the error sits near 0.4 for hundreds of half-steps
    # while the scalings move; textbook IPF converges at half-step 609.
    T = np.array([[1, 1e30], [1e120, 1]])
    for res in (balance_table(T, [0.6, 0.4], [0.2, 0.8]), balance_logits(np.log(T), [0.6, 0.4], [0.2, 0.8])):
        assert res.converged and res.marginal_error[-1].max() <= 1e-10


@pytest.mark.parametrize("seed", range(30))
def test_a_tolerance_below_resolution_is_never_certified(seed):
    T = np.random.default_rng(seed).random((4, 5))
    with pytest.warns(ConvergenceWarning, match="stalled"):
        res = balance_table(T, np.full(4, 0.25), np.full(5, 0.2), tol=1e-300)
    assert res.status == "stalled"


@pytest.mark.parametrize("seed", [4, 16])
@pytest.mark.parametrize("sparse", [False, True])
def test_float32_convergence_is_checked_in_float64(seed, sparse):
    rng = np.random.default_rng(seed)
    T = rng.random((3, 100_000)).astype(np.float32)
    p_x = rng.dirichlet(np.ones(3)).astype(np.float32)
    p_y = rng.dirichlet(np.ones(100_000)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        res = balance_table(sp.csr_array(T) if sparse else T, p_x, p_y, tol=1e-6)
    out = (res.table.toarray() if sparse else res.table).astype(np.float64)
    total = p_x.astype(np.float64).sum()
    # Each target is met over its own total (float32 totals differ by rounding; the table carries p_x's).
    q = p_y.astype(np.float64) * (total / p_y.astype(np.float64).sum())
    true = [np.abs(out.sum(axis=1) - p_x).sum() / total, np.abs(out.sum(axis=0) - q).sum() / total]
    np.testing.assert_allclose(res.marginal_error[-1], true, rtol=1e-6, atol=1e-12)
    assert res.converged == (max(true) <= 1e-6)


def test_scalings_beyond_float_range_fail_honestly_and_name_the_remedy():
    with pytest.warns(ConvergenceWarning, match=r"failed.*balance_logits\(np.log\(table\)"):
        res = balance_table(np.array([[1e-300, 1e-300], [1e30, 1e30]]), [0.5, 0.5], [0.5, 0.5])
    assert res.status == "failed" and not res.converged


def test_result_arrays_are_read_only_and_inputs_keep_their_flags():
    T, p_x, p_y = rng_problem(0)
    res = balance_table(T, p_x, p_y)
    with pytest.raises(ValueError, match="read-only"):
        res.row_scaling[0] = 100.0
    assert T.flags.writeable and not res.marginal_error.flags.writeable
