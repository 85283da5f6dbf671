"""Hypothesis strategies and assertion helpers for property-based tests of code that balances.

The strategies *build* valid inputs (they normalise, they never filter), and every promise a
strategy makes -- connected support, feasible or infeasible targets -- holds by construction:

* :func:`joint_tables` -- dense or scipy.sparse tables, strictly positive or with structural zeros,
  whose support graph is connected or has several components.
* :func:`balancing_problems` -- a table with targets ``(p_x, p_y)`` that are feasible (the margins
  of a witness table on the same support) or infeasible (a Hall violation built in).
* :func:`margin_problems` -- an N-d table and a ``margins`` mapping for
  :func:`~databalance.balance_margins`, one- and multi-way keys.
* :func:`labelled_samples` -- columns of category labels and mapping targets for
  :class:`~databalance.BalancedEstimator`.

:func:`assert_balanced` and :func:`assert_results_close` check results with readable messages.

hypothesis is imported here only, and only when this module is: install the ``testing`` extra
(``pip install "databalance[testing]"``).

Examples
--------
>>> from hypothesis import given, settings
>>> from databalance import balance_table
>>> from databalance.testing import assert_balanced, balancing_problems
>>> @settings(max_examples=20, deadline=None)
... @given(balancing_problems(sparse=True))
... def test_converges(problem):
...     table, p_x, p_y = problem
...     assert_balanced(balance_table(table, p_x, p_y).table, (p_x, p_y))
>>> test_converges()
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from . import _validation as check
from ._kernels import is_sparse

try:
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp
except ImportError:  # pragma: no cover - exercised by a subprocess test without hypothesis
    raise check.hypothesis_missing() from None

__all__ = ["assert_balanced", "assert_results_close", "balancing_problems", "joint_tables", "labelled_samples",
           "margin_problems"]

# Entries and witness masses within a factor 100 of each other keep the problems well conditioned:
# balancing them converges in a few hundred half-steps at most.
_MASS = st.floats(min_value=0.1, max_value=10.0, allow_nan=False, allow_infinity=False)


def _staircase(m: int, l: int, moves: Sequence[bool]) -> np.ndarray:
    """Cells of a monotone path from (0, 0) to (m - 1, l - 1): each shares a row or a column with the
    previous one, so the path's support graph is connected and meets every row and column."""
    cells = np.zeros((m, l), dtype=bool)
    i = j = 0
    cells[0, 0] = True
    for down in moves:
        i, j = (i + 1, j) if down else (i, j + 1)
        cells[i, j] = True
    return cells


@st.composite
def _connected_pattern(draw, m: int, l: int, zeros: bool) -> np.ndarray:
    if not zeros:
        return np.ones((m, l), dtype=bool)
    moves = draw(st.permutations([True] * (m - 1) + [False] * (l - 1)))
    return _staircase(m, l, moves) | draw(hnp.arrays(np.bool_, (m, l)))


@st.composite
def _split(draw, n: int, parts: int) -> list[int]:
    """``n`` as a sum of ``parts`` positive integers."""
    cuts = sorted(draw(st.lists(st.integers(1, n - 1), min_size=parts - 1, max_size=parts - 1, unique=True)))
    return [int(d) for d in np.diff([0, *cuts, n])]


@st.composite
def _pattern(draw, *, min_side: int, max_side: int, zeros: bool, connected: bool) -> np.ndarray:
    """A support with every row and column nonempty; connected, or with 2 or more components."""
    low = max(min_side, 1 if connected else 2)
    m, l = draw(st.integers(low, max_side)), draw(st.integers(low, max_side))
    if connected:
        mask = draw(_connected_pattern(m, l, zeros))
    else:
        blocks = draw(st.integers(2, min(m, l, 3)))
        rows, cols = draw(_split(m, blocks)), draw(_split(l, blocks))
        mask = np.zeros((m, l), dtype=bool)
        r0 = c0 = 0
        for r, c in zip(rows, cols, strict=True):
            mask[r0:r0 + r, c0:c0 + c] = draw(_connected_pattern(r, c, True))
            r0, c0 = r0 + r, c0 + c
    return mask[draw(st.permutations(range(m)))][:, draw(st.permutations(range(l)))]


def _sparse(table: Any) -> bool:
    """The kernels' dispatch test (a plain bool: scipy-stubs' narrowing lacks the array methods)."""
    return bool(is_sparse(table))


def _filled(draw, mask: np.ndarray) -> np.ndarray:
    return draw(hnp.arrays(np.float64, mask.shape, elements=_MASS)) * mask


def _as_kind(table: np.ndarray, sparse: bool):
    return sp.csr_array(table) if sparse else table


@st.composite
def joint_tables(draw, *, min_side: int = 1, max_side: int = 6, zeros: bool = True, connected: bool = True,
                 sparse: bool = False):
    """A nonnegative 2-D table whose every row and column has a nonzero entry.

    Parameters
    ----------
    min_side, max_side : int
        Bounds on the number of rows and of columns (``connected=False`` needs at least 2 of each).
    zeros : bool
        Structural zeros allowed (``False``: strictly positive, hence connected).
    connected : bool
        ``True``: the support graph (rows and columns as nodes, nonzero entries as edges) is
        connected -- a monotone path through every row and column plus random extra cells.
        ``False``: it has 2 or 3 components (blocks with rows and columns permuted).
    sparse : bool
        Return a ``scipy.sparse.csr_array`` (its stored entries are exactly the nonzeros).

    Returns
    -------
    SearchStrategy of ndarray or csr_array, float64
        Nonzero entries lie in [0.1, 10].

    Examples
    --------
    >>> import scipy.sparse as sp
    >>> from hypothesis import given, settings
    >>> from scipy.sparse.csgraph import connected_components
    >>> from databalance.testing import joint_tables
    >>> @settings(max_examples=10, deadline=None)
    ... @given(joint_tables(connected=False, sparse=True))
    ... def test_components(T):
    ...     assert connected_components(sp.bmat([[None, T], [T.T, None]]))[0] >= 2
    >>> test_components()
    """
    if not connected and not zeros:
        raise ValueError("`connected=False` needs structural zeros; pass `zeros=True`.")
    mask = draw(_pattern(min_side=min_side, max_side=max_side, zeros=zeros, connected=connected))
    return _as_kind(_filled(draw, mask), sparse)


@st.composite
def _hall_violation(draw, max_side: int):
    """A connected table and positive targets where row r needs more than its columns N(r) can take."""
    m, l = draw(st.integers(2, max(2, max_side))), draw(st.integers(2, max(2, max_side)))
    width = draw(st.integers(1, l - 1))
    mask = np.zeros((m, l), dtype=bool)
    mask[0, :width] = True  # N(0) = the first `width` columns, a proper subset
    moves = draw(st.permutations([True] * (m - 2) + [False] * (l - 1)))
    mask[1:] = _staircase(m - 1, l, moves) | draw(hnp.arrays(np.bool_, (m - 1, l)))
    p_y = draw(hnp.arrays(np.float64, l, elements=_MASS))
    p_y /= p_y.sum()
    reachable = p_y[:width].sum()
    p_x = np.empty(m)
    p_x[0] = reachable + draw(st.floats(0.1, 0.9)) * (1 - reachable)
    rest = draw(hnp.arrays(np.float64, m - 1, elements=_MASS))
    p_x[1:] = rest / rest.sum() * (1 - p_x[0])
    return mask, p_x, p_y


@st.composite
def balancing_problems(draw, *, feasible: bool = True, min_side: int = 1, max_side: int = 6, zeros: bool = True,
                       connected: bool = True, sparse: bool = False):
    """A table and target marginals ``(table, p_x, p_y)`` for :func:`~databalance.balance_table`.

    Parameters
    ----------
    feasible : bool
        ``True``: the targets are the marginals of a *witness*, a table with the same support and
        entries in [0.1, 10]; the balanced table exists, has that support and finite scalings, and
        ``balance_table`` converges. ``False``: a Hall violation is built in -- one row (or, half of
        the time, one column) has its nonzeros in a proper subset of the other side whose targets
        sum to less than its own target -- so ``balance_table(..., steps=None)`` raises
        :class:`~databalance.InfeasibleError`. The support is then connected, every target positive
        and every row and column nonempty (no other check fires first).
    min_side, max_side, zeros, connected, sparse
        As in :func:`joint_tables` (``feasible=False`` ignores ``min_side``, ``zeros`` and
        ``connected``: it always has at least 2 rows and columns, zeros, and a connected support).

    Returns
    -------
    SearchStrategy of (table, p_x, p_y)
        Targets are positive float64 vectors summing to 1.

    Examples
    --------
    >>> import pytest
    >>> from hypothesis import given, settings
    >>> from databalance import InfeasibleError, balance_table
    >>> from databalance.testing import balancing_problems
    >>> @settings(max_examples=10, deadline=None)
    ... @given(balancing_problems(feasible=False, sparse=True))
    ... def test_raises(problem):
    ...     with pytest.raises(InfeasibleError):
    ...         balance_table(*problem)
    >>> test_raises()
    """
    if not feasible:
        mask, p_x, p_y = draw(_hall_violation(max_side))
        if draw(st.booleans()):
            mask, p_x, p_y = mask.T, p_y, p_x
        rows, cols = draw(st.permutations(range(mask.shape[0]))), draw(st.permutations(range(mask.shape[1])))
        table = _filled(draw, mask[rows][:, cols])
        return _as_kind(table, sparse), p_x[rows], p_y[cols]
    table = draw(joint_tables(min_side=min_side, max_side=max_side, zeros=zeros, connected=connected))
    witness = _filled(draw, table > 0)
    witness /= witness.sum()
    return _as_kind(table, sparse), witness.sum(axis=1), witness.sum(axis=0)


@st.composite
def margin_problems(draw, *, min_ndim: int = 2, max_ndim: int = 3, max_side: int = 4, max_margins: int = 4,
                    zeros: bool = False):
    """An N-d table and feasible ``margins`` for :func:`~databalance.balance_margins`.

    The keys are distinct sets of axes, each an ``int`` (one-way) or a tuple of 2 to ``ndim - 1``
    axes in random order (a joint margin, its target's axes in the key's order), listed in random
    order. The targets are the margins of a witness with the table's support and entries in
    [0.1, 10], normalised to total 1, so the balanced table exists and ``balance_margins``
    converges.

    Parameters
    ----------
    min_ndim, max_ndim : int
        Bounds on the number of axes (at least 1).
    max_side : int
        Largest length of an axis.
    max_margins : int
        Most margins drawn (at least one).
    zeros : bool
        Structural zeros (at least one cell stays nonzero); ``False``: strictly positive.

    Returns
    -------
    SearchStrategy of (ndarray, dict)

    Examples
    --------
    >>> from hypothesis import given, settings
    >>> from databalance import balance_margins
    >>> from databalance.testing import assert_balanced, margin_problems
    >>> @settings(max_examples=10, deadline=None)
    ... @given(margin_problems(zeros=True))
    ... def test_margins_met(problem):
    ...     table, margins = problem
    ...     assert_balanced(balance_margins(table, margins).table, margins)
    >>> test_margins_met()
    """
    ndim = draw(st.integers(max(1, min_ndim), max_ndim))
    shape = tuple(draw(st.integers(1, max_side)) for _ in range(ndim))
    mask = draw(hnp.arrays(np.bool_, shape)) if zeros else np.ones(shape, dtype=bool)
    mask[tuple(draw(st.integers(0, n - 1)) for n in shape)] = True
    table = _filled(draw, mask)
    witness = _filled(draw, mask)
    witness /= witness.sum()
    sets = [(a,) for a in range(ndim)] + [tuple(s) for s in _subsets(ndim) if 2 <= len(s) < ndim]
    chosen = draw(st.lists(st.sampled_from(sets), min_size=1, max_size=max_margins, unique=True))
    margins: dict = {}
    for axes in chosen:
        key: Any = axes[0] if len(axes) == 1 else tuple(draw(st.permutations(axes)))
        order = (key,) if isinstance(key, int) else key
        summed = witness.sum(axis=tuple(a for a in range(ndim) if a not in order))
        margins[key] = np.transpose(summed, np.argsort(np.argsort(order)))
    return table, margins


def _subsets(n: int) -> list[tuple[int, ...]]:
    return [tuple(a for a in range(n) if bits >> a & 1) for bits in range(1, 2**n)]


@st.composite
def labelled_samples(draw, *, min_columns: int = 2, max_columns: int = 3, max_categories: int = 4,
                     max_samples: int = 40, joint: bool = False):
    """Samples as columns of string labels, and feasible mapping targets for
    :class:`~databalance.BalancedEstimator`.

    Every category of every column occurs in the sample. The targets are the margins of positive
    weights on the samples (a witness), so raking on the sample's occupied cells converges; each
    is a dict label -> mass summing to 1.

    Parameters
    ----------
    min_columns, max_columns : int
        Bounds on the number of label columns, named ``"c0"``, ``"c1"``, ...
    max_categories : int
        Most categories per column (labels ``"c0=0"``, ``"c0=1"``, ...; at least one).
    max_samples : int
        Most samples (at least as many as the largest number of categories, and 2).
    joint : bool
        Add a joint margin on ``("c0", "c1")`` (needs two columns), listed first, whose target maps
        the occupied label pairs to their witness mass.

    Returns
    -------
    SearchStrategy of (dict, dict)
        ``data`` (column name -> ndarray of str) and ``margins`` (key -> dict label -> mass).

    Examples
    --------
    >>> from hypothesis import given, settings
    >>> from databalance import BalancedEstimator
    >>> from databalance.testing import labelled_samples
    >>> @settings(max_examples=10, deadline=None)
    ... @given(labelled_samples(joint=True))
    ... def test_weights_sum_to_one(sample):
    ...     data, margins = sample
    ...     assert abs(BalancedEstimator(margins).fit(data).weights_.sum() - 1) < 1e-12
    >>> test_weights_sum_to_one()
    """
    if joint and max_columns < 2:
        raise ValueError("`joint=True` needs two columns; pass `max_columns` >= 2.")
    k = draw(st.integers(max(min_columns, 2 if joint else 1), max_columns))
    sizes = [draw(st.integers(1, max_categories)) for _ in range(k)]
    n = draw(st.integers(max(2, *sizes), max(2, max_samples, *sizes)))
    data = {}
    for c, size in enumerate(sizes):
        rest = draw(hnp.arrays(np.int64, n - size, elements=st.integers(0, size - 1)))
        codes = np.concatenate([np.arange(size), rest])  # every category at least once
        data[f"c{c}"] = np.array([f"c{c}={i}" for i in codes])[draw(st.permutations(range(n)))]
    witness = draw(hnp.arrays(np.float64, n, elements=_MASS))
    witness /= witness.sum()
    margins: dict = {}
    if joint:
        margins[("c0", "c1")] = _label_masses(list(zip(data["c0"].tolist(), data["c1"].tolist(), strict=True)), witness)
    for name, labels in data.items():
        margins[name] = _label_masses(labels.tolist(), witness)
    return data, margins


def _label_masses(labels: list, witness: np.ndarray) -> dict:
    masses: dict = {}
    for label, w in zip(labels, witness, strict=True):
        masses[label] = masses.get(label, 0.0) + float(w)
    return masses


def _default_tol(*arrays) -> float:
    return 1e-4 if any(getattr(a, "dtype", None) == np.float32 for a in arrays) else 1e-8


def _margin_of(table, axes: tuple[int, ...]) -> np.ndarray:
    """The sums of ``table`` over every axis not in ``axes``, its axes in the order of ``axes``."""
    others = tuple(a for a in range(table.ndim) if a not in axes)
    if not others:  # the margin is the table itself
        summed = table.toarray() if _sparse(table) else table
    else:
        summed = table.sum(axis=others, dtype=np.float64)
    summed = np.asarray(summed, dtype=np.float64)
    return np.transpose(np.asarray(summed).reshape([table.shape[a] for a in sorted(axes)]),
                        np.argsort(np.argsort(axes)))


def assert_balanced(table, margins, tol: float | None = None) -> None:
    """Assert that ``table``'s margins match their targets to a relative L1 error of ``tol``.

    Parameters
    ----------
    table : array_like or scipy.sparse matrix/array
        The table to check (e.g. ``balance_table(...).table``).
    margins : mapping or (p_x, p_y)
        As for :func:`~databalance.balance_margins` (an axis or a tuple of axes -> target in the
        key's axis order), or a pair ``(p_x, p_y)``: the row and column targets of a 2-D table.
    tol : float, optional
        Largest allowed ``sum|achieved - target| / sum(target)`` per margin, the library's error
        measure. Default 1e-8, or 1e-4 when ``table`` is float32.

    Raises
    ------
    AssertionError
        Listing every margin whose error exceeds ``tol``: its name, the error and the cell with the
        largest deviation (achieved vs target).
    ValueError, TypeError
        ``margins`` that do not fit ``table`` (as :func:`~databalance.balance_margins` words them).

    Examples
    --------
    >>> import numpy as np
    >>> from databalance.testing import assert_balanced
    >>> assert_balanced(np.array([[0.25, 0.25], [0.125, 0.375]]), ([0.5, 0.5], [0.375, 0.625]))
    >>> assert_balanced(np.array([[0.25, 0.25], [0.125, 0.375]]), {1: [0.5, 0.5]})
    Traceback (most recent call last):
    ...
    AssertionError: 1 of 1 margins off by more than tol = 1e-08:
      margins[1]: relative L1 error 0.25; largest deviation at cell (0,): achieved 0.375, target 0.5
    """
    if not _sparse(table):
        table = np.asarray(table)
    names: list[str]
    if isinstance(margins, Mapping):
        keys, names = list(margins), [f"margins[{k!r}]" for k in margins]
    else:
        if len(margins) != 2 or table.ndim != 2:
            raise ValueError(check.assert_margins_pair(len(margins), table.ndim))
        keys, names, margins = [0, 1], ["p_x", "p_y"], {0: margins[0], 1: margins[1]}
    check.margin_targets(margins, table.shape)
    tol = _default_tol(table) if tol is None else tol
    failures = []
    for key, name in zip(keys, names, strict=True):
        axes = (int(key) % table.ndim,) if np.ndim(key) == 0 else tuple(int(a) % table.ndim for a in key)
        target = np.asarray(margins[key], dtype=np.float64)
        achieved = _margin_of(table, axes)
        gap = np.abs(achieved - target)
        error = float(gap.sum() / target.sum()) if target.sum() > 0 else float(gap.sum())
        if not error <= tol:
            cell = tuple(int(i) for i in np.unravel_index(np.argmax(np.nan_to_num(gap, nan=np.inf)), gap.shape))
            failures.append(f"  {name}: relative L1 error {error:.3g}; largest deviation at cell {cell}: "
                            f"achieved {achieved[cell]:.6g}, target {target[cell]:.6g}")
    if failures:
        raise AssertionError(f"{len(failures)} of {len(keys)} margins off by more than tol = {tol:g}:\n"
                             + "\n".join(failures))


def _result_table(result):
    if hasattr(result, "table"):
        return result.table
    if hasattr(result, "cell_masses"):
        return result.cell_masses
    raise TypeError(check.not_a_result(type(result).__name__))


def _l1(a, b) -> tuple[float, float]:
    """``sum|a - b|`` and ``sum|b|``; a sparse table against a dense one is densified (test sizes)."""
    if _sparse(a) and _sparse(b):
        return float(abs(a - b).sum()), float(abs(b).sum())
    a = a.toarray() if _sparse(a) else np.asarray(a)
    b = b.toarray() if _sparse(b) else np.asarray(b)
    return float(np.abs(a.astype(np.float64) - b).sum()), float(np.abs(b.astype(np.float64)).sum())


def assert_results_close(actual, desired, *, rtol: float | None = None, steps: bool | int = True,
                         status: bool = True) -> None:
    """Assert that two balancing results agree: status, half-steps and balanced tables.

    Works for :class:`~databalance.BalanceResult`, :class:`~databalance.LogBalanceResult` and
    :class:`~databalance.MarginsResult` (and any result with a ``table``), in any mix: dense,
    sparse and log-domain runs of one problem give the same result. The tables are compared, not
    the scalings, which are defined only up to a constant factor moved between them.

    Parameters
    ----------
    actual, desired : result
        The two results.
    rtol : float, optional
        Largest allowed ``sum|A - B| / sum|B|`` between the tables. Default 1e-8 (float64), 1e-4
        when either table is float32: two runs of the same problem agree to rounding after
        ``steps=k``, and to within about ``tol`` after converging to ``tol``.
    steps : bool or int
        ``True``: equal numbers of half-steps; an int ``s``: differing by at most ``s`` (runs that
        stop at a tolerance can take one more half-step when the last error lands within rounding
        of it); ``False``: not compared.
    status : bool
        Compare the statuses.

    Raises
    ------
    AssertionError
        Naming every difference found.

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp
    >>> from databalance import balance_table
    >>> from databalance.testing import assert_results_close
    >>> T = np.array([[1., 2.], [0., 4.]])
    >>> dense = balance_table(T, [.5, .5], [.25, .75])
    >>> assert_results_close(balance_table(sp.csr_array(T), [.5, .5], [.25, .75]), dense)
    >>> assert_results_close(balance_table(T, [.5, .5], [.25, .75], steps=3), dense)
    Traceback (most recent call last):
    ...
    AssertionError: The results differ:
      status: 'completed' vs 'converged'
      steps: 3 vs 40
      tables: relative L1 distance 0.0455 > rtol = 1e-08
    """
    problems = []
    if status and actual.status != desired.status:
        problems.append(f"status: {actual.status!r} vs {desired.status!r}")
    allowed = 0 if steps is True else int(steps)
    if steps is not False and abs(actual.steps - desired.steps) > allowed:
        problems.append(f"steps: {actual.steps} vs {desired.steps}" + (f" (allowed difference {allowed})"
                                                                        if allowed else ""))
    a, b = _result_table(actual), _result_table(desired)
    if a.shape != b.shape:
        problems.append(f"tables: shapes {a.shape} vs {b.shape}")
    else:
        rtol = _default_tol(a, b) if rtol is None else rtol
        gap, size = _l1(a, b)
        distance = gap / size if size > 0 else gap
        if not distance <= rtol:
            problems.append(f"tables: relative L1 distance {distance:.3g} > rtol = {rtol:g}")
    if problems:
        raise AssertionError("The results differ:\n" + "\n".join(f"  {p}" for p in problems))
