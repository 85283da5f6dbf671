"""Iterative marginal rebalancing (IPF, raking, Sinkhorn-Knopp) of dense, sparse and log tables.

One algorithm, :func:`_half_steps`, serves every representation. It works on scaling vectors
``u, v`` (the balanced table is ``diag(u) K diag(v)``) and asks a *kernel* for the two products it
needs, ``K @ v`` and ``K.T @ u``. Half-step k divides the target by the current row (odd k, with
``start="x"``) or column sums; the product computed right after it is both the input of the next
half-step and the other marginal's error, so a sweep costs exactly two matrix-vector products.

Kernels:

* :class:`_Scaling` -- a dense (optionally batched) array or a scipy.sparse matrix, used as is.
* :class:`_LogScaling` -- logits ``L``. It keeps potentials ``f, g`` and the exponentiated kernel
  ``exp(L + f + g)`` (one table-sized buffer, computed once). Steps are plain scaling steps on that
  kernel; when a scaling leaves ``[1/tau, tau]`` it is absorbed into the potentials and the kernel is
  re-exponentiated, and when a row (column) sum has underflowed an exact log-sum-exp step is taken.
  Both are rare: logits within a few hundred of each other in float64 need neither.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import cache, cached_property
from typing import Any, Callable, Iterator

import numpy as np
import scipy.sparse as sp

from . import _feasibility
from . import _validation as check
from ._errors import ConvergenceWarning, InfeasibleError

__all__ = [
    "BalanceResult",
    "ConvergenceWarning",
    "LogBalanceResult",
    "balance_logits",
    "balance_table",
    "iterate_balance",
]

#: A run is stalled when its smallest marginal error, last improved at half-step k_best, has not
#: improved for max(STALL_PATIENCE, k_best) half-steps (progress can come in widening stairs).
STALL_PATIENCE = 200


@dataclass(frozen=True, eq=False, kw_only=True)
class _Outcome:
    """What both result classes share: the run's length and status, the marginal errors of every
    iterate, and what derives from them."""

    steps: int
    status: str
    marginal_error: np.ndarray = field(repr=False)
    _input: Any = field(default=None, repr=False)
    _deficit: Callable[[], Any] = field(default=lambda: None, repr=False)

    @property
    def converged(self) -> bool:
        return self.status == "converged"

    @cached_property
    def feasible(self) -> bool:
        """Whether the fully balanced table exists (a max-flow on the support, run once if needed)."""
        return self._deficit() is None


@dataclass(frozen=True, eq=False)
class BalanceResult(_Outcome):
    """The outcome of :func:`balance_table` (also yielded by :func:`iterate_balance`).

    Attributes
    ----------
    row_scaling, col_scaling : ndarray
        ``u`` and ``v`` with ``table == diag(u) @ input @ diag(v)`` (leading batch axes first).
    steps : int
        Half-steps performed (k in the paper's notation; a sweep is two half-steps).
    status : str
        ``"completed"`` (``steps=k`` was requested and run), ``"converged"`` (every marginal within
        ``tol``), ``"max_steps"`` (budget exhausted) or ``"stalled"`` (the marginal error stopped
        decreasing, e.g. because ``tol`` is below what the floating-point sums resolve).
    marginal_error : ndarray, shape (..., steps + 1, 2)
        L1 distance of the row (``[..., k, 0]``) and column (``[..., k, 1]``) sums of iterate k from
        the targets, divided by the target total; ``k = 0`` is the input.
    feasible : bool
        Whether the fully balanced table exists (the zero pattern can carry the targets). Known
        without extra work after ``steps=None``; after ``steps=k`` it is computed (a max-flow on
        the support) when first read.
    """

    row_scaling: np.ndarray
    col_scaling: np.ndarray

    @cached_property
    def table(self):
        """The balanced table ``diag(u) @ input @ diag(v)``; sparse input gives sparse output."""
        return _scale(self._input, self.row_scaling, self.col_scaling)


@dataclass(frozen=True, eq=False)
class LogBalanceResult(_Outcome):
    """The outcome of :func:`balance_logits`.

    Attributes
    ----------
    row_potential, col_potential : ndarray
        ``f`` and ``g`` with ``log_table == f[..., :, None] + logits + g[..., None, :]``.
    steps, status, marginal_error, feasible
        As in :class:`BalanceResult`.
    """

    row_potential: np.ndarray
    col_potential: np.ndarray

    @cached_property
    def log_table(self) -> np.ndarray:
        """The log of the balanced table; -inf entries of the logits stay -inf."""
        return _add_potentials(self._input, self.row_potential, self.col_potential,
                               out=np.empty_like(self._input))

    @cached_property
    def table(self) -> np.ndarray:
        """``exp(log_table)``, exponentiated in one pass."""
        return _add_potentials(self._input, self.row_potential, self.col_potential,
                               out=np.empty_like(self._input), fn=np.exp)


def _scale(table, u, v):
    if not sp.issparse(table):
        out = np.multiply(table, u[..., :, None])
        out *= v[..., None, :]
        return out
    if table.format == "csc":
        idx = table.indices
        data = table.data * v.repeat(np.diff(table.indptr)) * u[idx]
    else:
        idx = table.indices
        data = table.data * u.repeat(np.diff(table.indptr)) * v[idx]
    return type(table)((data, idx.copy(), table.indptr.copy()), shape=table.shape)


def _ratio(p: np.ndarray, s: np.ndarray, zero) -> np.ndarray:
    """p / s, with 0 on the lines whose target is 0 (``zero`` indexes them; they are emptied).

    Lines with a positive target always have positive sums (checked before iterating), so only
    the zero-target lines can divide 0 by 0."""
    if zero is None:
        return p / s
    with np.errstate(divide="ignore", invalid="ignore"):
        out = p / s
    out[zero] = 0
    return out


class _Scaling:
    """A nonnegative table used as is: dense (``..., m, l``) or 2-D scipy.sparse."""

    def __init__(self, table, lowest: float = 0.0):
        self.table = table
        self.lowest = lowest
        self.dtype = table.dtype
        self.shape = table.shape[-2:]
        self.batch = table.shape[:-2]

    @classmethod
    def from_input(cls, table) -> _Scaling:
        if sp.issparse(table):
            if table.ndim != 2:
                raise ValueError(f"`table` must be 2-D; got shape {table.shape}.")
            dtype = check.working_dtype(table.dtype, "table")
            kernel = table if table.format in ("csr", "csc") else table.tocsr()
            kernel = kernel.astype(dtype, copy=False)
            check.sparse_entries(kernel)
            return cls(kernel)
        arr = check.dense_array(table, "table", min_ndim=2)
        arr = arr.astype(check.working_dtype(arr.dtype, "table"), copy=False)
        return cls(arr, check.nonnegative(arr, "table"))

    def row_sums(self, v):
        if sp.issparse(self.table) or self.table.ndim == 2:
            return self.table @ v
        return np.matmul(self.table, v[..., None])[..., 0]

    def col_sums(self, u):
        if sp.issparse(self.table) or self.table.ndim == 2:
            return self.table.T @ u
        return np.matmul(self.table.swapaxes(-1, -2), u[..., None])[..., 0]

    @cached_property
    def frame_sums(self) -> tuple[np.ndarray, np.ndarray]:
        """Row and column sums of the kernel as stored."""
        return (self.row_sums(np.ones(self.batch + self.shape[1:], self.dtype)),
                self.col_sums(np.ones(self.batch + self.shape[:1], self.dtype)))

    @property
    def input_sums(self) -> tuple[np.ndarray, np.ndarray]:
        """Row and column sums of the input table (here the kernel itself)."""
        return self.frame_sums

    def start(self):
        """Sums in the kernel's frame (for the first step) and the input's own sums (for errors)."""
        return self.frame_sums + self.input_sums

    def nonempty(self, axis: int, within: np.ndarray | None = None) -> np.ndarray:
        """Rows (axis=-1) or columns (axis=-2) with mass, counting only the ``within`` lines."""
        if within is None:
            return self.input_sums[0 if axis == -1 else 1] > 0
        w = within.astype(self.dtype)
        return (self.row_sums(w) if axis == -1 else self.col_sums(w)) > 0

    def full_support(self) -> bool:
        if sp.issparse(self.table):
            return self.table.count_nonzero() == self.shape[0] * self.shape[1]
        return self.lowest > 0

    def pattern(self, b: tuple):
        return _feasibility.support_pattern(self.table if sp.issparse(self.table) else self.table[b])

    def support_size(self) -> int:
        return self.table.nnz if sp.issparse(self.table) else self.table.size

    def step(self, axis, p, s, other, zero):
        """Rescale the rows (axis=-1) or columns to the target ``p`` given their sums ``s``.

        Returns the new scaling of that side, the other side's scaling and the line sums in the
        kernel's frame (a kernel may move its frame, as the log kernel does)."""
        return _ratio(p, s, zero), other, s

    def export(self, u, v):
        return u, v

    def initial(self):
        """The exported scalings of the input itself (iterate 0)."""
        return (np.ones(self.batch + self.shape[:1], self.dtype),
                np.ones(self.batch + self.shape[1:], self.dtype))


class _LogScaling(_Scaling):
    """Logits ``L`` (-inf = structural zero), balanced through a stabilised scaling kernel."""

    def __init__(self, logits: np.ndarray, start: str, has_zeros: bool = True):
        self.logits = logits
        self.has_zeros = has_zeros
        self.dtype = logits.dtype
        self.shape = logits.shape[-2:]
        self.batch = logits.shape[:-2]
        self.tiny, self.tau = (1e-100, 1e50) if self.dtype == np.float64 else (1e-15, 1e8)
        # Centre the side that the first step rescales (its old scaling is never used), so that the
        # other side's potential is exactly 0 and the first step acts on exp(L) itself.
        axis = -1 if start == "x" else -2
        centre = _finite_max(logits, axis)
        zero = np.zeros(self.batch + (self.shape[1] if start == "x" else self.shape[0],))
        self.f, self.g = (-centre, zero) if start == "x" else (zero, -centre)
        self.table = np.empty_like(logits)
        self._exponentiate()

    def _exponentiate(self):
        _add_potentials(self.logits, self.f, self.g, out=self.table, fn=np.exp)

    @cached_property
    def input_sums(self):
        """Row and column sums of exp(L) in float64 (inf where they overflow)."""
        r, c = self.frame_sums
        # One of f, g is 0; undo the other in log space, shifting by its min so that the weights
        # cannot overflow (sums that overflow float64 are reported as inf).
        with np.errstate(over="ignore", under="ignore", divide="ignore"):
            if np.any(self.f != 0):
                shift = self.f.min(axis=-1, keepdims=True)
                c = np.exp(np.log(self.col_sums(np.exp(shift - self.f).astype(self.dtype))) - shift)
                r = np.exp(np.log(r) - self.f)
            else:
                shift = self.g.min(axis=-1, keepdims=True)
                r = np.exp(np.log(self.row_sums(np.exp(shift - self.g).astype(self.dtype))) - shift)
                c = np.exp(np.log(c) - self.g)
        return r, c

    def nonempty(self, axis, within=None):
        if not self.has_zeros:
            lines = self.shape[0] if axis == -1 else self.shape[1]
            full = np.ones(self.batch + (lines,), dtype=bool)
            return full if within is None else full & within.any(axis=-1, keepdims=True)
        support = self.logits > -np.inf
        if within is not None:
            support = support & (within[..., None, :] if axis == -1 else within[..., :, None])
        return support.any(axis=axis)

    def full_support(self) -> bool:
        return not self.has_zeros

    def pattern(self, b):
        return _feasibility.support_pattern(self.logits[b] > -np.inf)

    def support_size(self) -> int:
        return self.logits.size

    def step(self, axis, p, s, other, zero):
        with np.errstate(divide="ignore"):
            if np.min(s, where=p > 0, initial=np.inf) < self.tiny:
                return self._exact_step(axis, p, other)
            new = _ratio(p, s, zero)
            if self._out_of_range(new, p > 0) or self._out_of_range(other, other > 0):
                mine_pot, other_pot = self._pots(axis)
                self._set_pots(axis, mine_pot + np.log(new), other_pot + np.log(other))
                self._exponentiate()
                return np.ones_like(new), np.ones_like(other), new * s
            return new, other, s

    def _out_of_range(self, x, where) -> bool:
        return x.max(initial=0) > self.tau or np.min(x, where=where, initial=np.inf) < 1 / self.tau

    def _pots(self, axis):
        return (self.f, self.g) if axis == -1 else (self.g, self.f)

    def _set_pots(self, axis, mine, other):
        self.f, self.g = (mine, other) if axis == -1 else (other, mine)

    def _exact_step(self, axis, p, other):
        """One log-sum-exp half-step, then the kernel is rebuilt on the new potentials."""
        _, other_pot = self._pots(axis)
        other_pot = other_pot + np.log(other)
        lines = self.logits if axis == -1 else self.logits.swapaxes(-1, -2)
        lse = _logsumexp_rows(lines, other_pot)
        self._set_pots(axis, np.where(p > 0, np.log(p.astype(np.float64)) - lse, -np.inf), other_pot)
        self._exponentiate()
        return np.ones_like(p), np.ones_like(other), p.copy()

    def export(self, u, v):
        with np.errstate(divide="ignore"):
            return self.f + np.log(u), self.g + np.log(v)

    def initial(self):
        return np.zeros(self.batch + self.shape[:1]), np.zeros(self.batch + self.shape[1:])


def _finite_max(a: np.ndarray, axis: int) -> np.ndarray:
    """Max along an axis in float64, with 0 for lines that are entirely -inf."""
    peak = a.max(axis=axis).astype(np.float64)
    peak[np.isneginf(peak)] = 0.0
    return peak


#: Elements per chunk when logits are combined with potentials in float64.
_CHUNK = 1 << 18


def _row_chunks(L: np.ndarray):
    """(batch index, row slice) pairs covering ``L[..., :, :]`` in chunks of about _CHUNK elements."""
    step = max(1, _CHUNK // max(1, L.shape[-1]))
    for b in np.ndindex(*L.shape[:-2]):
        for i in range(0, L.shape[-2], step):
            yield b, slice(i, i + step)


def _add_potentials(L, f, g, *, out, fn=None):
    """``out = fn(L + f[..., :, None] + g[..., None, :])``, summed in float64 chunk by chunk.

    float32 logits of size 1e4 carry potentials of size 1e4 that cancel them; summing in float32
    would lose ~1e-3 of every entry before the cancellation. Rounding happens once, at the end.
    """
    for b, rows in _row_chunks(L):
        t = L[b][rows].astype(np.float64)
        t += f[b][rows, None]
        t += g[b][None, :]
        if fn is not None:
            fn(t, out=t)
        out[b][rows] = t
    return out


def _logsumexp_rows(L, g) -> np.ndarray:
    """``log(sum_j exp(L[..., i, j] + g[..., j]))`` in float64; -inf for lines with no mass."""
    out = np.empty(L.shape[:-1])
    for b, rows in _row_chunks(L):
        t = L[b][rows].astype(np.float64)
        t += g[b][None, :]
        peak = _finite_max(t, -1)
        t -= peak[:, None]
        np.exp(t, out=t)
        with np.errstate(divide="ignore"):
            out[b][rows] = np.log(t.sum(axis=-1)) + peak
    return out


def _l1(scaling, sums, p, total, scratch=None):
    """L1 distance of the line sums ``scaling * sums`` from ``p``, relative to the total.

    ``scratch`` (never handed out) avoids allocating, and page-faulting, a vector per step.
    """
    d = np.multiply(scaling, sums, out=scratch)
    d -= p
    np.abs(d, out=d)
    return d.sum(axis=-1, dtype=np.float64) / total


def _half_steps(kernel, p_x, p_y, total, start) -> Iterator[tuple[int, tuple, np.ndarray, np.ndarray]]:
    """Yield (k, scalings, row error, column error) for k = 0, 1, 2, ... half-steps.

    The marginal a step fixes is exact by construction (one rounding per entry, from p / s * s);
    its error is recorded as 0 rather than paid for with a pass over the vectors. The other
    marginal's error comes from the product that the next step needs anyway.
    """
    zero_x = None if (p_x > 0).all() else np.nonzero(p_x == 0)
    zero_y = None if (p_y > 0).all() else np.nonzero(p_y == 0)
    r, c, r0, c0 = kernel.start()
    u = np.ones(kernel.batch + kernel.shape[:1], kernel.dtype)
    v = np.ones(kernel.batch + kernel.shape[1:], kernel.dtype)
    exact = np.zeros(kernel.batch)
    scratch_x, scratch_y = np.empty_like(u), np.empty_like(v)
    yield 0, None, _l1(1.0, r0, p_x, total), _l1(1.0, c0, p_y, total)
    x_turn = start == "x"
    k = 0
    while True:
        k += 1
        if x_turn:
            u, v, r = kernel.step(-1, p_x, r, v, zero_x)
            c = kernel.col_sums(u)
            yield k, kernel.export(u, v), exact, _l1(v, c, p_y, total, scratch_y)
        else:
            v, u, c = kernel.step(-2, p_y, c, u, zero_y)
            r = kernel.row_sums(v)
            yield k, kernel.export(u, v), _l1(u, r, p_x, total, scratch_x), exact
        x_turn = not x_turn


def _setup(kernel, p_x, p_y, *, start, steps):
    """Validate the targets against the table; return (p_x, p_y, total, deficit).

    ``deficit()`` runs the (cached) max-flow feasibility check of :mod:`._feasibility`.
    """
    batch = kernel.batch
    p_x = check.marginal(p_x, "p_x", kernel.shape[0], batch)
    p_y = check.marginal(p_y, "p_y", kernel.shape[1], batch)
    total = check.matching_totals(p_x, p_y)
    p_x, p_y = p_x.astype(kernel.dtype, copy=False), p_y.astype(kernel.dtype, copy=False)
    check.finite_sums(kernel.frame_sums[0], kernel.table, "table")
    sides = {"x": (-1, "Row", "p_x", p_x, "p_y", p_y), "y": (-2, "Column", "p_y", p_y, "p_x", p_x)}
    first, second = (sides["x"], sides["y"]) if start == "x" else (sides["y"], sides["x"])
    n_steps = np.inf if steps is None else steps
    # The first side is rescaled at steps 1, 3, ...; the second at 2, 4, ... From step 2 on, a line
    # keeps only its mass in lines of the other side with positive targets, and must still have some.
    for (axis, name, target, p, other_name, other), plain_from, restricted_from in (
            (first, 1, 3), (second, 2, 2)):
        if n_steps >= plain_from:
            check.missing_mass(kernel.nonempty(axis), p, name, target)
        if n_steps >= restricted_from and not (other > 0).all():
            check.missing_mass(kernel.nonempty(axis, other > 0), p, name, target,
                               reason=f"has mass only where `{other_name}` is 0")

    @cache
    def deficit():
        """The first problem in the batch whose zero pattern cannot carry its targets, or None."""
        if kernel.full_support():
            return None
        for b in np.ndindex(*batch):
            found = _feasibility.deficit(kernel.pattern(b), p_x[b], p_y[b])
            if found is not None:
                return found
        return None

    return p_x, p_y, total, deficit


def _raise_if_infeasible(deficit):
    found = deficit()
    if found is not None:
        raise check.infeasible(found.rows, found.cols, found.row_mass, found.col_mass)


#: Supports with more entries than this are checked for feasibility only if the run has not
#: converged after FEASIBILITY_DEFERRED_TO half-steps (convergence itself proves feasibility to
#: within tol, and the max-flow costs ~1 s per 10^6 entries); smaller ones before iterating.
FEASIBILITY_EAGER_SIZE = 10**6
FEASIBILITY_DEFERRED_TO = 100


def _run(kernel, p_x, p_y, total, deficit, *, start, steps, tol, max_steps):
    """Consume the half-steps until the requested count, convergence, a stall or the budget."""
    check_at = 0 if kernel.support_size() <= FEASIBILITY_EAGER_SIZE else FEASIBILITY_DEFERRED_TO
    history = []
    best, best_k = np.inf, 0
    scalings = None
    for k, scal, ex, ey in _half_steps(kernel, p_x, p_y, total, start):
        history.append((ex, ey))
        scalings = scal if scal is not None else scalings
        if steps is not None:
            if k == steps:
                return k, scalings, history, "completed"
            continue
        worst = max(ex.max(initial=0), ey.max(initial=0))
        if worst <= tol:
            return k, scalings, history, "converged"
        if k == check_at:
            _raise_if_infeasible(deficit)
        if worst < best:
            best, best_k = worst, k
        elif k - best_k >= max(STALL_PATIENCE, best_k):
            return k, scalings, history, "stalled"
        if k >= max_steps:
            return k, scalings, history, "max_steps"
    raise AssertionError("unreachable")


def _finish(kernel, k, scalings, history, status, tol):
    if scalings is None:  # zero half-steps: the input itself
        scalings = kernel.initial()
    errors = np.stack([np.stack(pair, axis=-1) for pair in history], axis=-2)
    if status in ("max_steps", "stalled"):
        worst = float(errors[..., -1, :].max())
        warnings.warn(
            f"Balancing stopped ({status}) after {k} half-steps with marginal error {worst:.3g} > "
            f"tol = {tol:.3g}. "
            + ("Raise `max_steps`." if status == "max_steps" else
               "The error stopped decreasing: `tol` may be below what the floating-point sums resolve, "
               "or the targets can be met only by driving some entries to zero (very slow convergence)."),
            ConvergenceWarning,
            stacklevel=3,
        )
    return scalings, errors


def balance_table(table, p_x, p_y, *, steps: int | None = None, start: str = "x",
                  tol: float | None = None, max_steps: int = 10_000) -> BalanceResult:
    """Rescale a nonnegative table so that its row and column sums match target marginals.

    Alternately rescales the rows to ``p_x`` and the columns to ``p_y`` (iterative proportional
    fitting, raking, Sinkhorn-Knopp). Each half-step is the KL projection onto the tables with one
    marginal fixed; the limit is the KL projection onto the tables with both.

    Parameters
    ----------
    table : array_like, shape (..., m, l), or scipy.sparse matrix/array, shape (m, l)
        Nonnegative counts or weights; rows are X, columns are Y; need not be normalised. Leading
        axes of a dense array are a batch of independent problems. Zeros are structural.
    p_x, p_y : array_like, shape (m,) and (l,) (or broadcastable with the batch)
        Nonnegative target marginals with equal totals; the balanced table carries that total.
    steps : int, optional
        Run exactly this many half-steps (status ``"completed"``). Half-step 1 fixes the rows when
        ``start="x"``, half-step 2 the columns, and so on. ``None`` iterates until every marginal
        is within ``tol``.
    start : {"x", "y"}
        Which marginal the first half-step fixes.
    tol : float, optional
        Convergence tolerance on the L1 marginal error relative to the total mass, for
        ``steps=None``. Default 1e-10 (float64) or 1e-5 (float32).
    max_steps : int
        Budget of half-steps for ``steps=None``.

    Returns
    -------
    BalanceResult
        Scalings, status, per-step marginal errors; ``.table`` gives the balanced table (dense for
        dense input, same sparse format and pattern for sparse input).

    Raises
    ------
    ValueError, TypeError
        Invalid input (messages name the parameter), or a row (column) with no mass but a positive
        target.
    InfeasibleError
        With ``steps=None``, when the zero pattern cannot carry the targets (a subclass of
        ValueError, naming a set of rows that needs more mass than its columns can take). The
        max-flow check runs before iterating when the support has at most 10^6 entries; on larger
        ones only if the run has not converged after 100 half-steps (convergence proves
        feasibility to within ``tol``, and the check costs about a second per 10^6 entries). With
        ``steps=k`` the steps are run and ``feasible`` is False instead.

    Warns
    -----
    ConvergenceWarning
        When ``steps=None`` stops without reaching ``tol`` (status "max_steps" or "stalled").

    Notes
    -----
    Convergence is geometric with rate s_2^2 per half-step, s_2 the second singular value of
    ``D_p^-1/2 P D_q^-1/2`` (see :func:`databalance.spectrum`). When the targets can be met only by
    driving some positive entries to zero, the scalings diverge and convergence is sublinear; such
    runs end as "max_steps" or "stalled", never as "converged". Inputs are not modified; float32
    input is computed and returned in float32.

    Examples
    --------
    >>> import numpy as np
    >>> from databalance import balance_table
    >>> res = balance_table(np.array([[1., 2.], [3., 4.]]), [0.5, 0.5], [0.5, 0.5])
    >>> res.status, res.table.sum(axis=1).round(12).tolist(), res.table.sum(axis=0).round(12).tolist()
    ('converged', [0.5, 0.5], [0.5, 0.5])
    >>> balance_table(np.array([[1., 2.], [3., 4.]]), [0.5, 0.5], [0.5, 0.5], steps=1).table
    array([[0.16666667, 0.33333333],
           [0.21428571, 0.28571429]])
    """
    steps = check.steps_option(steps)
    start = check.start_option(start)
    max_steps = check.positive_int(max_steps, "max_steps")
    kernel = _Scaling.from_input(table)
    tol = check.tolerance(tol, kernel.dtype)
    return _solve(kernel, kernel.table, p_x, p_y, start=start, steps=steps, tol=tol,
                  max_steps=max_steps, result=BalanceResult)


def _solve(kernel, source, p_x, p_y, *, start, steps, tol, max_steps, result):
    p_x, p_y, total, deficit = _setup(kernel, p_x, p_y, start=start, steps=steps)
    k, scalings, history, status = _run(kernel, p_x, p_y, total, deficit, start=start, steps=steps,
                                        tol=tol, max_steps=max_steps)
    scalings, errors = _finish(kernel, k, scalings, history, status, tol)
    return result(scalings[0], scalings[1], steps=k, status=status, marginal_error=errors, _input=source,
                  _deficit=deficit)


def balance_logits(logits, p_x, p_y, *, steps: int | None = None, start: str = "x",
                   tol: float | None = None, max_steps: int = 10_000) -> LogBalanceResult:
    """Balance ``exp(logits)`` without leaving log space: stable for logits spanning +-1e4.

    Parameters
    ----------
    logits : array_like, shape (..., m, l)
        Log masses (float32 or float64); ``-inf`` marks a structural zero and stays ``-inf``.
        Leading axes are a batch (e.g. per-batch CLIP logit matrices).
    p_x, p_y, steps, start, tol, max_steps
        As in :func:`balance_table`.

    Returns
    -------
    LogBalanceResult
        Potentials ``f, g`` with ``log_table = f[..., :, None] + logits + g[..., None, :]``.

    Raises
    ------
    ValueError, TypeError, InfeasibleError
        As in :func:`balance_table`; NaN and +inf logits are errors.

    Notes
    -----
    ``exp(logits + f + g)`` is computed once (the row maxima subtracted first) and the iteration runs
    on it as plain scaling steps, which cost the same as :func:`balance_table`'s. Two safeguards keep
    it exact: a scaling that leaves ``[1e-50, 1e50]`` (``[1e-8, 1e8]`` in float32) is absorbed
    into the potentials and the kernel is re-exponentiated; a row or column whose sum underflows
    below ``1e-100`` (``1e-15``) gets an exact log-sum-exp step instead. Entries of the kernel that
    underflow are then smaller than the float resolution of every sum they enter.

    Examples
    --------
    >>> import numpy as np
    >>> from databalance import balance_logits
    >>> L = np.array([[1e4, 0.0], [0.0, -1e4]])
    >>> res = balance_logits(L, [0.5, 0.5], [0.5, 0.5])
    >>> np.exp(res.log_table).round(12)
    array([[0.25, 0.25],
           [0.25, 0.25]])
    """
    steps = check.steps_option(steps)
    start = check.start_option(start)
    max_steps = check.positive_int(max_steps, "max_steps")
    arr = check.dense_array(logits, "logits", min_ndim=2)
    dtype = check.working_dtype(arr.dtype, "logits")
    arr = arr.astype(dtype, copy=False)
    has_zeros = check.logits_entries(arr, "logits")
    tol = check.tolerance(tol, dtype)
    kernel = _LogScaling(arr, start, has_zeros)
    return _solve(kernel, arr, p_x, p_y, start=start, steps=steps, tol=tol, max_steps=max_steps,
                  result=LogBalanceResult)


def iterate_balance(table, p_x, p_y, *, start: str = "x") -> Iterator[BalanceResult]:
    """Yield the iterates P^(0), P^(1), P^(2), ... of balancing, one per half-step, lazily.

    Each item is a :class:`BalanceResult` with status ``"completed"``; its scalings are computed
    eagerly (two matrix-vector products per half-step) and its ``.table`` only when asked for. The
    generator never ends: take what you need with ``itertools.islice`` or ``zip(range(k + 1), ...)``.

    Parameters
    ----------
    table, p_x, p_y, start
        As in :func:`balance_table`.

    Yields
    ------
    BalanceResult
        Iterate k, for k = 0, 1, 2, ...

    Raises
    ------
    ValueError, TypeError
        As in :func:`balance_table` (the feasibility check runs only when ``feasible`` is read).

    Examples
    --------
    >>> import itertools
    >>> import numpy as np
    >>> from databalance import iterate_balance
    >>> T = np.array([[1., 2.], [3., 4.]])
    >>> for it in itertools.islice(iterate_balance(T, [0.5, 0.5], [0.5, 0.5]), 3):
    ...     print(it.steps, it.marginal_error[-1].round(4))
    0 [9. 9.]
    1 [0.     0.2381]
    2 [0.024 0.   ]
    """
    start = check.start_option(start)
    kernel = _Scaling.from_input(table)
    p_x, p_y, total, deficit = _setup(kernel, p_x, p_y, start=start, steps=None)
    # The errors of every iterate, in a buffer that doubles when full: each result gets a read-only
    # view of its prefix (amortised O(1) per step; a view keeps its buffer alive after a doubling).
    history = np.empty(kernel.batch + (16, 2))
    for k, scal, ex, ey in _half_steps(kernel, p_x, p_y, total, start):
        if k == history.shape[-2]:
            history = np.concatenate([history, np.empty_like(history)], axis=-2)
        history[..., k, 0], history[..., k, 1] = ex, ey
        errors = history[..., : k + 1, :]
        errors.flags.writeable = False
        u, v = scal if scal is not None else kernel.initial()
        yield BalanceResult(u, v, steps=k, status="completed", marginal_error=errors, _input=kernel.table,
                            _deficit=deficit)
