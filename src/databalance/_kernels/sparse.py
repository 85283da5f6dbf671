"""A 2-D scipy.sparse table, never densified: CSR and CSC are used as stored, other formats as CSR."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .. import _validation as check
from .dense import DenseKernel


def support_pattern_sparse(table) -> sp.csr_array:
    pattern = sp.csr_array(table)
    if pattern.data.size and pattern.data.min() <= 0:
        pattern = sp.csr_array(pattern > 0)
    pattern.sort_indices()
    return pattern


def scaled_sparse(table, u, v):
    """``diag(u) table diag(v)`` with the pattern, container type and format of ``table``."""
    work = table if table.format in ("csr", "csc") else table.tocsr()
    lead, inner = (v, u) if work.format == "csc" else (u, v)
    data = work.data * lead.repeat(np.diff(work.indptr)) * inner[work.indices]
    out = type(work)((data, work.indices.copy(), work.indptr.copy()), shape=work.shape)
    return out if out.format == table.format else out.asformat(table.format)


class SparseKernel(DenseKernel):
    """The products of :class:`DenseKernel` work unchanged on a 2-D sparse matrix."""

    @classmethod
    def from_input(cls, table) -> SparseKernel:
        if table.ndim != 2:
            raise ValueError(f"`table` must be 2-D; got shape {table.shape}.")
        dtype = check.working_dtype(table.dtype, "table")
        kernel = table if table.format in ("csr", "csc") else table.tocsr()
        kernel = kernel.astype(dtype, copy=False)
        check.sparse_entries(kernel)
        return cls(kernel)

    def full_support(self) -> bool:
        return self.table.count_nonzero() == self.shape[0] * self.shape[1]

    def float64_sums(self, scalings) -> list[np.ndarray]:
        """Row and column sums, accumulated in float64, of the table ``scaled_table`` returns."""
        u, v = scalings
        csr = self.table if self.table.format == "csr" else self.table.tocsr()
        rows = np.repeat(np.arange(self.shape[0]), np.diff(csr.indptr))
        data = (csr.data * u.repeat(np.diff(csr.indptr)) * v[csr.indices]).astype(np.float64)
        return [np.bincount(rows, data, minlength=self.shape[0]),
                np.bincount(csr.indices, data, minlength=self.shape[1])]

    def support_size(self) -> int:
        return self.table.nnz

    def pattern(self, b):
        return support_pattern_sparse(self.table)
