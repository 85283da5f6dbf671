"""The variance of balanced estimators: sigma_k^2 profiles, their closed form through the spectrum,
and the bias and variance of balancing towards misspecified targets.

The k-step balanced estimator of P(h) has influence function IF_k = C_1 C_2 ... C_k h (the last
step's projection acts first) and first-order variance sigma_k^2 = Var_P(IF_k); see the theory page
of the documentation.

Every IF_k is h - P(h) - a(x) - b(y), so the recursion tracks two vectors (a, b) instead of an
m x l array: a projection costs one product with P. IF_k for odd k are the iterates of the chain
whose first projection is C_X, for even k those of the chain that starts with C_Y, so all k up to
K cost about 2K products. (Running both chains through one product with a two-column matrix reads
P once, but OpenBLAS's gemm with two columns is slower than two gemv calls.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import scipy.sparse as sp

from . import _feasibility
from . import _validation as check
from ._joint import Joint, additive_residual
from .balance import iterate_balance

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
        ``sigma_k^2 = Var_P(C_1 ... C_k h)``: ``n * MSE`` of the k-step estimator as n grows.
    start : str
        Which marginal step 1 fixed.
    """

    sigma2: np.ndarray
    start: str
    _joint: Joint = field(repr=False)

    @property
    def reduction(self) -> np.ndarray:
        """``sigma_0^2 - sigma_k^2``: the variance removed by k steps of balancing."""
        return self.sigma2[0] - self.sigma2

    def predicted_mse(self, n: int) -> np.ndarray:
        """``sigma_k^2 / n``: the first-order mean squared error with n samples."""
        return self.sigma2 / check.positive_int(n, "n")

    @cached_property
    def sigma2_limit(self):
        """``sigma_inf^2``: the residual variance of h after weighted least squares on additive
        functions u(x) + v(y), the efficiency bound with both marginals known. Computed on first
        access with MINRES on the (m + l) normal equations."""
        out = additive_residual(self._joint)
        return out if self.sigma2.ndim == 2 else float(out[0])


def variance_profile(table, h, *, max_steps: int, start: str = "x") -> VarianceProfile:
    """The exact first-order variance of the k-step balanced estimator for k = 0..max_steps.

    Parameters
    ----------
    table : array_like (m, l) or scipy.sparse matrix
        The true joint distribution P (normalised internally); no empty rows or columns.
    h : array_like
        The function: (m, l) or (m, l, d) for a dense table; for a sparse table a sparse matrix of
        the same shape (read on the table's nonzeros) or its values on the nonzeros in CSR order,
        (nnz,) or (nnz, d).
    max_steps : int
        Largest k.
    start : {"x", "y"}
        Which marginal the first balancing step fixes.

    Returns
    -------
    VarianceProfile

    Raises
    ------
    ValueError, TypeError
        Invalid ``table`` (see :func:`spectrum`); ``h`` of the wrong shape or with NaN or inf;
        ``max_steps`` not a nonnegative integer; ``start`` not "x" or "y".

    Notes
    -----
    Costs about 2 * max_steps products with P (O(max_steps * nnz)) for all k together, fewer when
    sigma_k^2 converges first: the recursion stops once its remaining geometric tail is below
    1e-15 Var(h), and later k repeat the last value. ``sigma2_limit`` costs a MINRES solve, on
    first access.

    Examples
    --------
    >>> import numpy as np
    >>> from databalance import variance_profile
    >>> P = [[.10, .05, .05], [.05, .20, .05], [.05, .05, .40]]
    >>> h = [[1, 0, 2], [0, 3, 1], [2, 1, 0]]
    >>> prof = variance_profile(P, h, max_steps=3)
    >>> prof.sigma2.round(6), round(prof.sigma2_limit, 6)
    (array([1.4     , 0.746667, 0.63433 , 0.597818]), 0.577099)
    """
    start = check.side_option(start, "start")
    max_steps = _max_steps(max_steps)
    T, tr, tc = check.joint_table(table)
    h = check.function_values(h, T)
    joint = Joint(T, tr, tc, h)
    if start == "y":
        joint = joint.transpose()
    sigma2 = _chains(joint, max_steps)
    return VarianceProfile(sigma2 if h.ndim == joint.h.ndim else sigma2[:, 0], start, joint)


def _max_steps(value) -> int:
    steps = check.steps_option(value)
    if steps is None:
        raise TypeError("`max_steps` must be an integer >= 0 (the largest k).")
    return steps


#: A chain stops once the geometric tail of its remaining changes is below this share of Var(h):
#: every later value then equals the last one to within rounding.
_TAIL = 1e-15


def _chains(joint: Joint, K: int) -> np.ndarray:
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
        for t in range(1, last + 1):
            # After an X-projection E[g | X] = 0, so Var(g) = E[(h~ - b)^2] - E[a^2], a = E[h~ - b | X].
            if (t % 2 == 1) == (first == "x"):
                a = r - joint.given_x(b) if t > 1 else r
                value = second - 2 * (qc * b).sum(0) + (q[:, None] * b**2).sum(0) - (p[:, None] * a**2).sum(0)
            else:
                b = c - joint.given_y(a) if t > 1 else c
                value = second - 2 * (pr * a).sum(0) + (p[:, None] * a**2).sum(0) - (q[:, None] * b**2).sum(0)
            if (t % 2 == 1) == (first == "x"):
                sigma2[t] = value
                kept.append(value)
                if len(kept) % 4 == 3 and _converged(kept, scale):  # cheap, but not free: every 4th
                    sigma2[t + 2 :: 2] = value
                    break
    return sigma2


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
    """sigma_k^2 split over the singular directions of the table (THEORY.md §4).

    Attributes
    ----------
    singular_values : ndarray, shape (n,)
        ``s_j`` for j = 0..n-1, n = max(m, l), padded with zeros for unpaired directions.
    x_coordinates, y_coordinates : ndarray, shape (n,) or (n, d)
        ``f_j = E[h alpha_j(X)]`` and ``g_j = E[h beta_j(Y)]`` (0 where a direction does not exist).
    sigma2_limit : float or ndarray
        ``sigma_inf^2 = Var(h) - sum_j (f_j^2 + g_j^2 - 2 s_j f_j g_j) / (1 - s_j^2)``, j >= 1.
    terms : ndarray, shape (max_steps + 1, n) or (max_steps + 1, n, d)
        ``sigma_k^2 - sigma_inf^2`` carried by direction j: ``s_j^(2(k-1)) c_jk^2 / (1 - s_j^2)`` for
        k >= 1, with ``c = g - s f`` after an X-step and ``f - s g`` after a Y-step; row 0 is the
        direction's share of ``Var(h) - sigma_inf^2``. Column 0 (the constants) is 0.
    """

    singular_values: np.ndarray
    x_coordinates: np.ndarray
    y_coordinates: np.ndarray
    sigma2_limit: np.ndarray
    terms: np.ndarray = field(repr=False)

    @property
    def sigma2(self) -> np.ndarray:
        """``sigma_k^2`` for k = 0..max_steps (equal to :func:`variance_profile`'s)."""
        return self.sigma2_limit + self.terms.sum(axis=1)


def variance_decomposition(table, h, *, max_steps: int, start: str = "x") -> VarianceDecomposition:
    """The closed form of sigma_k^2 through the spectrum: which directions carry the variance.

    Dense tables with a connected support only (the closed form divides by ``1 - s_j^2``).

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
    start = check.side_option(start, "start")
    max_steps = _max_steps(max_steps)
    T, tr, tc = check.joint_table(table)
    if sp.issparse(T):
        raise TypeError("variance_decomposition needs a dense table (it uses the full SVD); "
                        "use variance_profile for sparse tables.")
    h = check.function_values(h, T)
    joint = Joint(T, tr, tc, h)
    p, q = joint.p, joint.q
    m, l = T.shape
    n = max(m, l)
    U, s, Vt = np.linalg.svd(T / np.sqrt(tr)[:, None] / np.sqrt(tc)[None, :])
    if _feasibility.components(_feasibility.support_pattern(T))[0] > 1:
        raise ValueError("The support graph of `table` is disconnected (s_2 = 1), so the closed form "
                         "divides by zero; use variance_profile, which handles it.")
    _, second, pr, qc = joint.moments
    # f_j = E[h alpha_j(X)] = sum_x alpha_j(x) p(x) E[h|X=x] = (U^T (pr / sqrt p))_j
    f = np.zeros((n, pr.shape[1]))
    g = np.zeros((n, pr.shape[1]))
    f[:m] = U.T @ (pr / np.sqrt(p)[:, None])
    g[:l] = Vt @ (qc / np.sqrt(q)[:, None])
    s_full = np.zeros(n)
    s_full[: len(s)] = s
    s_full[0] = 0.0  # the constant direction carries nothing (h is centred)
    if start == "y":
        f, g = g, f
    S = s_full[:, None]
    denom = 1 - S**2
    total = (f**2 + g**2 - 2 * S * f * g) / denom
    terms = np.zeros((max_steps + 1, n, f.shape[1]))
    terms[0] = total
    for k in range(1, max_steps + 1):
        coef = g - S * f if k % 2 else f - S * g
        terms[k] = S ** (2 * (k - 1)) * coef**2 / denom
    terms[:, 0] = 0.0
    limit = second - total[1:].sum(axis=0)
    s_out = s_full.copy()
    s_out[0] = 1.0
    squeeze = (lambda a: a[..., 0]) if h.ndim == 2 else (lambda a: a)
    if start == "y":
        f, g = g, f
    return VarianceDecomposition(s_out, squeeze(f), squeeze(g), squeeze(limit) if h.ndim == 3 else float(limit[0]),
                                 squeeze(terms))


# -- misspecified marginals ------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MisspecifiedProfile:
    """Bias and first-order variance of k-step balancing towards wrong marginals (THEORY.md §5).

    Attributes
    ----------
    bias : ndarray, shape (max_steps + 1,) or (max_steps + 1, d)
        ``Pbar^(k)(h) - P(h)``, where ``Pbar^(k)`` balances the true P itself towards the targets.
        It does not shrink with n.
    variance : ndarray
        ``Var_P(L_1 ... L_k h)``: ``n`` times the variance of the k-step estimator as n grows.
    """

    bias: np.ndarray
    variance: np.ndarray

    def mse(self, n: int) -> np.ndarray:
        """``bias^2 + variance / n``: the first-order mean squared error with n samples."""
        return self.bias**2 + self.variance / check.positive_int(n, "n")


def misspecified_profile(table, h, p_x, p_y, *, max_steps: int, start: str = "x") -> MisspecifiedProfile:
    """Predicted bias and variance of balancing a sample of ``table`` towards ``p_x, p_y``.

    Parameters
    ----------
    table : array_like (m, l)
        The true joint distribution (dense; normalised internally).
    h : array_like (m, l) or (m, l, d)
        The function whose mean is estimated.
    p_x, p_y : array_like
        The targets used for balancing (possibly wrong); normalised to total 1.
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
        Targets of the wrong length, negative, or with different totals; invalid ``table``/``h``.

    Notes
    -----
    ``L_j g = w_j (g - E_{Pbar^(j-1)}[g | X])`` with ``w_j = p_x / Pbar^(j-1)_X`` for an X-step (Y and
    ``p_y`` for a Y-step). Costs O(max_steps^2 m l).

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
    start = check.side_option(start, "start")
    max_steps = _max_steps(max_steps)
    T, tr, _ = check.joint_table(table)
    if sp.issparse(T):
        raise TypeError("misspecified_profile needs a dense table.")
    P = T / tr.sum()
    h = check.function_values(h, P)
    h3 = h if h.ndim == 3 else h[..., None]
    p_x = check.marginal(p_x, "p_x", P.shape[0], ())
    p_y = check.marginal(p_y, "p_y", P.shape[1], ())
    total = check.matching_totals(p_x, p_y)
    p_x, p_y = p_x / total, p_y / total
    iterates = [it.table for _, it in zip(range(max_steps + 1), iterate_balance(P, p_x, p_y, start=start))]
    truth = np.einsum("xy,xyd->d", P, h3)
    bias = np.array([np.einsum("xy,xyd->d", Pk, h3) - truth for Pk in iterates])
    variance = np.empty_like(bias)
    for k in range(max_steps + 1):
        g = h3
        for j in range(k, 0, -1):
            g = _misspecified_step(g, iterates[j - 1], p_x, p_y, x_step=(j % 2 == 1) == (start == "x"))
        mean = np.einsum("xy,xyd->d", P, g)
        variance[k] = np.einsum("xy,xyd->d", P, g**2) - mean**2
    squeeze = (lambda a: a) if h.ndim == 3 else (lambda a: a[:, 0])
    return MisspecifiedProfile(squeeze(bias), squeeze(variance))


def _misspecified_step(g, Pbar, p_x, p_y, *, x_step):
    axis, target = (1, p_x) if x_step else (0, p_y)
    margin = Pbar.sum(axis=axis)
    cond = np.einsum("xy,xyd->xd" if x_step else "xy,xyd->yd", Pbar, g) / margin[:, None]
    weight = target / margin
    if x_step:
        return weight[:, None, None] * (g - cond[:, None, :])
    return weight[None, :, None] * (g - cond[None, :, :])
