"""Logits ``L`` (-inf = structural zero), balanced through a stabilised scaling buffer.

The kernel keeps potentials ``f, g`` (in the loop's :class:`~databalance._kernels.State`, as its
frame) and the buffer ``exp(L + f + g)``, computed once. Steps are plain scaling steps on that
buffer; when a scaling leaves ``[1/tau, tau]`` it is absorbed into the potentials and the buffer is
re-exponentiated, and when a row (column) sum has underflowed an exact log-sum-exp step is taken.
Both are rare: logits within a few hundred of each other in float64 need neither.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .dense import DenseKernel, ratio, support_pattern_dense

#: Elements per chunk when logits are combined with potentials in float64.
CHUNK = 1 << 18


def finite_max(a: np.ndarray, axis: int, given: np.ndarray | None = None) -> np.ndarray:
    """Max along an axis in float64, with 0 for lines that are entirely -inf (``given``: that max,
    already computed)."""
    peak = (a.max(axis=axis) if given is None else given).astype(np.float64)
    peak[np.isneginf(peak)] = 0.0
    return peak


def row_chunks(L: np.ndarray):
    """(batch index, row slice) pairs covering ``L[..., :, :]`` in chunks of about CHUNK elements."""
    step = max(1, CHUNK // max(1, L.shape[-1]))
    for b in np.ndindex(*L.shape[:-2]):
        for i in range(0, L.shape[-2], step):
            yield b, slice(i, i + step)


def _chunk_sum(L, f, g, b, rows) -> np.ndarray:
    """``L[b][rows] + f[b][rows, None] + g[b][None, :]`` in float64 (a fresh chunk)."""
    t = L[b][rows].astype(np.float64)
    t += f[b][rows, None]
    t += g[b][None, :]
    return t


def one_addend(L, f, g, dtype) -> tuple[np.ndarray, int] | None:
    """When one potential is 0 and the other is exact in ``dtype`` (the first exponentiation, whose
    other potential centres the lines by their maxima): that one in ``dtype`` and the axis along
    which it is constant (-1: a row's, -2: a column's); else None. ``L + f + g`` is then one
    addition in ``dtype``, rounded as the float64 sum rounded to ``dtype`` is (two float32 numbers:
    float64 holds their sum's double rounding harmlessly; only a zero's sign can differ, which no
    exponential sees), without the float64 chunk (half the time of the NumPy kernel's
    exponentiation of 4000^2 float32 logits)."""
    if L.dtype != dtype:
        return None
    for zero, other, axis in ((g, f, -1), (f, g, -2)):
        if not zero.any():
            exact = other.astype(dtype)
            if np.array_equal(exact, other):
                return exact, axis
    return None


def addend_rows(addend: tuple[np.ndarray, int], b, rows: slice) -> np.ndarray:
    """Problem ``b``'s rows ``rows`` of the one addend, broadcastable against ``L[b][rows]``."""
    a, axis = addend
    return a[b][rows, None] if axis == -1 else a[b][None, :]


def add_potentials(L, f, g, *, out, fn=None):
    """``out = fn(L + f[..., :, None] + g[..., None, :])``, summed in float64 chunk by chunk.

    float32 logits of size 1e4 carry potentials of size 1e4 that cancel them; summing in float32
    would lose ~1e-3 of every entry before the cancellation. The sum is rounded to ``out``'s dtype
    once, and ``fn`` is applied in that dtype: float32 logits are exponentiated in float32 (twice
    as fast as in float64), which adds a relative error of at most ``|L + f + g| * 2**-24`` to an
    entry; between re-exponentiations the scalings stay within ``[1/tau, tau]``, so the entries
    that carry mass have ``|L + f + g|`` below ``2 log(tau)`` (36.8: an error of at most 2.2e-6),
    and an entry ``exp(x)`` with ``x`` below -36.8 weighs less than 1e-16 of one near 1.
    """
    single = one_addend(L, f, g, out.dtype)
    for b, rows in row_chunks(L):
        target = out[b][rows]
        if single is not None:
            np.add(L[b][rows], addend_rows(single, b, rows), out=target, casting="same_kind")
            if fn is not None:
                fn(target, out=target)
            continue
        t = _chunk_sum(L, f, g, b, rows)
        if fn is not None and target.dtype == np.float64:
            fn(t, out=target)
            continue
        np.copyto(target, t, casting="same_kind")
        if fn is not None:
            fn(target, out=target)
    return out


def scale_buffer(table, scalings) -> bool:
    """``table *= u[..., :, None] * v[..., None, :]`` in place for ``scalings = (u, v)`` (float64;
    each product rounded to the table's dtype, as :func:`~databalance._kernels.scaled_table` rounds),
    by one threaded numba pass when it can (:func:`.fused.scale_in_place`: 2-3x quicker than NumPy's
    two passes on a 4000^2 buffer); whether every entry stayed finite."""
    from . import fused

    u, v = scalings
    finite = fused.scale_in_place(table, u, v)
    if finite is not None:
        return finite
    np.multiply(table, u[..., :, None], out=table, casting="same_kind")
    np.multiply(table, v[..., None, :], out=table, casting="same_kind")
    return bool(np.isfinite(table.max(initial=0.0)))


def exp_line_sums(L, f, g) -> tuple[np.ndarray, np.ndarray]:
    """Row and column sums of ``exp(L + f + g)`` in float64 (exponentiated in float64)."""
    rows = np.zeros(L.shape[:-1])
    cols = np.zeros(L.shape[:-2] + L.shape[-1:])
    with np.errstate(over="ignore"):
        for b, r in row_chunks(L):
            t = np.exp(_chunk_sum(L, f, g, b, r))
            rows[b][r] = t.sum(axis=-1)
            cols[b] += t.sum(axis=-2)
    return rows, cols


def logsumexp_rows(L, g) -> np.ndarray:
    """``log(sum_j exp(L[..., i, j] + g[..., j]))`` in float64; -inf for lines with no mass."""
    out = np.empty(L.shape[:-1])
    for b, rows in row_chunks(L):
        t = L[b][rows].astype(np.float64)
        t += g[b][None, :]
        peak = finite_max(t, -1)
        t -= peak[:, None]
        np.exp(t, out=t)
        with np.errstate(divide="ignore"):
            out[b][rows] = np.log(t.sum(axis=-1)) + peak
    return out


class LogKernel(DenseKernel):
    """The buffer ``exp(L + f + g)`` as a dense table; the potentials are the state's frame."""

    def __init__(self, logits: np.ndarray, first: int, has_zeros: bool = True, line_max: np.ndarray | None = None):
        super().__init__(np.empty_like(logits))
        self.logits = logits
        self.has_zeros = has_zeros
        self.first = first
        self.tiny, self.tau = (1e-100, 1e50) if self.dtype == np.float64 else (1e-15, 1e8)
        # Centre the side that the first step rescales (its old scaling is never used), so that the
        # other side's potential is exactly 0 and the first step acts on exp(L) itself.
        centre = -finite_max(logits, -1 if first == 0 else -2, line_max)
        zero = np.zeros(self.batch + (self.shape[1 - first],))
        self.centre = centre
        self._frame = [centre, zero] if first == 0 else [zero, centre]
        self._exponentiate(self._frame)
        self.frame_sums  # noqa: B018 -- cached now, in the initial frame, before any step moves it

    def initial_state(self):
        state = super().initial_state()
        state.frame = list(self._frame)
        return state

    def _exponentiate(self, frame):
        add_potentials(self.logits, frame[0], frame[1], out=self.table, fn=np.exp)

    def input_sums(self):
        """Row and column sums of exp(L) in float64 (inf where they overflow), from the first frame:
        one of f, g is 0; the other is undone in log space, shifted by its min so that the weights
        cannot overflow."""
        r, c = self.frame_sums
        pot = self.centre
        with np.errstate(over="ignore", under="ignore", divide="ignore"):
            shift = pot.min(axis=-1, keepdims=True)
            weights = np.exp(shift - pot).astype(self.dtype)
            if self.first == 0:
                return [np.exp(np.log(r) - pot), np.exp(np.log(self.col_sums(weights)) - shift)]
            return [np.exp(np.log(self.row_sums(weights)) - shift), np.exp(np.log(c) - pot)]

    def rescale(self, j, margin, sums, state):
        return self._install(j, margin, None, sums, state)

    def _install(self, j, margin, new, sums, state):
        """Set margin ``j``'s scaling to ``new`` (``None``: target / sums) through the safeguards:
        an exact log-sum-exp step when a sum has underflowed, absorption into the potentials when
        a scaling leaves ``[1/tau, tau]``."""
        p = margin.target
        other = state.factors[1 - j]
        if np.min(sums, where=p > 0, initial=np.inf) < self.tiny:
            return self._exact_step(j, p, state)
        if new is None:
            new = ratio(p, sums, margin.zero)
        if not (self._out_of_range(new, p > 0) or self._out_of_range(other, other > 0)):
            state.factors[j] = new
            return sums
        with np.errstate(divide="ignore"):
            state.frame[j] = state.frame[j] + np.log(new)
            state.frame[1 - j] = state.frame[1 - j] + np.log(other)
        self._reset(state)
        return new * sums

    def _out_of_range(self, x, where) -> bool:
        return x.max(initial=0) > self.tau or np.min(x, where=where, initial=np.inf) < 1 / self.tau

    def _reset(self, state):
        self._exponentiate(state.frame)
        state.factors = [np.ones_like(f) for f in state.factors]

    def _exact_step(self, j, p, state):
        """One log-sum-exp half-step, then the buffer is rebuilt on the new potentials."""
        with np.errstate(divide="ignore"):
            other = state.frame[1 - j] + np.log(state.factors[1 - j])
            lines = self.logits if j == 0 else self.logits.swapaxes(-1, -2)
            lse = logsumexp_rows(lines, other)
            state.frame[j] = np.where(p > 0, np.log(p.astype(np.float64)) - lse, -np.inf)
        state.frame[1 - j] = other
        self._reset(state)
        return p.copy()

    def buffer_scalings(self, state, scales) -> list[np.ndarray] | None:
        """The float64 scalings (u, v) with ``exp(L + f + g) = buffer * u v'`` for the potentials
        :meth:`export` gives (None after no step: the returned table is then ``exp(L)``, which the
        buffer's frame may not reach without overflow)."""
        if state.steps == 0:
            return None
        return [f.astype(np.float64) * np.asarray(c, np.float64) for f, c in zip(state.factors, scales, strict=True)]

    def export(self, state, scales):
        if state.steps == 0:
            return [np.zeros(f.shape) for f in state.factors]
        with np.errstate(divide="ignore"):
            return [pot + np.log(f) + np.log(c)
                    for pot, f, c in zip(state.frame, state.factors, scales, strict=True)]

    def nonempty(self, j, masks=None):
        within = None if masks is None else masks[1 - j]
        if not self.has_zeros:
            full = np.ones(self.batch + (self.shape[j],), dtype=bool)
            return full if within is None else full & within.any(axis=-1, keepdims=True)
        support = self.logits > -np.inf
        if within is not None:
            support = support & (within[..., None, :] if j == 0 else within[..., :, None])
        return support.any(axis=-1 if j == 0 else -2)

    def full_support(self) -> bool:
        return not self.has_zeros

    def support_size(self) -> int:
        return self.logits.size

    def pattern(self, b) -> sp.csr_array:
        return support_pattern_dense(self.logits[b] > -np.inf)
