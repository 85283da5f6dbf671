"""The fused sparse kernel (numba): one read of a CSR or CSC table's values and indices per sweep.

The same pass as the dense kernel of :mod:`databalance._kernels.fused` (row sums with the current
column scaling, the new row scaling, that row's contribution to the column sums), over the nonzeros
of each line; lines are split into blocks of about equal nonzeros, one per thread, each with its own
column accumulator. :func:`auto_choice` says whether ``DATABALANCE_KERNEL=auto`` uses it.
"""

from __future__ import annotations

import numpy as np

from .fused import PER_THREAD, _Fused, _rule, _using, compiled, prange, threads
from .sparse import SparseKernel

__all__ = ["FusedSparseKernel", "auto_choice"]


def auto_choice(table) -> bool:
    """Whether ``DATABALANCE_KERNEL=auto`` runs the fused kernel on this CSR/CSC table: not yet,
    since scipy's two products measured faster (benchmarks/RESULTS.md)."""
    return False


def _csr_pass(indptr, indices, data, v, uold, p, w, bounds, r, u, acc):
    """One fused pass over a CSR pattern: ``r = T v``, ``u = rule(p, r)``, ``acc[t] = T' u`` over
    row block t (blocks of about equal nonzeros)."""
    nblocks = bounds.size - 1
    n = acc.shape[1]
    for t in prange(nblocks):
        a = acc[t]
        for j in range(n):
            a[j] = 0.0
        for i in range(bounds[t], bounds[t + 1]):
            s = 0.0
            for k in range(indptr[i], indptr[i + 1]):
                s += data[k] * v[indices[k]]
            r[i] = s
            u[i] = _rule(p[i], s, uold[i], w)
            ui = u[i]
            if ui != 0.0:
                for k in range(indptr[i], indptr[i + 1]):
                    a[indices[k]] += data[k] * ui


def _block_bounds(indptr: np.ndarray, nblocks: int) -> np.ndarray:
    """Row block boundaries with about equal nonzeros in each block."""
    goals = np.linspace(0, indptr[-1], nblocks + 1)
    bounds = np.searchsorted(indptr, goals, side="left").astype(np.int64)
    bounds[0], bounds[-1] = 0, indptr.size - 1
    return np.maximum.accumulate(bounds)


class FusedSparseKernel(_Fused, SparseKernel):
    """:class:`SparseKernel` on CSR or CSC, whose sweeps read the values and indices once (numba,
    threaded over blocks of lines of about equal nonzeros, one accumulator per block)."""

    def __init__(self, table):
        super().__init__(table)
        self.lead = 0 if table.format == "csr" else 1
        self.reads = 0
        self.generation = 0
        self._bounds: dict[int, np.ndarray] = {}

    def _pass(self, x, old, p, omega):
        T = self.table
        nblocks = min(threads(), max(1, T.nnz // PER_THREAD))
        bounds = self._bounds.get(nblocks)
        if bounds is None:
            bounds = self._bounds[nblocks] = _block_bounds(T.indptr, nblocks)
        m, l = self.shape if self.lead == 0 else self.shape[::-1]
        r = np.empty(m, self.dtype)
        u = np.empty(m, self.dtype)
        acc = np.empty((nblocks, l))
        w = 1.0 if omega is None else float(np.asarray(omega).reshape(-1)[0])
        # unsigned indices spare numba's wraparound test of every gathered index (1.7x faster)
        indptr, indices = (a.view(np.uint32 if a.dtype == np.int32 else np.uint64) for a in (T.indptr, T.indices))
        with _using(nblocks):
            compiled(_csr_pass)(indptr, indices, T.data, x, old, np.ascontiguousarray(p), w,
                                   bounds.view(np.uint64), r, u, acc)
        c = (acc[0] if nblocks == 1 else acc.sum(axis=0)).astype(self.dtype)
        return r, u, c
