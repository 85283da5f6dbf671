"""The fused sparse kernels (CSR/CSC, every layout) against scipy's products through the NumPy path;
the tiled copy and the transposed pattern; 1 and 2 threads; which kernel ``auto`` picks for sparse
tables."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import databalance as db

from .test_fused import SETTINGS, STEPS, assert_same, both, kernel_choice, problems

numba = pytest.importorskip("numba")

from databalance._kernels import fused  # noqa: E402  (after the skip)
from databalance._kernels import fused_sparse as fs  # noqa: E402


@contextlib.contextmanager
def sparse_setup(layout: str, per_thread: int | None = None, nthreads: int | None = None,
                 tile: tuple[int, int] = (5, 3)):
    """The fused sparse kernel's default layout, nonzeros per thread (1: every pass split into as
    many blocks as threads), numba's thread count and the largest tile (small: the small tables
    of the tests make many tiles, the last ones partial, some empty), for the block; the adaptive
    layout builds its copy in the third pass, the loop's errors are measured by numba."""
    old = (fs.DEFAULT_LAYOUT, fs.PER_THREAD, numba.get_num_threads(), fs.L1_MIN_LINES, fs.BUILD_AFTER, fs.TILE_LEAD,
           fs.TILE_OTHER)
    fs.DEFAULT_LAYOUT = layout
    fs.BUILD_AFTER = 2
    fs.L1_MIN_LINES = 1
    fs.TILE_LEAD, fs.TILE_OTHER = tile
    if per_thread is not None:
        fs.PER_THREAD = per_thread
    if nthreads is not None:
        numba.set_num_threads(nthreads)
    try:
        yield
    finally:
        fs.DEFAULT_LAYOUT, fs.PER_THREAD = old[:2]
        numba.set_num_threads(old[2])
        fs.L1_MIN_LINES, fs.BUILD_AFTER, fs.TILE_LEAD, fs.TILE_OTHER = old[3:]


THREADS = st.sampled_from([1, min(2, numba.config.NUMBA_NUM_THREADS)])


@SETTINGS
@given(problems(holes=True), STEPS, st.sampled_from(["csr", "csc"]), st.sampled_from(fs.LAYOUTS), THREADS)
def test_sparse_matches_numpy(problem, steps, fmt, layout, nthreads):
    """Every layout, CSR and CSC, float32 and float64, zero targets and empty lines, split into
    blocks (one nonzero per thread suffices), tiled by 5 x 3 (partial and empty tiles), k steps or
    converged, equals the NumPy path to 1e-12 (float64)."""
    table, p, q = problem
    S = sp.csr_array(table).asformat(fmt)
    # Anderson (acceleration="auto", steps=None) extrapolates the fused kernel's non-lead margin,
    # the columns of a CSC table: there the two paths' iterates differ by design
    acceleration = "none" if fmt == "csc" else "auto"
    with sparse_setup(layout, per_thread=1, nthreads=nthreads):
        a, b = both(db.balance_table, S, p, q, steps=steps, acceleration=acceleration)
    assert_same(a, b, ["row_scaling", "col_scaling"], table.dtype)
    assert b.table.format == fmt


@settings(SETTINGS, max_examples=10)
@given(problems(holes=True), st.sampled_from(["csr", "csc"]), st.integers(1, 9))
def test_transposed_layout_same_bits_on_any_thread_count(problem, fmt, steps):
    """Each sum of the tiled, transposed and adaptive layouts is made by one thread in a fixed order
    (or by scipy): 1 and 2 threads give the same bits; the accumulators' blocks change only the
    rounding."""
    table, p, q = problem
    S = sp.csr_array(table).asformat(fmt)
    out = {}
    for layout in fs.LAYOUTS:
        for nt in (1, 2):
            with sparse_setup(layout, per_thread=1, nthreads=min(nt, numba.config.NUMBA_NUM_THREADS)), \
                    kernel_choice("numba"):
                out[layout, nt] = db.balance_table(S, p, q, steps=steps)
    for name in ("row_scaling", "col_scaling"):
        for layout in ("tiled", "transposed", "adaptive"):
            np.testing.assert_array_equal(getattr(out[layout, 1], name), getattr(out[layout, 2], name))
        x, y = getattr(out["accumulators", 1], name), getattr(out["accumulators", 2], name)
        np.testing.assert_allclose(y, x, rtol=1e-12 if table.dtype == np.float64 else 2e-5)


def random_pattern(rng, m, l, density, dtype=np.float64, big_indptr=False):
    """A CSR with empty rows and columns and unsorted indices within rows."""
    A = sp.random_array((m, l), density=density, format="csr", rng=rng, dtype=dtype)
    A.data += dtype(0.5)
    perm = rng.permutation(A.nnz)  # shuffle within rows: keep each row's block, permute inside
    order = np.lexsort((perm, np.repeat(np.arange(m), np.diff(A.indptr))))
    A = sp.csr_array((A.data[order], A.indices[order], A.indptr), shape=(m, l))
    if big_indptr:
        A.indptr = A.indptr.astype(np.int64)
        A.indices = A.indices.astype(np.int64)
    return A


@pytest.mark.parametrize("nblocks", [1, 2, 3, 7])
@pytest.mark.parametrize("big", [False, True])
def test_transposed_pattern_is_scipys_sorted_csc(nblocks, big):
    rng = np.random.default_rng(nblocks)
    A = random_pattern(rng, 37, 23, 0.15, big_indptr=big)
    A = sp.csr_array(sp.diags_array(np.arange(37) % 5 != 0, dtype=float) @ A)  # empty rows
    A.eliminate_zeros()
    ptr, idx, val = fs.transposed_pattern(A.indptr, A.indices, A.data, 23, nblocks=nblocks)
    C = A.tocsc()
    C.sort_indices()
    np.testing.assert_array_equal(ptr, C.indptr)
    np.testing.assert_array_equal(idx, C.indices)
    np.testing.assert_array_equal(val, C.data)
    assert idx.dtype == np.uint32 and ptr.dtype == np.uint32 and val.dtype == A.dtype


def test_transposed_pattern_of_an_empty_table():
    ptr, idx, val = fs.transposed_pattern(np.zeros(4, np.int32), np.zeros(0, np.int32), np.zeros(0), 3)
    assert ptr.tolist() == [0, 0, 0, 0] and idx.size == 0 and val.size == 0


@pytest.mark.parametrize("fmt", ["csr", "csc"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("layout", fs.LAYOUTS)
def test_products_match_scipy(fmt, dtype, layout):
    """``row_sums`` / ``col_sums`` (the frame's sums, the first sweep, the support checks)."""
    rng = np.random.default_rng(3)
    A = random_pattern(rng, 300, 200, 0.05, dtype).asformat(fmt)
    v, u = rng.random(200).astype(dtype), rng.random(300).astype(dtype)
    with sparse_setup(layout, per_thread=1):
        K = fs.FusedSparseKernel(A)
        rtol = 1e-12 if dtype == np.float64 else 1e-5
        np.testing.assert_allclose(K.row_sums(v), A @ v, rtol=rtol)
        np.testing.assert_allclose(K.col_sums(u), A.T @ u, rtol=rtol)
        assert K.row_sums(v).dtype == dtype


@pytest.mark.parametrize("layout", fs.LAYOUTS)
@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_power_law_rows_and_empty_rows_sparse(layout, fmt):
    """Blocks of equal nonzeros: one row holding most entries, rows with none (zero targets)."""
    rng = np.random.default_rng(2)
    T = np.zeros((60, 50))
    T[7] = rng.random(50) + 0.1
    T[rng.random((60, 50)) < 0.05] = 1.0
    T[:, 0] += 0.5
    T[[3, 11]] = 0.0
    witness = T * rng.uniform(0.5, 2.0, T.shape)  # targets a table on this support has: feasible
    p, q = witness.sum(axis=1), witness.sum(axis=0)
    with sparse_setup(layout, per_thread=1):
        a, b = both(db.balance_table, sp.csr_array(T).asformat(fmt), p, q, acceleration="none")
    assert b.converged
    assert_same(a, b, ["row_scaling", "col_scaling"], np.float64)


def test_overrelaxed_sparse_matches_numpy():
    """The over-relaxed rule (``acceleration``) runs inside the lead pass as in the NumPy path."""
    rng = np.random.default_rng(5)
    A = random_pattern(rng, 80, 60, 0.2)
    A = A + sp.csr_array(np.eye(80, 60))
    p, q = rng.random(80) + 0.1, rng.random(60) + 0.1
    q *= p.sum() / q.sum()
    with sparse_setup("transposed", per_thread=1):
        a, b = both(db.balance_table, A, p, q, acceleration="overrelax", tol=1e-9)
    assert_same(a, b, ["row_scaling", "col_scaling"], np.float64)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_margin_l1_is_the_loops_l1(dtype):
    """The kernel's one-pass marginal error against :func:`databalance._ipf.l1` (NumPy); short or
    batched vectors go to NumPy itself."""
    from databalance._ipf import l1

    rng = np.random.default_rng(4)
    n = fs.L1_MIN_LINES + 3
    x, s, t = rng.random(n).astype(dtype), rng.random(n).astype(dtype), rng.random(n)
    K = fs.FusedSparseKernel(sp.csr_array(np.eye(3)))
    got = K.margin_l1(x, s, t, 0, np.empty(n, dtype))
    assert isinstance(got, np.float64)
    np.testing.assert_allclose(got, l1(x, s, t, 0, np.empty(n, dtype)), rtol=1e-12)
    np.testing.assert_allclose(K.margin_l1(x, s, t.astype(dtype), 0), l1(x, s, t.astype(dtype), 0), rtol=1e-12)
    short = (x[:5], s[:5], t[:5])
    assert K.margin_l1(*short, 0) == l1(*short, 0)
    batched = (x.reshape(1, -1), s.reshape(1, -1), t.reshape(1, -1))
    np.testing.assert_array_equal(K.margin_l1(*batched, 1), l1(*batched, 1))


@pytest.mark.parametrize("layout", fs.LAYOUTS)
def test_when_the_copy_is_built(monkeypatch, layout):
    """``adaptive``: the tiled copy in pass BUILD_AFTER + 1 (scipy's products before); ``tiled`` and
    ``transposed``: their copy with the frame's sums, before any pass; ``accumulators``: never."""
    from databalance import _ipf

    monkeypatch.setattr(fs, "BUILD_AFTER", 3)
    rng = np.random.default_rng(6)
    A = random_pattern(rng, 40, 30, 0.3) + sp.csr_array(np.eye(40, 30))
    p, q = np.full(40, 1 / 40), np.full(30, 1 / 30)
    K = fs.FusedSparseKernel(sp.csr_array(A), layout)
    problem = _ipf.Problem.from_targets([p, q], ["p_x", "p_y"], np.ones(()), K.dtype)
    copy = "_other_lines" if layout == "transposed" else "_tiles"
    built = []
    for _ in zip(range(16), _ipf.half_steps(K, problem), strict=False):
        built.append((K.passes, copy in K.__dict__))
        assert ("_tiles" if layout == "transposed" else "_other_lines") not in K.__dict__  # one copy at most
    first = {"adaptive": 4, "tiled": 0, "transposed": 0, "accumulators": None}[layout]
    assert [b for p, b in built] == [first is not None and p >= first for p, _ in built]
    assert built[-1][0] >= 6


@pytest.mark.parametrize("tiled", [True, False])
def test_adaptive_keeps_scipy_without_memory_for_the_copy(monkeypatch, tiled):
    """The adaptive layout builds its copy (tiled, or the transposed pattern when the tiles would be
    too sparse) only if it takes at most half of the memory available; its size is the values'
    and one 32-bit index array's, plus the pointers."""
    rng = np.random.default_rng(7)
    A = random_pattern(rng, 40, 30, 0.3) + sp.csr_array(np.eye(40, 30))
    monkeypatch.setattr(fs, "TILE_LEAD", 16)
    monkeypatch.setattr(fs, "TILE_OTHER", 4)
    if not tiled:
        monkeypatch.setattr(fs, "TILE_MIN_NNZ", 10**6)
        monkeypatch.setattr(fs, "tiling", lambda m, l, nnz: None)
    K = fs.FusedSparseKernel(sp.csr_array(A), "adaptive")
    if tiled:
        assert K.tile == (16, 4)
        assert K.copy_bytes() == A.nnz * (8 + 4) + (3 * 8 + 1) * 8
        assert sum(a.nbytes for a in K._tiles[:3]) == K.copy_bytes()
    else:
        assert K.tile is None
        assert K.copy_bytes() == A.nnz * (8 + 4) + 31 * 4
        assert sum(a.nbytes for a in K._other_lines) == K.copy_bytes()
    monkeypatch.setattr(fs, "BUILD_AFTER", 0)
    K = fs.FusedSparseKernel(sp.csr_array(A), "adaptive")
    assert K.build_bytes() == K.copy_bytes() + 8 * fs._nblocks(A.nnz) * (3 * 8 if tiled else 30)  # the counters
    monkeypatch.setattr(fs, "available_memory", lambda: 2 * K.build_bytes() - 1)
    assert not K.built()
    np.testing.assert_allclose(K.col_sums(np.ones(40)), A.sum(axis=0), rtol=1e-12)  # scipy's product
    assert "_tiles" not in K.__dict__ and "_other_lines" not in K.__dict__
    monkeypatch.setattr(fs, "available_memory", lambda: 2 * K.build_bytes())
    assert K.built()
    np.testing.assert_allclose(K.col_sums(np.ones(40)), A.sum(axis=0), rtol=1e-12)
    assert ("_tiles" if tiled else "_other_lines") in K.__dict__
    assert 0 < fs.available_memory()


def test_adaptive_keeps_scipy_when_the_build_runs_out_of_memory(monkeypatch):
    """A build that raises MemoryError (the memory looked free but was not) leaves scipy's
    products, and is not tried again."""
    A = sp.csr_array(random_pattern(np.random.default_rng(8), 40, 30, 0.3) + sp.csr_array(np.eye(40, 30)))
    monkeypatch.setattr(fs, "BUILD_AFTER", 0)
    tries = []

    def short(*args, **kwargs):
        tries.append(1)
        raise MemoryError

    monkeypatch.setattr(fs, "tiled_pattern", short)
    monkeypatch.setattr(fs, "transposed_pattern", short)
    K = fs.FusedSparseKernel(A, "adaptive")
    for _ in range(3):
        assert not K.built()
        np.testing.assert_allclose(K.col_sums(np.ones(40)), A.sum(axis=0), rtol=1e-12)
    assert len(tries) == 1


def test_available_memory_reads_meminfo_and_the_cgroup(monkeypatch, tmp_path):
    """MemAvailable (free memory and droppable cache), at most the cgroup's headroom."""
    import builtins

    files = {"/proc/meminfo": "MemTotal: 100 kB\nMemFree: 10 kB\nMemAvailable: 50 kB\n",
             "/sys/fs/cgroup/memory.max": "40960\n", "/sys/fs/cgroup/memory.current": "8192\n"}
    real = builtins.open

    def fake(path, *args, **kwargs):
        if path in files:
            out = tmp_path / path.replace("/", "_")
            out.write_text(files[path])
            return real(out, *args, **kwargs)
        if str(path).startswith(("/proc", "/sys")):
            raise OSError(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake)
    assert fs.available_memory() == 40960 - 8192
    files["/sys/fs/cgroup/memory.max"] = "max\n"
    assert fs.available_memory() == 50 * 1024


def test_index_arrays_in_another_byte_order():
    """Index arrays assigned in big-endian order (scipy keeps them): read as their values, not
    their bytes (a segmentation fault before)."""
    A = sp.csr_array(random_pattern(np.random.default_rng(9), 30, 20, 0.3) + sp.csr_array(np.eye(30, 20)))
    B = A.copy()
    B.indices, B.indptr = B.indices.astype(">i4"), B.indptr.astype(">i4")
    for layout in fs.LAYOUTS:
        K = fs.FusedSparseKernel(B, layout)
        np.testing.assert_allclose(K.row_sums(np.arange(20.0)), A @ np.arange(20.0), rtol=1e-12)
        np.testing.assert_allclose(K.col_sums(np.arange(30.0)), A.T @ np.arange(30.0), rtol=1e-12)


def tiles_as_coo(t: fs.Tiles):
    """The tiled copy's entries as (lead line, other line, value), in stored order."""
    tile_of = np.repeat(np.arange(t.ptr.size - 1), np.diff(t.ptr))
    a, b = tile_of % t.n_lead_blocks, tile_of // t.n_lead_blocks
    keys = t.keys.astype(np.int64)
    return a * t.lead_tile + (keys >> 16), b * t.other_tile + (keys & 0xFFFF), t.values


@pytest.mark.parametrize("nblocks", [1, 2, 3, 7])
@pytest.mark.parametrize("tile", [(1, 1), (4, 3), (37, 23), (5, 100), (65536, 65536)])
def test_tiled_pattern_is_the_table_by_tiles(nblocks, tile):
    """Every entry once, in its tile (other blocks outer, lead blocks inner), lead lines ascending
    within a tile and each line's entries in their stored order; empty tiles and lines; the same
    copy whatever the build's blocks."""
    rng = np.random.default_rng(nblocks)
    A = random_pattern(rng, 37, 23, 0.15, big_indptr=nblocks == 3)
    A = sp.csr_array(sp.diags_array(np.arange(37) % 5 != 0, dtype=float) @ A)  # empty rows
    A.eliminate_zeros()
    t = fs.tiled_pattern(A.indptr, A.indices, A.data, 23, tile=tile, nblocks=nblocks)
    assert (t.lead_tile, t.other_tile) == tile
    assert t.n_lead_blocks == -(-37 // tile[0]) and t.n_other_blocks == -(-23 // tile[1])
    assert t.keys.dtype == np.uint32 and t.values.dtype == A.dtype and t.ptr[-1] == A.nnz
    i, j, val = tiles_as_coo(t)
    tile_of = (j // tile[1]) * t.n_lead_blocks + i // tile[0]
    # the expected order: by tile, then by line, then as stored (a stable sort of the CSR order)
    rows = np.repeat(np.arange(37), np.diff(A.indptr))
    order = np.lexsort((rows, (A.indices // tile[1]) * t.n_lead_blocks + rows // tile[0]))
    np.testing.assert_array_equal(i, rows[order])
    np.testing.assert_array_equal(j, A.indices[order])
    np.testing.assert_array_equal(val, A.data[order])
    np.testing.assert_array_equal(np.diff(t.ptr), np.bincount(tile_of, minlength=t.ptr.size - 1))
    assert (np.diff(t.ptr) == 0).any() == (np.bincount(tile_of, minlength=t.ptr.size - 1) == 0).any()


def test_tiled_copy_of_an_empty_table():
    t = fs.tiled_pattern(np.zeros(4, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32), 3, tile=(2, 2))
    assert t.ptr.tolist() == [0] * 5 and t.keys.size == 0 and t.values.dtype == np.float32
    K = fs.FusedSparseKernel(sp.csr_array((3, 5)), "tiled")
    np.testing.assert_array_equal(K.col_sums(np.ones(3)), np.zeros(5))


def test_tiles_at_the_16_bit_boundary(monkeypatch):
    """Lines numbered 65535 and 65536: the last of a full tile (16-bit number 0xFFFF) and the first
    of the next; the passes against scipy on a 65537 x 131073 table with a few entries."""
    m, l = 65537, 131073
    rows = np.array([0, 65535, 65535, 65536, 65536, 7, 65535])
    cols = np.array([0, 65535, 65536, 65535, 131072, 131071, 0])
    A = sp.csr_array((np.arange(1.0, 8.0), (rows, cols)), shape=(m, l))
    t = fs.tiled_pattern(A.indptr, A.indices, A.data, l, tile=(65536, 65536))
    assert (t.n_lead_blocks, t.n_other_blocks) == (2, 3)
    i, j, val = tiles_as_coo(t)
    assert sorted(zip(i.tolist(), j.tolist(), val.tolist(), strict=True)) == sorted(
        zip(rows.tolist(), cols.tolist(), np.arange(1.0, 8.0).tolist(), strict=True))
    assert t.keys.max() == 0xFFFFFFFF  # (65535, 65535) within its tile
    rng = np.random.default_rng(0)
    u, v = rng.random(m), rng.random(l)
    monkeypatch.setattr(fs, "TILE_BLOCKS", 1)
    for fmt in ("csr", "csc"):
        with sparse_setup("tiled", per_thread=1, tile=(65536, 65536)):
            K = fs.FusedSparseKernel(A.asformat(fmt))
            assert K.tile == (65536, 65536)
            np.testing.assert_allclose(K.row_sums(v), A @ v, rtol=1e-15)
            np.testing.assert_allclose(K.col_sums(u), A.T @ u, rtol=1e-15)


def test_bad_tile():
    A = sp.csr_array(np.eye(3))
    for tile in [(65537, 1), (1, 65537), (0, 4)]:
        with pytest.raises(ValueError, match=r"`tile` must give between 1 and 65536 .* got \(" + str(tile[0])):
            fs.tiled_pattern(A.indptr, A.indices, A.data, 3, tile=tile)


def test_tiling():
    """Full tiles on large tables, narrower blocks of other lines on narrow ones (TILE_BLOCKS of
    them), none when the tiles would be too sparse (then the kernel has the transposed pattern)."""
    assert fs.tiling(10**6, 10**6, 10**7) == (fs.TILE_LEAD, fs.TILE_OTHER)
    assert fs.tiling(100, 40, 10) == (100, 5)
    assert fs.tiling(3, 1, 1) == (3, 1)
    tiles = -(-10**9 // fs.TILE_LEAD) * -(-10**9 // fs.TILE_OTHER)
    assert fs.tiling(10**9, 10**9, tiles * fs.TILE_MIN_NNZ - 1) is None
    assert fs.tiling(10**9, 10**9, tiles * fs.TILE_MIN_NNZ) == (fs.TILE_LEAD, fs.TILE_OTHER)
    A = random_pattern(np.random.default_rng(8), 100, 100, 0.01)
    with sparse_setup("tiled", per_thread=1, tile=(1, 1)):  # 10^4 tiles for ~100 nonzeros
        K = fs.FusedSparseKernel(A)
        assert K.tile is None
        np.testing.assert_allclose(K.col_sums(np.arange(100.0)), A.T @ np.arange(100.0), rtol=1e-12)
        assert "_other_lines" in K.__dict__ and "_tiles" not in K.__dict__


def test_bad_layout():
    with pytest.raises(ValueError, match="`layout` must be one of 'adaptive', 'tiled', 'transposed', 'accumulators'"):
        fs.FusedSparseKernel(sp.csr_array(np.eye(3)), "csc")


def test_auto_choice_follows_size_and_threads(monkeypatch):
    """``auto``: scipy below AUTO_MIN_NNZ nonzeros or on one thread, the fused kernel above."""
    A = sp.csr_array(np.eye(40))
    monkeypatch.setattr(fs, "AUTO_MIN_NNZ", 41)
    assert not fs.auto_choice(A)
    with kernel_choice(None):
        assert db.which_kernel(A) == "numpy"
    monkeypatch.setattr(fs, "AUTO_MIN_NNZ", 40)
    with sparse_setup(fs.DEFAULT_LAYOUT, nthreads=1):
        assert not fs.auto_choice(A)
    if numba.config.NUMBA_NUM_THREADS >= 2:
        with sparse_setup(fs.DEFAULT_LAYOUT, nthreads=2), kernel_choice(None):
            assert fs.auto_choice(A)
            assert db.which_kernel(A) == "numba"
            assert db.which_kernel(A.astype(np.float32).tocsc()) == "numba"
            assert db.which_kernel(A.tocoo()) == "numpy"  # COO is balanced as CSR by scipy
    monkeypatch.setattr(fused, "numba_installed", lambda: False)
    assert not fs.auto_choice(A)


def test_sparse_without_numba():
    """With numba blocked, ``auto`` keeps scipy for any sparse table and balances it."""
    code = textwrap.dedent("""
        import sys
        sys.modules["numba"] = None
        import numpy as np, scipy.sparse as sp
        import databalance as db
        from databalance._kernels import fused_sparse as fs
        fs.AUTO_MIN_NNZ = 0
        A = sp.csr_array(np.eye(4) + 1.0)
        assert not fs.auto_choice(A)
        assert db.which_kernel(A) == "numpy"
        r = db.balance_table(A, np.ones(4), np.ones(4))
        assert r.converged
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != fused.ENV}  # auto (CI also runs the suite with numba forced)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
