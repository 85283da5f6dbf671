"""The variance of balanced estimators: sigma_k^2 profiles, their closed form through the spectrum,
and the bias and variance of balancing towards misspecified targets.

The k-step balanced estimator of P(h) has influence function IF_k = C_1 C_2 ... C_k h (the last
step's projection acts first) and first-order variance sigma_k^2 = Var_P(IF_k); see the theory page
of the documentation, section 'Influence functions and the variance profile'.

Every IF_k is h - P(h) - a(x) - b(y), so the recursion tracks two vectors (a, b) instead of an
m x l array: a projection costs one product with P. IF_k for odd k are the iterates of the chain
whose first projection is C_X, for even k those of the chain that starts with C_Y, so all k up to
K cost about 2K products. (Running both chains through one product with a two-column matrix reads
P once, but OpenBLAS's gemm with two columns is slower than two gemv calls.)

With K margins of an N-d table (``margins=``), IF_k = C_{j(1)} ... C_{j(k)} h with C_j f = f -
E[f | margin j's variables], j(k) the margin step k fixes (the cycle order). The operator applied
first is that of margin (k - 1) mod K, so K chains, one per first margin, give every k: chain c
yields IF_k for k = c + 1 (mod K). They run on the table's occupied cells (:class:`Cells`), one
grouped sum per projection: O(K * max_steps * cells) for all k.

Variances are quadratic in h, so an h near the float range is divided by a power of two first and
the results multiplied back: an overflow then ends in inf, never in inf - inf = NaN.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from . import _feasibility, _progress, plotting
from . import _validation as check
from ._joint import Cells, Joint, additive_fit, additive_residual
from ._kernels import fused, is_sparse, support_pattern
from ._typing import TableLike
from .balance import iterate_balance
from .spectral import cyclic_rate

__all__ = [
    "MisspecifiedProfile",
    "VarianceDecomposition",
    "VarianceProfile",
    "misspecified_profile",
    "variance_decomposition",
    "variance_profile",
]


@dataclass(frozen=True, eq=False)
class VarianceProfile:
    """First-order variances of the k-step balanced estimator, k = 0..max_steps.

    Attributes
    ----------
    sigma2 : ndarray, shape (max_steps + 1,) or (max_steps + 1, d)
        ``sigma_k^2 = Var_P(C_{j(1)} ... C_{j(k)} h)``: ``n * MSE`` of the k-step estimator as n
        grows. Never negative (rounding below 0 is clamped); ``inf`` where it exceeds the float
        range.
    start : str or None
        Which marginal step 1 fixed (two-way tables); None with ``margins``.
    margins : tuple of tuple of int, or None
        The margins in cycle order (each as sorted axes), or None for a two-way table.
    """

    sigma2: np.ndarray
    start: str | None
    margins: tuple[tuple[int, ...], ...] | None
    _joint: Joint | None = field(repr=False)
    _cells: Cells | None = field(repr=False)
    _h: np.ndarray | None = field(repr=False)  # h - P(h) on the cells, scaled (margins only)
    _scale: np.ndarray = field(repr=False)

    def __repr__(self) -> str:
        steps = self.sigma2.shape[0] - 1
        where = f"margins {list(self.margins)}" if self.margins is not None else f"start={self.start!r}"
        return (f"VarianceProfile(k = 0..{steps}, {where}, {_functions(self.sigma2, 1)}: "
                f"sigma_0^2 {_numbers(self.sigma2[0])}, sigma_{steps}^2 {_numbers(self.sigma2[-1])})")

    @property
    def reduction(self) -> np.ndarray:
        """``sigma_0^2 - sigma_k^2``: the variance removed by k steps of balancing."""
        return self.sigma2[0] - self.sigma2

    def predicted_mse(self, n: int) -> np.ndarray:
        """``sigma_k^2 / n``: the first-order mean squared error with n samples."""
        return self.sigma2 / check.positive_int(n, "n")

    def plot(self, ax: Any = None) -> Any:
        """Draw ``sigma_k^2`` against k with the line ``sigma_inf^2`` (needs matplotlib).

        With correct targets balancing adds no bias, so ``sigma_k^2 / n`` is the whole first-order
        MSE: more steps never hurt in the long run, since every ``sigma_k^2`` is at least
        ``sigma_inf^2`` and the profile approaches it (geometrically, like ``s_2^(2k)`` for two
        margins). The profile need not fall at every step, though: for h a function of x alone it
        is 0 after every X-step and positive after every Y-step (theory page, section 'Influence
        functions and the variance profile'). A best finite k exists only when the targets are
        off: see :meth:`MisspecifiedProfile.best_k`.

        Parameters
        ----------
        ax : matplotlib Axes, optional
            Where to draw; a new figure if None (see :mod:`databalance.plotting`).

        Returns
        -------
        matplotlib Axes
            One line of ``sigma2`` at k = 0..max_steps (one per function when the profile holds
            several) and a dashed horizontal line at ``sigma2_limit`` (computed here if it was not
            yet).

        Raises
        ------
        ImportError
            matplotlib is not installed (install the ``plot`` extra).
        TypeError
            ``ax`` is not a matplotlib Axes.

        Examples
        --------
        >>> from databalance import variance_profile
        >>> P = [[.10, .05, .05], [.05, .20, .05], [.05, .05, .40]]
        >>> h = [[1, 0, 2], [0, 3, 1], [2, 1, 0]]
        >>> ax = variance_profile(P, h, max_steps=3).plot()
        >>> ax.lines[0].get_ydata().round(6)
        array([1.4     , 0.746667, 0.63433 , 0.597818])
        >>> round(float(ax.lines[1].get_ydata()[0]), 6)  # sigma_inf^2
        0.577099
        """
        return plotting.plot_variance_profile(self, ax)

    @cached_property
    def sigma2_limit(self) -> float | np.ndarray:
        """``sigma_inf^2``: the residual variance of h after weighted least squares on the sums of
        functions of each margin's variables (u(x) + v(y) for a two-way table), the efficiency
        bound with the margins known (theory page, section 'The efficiency bound'). Computed on
        first access: MINRES on the (m + l) normal equations for a two-way table, LSQR on the
        sparse indicator columns of the margins' categories with ``margins``; never negative."""
        if self._joint is not None:
            residual = additive_residual(self._joint)
        else:
            assert self._cells is not None and self._h is not None
            residual = _span_residual(self._cells, self._h)
        out = _unscale_variance(residual, self._scale)
        return out if self.sigma2.ndim == 2 else float(out[0])

    @cached_property
    def sweep_rate(self) -> float:
        """The asymptotic factor by which one *sweep* (one step per margin) shrinks the distance to
        the limit.

        It is the spectral radius of the cyclic product ``C_{j(1)} C_{j(2)} ... C_{j(K)}`` on the
        span of functions of the margins' variables (von Neumann-Halperin; theory page, section
        'Rate of convergence'). For two margins it is ``s_2^2`` (:attr:`SpectrumResult.ipf_rate`)
        when the support is connected, otherwise the largest ``s_j^2 < 1``.

        IPF's marginal errors near a table shrink by about this factor per sweep, and
        ``sigma_k^2 - sigma_inf^2`` by about its square (per K half-steps). Computed on first
        access, densely in the number L of margin categories (O(L^3)), never in the cells.
        """
        if self._cells is not None:
            return cyclic_rate(self._cells)
        assert self._joint is not None
        T = self._joint.T
        if is_sparse(T):
            rows = np.repeat(np.arange(T.shape[0]), np.diff(T.indptr))
            cells = Cells([rows, T.indices.astype(np.int64)], [(T.shape[0],), (T.shape[1],)], T.data)
        else:
            cells = Cells.from_table(np.asarray(T), [(0,), (1,)])
        return cyclic_rate(cells)


def variance_profile(table: TableLike, h: TableLike, *, max_steps: int, margins=None,
                     start: str = "x", progress: Any = None) -> VarianceProfile:
    """The exact first-order variance of the k-step balanced estimator for k = 0..max_steps.

    Parameters
    ----------
    table : array_like or scipy.sparse matrix
        The true joint distribution P (normalised internally). Without ``margins``: a two-way
        table (m, l), dense or sparse, with no empty rows or columns. With ``margins``: a dense
        N-d array; categories of a margin without mass are allowed (they carry no weight).
    h : array_like or scipy.sparse matrix
        The function (real numbers): the table's shape, or that shape + (d,) for d functions at
        once. For a sparse two-way table either a sparse matrix of the same shape (read on the
        table's entries), or one value per stored entry of ``table`` in the order of
        ``table.data`` (CSR, CSC or COO ``table``), shape (nnz,) or (nnz, d); a table storing a
        cell twice is refused then (ambiguous).
    max_steps : int
        Largest k (k counts half-steps: one margin's projection each).
    margins : sequence, optional
        The margins in cycle order, each an axis (``int``, a one-way margin) or a tuple of axes (a
        joint margin, in any axis order), as in :func:`balance_margins`: step k fixes margin
        ``(k - 1) mod K``. None (the default) means the rows and columns of a two-way table.
    start : {"x", "y"}
        Without ``margins``: which marginal the first step fixes. With ``margins`` it must stay
        "x" (reorder ``margins`` instead).
    progress : bool or callable, optional
        For long profiles: a callable ``f(done, values)`` called each time another ``sigma_k^2``
        is known, with ``done`` the number of k in 1..max_steps known so far (it only grows, up to
        max_steps; the chains fill odd and even k, or each margin's k, in turn, and a converged
        chain fills the rest of its k at once) and ``values`` the latest ``sigma_k^2`` (an array,
        one per function); ``True`` for a progress bar (tqdm when installed, else a line on
        stderr); ``False``/``None`` (default) for silence.

    Returns
    -------
    VarianceProfile
        ``sigma2`` for every k; ``sigma2_limit`` and ``sweep_rate`` on first access.

    Raises
    ------
    ValueError, TypeError
        Invalid ``table`` (see :func:`spectrum`; with ``margins``, a sparse, negative, NaN or inf
        table, or one of total 0); ``h`` of the wrong shape, complex, masked, with NaN or inf, or
        given per stored entry of a sparse table that stores a cell twice or is not CSR, CSC or
        COO; ``margins`` not a sequence, naming an axis out of range, repeating an axis within a
        margin or a margin twice; ``max_steps`` not an integer >= 0; ``start`` not "x" or "y", or
        "y" with ``margins``; ``progress`` neither a bool nor a callable (TypeError).

    Warns
    -----
    ConvergenceWarning
        When the LSQR solve behind ``sigma2_limit`` stops at its iteration limit.

    Notes
    -----
    Costs about 2 * max_steps products with P (O(max_steps * nnz)) for a two-way table, and
    K * max_steps grouped sums over the occupied cells (O(K * max_steps * cells)) with K
    ``margins``, for all k together; fewer when sigma_k^2 converges first: a chain stops once its
    remaining geometric tail is below 1e-15 Var(h), and later k repeat the last value. With
    ``margins=[0, 1]`` on a two-way table the numbers equal those without ``margins`` (to
    rounding). ``sigma2_limit`` costs a sparse least-squares solve, on first access. The theory
    is on the documentation's theory page, sections 'Influence functions and the variance
    profile' and 'Rate of convergence'.

    Examples
    --------
    >>> import numpy as np
    >>> from databalance import variance_profile
    >>> P = [[.10, .05, .05], [.05, .20, .05], [.05, .05, .40]]
    >>> h = [[1, 0, 2], [0, 3, 1], [2, 1, 0]]
    >>> prof = variance_profile(P, h, max_steps=3)
    >>> prof.sigma2.round(6), round(prof.sigma2_limit, 6)
    (array([1.4     , 0.746667, 0.63433 , 0.597818]), 0.577099)

    Three margins of a 3-way table, one of them joint. A function of axes 0 and 1 has
    sigma_k^2 = 0 right after each step that fixes the margin (0, 1) (k = 2, 5, ...), and also
    when the steps after that one only fix margins of those axes (k = 3):

    >>> T = np.arange(24.0).reshape(2, 3, 4) % 7 + 1
    >>> g = np.broadcast_to(np.array([[1., 0., 2.], [0., 3., 1.]])[:, :, None], T.shape)
    >>> prof = variance_profile(T, g, max_steps=5, margins=[2, (0, 1), 1])
    >>> prof.sigma2.round(4)
    array([1.3167, 1.2165, 0.    , 0.    , 0.0108, 0.    ])
    >>> round(prof.sweep_rate, 4), bool(prof.sigma2_limit < 1e-12)
    (0.1302, True)
    """
    max_steps = check.max_steps_option(max_steps)
    check.progress_option(progress)
    if margins is not None:
        check.start_option(start)
        check.margins_start(start)
        return _margins_profile(table, h, max_steps=max_steps, margins=margins, progress=progress)
    start = check.start_option(start)
    T, tr, tc = check.joint_table(table)
    h = check.function_values(h, T, table=table)
    h3, scale, single = _scaled_functions(h, T)
    joint = Joint(T, tr, tc, h3)
    if start == "y":
        joint = joint.transpose()
    with _Counter(progress, max_steps) as count:
        sigma2 = _unscale_variance(_chains(joint, max_steps, count), scale)
    return VarianceProfile(sigma2[:, 0] if single else sigma2, start, None, joint, None, None, scale)


class _Counter:
    """Reports, through :func:`databalance._progress.reporter`, how many sigma_k^2 (k >= 1) are
    known and the latest one (for an h near the float range, of h divided by its power-of-two
    scale)."""

    def __init__(self, progress: Any, total: int) -> None:
        self.pair = _progress.reporter(progress, "variance_profile: sigma_k^2 known", total,
                                       what="largest sigma_k^2")
        self.done = 0

    def __call__(self, new: int, value: np.ndarray) -> None:
        self.done += new
        if self.pair is not None and new > 0:
            self.pair[0](self.done, value)

    def __enter__(self) -> _Counter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pair is not None:
            self.pair[1]()


def _margins_profile(table: TableLike, h: TableLike, *, max_steps: int, margins, progress: Any) -> VarianceProfile:
    """variance_profile on an N-d table seen through ``margins`` (see the module docstring)."""
    T = check.nd_table(table)
    axes = check.margin_axes(margins, T.ndim)
    h = check.nd_function_values(h, T.shape)
    single = h.ndim == T.ndim
    cells = Cells.from_table(T, axes)
    where = np.nonzero(T > 0)
    values = h[where]
    values = values[:, None] if single else values
    values, scale = _scaled_columns(values, np.ones(len(values), dtype=bool))
    p = cells.mass / cells.mass.sum()
    centred = values - p @ values
    with _Counter(progress, max_steps) as count:
        sigma2 = _unscale_variance(_cyclic_chains(cells, p, centred, max_steps, count), scale)
    return VarianceProfile(sigma2[:, 0] if single else sigma2, None, tuple(axes), None, cells, centred, scale)


#: |h| between 2**-256 and 2**256 keeps h^2 and its sums inside the normal float range;
#: beyond, h is divided by a power of two (exact) and the variances multiplied back.
_SAFE_EXPONENT = 256


def _scaled_functions(h: np.ndarray, T: Any) -> tuple[np.ndarray, np.ndarray, bool]:
    """(h with a trailing function axis, divided by its scale; the scale per function; whether h
    was a single function). The scale is 1 unless the largest |h| on the support of T is outside
    [2**-256, 2**256], else the power of two at that largest value."""
    sparse = is_sparse(T)
    single = h.ndim == (1 if sparse else 2)
    h3 = h[..., None] if single else h
    support = (T.data if sparse else T) > 0
    h3, scale = _scaled_columns(h3, support)
    return h3, scale, single


def _scaled_columns(h: np.ndarray, support: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(h / scale, scale) for functions in the last axis of h, judged on ``support`` (the shape of
    h without its last axis); see :func:`_scaled_functions`."""
    peak = np.abs(h).max(axis=tuple(range(h.ndim - 1)), where=support[..., None], initial=0.0)
    _, exponent = np.frexp(peak)
    exponent[(np.abs(exponent) <= _SAFE_EXPONENT) | (peak == 0)] = 0
    if not exponent.any():
        return h, np.ones(h.shape[-1])
    scale = np.ldexp(1.0, exponent)
    return h / scale, scale


def _unscale_variance(value: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Clamp rounding below 0, then undo the scaling of h: (v * s) * s, never NaN for finite
    v >= 0 and s > 0 (s * s could overflow and meet v = 0); an overflow gives inf."""
    with np.errstate(over="ignore"):
        return np.maximum(value, 0.0) * scale * scale


#: A chain stops once the geometric tail of its remaining changes is below this share of Var(h):
#: every later value then equals the last one to within rounding.
_TAIL = 1e-15


def _chains(joint: Joint, K: int, count: _Counter) -> np.ndarray:
    """sigma_k^2, k = 0..K, from two chains of (a, b) vectors (see the module docstring)."""
    p, q = joint.p, joint.q
    _, second, pr, qc = joint.moments
    r, c = pr / p[:, None], qc / q[:, None]
    sigma2 = np.empty((K + 1, second.shape[0]))
    sigma2[0] = second
    scale = _TAIL * np.maximum(second, np.finfo(float).tiny)
    for first in ("x", "y"):
        # The chain whose first projection is C_first gives IF_t for odd t (first = x) or even t.
        a, b = np.zeros_like(r), np.zeros_like(c)
        last = K if (K % 2 == 1) == (first == "x") else K - 1
        kept = []  # the values this chain contributes, every second projection
        step = _Steps(joint, r, c)
        for t in range(1, last + 1):
            # After an X-projection E[g | X] = 0, so Var(g) = E[(h~ - b)^2] - E[a^2], a = E[h~ - b | X].
            if (t % 2 == 1) == (first == "x"):
                a = step.x(b) if t > 1 else r
                value = second - 2 * (qc * b).sum(0) + (q[:, None] * b**2).sum(0) - (p[:, None] * a**2).sum(0)
            else:
                b = step.y(a) if t > 1 else c
                value = second - 2 * (pr * a).sum(0) + (p[:, None] * a**2).sum(0) - (q[:, None] * b**2).sum(0)
            if (t % 2 == 1) == (first == "x"):
                sigma2[t] = value
                count(1, value)
                kept.append(value)
                if len(kept) % 4 == 3 and _converged(kept, scale):  # cheap, but not free: every 4th
                    sigma2[t + 2 :: 2] = value
                    count(len(sigma2[t + 2 :: 2]), value)
                    break
    return sigma2


class _Steps:
    """The chains' steps ``a = r - E[b | X]`` and ``b = c - E[a | Y]``.

    Where the fused kernels run (:func:`databalance._kernels.fused.which_kernel`): on a dense table a
    step over the table's contiguous lines (X for C order, Y for Fortran order) is one numba pass
    that also gives the sums the next step needs (one read of the table per two steps instead of
    one per step); on a CSR/CSC table each step is a threaded gather, the sparse kernel's
    (:func:`databalance._kernels.fused_sparse.line_products`; a fused pass's scattered updates
    measured slower than a second gather there). Otherwise each step is a product with the table."""

    def __init__(self, joint: Joint, r: np.ndarray, c: np.ndarray) -> None:
        self.joint, self.r, self.c = joint, r, c
        numba = fused.which_kernel(joint.T) == "numba"
        self.lead = None if joint.sparse or not numba else fused._lead(joint.T)
        self.products = None
        if joint.sparse and numba:
            from ._kernels.fused_sparse import line_products

            self.products = line_products(joint.T)
        self.next: tuple | None = None  # (the step's result, the next step's conditional mean)

    def x(self, b: np.ndarray) -> np.ndarray:
        return self._step(0, b)

    def y(self, a: np.ndarray) -> np.ndarray:
        return self._step(1, a)

    def _step(self, side: int, v: np.ndarray) -> np.ndarray:
        j = self.joint
        base, sums = (self.r, j.tr) if side == 0 else (self.c, j.tc)
        if self.products is not None:
            return base - self.products[side](v) / sums[:, None]
        if self.lead is None:
            return base - (j.given_x(v) if side == 0 else j.given_y(v))
        if self.next is not None and self.next[0] is v:  # computed in the pass of the last step
            return base - self.next[1]
        W = j.T if self.lead == 0 else j.T.T  # C-ordered: its rows are the lead lines
        if side != self.lead:  # the product alone (a chain's first product): nothing to step
            product = fused.chain_pass(W, np.zeros((W.shape[1], v.shape[1])), v, np.zeros(W.shape[0]))[1]
            return base - product / sums[:, None]
        out, product = fused.chain_pass(W, v, base, 1.0 / sums)
        self.next = (out, product / (j.tc if side == 0 else j.tr)[:, None])
        return out


def _cyclic_chains(cells: Cells, p: np.ndarray, h: np.ndarray, K: int, count: _Counter) -> np.ndarray:
    """sigma_k^2, k = 0..K, for the margins of ``cells`` (p the cell probabilities, h centred,
    shape (cells, d)); see the module docstring."""
    n_margins = len(cells.codes)
    masses = [cells.margin_sums(j, p) for j in range(n_margins)]
    second = p @ h**2
    sigma2 = np.empty((K + 1, h.shape[1]))
    sigma2[0] = second
    scale = _TAIL * np.maximum(second, np.finfo(float).tiny)
    for first in range(min(n_margins, K)):
        # Chain `first` projects on margins first, first - 1, ... (cyclically); after t projections
        # with t = first + 1 (mod K) the last one is margin 0's: that is IF_t.
        g = h.copy()
        kept = []
        last = first + 1 + (K - first - 1) // n_margins * n_margins
        for t in range(1, last + 1):
            j = (first - t + 1) % n_margins
            mean = np.zeros((cells.sizes[j], h.shape[1]))
            np.divide(cells.margin_sums(j, p[:, None] * g), masses[j][:, None], out=mean,
                      where=masses[j][:, None] > 0)
            g -= mean[cells.codes[j]]
            if (t - first - 1) % n_margins == 0:
                value = p @ g**2  # E[g] = 0 after a projection
                sigma2[t] = value
                count(1, value)
                kept.append(value)
                if len(kept) % 4 == 3 and _converged(kept, scale):
                    sigma2[t + n_margins :: n_margins] = value
                    count(len(sigma2[t + n_margins :: n_margins]), value)
                    break
    return sigma2


def _span_residual(cells: Cells, h: np.ndarray) -> np.ndarray:
    """min over sums a_1(g_1) + ... + a_K(g_K) of E[(h - sum)^2] for each column of h (centred):
    the residual of the weighted least-squares fit of the estimators' linearisation
    (:func:`databalance._joint.additive_fit`, LSQR on the scaled sparse indicator columns)."""
    q = cells.mass / cells.mass.sum()
    fit = additive_fit(cells, cells.mass, q[:, None] * h)
    return (q[:, None] * (h - fit) ** 2).sum(axis=0)


def _functions(values: Any, ndim: int) -> str:
    """'1 function' or 'd functions' for an array with ``ndim`` axes per function."""
    d = 1 if np.ndim(values) == ndim else np.shape(values)[-1]
    return f"{d} function" + ("s" if d > 1 else "")


def _numbers(values: Any) -> str:
    """A float, or the first three of several, in 4 significant digits."""
    v = np.atleast_1d(np.asarray(values, dtype=np.float64))
    shown = ", ".join(f"{x:.4g}" for x in v[:3]) + (", ..." if len(v) > 3 else "")
    return shown if len(v) == 1 else f"[{shown}]"


def _converged(values, scale) -> bool:
    """Whether the geometric tail inc * rho / (1 - rho) of a sequence is below ``scale``."""
    if len(values) < 3:
        return False
    inc = np.abs(values[-1] - values[-2])
    prev = np.abs(values[-2] - values[-3])
    rho = np.divide(inc, prev, out=np.zeros_like(inc), where=prev > 0)
    return bool(np.all((rho < 1) & (inc * rho <= scale * (1 - rho))) or np.all(inc == 0))




# -- the closed form -------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class VarianceDecomposition:
    """sigma_k^2 split over the singular directions of the table (theory page, section 'The
    spectral closed form').

    Attributes
    ----------
    singular_values : ndarray, shape (n,)
        ``s_j`` for j = 0..n-1, n = max(m, l), padded with zeros for unpaired directions.
    x_coordinates, y_coordinates : ndarray, shape (n,) or (n, d)
        ``f_j = E[h alpha_j(X)]`` and ``g_j = E[h beta_j(Y)]`` (0 where a direction does not exist).
    sigma2_limit : float or ndarray
        ``sigma_inf^2 = Var(h) - sum_j (f_j^2 + g_j^2 - 2 s_j f_j g_j) / (1 - s_j^2)``, j >= 1; never
        negative (rounding below 0 is clamped).
    terms : ndarray, shape (max_steps + 1, n) or (max_steps + 1, n, d)
        ``sigma_k^2 - sigma_inf^2`` carried by direction j: ``s_j^(2(k-1)) c_jk^2 / (1 - s_j^2)`` for
        k >= 1, with ``c = g - s f`` after an X-step and ``f - s g`` after a Y-step; row 0 is the
        direction's share of ``Var(h) - sigma_inf^2``. Column 0 (the constants) is 0.
    """

    singular_values: np.ndarray
    x_coordinates: np.ndarray
    y_coordinates: np.ndarray
    sigma2_limit: float | np.ndarray
    terms: np.ndarray = field(repr=False)

    def __repr__(self) -> str:
        s = self.singular_values
        return (f"VarianceDecomposition(k = 0..{self.terms.shape[0] - 1}, {len(s)} directions, s_2 = "
                f"{s[1] if len(s) > 1 else 0.0:.4g}, {_functions(self.x_coordinates, 1)}: sigma_inf^2 "
                f"{_numbers(self.sigma2_limit)})")

    @property
    def sigma2(self) -> np.ndarray:
        """``sigma_k^2`` for k = 0..max_steps (equal to :func:`variance_profile`'s); never negative."""
        return np.maximum(self.sigma2_limit + self.terms.sum(axis=1), 0.0)


def variance_decomposition(table: TableLike, h: ArrayLike, *, max_steps: int,
                           start: str = "x") -> VarianceDecomposition:
    """The closed form of sigma_k^2 through the spectrum: which directions carry the variance.

    Dense tables with a connected support only (the closed form divides by ``1 - s_j^2``). The
    formula is derived on the documentation's theory page, section 'The spectral closed form'.

    Parameters
    ----------
    table, h, max_steps, start
        As in :func:`variance_profile` (``table`` dense).

    Returns
    -------
    VarianceDecomposition

    Raises
    ------
    TypeError
        A sparse table.
    ValueError
        A disconnected support (``s_2 = 1``), or invalid input as in :func:`variance_profile`.

    Examples
    --------
    >>> import numpy as np
    >>> from databalance import variance_decomposition
    >>> s = 0.5
    >>> P = np.array([[1 + s, 1 - s], [1 - s, 1 + s]]) / 4
    >>> dec = variance_decomposition(P, [[1, 0], [0, 0]], max_steps=2)
    >>> dec.sigma2.round(6), round(dec.sigma2_limit * 16, 12)  # sigma_inf^2 = (1 - s^2) / 16
    (array([0.234375, 0.09375 , 0.058594]), 0.75)
    """
    start = check.start_option(start)
    max_steps = check.max_steps_option(max_steps)
    if is_sparse(table):
        raise TypeError("variance_decomposition needs a dense table (it uses the full SVD); "
                        "use variance_profile for sparse tables.")
    T, tr, tc = check.joint_table(table)
    h3, scale, single = _scaled_functions(check.function_values(h, T), T)
    if _feasibility.components(support_pattern(T))[0] > 1:
        raise ValueError("The support graph of `table` is disconnected (s_2 = 1), so the closed form "
                         "divides by zero; use variance_profile, which handles it.")
    s, f, g, second = _coordinates(Joint(T, tr, tc, h3), start)
    S = s[:, None]
    denom = 1 - S**2
    total = (f**2 + g**2 - 2 * S * f * g) / denom
    terms = np.zeros((max_steps + 1, len(s), f.shape[1]))
    terms[0] = total
    for k in range(1, max_steps + 1):
        coef = g - S * f if k % 2 else f - S * g
        terms[k] = S ** (2 * (k - 1)) * coef**2 / denom
    terms[:, 0] = 0.0
    limit = _unscale_variance(second - total[1:].sum(axis=0), scale)
    with np.errstate(over="ignore"):
        terms = terms * scale * scale
        f, g = f * scale, g * scale
    if start == "y":
        f, g = g, f
    s[0] = 1.0
    if single:
        return VarianceDecomposition(s, f[:, 0], g[:, 0], float(limit[0]), terms[..., 0])
    return VarianceDecomposition(s, f, g, limit, terms)


def _coordinates(joint: Joint, start: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(s, f, g, Var h) with s padded by zeros to n = max(m, l) and s_0 = 0 (h is centred: the
    constant direction carries nothing), and f, g exchanged for start="y" so that the formula
    always reads as if step 1 were an X-step."""
    m, l = joint.T.shape
    n = max(m, l)
    _, second, pr, qc = joint.moments
    U, s, Vt = np.linalg.svd(joint.T / np.sqrt(joint.tr)[:, None] / np.sqrt(joint.tc)[None, :])
    # f_j = E[h alpha_j(X)] = sum_x alpha_j(x) p(x) E[h | X = x] = (U^T (pr / sqrt p))_j
    f = np.zeros((n, pr.shape[1]))
    g = np.zeros((n, pr.shape[1]))
    f[:m] = U.T @ (pr / np.sqrt(joint.p)[:, None])
    g[:l] = Vt @ (qc / np.sqrt(joint.q)[:, None])
    s_full = np.zeros(n)
    s_full[1 : len(s)] = s[1:]
    return (s_full, g, f, second) if start == "y" else (s_full, f, g, second)


# -- misspecified marginals ------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MisspecifiedProfile:
    """Bias and first-order variance of k-step balancing towards wrong marginals (theory page,
    section 'Misspecified targets').

    Attributes
    ----------
    bias : ndarray, shape (max_steps + 1,) or (max_steps + 1, d)
        ``Pbar^(k)(h) - P(h)``, where ``Pbar^(k)`` balances the true P itself towards the targets.
        It does not shrink with n.
    variance : ndarray
        ``Var_P(L_1 ... L_k h)``: ``n`` times the variance of the k-step estimator as n grows.
        Never negative; ``inf`` where it exceeds the float range.
    """

    bias: np.ndarray
    variance: np.ndarray

    def __repr__(self) -> str:
        steps = self.bias.shape[0] - 1
        return (f"MisspecifiedProfile(k = 0..{steps}, {_functions(self.bias, 1)}: bias at k = {steps} "
                f"{_numbers(self.bias[-1])}, variance at k = 0 {_numbers(self.variance[0])} and k = {steps} "
                f"{_numbers(self.variance[-1])})")

    def mse(self, n: int) -> np.ndarray:
        """``bias^2 + variance / n``: the first-order mean squared error with n samples."""
        return self.bias**2 + self.variance / check.positive_int(n, "n")

    def best_k(self, n: int) -> int | np.ndarray:
        """The number of half-steps k (0..max_steps) with the smallest predicted MSE for n samples.

        Ties go to the smallest k; values that differ only by rounding (relative ``1e-12``) count as
        ties, so a profile that has converged gives the first k of its plateau, not a step picked
        by rounding noise.

        With correct targets there is no bias, and more steps never hurt in the long run: every
        ``sigma_k^2`` is at least the limit ``sigma_inf^2`` and approaches it, although not
        necessarily at every step (theory page, section 'Misspecified targets'). The answer is
        then one of the last steps computed (or where the profile stops changing). A best finite k
        exists only when the targets are off: the bias, which does not shrink with n, then
        outweighs the variance saved by more steps, and the best k falls to 0 (the plain mean)
        once n is large.

        Parameters
        ----------
        n : int
            The sample size.

        Returns
        -------
        int, or ndarray of int with one k per function when the profile holds several.

        Raises
        ------
        ValueError
            ``n`` not a positive integer.

        Examples
        --------
        >>> import numpy as np
        >>> from databalance import misspecified_profile
        >>> P = np.array([[.3, .2], [.1, .4]])
        >>> prof = misspecified_profile(P, [[1, 0], [0, 0]], [.6, .4], [.4, .6], max_steps=4)
        >>> [prof.best_k(n) for n in (10, 100, 1000)]  # the bias outweighs the variance as n grows
        [2, 2, 0]
        """
        mse = self.mse(n)
        ties = mse <= mse.min(axis=0) * (1 + _TIE_RTOL)
        best = np.argmax(ties, axis=0)
        return int(best) if mse.ndim == 1 else best

    def plot(self, n: int, ax: Any = None, *, function: int | None = None) -> Any:
        """Draw bias^2, variance / n and the predicted MSE against k for n samples, with
        :meth:`best_k` marked (needs matplotlib).

        Parameters
        ----------
        n : int
            The sample size.
        ax : matplotlib Axes, optional
            Where to draw; a new figure if None (see :mod:`databalance.plotting`).
        function : int, optional
            Which function to draw when the profile holds several (required then).

        Returns
        -------
        matplotlib Axes
            Three lines at k = 0..max_steps: ``bias**2``, ``variance / n`` and ``mse(n)``, and a
            vertical line at ``best_k(n)``. The y axis is linear (bias^2 is 0 at k = 0); call
            ``ax.set_yscale("log")`` for a log scale.

        Raises
        ------
        ValueError
            ``n`` not a positive integer; ``function`` missing or out of range for a profile of
            several functions, or given for a profile of one.
        ImportError
            matplotlib is not installed (install the ``plot`` extra).
        TypeError
            ``ax`` is not a matplotlib Axes.

        Examples
        --------
        >>> import numpy as np
        >>> from databalance import misspecified_profile
        >>> P = np.array([[.3, .2], [.1, .4]])
        >>> prof = misspecified_profile(P, [[1, 0], [0, 0]], [.6, .4], [.4, .6], max_steps=4)
        >>> ax = prof.plot(100)
        >>> [line.get_label() for line in ax.lines]
        ['bias$^2$', 'variance / n', 'MSE', 'best k = 2']
        """
        return plotting.plot_misspecified(self, n, ax, function=function)


#: Relative difference below which two predicted MSEs count as equal in MisspecifiedProfile.best_k:
#: far above the rounding of the sums behind them (about 1e-15 per step), far below any real gap.
_TIE_RTOL = 1e-12


def misspecified_profile(table: TableLike, h: ArrayLike, p_x: ArrayLike, p_y: ArrayLike, *, max_steps: int,
                         start: str = "x") -> MisspecifiedProfile:
    """Predicted bias and variance of balancing a sample of ``table`` towards ``p_x, p_y``.

    Parameters
    ----------
    table : array_like (m, l)
        The true joint distribution (dense; normalised internally).
    h : array_like (m, l) or (m, l, d)
        The function whose mean is estimated (real numbers).
    p_x, p_y : array_like
        The targets used for balancing (possibly wrong); normalised to total 1. Zero entries are
        allowed: those lines are emptied, as :func:`balance_table` does.
    max_steps, start
        As in :func:`variance_profile`.

    Returns
    -------
    MisspecifiedProfile

    Raises
    ------
    TypeError
        A sparse table.
    ValueError
        Targets of the wrong length, negative, or with different totals; targets no rescaling of
        ``table`` can reach; invalid ``table``/``h``/``max_steps``/``start``.

    Notes
    -----
    ``L_j g = w_j (g - E_{Pbar^(j-1)}[g | X])`` with ``w_j = p_x / Pbar^(j-1)_X`` for an X-step (Y and
    ``p_y`` for a Y-step); see the theory page, section 'Misspecified targets'. A line whose target
    is 0 is empty in every iterate from the step that fixes it on, whatever the sample, so its
    cells have weight 0 there. Costs O(max_steps^2 m l).

    Examples
    --------
    >>> import numpy as np
    >>> from databalance import misspecified_profile
    >>> P = np.array([[.3, .2], [.1, .4]])
    >>> h = [[1, 0], [0, 0]]
    >>> prof = misspecified_profile(P, h, [.6, .4], [.4, .6], max_steps=2)  # true P_X = (.5, .5)
    >>> prof.bias.round(4), prof.variance.round(4)
    (array([0.    , 0.06  , 0.0273]), array([0.21  , 0.1728, 0.033 ]))
    """
    start = check.start_option(start)
    max_steps = check.max_steps_option(max_steps)
    if is_sparse(table):
        raise TypeError("misspecified_profile needs a dense table; convert it with `table.toarray()`.")
    T, tr, _ = check.joint_table(table)
    P = T / tr.sum()
    h3, scale, single = _scaled_functions(check.function_values(h, P), P)
    target_x = check.marginal(p_x, "p_x", P.shape[0], ())
    target_y = check.marginal(p_y, "p_y", P.shape[1], ())
    total = check.matching_totals(target_x, target_y)
    target_x, target_y = target_x / total, target_y / total
    balancing = iterate_balance(P, target_x, target_y, start=start)
    iterates = [it.table for it in itertools.islice(balancing, max_steps + 1)]
    truth = np.einsum("xy,xyd->d", P, h3)
    bias = np.array([np.einsum("xy,xyd->d", Pk, h3) - truth for Pk in iterates])
    variance = np.empty_like(bias)
    for k in range(max_steps + 1):
        g = h3
        for j in range(k, 0, -1):
            g = _misspecified_step(g, iterates[j - 1], target_x, target_y,
                                   x_step=(j % 2 == 1) == (start == "x"))
        centred = g - np.einsum("xy,xyd->d", P, g)
        variance[k] = np.einsum("xy,xyd,xyd->d", P, centred, centred)
    with np.errstate(over="ignore"):
        bias = bias * scale
    variance = _unscale_variance(variance, scale)
    return MisspecifiedProfile(bias[:, 0], variance[:, 0]) if single else MisspecifiedProfile(bias, variance)


def _misspecified_step(g: np.ndarray, Pbar: np.ndarray, p_x: np.ndarray, p_y: np.ndarray, *,
                       x_step: bool) -> np.ndarray:
    """L_j g for the step that fixes X (or Y) on the population iterate Pbar = Pbar^(j-1)."""
    axis, target = (1, p_x) if x_step else (0, p_y)
    margin = Pbar.sum(axis=axis)
    # A line emptied by an earlier zero target has margin 0 and target 0: the step keeps it empty
    # whatever the sample (weight 0), and its conditional mean, 0/0, is never used.
    filled = margin > 0
    safe = np.where(filled, margin, 1.0)
    cond = np.einsum("xy,xyd->xd" if x_step else "xy,xyd->yd", Pbar, g) / safe[:, None]
    weight = np.where(filled, target / safe, 0.0)
    if x_step:
        return weight[:, None, None] * (g - cond[:, None, :])
    return weight[None, :, None] * (g - cond[None, :, :])
