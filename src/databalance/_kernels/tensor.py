"""A dense N-d table with one scaling per margin, each margin a set of axes (one-way or joint)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .. import _validation as check
from .dense import DenseKernel, ratio


class TensorKernel(DenseKernel):
    """The sums of margin ``j`` contract the table with every other margin's scaling; numpy's
    einsum, on a contraction order found once per margin, does it in about one read of the table
    (BLAS products for the large contraction, the small factors afterwards)."""

    def __init__(self, table: np.ndarray, axes: list[tuple[int, ...]], lowest: float = 0.0):
        self.table = table
        self.lowest = lowest
        self.dtype = table.dtype
        self.shape = table.shape
        self.batch = ()
        self.axes = axes
        self.margin_shapes = [tuple(table.shape[a] for a in ax) for ax in axes]
        self._paths: dict = {}

    @classmethod
    def from_input(cls, table, axes: list[tuple[int, ...]] | None = None) -> TensorKernel:
        arr = check.dense_array(table, "table", min_ndim=1)
        arr = arr.astype(check.working_dtype(arr.dtype, "table"), copy=False)
        return cls(arr, axes or [(a,) for a in range(arr.ndim)], check.nonnegative(arr, "table"))

    def _contract(self, j: int, factors) -> np.ndarray:
        ops: list = [self.table, list(range(self.table.ndim))]
        for i, f in enumerate(factors):
            if i != j:
                ops += [f, list(self.axes[i])]
        ops.append(list(self.axes[j]))
        return self._einsum(j, ops)

    def sums(self, j, state):
        return self._contract(j, state.factors)

    def sums_many(self, js: list[int], state) -> dict[int, np.ndarray]:
        """The sums of several margins, sharing one read of the table among margins that leave a
        common set of axes Z untouched: T is contracted over Z once (with the scalings that live
        in Z), and each margin's sums come from that smaller intermediate."""
        out: dict[int, np.ndarray] = {}
        for group, zone in self._groups(tuple(js)):
            if zone is None:
                out[group[0]] = self._contract(group[0], state.factors)
                continue
            inner = [i for i, ax in enumerate(self.axes) if set(ax) <= zone]
            kept = [a for a in range(self.table.ndim) if a not in zone]
            ops: list = [self.table, list(range(self.table.ndim))]
            for i in inner:
                ops += [state.factors[i], list(self.axes[i])]
            ops.append(kept)
            Y = self._einsum(("Z", tuple(group)), ops)
            for j in group:
                sub: list = [Y, kept]
                for i, f in enumerate(state.factors):
                    if i != j and i not in inner:
                        sub += [f, list(self.axes[i])]
                sub.append(list(self.axes[j]))
                out[j] = self._einsum(("Y", j, tuple(group)), sub)
        return out

    def _einsum(self, key, ops):
        if key not in self._paths:  # shapes never change, so neither does the best order
            self._paths[key] = np.einsum_path(*ops, optimize="optimal" if len(ops) <= 12 else "greedy")[0]
        return np.einsum(*ops, optimize=self._paths[key])

    def _groups(self, js: tuple[int, ...]) -> list:
        """Margins ``js`` grouped greedily by a common untouched zone of axes (cached per ``js``)."""
        key = ("groups", js)
        if key not in self._paths:
            groups: list = []
            for j in js:
                for g in groups:
                    zone = self._zone(g[0] + [j])
                    if zone:
                        g[0].append(j)
                        g[1] = zone
                        break
                else:
                    groups.append([[j], self._zone([j])])
            self._paths[key] = [(tuple(g), z if len(g) > 1 else None) for g, z in groups]
        return self._paths[key]

    def _zone(self, group: list[int]):
        """The axes no margin of ``group`` touches, if every scaling lies inside or outside them."""
        zone = set(range(self.table.ndim)) - {a for j in group for a in self.axes[j]}
        if zone and all(set(ax) <= zone or not set(ax) & zone for ax in self.axes):
            return zone
        return None

    @property
    def frame_sums(self) -> list[np.ndarray]:
        return self.input_sums()

    def input_sums(self) -> list[np.ndarray]:
        if not hasattr(self, "_input_sums"):
            ndim = self.table.ndim
            self._input_sums = [
                np.einsum(self.table, list(range(ndim)), list(ax)) for ax in self.axes
            ]
        return self._input_sums

    def initial_state(self):
        from . import State

        total = float(self.input_sums()[0].sum(dtype=np.float64))
        scale = self.dtype.type(np.exp2(np.round(-np.log2(total) / len(self.axes))))
        return State([np.full(s, scale, self.dtype) for s in self.margin_shapes])

    def rescale(self, j, margin, sums, state):
        state.factors[j] = ratio(margin.target, sums, margin.zero)
        return sums

    def nonempty(self, j, masks=None):
        if masks is None:
            return self.input_sums()[j] > 0
        return self._contract(j, [m.astype(self.dtype) for m in masks]) > 0

    def float64_sums(self, scalings) -> list[np.ndarray]:
        """Every margin's sums, accumulated in float64, of the table ``MarginsResult.table``
        returns for these (exported, sorted-axes) scalings."""
        out = np.array(self.table, copy=True)
        for f, ax in zip(scalings, self.axes, strict=True):
            shape = [1] * out.ndim
            for a in ax:
                shape[a] = out.shape[a]
            out *= f.reshape(shape)
        ndim = out.ndim
        return [np.einsum(out, list(range(ndim)), list(ax), dtype=np.float64) for ax in self.axes]

    def full_support(self) -> bool:
        """No zero entry and no two margins sharing an axis: then the product of the targets is a
        table with every margin, so any targets are feasible. Overlapping margins can conflict
        even on a full support (X = Y, X = Z, Y != Z), which only the linear program decides."""
        disjoint = len({a for ax in self.axes for a in ax}) == sum(len(ax) for ax in self.axes)
        return self.lowest > 0 and disjoint

    def pattern(self, b) -> sp.csr_array:
        return sp.csr_array(self.table.reshape(1, -1) > 0)
