"""A dense (optionally batched) nonnegative table, used as is."""

from __future__ import annotations

from functools import cached_property

import numpy as np
import scipy.sparse as sp

from .. import _validation as check


def ratio(p: np.ndarray, s: np.ndarray, zero) -> np.ndarray:
    """p / s, with 0 on the lines whose target is 0 (``zero`` indexes them; they are emptied).

    Lines with a positive target always have positive sums (checked before iterating), so only
    the zero-target lines can divide 0 by 0."""
    if zero is None:
        return p / s
    with np.errstate(divide="ignore", invalid="ignore"):
        out = p / s
    out[zero] = 0
    return out


def support_pattern_dense(table: np.ndarray) -> sp.csr_array:
    pattern = sp.csr_array(table > 0)
    pattern.sort_indices()
    return pattern


class DenseKernel:
    """A nonnegative table of shape ``batch + (m, l)``; the scalings are ``u`` (rows), ``v`` (columns)."""

    def __init__(self, table, lowest: float = 0.0):
        self.table = table
        self.lowest = lowest
        self.dtype = table.dtype
        self.shape = table.shape[-2:]
        self.batch = table.shape[:-2]

    @classmethod
    def from_input(cls, table) -> DenseKernel:
        arr = check.dense_array(table, "table", min_ndim=2)
        arr = arr.astype(check.working_dtype(arr.dtype, "table"), copy=False)
        return cls(arr, check.nonnegative(arr, "table"))

    # -- products -----------------------------------------------------------------------------------

    def row_sums(self, v):
        if self.table.ndim == 2:
            return self.table @ v
        return np.matmul(self.table, v[..., None])[..., 0]

    def col_sums(self, u):
        if self.table.ndim == 2:
            return self.table.T @ u
        return np.matmul(self.table.swapaxes(-1, -2), u[..., None])[..., 0]

    def sums(self, j, state):
        return self.row_sums(state.factors[1]) if j == 0 else self.col_sums(state.factors[0])

    def sums_many(self, js, state) -> dict[int, np.ndarray]:
        return {j: self.sums(j, state) for j in js}

    def float64_sums(self, scalings) -> list[np.ndarray]:
        """Row and column sums, accumulated in float64, of the table ``scaled_table`` returns for
        these (exported) scalings: computed exactly as it is, a block of rows at a time."""
        u, v = scalings
        rows = np.zeros(u.shape)
        cols = np.zeros(v.shape)
        step = max(1, (1 << 18) // max(1, self.shape[1]))
        for i in range(0, self.shape[0], step):
            # each product rounded to the table's dtype, as scaled_table (and the log kernel's
            # scale_buffer, whose scalings are float64) round it
            block = np.multiply(self.table[..., i:i + step, :], u[..., i:i + step, None]).astype(self.dtype, copy=False)
            block = np.multiply(block, v[..., None, :]).astype(self.dtype, copy=False)
            rows[..., i:i + step] = block.sum(axis=-1, dtype=np.float64)
            cols += block.sum(axis=-2, dtype=np.float64)
        return [rows, cols]

    @cached_property
    def frame_sums(self) -> list[np.ndarray]:
        """Row and column sums of the table as stored."""
        return [self.row_sums(np.ones(self.batch + self.shape[1:], self.dtype)),
                self.col_sums(np.ones(self.batch + self.shape[:1], self.dtype))]

    def input_sums(self) -> list[np.ndarray]:
        return self.frame_sums

    # -- the loop's state ---------------------------------------------------------------------------

    def initial_state(self):
        """Every scaling equal to ``total ** -1/2`` (rounded to a power of two, so exactly
        representable): the iterates do not depend on it, and it keeps the scalings and products
        of a table with a tiny or huge total in range."""
        from . import State

        total = self.frame_sums[0].sum(axis=-1, dtype=np.float64, keepdims=True)
        scale = np.exp2(np.round(-np.log2(total) / len(self.shape))).astype(self.dtype)
        return State([np.ones(self.batch + (n,), self.dtype) * scale for n in self.shape])

    def rescale(self, j, margin, sums, state):
        state.factors[j] = ratio(margin.target, sums, margin.zero)
        return sums

    def export(self, state, scales):
        if state.steps == 0:  # the input itself, whatever the starting scalings
            return [np.ones_like(f) for f in state.factors]
        return [f * np.asarray(c, self.dtype) for f, c in zip(state.factors, scales, strict=True)]

    # -- support ------------------------------------------------------------------------------------

    def nonempty(self, j, masks=None):
        """Lines of margin ``j`` with mass, counting only cells where every other margin's
        ``masks`` entry is True (``None``: all cells)."""
        if masks is None:
            return self.input_sums()[j] > 0
        w = masks[1 - j].astype(self.dtype)
        return (self.row_sums(w) if j == 0 else self.col_sums(w)) > 0

    def full_support(self) -> bool:
        return self.lowest > 0

    def support_size(self) -> int:
        return self.table.size

    def pattern(self, b):
        return support_pattern_dense(self.table[b])
