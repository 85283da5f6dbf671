"""Dask fits whose samples are their own cells: when the margins' columns have more combinations
than a cell table could hold, the cell table is never built.

Everything is then a small vector per margin level on the client plus passes over the samples on
the workers, each pass one map over the partitions (encoding the labels, gathering the small
vectors at every sample's categories, ``np.bincount`` per level) merged by Dask's tree reduction
(:func:`._dask._tree`). Sample i's weight is ``d_i prod_j F_j[x_ij]``. When the encoded codes fit a
share of the workers' memory they are encoded once and persisted (:func:`cached`; under
``distributed``, when they do not, in files on the workers' disks: :class:`Spilled`): later passes
read them instead of the columns; under ``distributed`` a pass over them is then submitted as
futures, a task per worker thread over the groups that worker holds (:func:`_submitted`), not
built as a graph.
With numba, a fit's pass is one compiled loop per partition (:func:`_weight_pass`), and so is
each pass of a ``mean`` (:func:`_first_pass`, :func:`_step_pass`,
:func:`_terms_pass`: per sample the scalings gathered, the chain's steps and the sums, with the
NumPy passes' operations in their order). With the codes cached, a ``mean``'s values are also read
once and kept for its passes when they fit the same budget (:func:`cached_values`).

- Fit: :class:`SamplesKernel` is the loop's cell kernel (:mod:`._ipf`, through
  :func:`.balance.balance_cells`) with one pass per half-step (every margin's sums of the current
  weights at once), so the steps, status, errors and trace are those of the in-memory loop. A
  first pass encodes and checks every label and gives the input's margin sums.
- Finite-k standard error: the backfitting form of :func:`._joint.step_linearization` with the
  samples as cells. There ``D`` (one number per cell and statistic) is updated in place, step
  after step; here it cannot be kept (one number per sample). Margin m(j)'s sums of
  ``D_j = q_k h~ - sum_(l > j) q_l mu_l[m(l)]`` are instead margin m(j)'s sums of q_k h~ (one pass
  of the ``mean``) minus the two-way tables of margins m(j) and m(l) under iterate l applied to
  ``mu_l``: the fit's pass after step l gathers those tables (balanced linearisation; the survey
  one's iterates are all the starting measure, whose pairwise tables the ``mean``'s first pass
  gathers), and the recursion runs on the client (:func:`_mus_in_memory`). When the tables would be
  too large (``TABLES_MAX``), one pass per step j = k, ..., 1 sums ``D_j`` recomputed at every
  sample from the iterates' factors and the known ``mu_l`` (:class:`StepSums`).
- Converged standard error: the additive least-squares fit of :func:`._joint.additive_fit`, from
  its normal equations (the pairwise two-way tables of the margins under the measure and the
  per-level sums of h, one pass), solved in memory.
- Then one pass for the sums of z and z^2 (z as in :meth:`.estimators.BalancedEstimator._from_moments`),
  merged by Chan's formula.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
import weakref
from dataclasses import dataclass, field, replace
from functools import cache, cached_property
from typing import Any

import dask
import dask.array as da
import numpy as np

from . import _dask
from . import _validation as check
from ._joint import _ratio
from ._kernels import State
from ._kernels.cells import CellKernel, factor_product
from ._kernels.chunked import active_client, pinned_results
from ._kernels.dense import ratio


@dataclass(frozen=True)
class Samples:
    """The fitted data: the plan, the (lazy) columns and design weights, each margin's shape."""

    plan: Any
    columns: list
    design: Any
    shapes: list[tuple[int, ...]]
    #: The margin codes, encoded once and persisted (one object per group of consecutive
    #: partitions: a list of arrays of the smallest unsigned dtype), or None: every pass encodes
    #: the columns.
    encoded: Any = None
    #: The groups of ``encoded``: per group, its partitions' (index, length) in order.
    groups: tuple = ()
    #: Whether each group of ``encoded`` also holds its samples' design weights (float64, checked),
    #: after the codes: the passes then read neither the columns nor the design weights.
    design_cached: bool = False
    #: Under ``distributed``: the worker holding each group of ``encoded`` (by key), asked once
    #: (a pass's tasks are only loosely pinned: a worker that left is passed over).
    homes: dict = field(default_factory=dict, compare=False, repr=False)
    #: Under ``distributed``: each group's future (in the groups' order), its codes computed and held
    #: on a worker of its own (:func:`placed`).
    held: tuple = ()
    #: Whether the groups of ``encoded`` are kept in files on the workers' disks (:class:`Spilled`).
    spilled: bool = False

    @property
    def sizes(self) -> list[int]:
        return [int(np.prod(s)) for s in self.shapes]

    @cached_property
    def plan_literal(self) -> Any:
        """The plan as one literal of every pass's graph (its category lists are long: as a
        plain argument Dask would walk them for every pass)."""
        return dask.delayed(self.plan, pure=True)


# -- one pass ------------------------------------------------------------------------------------


def _margin_codes(plan, blocks, p: int, validate: bool, dtype=np.intp) -> list[np.ndarray]:
    """Every margin's flat category of the partition's samples (a joint margin's in C order), in
    ``dtype`` where the margin's columns are integer codes (the cache's compact dtype, which holds
    every margin's categories: no int64 temporaries), else as ``np.int64``.

    The first pass of a fit (``validate``) checks every label and combination; later passes look
    labels up again and check only that integer codes are in range (an out-of-range one gets the
    first pass's error): the data must not change between the passes of a fit and its means."""
    if validate or all(plan.mapped):
        codes = _dask._codes_of(plan, blocks, p, dtype)
    else:
        raw = [np.asarray(b) for b in blocks]
        if any(not plan.mapped[i] and r.size and (r.dtype.kind not in "iu" or r.min() < 0 or
                                                  r.max() >= len(plan.levels[i])) for i, r in enumerate(raw)):
            codes = _dask._codes_of(plan, blocks, p, dtype)  # the data changed since the first pass: its error
        else:
            codes = [plan.column_codes(i, r) if plan.mapped[i] else r.astype(dtype, copy=False)
                     for i, r in enumerate(raw)]
    if validate:
        try:
            plan.check_listed(codes)
        except (ValueError, TypeError) as error:
            raise type(error)(check.in_partition(str(error), p)) from None
    out = []
    for m in plan.margins:
        key = codes[m.index[0]]
        for i in m.index[1:]:  # C order (as np.ravel_multi_index, without its bounds checks)
            key = key * len(plan.levels[i])
            key += codes[i]
        out.append(key)
    return out


def _partition(p, *blocks, plan, ncols, weighted, with_values, task, validate, groups=None, into=None):
    """One task of a pass: partition ``p``'s samples, or with ``groups`` (the cached codes) group
    ``p``'s (its partitions' design weights and values checked one partition at a time, so that
    an error names the partition). ``weighted``: design weights in the blocks after the columns
    (True), none (False), or held in the cached group after its codes (``"cached"``). ``into``: an
    earlier result the task adds this one's sums to, in place (tasks that ``accumulate``)."""
    p = int(np.asarray(p).ravel()[0])
    cached_d = None
    if groups is not None:  # the cached codes (checked by the fit's first pass), as NumPy indexes unless compact
        parts = groups[p]
        group = unspilled(blocks[0][0])
        K = len(group) - 1 if weighted == "cached" else len(group)
        codes = [c if getattr(task, "takes_compact", False) else c.astype(np.intp) for c in group[:K]]
        cached_d = group[K] if weighted == "cached" else None
    else:
        codes = _margin_codes(plan, blocks[:ncols], p, validate)
        parts = ((p, len(codes[0])),)
    n = len(codes[0])
    p = parts[0][0]  # the partition an error names (a group's: its own partition, checked below)
    bounds = np.cumsum([0] + [length for _, length in parts])
    d = cached_d
    if weighted and cached_d is None:
        d = blocks[ncols] if len(parts) > 1 else _dask._design(blocks[ncols], n, p)
        if len(parts) > 1:
            d = np.concatenate([_dask._design(d[a:b], b - a, q) for (q, _), a, b in
                                zip(parts, bounds[:-1], bounds[1:], strict=True)])
    h = None
    if with_values:
        h = blocks[-1]
        spilled = isinstance(h, np.ndarray) and h.shape == (1,) and isinstance(h[0], (Spilled, SpilledArrays))
        h = unspilled(h[0])[0] if spilled else np.asarray(h)
        for (q, _), a, b in zip(parts, bounds[:-1], bounds[1:], strict=True):
            part = h if len(parts) == 1 else h[a:b]
            try:
                check.sample_values(part)
            except (ValueError, TypeError) as error:
                raise type(error)(check.in_partition(str(error), q)) from None
        h = check.sample_values(h)
        h = h[:, None] if h.ndim == 1 else h
        if len(h) != n:
            raise ValueError(check.in_partition(check.dask_values_length(len(h), n), p))
    out = task(codes, d, h) if into is None else task(codes, d, h, into)
    out["n"], out["lengths"] = n, dict(parts)
    return _dask._wrap(out)


def _merge(key: str, values: list) -> Any:
    if key == "lengths":
        return {k: v for part in values for k, v in part.items()}
    if key.startswith("min"):
        return np.minimum.reduce(values)
    if key.startswith("max"):
        return np.maximum.reduce(values)
    if key.startswith("moments"):
        return _chan(values)
    if isinstance(values[0], list):
        return [_added(parts) for parts in zip(*values, strict=True)]
    return _added(values)


def _added(parts) -> Any:
    """The sum of partial sums (arrays added in place into a copy of the first: a node of the tree
    merges tables of millions of entries, one temporary each with ``sum``)."""
    first = parts[0]
    if not isinstance(first, np.ndarray) or first.ndim == 0:
        return sum(parts)
    out = first.astype(np.result_type(*parts), copy=True)
    for part in parts[1:]:
        out += part
    return out


def _chan(parts: list[tuple]) -> tuple:
    """Chan's merge of (count, sum, sum of squares around the mean) per column."""
    count, total, m2 = parts[0]
    for c, s, q in parts[1:]:
        if c == 0:
            continue
        if count == 0:
            count, total, m2 = c, s, q
            continue
        delta = s / c - total / count
        m2 = m2 + q + delta**2 * (count * c / (count + c))
        count, total = count + c, total + s
    return count, total, m2


def _combine(parts: list[dict]) -> dict:
    return {key: _merge(key, [q[key] for q in parts]) for key in parts[0]}


@dataclass(frozen=True)
class HeldValues:
    """A ``mean``'s values held on the workers in the cached codes' groups (:func:`cached_values`):
    the Dask array, and per group the future of its block (for passes submitted as futures)."""

    array: da.Array
    futures: list


def run(samples: Samples, task, values: da.Array | HeldValues | None = None, validate: bool = False) -> dict:
    """One pass: ``task(codes per margin, d or None, h (n, s) or None)`` -> dict per partition,
    merged (sums; ``min*``/``max*`` keys by extremes, ``moments*`` by Chan's formula), plus ``n``
    and ``lengths`` (each partition's samples). Under ``distributed`` with the codes (and the design
    weights and values it reads) held on the workers, the pass is submitted as futures
    (:func:`_submitted`); else one graph (a blockwise map and Dask's tree reduction)."""
    client = active_client()
    if (client is not None and samples.encoded is not None and (samples.design is None or samples.design_cached)
            and (values is None or isinstance(values, HeldValues))):
        return _submitted(client, samples, task, values)
    if isinstance(values, HeldValues):
        values = values.array
    design = None if samples.design_cached else samples.design
    regroup = samples.encoded is not None and any(len(g) > 1 for g in samples.groups)
    if regroup and values is not None and np.isnan(values.chunks[0]).any():
        samples, regroup = replace(samples, encoded=None, groups=(), design_cached=False), False  # the columns
        design = samples.design
    if samples.encoded is None:
        args: list = [_dask._partition_ids(samples.columns[0]), "i"]
        columns = samples.columns
        groups = None
    else:
        columns, groups = [samples.encoded], samples.groups
        args = [da.arange(len(groups), chunks=1), "i"]
        if regroup:
            sizes = {0: tuple(sum(length for _, length in g) for g in groups)}
            design = None if design is None else design.rechunk(sizes)
            values = None if values is None else values.rechunk(sizes)
    for c in columns:
        args += [c, "i"]
    if design is not None:
        args += [design, "i"]
    if values is not None:
        args += [values, "ij" if values.ndim == 2 else "i"]
    weighted = "cached" if samples.design_cached and groups is not None else design is not None
    objs = da.blockwise(_partition, "i", *args, dtype=object, align_arrays=False, concatenate=True,
                        plan=samples.plan_literal, ncols=len(columns), weighted=weighted,
                        with_values=values is not None, task=dask.delayed(task, pure=True), validate=validate,
                        groups=None if groups is None else dask.delayed(groups, pure=True),
                        meta=np.empty(0, dtype=object))
    objs = objs.map_blocks(lambda b: b, chunks=((1,) * objs.numblocks[0],), dtype=object,
                           meta=np.empty(0, dtype=object))
    (out,) = dask.compute(_dask._tree(objs, _combine))
    return out


def _groups_pass(gs, *held, task, groups, weighted, with_values):
    """A submitted pass's task: the partial sums of groups ``gs`` (``held``: their codes, then with
    values their values, in order; :func:`_partition` on each), added group after group (one
    group's samples and one partial result in memory at a time)."""
    total = None
    for i, g in enumerate(gs):
        values = (held[len(gs) + i],) if with_values else ()
        into = total if getattr(task, "accumulates", False) else None  # its sums and tables added to in place
        part = _partition(g, held[i], *values, plan=None, ncols=1, weighted=weighted, with_values=with_values,
                          task=task, validate=False, groups=groups, into=into)[0]
        if into is not None:
            part["n"], part["lengths"] = into["n"] + part["n"], {**into["lengths"], **part["lengths"]}
            total = part
        else:
            total = part if total is None else _combine([total, part])
    return total


def _submitted(client, samples: Samples, task, values: HeldValues | None) -> dict:
    """One pass over codes held on the workers, as futures: per worker thread one task over groups
    that worker holds (no graph built, tokenized and sent per pass), its groups' partial sums added
    there as it goes, the tasks' results added on the client (a tree between the workers would
    move tables of millions of entries from one to another first). A task is pinned to its worker
    (Dask counts a group on disk as a few bytes: free to move, its work could be stolen and the
    group sent, as its arrays, to a worker's memory); a worker that leaves before the results
    arrive cancels the pass, which runs again where the groups now are (:func:`._kernels.chunked.pinned_results`)."""
    held = {f.key: f for f in samples.held}
    keys = [f.key for f in samples.held]
    if not keys:  # not persisted as futures (cannot happen): the graph
        return run(replace(samples, encoded=None, groups=(), design_cached=False), task,
                   None if values is None else values.array)
    weighted = "cached" if samples.design_cached else False
    while True:
        info = client.scheduler_info().get("workers", {})
        where = _homes(client, samples, info)
        by_worker: dict = {}
        for g, key in enumerate(keys):  # a worker holding the group (none: the scheduler chooses)
            by_worker.setdefault(next((w for w in where.get(key, ()) if w in info), None), []).append(g)
        futures = []
        for worker, gs in by_worker.items():
            threads = len(gs) if worker is None else max(1, int(info.get(worker, {}).get("nthreads", 1)))
            for chain in (gs[t::threads] for t in range(min(threads, len(gs)))):
                args = [held[keys[g]] for g in chain] + ([] if values is None else [values.futures[g] for g in chain])
                futures.append(client.submit(_groups_pass, chain, *args, task=task, groups=samples.groups,
                                             weighted=weighted, with_values=values is not None, pure=False,
                                             workers=None if worker is None else [worker], allow_other_workers=False,
                                             key=f"databalance-pass-{uuid.uuid4().hex}"))
        got = pinned_results(client, futures, {w for w in by_worker if w is not None}, futures)
        if got is not None:
            return _combine(got)
        samples.homes.clear()  # a worker left during the pass: ask where the groups are now


def _homes(client, samples: Samples, info: dict) -> dict:
    """Where each held group is (by key), asked again when not asked yet or a worker holding one
    left, and for groups on disk before every pass (a worker restarted at its old address, with a
    fixed port, no longer holds its groups: a task pinned there would fetch them, remade elsewhere,
    into its memory), waiting for groups on disk being made again. Kept in ``samples.homes`` when
    every group is made (else asked again at the next pass)."""
    keys = [f.key for f in samples.held]
    where = samples.homes
    if samples.spilled or any(k not in where or not set(where[k]) <= set(info) for k in keys):
        if samples.spilled:
            from distributed import wait

            wait(list(samples.held))
        where = {k: list(w) for k, w in client.who_has(list(samples.held)).items()}
        samples.homes.clear()
        if all(where.get(k) for k in keys):
            samples.homes.update(where)
    return where


# -- the cache of encoded codes -----------------------------------------------------------------------

#: The share of the memory of the workers (the sum of their memory limits; without ``distributed``,
#: or without limits, this machine's available memory) that a fit's encoded codes may take: within
#: it they are encoded once and kept (persisted) for the fit's and its means' later passes, which
#: then neither load (or generate) nor encode the columns again. 0 turns the cache off (on the
#: workers' disks too, :data:`DISK_FRACTION`).
CACHE_FRACTION = 0.25


#: When the encoded codes do not fit :data:`CACHE_FRACTION` of the workers' memory (under
#: ``distributed``): the share of the free space of the workers' local directories (the smallest,
#: as if they shared one disk) that they may take there instead, written once by the workers that
#: encode them and read back by every later pass (:class:`Spilled`); the same for a ``mean``'s
#: values. 0 turns this off: every pass then loads (or generates) and encodes the columns again.
DISK_FRACTION = 0.5


class Spilled:
    """Arrays kept in a file of the worker that made them (its local directory) instead of its
    memory; every pass maps them back (:meth:`load`). The file goes with the object (its key
    released, or the worker closed). Pickled (sent to another worker, or spilled by Dask), it
    becomes its arrays."""

    def __init__(self, arrays: list, directory: str):
        """``arrays``: each an array, or a list of pieces (of one dtype) written one after the other
        as one array (a group's partitions: never joined in memory)."""
        path = os.path.join(directory, f"databalance-{uuid.uuid4().hex}.npy-group")
        self.layout: list[tuple[str, tuple, int]] = []  # per array: dtype, shape, offset (aligned to 64 bytes)
        try:
            with open(path, "wb") as file:
                for a in arrays:
                    pieces = [np.asarray(piece) for piece in a] if isinstance(a, list) else [np.asarray(a)]
                    file.write(b"\0" * (-file.tell() % 64))
                    shape = (sum(len(piece) for piece in pieces),) + pieces[0].shape[1:]
                    self.layout.append((pieces[0].dtype.str, shape, file.tell()))
                    for piece in pieces:  # (not ``tofile``: it can lose a failed flush's error)
                        file.write(np.ascontiguousarray(piece, pieces[0].dtype).data)
                expected = file.tell()
            if os.path.getsize(path) != expected:  # a write the system did not report as failed
                raise OSError(f"{os.path.getsize(path)} of {expected} bytes written")
        except OSError as error:
            _remove(path)
            raise OSError(check.spill_failed(path, error)) from error
        self.path = path
        weakref.finalize(self, _remove, path)

    def load(self) -> list[np.ndarray]:
        """The arrays, read-only, mapped from the file (its pages, in the system's file cache, are
        read in place: no copy into the worker's memory)."""
        return [np.memmap(self.path, dtype=np.dtype(kind), mode="r", offset=offset, shape=shape).view(np.ndarray)
                if int(np.prod(shape)) else np.empty(shape, np.dtype(kind)) for kind, shape, offset in self.layout]

    def __reduce__(self):
        return SpilledArrays, (self.load(),)


class SpilledArrays(list):
    """A :class:`Spilled` group's arrays, as it arrives pickled (in memory: moved, or spilled by Dask)."""


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def unspilled(group):
    """A cached group's arrays (read back when :class:`Spilled`)."""
    return group.load() if isinstance(group, Spilled) else group


def _spill(block) -> np.ndarray:
    """A cached group (its partitions' codes and design weights, as :func:`_joined` would join
    them, written piece by piece) or a block of values, written to this worker's local directory."""
    from distributed import get_worker

    arrays: list
    if block.dtype == object:
        parts = list(np.ravel(block))
        arrays = [[part[j] for part in parts] for j in range(len(parts[0]))]
    else:
        arrays = [np.asarray(block)]
    return _dask._wrap(Spilled(arrays, get_worker().local_directory))


def _free_bytes(dask_worker) -> int:
    return shutil.disk_usage(dask_worker.local_directory).free


def disk_budget() -> float:
    """Bytes the encoded codes (or a ``mean``'s values) may take on the workers' disks:
    :data:`DISK_FRACTION` of the smallest free space of their local directories; 0 without a
    ``distributed`` client (the local schedulers keep nothing on disk)."""
    client = active_client()
    if client is None or DISK_FRACTION <= 0:
        return 0.0
    free = client.run(_free_bytes)
    return DISK_FRACTION * float(min(free.values())) if free else 0.0


def _on_disk(objs: da.Array, chunks: tuple) -> da.Array:
    """Each block of ``objs`` (a cached group, or values) written to disk where it is computed."""
    return da.map_blocks(_spill, objs, chunks=chunks, drop_axis=list(range(1, objs.ndim)), dtype=object,
                         meta=np.empty(0, dtype=object))


def code_dtype(sizes: list[int]) -> np.dtype:
    """The smallest unsigned integer dtype holding every margin's flat category."""
    largest = max(sizes) - 1
    for dtype in (np.uint8, np.uint16, np.uint32):
        if largest <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def cache_budget() -> float:
    """Bytes the encoded codes may take: :data:`CACHE_FRACTION` of the workers' memory (of this
    machine's available memory under the local schedulers, or when the workers have no limit)."""
    from ._kernels.fused_sparse import available_memory

    memory = available_memory()
    client = active_client()
    if client is not None:
        limits = [w.get("memory_limit") or 0 for w in client.scheduler_info().get("workers", {}).values()]
        if limits and all(limit > 0 for limit in limits):
            memory = float(sum(limits))
    return CACHE_FRACTION * memory


#: A group of the cached codes holds at most this many samples (and there are at least as many
#: groups as the scheduler has threads): a pass's cost per task (its tables, above all: up to
#: millions of entries, built, sent and added per task) is paid per group, not per partition.
GROUP_MAX = 1 << 23


def threads_available() -> int:
    """Threads that run a pass's tasks: the workers' under an active ``distributed`` client, else
    this machine's cores."""
    client = active_client()
    if client is not None:
        total = sum(int(w.get("nthreads", 1)) for w in client.scheduler_info().get("workers", {}).values())
        if total > 0:
            return total
    return os.cpu_count() or 1


def grouped(lengths: tuple[int, ...], threads: int) -> tuple:
    """Consecutive partitions in groups of about equal samples: a multiple of ``threads`` groups
    (fewer only with fewer partitions), of at most :data:`GROUP_MAX` samples each where partitions
    allow."""
    n = sum(lengths)
    count = max(threads, -(-n // GROUP_MAX))
    count = max(1, min(len(lengths), -(-count // threads) * threads))  # a multiple of the threads: balanced
    groups: list[list] = [[] for _ in range(count)]
    before = 0
    for p, length in enumerate(lengths):
        groups[min(count - 1, before * count // max(n, 1))].append((p, int(length)))
        before += length
    return tuple(tuple(g) for g in groups if g)


def _encode(g, *blocks, plan, ncols, code_type, validate, groups):
    """Group ``g``'s codes (each partition encoded, and checked, on its own: errors name it), then
    with a block after the columns its design weights (float64, checked per partition)."""
    parts = groups[int(np.asarray(g).ravel()[0])]
    bounds = np.cumsum([0] + [length for _, length in parts])
    pieces = [_margin_codes(plan, [np.asarray(b)[lo:hi] for b in blocks[:ncols]], p, validate, code_type)
              for (p, _), lo, hi in zip(parts, bounds[:-1], bounds[1:], strict=True)]
    out = [np.concatenate([piece[j] for piece in pieces]).astype(code_type, copy=False)
           for j in range(len(pieces[0]))]
    if len(blocks) > ncols:
        d = blocks[ncols]
        out.append(np.concatenate([np.zeros(0)] + [_dask._design(d[lo:hi], hi - lo, p) for (p, _), lo, hi in
                                                   zip(parts, bounds[:-1], bounds[1:], strict=True)]))
    return _dask._wrap(out)


def cached(samples: Samples, lengths: tuple[int, ...], validate: bool) -> Samples:
    """The samples with their encoded codes persisted (on the workers under ``distributed``), in
    groups of consecutive partitions (:func:`grouped`), when the codes fit :func:`cache_budget`;
    else the samples as they are (every pass then loads and encodes the columns). ``lengths``:
    each partition's samples. ``validate``: the encoding checks every label (the fit's first pass).
    The design weights are kept with the codes (read once too) when both fit."""
    dtype = code_dtype(samples.sizes)
    codes_bytes = sum(lengths) * len(samples.sizes) * dtype.itemsize
    if samples.encoded is not None:
        return samples
    if CACHE_FRACTION <= 0:  # the cache off, on disk too
        return samples
    budget = cache_budget()  # (asked once: under ``distributed`` a round trip to the scheduler)
    spill = codes_bytes > budget
    if spill:  # the workers' disks instead of their memory
        budget = disk_budget()
        if codes_bytes > budget:
            return samples
    with_design = samples.design is not None and codes_bytes + 8 * sum(lengths) <= budget
    # partitions of unknown lengths (a DataFrame's, or design weights') cannot be regrouped: one
    # group each (the passes then rechunk nothing)
    known = all(c.chunks[0] == tuple(lengths) for c in samples.columns) and (
        samples.design is None or samples.design.chunks[0] == tuple(lengths))
    single = tuple(((p, int(n)),) for p, n in enumerate(lengths))
    groups = grouped(lengths, threads_available()) if known else single
    # each partition encoded where it is loaded (only the compact codes move), then a group's joined
    args: list = [da.arange(len(single), chunks=1), "i"]
    for c in samples.columns + ([samples.design] if with_design else []):
        args += [c, "i"]
    # keys of this fit's own (a fit again on the same graph, after the data changed, must not find
    # an earlier fit's codes still held on the workers under the same keys)
    objs = da.blockwise(_encode, "i", *args, dtype=object, align_arrays=False, concatenate=True,
                        plan=samples.plan_literal, ncols=len(samples.columns), code_type=dtype, validate=validate,
                        groups=dask.delayed(single, pure=True), meta=np.empty(0, dtype=object),
                        name=f"databalance-codes-{uuid.uuid4().hex}")
    objs = objs.map_blocks(lambda b: b, chunks=((1,) * objs.numblocks[0],), dtype=object,
                           meta=np.empty(0, dtype=object))
    if groups != single:
        objs = objs.rechunk({0: tuple(len(g) for g in groups)})
    if spill:  # each group's partitions written one after the other
        objs = _on_disk(objs, ((1,) * len(groups),))
    elif groups != single:
        objs = objs.map_blocks(_joined, chunks=((1,) * len(groups),), dtype=object, meta=np.empty(0, dtype=object))
    encoded, held = placed(objs, spill)
    return replace(samples, encoded=encoded, groups=groups, design_cached=with_design, held=held, spilled=spill)


def placed(objs: da.Array, streamed: bool = False) -> tuple[da.Array, tuple]:
    """The groups persisted: under ``distributed`` group g on worker g modulo the workers (in
    proportion to their threads), every task of its graph (its partitions' loading, or generation,
    and encoding) restricted there, loosely (a worker that left is passed over), and its future;
    else in this process, and no futures. Left to the scheduler, the groups' joins could all land
    on one worker (they did, in the benchmark: its passes then ran on one core). ``streamed``
    (groups written to disk, which together do not fit the workers' memory): at most two groups
    per worker thread in the making at once, the next submitted as one is done (the scheduler
    would load every partition at once, and their codes wait in memory for their groups' joins:
    at 10^9 samples the workers ran out of memory); a group's error is raised then."""
    client = active_client()
    if client is None:
        return objs.persist(), ()
    from distributed import futures_of

    info = client.scheduler_info().get("workers", {})
    slots = [w for w in sorted(info) for _ in range(max(1, int(info[w].get("nthreads", 1))))]
    held = _persisted(client, objs, [[slots[g % len(slots)]] if slots else [] for g in range(objs.numblocks[0])],
                      streamed)
    futures = [futures_of(block) for block in held]
    if not all(len(f) == 1 for f in futures):  # cannot happen: the groups as one collection
        return objs.persist(), ()
    return da.concatenate(held), tuple(f[0] for f in futures)


def _persisted(client, objs: da.Array, workers: list[list], streamed: bool) -> list:
    """Block g of ``objs`` persisted on ``workers[g]`` (loosely; none: where the scheduler
    chooses), each block a collection of its own. ``streamed``: at most two blocks per thread of
    the target worker (of the cluster, for blocks without one) in the making at once, the next
    submitted as one is done, and a block's error raised then, every block persisted so far
    released first (the error's traceback, kept with the erred future, would hold them all: their
    files and futures would stay until the client closed)."""
    from distributed import futures_of, wait

    threads = {w: max(1, int(i.get("nthreads", 1))) for w, i in client.scheduler_info().get("workers", {}).items()}
    held: list = []
    making: dict = {}  # target worker (None: any) -> its blocks' futures not done yet
    try:
        for g in range(objs.numblocks[0]):
            target = workers[g][0] if workers[g] else None
            room = 2 * (threads.get(target, 1) if target is not None else max(1, sum(threads.values())))
            while streamed and len(making.get(target, ())) >= room:
                done = wait(sum(making.values(), []), return_when="FIRST_COMPLETED").done
                for future in done:
                    if future.status == "error":
                        future.result()  # the block's error (a label not listed: naming its partition)
                making = {w: [f for f in fs if f not in done] for w, fs in making.items()}
            block = objs.blocks[g]
            held.append(client.persist(block, workers=workers[g], allow_other_workers=True) if workers[g] else
                        client.persist(block))
            making.setdefault(target, []).extend(futures_of(held[-1]))
        if streamed:  # all made (the first pass then knows where each is, and pins its tasks there)
            for future in wait(sum(making.values(), [])).done:
                if future.status == "error":
                    future.result()
    except BaseException:
        for block in held:
            for future in futures_of(block):
                future.release()
        raise
    return held


def _joined(parts) -> np.ndarray:
    """A group's cached arrays: its partitions' (codes per margin, then design weights) joined."""
    parts = [part for part in np.ravel(parts)]
    return _dask._wrap([np.concatenate([part[j] for part in parts]) for j in range(len(parts[0]))])


def cached_values(samples: Samples, values: da.Array) -> da.Array | HeldValues:
    """A ``mean``'s values in the cached codes' groups, read (or generated) once and persisted for
    its passes, when the codes are cached and the values (with the codes, unless those are on
    disk) fit :func:`cache_budget`; else under ``distributed`` written to the workers' disks when
    they fit :func:`disk_budget` (:class:`Spilled`); else the values as they are (every pass then
    reads them). Under ``distributed`` each group's
    values are computed on a worker holding that group's codes (the passes' tasks then find both
    there, and the values come back as :class:`HeldValues`: the passes are submitted as futures).
    Released when the ``mean`` returns."""
    if samples.encoded is None or values.ndim not in (1, 2) or np.isnan(values.chunks[0]).any():
        return values
    sizes = tuple(sum(length for _, length in g) for g in samples.groups)
    n, s = sum(sizes), 1 if values.ndim == 1 else int(values.shape[1])
    per_code = len(samples.sizes) * code_dtype(samples.sizes).itemsize + 8 * samples.design_cached
    codes = 0 if samples.spilled else per_code  # bytes per sample in memory besides the values
    if n != values.shape[0]:
        return values
    client = active_client()
    spill = n * (codes + 8 * s) > cache_budget()
    submitted = client is not None and bool(samples.held) and (samples.design is None or samples.design_cached)
    if spill and (not submitted or n * 8 * s > disk_budget()):  # (on disk only for the submitted passes)
        return values
    rechunked = values.rechunk({0: sizes} if values.ndim == 1 else {0: sizes, 1: -1})
    if client is None:
        return rechunked.persist()
    from distributed import futures_of

    if not samples.held:
        return rechunked.persist()
    if spill:  # the futures hold files; the array stays the values' (for a pass as a graph)
        rechunked = _on_disk(rechunked, ((1,) * len(sizes),))
    keys = [f.key for f in samples.held]
    who = _homes(client, samples, client.scheduler_info().get("workers", {}))  # the codes' (asked again if stale)
    held = _persisted(client, rechunked, [list(who.get(key, ())) for key in keys], spill)
    futures = [futures_of(block) for block in held]
    if not all(len(f) == 1 for f in futures):  # cannot happen: one future a group
        return values if spill else da.concatenate(held)
    return HeldValues(values if spill else da.concatenate(held), [f[0] for f in futures])


# -- the fit -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightSums:
    """A pass of the fit: every margin's sums of ``u = d prod_j factors[j]`` (None: u = d), with
    sum u^2 and the extreme u. ``compiled``: in one numba loop over the samples (every margin's
    sums and the tables while a sample's weight is in a register; the codes in their cached
    compact dtype), else with NumPy (a gather per margin, a ``bincount`` per margin and table)."""

    factors: list[np.ndarray] | None
    sizes: list[int]
    pairs_of: int | None = None  # also the two-way tables of this margin with every other one
    compiled: bool = False
    #: With ``pairs_of``, the other margins whose tables are wanted (None: all; the others' come
    #: back empty): the finite-k recursion reads step l's tables only with the margins of steps
    #: before l.
    pairs_with: tuple[int, ...] | None = None

    @property
    def takes_compact(self) -> bool:
        """Whether the codes may come in their compact cached dtype (else as ``np.intp``)."""
        return self.compiled

    @property
    def accumulates(self) -> bool:
        """Whether a call may add to an earlier result's sums and tables in place (``into``): a
        worker's groups then share one set of tables (one table of 10^6 entries per task, not one
        allocated and added per group)."""
        return self.compiled

    def __call__(self, codes, d, h, into: dict | None = None) -> dict:
        if self.compiled:
            return self._compiled(codes, d, into)
        n = len(codes[0])
        u = factor_product(d, self.factors, codes, n) if self.factors is not None else (np.ones(n) if d is None else d)
        out = {"sums": [np.bincount(c, u, minlength=s) for c, s in zip(codes, self.sizes, strict=True)],
               "u2": float(u @ u), "min_u": u.min(initial=np.inf), "max_u": u.max(initial=-np.inf)}
        if self.pairs_of is not None:
            out["tables"] = _tables_of(self.pairs_of, codes, self.sizes, u, self.pairs_with)
        return out

    def _compiled(self, codes, d, into: dict | None = None) -> dict:
        K = len(self.sizes)
        dtype = np.result_type(*(c.dtype for c in codes))
        codes = _one_type(codes, dtype)  # one type: numba's homogeneous tuple
        factors = tuple(np.ones(s) for s in self.sizes) if self.factors is None else \
            tuple(np.ascontiguousarray(f, np.float64) for f in self.factors)
        a = -1 if self.pairs_of is None else self.pairs_of
        wanted = range(K) if self.pairs_with is None else self.pairs_with
        if into is None:
            sums = tuple(np.zeros(s) for s in self.sizes)
            tables = tuple(np.zeros(self.sizes[a] * self.sizes[b] if a >= 0 and b != a and b in wanted else 0)
                           for b in range(K))
        else:  # added to the earlier result's arrays (the samples' order: as one partition)
            sums = tuple(into["sums"])
            tables = tuple(into["tables"]) if a >= 0 else tuple(np.zeros(0) for _ in range(K))
        weights = np.empty(0) if d is None else np.ascontiguousarray(d, np.float64)
        u2, low, high = _compiled_pass()(codes, weights, d is not None, factors, self.factors is not None, sums, a,
                                         tables, np.asarray(self.sizes, np.int64))
        if into is not None:
            u2, low, high = into["u2"] + u2, min(into["min_u"], low), max(into["max_u"], high)
        out = {"sums": list(sums), "u2": u2, "min_u": low, "max_u": high}
        if a >= 0:
            out["tables"] = list(tables)
        return out


def _weight_pass(codes, d, weighted, factors, scaled, sums, a, tables, sizes):
    """Every margin's sums of ``u_i = d_i prod_j factors[j][codes[j][i]]`` (the product in
    :func:`factor_product`'s order; ``weighted`` False: no ``d``; ``scaled`` False: u = d), added
    in sample order as ``np.bincount`` adds them; with ``a >= 0`` margin a's two-way tables with
    every other margin b whose ``tables[b]`` is not empty (flat, a major), one table at a time
    over a block of :data:`TABLE_BLOCK` samples (a loop that only
    scatters into a table larger than the cache keeps more of its misses in flight). Returns
    (sum u^2, min u, max u)."""
    K = len(codes)
    n = codes[0].size
    if a < 0:
        return _weights(codes, d, weighted, factors, scaled, sums, 0, n, np.empty(0), False, 0.0, np.inf, -np.inf)
    u2, low, high = 0.0, np.inf, -np.inf
    u = np.empty(TABLE_BLOCK)  # a block's weights (a buffer of n samples would cost its page faults)
    for first in range(0, n, TABLE_BLOCK):
        last = min(n, first + TABLE_BLOCK)
        u2, low, high = _weights(codes, d, weighted, factors, scaled, sums, first, last, u, True, u2, low, high)
        ca = codes[a][first:last]
        for b in range(K):
            if b != a and tables[b].size > 0:
                _scatter_table(ca, codes[b][first:last], np.int64(sizes[b]), u, tables[b])
    return u2, low, high


def _weights(codes, d, weighted, factors, scaled, sums, first, last, u, keep, u2, low, high):
    """:func:`_weight_pass` over samples ``first, ..., last - 1`` (their weights in ``u`` with
    ``keep``), from the running sum of squares and extremes."""
    K = len(codes)
    for i in range(first, last):
        if scaled:
            w = factors[0][codes[0][i]]
            if weighted:
                w = d[i] * w
            for j in range(1, K):
                w *= factors[j][codes[j][i]]
        elif weighted:
            w = d[i]
        else:
            w = 1.0
        for j in range(K):
            sums[j][codes[j][i]] += w
        if keep:
            u[i - first] = w
        u2 += w * w
        low = min(low, w)
        high = max(high, w)
    return u2, low, high


#: Samples per block of :func:`_weight_pass`: their weights are kept for the tables' scatter loops.
TABLE_BLOCK = 16384


def _scatter_table(ca, cb, size, u, table):
    for i in range(ca.size):
        table[np.int64(ca[i]) * size + np.int64(cb[i])] += u[i]


@cache
def _compiled_pass():
    import numba

    # no fast-math: the products and the sums in NumPy's order and rounding; the pass calls the
    # compiled table scatter by its module name (bound here, once)
    # (py_func: two threads of a pass may run this at once on the first call; ``cache`` is no lock)
    for name in ("_scatter_table", "_weights"):
        function = globals()[name]
        globals()[name] = numba.njit(getattr(function, "py_func", function), cache=True, nogil=True)
    return numba.njit(_weight_pass, cache=True, nogil=True)


def compiled_passes() -> bool:
    """Whether the fit's passes run :func:`_weight_pass` compiled: numba installed and not refused by
    ``DATABALANCE_KERNEL=numpy`` (``numba`` without numba installed raises, as everywhere)."""
    from ._kernels import fused

    return fused.numba_wanted()


def _tables_of(a: int, codes: list[np.ndarray], sizes: list[int], v: np.ndarray,
               wanted: tuple[int, ...] | None = None) -> list[np.ndarray]:
    """Margin a's two-way tables (flat, a's level major) with every other margin (of ``wanted``,
    None: all), under v (an empty placeholder for a itself and the margins not wanted)."""
    out: list[np.ndarray] = []
    for b, (c, size) in enumerate(zip(codes, sizes, strict=True)):
        if b == a or (wanted is not None and b not in wanted):
            out.append(np.zeros(0))
            continue
        key = codes[a] * size
        key += c
        out.append(np.bincount(key, v, minlength=sizes[a] * size))
    return out


def pairs_size(sizes: list[int], margins: list[int] | None = None) -> int:
    """Entries of the two-way tables of ``margins`` (all, by default) with every other margin."""
    total = sum(sizes)
    return sum(sizes[a] * (total - sizes[a]) for a in (range(len(sizes)) if margins is None else margins))


class SamplesKernel(CellKernel):
    """The cell kernel of the loop (:class:`._kernels.cells.CellKernel`) with the samples as the
    cells, kept on the workers: the state has no frame, and every margin's sums are one pass."""

    def __init__(self, samples: Samples, first: dict, table: da.Array, tables: bool = False):
        self.samples = samples
        # With ``tables``, the pass after step l also gives the two-way tables of the margin it fixed
        # with every other margin, under iterate l: what the finite-k linearisation needs.
        self.tables = tables
        self.iterate_tables: dict[int, tuple[np.ndarray, list[np.ndarray]]] = {}
        self.table = table  # each sample's design weight (1 without), lazily: what ``cell_masses`` reports
        self.lowest = 0.0
        self.dtype = np.dtype(np.float64)
        self.shape = (int(first["n"]),)
        self.batch = ()
        self.margin_shapes = samples.shapes
        self.sizes = samples.sizes
        self._given = [s.reshape(sh) for s, sh in zip(first["sums"], samples.shapes, strict=True)]
        self._input_sums = self._given
        self.total = float(first["sums"][0].sum())
        self.passes = 0
        self.compiled = compiled_passes()
        self.last: tuple[list[np.ndarray], dict] | None = None  # the latest pass: its factors and sums

    def weight_sums(self, factors: list[np.ndarray] | None, pairs_of: int | None = None,
                    pairs_with: tuple[int, ...] | None = None) -> dict:
        self.passes += 1
        if pairs_with == ():  # no table wanted: the pass without them, and empty placeholders
            out = run(self.samples, WeightSums(None if factors is None else [np.ravel(f) for f in factors],
                                               self.sizes, None, self.compiled))
            out["tables"] = [np.zeros(0) for _ in self.sizes]
            return out
        return run(self.samples, WeightSums(None if factors is None else [np.ravel(f) for f in factors], self.sizes,
                                            pairs_of, self.compiled, pairs_with))

    def two_margin_support(self):
        """With two margins, the occupied cells as a sparse pattern (margin 0's levels by margin
        1's): the positive entries of their two-way table of the design weights, one pass (at most
        ``TABLES_MAX`` entries). None with more margins (their pairwise tables do not determine the
        cells: undecided, as for a large cell list in memory)."""
        import scipy.sparse as sp

        if len(self.sizes) != 2 or self.sizes[0] * self.sizes[1] > TABLES_MAX:
            return None
        table = self.weight_sums(None, pairs_of=0)["tables"][1].reshape(self.sizes)  # [0]: margin 0 itself
        return sp.csr_array(table > 0)

    def initial_state(self):
        scale = np.exp2(np.round(-np.log2(self.total) / len(self.sizes)))
        return State([np.full(s, scale) for s in self.margin_shapes])

    def sums(self, j, state):
        return self.sums_many([j], state)[j]

    def sums_many(self, js, state) -> dict[int, np.ndarray]:
        if state.steps == 0:  # equal starting scalings: the input's sums, scaled (exactly: powers of two)
            scale = float(state.factors[0].flat[0]) ** len(self.sizes)
            return {j: self._without_own(j, self._given[j] * scale, state) for j in js}
        # step l's tables are read (by :func:`_mus_in_memory`) only with the margins of steps 1..l-1
        wanted = tuple(sorted({(j - 1) % len(self.sizes) for j in range(1, state.steps)} - {state.fixed}))
        out = self.weight_sums(state.factors, state.fixed if self.tables else None, wanted if self.tables else None)
        self.last = ([f.copy() for f in state.factors], out)
        if self.tables:  # iterate l's (total 1) sums of the margin step l fixed, and its tables
            self.iterate_tables[state.steps] = (out["sums"][state.fixed], out.pop("tables"))
            held = sum(t.size for _, tables in self.iterate_tables.values() for t in tables)
            if held > TABLES_MAX:  # every step's tables together: more than the client should hold,
                self.tables, self.iterate_tables = False, {}  # so the mean takes one pass per step
        return {j: self._without_own(j, out["sums"][j].reshape(self.margin_shapes[j]), state) for j in js}

    def rescale(self, j, margin, sums, state):
        state.factors[j] = ratio(margin.target, sums, margin.zero)
        return sums

    def nonempty(self, j, masks=None):
        if masks is None:
            return self._given[j] > 0
        factors = [m.astype(np.float64) for m in masks]
        factors[j] = np.ones(self.margin_shapes[j])
        return self.weight_sums(factors)["sums"][j].reshape(self.margin_shapes[j]) > 0

    def current_masses(self, state):
        """Every sample's mass in the last iterate (of total 1 after the first half-step), lazily."""
        return lazy_weights(self.samples, [np.ravel(f) for f in state.factors], 1.0,
                            tuple(int(c) for c in self.table.chunks[0]))

    def support_size(self) -> int:
        return self.shape[0]


def latest_factors(trace: tuple, K: int, steps: int) -> list[list[np.ndarray]]:
    """Every margin's latest scaling (flattened) at iterates 0..steps, from the loop's trace (the
    starting scalings, then the one each half-step set)."""
    latest = [np.ravel(f) for f in trace[:K]]
    out = [list(latest)]
    for s in range(1, steps + 1):
        latest[(s - 1) % K] = np.ravel(trace[K + s - 1])
        out.append(list(latest))
    return out


def _weights_chunk(p, *blocks, plan, ncols, weighted, factors, scale):
    p = int(np.asarray(p).ravel()[0])
    codes = _margin_codes(plan, blocks[:ncols], p, False)
    n = len(codes[0])
    return factor_product(_dask._design(blocks[ncols], n, p) if weighted else None, factors, codes, n) * scale


def lazy_weights(samples: Samples, factors: list[np.ndarray], scale: float, lengths: tuple[int, ...]) -> da.Array:
    """Each sample's ``d prod_j factors[j] * scale``, a Dask array with the data's partitions (of
    ``lengths`` samples each)."""
    args: list = [_dask._partition_ids(samples.columns[0]), "i"]
    for c in samples.columns + ([samples.design] if samples.design is not None else []):
        args += [c, "i"]
    return da.blockwise(_weights_chunk, "i", *args, dtype=np.float64, align_arrays=False, concatenate=True,
                        adjust_chunks={"i": lengths}, plan=samples.plan_literal, ncols=len(samples.columns),
                        weighted=samples.design is not None, factors=dask.delayed(factors, pure=True),
                        scale=scale, meta=np.empty(0, dtype=np.float64))


def design_array(samples: Samples, lengths: tuple[int, ...]) -> da.Array:
    """Each sample's design weight (1 without), lazily, with known partition lengths."""
    return lazy_weights(samples, [np.ones(s) for s in samples.sizes], 1.0, lengths)


@dataclass(frozen=True)
class SamplesFit:
    """What a ``mean`` needs of a samples-path fit: per margin the final scalings (a sample's
    weight is ``d prod_j final[j] / total_u``), for the balanced linearisation at finite k every
    iterate's scalings, the normalised targets and the starting measure's margins."""

    samples: Samples
    n: int
    total: float  # sum of d (n without design weights)
    final: list[np.ndarray]
    total_u: float
    iterates: list[list[np.ndarray]]  # latest scalings at iterates 0..k (empty unless needed)
    targets: list[np.ndarray]  # flat, of total 1
    start_margins: list[np.ndarray]  # flat: margin sums of d / total
    steps: int | None  # None: linearised at the limit
    balanced: bool
    lengths: tuple[int, ...]
    # Balanced, finite k: per step l, iterate l's sums of margin m(l) and its two-way tables with
    # the other margins (empty when they would be too large: then one pass per step).
    iterate_tables: dict = field(default_factory=dict)

    @cached_property
    def shipped(self) -> SamplesFit:
        """What a pass's tasks carry: this fit without its tables (the client's alone) and without
        the data's Dask collections (inside a task's argument Dask would compute them whole, as
        its dependencies)."""
        return replace(self, iterate_tables={}, samples=Samples(None, [], None, self.samples.shapes))


# -- a mean ------------------------------------------------------------------------------------------


def _chain(codes, fit: SamplesFit, mus: dict[int, np.ndarray], lowest: int, n: int, s: int):
    """Per sample, (G_k (n,), sum_(l > lowest) G_l mu_l[its category in m(l)] (s, n)) with
    q_l = d G_l the iterate l's mass (balanced; G_l = 1 / total for the survey convention): the
    backfitting sum of :func:`._joint.step_linearization`, from the iterates' scalings. Iterate
    l - 1 is iterate l times the change of the one scaling step l set (rebuilt from all scalings
    where that scaling has zeros). One statistic at a time: (n, s) temporaries cost more."""
    K, k = len(codes), int(fit.steps or 0)
    acc = np.zeros((s, n))
    buf = np.empty(n)
    if not fit.balanced:
        for l_step, mu in mus.items():
            if l_step > lowest:
                for row, col in zip(acc, np.asarray(mu).T, strict=True):
                    row += np.take(col, codes[(l_step - 1) % K], out=buf, mode="clip")
        acc /= fit.total
        return np.full(n, 1.0 / fit.total), acc
    g = factor_product(None, fit.iterates[k], codes, n)
    top = g.copy()
    for l_step in range(k, lowest, -1):
        m = (l_step - 1) % K
        for row, col in zip(acc, np.ascontiguousarray(mus[l_step].T), strict=True):
            np.take(col, codes[m], out=buf, mode="clip")
            buf *= g
            row += buf
        if l_step - 1 > lowest:
            before, after = fit.iterates[l_step - 1][m], fit.iterates[l_step][m]
            if (after > 0).all():
                g *= np.take(before / after, codes[m], out=buf, mode="clip")
            else:
                g = factor_product(None, fit.iterates[l_step - 1], codes, n)
    return top, acc


@dataclass(frozen=True)
class FirstMoments:
    """The first pass of a ``mean``: sum w h (the estimate), sum d h, max |h|; and per ``mode``:

    - ``"limit"``: the normal equations' per-level sums of v h and v and the pairwise tables of v
      (v the measure: w balanced, d survey);
    - ``"tables"`` (finite k > 0, the recursion in memory): every margin's sums of q_k h and q_k,
      and for the survey convention (q_l = t) the pairwise tables of d;
    - ``"passes"`` (finite k > 0, one pass per step): margin m(k)'s sums of q_k h and q_k;
    - ``"none"`` (k = 0)."""

    fit: SamplesFit
    mode: str
    compiled: bool = False  # in one numba loop per partition (:func:`_first_pass`)

    @property
    def takes_compact(self) -> bool:
        return self.compiled

    def __call__(self, codes, d, h) -> dict:
        if self.compiled:
            return self._compiled(codes, d, h)
        fit, n = self.fit, len(h)
        a = factor_product(d, fit.final, codes, n)
        a /= fit.total_u  # w_i
        out = {"est": a @ h, "plain": h.sum(axis=0) if d is None else d @ h,
               "max_top": np.abs(h).max(axis=0, initial=0.0)}
        sizes = self.fit.samples.sizes
        if self.mode == "none":
            return out
        if self.mode == "limit":
            v = a if fit.balanced else (np.ones(n) if d is None else d)
        else:
            v = _chain(codes, fit, {}, int(fit.steps or 0), n, 0)[0]  # q_k / d
            if d is not None:
                v *= d
        chosen = range(len(codes)) if self.mode != "passes" else [(int(fit.steps or 0) - 1) % len(codes)]
        out["level_h"] = [_level_sums(codes[m], v, h, sizes[m]) for m in chosen]
        out["level_1"] = [np.bincount(codes[m], v, minlength=sizes[m]) for m in chosen]
        if self.mode == "limit" or (self.mode == "tables" and not fit.balanced):
            out["pairs"] = [np.bincount(codes[i] * sizes[j] + codes[j], v, minlength=sizes[i] * sizes[j])
                            for i in range(len(codes)) for j in range(i + 1, len(codes))]
        return out

    def _compiled(self, codes, d, h) -> dict:
        fit, sizes = self.fit, self.fit.samples.sizes
        K, k = len(codes), int(fit.steps or 0)
        codes, d, h = _compact(codes, d, h)
        s = h.shape[1]
        iterate = self.mode in ("tables", "passes") and fit.balanced
        fv, fo = _factor_sets(fit, iterate)
        # v: 0 none, 1 the weights a, 2 d (1 without), 3 iterate k's product times d, 4 1 / total times d
        vkind = {"none": 0, "limit": 1 if fit.balanced else 2}.get(self.mode, 3 if fit.balanced else 4)
        chosen = range(K) if self.mode != "passes" else [(k - 1) % K]
        chosen_off = np.full(K, -1, np.int64)
        offset = 0
        for m in (chosen if self.mode != "none" else []):
            chosen_off[m], offset = offset, offset + sizes[m]
        level_1, level_h = np.zeros(offset), np.zeros(offset * s)
        with_pairs = self.mode == "limit" or (self.mode == "tables" and not fit.balanced)
        pairs = np.zeros(sum(sizes[i] * sizes[j] for i in range(K) for j in range(i + 1, K)) if with_pairs else 0)
        est, plain, top = _compiled_mean()[0](codes, d, d.size > 0, h, fv, fo, fit.total_u, 1.0 / fit.total, vkind,
                                              1 + k if iterate else 0, chosen_off, level_1, level_h, with_pairs,
                                              pairs, np.asarray(sizes, np.int64))
        out = {"est": est, "plain": plain, "max_top": top}
        if self.mode == "none":
            return out
        out["level_h"] = [level_h[chosen_off[m] * s:(chosen_off[m] + sizes[m]) * s].reshape(sizes[m], s)
                          for m in chosen]
        out["level_1"] = [level_1[chosen_off[m]:chosen_off[m] + sizes[m]] for m in chosen]
        if with_pairs:
            bounds = np.cumsum([0] + [sizes[i] * sizes[j] for i in range(K) for j in range(i + 1, K)])
            out["pairs"] = [pairs[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        return out


def _level_sums(index: np.ndarray, weight: np.ndarray, h: np.ndarray, size: int) -> np.ndarray:
    """(size, s): per level of ``index``, the sums of ``weight * h[:, j]``."""
    buf = np.empty(len(weight))
    return np.column_stack([np.bincount(index, np.multiply(weight, col, out=buf), minlength=size) for col in h.T])


@dataclass(frozen=True)
class StepSums:
    """Pass j of the finite-k linearisation: margin m(j)'s sums of ``D_j = q_k g - sum_(l > j) q_l
    mu_l[m(l)]`` (g = h / scale - estimate, in units of scale)."""

    fit: SamplesFit
    j: int
    mus: dict
    estimate: np.ndarray
    scale: np.ndarray
    compiled: bool = False  # in one numba loop per partition (:func:`_step_pass`)

    @property
    def takes_compact(self) -> bool:
        return self.compiled

    def __call__(self, codes, d, h) -> dict:
        if self.compiled:
            codes, d, h = _compact(codes, d, h)
            m = (self.j - 1) % len(codes)
            out = np.zeros((self.fit.samples.sizes[m], h.shape[1]))
            _compiled_mean()[2](codes, d, d.size > 0, h, *_chain_data(self.fit, self.mus), self.j, m,
                                np.ascontiguousarray(self.estimate, np.float64),
                                np.ascontiguousarray(self.scale, np.float64), out)
            return {"level": out}
        n, s = h.shape
        top, acc = _chain(codes, self.fit, self.mus, self.j, n, s)
        m = (self.j - 1) % len(codes)
        size = self.fit.samples.sizes[m]
        out = np.empty((size, s))
        D = np.empty(n)
        for j, (col, row) in enumerate(zip(h.T, acc, strict=True)):  # D_j = d (G_k g - acc), a statistic at a time
            np.divide(col, self.scale[j], out=D)
            D -= self.estimate[j]
            D *= top
            D -= row
            if d is not None:
                D *= d
            out[:, j] = np.bincount(codes[m], D, minlength=size)
        return {"level": out}


@dataclass(frozen=True)
class Terms:
    """The last pass: Chan's moments of the linearised terms z_i = d_i (a_i g_i + b_i) and of the
    plain mean's d_i (h_i / scale - plain) / total."""

    fit: SamplesFit
    mus: dict
    coefficients: list | None  # at the limit: the additive fit's per-level coefficients
    estimate: np.ndarray
    plain: np.ndarray
    scale: np.ndarray
    compiled: bool = False  # z and the plain terms in one numba loop per partition (:func:`_terms_pass`)

    @property
    def takes_compact(self) -> bool:
        return self.compiled

    def __call__(self, codes, d, h) -> dict:
        fit = self.fit
        n, s = h.shape
        if self.compiled:
            codes, d, h = _compact(codes, d, h)
            sizes = fit.samples.sizes
            coefficients = self.coefficients
            use_coef = coefficients is not None
            coef = np.concatenate([np.ascontiguousarray(c, np.float64).reshape(size, s).ravel() for c, size in
                                   zip(coefficients, sizes, strict=True)]) if coefficients is not None else np.zeros(0)
            coef_off = np.cumsum([0] + [size * s for size in sizes])[:-1].astype(np.int64)
            z, plain = np.empty((s, min(n, CHAIN_BLOCK))), np.empty((s, min(n, CHAIN_BLOCK)))
            moments = np.zeros((4, s))  # per statistic: z's total and M2, the plain terms' total and M2
            _compiled_mean()[1](codes, d, d.size > 0, h, *_chain_data(fit, self.mus), fit.total_u,
                                not use_coef and bool(self.mus), coef, coef_off, use_coef,
                                np.ascontiguousarray(self.estimate, np.float64),
                                np.ascontiguousarray(self.plain, np.float64),
                                np.ascontiguousarray(self.scale, np.float64), z, plain, moments)
            return {"moments_z": (n, moments[0], moments[1]), "moments_plain": (n, moments[2], moments[3])}
        a = factor_product(None, fit.final, codes, n)
        a /= fit.total_u
        beta = None
        if self.coefficients is None and self.mus:
            beta = _chain(codes, fit, self.mus, 0, n, s)[1]
            beta *= -fit.total
        z, plain = np.empty((s, n)), np.empty((s, n))
        buf = np.empty(n)
        for j, col in enumerate(h.T):
            g = np.divide(col, self.scale[j], out=z[j])
            np.subtract(g, self.plain[j], out=plain[j])
            if d is not None:
                plain[j] *= d
            plain[j] /= fit.total
            g -= self.estimate[j]
            if self.coefficients is not None:  # z = d a (g - fit): both conventions (beta = -ratio fit)
                for c, coef in zip(codes, self.coefficients, strict=True):
                    g -= np.take(coef[:, j], c, out=buf, mode="clip")
                g *= a
            elif beta is not None and fit.balanced:  # z = d (a g + beta / total)
                g *= a
                g += beta[j] / fit.total
            else:  # survey: z = d a (g + beta)
                if beta is not None:
                    g += beta[j]
                g *= a
            if d is not None:
                g *= d
        return {"moments_z": _moments(z), "moments_plain": _moments(plain)}


def _moments(z: np.ndarray) -> tuple:
    """(count, sums, sums of squares around the mean) of the rows of z (s, n)."""
    n = z.shape[1]
    if not n:
        return 0, np.zeros(len(z)), np.zeros(len(z))
    total = z.sum(axis=1)
    z -= (total / n)[:, None]
    return n, total, np.einsum("ij,ij->i", z, z)


# -- a mean's passes, compiled ------------------------------------------------------------------------


def _one_type(codes, dtype) -> tuple:
    """The codes as one numba type: contiguous arrays of ``dtype``, all read-only views (a column
    of a pandas DataFrame is read-only, a joint margin's computed codes are not; numba types them
    apart and a tuple of both is not homogeneous)."""
    out = []
    for c in codes:
        view = np.ascontiguousarray(c, dtype).view()
        view.flags.writeable = False
        out.append(view)
    return tuple(out)


def _compact(codes, d, h) -> tuple:
    """A compiled pass's arguments: the codes as a tuple of one dtype (numba's homogeneous tuple),
    ``d`` (empty without design weights) and ``h`` (n, s) contiguous float64."""
    dtype = np.result_type(*(c.dtype for c in codes))
    return (_one_type(codes, dtype),
            np.empty(0) if d is None else np.ascontiguousarray(d, np.float64), np.ascontiguousarray(h, np.float64))


def _factor_sets(fit: SamplesFit, iterates: bool) -> tuple[np.ndarray, np.ndarray]:
    """Every scaling a compiled pass reads, in one flat vector ``fv``, and ``fo`` (sets, K): where
    set r's margin m starts in it. Set 0 is the final scalings, set 1 + l iterate l's (with
    ``iterates``); a scaling shared by several sets (each step changes one) is stored once."""
    sets = [fit.final] + (list(fit.iterates) if iterates else [])
    K = len(fit.samples.sizes)
    fo = np.empty((len(sets), K), np.int64)
    where: dict[int, int] = {}
    parts: list[np.ndarray] = []
    offset = 0
    for r, factors in enumerate(sets):
        for m, f in enumerate(factors):
            if id(f) not in where:
                where[id(f)] = offset
                parts.append(np.ravel(f).astype(np.float64, copy=False))
                offset += parts[-1].size
            fo[r, m] = where[id(f)]
    return np.concatenate(parts), fo


def _chain_data(fit: SamplesFit, mus: dict) -> tuple:
    """:func:`_chain_at`'s arguments but the sample's: the scalings (:func:`_factor_sets`), the
    convention, total, k, per step l the change of its scaling ``before / after`` (``rv`` from
    ``ro[l]``; ``ok[l]`` False where ``after`` has zeros: iterate l - 1 rebuilt from its scalings)
    and the mu_l, (size, s) each, flat (``mv`` from ``mo[l]``, -1 for none)."""
    k, K = int(fit.steps or 0), len(fit.samples.sizes)
    balanced = fit.balanced and bool(fit.iterates)
    fv, fo = _factor_sets(fit, balanced)
    ro, mo = np.full(k + 1, -1, np.int64), np.full(k + 1, -1, np.int64)
    ok = np.zeros(k + 1, np.bool_)
    rv: list[np.ndarray] = []
    offset = 0
    if balanced:
        for l_step in range(1, k + 1):
            m = (l_step - 1) % K
            before, after = np.ravel(fit.iterates[l_step - 1][m]), np.ravel(fit.iterates[l_step][m])
            ok[l_step] = bool((after > 0).all())
            if ok[l_step]:
                ro[l_step] = offset
                rv.append(before / after)
                offset += after.size
    mv: list[np.ndarray] = []
    offset = 0
    for l_step, mu in mus.items():
        mo[l_step] = offset
        mv.append(np.ascontiguousarray(mu, np.float64).ravel())
        offset += mv[-1].size
    return (fv, fo, fit.balanced, fit.total, k, np.concatenate(rv) if rv else np.zeros(0), ro, ok,
            np.concatenate(mv) if mv else np.zeros(0), mo)


def _product(fv, fo, r, codes, i, start, has_start):
    """Sample i's ``start * prod_j`` (set r's scaling j at its code), in :func:`factor_product`'s
    order (without ``has_start``, no start)."""
    w = fv[fo[r, 0] + codes[0][i]]
    if has_start:
        w = start * w
    for j in range(1, len(codes)):
        w *= fv[fo[r, j] + codes[j][i]]
    return w


def _chain_block(first, codes, fv, fo, balanced, total, k, rv, ro, ok, mv, mo, lowest, top, acc):
    """:func:`_chain` for samples ``first, ..., first + len(top) - 1``: G_k in ``top`` and
    ``sum_(l > lowest) G_l mu_l[its category in m(l)]`` in ``acc`` (s, len(top)) (survey: divided
    by total); per sample the NumPy function's operations in its order. Step by step over the
    block, as the NumPy function runs over all samples: a step's two small vectors stay in the
    cache and the samples' updates are independent (a sample's steps one after the other wait on
    each other and miss the cache). ``top`` holds G_l while it runs."""
    K = len(codes)
    s = acc.shape[0]
    nb = top.size
    acc[:, :nb] = 0.0
    if not balanced:
        for l_step in range(k, lowest, -1):
            if mo[l_step] >= 0:
                cm = codes[(l_step - 1) % K]
                for b in range(nb):
                    base = mo[l_step] + np.int64(cm[first + b]) * s
                    for j in range(s):
                        acc[j, b] += mv[base + j]
        for b in range(nb):
            for j in range(s):
                acc[j, b] /= total
            top[b] = 1.0 / total
        return
    g = np.empty(nb)
    for b in range(nb):
        g[b] = _product(fv, fo, 1 + k, codes, first + b, 1.0, False)
    top[:] = g
    for l_step in range(k, lowest, -1):
        cm = codes[(l_step - 1) % K]
        mbase = mo[l_step]
        if l_step - 1 > lowest and ok[l_step]:  # the common case in its own loop: no branches in it
            rbase = ro[l_step]
            for b in range(nb):
                c = np.int64(cm[first + b])
                gb = g[b]
                for j in range(s):
                    acc[j, b] += mv[mbase + c * s + j] * gb
                g[b] = gb * rv[rbase + c]
            continue
        for b in range(nb):
            c = np.int64(cm[first + b])
            for j in range(s):
                acc[j, b] += mv[mbase + c * s + j] * g[b]
            if l_step - 1 > lowest:
                g[b] = _product(fv, fo, l_step, codes, first + b, 1.0, False)


#: Samples per call of :func:`_chain_block` in the compiled passes.
CHAIN_BLOCK = 1024


def _first_pass(codes, d, weighted, h, fv, fo, total_u, inverse_total, vkind, kset, chosen_off, level_1, level_h,
                with_pairs, pairs, sizes):
    """:class:`FirstMoments` in one loop over the samples: returns (sum w h, sum d h, max |h|) and
    adds, per chosen margin (``chosen_off[m] >= 0``), the per-level sums of v and v h; with
    ``with_pairs`` the pairwise tables of v (each in its own scatter loop, as the fit's pass). The
    sums of w h and d h are added in blocks of 4096 samples (their rounding error near the
    pairwise sums' of NumPy, not growing with the partition's length)."""
    n, s = h.shape
    K = len(codes)
    est, plain, top = np.zeros(s), np.zeros(s), np.zeros(s)
    est_block, plain_block = np.zeros(s), np.zeros(s)  # sums of 4096 samples at a time, then added
    v_all = np.empty(n if with_pairs else 0)
    for i in range(n):
        a = _product(fv, fo, 0, codes, i, d[i] if weighted else 1.0, weighted) / total_u
        for j in range(s):
            x = h[i, j]
            est_block[j] += a * x
            plain_block[j] += d[i] * x if weighted else x
            top[j] = max(top[j], abs(x))
        if (i + 1) % 4096 == 0 or i == n - 1:
            for j in range(s):
                est[j] += est_block[j]
                plain[j] += plain_block[j]
                est_block[j] = 0.0
                plain_block[j] = 0.0
        if vkind == 0:
            continue
        if vkind == 1:
            v = a
        elif vkind == 2:
            v = d[i] if weighted else 1.0
        else:
            v = _product(fv, fo, kset, codes, i, 1.0, False) if vkind == 3 else inverse_total
            if weighted:
                v *= d[i]
        for m in range(K):
            if chosen_off[m] >= 0:
                c = chosen_off[m] + np.int64(codes[m][i])
                level_1[c] += v
                for j in range(s):
                    level_h[c * s + j] += v * h[i, j]
        if with_pairs:
            v_all[i] = v
    if with_pairs:
        offset = 0
        for a_ in range(K):
            for b in range(a_ + 1, K):
                size = sizes[a_] * sizes[b]
                _scatter_table(codes[a_], codes[b], sizes[b], v_all, pairs[offset:offset + size])
                offset += size
    return est, plain, top


def _terms_pass(codes, d, weighted, h, fv, fo, balanced, total, k, rv, ro, ok, mv, mo, total_u, chain, coef,
                coef_off, use_coef, estimate, plain_mean, scale, z, plain, moments):
    """:class:`Terms`' z and plain terms, one sample at a time (the NumPy pass's operations in its
    order), block by block of :data:`CHAIN_BLOCK` samples in ``z`` and ``plain`` (s, block); each
    block's totals and sums of squares around its mean merged into ``moments`` (z's total, z's M2,
    the plain terms' total, their M2; by Chan's formula, as :func:`_chan`): no arrays of the
    group's length to fill and read again."""
    n, s = h.shape
    K = len(codes)
    top = np.empty(CHAIN_BLOCK)
    acc = np.zeros((s, CHAIN_BLOCK))
    for first in range(0, n, CHAIN_BLOCK):
        last = min(n, first + CHAIN_BLOCK)
        if chain:
            _chain_block(first, codes, fv, fo, balanced, total, k, rv, ro, ok, mv, mo, 0, top[:last - first], acc)
        for i in range(first, last):
            a = _product(fv, fo, 0, codes, i, 1.0, False) / total_u
            for j in range(s):
                g = h[i, j] / scale[j]
                p = g - plain_mean[j]
                if weighted:
                    p *= d[i]
                plain[j, i - first] = p / total
                g -= estimate[j]
                if use_coef:
                    for m in range(K):
                        g -= coef[coef_off[m] + np.int64(codes[m][i]) * s + j]
                    g *= a
                elif chain and balanced:
                    g *= a
                    g += acc[j, i - first] * -total / total
                else:
                    if chain:
                        g += acc[j, i - first] * -total
                    g *= a
                if weighted:
                    g *= d[i]
                z[j, i - first] = g
        _block_moments(z, last - first, first, moments, 0)
        _block_moments(plain, last - first, first, moments, 2)


def _block_moments(buf, nb, count, moments, row):
    """Merges the first ``nb`` columns of ``buf`` (s, block) into ``moments[row]`` (totals) and
    ``moments[row + 1]`` (sums of squares around the mean) of the ``count`` terms before them."""
    for j in range(buf.shape[0]):
        total = 0.0
        for b in range(nb):
            total += buf[j, b]
        mean = total / nb
        m2 = 0.0
        for b in range(nb):
            x = buf[j, b] - mean
            m2 += x * x
        if count == 0:
            moments[row, j] = total
            moments[row + 1, j] = m2
        else:
            delta = mean - moments[row, j] / count
            moments[row + 1, j] += m2 + delta**2 * (count * nb / (count + nb))
            moments[row, j] += total


def _step_pass(codes, d, weighted, h, fv, fo, balanced, total, k, rv, ro, ok, mv, mo, lowest, m, estimate, scale,
               out):
    """:class:`StepSums`: adds margin m's per-level sums of D_j (``lowest`` = j) to ``out`` (size, s)."""
    n, s = h.shape
    top = np.empty(CHAIN_BLOCK)
    acc = np.zeros((s, CHAIN_BLOCK))
    for first in range(0, n, CHAIN_BLOCK):
        last = min(n, first + CHAIN_BLOCK)
        _chain_block(first, codes, fv, fo, balanced, total, k, rv, ro, ok, mv, mo, lowest, top[:last - first], acc)
        for i in range(first, last):
            c = np.int64(codes[m][i])
            for j in range(s):
                x = h[i, j] / scale[j]
                x -= estimate[j]
                x *= top[i - first]
                x -= acc[j, i - first]
                if weighted:
                    x *= d[i]
                out[c, j] += x


@cache
def _compiled_mean() -> tuple:
    """The compiled (first, terms, step) passes of a ``mean``."""
    import numba

    _compiled_pass()  # binds the compiled table scatter
    # no fast-math: NumPy's operations, order and rounding
    for name in ("_product", "_chain_block", "_block_moments"):  # (py_func: see _compiled_pass)
        function = globals()[name]
        globals()[name] = numba.njit(getattr(function, "py_func", function), cache=True, nogil=True)
    return tuple(numba.njit(f, cache=True, nogil=True) for f in (_first_pass, _terms_pass, _step_pass))


def additive_coefficients(fit: SamplesFit, level_h: list, level_1: list, pairs: list) -> list[np.ndarray]:
    """Per margin level, coefficients c with fit_i = sum_j c_j[x_ij] the least-squares fit of g
    under the measure v, from the normal equations ``(A^T V A) c = A^T V g``: the blocks of A^T V A
    are the levels' masses (diagonal) and the pairwise tables; ``level_h`` are A^T V g. Columns
    scaled to unit mass (the form :func:`._joint.additive_fit` runs LSQR on), then solved by a
    pseudo-inverse (the gauge: one constant per margin but one is free)."""
    sizes = fit.samples.sizes
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    G = np.zeros((offsets[-1], offsets[-1]))
    for j, mass in enumerate(level_1):
        G[offsets[j]:offsets[j + 1], offsets[j]:offsets[j + 1]] = np.diag(mass)
    pair = iter(pairs)
    for i in range(len(sizes)):
        for j in range(i + 1, len(sizes)):
            table = next(pair).reshape(sizes[i], sizes[j])
            G[offsets[i]:offsets[i + 1], offsets[j]:offsets[j + 1]] = table
            G[offsets[j]:offsets[j + 1], offsets[i]:offsets[i + 1]] = table.T
    col_mass = np.concatenate(level_1)
    scale = np.zeros_like(col_mass)
    np.divide(1.0, np.sqrt(col_mass), out=scale, where=col_mass > 0)
    G *= scale[:, None] * scale[None, :]
    rhs = np.vstack(level_h) * scale[:, None]
    values, vectors = np.linalg.eigh(G)
    keep = values > values.max() * len(values) * np.finfo(np.float64).eps
    coef = vectors[:, keep] @ ((vectors[:, keep].T @ rhs) / values[keep, None])
    coef *= scale[:, None]
    return [coef[offsets[j]:offsets[j + 1]] for j in range(len(sizes))]


#: The two-way tables a pass may gather (entries; 8 bytes each, in every partition's partial and
#: on the client): beyond, a finite-k mean takes one pass per step, and a converged one refuses.
TABLES_MAX = 2**24


def _mus_in_memory(fit: SamplesFit, level: list[np.ndarray], pairs: list[np.ndarray] | None) -> dict:
    """The backfitting recursion of :func:`._joint.step_linearization` on the per-level vectors
    alone: margin m(j)'s sums of ``D_j = q_k g - sum_(l > j) q_l mu_l[m(l)]`` are ``level[m(j)]``
    (its sums of q_k g) minus the two-way tables of m(j) with m(l) under q_l applied to mu_l. The
    in-memory function updates D cell by cell instead (it has the cells); here there are no cells
    to update, only these tables (from the fit's passes, or for the survey convention, where every
    q_l is the starting measure t, the pairwise tables of t)."""
    sizes = fit.samples.sizes
    K, k = len(sizes), fit.steps
    assert k is not None  # a finite-k linearisation
    norms = fit.targets if fit.balanced else fit.start_margins
    where: dict[tuple[int, int], int] = {}
    for i in range(K):
        for j in range(i + 1, K):
            where[i, j] = len(where)

    def table(l_step: int, m: int) -> np.ndarray:
        """Margin m by margin m(l) under q_l: a vector (the diagonal) when they are the same."""
        ml = (l_step - 1) % K
        if fit.balanced:
            diagonal, tables = fit.iterate_tables[l_step]
            return diagonal if m == ml else tables[m].reshape(sizes[ml], sizes[m]).T
        if m == ml:
            return fit.start_margins[m]
        assert pairs is not None  # the survey convention's tables come with the first pass
        low, high = min(m, ml), max(m, ml)
        t = pairs[where[low, high]].reshape(sizes[low], sizes[high])
        return t if m == low else t.T

    mus: dict[int, np.ndarray] = {}
    for j in range(k, 0, -1):
        m = (j - 1) % K
        sums = level[m].copy()
        for l_step in range(j + 1, k + 1):
            t = table(l_step, m)
            sums -= t[:, None] * mus[l_step] if t.ndim == 1 else t @ mus[l_step]
        mus[j] = _ratio(sums, norms[m])
    return mus


def mean(fit: SamplesFit, h: da.Array, power_of_two_scale) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(estimate, standard error, plain mean's standard error) per statistic of ``h`` (n,) or (n, s):
    2 passes (the first pass's sums and tables, then the terms), or k + 1 for k half-steps when the
    two-way tables would exceed TABLES_MAX."""
    samples = fit.samples
    K, k = len(samples.shapes), fit.steps
    if k is None:
        # the pairwise tables, then the dense normal equations over every margin's levels
        entries = max(pairs_size(samples.sizes) // 2, sum(samples.sizes) ** 2)
        if entries > TABLES_MAX:
            raise ValueError(check.samples_tables_too_large(entries, TABLES_MAX))
        mode = "limit"
    elif k == 0:
        mode = "none"
    elif fit.balanced:
        mode = "tables" if fit.iterate_tables else "passes"
    else:
        mode = "tables" if pairs_size(samples.sizes) // 2 <= TABLES_MAX else "passes"
    compiled = compiled_passes()
    values = cached_values(samples, h)  # read once for the mean's passes, when it fits
    first = run(samples, FirstMoments(fit.shipped, mode, compiled), values)
    top = first["max_top"]
    scale = power_of_two_scale(np.vstack([top, -top]))
    estimate = first["est"] / scale
    plain = first["plain"] / fit.total / scale
    mus: dict[int, np.ndarray] = {}
    coefficients = None
    if mode != "none":  # each chosen margin's sums of v (h - estimate), in units of scale
        level = [(sums - np.outer(ones, first["est"])) / scale
                 for sums, ones in zip(first["level_h"], first["level_1"], strict=True)]
    if mode == "limit":
        coefficients = additive_coefficients(fit, level, first["level_1"], first["pairs"])
    elif mode == "tables":
        mus = _mus_in_memory(fit, level, first.get("pairs"))
    elif mode == "passes":
        assert k is not None
        norms = fit.targets if fit.balanced else fit.start_margins
        mus[k] = _ratio(level[0], norms[(k - 1) % K])
        for j in range(k - 1, 0, -1):
            sums = run(samples, StepSums(fit.shipped, j, dict(mus), estimate, scale, compiled), values)["level"]
            mus[j] = _ratio(sums, norms[(j - 1) % K])
    last = run(samples, Terms(fit.shipped, mus, coefficients, estimate, plain, scale, compiled), values)
    n = fit.n
    se = np.sqrt(np.maximum(n / (n - 1) * last["moments_z"][2], 0.0))
    plain_se = np.sqrt(np.maximum(n / (n - 1) * last["moments_plain"][2], 0.0))
    return first["est"], se * scale, plain_se * scale
