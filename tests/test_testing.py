"""databalance.testing keeps its promises: the strategies build what they say (checked independently:
graph components, a linear program, the library's own solvers) and the assertion helpers pass and
fail when they should, with readable messages."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import find, given
from hypothesis import strategies as st
from scipy.optimize import linprog
from scipy.sparse.csgraph import connected_components

from databalance import (
    BalancedEstimator,
    InfeasibleError,
    balance_logits,
    balance_margins,
    balance_table,
)
from databalance.testing import assert_balanced, assert_results_close

from .strategies import balancing_problems, joint_tables, labelled_samples, margin_problems


def components(table) -> int:
    """Connected components of the bipartite support graph (rows and columns as nodes)."""
    T = sp.csr_array(table)
    return connected_components(sp.bmat([[None, T], [T.T, None]]))[0]


def lp_deficit(table, p_x, p_y) -> float:
    """The mass (of total 1) that no table on the support can carry within both targets."""
    dense = table.toarray() if sp.issparse(table) else table
    m, l = dense.shape
    cells = np.argwhere(dense > 0)
    A = np.zeros((m + l, len(cells)))
    A[cells[:, 0], np.arange(len(cells))] = 1
    A[m + cells[:, 1], np.arange(len(cells))] = 1
    lp = linprog(-np.ones(len(cells)), A_ub=A, b_ub=np.concatenate([p_x, p_y]), bounds=(0, None), method="highs")
    return 1 + lp.fun


@given(st.data(), st.booleans(), st.booleans())
def test_joint_tables_connected_or_not_by_construction(data, connected, sparse):
    T = data.draw(joint_tables(connected=connected, sparse=sparse))
    assert sp.issparse(T) == sparse
    dense = T.toarray() if sparse else T
    assert (dense.sum(axis=1) > 0).all() and (dense.sum(axis=0) > 0).all()
    assert ((dense == 0) | ((dense >= 0.1) & (dense <= 10))).all()
    if sparse:
        assert T.nnz == np.count_nonzero(dense)  # no stored zeros
    n = components(T)
    assert n == 1 if connected else n in (2, 3)


@given(joint_tables(zeros=False, max_side=4))
def test_joint_tables_without_zeros_are_positive(T):
    assert (T > 0).all()


def test_disconnected_tables_need_zeros():
    with pytest.raises(ValueError, match=r"`connected=False` needs structural zeros"):
        find(joint_tables(zeros=False, connected=False), lambda t: True)


@given(st.data(), st.booleans(), st.booleans())
def test_feasible_problems_converge_on_the_support(data, connected, sparse):
    T, p_x, p_y = data.draw(balancing_problems(connected=connected, sparse=sparse))
    assert lp_deficit(T, p_x, p_y) < 1e-9
    res = balance_table(T, p_x, p_y)
    assert res.converged and res.feasible
    assert_balanced(res.table, (p_x, p_y))
    # A witness on the whole support: the scalings are finite and positive, no entry is driven to 0.
    assert np.isfinite(res.row_scaling).all() and (res.row_scaling > 0).all()
    assert np.isfinite(res.col_scaling).all() and (res.col_scaling > 0).all()


@given(st.data(), st.booleans())
def test_infeasible_problems_raise_and_a_linear_program_agrees(data, sparse):
    T, p_x, p_y = data.draw(balancing_problems(feasible=False, sparse=sparse))
    assert lp_deficit(T, p_x, p_y) > 1e-6
    assert components(T) == 1 and (p_x > 0).all() and (p_y > 0).all()
    assert np.isclose(p_x.sum(), 1) and np.isclose(p_y.sum(), 1)
    with pytest.raises(InfeasibleError, match="cannot carry the targets"):
        balance_table(T, p_x, p_y)
    assert balance_table(T, p_x, p_y, steps=2).feasible is False


def test_infeasible_problems_violate_hall_on_either_side():
    """Half of them on the rows, half on the columns: both kinds are drawn."""
    def row_violation(problem):
        T, p_x, p_y = problem
        dense = T > 0
        return any(p_x[i] > p_y[dense[i]].sum() for i in range(len(p_x)))

    T, p_x, p_y = find(balancing_problems(feasible=False), row_violation)
    assert lp_deficit(T, p_x, p_y) > 1e-6
    T, p_x, p_y = find(balancing_problems(feasible=False), lambda p: not row_violation(p))
    assert any(p_y[j] > p_x[T[:, j] > 0].sum() for j in range(len(p_y)))


@given(st.data(), st.booleans())
def test_margin_problems_converge(data, zeros):
    T, margins = data.draw(margin_problems(zeros=zeros, max_ndim=4, max_side=3))
    res = balance_margins(T, margins)
    assert res.converged
    assert_balanced(res.table, margins, tol=1e-9)
    totals = [np.sum(t) for t in margins.values()]
    np.testing.assert_allclose(totals, 1.0, rtol=1e-12)


def test_margin_problems_include_joint_keys_in_any_axis_order():
    def unsorted(problem):
        return any(isinstance(k, tuple) and list(k) != sorted(k) for k in problem[1])

    T, margins = find(margin_problems(min_ndim=3), unsorted)
    key = next(k for k in margins if isinstance(k, tuple) and list(k) != sorted(k))
    assert np.shape(margins[key]) == tuple(T.shape[a] for a in key)


@given(labelled_samples(joint=True))
def test_labelled_samples_cover_every_category_and_can_be_raked(sample):
    data, margins = sample
    n = len(data["c0"])
    assert ("c0", "c1") in margins and list(margins)[0] == ("c0", "c1")
    for name, labels in data.items():
        assert len(labels) == n and set(labels.tolist()) == set(margins[name])
        assert np.isclose(sum(margins[name].values()), 1)
    fitted = BalancedEstimator(margins).fit(data)
    assert fitted.balance_.status == "converged"
    for name, target in margins.items():
        if isinstance(name, str):
            for label, mass in target.items():
                assert np.isclose(fitted.weights_[data[name] == label].sum(), mass, atol=1e-9)


@given(labelled_samples(min_columns=1, max_columns=1))
def test_labelled_samples_one_column(sample):
    data, margins = sample
    assert list(data) == ["c0"] and list(margins) == ["c0"]


def test_labelled_samples_joint_needs_two_columns():
    with pytest.raises(ValueError, match=r"`joint=True` needs two columns"):
        find(labelled_samples(max_columns=1, joint=True), lambda s: True)


# --- assert_balanced ---

TABLE = np.array([[0.25, 0.25], [0.125, 0.375]])


@pytest.mark.parametrize("table", [TABLE, sp.csr_array(TABLE), TABLE.astype(np.float32)])
def test_assert_balanced_passes(table):
    assert_balanced(table, ([0.5, 0.5], [0.375, 0.625]))
    assert_balanced(table, {0: [0.5, 0.5], -1: [0.375, 0.625]})
    assert_balanced(table, {(1, 0): TABLE.T})


def test_assert_balanced_names_every_margin_off():
    msg = (r"2 of 2 margins off by more than tol = 1e-08:\n"
           r"  p_x: relative L1 error 0\.1; largest deviation at cell \(0,\): achieved 0\.5, target 0\.55\n"
           r"  p_y: relative L1 error 0\.05; largest deviation at cell \(0,\): achieved 0\.375, target 0\.4")
    with pytest.raises(AssertionError, match=msg):
        assert_balanced(TABLE, ([0.55, 0.45], [0.4, 0.6]))


def test_assert_balanced_joint_margin_cell_in_the_key_order():
    T = np.arange(1.0, 9.0).reshape(2, 2, 2)
    target = T.sum(axis=0).T.copy()  # axes (2, 1)
    assert_balanced(T, {(2, 1): target})
    target[1, 0] += 1  # cell (z=1, y=0)
    with pytest.raises(AssertionError, match=r"margins\[\(2, 1\)\]: .* at cell \(1, 0\): achieved 8, target 9"):
        assert_balanced(T, {(2, 1): target}, tol=0.01)


def test_assert_balanced_tolerance_and_nan():
    assert_balanced(TABLE, ([0.5 + 1e-9, 0.5 - 1e-9], [0.375, 0.625]))
    with pytest.raises(AssertionError, match=r"p_x: relative L1 error 2e-06"):
        assert_balanced(TABLE, ([0.500001, 0.499999], [0.375, 0.625]))
    assert_balanced(TABLE, ([0.500001, 0.499999], [0.375, 0.625]), tol=1e-5)
    with pytest.raises(AssertionError, match=r"p_x: relative L1 error nan"):
        assert_balanced(np.array([[np.nan, 1.0], [1.0, 1.0]]), ([0.5, 0.5], [0.5, 0.5]))


@pytest.mark.parametrize(("table", "margins", "error", "match"), [
    (TABLE, ([0.5, 0.5], [0.5, 0.5], [1.0]), ValueError,
     r"`margins` must be a mapping .* or a pair \(p_x, p_y\) for a 2-D table; got a sequence of length 3"),
    (np.ones((2, 2, 2)), ([0.5, 0.5], [0.5, 0.5]), ValueError, r"got a sequence of length 2 for a table with 3"),
    (TABLE, {0: [1.0, 0.0, 0.0]}, ValueError, r"`margins\[0\]` has shape \(3,\) but the axes 0 of `table`"),
    (TABLE, {2: [0.5, 0.5]}, ValueError, r"`margins` key 2 names an axis outside 0\.\.1"),
])
def test_assert_balanced_bad_margins(table, margins, error, match):
    with pytest.raises(error, match=match):
        assert_balanced(table, margins)


# --- assert_results_close ---

@given(balancing_problems(max_side=5))
def test_dense_sparse_and_log_results_are_close(problem):
    T, p_x, p_y = problem
    dense = balance_table(T, p_x, p_y)
    assert_results_close(balance_table(sp.csr_array(T), p_x, p_y), dense, steps=1)
    with np.errstate(divide="ignore"):
        logits = np.log(T)
    assert_results_close(balance_logits(logits, p_x, p_y), dense, steps=1, rtol=1e-8)
    assert_results_close(balance_margins(T, {0: p_x, 1: p_y}), dense)


def test_assert_results_close_reports_every_difference():
    T = np.array([[1.0, 2.0], [3.0, 4.0]])
    a = balance_table(T, [0.5, 0.5], [0.5, 0.5], steps=1)
    b = balance_table(T, [0.5, 0.5], [0.5, 0.5], steps=3)
    msg = (r"The results differ:\n  steps: 1 vs 3\n  tables: relative L1 distance [0-9.e-]+ > rtol = 1e-08")
    with pytest.raises(AssertionError, match=msg):
        assert_results_close(a, b)
    with pytest.raises(AssertionError, match=r"steps: 1 vs 3 \(allowed difference 1\)"):
        assert_results_close(a, b, steps=1, rtol=1)
    assert_results_close(a, b, steps=2, rtol=1)
    assert_results_close(a, b, steps=False, rtol=1)
    converged = balance_table(T, [0.5, 0.5], [0.5, 0.5])
    with pytest.raises(AssertionError, match=r"status: 'completed' vs 'converged'"):
        assert_results_close(a, converged, steps=False, rtol=1)
    assert_results_close(a, converged, status=False, steps=False, rtol=1)


def test_assert_results_close_shapes_and_types():
    a = balance_table(np.ones((2, 2)), [0.5, 0.5], [0.5, 0.5])
    b = balance_table(np.ones((2, 3)), [0.5, 0.5], [0.2, 0.3, 0.5])
    with pytest.raises(AssertionError, match=r"tables: shapes \(2, 2\) vs \(2, 3\)"):
        assert_results_close(a, b, steps=False)
    with pytest.raises(TypeError, match=r"Expected balancing results .* got ndarray"):
        assert_results_close(a, np.ones((2, 2)), status=False, steps=False)


def test_float32_results_use_a_float32_tolerance():
    T = np.array([[1.0, 2.0], [3.0, 4.0]])
    a = balance_table(T.astype(np.float32), [0.5, 0.5], [0.5, 0.5])
    b = balance_table(T, [0.5, 0.5], [0.5, 0.5])
    assert_results_close(a, b, steps=False)
    with pytest.raises(AssertionError, match=r"tables: relative L1 distance"):
        assert_results_close(a, b, steps=False, rtol=1e-12)


def test_import_without_hypothesis_names_the_extra():
    code = ("import sys; sys.modules['hypothesis'] = None\n"
            "import databalance, databalance.curation\n"  # neither needs hypothesis
            "try:\n    import databalance.testing\n"
            "except ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == 'databalance.testing needs hypothesis, which is not installed. Install it with: pip install ' \
                  '"databalance[testing]"\n'


def test_guide_page_examples_run():
    import doctest
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / "docs" / "guide" / "testing.rst"
    result = doctest.testfile(str(page), module_relative=False, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 5 and result.failed == 0
