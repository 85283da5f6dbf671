"""Every input check of the library and the wording of every error it raises.

Checks run before any numerical work. Each message names the parameter, says what was found and
what to do about it.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import scipy.sparse as sp

from ._errors import InfeasibleError
from ._feasibility import row_indices

#: Relative tolerance within which the totals of two target marginals must agree.
TOTAL_RTOL = 1e-9


def _first_index(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def working_dtype(dtype: np.dtype, name: str) -> np.dtype:
    """float32 stays float32; every other real numeric dtype is computed in float64."""
    if dtype.kind not in "biuf":
        raise TypeError(
            f"`{name}` has dtype {dtype}, which is not a real number type. "
            "Pass a table of counts or nonnegative weights (integer or float)."
        )
    if dtype == np.float32 or dtype == np.float16:
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def dense_array(table, name: str, *, min_ndim: int, max_ndim: int | None = None) -> np.ndarray:
    """The input as an ndarray (not copied when already one), checked for dimensionality."""
    if sp.issparse(table):
        raise TypeError(f"`{name}` is a scipy.sparse matrix; this function needs a dense array.")
    arr = as_array(table, name)
    if arr.dtype == object:
        raise TypeError(f"`{name}` could not be read as a numeric array (got dtype object).")
    if arr.ndim < min_ndim or (max_ndim is not None and arr.ndim > max_ndim):
        want = f"{min_ndim}" if max_ndim == min_ndim else f"at least {min_ndim}"
        raise ValueError(
            f"`{name}` must have {want} dimensions (rows are X, columns are Y"
            f"{', leading axes are a batch' if max_ndim is None else ''}); got shape {arr.shape}."
        )
    return arr


def as_array(value, name: str) -> np.ndarray:
    """``np.asarray`` that names the parameter when the input is ragged or masked."""
    if np.ma.isMaskedArray(value):
        raise TypeError(
            f"`{name}` is a masked array; its mask would be ignored. Fill the masked entries first "
            f"(e.g. `{name}.filled(0)` to make them structural zeros) or pass `{name}.data`."
        )
    try:
        return np.asarray(value)
    except ValueError as exc:
        raise ValueError(
            f"`{name}` could not be read as an array: its rows have different lengths or shapes "
            f"({exc}). Give a rectangular array."
        ) from None


def nonnegative(values: np.ndarray, name: str) -> float:
    """Raise naming the first NaN or negative entry; return the smallest entry (one pass)."""
    if values.size == 0:
        return np.inf
    lowest = values.min()
    if np.isnan(lowest):
        raise ValueError(f"`{name}` contains NaN, first at index {_first_index(np.isnan(values))}.")
    if lowest < 0:
        idx = _first_index(values < 0)
        raise ValueError(
            f"`{name}` must be nonnegative; found {float(values[idx])!r} at index {idx}. "
            "Balancing rescales masses, so every entry must be a count or weight >= 0."
        )
    return float(lowest)


def finite_sums(sums: np.ndarray, values, name: str) -> None:
    """Infinite entries show up as infinite row sums, which balancing computes anyway."""
    if np.isfinite(sums).all():
        return
    # Sparse entries were checked one by one (sparse_entries); a dense table is searched here.
    if not sp.issparse(values) and np.isinf(values).any():
        raise ValueError(
            f"`{name}` contains an infinite value, first at index {_first_index(np.isinf(values))}."
        )
    raise ValueError(f"The row sums of `{name}` overflow; divide `{name}` by a large constant.")


def logits_entries(logits: np.ndarray, name: str, line_max: np.ndarray | None = None,
                   lowest: Any = None) -> tuple[bool, float]:
    """NaN and +inf are errors; -inf is a structural zero. Returns whether any -inf is present and
    the largest magnitude of a finite entry.

    Two reductions over the table (none when the maxima of its lines, ``line_max``, and its
    minimum, ``lowest``, are given: NaN must then show in one of them); the offending index is
    searched only on the error path.
    """
    if logits.size == 0:
        return False, 0.0
    lowest = logits.min() if lowest is None else lowest
    highest = logits.max() if line_max is None else line_max.max()
    if np.isnan(lowest) or np.isnan(highest):
        raise ValueError(f"`{name}` contains NaN, first at index {_first_index(np.isnan(logits))}.")
    if np.isposinf(highest):
        raise ValueError(
            f"`{name}` contains +inf, first at index {_first_index(np.isposinf(logits))}. "
            "Logits must be finite or -inf (a structural zero)."
        )
    has_zeros = bool(np.isneginf(lowest))
    if has_zeros:  # the smallest finite entry, found only when -inf is present
        finite = logits[logits > -np.inf]
        lowest = finite.min() if finite.size else highest
    return has_zeros, float(max(abs(lowest), abs(highest)))


def not_converged(status: str, steps: int, worst: float, tol: float, reason: str = "") -> str:
    """The message of the warning for a balancing run that stopped short of its tolerance."""
    why = reason or {
        "max_steps": "Raise `max_steps`.",
        "stalled": "The error stopped decreasing: `tol` may be below what the floating-point sums resolve, "
                   "or the targets can be met only by driving some entries to zero (very slow convergence).",
        "failed": "A scaling overflowed float's range; the result is not usable. Either the table's entries "
                  "span too many orders of magnitude for scaling vectors (balance the logs instead: "
                  "balance_logits(np.log(table), ...)), or the targets cannot be met on this zero pattern and "
                  "the scalings diverge (see the result's `feasible`).",
    }[status]
    return (f"Balancing stopped ({status}) after {steps} half-steps with marginal error {worst:.3g} > "
            f"tol = {tol:.3g}. {why}")


def max_steps_plain() -> str:
    """Why a plain (unaccelerated) run used up its budget, and what to do."""
    return ("Raise `max_steps`, or pass `acceleration='auto'`: on a slowly mixing table (second singular "
            "value near 1) it reaches `tol` in far fewer passes.")


def float32_resolution() -> str:
    """Why a float32 run that looked converged is not."""
    return ("Its float32 sums looked converged, but the returned table, summed in float64, is not within "
            "`tol`: float32 cannot resolve this tolerance for this table. Pass the table as float64 or "
            "raise `tol`.")


def unrepresentable(magnitude: float) -> str:
    """Why a log-domain result is less precise than its iterations were."""
    return (f"The logits reach {magnitude:.3g} in magnitude, so float64 potentials are rounded by about "
            f"{magnitude * 2.2e-16:.2g}, which moves every entry of the returned table by that relative "
            "amount. Subtract a constant (or per-row and per-column offsets) from the logits first.")


def marginal(p, name: str, length: int, batch: tuple[int, ...]) -> np.ndarray:
    """A target marginal broadcast to ``batch + (length,)`` and checked (not yet converted)."""
    arr = as_array(p, name)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"`{name}` must hold real numbers; got dtype {arr.dtype}.")
    if arr.ndim == 0 or arr.shape[-1] != length:
        raise ValueError(
            f"`{name}` has shape {arr.shape} but the table has {length} "
            f"{'rows' if name == 'p_x' else 'columns'}: give one target mass per category."
        )
    try:
        arr = np.broadcast_to(arr, batch + (length,))
    except ValueError:
        raise ValueError(
            f"`{name}` has shape {arr.shape}, which does not broadcast to the batch shape "
            f"{batch + (length,)}."
        ) from None
    if not np.isfinite(arr).all():
        raise ValueError(f"`{name}` contains NaN or inf, first at index {_first_index(~np.isfinite(arr))}.")
    if (arr < 0).any():
        idx = _first_index(arr < 0)
        raise ValueError(f"`{name}` must be nonnegative; found {float(arr[idx])!r} at index {idx}.")
    return arr


def matching_totals(p_x: np.ndarray, p_y: np.ndarray) -> np.ndarray:
    """The common total mass of the targets (one per problem in a batch).

    They must agree to ``TOTAL_RTOL``, or to the rounding of their own dtype if that is coarser.
    """
    with np.errstate(over="ignore"):
        tx = p_x.sum(axis=-1, dtype=np.float64)
        ty = p_y.sum(axis=-1, dtype=np.float64)
    if np.any(tx <= 0):
        raise ValueError("`p_x` and `p_y` have total mass 0; give targets with positive mass.")
    if not (np.isfinite(tx).all() and np.isfinite(ty).all()):
        raise ValueError("The total of `p_x` or `p_y` overflows float64; divide both targets by a large "
                         "constant (balancing is invariant to the scale of the targets, up to that factor).")
    eps = max(_eps(p_x) * np.sqrt(p_x.shape[-1]), _eps(p_y) * np.sqrt(p_y.shape[-1]))
    bad = np.abs(tx - ty) > max(TOTAL_RTOL, 10 * eps) * np.maximum(tx, ty)
    if np.any(bad):
        idx = _first_index(np.atleast_1d(bad))
        where = f" (batch index {idx})" if np.ndim(bad) else ""
        raise ValueError(
            f"The totals of `p_x` ({float(np.atleast_1d(tx)[idx])!r}) and `p_y` "
            f"({float(np.atleast_1d(ty)[idx])!r})"
            f"{where} differ; a table cannot have both. Normalise both to the same total, e.g. "
            "p_x / p_x.sum() and p_y / p_y.sum()."
        )
    return tx


def margin_targets(margins, shape: tuple[int, ...]) -> tuple[list[tuple[int, ...]], list, list[np.ndarray]]:
    """The margins of an N-d table: (sorted axes, the user's keys, targets in sorted-axes order).

    ``margins`` maps an axis or a tuple of axes to a target of that sub-table's shape (in the
    key's axis order). Keys name distinct axis sets; the targets are finite and nonnegative.
    """
    if not hasattr(margins, "items") or isinstance(margins, np.ndarray):
        raise TypeError(
            f"`margins` must be a mapping from an axis (int) or a tuple of axes to its target, in cycle "
            f"order, e.g. {{0: p0, (1, 2): p12}}; got {type(margins).__name__}."
        )
    if len(margins) == 0:
        raise ValueError("`margins` is empty; give at least one margin to balance.")
    ndim = len(shape)
    axes: list[tuple[int, ...]] = []
    keys: list = []
    targets: list[np.ndarray] = []
    for key, target in margins.items():
        normal = _margin_key(key, ndim, axes, "key")
        name = f"margins[{key!r}]"
        arr = as_array(target, name)
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"`{name}` must hold real numbers; got dtype {arr.dtype}.")
        want = tuple(shape[a] for a in normal)
        if arr.shape != want:
            raise ValueError(
                f"`{name}` has shape {arr.shape} but the axes {key!r} of `table` have shape {want}: give one "
                "target mass per cell of that margin, its axes in the key's order."
            )
        if not np.isfinite(arr).all():
            raise ValueError(f"`{name}` contains NaN or inf, first at index {_first_index(~np.isfinite(arr))}.")
        if (arr < 0).any():
            idx = _first_index(arr < 0)
            raise ValueError(f"`{name}` must be nonnegative; found {float(arr[idx])!r} at index {idx}.")
        order = np.argsort(normal)
        axes.append(tuple(normal[i] for i in order))
        keys.append(key)
        targets.append(np.transpose(arr, order).astype(np.float64))
    return axes, keys, targets


def common_total(targets: list[np.ndarray], names: list[str]) -> float:
    """The total every target must share (to ``TOTAL_RTOL``)."""
    with np.errstate(over="ignore"):
        totals = [float(t.sum(dtype=np.float64)) for t in targets]
    if not all(np.isfinite(totals)):
        raise ValueError(f"The total of `{names[int(np.argmin(np.isfinite(totals)))]}` overflows float64; divide "
                         "every target by a large constant.")
    if min(totals) <= 0:
        raise ValueError(f"`{names[int(np.argmin(totals))]}` has total mass 0; give targets with positive mass.")
    lo, hi = int(np.argmin(totals)), int(np.argmax(totals))
    if totals[hi] - totals[lo] > TOTAL_RTOL * totals[hi]:
        raise ValueError(
            f"The totals of `{names[lo]}` ({totals[lo]!r}) and `{names[hi]}` ({totals[hi]!r}) differ; a table "
            "cannot have both. Normalise every target to the same total."
        )
    return totals[0]


def consistent_margins(axes: list[tuple[int, ...]], targets: list[np.ndarray], names: list[str],
                       total: float) -> None:
    """Margins that share axes must agree on their common sub-margin (to 1e-9 of the total)."""
    for i in range(len(axes)):
        for j in range(i + 1, len(axes)):
            shared = tuple(a for a in axes[i] if a in axes[j])
            if not shared:
                continue
            a = targets[i].sum(axis=tuple(k for k, ax in enumerate(axes[i]) if ax not in shared))
            b = targets[j].sum(axis=tuple(k for k, ax in enumerate(axes[j]) if ax not in shared))
            gap = np.abs(a - b)
            if gap.max() > 1e-9 * total:
                raise ValueError(
                    f"`{names[i]}` and `{names[j]}` disagree on their common margin over axes {shared}: the "
                    f"largest discrepancy is {gap.max():.6g} at {_first_index(gap == gap.max())} (total "
                    f"{total:.6g}). No table has both; derive both targets from one population table."
                )


def _eps(a: np.ndarray) -> float:
    return float(np.finfo(a.dtype).eps) if a.dtype.kind == "f" else 0.0


def steps_option(steps) -> int | None:
    if steps is None:
        return None
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"`steps` must be an integer number of half-steps or None; got {steps!r}.")
    if steps < 0:
        raise ValueError(f"`steps` must be >= 0 (it counts half-steps); got {steps}.")
    return int(steps)


def start_option(start) -> str:
    if not isinstance(start, str) or start not in ("x", "y"):
        raise ValueError(
            f"`start` must be 'x' (the first step fixes the row marginal) or 'y' (the column "
            f"marginal); got {start!r}."
        )
    return start


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
    return int(value)


def tolerance(tol, dtype: np.dtype) -> float:
    """``None`` means 1e-10 in float64 and 1e-5 in float32 (what float32 sums can resolve)."""
    if tol is None:
        return 1e-10 if dtype == np.float64 else 1e-5
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 < float(tol) < np.inf:
        raise ValueError(f"`tol` must be a positive finite number; got {tol!r}.")
    return float(tol)


def missing_mass(sums: np.ndarray, target: np.ndarray, axis_name: str, target_name: str,
                 *, reason: str = "", table: str = "table") -> None:
    """A row (column) with no mass cannot be scaled to a positive target."""
    bad = (sums <= 0) & (target > 0)
    if bad.any():
        idx = _first_index(bad)
        label = idx[-1] if len(idx) == 1 else idx
        raise ValueError(
            f"{axis_name} {label} of `{table}` {reason or 'is empty'} but `{target_name}[{label}]` = "
            f"{target[idx]:.6g} > 0: no rescaling can reach `{target_name}`. Merge sparse categories, "
            f"collect more samples, or set that target to 0."
        )


def infeasible(rows: np.ndarray, cols: np.ndarray, mass_rows: float, mass_cols: float,
               table: str = "table") -> InfeasibleError:
    def show(ix):
        ix = list(map(int, ix))
        return str(ix) if len(ix) <= 10 else f"{ix[:10]} ... ({len(ix)} in all)"

    return InfeasibleError(
        f"The zero pattern of `{table}` cannot carry the targets: rows {show(rows)} need total mass "
        f"{mass_rows:.6g} (from `p_x`) but their nonzero entries lie only in columns {show(cols)}, "
        f"whose targets in `p_y` total {mass_cols:.6g}. No balanced table exists, and iterating would "
        "oscillate forever. Fix the targets or the zero pattern, or run a fixed number of half-steps "
        "with `steps=k` (each step is well defined)."
    )


def infeasible_margins(lost: float, names: list[str], table: str = "table") -> InfeasibleError:
    return InfeasibleError(
        f"The zero pattern of `{table}` cannot carry the targets {', '.join(f'`{n}`' for n in names)} together: "
        f"a linear program over its nonzero cells places at most {1 - lost:.9g} of the total mass within them "
        f"({lost:.3g} is left over). No balanced table exists, and iterating would not converge. Fix the "
        "targets or the zero pattern (margins can be consistent pair by pair and still infeasible together), "
        "or run a fixed number of half-steps with `steps=k`."
    )


def sparse_entries(table) -> None:
    """Raise on the first NaN, infinite or negative stored entry of a CSR/CSC matrix, naming (row, col)."""
    data = table.data
    bad = ~np.isfinite(data) | (data < 0)
    if data.size and bad.any():
        k = int(np.argmax(bad))
        outer = int(np.searchsorted(table.indptr, k, side="right") - 1)
        inner = int(table.indices[k])
        row, col = (outer, inner) if table.format == "csr" else (inner, outer)
        what = "NaN" if np.isnan(data[k]) else "an infinite value" if np.isinf(data[k]) else repr(float(data[k]))
        raise ValueError(
            f"`table` must be finite and nonnegative; found {what} at index ({row}, {col}). "
            "Balancing rescales masses, so every entry must be a count or weight >= 0."
        )


def joint_table(table: Any, name: str = "table") -> tuple[Any, np.ndarray, np.ndarray]:
    """A 2-D table describing a joint distribution with no empty row or column.

    Returns (T, row_sums, col_sums): the table in float64 (a dense float64 input is used as is,
    not copied or normalised; sparse input becomes a canonical CSR copy) and its line sums. The
    joint distribution is T / T.sum().
    """
    T = _sparse_joint(table, name) if sp.issparse(table) else _dense_joint(table, name)
    # Line sums as matrix-vector products: BLAS threads them, numpy's sum does not. An overflow is
    # reported by finite_sums, so numpy's warning would only repeat it.
    with np.errstate(over="ignore"):
        rows = np.asarray(T @ np.ones(T.shape[1])).ravel()
    finite_sums(rows, T, name)
    if not rows.sum() > 0:
        raise ValueError(f"`{name}` has total mass 0; it must describe a joint distribution.")
    cols = np.asarray(T.T @ np.ones(T.shape[0])).ravel()
    for sums, axis_name in ((rows, "Row"), (cols, "Column")):
        if (sums <= 0).any():
            idx = int(np.argmax(sums <= 0))
            raise ValueError(
                f"{axis_name} {idx} of `{name}` is empty, so the conditional mean given that "
                f"category is undefined. Drop or merge empty categories first."
            )
    return T, rows, cols


def _sparse_joint(table: Any, name: str) -> Any:
    if table.ndim != 2:
        raise ValueError(f"`{name}` must be 2-D; got shape {table.shape}.")
    working_dtype(table.dtype, name)
    T = sp.csr_array(table, dtype=np.float64, copy=True)
    T.sum_duplicates()
    T.sort_indices()
    sparse_entries(T)
    return T


def _dense_joint(table: Any, name: str) -> np.ndarray:
    T = dense_array(table, name, min_ndim=2, max_ndim=2)
    working_dtype(T.dtype, name)
    T = T.astype(np.float64, copy=False)
    nonnegative(T, name)
    return T


def function_values(h: Any, P: Any, name: str = "h", *, table: Any = None) -> np.ndarray:
    """h on the support of P as finite float64: shape (m, l[, d]) for dense P, (nnz[, d]) for CSR P.

    For a sparse P (the canonical CSR copy :func:`joint_table` made of ``table``), h is a sparse
    matrix read on P's entries, or one value per stored entry of ``table`` in *its* storage order
    (the order of ``table.data``), returned in P's order.
    """
    if not sp.issparse(P):
        return nd_function_values(h, P.shape, name)
    values = _sparse_function(h, P, name) if sp.issparse(h) else _entry_function(h, P, table, name)
    if not np.isfinite(values).all():
        raise ValueError(f"`{name}` contains NaN or inf, first at index {_first_index(~np.isfinite(values))}.")
    return values


def _real_values(h: Any, name: str) -> np.ndarray:
    """h as float64, refusing dtypes a cast would silently cut (complex) or cannot read."""
    values = as_array(h, name)
    if values.dtype.kind not in "biuf":
        raise TypeError(f"`{name}` must hold real numbers; got dtype {values.dtype}.")
    return values.astype(np.float64, copy=False)


def _sparse_function(h: Any, P: Any, name: str) -> np.ndarray:
    if h.shape != P.shape:
        raise ValueError(f"`{name}` has shape {h.shape} but `table` has shape {P.shape}.")
    if h.dtype.kind not in "biuf":
        raise TypeError(f"`{name}` must hold real numbers; got dtype {h.dtype}.")
    return np.asarray(sp.csr_array(h)[row_indices(P), P.indices]).astype(np.float64).ravel()


def _entry_function(h: Any, P: Any, table: Any, name: str) -> np.ndarray:
    """Values given per stored entry of ``table``, moved into the canonical order of P."""
    values = _real_values(h, name)
    rows, cols = _stored_coordinates(table, name)
    if values.ndim not in (1, 2) or values.shape[0] != len(rows):
        raise ValueError(
            f"`{name}` has shape {values.shape}; for a sparse table give a sparse matrix of the "
            f"table's shape, or the values on its {len(rows)} stored entries in the order of "
            f"`table.data`, shape ({len(rows)},) or ({len(rows)}, d)."
        )
    key = rows * np.int64(P.shape[1]) + cols
    if np.all(key[1:] > key[:-1]):  # already canonical CSR order: nothing to move
        return values
    order = np.argsort(key, kind="stable")
    repeated = key[order][1:] == key[order][:-1]
    if repeated.any():
        i = int(order[1:][repeated][0])
        raise ValueError(
            f"`{name}` is given per stored entry, but `table` stores entry ({int(rows[i])}, {int(cols[i])}) "
            f"more than once, so which value of `{name}` belongs to that cell is ambiguous. Call "
            f"`table.sum_duplicates()` (and give `{name}` in the new order), or pass `{name}` as a "
            "sparse matrix."
        )
    return values[order]


def _stored_coordinates(table: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of each stored entry of a CSR, CSC or COO table, in storage order."""
    if table.format in ("csr", "csc"):
        outer = np.repeat(np.arange(len(table.indptr) - 1), np.diff(table.indptr))
        inner = table.indices.astype(np.int64)
        return (outer, inner) if table.format == "csr" else (inner, outer)
    if table.format == "coo":
        return table.row.astype(np.int64), table.col.astype(np.int64)
    raise TypeError(
        f"`{name}` is given per stored entry, but `table` is in {table.format.upper()} format, which "
        f"does not store a list of entries. Convert it with `table = table.tocsr()` and give `{name}` "
        "in the order of `table.data`, or pass `{name}` as a sparse matrix."
    )


def side_option(value: object, name: str) -> str:
    """'x' or 'y' for an option that names a side other than the balancing start (e.g. `given`)."""
    if value not in ("x", "y"):
        raise ValueError(f"`{name}` must be 'x' or 'y'; got {value!r}.")
    return str(value)


def _show(label) -> str:
    return repr(label.item() if isinstance(label, np.generic) else label)


def sample_array(a, name: str, n: int | None, *, max_ndim: int = 1) -> np.ndarray:
    """A per-sample array (pandas Series and Categoricals accepted) with the expected length."""
    if hasattr(a, "to_numpy"):
        a = a.to_numpy()
    arr = np.asarray(a)
    if arr.ndim == 0:
        raise ValueError(f"`{name}` must have one entry per sample; got a scalar.")
    if arr.ndim > max_ndim:
        shapes = "(n,) or (n, d)" if max_ndim == 2 else "(n,), one entry per sample"
        raise ValueError(
            f"`{name}` must have shape {shapes}; got shape {arr.shape}. Pass a 1-D array or a pandas "
            f"Series (one column of a DataFrame), not a table."
        )
    if n is not None and arr.shape[0] != n:
        raise ValueError(
            f"`{name}` has {arr.shape[0]} entries but `values` has {n} samples; give one per sample."
        )
    return arr


def sample_values(values) -> np.ndarray:
    arr = sample_array(values, "values", None, max_ndim=2)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"`values` must hold real numbers; got dtype {arr.dtype}.")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(
            f"`values` contains NaN or inf, first at sample {_first_index(~np.isfinite(arr))[0]}. "
            "Remove or impute those samples first; nothing is dropped silently."
        )
    return arr


def _real_nonnegative_weights(arr: np.ndarray) -> np.ndarray:
    """Design weights as float64: real, finite and nonnegative (the checks shared by in-memory
    samples and each Dask partition)."""
    if arr.dtype.kind not in "biuf":
        raise TypeError(
            f"`sample_weight` must hold real numbers; got dtype {arr.dtype}. Convert it first, e.g. "
            f"with np.asarray(sample_weight, dtype=float), after checking where the strings came from."
        )
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"`sample_weight` contains NaN or inf, first at sample {_first_index(~np.isfinite(arr))[0]}.")
    if (arr < 0).any():
        i = _first_index(arr < 0)[0]
        raise ValueError(f"`sample_weight` must be nonnegative; sample {i} has weight {float(arr[i])!r}.")
    return arr


def sample_weights(weights, n: int) -> np.ndarray:
    arr = _real_nonnegative_weights(sample_array(weights, "sample_weight", n))
    if not arr.sum() > 0:
        raise ValueError("`sample_weight` sums to 0; at least one sample needs positive weight.")
    return arr


def empty_policy(value) -> str:
    if value not in ("error", "drop"):
        raise ValueError(f"`empty` must be 'error' or 'drop'; got {value!r}.")
    return value


def unsampled(counts: np.ndarray, masses: np.ndarray, categories, name: str | tuple, target_name: str) -> None:
    """A target category with mass but no sample; ``categories`` gives the label of a flat index
    (a sequence, or a callable for joint margins, whose ``name`` is the tuple of columns)."""
    bad = (counts <= 0) & (masses > 0)
    if bad.any():
        i = int(np.argmax(bad))
        label = categories(i) if callable(categories) else categories[i]
        shown = f"`{name}`" if not isinstance(name, tuple) else f"({', '.join(f'`{c}`' for c in name)})"
        raise ValueError(
            f"No sample has {shown} = {_show(label)}, but `{target_name}` gives it mass "
            f"{masses[i]:.6g}: no weighting of the samples can reach that target. Merge it with a "
            f"neighbouring category, collect samples, or pass empty='drop' to remove it from the targets."
        )


def cli_seed(seed: int) -> int:
    """The command line's ``--seed``: NumPy's generators take only non-negative seeds."""
    if seed < 0:
        raise ValueError(f"`--seed` must be a non-negative integer; got {seed}. Use, e.g., --seed {-seed}.")
    return seed


def cli_jobs(jobs: int) -> int:
    if jobs < 1:
        raise ValueError(f"`--jobs` must be at least 1 (the number of parallel processes); got {jobs}.")
    return jobs


def output_folder(out: str):
    """Create the command line's ``--out`` folder (parents too) and prove it is writable, so that a
    bad path fails before minutes of simulation rather than when the report is written."""
    import pathlib
    import tempfile

    path = pathlib.Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"`--out` must be a folder, but {str(path)!r} is an existing file. "
                         f"Choose another name or remove the file.")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ValueError(f"`--out` {str(path)!r} cannot be created: {str(blocker)!r} is a file, not a folder. "
                         f"Choose a path whose parents are folders.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ValueError(f"`--out` {str(path)!r} is not a folder this process can write to "
                         f"({err.strerror or err}). Choose a writable folder.") from None
    return path


def max_steps_option(value: object) -> int:
    """The largest k of a variance profile: an integer >= 0 (None is not allowed here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`max_steps` must be an integer >= 0 (the largest k, in half-steps); got {value!r}.")
    if value < 0:
        raise ValueError(f"`max_steps` must be >= 0 (the largest k, in half-steps); got {value}.")
    return int(value)


def spectrum_rank(rank: object, shape: tuple[int, int], *, sparse: bool) -> int:
    """How many singular triplets to compute: all min(m, l) by default for a dense table (a full
    SVD); a sparse table needs an explicit rank < min(m, l) (ARPACK cannot return them all)."""
    n = min(shape)
    if rank is None:
        if sparse:
            raise ValueError(
                "`rank` is required for a sparse table: give the number of leading singular triplets "
                f"to compute (at most {n - 1}); a full SVD would densify the table."
            )
        return n
    rank = positive_int(rank, "rank")
    if sparse and rank >= n:
        raise ValueError(
            f"`rank` must be < min(m, l) = {n} for a sparse table; got {rank}. Use a smaller rank, "
            "or pass `table.toarray()` for the full spectrum of a small table."
        )
    if rank > n:
        raise ValueError(f"`rank` must be <= min(m, l) = {n}, the number of singular values; got {rank}.")
    return rank


def _is_missing(value) -> bool:
    if value is None:
        return True
    try:
        return bool(value != value)  # NaN is the value that differs from itself
    except (TypeError, ValueError):  # pandas.NA has no truth value: it is missing by definition
        return True


def missing_labels(labels: np.ndarray, name: str, target_name: str) -> None:
    """None, NaN or pandas.NA among the category labels: a sample without a category."""
    if labels.dtype.kind == "f":
        missing = np.isnan(labels)
    elif labels.dtype == object:
        missing = np.fromiter(map(_is_missing, labels), bool, count=len(labels))
    else:
        return
    if missing.any():
        i = int(np.argmax(missing))
        raise ValueError(
            f"`{name}` has a missing label ({_show(labels[i])}) at sample {i}. Every sample needs a category: "
            f"drop the samples without one, or give them their own label (e.g. 'missing') with a target "
            f"mass in `{target_name}`."
        )


def _mapping_masses(target, categories: list, target_name: str) -> np.ndarray:
    """The masses of a mapping target in the order of ``categories``, each a finite number >= 0."""
    for c in categories:
        v = target[c]
        if isinstance(v, (str, bytes)) or not isinstance(v, numbers.Real):
            raise TypeError(
                f"`{target_name}` maps {_show(c)} to {v!r}, which is not a real number. Give each "
                f"category's target mass as a number."
            )
        if not (np.isfinite(float(v)) and float(v) >= 0):
            raise ValueError(
                f"`{target_name}` maps {_show(c)} to {v!r}; target masses must be finite and >= 0."
            )
    return np.array([target[c] for c in categories], dtype=np.float64)


def linearization_option(value) -> str:
    if value not in ("balanced", "survey"):
        raise ValueError(
            f"`linearization` must be 'balanced' (conditional means of the balanced iterates: right "
            f"whether or not the targets match the sampled population) or 'survey' (R survey's "
            f"convention: conditional means of the starting sample); got {value!r}."
        )
    return value


def sample_margin_keys(margins) -> list[tuple[Any, tuple]]:
    """The estimator's margins: (key, the key's column names) in cycle order.

    A key is a column name, or a tuple of column names for a joint margin.
    """
    if not hasattr(margins, "items") or isinstance(margins, np.ndarray):
        raise TypeError(
            f"`margins` must be a mapping from a column name (or a tuple of names, for a joint margin) to "
            f"its target, in cycle order, e.g. {{'age': p_age, ('sex', 'region'): p_sex_region}}; got "
            f"{type(margins).__name__}."
        )
    if len(margins) == 0:
        raise ValueError("`margins` is empty; give at least one margin to balance.")
    out: list[tuple[Any, tuple]] = []
    seen: dict[frozenset, Any] = {}
    for key in margins:
        columns = key if isinstance(key, tuple) else (key,)
        if not columns:
            raise ValueError("`margins` has the key (); a joint margin names at least one column.")
        if len(set(columns)) != len(columns):
            raise ValueError(f"`margins` key {key!r} repeats a column; a joint margin names each column once.")
        if frozenset(columns) in seen:
            raise ValueError(f"`margins` has the keys {seen[frozenset(columns)]!r} and {key!r} for the same "
                             "columns; give each margin once.")
        seen[frozenset(columns)] = key
        out.append((key, columns))
    return out


def sample_data(data, columns: list, n_hint: int | None = None) -> dict:
    """The 1-d arrays of the named columns of a DataFrame or a mapping name -> array, one length."""
    if not hasattr(data, "keys") or not hasattr(data, "__getitem__"):
        raise TypeError(
            f"`data` must be a pandas DataFrame or a mapping from column name to a 1-d array; got "
            f"{type(data).__name__}."
        )
    out: dict = {}
    for c in columns:
        if c not in data:
            listed = list(data.keys())
            raise ValueError(
                f"`margins` names the column {c!r}, which `data` lacks (its columns: {listed!r}). Add the "
                "column or fix the margin's key."
            )
        out[c] = sample_array(data[c], str(c), None)
    lengths = {c: a.shape[0] for c, a in out.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"The columns of `data` have different lengths {lengths}; give one entry per sample "
                         "in every column.")
    return out


def mixed_target_kinds(column, names: list[str]) -> TypeError:
    return TypeError(
        f"The column {column!r} is in margins given as mappings and as arrays ({', '.join(f'`{n}`' for n in names)}): "
        "give every margin on it as a mapping label -> mass, or every one as an array over integer codes."
    )


def mapping_target(target, target_name: str, width: int) -> tuple[list, np.ndarray]:
    """The (categories, masses) of a mapping target; a joint margin's categories are tuples of ``width``."""
    categories = list(target.keys())
    if len(set(categories)) != len(categories):
        raise ValueError(f"`{target_name}` lists a category twice.")
    if width > 1:
        for c in categories:
            if not isinstance(c, tuple) or len(c) != width:
                raise ValueError(
                    f"`{target_name}` has the key {_show(c)}, but a margin of {width} columns needs tuples of "
                    f"{width} labels as keys (a pandas Series needs a MultiIndex of {width} levels)."
                )
    return categories, _mapping_masses(target, categories, target_name)


def array_target(target, target_name: str, width: int) -> np.ndarray:
    """An array target over integer codes: real, finite, nonnegative, one axis per column."""
    arr = as_array(target, target_name)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"`{target_name}` must hold real numbers; got dtype {arr.dtype}.")
    if arr.ndim != width:
        what = "1-D (or a mapping label -> mass)" if width == 1 else f"{width}-D, one axis per column of the margin"
        raise ValueError(f"`{target_name}` must be {what}; got shape {arr.shape}.")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"`{target_name}` contains NaN or inf, first at index {_first_index(~np.isfinite(arr))}.")
    if (arr < 0).any():
        idx = _first_index(arr < 0)
        raise ValueError(f"`{target_name}` must be nonnegative; found {float(arr[idx])!r} at index {idx}.")
    return arr


def category_counts_differ(column, first: str, n_first: int, other: str, n_other: int) -> ValueError:
    return ValueError(
        f"`{first}` has {n_first} categories of {column!r} but `{other}` has {n_other}: a target's shape must "
        f"match its columns' categories. Give both margins the same codes 0..n-1 of {column!r}."
    )


def lookup_labels(labels: np.ndarray, index: dict, name: str, target_name: str) -> np.ndarray:
    """Each sample's position in ``index`` (label -> code); a label it lacks is an error."""
    missing_labels(labels, name, target_name)
    uniques: list
    try:
        sorted_uniques, inverse = np.unique(labels, return_inverse=True)
        uniques = list(sorted_uniques)
    except TypeError:  # labels of mixed types cannot be sorted, but can still be looked up
        uniques = list(dict.fromkeys(labels.tolist()))
        position = {u: j for j, u in enumerate(uniques)}
        inverse = np.fromiter((position[v] for v in labels.tolist()), np.int64, count=len(labels))
    lookup = np.empty(len(uniques), dtype=np.int64)
    for j, u in enumerate(uniques):
        key = u.item() if isinstance(u, np.generic) else u
        if key not in index:
            raise unlisted_label(name, u, target_name)
        lookup[j] = index[key]
    return lookup[inverse.ravel()]


def integer_codes(labels: np.ndarray, size: int, name: str, target_name: str, dtype=np.int64) -> np.ndarray:
    """Integer codes 0..size-1 of a column whose margins are arrays, in ``dtype`` (checked first)."""
    missing_labels(labels, name, target_name)
    if labels.dtype.kind not in "iu":
        raise TypeError(
            f"`{name}` holds labels of dtype {labels.dtype}, but `{target_name}` is an array: give "
            f"`{name}` as integer codes 0..{size - 1}, or `{target_name}` as a mapping label -> mass."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= size):
        i = _first_index((labels < 0) | (labels >= size))[0]
        raise ValueError(
            f"`{name}` has code {int(labels[i])} at sample {i}, outside 0..{size - 1} "
            f"(the length of `{target_name}` along it)."
        )
    return labels.astype(dtype, copy=False)


def unlisted_label(name: str, label, target_name: str) -> ValueError:
    return ValueError(
        f"`{name}` has the label {_show(label)}, which `{target_name}` does not list. Give it a "
        f"target mass (0 removes those samples' weight) or recode the samples."
    )


def unlisted_combination(columns: tuple, labels: tuple, target_name: str, sample: int) -> ValueError:
    return ValueError(
        f"Sample {sample} has ({', '.join(f'`{c}`' for c in columns)}) = {labels!r}, which `{target_name}` does "
        "not list. Give that combination a target mass (0 removes those samples' weight) or recode the samples."
    )


def weight_bounds(bounds, steps: int | None) -> tuple[float, float] | None:
    """``(low, high)`` on the weights relative to their mean: 0 <= low <= 1 <= high."""
    if bounds is None:
        return None
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise TypeError(f"`bounds` must be a pair (low, high) of numbers or None; got {bounds!r}.") from None
    if not (0 <= low <= 1 <= high < np.inf):
        raise ValueError(
            f"`bounds` = {bounds!r} must satisfy 0 <= low <= 1 <= high < inf: they bound the weights relative "
            "to their mean, which is 1."
        )
    if steps is not None:
        raise ValueError(
            f"`bounds` needs `steps=None`: trimming alternates with raking to convergence; got steps={steps}."
        )
    return low, high


def bounds_not_met(bounds: tuple[float, float], lowest: float, highest: float, worst: float, tol: float,
                   sweeps: int) -> str:
    return (
        f"The margins and `bounds` = {bounds} cannot both hold (not after {sweeps} sweeps of raking with the "
        f"weights clipped to the bounds): the bounded weights still miss a margin by {worst:.3g} (relative L1; "
        f"tol = {tol:.3g}). The weights returned meet the margins and span {lowest:.6g} .. {highest:.6g} times "
        "their mean, outside the bounds; widen the bounds, or merge the categories that need the extreme weights."
    )


def margin_axes(margins, ndim: int) -> list[tuple[int, ...]]:
    """A variance profile's margins: each an axis or a tuple of axes, in cycle order; returned as
    sorted tuples of nonnegative axes (the wording of :func:`margin_targets`)."""
    if isinstance(margins, (str, bytes)) or hasattr(margins, "items") or not hasattr(margins, "__len__"):
        raise TypeError(
            f"`margins` must be a sequence of axes (int) or tuples of axes, in cycle order, e.g. "
            f"[(0, 1), 2, 3]; got {type(margins).__name__}."
        )
    if len(margins) == 0:
        raise ValueError("`margins` is empty; give at least one margin.")
    out: list[tuple[int, ...]] = []
    for key in margins:
        out.append(tuple(sorted(_margin_key(key, ndim, out, "entry"))))
    return out


def _margin_key(key, ndim: int, seen: list[tuple[int, ...]], word: str) -> tuple[int, ...]:
    """One margin's axes as nonnegative ints in the key's order, checked: an int or a nonempty
    tuple of ints, in range, none repeated, an axis set not in ``seen`` (sorted tuples)."""
    ax = (key,) if isinstance(key, numbers.Integral) and not isinstance(key, bool) else key
    if not isinstance(ax, tuple) or not ax or not all(
            isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in ax):
        raise TypeError(f"`margins` {word} {key!r} must be an axis (int) or a nonempty tuple of axes.")
    normal = tuple(int(a) % ndim if -ndim <= a < ndim else ndim for a in ax)
    if ndim in normal:
        raise ValueError(f"`margins` {word} {key!r} names an axis outside 0..{ndim - 1} (`table` has {ndim}).")
    if len(set(normal)) != len(normal):
        raise ValueError(f"`margins` {word} {key!r} repeats an axis; a joint margin names each axis once.")
    if tuple(sorted(normal)) in seen:
        raise ValueError(f"`margins` names the axes {tuple(sorted(normal))} twice; give each margin once.")
    return normal


def nd_table(table: Any, name: str = "table") -> np.ndarray:
    """A dense N-d table of a joint distribution in float64: finite, nonnegative, total > 0."""
    if sp.issparse(table):
        raise TypeError(
            f"`{name}` is a scipy.sparse matrix; with `margins` give a dense array (without `margins` a "
            "sparse 2-D table is accepted)."
        )
    T = dense_array(table, name, min_ndim=1)
    working_dtype(T.dtype, name)
    T = T.astype(np.float64, copy=False)
    nonnegative(T, name)
    if not np.isfinite(T).all():
        raise ValueError(f"`{name}` contains inf, first at index {_first_index(~np.isfinite(T))}.")
    if not T.sum() > 0:
        raise ValueError(f"`{name}` has total mass 0; it must describe a joint distribution.")
    return T


def nd_function_values(h: Any, shape: tuple[int, ...], name: str = "h") -> np.ndarray:
    """h on an N-d table of shape ``shape`` as finite float64: shape ``shape`` or ``shape + (d,)``."""
    if sp.issparse(h):
        raise TypeError(f"`{name}` is sparse but `table` is dense; pass a dense array.")
    values = _real_values(h, name)
    if values.shape[:len(shape)] != shape or values.ndim not in (len(shape), len(shape) + 1):
        raise ValueError(
            f"`{name}` has shape {values.shape} but `table` has shape {shape}: give h as an array of shape "
            f"{shape}, or {shape} + (d,) for d functions at once."
        )
    if not np.isfinite(values).all():
        raise ValueError(f"`{name}` contains NaN or inf, first at index {_first_index(~np.isfinite(values))}.")
    return values


def margins_start(start) -> None:
    """With `margins` the cycle order is the order of `margins`; `start` is for two-way tables."""
    if start != "x":
        raise ValueError(
            f"`start` ({start!r}) applies to a two-way table without `margins`; with `margins` the first step "
            "fixes the first margin listed, so reorder `margins` instead (e.g. [(1,), (0,)])."
        )


def progress_option(progress):
    """``None``/``False`` (silent), ``True`` (a bar or a line) or a callable ``f(step, errors)``."""
    if progress is None or progress is False:
        return None
    if progress is True or callable(progress):
        return progress
    raise TypeError(
        f"`progress` must be True, False or a callable f(step, errors); got {type(progress).__name__}."
    )


def matplotlib_installed() -> None:
    """Import matplotlib, or say how to get it (the wording of `databalance reproduce`)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ImportError('matplotlib is not installed, so nothing can be plotted. '
                          'Install it with: pip install "databalance[plot]"', name="matplotlib") from err


def plot_axes(ax):
    """``ax`` as given, if it is a matplotlib Axes (matplotlib is imported by the caller)."""
    from matplotlib.axes import Axes

    if not isinstance(ax, Axes):
        raise TypeError(f"`ax` must be a matplotlib Axes (from `figure.add_subplot()` or `plt.subplots()`), "
                        f"or None for a new one; got {type(ax).__name__}.")
    return ax


def error_history(result) -> np.ndarray:
    """The ``marginal_error`` of a balancing result as (steps + 1, K), the largest over any batch."""
    errors = getattr(result, "marginal_error", None)
    if not isinstance(errors, np.ndarray) or errors.ndim < 2 or errors.shape[-2] < 1:
        raise TypeError("`result` must be a balancing result with a `marginal_error` array of shape "
                        "(..., steps + 1, K), e.g. from balance_table or balance_margins; "
                        f"got {type(result).__name__}.")
    return errors.reshape(-1, *errors.shape[-2:]).max(axis=0)


def plot_rate(rate) -> float | None:
    """The predicted error factor per half-step, a number in (0, 1], or None."""
    if rate is None:
        return None
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 < float(rate) <= 1:
        raise ValueError(f"`rate` must be the predicted error factor per half-step, a number in (0, 1] (s_2 for "
                         f"two margins: `spectrum(result.table).max_correlation`), or None; got {rate!r}.")
    return float(rate)


def function_column(function, count: int | None) -> int | None:
    """Which of ``count`` functions to plot (None: the profile holds a single function)."""
    if count is None:
        if function is not None:
            raise ValueError(f"`function` selects one of several functions, but this profile holds one; "
                             f"leave it out (got {function!r}).")
        return None
    if isinstance(function, bool) or not isinstance(function, numbers.Integral) or not 0 <= int(function) < count:
        raise ValueError(f"This profile holds {count} functions: pass `function` = an index in 0..{count - 1} "
                         f"to choose the one to plot; got {function!r}.")
    return int(function)


def match_table(matches: Any) -> Any:
    """A document x concept match table as canonical CSR, checked entry by entry; never densified
    (a copy unless it is canonical CSR already, and the input is never modified)."""
    if not _sparse(matches):
        raise TypeError(
            f"`matches` must be a scipy.sparse matrix or array (documents x concepts); got {type(matches).__name__}. "
            "Wrap a small dense table with `scipy.sparse.csr_array(matches)`; build a large one sparse."
        )
    if matches.ndim != 2:
        raise ValueError(f"`matches` must be 2-D (documents x concepts); got shape {matches.shape}.")
    if matches.dtype.kind not in "biuf":
        raise TypeError(f"`matches` has dtype {matches.dtype}; give nonzero numbers (or True) where a "
                        "document matches a concept.")
    if matches.format not in ("csr", "csc", "coo"):
        matches = matches.tocoo()
    _match_entries(matches)
    csr = matches if matches.format == "csr" else matches.tocsr()
    if not csr.has_canonical_format:
        csr = csr.copy()
        csr.sum_duplicates()
    return csr


def _sparse(table: Any) -> bool:
    """``sp.issparse`` without its type narrowing (scipy-stubs' SparseABC lacks the array methods)."""
    return bool(sp.issparse(table))


def _match_entries(matches: Any) -> None:
    data = matches.data
    if data.dtype.kind == "b" or not data.size:
        return
    bad = (data < 0) | ~np.isfinite(data) if data.dtype.kind == "f" else data < 0
    if not bad.any():
        return
    k = int(np.argmax(bad))
    if matches.format == "coo":
        row, col = int(matches.row[k]), int(matches.col[k])
    else:
        outer, inner = int(np.searchsorted(matches.indptr, k, side="right") - 1), int(matches.indices[k])
        row, col = (outer, inner) if matches.format == "csr" else (inner, outer)
    raise ValueError(
        f"`matches` must be finite and nonnegative; found {float(data[k])!r} at (document {row}, concept {col}). "
        "A nonzero entry marks a match, a zero none."
    )


def concept_cap(t: object) -> float:
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise TypeError(f"`t` (the cap per concept) must be a number; got {type(t).__name__}.")
    if not (np.isfinite(float(t)) and float(t) > 0):
        raise ValueError(f"`t` (the cap per concept) must be a positive finite number, e.g. 20000; got {t!r}.")
    return float(t)


def random_seed(seed: object) -> np.random.Generator:
    """``numpy.random.default_rng(seed)`` for None, a nonnegative int or a Generator."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"`seed` must be None, a nonnegative int or a numpy.random.Generator; got "
                        f"{type(seed).__name__}.")
    if seed is not None and int(seed) < 0:
        raise ValueError(f"`seed` must be a nonnegative int; got {seed!r}.")
    return np.random.default_rng(None if seed is None else int(seed))


def hypothesis_missing() -> ImportError:
    return ImportError('databalance.testing needs hypothesis, which is not installed. Install it with: '
                       'pip install "databalance[testing]"', name="hypothesis")


def assert_margins_pair(length: int, ndim: int) -> str:
    return (f"`margins` must be a mapping (as for balance_margins) or a pair (p_x, p_y) for a 2-D table; got "
            f"a sequence of length {length} for a table with {ndim} dimensions.")


def not_a_result(kind: str) -> str:
    return (f"Expected balancing results (from balance_table, balance_logits or balance_margins), which have a "
            f"`table`; got {kind}.")


def sample_value_columns(values) -> tuple[tuple | None, np.ndarray]:
    """(the statistics' names or None, h as (n,) or (n, d) float64): ``values`` an array, a pandas
    Series or DataFrame (names: its columns) or a mapping name -> 1-d array (names: its keys)."""
    columns = getattr(values, "columns", None)
    if columns is not None and getattr(values, "ndim", None) == 2:
        return tuple(columns), sample_values(values)
    if not hasattr(values, "items") or isinstance(values, np.ndarray) or hasattr(values, "to_numpy"):
        return None, sample_values(values)
    if len(values) == 0:
        raise ValueError("`values` is an empty mapping; give at least one statistic (name -> array).")
    arrays = {k: sample_array(v, f"values[{k!r}]", None) for k, v in values.items()}
    lengths = {k: a.shape[0] for k, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"The statistics in `values` have different lengths {lengths}; give one entry per "
                         "sample in every one.")
    return tuple(arrays), sample_values(np.column_stack(list(arrays.values())))


def misaligned_values() -> str:
    return ("The index of `values` differs from that of the fitted data, so its rows would be matched to the "
            "wrong samples. Align it first (e.g. `values.loc[data.index]`), or pass `values.to_numpy()` if "
            "the order is right.")


def summary_unavailable() -> str:
    return ("This estimate was not made by BalancedEstimator.mean, so it has no fit to summarise; call "
            "`summary()` on an estimate from `mean` or `balanced_mean`.")


def misaligned_inputs(first: str, other: str) -> ValueError:
    return ValueError(
        f"`{other}` has a different pandas index from `{first}`: rows are matched by position, so they would "
        f"be misaligned. Reindex `{other}` like `{first}` (e.g. `{other}.reindex({first}.index)`) or pass arrays."
    )


def solver_stopped(solver: str, iterations: int) -> str:
    return (f"{solver} stopped after {iterations} iterations before reaching its tolerance: the least-squares "
            "fit behind sigma_inf^2 / the converged standard error may be inaccurate (a nearly disconnected "
            "support makes it ill-conditioned).")


def confidence_level(level) -> float:
    if not isinstance(level, numbers.Real) or not 0 < float(level) < 1:
        raise ValueError(f"`level` must be a number strictly between 0 and 1; got {level!r}.")
    return float(level)


# -- issue 12: Dask collections (estimators, row-partitioned tables) ---------------------------------


def in_partition(message: str, partition: int) -> str:
    """A message raised while computing one Dask partition, saying which (sample numbers in it count
    from the partition's first row)."""
    return f"{message} [Dask partition {partition}; sample numbers count from its first row]"


def partition_weights(weights, n: int) -> np.ndarray:
    """One partition's design weights: real, finite, nonnegative (a partition may hold only zeros)."""
    arr = np.asarray(weights)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"`sample_weight` has {arr.shape[0] if arr.ndim else 0} entries in this partition but the "
                         f"data has {n}; give one weight per sample, partitioned like the data.")
    return _real_nonnegative_weights(arr)


def dask_mixed_input(name: str, kind: str) -> str:
    return (f"`{name}` is a {kind} but other inputs are Dask collections: give every per-sample input as a Dask "
            "array, Series or DataFrame column with the same partitions (e.g. `dask.array.from_array(x, "
            "chunks=data_chunks)`), or compute them all first.")


def dask_lengths_differ(first: str, n_first: int, other: str, n_other: int) -> str:
    return f"`{other}` has {n_other} rows but `{first}` has {n_first}; give one entry per sample in every input."


def dask_partitions_differ(first: str, p_first: int, other: str, p_other: int) -> str:
    return (f"`{other}` has {p_other} partitions but `{first}` has {p_first}, and their lengths are unknown, so "
            f"rows cannot be matched. Take both from one Dask DataFrame, or compute their lengths "
            f"(`.to_dask_array(lengths=True)`).")


def dask_block_lengths(lengths: list[int], columns: list) -> str:
    return (f"The columns {columns!r} of `data` have {lengths} rows in one partition; every column must be "
            "partitioned like the others.")


def spill_failed(path: str, error: OSError) -> str:
    return (f"Could not write the encoded samples to the worker's local directory ({path}: {error}). Free space "
            "there, point Dask's `temporary-directory` elsewhere, or keep them off disk with "
            "`databalance._dask_samples.DISK_FRACTION = 0` (every pass then reads the columns again).")


def dask_values_length(n_values: int, n_data: int) -> str:
    return (f"`values` has {n_values} rows in a partition where the fitted data has {n_data}; give `values` the "
            "fitted data's partitions (e.g. a column of the same Dask DataFrame).")


def dask_data_changed() -> str:
    return ("The fitted data has a category combination that the fit did not see: the Dask collection changed "
            "between fit and mean (e.g. a Parquet dataset rewritten). Fit again.")


def dask_fit_mismatch(fitted_dask: bool) -> str:
    if fitted_dask:
        return ("This estimator was fitted on Dask collections: give `values` as a Dask array, Series or DataFrame "
                "partitioned like the fitted data.")
    return ("This estimator was fitted in memory: give `values` as an in-memory array (e.g. `values.compute()`), "
            "or fit on the Dask collections.")


def dask_bounds() -> str:
    return ("`bounds` (trimming) is not available for Dask input: it clips every sample's weight, which needs the "
            "samples in memory. Fit without bounds, or compute the columns first.")


def dask_unlisted_combination(columns: tuple, labels: tuple, target_name: str) -> ValueError:
    return ValueError(
        f"Some sample has ({', '.join(f'`{c}`' for c in columns)}) = {labels!r}, which `{target_name}` does not list. "
        "Give that combination a target mass (0 removes those samples' weight) or recode the samples."
    )


def dask_table(table) -> None:
    """A Dask table for balance_table: 2-D, real, partitioned along its rows only."""
    if table.ndim != 2:
        raise ValueError(f"`table` must be 2-D when it is a Dask array (batches are not supported); got shape "
                         f"{table.shape}.")
    if any(np.isnan(c) for c in table.chunks[0]):
        raise ValueError("`table` has unknown chunk sizes along its rows; call `table.compute_chunk_sizes()` first.")


def dask_column_chunks(n_chunks: int) -> str:
    return (f"`table` is split into {n_chunks} chunks along its columns; it is rechunked to one chunk per row "
            "block (`table.rechunk({1: -1})`), so each block holds whole rows. Chunk it along rows only to "
            "avoid this copy.")


def dask_missing_column(column, listed: list) -> ValueError:
    return ValueError(
        f"`margins` names the column {column!r}, which `data` lacks (its columns: {listed!r}). Add the column or fix "
        "the margin's key."
    )


def dask_many_cells(cells: int, n: int) -> str:
    return (f"The {n} samples fall into {cells} distinct cells (combinations of the margins' columns): the cell "
            "table, held in memory, is nearly as large as the data, and every pass ships it to the workers. Merge "
            "rare categories, or fit on the columns of fewer margins, to keep it small.")


# -- issue 10: arrays of the Python array API standard (PyTorch, JAX, CuPy, array-api-strict) --------


def _kind(x) -> str:
    root = type(x).__module__.split(".")[0]
    return {"jaxlib": "jax", "builtins": "Python"}.get(root, root)


def api_table(xp, arr, name: str) -> None:
    """A table or logits of another namespace: real floating (float32 or float64), at least 2-D."""
    if arr.dtype not in (xp.float32, xp.float64):
        raise TypeError(
            f"`{name}` is a {_kind(arr)} array of dtype {arr.dtype}; arrays other than NumPy's are balanced in "
            "their own dtype, which must be float32 or float64 (integer, complex and half-precision arrays "
            f"are not). Convert it first, e.g. `{name}.float()` in PyTorch or `{name}.astype(jnp.float32)`."
        )
    if arr.ndim < 2:
        raise ValueError(f"`{name}` must have at least 2 dimensions (rows are X, columns are Y, leading axes are "
                         f"a batch); got shape {tuple(arr.shape)}.")


def api_target(p, name: str, xp, table, table_name: str, length: int, batch: tuple[int, ...]) -> np.ndarray:
    """A target given in NumPy (or a list) or in the table's namespace on its device, checked like
    :func:`marginal`; returned as a host copy (targets are vectors, read once before the loop)."""
    from ._kernels import arrayapi

    if arrayapi.is_array_api(p):
        if arrayapi.namespace(p) is not xp:
            raise TypeError(
                f"`{name}` is a {_kind(p)} array but `{table_name}` is a {_kind(table)} array; give the targets "
                f"in `{table_name}`'s namespace (on its device) or as NumPy arrays."
            )
        if arrayapi.device(p) != arrayapi.device(table):
            raise ValueError(
                f"`{name}` is on device {arrayapi.device(p)} but `{table_name}` is on {arrayapi.device(table)}; "
                f"move `{name}` to `{table_name}`'s device (e.g. `{name}.to({table_name}.device)`)."
            )
        if p.dtype not in (xp.float32, xp.float64):
            raise TypeError(f"`{name}` is a {_kind(p)} array of dtype {p.dtype}; give float32 or float64 targets.")
        if arrayapi.requires_grad(p) or arrayapi.is_traced(p):
            raise TypeError(
                f"`{name}` requires gradients (or is traced by JAX); gradients with respect to the targets "
                f"are not supported. Pass a constant: `{name}.detach()` in PyTorch, or close over a concrete "
                "array in JAX."
            )
        p = arrayapi.to_numpy(p)
    return marginal(p, name, length, batch)


def api_entries(xp, arr, name: str, *, log: bool) -> bool:
    """Value checks of a table (nonnegative, finite) or of logits (no NaN, no +inf), from three
    reductions read in one transfer; returns whether a structural zero (0, or -inf) is present.
    The offending index is searched on the host on the error path only."""
    from ._kernels import arrayapi

    if int(np.prod(tuple(arr.shape))) == 0:
        return False
    x = arrayapi.stop_gradient(arr)
    # NaN propagates through min and max in PyTorch, JAX, CuPy and NumPy: two passes, one read
    lo, hi = (float(v) for v in arrayapi.to_numpy(xp.stack([xp.min(x), xp.max(x)])))
    nan = np.isnan(lo) or np.isnan(hi)
    if nan or (log and hi == np.inf) or (not log and (lo < 0 or hi == np.inf)):
        host = arrayapi.to_numpy(x)
        if log:
            logits_entries(host, name)
        else:
            nonnegative(host, name)
            finite_sums(np.array([np.inf]), host, name)
    return lo == (-np.inf if log else 0.0)


def api_finite_sums(sums, name: str) -> None:
    from ._kernels import arrayapi

    if not np.isfinite(arrayapi.to_numpy(arrayapi.stop_gradient(sums))).all():
        raise ValueError(f"The row sums of `{name}` overflow; divide `{name}` by a large constant.")


def api_adjoint_unsolved(iterations: int, residual: float) -> str:
    return (f"The adjoint system of the converged balance (implicit differentiation) was solved to a relative "
            f"residual of {residual:.2g} after {iterations} conjugate-gradient iterations; the gradient is "
            "approximate. Balance with a smaller `tol`, or differentiate `steps=k` instead.")


def api_implicit_unconverged(name: str, status: str, steps: int, tol: float) -> RuntimeError:
    """The backward of ``steps=None`` when the forward run did not converge: the implicit
    derivative holds at the fixed point only, so it would be silently wrong."""
    return RuntimeError(
        f"The gradient of balancing `{name}` with `steps=None` is the implicit derivative at the converged "
        f"result, but the forward run stopped with status {status!r} after {steps} half-steps (tol={tol:g}), "
        "short of the fixed point, where that derivative does not hold. Differentiate the exact k-step map "
        "with `steps=k`, or let the run converge (a larger `max_steps`, or a larger `tol`)."
    )


def api_traced(name: str) -> TypeError:
    """``steps=None`` needs to read the marginal error; traced JAX values cannot be read."""
    return TypeError(
        f"`{name}` is traced by JAX (under jax.jit, jax.vmap or another transformation that traces), but "
        "`steps=None` reads the marginal error after every sweep to decide when to stop. Under such a "
        "transformation pass `steps=k` (the k-step map, differentiable), or call the function on concrete "
        "arrays (jax.grad works there: the converged result is differentiated implicitly; for a batch, pass "
        "the stacked arrays: leading axes are a batch of problems)."
    )


def api_acceleration(name: str, value: str = "overrelax") -> ValueError:
    return ValueError(f"`acceleration={value!r}` is available for NumPy and scipy.sparse inputs only; `{name}` is "
                      "an array of another namespace, balanced by plain IPF (`acceleration='auto'` or 'none').")


def loss_logits(logits, name: str = "logits") -> None:
    """A batch's logit matrix (or a batch of them): square over the last two axes (pair i is row i
    and column i)."""
    shape = tuple(logits.shape)
    if len(shape) < 2 or shape[-1] != shape[-2] or shape[-1] == 0:
        raise ValueError(f"`{name}` must be a square matrix of pairs (..., n, n): row i and column i are the "
                         f"two views of sample i; got shape {shape}.")


def loss_steps(k) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
        raise ValueError(f"`k` must be an integer >= 0 (half-steps of balancing: 0 is the joint softmax, 1 "
                         f"the CLIP loss, 2 the double-balanced loss); got {k!r}.")
    return int(k)


def loss_reduction(reduction) -> str:
    if reduction not in ("mean", "none"):
        raise ValueError(f"`reduction` must be 'mean' (one number) or 'none' (one per matrix of the batch); "
                         f"got {reduction!r}.")
    return str(reduction)


# -- issue 11: fused kernels (numba) and accelerated convergence ------------------------------------------


def kernel_choice(variable: str, value: str) -> str:
    return (f"The environment variable {variable} is {value!r}; it must be 'auto' (numba for large tables when "
            "installed), 'numpy' or 'numba'.")


def numba_missing(variable: str) -> str:
    return (f"{variable}=numba asks for the numba kernels, but numba is not installed: "
            "`pip install databalance[fast]`, or unset the variable.")


def acceleration_option(value) -> str:
    """``acceleration`` of balance_table / balance_logits."""
    choices = ("auto", "overrelax", "anderson", "none")
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`acceleration` must be one of {', '.join(repr(c) for c in choices)}; got {value!r}.")
    return value


# -- issue 11 (sparse part): the fused sparse kernel's layout -----------------------------------------------


def sparse_layout(value, choices: tuple[str, ...]) -> str:
    """``layout`` of the fused sparse kernel."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`layout` must be one of {', '.join(repr(c) for c in choices)}; got {value!r}.")
    return value


def tile_size(lead: int, other: int) -> str:
    return (f"`tile` must give between 1 and 65536 lead lines and other lines per tile (their numbers within a "
            f"tile are 16-bit); got {(lead, other)!r}.")


# -- issue 12 (samples path) -------------------------------------------------------------------------


def samples_tables_too_large(entries: int, limit: int) -> str:
    return (f"The converged standard error of a Dask fit whose samples are their own cells needs the margins' "
            f"pairwise two-way tables and the normal equations over all their categories: {entries} entries "
            f"here, more than the {limit} the client may hold. Give `steps=k` (its standard error needs no "
            f"such system), or margins with fewer categories.")
