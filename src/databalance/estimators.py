"""Balanced expectations from paired samples, with weights, standard errors and intervals.

With n samples (x_i, y_i, h_i) and known marginals of X and Y, the k-step estimator of E[h] is
the mean of h under the sample's (weighted) empirical table balanced for k half-steps: survey
statisticians call the limit raking, ML users balancing a batch. Sample i gets weight
``w_i ~ d_i u[x_i] v[y_i]`` (``d`` the design weights, ``u, v`` the table's scalings).

The standard error comes from the influence function IF_k = C_1 ... C_k h (THEORY.md §3), estimated
by plug-in: conditional means of the (design-weighted) sample, applied in order (the last step's
projection first), and the result weighted by the balanced weights. Every IF_k is
h - est - a(x) - b(y), so the plug-in needs only the m x l table of sample counts
(``databalance._joint.additive_shift``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.special import ndtri

from . import _validation as check
from .balance import BalanceResult, balance_table
from ._joint import Joint, additive_shift

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
        ``sqrt(n / (n - 1) * sum_i (w_i psi_i - mean)^2)`` with ``psi`` the plug-in influence
        function; the linearisation convention of survey software.
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

    def __init__(self, p_x, p_y, *, steps: int | None = None, start: str = "x",
                 tol: float | None = None, empty: str = "error"):
        self.p_x, self.p_y = p_x, p_y
        self.steps, self.start, self.tol, self.empty = steps, start, tol, empty

    def fit(self, x, y, sample_weight=None) -> BalancedEstimator:
        """Balance the samples' table; sets ``weights_``, ``balance_`` and the category lists."""
        steps = check.steps_option(self.steps)
        start = check.start_option(self.start)
        empty = check.empty_policy(self.empty)
        x = check.sample_array(x, "x", None)
        n = x.shape[0]
        y = check.sample_array(y, "y", n)
        design = None if sample_weight is None else check.sample_weights(sample_weight, n)
        if n < 2:
            raise ValueError(f"Need at least 2 samples to estimate a standard error; got {n}.")
        xc, p_x, self.x_categories_ = check.encode(x, self.p_x, "x", "p_x")
        yc, p_y, self.y_categories_ = check.encode(y, self.p_y, "y", "p_y")
        m, l = len(p_x), len(p_y)
        table = _sample_table(xc, yc, design, m, l)
        row_mass = np.asarray(table.sum(axis=1)).ravel()
        col_mass = np.asarray(table.sum(axis=0)).ravel()
        if empty == "drop":
            p_x, p_y = _drop_empty(p_x, row_mass), _drop_empty(p_y, col_mass)
        check.unsampled(row_mass, p_x, self.x_categories_, "x", "p_x")
        check.unsampled(col_mass, p_y, self.y_categories_, "y", "p_y")
        result = balance_table(table, p_x, p_y, steps=steps, start=start, tol=self.tol)
        u, v = result.row_scaling, result.col_scaling
        w = u[xc] * v[yc]
        if design is not None:
            w *= design
        w /= w.sum()
        self.balance_, self.weights_ = result, w
        self._codes, self._start = (xc, yc), start
        self._start_weights = np.full(n, 1.0 / n) if design is None else design / design.sum()
        self._projection = _projection_joint(result)
        # A run stopped early (max_steps, stalled) is treated as converged: its limit is the target.
        self._if_steps = result.steps if result.status == "completed" else None
        return self

    def mean(self, values) -> BalancedEstimate:
        """The balanced estimate of E[h] from ``values`` = h at each fitted sample, (n,) or (n, d)."""
        if not hasattr(self, "weights_"):
            raise RuntimeError("Call fit(x, y) before mean(values).")
        h = check.sample_values(values)
        n = self.weights_.shape[0]
        if h.shape[0] != n:
            raise ValueError(f"`values` has {h.shape[0]} entries but {n} samples were fitted.")
        w = self.weights_
        h2 = h.reshape(n, -1)
        estimate = w @ h2
        psi = _influence(h2 - estimate, self._start_weights, self._codes, self._projection, self._if_steps,
                         self._start)
        z = psi
        z *= w[:, None]
        z -= z.mean(axis=0)
        se = np.sqrt(n / (n - 1) * np.einsum("ij,ij->j", z, z))
        squeeze = (lambda a: float(a[0])) if h.ndim == 1 else (lambda a: a)
        steps = self.balance_.steps
        return BalancedEstimate(squeeze(estimate), squeeze(se), w, steps, self.balance_)


def _sample_table(xc, yc, weights, m, l):
    """The (weighted) counts of the m x l cells: dense when small, CSR otherwise."""
    if m * l <= DENSE_CELLS:
        return np.bincount(xc * l + yc, weights=weights, minlength=m * l).reshape(m, l).astype(np.float64)
    data = np.ones(len(xc)) if weights is None else weights
    table = sp.csr_array((data, (xc, yc)), shape=(m, l))
    table.sum_duplicates()
    return table


def _drop_empty(target, mass):
    kept = np.where(mass > 0, target, 0.0)
    if not kept.sum() > 0:
        raise ValueError("With empty='drop' no target category has a sample left.")
    return kept * (target.sum() / kept.sum())


def _projection_joint(result):
    """The starting sample's table restricted to categories with mass, as a _Joint, and the kept
    row and column indices: what every influence-function computation of a fit shares."""
    table = result._input
    tr = np.asarray(table.sum(axis=1)).ravel()
    tc = np.asarray(table.sum(axis=0)).ravel()
    rows, cols = np.flatnonzero(tr > 0), np.flatnonzero(tc > 0)
    sub = table[rows][:, cols] if not sp.issparse(table) else sp.csr_array(table)[rows][:, cols]
    return Joint(sub, tr[rows], tc[cols]), rows, cols, (len(tr), len(tc))


def _influence(g, start_weights, codes, projection, steps, start):
    """Plug-in IF_k at each sample: g - a(x) - b(y), the conditional means taken under the
    starting (design-weighted) empirical measure, as in linearisation variance estimators.
    Categories without samples carry no weight and are left out of the projections."""
    xc, yc = codes
    joint, rows, cols, (m, l) = projection
    d = g.shape[1]
    wg = start_weights[:, None] * g
    pr = np.column_stack([np.bincount(xc, wg[:, j], minlength=m) for j in range(d)])
    qc = np.column_stack([np.bincount(yc, wg[:, j], minlength=l) for j in range(d)])
    a_sub, b_sub = additive_shift(joint, pr[rows], qc[cols], steps=steps, start=start)
    a, b = np.zeros((m, d)), np.zeros((l, d))
    a[rows], b[cols] = a_sub, b_sub
    out = g - a[xc]
    out -= b[yc]
    return out


def balanced_mean(values, x, y, p_x, p_y, *, steps: int | None = None, start: str = "x",
                  tol: float | None = None, sample_weight=None, empty: str = "error") -> BalancedEstimate:
    """Estimate E[h(X, Y)] from paired samples when the marginals of X and Y are known.

    Parameters
    ----------
    values : array_like (n,) or (n, d)
        h at each sample (d statistics at once in the columns).
    x, y : array_like (n,)
        Each sample's categories: integer codes (with array targets) or any hashable labels (with
        mapping targets); pandas Series and Categoricals are accepted.
    p_x, p_y : array_like or mapping
        The known marginals; see :class:`BalancedEstimator`.
    steps : int, optional
        ``k`` gives the paper's k-step estimator; ``None`` (default) balances to convergence
        (raking). ``0`` is the plain (design-weighted) sample mean with its usual standard error.
    start, tol, empty
        See :class:`BalancedEstimator`.
    sample_weight : array_like (n,), optional
        Design weights: the starting measure is the weighted empirical one.

    Returns
    -------
    BalancedEstimate

    Raises
    ------
    ValueError, TypeError
        Lengths that differ; NaN or inf in ``values`` or ``sample_weight``; negative weights; a
        sample label the targets do not list; a target category with mass but no sample (unless
        ``empty="drop"``); targets whose totals differ; an infeasible pattern (as in
        :func:`databalance.balance_table`).

    Notes
    -----
    At convergence the estimate is the raking estimator, and the standard error linearises it as
    R's ``survey`` package does (``svymean`` on a ``rake()``-d design): residuals of ``h`` after
    weighted least squares on the X and Y categories. R computes those residuals with 10 passes of
    alternating projections; here they are solved exactly, which differs only when the passes have
    not converged. At finite k there is no survey-software analogue: the residual is the plug-in
    influence function of the k-step estimator, ``C_1 ... C_k (h - estimate)``, which for k = 1 is
    post-stratification on X.

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
    estimator = BalancedEstimator(p_x, p_y, steps=steps, start=start, tol=tol, empty=empty)
    n = check.sample_values(values).shape[0]
    check.sample_array(x, "x", n)
    return estimator.fit(x, y, sample_weight).mean(values)
