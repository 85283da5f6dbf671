"""Fused, threaded kernels (numba): one read of the table per sweep, and which kernel runs.

A row half-step needs the row sums ``r = T v``; the column half-step after it needs the column
sums ``c = T' u`` of the new row scaling ``u = p / r``. Each ``u_i`` depends only on row ``i`` and
the old ``v``, so one pass over the rows can compute ``r_i``, then ``u_i``, then add row ``i``'s
contribution ``T_i u_i`` to the column sums while the row is in cache: a sweep reads the table
once instead of twice (exact, not an approximation). Rows are split into blocks, one per thread,
each with its own column accumulator (float64), added up at the end of the pass. The sparse form
of the pass is in :mod:`databalance._kernels.fused_sparse`.

The loop (:mod:`databalance._ipf`) is unchanged: it asks ``sums(lead)``, then ``rescale(lead)``,
then ``sums(other)``. The fused kernel does the pass in ``sums(lead)`` with the rule the previous
``rescale(lead)`` used (its margin, and the over-relaxation factor of :mod:`databalance._accelerate`,
if any), keeps the new scaling and the other margin's sums in the loop's
:class:`~databalance._kernels.State`, hands the scaling to ``rescale(lead)`` when it gets the
same sums and margin, and the column sums to ``sums(other)`` while the state still holds that
scaling. Anything else (the first steps, a new rule, the log kernel's re-exponentiation) falls
back to a plain product. The *lead* margin is the one whose lines are contiguous in memory: rows
for C order and CSR, columns for Fortran order and CSC.

Which kernel runs: :func:`which_kernel`; the environment variable ``DATABALANCE_KERNEL``
(``auto``, the default; ``numpy``; ``numba``) overrides the choice. numba is imported only when a
fused kernel is built; the kernels are compiled on first use for the dtypes used (and cached on
disk).
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, cached_property
from typing import Any, cast

import numpy as np
import scipy.sparse as sp

from .. import _validation as check
from .cells import parallel
from .dense import DenseKernel, ratio
from .log import CHUNK, LogKernel, addend_rows, one_addend, row_chunks
from .sparse import SparseKernel

#: The environment variable that chooses the kernel: ``auto`` (numba for large tables when it is
#: installed), ``numpy`` (never numba) or ``numba`` (always, for every supported table).
ENV = "DATABALANCE_KERNEL"

#: ``auto`` uses numba for dense tables with at least this many entries: below it
#: a BLAS product costs microseconds and numba's dispatch is not worth its import.
MIN_SIZE = 1 << 16


def requested() -> str:
    """The kernel the environment asks for: ``auto``, ``numpy`` or ``numba``."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "numpy", "numba"):
        raise ValueError(check.kernel_choice(ENV, value))
    return value


def numba_installed() -> bool:
    """Whether numba can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("numba") is not None
    except (ImportError, ValueError):  # a module blocked in sys.modules
        return False


def numba_wanted() -> bool:
    """Whether compiled passes may run where no table size decides: numba installed and not refused
    by ``DATABALANCE_KERNEL=numpy`` (``numba`` without numba installed raises, as everywhere)."""
    choice = requested()
    if choice == "numpy":
        return False
    if not numba_installed():
        if choice == "numba":
            raise ImportError(check.numba_missing(ENV))
        return False
    return True


def _supported(table) -> bool:
    """Whether a fused kernel handles this (validated) table: float32/float64, and a layout it
    reads in place (C or Fortran order in the last two axes; CSR or CSC)."""
    if table.dtype not in (np.float32, np.float64):
        return False
    if sp.issparse(table):
        return cast(Any, table).format in ("csr", "csc")
    return _lead(table) is not None


def _lead(table: np.ndarray) -> int | None:
    """0 when each problem's rows are contiguous (C order), 1 when its columns are, else None."""
    if table.ndim < 2 or table.size == 0:
        return None
    m, l = table.shape[-2:]
    flat = table.reshape((-1, m, l)) if table.flags.c_contiguous else None
    if flat is not None:
        return 0
    swapped = np.swapaxes(table, -1, -2)
    return 1 if swapped.flags.c_contiguous else None


def which_kernel(table) -> str:
    """Which kernel balances ``table``: ``"numba"`` (fused, threaded) or ``"numpy"``.

    The choice follows the environment variable ``DATABALANCE_KERNEL``: ``numpy`` never uses
    numba; ``numba`` always does for float32/float64 tables in C or Fortran order (CSR or CSC when
    sparse); ``auto`` (the default) does for such dense tables and logits with at least
    ``MIN_SIZE`` (65 536) entries when numba is installed, and for CSR/CSC tables with at least
    ``fused_sparse.AUTO_MIN_NNZ`` (2**22) nonzeros when numba runs on two threads or more.

    Parameters
    ----------
    table : array_like or scipy.sparse matrix
        A table as :func:`~databalance.balance_table` takes it, or logits as
        :func:`~databalance.balance_logits` takes them.

    Returns
    -------
    str
        ``"numba"`` or ``"numpy"``.

    Raises
    ------
    ValueError
        ``DATABALANCE_KERNEL`` is not one of ``auto``, ``numpy``, ``numba``.
    ImportError
        ``DATABALANCE_KERNEL=numba`` and numba is not installed.

    Notes
    -----
    A process forked after this one ran numba's kernels under GNU OpenMP (numba's usual threading
    layer on Linux) gets ``"numpy"``: OpenMP cannot start threads there. Set
    ``NUMBA_THREADING_LAYER=workqueue`` (or install tbb), or start workers with "spawn", to keep
    numba in such workers.

    Examples
    --------
    >>> import numpy as np
    >>> from databalance import which_kernel
    >>> which_kernel(np.ones((3, 3)))  # too small to be worth it
    'numpy'
    """
    choice = requested()
    if choice == "numpy" or _FORK_UNSAFE:
        return "numpy"
    if not sp.issparse(table):
        table = np.asarray(table)
        if table.dtype.kind in "biu":
            table = table.astype(np.float64)
    if not _supported(table):
        return "numpy"
    if choice == "numba":
        if not numba_installed():
            raise ImportError(check.numba_missing(ENV))
        return "numba"
    if sp.issparse(table):
        from .fused_sparse import auto_choice

        return "numba" if auto_choice(table) and numba_installed() else "numpy"
    return "numba" if table.size >= MIN_SIZE and numba_installed() else "numpy"


def accelerated(kernel):
    """The fused form of a validated :class:`DenseKernel` or :class:`SparseKernel` when
    :func:`which_kernel` chooses numba, else the kernel itself."""
    if which_kernel(kernel.table) != "numba":
        return kernel
    if isinstance(kernel, SparseKernel):
        from .fused_sparse import FusedSparseKernel

        return FusedSparseKernel(kernel.table)
    return FusedDenseKernel(kernel.table, kernel.lowest)


def log_kernel(logits: np.ndarray, first: int, has_zeros: bool = True, line_max: np.ndarray | None = None) -> LogKernel:
    """The log kernel of validated logits (``line_max``: their maxima along the lines the first
    step rescales, if known): fused when :func:`which_kernel` chooses numba."""
    cls = FusedLogKernel if which_kernel(logits) == "numba" else LogKernel
    return cls(logits, first, has_zeros, line_max)


# -- the update rule ----------------------------------------------------------------------------------


def relaxed_ratio(old: np.ndarray, p: np.ndarray, sums: np.ndarray, zero, omega) -> np.ndarray:
    """The over-relaxed scaling ``old * (p / (old * sums)) ** omega`` (``omega`` broadcast over
    the lines), and the plain ``p / sums`` on each line where the relaxed one would not decrease
    the dual objective ``sums * x - p log x``, or when ``omega`` is None; 0 where ``p`` is 0.

    The per-line safeguard keeps the dual objective decreasing at every half-step, which makes the
    relaxed iteration converge whenever plain IPF does (Thibault, Chizat, Dossal, Papadakis 2017).
    """
    plain = ratio(p, sums, zero)
    if omega is None:
        return plain
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rho = np.asarray(p, np.float64) / (np.asarray(old, np.float64) * sums)
        lw = omega * np.log(rho)
        d = np.expm1(lw)  # exp(lw) - 1 would be rounding noise near the solution (rho = 1 + 1e-10)
        gain = d / rho - lw  # change of the dual objective, over p (<= 0: a decrease)
        new = np.where(gain <= 0.0, old * (1.0 + d), plain)
    new = new.astype(plain.dtype, copy=False)
    if zero is not None:
        new[zero] = 0
    return new


# -- numba: compiled on first use ---------------------------------------------------------------------

#: Bound to ``numba.prange`` before the first compilation; ``range`` when the functions run as Python.
prange = range


def _rule(pi, s, uo, w):
    """The new scaling of one line: ``pi / s`` (0 when ``pi`` is 0), or with ``w != 1`` the
    over-relaxed one of :func:`relaxed_ratio` (the same formula and safeguard)."""
    if pi == 0:
        return 0.0
    if w == 1.0:
        return pi / s
    rho = pi / (uo * s)
    lw = w * np.log(rho)
    d = np.expm1(lw)  # near the solution rho = 1 + 1e-10: exp(lw) - 1 would be rounding noise
    if d / rho - lw <= 0.0:
        return uo * (1.0 + d)
    return pi / s


def _dots(Tb, x, lo, hi, zero, out):
    """``out[i] = T_i . x`` for rows ``lo <= i < hi``, four rows at a time (four streams from memory
    keep more loads in flight than one), accumulated in ``zero``'s dtype: the table's, as BLAS does
    (float64 for float64 sums). As compiled, a row of a group of four and a row left over are
    summed in the same order, so row blocks (thread counts) do not change the sums: a test checks
    it (eight rows at a time summed a group's rows in another order)."""
    i = lo
    while i + 4 <= hi:
        s0 = zero
        s1 = zero
        s2 = zero
        s3 = zero
        for j in range(x.size):
            xj = x[j]
            s0 += Tb[i, j] * xj
            s1 += Tb[i + 1, j] * xj
            s2 += Tb[i + 2, j] * xj
            s3 += Tb[i + 3, j] * xj
        out[i] = s0
        out[i + 1] = s1
        out[i + 2] = s2
        out[i + 3] = s3
        i += 4
    while i < hi:
        s = zero
        for j in range(x.size):
            s += Tb[i, j] * x[j]
        out[i] = s
        i += 1


def _axpy(Tb, y, lo, hi, a):
    """``a += sum_i y[i] T_i`` over rows ``lo <= i < hi`` (``a`` float64): eight rows per update of
    ``a``, summed in the dtype of the products (the table's; float64 when ``y`` is)."""
    i = lo
    while i + 8 <= hi:
        y0 = y[i]
        y1 = y[i + 1]
        y2 = y[i + 2]
        y3 = y[i + 3]
        y4 = y[i + 4]
        y5 = y[i + 5]
        y6 = y[i + 6]
        y7 = y[i + 7]
        for j in range(a.size):
            a[j] += ((Tb[i, j] * y0 + Tb[i + 1, j] * y1 + Tb[i + 2, j] * y2 + Tb[i + 3, j] * y3)
                     + (Tb[i + 4, j] * y4 + Tb[i + 5, j] * y5 + Tb[i + 6, j] * y6 + Tb[i + 7, j] * y7))
        i += 8
    while i < hi:
        yi = y[i]
        if yi != 0.0:
            for j in range(a.size):
                a[j] += Tb[i, j] * yi
        i += 1


def _line_dot(indptr, indices, data, x, i):
    """Line ``i`` of a compressed sparse pattern times ``x``, summed in float64."""
    s = 0.0
    for k in range(indptr[i], indptr[i + 1]):
        s += data[k] * x[indices[k]]
    return s


def _starts(counts, ptr):
    """A counting sort's positions: ``counts[t, j]`` (block t's entries in group j) becomes where
    block t's entries of group j start, the groups in order and each group's blocks in order;
    ``ptr[j]`` where group j starts (``ptr[-1]`` the total)."""
    total = 0
    for j in range(counts.shape[1]):
        ptr[j] = total
        for t in range(counts.shape[0]):
            ct = counts[t, j]
            counts[t, j] = total
            total += ct
    ptr[counts.shape[1]] = total


def _dense_pass(T, v, uold, p, omega, nblocks, zero, r, u, acc):
    """One fused pass over ``T`` (B, m, l): ``r = T v``, ``u = rule(p, r)``, ``acc[q] = T' u``
    over row block q of problem ``q // nblocks``: eight rows at a time (3-5% quicker than sixteen
    in A/B runs), their sums, their new scalings, then their contributions to the column sums while
    the rows are in cache."""
    B, m, l = T.shape
    for q in prange(B * nblocks):  # numba.prange when compiled
        b = q // nblocks
        lo = (q % nblocks) * m // nblocks
        hi = (q % nblocks + 1) * m // nblocks
        a = acc[q]
        a[:] = 0.0
        for i in range(lo, hi, 8):
            e = min(i + 8, hi)
            _dots(T[b], v[b], i, e, zero, r[b])
            for g in range(i, e):
                u[b, g] = _rule(p[b, g], r[b, g], uold[b, g], omega[b])
            _axpy(T[b], u[b], i, e, a)


def _scaled_row(row, xi, y, lead_first, out):
    """``out = (row * xi) * y`` (``xi`` first when ``lead_first``, else ``y``), each product
    rounded to ``out``'s dtype (compiled without fast-math: no product is reassociated)."""
    if lead_first:
        for j in range(out.size):
            out[j] = row[j] * xi
        for j in range(out.size):
            out[j] = out[j] * y[j]
    else:
        for j in range(out.size):
            out[j] = row[j] * y[j]
        for j in range(out.size):
            out[j] = out[j] * xi


def _rounded_sums(T, x, y, lead_first, nblocks, r, acc):
    """Row sums ``r`` and column sums ``acc[q]`` over row block q, in float64, of the entries
    ``T_ij x_i y_j`` rounded to the table's dtype after each product, as the returned table is."""
    B, m, l = T.shape
    for q in prange(B * nblocks):
        b = q // nblocks
        a = acc[q]
        a[:] = 0.0
        t = np.empty_like(T[b, 0])  # one row of the table's dtype: the products rounded as stored
        for i in range((q % nblocks) * m // nblocks, (q % nblocks + 1) * m // nblocks):
            _scaled_row(T[b, i], x[b, i], y[b], lead_first, t)
            s = 0.0
            for j in range(l):
                s += t[j]
                a[j] += t[j]
            r[b, i] = s


def _scale_in_place(T, x, y, lead_first, nblocks, bad):
    """``T[b, i] = (T[b, i] * x[b, i]) * y[b]`` in place (the lead line's scaling first when
    ``lead_first``; each product rounded as :func:`_scaled_row` rounds it), over row block q of
    problem ``q // nblocks``; ``bad[q]`` the block's entries that are not below +inf (infinite or
    NaN: a count of comparisons, which vectorises, and cannot overflow as a sum of entries can)."""
    B, m, l = T.shape
    for q in prange(B * nblocks):
        b = q // nblocks
        n = 0
        for i in range((q % nblocks) * m // nblocks, (q % nblocks + 1) * m // nblocks):
            row = T[b, i]
            _scaled_row(row, x[b, i], y[b], lead_first, row)
            for j in range(l):
                n += not row[j] < np.inf
        bad[q] = n


def _key_extremes(K, shift, mask, nblocks, line, low):
    """Extremes of ordered integer keys (see :func:`line_extremes`) of ``K`` (B, m, l), row block q
    by thread q: ``line[b, i]`` the maximum of row i, ``low[q]`` the block's minimum."""
    B, m, l = K.shape
    for q in prange(B * nblocks):
        b = q // nblocks
        first = (q % nblocks) * m // nblocks  # every block has a row
        lo = K[b, first, 0] ^ ((K[b, first, 0] >> shift) & mask)
        for i in range(first, (q % nblocks + 1) * m // nblocks):
            row = K[b, i]
            hi = row[0] ^ ((row[0] >> shift) & mask)
            for j in range(l):
                k = row[j] ^ ((row[j] >> shift) & mask)
                lo = min(lo, k)
                hi = max(hi, k)
            line[b, i] = hi
        low[q] = lo


def _chain_pass(W, xT, base, scale, nblocks, y, acc):
    """``y[k] = base[k] - scale * (W xT[k])`` for each column k, and ``acc[q, k] = W' y[k]`` over
    row block q: sixteen rows at a time, every column's sums and updates while the rows are in
    cache (one read of ``W`` whatever the number of columns)."""
    m, l = W.shape
    for q in prange(nblocks):
        lo = q * m // nblocks
        hi = (q + 1) * m // nblocks
        A = acc[q]
        A[:] = 0.0
        for i in range(lo, hi, 16):
            e = min(i + 16, hi)
            for k in range(xT.shape[0]):
                _dots(W, xT[k], i, e, 0.0, y[k])
                for g in range(i, e):
                    y[k, g] = base[k, g] - scale[g] * y[k, g]
                _axpy(W, y[k], i, e, A[k])


def _lead_products(T, x, nblocks, zero, r):
    """``r = T x`` for ``T`` (B, m, l) (the lead lines' sums), threaded over row blocks."""
    B, m, l = T.shape
    for q in prange(B * nblocks):
        b = q // nblocks
        _dots(T[b], x[b], (q % nblocks) * m // nblocks, (q % nblocks + 1) * m // nblocks, zero, r[b])


def _other_products(T, y, nblocks, acc):
    """``acc[q] = T' y`` over row block q of problem ``q // nblocks`` (the other lines' sums)."""
    B, m, l = T.shape
    for q in prange(B * nblocks):
        b = q // nblocks
        a = acc[q]
        a[:] = 0.0
        _axpy(T[b], y[b], (q % nblocks) * m // nblocks, (q % nblocks + 1) * m // nblocks, a)


def _potential_sum(L, f, g, lo, hi, out):
    """``out[i] = (L[i] + f[i]) + g`` for rows ``lo <= i < hi`` of one problem, summed in float64
    and rounded to ``out``'s dtype (compiled without reassociation: the sums of
    :func:`~databalance._kernels.log.add_potentials`, to the bit)."""
    for i in range(lo, hi):
        fi = f[i]
        for j in range(g.size):
            out[i, j] = (np.float64(L[i, j]) + fi) + g[j]


#: float32 exp for :func:`_exp_rows`: e^x = 2^t e^r, t = round(x log2(e)), r = x - t ln(2) with
#: ln(2) = LN2_HI + LN2_LO (Cody and Waite; LN2_HI has 15 significant bits, so that t * LN2_HI is
#: exact for |t| < 2^9), and e^r = 1 + r + r^2 P(r) on |r| <= ln(2)/2, P of degree 4 fitted to
#: (e^r - 1 - r) / r^2 by least squares on 2000 Chebyshev nodes (relative error 1.0e-8, 0.17 of
#: float32's unit of least precision). Arguments are clamped to [EXP_LOW, EXP_HIGH], beyond which
#: the float32 result is 0 or inf anyway.
EXP_P = (np.float32(0.5), np.float32(0.16666576), np.float32(0.041666467), np.float32(0.008363175),
         np.float32(0.0013933644))
LOG2_E, LN2_HI, LN2_LO = np.float32(1.4426950408889634), np.float32(0.693145751953125), np.float32(1.4286068e-06)
EXP_LOW, EXP_HIGH, EXP_ZERO = np.float32(-110.0), np.float32(100.0), np.float32(-104.0)


def _exp_row(x, a, c, out, bits, scale):
    """``out = exp((x + a) + c)`` for one row (see :func:`_exp_rows`; ``scale`` is ``bits`` as
    float32: a function of its own, so that LLVM vectorises its loops; ``x`` and ``out`` must be
    distinct arrays, or the loops do not vectorise: numba's arrays may alias)."""
    l = x.size
    p0, p1, p2, p3, p4 = EXP_P
    for j in range(l):
        v = np.float32((x[j] + a) + c[j])
        keep = v >= EXP_ZERO
        v = EXP_HIGH if v > EXP_HIGH else v
        v = EXP_LOW if v < EXP_LOW else v
        t = np.floor(v * LOG2_E + np.float32(0.5))
        r = (v - t * LN2_HI) - t * LN2_LO
        e = np.int32(t)
        half = e >> 1
        bits[j] = (half + 127) << 23
        bits[l + j] = ((e - half + 127) << 23) if keep else 0
        out[j] = np.float32(1.0) + r + r * r * ((((p4 * r + p3) * r + p2) * r + p1) * r + p0)
    for j in range(l):
        out[j] = (out[j] * scale[j]) * scale[l + j]


def _exp_rows(L, a, c, lo, hi, out, bits):
    """``out[i] = exp((L[i] + a[i]) + c)`` in float32 for rows ``lo <= i < hi`` of one problem
    (C-contiguous rows; ``out`` not ``L``; ``bits`` int32 scratch of twice a row): the sum (in
    float32 for float32 addends, as :func:`~databalance._kernels.log.one_addend` allows; in float64
    for float64 potentials, rounded once to float32, as :func:`_potential_sum`) and the exponential
    in one vectorised pass (NumPy's exp cannot take the addition: 0.8x of ``np.add`` then
    ``np.exp`` on 4000^2 float32, one thread). Within 1.4 units of least precision of the exact
    exponential (NumPy's float32 exp: 2.5); 0 and inf exactly where NumPy gives them: below -104
    (under half the least subnormal) 0, subnormal results rounded once (``2^t`` applied as two
    normal factors, 2^(t // 2) then the rest), inf from 88.73 up, NaN for NaN."""
    scale = bits.view(np.float32)
    for i in range(lo, hi):
        _exp_row(L[i], a[i], c, out[i], bits, scale)


def _line_sums(E, lo, hi, w, along, rows, cols, weighted):
    """For rows ``lo <= i < hi`` of one problem, in float64: ``rows[i]`` the sum of row i, and the
    rows added to ``cols``; ``weighted[i]`` the sum of row i weighted by ``w`` (``along``), or the
    rows times ``w[i]`` added to ``weighted``."""
    ones = np.ones(max(E.shape[0], E.shape[1]))
    _dots(E, ones[:E.shape[1]], lo, hi, 0.0, rows)
    _axpy(E, ones, lo, hi, cols)
    if along:
        _dots(E, w, lo, hi, 0.0, weighted)
    else:
        _axpy(E, w, lo, hi, weighted)


@cache
def compiled(func, parallel: bool = True, exact: bool = False):
    """The numba-compiled form of a pass (numba imported here, once): threaded over its ``prange``
    unless not ``parallel``; with :data:`FASTMATH` unless ``exact``; IEEE division (a line sum that
    underflowed to 0 gives an infinite scaling, which the kernels' safeguards see, as NumPy's
    does, instead of raising). Before compiling, the pass's module gets numba's ``prange`` and the
    compiled functions of :data:`_INNER` under the names it calls.

    numba's disk cache keys a compiled pass on its own file: after an edit of an inner function in
    this file, clear ``__pycache__`` (or ``NUMBA_CACHE_DIR``) before timing a pass of another
    file."""
    import numba

    namespace = func.__globals__
    namespace["prange"] = numba.prange
    for name, (inner, exact_inner) in _INNER.items():
        if name in namespace:
            namespace[name] = _jitted(inner, exact_inner)
    return numba.njit(func, parallel=parallel, nogil=True, cache=True, error_model="numpy",
                      fastmath=False if exact else set(FASTMATH))


#: reassoc/contract let LLVM vectorise the sums (a sum in another order: the results differ from
#: BLAS by rounding only); no nnan/ninf, so -inf and inf keep their IEEE meaning.
FASTMATH = frozenset({"reassoc", "contract", "nsz"})


@cache
def _jitted(func, exact: bool):
    import numba

    return numba.njit(func, cache=True, error_model="numpy", fastmath=False if exact else set(FASTMATH))


#: The plain functions the passes call, by the names they call them, and whether each is compiled
#: without fast-math (bound to their compiled forms in a pass's module before it compiles).
_INNER = {"_rule": (_rule, False), "_dots": (_dots, False), "_axpy": (_axpy, False), "_scaled_row": (_scaled_row, True),
          "_line_dot": (_line_dot, False), "_starts": (_starts, True), "_exp_row": (_exp_row, True)}


#: Entries (nonzeros) per thread: a pass over fewer runs on one thread, since waking the others
#: costs more than it saves (far more on a machine busy with other work).
PER_THREAD = 1 << 20


#: numba's threading layer once a parallel region has run in this process (None before).
_LAYER: str | None = None
#: Whether this process was forked from one that ran a parallel region under GNU OpenMP: such a
#: child cannot start OpenMP threads (it dies), so it balances with the NumPy kernels.
_FORK_UNSAFE = False


def _after_fork() -> None:
    global _FORK_UNSAFE
    _FORK_UNSAFE = _FORK_UNSAFE or _LAYER == "omp"


os.register_at_fork(after_in_child=_after_fork)


def threads() -> int:
    """numba's current thread count (``numba.set_num_threads``)."""
    import numba

    return int(numba.get_num_threads())


@contextmanager
def _using(n: int):
    """Run a parallel region on ``n`` of numba's threads."""
    import numba

    old = numba.get_num_threads()
    if n != old:
        numba.set_num_threads(n)
    try:
        yield
    finally:
        if n != old:
            numba.set_num_threads(old)
        global _LAYER
        if _LAYER is None:
            _LAYER = numba.threading_layer()


def chain_pass(W: np.ndarray, x: np.ndarray, base: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For a C-ordered table ``W`` (m, l) and ``x`` (l, d): ``y = base - scale[:, None] * (W x)``
    and ``W' y``, float64, from one read of ``W`` (numba, threaded over row blocks). With ``x = 0``
    and ``scale = 0`` it is the product ``W' base``.

    The alternating conditional means of :func:`databalance.variance_profile` are such steps: one
    pass gives a step and the product the next step needs."""
    m, l = W.shape
    d = x.shape[1]
    nt = min(threads(), max(1, W.size // PER_THREAD))
    nblocks = max(1, min(m, nt))
    y = np.empty((d, m))
    acc = np.empty((nblocks, d, l))
    with _using(nt):
        compiled(_chain_pass)(W, np.ascontiguousarray(x.T, np.float64), np.ascontiguousarray(base.T, np.float64),
                              np.ascontiguousarray(scale, np.float64), nblocks, y, acc)
    return y.T, acc.sum(axis=0).T


def _one_off_pass(table: np.ndarray) -> bool:
    """Whether a one-off numba pass (outside a kernel) may run over this dense table: numba wanted,
    not in a child forked after GNU OpenMP's threads ran, a table of native float32 or float64 of
    at least :data:`PER_THREAD` entries."""
    return (numba_wanted() and not _FORK_UNSAFE and table.ndim >= 2 and table.size >= PER_THREAD
            and table.dtype in (np.dtype(np.float32), np.dtype(np.float64)))


def line_extremes(table: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The maxima of the table's lines along ``axis`` (-1 or -2) and its minimum, from one threaded
    read: each float's bits as a signed integer ``b ^ ((b >> (w - 1)) & (2^(w - 1) - 1))`` order
    as the floats do (integer extremes vectorise; float ones, NaN-aware, do not: twice as quick as
    NumPy's max and min), so the values are NumPy's (a zero's sign aside: -0.0 ranks below +0.0),
    and a NaN of either sign lands above +inf or below -inf, so it shows in the extremes. None
    (nothing done) unless :func:`_one_off_pass` allows it and the lines are the contiguous ones."""
    if not _one_off_pass(table):
        return None
    if table.flags.c_contiguous and axis == -1:
        W = table.reshape((-1,) + table.shape[-2:])
    elif table.ndim == 2 and table.flags.f_contiguous and axis == -2:  # its columns are contiguous
        W = table.T[None]
    else:
        return None
    ints = np.dtype(f"i{table.dtype.itemsize}")
    width = 8 * table.dtype.itemsize
    shift, mask = ints.type(width - 1), ints.type(2 ** (width - 1) - 1)
    B, m, l = np.shape(W)
    nt = min(threads(), max(1, W.size // PER_THREAD))
    nblocks = max(1, min(m, -(-nt // B)))
    line, low = np.empty((B, m), ints), np.empty(B * nblocks, ints)
    with _using(nt):
        compiled(_key_extremes)(W.view(ints), shift, mask, nblocks, line, low)
    floats = (line ^ ((line >> shift) & mask)).view(table.dtype).reshape(table.shape[:-2] + (m,))
    least = low.min(keepdims=True)
    return floats, (least ^ ((least >> shift) & mask)).view(table.dtype)[0]


def scale_in_place(table: np.ndarray, u: np.ndarray, v: np.ndarray) -> bool | None:
    """``table *= u[..., :, None] * v[..., None, :]`` in place, each product rounded to the table's
    dtype in that order (as NumPy's two in-place products with float64 scalings round them), from
    one threaded read; whether every entry stayed finite. None (nothing done) unless
    :func:`_one_off_pass` allows it and the table's lines are contiguous."""
    if not _one_off_pass(table):
        return None
    if table.flags.c_contiguous:
        W, x, y, lead_first = table.reshape((-1,) + table.shape[-2:]), u, v, True
    elif table.ndim == 2 and table.flags.f_contiguous:  # its columns are the contiguous lines
        W, x, y, lead_first = table.T[None], v, u, False
    else:
        return None
    B, m, l = np.shape(W)
    nt = min(threads(), max(1, W.size // PER_THREAD))
    nblocks = max(1, min(m, -(-nt // B)))
    bad = np.empty(B * nblocks, np.int64)
    with _using(nt):
        compiled(_scale_in_place)(W, np.ascontiguousarray(np.broadcast_to(x, table.shape[:-2] + (m,)),
                                                          np.float64).reshape(B, m),
                                  np.ascontiguousarray(np.broadcast_to(y, table.shape[:-2] + (l,)),
                                                       np.float64).reshape(B, l), lead_first, nblocks, bad)
    return not bad.any()


# -- the kernels ------------------------------------------------------------------------------------------


@dataclass
class _Cache:
    """What the fused kernel keeps in the loop's state between calls: the rule (margin, relaxation)
    of the last rescale of the lead margin, and a pass's results waiting to be used."""

    margin: Any = None
    omega: Any = None
    sums: Any = None  # the lead margin's sums the pass returned
    scaling: Any = None  # the scaling the rule gives for them
    other: Any = None  # the other margin's sums with that scaling
    generation: int = 0  # the table's version (the log kernel's buffer is rewritten on a reset)
    ready: bool = False  # the scaling has been installed by rescale


class _Fused:
    """The fused sums/rescale logic; a subclass provides ``lead`` and ``_pass``."""

    lead: int
    reads: int
    generation: int

    def _pass(self, x, old, p, omega) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def sums(self, j, state):
        cache = state.cache if isinstance(state.cache, _Cache) else None
        if cache is not None and cache.generation == self.generation:
            if j != self.lead and cache.ready and state.factors[self.lead] is cache.scaling:
                return cache.other
            if j == self.lead and cache.margin is not None:
                m = cache.margin
                r, u, c = self._pass(state.factors[1 - j], state.factors[j], m.target, cache.omega)
                self.reads += 1
                state.cache = _Cache(m, cache.omega, r, u, c, self.generation)
                return r
        if state.steps == 0:
            return self._initial_sums(j, state)
        self.reads += 1
        return super().sums(j, state)  # type: ignore[misc]

    def _initial_sums(self, j, state):
        """The sums at the starting scalings (equal, a power of two per problem): the frame's sums
        times that power of two, with no pass over the table."""
        other = state.factors[1 - j]
        return self.frame_sums[j] * other[..., :1]  # type: ignore[attr-defined]

    def rescale(self, j, margin, sums, state):
        return self.relaxed_rescale(j, margin, sums, state, None)

    def relaxed_rescale(self, j, margin, sums, state, omega):
        """``rescale`` with the scaling over-relaxed by ``omega`` (None: plain)."""
        cache = state.cache if isinstance(state.cache, _Cache) else None
        if j != self.lead:
            new = relaxed_ratio(state.factors[j], margin.target, sums, margin.zero, omega)
            return self._install(j, margin, new, sums, state)
        if (cache is not None and cache.sums is sums and cache.margin is margin and cache.omega is omega
                and cache.generation == self.generation):
            new = cache.scaling
        else:
            new = relaxed_ratio(state.factors[j], margin.target, sums, margin.zero, omega)
            cache = _Cache(margin, omega, generation=self.generation)
        out = self._install(j, margin, new, sums, state)
        cache.ready = state.factors[j] is new  # not after the log kernel moved its frame
        cache.generation = self.generation
        state.cache = cache
        return out

    def _install(self, j, margin, new, sums, state):
        state.factors[j] = new
        return sums


class _DenseFused(_Fused):
    """The numba passes and products of a dense table (or the log kernel's buffer), threaded over
    blocks of lead lines. Every product goes through numba, none through BLAS: on a machine with
    few cores, a parallel region that starts while BLAS's threads still spin after a product runs
    up to twice as slow (benchmarks/RESULTS.md)."""

    table: np.ndarray
    dtype: np.dtype
    batch: tuple
    shape: tuple

    @cached_property
    def _work(self) -> np.ndarray:
        """The table as (problems, lead lines, other lines), C-contiguous: a view."""
        t = self.table if self.lead == 0 else np.swapaxes(self.table, -1, -2)
        return t.reshape((-1,) + t.shape[-2:])

    def _blocks(self) -> tuple[int, int]:
        """(threads, row blocks per problem) for a pass over the table."""
        T = self._work
        nt = min(threads(), max(1, T.size // PER_THREAD))
        return nt, max(1, min(T.shape[1], -(-nt // T.shape[0])))

    def _pass(self, x, old, p, omega):
        T = self._work
        B, m, l = T.shape
        nt, nblocks = self._blocks()
        lead_shape = self.batch + (m,)
        r = np.empty((B, m), self.dtype)
        u = np.empty((B, m), self.dtype)
        acc = np.empty((B * nblocks, l))
        w = np.broadcast_to(np.float64(1.0) if omega is None else np.asarray(omega, np.float64)[..., 0],
                            self.batch).reshape(B)
        with _using(nt):
            compiled(_dense_pass)(T, np.ascontiguousarray(x).reshape(B, l), np.ascontiguousarray(old).reshape(B, m),
                                  np.ascontiguousarray(np.broadcast_to(p, lead_shape)).reshape(B, m),
                                  np.ascontiguousarray(w), nblocks, self.dtype.type(0), r, u, acc)
        return r.reshape(lead_shape), u.reshape(lead_shape), self._added(acc, nblocks)

    def _added(self, acc: np.ndarray, nblocks: int) -> np.ndarray:
        """The blocks' column accumulators added up (here, not in a second parallel region: waking
        the threads again costs more than adding a few vectors), in the table's dtype."""
        B, l = self._work.shape[0], self._work.shape[2]
        return acc.reshape(B, nblocks, l).sum(axis=1).astype(self.dtype, copy=False).reshape(self.batch + (l,))

    def _products(self, lead: bool, x: np.ndarray) -> np.ndarray:
        """The sums of the lead lines (``lead``) or of the other lines, with ``x`` scaling the
        other (or the lead) lines."""
        T = self._work
        B, m, l = T.shape
        nt, nblocks = self._blocks()
        x = np.ascontiguousarray(np.broadcast_to(x, self.batch + (l if lead else m,)), self.dtype).reshape(B, -1)
        with _using(nt):
            if lead:
                r = np.empty((B, m), self.dtype)
                compiled(_lead_products)(T, x, nblocks, self.dtype.type(0), r)
                return r.reshape(self.batch + (m,))
            acc = np.empty((B * nblocks, l))
            compiled(_other_products)(T, x, nblocks, acc)
        return self._added(acc, nblocks)

    def float64_sums(self, scalings) -> list[np.ndarray]:
        """Row and column sums, accumulated in float64, of the table that ``scalings = (u, v)``
        give (each product rounded as :func:`~databalance._kernels.scaled_table` rounds it), from
        one read."""
        T = self._work
        B, m, l = T.shape
        nt, nblocks = self._blocks()
        u, v = (np.broadcast_to(s, self.batch + (n,)) for s, n in zip(scalings, self.shape, strict=True))
        x, y = (u, v) if self.lead == 0 else (v, u)  # the lead lines' scaling, the other's
        r = np.empty((B, m))
        acc = np.empty((B * nblocks, l))
        with _using(nt):
            compiled(_rounded_sums)(T, np.ascontiguousarray(x).reshape(B, m), np.ascontiguousarray(y).reshape(B, l),
                                    self.lead == 0, nblocks, r, acc)
        lead_sums = r.reshape(self.batch + (m,))
        other_sums = acc.reshape(B, nblocks, l).sum(axis=1).reshape(self.batch + (l,))
        return [lead_sums, other_sums] if self.lead == 0 else [other_sums, lead_sums]

    def row_sums(self, v):
        return self._products(self.lead == 0, v)

    def col_sums(self, u):
        return self._products(self.lead == 1, u)


class FusedDenseKernel(_DenseFused, DenseKernel):
    """:class:`DenseKernel` whose sweeps read the table once (numba, threaded over row blocks)."""

    def __init__(self, table, lowest: float = 0.0):
        super().__init__(table, lowest)
        self.lead = _lead(table) or 0
        self.reads = 0
        self.generation = 0

    @cached_property
    def frame_sums(self) -> list[np.ndarray]:
        """Row and column sums of the table as stored, from one read (a block of rows at a time)."""
        if self.lead == 1:
            return DenseKernel.frame_sums.func(self)  # type: ignore[attr-defined]
        rows = np.empty(self.batch + self.shape[:1], self.dtype)
        cols = np.zeros(self.batch + self.shape[1:], self.dtype)
        step = max(1, CHUNK // max(1, self.shape[1]))
        for i in range(0, self.shape[0], step):
            block = self.table[..., i:i + step, :]
            rows[..., i:i + step] = block.sum(axis=-1)
            cols += block.sum(axis=-2)
        return [rows, cols]


class FusedLogKernel(_DenseFused, LogKernel):
    """:class:`LogKernel` with fused sweeps; the exponentiation computes the frame's sums (and the
    input's) while each block of the buffer is in cache, so the first half-step needs no pass."""

    def __init__(self, logits: np.ndarray, first: int, has_zeros: bool = True, line_max: np.ndarray | None = None):
        self.reads = 0
        self.generation = 0
        self._first_sums: list[np.ndarray] | None = None
        self._weighted: np.ndarray | None = None
        super().__init__(logits, first, has_zeros, line_max)
        self.lead = _lead(self.table) or 0

    def _exponentiate(self, frame):
        """``exp(L + f + g)`` a block of rows at a time, the sum as :func:`add_potentials` computes it
        (in float64 by numba, or one addition in the buffer's dtype), the exp in the buffer's dtype
        while the block is in cache (float32: :func:`_exp_rows`, with the addition; float64: NumPy's);
        the first call also takes the buffer's line sums and the input's weighted lines that
        :meth:`input_sums` needs from each block, in float64."""
        self.generation += 1
        L, out = self.logits, self.table
        first = self._first_sums is None
        if first:
            rows, wrows = np.empty(L.shape[:-1]), np.empty(L.shape[:-1])
            with np.errstate(over="ignore", under="ignore"):
                shift = self.centre.min(axis=-1, keepdims=True)
                weights = np.exp(shift - self.centre).astype(self.dtype).astype(np.float64)
            # first == 0: the rows' potentials are undone in the column sums, and vice versa
            along = self.first == 1
        f, g = (np.ascontiguousarray(x, np.float64) for x in frame)
        add, sums = compiled(_potential_sum, parallel=False, exact=True), compiled(_line_sums, parallel=False)
        single = one_addend(L, f, g, self.dtype)  # the first exponentiation: one addition
        m, l = L.shape[-2:]
        # float32 with contiguous rows: the sum (of float32 addends, or of float64 potentials) and
        # the exponential in one numba pass; else NumPy's exp after the sum
        rows_contiguous = L.strides[-1] == L.itemsize and out.strides[-1] == out.itemsize
        exp32 = None
        if self.dtype == np.float32 and rows_contiguous:
            exp32 = compiled(_exp_rows, parallel=False, exact=True)
        a, c = cast(np.ndarray, f), cast(np.ndarray, g)  # the addends: float64, or float32 below
        if exp32 is not None and single is not None:
            zeros = np.zeros(L.shape[:-2] + (max(m, l),), np.float32)
            a, c = (single[0], zeros[..., :l]) if single[1] == -1 else (zeros[..., :m], single[0])
        # up to numba's thread count (the calling thread and the library's pool, which holds at
        # most four), the compiled parts and NumPy's exp releasing the GIL: the exponentiation is
        # not left to one core. Rows are written in place; each group adds up its own column sums.
        chunks = list(row_chunks(L))
        nt = max(1, min(threads(), L.size // PER_THREAD, len(chunks)))
        groups = [chunks[i * len(chunks) // nt:(i + 1) * len(chunks) // nt] for i in range(nt)]
        cols = np.zeros((2 * nt,) + L.shape[:-2] + L.shape[-1:]) if first else None

        def exponentiate(t: int) -> None:
            bits = np.empty(2 * l, np.int32)
            with np.errstate(over="ignore", under="ignore"):
                for b, r in groups[t]:
                    stop = min(r.stop, m)
                    if exp32 is not None:
                        exp32(L[b], a[b], c[b], r.start, stop, out[b], bits)
                    else:
                        if single is None:
                            add(L[b], f[b], g[b], r.start, stop, out[b])
                        else:
                            np.add(L[b][r], addend_rows(single, b, r), out=out[b][r])
                        np.exp(out[b][r], out=out[b][r])
                    if cols is not None:
                        sums(out[b], r.start, stop, weights[b], along, rows[b], cols[2 * t][b],
                             wrows[b] if along else cols[2 * t + 1][b])

        jobs = [parallel(exponentiate, t) for t in range(1, nt)]
        exponentiate(0)
        for job in jobs:
            job.result()
        if cols is not None:
            self._first_sums = [rows.astype(self.dtype), cols[0::2].sum(axis=0).astype(self.dtype)]
            self._weighted = cols[1::2].sum(axis=0) if self.first == 0 else wrows

    @cached_property
    def frame_sums(self) -> list[np.ndarray]:
        assert self._first_sums is not None
        return self._first_sums

    def input_sums(self):
        """As :meth:`LogKernel.input_sums`, with the weighted sums the exponentiation computed."""
        r, c = self.frame_sums
        pot = self.centre
        assert self._weighted is not None
        with np.errstate(over="ignore", under="ignore", divide="ignore"):
            shift = pot.min(axis=-1, keepdims=True)
            if self.first == 0:
                return [np.exp(np.log(r) - pot), np.exp(np.log(self._weighted) - shift)]
            return [np.exp(np.log(self._weighted) - shift), np.exp(np.log(c) - pot)]

    _install = LogKernel._install  # the safeguards, with the fused pass's scaling
