"""Public balancing API: dense, batched, sparse and log-domain tables, and their results.

The algorithm itself is :mod:`databalance._ipf` (a loop of half-steps over a list of margins);
the representations of the table are the kernels of :mod:`databalance._kernels`. This module
validates the inputs, sets up the problem, runs the loop and packs what it computed into frozen
results that hold data (the input, the scalings, the targets), never the kernels.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from . import _accelerate, _feasibility, _ipf, _progress
from . import _kernels as kernels
from . import _validation as check
from ._errors import ConvergenceWarning, InfeasibleError
from ._typing import Marginal, TableLike

__all__ = [
    "BalanceResult",
    "ConvergenceWarning",
    "InfeasibleError",
    "LogBalanceResult",
    "CellsResult",
    "MarginsResult",
    "balance_logits",
    "balance_margins",
    "balance_table",
    "iterate_balance",
]

#: Supports with more entries than this are checked for feasibility only if the run has not
#: converged after FEASIBILITY_DEFERRED_TO half-steps (convergence itself proves feasibility to
#: within tol, and the max-flow costs ~1 s per 10^6 entries); smaller ones before iterating.
FEASIBILITY_EAGER_SIZE = 10**6
FEASIBILITY_DEFERRED_TO = 100


@dataclass(frozen=True, eq=False, kw_only=True)
class _Outcome:
    """What both result classes share: the run's length and status, the marginal errors of every
    iterate, and the data from which feasibility is decided when first asked."""

    steps: int
    status: str
    marginal_error: np.ndarray = field(repr=False)
    passes: int | None = field(default=None, repr=False)
    _input: Any = field(default=None, repr=False)
    _targets: tuple = field(default=(), repr=False)
    _known_feasible: bool | None = field(default=None, repr=False)

    def __post_init__(self):
        # Results are values: their arrays cannot be changed through them. The input table is
        # referenced, not copied (it can be large): change it in place and `table` changes too.
        for name, value in vars(self).items():
            for array in value if isinstance(value, tuple) else (value,):
                if isinstance(array, np.ndarray) and not name.startswith("_"):  # never the caller's arrays
                    array.flags.writeable = False

    @property
    def converged(self) -> bool:
        return self.status == "converged"

    @cached_property
    def feasible(self) -> bool:
        """Whether the fully balanced table exists (a max-flow on the support, run once if needed)."""
        if self._known_feasible is not None:
            return self._known_feasible
        batch = self.marginal_error.shape[:-2]
        return _first_deficit(self._pattern, batch, *self._targets) is None

    def _pattern(self, b: tuple):
        raise NotImplementedError

    def __repr__(self) -> str:
        """One line: status, steps, each margin's final error (the largest over a batch), shape."""
        final = _host(self.marginal_error)[..., -1, :]
        worst = final.reshape(-1, final.shape[-1]).max(axis=0)
        errors = ", ".join(f"{e:.2g}" for e in worst)
        return (f"{type(self).__name__}(status={self.status!r}, steps={self.steps}, "
                f"final errors [{errors}], {self._describe()})")

    def _describe(self) -> str:
        return f"shape {tuple(np.shape(self._input))}"

    def plot(self, ax=None, *, rate: float | None = None):
        """Draw every margin's error after each half-step on a log scale (needs matplotlib); ``rate``
        draws a predicted decay per half-step (``s_2`` for two margins: see
        :func:`databalance.plotting.plot_balance`). Returns the Axes."""
        from . import plotting

        return plotting.plot_balance(self, ax, rate=rate)


@dataclass(frozen=True, eq=False, repr=False)
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
        ``tol``), ``"max_steps"`` (budget exhausted), ``"stalled"`` (the marginal error stopped
        decreasing: near the floating-point floor, e.g. because ``tol`` is below what the sums
        resolve, or for a long time above it) or ``"failed"`` (a scaling overflowed or became
        NaN: the result is not usable).
    marginal_error : ndarray, shape (..., steps + 1, 2)
        L1 distance of the row (``[..., k, 0]``) and column (``[..., k, 1]``) sums of iterate k from
        the targets, divided by the target total; ``k = 0`` is the input.
    passes : int or None
        Passes over the table the iteration made (products with it, or fused sweeps that read it
        once for two half-steps; setup and checks not counted); None for array-API inputs.
    feasible : bool
        Whether the fully balanced table exists (the zero pattern can carry the targets). Known
        without extra work after ``steps=None``; after ``steps=k`` it is computed (a max-flow on
        the support) when first read.
    """

    row_scaling: np.ndarray
    col_scaling: np.ndarray

    @cached_property
    def table(self):
        """The balanced table ``diag(u) @ input @ diag(v)``; sparse input gives sparse output of
        the input's format."""
        return kernels.scaled_table(self._input, self.row_scaling, self.col_scaling)

    def _pattern(self, b):
        return kernels.support_pattern(self._input[b] if b else self._input)


@dataclass(frozen=True, eq=False, repr=False)
class LogBalanceResult(_Outcome):
    """The outcome of :func:`balance_logits`.

    Attributes
    ----------
    row_potential, col_potential : ndarray
        ``f`` and ``g`` with ``log_table == f[..., :, None] + logits + g[..., None, :]``.
    steps, status, marginal_error, passes, feasible
        As in :class:`BalanceResult`.
    """

    row_potential: np.ndarray
    col_potential: np.ndarray
    # [(the kernel's buffer, its scalings)] until `table` takes it: popped, so that a copy of the
    # result, or a second thread, never scales the same buffer twice (it exponentiates instead)
    _buffer: list = field(default_factory=list, repr=False)

    @cached_property
    def log_table(self) -> np.ndarray:
        """The log of the balanced table in the logits' dtype; -inf entries of the logits stay -inf.

        In float32 its entries carry the rounding of their own size (about 1e-3 for values near
        1e4); :attr:`table` was exponentiated from float64 sums of the logits and potentials and
        carries none of it."""
        if kernels.is_array_api(self._input):
            from ._kernels import arrayapi

            xp = arrayapi.namespace(self._input)
            return arrayapi.add_potentials(xp, self._input, self.row_potential, self.col_potential)
        return kernels.log.add_potentials(self._input, self.row_potential, self.col_potential,
                                          out=np.empty_like(self._input))

    @cached_property
    def table(self) -> np.ndarray:
        """``exp(log_table)``: the balancing buffer, scaled in place by the last scalings when
        first read (no second exponentiation; the result holds that buffer until then)."""
        if kernels.is_array_api(self._input):
            from ._kernels import arrayapi

            return arrayapi.namespace(self._input).exp(self.log_table)
        try:
            buffer, scalings = self._buffer.pop()
        except IndexError:  # taken by another copy of this result, or none kept
            pass
        else:
            if kernels.log.scale_buffer(buffer, scalings):
                return buffer
            # a last re-exponentiation can overflow the buffer where exp(log_table) does not
            return kernels.log.add_potentials(self._input, self.row_potential, self.col_potential, out=buffer,
                                              fn=np.exp)
        return kernels.log.add_potentials(self._input, self.row_potential, self.col_potential,
                                          out=np.empty_like(self._input), fn=np.exp)

    def _pattern(self, b):
        return kernels.support_pattern(self._input[b] > -np.inf)


def _host(errors) -> np.ndarray:
    """A result's marginal errors on the host (array-API results keep them on the device)."""
    if isinstance(errors, np.ndarray):
        return errors
    from ._kernels.arrayapi import to_numpy

    return to_numpy(errors)


def _api_balance(data, p_x, p_y, *, log: bool, steps, start, tol, max_steps, progress, acceleration="none"):
    """:func:`balance_table` / :func:`balance_logits` of an array of another array-API namespace
    (options validated): the same loop on an array-API kernel, in the array's namespace and on its
    device. ``steps=k`` is differentiated through the unrolled steps by the framework; with
    ``steps=None`` the loop runs on a detached input and :mod:`databalance._implicit` attaches the
    derivative of the fixed point. Value checks read three scalars (and the line sums) once before
    the loop; under ``jax.jit`` (traced values) they are skipped."""
    from . import _implicit
    from ._kernels import arrayapi as api

    name = "logits" if log else "table"
    if acceleration in ("overrelax", "anderson"):  # "auto" means plain IPF here
        raise check.api_acceleration(name, acceleration)
    xp = api.namespace(data)
    check.api_table(xp, data, name)
    batch, (m, l) = tuple(data.shape[:-2]), tuple(data.shape[-2:])
    targets = [check.api_target(p, n, xp, data, name, size, batch)
               for p, n, size in ((p_x, "p_x", m), (p_y, "p_y", l))]
    traced = api.is_traced(data)
    has_zeros = True if traced else check.api_entries(xp, data, name, log=log)
    tol = check.tolerance(tol, api.numpy_dtype(xp, data.dtype))
    first = _first(start)

    def solve(arr):
        concrete = not api.is_traced(arr)
        if steps is None and not concrete:
            raise check.api_traced(name)
        kernel: Any = (api.ApiLogKernel(arr, xp, first, has_zeros, traced=not concrete) if log
                       else api.ApiDenseKernel(arr, xp, has_zeros))
        if concrete:
            if not log:
                check.api_finite_sums(kernel.frame_sums[0], name)
            problem = _problem(kernel, targets, ["p_x", "p_y"], ["Row", "Column"], first=first, steps=steps,
                               name=name)
        else:
            problem = _ipf.Problem.from_targets(targets, ["p_x", "p_y"], check.matching_totals(*targets),
                                                kernel.dtype, first)
        problem = kernel.adopt(problem)
        outcome, known = _solve(kernel, problem, steps=steps, tol=tol, max_steps=max_steps,
                                deficit=_max_flow_check(kernel, targets, name), progress=on_host,
                                desc="balance_logits" if log else "balance_table")
        factors = kernel.export(outcome.state, problem.export_scales())
        outcome, reason = _api_remeasured(kernel, arr, factors, problem, outcome, tol, log)
        return factors, (outcome, known, reason)

    # progress hears host copies of the errors (one transfer per half-step, only when asked for)
    reporter = _progress.reporter(progress, "balance_logits" if log else "balance_table",
                                  total=steps if steps is not None else max_steps)
    on_host = None if reporter is None else (lambda k, errors: reporter[0](k, api.to_numpy(errors)))
    try:
        if steps is None and _implicit.needs_gradient(data):
            (a, b), (outcome, known, reason) = _implicit.converged(data, solve, log=log, tol=tol)
        else:
            (a, b), (outcome, known, reason) = solve(data)
    finally:
        if reporter is not None:
            reporter[1]()
    if outcome.status in ("max_steps", "stalled", "failed"):
        _ipf.warn_if_unconverged(_ipf.Outcome(outcome.steps, outcome.status, outcome.state, _host(outcome.errors)),
                                 tol, reason)
    result = LogBalanceResult if log else BalanceResult
    return result(a, b, steps=outcome.steps, status=outcome.status, marginal_error=outcome.errors, _input=data,
                  _targets=tuple(targets), _known_feasible=known)


def _api_remeasured(kernel, arr, factors, problem, outcome, tol, log):
    """After ``steps=None``, the last errors measured on the table the result returns (as
    :func:`balance_logits` and :func:`_float64_check` do for NumPy), on the device in the working
    dtype: a run whose working sums looked converged but whose returned table is not is "stalled"."""
    from ._kernels import arrayapi as api

    if outcome.status == "completed" or outcome.steps == 0 or not (log or kernel.dtype == np.float32):
        return outcome, ""
    xp = kernel.xp
    sums = api.returned_sums(xp, arr, *factors) if log else [
        kernel.row_sums(factors[1]) * factors[0], kernel.col_sums(factors[0]) * factors[1]]
    total = kernel.asarray(problem.total)[..., None]
    last = xp.stack([_ipf.l1(1.0, s / total, mg.target, len(kernel.batch), xp=xp)
                     for s, mg in zip(sums, problem.margins, strict=True)], axis=-1)
    errors = xp.concat([outcome.errors[..., :-1, :], last[..., None, :]], axis=-2)
    status = outcome.status
    lost = status == "converged" and not float(api.to_numpy(xp.max(last))) <= tol
    reason = ""
    if lost:
        status = "stalled"
        reason = check.float32_resolution() if kernel.dtype == np.float32 else check.unrepresentable(
            float(api.to_numpy(xp.max(xp.abs(xp.where(xp.isinf(arr), 0.0, arr))))))
    return _ipf.Outcome(outcome.steps, status, outcome.state, errors), reason


def _first_deficit(pattern, batch, p_x, p_y):
    """The first problem in the batch whose zero pattern cannot carry its targets, or None."""
    for b in np.ndindex(*batch):
        found = _feasibility.deficit(pattern(b), p_x[b], p_y[b])
        if found is not None:
            return found
    return None


def _problem(kernel, targets: list, names: list[str], lines: list[str], *, first: int, steps: int | None,
             name: str = "table", total: np.ndarray | None = None):
    """Check that the table can be scaled to the targets for the steps requested; the problem.

    A margin is rescaled at steps t + 1, t + 1 + K, ... (t its position in the cycle). At its first
    step the margins before it have emptied the cells their zero targets exclude; from its second,
    every other margin has. A cell of the margin with a positive target must keep some mass.
    """
    K = len(targets)
    if total is None:  # two targets with a batch
        total = check.matching_totals(*targets)
    if getattr(kernel, "xp", None) is None:  # array-API tables are checked on their device
        check.finite_sums(kernel.frame_sums[0], kernel.table, name)
    n_steps = np.inf if steps is None else steps
    masks = [p > 0 for p in targets]
    for t in range(K if steps is None else min(K, steps)):
        j = (first + t) % K
        before = [(first + s) % K for s in range(t)]
        others = [i for i in range(K) if i != j]
        for applied, lower in ((before, t + 1), (others, t + 1 + K)):
            zeros = [i for i in applied if not masks[i].all()]
            if n_steps < lower or (applied is others and before == others):
                continue
            if not zeros:
                check.missing_mass(kernel.nonempty(j), targets[j], lines[j], names[j], table=name)
                continue
            keep = [masks[i] if i in zeros else np.ones_like(masks[i]) for i in range(K)]
            check.missing_mass(kernel.nonempty(j, keep), targets[j], lines[j], names[j], table=name,
                               reason=f"has mass only where {_listing(names[i] for i in zeros)} is 0")
    return _ipf.Problem.from_targets(targets, names, total, kernel.dtype, first)


def _listing(names) -> str:
    return " or ".join(f"`{n}`" for n in names)


def _two_targets(kernel, p_x: Marginal, p_y: Marginal) -> list[np.ndarray]:
    return [check.marginal(p_x, "p_x", kernel.shape[0], kernel.batch),
            check.marginal(p_y, "p_y", kernel.shape[1], kernel.batch)]


def _first(start: str) -> int:
    return 0 if start == "x" else 1


def _solve(kernel, problem, *, steps, tol, max_steps, deficit, progress=None, desc="balancing", trace=None,
           costly=False, remeasured=False):
    """Run the loop; for ``steps=None`` decide feasibility before (small supports) or during it.

    ``deficit()`` raises :class:`InfeasibleError` when no balanced table exists and returns False
    when it could not decide (a support too large for the linear program); a ``costly`` one runs
    only if the loop has not converged after FEASIBILITY_DEFERRED_TO half-steps. Returns the
    outcome and whether the problem is then known to be feasible (``None``: not decided).
    ``remeasured``: the caller measures the final errors itself (a float32 run's, in float64: see
    :func:`_float64_check`), so the last half-step computes none of its own."""
    eager = kernel.support_size() <= FEASIBILITY_EAGER_SIZE and not costly
    check_at = 0 if eager else FEASIBILITY_DEFERRED_TO
    report = _progress.reporter(progress, desc, total=steps if steps is not None else max_steps)
    checked: list[bool] = []
    outcome = _ipf.run(kernel, problem, steps=steps, tol=tol, max_steps=max_steps,
                       check_feasible_at=None if kernel.full_support() else check_at,
                       feasible=lambda: checked.append(deficit() is not False), progress=report, trace=trace,
                       remeasured=remeasured)
    if kernel.full_support() or outcome.converged or any(checked):
        return outcome, True
    return outcome, None


def _max_flow_check(kernel, targets, name):
    """The feasibility check of two margins: a max-flow per batch problem, run when called."""

    def deficit():
        found = _first_deficit(kernel.pattern, kernel.batch, *targets)
        if found is not None:
            raise check.infeasible(found.rows, found.cols, found.row_mass, found.col_mass, name)

    return deficit


def balance_table(table: TableLike, p_x: Marginal, p_y: Marginal, *, steps: int | None = None,
                  start: str = "x", tol: float | None = None, max_steps: int = 10_000,
                  progress: bool | _progress.Progress = False, acceleration: str = "none") -> BalanceResult:
    """Rescale a nonnegative table so that its row and column sums match target marginals.

    Alternately rescales the rows to ``p_x`` and the columns to ``p_y`` (iterative proportional
    fitting, raking, Sinkhorn-Knopp). Each half-step is the KL projection onto the tables with one
    marginal fixed; the limit is the KL projection onto the tables with both.

    Parameters
    ----------
    table : array_like, shape (..., m, l), or scipy.sparse matrix/array, shape (m, l)
        Nonnegative counts or weights; rows are X, columns are Y; need not be normalised. Leading
        axes of a dense array are a batch of independent problems. Zeros are structural. A
        PyTorch, JAX, CuPy (any array-API) float32/float64 array is balanced in its namespace, on
        its device, differentiably (:doc:`/guide/array_api`). A 2-D Dask array partitioned along
        its rows (blocks NumPy or scipy.sparse) is balanced block by block on its workers, and
        ``table`` of the result is a lazy Dask array (:doc:`/guide/dask`).
    p_x, p_y : array_like, shape (m,) and (l,) (or broadcastable with the batch)
        Nonnegative target marginals with equal totals; the balanced table carries that total.
        Totals that differ only by their dtype's rounding (float32 thirds) are each met over their
        own total: the table carries ``p_x``'s.
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
    progress : bool or callable
        ``True`` shows a progress bar (tqdm when installed, else a line on stderr); a callable
        ``f(step, errors)`` is called after every half-step with that step's marginal errors.
    acceleration : {"none", "auto", "anderson", "overrelax"}
        For ``steps=None`` only (``steps=k`` always runs plain half-steps). ``"none"`` is plain
        IPF. ``"auto"`` runs plain IPF for a few sweeps, estimates its rate per sweep and, when
        that is slow (at least 0.5), switches to Anderson acceleration of the sweeps (on the log
        scalings, safeguarded by the dual objective), falling back to plain IPF if that does not
        beat it: 24-450x fewer passes over the slowly mixing tables of the benchmarks (s_2 of
        0.99-0.999). ``"anderson"`` and ``"overrelax"`` (over-relaxed scalings, 8-27x fewer) do
        so whatever the rate. The table is the same to within ``tol`` (the split of its scalings between rows and
        columns may differ by a constant factor) and errors are measured on the iterates, so
        "converged" means the same; ``steps`` counts the half-steps taken, ``passes`` the reads of
        the table (see :doc:`/guide/performance`). NumPy and scipy.sparse inputs only.

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
        When ``steps=None`` stops without reaching ``tol`` (status "max_steps", "stalled" or
        "failed").

    Notes
    -----
    The result refers to ``table`` rather than copying it: its ``table`` is computed on first
    access, so modifying the input in place before then changes it (copy the input first if you
    reuse its buffer). The result's own arrays are read-only. float32 tables are summed in float32
    while iterating and checked in float64 at the end: a run is "converged" only if the returned
    table is within ``tol``. A ``tol`` below the dtype's resolution cannot be certified (such runs
    end "stalled"); status "failed" means a scaling overflowed, for tables whose entries span more
    orders of magnitude than scalings can carry (use :func:`balance_logits` on their logs).

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
    check.progress_option(progress)
    acceleration = check.acceleration_option(acceleration)
    if kernels.is_array_api(table):
        return _api_balance(table, p_x, p_y, log=False, steps=steps, start=start, tol=tol, max_steps=max_steps,
                            progress=progress, acceleration=acceleration)
    kernel = kernels.kernel_for(table)
    tol = check.tolerance(tol, kernel.dtype)
    targets = _two_targets(kernel, p_x, p_y)
    problem = _problem(kernel, targets, ["p_x", "p_y"], ["Row", "Column"], first=_first(start), steps=steps)
    runner = _accelerate.wrap(kernel, acceleration, steps, _first(start))
    outcome, known = _solve(runner, problem, steps=steps, tol=tol, max_steps=max_steps,
                            deficit=_max_flow_check(kernel, targets, "table"), progress=progress,
                            desc="balance_table", remeasured=kernel.dtype == np.float32)
    u, v = kernel.export(outcome.state, problem.export_scales())
    outcome, reason = _float64_check(kernel, outcome, problem, tol, (u, v))
    _ipf.warn_if_unconverged(outcome, tol, reason or _slow_hint(outcome, acceleration))
    return BalanceResult(u, v, steps=outcome.steps, status=outcome.status, marginal_error=outcome.errors,
                         passes=runner.passes,
                         _input=table if kernels.is_sparse(table) else kernel.table, _targets=tuple(targets),
                         _known_feasible=known)


def balance_logits(logits, p_x: Marginal, p_y: Marginal, *, steps: int | None = None, start: str = "x",
                   tol: float | None = None, max_steps: int = 10_000,
                   progress: bool | _progress.Progress = False, acceleration: str = "none") -> LogBalanceResult:
    """Balance ``exp(logits)`` without leaving log space: stable for logits spanning +-1e4.

    Parameters
    ----------
    logits : array_like, shape (..., m, l)
        Log masses (float32 or float64); ``-inf`` marks a structural zero and stays ``-inf``.
        Leading axes are a batch (e.g. per-batch CLIP logit matrices). PyTorch, JAX, CuPy (any
        array-API) arrays are balanced in their namespace, on their device, differentiably; their
        potentials keep the logits' dtype (:doc:`/guide/array_api`).
    p_x, p_y, steps, start, tol, max_steps, progress, acceleration
        As in :func:`balance_table`.

    Returns
    -------
    LogBalanceResult
        Potentials ``f, g`` with ``log_table = f[..., :, None] + logits + g[..., None, :]``. They are
        float64 even for float32 logits (a float32 potential of size 1e4 is rounded by ~1e-3, which
        would move every entry of the table by that relative amount); ``table`` and ``log_table``
        have the logits' dtype. ``table`` is the iteration's buffer scaled by the last scalings
        (the result holds the buffer; no second exponentiation). The final marginal errors are
        measured in float64 on ``table`` for float32 logits; when rounding the potentials in
        float64 matters (logits of size ~1e15 and beyond), they are measured on
        ``exp(logits + f + g)`` and such a run is not called converged.

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
    underflow are then smaller than the float resolution of every sum they enter. ``logits + f + g``
    is summed in float64; float32 logits are then exponentiated in float32, which moves an entry
    ``exp(x)`` by at most ``|x| 2**-24`` relative (``|x| < 2 log(1e8) = 36.8`` for every entry
    above 1e-8 of its row's largest, so at most about 2.2e-6).

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
    check.progress_option(progress)
    acceleration = check.acceleration_option(acceleration)
    if kernels.is_array_api(logits):
        return _api_balance(logits, p_x, p_y, log=True, steps=steps, start=start, tol=tol, max_steps=max_steps,
                            progress=progress, acceleration=acceleration)
    arr = check.dense_array(logits, "logits", min_ndim=2)
    dtype = check.working_dtype(arr.dtype, "logits")
    arr = arr.astype(dtype, copy=False)
    # the maxima of the lines the first step rescales centre the kernel and serve the validation
    from ._kernels.fused import line_extremes

    axis = -1 if _first(start) == 0 else -2  # one read gives both where numba runs
    line_max, lowest = line_extremes(arr, axis) or (arr.max(axis=axis, initial=-np.inf), None)
    has_zeros, magnitude = check.logits_entries(arr, "logits", line_max, lowest)
    tol = check.tolerance(tol, dtype)
    kernel = kernels.log_kernel(arr, _first(start), has_zeros, line_max)
    targets = _two_targets(kernel, p_x, p_y)
    problem = _problem(kernel, targets, ["p_x", "p_y"], ["Row", "Column"], first=_first(start), steps=steps,
                       name="logits")
    runner = _accelerate.wrap(kernel, acceleration, steps, _first(start))
    outcome, known = _solve(runner, problem, steps=steps, tol=tol, max_steps=max_steps,
                            deficit=_max_flow_check(kernel, targets, "logits"), progress=progress,
                            desc="balance_logits", remeasured=kernel.dtype == np.float32)
    scales = problem.export_scales()
    f, g = kernel.export(outcome.state, scales)
    scalings = kernel.buffer_scalings(outcome.state, scales)
    eps = np.finfo(np.float64).eps
    if 8 * eps * (magnitude + np.abs(f).max(initial=0) + np.abs(g).max(initial=0)) > tol / 10:
        # Potentials of size F are rounded to about 1e-16 F, which moves every entry of the table
        # they give by that much: for logits near 1e15 they cannot represent the balanced table.
        # The errors (and `table`) are then those of exp(logits + f + g); such a run is not called
        # converged ("stalled": no more steps help).
        sums, scalings, why = list(kernels.log.exp_line_sums(arr, f, g)), None, check.unrepresentable(magnitude)
    elif dtype == np.float32 and scalings is not None:  # float32 working sums: measured in float64
        sums, why = kernel.float64_sums(scalings), check.float32_resolution()
        if not all(np.isfinite(s).all() for s in sums):  # the buffer overflowed float32 after a last reset
            sums, scalings = list(kernels.log.exp_line_sums(arr, f, g)), None
    else:
        sums, why = None, ""
    measured = outcome if sums is None else _ipf.remeasured(outcome, problem, sums, tol)
    lost = outcome.converged and not measured.converged
    outcome = measured
    _ipf.warn_if_unconverged(outcome, tol, why if lost else _slow_hint(outcome, acceleration))
    return LogBalanceResult(f, g, steps=outcome.steps, status=outcome.status, marginal_error=outcome.errors,
                            passes=runner.passes, _input=arr, _targets=tuple(targets), _known_feasible=known,
                            _buffer=[] if scalings is None else [(kernel.table, scalings)])


def _slow_hint(outcome, acceleration: str) -> str:
    """The advice for a plain run that used up ``max_steps`` (empty otherwise: the usual advice)."""
    return check.max_steps_plain() if outcome.status == "max_steps" and acceleration == "none" else ""


def _float64_check(kernel, outcome, problem, tol, scalings):
    """float32 tables are summed in float32 while iterating; their final errors are measured in
    float64 on the table that is returned (``scalings`` exported), and a run is converged only if
    that table is within ``tol``. Returns the outcome and the reason for a lost convergence."""
    if kernel.dtype != np.float32 or outcome.steps == 0:
        return outcome, ""
    measured = _ipf.remeasured(outcome, problem, kernel.float64_sums(scalings), tol)
    lost = outcome.converged and not measured.converged
    return measured, check.float32_resolution() if lost else ""


def iterate_balance(table: TableLike, p_x: Marginal, p_y: Marginal, *, start: str = "x") -> Iterator[BalanceResult]:
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
    kernel = kernels.kernel_for(table)
    targets = _two_targets(kernel, p_x, p_y)
    problem = _problem(kernel, targets, ["p_x", "p_y"], ["Row", "Column"], first=_first(start), steps=None)
    history = _ipf.History(kernel.batch, 2)
    scales = problem.export_scales()
    source = table if kernels.is_sparse(table) else kernel.table
    for k, state, errors in _ipf.half_steps(kernel, problem):
        history.append(errors)
        u, v = kernel.export(state, scales)
        yield BalanceResult(u, v, steps=k, status="completed", marginal_error=history.view(), _input=source,
                            _targets=tuple(targets))


@dataclass(frozen=True, eq=False, repr=False)
class MarginsResult(_Outcome):
    """The outcome of :func:`balance_margins`.

    Attributes
    ----------
    factors : tuple of ndarray
        One scaling per margin, in the order of ``margins``, each of its target's shape (axes in the
        key's order): ``table == input * prod(factors)``, each broadcast over its margin's axes.
    keys : tuple
        The margins' keys, in order.
    steps : int
        Half-steps performed; a half-step is one margin's projection, a sweep is ``K`` of them.
    status : str
        As in :class:`BalanceResult`.
    marginal_error : ndarray, shape (steps + 1, K)
        L1 distance of every margin of iterate k from its target, divided by the target total; row 0
        is the input.
    feasible : bool or None
        Whether a table with every target margin exists on the input's support: a max-flow for two
        one-way margins of a 2-D table, a linear program (HiGHS) otherwise when the support has at
        most 10 000 cells; ``None`` when it is larger and the run did not converge.
    """

    factors: tuple
    keys: tuple = field(repr=False)
    _axes: tuple = field(default=(), repr=False)

    def _describe(self) -> str:
        return f"shape {tuple(self._input.shape)}, margins {list(self.keys)}"

    @cached_property
    def table(self):
        """The balanced table ``input * prod(factors)`` (a new array; sparse input stays sparse)."""
        if self._input.ndim == 2 and sorted(self._axes) == [(0,), (1,)]:  # as balance_table computes it
            u, v = self.factors if self._axes[0] == (0,) else self.factors[::-1]
            return kernels.scaled_table(self._input, u, v)
        out = np.array(self._input, copy=True)
        for f, ax in zip(self.factors, self._axes, strict=True):
            shape = [1] * out.ndim
            for a in ax:
                shape[a] = out.shape[a]
            out *= np.transpose(f, np.argsort(ax)).reshape(shape)
        return out

    @cached_property
    def feasible(self) -> bool | None:  # type: ignore[override]
        """Whether the balanced table exists (decided on first access when the run did not)."""
        if self._known_feasible is not None:
            return self._known_feasible
        axes = [tuple(sorted(ax)) for ax in self._axes]
        if len(self._input.shape) == 2 and sorted(axes) == [(0,), (1,)]:
            p_x, p_y = (self._targets[i] for i in np.argsort([ax[0] for ax in axes]))
            return _feasibility.deficit(kernels.support_pattern(self._input), p_x, p_y) is None
        lost = _lp_lost(_feasibility.support_codes(self._input, axes), self._targets)
        return None if lost is None else lost <= LP_FEASIBILITY_TOL


def _lp_lost(codes, targets) -> float | None:
    """The share of the mass a linear program cannot place on the cells (None: too many cells)."""
    return None if codes is None else _feasibility.lp_deficit(codes, list(targets))


#: A linear program that cannot place more than this share of the total mass calls the problem
#: infeasible (HiGHS solves to about 1e-9).
LP_FEASIBILITY_TOL = 1e-7


def balance_margins(table: TableLike, margins: Mapping, *, steps: int | None = None, tol: float | None = None,
                    max_steps: int | None = None, progress: bool | _progress.Progress = False) -> MarginsResult:
    """Rescale an N-d table so that any number of its one- and multi-way margins match targets.

    Raking (iterative proportional fitting) to K margins: half-step k rescales the table so that
    margin ``((k - 1) mod K)`` (in the order of ``margins``) equals its target exactly. Each
    half-step is the KL projection onto the tables with that margin; the limit is the KL projection
    onto the tables with all of them. A *sweep* is K half-steps (R's ``rake(..., control =
    list(maxit))`` counts sweeps).

    Parameters
    ----------
    table : array_like, shape (n_0, ..., n_{d-1}), or a 2-D scipy.sparse matrix
        Nonnegative counts or weights; zeros are structural. float32 stays float32. A sparse table
        takes the two one-way margins 0 and 1 only.
    margins : mapping
        In cycle order, from an axis (``int``) or a tuple of axes (a joint margin) to the target:
        an array of that sub-table's shape, its axes in the key's order. Targets are nonnegative with
        equal totals, and margins that share axes must agree on their common sub-margin.
    steps : int, optional
        Run exactly this many half-steps (status ``"completed"``); ``None`` iterates until every margin
        is within ``tol``.
    tol : float, optional
        Convergence tolerance on every margin's L1 error relative to the total. Default 1e-10
        (float64) or 1e-5 (float32).
    max_steps : int, optional
        Budget of half-steps for ``steps=None``; default 5000 sweeps (``5000 * K``).
    progress : bool or callable
        As in :func:`balance_table`.

    Returns
    -------
    MarginsResult
        The factors (one per margin), status, the error of every margin after every half-step;
        ``.table`` gives the balanced table.

    Raises
    ------
    ValueError, TypeError
        Invalid input (messages name the parameter): an axis out of range or repeated in a key, a
        target of the wrong shape, negative or non-finite, totals that differ, overlapping margins
        that disagree, a margin cell with a positive target and no mass.
    InfeasibleError
        With ``steps=None``, when no table on the support has these margins: a max-flow for two
        one-way margins, a linear program otherwise (supports of at most 10 000 cells, run only if
        the loop has not converged after 100 half-steps: convergence proves feasibility; larger
        supports report what the iteration shows). Pairwise-consistent margins can still be
        infeasible.

    Warns
    -----
    ConvergenceWarning
        When ``steps=None`` stops without reaching ``tol``.

    Notes
    -----
    ``balance_table(T, p_x, p_y, start="x")`` is ``balance_margins(T, {0: p_x, 1: p_y})``: the same
    loop (:mod:`databalance._ipf`) on the same kernel. With K >= 3 margins a half-step needs the
    sums of the other K - 1 margins (the next step's input and every margin's error); margins that
    leave a common set of axes untouched share one contraction of the table, so a half-step costs
    one or a few reads of the table (a sweep of three one-way and one two-way margin of a 200^3
    table: 0.8x the time NumPy takes to sum the table once per margin; benchmarks/RESULTS.md).

    Examples
    --------
    >>> import numpy as np
    >>> from databalance import balance_margins
    >>> T = np.ones((2, 3, 2))
    >>> res = balance_margins(T, {0: [.3, .7], (1, 2): [[.1, .1], [.2, .2], [.1, .3]]})
    >>> res.status, res.table.sum(axis=(1, 2)).round(12).tolist()
    ('converged', [0.3, 0.7])
    >>> res.marginal_error.shape  # (steps + 1, K)
    (3, 2)
    """
    steps = check.steps_option(steps)
    check.progress_option(progress)
    sparse = kernels.is_sparse(table)
    shape = table.shape if sparse else check.dense_array(table, "table", min_ndim=1).shape  # type: ignore[union-attr]
    axes, keys, targets = check.margin_targets(margins, shape)
    names = [f"margins[{k!r}]" for k in keys]
    K = len(axes)
    max_steps = 5000 * K if max_steps is None else check.positive_int(max_steps, "max_steps")
    if len(shape) == 2 and sorted(axes) == [(0,), (1,)]:
        return _two_margins(table, axes, keys, targets, names, steps=steps, tol=tol, max_steps=max_steps,
                            progress=progress)
    if sparse:
        raise TypeError("A scipy.sparse `table` takes the two one-way margins 0 and 1; for joint margins pass "
                        "a dense array.")
    kernel = kernels.TensorKernel.from_input(table, axes)
    tol = check.tolerance(tol, kernel.dtype)
    total = check.common_total(targets, names)
    check.consistent_margins(axes, targets, names, total)
    lines = [f"Margin {k!r} cell" for k in keys]
    problem = _problem(kernel, targets, names, lines, first=0, steps=steps, total=np.asarray(total))

    def deficit():
        lost = _lp_lost(_feasibility.support_codes(kernel.table, axes), targets)
        if lost is not None and lost > LP_FEASIBILITY_TOL:
            raise check.infeasible_margins(lost, names)
        return lost is not None

    outcome, known = _solve(kernel, problem, steps=steps, tol=tol, max_steps=max_steps, deficit=deficit,
                            progress=progress, desc="balance_margins", costly=True,
                            remeasured=kernel.dtype == np.float32)
    exported = kernel.export(outcome.state, problem.export_scales())
    outcome, reason = _float64_check(kernel, outcome, problem, tol, exported)
    _ipf.warn_if_unconverged(outcome, tol, reason)
    user_axes = [_key_axes(k, len(shape)) for k in keys]
    factors = [np.transpose(f, np.argsort(np.argsort(ax))) for f, ax in zip(exported, user_axes, strict=True)]
    return MarginsResult(steps=outcome.steps, status=outcome.status, marginal_error=outcome.errors,
                         factors=tuple(factors), keys=tuple(keys), _input=kernel.table, _targets=tuple(targets),
                         _known_feasible=known, _axes=tuple(user_axes))


def _key_axes(key, ndim: int) -> tuple[int, ...]:
    """A margin's axes in the key's order, as nonnegative ints."""
    return tuple(int(a) % ndim for a in ((key,) if np.ndim(key) == 0 else key))


def _two_margins(table, axes, keys, targets, names, *, steps, tol, max_steps, progress) -> MarginsResult:
    """Two one-way margins of a 2-D table: the kernels and the feasibility check of balance_table."""
    kernel = kernels.kernel_for(table)
    tol = check.tolerance(tol, kernel.dtype)
    order = [axes.index((0,)), axes.index((1,))]  # kernel order: rows, then columns
    ordered = [targets[i] for i in order]
    problem = _problem(kernel, ordered, [names[i] for i in order], ["Row", "Column"], first=order.index(0),
                       steps=steps)
    outcome, known = _solve(kernel, problem, steps=steps, tol=tol, max_steps=max_steps,
                            deficit=_max_flow_check(kernel, ordered, "table"), progress=progress,
                            desc="balance_margins", remeasured=kernel.dtype == np.float32)
    factors = kernel.export(outcome.state, problem.export_scales())
    outcome, reason = _float64_check(kernel, outcome, problem, tol, factors)
    _ipf.warn_if_unconverged(outcome, tol, reason)
    back = np.argsort(order)  # kernel order -> the user's order
    source = table if kernels.is_sparse(table) else kernel.table
    return MarginsResult(steps=outcome.steps, status=outcome.status, marginal_error=outcome.errors[:, back],
                         factors=tuple(factors[i] for i in back), keys=tuple(keys), _input=source,
                         _targets=tuple(targets), _known_feasible=known,
                         _axes=tuple(axes))


@dataclass(frozen=True, eq=False, repr=False)
class CellsResult(_Outcome):
    """The balancing of a sample's occupied cells towards K margins (``BalancedEstimator.balance_``).

    Attributes
    ----------
    factors : tuple of ndarray
        One scaling per margin, in the order of the estimator's ``margins``, of that margin's
        target shape: a sample in cell c gets weight ``d_i * prod_j factors[j][c's category]``.
    keys : tuple
        The margins' keys (column names, or tuples of them for joint margins).
    steps, status, converged, marginal_error
        As in :class:`MarginsResult`: every margin's L1 error after every half-step.
    cell_masses : ndarray
        The balanced mass of each occupied cell (the estimator's order of cells).
    feasible : bool or None
        Whether the targets can be met on the occupied cells (a max-flow for two margins, a linear
        program for more when there are at most 10 000 cells; ``None`` when undecided).
    """

    factors: tuple
    keys: tuple = field(repr=False)
    _codes: tuple | None = field(default=(), repr=False)  # None: the Dask samples path (no LP)
    _trace: tuple = field(default=(), repr=False)  # the starting scalings, then each half-step's
    _final: Any = field(default=None, repr=False)  # the last iterate's cell masses, of total 1

    def iterate_factors(self) -> tuple:
        """The starting scaling of every margin (K arrays), then the scaling each half-step set, in
        order (step j sets margin ``(j - 1) mod K``'s), all in the loop's internal frame: there,
        iterate j >= 1 is ``cell mass * prod of every margin's latest scaling``, of total 1."""
        return self._trace

    def _describe(self) -> str:
        return f"{len(self._input)} occupied cells, margins {list(self.keys)}"

    @cached_property
    def cell_masses(self) -> np.ndarray:
        """The balanced mass of each cell (the targets' total)."""
        if self.steps == 0:
            if kernels.is_dask_array(self._input):  # the Dask samples path: lazy, as after any step
                return self._input.astype(np.float64)
            return np.array(self._input, dtype=np.float64)
        return self._final * float(np.sum(self._targets[0]))

    @cached_property
    def feasible(self) -> bool | None:  # type: ignore[override]
        if self._known_feasible is not None:
            return self._known_feasible
        lost = _lp_lost(None if self._codes is None else list(self._codes), self._targets)
        return None if lost is None else lost <= LP_FEASIBILITY_TOL


def balance_cells(codes: list[np.ndarray] | None, shapes: list[tuple[int, ...]], mass: np.ndarray | None,
                  targets: list, keys: list, *, steps: int | None = None, tol: float | None = None,
                  max_steps: int | None = None, progress: bool | _progress.Progress = False,
                  margin_sums: list[np.ndarray] | None = None, kernel: Any = None) -> CellsResult:
    """Balance a table given by its occupied cells (each cell's category in every margin, and its
    mass) towards the margins' targets (validated arrays of ``shapes``), in the order given;
    ``margin_sums``, each margin's sums of ``mass`` when the caller has them.

    The sample-level form of :func:`balance_margins`: the same loop, on the cells only. ``kernel``,
    a kernel of the cells to use instead (the Dask samples path's, whose cells are the samples
    on the workers; ``codes`` and ``mass`` are then None: no linear-programming check).
    """
    names = [f"margins[{k!r}]" for k in keys]
    if kernel is None:
        assert codes is not None and mass is not None  # the cells in memory
        kernel = kernels.CellKernel(list(codes), list(shapes), np.asarray(mass, dtype=np.float64), margin_sums)
    tol = check.tolerance(tol, kernel.dtype)
    max_steps = 5000 * len(shapes) if max_steps is None else check.positive_int(max_steps, "max_steps")
    total = check.common_total(targets, names)
    lines = [f"Margin {k!r} cell" for k in keys]
    problem = _problem(kernel, targets, names, lines, first=0, steps=steps, total=np.asarray(total),
                       name="samples")

    def deficit():
        support = None if codes is not None else getattr(kernel, "two_margin_support", lambda: None)()
        if support is not None:  # the Dask samples path: max-flow on the two margins' occupied cells
            found = _feasibility.deficit(support, targets[0].ravel(), targets[1].ravel())
            if found is not None:
                raise check.infeasible_margins(max(found.row_mass - found.col_mass, 0.0) / float(total), names,
                                               "samples")
            return True
        lost = _lp_lost(None if codes is None else list(codes), targets)
        if lost is not None and lost > LP_FEASIBILITY_TOL:
            raise check.infeasible_margins(lost, names, "samples")
        return lost is not None

    trace: list = []
    outcome, known = _solve(kernel, problem, steps=steps, tol=tol, max_steps=max_steps, deficit=deficit,
                            progress=progress, desc="raking", trace=trace, costly=True)
    _ipf.warn_if_unconverged(outcome, tol)
    factors = kernel.export(outcome.state, problem.export_scales())
    return CellsResult(steps=outcome.steps, status=outcome.status, marginal_error=outcome.errors,
                       factors=tuple(factors), keys=tuple(keys), _input=kernel.table, _targets=tuple(targets),
                       _known_feasible=known, _codes=None if codes is None else tuple(codes), _trace=tuple(trace),
                       _final=kernel.current_masses(outcome.state))
