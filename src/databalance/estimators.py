"""Balanced expectations from paired samples, with weights, standard errors and intervals.

With n samples (x_i, y_i, h_i) and known marginals of X and Y, the k-step estimator of E[h] is
the mean of h under the sample's (weighted) empirical table balanced for k half-steps: survey
statisticians call the limit raking, ML users balancing a batch. Sample i gets weight
``w_i ~ d_i u[x_i] v[y_i]`` (``d`` the design weights, ``u, v`` the table's scalings).

The standard error linearises the estimate: each sample's term of its influence function, psi_i,
from the chain ``L_1 ... L_k (h - estimate)`` of the balancing steps (theory page, section
'Linearising at the balanced measure'), or, with ``linearization="survey"``, R survey's plug-in
``C_1 ... C_k (h - estimate)`` of the starting sample (section 'Influence functions and the
variance profile'). Within a cell of the sample's table psi is ``alpha(c) h + beta(c)``, so the
chain runs on the m x l table of occupied cells (``databalance._joint``) and each sample only
gathers its cell's two numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import ndtri

from . import _validation as check
from ._joint import Cells, limit_linearization, step_linearization
from .balance import BalanceResult, balance_table

__all__ = ["BalancedEstimate", "BalancedEstimator", "balanced_mean"]

#: Tables with more cells than this are built sparse (only the observed cells are stored).
DENSE_CELLS = 4 * 10**6


@dataclass(frozen=True, eq=False)
class BalancedEstimate:
    """A balanced estimate of E[h] with its standard error.

    Attributes
    ----------
    estimate : float or ndarray (d,)
        ``sum_i w_i h_i``.
    standard_error : float or ndarray (d,)
        ``sqrt(n / (n - 1) * sum_i (z_i - mean z)^2)`` with ``z_i`` sample i's term of the
        linearised estimate (see :func:`balanced_mean`, Notes); the convention of survey software.
    weights : ndarray (n,)
        The balanced sample weights; they sum to 1.
    steps : int
        Half-steps of balancing performed.
    balance : BalanceResult
        The balancing run of the sample's table (status, marginal errors, scalings).
    """

    estimate: float | np.ndarray
    standard_error: float | np.ndarray
    weights: np.ndarray = field(repr=False)
    steps: int
    balance: BalanceResult = field(repr=False)

    def confidence_interval(self, level: float = 0.95) -> tuple:
        """Normal-approximation interval ``estimate -+ z * standard_error``, as (low, high)."""
        z = float(ndtri(0.5 + check.confidence_level(level) / 2))
        return self.estimate - z * self.standard_error, self.estimate + z * self.standard_error

    @property
    def effective_sample_size(self) -> float:
        """Kish's ``(sum w)^2 / sum w^2``: the size of an unweighted sample as precise (for a
        constant-variance h) as this weighted one."""
        return float(1.0 / np.dot(self.weights, self.weights))


class BalancedEstimator:
    """Fit balancing weights once for samples (x, y), then estimate the mean of many functions.

    Parameters
    ----------
    p_x, p_y : array_like or mapping
        Known marginals of X and Y: arrays indexed by integer codes, or mappings label -> mass
        (dict, pandas Series). Totals need not be 1 but must agree.
    steps : int, optional
        Half-steps of balancing (the paper's k); ``None`` balances to convergence (raking).
    start : {"x", "y"}
        Which marginal the first half-step fixes.
    tol : float, optional
        Convergence tolerance for ``steps=None`` (see :func:`databalance.balance_table`).
    empty : {"error", "drop"}
        A target category with positive mass but no sample cannot be reached. ``"error"`` (default)
        raises, naming it; ``"drop"`` sets its target mass to 0 and rescales the other targets to
        the same total (the estimate then describes the population without those categories).
    linearization : {"balanced", "survey"}
        How the standard error linearises the estimator. ``"balanced"`` (default): the influence
        function of the estimate with respect to the sampling distribution, with the conditional
        means of the balancing iterates; right whether or not the targets match the sampled
        population. ``"survey"``: conditional means of the starting (design-weighted) sample, R
        survey's convention, right only when the sample matches the targets in expectation. See
        :func:`balanced_mean`.

    Examples
    --------
    >>> from databalance import BalancedEstimator
    >>> x = ["a", "a", "b", "b", "b"]
    >>> y = [0, 1, 0, 1, 1]
    >>> est = BalancedEstimator({"a": .5, "b": .5}, [.5, .5]).fit(x, y)
    >>> est.weights_.round(3)
    array([0.293, 0.207, 0.207, 0.146, 0.146])
    >>> float(est.mean([1.0, 2.0, 3.0, 4.0, 4.0]).estimate)
    2.5
    """

    def __init__(self, p_x: ArrayLike | Mapping, p_y: ArrayLike | Mapping, *, steps: int | None = None,
                 start: str = "x", tol: float | None = None, empty: str = "error",
                 linearization: str = "balanced") -> None:
        self.p_x, self.p_y = p_x, p_y
        self.steps, self.start, self.tol, self.empty = steps, start, tol, empty
        self.linearization = linearization

    def fit(self, x: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | None = None) -> BalancedEstimator:
        """Balance the samples' table; sets ``weights_``, ``balance_`` and the category lists."""
        steps = check.steps_option(self.steps)
        start = check.start_option(self.start)
        empty = check.empty_policy(self.empty)
        linearization = check.linearization_option(self.linearization)
        x = check.sample_array(x, "x", None)
        n = x.shape[0]
        y = check.sample_array(y, "y", n)
        design = None if sample_weight is None else check.sample_weights(sample_weight, n)
        if n < 2:
            raise ValueError(f"Need at least 2 samples to estimate a standard error; got {n}.")
        xc, p_x, self.x_categories_ = check.encode(x, self.p_x, "x", "p_x")
        yc, p_y, self.y_categories_ = check.encode(y, self.p_y, "y", "p_y")
        m, l = len(p_x), len(p_y)
        cells, cell_of = _cells(xc, yc, design, m, l)
        row_mass, col_mass = cells.row_sums(cells.mass), cells.col_sums(cells.mass)
        if empty == "drop":
            p_x, p_y = _drop_empty(p_x, row_mass), _drop_empty(p_y, col_mass)
        check.unsampled(row_mass, p_x, self.x_categories_, "x", "p_x")
        check.unsampled(col_mass, p_y, self.y_categories_, "y", "p_y")
        result = balance_table(cells.table(cells.mass), p_x, p_y, steps=steps, start=start, tol=self.tol)
        u, v = result.row_scaling, result.col_scaling
        w = u[xc] * v[yc]
        if design is not None:
            w *= design
        w /= w.sum()
        self.balance_, self.weights_ = result, w
        self._cells, self._cell_of = cells, cell_of
        self._targets = (p_x / p_x.sum(), p_y / p_y.sum())
        self._start, self._linearization = start, linearization
        self._start_weights = np.full(n, 1.0 / n) if design is None else design / design.sum()
        # A run stopped early (max_steps, stalled) is treated as converged: its limit is the target.
        self._if_steps = result.steps if result.status == "completed" else None
        return self

    def mean(self, values: ArrayLike) -> BalancedEstimate:
        """The balanced estimate of E[h] from ``values`` = h at each fitted sample, (n,) or (n, d)."""
        if not hasattr(self, "weights_"):
            raise RuntimeError("Call fit(x, y) before mean(values).")
        h = check.sample_values(values)
        n = self.weights_.shape[0]
        if h.shape[0] != n:
            raise ValueError(f"`values` has {h.shape[0]} entries but {n} samples were fitted.")
        h2 = h.reshape(n, -1)
        scale = _power_of_two_scale(h2)
        if np.any(scale != 1.0):
            h2 = h2 / scale
        estimate = self.weights_ @ h2
        z = self._contributions(h2 - estimate)
        z -= z.mean(axis=0)
        # A sum of squares cannot be negative, but say so: rounding must never give NaN from sqrt.
        se = np.sqrt(np.maximum(n / (n - 1) * np.einsum("ij,ij->j", z, z), 0.0)) * scale
        estimate = estimate * scale
        squeeze = (lambda a: float(a[0])) if h.ndim == 1 else (lambda a: a)
        return BalancedEstimate(squeeze(estimate), squeeze(se), self.weights_, self.balance_.steps,
                                self.balance_)

    def _contributions(self, g: np.ndarray) -> np.ndarray:
        """Each sample's term of the linearised estimate, omega_i psi_i, for g = h - estimate (n, d).

        ``"balanced"``: d~_i psi_i with psi = L_1 ... L_k g at the iterates, whose cell factor
        alpha is the final weight ratio (so d~_i alpha = w_i). ``"survey"``: w_i (C_1 ... C_k g) under
        the starting measure. Only per-cell sums of g are scattered; the rest are gathers.
        """
        cells, cell_of = self._cells, self._cell_of
        d_norm = self._start_weights
        S = np.column_stack([np.bincount(cell_of, d_norm * g[:, j], minlength=len(cells.mass))
                             for j in range(g.shape[1])])
        balanced = self._linearization == "balanced"
        if self._if_steps is None:
            ratio = np.ones(len(cells.mass))
            if balanced:
                u, v = self.balance_.row_scaling, self.balance_.col_scaling
                ratio = u[cells.rows] * v[cells.cols]
                ratio *= cells.mass.sum() / (ratio * cells.mass).sum()
            _, beta = limit_linearization(cells, S, ratio)
        else:
            _, beta = step_linearization(cells, S, *self._targets, steps=self._if_steps,
                                             start=self._start, at_iterates=balanced)
        # omega_i alpha(c_i) is the balanced weight w_i in both conventions.
        z = g * self.weights_[:, None]
        z += beta[cell_of] * (d_norm if balanced else self.weights_)[:, None]
        return z


def _cells(xc: np.ndarray, yc: np.ndarray, design: np.ndarray | None, m: int, l: int):
    """The samples' occupied cells in row-major order (dense table when small, CSR otherwise) and
    each sample's cell."""
    key = xc * l + yc
    dense = m * l <= DENSE_CELLS
    if dense:  # a lookup over all m * l cells: no sort of the n keys
        position = np.cumsum(np.bincount(key, minlength=m * l) > 0) - 1
        flat = np.flatnonzero(np.diff(position, prepend=-1))
        cell_of = position[key]
    else:
        flat, cell_of = np.unique(key, return_inverse=True)
        cell_of = cell_of.ravel()
    mass = np.bincount(cell_of, weights=design, minlength=len(flat)).astype(np.float64)
    return Cells([flat // l, flat % l], [(m,), (l,)], mass, dense=dense), cell_of


def _drop_empty(target, mass):
    kept = np.where(mass > 0, target, 0.0)
    if not kept.sum() > 0:
        raise ValueError("With empty='drop' no target category has a sample left.")
    return kept * (target.sum() / kept.sum())


def _power_of_two_scale(h: np.ndarray) -> np.ndarray:
    """Per column, 1, or for values whose squares could overflow or underflow (max |h| beyond
    2^+-400) a power of 2 near max |h|: dividing by it is exact, and it keeps the sums of squares of
    the standard error finite (squares of values near 1e200 would be inf)."""
    top = np.maximum(h.max(axis=0), -h.min(axis=0))
    extreme = (top > 2.0**400) | ((top < 2.0**-400) & (top > 0))
    return np.where(extreme, np.exp2(np.floor(np.log2(np.where(extreme, top, 1.0)))), 1.0)


def balanced_mean(values: ArrayLike, x: ArrayLike, y: ArrayLike, p_x: ArrayLike | Mapping,
                  p_y: ArrayLike | Mapping, *, steps: int | None = None, start: str = "x",
                  tol: float | None = None, sample_weight: ArrayLike | None = None, empty: str = "error",
                  linearization: str = "balanced") -> BalancedEstimate:
    """Estimate E[h(X, Y)] from paired samples when the marginals of X and Y are known.

    Parameters
    ----------
    values : array_like (n,) or (n, d)
        h at each sample (d statistics at once in the columns).
    x, y : array_like (n,)
        Each sample's categories: integer codes (with array targets) or any hashable labels (with
        mapping targets); pandas Series and Categoricals are accepted. Missing labels (None, NaN)
        are an error.
    p_x, p_y : array_like or mapping
        The known marginals; see :class:`BalancedEstimator`.
    steps : int, optional
        ``k`` gives the paper's k-step estimator; ``None`` (default) balances to convergence
        (raking). ``0`` is the plain (design-weighted) sample mean with its usual standard error.
    start, tol, empty
        See :class:`BalancedEstimator`.
    sample_weight : array_like (n,), optional
        Design weights: the starting measure is the weighted empirical one.
    linearization : {"balanced", "survey"}
        ``"balanced"`` (default): the standard error of the estimate whatever population the
        sample came from. ``"survey"``: R survey's convention, for exact agreement with R. See the
        Notes.

    Returns
    -------
    BalancedEstimate

    Raises
    ------
    ValueError, TypeError
        Lengths that differ; NaN or inf in ``values`` or ``sample_weight``; strings in
        ``sample_weight`` or among the target masses; negative weights; a 2-D ``x`` or ``y``; a
        missing label (None, NaN); a sample label the targets do not list; a target category with
        mass but no sample (unless ``empty="drop"``); targets whose totals differ; an infeasible
        pattern (as in :func:`databalance.balance_table`); an unknown ``linearization``.

    Notes
    -----
    Both standard errors are ``sqrt(n / (n - 1) * sum_i (z_i - mean z)^2)``, the convention of
    survey software, with ``z_i`` sample i's term of the linearised estimate. They differ in where
    the estimator is linearised (theory page, section 'Linearising at the balanced measure').

    ``"balanced"`` uses the influence function of the k-step estimate with respect to the
    distribution the samples were drawn from: ``psi = L_1 ... L_k (h - estimate)`` with
    ``L_j g = w_j (g - E_j[g | margin j])``, the conditional means taken under the iterate the
    step j starts from and ``w_j`` the ratio of the target to that iterate's margin; ``z_i`` is
    the normalised design weight times ``psi_i``. At convergence ``psi`` is the final weight ratio
    times the residual of ``h`` after weighted least squares on additive functions of X and Y,
    weighted by the *balanced* table. It stays right when the sample's (design-weighted) marginals
    differ from the targets in expectation: quota samples, non-response, deliberately shifted
    targets.

    ``"survey"`` takes the conditional means of the *starting* sample and ``z_i`` = the balanced
    weight times the residual. At convergence this is R's ``survey`` (``svymean`` on a
    ``rake()``-d design; R solves the least squares with 10 passes of alternating projections,
    here exactly, which differs only when those passes have not converged). It is right when the
    sample matches the targets in expectation, and can then be slightly less noisy; when it does
    not match, it can be far off (twice the true standard error in the theory page's example).
    The two agree to first order when the sample matches the targets, and are equal at ``k = 0``.

    At finite k there is no survey-software analogue; with ``"survey"`` the residual is the
    plug-in ``C_1 ... C_k (h - estimate)`` of the starting sample, which for k = 1 is
    post-stratification on X.

    Intervals built from either standard error under-cover when heavily weighted cells hold only
    a few samples (see the user guide, "Estimation with standard errors").

    Examples
    --------
    >>> import numpy as np
    >>> from databalance import balanced_mean
    >>> rng = np.random.default_rng(0)
    >>> x, y = rng.integers(0, 2, 500), rng.integers(0, 3, 500)
    >>> h = x + y + rng.normal(size=500)
    >>> est = balanced_mean(h, x, y, [0.5, 0.5], [0.2, 0.3, 0.5])
    >>> round(est.estimate, 3), round(est.standard_error, 3)
    (1.722, 0.044)
    """
    estimator = BalancedEstimator(p_x, p_y, steps=steps, start=start, tol=tol, empty=empty,
                                  linearization=linearization)
    n = check.sample_values(values).shape[0]
    check.sample_array(x, "x", n)
    return estimator.fit(x, y, sample_weight).mean(values)
