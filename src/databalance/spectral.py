"""The spectrum of a table's conditional-mean operators.

P is the table normalised to a joint distribution with marginals p = P_X, q = P_Y. The SVD of
D_p^-1/2 P D_q^-1/2 gives the singular functions of mu_X g = E[g | X] and mu_Y f = E[f | Y]; its
second singular value s_2 (the maximal correlation) sets the rate of balancing and of the variance
reduction it brings (see :mod:`databalance.variance`).

With K margins of an N-d table the same role is played by the cyclic product
T = C_1 C_2 ... C_K of the operators C_j f = f - E[f | margin j]: :func:`cyclic_rate` computes its
spectral radius on the span of functions of the margins (for two margins it is s_2^2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator, eigsh

from . import _feasibility, plotting
from . import _validation as check
from ._joint import Cells
from ._kernels import is_sparse, support_pattern
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

    def __repr__(self) -> str:
        s = self.singular_values
        head = ", ".join(f"{v:.4g}" for v in s[:4]) + (f", ... ({len(s)} in all)" if len(s) > 4 else "")
        return (f"SpectrumResult(singular values [{head}]; s_2 = {self.max_correlation:.4g}, "
                f"{self.n_components} component(s), table {self.x_functions.shape[0]} x {self.y_functions.shape[0]})")

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

    def plot(self, ax: Any = None) -> Any:
        """Draw the singular values against j, with ``s_2`` marked (needs matplotlib).

        Parameters
        ----------
        ax : matplotlib Axes, optional
            Where to draw; a new figure if None (see :mod:`databalance.plotting`).

        Returns
        -------
        matplotlib Axes
            The line of ``singular_values`` at j = 1, 2, ..., and a marker on ``s_2``, the rate per
            half-step of balancing near this table (theory page, section 'Rate of convergence').

        Raises
        ------
        ImportError
            matplotlib is not installed (install the ``plot`` extra).
        TypeError
            ``ax`` is not a matplotlib Axes.

        Examples
        --------
        >>> from databalance import spectrum
        >>> ax = spectrum([[.10, .05, .05], [.05, .20, .05], [.05, .05, .40]]).plot()
        >>> ax.lines[0].get_ydata().round(6)
        array([1.      , 0.613504, 0.353163])
        """
        return plotting.plot_spectrum(self, ax)


def spectrum(table: TableLike, *, rank: int | None = None) -> SpectrumResult:
    """Singular value decomposition of ``D_p^-1/2 P D_q^-1/2`` for the joint table ``P``.

    Parameters
    ----------
    table : array_like (m, l) or scipy.sparse matrix
        Nonnegative; normalised internally. Every row and column needs mass.
    rank : int, optional
        Number of leading triplets. Dense tables default to all ``min(m, l)`` (a full SVD); sparse
        tables require ``rank < min(m, l)`` and use, component by component of the support,
        ARPACK (``scipy.sparse.linalg.eigsh``) on the Gram matrix of a rescaled sparse copy
        (LAPACK for small components), never densifying; with the fused kernels
        (:func:`~databalance.which_kernel`, ``DATABALANCE_KERNEL``) its products are threaded.

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
    sparse = is_sparse(T)
    rank = check.spectrum_rank(rank, T.shape, sparse=sparse)
    # D_p^-1/2 P D_q^-1/2 = D_tr^-1/2 T D_tc^-1/2 for P = T / total: no normalised copy needed.
    rt, ct = np.sqrt(tr), np.sqrt(tc)
    sp_, sq = rt / np.sqrt(tr.sum()), ct / np.sqrt(tc.sum())
    n_components, labels = _feasibility.components(support_pattern(T))
    # The s = 1 block is known exactly from the components (one pair per component); it is used
    # as is rather than taken from a solver, for which a repeated value is hard.
    U1, V1 = _unit_block(labels, sp_, sq, int(n_components), min(rank, int(n_components)))
    if not sparse:
        U, s, Vt = np.linalg.svd(T / rt[:, None] / ct[None, :], full_matrices=False)
        U, s, V = U[:, :rank], s[:rank], Vt[:rank].T
    else:
        U, s, V = _sparse_svd(_scaled_csr(T, rt, ct), labels, sp_, sq, U1, V1, rank)
    c = U1.shape[1]
    U, V = U.copy(), V.copy()
    U[:, :c], V[:, :c] = U1, V1
    _sign_convention(U, V)
    return SpectrumResult(s, U / sp_[:, None], V / sq[:, None], int(n_components))


def _scaled_csr(T: Any, rt: np.ndarray, ct: np.ndarray) -> sp.csr_array:
    """D_tr^-1/2 T D_tc^-1/2 as one scaled sparse copy of T (still O(nnz)): ARPACK on an explicit
    CSR runs about twice as fast as on a LinearOperator that rescales at every product."""
    rows = _feasibility.row_indices(T)
    return sp.csr_array((T.data / rt[rows] / ct[T.indices], T.indices, T.indptr), shape=T.shape)


#: A component whose shorter side has at most this many lines, or of which at least half the
#: values are asked for, gets LAPACK's dense SVD (cheaper than ARPACK's setup, and exact for
#: repeated values) when it has at most DENSE_ENTRIES cells (32 MB).
DENSE_LINES = 200
DENSE_ENTRIES = 1 << 22


def _sparse_svd(M: sp.csr_array, labels: np.ndarray, sp_: np.ndarray, sq: np.ndarray, U1: np.ndarray,
                V1: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The leading ``rank`` triplets of M = D_tr^-1/2 T D_tc^-1/2 (:func:`_scaled_csr`), descending.

    The c pairs with s = 1 are U1, V1 (exact). M is block diagonal over the support's components
    (``labels``: rows, then columns), so the other values are each component's own below its
    s = 1, computed component by component and merged: a value repeated across components (identical
    blocks) is found in each. Within one component ARPACK's Lanczos method finds the values of
    the component minus its s = 1 pair; like any single-vector Lanczos method it can miss a
    value that repeats exactly within one component.
    """
    c = U1.shape[1]
    if rank <= c:
        return U1, np.ones(rank), V1
    m, l = M.shape
    if labels.max() == 0:  # one component: M as it is
        rows, cols, row_ends, col_ends, Mp = np.arange(m), np.arange(l), np.array([m]), np.array([l]), M
    else:  # components as diagonal blocks
        rows, cols = np.argsort(labels[:m], kind="stable"), np.argsort(labels[m:], kind="stable")
        row_ends = np.searchsorted(labels[:m][rows], np.arange(1, labels.max() + 2))
        col_ends = np.searchsorted(labels[m:][cols], np.arange(1, labels.max() + 2))
        Mp = sp.csr_array(M[rows][:, cols])
    found = []  # (s, component, local left and right vectors)
    r0 = c0 = 0
    for k, (r1, c1) in enumerate(zip(row_ends, col_ends, strict=True)):
        u1, v1 = sp_[rows[r0:r1]], sq[cols[c0:c1]]
        norm = np.sqrt(u1 @ u1)  # = sqrt(v1 @ v1): the component's mass
        whole = r1 - r0 == m and c1 - c0 == l  # one component: no copy
        block = _component_svd(Mp if whole else sp.csr_array(Mp[r0:r1, c0:c1]), u1 / norm, v1 / norm, rank - c)
        found += [(s_j, k, block[0][:, j], block[2][:, j], r0, c0) for j, s_j in enumerate(block[1])]
        r0, c0 = r1, c1
    found.sort(key=lambda f: (-f[0], f[1]))
    found = found[:rank - c]
    U, V = np.zeros((m, len(found))), np.zeros((l, len(found)))
    for j, (_, _, u, v, r0, c0) in enumerate(found):
        U[rows[r0:r0 + len(u)], j] = u
        V[cols[c0:c0 + len(v)], j] = v
    s = np.array([f[0] for f in found])
    return np.column_stack([U1, U]), np.concatenate([np.ones(c), s]), np.column_stack([V1, V])


def _component_svd(M: sp.csr_array, u1: np.ndarray, v1: np.ndarray,
                   need: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Up to ``need`` leading triplets of one component's block ``M`` after its s = 1 pair
    (``u1``, ``v1``), descending: all of them when it has fewer (LAPACK's dense SVD of ``M - u1
    v1'`` for small blocks or many values, ARPACK otherwise)."""
    need = min(need, min(M.shape) - 1)
    if need <= 0:
        return np.zeros((M.shape[0], 0)), np.zeros(0), np.zeros((M.shape[1], 0))
    if (min(M.shape) <= DENSE_LINES or 2 * need >= min(M.shape)) and M.shape[0] * M.shape[1] <= DENSE_ENTRIES:
        U, s, Vt = np.linalg.svd(M.toarray() - np.outer(u1, v1), full_matrices=False)
        # u1, v1 span the removed block's null space: the vectors of s = 0 must avoid them
        return _orthogonal_to(u1[:, None], U[:, :need]), s[:need], _orthogonal_to(v1[:, None], Vt[:need].T)
    if M.shape[0] < M.shape[1]:  # iterate on the shorter side: the triplets of M' swapped
        Vt, s, Ut = _component_svd(sp.csr_array(M.T), v1, u1, need)
        return Ut, s, Vt
    v0 = np.cos(np.arange(M.shape[1]) + 1.0)
    v0 -= v1 * (v1 @ v0)
    return _gram_svd(M, need, v0, u1[:, None], v1[:, None])


def _gram_svd(M: sp.csr_array, rank: int, v0: np.ndarray, U1: np.ndarray,
              V1: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The leading ``rank`` triplets of ``M - U1 V1'`` (``M`` m x l with m >= l, ``M V1 = U1``,
    ``M' U1 = V1``), descending: ARPACK's Lanczos method on the Gram matrix ``M' M - 2 V1 V1'``
    (whose eigenvalue at ``V1`` is -1, so never among the largest, even where ``M`` has s = 0),
    then the SVD of the m x rank matrix ``(M - U1 V1') W`` of the eigenvectors ``W``, for
    singular values as accurate as the matrix's own (as ``scipy.sparse.linalg.svds`` does), and
    left vectors completed orthogonally to ``U1`` (those of s = 0 are arbitrary in that SVD).
    ``M' (M x)`` is two threaded gathers with the fused kernels
    (:func:`~databalance._kernels.fused_sparse.line_products`), else two scipy products; the
    block is removed by einsum, not BLAS (a BLAS call per product wakes its threads: on a busy
    machine that took ten times the product)."""
    from ._kernels import fused

    if fused.which_kernel(M) == "numba":
        from ._kernels.fused_sparse import line_products

        rows, cols = line_products(M)

        def product(x: np.ndarray) -> np.ndarray:
            return cols(rows(x))
    else:
        def product(x: np.ndarray) -> np.ndarray:
            return M.T @ (M @ x)

    def deflated(x: np.ndarray) -> np.ndarray:
        x = x.ravel()
        return product(x) - 2.0 * np.einsum("ij,j->i", V1, np.einsum("ij,i->j", V1, x))

    n = M.shape[1]
    # a Lanczos basis four vectors larger than eigsh's default: fewer products (920 against 1108
    # for the top 9 of a 10^5 x 10^5 table; svds took 983 for the top 10)
    _, W = eigsh(LinearOperator((n, n), dtype=np.float64, matvec=deflated), k=rank, which="LA", v0=v0, tol=0,
                 ncv=min(n, max(2 * rank + 1, 20) + 4))
    MW = M @ W
    MW -= U1 @ (V1.T @ W)  # W is orthogonal to V1 up to rounding
    U, s, Zt = np.linalg.svd(MW, full_matrices=False)
    return _orthogonal_to(U1, U), s, W @ Zt.T


def _orthogonal_to(B: np.ndarray, X: np.ndarray) -> np.ndarray:
    """The orthonormal columns ``X`` made orthogonal to the orthonormal ``B`` (Gram-Schmidt by a QR
    of ``[B X]``, signs kept): columns already orthogonal to ``B`` come back unchanged up to
    rounding; those of a singular value 0, which an SVD picks arbitrarily in the null space, are
    moved out of ``B``'s span."""
    Q, R = np.linalg.qr(np.column_stack([B, X]))
    c = B.shape[1]
    return Q[:, c:] * np.where(np.diag(R)[c:] < 0, -1.0, 1.0)


def _unit_block(labels: np.ndarray, sp_: np.ndarray, sq: np.ndarray, n_components: int,
                width: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``width`` pairs of an orthonormal basis of the s = 1 singular space, the first
    pair (sqrt p, sqrt q).

    Per component C, ``sqrt(p)`` and ``sqrt(q)`` restricted to C (normalised) form a pair with
    s = 1; a Householder reflection of the components' coordinates that sends e_1 to their
    weights w = sqrt(P(C)) turns them into a basis whose first member is sqrt(p) itself. Only the
    ``width`` columns asked for are formed (the reflection is never stored as a c x c matrix).
    """
    m = len(sp_)
    rows, cols = labels[:m], labels[m:]
    w = np.sqrt(np.bincount(rows, sp_**2, minlength=n_components))
    B = sp.csr_array((sp_ / w[rows], (np.arange(m), rows)), shape=(m, n_components))
    D = sp.csr_array((sq / w[cols], (np.arange(len(sq)), cols)), shape=(len(sq), n_components))
    v = -w
    v[0] += 1.0  # v = e_1 - w; H = I - 2 v v^T / |v|^2 maps e_1 to w
    H = np.eye(n_components, width)
    norm2 = v @ v
    if norm2 > 1e-30:
        H -= np.outer(v, v[:width]) * (2 / norm2)
    return np.asarray(B @ H), np.asarray(D @ H)


def _sign_convention(U: np.ndarray, V: np.ndarray) -> None:
    """Sign each pair after the first so that its largest entry in U is positive (an SVD fixes
    pairs only up to a joint sign); in place."""
    for j in range(1, U.shape[1]):
        if U[np.argmax(np.abs(U[:, j])), j] < 0:
            U[:, j] *= -1
            V[:, j] *= -1


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




# -- many margins: the rate of one sweep -----------------------------------------------------------


def scaled_indicators(cells: Cells) -> sp.csr_array:
    """B = D_w^1/2 Phi D_m^-1/2: the cells x levels indicator matrix of every margin's categories,
    rows weighted by sqrt of the cell masses (normalised to total 1) and columns divided by sqrt of
    the categories' masses, so that B^T B is the scaled Burt matrix with identity diagonal blocks.
    Sparse (K entries per row); categories without mass keep an empty column."""
    Phi = cells.indicators()
    mass = cells.mass / cells.mass.sum()
    levels = np.concatenate([cells.margin_sums(j, mass) for j in range(len(cells.codes))])
    col_scale = np.zeros_like(levels)
    np.divide(1.0, np.sqrt(levels), out=col_scale, where=levels > 0)
    rows = np.repeat(np.sqrt(mass), len(cells.codes))
    return sp.csr_array((rows * col_scale[Phi.indices], Phi.indices, Phi.indptr), shape=Phi.shape)


def cyclic_rate(cells: Cells) -> float:
    """Spectral radius of T = C_1 ... C_K (C_K acting first) on S, the span of functions of each
    margin's variables, under the distribution of the cells' masses.

    S is invariant under every C_j, and f = sum_j a_j(g_j) in S maps to C_j f by replacing a_j with
    -sum_{i != j} E[a_i | G_j]: a block Gauss-Seidel (backfitting) sweep on the coefficients. The
    coefficients have a kernel N (the representations of f = 0: shared constants, overlapping
    margins, gaps in the support) that the sweep fixes, so its spurious eigenvalue 1 is removed by
    working on the quotient: the orthogonal complement of N in the scaled coordinates, the range
    of the scaled Burt matrix. Dense in the number of categories L (O(L^3)), never in the cells.
    On S^perp every C_j is the identity, so this is the rate at which the iterates converge
    (von Neumann-Halperin); it is always < 1 for a finite table.
    """
    B = scaled_indicators(cells)
    used = np.flatnonzero(np.diff(B.tocsc().indptr) > 0)  # categories with mass
    B = B[:, used]
    burt = (B.T @ B).toarray()
    values, vectors = np.linalg.eigh(burt)
    threshold = values[-1] * burt.shape[0] * np.finfo(float).eps * 16
    Z = vectors[:, values > threshold]
    offsets = np.searchsorted(used, np.cumsum([0] + cells.sizes))  # each margin's block of used columns
    # The sweep on the quotient, Z^T G Z, with G = E_1 ... E_K (E_K first) and E_j replacing block
    # j by -sum_{i != j} Burt_ji (the diagonal block is the identity).
    X = Z.copy()
    for j in range(len(cells.codes) - 1, -1, -1):
        block = slice(offsets[j], offsets[j + 1])
        X[block] -= burt[block] @ X
    if Z.shape[1] == 0:
        return 0.0
    return float(np.abs(np.linalg.eigvals(Z.T @ X)).max())
