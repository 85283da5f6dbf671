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

from functools import cached_property

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator, minres

from . import _feasibility

__all__ = ["Cells", "Joint", "additive_residual", "additive_shift", "limit_linearization",
           "step_linearization"]


class Joint:
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
    a, b = additive_shift(joint, pr, qc, steps=None)
    return second - (pr * a).sum(axis=0) - (qc * b).sum(axis=0)


def additive_shift(joint: Joint, pr, qc, *, steps, start="x"):
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


class Cells:
    """The occupied cells of an N-d table, seen through K margins: for margin j each cell's code in
    ``0..sizes[j] - 1`` (a joint margin's cells flattened in C order of ``shapes[j]``), and each
    cell's mass (a sum of weights). Only occupied cells are stored, never the cross-product.

    Margin sums take ``values`` of shape (cells,) or (cells, d) (d functions in the columns).
    """

    def __init__(self, codes: list[np.ndarray], shapes: list[tuple[int, ...]], mass: np.ndarray,
                 *, dense: bool = False):
        self.codes, self.shapes, self.mass, self.dense = list(codes), list(shapes), mass, dense
        self.sizes = [int(np.prod(s)) for s in self.shapes]

    @classmethod
    def from_table(cls, table: np.ndarray, axes: list[tuple[int, ...]]) -> Cells:
        """The nonzero cells of a dense N-d table, seen through the margins ``axes``."""
        where = np.nonzero(table > 0)
        shapes = [tuple(table.shape[a] for a in ax) for ax in axes]
        codes = [np.ravel_multi_index(tuple(where[a] for a in ax), s) for ax, s in zip(axes, shapes, strict=True)]
        return cls(codes, shapes, table[where].astype(np.float64), dense=True)

    def margin_sums(self, j: int, values: np.ndarray) -> np.ndarray:
        """Sums of ``values`` over the cells of each category of margin j, shape (sizes[j],[ d])."""
        return _group_sums(self.codes[j], values, self.sizes[j])

    def indicators(self) -> sp.csr_array:
        """The (cells x sum of sizes) 0/1 matrix of every margin's categories (sparse, K per row)."""
        n, K = len(self.mass), len(self.codes)
        offsets = np.cumsum([0] + self.sizes[:-1])
        cols = np.column_stack([c + o for c, o in zip(self.codes, offsets, strict=True)]).ravel()
        return sp.csr_array((np.ones(n * K), cols, np.arange(0, n * K + 1, K)), shape=(n, sum(self.sizes)))

    # -- two margins (rows, columns) -----------------------------------------------------------------

    @property
    def rows(self) -> np.ndarray:
        return self.codes[0]

    @property
    def cols(self) -> np.ndarray:
        return self.codes[1]

    @property
    def shape(self) -> tuple[int, int]:
        return self.sizes[0], self.sizes[1]

    def row_sums(self, values: np.ndarray) -> np.ndarray:
        return self.margin_sums(0, values)

    def col_sums(self, values: np.ndarray) -> np.ndarray:
        return self.margin_sums(1, values)

    def table(self, values: np.ndarray):
        """The m x l table holding ``values`` at the cells (two margins): dense, or CSR when sparse."""
        if self.dense:
            out = np.zeros(self.shape)
            out[self.rows, self.cols] = values
            return out
        # Cells are distinct, so the COO -> CSR conversion sums nothing; explicit zeros stay stored.
        return sp.csr_array((values, (self.rows, self.cols)), shape=self.shape)


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


def _iterates(cells: Cells, p: np.ndarray, q: np.ndarray, steps: int, start: str) -> list:
    """Scalings (u, v) of the iterates Q^(0), ..., Q^(steps - 1) of balancing the cell masses
    towards p, q: Q^(j)(c) = u[row c] v[col c] t(c), with t the masses normalised to total 1."""
    t = cells.mass / cells.mass.sum()
    u, v = np.ones(cells.shape[0]), np.ones(cells.shape[1])
    out = []
    for j in range(1, steps + 1):
        out.append((u, v))
        if (j % 2 == 1) == (start == "x"):
            u = _ratio(p, cells.row_sums(v[cells.cols] * t))
        else:
            v = _ratio(q, cells.col_sums(u[cells.rows] * t))
    return out


def step_linearization(cells: Cells, S: np.ndarray, p: np.ndarray, q: np.ndarray, *, steps: int,
                       start: str, at_iterates: bool) -> tuple[np.ndarray, np.ndarray]:
    """Cell arrays (alpha, beta) with psi = alpha(c) h~ + beta(c) = L_1 ... L_k h~ at every sample.

    ``S`` (cells, d) holds the cell sums of the normalised design weights times h~ = h - estimate.
    With ``at_iterates`` (the balanced linearisation), L_j g = w_j (g - E_{Q^(j-1)}[g | margin j])
    with w_j = p_j / Q^(j-1)_{margin j}: the influence function of the k-step estimate with respect
    to the sampling distribution. Without it, L_j = C_j under the starting measure Q^(0) and w_j = 1
    (R survey's convention: the result is to be multiplied by the balanced weights).
    """
    t = cells.mass / cells.mass.sum()
    iterates = _iterates(cells, p, q, steps, start) if at_iterates else None
    alpha, beta = np.ones(len(t)), np.zeros(S.shape)
    for j in range(steps, 0, -1):  # the last step's operator acts first
        on_rows = (j % 2 == 1) == (start == "x")
        index, line_sums, target = ((cells.rows, cells.row_sums, p) if on_rows
                                    else (cells.cols, cells.col_sums, q))
        if iterates is None:
            ratio = np.ones(len(t))
        else:
            u, v = iterates[j - 1]
            ratio = u[cells.rows] * v[cells.cols]  # Q^(j-1) / Q^(0) in each cell
        mass = line_sums(ratio * t)
        mean = _ratio(line_sums(ratio[:, None] * (alpha[:, None] * S + beta * t[:, None])), mass)
        beta = beta - mean[index]
        if iterates is not None:
            w = _ratio(target, mass)[index]
            alpha = alpha * w
            beta *= w[:, None]
    return alpha, beta


def limit_linearization(cells: Cells, S: np.ndarray, ratio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cell arrays (alpha, beta) with psi = ratio(c) (h~ - a(x) - b(y)) = alpha h~ + beta, where
    a + b is the weighted least-squares fit of h~ on additive functions under the measure
    ``ratio * t`` (t the cell masses): the balanced measure with ``ratio`` = Qbar / Q^(0) (the
    influence function of the raking estimate), or the starting measure with ``ratio`` = 1 (R
    survey's convention). ``S`` is as in :func:`step_linearization`.
    """
    measure = ratio * cells.mass
    rs, cs = cells.row_sums(measure), cells.col_sums(measure)
    rows, cols = np.flatnonzero(rs > 0), np.flatnonzero(cs > 0)
    table = cells.table(measure)
    sub = table[np.ix_(rows, cols)] if cells.dense else table[rows][:, cols]
    total = measure.sum()
    # pr = Q_X * E_Q[h~ | X] for the measure Q = measure / total, from the cell sums of h~.
    weighted = ratio[:, None] * S * (cells.mass.sum() / total)
    pr, qc = cells.row_sums(weighted), cells.col_sums(weighted)
    a_sub, b_sub = additive_shift(Joint(sub, rs[rows], cs[cols]), pr[rows], qc[cols], steps=None)
    a, b = np.zeros(pr.shape), np.zeros(qc.shape)
    a[rows], b[cols] = a_sub, b_sub
    return ratio, -ratio[:, None] * (a[cells.rows] + b[cells.cols])
