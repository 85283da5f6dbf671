"""The fused sparse kernels (numba): threaded sweeps over a CSR or CSC table, never densified.

A sweep needs the lead margin's sums ``r = T v`` (rows for CSR, columns for CSC: the lines stored
contiguously), the new scaling ``u = rule(p, r)``, then the other margin's sums ``c = T' u``. The
lead pass is a threaded gather over blocks of lead lines of about equal nonzeros. The other
margin's sums, by layout:

* ``"transposed"``: the table's pattern in the other order (CSC for a CSR table, CSR for a CSC
  table: one index array of lead-line numbers, the other lines' pointers and the values in that
  order), built once per kernel by a threaded counting sort; ``c`` is then a second threaded
  gather. Every sum is made by one thread in a fixed order, so the results do not depend on the
  thread count. Costs one more copy of the values and indices (the size of the table) and the
  build (several scipy sweeps).
* ``"tiled"``: a copy of the table cut into tiles of at most :data:`TILE_LEAD` lead lines by
  :data:`TILE_OTHER` other lines, stored block of other lines by block (each block's tiles in
  lead-line order), each entry's value and its two 16-bit numbers within the tile (as many bytes
  as the table's own values and 32-bit indices), built by a threaded counting sort. ``c`` is then
  summed one block of other lines at a time into a float64 accumulator of TILE_OTHER lines that
  stays in the core's L2 cache, while the lead lines' scalings are read in ascending order:
  no access goes at random into the whole of ``u``. Each block is summed by one thread in a fixed
  order, so the results do not depend on the thread count. Same memory as ``"transposed"``, a
  quicker build, a quicker other pass (benchmarks/bench_sparse.py). Tables whose tiles would hold
  too few nonzeros each (:func:`tiling`) get the transposed pattern instead.
* ``"adaptive"`` (the default): scipy's ``T' u`` for the first :data:`BUILD_AFTER` passes, then as
  ``"tiled"``: short runs do not pay for the build, long runs get the two threaded passes.
* ``"accumulators"``: one pass over the lead lines that gathers ``r_i``, computes ``u_i`` and
  scatters line ``i`` times ``u_i`` into a per-thread accumulator of the other margin's sums while
  the line is in cache. No extra memory beyond the accumulators; but each scattered update is a
  random access into a vector of the other margin's length, which costs as much as a gather, so
  fusing saves only the second streaming read (benchmarks/bench_sparse.py measures it).

The cost of a sparse sweep is the random access into the scaling vectors (one per nonzero per
half-step), not the bytes of the table: a streaming read of values and indices takes a fraction of
either product. :func:`auto_choice` says whether ``DATABALANCE_KERNEL=auto`` uses these kernels.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import cache, cached_property
from typing import NamedTuple

import numpy as np

from .. import _validation as check
from .fused import PER_THREAD, _Fused, _line_dot, _rule, _starts, _using, compiled, prange, threads
from .sparse import SparseKernel

__all__ = ["AUTO_MIN_NNZ", "BUILD_AFTER", "DEFAULT_LAYOUT", "LAYOUTS", "TILE_LEAD", "TILE_OTHER", "FusedSparseKernel",
           "Tiles", "auto_choice", "tiled_pattern", "tiling", "transposed_pattern"]

#: The layouts of :class:`FusedSparseKernel`.
LAYOUTS = ("adaptive", "tiled", "transposed", "accumulators")

#: Lead lines per tile of the ``"tiled"`` layout (at most 2**16: a line's number within its tile is
#: stored in 16 bits).
TILE_LEAD = 1 << 16

#: Other lines per tile of the ``"tiled"`` layout (at most 2**16): the float64 accumulator of one
#: block of other lines (256 KB) stays in a core's L2 cache.
TILE_OTHER = 1 << 15

#: The ``"tiled"`` layout cuts the other lines into at least this many blocks (narrower tiles on
#: narrow tables), so that every thread has blocks to sum.
TILE_BLOCKS = 8

#: The ``"tiled"`` layout is used when its tiles average at least this many nonzeros (or there are
#: at most 4096 tiles); else the transposed pattern (a tile's overhead is a pointer and a loop).
TILE_MIN_NNZ = 16

#: The layout a :class:`FusedSparseKernel` uses when none is given.
DEFAULT_LAYOUT = "adaptive"

#: The ``"adaptive"`` layout builds its copy in its pass number BUILD_AFTER + 1: the tiled copy's
#: build took 0.06-0.1 s at 10^7 nonzeros (0.5 s at 5*10^7) and its other pass saves 10-25 ms
#: (60-100 ms) per pass over scipy's transposed product on two threads, so by then the passes have
#: cost about what the build would have (a run is never much slower than with the better of the
#: two choices made in hindsight). It was 12 with the transposed pattern (a 3-5x slower build).
BUILD_AFTER = 6

#: ``DATABALANCE_KERNEL=auto`` uses the fused sparse kernel from this many nonzeros on, when numba
#: runs on two threads or more. One thread gathers about as fast as scipy's product, so there is
#: nothing to gain; below 2^21 nonzeros a pass runs on one thread (fused.PER_THREAD).
AUTO_MIN_NNZ = 1 << 22


def auto_choice(table) -> bool:
    """Whether ``DATABALANCE_KERNEL=auto`` runs the fused kernel on this CSR/CSC table: with at
    least :data:`AUTO_MIN_NNZ` nonzeros when numba is installed and runs on two threads or more."""
    if table.nnz < AUTO_MIN_NNZ:
        return False
    from .fused import numba_installed

    return numba_installed() and threads() >= 2


# -- the passes (compiled by numba on first use) --------------------------------------------------


def _lead_pass(indptr, indices, data, v, uold, p, w, bounds, r, u):
    """``r = T v`` over the lead lines and the new scaling ``u = rule(p, r)``, line block t by
    thread t. Sums accumulate in float64 and are rounded to the table's dtype before the rule."""
    for t in prange(bounds.size - 1):
        for i in range(bounds[t], bounds[t + 1]):
            r[i] = _line_dot(indptr, indices, data, v, i)
            u[i] = _rule(p[i], r[i], uold[i], w)


def _gather(indptr, indices, data, x, bounds, out):
    """``out = T x`` over the lines of a compressed pattern, line block t by thread t."""
    for t in prange(bounds.size - 1):
        for i in range(bounds[t], bounds[t + 1]):
            out[i] = _line_dot(indptr, indices, data, x, i)


def _scatter_pass(indptr, indices, data, v, uold, p, w, bounds, r, u, acc):
    """One fused pass over the lead lines: ``r = T v``, ``u = rule(p, r)``, ``acc[t] = T' u`` over
    line block t (blocks of about equal nonzeros)."""
    n = acc.shape[1]
    for t in prange(bounds.size - 1):
        a = acc[t]
        for j in range(n):
            a[j] = 0.0
        for i in range(bounds[t], bounds[t + 1]):
            r[i] = _line_dot(indptr, indices, data, v, i)
            u[i] = _rule(p[i], r[i], uold[i], w)
            ui = u[i]
            if ui != 0.0:
                for k in range(indptr[i], indptr[i + 1]):
                    a[indices[k]] += data[k] * ui


def _transpose(indptr, indices, data, bounds, counts, out_ptr, out_idx, out_data):
    """The pattern in the other order (a counting sort): ``counts`` (blocks, other lines) zeros,
    ``out_ptr`` (other lines + 1). Within each other line the lead lines ascend."""
    nb = bounds.size - 1
    for t in prange(nb):
        c = counts[t]
        for k in range(indptr[bounds[t]], indptr[bounds[t + 1]]):
            c[indices[k]] += 1
    _starts(counts, out_ptr)
    for t in prange(nb):
        c = counts[t]
        for i in range(bounds[t], bounds[t + 1]):
            for k in range(indptr[i], indptr[i + 1]):
                j = indices[k]
                pos = c[j]
                out_idx[pos] = i
                out_data[pos] = data[k]
                c[j] = pos + 1


#: The shift and mask of a tiled entry's key: the lead line's number within the tile in the high
#: 16 bits, the other line's in the low 16 (unsigned, so numba skips the wraparound test).
_SHIFT = np.uint64(16)
_MASK = np.uint64(0xFFFF)


def _tile(indptr, indices, data, lead_tile, other_tile, n_lead_blocks, bounds, counts, ptr, keys, out_data):
    """The tiled copy (a counting sort by tile): tile ``b * n_lead_blocks + a`` holds the entries
    of lead-line block ``a`` and other-line block ``b``, in lead-line order (each line's in its
    stored order). ``counts`` (blocks, tiles) zeros; ``ptr`` (tiles + 1)."""
    nb = bounds.size - 1
    for t in prange(nb):
        c = counts[t]
        for i in range(bounds[t], bounds[t + 1]):
            a = i // lead_tile
            for k in range(indptr[i], indptr[i + 1]):
                c[(indices[k] // other_tile) * n_lead_blocks + a] += 1
    _starts(counts, ptr)
    for t in prange(nb):
        c = counts[t]
        for i in range(bounds[t], bounds[t + 1]):
            a = i // lead_tile
            high = (i - a * lead_tile) << _SHIFT
            for k in range(indptr[i], indptr[i + 1]):
                j = indices[k]
                b = j // other_tile
                s = b * n_lead_blocks + a
                pos = c[s]
                keys[pos] = high | (j - b * other_tile)
                out_data[pos] = data[k]
                c[s] = pos + 1


def _tiled_gather(ptr, keys, data, x, lead_tile, other_tile, n_lead_blocks, n_other, groups, out):
    """``out = T' x`` (the other lines' sums) from the tiled copy: the blocks of other lines of
    group t by thread t, each summed in a float64 accumulator over its tiles in lead-block order."""
    for t in prange(groups.size - 1):
        acc = np.empty(other_tile)
        for b in range(groups[t], groups[t + 1]):
            for j in range(other_tile):
                acc[j] = 0.0
            for a in range(n_lead_blocks):
                base = a * lead_tile
                s = b * n_lead_blocks + a
                for k in range(ptr[s], ptr[s + 1]):
                    key = np.uint64(keys[k])
                    acc[key & _MASK] += data[k] * x[base + (key >> _SHIFT)]
            lo = b * other_tile
            for j in range(min(other_tile, n_other - lo)):
                out[lo + j] = acc[j]


def _l1(scaling, sums, target, rounded):
    """``sum |scaling * sums - target|`` with each difference rounded by ``rounded`` (the product's
    NumPy type: NumPy subtracts in place in the product's dtype), accumulated in float64."""
    total = 0.0
    for i in range(sums.size):
        total += abs(rounded(scaling[i] * sums[i] - target[i]))
    return total


@cache
def _jitted_l1():
    import numba

    # no "contract": a fused multiply-add would skip the rounding of the product that NumPy does
    return numba.njit(_l1, cache=True, fastmath={"reassoc", "nsz"})


#: Lines from which :meth:`FusedSparseKernel.margin_l1` measures in numba (one pass over three
#: vectors, not NumPy's four).
L1_MIN_LINES = 1 << 14


# -- helpers ------------------------------------------------------------------------------------------


def _block_bounds(indptr: np.ndarray, nblocks: int) -> np.ndarray:
    """Line block boundaries with about equal nonzeros in each block (unsigned 64-bit)."""
    goals = (np.arange(nblocks + 1, dtype=np.int64) * int(indptr[-1])) // nblocks  # integers: no float copy
    bounds = np.searchsorted(indptr, goals.astype(indptr.dtype), side="left").astype(np.int64)
    bounds[0], bounds[-1] = 0, indptr.size - 1
    return np.maximum.accumulate(bounds).view(np.uint64)


def _unsigned(a: np.ndarray) -> np.ndarray:
    """A nonnegative index array viewed as unsigned: numba then skips the wraparound test of every
    gathered index (1.7x faster gathers)."""
    a = np.ascontiguousarray(a)
    if not a.dtype.isnative:  # scipy keeps an index array assigned in another byte order as is
        a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype.kind == "u":
        return a
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def _index_dtype(bound: int) -> np.dtype:
    return np.dtype(np.uint32 if bound < 2**32 else np.uint64)


def available_memory() -> float:
    """Bytes of memory available to this process: Linux's MemAvailable (free memory and the page
    cache it can drop), at most what the process's cgroup (v2 or v1) still allows; elsewhere the
    free pages (infinite where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            meminfo = {line.split(":")[0]: line.split()[1] for line in f}
        available = float(meminfo["MemAvailable"]) * 1024
    except (OSError, KeyError, IndexError, ValueError):
        try:
            available = float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return float("inf")
    return min(available, _cgroup_headroom())


def _cgroup_headroom() -> float:
    """Bytes the process's memory cgroup still allows (infinite without a limit)."""
    v1 = "/sys/fs/cgroup/memory/memory."
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         (v1 + "limit_in_bytes", v1 + "usage_in_bytes")):
        try:
            with open(limit) as f, open(usage) as g:
                cap = f.read().strip()
                if cap != "max" and int(cap) < 1 << 60:
                    return float(int(cap) - int(g.read().strip()))
        except (OSError, ValueError):
            continue
    return float("inf")


def _nblocks(nnz: int) -> int:
    """Blocks (threads) for a pass over ``nnz`` nonzeros: one per PER_THREAD, at most numba's
    thread count."""
    return min(threads(), max(1, nnz // PER_THREAD))


def transposed_pattern(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, n_other: int,
                       nblocks: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The compressed pattern ``(indptr, indices, data)`` of a CSR/CSC pattern's transpose (CSC of
    a CSR), with unsigned indices, sorted within each line; built by a threaded counting sort.

    Parameters
    ----------
    indptr, indices, data : numpy.ndarray
        A compressed sparse pattern over ``indptr.size - 1`` lines; ``indices`` in
        ``range(n_other)`` (any order within a line).
    n_other : int
        The number of lines of the transpose.
    nblocks : int, optional
        Threads' blocks of lines (default: numba's thread count, one block per 2**20 nonzeros).

    Returns
    -------
    tuple of numpy.ndarray
        ``(ptr, idx, values)``: ``ptr`` (n_other + 1), ``idx`` the lines of the original pattern,
        ascending within each line of the transpose, ``values`` in that order.

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp
    >>> from databalance._kernels.fused_sparse import transposed_pattern
    >>> A = sp.csr_array(np.array([[1.0, 0, 2], [0, 3, 4]]))
    >>> ptr, idx, val = transposed_pattern(A.indptr, A.indices, A.data, 3)
    >>> ptr.tolist(), idx.tolist(), val.tolist()
    ([0, 1, 2, 4], [0, 1, 0, 1], [1.0, 3.0, 2.0, 4.0])
    """
    m = indptr.size - 1
    nnz = int(indptr[-1])
    nb = _nblocks(nnz) if nblocks is None else nblocks
    counts = np.zeros((nb, n_other), np.int64)
    ptr = np.empty(n_other + 1, _index_dtype(nnz))
    idx = np.empty(nnz, _index_dtype(m))
    values = np.empty(nnz, data.dtype)
    with _using(min(nb, threads())):
        compiled(_transpose)(_unsigned(indptr), _unsigned(indices), data, _block_bounds(indptr, nb), counts,
                             ptr, idx, values)
    return ptr, idx, values


class Tiles(NamedTuple):
    """The ``"tiled"`` layout's copy of a table (:func:`tiled_pattern`)."""

    ptr: np.ndarray  #: (tiles + 1,) int64: tile ``b * n_lead_blocks + a`` is ``ptr[s]:ptr[s + 1]``
    keys: np.ndarray  #: (nnz,) uint32: line number within the tile, lead (high 16 bits) and other
    values: np.ndarray  #: (nnz,) the values in that order
    lead_tile: int  #: lead lines per tile
    other_tile: int  #: other lines per tile
    n_lead_blocks: int
    n_other_blocks: int


def tiling(n_lead: int, n_other: int, nnz: int) -> tuple[int, int] | None:
    """The tile (lead lines, other lines) of the ``"tiled"`` layout for a table with these lines
    and nonzeros: :data:`TILE_LEAD` by :data:`TILE_OTHER`, narrower so that the other lines make
    at least :data:`TILE_BLOCKS` blocks; None when the tiles would average fewer than
    :data:`TILE_MIN_NNZ` nonzeros (and be more than 4096).

    Examples
    --------
    >>> from databalance._kernels.fused_sparse import tiling
    >>> tiling(10**6, 10**6, 10**7)
    (65536, 32768)
    >>> tiling(10**6, 1000, 10**6)
    (65536, 125)
    >>> tiling(10**9, 10**9, 10**9) is None
    True
    """
    lead = max(1, min(TILE_LEAD, n_lead))
    other = max(1, min(TILE_OTHER, -(-n_other // TILE_BLOCKS)))
    tiles = -(-n_lead // lead) * -(-n_other // other)
    return (lead, other) if tiles <= max(4096, nnz // TILE_MIN_NNZ) else None


def tiled_pattern(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, n_other: int,
                  tile: tuple[int, int] | None = None, nblocks: int | None = None) -> Tiles:
    """The ``"tiled"`` layout's copy of a CSR/CSC pattern, built by a threaded counting sort.

    Parameters
    ----------
    indptr, indices, data : numpy.ndarray
        A compressed sparse pattern over ``indptr.size - 1`` lead lines; ``indices`` in
        ``range(n_other)`` (any order within a line).
    n_other : int
        The number of other lines.
    tile : tuple of int, optional
        Lead lines and other lines per tile, each at most 2**16 (default: :func:`tiling`'s, or
        :data:`TILE_LEAD` by :data:`TILE_OTHER`).
    nblocks : int, optional
        Threads' blocks of lead lines for the build (default: numba's thread count, one block per
        2**20 nonzeros). The copy does not depend on it.

    Returns
    -------
    Tiles
        The tile pointers, the entries' keys (lead line within the tile << 16 | other line within
        the tile), the values in that order and the tiling. Tiles are stored block of other lines
        by block, each block's tiles in lead-block order, each tile's entries in lead-line order.

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp
    >>> from databalance._kernels.fused_sparse import tiled_pattern
    >>> A = sp.csr_array(np.array([[1.0, 0, 2], [0, 3, 4]]))
    >>> t = tiled_pattern(A.indptr, A.indices, A.data, 3, tile=(1, 2))
    >>> t.ptr.tolist(), t.values.tolist()  # tiles (lines 0, others 0-1), (1, 0-1), (0, 2), (1, 2)
    ([0, 1, 2, 3, 4], [1.0, 3.0, 2.0, 4.0])
    >>> [(int(k) >> 16, int(k) & 0xFFFF) for k in t.keys]
    [(0, 0), (0, 1), (0, 0), (0, 0)]
    """
    m = indptr.size - 1
    nnz = int(indptr[-1])
    lead, other = tile or tiling(m, n_other, nnz) or (TILE_LEAD, TILE_OTHER)
    if not (0 < lead <= 1 << 16 and 0 < other <= 1 << 16):
        raise ValueError(check.tile_size(lead, other))
    n_lead_blocks, n_other_blocks = max(1, -(-m // lead)), max(1, -(-n_other // other))
    nb = _nblocks(nnz) if nblocks is None else nblocks
    counts = np.zeros((nb, n_lead_blocks * n_other_blocks), np.int64)
    ptr = np.empty(n_lead_blocks * n_other_blocks + 1, np.int64)
    keys = np.empty(nnz, np.uint32)
    values = np.empty(nnz, data.dtype)
    u64 = np.uint64
    with _using(min(nb, threads())):
        compiled(_tile)(_unsigned(indptr), _unsigned(indices), data, u64(lead), u64(other), u64(n_lead_blocks),
                        _block_bounds(indptr, nb), counts, ptr, keys, values)
    return Tiles(ptr, keys, values, lead, other, n_lead_blocks, n_other_blocks)


# -- the kernel ---------------------------------------------------------------------------------------


def line_products(table) -> tuple[Callable, Callable]:
    """``(x -> T x, y -> T' y)`` for a CSR/CSC table and 1-D or 2-D (one column per product)
    ``x``, ``y`` in float64: the kernel's threaded gathers, the other margin's from its copy of the
    table, built on the first such product when the memory allows (else scipy's product). For
    chains of products (:func:`databalance.variance_profile`, sparse
    :func:`databalance.spectrum`) where :func:`~databalance._kernels.fused.which_kernel` chooses
    numba."""
    K = FusedSparseKernel(table, "adaptive", build_after=0)

    def by_columns(j: int) -> Callable:
        def product(x: np.ndarray) -> np.ndarray:
            x = np.asarray(x, np.float64)
            if x.ndim == 1:
                return K._sums_of(j, x).astype(np.float64, copy=False)
            return np.column_stack([K._sums_of(j, np.ascontiguousarray(c)) for c in x.T]).astype(np.float64, copy=False)
        return product

    return by_columns(0), by_columns(1)


class FusedSparseKernel(_Fused, SparseKernel):
    """:class:`SparseKernel` on CSR or CSC with threaded sweeps (numba), in one of :data:`LAYOUTS`.

    ``"tiled"`` and ``"transposed"`` build their copy of the table on the first product that
    needs it; then every product (the sweeps' and :meth:`row_sums` / :meth:`col_sums`) is threaded:
    the lead margin's sums a gather over the lines as stored, the other margin's sums from the
    copy. ``"adaptive"`` gathers the lead margin's sums by numba and the other margin's by scipy
    until :data:`BUILD_AFTER` passes have run, then builds the tiled copy (a short run never pays
    for it). ``"accumulators"`` fuses each sweep into one pass with per-thread accumulators.
    """

    def __init__(self, table, layout: str | None = None, build_after: int | None = None):
        super().__init__(table)
        self.build_after = build_after  # None: BUILD_AFTER
        self.layout = check.sparse_layout(DEFAULT_LAYOUT if layout is None else layout, LAYOUTS)
        self.lead = 0 if table.format == "csr" else 1
        self.reads = 0
        self.generation = 0
        self.passes = 0  # fused passes run
        self._bounds: dict[tuple[int, int], np.ndarray] = {}
        self._refused = False  # the adaptive copy's build ran out of memory: scipy's products

    @cached_property
    def _lines(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The lead lines' pattern as stored, indices viewed as unsigned (no copy)."""
        T = self.table
        return _unsigned(T.indptr), _unsigned(T.indices), T.data

    @cached_property
    def _other_lines(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The other margin's lines: the transposed pattern, built once."""
        ptr, indices, data = self._lines
        return transposed_pattern(ptr, indices, data, self.shape[1 - self.lead])

    @cached_property
    def _tiles(self) -> Tiles:
        """The tiled copy, built once."""
        ptr, indices, data = self._lines
        return tiled_pattern(ptr, indices, data, self.shape[1 - self.lead], self.tile)

    @cached_property
    def tile(self) -> tuple[int, int] | None:
        """The tile (lead lines, other lines) of the tiled copy, None when this kernel's copy is the
        transposed pattern (layout ``"transposed"``, or tiles too sparse: :func:`tiling`)."""
        if self.layout not in ("tiled", "adaptive"):
            return None
        return tiling(self.shape[self.lead], self.shape[1 - self.lead], self.table.nnz)

    def built(self) -> bool:
        """Whether the other margin's sums come from the kernel's copy of the table, the tiled copy
        or the transposed pattern (built now if the layout says it is time: for ``"adaptive"``,
        after :data:`BUILD_AFTER` passes, when the build takes at most half of the memory
        available; scipy's products stay if it runs out of memory all the same)."""
        if self.layout in ("tiled", "transposed") or "_tiles" in self.__dict__ or "_other_lines" in self.__dict__:
            return True
        after = BUILD_AFTER if self.build_after is None else self.build_after
        if not (self.layout == "adaptive" and self.passes >= after and not self._refused
                and 2 * self.build_bytes() <= available_memory()):
            return False
        try:
            self._tiles if self.tile is not None else self._other_lines  # noqa: B018 -- built here
        except MemoryError:  # scipy's products then, as when the memory looked short
            self._refused = True
            return False
        return True

    def copy_bytes(self) -> int:
        """The memory the copy takes: about the table's own."""
        nnz, lines = self.table.nnz, self.shape[1 - self.lead]
        m = self.shape[self.lead]
        return nnz * (self.dtype.itemsize + 4) + 8 * (self._pointers() + 1) if self.tile is not None else (
            nnz * (self.dtype.itemsize + _index_dtype(m).itemsize) + (lines + 1) * _index_dtype(nnz).itemsize)

    def build_bytes(self) -> int:
        """The memory the copy's build takes at its peak: the copy and the counting sort's counters
        (one per block of nonzeros and tile, or other line)."""
        return self.copy_bytes() + 8 * _nblocks(self.table.nnz) * self._pointers()

    def _pointers(self) -> int:
        """Tiles of the tiled copy, or lines of the transposed pattern."""
        lines, m = self.shape[1 - self.lead], self.shape[self.lead]
        return -(-m // self.tile[0]) * -(-lines // self.tile[1]) if self.tile is not None else lines

    def _line_bounds(self, which: int, indptr: np.ndarray, nblocks: int) -> np.ndarray:
        key = (which, nblocks)
        if key not in self._bounds:
            self._bounds[key] = _block_bounds(indptr, nblocks)
        return self._bounds[key]

    def _gathered(self, j: int, x: np.ndarray) -> np.ndarray:
        """Margin ``j``'s sums with the other margin's scaling ``x``: a threaded gather (from the
        tiled copy for the other margin when there is one)."""
        if j != self.lead and self.tile is not None:
            return self._tiled_sums(x)
        indptr, indices, data = self._lines if j == self.lead else self._other_lines
        nb = _nblocks(data.size)
        out = np.empty(indptr.size - 1, self.dtype)
        with _using(nb):
            compiled(_gather)(indptr, indices, data, np.ascontiguousarray(x, self.dtype),
                              self._line_bounds(j, indptr, nb), out)
        return out

    def _tiled_sums(self, x: np.ndarray) -> np.ndarray:
        """The other margin's sums from the tiled copy, its blocks of other lines shared among the
        threads in groups of about equal nonzeros."""
        t = self._tiles
        nb = min(_nblocks(t.values.size), t.n_other_blocks)
        n_other = self.shape[1 - self.lead]
        key = (2, nb)
        if key not in self._bounds:
            self._bounds[key] = _block_bounds(t.ptr[::t.n_lead_blocks], nb)
        out = np.empty(n_other, self.dtype)
        u64 = np.uint64
        with _using(nb):
            compiled(_tiled_gather)(t.ptr, t.keys, t.values, np.ascontiguousarray(x, self.dtype), u64(t.lead_tile),
                                    u64(t.other_tile), u64(t.n_lead_blocks), u64(n_other), self._bounds[key], out)
        return out

    def _sums_of(self, j: int, x):
        """Margin ``j``'s sums with the other margin's scaling ``x``: gathered by numba when the
        layout has the lines of margin ``j``, else scipy's product."""
        if getattr(x, "ndim", 0) == 1 and self.layout != "accumulators" and (j == self.lead or self.built()):
            return self._gathered(j, x)
        return SparseKernel.row_sums(self, x) if j == 0 else SparseKernel.col_sums(self, x)

    def row_sums(self, v):
        return self._sums_of(0, v)

    def col_sums(self, u):
        return self._sums_of(1, u)

    def margin_l1(self, scaling, sums, target, batch_ndim: int, scratch=None, xp=None):
        """The loop's marginal error ``sum |scaling * sums - target|`` (:func:`databalance._ipf.l1`),
        in one numba pass over the vectors when they are long (to rounding: another summation
        order)."""
        if (xp is None and batch_ndim == 0 and sums.size >= L1_MIN_LINES
                and all(isinstance(a, np.ndarray) and a.ndim == 1 and a.size == sums.size
                        for a in (scaling, sums, target))):
            rounded = np.result_type(scaling, sums).type
            return np.float64(_jitted_l1()(scaling, sums, target, rounded))
        from .._ipf import l1

        return l1(scaling, sums, target, batch_ndim, scratch, xp)

    def _pass(self, x, old, p, omega):
        indptr, indices, data = self._lines
        m, l = self.shape if self.lead == 0 else self.shape[::-1]
        nb = _nblocks(data.size)
        bounds = self._line_bounds(self.lead, indptr, nb)
        r = np.empty(m, self.dtype)
        u = np.empty(m, self.dtype)
        w = 1.0 if omega is None else float(np.asarray(omega).reshape(-1)[0])
        args = (indptr, indices, data, np.ascontiguousarray(x), np.ascontiguousarray(old),
                np.ascontiguousarray(p), w, bounds, r, u)
        if self.layout != "accumulators":
            with _using(nb):
                compiled(_lead_pass)(*args)
            c = self._sums_of(1 - self.lead, u)
        else:
            acc = np.empty((nb, l))
            with _using(nb):
                compiled(_scatter_pass)(*args, acc)
            c = (acc[0] if nb == 1 else acc.sum(axis=0)).astype(self.dtype)
        self.passes += 1
        return r, u, c
