"""Plots of balancing runs, spectra and variance profiles (needs matplotlib: pip install "databalance[plot]").

matplotlib is imported only when something is plotted. Each function draws on the Axes it is
given; without one it makes a new figure: through pyplot when the caller has already imported
pyplot (so the figure shows in a notebook like any other), otherwise as a bare ``Figure`` with its
own Agg canvas (save it with ``ax.figure.savefig``). The process's backend is never changed. Each
function returns the Axes it drew on.

The result classes call these functions: ``SpectrumResult.plot()``, ``VarianceProfile.plot()``,
``MisspecifiedProfile.plot(n)``; :func:`plot_balance` draws the marginal errors of any balancing
result.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _validation as check

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["plot_balance", "plot_misspecified", "plot_spectrum", "plot_variance_profile"]


def _axes(ax: Axes | None) -> Axes:
    check.matplotlib_installed()
    if ax is not None:
        return check.plot_axes(ax)
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        return pyplot.subplots(layout="constrained")[1]
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(layout="constrained")
    FigureCanvasAgg(fig)
    return fig.add_subplot()


def _integer_steps(ax: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _margin_labels(result: Any, count: int) -> list[str]:
    keys = getattr(result, "keys", None)
    if isinstance(keys, tuple) and len(keys) == count:
        return [f"margin {key}" for key in keys]
    if count == 2:
        return ["p_x (rows)", "p_y (columns)"]
    return [f"margin {j}" for j in range(count)]


def plot_balance(result: Any, ax: Axes | None = None, *, rate: float | None = None) -> Axes:
    """The marginal error of every margin after each half-step, on a log scale.

    Parameters
    ----------
    result : BalanceResult, LogBalanceResult, MarginsResult or CellsResult
        Any result with a ``marginal_error`` of shape (..., steps + 1, K); over a batch, the largest
        error of each margin at each step is drawn.
    ax : matplotlib Axes, optional
        Where to draw; a new figure if None (see :mod:`databalance.plotting`).
    rate : float in (0, 1], optional
        The predicted factor by which the error shrinks per half-step, drawn as a dashed line ending
        at the largest error of the last step where one is positive (nothing is drawn if only the
        start has one). Nothing is computed when it is
        omitted (the prediction needs an SVD of the balanced table): for two margins pass ``s_2``
        of the balanced table, ``spectrum(result.table).max_correlation`` (theory page, section
        'Rate of convergence'); for K margins, ``sweep_rate ** (1 / K)`` of a variance profile of
        the balanced table (:attr:`VarianceProfile.sweep_rate`).

    Returns
    -------
    matplotlib Axes
        One line per margin (labelled p_x / p_y, or by the margin keys), x = k (half-steps from 0 to
        ``steps``), y = the result's ``marginal_error``. The margin a step has just fixed has an error
        of 0 or of rounding size there: exact zeros cannot be shown on a log axis and leave gaps
        (the line then shows as dots).

    Raises
    ------
    TypeError
        ``result`` has no ``marginal_error`` of that shape; ``ax`` is not an Axes.
    ValueError
        ``rate`` not a number in (0, 1].
    ImportError
        matplotlib is not installed (install the ``plot`` extra).

    Examples
    --------
    >>> from databalance import balance_table, spectrum
    >>> from databalance.plotting import plot_balance
    >>> T = [[.10, .05, .05], [.05, .20, .05], [.05, .05, .40]]
    >>> res = balance_table(T, [.3, .3, .4], [.4, .3, .3], steps=12)
    >>> s2 = spectrum(res.table).max_correlation
    >>> ax = plot_balance(res, rate=s2)
    >>> [line.get_label() for line in ax.lines]
    ['p_x (rows)', 'p_y (columns)', 'predicted: 0.557 per half-step']
    """
    errors = check.error_history(result)
    rate = check.plot_rate(rate)
    ax = _axes(ax)
    k = np.arange(errors.shape[0])
    batch = np.ndim(result.marginal_error) > 2
    for label, column in zip(_margin_labels(result, errors.shape[1]), errors.T, strict=True):
        ax.plot(k, column, "o-", ms=3, label=label + (" (largest over the batch)" if batch else ""))
    if rate is not None:
        _draw_rate(ax, errors.max(axis=1), rate)
    # Masked, not clipped: a clipped zero would draw a spike to the axis' floor, a value no run had.
    ax.set_yscale("log", nonpositive="mask")
    _integer_steps(ax)
    ax.set(xlabel="k (half-steps)", ylabel="marginal error", title="Marginal error of balancing")
    ax.legend(fontsize=8)
    return ax


def _draw_rate(ax: Axes, worst: np.ndarray, rate: float) -> None:
    """The line worst[a] * rate^(k - a) for k <= a, a the last step with a positive error (later
    errors are exact zeros, which no rate predicts), where it stays below the largest error drawn
    (further back it would stretch the axis over values no run had). Nothing if a < 1."""
    positive = np.flatnonzero(worst > 0)
    if positive.size == 0 or positive[-1] < 1:
        return
    anchor = positive[-1]
    k = np.arange(anchor + 1)
    with np.errstate(over="ignore"):
        line = worst[anchor] * rate ** (k - anchor).astype(float)
    shown = line <= worst.max()
    ax.plot(k[shown], line[shown], "k--", lw=1, label=f"predicted: {rate:.3g} per half-step")


def plot_spectrum(result: Any, ax: Axes | None = None) -> Axes:
    """The singular values s_1 = 1 >= s_2 >= ... of a :class:`SpectrumResult`, with s_2 marked.

    Called by ``SpectrumResult.plot``; see that method.
    """
    s = np.asarray(result.singular_values)
    ax = _axes(ax)
    j = np.arange(1, len(s) + 1)
    ax.plot(j, s, "o-", ms=4, label="$s_j$")
    if len(s) > 1:
        ax.plot([2], [s[1]], "o", ms=10, mfc="none", mec="C3", mew=2,
                label=f"$s_2$ = {s[1]:.4g}")
    ax.set_ylim(0, 1.05)
    _integer_steps(ax)
    title = "Spectrum of the conditional-mean operators"
    if result.n_components > 1:
        title += f" ({result.n_components} components)"
    ax.set(xlabel="j", ylabel="singular value $s_j$", title=title)
    ax.legend(fontsize=8)
    return ax


def plot_variance_profile(profile: Any, ax: Axes | None = None) -> Axes:
    """sigma_k^2 against k with the sigma_inf^2 line, for a :class:`VarianceProfile`.

    Called by ``VarianceProfile.plot``; see that method.
    """
    sigma2 = np.asarray(profile.sigma2)
    ax = _axes(ax)
    limit = np.atleast_1d(profile.sigma2_limit)
    columns = sigma2[:, None] if sigma2.ndim == 1 else sigma2
    k = np.arange(columns.shape[0])
    for i in range(columns.shape[1]):
        name = "" if sigma2.ndim == 1 else f" of h[..., {i}]"
        line, = ax.plot(k, columns[:, i], "o-", ms=4, label=r"$\sigma_k^2$" + name)
        ax.axhline(limit[i], color=line.get_color(), ls="--", lw=1,
                   label=r"$\sigma_\infty^2$" + name + " (efficiency bound)")
    _integer_steps(ax)
    ax.set(xlabel="k (half-steps)", ylabel=r"$n \times$ MSE (first order)",
           title="Variance of the k-step balanced estimator")
    ax.legend(fontsize=8)
    return ax


def plot_misspecified(profile: Any, n: int, ax: Axes | None = None, *, function: int | None = None) -> Axes:
    """bias^2, variance / n and their sum, the predicted MSE, against k for a
    :class:`MisspecifiedProfile`, with the best k marked.

    Called by ``MisspecifiedProfile.plot``; see that method.
    """
    n = check.positive_int(n, "n")
    bias = np.asarray(profile.bias)
    column = check.function_column(function, None if bias.ndim == 1 else bias.shape[1])
    ax = _axes(ax)
    pick = (slice(None),) if column is None else (slice(None), column)
    bias2, variance, mse = bias[pick] ** 2, np.asarray(profile.variance)[pick] / n, profile.mse(n)[pick]
    best = profile.best_k(n)
    best = int(best if column is None else best[column])
    k = np.arange(len(mse))
    ax.plot(k, bias2, "s-", ms=4, label="bias$^2$")
    ax.plot(k, variance, "^-", ms=4, label="variance / n")
    ax.plot(k, mse, "ko-", ms=4, lw=2, label="MSE")
    ax.axvline(best, color="C3", ls=":", label=f"best k = {best}")
    _integer_steps(ax)
    ax.set(xlabel="k (half-steps)", ylabel="predicted MSE", title=f"Balancing towards wrong marginals, n = {n:,}")
    ax.legend(fontsize=8)
    return ax
