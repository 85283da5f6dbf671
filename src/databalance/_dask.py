"""Dask collections in the estimators: one streaming pass per fit and per ``mean``.

Imported only when a Dask collection reaches :mod:`databalance.estimators`. Every partition
encodes its labels against the targets' category lists (an unseen label raises at compute time,
naming the column, the label and the partition), combines its columns' codes into one integer
key per sample (mixed radix over the columns' category counts) and reduces its samples to per-cell
sufficient statistics; Dask's tree reduction (:func:`dask.array.reduction`) merges them. Everything
else -- the balancing, the influence-function algebra, the diagnostics -- runs in memory on the
cell table (see the user guide, "Samples and tables on Dask").

Statistics per cell c of the fit: the sample count, the design weights' sum, sum of squares,
minimum and maximum. Of a ``mean``, for every statistic h: ``sum d h``, ``sum d^2 h`` and
``M2 = sum d^2 (h - m_c)^2`` around the cell's ``d^2``-weighted mean ``m_c``, merged between
partitions by Chan's formula (so that the standard error never subtracts two large sums), and
``max |h|``; the sums are in units of ``2^exponent`` (per statistic), so that squares of huge
values cannot overflow.
"""

from __future__ import annotations

import warnings
from typing import Any

import dask
import dask.array as da
import numpy as np

from . import _validation as check
from .estimators import _cell_moments, _exponents

#: Partials merged per node of the tree reductions.
SPLIT_EVERY = 8




def rows(obj: Any, name: str, *, max_ndim: int = 1) -> da.Array:
    """A Dask array with one row per sample from a Dask array, Series or DataFrame (a 2-D array in
    one chunk along its columns)."""
    if isinstance(obj, da.Array):
        arr = obj
    elif hasattr(obj, "to_dask_array"):
        with warnings.catch_warnings():  # pandas extension dtypes (strings) become object: labels kept
            warnings.simplefilter("ignore", UserWarning)
            arr = obj.to_dask_array()
    else:
        raise TypeError(check.dask_mixed_input(name, type(obj).__name__))
    if arr.ndim == 0 or arr.ndim > max_ndim:
        shapes = "(n,) or (n, d)" if max_ndim == 2 else "(n,), one entry per sample"
        raise ValueError(f"`{name}` must have shape {shapes}; got a Dask array of shape {arr.shape}.")
    if arr.ndim == 2 and arr.numblocks[1] > 1:
        arr = arr.rechunk({1: -1})
    return arr


def aligned(arrays: dict[str, da.Array]) -> dict[str, da.Array]:
    """The arrays with the first one's row chunks: rechunked when every chunking is known, refused
    when the partition counts differ and some lengths are unknown (rows would be misaligned)."""
    names = list(arrays)
    first = arrays[names[0]]
    out = {names[0]: first}
    known = not np.isnan(first.chunks[0]).any()
    for name in names[1:]:
        arr = arrays[name]
        if arr.chunks[0] != first.chunks[0]:
            if known and not np.isnan(arr.chunks[0]).any():
                if sum(arr.chunks[0]) != sum(first.chunks[0]):
                    raise ValueError(check.dask_lengths_differ(names[0], sum(first.chunks[0]), name,
                                                               sum(arr.chunks[0])))
                arr = arr.rechunk({0: first.chunks[0]})
            elif arr.numblocks[0] != first.numblocks[0]:
                raise ValueError(check.dask_partitions_differ(names[0], first.numblocks[0], name, arr.numblocks[0]))
        out[name] = arr
    return out


def shared(array: np.ndarray) -> da.Array:
    """A client-side array every partition's task reads, as a one-chunk Dask array: scattered to
    the workers once under an active ``distributed`` client (a cell table's keys can be tens of MB,
    too much to embed in every graph), embedded in the graph otherwise."""
    try:
        from distributed import default_client

        client = default_client()
    except (ImportError, ValueError):  # no distributed, or no client: the local schedulers
        return da.from_array(array, chunks=-1)
    if dask.config.get("scheduler", None) not in (None, "dask.distributed", "distributed") and \
            dask.config.get("scheduler", None) is not client:
        return da.from_array(array, chunks=-1)
    future = client.scatter(array, broadcast=True, hash=False)
    return da.from_delayed(future, shape=array.shape, dtype=array.dtype, meta=array[:0])


def _partition_ids(arr: da.Array) -> da.Array:
    return da.arange(arr.numblocks[0], chunks=1)


def _codes_of(plan, blocks, p: int, dtype=np.int64) -> list[np.ndarray]:
    """Every encoded column's codes in partition ``p`` (integer codes in ``dtype``, which must hold
    them; looked-up labels as int64); errors name the partition."""
    out = []
    for i, labels in enumerate(blocks):
        try:
            out.append(plan.column_codes(i, np.asarray(labels), dtype))
        except (ValueError, TypeError) as error:
            raise type(error)(check.in_partition(str(error), p)) from None
    lengths = {len(c) for c in out}
    if len(lengths) > 1:
        raise ValueError(check.in_partition(check.dask_block_lengths([len(c) for c in out], plan.columns), p))
    return out


def _key(codes: list[np.ndarray], strides: list[int]) -> np.ndarray:
    key = codes[0] * strides[0]
    for c, s in zip(codes[1:], strides[1:], strict=True):
        key += c * s
    return key


def _design(block, n: int, p: int) -> np.ndarray:
    try:
        return check.partition_weights(block, n)
    except (ValueError, TypeError) as error:
        raise type(error)(check.in_partition(str(error), p)) from None


def _wrap(value) -> np.ndarray:
    out = np.empty(1, dtype=object)
    out[0] = value
    return out


def _parts(nested):
    """The dicts in a (nested) list of one-element object arrays, as the tree reduction hands them."""
    if isinstance(nested, dict):
        yield nested
    elif isinstance(nested, (list, tuple)):
        for x in nested:
            yield from _parts(x)
    else:
        for x in np.ravel(nested):
            yield from _parts(x)


def _tree(objs: da.Array, combine) -> Any:
    """Dask's tree reduction of one object per partition with ``combine`` (a list of dicts -> dict)."""
    def node(parts, axis=None, keepdims=True):
        return _wrap(combine(list(_parts(parts))))

    def top(parts, axis=None, keepdims=False):
        return combine(list(_parts(parts)))

    return da.reduction(objs, chunk=lambda b, axis, keepdims: b, combine=node, aggregate=top, concatenate=False,
                        dtype=object, split_every=SPLIT_EVERY, meta=np.empty(0, dtype=object))


# -- the fit: occupied cells and their design-weight sums -------------------------------------------


def _group(key: np.ndarray, product: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct keys, each sample's position among them): a lookup table when the key space
    is at most a few times the block, else a sort."""
    if product <= 4 * len(key):
        present = np.bincount(key, minlength=product) > 0
        position = np.cumsum(present) - 1
        return np.flatnonzero(present), position[key]
    uniq, inverse = np.unique(key, return_inverse=True)
    return uniq, inverse.ravel()


def _extremes(inverse: np.ndarray, d: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per group, the smallest and largest of ``d``."""
    low, high = np.full(size, np.inf), np.full(size, -np.inf)
    np.minimum.at(low, inverse, d)
    np.maximum.at(high, inverse, d)
    return low, high


def _fit_chunk(p, *blocks, plan, strides, product, weighted):
    p = int(np.asarray(p).ravel()[0])
    ncols = len(plan.columns)
    codes = _codes_of(plan, blocks[:ncols], p)
    n = len(codes[0])
    key = _key(codes, strides)
    keys, inverse = _group(key, product)
    part = {"n": n, "keys": keys, "count": np.bincount(inverse, minlength=len(keys)).astype(np.float64)}
    if weighted:
        d = _design(blocks[ncols], n, p)
        part["d"] = np.bincount(inverse, d, minlength=len(keys))
        part["d2"] = np.bincount(inverse, d * d, minlength=len(keys))
        part["dmin"], part["dmax"] = _extremes(inverse, d, len(keys))
    return _wrap(part)


def _fit_combine(parts: list[dict]) -> dict:
    keys, inverse = np.unique(np.concatenate([q["keys"] for q in parts]), return_inverse=True)
    inverse = inverse.ravel()
    out: dict = {"n": sum(q["n"] for q in parts), "keys": keys}
    for name in ("count", "d", "d2"):
        if name in parts[0]:
            out[name] = np.bincount(inverse, np.concatenate([q[name] for q in parts]), minlength=len(keys))
    if "dmin" in parts[0]:
        low, _ = _extremes(inverse, np.concatenate([q["dmin"] for q in parts]), len(keys))
        _, high = _extremes(inverse, np.concatenate([q["dmax"] for q in parts]), len(keys))
        out["dmin"], out["dmax"] = low, high
    return out


def cell_statistics(plan, columns: list[da.Array], design: da.Array | None, strides: list[int],
                    product: int) -> dict:
    """One pass: the occupied cells' keys (sorted) and per cell the count, and with design weights
    the sums of d and d^2 and the extreme d; ``n``, the samples."""
    args = [_partition_ids(columns[0]), "i"]
    for c in columns + ([design] if design is not None else []):
        args += [c, "i"]
    objs = da.blockwise(_fit_chunk, "i", *args, dtype=object, align_arrays=False, concatenate=True,
                        plan=plan, strides=strides, product=product, weighted=design is not None,
                        meta=np.empty(0, dtype=object))
    objs = objs.map_blocks(lambda b: b, chunks=((1,) * objs.numblocks[0],), dtype=object,
                           meta=np.empty(0, dtype=object))
    (out,) = dask.compute(_tree(objs, _fit_combine))
    return out


# -- a mean: per-cell moments of the values -------------------------------------------------------


def _locate(plan, blocks, strides, keys, p) -> tuple[np.ndarray, np.ndarray]:
    """(the partition's distinct cells as positions in the sorted ``keys``, each sample's index
    among them): through a lookup table when the key space is at most a few times the block, else by
    sorting the block's keys and searching only the distinct ones (sorted queries: a random search
    per sample into millions of keys costs several times more)."""
    key = _key(_codes_of(plan, blocks, p), strides)
    product = int(strides[0]) * len(plan.levels[0])
    if not len(key):
        return key, key
    if product <= 4 * len(key):
        position = np.full(product, -1, dtype=np.int64)
        position[keys] = np.arange(len(keys))
        where = position[key]
        if where.min() < 0:
            raise ValueError(check.in_partition(check.dask_data_changed(), p))
        return _group(where, len(keys))
    distinct, local = np.unique(key, return_inverse=True)
    cells = np.minimum(np.searchsorted(keys, distinct), len(keys) - 1)
    if not np.array_equal(keys[cells], distinct):
        raise ValueError(check.in_partition(check.dask_data_changed(), p))
    return cells, local.ravel()


def _mean_chunk(p, *blocks, keys, plan, strides, ncols, weighted):
    p = int(np.asarray(p).ravel()[0])
    keys = np.asarray(keys)
    cells, local = _locate(plan, blocks[:ncols], strides, keys, p)  # only the partition's own cells
    h = blocks[ncols]
    try:
        h = check.sample_values(np.asarray(h))
    except (ValueError, TypeError) as error:
        raise type(error)(check.in_partition(str(error), p)) from None
    h = h[:, None] if h.ndim == 1 else h
    if len(h) != len(local):
        raise ValueError(check.in_partition(check.dask_values_length(len(h), len(local)), p))
    d = _design(blocks[ncols + 1], len(h), p) if weighted else None
    # Each column divided by a power of two near its largest |h| (exact): squares of values near
    # 1e200 would overflow. The partials carry their exponent; the merge rescales them to the largest.
    top, exponent = _exponents(h)
    part = _cell_moments(local, np.ldexp(h, -exponent), d, len(cells))
    part["cells"], part["top"], part["exponent"] = cells, top, exponent
    return _wrap(part)


def _mean_combine(parts: list[dict]) -> dict:
    """Chan's merge of the per-cell moments: M2 = sum M2_b + sum w2_b (m_b - m)^2, after bringing
    every partial to the largest exponent (``sum d h`` of partial b is ``dh_b * 2^exponent_b``)."""
    exponent = np.max([q["exponent"] for q in parts], axis=0)
    parts = [_rescaled(q, exponent) for q in parts]
    cells, inverse = np.unique(np.concatenate([q["cells"] for q in parts]), return_inverse=True)
    inverse = inverse.ravel()
    size = len(cells)

    def summed(name):
        stacked = np.concatenate([q[name] for q in parts], axis=-1)
        if stacked.ndim == 1:
            return np.bincount(inverse, stacked, minlength=size)
        return np.stack([np.bincount(inverse, row, minlength=size) for row in stacked])

    w2, d2h, m2 = summed("w2"), summed("d2h"), summed("m2")
    mean = np.divide(d2h, w2, out=np.zeros_like(d2h), where=w2 > 0)
    part_w2 = np.concatenate([q["w2"] for q in parts])
    part_d2h = np.concatenate([q["d2h"] for q in parts], axis=-1)
    part_mean = np.divide(part_d2h, part_w2, out=np.zeros_like(part_d2h), where=part_w2 > 0)
    spread = part_w2 * (part_mean - mean[:, inverse]) ** 2
    m2 += np.stack([np.bincount(inverse, row, minlength=size) for row in spread])
    return {"cells": cells, "w2": w2, "dh": summed("dh"), "d2h": d2h, "m2": m2,
            "top": np.max([q["top"] for q in parts], axis=0), "exponent": exponent}


def _rescaled(part: dict, exponent: np.ndarray) -> dict:
    if np.array_equal(part["exponent"], exponent):
        return part
    shift = np.maximum(part["exponent"] - exponent, -2000)[:, None]  # <= 0; far below: underflows to 0
    return dict(part, dh=np.ldexp(part["dh"], shift), d2h=np.ldexp(part["d2h"], shift),
                m2=np.ldexp(part["m2"], 2 * shift), exponent=exponent)


def value_statistics(plan, columns: list[da.Array], design: da.Array | None, values: da.Array, strides: list[int],
                     keys: np.ndarray) -> dict:
    """One pass over the fitted data and ``values`` (n, s): per cell (in the order of ``keys``) the
    sums of d^2, and per statistic the sums of d h, d^2 h and M2; ``top``, max |h| per statistic."""
    args = [_partition_ids(columns[0]), "i"]
    for c in columns:
        args += [c, "i"]
    args += [values, "ij" if values.ndim == 2 else "i"]
    if design is not None:
        args += [design, "i"]
    args += [shared(keys), "k"]
    objs = da.blockwise(_mean_chunk_positional, "i", *args, dtype=object, align_arrays=False, concatenate=True,
                        plan=plan, strides=strides, ncols=len(columns), weighted=design is not None,
                        meta=np.empty(0, dtype=object))
    objs = objs.map_blocks(lambda b: b, chunks=((1,) * objs.numblocks[0],), dtype=object,
                           meta=np.empty(0, dtype=object))
    (out,) = dask.compute(_tree(objs, _mean_combine))
    dense = {"top": out["top"], "exponent": out["exponent"], "w2": np.zeros(len(keys))}
    dense["w2"][out["cells"]] = out["w2"]
    for name in ("dh", "d2h", "m2"):
        dense[name] = np.zeros((out[name].shape[0], len(keys)))
        dense[name][:, out["cells"]] = out[name]
    return dense


def _mean_chunk_positional(p, *blocks, plan, strides, ncols, weighted):
    """``_mean_chunk`` with the cells' keys as the last positional block."""
    return _mean_chunk(p, *blocks[:-1], keys=blocks[-1], plan=plan, strides=strides, ncols=ncols,
                       weighted=weighted)


# -- the weights, lazily ---------------------------------------------------------------------------


def _weights_chunk(p, *blocks, plan, strides, ncols, weighted):
    p = int(np.asarray(p).ravel()[0])
    keys, factor = blocks[-2], blocks[-1]
    cells, local = _locate(plan, blocks[:ncols], strides, np.asarray(keys), p)
    w = np.asarray(factor)[cells][local]
    if weighted:
        w = w * _design(blocks[ncols], len(w), p)
    return w


def lazy_weights(plan, columns: list[da.Array], design: da.Array | None, strides: list[int], keys: np.ndarray,
                 factor: np.ndarray) -> da.Array:
    """Each sample's weight ``factor[its cell] * d``, a Dask array with the data's partitions."""
    args = [_partition_ids(columns[0]), "i"]
    for c in columns + ([design] if design is not None else []):
        args += [c, "i"]
    args += [shared(keys), "k", shared(factor), "l"]
    return da.blockwise(_weights_chunk, "i", *args, dtype=np.float64, align_arrays=False, concatenate=True,
                        adjust_chunks={"i": tuple(columns[0].chunks[0])}, plan=plan, strides=strides,
                        ncols=len(columns), weighted=design is not None, meta=np.empty(0, dtype=np.float64))
