"""What a fitted estimator and its estimates say, read at a glance: :class:`Summary` (text for a
terminal, an HTML table for a notebook, the numbers as attributes) and :class:`LabelledValues`, the
small container that keys several statistics by name when pandas is not in play.
"""

from __future__ import annotations

import html
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["LabelledValues", "MarginSummary", "StatisticSummary", "Summary"]

#: Rows of a margin's achieved-vs-target table shown in text and HTML (all of them stay in the
#: attributes): the categories with the largest deviations first.
SHOWN_ROWS = 8


class LabelledValues(Mapping):
    """Numbers keyed by the names of the statistics they belong to (``values`` given as a mapping).

    A read-only mapping name -> float that also converts to an array in the order of the names:
    ``np.asarray(est.estimate)`` for arithmetic.

    Examples
    --------
    >>> import numpy as np
    >>> v = LabelledValues(("income", "age"), np.array([3.5, 41.0]))
    >>> v["age"], list(v), np.asarray(v) * 2
    (41.0, ['income', 'age'], array([ 7., 82.]))
    >>> v
    LabelledValues({'income': 3.5, 'age': 41.0})
    """

    __slots__ = ("_names", "_values")

    def __init__(self, names: tuple, values: np.ndarray) -> None:
        self._names = tuple(names)
        self._values = np.array(values, dtype=np.float64)
        self._values.flags.writeable = False

    def __getitem__(self, name: Any) -> float:
        try:
            return float(self._values[self._names.index(name)])
        except ValueError:
            raise KeyError(name) from None

    def __iter__(self) -> Iterator:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self._values if dtype is None else self._values.astype(dtype)

    def __repr__(self) -> str:
        return f"LabelledValues({dict(zip(self._names, self._values.tolist(), strict=True))!r})"


@dataclass(frozen=True, eq=False)
class MarginSummary:
    """One margin's achieved shares against its target shares.

    Attributes
    ----------
    key
        The margin's key in ``margins``.
    categories : tuple
        Every category (a tuple of labels for a joint margin), in the target's order.
    achieved, target : ndarray
        Shares (each summing to 1), flat, in the order of ``categories``.
    error : float
        ``sum |achieved - target|``.
    largest_deviation : float
        ``max |achieved - target|``, at the category ``largest_at``.
    largest_at
        The category with the largest deviation.
    """

    key: Any
    categories: tuple
    achieved: np.ndarray
    target: np.ndarray
    error: float
    largest_deviation: float
    largest_at: Any

    def __repr__(self) -> str:
        return (f"MarginSummary(key={self.key!r}, {len(self.categories)} categories, error {self.error:.3g}, "
                f"largest deviation {self.largest_deviation:.3g} at {self.largest_at!r})")


@dataclass(frozen=True, eq=False)
class StatisticSummary:
    """One statistic's estimate, standard error, interval and variance design effect.

    Attributes
    ----------
    name
        The statistic's name (its column), or its position when unnamed.
    estimate, standard_error, low, high : float
        The balanced estimate, its standard error and the interval at the summary's ``level``.
    plain_standard_error : float
        The standard error of the plain (design-weighted) mean of the same sample.
    design_effect : float
        ``(standard_error / plain_standard_error)^2``, R survey's ``deff``: below 1 when balancing
        makes the estimate more precise than the plain mean. NaN when the plain mean's standard
        error is 0 (a constant statistic).
    """

    name: Any
    estimate: float
    standard_error: float
    low: float
    high: float
    plain_standard_error: float
    design_effect: float

    def __repr__(self) -> str:
        return (f"StatisticSummary(name={self.name!r}, estimate {self.estimate:.6g}, SE {self.standard_error:.3g}, "
                f"design effect {self.design_effect:.3g})")


@dataclass(frozen=True, eq=False)
class Summary:
    """A fitted estimator (and optionally its estimates) at a glance.

    ``print(summary)`` gives a text report; in a notebook it shows as HTML tables.

    Attributes
    ----------
    status : str
        The balancing run's status ("converged", "completed", "max_steps", "stalled", ...).
    steps : int
        Half-steps of balancing performed.
    n : int
        Samples.
    effective_sample_size, design_effect : float
        Kish's ``(sum w)^2 / sum w^2`` and ``n / effective_sample_size``.
    min_weight, max_weight : float
        The extreme weights relative to the mean weight.
    weight_ratio : float
        ``max_weight / min_weight`` (inf when a weight is 0).
    bounds_met : bool or None
        With ``bounds``: whether the weights lie within them.
    margins : tuple of MarginSummary
        Every margin, in cycle order.
    statistics : tuple of StatisticSummary
        Every statistic (empty for an estimator summarised without values).
    level : float
        The intervals' confidence level.
    """

    status: str
    steps: int
    n: int
    effective_sample_size: float
    design_effect: float
    min_weight: float
    max_weight: float
    weight_ratio: float
    bounds_met: bool | None
    margins: tuple
    statistics: tuple
    level: float = 0.95

    def __repr__(self) -> str:
        worst = max((m.error for m in self.margins), default=0.0)
        return (f"Summary({self.status} after {self.steps} half-steps; n = {self.n}, effective sample size "
                f"{self.effective_sample_size:.1f}; {len(self.margins)} margins, largest error {worst:.2g}; "
                f"{len(self.statistics)} statistics)")

    def _head(self) -> list[tuple[str, str]]:
        bounds = {None: "none", True: "met", False: "NOT met"}[self.bounds_met]
        return [
            ("Balancing", f"{self.status} after {self.steps} half-steps"),
            ("Samples", f"{self.n}"),
            ("Effective sample size (Kish)", f"{self.effective_sample_size:.1f}"),
            ("Design effect (Kish)", f"{self.design_effect:.3f}"),
            ("Weights / mean weight", f"{self.min_weight:.3g} to {self.max_weight:.3g} "
                                      f"(ratio {self.weight_ratio:.3g})"),
            ("Weight bounds", bounds),
        ]

    def _statistic_rows(self) -> tuple[list[str], list[list[str]]]:
        pct = f"{100 * self.level:g}%"
        header = ["statistic", "estimate", "SE", f"{pct} low", f"{pct} high", "plain SE", "deff"]
        rows = [[str(s.name), f"{s.estimate:.6g}", f"{s.standard_error:.4g}", f"{s.low:.6g}", f"{s.high:.6g}",
                 f"{s.plain_standard_error:.4g}", f"{s.design_effect:.3f}"] for s in self.statistics]
        return header, rows

    def __str__(self) -> str:
        width = max(len(k) for k, _ in self._head())
        lines = [f"{k:<{width}}  {v}" for k, v in self._head()]
        for m in self.margins:
            lines += ["", f"Margin {m.key!r}: L1 error {m.error:.3g}, largest deviation {m.largest_deviation:.3g} "
                          f"at {m.largest_at!r}"]
            lines += _text_table(["category", "achieved", "target", "deviation"], _margin_rows(m))
            if len(m.categories) > SHOWN_ROWS:
                lines.append(f"  ... {len(m.categories) - SHOWN_ROWS} more categories (see .margins)")
        if self.statistics:
            lines += ["", "Estimates (deff: variance over that of the plain mean of the same sample)"]
            lines += _text_table(*self._statistic_rows())
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        parts = ["<div>", _html_table(None, [[k, v] for k, v in self._head()])]
        for m in self.margins:
            caption = (f"Margin {m.key!r}: L1 error {m.error:.3g}, largest deviation "
                       f"{m.largest_deviation:.3g} at {m.largest_at!r}")
            rows = _margin_rows(m)
            if len(m.categories) > SHOWN_ROWS:
                rows.append([f"... {len(m.categories) - SHOWN_ROWS} more", "", "", ""])
            parts.append(_html_table(["category", "achieved", "target", "deviation"], rows, caption))
        if self.statistics:
            parts.append(_html_table(*self._statistic_rows(), "Estimates"))
        parts.append("</div>")
        return "\n".join(parts)


def _margin_rows(m: MarginSummary) -> list[list[str]]:
    """The categories with the largest deviations (at most SHOWN_ROWS), in the target's order."""
    deviation = m.achieved - m.target
    shown = np.sort(np.argsort(-np.abs(deviation), kind="stable")[:SHOWN_ROWS])
    return [[str(m.categories[i]), f"{m.achieved[i]:.6g}", f"{m.target[i]:.6g}", f"{deviation[i]:+.2g}"]
            for i in shown]


def _text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if c == 0 else f"{{:>{w}}}" for c, w in enumerate(widths))
    return ["  " + fmt.format(*r) for r in [header, *rows]]


def _html_table(header: list[str] | None, rows: list[list[str]], caption: str | None = None) -> str:
    esc = html.escape
    out = ["<table>"]
    if caption:
        out.append(f"<caption style='text-align:left'>{esc(caption)}</caption>")
    if header:
        out.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
    out += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows]
    out.append("</table>")
    return "".join(out)
