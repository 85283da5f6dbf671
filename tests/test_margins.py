"""Tests of databalance.balance_margins: N-d tables, one- and multi-way margins."""

import itertools

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

from databalance import ConvergenceWarning, InfeasibleError, balance_margins, balance_table

from .strategies import tables_with_margins


def margin_of(table, axes):
    """The sub-table over ``axes`` (in the key's order) of an N-d table."""
    other = tuple(a for a in range(table.ndim) if a not in axes)
    return np.transpose(table.sum(axis=other), np.argsort(np.argsort(axes)))


def brute_force_ipf(table, margins, k):
    """Rescale the whole table, one margin per step, in cycle order (the textbook loop)."""
    P = np.array(table, dtype=np.float64)
    keys = list(margins)
    for step in range(k):
        key = keys[step % len(keys)]
        axes = (key,) if isinstance(key, int) else key
        sorted_axes = tuple(sorted(axes))
        current = P.sum(axis=tuple(a for a in range(P.ndim) if a not in axes), keepdims=True)
        target = np.transpose(np.asarray(margins[key], dtype=np.float64), np.argsort(axes))
        shape = [P.shape[a] if a in sorted_axes else 1 for a in range(P.ndim)]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(current > 0, target.reshape(shape) / current, 0.0)
        P = P * ratio
    return P


def population_margins(Q, keys):
    return {key: margin_of(Q, (key,) if isinstance(key, int) else key) for key in keys}


KEYS = [{0: None, 1: None, 2: None}, {(1, 0): None, 2: None}, {0: None, (2, 1): None, 1: None},
        {2: None, (0, 1): None, (1, 2): None, 0: None}]


@pytest.mark.parametrize("keys", KEYS)
@pytest.mark.parametrize("k", [1, 2, 3, 4, 7])
def test_k_steps_match_the_textbook_loop(keys, k):
    rng = np.random.default_rng(k)
    T = rng.gamma(1.0, size=(3, 4, 5))
    margins = population_margins(rng.dirichlet(np.ones(60)).reshape(3, 4, 5), keys)
    res = balance_margins(T, margins, steps=k)
    assert res.status == "completed" and res.steps == k
    expected = brute_force_ipf(T, margins, k) * 1.0
    # The textbook loop does not normalise first; for k >= 1 the result is the same.
    np.testing.assert_allclose(res.table, expected, rtol=1e-12, atol=1e-15)
    # Every margin's error after every step, against the iterates of the independent loop.
    for i in range(k + 1):
        P = brute_force_ipf(T, margins, i) if i else T
        want = [np.abs(margin_of(P, (key,) if isinstance(key, int) else key) - target).sum()
                for key, target in margins.items()]
        np.testing.assert_allclose(res.marginal_error[i], want, atol=1e-13)


@pytest.mark.parametrize("keys", KEYS)
def test_converged_meets_every_margin_and_factors_rebuild_the_table(keys):
    rng = np.random.default_rng(5)
    T = rng.gamma(1.0, size=(3, 4, 5))
    margins = population_margins(rng.dirichlet(np.ones(60)).reshape(3, 4, 5), keys)
    res = balance_margins(T, margins)
    assert res.converged and res.feasible and res.marginal_error.shape == (res.steps + 1, len(margins))
    for key, target in margins.items():
        np.testing.assert_allclose(margin_of(res.table, (key,) if isinstance(key, int) else key), target, atol=1e-10)
    rebuilt = T.copy()
    letters = "abc"
    for f, key in zip(res.factors, res.keys, strict=True):
        axes = (key,) if isinstance(key, int) else key
        assert f.shape == tuple(T.shape[a] for a in axes)
        rebuilt = np.einsum(f"abc,{''.join(letters[a] for a in axes)}->abc", rebuilt, f)
    np.testing.assert_allclose(rebuilt, res.table, rtol=1e-13)


@pytest.mark.parametrize("start", ["x", "y"])
@pytest.mark.parametrize("kind", ["dense", "sparse", "float32"])
def test_two_margins_are_balance_table(start, kind):
    rng = np.random.default_rng(0)
    T = rng.gamma(1.0, size=(6, 5)) * (rng.random((6, 5)) < 0.8) + np.eye(6, 5)
    p_x, p_y = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(5))
    T = sp.csr_array(T) if kind == "sparse" else T.astype(np.float32) if kind == "float32" else T
    if kind == "float32":
        p_x, p_y = p_x.astype(np.float32), p_y.astype(np.float32)
    margins = {0: p_x, 1: p_y} if start == "x" else {1: p_y, 0: p_x}
    for steps in (3, None):
        a = balance_margins(T, margins, steps=steps)
        b = balance_table(T, p_x, p_y, steps=steps, start=start)
        order = [0, 1] if start == "x" else [1, 0]
        assert a.steps == b.steps and a.status == b.status
        np.testing.assert_array_equal(a.marginal_error, b.marginal_error[:, order])
        ta, tb = (a.table.toarray(), b.table.toarray()) if kind == "sparse" else (a.table, b.table)
        np.testing.assert_array_equal(ta, tb)
        assert ta.dtype == tb.dtype == (np.float32 if kind == "float32" else np.float64)


def test_float32_stays_float32_and_inputs_are_not_mutated():
    rng = np.random.default_rng(1)
    T = rng.gamma(1.0, size=(4, 3, 2)).astype(np.float32)
    Q = rng.dirichlet(np.ones(24)).reshape(4, 3, 2)
    margins = population_margins(Q, [(0, 1), 2])
    before = T.copy(), {k: v.copy() for k, v in margins.items()}
    res = balance_margins(T, margins)
    assert res.converged and res.table.dtype == np.float32 and all(f.dtype == np.float32 for f in res.factors)
    np.testing.assert_array_equal(T, before[0])
    for k in margins:
        np.testing.assert_array_equal(margins[k], before[1][k])


@given(tables_with_margins(), st.floats(1e-3, 1e3))
def test_invariant_to_scaling_the_table_and_the_targets(problem, c):
    T, margins = problem
    a = balance_margins(T, margins, steps=5).table
    b = balance_margins(T * c, {k: v * 2.0 for k, v in margins.items()}, steps=5).table
    np.testing.assert_allclose(b, 2 * a, rtol=1e-10, atol=1e-14)


@given(tables_with_margins())
def test_fixed_margin_exact_after_its_step_and_limit(problem):
    T, margins = problem
    keys = list(margins)
    for k in range(1, 2 * len(keys) + 1):
        res = balance_margins(T, margins, steps=k)
        key = keys[(k - 1) % len(keys)]
        np.testing.assert_allclose(margin_of(res.table, (key,) if isinstance(key, int) else key), margins[key],
                                   rtol=1e-11, atol=1e-14)
    res = balance_margins(T, margins)
    assert res.converged and res.marginal_error[-1].max() <= 1e-10


def test_idempotent_on_a_table_with_its_own_margins():
    Q = np.random.default_rng(2).dirichlet(np.ones(24)).reshape(2, 3, 4)
    margins = population_margins(Q, [0, (1, 2), (0, 2)])
    res = balance_margins(Q, margins)
    assert res.steps <= 1 and res.converged
    np.testing.assert_allclose(res.table, Q, rtol=1e-12)


def test_pairwise_consistent_but_jointly_infeasible_margins():
    # X = Y, X = Z, Y != Z on {0, 1}^3: every pair of margins agrees, no table has all three.
    eye, off = np.eye(2) / 2, (1 - np.eye(2)) / 2
    with pytest.raises(ValueError, match=r"Margin \(0, 1\) cell \(0, 0\) of `table` has mass only where"):
        balance_margins(np.ones((2, 2, 2)), {(0, 1): eye, (0, 2): eye, (1, 2): off})


def test_linear_program_finds_an_infeasible_pattern():
    T = np.repeat(np.array([[1.0, 1.0], [0.0, 1.0]])[:, :, None], 3, axis=2)
    margins = {0: [0.2, 0.8], 1: [0.9, 0.1], 2: [0.3, 0.3, 0.4]}
    with pytest.raises(InfeasibleError, match=r"places at most 0.3 of the total mass"):
        balance_margins(T, margins)
    res = balance_margins(T, margins, steps=6)
    assert res.status == "completed" and res.feasible is False
    feasible = {0: [0.5, 0.5], 1: [0.3, 0.7], 2: [0.3, 0.3, 0.4]}
    assert balance_margins(T, feasible, steps=2).feasible is True


def test_large_supports_skip_the_linear_program(monkeypatch):
    import databalance._feasibility as feas

    monkeypatch.setattr(feas, "LP_CELLS", 5)
    T = np.ones((2, 3, 2))
    T[0, 0, 0] = 0
    res = balance_margins(T, {0: [0.5, 0.5], 1: [0.2, 0.3, 0.5], 2: [0.4, 0.6]}, steps=1)
    assert res.feasible is None  # undecided: too large to check, not converged


def test_stopping_short_warns_and_is_never_converged():
    T = np.repeat(np.array([[1.0, 1.0], [0.0, 1.0]])[:, :, None], 2, axis=2)
    # Feasible only by driving T[0, 1, :] to zero: sublinear convergence.
    margins = {0: [0.5, 0.5], 1: [0.5, 0.5], 2: [0.5, 0.5]}
    with pytest.warns(ConvergenceWarning, match="max_steps"):
        res = balance_margins(T, margins, max_steps=60)
    assert res.status == "max_steps" and not res.converged


P2 = [0.5, 0.5]


@pytest.mark.parametrize(
    "margins, exc, match",
    [
        ([P2], TypeError, r"`margins` must be a mapping"),
        ({}, ValueError, r"`margins` is empty"),
        ({3: P2}, ValueError, r"`margins` key 3 names an axis outside 0..2"),
        ({(0, 0): np.eye(2)}, ValueError, r"`margins` key \(0, 0\) repeats an axis"),
        ({0: P2, (0,): P2}, ValueError, r"names the axes \(0,\) twice"),
        ({"a": P2}, TypeError, r"`margins` key 'a' must be an axis"),
        ({0: [0.2, 0.3, 0.5]}, ValueError,
         r"`margins\[0\]` has shape \(3,\) but the axes 0 of `table` have shape \(2,\)"),
        ({0: [0.5, np.nan]}, ValueError, r"`margins\[0\]` contains NaN"),
        ({0: [1.5, -0.5]}, ValueError, r"`margins\[0\]` must be nonnegative"),
        ({0: ["a", "b"]}, TypeError, r"`margins\[0\]` must hold real numbers"),
        ({0: P2, 1: [0.5, 0.6]}, ValueError, r"totals of `margins\[0\]` \(1.0\) and `margins\[1\]` \(1.1\) differ"),
        ({0: P2, (0, 1): [[0.1, 0.1], [0.4, 0.4]]}, ValueError,
         r"`margins\[0\]` and `margins\[\(0, 1\)\]` disagree on their common margin over axes \(0,\): the largest "
         r"discrepancy is 0.3"),
        ({0: P2, 1: [[0.5], [0.2, 0.3]]}, ValueError, r"`margins\[1\]` could not be read as an array"),
    ],
)
def test_errors(margins, exc, match):
    with pytest.raises(exc, match=match):
        balance_margins(np.ones((2, 2, 2)), margins)


def test_empty_margin_cell_with_positive_target_is_named():
    T = np.ones((2, 2, 2))
    T[1] = 0
    with pytest.raises(ValueError, match=r"Margin 0 cell 1 of `table` is empty but `margins\[0\]\[1\]` = 0.5"):
        balance_margins(T, {0: P2, 1: P2})
    with pytest.raises(TypeError, match="sparse `table` takes the two one-way margins"):
        balance_margins(sp.csr_array(np.ones((2, 2))), {(0, 1): np.full((2, 2), 0.25)})
    with pytest.raises(ValueError, match="`steps` must be >= 0"):
        balance_margins(np.ones((2, 2)), {0: P2, 1: P2}, steps=-1)
    with pytest.raises(ValueError, match="`max_steps` must be a positive"):
        balance_margins(np.ones((2, 2)), {0: P2, 1: P2}, max_steps=0)


def test_many_margins_on_a_small_table():
    rng = np.random.default_rng(3)
    shape = (2, 3, 2, 2, 3)
    Q = rng.dirichlet(np.ones(int(np.prod(shape)))).reshape(shape)
    keys = [0, 1, 2, 3, 4, (0, 1), (3, 4)]
    res = balance_margins(rng.gamma(1.0, size=shape), population_margins(Q, keys))
    assert res.converged and res.marginal_error.shape[1] == 7
    for key, f in zip(keys, res.factors, strict=True):
        assert f.shape == tuple(shape[a] for a in ((key,) if isinstance(key, int) else key))
    assert list(itertools.islice(res.keys, 7)) == keys


def test_overlapping_margins_can_conflict_on_a_full_support():
    # Pairwise consistent, jointly impossible ("mostly X = Y, X = Z, Y != Z"): no zero entry anywhere.
    same = np.array([[0.45, 0.05], [0.05, 0.45]])
    other = np.array([[0.05, 0.45], [0.45, 0.05]])
    margins = {(0, 1): same, (0, 2): same, (1, 2): other}
    with pytest.raises(InfeasibleError, match="cannot carry the targets"):
        balance_margins(np.ones((2, 2, 2)), margins)
    assert balance_margins(np.ones((2, 2, 2)), margins, steps=3).feasible is False


def test_the_linear_program_waits_for_the_iteration(monkeypatch):
    # Three pairwise joint margins on a sparse support: the LP costs seconds to minutes there, and
    # convergence proves feasibility without it; it runs only after 100 unconverged half-steps.
    import databalance._feasibility as feas

    calls = []
    real = feas.lp_deficit
    monkeypatch.setattr(feas, "lp_deficit", lambda *a: calls.append(1) or real(*a))
    rng = np.random.default_rng(0)
    T = rng.random((12, 12, 12)) * (rng.random((12, 12, 12)) < 0.5)
    Q = T * rng.random(T.shape)
    Q /= Q.sum()
    res = balance_margins(T, {(0, 1): Q.sum(2), (1, 2): Q.sum(0), (0, 2): Q.sum(1)})
    assert res.converged and res.feasible is True and (calls == []) == (res.steps < 100)


def test_an_oscillation_no_check_caught_ends_stalled(monkeypatch):
    import databalance._feasibility as feas

    monkeypatch.setattr(feas, "LP_CELLS", 1)  # the LP declines: only the iteration can tell
    T = np.repeat(np.array([[1.0, 1.0], [0.0, 1.0]])[:, :, None], 3, axis=2)
    with pytest.warns(ConvergenceWarning, match=r"stalled|failed.*cannot be met on this zero pattern"):
        res = balance_margins(T, {0: [0.2, 0.8], 1: [0.9, 0.1], 2: [0.3, 0.3, 0.4]})
    assert res.status in ("stalled", "failed") and res.steps < 3 * 5000 and res.feasible is None
