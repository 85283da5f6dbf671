"""Balanced contrastive losses: CLIP's loss and the paper's k-step variants, on any array type.

A batch of n pairs gives the logit matrix ``L[i, j] = <f(x_i), g(y_j)> / temperature``; the reference
table is the softmax over all cells, and balancing it towards uniform marginals (1/n each) for k
half-steps gives ``Q^(k)``. Pair i should be likely under ``Q^(k)``:

    loss_k = -1/2 [mean_i log(n Q_x^(k)[i, i]) + mean_i log(n Q_y^(k)[i, i])],

``Q_x`` starting with the rows (images), ``Q_y`` with the columns (captions). The factor n makes a
balanced row (or column) a probability distribution, so that **k = 1 is exactly the usual CLIP
loss** (the mean of the row-wise and column-wise cross-entropies with the diagonal as labels);
without it every k > 0 would be larger by the constant ``log n``. k = 0 is the "joint" loss (the
softmax over all n^2 cells, plus the same ``log n``: ``-mean_i log(n R[i, i])``), k = 2 the
"double" variant (rows then columns, and the mirror), and so on (Liu et al., *The Benefits of
Balance*, NeurIPS 2024, on CLIP; the user guide page "PyTorch, JAX and other arrays").

The logits may be NumPy, PyTorch, JAX or any array-API array; the loss is computed in their
namespace, on their device, and is differentiable by the framework (the k steps are unrolled:
exact gradients of the k-step map).
"""

from __future__ import annotations

import math

import numpy as np

from . import _validation as check
from .balance import balance_logits

__all__ = ["balanced_contrastive_loss"]


def balanced_contrastive_loss(logits, k: int = 1, *, reduction: str = "mean"):
    """The paper's balanced contrastive loss of a batch's logit matrix after ``k`` half-steps.

    Parameters
    ----------
    logits : array, shape (..., n, n)
        ``logits[..., i, j]`` scores sample i's first view against sample j's second view (e.g.
        image i against caption j, divided by the temperature); the pairs are on the diagonal.
        NumPy, PyTorch, JAX, CuPy or any array-API array, float32 or float64; leading axes are a
        batch of independent matrices. ``-inf`` entries are structural zeros.
    k : int
        Half-steps of balancing: 0 the joint softmax over all cells, 1 the CLIP loss (rows, and the
        mirror columns), 2 the double-balanced loss, and so on.
    reduction : {"mean", "none"}
        ``"mean"`` averages over the batch axes (one number); ``"none"`` keeps one loss per matrix.

    Returns
    -------
    array
        The loss in the logits' namespace (a 0-d array for ``"mean"``), differentiable there.

    Raises
    ------
    ValueError, TypeError
        Logits that are not square over their last two axes, NaN or +inf entries, an integer or
        complex dtype; ``k`` not an integer >= 0; an unknown ``reduction``.

    Notes
    -----
    ``loss_k = -1/2 [mean_i log(n Q_x[i, i]) + mean_i log(n Q_y[i, i])]`` with ``Q_x`` (``Q_y``) the
    k-step balance of ``exp(logits)`` towards uniform marginals ``1/n`` that starts with the rows
    (columns): :func:`databalance.balance_logits` with ``steps=k``. The ``log n`` is inside the
    logarithm, so k = 1 equals the CLIP cross-entropy exactly; for k = 0 both starts coincide. The
    diagonal of ``log Q`` is ``diag(logits) + f + g``, so the balanced table itself is never formed.

    Examples
    --------
    >>> import numpy as np
    >>> from databalance.losses import balanced_contrastive_loss
    >>> L = np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 1.0, 2.0]])
    >>> rows = -np.mean(np.diag(L) - np.log(np.exp(L).sum(axis=1)))
    >>> cols = -np.mean(np.diag(L) - np.log(np.exp(L).sum(axis=0)))
    >>> bool(np.isclose(balanced_contrastive_loss(L, 1), (rows + cols) / 2))
    True
    >>> [round(float(balanced_contrastive_loss(L, k)), 4) for k in (0, 1, 2, 3)]
    [0.2988, 0.2956, 0.2899, 0.2881]
    """
    k = check.loss_steps(k)
    reduction = check.loss_reduction(reduction)
    xp, arr = _namespace(logits)
    check.loss_logits(arr)
    if k == 0:  # k > 0: balance_logits checks the same (dtype, NaN, +inf)
        _check_entries(xp, arr)
    n = arr.shape[-1]
    diag = xp.take(xp.reshape(arr, tuple(arr.shape[:-2]) + (n * n,)), xp.arange(0, n * n, n + 1), axis=-1)
    if k == 0:
        flat = xp.reshape(arr, tuple(arr.shape[:-2]) + (n * n,))
        peak = xp.max(flat, axis=-1, keepdims=True)  # its derivative cancels: lse does not depend on it
        lse = xp.log(xp.sum(xp.exp(flat - peak), axis=-1, keepdims=True)) + peak
        per_matrix = -xp.mean(diag - lse, axis=-1) - math.log(n)
    else:
        uniform = np.full(n, 1.0 / n)
        halves = []
        for start in ("x", "y"):
            res = balance_logits(logits, uniform, uniform, steps=k, start=start)
            halves.append(xp.mean(diag + res.row_potential + res.col_potential, axis=-1))
        per_matrix = -(halves[0] + halves[1]) / 2 - math.log(n)
    return xp.mean(per_matrix) if reduction == "mean" and per_matrix.ndim else per_matrix


def _namespace(logits):
    """The logits' namespace, and the logits as an array of it (NumPy for lists and NumPy arrays)."""
    from ._kernels import is_array_api

    if is_array_api(logits):
        from ._kernels import arrayapi

        return arrayapi.namespace(logits), logits
    return np, check.dense_array(logits, "logits", min_ndim=2)


def _check_entries(xp, arr) -> None:
    """The dtype and value checks of :func:`~databalance.balance_logits`: float32 or float64 outside
    NumPy, no NaN and no +inf (not read under ``jax.jit``, where values cannot be)."""
    from ._kernels import is_array_api

    if not is_array_api(arr):
        check.logits_entries(arr, "logits")
        return
    from ._kernels import arrayapi

    check.api_table(xp, arr, "logits")
    if not arrayapi.is_traced(arr):
        check.api_entries(xp, arr, "logits", log=True)
