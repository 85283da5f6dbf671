"""The spectrum of a table's conditional-mean operators and the variance of balanced estimators.

Notation (THEORY.md §3-§5): P is the table normalised to a joint distribution with marginals
p = P_X, q = P_Y; mu_X g = E[g | X], C_X = I - mu_X (likewise Y). The k-step balanced estimator of
P(h) has influence function IF_k = C_1 C_2 ... C_k h (the last step's projection acts first) and
first-order variance sigma_k^2 = Var_P(IF_k).

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
from scipy.sparse.linalg import LinearOperator, minres, svds

from . import _support
from . import _validation as check
from .balance import iterate_balance

__all__ = [
    "MisspecifiedProfile",
    "SpectrumResult",
    "VarianceDecomposition",
    "VarianceProfile",
    "conditional_mean",
    "misspecified_profile",
    "spectrum",
    "variance_decomposition",
    "variance_profile",
]


# -- the spectrum ----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SpectrumResult:
    """Singular triplets of the conditional-mean operators of a table.

    Attributes
    ----------
    singular_values : ndarray, shape (r,)
        Descending; the first is 1. ``s_j`` is the correlation of ``alpha_j(X)`` and ``beta_j(Y)``.
    x_functions : ndarray, shape (m, r)
        ``alpha_j``, orthonormal in L2(P_X); the first column is the constant 1.
        ``E[beta_j(Y) | X] = s_j alpha_j(X)``.
    y_functions : ndarray, shape (l, r)
        ``beta_j``, orthonormal in L2(P_Y); the first column is the constant 1.
    n_components : int
        Connected components of the bipartite support graph; more than one means ``s_2 = 1``.
    """

    singular_values: np.ndarray
    x_functions: np.ndarray = field(repr=False)
    y_functions: np.ndarray = field(repr=False)
    n_components: int = 1

    @property
    def max_correlation(self) -> float:
        """``s_2``: the maximal correlation between functions of X and of Y (0 if there is none)."""
        return float(self.singular_values[1]) if len(self.singular_values) > 1 else 0.0

    @property
    def spectral_gap(self) -> float:
        """``1 - s_2``."""
        return 1.0 - self.max_correlation

    @property
    def ipf_rate(self) -> float:
        """``s_2^2``: the factor by which IPF's marginal error shrinks per *sweep* (two half-steps)
        near this table, i.e. ``s_2`` per half-step on average.

        Measured: consecutive half-step ratios alternate around ``s_2`` (the row and column errors
        are measured in different norms) and multiply to ``s_2^2`` over a sweep. For a run towards
        targets ``p_x, p_y`` use the spectrum of the *balanced* table, near which IPF linearises.
        """
        return self.max_correlation**2

    def predicted_steps(self, tol: float, initial_error: float = 1.0) -> int:
        """Half-steps for the marginal error to fall from ``initial_error`` to ``tol`` (rate ``s_2``
        per half-step); exact up to a step when ``initial_error`` is taken near the limit."""
        s2 = self.max_correlation
        if initial_error <= tol:
            return 0
        if s2 == 0:
            return 1
        if s2 >= 1:
            return np.iinfo(np.int64).max
        return int(np.ceil(np.log(tol / initial_error) / np.log(s2)))


def spectrum(table, *, rank: int | None = None) -> SpectrumResult:
    """Singular value decomposition of ``D_p^-1/2 P D_q^-1/2`` for the joint table ``P``.

    Parameters
    ----------
    table : array_like (m, l) or scipy.sparse matrix
        Nonnegative; normalised internally. Every row and column needs mass.
    rank : int, optional
        Number of leading triplets. Dense tables default to all ``min(m, l)`` (a full SVD); sparse
        tables require ``rank < min(m, l)`` and use ``scipy.sparse.linalg.svds`` (ARPACK) on a
        rescaled sparse copy, never densifying.

    Returns
    -------
    SpectrumResult

    Raises
    ------
    ValueError
        Negative, NaN or infinite entries; an empty row or column; a sparse table without ``rank``
        or with ``rank >= min(m, l)``.

    Examples
    --------
    >>> import numpy as np
    >>> from databalance import spectrum
    >>> P = [[.10, .05, .05], [.05, .20, .05], [.05, .05, .40]]
    >>> spectrum(P).singular_values.round(6)
    array([1.      , 0.613504, 0.353163])
    """
    T, tr, tc = check.joint_table(table)
    m, l = T.shape
    # D_p^-1/2 P D_q^-1/2 = D_tr^-1/2 T D_tc^-1/2 for P = T / total: no normalised copy needed.
    rt, ct = np.sqrt(tr), np.sqrt(tc)
    sp_, sq = rt / np.sqrt(tr.sum()), ct / np.sqrt(tc.sum())
    if sp.issparse(T):
        if rank is None:
            raise ValueError(
                "`rank` is required for a sparse table: give the number of leading singular triplets "
                f"to compute (at most {min(m, l) - 1}); a full SVD would densify the table."
            )
        rank = check.positive_int(rank, "rank")
        if rank >= min(m, l):
            raise ValueError(f"`rank` must be < min(m, l) = {min(m, l)} for a sparse table; got {rank}.")
        # One scaled sparse copy of T (still O(nnz)): ARPACK on an explicit CSR runs about twice
        # as fast as on a LinearOperator that rescales at every product.
        rows = _support.row_indices(T)
        M = sp.csr_array((T.data / rt[rows] / ct[T.indices], T.indices, T.indptr), shape=T.shape)
        U, s, Vt = svds(M, k=rank, v0=sq.copy(), tol=0)
        order = np.argsort(s)[::-1]
        U, s, V = U[:, order], s[order], Vt[order].T
    else:
        U, s, Vt = np.linalg.svd(T / rt[:, None] / ct[None, :], full_matrices=False)
        V = Vt.T
        if rank is not None:
            rank = check.positive_int(rank, "rank")
            U, s, V = U[:, :rank], s[:rank], V[:, :rank]
    n_components, _ = _support.components(_support.support_pattern(T))
    U, V = _canonical(U, V, s, sp_, sq)
    return SpectrumResult(s, U / sp_[:, None], V / sq[:, None], int(n_components))


def _canonical(U, V, s, sp_, sq):
    """First pair = (sqrt p, sqrt q) even when s = 1 is repeated (a disconnected support); each
    other pair signed so that its largest entry in U is positive (an SVD fixes pairs only up to a
    joint sign)."""
    U, V = U.copy(), V.copy()
    top = max(1, int(np.sum(s > 1 - 1e-10)))
    old = U[:, :top]
    # sqrt(p) lies in the s = 1 block: complete it to an orthonormal basis of that block, and move
    # the right vectors by the same change of basis (M V_old = U_old there, so M V_old R = U_old R).
    rest = old - np.outer(sp_, sp_ @ old)
    others = np.linalg.svd(rest, full_matrices=False)[0][:, : top - 1]
    new = np.column_stack([sp_, others])
    V[:, :top] = V[:, :top] @ (old.T @ new)
    U[:, :top] = new
    V[:, 0] = sq
    for j in range(1, U.shape[1]):
        if U[np.argmax(np.abs(U[:, j])), j] < 0:
            U[:, j] *= -1
            V[:, j] *= -1
    return U, V


def conditional_mean(table, *, given: str = "x") -> LinearOperator:
    """The operator ``g -> E[g(Y) | X = x]`` (``given="x"``) or ``f -> E[f(X) | Y = y]``.

    Parameters
    ----------
    table : array_like (m, l) or scipy.sparse matrix
        The joint distribution (normalised internally); no empty rows or columns.
    given : {"x", "y"}
        Condition on X (rows) or on Y (columns).

    Returns
    -------
    scipy.sparse.linalg.LinearOperator
        Shape (m, l) for ``given="x"`` (or (l, m)); never densifies a sparse table and accepts
        several functions at once as the columns of a matrix.

    Raises
    ------
    ValueError
        Invalid ``table`` (see :func:`spectrum`) or ``given``.

    Examples
    --------
    >>> import numpy as np
    >>> from databalance import conditional_mean
    >>> mu = conditional_mean([[1., 3.], [2., 2.]], given="x")
    >>> mu @ np.array([0., 1.])
    array([0.75, 0.5 ])
    """
    given = check.side_option(given, "given")
    T, tr, tc = check.joint_table(table)
    A, w = (T, tr) if given == "x" else (T.T, tc)
    return LinearOperator(A.shape, dtype=np.float64,
                          matvec=lambda g: (A @ g.ravel()) / w,
                          matmat=lambda G: (A @ G) / w[:, None],
                          rmatvec=lambda f: A.T @ (f.ravel() / w))


# -- the variance profile --------------------------------------------------------------------------


class _Joint:
    """A joint distribution P = T / total, kept as the table T (dense or CSR) and its line sums,
    with the conditional means and moments the variance computations need."""

    def __init__(self, T, row_sums, col_sums, h=None):
        self.T, self.tr, self.tc = T, row_sums, col_sums
        self.total = row_sums.sum()
        self.p, self.q = row_sums / self.total, col_sums / self.total
        self.sparse = sp.issparse(T)
        if h is not None:
            self.h = h if h.ndim == (2 if self.sparse else 3) else h[..., None]

    def given_x(self, b):
        """E[b(Y) | X] for the columns of b (l, d)."""
        return (self.T @ b) / self.tr[:, None]

    def given_y(self, a):
        """E[a(X) | Y] for the columns of a (m, d)."""
        return (self.T.T @ a) / self.tc[:, None]

    def transpose(self):
        """The same distribution with X and Y exchanged (h follows)."""
        out = _Joint.__new__(_Joint)
        out.__dict__.update(self.__dict__)
        out.tr, out.tc, out.p, out.q = self.tc, self.tr, self.q, self.p
        if not self.sparse:
            out.T = self.T.T
            if hasattr(self, "h"):
                out.h = np.swapaxes(self.h, 0, 1)
            return out
        # CSR of T.T, and h reordered from T's CSR order to T.T's.
        order = sp.csr_array((np.arange(self.T.nnz, dtype=np.float64), self.T.indices, self.T.indptr),
                             shape=self.T.shape).T.tocsr()
        order.sort_indices()
        out.T = self.T.T.tocsr()
        out.T.sort_indices()
        if hasattr(self, "h"):
            out.h = self.h[order.data.astype(np.int64)]
        return out

    @cached_property
    def moments(self):
        """(P(h), E[h~^2], p * E[h~ | X], q * E[h~ | Y]) with h~ = h - P(h)."""
        h, T = self.h, self.T
        if self.sparse:
            m, l = T.shape
            w = T.data[:, None] * h
            rows_of = _support.row_indices(T)
            rows = np.column_stack([np.bincount(rows_of, w[:, j], minlength=m) for j in range(h.shape[1])])
            cols = np.column_stack([np.bincount(T.indices, w[:, j], minlength=l) for j in range(h.shape[1])])
            raw_second = np.einsum("ed,ed->d", w, h)
        elif h.shape[2] == 1:  # one function: 2-D reductions are about twice as fast
            g = h[:, :, 0]
            rows = np.einsum("xy,xy->x", T, g)[:, None]
            cols = np.einsum("xy,xy->y", T, g)[:, None]
            raw_second = np.einsum("xy,xy,xy->", T, g, g)[None]
        else:
            rows = np.einsum("xy,xyd->xd", T, h)
            cols = np.einsum("xy,xyd->yd", T, h)
            raw_second = np.einsum("xy,xyd,xyd->d", T, h, h)
        rows, cols = rows / self.total, cols / self.total
        mean = rows.sum(axis=0)
        second = raw_second / self.total - mean**2
        return mean, second, rows - self.p[:, None] * mean, cols - self.q[:, None] * mean


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
    _joint: _Joint = field(repr=False)

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
        out = _additive_residual(self._joint)
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
    joint = _Joint(T, tr, tc, h)
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


def _chains(joint: _Joint, K: int) -> np.ndarray:
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


def _additive_residual(joint: _Joint) -> np.ndarray:
    """min over a, b of E[(h~ - a(x) - b(y))^2] = E[h~^2] - E[h~ (a + b)] at the optimum."""
    _, second, pr, qc = joint.moments
    a, b = additive_shift(joint, pr, qc, steps=None)
    return second - (pr * a).sum(axis=0) - (qc * b).sum(axis=0)


def additive_shift(joint: _Joint, pr, qc, *, steps, start="x"):
    """(a, b) such that C_1 ... C_k g = g - a(x) - b(y) under the joint distribution.

    ``pr = p * E[g | X]`` and ``qc = q * E[g | Y]`` (shape (m, d), (l, d)) are all that is needed of
    g. ``steps=None`` gives the limit: the weighted least-squares fit of g on additive functions,
    from the normal equations in symmetric form
    [[I, M], [M^T, I]] [sqrt(p) a; sqrt(q) b] = [pr / sqrt(p); qc / sqrt(q)], solved by MINRES.
    """
    p, q = joint.p, joint.q
    m, l = len(p), len(q)
    r, c = pr / p[:, None], qc / q[:, None]
    a, b = np.zeros((m, r.shape[1])), np.zeros((l, r.shape[1]))
    if steps is not None:
        for j in range(steps, 0, -1):  # the last step's projection acts first
            if (j % 2 == 1) == (start == "x"):
                a = r - joint.given_x(b)
            else:
                b = c - joint.given_y(a)
        return a, b
    sp_, sq = np.sqrt(p), np.sqrt(q)
    rt, ct = np.sqrt(joint.tr), np.sqrt(joint.tc)
    T = joint.T

    def matvec(z):  # M = D_p^-1/2 P D_q^-1/2 = D_tr^-1/2 T D_tc^-1/2
        x, y = z[:m], z[m:]
        return np.concatenate([x + (T @ (y / ct)) / rt, y + (T.T @ (x / rt)) / ct])

    op = LinearOperator((m + l, m + l), matvec=matvec, rmatvec=matvec, dtype=np.float64)
    for j in range(r.shape[1]):
        z, _ = minres(op, np.concatenate([pr[:, j] / sp_, qc[:, j] / sq]), rtol=1e-14, maxiter=50 * (m + l))
        a[:, j], b[:, j] = z[:m] / sp_, z[m:] / sq
    return a, b


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
    joint = _Joint(T, tr, tc, h)
    p, q = joint.p, joint.q
    m, l = T.shape
    n = max(m, l)
    U, s, Vt = np.linalg.svd(T / np.sqrt(tr)[:, None] / np.sqrt(tc)[None, :])
    if _support.components(_support.support_pattern(T))[0] > 1:
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
