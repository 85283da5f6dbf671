"""Joint distributions given as tables, their conditional means and projections onto additive
functions: what the variance theory and the estimators' standard errors share.

P is a table T normalised to a joint distribution with marginals p = P_X, q = P_Y;
mu_X g = E[g | X], C_X = I - mu_X (likewise Y).

The estimators' linearisation works on the list of a sample's occupied cells (:class:`Cells`): a
function of the samples that is ``alpha(c) h + beta(c)`` within each cell c is carried as the two
cell arrays, and every conditional mean it needs is a line sum over cells of ``alpha S + beta t``,
with S the cell sums of h and t the cell masses.
"""

from __future__ import annotations

import warnings
from functools import cached_property

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator, lsqr, minres

from . import _feasibility
from . import _validation as check
from ._errors import ConvergenceWarning
from ._kernels import is_sparse
from ._kernels.cells import factor_product, parallel

__all__ = ["Cells", "Joint", "additive_fit", "additive_residual", "additive_shift", "limit_linearization",
           "step_linearization"]


class Joint:
    """A joint distribution P = T / total, kept as the table T (dense or CSR) and its line sums,
    with the conditional means and moments the variance computations need."""

    def __init__(self, T, row_sums, col_sums, h=None):
        self.T, self.tr, self.tc = T, row_sums, col_sums
        self.total = row_sums.sum()
        self.p, self.q = row_sums / self.total, col_sums / self.total
        self.sparse = is_sparse(T)
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
        out = Joint.__new__(Joint)
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
            rows_of = _feasibility.row_indices(T)
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



def additive_residual(joint: Joint) -> np.ndarray:
    """min over a, b of E[(h~ - a(x) - b(y))^2] = E[h~^2] - E[h~ (a + b)] at the optimum."""
    _, second, pr, qc = joint.moments
    a, b = additive_shift(joint, pr, qc)
    return second - (pr * a).sum(axis=0) - (qc * b).sum(axis=0)


def additive_shift(joint: Joint, pr, qc):
    """(a, b) of the weighted least-squares fit a(x) + b(y) of g under the joint distribution.

    ``pr = p * E[g | X]`` and ``qc = q * E[g | Y]`` (shape (m, d), (l, d)) are all that is needed of
    g: the normal equations in symmetric form
    [[I, M], [M^T, I]] [sqrt(p) a; sqrt(q) b] = [pr / sqrt(p); qc / sqrt(q)], solved by MINRES (a
    ConvergenceWarning if it stops short).
    """
    p, q = joint.p, joint.q
    m, l = len(p), len(q)
    a, b = np.zeros((m, pr.shape[1])), np.zeros((l, pr.shape[1]))
    sp_, sq = np.sqrt(p), np.sqrt(q)
    rt, ct = np.sqrt(joint.tr), np.sqrt(joint.tc)
    T = joint.T

    def matvec(z):  # M = D_p^-1/2 P D_q^-1/2 = D_tr^-1/2 T D_tc^-1/2
        x, y = z[:m], z[m:]
        return np.concatenate([x + (T @ (y / ct)) / rt, y + (T.T @ (x / rt)) / ct])

    op = LinearOperator((m + l, m + l), matvec=matvec, rmatvec=matvec, dtype=np.float64)
    for j in range(pr.shape[1]):
        z, info = minres(op, np.concatenate([pr[:, j] / sp_, qc[:, j] / sq]), rtol=1e-14, maxiter=50 * (m + l))
        if info > 0:
            warnings.warn(check.solver_stopped("MINRES", info), ConvergenceWarning, stacklevel=3)
        a[:, j], b[:, j] = z[:m] / sp_, z[m:] / sq
    return a, b


class Cells:
    """The occupied cells of an N-d table, seen through K margins: for margin j each cell's code in
    ``0..sizes[j] - 1`` (a joint margin's cells flattened in C order of ``shapes[j]``), and each
    cell's mass (a sum of weights). Only occupied cells are stored, never the cross-product.

    Margin sums take ``values`` of shape (cells,) or (cells, d) (d functions in the columns).
    """

    def __init__(self, codes: list[np.ndarray], shapes: list[tuple[int, ...]], mass: np.ndarray):
        self.codes, self.shapes, self.mass = list(codes), list(shapes), mass
        self.sizes = [int(np.prod(s)) for s in self.shapes]

    @classmethod
    def from_table(cls, table: np.ndarray, axes: list[tuple[int, ...]]) -> Cells:
        """The nonzero cells of a dense N-d table, seen through the margins ``axes``."""
        where = np.nonzero(table > 0)
        shapes = [tuple(table.shape[a] for a in ax) for ax in axes]
        codes = [np.ravel_multi_index(tuple(where[a] for a in ax), s) for ax, s in zip(axes, shapes, strict=True)]
        return cls(codes, shapes, table[where].astype(np.float64))

    def margin_sums(self, j: int, values: np.ndarray) -> np.ndarray:
        """Sums of ``values`` over the cells of each category of margin j, shape (sizes[j],[ d])."""
        return _group_sums(self.codes[j], values, self.sizes[j])

    def indicators(self) -> sp.csr_array:
        """The (cells x sum of sizes) 0/1 matrix of every margin's categories (sparse, K per row)."""
        n, K = len(self.mass), len(self.codes)
        offsets = np.cumsum([0] + self.sizes[:-1])
        cols = np.column_stack([c + o for c, o in zip(self.codes, offsets, strict=True)]).ravel()
        return sp.csr_array((np.ones(n * K), cols, np.arange(0, n * K + 1, K)), shape=(n, sum(self.sizes)))


def _group_sums(index: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    if values.ndim == 1:
        return np.bincount(index, values, minlength=size)
    return np.column_stack([np.bincount(index, values[:, j], minlength=size) for j in range(values.shape[1])])


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0: a category without mass carries no weight and no mean."""
    den = den if num.ndim == 1 else den[:, None]
    out = np.zeros(np.broadcast_shapes(num.shape, den.shape))
    np.divide(num, den, out=out, where=den > 0)
    return out


def step_linearization(cells: Cells, S: np.ndarray, targets: list[np.ndarray], *, steps: int,
                       at_iterates: bool, trace: tuple = (), final: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Cell arrays (alpha, beta) with psi = alpha(c) h~ + beta(c) = L_1 ... L_k h~ at every sample.

    Half-step j fixes margin m(j) = (j - 1) mod K (the targets in cycle order, each of total 1).
    ``S`` (cells, d) holds the cell sums of the normalised design weights times h~ = h - estimate.
    With ``at_iterates`` (the balanced linearisation), L_j g = w_j (g - E_{Q^(j-1)}[g | margin j])
    with w_j = p_j / Q^(j-1)_{margin j}: the influence function of the k-step estimate with respect
    to the sampling distribution. Without it, L_j = C_j under the starting measure Q^(0) and w_j = 1
    (R survey's convention: the result is to be multiplied by the balanced weights).

    Backfitting form. Since w_j = q_j / q_(j-1) cell by cell (q_j the cell masses of iterate j,
    total 1), unrolling the chain gives alpha = q_k / t and beta = -sum_j q_j mu_j[m(j)] / t, with

        mu_j = (margin m(j)'s sums of D_j) / p_m(j),   D_j = q_k S / t - sum_(i > j) q_i mu_i[m(i)],

    computed for j = k, ..., 1 with D updated in place: a step costs one sum per category, one
    gather and one update of q. The iterates are rebuilt backwards from ``trace``
    (``CellsResult.iterate_factors()``: the starting scalings, then the one each half-step set);
    ``final``, iterate k's cell masses when known, saves rebuilding it. For R's convention q_j = t
    and p_m(j) is the starting measure's margin.
    """
    t = cells.mass / cells.mass.sum()
    K = len(targets)
    one = S.ndim == 1
    D = np.asfortranarray(S.reshape(len(t), -1), dtype=np.float64).copy(order="F")  # contiguous columns
    buf = np.empty(len(t))  # one scratch vector: fresh temporaries of 10^7 cells cost page faults
    if at_iterates and steps > 0:
        history = [np.ravel(f) for f in trace[: K + steps]]
        latest = history[:K]
        for s in range(1, steps + 1):
            latest[(s - 1) % K] = history[K + s - 1]
        q = _gathered(latest, cells, buf) if final is None else final / final.sum()  # iterate k
        alpha = q / t
        D *= alpha[:, None]
    else:
        q, alpha, history = t, np.ones(len(t)), []
    A = D.copy(order="F")
    spare, gather = np.empty(len(t)), np.empty(len(t))
    for j in range(steps, 0, -1):  # the last step's operator acts first
        m = (j - 1) % K
        index = cells.codes[m]
        norm = targets[m].ravel() if history else cells.margin_sums(m, t)
        previous = None
        if history and j > 1:  # q_(j-1), computed in a thread while D is updated with q_j
            before, after = history[j - 1], history[K + j - 1]
            latest[m] = before
            if (after > 0).all():
                previous = parallel(_undo, q, before / after, index, gather, spare)
            else:  # a zero target emptied cells: rebuild iterate j - 1 from the scalings
                previous = parallel(_gathered, latest, cells, gather)
        for col in D.T:  # each a contiguous view
            mu = _ratio(np.bincount(index, col, minlength=cells.sizes[m]), norm)
            np.take(mu, index, out=buf, mode="clip")
            buf *= q
            col -= buf
        if previous is not None:
            q, spare = previous.result(), q
    D -= A
    D /= t[:, None]
    return alpha, D[:, 0] if one else np.ascontiguousarray(D)


def _undo(q: np.ndarray, change: np.ndarray, index: np.ndarray, buf: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``q * change[index]`` into ``out`` (``buf``: scratch for the gather)."""
    return np.multiply(q, np.take(change, index, out=buf, mode="clip"), out=out)


def _gathered(factors: list[np.ndarray], cells: Cells, buf: np.ndarray) -> np.ndarray:
    """Per cell, the cell's mass times every margin's factor at its category (``buf``: scratch)."""
    return factor_product(cells.mass, factors, cells.codes, len(cells.mass), buf)


def limit_linearization(cells: Cells, S: np.ndarray, ratio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cell arrays (alpha, beta) with psi = ratio(c) (h~ - f(c)) = alpha h~ + beta, where f, a sum of
    functions of each margin's categories, is the weighted least-squares fit of h~ under the measure
    ``ratio * t`` (t the cell masses): the balanced measure with ``ratio`` = Qbar / Q^(0) (the
    influence function of the raking estimate), or the starting measure with ``ratio`` = 1 (R
    survey's convention). ``S`` is as in :func:`step_linearization`.
    """
    fit = additive_fit(cells, ratio * cells.mass, ratio[:, None] * S * (cells.mass.sum() / (ratio * cells.mass).sum()))
    return ratio, -ratio[:, None] * fit


def additive_fit(cells: Cells, measure: np.ndarray, weighted: np.ndarray) -> np.ndarray:
    """Per cell, the weighted least-squares fit of g on the union of the margins' indicator columns,
    under the cell measure ``measure`` (normalised here) with ``weighted`` = measure * E[g | cell]
    (cells, d) in the same normalisation as ``measure / measure.sum()``.

    LSQR on the sparse indicator matrix with rows scaled by sqrt(measure) and columns by one over
    the square root of their mass: each margin's block of the normal equations is then the
    identity, so the conditioning is that of the margins' overlap, never a dense cells x levels
    matrix. Cells without measure drop out; the fit is unique even though the columns are not.
    """
    q = measure / measure.sum()
    keep = np.flatnonzero(q > 0)
    A = cells.indicators()[keep]
    col_mass = A.T @ q[keep]
    scale = np.zeros_like(col_mass)
    np.divide(1.0, np.sqrt(col_mass), out=scale, where=col_mass > 0)
    root = np.sqrt(q[keep])
    B = sp.diags_array(root) @ A @ sp.diags_array(scale)
    fit = np.zeros(weighted.shape)
    for j in range(weighted.shape[1]):
        rhs = weighted[keep, j] / root
        coef, stop, iterations = lsqr(B, rhs, atol=1e-15, btol=1e-15, conlim=1e12,
                                      iter_lim=20 * B.shape[1] + 100)[:3]
        if stop == 7:  # the iteration limit: the fit (and what is computed from it) may be off
            warnings.warn(check.solver_stopped("LSQR", iterations), ConvergenceWarning, stacklevel=3)
        fit[keep, j] = A @ (scale * coef)
    return fit
