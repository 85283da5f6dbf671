"""A sparse N-d table given as its occupied cells: per margin each cell's code, and each cell's mass.

What sample-level raking balances: the distinct combinations of the margin variables present in
the data, never their cross-product.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .dense import DenseKernel, ratio


class CellKernel(DenseKernel):
    """Margin j's sums gather every other margin's scaling at each cell (K - 1 gathers of the cell
    list) and add the products up per category of margin j."""

    def __init__(self, codes: list[np.ndarray], shapes: list[tuple[int, ...]], mass: np.ndarray):
        self.table = mass
        self.lowest = 0.0
        self.dtype = mass.dtype
        self.shape = (len(mass),)
        self.batch = ()
        self.codes = codes
        self.margin_shapes = shapes
        self.sizes = [int(np.prod(s)) for s in shapes]

    def _sums(self, j: int, factors) -> np.ndarray:
        w = self.table
        for i, f in enumerate(factors):
            if i != j:
                w = w * f.ravel()[self.codes[i]]
        return np.bincount(self.codes[j], w, minlength=self.sizes[j]).reshape(self.margin_shapes[j])

    def sums(self, j, state):
        return self._sums(j, state.factors)

    @property
    def frame_sums(self) -> list[np.ndarray]:
        return self.input_sums()

    def input_sums(self) -> list[np.ndarray]:
        ones = [np.ones(s) for s in self.margin_shapes]
        return [self._sums(j, ones) for j in range(len(self.codes))]

    def initial_state(self):
        from . import State

        total = float(self.table.sum())
        scale = np.exp2(np.round(-np.log2(total) / len(self.codes)))
        return State([np.full(s, scale) for s in self.margin_shapes])

    def rescale(self, j, margin, sums, state):
        state.factors[j] = ratio(margin.target, sums, margin.zero)
        return sums

    def nonempty(self, j, masks=None):
        if masks is None:
            return self.input_sums()[j] > 0
        return self._sums(j, [m.astype(np.float64) for m in masks]) > 0

    def full_support(self) -> bool:
        return len(self.table) == int(np.prod([s for s in self.sizes]))  # only for a single margin

    def support_size(self) -> int:
        return len(self.table)

    def pattern(self, b) -> sp.csr_array:
        raise NotImplementedError("cell tables are checked by linear programming")
