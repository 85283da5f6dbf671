"""A 2-D Dask array partitioned along its rows (blocks NumPy or scipy.sparse), balanced in place.

The blocks are persisted once (on the workers under ``distributed``) and never leave them; the
scalings (vectors of the table's row and column counts) live on the client. A half-step is one
map over the blocks: the rows' half-step gathers each block's ``block @ v`` (its own rows' sums),
the columns' one sums every block's ``block.T @ u[its rows]`` by Dask's tree reduction. The
products are those of :class:`.dense.DenseKernel` on each block, so the iterates are the in-memory
ones up to the order of the column sums' additions. Chunks along the columns are merged, with a
warning: a block must hold whole rows (see the user guide, "Samples and tables on Dask").

Imported only when a Dask array reaches :func:`databalance._kernels.kernel_for`.
"""

from __future__ import annotations

import warnings
from functools import cached_property
from typing import Any

import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp

from .. import _validation as check
from .dense import DenseKernel, support_pattern_dense
from .sparse import scaled_sparse, support_pattern_sparse

#: Partials summed per node of the column sums' tree reduction.
SPLIT_EVERY = 8

_delayed: Any = dask.delayed  # typed loosely: dask's stubs expect collections, not functions


def _csr(block: Any) -> Any:
    return sp.csr_array(block)


def _vector(x: np.ndarray) -> Any:
    """A vector every block's task reads, as one literal of the graph. (Scattering it to the workers
    instead measured 20% slower per sweep: it costs a round trip per half-step.)"""
    return _delayed(x, pure=True)


class ChunkedWarning(UserWarning):
    """A Dask table chunked along its columns was rechunked to whole rows."""


def _block_summary(block, offset: int, working):
    """One block's check (finite, nonnegative; errors name the table's row) and its row sums, column
    sums, smallest entry and stored entries, in the working dtype."""
    if sp.issparse(block):
        block = _csr(block).astype(working, copy=False)
        try:
            check.sparse_entries(block)
        except ValueError as error:
            raise ValueError(f"{error} [row index within the Dask block starting at row {offset}]") from None
        full = block.count_nonzero() == block.shape[0] * block.shape[1]
        lowest = 1.0 if full else 0.0
        nnz = block.nnz
    else:
        block = np.asarray(block).astype(working, copy=False)
        try:
            lowest = check.nonnegative(block, "table")
            if not np.isfinite(block.max(initial=0.0)):
                check.finite_sums(np.array([np.inf]), block, "table")  # raises, naming the entry
        except ValueError as error:
            raise ValueError(f"{error} [index within the Dask block starting at row {offset}]") from None
        nnz = block.size
    rows = block @ np.ones(block.shape[1], working)
    cols = block.T @ np.ones(block.shape[0], working)
    return {"rows": np.asarray(rows), "cols": np.asarray(cols), "lowest": lowest, "nnz": nnz}


def _prepared(block, working):
    """A block as the kernel keeps it: CSR for sparse, a NumPy array otherwise, in the working dtype."""
    if sp.issparse(block):
        return _csr(block).astype(working, copy=False)
    return np.asarray(block).astype(working, copy=False)


def _row_sums(block, v):
    return np.asarray(block @ v)


def _col_partial(block, u):
    return np.asarray(block.T @ u)[None, :]


def _float64_partial(block, u, v, start, stop):
    """Row sums and column sums, in float64, of the block of ``diag(u) table diag(v)``."""
    scaled = scaled_sparse(block, u[start:stop], v) if sp.issparse(block) else block * u[start:stop, None] * v
    data = scaled.astype(np.float64)
    return np.asarray(data.sum(axis=1)).ravel(), np.asarray(data.sum(axis=0)).ravel()


class ChunkedKernel(DenseKernel):
    """The products of :class:`DenseKernel`, a map over persisted row blocks each."""

    def __init__(self, table: da.Array, blocks: list, offsets: np.ndarray, summary: dict):
        self.table = table
        self.blocks = blocks
        self.offsets = offsets
        self.dtype = table.dtype
        self.shape = table.shape
        self.batch = ()
        self.lowest = summary["lowest"]
        self.nnz = summary["nnz"]
        self._frame = [summary["rows"], summary["cols"]]
        self.sparse = summary["sparse"]

    @classmethod
    def from_input(cls, table: da.Array) -> ChunkedKernel:
        check.dask_table(table)
        if table.numblocks[1] > 1:
            warnings.warn(check.dask_column_chunks(table.numblocks[1]), ChunkedWarning, stacklevel=4)
            table = table.rechunk({1: -1})
        working = check.working_dtype(np.dtype(table.dtype), "table")
        sparse = sp.issparse(getattr(table, "_meta", None))
        prepared = da.map_blocks(_prepared, table, working, dtype=working, meta=table._meta)
        prepared = prepared.persist()  # once: the blocks stay where they were computed
        blocks = list(prepared.to_delayed().ravel())
        offsets = np.concatenate([[0], np.cumsum(prepared.chunks[0])]).astype(np.int64)
        parts = dask.compute(*[_delayed(_block_summary)(b, int(o), working)
                               for b, o in zip(blocks, offsets[:-1], strict=True)])
        summary = {
            "rows": np.concatenate([p["rows"] for p in parts]).astype(working, copy=False),
            "cols": np.sum([p["cols"] for p in parts], axis=0).astype(working, copy=False),
            "lowest": min((p["lowest"] for p in parts), default=np.inf),
            "nnz": int(sum(p["nnz"] for p in parts)),
            "sparse": sparse,
        }
        return cls(prepared, blocks, offsets, summary)

    # -- products: one map over the blocks each ----------------------------------------------------

    def row_sums(self, v):
        shared = _vector(np.asarray(v, self.dtype))
        parts = [da.from_delayed(_delayed(_row_sums, pure=True)(b, shared), shape=(int(stop - start),),
                                 dtype=self.dtype)
                 for b, start, stop in zip(self.blocks, self.offsets[:-1], self.offsets[1:], strict=True)]
        (out,) = dask.compute(da.concatenate(parts))
        return out.astype(self.dtype, copy=False)

    def col_sums(self, u):
        u = np.asarray(u, self.dtype)  # each block's task gets only its rows' slice
        parts = [da.from_delayed(_delayed(_col_partial, pure=True)(b, u[start:stop]), shape=(1, self.shape[1]),
                                 dtype=self.dtype)
                 for b, start, stop in zip(self.blocks, self.offsets[:-1], self.offsets[1:], strict=True)]
        (out,) = dask.compute(da.concatenate(parts).sum(axis=0, split_every=SPLIT_EVERY, dtype=self.dtype))
        return out.astype(self.dtype, copy=False)

    def float64_sums(self, scalings) -> list[np.ndarray]:
        u, v = (np.asarray(s) for s in scalings)
        su, sv = _vector(u), _vector(v)
        parts = dask.compute(*[_delayed(_float64_partial, pure=True)(b, su, sv, int(start), int(stop))
                               for b, start, stop in zip(self.blocks, self.offsets[:-1], self.offsets[1:],
                                                         strict=True)])
        return [np.concatenate([p[0] for p in parts]), np.sum([p[1] for p in parts], axis=0)]

    @cached_property
    def frame_sums(self) -> list[np.ndarray]:
        return self._frame

    # -- support -----------------------------------------------------------------------------------

    def full_support(self) -> bool:
        return self.lowest > 0

    def support_size(self) -> int:
        return self.nnz

    def pattern(self, b):
        """The support, gathered to the client (for the feasibility check, run only when needed)."""
        return support_pattern_chunked(self.table)


def support_pattern_chunked(table: da.Array) -> sp.csr_array:
    blocks = dask.compute(*table.to_delayed().ravel())
    parts = [support_pattern_sparse(b) if sp.issparse(b) else support_pattern_dense(np.asarray(b)) for b in blocks]
    pattern = sp.csr_array(sp.vstack(parts, format="csr"))
    pattern.sort_indices()
    return pattern


def _scaled_block(block, u, v, block_info=None):
    start, stop = block_info[0]["array-location"][0]
    if sp.issparse(block):
        return scaled_sparse(_csr(block), u[start:stop], v)
    out = np.multiply(block, u[start:stop, None])
    out *= v[None, :]
    return out


def scaled_chunked(table: da.Array, u: np.ndarray, v: np.ndarray) -> da.Array:
    """``diag(u) @ table @ diag(v)`` as a lazy Dask array with the table's blocks (sparse blocks stay
    sparse)."""
    return da.map_blocks(_scaled_block, table, u, v, dtype=np.result_type(table.dtype, u.dtype), meta=table._meta)
