"""THE algorithm: iterative proportional fitting as a loop of half-steps over a list of margins.

Half-step k projects the current table onto the tables whose margin ``j(k)`` equals its target:
it divides the target by the margin's current sums. The loop works on one scaling per margin (the
table is ``input x prod of scalings``) and asks a kernel (:mod:`databalance._kernels`) for the
sums it needs. The sums computed right after a step are both the next margin's input and its
error, so with two margins a sweep costs exactly two products with the table (the shared-product
shortcut); with more margins every other margin's error costs one more product per step.

Targets are normalised to total 1 inside the loop and the kernel starts from scalings that bring
the table's total near 1, so the problem's scale never overflows or underflows the scalings; the
result's scalings are scaled back when exported.

Array-API kernels (PyTorch, JAX, CuPy: :mod:`databalance._kernels.arrayapi`) run in this same loop.
Their errors are computed on the device (:func:`l1` with ``xp``), one row per iterate, and stacked
when the history is viewed; ``steps=k`` never reads them, ``steps=None`` reads one scalar per
sweep (an odd iterate is decided together with the next; a kernel's pending device flag, the log
kernel's proof that the next sweep needs no safeguard, travels in the same transfer).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from . import _validation as check
from ._errors import ConvergenceWarning
from ._kernels import Kernel, State

#: A run is stalled when its smallest marginal error, last improved at half-step k_best, has not
#: improved for max(STALL_PATIENCE, k_best) half-steps (progress can come in widening stairs) when
#: it is within sqrt(eps) of 0 (where the floating-point sums stop resolving progress), or for ten
#: times as long above that (a long plateau, or an oscillation no feasibility check has caught).
STALL_PATIENCE = 200


@dataclass(frozen=True)
class Margin:
    """One margin (the kernel's margin of the same index): its target (normalised to total 1, in
    the working dtype), its name for messages and the indices of its zero entries (``None`` when
    it has none)."""

    target: np.ndarray
    name: str
    zero: tuple | None
    exact: np.ndarray  # the target normalised in float64, for errors measured in float64


@dataclass(frozen=True)
class Problem:
    """The margins in the user's order, which one the first half-step fixes, and the targets'
    common total (one per batch problem) by which the exported scalings are multiplied."""

    margins: tuple[Margin, ...]
    first: int
    total: np.ndarray

    @classmethod
    def from_targets(cls, targets, names, total, dtype, first: int = 0) -> Problem:
        margins = []
        for p, name in zip(targets, names, strict=True):
            # Each target over its own total: the targets' totals were checked to agree up to their
            # dtype's rounding (float32 thirds total 1 +- 3e-8), a gap no table could close.
            exact = np.asarray(p, dtype=np.float64)
            own = exact.sum(axis=tuple(range(total.ndim, exact.ndim)), keepdims=True)
            exact = exact / np.where(own > 0, own, 1.0)
            p = exact.astype(dtype)
            zero = None if (p > 0).all() else np.nonzero(p == 0)
            margins.append(Margin(p, name, zero, exact))
        return cls(tuple(margins), first, total)

    def cycle(self) -> Iterator[int]:
        """The margin fixed by half-step k = 1, 2, ...: the cycle order from ``first``."""
        j = self.first
        while True:
            yield j
            j = (j + 1) % len(self.margins)

    def export_scales(self) -> list[np.ndarray]:
        """Factors, one per margin, whose product is the total: a power of two for all but the
        last margin (so exact), the remainder for the last."""
        K = len(self.margins)
        share = np.exp2(np.round(np.log2(self.total) / K))[..., None]
        return [share] * (K - 1) + [self.total[..., None] / share ** (K - 1)]


def l1(scaling, sums, target, batch_ndim: int, scratch=None, xp=None) -> np.ndarray:
    """L1 distance of the margin sums ``scaling * sums`` from a target of total 1, per problem
    (the trailing axes after the ``batch_ndim`` leading ones are the margin's cells).

    ``scratch`` (never handed out) avoids allocating, and page-faulting, a vector per step. ``xp``,
    an array-API namespace: computed there, functionally, in the working dtype, on the device.
    """
    if xp is not None:
        return xp.sum(xp.abs(scaling * sums - target), axis=tuple(range(batch_ndim, sums.ndim)))
    d = np.multiply(scaling, sums, out=scratch)
    d -= target
    np.abs(d, out=d)
    return d.sum(axis=tuple(range(batch_ndim, d.ndim)), dtype=np.float64)


class History:
    """The marginal errors of every iterate, shape ``batch + (k + 1, K)``, in a buffer that doubles
    when full: :meth:`view` hands out a read-only view of the prefix (amortised O(1) per step; a
    view keeps its buffer alive after a doubling)."""

    def __init__(self, batch: tuple[int, ...], n_margins: int):
        self._buf = np.empty(batch + (16, n_margins))
        self.length = 0

    def append(self, errors: np.ndarray) -> None:
        if self.length == self._buf.shape[-2]:
            self._buf = np.concatenate([self._buf, np.empty_like(self._buf)], axis=-2)
        self._buf[..., self.length, :] = errors
        self.length += 1

    def view(self, upto: int | None = None) -> np.ndarray:
        """The errors of iterates 0..``upto`` (default: all)."""
        out = self._buf[..., : self.length if upto is None else upto + 1, :]
        out.flags.writeable = False
        return out

    def worst(self, which: int = -1) -> float:
        """The largest error of the last iterate (or of ``which``, counted from the end), NaN if
        any is NaN (never mistaken for small)."""
        return float(np.max(self._buf[..., self.length + which, :]))


class DeviceHistory:
    """The :class:`History` of an array-API kernel: one device array per iterate, stacked when
    viewed (no host copy); :meth:`worst` is the loop's host read (one per sweep)."""

    def __init__(self, xp, kernel=None):
        self.xp = xp
        self.kernel = kernel  # may offer a device flag to read along (``pending_flag``/``deliver``)
        self.rows: list = []
        self._read: tuple[int, float] | None = None  # (iterates then, the last one's largest error)

    @property
    def length(self) -> int:
        return len(self.rows)

    def append(self, errors) -> None:
        self.rows.append(errors)

    def view(self, upto: int | None = None):
        return self.xp.stack(self.rows if upto is None else self.rows[:upto + 1], axis=-2)

    def worst(self, which: int = -1) -> float:
        """The largest error of the last iterate (``which=-1``) or of the one before (-2). Asked for
        -2, both are read in one transfer and the last is kept for the call that follows."""
        from ._kernels.arrayapi import to_numpy

        if which == -1 and self._read is not None and self._read[0] == len(self.rows):
            return self._read[1]
        if which == -2:
            xp = self.xp
            values = [xp.max(self.rows[-2]), xp.max(self.rows[-1])]
            flag = None if self.kernel is None else getattr(self.kernel, "pending_flag", lambda: None)()
            if flag is not None:
                values.append(xp.astype(flag, values[0].dtype))
            both = to_numpy(xp.stack(values))
            if flag is not None:
                self.kernel.deliver(bool(both[2]))
            self._read = (len(self.rows), float(both[1]))
            return float(both[0])
        return float(to_numpy(self.xp.max(self.rows[-1])))


def new_history(kernel: Kernel, n_margins: int) -> History | DeviceHistory:
    xp = getattr(kernel, "xp", None)
    return History(kernel.batch, n_margins) if xp is None else DeviceHistory(xp, kernel)


def half_steps(kernel: Kernel, problem: Problem, last: int | None = None) -> Iterator[tuple[int, State, Any]]:
    """Yield (k, state, errors) for k = 0, 1, 2, ...; ``errors`` has one column per margin.

    The error of the margin a step fixes comes from its sums before the step (O(lines), one
    rounding per entry: not exactly 0). The next margin's error comes from the sums its step needs,
    except after half-step ``last`` (the final one, whose errors the caller measures itself: NaN
    there, and no pass over the table for sums no step will use).
    """
    margins = problem.margins
    nb = len(kernel.batch)
    xp = getattr(kernel, "xp", None)  # an array-API kernel: functional, errors stacked per iterate
    distance = getattr(kernel, "margin_l1", l1)  # a kernel may measure it in one pass (fused sparse)
    state = kernel.initial_state()
    errors: Any = np.empty(kernel.batch + (len(margins),)) if xp is None else _DeviceRow(xp, len(margins))
    for j, (m, s) in enumerate(zip(margins, kernel.input_sums(), strict=True)):
        errors[..., j] = l1(1.0, s, m.target, nb, xp=xp)
    yield 0, state, errors if xp is None else errors.stacked()
    scratch = [np.empty_like(f) for f in state.factors] if xp is None else [None] * len(margins)
    order = problem.cycle()
    j = next(order)
    sums = kernel.sums(j, state)
    for k in range(1, np.iinfo(np.int64).max):
        sums = kernel.rescale(j, margins[j], sums, state)
        state.steps, state.fixed = k, j
        errors = np.empty_like(errors) if xp is None else _DeviceRow(xp, len(margins))
        errors[..., j] = distance(state.factors[j], sums, margins[j].target, nb, scratch[j], xp)
        j = next(order)
        if k == last:
            errors[..., [i for i in range(len(margins)) if i != state.fixed]] = np.nan
            yield k, state, errors
            return
        if len(margins) == 2:  # the next margin's sums are all that is needed: the shortcut
            sums = kernel.sums(j, state)
            errors[..., j] = distance(state.factors[j], sums, margins[j].target, nb, scratch[j], xp)
        else:
            needed = [(j + s) % len(margins) for s in range(max(1, len(margins) - 1))]
            many = kernel.sums_many(needed, state)
            sums = many[j]
            for i in needed:
                errors[..., i] = distance(state.factors[i], many[i], margins[i].target, nb, scratch[i], xp)
        yield k, state, errors if xp is None else errors.stacked()


class _DeviceRow:
    """One iterate's errors for an array-API kernel: filled like ``errors[..., j] = e`` (as the
    NumPy row), stacked into one device array of shape ``batch + (K,)`` (arrays there may be
    immutable, and must be for autodiff)."""

    def __init__(self, xp, n: int):
        self.xp, self.cols = xp, [None] * n

    def __setitem__(self, key, value) -> None:
        self.cols[key[-1]] = value

    def stacked(self):
        return self.xp.stack(self.cols, axis=-1)


@dataclass
class Outcome:
    """What a run produced: its length and status, the final state and the error history."""

    steps: int
    status: str
    state: State
    errors: np.ndarray

    @property
    def converged(self) -> bool:
        return self.status == "converged"


def run(kernel: Kernel, problem: Problem, *, steps: int | None, tol: float, max_steps: int,
        check_feasible_at: int | None = None, feasible=None, progress=None,
        trace: list | None = None, remeasured: bool = False) -> Outcome:
    """Consume the half-steps until the requested count, convergence, a stall or the budget.

    ``feasible()`` raises if the problem has no solution; for ``steps=None`` it is called at
    half-step ``check_feasible_at`` unless the run has converged before. ``progress``, a
    (report, close) pair, hears of every step. ``trace``, a list, receives the (exported-frame-free)
    scaling each half-step sets, in order: what a linearisation at the iterates needs.
    ``remeasured``: the caller replaces the final errors of a run of ``steps`` half-steps by its own
    (:func:`remeasured`), so the final half-step's are left NaN where they would cost a pass over
    the table (not when ``progress`` hears of them, nor for an array-API kernel).
    """
    report, close = progress if progress is not None else (None, None)
    last = steps if remeasured and report is None and getattr(kernel, "xp", None) is None else None
    try:
        return _consume(kernel, problem, steps, tol, max_steps, check_feasible_at, feasible, report, trace, last)
    finally:
        if close is not None:
            close()


def _consume(kernel, problem, steps, tol, max_steps, check_feasible_at, feasible, report, trace, last) -> Outcome:
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # reported as status "failed"
        return _consume_quietly(kernel, problem, steps, tol, max_steps, check_feasible_at, feasible, report,
                                trace, last)


def _consume_quietly(kernel, problem, steps, tol, max_steps, check_feasible_at, feasible, report,
                     trace, last) -> Outcome:
    history = new_history(kernel, len(problem.margins))
    best, best_k = np.inf, 0
    eps = float(np.finfo(kernel.dtype).eps)
    certifiable = tol >= eps  # below the dtype's resolution no error can certify convergence
    # An array-API kernel's errors live on its device: an odd iterate is decided together with the
    # next one (its state kept: the kernels are functional, so a shallow copy is a snapshot), so
    # that deciding costs one host read per sweep. The decisions, and the step a run stops at, are
    # the same as reading every iterate.
    paired = isinstance(history, DeviceHistory)
    pending = None
    for k, state, errors in half_steps(kernel, problem, last):
        history.append(errors)
        if trace is not None:  # the starting scalings, then the one each half-step sets
            trace.extend(f.copy() for f in (state.factors if k == 0 else state.factors[state.fixed:state.fixed + 1]))
        if report is not None:
            report(k, errors)
        if steps is not None:
            if k == steps:
                return Outcome(k, "completed", state, history.view())
            continue
        if paired and k % 2 == 1 and k < max_steps:
            pending = (k, replace(state, factors=list(state.factors),
                                  frame=None if state.frame is None else list(state.frame)))
            continue
        if pending is None:
            decide = [(k, state, history.worst())]
        else:
            decide = [(pending[0], pending[1], history.worst(-2)), (k, state, history.worst())]
            pending = None
        for kk, st, worst in decide:
            if certifiable and worst <= tol:
                return Outcome(kk, "converged", st, history.view(kk))
            if kk == check_feasible_at and feasible is not None:
                feasible()
            if kk > 0 and not np.isfinite(worst):  # iterate 0 of huge logits may have infinite sums
                return Outcome(kk, "failed", st, history.view(kk))
            if worst < best:
                best, best_k = worst, kk
            elif kk - best_k >= max(STALL_PATIENCE, best_k) * (1 if best <= np.sqrt(eps) else 10):
                # Near the floating-point floor the usual patience; above it ten times as much: a
                # plateau at a large error (a table spanning a hundred orders of magnitude) can last
                # hundreds of half-steps while the scalings move, and then converge.
                return Outcome(kk, "stalled", st, history.view(kk))
            if kk >= max_steps:
                return Outcome(kk, "max_steps", st, history.view(kk))
    raise AssertionError("unreachable")


def remeasured(outcome: Outcome, problem: Problem, sums: list[np.ndarray], tol: float) -> Outcome:
    """The outcome with its last errors measured from ``sums``, every margin's float64 sums of the
    table the caller returns (in the targets' units): a run whose working sums looked converged
    but whose returned table is not becomes "stalled" (more steps cannot help)."""
    errors = np.array(outcome.errors)
    nb = errors.ndim - 2
    for j, (m, s) in enumerate(zip(problem.margins, sums, strict=True)):
        total = np.reshape(problem.total, problem.total.shape + (1,) * (s.ndim - nb))
        errors[..., -1, j] = l1(1.0, np.asarray(s, dtype=np.float64) / total, m.exact, nb)
    errors.flags.writeable = False
    status = outcome.status
    if status == "converged" and not float(np.max(errors[..., -1, :])) <= tol:
        status = "stalled"
    return Outcome(outcome.steps, status, outcome.state, errors)


def warn_if_unconverged(outcome: Outcome, tol: float, reason: str = "") -> None:
    """A :class:`ConvergenceWarning` for runs that stopped short of ``tol``."""
    if outcome.status in ("max_steps", "stalled", "failed"):
        worst = float(np.max(outcome.errors[..., -1, :]))
        warnings.warn(check.not_converged(outcome.status, outcome.steps, worst, tol, reason),
                      ConvergenceWarning, stacklevel=3)
