"""Joint distributions given as tables, their conditional means and projections onto additive
functions: what the variance theory and the estimators' standard errors share.

P is a table T normalised to a joint distribution with marginals p = P_X, q = P_Y;
mu_X g = E[g | X], C_X = I - mu_X (likewise Y).
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator, minres

from . import _feasibility

__all__ = ["Joint", "additive_residual", "additive_shift"]


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

