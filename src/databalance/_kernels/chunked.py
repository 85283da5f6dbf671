"""A 2-D Dask array partitioned along its rows (blocks NumPy or scipy.sparse), balanced in place.

The blocks are persisted once (on the workers under ``distributed``) and never leave them; the
scalings (vectors of the table's row and column counts) live on the client. The plain products
(:class:`ChunkedKernel`: the first half-steps, and a benchmark's reference) are one map over the
blocks each: the rows' half-step gathers each block's ``block @ v`` (its own rows' sums), the
columns' one sums every block's ``block.T @ u[its rows]`` by Dask's tree reduction. The
products are those of :class:`.dense.DenseKernel` on each block, so the iterates are the in-memory
ones up to the order of the column sums' additions. Chunks along the columns are merged, with a
warning: a block must hold whole rows (see the user guide, "Samples and tables on Dask").

The fused sweep (:class:`FusedChunkedKernel`) is one map over the blocks per sweep. Under
``distributed`` it goes through the futures API: each block is held (:class:`_Held`) on one
worker chosen to balance the nonzeros (:func:`_balanced`), a sweep is one task per worker over its
blocks, and after :data:`HELD_BUILD_AFTER` sweeps each sparse block is held with its tiled
copy (:func:`.fused_sparse.tiled_pattern`), released with the kernel. A plain sweep (no
over-relaxation) leaves the rows' sums and new scaling in its tasks' results on the workers
(:class:`_Swept`, :class:`_Rows`): the next sweep reads the scaling there, the rows' marginal
errors are measured there, and only the column sums (and two numbers per worker) reach the client;
the rows' scaling is fetched once, for the result (:data:`ROWS_ON_WORKERS`).

Imported only when a Dask array reaches :func:`databalance._kernels.kernel_for`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import uuid
import warnings
import weakref
from contextlib import contextmanager
from functools import cached_property
from typing import Any

import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp
from dask.sizeof import sizeof

from .. import _validation as check
from .dense import DenseKernel, support_pattern_dense
from .fused import _Fused
from .sparse import scaled_sparse, support_pattern_sparse

#: Partials summed per node of the column sums' tree reduction.
SPLIT_EVERY = 8

#: A fused sweep sends every block's column partials to the client, which adds them, while they
#: hold at most this many entries in all (128 MB); beyond, a tree reduction on the workers adds them.
CLIENT_SUM_MAX = 1 << 24

#: Under ``distributed``, each sparse block is held with its tiled copy (:func:`_tiled`) from the
#: sweep after this many on. Measured at 5*10^7 nonzeros in ten blocks on two one-thread workers
#: of a two-core machine (benchmarks/bench_dask.py table): the copies cut the workers' arithmetic by
#: about 10% (85-95 against 90-105 ms per worker and sweep) but no sweep got measurably shorter
#: (0.155 s either way, interleaved: the client, the scheduler and the workers share the cores),
#: while their build took 0.15-0.5 s per block, about 1 s per worker, once per run (a run of ten
#: sweeps that built them at the in-memory kernel's BUILD_AFTER = 6 took 0.25 s per sweep against
#: 0.13 s without). So only long runs build them, where a machine with cores to spare per worker
#: may gain what the in-memory kernel does (0.071 against 0.093 s per sweep on two threads).
HELD_BUILD_AFTER = 64

#: Under ``distributed``, a plain sweep (no over-relaxation) leaves the rows' sums and new scaling
#: on the workers (:class:`_Rows`): only the column partials and the rows' marginal errors reach the
#: client. False: every sweep's rows' sums go to the client, which computes their scaling and
#: errors (the sweep before; a benchmark's reference).
ROWS_ON_WORKERS = True

#: Seconds between checks, while a sweep's tasks run, that the workers they are pinned to are
#: still in the cluster (a task pinned to a worker that left would wait for it forever).
SWEEP_CHECK = 2.0

_delayed: Any = dask.delayed  # typed loosely: dask's stubs expect collections, not functions


def _csr(block: Any) -> Any:
    return sp.csr_array(block)


def _vector(x: np.ndarray) -> Any:
    """A vector every block's task reads, as one literal of the graph. (Scattering it to the workers
    instead measured 20% slower per sweep: it costs a round trip per half-step.)"""
    return _delayed(x, pure=True)


def active_client():
    """The ``distributed`` client that runs this process's computations, or None."""
    try:
        from distributed import default_client

        client = default_client()
    except (ImportError, ValueError):  # no distributed, or no client: the local schedulers
        return None
    scheduler = dask.config.get("scheduler", None)
    return client if scheduler in (None, "dask.distributed", "distributed") or scheduler is client else None


class ChunkedWarning(UserWarning):
    """A Dask table chunked along its columns was rechunked to whole rows."""


def _block_summary(block, offset: int, working):
    """One block's check (finite, nonnegative; errors name the table's row) and its row sums, column
    sums, smallest entry and stored entries, in the working dtype."""
    if sp.issparse(block):
        block = _csr(block).astype(working, copy=False)
        try:
            check.sparse_entries(block)
        except ValueError as error:
            raise ValueError(f"{error} [row index within the Dask block starting at row {offset}]") from None
        full = block.count_nonzero() == block.shape[0] * block.shape[1]
        lowest = 1.0 if full else 0.0
        nnz = block.nnz
    else:
        block = np.asarray(block).astype(working, copy=False)
        try:
            lowest = check.nonnegative(block, "table")
            if not np.isfinite(block.max(initial=0.0)):
                check.finite_sums(np.array([np.inf]), block, "table")  # raises, naming the entry
        except ValueError as error:
            raise ValueError(f"{error} [index within the Dask block starting at row {offset}]") from None
        nnz = block.size
    rows = block @ np.ones(block.shape[1], working)
    cols = block.T @ np.ones(block.shape[0], working)
    return {"rows": np.asarray(rows), "cols": np.asarray(cols), "lowest": lowest, "nnz": nnz}


def _prepared(block, working):
    """A block as the kernel keeps it: CSR for sparse, a C-ordered NumPy array otherwise (what the
    fused passes read in place), in the working dtype."""
    if sp.issparse(block):
        return _csr(block).astype(working, copy=False)
    return np.ascontiguousarray(np.asarray(block), dtype=working)


def _row_sums(block, v):
    return np.asarray(block @ v)


def _col_partial(block, u):
    return np.asarray(block.T @ u)[None, :]


def _float64_partial(block, u, v, start, stop):
    """Row sums and column sums, in float64, of the block of ``diag(u) table diag(v)``, each entry
    rounded to the table's dtype as :func:`scaled_table` rounds it (for sparse blocks from the
    stored values, without a scaled copy of the block)."""
    u = u[start:stop]
    if sp.issparse(block):
        csr: Any = block
        counts = np.diff(csr.indptr)
        data = (csr.data * u.repeat(counts) * v[csr.indices]).astype(np.float64)
        rows = np.repeat(np.arange(csr.shape[0]), counts)
        return np.bincount(rows, data, minlength=csr.shape[0]), np.bincount(csr.indices, data, minlength=csr.shape[1])
    data = (block * u[:, None] * v).astype(np.float64)
    return data.sum(axis=1), data.sum(axis=0)


#: Serialises the compiled passes of concurrent tasks (the threaded scheduler) unless numba's
#: threading layer is known to take calls from several threads at once (OpenMP, TBB; numba's
#: ``workqueue`` layer aborts the process on concurrent calls).
_LOCK = threading.Lock()


@contextmanager
def _one_thread():
    """Run a compiled pass on one of numba's threads (a task is one worker thread's work)."""
    from . import fused

    safe = fused._LAYER in ("omp", "tbb")
    if not safe:
        _LOCK.acquire()
    try:
        with fused._using(1):
            yield
    finally:
        if not safe:
            _LOCK.release()


def _rule(uold, p, r, w):
    """The rows' new scaling from their sums: ``p / r`` (0 where ``p`` is 0), over-relaxed by ``w``
    unless it is 1 (:func:`.fused.relaxed_ratio`, the in-memory kernels' rule)."""
    from .fused import relaxed_ratio

    zero = p == 0
    return relaxed_ratio(uold, p, r, zero if zero.any() else None, None if w == 1.0 else w)


def fused_here() -> bool:
    """Whether this process (a worker's, where a block's task runs) can run numba's passes: numba
    installed here (a worker may lack what the client has: its blocks then take scipy's or BLAS's
    products, to the same numbers), not refused by ``DATABALANCE_KERNEL=numpy``, and not forked
    from a process that ran GNU OpenMP's threads."""
    from . import fused

    try:
        return fused.numba_wanted() and not fused._FORK_UNSAFE
    except ImportError:  # DATABALANCE_KERNEL=numba where numba is missing
        return False


def _fused_block(block, v, uold, p, w, compiled: bool):
    """One block's part of a sweep: its rows' sums ``r = T_b v`` (in the block's dtype), their new
    scaling ``u = rule(p, r)`` (over-relaxed by ``w`` unless it is 1) and its part of the column
    sums ``T_b' u`` (float64). Returns ``(r, c)`` when the client can recompute ``u`` to the bit
    (the plain rule is one IEEE division: half the bytes sent back), else ``([r, u], c)``.

    A sparse block takes scipy's two products: on one thread a fused numba pass over a block
    (``fused_sparse._scatter_pass``) measured slower than the two (its scatter and its gather
    compete for the cache; benchmarks/bench_dask.py). A dense block takes numba's one-read pass
    (``fused._dense_pass``) when ``compiled`` (numba asked for, and runnable in this process),
    else BLAS's two products."""
    r, u, c, dense = _fused_lines(block, v, uold, p, w, compiled)
    return (np.stack([r, u]) if dense or w != 1.0 else r), c


def _fused_lines(block, v, uold, p, w, compiled: bool):
    """:func:`_fused_block`'s ``(r, u, c)``, and whether numba's dense pass made them."""
    from . import fused

    if compiled and not sp.issparse(block) and fused_here():
        m, l = block.shape
        r = np.empty(m, block.dtype)
        u = np.empty(m, block.dtype)
        acc = np.empty((1, l))
        with _one_thread():
            fused.compiled(fused._dense_pass)(block[None], v[None], uold[None], p[None], np.array([w], np.float64),
                                              1, block.dtype.type(0), r[None], u[None], acc)
        return r, u, acc[0], True
    r = np.asarray(block @ v).astype(block.dtype, copy=False)
    u = _rule(uold, p, r, w)
    c = np.asarray(block.T @ u).astype(np.float64, copy=False)
    return r, u, c, False


class _Held:
    """A sparse block as a sweep's task reads it on its worker, with the block's tiled copy
    (:func:`.fused_sparse.tiled_pattern`; None where it was not built: numba cannot run in the
    worker, the tiles would be too sparse, or the worker's memory could not take the build)."""

    __slots__ = ("block", "tiles", "moved")

    def __init__(self, block, tiles=None, moved: bool = False):
        self.block = block
        self.tiles = tiles
        self.moved = moved  # the block was sent from another worker: this one holds a copy

    def copy_bytes(self) -> int:
        """The memory this object adds to its worker's: the tiled copy, and the block when it was
        sent from another worker (else the block is counted under its own key)."""
        t = self.tiles
        tiles = 0 if t is None else int(t.ptr.nbytes + t.keys.nbytes + t.values.nbytes)
        return tiles + (_block_bytes(self.block) if self.moved else 0)


def _block_bytes(block) -> int:
    """A block's memory: its arrays (dask's ``sizeof`` does not know every scipy sparse class)."""
    if sp.issparse(block):
        return int(sum(getattr(block, name).nbytes for name in ("data", "indices", "indptr")
                       if hasattr(block, name)))
    return int(np.asarray(block).nbytes)


@sizeof.register(_Held)
def _sizeof_held(held: _Held) -> int:
    """What a held block adds to a worker's memory for Dask's accounting (:meth:`_Held.copy_bytes`)."""
    return 64 + held.copy_bytes()


def _headroom() -> float:
    """Bytes this process may still take: the memory available to it (:func:`.fused_sparse.available_memory`),
    and in a ``distributed`` worker with a memory limit at most the limit minus its resident memory."""
    from .fused_sparse import available_memory

    room = available_memory()
    try:
        from distributed import get_worker

        worker = get_worker()
        limit = worker.memory_manager.memory_limit
        if limit:
            room = min(room, float(limit - worker.monitor.get_process_memory()))
    except (ImportError, ValueError, AttributeError):  # not in a worker, or no limit to read
        pass
    return room


def _tile_build_bytes(block, tile: tuple[int, int]) -> int:
    """The peak memory of a block's tiled copy's build on one thread: the copy (values, 32-bit keys,
    tile pointers) and the counting sort's counters."""
    m, n = block.shape
    tiles = -(-m // tile[0]) * -(-n // tile[1])
    return int(block.nnz * (block.dtype.itemsize + 4) + 8 * (2 * tiles + 1))


def _hold(block, moved: bool) -> _Held:
    """A block as the sweeps' tasks on this worker read it (``moved``: sent from another worker)."""
    return _Held(block, None, moved)


def _tiled(held: _Held) -> _Held:
    """A held sparse block with its tiled copy, built on one thread when this process can run numba
    (not forked from one that ran OpenMP threads), the tiles are dense enough (:func:`.fused_sparse.tiling`)
    and the memory left (:func:`_headroom`) holds the build twice over; else the block alone (its
    sweeps then keep scipy's products)."""
    from . import fused_sparse as fs

    block = held.block
    tiles = None
    tile = fs.tiling(block.shape[0], block.shape[1], block.nnz)
    if fused_here() and tile is not None and 2 * _tile_build_bytes(block, tile) <= _headroom():
        try:
            with _one_thread():
                tiles = fs.tiled_pattern(fs._unsigned(block.indptr), fs._unsigned(block.indices), block.data,
                                         block.shape[1], tile, nblocks=1)
        except MemoryError:  # scipy's products then
            tiles = None
    return _Held(block, tiles, held.moved)


def _held_block(held: _Held, v, uold, p, w, compiled: bool):
    """:func:`_fused_block` on a held block: with its tiled copy, the rows' sums by numba's gather
    (``fused_sparse._gather``) and the column sums from the copy (``fused_sparse._tiled_gather``),
    each on one thread; without it, scipy's two products. Returns what :func:`_fused_block` does."""
    block, t = held.block, held.tiles
    if t is None:
        return _fused_block(block, v, uold, p, w, compiled)
    r, u, c = _held_lines(held, v, uold, p, w, compiled)
    return (r if w == 1.0 else np.stack([r, u])), c


def _held_lines(held: _Held, v, uold, p, w, compiled: bool):
    """:func:`_held_block`'s ``(r, u, c)``."""
    from . import fused
    from . import fused_sparse as fs

    block, t = held.block, held.tiles
    if t is None or fused._FORK_UNSAFE:
        return _fused_lines(block, v, uold, p, w, compiled)[:3]
    m, n = block.shape
    v = np.ascontiguousarray(v, block.dtype)
    r = np.empty(m, block.dtype)
    c = np.empty(n)
    u64 = np.uint64
    with _one_thread():
        fused.compiled(fs._gather)(fs._unsigned(block.indptr), fs._unsigned(block.indices), block.data, v,
                                   np.array([0, m], np.uint64), r)
    u = _rule(uold, p, r, w)
    with _one_thread():
        fused.compiled(fs._tiled_gather)(t.ptr, t.keys, t.values, np.ascontiguousarray(u), u64(t.lead_tile),
                                         u64(t.other_tile), u64(t.n_lead_blocks), u64(n),
                                         np.array([0, t.n_other_blocks], np.uint64), c)
    return r, u, c


def _worker_blocks(held: list, v, olds: list, targets: list, w, compiled: bool):
    """:func:`_held_block` over the blocks a worker holds: their lines, and their column sums added
    (in the blocks' order). One task per worker and sweep measured 0.72x the sweep of one task per
    block (benchmarks/bench_dask.py): fewer tasks to schedule, and a fifth of the column partials
    sent to the client."""
    lines, c = [], None
    for h, o, t in zip(held, olds, targets, strict=True):
        line, part = _held_block(h, v, o, t, w, compiled)
        lines.append(line)
        c = part if c is None else c + part
    return lines, c


def _worker_rows(held: list, v, prev: list, olds: list, targets: list, compiled: bool):
    """A plain sweep over the blocks a worker holds whose rows stay on the worker: per block the
    rows' sums ``r``, their new scaling ``u = p / r`` and the column partials (added, in the
    blocks' order), and the rows' marginal errors before and after the step, ``sum |u_old r - p|``
    and ``sum |u r - p|`` (:func:`databalance._ipf.l1`'s terms, added over the blocks). ``olds``:
    per block the old scaling, or its position among the lines of the previous sweep's results
    ``prev`` (on this worker: nothing is sent). Returns a :class:`_Swept`: the client fetches the
    column sums and errors; the lines stay here for the next sweep (:class:`_Rows`)."""
    previous = [u for result in prev for u in _kept(result)[1]]
    if not v.flags.aligned:  # as a task's argument it arrives unaligned: 3-6% slower gathers
        v = v.copy()
    rs, us, c = [], [], None
    before = after = 0.0
    for h, o, t in zip(held, olds, targets, strict=True):
        r, u, part = _held_lines(h, v, t, t, 1.0, compiled)
        old = previous[o] if isinstance(o, int) else o
        before += _line_l1(old, r, t)
        after += _line_l1(u, r, t)
        rs.append(r)
        us.append(u)
        c = part if c is None else c + part
    return _Swept(c, before, after, (rs, us))


class _LinesLost(RuntimeError):
    """A sweep's rows' lines were not on the worker that ran it (its result was spilled to disk or
    sent elsewhere: the lines are never serialised)."""


class _Swept:
    """A :func:`_worker_rows` result: the worker's column sums and rows' errors, which the client
    fetches, and the blocks' rows' sums and scalings ``lines = (rs, us)``, which stay in the
    worker's memory: they are not serialised (the client gets the rest without them, and so one
    task per worker and sweep, not two; a copy spilled to disk or sent to another worker has none,
    which its readers notice: :class:`_LinesLost`)."""

    __slots__ = ("after", "before", "c", "lines")

    def __init__(self, c, before: float, after: float, lines: tuple | None = None):
        self.c, self.before, self.after, self.lines = c, before, after, lines

    def __reduce__(self):
        return _Swept, (self.c, self.before, self.after)


@sizeof.register(_Swept)
def _sizeof_swept(swept: _Swept) -> int:
    lines = 0 if swept.lines is None else sum(a.nbytes for part in swept.lines for a in part)
    return 64 + int(np.asarray(swept.c).nbytes) + lines


def _kept(result: _Swept) -> tuple:
    if result.lines is None:
        raise _LinesLost("a sweep's rows' lines left their worker")
    return result.lines


def _line_l1(scaling, sums, target) -> float:
    """``sum |scaling * sums - target|`` as :func:`databalance._ipf.l1` measures it (the product
    rounded to its dtype), in one numba pass where numba runs."""
    if fused_here():
        from .fused_sparse import _jitted_l1

        return float(_jitted_l1()(scaling, sums, target, np.result_type(scaling, sums).type))
    from .._ipf import l1

    return float(l1(scaling, sums, target, 0))


def _lines_of(result: _Swept, which: int) -> list:
    """A :func:`_worker_rows` result's blocks' row sums (``which`` 0) or scalings (1)."""
    return _kept(result)[which]


def _sums_of(result: _Swept):
    return result.c


def _errors_of(result: _Swept) -> tuple:
    return result.before, result.after


class _Sweep:
    """A plain sweep of :class:`FusedChunkedKernel` on a ``distributed`` cluster whose rows' sums and
    new scaling stayed on the workers (one :func:`_worker_rows` task per worker): the tasks (their
    futures hold the lines), the blocks of each, the placement, the sweep's ``v`` and the rows'
    targets (to recompute the lines when a worker holding them left), and the rows' marginal
    errors before (with the scaling ``old``) and after the step."""

    def __init__(self, kernel, tasks: list, groups: list, at: list, v: np.ndarray, p: np.ndarray,
                 errors: tuple, old):
        self.kernel, self.tasks, self.groups, self.at, self.v, self.p = kernel, tasks, groups, at, v, p
        self.errors = errors
        try:
            self.old: Any = weakref.ref(old)
        except TypeError:
            self.old = None
        self._lines: list = [None, None]

    def lines(self, which: int) -> np.ndarray:
        """The rows' sums (``which`` 0) or new scaling (1), fetched from the workers once (read-only)."""
        if self._lines[which] is None:
            out = self._fetched(which)
            out.flags.writeable = False
            self._lines[which] = out
        return self._lines[which]

    def _fetched(self, which: int) -> np.ndarray:
        client = active_client()
        pinned = {a for a in self.at if a}
        if client is not None and pinned <= set(client.scheduler_info().get("workers", {})):
            parts = [client.submit(_lines_of, t, which, workers=[self.at[g[0]]] if self.at[g[0]] else None,
                                   allow_other_workers=False, pure=False)
                     for t, g in zip(self.tasks, self.groups, strict=True)]
            try:
                got = pinned_results(client, parts, pinned, parts)
            except _LinesLost:
                got = None
            if got is not None:
                lines: list = [None] * len(self.at)
                for g, part in zip(self.groups, got, strict=True):
                    for i, line in zip(g, part, strict=True):
                        lines[i] = line
                return np.concatenate(lines)
        # a worker holding them left: the lines again from the sweep's v (the blocks recomputed)
        r = self.kernel.row_sums(self.v)
        return r if which == 0 else _rule(r, self.p, r, 1.0)


class _Rows:
    """The rows' sums (``which`` 0) or new scaling (1) of a :class:`_Sweep`, left on the workers: what
    the loop holds in their place (its state's scaling, the fused kernel's cached sums). The loop's
    marginal errors of the rows come from the sweep (:meth:`FusedChunkedKernel.margin_l1`) and the
    next sweep's tasks read the scaling where it is; anything else that reads it as an array
    (``np.asarray``, ``copy``: the result's export, a trace, an acceleration's extrapolation) gets it
    fetched from the workers, once."""

    __slots__ = ("__weakref__", "dtype", "shape", "sweep", "which")
    ndim = 1

    def __init__(self, sweep: _Sweep, which: int, dtype: np.dtype, n: int):
        self.sweep, self.which, self.dtype, self.shape = sweep, which, np.dtype(dtype), (n,)

    @property
    def size(self) -> int:
        return self.shape[0]

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.sweep.lines(self.which)
        if dtype is not None and np.dtype(dtype) != out.dtype:
            return out.astype(dtype)
        return out.copy() if copy else out

    def copy(self) -> np.ndarray:
        return np.array(self.sweep.lines(self.which))


def pinned_results(client, futures: list, pinned: set, tasks: list) -> list | None:
    """The results of a sweep's ``futures`` (computed from its ``tasks``, pinned to the workers
    ``pinned``). None, every future cancelled, when one of those workers left the cluster before
    the results arrived (checked every :data:`SWEEP_CHECK` seconds): a pinned task, or its lost
    result, would wait for that worker forever. When a task raises, the futures are released
    (:func:`released_on_error`)."""
    every = list(futures) + [t for t in tasks if t not in futures]
    out = []
    with released_on_error(every):
        for future in futures:
            while True:
                try:
                    out.append(future.result(timeout=SWEEP_CHECK))
                    break
                except TimeoutError:
                    if future.status == "error":  # a task's own TimeoutError
                        raise
                    if not pinned <= set(client.scheduler_info().get("workers", {})):
                        client.cancel(every)
                        return None
    return out


@contextmanager
def released_on_error(futures: list):
    """Release ``futures`` when the block raises, before the error goes on: the client keeps an
    erred future's exception, whose traceback holds the frames that hold the futures, so their
    results would otherwise stay on the workers."""
    try:
        yield
    except BaseException:
        for future in futures:
            future.release()
        raise


def _identity(x):
    return x


def _aligned(x: np.ndarray) -> np.ndarray:
    """``x`` as an aligned array (an array sent to a worker arrives at any byte offset)."""
    return x if x.flags.aligned else x.copy()


def _item(pair, i: int):
    return pair[i]


def _added(*parts):
    return np.sum(parts, axis=0)


def _tree_sum(parts: list) -> Any:
    """The sum of delayed vectors by a tree of nodes adding :data:`SPLIT_EVERY` each."""
    while len(parts) > 1:
        parts = [_delayed(_added, pure=True)(*parts[i:i + SPLIT_EVERY]) for i in range(0, len(parts), SPLIT_EVERY)]
    return parts[0]


def _numba_wanted() -> bool:
    from . import fused

    return fused.numba_wanted()


def _balanced(where: list, nnz: list, threads: dict) -> list:
    """Per block, the one worker that holds it for the sweeps: one of those holding it already
    (``where``), unless that would put more than half a block beyond the worker's share of the
    nonzeros (in proportion to its threads); then the worker furthest below its share. Blocks are
    placed largest first; None where no worker is known.

    Examples
    --------
    >>> from databalance._kernels.chunked import _balanced
    >>> _balanced([["a"]] * 3 + [["b"]], [5, 5, 5, 5], {"a": 1, "b": 1})
    ['a', 'a', 'b', 'b']
    """
    if not threads or not nnz:
        return [None] * len(where)
    total = float(sum(nnz)) or 1.0
    share = {w: total * t / sum(threads.values()) for w, t in threads.items() if t > 0}
    load = dict.fromkeys(share, 0.0)
    out: list = [None] * len(where)
    for i in sorted(range(len(where)), key=lambda i: -nnz[i]):
        n = nnz[i]
        best = min(load, key=lambda w: (load[w] + n) / share[w])
        holders = [w for w in (where[i] or ()) if w in load]
        stay = min(holders, key=lambda w: (load[w] + n) / share[w], default=None)
        keep = stay is not None and (load[stay] + n <= share[stay] + n / 2 or stay == best)
        out[i] = stay if keep else best
        load[out[i]] += n
    return out


def compiled_passes(dtype: np.dtype, sparse: bool) -> bool:
    """Whether the blocks' tasks run numba's one-read pass: dense float32/float64 blocks, numba
    installed and not refused by ``DATABALANCE_KERNEL=numpy`` (``numba`` without numba installed
    raises, as in memory). A Dask table is never too small for it: its tasks cost more than
    numba's dispatch."""
    from . import fused

    return not sparse and dtype in (np.float32, np.float64) and fused.numba_wanted()


class ChunkedKernel(DenseKernel):
    """The products of :class:`DenseKernel`, a map over persisted row blocks each."""

    def __init__(self, table: da.Array, blocks: list, offsets: np.ndarray, summary: dict):
        self.table = table
        self.blocks = blocks
        self.offsets = offsets
        self.dtype = table.dtype
        self.shape = table.shape
        self.batch = ()
        self.lowest = summary["lowest"]
        self.nnz = summary["nnz"]
        self.block_nnz = summary.get("block_nnz", [])
        self._frame = [summary["rows"], summary["cols"]]
        self.sparse = summary["sparse"]

    @classmethod
    def from_input(cls, table: da.Array, *, plain: bool = False) -> ChunkedKernel:
        """The kernel of a 2-D Dask table: :class:`FusedChunkedKernel` (one map per sweep), or with
        ``plain`` this class (two maps per sweep: a benchmark's reference)."""
        check.dask_table(table)
        if table.numblocks[1] > 1:
            warnings.warn(check.dask_column_chunks(table.numblocks[1]), ChunkedWarning, stacklevel=4)
            table = table.rechunk({1: -1})
        working = check.working_dtype(np.dtype(table.dtype), "table")
        sparse = sp.issparse(getattr(table, "_meta", None))
        prepared = da.map_blocks(_prepared, table, working, dtype=working, meta=table._meta)
        prepared = prepared.persist()  # once: the blocks stay where they were computed
        blocks = list(prepared.to_delayed().ravel())
        offsets = np.concatenate([[0], np.cumsum(prepared.chunks[0])]).astype(np.int64)
        parts = dask.compute(*[_delayed(_block_summary)(b, int(o), working)
                               for b, o in zip(blocks, offsets[:-1], strict=True)])
        summary = {
            "rows": np.concatenate([p["rows"] for p in parts]).astype(working, copy=False),
            "cols": np.sum([p["cols"] for p in parts], axis=0).astype(working, copy=False),
            "lowest": min((p["lowest"] for p in parts), default=np.inf),
            "nnz": int(sum(p["nnz"] for p in parts)),
            "block_nnz": [int(p["nnz"]) for p in parts],
            "sparse": sparse,
        }
        if plain:
            return ChunkedKernel(prepared, blocks, offsets, summary)
        return FusedChunkedKernel(prepared, blocks, offsets, summary, compiled_passes(working, sparse))

    # -- products: one map over the blocks each ----------------------------------------------------

    def row_sums(self, v):
        shared = _vector(np.asarray(v, self.dtype))
        parts = [da.from_delayed(_delayed(_row_sums, pure=True)(b, shared), shape=(int(stop - start),),
                                 dtype=self.dtype)
                 for b, start, stop in zip(self.blocks, self.offsets[:-1], self.offsets[1:], strict=True)]
        (out,) = dask.compute(da.concatenate(parts))
        return out.astype(self.dtype, copy=False)

    def col_sums(self, u):
        u = np.asarray(u, self.dtype)  # each block's task gets only its rows' slice
        parts = [da.from_delayed(_delayed(_col_partial, pure=True)(b, u[start:stop]), shape=(1, self.shape[1]),
                                 dtype=self.dtype)
                 for b, start, stop in zip(self.blocks, self.offsets[:-1], self.offsets[1:], strict=True)]
        (out,) = dask.compute(da.concatenate(parts).sum(axis=0, split_every=SPLIT_EVERY, dtype=self.dtype))
        return out.astype(self.dtype, copy=False)

    def float64_sums(self, scalings) -> list[np.ndarray]:
        u, v = (np.asarray(s) for s in scalings)
        su, sv = _vector(u), _vector(v)
        parts = dask.compute(*[_delayed(_float64_partial, pure=True)(b, su, sv, int(start), int(stop))
                               for b, start, stop in zip(self.blocks, self.offsets[:-1], self.offsets[1:],
                                                         strict=True)])
        return [np.concatenate([p[0] for p in parts]), np.sum([p[1] for p in parts], axis=0)]

    @cached_property
    def frame_sums(self) -> list[np.ndarray]:
        return self._frame

    # -- support -----------------------------------------------------------------------------------

    def full_support(self) -> bool:
        return self.lowest > 0

    def support_size(self) -> int:
        return self.nnz

    def pattern(self, b):
        """The support, gathered to the client (for the feasibility check, run only when needed)."""
        return support_pattern_chunked(self.table)


class FusedChunkedKernel(_Fused, ChunkedKernel):
    """:class:`ChunkedKernel` whose sweeps are one map over the blocks (one ``dask.compute``): each
    block's task computes its rows' sums, their new scaling and its part of the column sums (dense
    blocks in one read by numba when ``compiled``). The first steps, and any other request of the
    loop, take the plain products of :class:`ChunkedKernel`. Under ``distributed``, a plain sweep's
    rows' sums and scaling stay on the workers (:meth:`_rows_sweep`); the loop holds them as
    :class:`_Rows` and gets the rows' errors from :meth:`margin_l1`."""

    def __init__(self, table: da.Array, blocks: list, offsets: np.ndarray, summary: dict, compiled: bool = False):
        super().__init__(table, blocks, offsets, summary)
        self.lead = 0  # rows: a block holds whole rows
        self.reads = 0
        self.generation = 0
        self._targets: tuple | None = None  # the rows' targets as given and their slices on the workers
        self._array: tuple | None = None  # the rows' targets as given and as one array
        self.compiled = compiled
        self._where: list | None = None  # the workers holding each block
        self.passes = 0  # fused passes run
        self._futures: list | None = None  # under distributed: the blocks' futures
        self._held: tuple | None = None  # under distributed: (placement, workers, held blocks' futures, tiled)
        self._threads: dict = {}  # under distributed: the workers' threads
        self._held_after = HELD_BUILD_AFTER  # the pass from which sparse blocks are held with tiled copies
        self._sent: tuple | None = None  # under distributed: (targets, placement, their slices' futures)
        self._last: list = []  # under distributed: the last sweep's tasks, released after the next's submission

    def _pass(self, x, old, p, omega):
        w = 1.0 if omega is None else float(np.asarray(omega).reshape(-1)[0])
        client = active_client()
        if client is not None and w == 1.0 and ROWS_ON_WORKERS:
            rows = self._rows_sweep(client, x, old, p)
            if rows is not None:
                self.passes += 1
                return rows
        parts = self._submitted(client, x, old, p, w) if client is not None else None
        self.passes += 1
        if parts is not None:
            return self._gathered(parts, self._target_array(p), w)
        v = _vector(np.ascontiguousarray(x, self.dtype))
        targets, q = self._target_slices(p)
        if w == 1.0:  # the plain rule does not read the old scaling: the targets stand in for it
            olds = targets
        else:
            old = np.ascontiguousarray(old, self.dtype)
            olds = [old[start:stop] for start, stop in zip(self.offsets[:-1], self.offsets[1:], strict=True)]
        tasks = []
        for b, o, t, where in zip(self.blocks, olds, targets, self._placement(), strict=True):
            # a block's task on a worker that holds the block: work stealing had moved blocks
            # (60 MB each in the benchmark) between the workers, 0.3 s a time
            with dask.annotate(workers=where, allow_other_workers=False) if where else contextlib.nullcontext():
                tasks.append(_delayed(_fused_block, pure=True, nout=2)(b, v, o, t, w, self.compiled))
        if len(tasks) * self.shape[1] <= CLIENT_SUM_MAX:
            # every block's results straight to the client, which adds the column partials: no
            # task moves a block's results between workers (measured: such a transfer waited
            # 0.1-0.4 s behind the sending worker's running task)
            parts = dask.compute(*tasks)
            lines = [part[0] for part in parts]
            c = _added(*[part[1] for part in parts])
        else:
            lines, c = dask.compute([t[0] for t in tasks], _tree_sum([t[1] for t in tasks]))
        return self._gathered((lines, c), q, w)

    def _gathered(self, parts: tuple, q: np.ndarray, w: float):
        """A sweep's ``(r, u, c)`` from the blocks' lines (``r``, or ``[r, u]``) and the column sums."""
        lines, c = parts
        if all(part.ndim == 1 for part in lines):  # the rows' sums only: the plain rule, here
            r = np.concatenate(lines)
            u = _rule(r, q, r, w)
        else:
            r, u = np.concatenate([part if part.ndim == 2 else np.stack([part, _rule(part, q[start:stop], part, w)])
                                   for part, start, stop in zip(lines, self.offsets[:-1], self.offsets[1:],
                                                                strict=True)], axis=1)
        return r, u, np.asarray(c).astype(self.dtype, copy=False)

    def _submitted(self, client, x, old, p, w: float) -> tuple | None:
        """A sweep on a ``distributed`` cluster by its futures API (no graph to build, tokenise or
        optimise). Each block is held (:class:`_Held`) on one worker, chosen once so that the
        workers hold about equal nonzeros per thread (:func:`_balanced`: the benchmark's ten
        blocks had landed six and four on two workers, whose sweeps then waited for one worker's
        sixth block); from the pass after :data:`HELD_BUILD_AFTER` on, a sparse block is
        held with its tiled copy when numba is wanted. One task per worker runs its blocks'
        parts of the sweep with that worker's copy of ``x`` (one small task per worker) and adds
        their column sums. Returns ``(lines, c)`` as the graph's sweep does; None when the blocks
        have no futures of this client (the graph's sweep then)."""
        blocks = self._block_futures(client)
        if blocks is None:
            return None
        at, held = self._holding(client, blocks)
        x = np.ascontiguousarray(x, self.dtype)
        copies = {a: client.submit(_identity, x, workers=[a] if a else None, pure=False) for a in set(at)}
        targets = self._sent_targets(client, p, at)
        if w == 1.0:  # the plain rule does not read the old scaling: the targets stand in for it
            olds = targets
        else:
            old = np.ascontiguousarray(old, self.dtype)
            olds = [old[start:stop] for start, stop in zip(self.offsets[:-1], self.offsets[1:], strict=True)]
        # one task per worker over the blocks it holds (their column sums added there); a block
        # whose worker is unknown gets a task of its own
        groups: dict = {}
        for i, a in enumerate(at):
            groups.setdefault(a if a else ("any", i), []).append(i)
        tasks = [client.submit(_worker_blocks, [held[i] for i in g], copies[at[g[0]]], [olds[i] for i in g],
                               [targets[i] for i in g], w, self.compiled, pure=False,
                               workers=[at[g[0]]] if at[g[0]] else None, allow_other_workers=False)
                 for g in groups.values()]
        if len(tasks) * self.shape[1] <= CLIENT_SUM_MAX:  # every worker's results to the client
            wanted = tasks
        else:  # the column sums added by a tree on the workers
            partials = [client.submit(_item, t, 1, pure=False) for t in tasks]
            while len(partials) > 1:
                partials = [client.submit(_added, *partials[i:i + SPLIT_EVERY], pure=False)
                            for i in range(0, len(partials), SPLIT_EVERY)]
            wanted = [client.submit(_item, t, 0, pure=False) for t in tasks] + partials
        got = pinned_results(client, wanted, {a for a in at if a}, tasks)
        if got is None:  # a worker left during the sweep: hold the blocks again where they are now
            self._held = self._where = None
            return self._submitted(client, x, old, p, w)
        if wanted is tasks:
            parts, c = got, _added(*[part[1] for part in got])
        else:
            parts, c = [(part,) for part in got[:-1]], got[-1]
        lines: list = [None] * len(at)
        for g, part in zip(groups.values(), parts, strict=True):
            for i, line in zip(g, part[0], strict=True):
                lines[i] = line
        return lines, c

    def _holding(self, client, blocks: list) -> tuple[list, list]:
        """The worker holding each block for the sweeps (:func:`_balanced`) and the held blocks'
        futures (:class:`_Held`; with their tiled copies from pass :data:`HELD_BUILD_AFTER` on)."""
        where = self._placement()
        if self._held is None or self._held[0] is not where:  # first, or a worker left: hold them again
            at = _balanced(where, self.block_nnz, self._threads)
            held = [client.submit(_hold, b, bool(a) and (not h or a not in h),
                                  key=f"databalance-held-{uuid.uuid4().hex}", workers=[a] if a else None,
                                  allow_other_workers=bool(a), pure=False)
                    for b, a, h in zip(blocks, at, where, strict=True)]
            self._held = (where, at, held, False)
            self._held_after = self.passes + HELD_BUILD_AFTER
        where, at, held, tiled = self._held
        if (not tiled and self.sparse and self.passes >= self._held_after
                and self.dtype in (np.float32, np.float64) and _numba_wanted()):
            held = [client.submit(_tiled, h, key=f"databalance-tiled-{uuid.uuid4().hex}",
                                  workers=[a] if a else None, allow_other_workers=bool(a), pure=False)
                    for h, a in zip(held, at, strict=True)]
            self._held = (where, at, held, True)
        return at, held

    def _rows_sweep(self, client, x, old, p) -> tuple | None:
        """A plain sweep whose rows stay on the workers: one :func:`_worker_rows` task per worker over
        the blocks it holds (``x`` sent with it), reading the old scaling where the previous sweep
        left it; its result sends the client only the column sums and the rows' errors
        (:class:`_Swept`). Returns ``(r, u, c)``, ``r`` and ``u`` as :class:`_Rows`; None when the
        blocks have no futures of this client."""
        blocks = self._block_futures(client)
        if blocks is None:
            return None
        at, held = self._holding(client, blocks)
        x = np.ascontiguousarray(x, self.dtype)
        targets = self._sent_targets(client, p, at)
        groups: dict = {}
        for i, a in enumerate(at):
            groups.setdefault(a if a else ("any", i), []).append(i)
        prev, olds = self._old_rows(old, at)
        tasks = []
        for g in groups.values():
            pin = {"workers": [at[g[0]]] if at[g[0]] else None, "allow_other_workers": False, "pure": False}
            reads = sorted({olds[i][0] for i in g if isinstance(olds[i], tuple)})
            where = {k: n for n, k in enumerate(reads)}
            firsts = np.cumsum([0] + [prev[1][k] for k in reads]).tolist()
            mine = [firsts[where[olds[i][0]]] + olds[i][1] if isinstance(olds[i], tuple) else olds[i] for i in g]
            tasks.append(client.submit(_worker_rows, [held[i] for i in g], x, [prev[0][k] for k in reads], mine,
                                       [targets[i] for i in g], self.compiled, **pin))
        # The last sweep's futures released now, after this one's submission: a release just before
        # it (the loop drops the last sweep's scaling as it installs the next) held the submission
        # back by the client's batched-send interval (10 ms in distributed 2026.8).
        self._last = tasks
        every = list(tasks)
        if len(tasks) * self.shape[1] <= CLIENT_SUM_MAX:  # every worker's column sums to the client
            wanted = tasks
        else:  # the column sums added by a tree on the workers
            partials = [client.submit(_sums_of, t, pure=False) for t in tasks]
            every += partials
            while len(partials) > 1:
                partials = [client.submit(_added, *partials[i:i + SPLIT_EVERY], pure=False)
                            for i in range(0, len(partials), SPLIT_EVERY)]
                every += partials
            wanted = [client.submit(_errors_of, t, pure=False) for t in tasks] + partials
            every += wanted
        try:
            got = pinned_results(client, wanted, {a for a in at if a}, every)
        except _LinesLost:  # the old scaling's lines were spilled: sent from the client instead
            return self._rows_sweep(client, x, np.asarray(old), p) if isinstance(old, _Rows) else None
        if got is None:  # a worker left during the sweep: hold the blocks again where they are now
            self._held = self._where = None
            return self._rows_sweep(client, x, old, p)
        if wanted is tasks:
            c, errors = _added(*[part.c for part in got]), [(part.before, part.after) for part in got]
        else:
            c, errors = got[-1], got[:-1]
        before, after = (np.float64(sum(e[k] for e in errors)) for k in (0, 1))
        sweep = _Sweep(self, tasks, list(groups.values()), at, x, self._target_array(p), (before, after), old)
        m = self.shape[0]
        c = np.asarray(c).astype(self.dtype, copy=False)
        return _Rows(sweep, 0, self.dtype, m), _Rows(sweep, 1, self.dtype, m), c

    def _old_rows(self, old, at: list) -> tuple[tuple[list, list], list]:
        """The old scaling as a sweep's tasks read it: ``((futures, their blocks' counts), olds)`` with
        ``olds[i]`` block i's old scaling, or ``(k, j)``: line j of ``futures[k]``'s result, where
        the previous sweep (same placement) left it; else every block's slice of ``old``, sent."""
        if isinstance(old, _Rows) and old.which == 1 and old.sweep.kernel is self and old.sweep.at is at:
            sweep = old.sweep
            olds: list = [None] * len(at)
            for k, g in enumerate(sweep.groups):
                for j, i in enumerate(g):
                    olds[i] = (k, j)
            return (sweep.tasks, [len(g) for g in sweep.groups]), olds
        old = np.ascontiguousarray(old, self.dtype)  # fetched from the workers, or recomputed
        return ([], []), [old[start:stop] for start, stop in zip(self.offsets[:-1], self.offsets[1:], strict=True)]

    def margin_l1(self, scaling, sums, target, batch_ndim: int, scratch=None, xp=None):
        """The loop's marginal error (:func:`databalance._ipf.l1`); the rows' of a sweep whose rows
        stayed on the workers measured there (:func:`_worker_rows`, to rounding: summed per block)."""
        from .._ipf import l1

        if isinstance(sums, _Rows) and sums.which == 0:
            sweep = sums.sweep
            if isinstance(scaling, _Rows) and scaling.sweep is sweep and scaling.which == 1:
                return sweep.errors[1]
            if sweep.old is not None and sweep.old() is scaling:
                return sweep.errors[0]
        if isinstance(sums, _Rows) or isinstance(scaling, _Rows):
            scratch = None
        return l1(scaling if not isinstance(scaling, _Rows) else np.asarray(scaling),
                  sums if not isinstance(sums, _Rows) else np.asarray(sums), target, batch_ndim, scratch, xp)

    def export(self, state, scales):
        """The scalings of ``state`` exported (those left on the workers fetched first)."""
        factors = [np.asarray(f) if isinstance(f, _Rows) else f for f in state.factors]
        return super().export(dataclasses.replace(state, factors=factors), scales)

    def _block_futures(self, client) -> list | None:
        """The blocks' futures (the persisted table's), None when they are not this client's."""
        if self._futures is None:
            from distributed import futures_of

            by_key = {f.key: f for f in futures_of(self.table) if f.client is client}
            self._futures = [by_key.get(b.key) for b in self.blocks]
        return None if any(f is None for f in self._futures) else self._futures

    def _sent_targets(self, client, p, at: list) -> list:
        """Each block's slice of the rows' targets, sent once to the worker holding the block (again
        when the targets or the placement change)."""
        if self._sent is None or self._sent[0] is not p or self._sent[1] is not at:
            q = self._target_array(p)
            self._sent = (p, at, [client.submit(_aligned, q[start:stop], workers=[a] if a else None,
                                                allow_other_workers=bool(a), pure=False)
                                  for start, stop, a in zip(self.offsets[:-1], self.offsets[1:], at, strict=True)])
        return self._sent[2]

    def release(self) -> None:
        """Drop the futures this kernel made on the cluster (the held blocks' tiled copies, the
        targets' slices): the workers free them."""
        self._held = self._sent = None
        self._last = []

    def _placement(self) -> list:
        """Per block, the workers holding it under an active ``distributed`` client (else None),
        asked again when one of them has left the cluster (a replaced worker: its blocks were
        recomputed elsewhere, and a task pinned to it would wait for it forever)."""
        client = active_client()
        if client is None:
            return [None] * len(self.blocks)
        workers = client.scheduler_info().get("workers", {})
        held = self._held[1] if self._held is not None else ()
        if (self._where is None or any(w not in workers for where in self._where if where for w in where)
                or any(a is not None and a not in workers for a in held)):
            from distributed import futures_of

            who = client.who_has(futures_of(self.table))
            self._where = [[w for w in who.get(b.key, ()) if w in workers] or None for b in self.blocks]
            self._threads = {w: int(info.get("nthreads", 1)) for w, info in workers.items()}
        return self._where

    def _target_array(self, p) -> np.ndarray:
        """The rows' targets as one array (the loop passes the same target array in every sweep)."""
        if self._array is None or self._array[0] is not p:
            self._array = (p, np.ascontiguousarray(np.broadcast_to(p, self.shape[:1])))
        return self._array[1]

    def _target_slices(self, p) -> tuple[list, np.ndarray]:
        """Each block's slice of the rows' targets, sent to the workers once and kept there; and
        the targets as one array."""
        q = self._target_array(p)
        if self._targets is None or self._targets[0] is not p:
            slices = [_delayed(q[start:stop], pure=True) for start, stop in
                      zip(self.offsets[:-1], self.offsets[1:], strict=True)]
            self._targets = (p, list(dask.persist(*slices)))
        return self._targets[1], q


def support_pattern_chunked(table: da.Array) -> sp.csr_array:
    blocks = dask.compute(*table.to_delayed().ravel())
    parts = [support_pattern_sparse(b) if sp.issparse(b) else support_pattern_dense(np.asarray(b)) for b in blocks]
    pattern = sp.csr_array(sp.vstack(parts, format="csr"))
    pattern.sort_indices()
    return pattern


def _scaled_block(block, u, v, block_info=None):
    start, stop = block_info[0]["array-location"][0]
    if sp.issparse(block):
        return scaled_sparse(_csr(block), u[start:stop], v)
    out = np.multiply(block, u[start:stop, None])
    out *= v[None, :]
    return out


def scaled_chunked(table: da.Array, u: np.ndarray, v: np.ndarray) -> da.Array:
    """``diag(u) @ table @ diag(v)`` as a lazy Dask array with the table's blocks (sparse blocks stay
    sparse)."""
    return da.map_blocks(_scaled_block, table, u, v, dtype=np.result_type(table.dtype, u.dtype), meta=table._meta)
