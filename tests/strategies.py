"""Hypothesis strategies for the library's own tests: the public ones of :mod:`databalance.testing`
under the names the test modules import, plus batched tables (which the public module does not
offer). They build valid inputs: they normalise, they never filter."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from databalance.testing import (
    balancing_problems,
    joint_tables,
    labelled_samples,
    margin_problems,
)

__all__ = ["balancing_problems", "joint_tables", "labelled_samples", "margin_problems", "patterned_tables",
           "positive_tables", "supports_with_targets", "tables_with_margins"]

dims = st.integers(min_value=1, max_value=7)
positive = st.floats(min_value=0.05, max_value=20.0, allow_nan=False, allow_infinity=False)


@st.composite
def positive_tables(draw, max_batch: int = 0):
    """A strictly positive table (optionally with leading batch axes) and reachable targets."""
    m, l = draw(dims), draw(dims)
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=max_batch)))
    table = draw(hnp.arrays(np.float64, batch + (m, l), elements=positive))
    p_x = draw(hnp.arrays(np.float64, batch + (m,), elements=positive))
    p_y = draw(hnp.arrays(np.float64, batch + (l,), elements=positive))
    p_x = p_x / p_x.sum(axis=-1, keepdims=True)
    p_y = p_y / p_y.sum(axis=-1, keepdims=True)
    return table, p_x, p_y


def patterned_tables():
    """A table with zeros (connected support or not) and feasible targets with full support: the
    marginals of a witness on the same pattern, so the balanced table exists with finite scalings."""
    return st.one_of(balancing_problems(max_side=7), balancing_problems(max_side=7, connected=False))


@st.composite
def _arbitrary_targets(draw):
    table = draw(joint_tables(max_side=5, connected=draw(st.booleans())))
    m, l = table.shape
    p_x = draw(hnp.arrays(np.float64, m, elements=positive))
    p_y = draw(hnp.arrays(np.float64, l, elements=positive))
    return table, p_x / p_x.sum(), p_y / p_y.sum()


def supports_with_targets():
    """A small zero pattern (every row and column nonempty) and positive targets, feasible or not:
    arbitrary targets (feasibility unknown) or a built-in Hall violation (infeasible)."""
    return st.one_of(_arbitrary_targets(), balancing_problems(feasible=False, max_side=5))


def tables_with_margins():
    """A strictly positive 3-d table and feasible one- and two-way margins in random order, keys
    with random axis orders."""
    return margin_problems(min_ndim=3, max_ndim=3, max_side=4)


@st.composite
def joint_distributions(draw, min_dim: int = 2):
    """A strictly positive m x l joint distribution (total 1), 2 <= m, l <= 6 by default."""
    m, l = draw(st.integers(min_dim, 6)), draw(st.integers(min_dim, 6))
    P = draw(hnp.arrays(np.float64, (m, l), elements=st.floats(0.05, 5.0)))
    return P / P.sum()


@st.composite
def tables_and_functions(draw, min_dim: int = 1):
    """A strictly positive joint distribution and a function h on its cells, values in [-3, 3]."""
    P = draw(joint_distributions(min_dim))
    h = draw(hnp.arrays(np.float64, P.shape, elements=st.floats(-3, 3)))
    return P, h
