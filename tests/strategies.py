"""Hypothesis strategies that build valid balancing problems (they normalise; they never filter)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

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


@st.composite
def patterned_tables(draw):
    """A table with zeros whose pattern carries the targets with full support.

    The targets are the marginals of another table on the same pattern, so a balanced table exists
    and its scalings are finite. Every row and column has at least one nonzero entry.
    """
    m, l = draw(dims), draw(dims)
    mask = draw(hnp.arrays(np.bool_, (m, l)))
    mask[np.arange(max(m, l)) % m, np.arange(max(m, l)) % l] = True
    table = draw(hnp.arrays(np.float64, (m, l), elements=positive)) * mask
    witness = draw(hnp.arrays(np.float64, (m, l), elements=positive)) * mask
    witness /= witness.sum()
    return table, witness.sum(axis=1), witness.sum(axis=0)


@st.composite
def supports_with_targets(draw):
    """A small random zero pattern (every row and column nonempty) and arbitrary positive targets:
    some problems are feasible, some are not."""
    m, l = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    mask = draw(hnp.arrays(np.bool_, (m, l)))
    mask[np.arange(m), draw(hnp.arrays(np.int64, m, elements=st.integers(0, l - 1)))] = True
    mask[draw(hnp.arrays(np.int64, l, elements=st.integers(0, m - 1))), np.arange(l)] = True
    table = mask * draw(hnp.arrays(np.float64, (m, l), elements=positive))
    p_x = draw(hnp.arrays(np.float64, m, elements=positive))
    p_y = draw(hnp.arrays(np.float64, l, elements=positive))
    return table, p_x / p_x.sum(), p_y / p_y.sum()


@st.composite
def tables_with_margins(draw):
    """A strictly positive 3-d table and the one- and two-way margins of another positive table
    (so a balanced table exists), keys in a random cycle order with random axis orders."""
    shape = tuple(draw(st.integers(1, 4)) for _ in range(3))
    table = draw(hnp.arrays(np.float64, shape, elements=positive))
    witness = draw(hnp.arrays(np.float64, shape, elements=positive))
    witness /= witness.sum()
    candidates = [0, 1, 2, (0, 1), (1, 0), (1, 2), (2, 0)]
    keys = draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=4,
                         unique_by=lambda k: tuple(sorted((k,) if isinstance(k, int) else k))))
    margins = {}
    for key in keys:
        axes = (key,) if isinstance(key, int) else key
        other = tuple(a for a in range(3) if a not in axes)
        margins[key] = np.transpose(witness.sum(axis=other), np.argsort(np.argsort(axes)))
    return table, margins
