"""The bipartite support graph of a table: can its zero pattern carry given marginals? (feasibility)

A table T with marginals p_x, p_y exists on the support of K iff the network
source -> row i (capacity p_x[i]) -> column j (unbounded, where K[i, j] > 0) -> column j -> sink
(capacity p_y[j]) carries the whole mass (Hall's condition in flow form). scipy's ``maximum_flow``
works on int32 capacities, so the masses are rounded to a grid of ``2**-30`` of the total. Rows are
rounded down and columns up, so a feasible problem is never reported infeasible; an infeasibility
smaller than about ``(m + l) * 2**-30`` of the total can go unnoticed. That is harmless: with a
deficiency D no iterate can bring the L1 marginal error below 2D, so the iteration itself stays
honest (it never reports convergence at a tolerance below 2D / total).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import breadth_first_order, connected_components, maximum_flow

_GRID = 2**30


@dataclass(frozen=True)
class Deficit:
    """A set of rows whose targets exceed what their columns can take (a Hall violator)."""

    rows: np.ndarray
    cols: np.ndarray
    row_mass: float
    col_mass: float


def deficit(pattern: sp.csr_array, p_x: np.ndarray, p_y: np.ndarray) -> Deficit | None:
    """``None`` if the entries of ``pattern`` can carry p_x and p_y; else a violating row set.

    The flow network is laid out directly as int32 CSR from the pattern: rows 0..m-1, columns
    m..m+l-1, then the source and the sink; lines with a zero target get zero capacity.
    """
    m, l = pattern.shape
    p_x = np.asarray(p_x, dtype=np.float64)
    p_y = np.asarray(p_y, dtype=np.float64)
    # Each target on the grid of its own total: the totals agree only to their dtype's rounding
    # (float32 targets of total 1 differ by ~1e-8, tens of grid units), which is not a deficit.
    grid = _GRID - m - l - 2
    cap_rows = np.floor(p_x * (grid / p_x.sum())).astype(np.int32)
    cap_cols = np.ceil(p_y * (grid / p_y.sum())).astype(np.int32)
    source, sink = m + l, m + l + 1
    nnz = pattern.indptr[-1]
    indptr = np.concatenate([pattern.indptr, nnz + 1 + np.arange(l), [nnz + l + m] * 2]).astype(np.int32)
    indices = np.concatenate([pattern.indices + m, np.full(l, sink), np.arange(m)]).astype(np.int32)
    middle = np.where(pattern.data > 0, _GRID, 0).astype(np.int32)
    graph = sp.csr_array((np.concatenate([middle, cap_cols, cap_rows]), indices, indptr),
                         shape=(m + l + 2,) * 2)
    flow = maximum_flow(graph, source, sink)
    if flow.flow_value >= int(cap_rows.sum(dtype=np.int64)):
        return None
    # Rows reachable from the source in the residual graph form the source side of a minimum cut.
    residual = (graph - flow.flow).tocsr()
    residual.data = (residual.data > 0).astype(np.int8)
    residual.eliminate_zeros()
    reached = breadth_first_order(residual, source, return_predecessors=False)
    bad_rows = np.sort(reached[reached < m])
    bad_cols = np.sort(reached[(reached >= m) & (reached < m + l)] - m)
    return Deficit(bad_rows, bad_cols, float(p_x[bad_rows].sum()), float(p_y[bad_cols].sum()))


def row_indices(csr) -> np.ndarray:
    """The row of every stored entry of a CSR matrix, in storage order."""
    return np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))


def components(pattern: sp.csr_array) -> tuple[int, np.ndarray]:
    """Connected components of the bipartite support graph; labels of rows then columns."""
    m, l = pattern.shape
    adj = sp.coo_array((np.ones(pattern.nnz, dtype=np.int8), (row_indices(pattern), m + pattern.indices)),
                       shape=(m + l, m + l))
    return connected_components(adj, directed=False)


#: Supports with more cells than this are not checked by linear programming (three or more
#: margins): with overlapping joint margins HiGHS's interior-point method takes about a second at
#: 5 000 cells, 8 s at 13 000 and minutes at 40 000. Larger problems report what the iteration shows.
LP_CELLS = 10_000


def lp_deficit(codes: list[np.ndarray], targets: list[np.ndarray]) -> float | None:
    """The mass (share of the total) that no table on the given cells can place within every
    margin's targets: 0 iff a table with exactly these margins exists on them.

    ``codes[j]`` is each cell's category in margin j (flat index into ``targets[j]``). maximise
    sum(x) over x >= 0 on the cells, subject to each margin's sums <= its target. The sums of every
    margin total sum(x), so the optimum is the targets' total exactly when all constraints hold
    with equality. ``None`` when there are more than LP_CELLS cells.
    """
    from scipy.optimize import linprog

    n = len(codes[0])
    if n > LP_CELLS:
        return None
    total = float(targets[0].sum())
    offsets = np.cumsum([0] + [p.size for p in targets[:-1]])
    rows = np.concatenate([c + o for c, o in zip(codes, offsets, strict=True)])
    A = sp.csr_array((np.ones(n * len(codes)), (rows, np.tile(np.arange(n), len(codes)))),
                     shape=(int(offsets[-1] + targets[-1].size), n))
    bounds = np.concatenate([p.ravel() for p in targets]) / total
    # HiGHS takes a sparse constraint matrix (scipy-stubs only lists dense ones).
    # Interior point: 5x faster than HiGHS's simplex on these degenerate problems.
    res = linprog(-np.ones(n), A_ub=A, b_ub=bounds, bounds=(0, None),  # type: ignore[call-overload]
                  method="highs-ipm")
    return max(0.0, 1.0 + float(res.fun))


def support_codes(table: np.ndarray, axes: list[tuple[int, ...]]) -> list[np.ndarray] | None:
    """For every nonzero cell of a dense N-d table, its category in each margin (flat index);
    ``None`` when there are more than LP_CELLS of them."""
    where = np.nonzero(table > 0)
    if len(where[0]) > LP_CELLS:
        return None
    return [np.ravel_multi_index(tuple(where[a] for a in ax), tuple(table.shape[a] for a in ax)) for ax in axes]
