"""The spectrum of a table's conditional-mean operators.

P is the table normalised to a joint distribution with marginals p = P_X, q = P_Y. The SVD of
D_p^-1/2 P D_q^-1/2 gives the singular functions of mu_X g = E[g | X] and mu_Y f = E[f | Y]; its
second singular value s_2 (the maximal correlation) sets the rate of balancing and of the variance
reduction it brings (see :mod:`databalance.variance`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator, svds

from . import _feasibility
from . import _validation as check
from ._typing import TableLike

__all__ = ["SpectrumResult", "conditional_mean", "spectrum"]


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


def spectrum(table: TableLike, *, rank: int | None = None) -> SpectrumResult:
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
    ValueError, TypeError
        Negative, NaN or infinite entries; an empty row or column; ``rank`` not a positive integer;
        a sparse table without ``rank`` or with ``rank >= min(m, l)``.

    Notes
    -----
    The singular functions and what ``s_2`` means for balancing are explained on the
    documentation's theory page, sections 'The spectral closed form' and 'Rate of convergence'.

    Examples
    --------
    >>> import numpy as np
    >>> from databalance import spectrum
    >>> P = [[.10, .05, .05], [.05, .20, .05], [.05, .05, .40]]
    >>> spectrum(P).singular_values.round(6)
    array([1.      , 0.613504, 0.353163])
    """
    T, tr, tc = check.joint_table(table)
    sparse = sp.issparse(T)
    rank = check.spectrum_rank(rank, T.shape, sparse=sparse)
    # D_p^-1/2 P D_q^-1/2 = D_tr^-1/2 T D_tc^-1/2 for P = T / total: no normalised copy needed.
    rt, ct = np.sqrt(tr), np.sqrt(tc)
    sp_, sq = rt / np.sqrt(tr.sum()), ct / np.sqrt(tc.sum())
    if sparse:
        U, s, V = _sparse_svd(T, rt, ct, sp_, sq, rank)
    else:
        U, s, Vt = np.linalg.svd(T / rt[:, None] / ct[None, :], full_matrices=False)
        U, s, V = U[:, :rank], s[:rank], Vt[:rank].T
    n_components, _ = _feasibility.components(_feasibility.support_pattern(T))
    U, V = _canonical(U, V, s, sp_, sq)
    return SpectrumResult(s, U / sp_[:, None], V / sq[:, None], int(n_components))


def _sparse_svd(T: Any, rt: np.ndarray, ct: np.ndarray, sp_: np.ndarray, sq: np.ndarray,
                rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The leading ``rank`` triplets of D_tr^-1/2 T D_tc^-1/2 by ARPACK, descending."""
    # One scaled sparse copy of T (still O(nnz)): ARPACK on an explicit CSR runs about twice
    # as fast as on a LinearOperator that rescales at every product.
    rows = _feasibility.row_indices(T)
    M = sp.csr_array((T.data / rt[rows] / ct[T.indices], T.indices, T.indptr), shape=T.shape)
    # svds iterates on the Gram matrix of the shorter side (M^T M if m >= l, else M M^T), so its
    # starting vector lives there: the known top singular vector of that side, for a
    # deterministic start.
    m, l = T.shape
    U, s, Vt = svds(M, k=rank, v0=(sq if m >= l else sp_).copy(), tol=0)
    order = np.argsort(s)[::-1]
    return U[:, order], s[order], Vt[order].T


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


def conditional_mean(table: TableLike, *, given: str = "x") -> LinearOperator:
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


