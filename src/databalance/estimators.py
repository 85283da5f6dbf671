"""Balanced expectations from samples raked to any number of one- and multi-way margins, with
weights, standard errors, intervals and diagnostics.

With n samples, their categories in the margins' columns, values h and known population margins,
the k-step estimator of E[h] is the mean of h under the sample's (weighted) empirical distribution
balanced for k half-steps (one margin's projection each, in the order of ``margins``): survey
statisticians call the limit raking, ML users balancing a batch. Sample i gets the weight
``w_i ~ d_i prod_j f_j[sample i's category in margin j]`` (``d`` the design weights, ``f_j`` the
scalings of margin j).

Only the occupied cells are ever formed (the distinct combinations of the margin columns present in
the sample), never their cross-product. The standard error linearises the estimate: each sample's
term of its influence function, psi_i, from the chain ``L_1 ... L_k (h - estimate)`` of the
balancing steps (theory page, section 'Linearising at the balanced measure'), or, with
``linearization="survey"``, R survey's plug-in ``C_1 ... C_k (h - estimate)`` of the starting sample
(section 'Influence functions and the variance profile'). Within a cell psi is
``alpha(c) h + beta(c)``, so the chain runs on the cells (:mod:`databalance._joint`) and each sample
only gathers its cell's two numbers.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import ndtri

from . import _validation as check
from ._errors import ConvergenceWarning
from ._joint import Cells, limit_linearization, step_linearization
from ._summary import LabelledValues, MarginSummary, StatisticSummary, Summary
from .balance import CellsResult, balance_cells

__all__ = ["BalancedEstimate", "BalancedEstimator", "Diagnostics", "MarginCheck", "balanced_mean"]

#: Combined codes below this many possible cells find the occupied ones by a lookup table (no
#: sort of the n samples); above it, by ``np.unique``.
DENSE_CELLS = 4 * 10**6

#: A Dask fit warns when its samples fill more cells than this and than a quarter of the samples.
MANY_CELLS = 10**6

#: A Dask fit reduces its samples to their occupied cells when the margins' columns have at most
#: this many combinations (its cell table then holds at most ~200 MB whatever the samples); beyond
#: it the samples are their own cells, kept on the workers (user guide, "Samples and tables on Dask").
DASK_CELL_TABLE_MAX = 2**22

#: Sweeps of raking with the weights clipped to ``bounds`` before reporting that the bounds and the
#: margins cannot both hold.
TRIM_SWEEPS = 2000


@dataclass(frozen=True, eq=False)
class BalancedEstimate:
    """A balanced estimate of E[h] with its standard error.

    Attributes
    ----------
    estimate : float, ndarray (d,), pandas Series or LabelledValues
        ``sum_i w_i h_i``: a float for one statistic; for several, an array (NumPy ``values``), a
        pandas Series indexed by the column names (a DataFrame ``values``, or any labelled
        ``values`` after a fit on a DataFrame) or a :class:`~databalance.LabelledValues`
        keyed by the names (``values`` a mapping name -> array, without pandas).
    standard_error : like ``estimate``
        ``sqrt(n / (n - 1) * sum_i (z_i - mean z)^2)`` with ``z_i`` sample i's term of the
        linearised estimate (see :func:`balanced_mean`, Notes); the convention of survey software.
    weights : ndarray (n,) or pandas Series
        The balanced sample weights; they sum to 1. A Series on the index of the fitted DataFrame
        (or of the pandas input of :func:`balanced_mean`) when there was one.
    steps : int
        Half-steps of balancing performed.
    balance : CellsResult
        The balancing run of the sample's cells (status, every margin's error, factors).
    """

    estimate: Any
    standard_error: Any
    weights: Any = field(repr=False)
    steps: int
    balance: CellsResult = field(repr=False)
    _names: tuple | None = field(default=None, repr=False)
    _pandas: bool = field(default=False, repr=False)
    # For summary(): the values (n, d) by reference (never copied), the normalised design weights
    # (1/n without them) and the fit's diagnostics.
    _values: np.ndarray | None = field(default=None, repr=False)
    _start_weights: Any = field(default=None, repr=False)
    _diagnostics: Diagnostics | None = field(default=None, repr=False)
    # Dask estimates: the plain mean's standard error, from the per-cell moments (no values kept).
    _plain: np.ndarray | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        est, se = _raw(self.estimate), _raw(self.standard_error)
        n = self._diagnostics.n if self._diagnostics is not None else len(self.weights)
        run = f"{self.balance.status} after {self.steps} half-steps, n = {n}"
        if isinstance(est, float):
            return f"BalancedEstimate(estimate={est:.6g}, standard_error={se:.3g}; {run})"
        names = self._names if self._names is not None else tuple(range(len(est)))
        shown = ", ".join(f"{k!r}: {e:.6g} (SE {s:.3g})" for k, e, s in zip(names[:3], est, se, strict=False))
        more = f", ... {len(est) - 3} more" if len(est) > 3 else ""
        return f"BalancedEstimate({len(est)} statistics: {shown}{more};\n                 {run})"

    def confidence_interval(self, level: float = 0.95) -> tuple:
        """Normal-approximation interval ``estimate -+ z * standard_error``, as (low, high), labelled
        like ``estimate``."""
        z = float(ndtri(0.5 + check.confidence_level(level) / 2))
        est, se = _raw(self.estimate), _raw(self.standard_error)
        return self._label(est - z * se), self._label(est + z * se)

    @property
    def effective_sample_size(self) -> float:
        """Kish's ``(sum w)^2 / sum w^2``: the size of an unweighted sample as precise (for a
        constant-variance h) as this weighted one."""
        if self._plain is not None and self._diagnostics is not None:  # lazy Dask weights: the fit's sums
            return self._diagnostics.effective_sample_size
        w = np.asarray(self.weights)
        return float(1.0 / np.dot(w, w))

    def summary(self, level: float = 0.95) -> Summary:
        """The fit and these estimates at a glance: see :meth:`BalancedEstimator.summary`.

        The design effects are computed now from the ``values`` given to ``mean`` (held by
        reference, not copied: change them in place and the design effects change too).

        Examples
        --------
        Balancing on x and y removes the part of h they explain, so the balanced estimate's variance
        is about half that of the plain mean (deff 0.52):

        >>> import numpy as np
        >>> from databalance import balanced_mean
        >>> rng = np.random.default_rng(0)
        >>> x, y = rng.integers(0, 2, 500), rng.integers(0, 3, 500)
        >>> est = balanced_mean(x + y + rng.normal(size=500), x, y, [0.5, 0.5], [0.2, 0.3, 0.5])
        >>> stat = est.summary().statistics[0]
        >>> round(stat.standard_error, 4), round(stat.plain_standard_error, 4), round(stat.design_effect, 2)
        (0.0439, 0.0609, 0.52)
        """
        level = check.confidence_level(level)
        if self._diagnostics is None or (self._values is None and self._plain is None):
            raise ValueError(check.summary_unavailable())
        est, se = np.atleast_1d(_raw(self.estimate)), np.atleast_1d(_raw(self.standard_error))
        z = float(ndtri(0.5 + level / 2))
        plain = self._plain if self._plain is not None else _plain_standard_error(np.asarray(self._values),
                                                                                  self._start_weights)
        names = self._names if self._names is not None else (
            ("value",) if isinstance(_raw(self.estimate), float) else tuple(range(len(est))))
        with np.errstate(divide="ignore", invalid="ignore"):
            deff = np.where(plain > 0, (se / np.where(plain > 0, plain, 1.0)) ** 2, np.nan)
        stats = tuple(StatisticSummary(name, float(e), float(s), float(e - z * s), float(e + z * s), float(p),
                                       float(f)) for name, e, s, p, f in zip(names, est, se, plain, deff,
                                                                             strict=True))
        return _summarise(self._diagnostics, self.balance, stats, level)

    def _label(self, values):
        return _labelled(values, self._names, self._pandas)


@dataclass(frozen=True, eq=False)
class MarginCheck:
    """One margin of the fitted weights against its target.

    Attributes
    ----------
    key
        The margin's key in ``margins``.
    categories : tuple of lists
        The labels along each of the margin's columns (integer codes for array targets).
    achieved, target : ndarray
        The weighted sample's margin (scaled to the target's total) and the target, of the target's
        shape (one axis per column, in the key's order). ``empty="drop"`` shows the reduced target.
    error : float
        ``sum |achieved - target| / total``, the relative L1 error the convergence test uses.
    """

    key: Any
    categories: tuple
    achieved: np.ndarray = field(repr=False)
    target: np.ndarray = field(repr=False)
    error: float

    def __repr__(self) -> str:
        deviation = np.abs(self.achieved - self.target) / self.target.sum()
        at = self._category(int(np.argmax(deviation)))
        return (f"MarginCheck(key={self.key!r}, shape {self.target.shape}, error {self.error:.3g}, "
                f"largest deviation {float(deviation.max(initial=0.0)):.3g} at {at!r})")

    def _category(self, flat: int):
        """The label of the target's flat entry ``flat`` (a tuple for a joint margin)."""
        at = np.unravel_index(flat, self.target.shape)
        labels = tuple(levels[i] for levels, i in zip(self.categories, at, strict=True))
        return labels[0] if len(labels) == 1 else labels


@dataclass(frozen=True, eq=False)
class Diagnostics:
    """What to check before trusting weights (``BalancedEstimator.diagnostics_``).

    Attributes
    ----------
    n : int
        Samples fitted.
    design_effect : float
        Kish's design effect of the weights, ``n sum w^2 / (sum w)^2`` (1 for equal weights): the
        factor by which weighting inflates the variance of a mean of a constant-variance h.
    effective_sample_size : float
        ``n / design_effect``.
    min_weight, max_weight : float
        The smallest and largest weight relative to the mean weight.
    margins : tuple of MarginCheck
        Every margin's achieved table against its target, in cycle order.
    bounds_met : bool or None
        With ``bounds``: whether weights clipped to them met every margin within ``tol``;
        ``None`` without bounds.
    """

    n: int
    design_effect: float
    effective_sample_size: float
    min_weight: float
    max_weight: float
    margins: tuple = field(repr=False)
    bounds_met: bool | None

    def __repr__(self) -> str:
        worst = max((m.error for m in self.margins), default=0.0)
        bounds = "" if self.bounds_met is None else (", bounds met" if self.bounds_met else ", bounds NOT met")
        return (f"Diagnostics(n={self.n}, effective sample size {self.effective_sample_size:.1f}, design effect "
                f"{self.design_effect:.3g}, weights {self.min_weight:.3g} to {self.max_weight:.3g} x mean, "
                f"{len(self.margins)} margins, largest error {worst:.2g}{bounds})")


class BalancedEstimator:
    """Fit balancing (raking) weights once to K margins, then estimate the mean of many functions.

    Parameters
    ----------
    margins : mapping
        In cycle order, from a column name of ``data`` (a one-way margin) or a tuple of column names
        (a joint margin) to its target: a mapping label -> mass (dict, pandas Series; for a joint
        margin tuple keys or a MultiIndex), or an array over integer codes (N-d for a joint margin,
        one axis per column in the key's order). Totals need not be 1 but must agree; margins that
        share a column must agree on it.
    steps : int, optional
        Half-steps of balancing (the paper's k): half-step j fixes margin ``(j - 1) mod K``, so a
        sweep over all margins is K half-steps (R's ``maxit`` counts sweeps). ``None`` balances to
        convergence (raking).
    tol : float, optional
        Convergence tolerance for ``steps=None``: every margin's L1 error relative to the total
        (default 1e-10).
    max_steps : int, optional
        For ``steps=None``: at most this many half-steps (default 5000 per margin). A run that uses
        them up without reaching ``tol`` has status ``"max_steps"`` in ``balance_`` and warns
        (:class:`~databalance.ConvergenceWarning`); its weights are those of its last half-step,
        and the standard error treats them as converged. With ``bounds`` it caps both rakings (the
        one whose weights the trimming starts from, silently, and the last, which ``balance_``
        describes); the trimming's own sweeps are capped apart. On Dask samples that are their own
        cells every half-step is a pass over the samples (after one that encodes them): this is
        the budget of passes.
    empty : {"error", "drop"}
        A target category with positive mass but no sample cannot be reached. ``"error"`` (default)
        raises, naming it; ``"drop"`` sets its target mass to 0 and rescales that margin's other
        targets to the same total (the estimate then describes the population without them).
    linearization : {"balanced", "survey"}
        How the standard error linearises the estimator. ``"balanced"`` (default): the influence
        function of the estimate with respect to the sampling distribution, with the conditional
        means of the balancing iterates; right whether or not the targets match the sampled
        population. ``"survey"``: conditional means of the starting (design-weighted) sample, R
        survey's convention, right only when the sample matches the targets in expectation. See
        :func:`balanced_mean`.
    bounds : (float, float), optional
        ``(low, high)`` bounds on the weights relative to their mean, as R's ``trimWeights`` and
        ``calibrate(bounds=)``; needs ``steps=None``. The weights are clipped to the bounds after
        every half-step of raking (weights a zero target empties stay 0), until the clipped weights
        meet every margin within ``tol``; if they cannot (bounds too tight for the margins), a
        :class:`~databalance.ConvergenceWarning` says so with the errors achieved,
        ``diagnostics_.bounds_met`` is False, and the weights returned meet the margins. The
        trimmed weights then become the design weights of a last raking, which ``balance_``
        describes; the standard error treats them as fixed (the trimming itself is not
        linearised), as R's does.

    Attributes
    ----------
    weights_ : ndarray (n,) or pandas Series
        The balanced weights (summing to 1), after :meth:`fit`: a Series on the DataFrame's index
        when ``data`` was a DataFrame. pandas is never imported for other input.
    balance_ : CellsResult
        The balancing run on the sample's occupied cells: status, every margin's error after every
        half-step, the factors.
    categories_ : dict
        For every column, its categories (labels, or codes ``0..n-1`` with array targets).
    diagnostics_ : Diagnostics
        Design effect, effective sample size, extreme weights and every margin's achieved table.

    Examples
    --------
    Two margins:

    >>> from databalance import BalancedEstimator
    >>> data = {"x": ["a", "a", "b", "b", "b"], "y": [0, 1, 0, 1, 1]}
    >>> est = BalancedEstimator({"x": {"a": .5, "b": .5}, "y": [.5, .5]}).fit(data)
    >>> est.weights_.round(3)
    array([0.293, 0.207, 0.207, 0.146, 0.146])
    >>> float(est.mean([1.0, 2.0, 3.0, 4.0, 4.0]).estimate)
    2.5

    Three margins, one of them joint (sex x age), from pandas:

    >>> import numpy as np, pandas as pd
    >>> rng = np.random.default_rng(1)
    >>> df = pd.DataFrame({"sex": rng.choice(["f", "m"], 400), "age": rng.choice(["<40", "40+"], 400),
    ...                    "region": rng.choice(["N", "S", "W"], 400)})
    >>> sex_age = pd.Series([.2, .3, .2, .3], index=pd.MultiIndex.from_product([["f", "m"], ["<40", "40+"]]))
    >>> fitted = BalancedEstimator({("sex", "age"): sex_age, "region": {"N": .5, "S": .3, "W": .2}}).fit(df)
    >>> fitted  # doctest: +ELLIPSIS
    BalancedEstimator(margins=[('sex', 'age'), 'region']): converged after 13 half-steps; n = 400, ...
    >>> round(fitted.diagnostics_.effective_sample_size, 1)
    319.2
    >>> float(fitted.diagnostics_.margins[1].achieved[0].round(6))
    0.5
    """

    _target_names: list[str] | None = None  # balanced_mean's p_x / p_y in messages
    _w: Any  # the weights: an ndarray, or a lazy Dask array after a fit on Dask collections
    _dask_fit: Any  # _DaskFit, _dask_samples.SamplesFit, or None
    _index_of_fit: Any = None  # balanced_mean's pandas index (its data is a dict of arrays)

    def __init__(self, margins: Mapping, *, steps: int | None = None, tol: float | None = None,
                 empty: str = "error", linearization: str = "balanced",
                 bounds: tuple[float, float] | None = None, max_steps: int | None = None) -> None:
        self.margins, self.steps, self.tol, self.empty = margins, steps, tol, empty
        self.linearization, self.bounds, self.max_steps = linearization, bounds, max_steps

    def __repr__(self) -> str:
        keys = list(self.margins.keys()) if hasattr(self.margins, "keys") else self.margins
        head = f"BalancedEstimator(margins={keys!r}" + (f", steps={self.steps}" if self.steps is not None else "")
        if "_w" not in vars(self):
            return head + "): not fitted"
        b, d = self.balance_, self.diagnostics_
        bounds = "" if d.bounds_met is None else ("; bounds met" if d.bounds_met else "; bounds NOT met")
        return (f"{head}): {b.status} after {b.steps} half-steps{bounds}; n = {d.n}, effective sample size "
                f"{d.effective_sample_size:.1f}, weights {d.min_weight:.3g} to {d.max_weight:.3g} x mean")

    @property
    def weights_(self) -> Any:
        """The balanced weights (summing to 1): a pandas Series on the fitted DataFrame's index when
        ``data`` was a DataFrame (built on each access, sharing the array), an ndarray otherwise."""
        if "_w" not in vars(self):
            raise AttributeError("`weights_` exists after fit(data); call fit first.")
        return self._w if self._index is None else _as_series(self._w, self._index)

    def summary(self, values: ArrayLike | Mapping | None = None, *, level: float = 0.95) -> Summary:
        """The fit at a glance: status and steps, n, Kish's effective sample size and design
        effect, the weights' range, every margin's achieved against target shares, and with
        ``values`` every statistic's estimate, standard error, interval and variance design effect.

        Parameters
        ----------
        values : array_like (n,) or (n, d), DataFrame or mapping, optional
            As in :meth:`mean`; without it the summary has no statistics.
        level : float
            The intervals' confidence level.

        Returns
        -------
        Summary
            ``print()`` it for text; a notebook shows HTML tables; the numbers are attributes.
            A statistic's ``design_effect`` is R survey's ``deff``: the variance of the balanced
            estimate over that of the plain (design-weighted) mean of the same sample, each from
            its linearisation (the plain mean's is its usual with-replacement standard error).

        Raises
        ------
        RuntimeError
            Before :meth:`fit`.
        ValueError
            ``level`` not strictly between 0 and 1; invalid ``values`` as in :meth:`mean`.

        Examples
        --------
        >>> from databalance import BalancedEstimator
        >>> data = {"x": ["a", "a", "b", "b", "b"], "y": [0, 1, 0, 1, 1]}
        >>> fitted = BalancedEstimator({"x": {"a": .5, "b": .5}, "y": [.5, .5]}).fit(data)
        >>> s = fitted.summary({"h": [1.0, 2.0, 3.0, 4.0, 4.0]})
        >>> round(s.effective_sample_size, 3), round(s.weight_ratio, 3)
        (4.663, 2.0)
        >>> print(s)  # doctest: +ELLIPSIS
        Balancing                     converged after ... half-steps
        ...
        Margin 'x': L1 error ..., largest deviation ... at ...
          category  achieved  target  deviation
          a              0.5     0.5  ...
        ...
        """
        if "_w" not in vars(self):
            raise RuntimeError("Call fit(data) before summary().")
        level = check.confidence_level(level)
        if values is None:
            return _summarise(self.diagnostics_, self.balance_, (), level)
        return self.mean(values).summary(level)

    def fit(self, data: Any, sample_weight: ArrayLike | None = None) -> BalancedEstimator:
        """Balance the samples' occupied cells to the margins; sets ``weights_``, ``balance_``,
        ``categories_`` and ``diagnostics_``.

        ``data`` is a pandas DataFrame or a mapping from column name to a 1-d array holding every
        column the margins name (other columns are ignored); ``sample_weight`` the design weights.
        A Dask DataFrame (or a mapping of Dask arrays or Series) is reduced to its occupied cells in
        one pass, and ``weights_`` is then a lazy Dask array with its partitions (user guide,
        "Samples and tables on Dask"; ``bounds`` is refused there). When the margins' columns have
        more than ``DASK_CELL_TABLE_MAX`` combinations the samples stay on the workers as their own
        cells: one pass per half-step, and two for a ``mean``.
        """
        steps = check.steps_option(self.steps)
        if self.max_steps is not None:
            check.positive_int(self.max_steps, "max_steps")
        empty = check.empty_policy(self.empty)
        linearization = check.linearization_option(self.linearization)
        bounds = check.weight_bounds(self.bounds, steps)
        if _is_dask(data, sample_weight):
            return self._fit_dask(data, sample_weight, steps, empty, linearization, bounds)
        if self._index_of_fit is None:
            _common_index({"data": data, "sample_weight": sample_weight})
        enc = _encode(self.margins, data, self._target_names)
        n = len(enc.codes[0])
        design = None if sample_weight is None else check.sample_weights(sample_weight, n)
        if n < 2:
            raise ValueError(f"Need at least 2 samples to estimate a standard error; got {n}.")
        cells, cell_of = _cells(enc, design)
        result, targets, d, met = self._rake(cells, cell_of, design, enc, steps, empty, bounds)
        w = _at_samples(_cell_ratio(result, cells), cell_of)
        if d is not None:
            w *= d
        w /= w.sum()
        w.flags.writeable = False  # shared by weights_ and every estimate: read-only
        self.balance_, self._w, self._dask_fit = result, w, None
        self._index = _pandas_index(data) if self._index_of_fit is None else self._index_of_fit
        self.categories_ = dict(zip(enc.columns, enc.levels, strict=True))
        self._cells, self._cell_of = cells, cell_of
        self._targets = [t / t.sum() for t in targets]
        self._linearization = linearization
        self._start_weights = 1.0 / n if d is None else d / d.sum()
        self._design_weights = 1.0 / n if design is None else design / design.sum()
        # A run stopped early (max_steps, stalled) is treated as converged: its limit is the target.
        self._if_steps = result.steps if result.status == "completed" else None
        self.diagnostics_ = _diagnostics(w, cells, cell_of, targets, enc, met)
        return self

    def _fit_dask(self, data, sample_weight, steps, empty, linearization, bounds) -> BalancedEstimator:
        """The fit of Dask collections: one pass reduces the samples to their occupied cells (count,
        and with design weights the sums of d and d^2 and the extreme d); the rest runs on the cells,
        and ``weights_`` is a lazy Dask array with the data's partitions."""
        from . import _dask

        if bounds is not None:
            raise ValueError(check.dask_bounds())
        plan = _plan(self.margins, self._target_names)
        plan.check_totals()
        listed = list(data.columns) if hasattr(data, "columns") else list(data.keys())
        arrays: dict[tuple, Any] = {}
        for c in plan.columns:
            if c not in listed:
                raise check.dask_missing_column(c, listed)
            arrays[("column", c)] = _dask.rows(data[c], str(c))
        if sample_weight is not None:
            arrays[("weight",)] = _dask.rows(sample_weight, "sample_weight")
        named = _dask.aligned({_input_name(k): a for k, a in arrays.items()})
        columns = [named[_input_name(("column", c))] for c in plan.columns]
        design = named.get("sample_weight")
        sizes = [len(lev) for lev in plan.levels]
        # (past the threshold, which is far below 2^63, cell keys could not even be int64)
        if float(np.prod(np.array(sizes, dtype=np.float64))) > DASK_CELL_TABLE_MAX:
            return self._fit_dask_samples(plan, columns, design, steps, empty, linearization)
        strides = [int(np.prod(sizes[i + 1:], dtype=np.int64)) for i in range(len(sizes))]
        stats = _dask.cell_statistics(plan, columns, design, strides, int(np.prod(sizes, dtype=np.int64)))
        n, keys = int(stats["n"]), stats["keys"]
        if len(keys) > MANY_CELLS and len(keys) > n / 4:
            warnings.warn(check.dask_many_cells(len(keys), n), UserWarning, stacklevel=3)
        if n < 2:
            raise ValueError(f"Need at least 2 samples to estimate a standard error; got {n}.")
        if design is not None and not stats["d"].sum() > 0:
            raise ValueError("`sample_weight` sums to 0; at least one sample needs positive weight.")
        column_codes = [np.asarray(c, dtype=np.int64) for c in np.unravel_index(keys, sizes)]
        plan.check_listed(column_codes, samples=False)
        enc = _Encoded(plan.columns, column_codes, plan.levels, plan.margins, plan.targets)
        mass = (stats["count"] if design is None else stats["d"]).astype(np.float64)
        cells = Cells([_margin_codes(enc, j, None) for j in range(len(enc.margins))],
                      [enc.shape(j) for j in range(len(enc.margins))], mass)
        result, targets, _, met = self._rake(cells, None, None, enc, steps, empty, None)
        ratio = _cell_ratio(result, cells)
        factor = ratio / float(ratio @ mass)  # a sample's weight: factor[its cell] * d
        self.balance_, self._index = result, None
        self._w = _dask.lazy_weights(plan, columns, design, strides, keys, factor)
        self.categories_ = dict(zip(enc.columns, enc.levels, strict=True))
        self._cells, self._cell_of = cells, None
        self._targets = [t / t.sum() for t in targets]
        self._linearization = linearization
        self._if_steps = result.steps if result.status == "completed" else None
        second = stats["count"] if design is None else stats["d2"]
        sampled = stats["count"] > 0
        low = factor if design is None else factor * stats["dmin"]
        high = factor if design is None else factor * stats["dmax"]
        self.diagnostics_ = _diagnostics_of(n, float(factor**2 @ second), float(low[sampled].min()),
                                            float(high[sampled].max()), [cells.margin_sums(j, factor * mass) for j
                                                                         in range(len(enc.margins))], targets, enc, met)
        self._dask_fit = _DaskFit(plan, columns, design, strides, keys, n)
        return self

    def _fit_dask_samples(self, plan, columns, design, steps, empty, linearization) -> BalancedEstimator:
        """The fit of Dask collections whose margins' columns have too many combinations for a cell
        table: the samples are the cells, kept on the workers. One pass encodes and checks every
        label and sums the input per margin level; then every half-step is one pass (see
        :mod:`databalance._dask_samples`)."""
        from . import _dask_samples

        K = len(plan.margins)
        shapes = [tuple(len(plan.levels[i]) for i in m.index) for m in plan.margins]
        samples = _dask_samples.Samples(plan, columns, design, shapes)
        # the codes encoded once and kept on the workers when they fit (from the first pass when the
        # samples' count is known, else after it): the later passes read them
        known = not np.isnan(columns[0].chunks[0]).any()
        if known:
            samples = _dask_samples.cached(samples, tuple(int(c) for c in columns[0].chunks[0]), validate=True)
        first = _dask_samples.run(samples, _dask_samples.WeightSums(None, samples.sizes,
                                                                    compiled=_dask_samples.compiled_passes()),
                                  validate=True)
        n = int(first["n"])
        if not known:
            samples = _dask_samples.cached(samples, tuple(int(first["lengths"][p]) for p in
                                                          range(columns[0].numblocks[0])), validate=False)
        if n < 2:
            raise ValueError(f"Need at least 2 samples to estimate a standard error; got {n}.")
        if design is not None and not first["sums"][0].sum() > 0:
            raise ValueError("`sample_weight` sums to 0; at least one sample needs positive weight.")
        lengths = tuple(int(first["lengths"][p]) for p in range(columns[0].numblocks[0]))
        # Balanced at finite k: the fit's passes also gather the tables the standard error needs (so
        # that a mean is two passes), unless a pass's tables would be too large.
        tables = linearization == "balanced" and bool(steps) and max(
            _dask_samples.pairs_size(samples.sizes, [j]) for j in range(K)) <= _dask_samples.TABLES_MAX
        kernel = _dask_samples.SamplesKernel(samples, first, _dask_samples.design_array(samples, lengths), tables)
        enc = _Encoded(plan.columns, [], plan.levels, plan.margins, plan.targets)
        result, targets, _, met = self._rake(None, None, None, enc, steps, empty, None, kernel=kernel)
        iterates = _dask_samples.latest_factors(result.iterate_factors(), K, result.steps)
        final, sums = [np.ones(size) for size in samples.sizes], first  # k = 0: the input
        if result.steps > 0:
            final, last = iterates[-1], kernel.last  # the loop's last pass: the sums at the final scalings
            if last is None or not all(np.array_equal(np.ravel(a), b) for a, b in zip(last[0], final, strict=True)):
                last = (final, kernel.weight_sums(final))  # not reached by the loop as it is: a safeguard
            sums = last[1]
        total_u = float(sums["sums"][0].sum())
        if_steps = result.steps if result.status == "completed" else None
        at_iterates = linearization == "balanced" and bool(if_steps)
        total = float(first["sums"][0].sum())
        self.balance_, self._index = result, None
        self._w = _dask_samples.lazy_weights(samples, final, 1.0 / total_u, lengths)
        self.categories_ = dict(zip(enc.columns, enc.levels, strict=True))
        for stale in ("_cells", "_cell_of"):  # an earlier fit's cells: this one has none
            vars(self).pop(stale, None)
        self._targets = [t / t.sum() for t in targets]
        self._linearization = linearization
        self._if_steps = if_steps
        self.diagnostics_ = _diagnostics_of(n, sums["u2"] / total_u**2, float(sums["min_u"]) / total_u,
                                            float(sums["max_u"]) / total_u, [s / total_u for s in sums["sums"]],
                                            targets, enc, met)
        self._dask_fit = _dask_samples.SamplesFit(
            samples, n, total, final, total_u, iterates if at_iterates else [], [t.ravel() for t in self._targets],
            [s / total for s in first["sums"]], if_steps, linearization == "balanced", lengths,
            kernel.iterate_tables if at_iterates else {})
        return self

    def _rake(self, cells, cell_of, design, enc, steps, empty, bounds, kernel=None):
        """Check the margins against the cells and balance them: the result, the targets (reduced
        by ``empty="drop"``), the design weights of the last round and whether bounds hold.
        ``kernel``: the Dask samples path's (``cells`` None), holding the input's margin sums."""
        targets = list(enc.targets)
        if kernel is None:
            counts_of = [cells.margin_sums(j, cells.mass) for j in range(len(enc.margins))]
        else:
            counts_of = [s.ravel() for s in kernel.input_sums()]
        for j, (m, counts) in enumerate(zip(enc.margins, counts_of, strict=True)):
            if empty == "drop":
                targets[j] = _drop_empty(targets[j], counts.reshape(targets[j].shape))
            check.unsampled(counts, targets[j].ravel(), enc.label_of(j), m.columns if len(m.columns) > 1
                            else m.columns[0], m.name)
        if empty == "drop":  # dropping from one margin can break its agreement with another
            axes = [tuple(sorted(m.index)) for m in enc.margins]
            check.consistent_margins(axes, [np.transpose(t, np.argsort(m.index)) for t, m in
                                            zip(targets, enc.margins, strict=True)],
                                     [m.name + " (after empty='drop')" for m in enc.margins],
                                     float(sum(targets[0].ravel())))
        if kernel is not None:
            keys = [m.key for m in enc.margins]
            shapes = [enc.shape(j) for j in range(len(enc.margins))]
            return balance_cells(None, shapes, None, targets, keys, steps=steps, tol=self.tol,
                                 max_steps=self.max_steps, kernel=kernel), targets, None, None
        result, d, met = self._balance(cells, cell_of, design, targets, enc, steps, bounds, counts_of)
        return result, targets, d, met

    def _balance(self, cells, cell_of, d, targets, enc, steps, bounds, counts):
        """Rake (alternating with trimming when ``bounds`` are given); the result, the design
        weights of the last round and whether the bounds hold (None without bounds)."""
        keys = [m.key for m in enc.margins]
        codes, shapes = cells.codes, cells.shapes
        with warnings.catch_warnings():
            if bounds is not None:  # this raking only seeds the trimming: the last one's status is reported
                warnings.simplefilter("ignore", ConvergenceWarning)
            result = balance_cells(codes, shapes, cells.mass, targets, keys, steps=steps, tol=self.tol,
                                   max_steps=self.max_steps, margin_sums=counts)
        if bounds is None:
            return result, d, None
        w = _at_samples(_cell_ratio(result, cells), cell_of) * (1.0 if d is None else d)
        codes_n = [_at_samples(c, cell_of) for c in codes]
        tol = check.tolerance(self.tol, np.dtype(np.float64))
        w, errors, sweeps = _bounded_rake(w * (len(w) / w.sum()), codes_n, targets, bounds, tol)
        # The bounded weights become the design weights of a last raking: it leaves them in place
        # when they meet the margins, and the standard error treats them as fixed.
        cells.mass = _per_cell(w, cell_of, len(cells.mass))
        result = balance_cells(codes, shapes, cells.mass, targets, keys, steps=steps, tol=self.tol,
                               max_steps=self.max_steps)
        met = max(errors) <= tol
        if not met:
            raked = w * _at_samples(_cell_ratio(result, cells), cell_of)
            raked *= len(raked) / raked.sum()
            warnings.warn(check.bounds_not_met(bounds, float(raked.min()), float(raked.max()), max(errors), tol,
                                               sweeps), ConvergenceWarning, stacklevel=3)
        return result, w, met

    def mean(self, values: ArrayLike | Mapping) -> BalancedEstimate:
        """The balanced estimate of E[h] from ``values`` = h at each fitted sample.

        ``values`` is an array (n,) or (n, d), a pandas Series or DataFrame, or a mapping name -> 1-d
        array (one statistic each). Several named statistics (DataFrame columns, mapping keys) give
        estimates, standard errors and intervals keyed by name: pandas Series when pandas input was
        given, :class:`~databalance.LabelledValues` otherwise. pandas ``values`` must have
        the fitted DataFrame's index (rows are matched by position, so a different index is refused).
        After a fit on Dask collections, ``values`` is a Dask array, Series or DataFrame partitioned
        like the data (one more pass over it).
        """
        if not hasattr(self, "_w"):
            raise RuntimeError("Call fit(data) before mean(values).")
        fitted_dask = vars(self).get("_dask_fit") is not None
        if _is_dask(values) != fitted_dask:
            raise TypeError(check.dask_fit_mismatch(fitted_dask))
        if fitted_dask:
            return self._mean_dask(values)
        names, h = check.sample_value_columns(values)
        n = self._w.shape[0]
        if h.shape[0] != n:
            raise ValueError(f"`values` has {h.shape[0]} entries but {n} samples were fitted.")
        index = _common_index(dict(values) if isinstance(values, Mapping) else {"values": values})
        if index is not None and self._index is not None and not index.equals(self._index):
            raise ValueError(check.misaligned_values())
        given = h.reshape(n, -1)
        estimate: Any
        se: Any
        estimate, se, _ = self._from_moments(_sample_moments(given, self._start_weights, self._cells, self._cell_of), n)
        pandas = index is not None or self._index is not None
        if h.ndim == 1:
            estimate, se = float(estimate[0]), float(se[0])
            name = getattr(values, "name", None) if index is not None else None
            names = None if name is None else (name,)
        elif names is not None:
            estimate, se = _labelled(estimate, names, pandas), _labelled(se, names, pandas)
        return BalancedEstimate(estimate, se, self.weights_, self.balance_.steps, self.balance_, names, pandas,
                                given, self._design_weights, self.diagnostics_)

    def _mean_dask(self, values) -> BalancedEstimate:
        """One pass over the fitted data and ``values`` for their per-cell moments; the estimate, its
        standard error and the plain mean's from those (see :func:`_from_moments`)."""
        from . import _dask

        fit = self._dask_fit
        assert fit is not None  # mean() dispatches here only after a Dask fit
        names, h, frame = _dask_values(values, _dask)
        estimate: Any
        se: Any
        if not isinstance(fit, _DaskFit):  # the samples path
            from . import _dask_samples

            h = _dask.aligned({"data": fit.samples.columns[0], "values": h})["values"]
            estimate, se, plain = _dask_samples.mean(fit, h, _power_of_two_scale)
        else:
            h = _dask.aligned({"data": fit.columns[0], "values": h})["values"]
            moments = _dask.value_statistics(fit.plan, fit.columns, fit.design, h, fit.strides, fit.keys)
            estimate, se, plain = self._from_moments(moments, fit.n)
        if h.ndim == 1:
            estimate, se = float(estimate[0]), float(se[0])
        elif names is not None:
            estimate, se = _labelled(estimate, names, frame), _labelled(se, names, frame)
        return BalancedEstimate(estimate, se, self._w, self.balance_.steps, self.balance_, names, frame, None, None,
                                self.diagnostics_, plain)

    def _from_moments(self, moments: dict, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(estimate, standard error, plain mean's standard error) per statistic from the per-cell
        sums of d h, d^2 h, d^2 and M2 = sum d^2 (h - m_c)^2 (m_c the d^2-weighted cell mean).

        Sample i's linearised term is d_i (a_c g_i + b_c) with g = h - estimate, a_c = the cell's
        weight factor and b_c from the cell's beta (see :meth:`_contributions`), so per cell
        ``sum z = a S_dg + b sum d`` and ``sum z^2 = a^2 M2 + sum d^2 (a (m_c - estimate) + b)^2``: a
        sum of nonnegative terms, with no difference of large sums.
        """
        cells = self._cells
        mass = cells.mass
        ratio = _cell_ratio(self.balance_, cells)
        a = ratio / float(ratio @ mass)
        top = moments["top"]
        scale = _power_of_two_scale(np.vstack([top, -top]))
        # The sums come in units of 2^exponent per statistic; bring them to units of scale (exactly).
        shift = (moments["exponent"] - np.log2(scale).astype(np.int64))[:, None]
        dh, d2h = np.ldexp(moments["dh"], shift), np.ldexp(moments["d2h"], shift)
        m2, w2 = np.ldexp(moments["m2"], 2 * shift), moments["w2"]
        total = float(mass.sum())
        estimate = dh @ a
        centred = dh - estimate[:, None] * mass  # sum d (h - estimate) per cell
        beta = self._beta(np.ascontiguousarray((centred / total).T)).T
        b = beta / total if self._linearization == "balanced" else beta * a
        mean2 = np.divide(d2h, w2, out=np.zeros_like(d2h), where=w2 > 0)
        sum_z = (a * centred + b * mass).sum(axis=1)
        sum_z2 = (a**2 * m2 + w2 * (a * (mean2 - estimate[:, None]) + b) ** 2).sum(axis=1)
        se = np.sqrt(np.maximum(n / (n - 1) * (sum_z2 - sum_z**2 / n), 0.0))
        plain_mean = dh.sum(axis=1) / total
        plain_z = (dh.sum(axis=1) - plain_mean * total) / total
        plain_z2 = (m2 + w2 * (mean2 - plain_mean[:, None]) ** 2).sum(axis=1) / total**2
        plain = np.sqrt(np.maximum(n / (n - 1) * (plain_z2 - plain_z**2 / n), 0.0))
        return estimate * scale, se * scale, plain * scale

    def _beta(self, S: np.ndarray) -> np.ndarray:
        """Per cell and statistic, beta of psi = alpha h~ + beta (``S``: cell sums of the normalised
        design weights times h~, (cells, d))."""
        cells = self._cells
        if self._if_steps is None:
            ratio = np.ones(len(cells.mass))
            if self._linearization == "balanced":
                ratio = _cell_ratio(self.balance_, cells)
                ratio *= cells.mass.sum() / (ratio * cells.mass).sum()
            return limit_linearization(cells, S, ratio)[1]
        return step_linearization(cells, S, self._targets, steps=self._if_steps,
                                  at_iterates=self._linearization == "balanced",
                                  trace=self.balance_.iterate_factors(), final=self.balance_.cell_masses)[1]

    def _contributions(self, g: np.ndarray) -> np.ndarray:
        """Each sample's term of the linearised estimate, omega_i psi_i, for g = h - estimate (n, d).

        ``"balanced"``: d~_i psi_i with psi = L_1 ... L_k g at the iterates, whose cell factor
        alpha is the final weight ratio (so d~_i alpha = w_i). ``"survey"``: w_i (C_1 ... C_k g) under
        the starting measure. Only per-cell sums of g are scattered; the rest are gathers.
        """
        cells, cell_of = self._cells, self._cell_of
        d_norm = self._start_weights
        S = np.column_stack([_per_cell(d_norm * g[:, j], cell_of, len(cells.mass)) for j in range(g.shape[1])])
        balanced = self._linearization == "balanced"
        beta = self._beta(S)
        # omega_i alpha(c_i) is the balanced weight w_i in both conventions.
        z = g * self._w[:, None]
        scale = np.reshape(d_norm if balanced else self._w, (-1, 1))  # (n, 1), or (1, 1) for 1/n
        z += _at_samples(beta, cell_of) * scale
        return z


@dataclass(frozen=True)
class _DaskFit:
    """What a ``mean`` of Dask values needs from a Dask fit: the plan, the (lazy) columns and design
    weights, the key strides and the occupied cells' keys, the number of samples."""

    plan: Any
    columns: list
    design: Any
    strides: list[int]
    keys: np.ndarray
    n: int


#: The scaling exponent of a statistic whose values are all 0: below any other.
NO_EXPONENT = -100_000


def _cell_moments(inverse: np.ndarray | None, h: np.ndarray, d: np.ndarray | None, size: int) -> dict:
    """Per cell and column of h (n, s): sums of d h and d^2 h, M2 = sum d^2 (h - m_c)^2 around the
    cell's d^2-weighted mean m_c, and the cells' sums of d^2 (d None: every d is 1; ``inverse``
    None: every sample is its own cell)."""
    s = h.shape[1]
    if inverse is None:
        w2 = np.ones(len(h)) if d is None else d * d
        dh = h.T.copy() if d is None else (h * d[:, None]).T
        d2h = dh if d is None else (h * w2[:, None]).T
        return {"w2": w2, "dh": dh, "d2h": d2h, "m2": np.zeros((s, len(h)))}
    w2 = np.bincount(inverse, None if d is None else d * d, minlength=size).astype(np.float64)
    dh, d2h, m2 = np.zeros((s, size)), np.zeros((s, size)), np.zeros((s, size))
    d2 = None if d is None else d * d
    for j in range(s):
        col = h[:, j]
        dh[j] = np.bincount(inverse, col if d is None else d * col, minlength=size)
        d2h[j] = dh[j] if d is None else np.bincount(inverse, d2 * col, minlength=size)
        mean = np.divide(d2h[j], w2, out=np.zeros(size), where=w2 > 0)
        r = col - mean[inverse]
        r *= r
        m2[j] = np.bincount(inverse, r if d2 is None else d2 * r, minlength=size)
    return {"w2": w2, "dh": dh, "d2h": d2h, "m2": m2}


def _exponents(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max |h|, the exponent of a power of two near it) per column of h (n, s): dividing by it is
    exact and keeps squares of huge or tiny values in range."""
    top = np.abs(h).max(axis=0, initial=0.0)
    return top, np.where(top > 0, np.frexp(top)[1] - 1, NO_EXPONENT)


def _sample_moments(h: np.ndarray, start_weights: Any, cells: Cells, cell_of: np.ndarray | None) -> dict:
    """The per-cell moments of in-memory values (n, s), as a Dask partition computes them; the
    design weights are ``start_weights`` scaled to the cells' masses (None for 1/n)."""
    d = None if np.ndim(start_weights) == 0 else np.asarray(start_weights) * float(cells.mass.sum())
    top, exponent = _exponents(h)
    moments = _cell_moments(cell_of, np.ldexp(h, -exponent), d, len(cells.mass))
    moments["top"], moments["exponent"] = top, exponent
    return moments


def _is_dask(*inputs: Any) -> bool:
    """Whether any input (or any value of a mapping input) is a Dask collection; dask is not imported."""
    for obj in inputs:
        if type(obj).__module__.partition(".")[0] == "dask":
            return True
        if isinstance(obj, Mapping) and any(type(v).__module__.partition(".")[0] == "dask" for v in obj.values()):
            return True
    return False


def _input_name(key: tuple) -> str:
    return "sample_weight" if key[0] == "weight" else f"data[{key[1]!r}]"


def _dask_values(values, _dask) -> tuple[tuple | None, Any, bool]:
    """(the statistics' names or None, h as a Dask array (n,) or (n, d), whether ``values`` is a Dask
    DataFrame, whose names label the results as pandas Series)."""
    if hasattr(values, "columns") and getattr(values, "ndim", None) == 2:
        return tuple(values.columns), _dask.rows(values, "values", max_ndim=2), True
    if isinstance(values, Mapping):
        if len(values) == 0:
            raise ValueError("`values` is an empty mapping; give at least one statistic (name -> array).")
        arrays = _dask.aligned({f"values[{k!r}]": _dask.rows(v, f"values[{k!r}]") for k, v in values.items()})
        import dask.array as da  # only reached with Dask values

        return tuple(values), da.stack(list(arrays.values()), axis=1), False
    return None, _dask.rows(values, "values", max_ndim=2), False


@dataclass(frozen=True)
class _Margin:
    key: Any
    columns: tuple  # column names, in the key's order
    index: tuple[int, ...]  # their positions among the encoded columns
    name: str  # the target's name in messages


@dataclass(frozen=True)
class _Encoded:
    """The samples' integer codes per column, the columns' categories, and the targets over them."""

    columns: list
    codes: list[np.ndarray]
    levels: list[list]
    margins: list[_Margin]
    targets: list[np.ndarray]  # of shape (levels of each column), in the key's order

    def shape(self, j: int) -> tuple[int, ...]:
        return tuple(len(self.levels[i]) for i in self.margins[j].index)

    def label_of(self, j: int):
        """The label of margin j's flat category i (a tuple for joint margins)."""
        m, shape = self.margins[j], self.shape(j)
        if len(m.index) == 1:
            return self.levels[m.index[0]]
        return lambda i: tuple(self.levels[c][k] for c, k in zip(m.index, np.unravel_index(i, shape), strict=True))


def _is_mapping(target) -> bool:
    return hasattr(target, "items") and not isinstance(target, np.ndarray)


@dataclass(frozen=True)
class _Plan:
    """The margins validated without the data: the columns, their categories, the targets, and how
    each column's labels become codes (kept picklable: Dask ships it to every partition)."""

    columns: list
    levels: list[list]
    margins: list[_Margin]
    targets: list[np.ndarray]
    mapped: list[bool]  # per column: labels looked up (mapping targets) or integer codes (arrays)
    first: list[str]  # per column: the first target naming it, for messages
    listed: list[np.ndarray | None]  # per margin: its listed flat categories (None: all of them)

    def column_codes(self, i: int, labels: np.ndarray, dtype=np.int64) -> np.ndarray:
        """Column i's labels as codes 0..len(levels[i]) - 1 (an unlisted label is an error); integer
        codes in ``dtype`` (which must hold them), looked-up labels as int64."""
        name, lev = str(self.columns[i]), self.levels[i]
        if self.mapped[i]:
            return check.lookup_labels(labels, {v: k for k, v in enumerate(lev)}, name, self.first[i])
        return check.integer_codes(labels, len(lev), name, self.first[i], dtype)

    def check_listed(self, codes: list[np.ndarray], *, samples: bool = True) -> None:
        """Every code combination of a mapping margin is one it lists (``codes``: per column, of the
        samples, or of the distinct cells when ``samples`` is False)."""
        for j, m in enumerate(self.margins):
            if self.listed[j] is not None:
                shape = tuple(len(self.levels[i]) for i in m.index)
                _unlisted(self.listed[j], [codes[i] for i in m.index], shape, m.columns,
                          [self.levels[i] for i in m.index], m.name, samples)

    def check_totals(self) -> None:
        """The targets' totals agree, and so do margins sharing columns."""
        names = [m.name for m in self.margins]
        total = check.common_total(self.targets, names)
        axes = [tuple(sorted(m.index)) for m in self.margins]
        check.consistent_margins(axes, [np.transpose(t, np.argsort(m.index)) for t, m in
                                        zip(self.targets, self.margins, strict=True)], names, total)


def _plan(margins, names: list[str] | None) -> _Plan:
    """Validate the margins: the union of the categories the margins list for every column (or
    0..n-1 for array targets) and the targets over them (totals: :meth:`_Plan.check_totals`)."""
    specs = check.sample_margin_keys(margins)
    columns = list(dict.fromkeys(c for _, cols in specs for c in cols))
    names = names or [f"margins[{key!r}]" for key, _ in specs]
    raw = [margins[key] for key, _ in specs]
    mapped = [_is_mapping(t) for t in raw]
    parsed: list[Any] = [check.mapping_target(t, nm, len(cols)) if is_map else check.array_target(t, nm, len(cols))
              for t, nm, (_, cols), is_map in zip(raw, names, specs, mapped, strict=True)]
    position = {c: i for i, c in enumerate(columns)}
    users = {c: [j for j, (_, cols) in enumerate(specs) if c in cols] for c in columns}
    levels: list[list] = []
    for c in columns:
        if len({mapped[j] for j in users[c]}) > 1:
            raise check.mixed_target_kinds(c, [names[j] for j in users[c]])
        if mapped[users[c][0]]:
            found: dict = {}
            for j in users[c]:
                at = specs[j][1].index(c)
                for cat in parsed[j][0]:
                    found.setdefault(cat if len(specs[j][1]) == 1 else cat[at], None)
            levels.append(list(found))
        else:
            sizes = [(j, parsed[j].shape[specs[j][1].index(c)]) for j in users[c]]
            for j, size in sizes[1:]:
                if size != sizes[0][1]:
                    raise check.category_counts_differ(c, names[sizes[0][0]], sizes[0][1], names[j], size)
            levels.append(list(range(sizes[0][1])))
    out_margins, targets, listed_of = [], [], []
    for j, (key, cols) in enumerate(specs):
        index = tuple(position[c] for c in cols)
        shape = tuple(len(levels[i]) for i in index)
        listed_j = None
        if mapped[j]:
            cats, masses = parsed[j]
            lookups = [{v: i for i, v in enumerate(levels[k])} for k in index]
            tuples = [cat if len(cols) > 1 else (cat,) for cat in cats]
            flat = np.ravel_multi_index(tuple(np.array([lk[t[a]] for t in tuples], dtype=np.int64)
                                              for a, lk in enumerate(lookups)), shape) if cats else np.zeros(0, int)
            target = np.zeros(shape)
            target.flat[flat] = masses
            listed = np.zeros(int(np.prod(shape)), bool)
            listed[flat] = True
            listed_j = None if listed.all() else listed
        else:
            target = parsed[j]
        out_margins.append(_Margin(key, tuple(cols), index, names[j]))
        targets.append(target)
        listed_of.append(listed_j)
    first = [names[users[c][0]] for c in columns]
    return _Plan(columns, levels, out_margins, targets, [mapped[users[c][0]] for c in columns], first, listed_of)


def _encode(margins, data, names: list[str] | None) -> _Encoded:
    """Validate the margins against ``data`` and encode every column once: codes into the union of
    the categories the margins list for it (or 0..n-1 for array targets)."""
    plan = _plan(margins, names)
    arrays = check.sample_data(data, plan.columns)
    codes = [plan.column_codes(i, arrays[c]) for i, c in enumerate(plan.columns)]
    plan.check_listed(codes)
    plan.check_totals()
    return _Encoded(plan.columns, codes, plan.levels, plan.margins, plan.targets)


def _unlisted(listed, codes, shape, cols, levels, name, samples: bool = True) -> None:
    """A sample whose category (combination) a mapping target does not list (``codes`` of the
    samples, or of the distinct cells when ``samples`` is False: then no sample number is known)."""
    flat = codes[0] if len(codes) == 1 else np.ravel_multi_index(tuple(codes), shape)
    bad = ~listed[flat]
    if bad.any():
        i = int(np.argmax(bad))
        labels = tuple(lev[c[i]] for lev, c in zip(levels, codes, strict=True))
        if len(cols) == 1:
            raise check.unlisted_label(str(cols[0]), labels[0], name)
        if not samples:
            raise check.dask_unlisted_combination(cols, labels, name)
        raise check.unlisted_combination(cols, labels, name, i)


def _cells(enc: _Encoded, design: np.ndarray | None) -> tuple[Cells, np.ndarray | None]:
    """The samples' occupied cells (distinct combinations of all the margins' columns) and each
    sample's cell. Never the cross-product: a lookup when the possible combinations number at most
    DENSE_CELLS; beyond that, where most samples fall in a cell of their own, the samples
    themselves are the cells (``None`` for the identity map: no sort, no copy of the codes), which
    every computation treats alike, as a cell may hold several samples anyway."""
    sizes = [len(lev) for lev in enc.levels]
    shapes = [enc.shape(j) for j in range(len(enc.margins))]
    if float(np.prod(np.array(sizes, dtype=np.float64))) > DENSE_CELLS:
        codes = [_margin_codes(enc, j, None) for j in range(len(enc.margins))]
        mass = np.ones(len(codes[0])) if design is None else design.astype(np.float64, copy=True)
        return Cells(codes, shapes, mass), None
    key = enc.codes[0].astype(np.int64, copy=True)
    for c, s in zip(enc.codes[1:], sizes[1:], strict=True):
        key *= s
        key += c
    present = np.bincount(key, minlength=int(np.prod(sizes))) > 0
    position = np.cumsum(present) - 1
    cell_of = position[key]
    n_cells = int(position[-1]) + 1
    del key
    first = np.empty(n_cells, dtype=np.int64)
    first[cell_of[::-1]] = np.arange(len(cell_of) - 1, -1, -1)  # a sample of every cell
    codes = [_margin_codes(enc, j, first) for j in range(len(enc.margins))]
    mass = np.bincount(cell_of, weights=design, minlength=n_cells).astype(np.float64)
    return Cells(codes, shapes, mass), cell_of


def _margin_codes(enc: _Encoded, j: int, rows: np.ndarray | None) -> np.ndarray:
    """Margin j's flat category of the samples ``rows`` (all samples for None, not copied when the
    margin is one column)."""
    m = enc.margins[j]
    parts = tuple(enc.codes[i] if rows is None else enc.codes[i][rows] for i in m.index)
    return parts[0] if len(parts) == 1 else np.ravel_multi_index(parts, enc.shape(j))


def _at_samples(per_cell: np.ndarray, cell_of: np.ndarray | None) -> np.ndarray:
    return per_cell if cell_of is None else per_cell[cell_of]


def _per_cell(per_sample: np.ndarray, cell_of: np.ndarray | None, n_cells: int) -> np.ndarray:
    """Per-sample values summed per cell (the values themselves, not copied, when samples are cells)."""
    if cell_of is None:
        return per_sample
    return np.bincount(cell_of, per_sample, minlength=n_cells)


def _cell_ratio(result: CellsResult, cells: Cells) -> np.ndarray:
    """Per cell, the balanced over the starting mass (up to a constant): the product of the
    margins' factors."""
    masses = result.cell_masses
    return np.divide(masses, cells.mass, out=np.zeros_like(masses), where=cells.mass > 0)  # 0: trimmed out


def _bounded_rake(w, codes, targets, bounds, tol):
    """Raking with the weights (mean 1) clipped to ``bounds`` after every half-step, for at most
    TRIM_SWEEPS sweeps: the weights, every margin's final L1 error and the sweeps run.

    Clipping after each half-step (rather than after raking to convergence) keeps the two
    constraints from undoing each other's work for long: the iteration moves between the margins'
    and the box's constraint sets one small step at a time.
    """
    low, high = bounds
    n = len(w)
    targets = [t.ravel() * (n / t.sum()) for t in targets]
    errors = [np.inf]
    sweeps = 0
    while sweeps < TRIM_SWEEPS:
        sweeps += 1
        for c, t in zip(codes, targets, strict=True):
            mass = np.bincount(c, w, minlength=len(t))
            factor = np.divide(t, mass, out=np.zeros_like(t), where=mass > 0)
            w = w * factor[c]
            np.clip(w, low, high, out=w, where=w > 0)  # a weight a zero target emptied stays 0
        errors = [float(np.abs(np.bincount(c, w, minlength=len(t)) - t).sum() / n)
                  for c, t in zip(codes, targets, strict=True)]
        if max(errors) <= tol:
            break
    return w, errors, sweeps


def _diagnostics(w, cells, cell_of, targets, enc, met) -> Diagnostics:
    per_cell = _per_cell(w, cell_of, len(cells.mass))
    return _diagnostics_of(len(w), float(np.dot(w, w)), float(w.min()), float(w.max()),
                           [cells.margin_sums(j, per_cell) for j in range(len(enc.margins))], targets, enc, met)


def _diagnostics_of(n, sum_w2, lowest, highest, margin_sums, targets, enc, met) -> Diagnostics:
    """The diagnostics from the weights' sum of squares, extremes and every margin's sums
    (weights of total 1)."""
    deff = float(n * sum_w2)
    checks = []
    for j, (m, t) in enumerate(zip(enc.margins, targets, strict=True)):
        achieved = np.reshape(margin_sums[j], t.shape) * t.sum()
        checks.append(MarginCheck(m.key, tuple(enc.levels[i] for i in m.index), achieved, t,
                                  float(np.abs(achieved - t).sum() / t.sum())))
    return Diagnostics(n, deff, n / deff, lowest * n, highest * n, tuple(checks), met)


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


# -- labels and summaries --------------------------------------------------------------------------


def _pandas_index(obj: Any) -> Any:
    """The index of a pandas object, by reference; None for anything else (pandas is not imported)."""
    if type(obj).__module__.partition(".")[0] == "pandas" and hasattr(obj, "index"):
        return obj.index
    return None


def _as_series(w: np.ndarray, index: Any) -> Any:
    import pandas as pd  # only reached when the user passed pandas input

    return pd.Series(w, index=index, name="weight", copy=False)


def _labelled(values: Any, names: tuple | None, pandas: bool) -> Any:
    """Several statistics' numbers keyed by their names: a pandas Series when the input was pandas,
    a LabelledValues otherwise; unchanged when unnamed or a single float."""
    if names is None or isinstance(values, float):
        return values
    if pandas:
        import pandas as pd  # only reached when the user passed pandas input

        return pd.Series(values, index=list(names))
    return LabelledValues(names, values)


def _raw(values: Any) -> Any:
    """A float as itself, anything labelled as its float64 array."""
    return values if isinstance(values, float) else np.asarray(values, dtype=np.float64)


def _common_index(inputs: dict):
    """The pandas index the named inputs share (None without pandas input); inputs with different
    indexes are refused: rows are matched by position, so they would be silently misaligned."""
    found = [(name, _pandas_index(value)) for name, value in inputs.items() if value is not None]
    found = [(name, index) for name, index in found if index is not None]
    for name, index in found[1:]:
        if not index.equals(found[0][1]):
            raise ValueError(check.misaligned_inputs(found[0][0], name))
    return found[0][1] if found else None


def _plain_standard_error(h: np.ndarray, d_norm: Any) -> np.ndarray:
    """Per column of h (n, d), the usual with-replacement standard error of the plain
    (design-weighted, weights d_norm summing to 1) mean: the k = 0 case of :meth:`mean`."""
    n = h.shape[0]
    scale = _power_of_two_scale(h)
    g = h / scale if np.any(scale != 1.0) else h
    weights = np.broadcast_to(np.asarray(d_norm, dtype=np.float64), (n,))
    r = g - weights @ g
    r -= weights @ r  # a second centring pass: a constant statistic then has a residual of exactly 0
    return _standard_error(r * weights[:, None]) * scale


def _standard_error(z: np.ndarray) -> np.ndarray:
    """sqrt(n / (n - 1) * sum_i (z_i - mean z)^2) per column of the linearised terms z (n, d), the
    survey convention (centred in place)."""
    n = z.shape[0]
    z -= z.mean(axis=0)
    # A sum of squares cannot be negative, but say so: rounding must never give NaN from sqrt.
    return np.sqrt(np.maximum(n / (n - 1) * np.einsum("ij,ij->j", z, z), 0.0))


def _summarise(d: Diagnostics, balance: CellsResult, statistics: tuple, level: float) -> Summary:
    margins = []
    for m in d.margins:
        total = m.target.sum()
        achieved, target = (m.achieved / total).ravel(), (m.target / total).ravel()
        deviation = np.abs(achieved - target)
        at = int(np.argmax(deviation))
        cats = tuple(m._category(i) for i in range(target.size))
        margins.append(MarginSummary(m.key, cats, achieved, target, float(deviation.sum()), float(deviation[at]),
                                     cats[at]))
    ratio = d.max_weight / d.min_weight if d.min_weight > 0 else np.inf
    return Summary(balance.status, balance.steps, d.n, d.effective_sample_size, d.design_effect, d.min_weight,
                   d.max_weight, float(ratio), d.bounds_met, tuple(margins), statistics, level)


def balanced_mean(values: ArrayLike, x: ArrayLike, y: ArrayLike, p_x: ArrayLike | Mapping,
                  p_y: ArrayLike | Mapping, *, steps: int | None = None, start: str = "x",
                  tol: float | None = None, sample_weight: ArrayLike | None = None, empty: str = "error",
                  linearization: str = "balanced", max_steps: int | None = None) -> BalancedEstimate:
    """Estimate E[h(X, Y)] from paired samples when the marginals of X and Y are known.

    The two-margin call of :class:`BalancedEstimator`: ``BalancedEstimator({"x": p_x, "y": p_y})``
    on the columns x and y (the margins in the other order for ``start="y"``).

    Parameters
    ----------
    values : array_like (n,) or (n, d)
        h at each sample (d statistics at once in the columns).
    x, y : array_like (n,)
        Each sample's categories: integer codes (with array targets) or any hashable labels (with
        mapping targets); pandas Series and Categoricals are accepted. Missing labels (None, NaN)
        are an error. ``values``, ``x``, ``y`` and ``sample_weight`` may all be Dask arrays or
        Series with the same partitions: two passes over them, no sample collected (user guide,
        "Samples and tables on Dask").
    p_x, p_y : array_like or mapping
        The known marginals: arrays indexed by integer codes, or mappings label -> mass (dict,
        pandas Series). Totals need not be 1 but must agree.
    steps : int, optional
        ``k`` gives the paper's k-step estimator; ``None`` (default) balances to convergence
        (raking). ``0`` is the plain (design-weighted) sample mean with its usual standard error.
    start : {"x", "y"}
        Which marginal the first half-step fixes.
    tol, empty, max_steps
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
        pattern; an unknown ``linearization``.

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
    times the residual of ``h`` after weighted least squares on the sum of functions of each
    margin, weighted by the *balanced* measure. It stays right when the sample's (design-weighted)
    margins differ from the targets in expectation: quota samples, non-response, deliberately
    shifted targets.

    ``"survey"`` takes the conditional means of the *starting* sample and ``z_i`` = the balanced
    weight times the residual. At convergence this is R's ``survey`` (``svymean`` on a
    ``rake()``-d design; R solves the least squares with 10 passes of alternating projections,
    here exactly (LSQR), which differs only when those passes have not converged). It is right
    when the sample matches the targets in expectation, and can then be slightly less noisy; when it
    does not match, it can be far off (twice the true standard error in the theory page's example).
    The two agree to first order when the sample matches the targets, and are equal at ``k = 0``.
    With unequal design weights R residualises with *unweighted* category means, databalance with
    design-weighted ones: the standard errors then differ by a few percent.

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
    start = check.start_option(start)
    if _is_dask(values, x, y, sample_weight):  # one pass for the fit, one for the mean
        margins = {"x": p_x, "y": p_y} if start == "x" else {"y": p_y, "x": p_x}
        estimator = BalancedEstimator(margins, steps=steps, tol=tol, empty=empty, linearization=linearization,
                                  max_steps=max_steps)
        estimator._target_names = ["p_x", "p_y"] if start == "x" else ["p_y", "p_x"]
        return estimator.fit({"x": x, "y": y}, sample_weight).mean(values)
    index = _common_index({"values": values, "x": x, "y": y, "sample_weight": sample_weight})
    n = check.sample_value_columns(values)[1].shape[0]
    x = check.sample_array(x, "x", n)
    y = check.sample_array(y, "y", n)
    margins = {"x": p_x, "y": p_y} if start == "x" else {"y": p_y, "x": p_x}
    estimator = BalancedEstimator(margins, steps=steps, tol=tol, empty=empty, linearization=linearization,
                                  max_steps=max_steps)
    estimator._target_names = ["p_x", "p_y"] if start == "x" else ["p_y", "p_x"]
    estimator._index_of_fit = index
    return estimator.fit({"x": x, "y": y}, sample_weight).mean(values)
