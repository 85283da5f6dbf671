"""A sparse N-d table given as its occupied cells: per margin each cell's code, and each cell's mass.

What sample-level raking balances: the distinct combinations of the margin variables present in
the data, never their cross-product.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import scipy.sparse as sp

from .dense import DenseKernel, ratio

#: Cell lists at least this long have several margins' sums computed in threads.
PARALLEL_CELLS = 200_000


_POOL: dict[int, ThreadPoolExecutor] = {}


def _pool() -> ThreadPoolExecutor:
    """This process's thread pool: a forked child (multiprocessing's default on Linux) inherits the
    parent's pool object but not its threads, so each process makes its own."""
    pid = os.getpid()
    if pid not in _POOL:
        _POOL.clear()
        _POOL[pid] = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="databalance")
    return _POOL[pid]


def parallel(fn, *args) -> Future:
    """Run ``fn(*args)`` in the library's thread pool (NumPy's gathers, arithmetic and bincount
    release the GIL on large arrays, so two passes over the cells can overlap)."""
    return _pool().submit(fn, *args)


def factor_product(start: np.ndarray | None, factors: list[np.ndarray], codes: list[np.ndarray], n: int,
                   buf: np.ndarray | None = None) -> np.ndarray:
    """``start * prod_j factors[j][codes[j]]`` for each of ``n`` cells, a new float64 array
    (``start`` None: 1; ``buf``: a float64 scratch vector of length n for the gathers)."""
    factors = [np.ravel(f) for f in factors]
    if start is None and factors:
        out = np.take(factors[0], codes[0], mode="clip").astype(np.float64, copy=False)
        factors, codes = factors[1:], codes[1:]
    else:
        out = np.ones(n) if start is None else np.array(start, dtype=np.float64)
    buf = np.empty(n) if buf is None else buf
    for f, c in zip(factors, codes, strict=True):
        out *= np.take(f, c, out=buf, mode="clip")
    return out


class CellKernel(DenseKernel):
    """The state's frame holds every cell's current mass W = mass * prod_j factors[j][cell's
    category]: margin j's sums are W's sums per category of j divided by its own factor (one pass
    of the cells), and a step multiplies W by the change of one factor (one gather). W is rebuilt
    from the factors every REBUILD steps, so rounding cannot drift."""

    REBUILD = 64

    def __init__(self, codes: list[np.ndarray], shapes: list[tuple[int, ...]], mass: np.ndarray,
                 input_sums: list[np.ndarray] | None = None):
        self.table = mass
        self.lowest = 0.0
        self.dtype = mass.dtype
        self.shape = (len(mass),)
        self.batch = ()
        self.codes = codes
        self.margin_shapes = shapes
        self.sizes = [int(np.prod(s)) for s in shapes]
        self._input_sums = None if input_sums is None else [s.reshape(sh) for s, sh in zip(input_sums, shapes,
                                                                                            strict=True)]

    def _sums_with(self, j: int, weights: np.ndarray) -> np.ndarray:
        return np.bincount(self.codes[j], weights, minlength=self.sizes[j]).reshape(self.margin_shapes[j])

    def _masses(self, factors) -> np.ndarray:
        return factor_product(self.table, factors, self.codes, len(self.table), self._buffer())

    def current_masses(self, state) -> np.ndarray:
        """Every cell's mass in the current iterate (of total 1 after the first half-step)."""
        return state.frame

    def _buffer(self) -> np.ndarray:
        """A cell-sized scratch vector, allocated once: fresh 10^7-element temporaries cost more
        in page faults than the arithmetic done in them."""
        if not hasattr(self, "_scratch"):
            self._scratch = np.empty(len(self.table))
        return self._scratch

    def sums(self, j, state):
        return self._without_own(j, self._sums_with(j, state.frame), state)

    def sums_many(self, js, state) -> dict[int, np.ndarray]:
        """The sums of several margins, their passes over the cells run in threads (bincount and
        gathers release the GIL for large arrays)."""
        if len(js) == 1 or len(self.table) < PARALLEL_CELLS:
            return {j: self.sums(j, state) for j in js}
        totals = _pool().map(lambda j: self._sums_with(j, state.frame), js)
        return {j: self._without_own(j, s, state) for j, s in zip(js, totals, strict=True)}

    @staticmethod
    def _without_own(j, total, state):
        f = state.factors[j]
        return np.divide(total, f, out=np.zeros_like(total), where=f > 0)

    @property
    def frame_sums(self) -> list[np.ndarray]:
        return self.input_sums()

    def input_sums(self) -> list[np.ndarray]:
        if self._input_sums is None:
            self._input_sums = [self._sums_with(j, self.table) for j in range(len(self.codes))]
        return self._input_sums

    def initial_state(self):
        from . import State

        total = float(self.table.sum())
        scale = np.exp2(np.round(-np.log2(total) / len(self.codes)))
        factors = [np.full(s, scale) for s in self.margin_shapes]
        return State(factors, frame=self.table * scale ** len(self.codes))  # exact: powers of two

    def rescale(self, j, margin, sums, state):
        old = state.factors[j]
        new = ratio(margin.target, sums, margin.zero)
        state.factors[j] = new
        if (state.steps + 1) % self.REBUILD == 0:
            state.frame = self._masses(state.factors)
        else:
            change = np.divide(new, old, out=np.zeros_like(new), where=old > 0)
            state.frame *= np.take(change.ravel(), self.codes[j], out=self._buffer(), mode="clip")
        return sums

    def nonempty(self, j, masks=None):
        if masks is None:
            return self.input_sums()[j] > 0
        return self._sums_with(j, self._masses([m.astype(np.float64) for m in masks[:j] + [np.ones(
            self.margin_shapes[j])] + masks[j + 1:]])) > 0

    def full_support(self) -> bool:
        return False  # decided by linear programming on the cells

    def support_size(self) -> int:
        return len(self.table)

    def pattern(self, b) -> sp.csr_array:
        raise NotImplementedError("cell tables are checked by linear programming")
