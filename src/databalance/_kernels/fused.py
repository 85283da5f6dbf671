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
from .dense import DenseKernel, ratio
from .log import CHUNK, LogKernel, row_chunks
from .sparse import SparseKernel

#: The environment variable that chooses the kernel: ``auto`` (numba for large tables when it is
#: installed), ``numpy`` (never numba) or ``numba`` (always, for every supported table).
ENV = "DATABALANCE_KERNEL"

#: ``auto`` uses numba for tables with at least this many entries (nonzeros when sparse): below it
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
    ``MIN_SIZE`` (65 536) entries when numba is installed; for sparse tables it follows the
    measurements recorded in benchmarks/RESULTS.md.

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


def log_kernel(logits: np.ndarray, first: int, has_zeros: bool = True) -> LogKernel:
    """The log kernel of validated logits: fused when :func:`which_kernel` chooses numba."""
    cls = FusedLogKernel if which_kernel(logits) == "numba" else LogKernel
    return cls(logits, first, has_zeros)


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


def _dense_pass(T, v, uold, p, omega, nblocks, zero, r, u, acc):
    """One fused pass over ``T`` (B, m, l): ``r = T v``, ``u = rule(p, r)``, ``acc[q] = T' u``
    over row block q of problem ``q // nblocks``.

    Rows go sixteen at a time: their sums four at a time (four streams from memory keep more loads
    in flight than one), then their contributions to the column sums eight at a time while the
    sixteen rows are in cache (one update of the accumulator per eight rows). Row sums accumulate
    in the table's dtype (``zero``), as BLAS does; the column accumulators are float64.
    """
    B, m, l = T.shape
    for q in prange(B * nblocks):  # numba.prange when compiled
        b = q // nblocks
        t = q % nblocks
        lo = t * m // nblocks
        hi = (t + 1) * m // nblocks
        a = acc[q]
        for j in range(l):
            a[j] = 0.0
        w = omega[b]
        vb = v[b]
        Tb = T[b]
        i = lo
        while i + 16 <= hi:
            for g in range(i, i + 16, 4):
                s0 = zero
                s1 = zero
                s2 = zero
                s3 = zero
                for j in range(l):
                    vj = vb[j]
                    s0 += Tb[g, j] * vj
                    s1 += Tb[g + 1, j] * vj
                    s2 += Tb[g + 2, j] * vj
                    s3 += Tb[g + 3, j] * vj
                r[b, g] = s0
                r[b, g + 1] = s1
                r[b, g + 2] = s2
                r[b, g + 3] = s3
                u[b, g] = _rule(p[b, g], s0, uold[b, g], w)
                u[b, g + 1] = _rule(p[b, g + 1], s1, uold[b, g + 1], w)
                u[b, g + 2] = _rule(p[b, g + 2], s2, uold[b, g + 2], w)
                u[b, g + 3] = _rule(p[b, g + 3], s3, uold[b, g + 3], w)
            for g in range(i, i + 16, 8):
                u0 = u[b, g]
                u1 = u[b, g + 1]
                u2 = u[b, g + 2]
                u3 = u[b, g + 3]
                u4 = u[b, g + 4]
                u5 = u[b, g + 5]
                u6 = u[b, g + 6]
                u7 = u[b, g + 7]
                for j in range(l):
                    a[j] += ((Tb[g, j] * u0 + Tb[g + 1, j] * u1 + Tb[g + 2, j] * u2 + Tb[g + 3, j] * u3)
                             + (Tb[g + 4, j] * u4 + Tb[g + 5, j] * u5 + Tb[g + 6, j] * u6 + Tb[g + 7, j] * u7))
            i += 16
        while i < hi:
            s = zero
            for j in range(l):
                s += Tb[i, j] * vb[j]
            r[b, i] = s
            u[b, i] = _rule(p[b, i], s, uold[b, i], w)
            ui = u[b, i]  # as stored (float32 tables store float32 scalings)
            if ui != 0.0:
                for j in range(l):
                    a[j] += Tb[i, j] * ui
            i += 1


@cache
def compiled(func):
    """The numba-compiled form of a pass (numba imported here, once). Before compiling, the pass's
    module gets numba's ``prange`` and the compiled :func:`_rule` under the names it calls."""
    import numba

    namespace = func.__globals__
    namespace["prange"] = numba.prange
    if "_rule" in namespace:
        namespace["_rule"] = _jitted_rule()
    return numba.njit(func, parallel=True, cache=True, fastmath=set(FASTMATH))


#: reassoc/contract let LLVM vectorise the sums (a sum in another order: the results differ from
#: BLAS by rounding only); no nnan/ninf, so -inf and inf keep their IEEE meaning.
FASTMATH = frozenset({"reassoc", "contract", "nsz"})


@cache
def _jitted_rule():
    import numba

    return numba.njit(_rule_py, cache=True, fastmath=set(FASTMATH))


_rule_py = _rule


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


class FusedDenseKernel(_Fused, DenseKernel):
    """:class:`DenseKernel` whose sweeps read the table once (numba, threaded over row blocks)."""

    def __init__(self, table, lowest: float = 0.0):
        super().__init__(table, lowest)
        self.lead = _lead(table) or 0
        self.reads = 0
        self.generation = 0

    @cached_property
    def _work(self) -> np.ndarray:
        """The table as (problems, lead lines, other lines), C-contiguous: a view."""
        t = self.table if self.lead == 0 else np.swapaxes(self.table, -1, -2)
        return t.reshape((-1,) + t.shape[-2:])

    def _pass(self, x, old, p, omega):
        T = self._work
        B, m, l = T.shape
        nt = min(threads(), max(1, T.size // PER_THREAD))
        nblocks = max(1, min(m, -(-nt // B)))
        lead_shape = self.batch + (m,)
        r = np.empty((B, m), self.dtype)
        u = np.empty((B, m), self.dtype)
        acc = np.empty((B * nblocks, l))
        zero = self.dtype.type(0)
        w = np.broadcast_to(np.float64(1.0) if omega is None else np.asarray(omega, np.float64)[..., 0],
                            self.batch).reshape(B)
        with _using(nt):
            compiled(_dense_pass)(T, np.ascontiguousarray(x).reshape(B, l),
                                     np.ascontiguousarray(old).reshape(B, m),
                                     np.ascontiguousarray(np.broadcast_to(p, lead_shape)).reshape(B, m),
                                     np.ascontiguousarray(w), nblocks, zero, r, u, acc)
        # the blocks' accumulators added up here, not in a second parallel region: waking the
        # threads again costs more than adding a few vectors
        c = acc.reshape(B, nblocks, l).sum(axis=1).astype(self.dtype, copy=False)
        return (r.reshape(lead_shape), u.reshape(lead_shape), c.reshape(self.batch + (l,)))

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


class FusedLogKernel(_Fused, LogKernel):
    """:class:`LogKernel` with fused sweeps; the exponentiation computes the frame's sums (and the
    input's) while each block of the buffer is in cache, so the first half-step needs no pass."""

    def __init__(self, logits: np.ndarray, first: int, has_zeros: bool = True):
        self.reads = 0
        self.generation = 0
        self._first_sums: list[np.ndarray] | None = None
        self._weighted: np.ndarray | None = None
        super().__init__(logits, first, has_zeros)
        self.lead = _lead(self.table) or 0

    def _exponentiate(self, frame):
        """``exp(L + f + g)`` a block of rows at a time (float64, as :func:`add_potentials`), with the
        buffer's row and column sums from the block in cache; the first call also sums the input's
        weighted lines that :meth:`input_sums` needs."""
        self.generation += 1
        L, out = self.logits, self.table
        first = self._first_sums is None
        rows = np.empty(L.shape[:-1])
        cols = np.zeros(L.shape[:-2] + L.shape[-1:])
        weighted = None
        if first:
            with np.errstate(over="ignore", under="ignore"):
                shift = self.centre.min(axis=-1, keepdims=True)
                weights = np.exp(shift - self.centre).astype(self.dtype).astype(np.float64)
            # first == 0: the rows' potentials are undone in the column sums, and vice versa
            weighted = np.zeros(L.shape[:-2] + (L.shape[-1] if self.first == 0 else L.shape[-2],))
        f, g = frame
        for b, r in row_chunks(L):
            t = L[b][r].astype(np.float64)
            t += f[b][r, None]
            t += g[b][None, :]
            np.exp(t, out=t)
            out[b][r] = t
            if self.dtype != np.float64:
                t = out[b][r].astype(np.float64)
            if first:
                rows[b][r] = t.sum(axis=-1)
                cols[b] += t.sum(axis=-2)
                if self.first == 0:
                    weighted[b] += weights[b][r] @ t  # type: ignore[index]
                else:
                    weighted[b][r] = t @ weights[b]  # type: ignore[index]
        if first:
            self._first_sums = [rows.astype(self.dtype), cols.astype(self.dtype)]
            self._weighted = weighted

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

    _work = FusedDenseKernel.__dict__["_work"]
    _pass = FusedDenseKernel._pass

    _install = LogKernel._install  # the safeguards, with the fused pass's scaling
