"""Dask tables on a ``distributed`` cluster (issue 12, DASK-TABLE): the sweeps by the futures API,
each block held on one worker (balanced by nonzeros) and, after ``HELD_BUILD_AFTER`` passes, with its
tiled copy; checked against the in-memory NumPy kernel (never numba) on small tables."""

import gc
import subprocess
import sys
import threading

import numpy as np
import pytest
import scipy.sparse as sp

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

from databalance import balance_table  # noqa: E402
from databalance._kernels import chunked  # noqa: E402

from .dask_support import (  # noqa: E402
    assert_equal_scalings,
    assert_steps_like_numpy,
    local_cluster,
    numpy_reference,
    sparse_blocks,
)


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(default_client=False) as c:
        yield c


@pytest.fixture
def client(cluster):
    """The module's cluster, its client active during the test (only: a client in dask's config
    keeps the nanny of another test's cluster from starting a worker)."""
    with cluster.as_current(), dask.config.set(scheduler=cluster):
        yield cluster


def random_table(rng, m, n, zeros=0.6, dtype=np.float64):
    T = rng.random((m, n))
    T[T < zeros] = 0.0
    T[np.arange(m), rng.integers(0, n, m)] = 1.0  # no empty row
    T[rng.integers(0, m, n), np.arange(n)] = 1.0  # no empty column
    return T.astype(dtype)


def problem(seed, m=300, n=40, dtype=np.float64, zero_targets=True):
    rng = np.random.default_rng(seed)
    T = random_table(rng, m, n, dtype=dtype)
    p, q = rng.dirichlet(np.ones(m)), rng.dirichlet(np.ones(n))
    if zero_targets:  # those lines are emptied, as in memory
        p[[3, 77]] = 0.0
        q[5] = 0.0
    return T, p / p.sum(), q / q.sum()


def blocks_of(T, kind, rows=40):
    """A Dask table of row blocks, each built by its own task (sparse: CSR blocks)."""
    if kind == "dense":
        return da.from_array(T, chunks=(rows, T.shape[1]))
    return sparse_blocks(T, rows)


def cluster_keys(client, prefix):
    return client.run_on_scheduler(lambda dask_scheduler: [str(k) for k in dask_scheduler.tasks
                                                           if str(k).startswith(prefix)])


@pytest.fixture
def spy_tiled(monkeypatch):
    """Count the tiled copies' builds submitted (they run on the workers)."""
    calls = []
    submit = distributed.Client.submit

    def counted(self, func, *args, **kwargs):
        if func is chunked._tiled:
            calls.append(kwargs.get("key"))
        return submit(self, func, *args, **kwargs)

    monkeypatch.setattr(distributed.Client, "submit", counted)
    return calls


@pytest.mark.parametrize("build_after", [0, 3])
@pytest.mark.parametrize("kind", ["sparse", "dense"])
@pytest.mark.parametrize("start", ["x", "y"])
def test_held_sweeps_equal_numpy_kernel(client, monkeypatch, spy_tiled, kind, start, build_after):
    monkeypatch.setattr(chunked, "HELD_BUILD_AFTER", build_after)
    T, p, q = problem(21)
    table = client.persist(blocks_of(T, kind))
    assert_steps_like_numpy(monkeypatch, table, T, kind, p, q, start)
    # sparse blocks get their tiled copies once a run has made HELD_BUILD_AFTER passes (dense never)
    assert bool(spy_tiled) == (kind == "sparse")


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_float32_on_the_cluster(client, monkeypatch, spy_tiled, kind):
    monkeypatch.setattr(chunked, "HELD_BUILD_AFTER", 1)
    T, p, q = problem(22, dtype=np.float32)
    got = balance_table(blocks_of(T, kind), p, q, steps=9)
    ref = numpy_reference(monkeypatch, T, kind, p, q, steps=9)
    assert got.row_scaling.dtype == np.float32 and got.col_scaling.dtype == np.float32
    assert_equal_scalings(got, ref, rtol=2e-5)  # float32 sums added in another order
    assert bool(spy_tiled) == (kind == "sparse")


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_overrelaxed_sweeps_on_the_cluster(client, monkeypatch, spy_tiled, kind):
    monkeypatch.setattr(chunked, "HELD_BUILD_AFTER", 2)
    T, p, q = problem(23, m=240, n=50)
    ref = numpy_reference(monkeypatch, T, kind, p, q, acceleration="overrelax", tol=1e-12)
    got = balance_table(blocks_of(T, kind), p, q, acceleration="overrelax", tol=1e-12)
    assert (got.status, got.steps) == (ref.status, ref.steps)
    assert_equal_scalings(got, ref, rtol=1e-10)
    assert bool(spy_tiled) == (kind == "sparse")


def test_tiled_pass_equals_products_and_blocks_are_balanced(client, monkeypatch):
    monkeypatch.setattr(chunked, "HELD_BUILD_AFTER", 3)
    rng = np.random.default_rng(24)
    T = random_table(rng, 330, 60)
    p = rng.dirichlet(np.ones(330))
    p[7] = 0.0
    kernel = chunked.ChunkedKernel.from_input(client.persist(blocks_of(T, "sparse", rows=30)))
    v, old = rng.random(60) + 0.5, rng.random(330) + 0.5
    for _ in range(chunked.HELD_BUILD_AFTER + 2):  # the last pass reads the tiled copies
        r, u, c = kernel._pass(v, old, p, None)
    where, at, held, tiled = kernel._held
    assert tiled
    objects = client.gather(held)
    assert all(h.tiles is not None for h in objects)
    np.testing.assert_allclose(r, T @ v, rtol=1e-13)
    np.testing.assert_array_equal(u, np.divide(p, r, out=np.zeros_like(p), where=p > 0))
    np.testing.assert_allclose(c, T.T @ u, rtol=1e-13)
    r, u, c = kernel._pass(v, old, p, np.array([1.5]))  # over-relaxed: the rule of the in-memory kernels
    from databalance._kernels.fused import relaxed_ratio

    np.testing.assert_allclose(u, relaxed_ratio(old, p, T @ v, np.flatnonzero(p == 0), 1.5), rtol=1e-13)
    np.testing.assert_allclose(c, T.T @ u, rtol=1e-13)
    # eleven blocks on two one-thread workers: their nonzeros within one block of each other
    assert set(at) == set(client.scheduler_info()["workers"])
    per_worker = [sum(n for n, a in zip(kernel.block_nnz, at, strict=True) if a == w) for w in set(at)]
    assert abs(per_worker[0] - per_worker[1]) <= max(kernel.block_nnz)
    assert all(h.moved == (a not in (w or ())) for h, a, w in zip(objects, at, where, strict=True))
    # Dask counts a held block's tiled copy, and the block itself where it was sent from another worker
    for h in objects:
        t = h.tiles
        block = t.ptr.nbytes + t.keys.nbytes + t.values.nbytes
        moved = h.block.data.nbytes + h.block.indices.nbytes + h.block.indptr.nbytes if h.moved else 0
        assert chunked.sizeof(h) == 64 + block + moved
    weights = client.run(lambda dask_worker: {str(k): dask_worker.data.fast.weights[k] for k in dask_worker.data
                                              if str(k).startswith("databalance-tiled")
                                              and k in getattr(dask_worker.data, "fast", {})})
    counted = {k: v for per in weights.values() for k, v in per.items()}
    assert counted == {str(f.key): chunked.sizeof(h) for f, h in zip(held, objects, strict=True)}


def test_copies_released_with_the_result(client, monkeypatch):
    monkeypatch.setattr(chunked, "HELD_BUILD_AFTER", 1)
    T, p, q = problem(25)
    table = client.persist(blocks_of(T, "sparse"))
    got = balance_table(table, p, q, steps=12)
    assert got.steps == 12
    for _ in range(100):  # the kernel goes with the run (at the latest at a garbage collection), and
        # the scheduler hears of released futures asynchronously
        gc.collect()
        if not cluster_keys(client, "databalance-") and not cluster_keys(client, "_identity"):
            break
        threading.Event().wait(0.1)
    assert cluster_keys(client, "databalance-") == []
    assert cluster_keys(client, "_worker_blocks") == [] and cluster_keys(client, "_identity") == []
    # the result's lazy table still computes (from the user's blocks)
    np.testing.assert_allclose(got.table.compute().toarray(), T * np.outer(got.row_scaling, got.col_scaling),
                               rtol=1e-12)


def test_kernel_refused_numba_builds_no_copy(client, monkeypatch, spy_tiled):
    monkeypatch.setattr(chunked, "HELD_BUILD_AFTER", 0)
    monkeypatch.setenv("DATABALANCE_KERNEL", "numpy")
    T, p, q = problem(26)
    got = balance_table(blocks_of(T, "sparse"), p, q, steps=8)
    assert spy_tiled == []
    assert_equal_scalings(got, numpy_reference(monkeypatch, T, "sparse", p, q, steps=8), rtol=1e-12)


def test_held_block_without_numba_or_copy_equals_tiled(monkeypatch):
    """A held block's task where numba cannot run (a forked process) or without its copy (memory
    short, tiles too sparse) gives the tiled pass's results to rounding."""
    pytest.importorskip("numba")
    from databalance._kernels import fused

    rng = np.random.default_rng(27)
    T = random_table(rng, 120, 30)
    p = rng.dirichlet(np.ones(120))
    p[4] = 0.0
    block = chunked._prepared(sp.csr_matrix(T), np.float64)
    held = chunked._tiled(chunked._hold(block, False))
    assert held.tiles is not None and not held.moved
    v, old = rng.random(30) + 0.5, rng.random(120) + 0.5
    for w in (1.0, 1.4):
        tiled = chunked._held_block(held, v, old, p, w, False)
        plain = chunked._held_block(chunked._Held(block), v, old, p, w, False)
        monkeypatch.setattr(fused, "_FORK_UNSAFE", True)
        forked = chunked._held_block(held, v, old, p, w, False)
        assert chunked._tiled(chunked._hold(block, False)).tiles is None  # no numba: no copy
        monkeypatch.setattr(fused, "_FORK_UNSAFE", False)
        for lines, c in (plain, forked):
            np.testing.assert_allclose(lines, tiled[0], rtol=1e-13)
            np.testing.assert_allclose(c, tiled[1], rtol=1e-13)
    monkeypatch.setattr(chunked, "_headroom", lambda: 0.0)  # the memory guard
    assert chunked._tiled(chunked._hold(block, True)).tiles is None


def test_balanced_placement():
    b = chunked._balanced
    assert b([["a"]] * 6 + [["b"]] * 4, [10] * 10, {"a": 1, "b": 1}).count("a") == 5
    assert b([["a"]] * 4, [10] * 4, {"a": 1, "b": 3}) == ["a", "b", "b", "b"]  # by threads
    assert b([["a"], ["a"], ["b"]], [1, 1, 100], {"a": 1, "b": 1}) == ["a", "a", "b"]  # one block outweighs
    assert b([None, None], [3, 3], {"a": 1, "b": 1}) == ["a", "b"]  # holders unknown
    assert b([["a"], ["a", "b"]], [5, 5], {"a": 1, "b": 1}) == ["a", "b"]  # a replica where it helps
    assert b([["a"]], [5], {}) == [None]


def test_works_without_numba_on_a_cluster():
    code = ("import sys; sys.modules['numba'] = None\n"
            "import warnings; warnings.simplefilter('ignore')\n"
            "import numpy as np, scipy.sparse as sp, dask, dask.array as da, distributed\n"
            "from databalance import balance_table\n"
            "from databalance._kernels import chunked\n"
            "chunked.HELD_BUILD_AFTER = 0\n"
            "r = np.random.default_rng(3); T = r.random((120, 15)); T[T < .5] = 0; T[:, 0] = 1; T[0] = 1\n"
            "p, q = r.dirichlet(np.ones(120)), r.dirichlet(np.ones(15))\n"
            "table = da.from_array(T, chunks=(30, 15)).map_blocks(sp.csr_matrix)\n"
            "with distributed.LocalCluster(n_workers=2, processes=False, threads_per_worker=1,\n"
            "                              dashboard_address=None) as lc, distributed.Client(lc):\n"
            "    got = balance_table(table, p, q, steps=9)\n"
            "ref = balance_table(sp.csr_array(T), p, q, steps=9)\n"
            "assert np.allclose(got.row_scaling, ref.row_scaling, rtol=1e-12, atol=0)\n"
            "assert np.allclose(got.col_scaling, ref.col_scaling, rtol=1e-12, atol=0)\n"
            "assert 'numba' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_sweeps_after_a_worker_is_restarted(monkeypatch):
    """A worker restarted after the tiled copies were built: its blocks and held copies are made
    again elsewhere, the next sweep is not pinned to the worker that left, and the results hold."""
    pytest.importorskip("numba")
    monkeypatch.setattr(chunked, "HELD_BUILD_AFTER", 2)
    with local_cluster() as c:  # the default client (a client in dask's config cannot restart a worker)
        rng = np.random.default_rng(28)
        T = random_table(rng, 240, 20)
        kernel = chunked.ChunkedKernel.from_input(c.persist(blocks_of(T, "sparse")))
        p = rng.dirichlet(np.ones(240))
        v, old = np.ones(20), np.ones(240)
        for _ in range(chunked.HELD_BUILD_AFTER + 2):
            kernel._pass(v, old, p, None)
        assert kernel._held[3]
        victim = next(a for a in kernel._held[1] if a)
        c.restart_workers([victim])
        out: dict = {}

        def sweep():
            out["first"] = kernel._pass(v, old, p, None)
            for _ in range(chunked.HELD_BUILD_AFTER + 1):
                out["later"] = kernel._pass(v, old, p, None)

        thread = threading.Thread(target=sweep, daemon=True)
        thread.start()
        thread.join(90)
        assert "later" in out, "a sweep waited for a worker that left"
        assert victim not in kernel._held[1] and kernel._held[3]  # held and tiled again
        for r, u, cs in (out["first"], out["later"]):
            np.testing.assert_allclose(r, T @ v, rtol=1e-12)
            np.testing.assert_allclose(cs, T.T @ u, rtol=1e-12)


def test_a_worker_lost_during_a_sweep_does_not_hang_it(monkeypatch):
    """A worker restarted while a sweep's tasks run on it: the sweep notices (the tasks were pinned
    to a worker that left), holds the blocks again and finishes, with the right sums."""
    import time

    monkeypatch.setattr(chunked, "SWEEP_CHECK", 0.5)
    with local_cluster() as c:
        rng = np.random.default_rng(31)
        T = random_table(rng, 240, 20)
        kernel = chunked.ChunkedKernel.from_input(c.persist(blocks_of(T, "sparse")))
        p = rng.dirichlet(np.ones(240))
        v, old = np.ones(20), np.ones(240)
        kernel._pass(v, old, p, None)  # the blocks held
        victim = next(a for a in kernel._held[1] if a)

        def slow_sweeps():  # on the workers: their sweep tasks sleep first (a fresh worker's do not)
            from databalance._kernels import chunked as worker_chunked

            for name in ("_worker_blocks", "_worker_rows"):  # the sweep's rows sent back, or kept there
                original = getattr(worker_chunked, name)

                def slow(*args, original=original):
                    time.sleep(3.0)
                    return original(*args)

                setattr(worker_chunked, name, slow)

        c.run(slow_sweeps)
        out: dict = {}
        thread = threading.Thread(target=lambda: out.setdefault("r", kernel._pass(v, old, p, None)), daemon=True)
        thread.start()
        time.sleep(1.0)  # the sweep's tasks are running (sleeping) on both workers
        c.restart_workers([victim])
        thread.join(90)
        assert "r" in out, "a sweep waited for a worker that left during it"
        r, u, cs = out["r"]
        np.testing.assert_allclose(r, T @ v, rtol=1e-12)
        np.testing.assert_allclose(cs, T.T @ u, rtol=1e-12)
        assert victim not in kernel._held[1]


@pytest.mark.parametrize("wide", [False, True])
def test_a_failed_sweep_leaves_nothing_on_the_cluster(client, monkeypatch, wide):
    """A sweep whose task raises releases its futures (and the tree's) before the error goes on:
    the client keeps the erred future's exception, whose traceback would hold them."""
    import time

    if wide:
        monkeypatch.setattr(chunked, "CLIENT_SUM_MAX", 0)
    T, p, q = problem(33)
    table = client.persist(blocks_of(T, "sparse"))
    distributed.wait(table)

    def keys():
        gc.collect()
        time.sleep(1.0)
        gc.collect()
        return {str(k) for keys in client.run(lambda dask_worker: list(dask_worker.data)).values() for k in keys}

    def install():
        import databalance._kernels.chunked as module

        def boom(*args):
            raise MemoryError("a sweep task failed")

        module._fused_lines_saved, module._fused_lines = module._fused_lines, boom

    def restore():
        module = sys.modules["databalance._kernels.chunked"]
        module._fused_lines = module._fused_lines_saved

    before = keys()
    client.run(install)
    try:
        with pytest.raises(MemoryError, match="a sweep task failed"):
            balance_table(table, p, q, steps=12)
    finally:
        client.run(restore)
    left = keys() - before
    assert not left, f"left on the cluster after the failed sweep: {sorted(left)[:5]}"


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_workers_without_numba_take_the_products(monkeypatch, kind):
    """Workers that cannot import numba (the client can): dense blocks' one-read pass and sparse
    blocks' tiled copies give way to scipy's or BLAS's products, with the same results."""
    pytest.importorskip("numba")
    monkeypatch.setattr(chunked, "HELD_BUILD_AFTER", 1)
    T, p, q = problem(35)
    ref = numpy_reference(monkeypatch, T, kind, p, q, steps=9)

    def block_numba():
        sys.modules["numba"] = None  # import numba now fails in this worker

    with local_cluster() as c:
        c.run(block_numba)
        with c.as_current(), dask.config.set(scheduler=c):
            got = balance_table(c.persist(blocks_of(T, kind)), p, q, steps=9)
        assert all(c.run(lambda: sys.modules["numba"] is None).values())
    assert_equal_scalings(got, ref, rtol=1e-12)


def test_column_sums_added_on_the_workers_when_wide(client, monkeypatch):
    """Beyond CLIENT_SUM_MAX entries of column partials, a tree of tasks adds them on the workers."""
    monkeypatch.setattr(chunked, "CLIENT_SUM_MAX", 0)
    monkeypatch.setattr(chunked, "HELD_BUILD_AFTER", 2)
    T, p, q = problem(29)
    for kind in ["sparse", "dense"]:
        got = balance_table(blocks_of(T, kind), p, q, steps=8)
        assert_equal_scalings(got, numpy_reference(monkeypatch, T, kind, p, q, steps=8), rtol=1e-12)


@pytest.mark.parametrize("on_workers", [True, False])
def test_one_task_per_worker_and_sweep(client, monkeypatch, on_workers):
    """A sweep is one task per worker over its blocks, whose result sends the client only its column
    sums and rows' errors (the rows stay there); with ROWS_ON_WORKERS off, one copy of ``v`` per
    worker and the rows' sums sent to the client."""
    monkeypatch.setattr(chunked, "ROWS_ON_WORKERS", on_workers)
    T, p, q = problem(30)
    kernel = chunked.ChunkedKernel.from_input(client.persist(blocks_of(T, "sparse", rows=30)))
    kernel._pass(np.ones(T.shape[1]), np.ones(T.shape[0]), p, None)  # holds the blocks
    calls = []
    submit = distributed.Client.submit

    def counted(self, func, *args, **kwargs):
        calls.append(func.__name__)
        return submit(self, func, *args, **kwargs)

    monkeypatch.setattr(distributed.Client, "submit", counted)
    r, u, c = kernel._pass(np.ones(T.shape[1]), np.ones(T.shape[0]), p, None)
    if on_workers:
        assert sorted(calls) == ["_worker_rows", "_worker_rows"]
        assert isinstance(r, chunked._Rows) and isinstance(u, chunked._Rows)
    else:
        assert sorted(calls) == ["_identity", "_identity", "_worker_blocks", "_worker_blocks"]
    np.testing.assert_allclose(r, T.sum(axis=1), rtol=1e-13)
    np.testing.assert_allclose(c, T.T @ u, rtol=1e-13)


def test_short_runs_build_no_copy(client, spy_tiled):
    """Runs of fewer than HELD_BUILD_AFTER sweeps never build the tiled copies (their build costs
    more than they save there)."""
    T, p, q = problem(31)
    got = balance_table(blocks_of(T, "sparse"), p, q, steps=2 * chunked.HELD_BUILD_AFTER)
    assert got.passes < chunked.HELD_BUILD_AFTER + 2 and spy_tiled == []


def l1_numpy(scaling, sums, target):
    return float(np.abs(scaling * sums - target).sum())


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_rows_stay_on_the_workers(client, monkeypatch, kind):
    """Sweeps chained as the loop chains them (each reads the scaling the last one left on the
    workers): the rows' sums and scalings equal ``T v`` and ``p / (T v)`` (0 on zero targets), the
    column sums ``T' u``, and the rows' errors before and after each step NumPy's L1 distances."""
    monkeypatch.setattr(chunked, "HELD_BUILD_AFTER", 2)
    T, p, q = problem(36)
    kernel = chunked.ChunkedKernel.from_input(client.persist(blocks_of(T, kind)))
    v, old = np.ones(T.shape[1]), np.full(T.shape[0], 1.0)
    olds = []
    for _ in range(5):  # the tiled copies from the third on
        r, u, c = kernel._pass(v, old, p, None)
        assert isinstance(r, chunked._Rows) and isinstance(u, chunked._Rows)
        want_r = T @ v
        want_u = np.where(p > 0, p / np.where(p > 0, want_r, 1.0), 0.0)
        assert kernel.margin_l1(old, r, p, 0) == pytest.approx(l1_numpy(np.asarray(old), want_r, p), rel=1e-12)
        assert kernel.margin_l1(u, r, p, 0) == pytest.approx(l1_numpy(want_u, want_r, p), rel=1e-9, abs=1e-15)
        np.testing.assert_allclose(r, want_r, rtol=1e-13)
        assert_equal_scalings_of(np.asarray(u), want_u)
        np.testing.assert_allclose(c, T.T @ want_u, rtol=1e-12)
        olds.append(old)
        old, v = u, np.where(q > 0, q / np.where(q > 0, c, 1.0), 0.0)
    assert kernel._held[3] == (kind == "sparse")
    assert all(isinstance(o, chunked._Rows) for o in olds[1:])
    assert np.asarray(u).flags.writeable is False and u.copy().flags.writeable


def assert_equal_scalings_of(got, want):
    assert np.array_equal(got == 0, want == 0)
    np.testing.assert_allclose(got[want != 0], want[want != 0], rtol=1e-13)


def test_a_run_fetches_the_rows_once(client, monkeypatch):
    """A plain run of many sweeps fetches the rows' scaling from the workers once (for the result),
    never the rows' sums; its scalings and errors are those of the sweeps that send the rows to the
    client (to rounding)."""
    T, p, q = problem(37)
    table = client.persist(blocks_of(T, "sparse"))
    calls = []
    submit = distributed.Client.submit

    def counted(self, func, *args, **kwargs):
        calls.append((func.__name__, args[1] if func is chunked._lines_of else None))
        return submit(self, func, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(distributed.Client, "submit", counted)
        got = balance_table(table, p, q, steps=16)
    assert [c for c in calls if c[0] == "_lines_of"] == [("_lines_of", 1)] * 2  # u, from both workers
    assert sum(c[0] == "_worker_rows" for c in calls) == 2 * (got.passes - 1)  # the first pass is plain products
    monkeypatch.setattr(chunked, "ROWS_ON_WORKERS", False)
    before = balance_table(table, p, q, steps=16)
    # equal to rounding: each run holds its blocks where they were persisted, and the column sums
    # are added per worker (bit-equal for the same placement)
    assert_equal_scalings(got, before, rtol=1e-14)
    np.testing.assert_allclose(got.marginal_error, before.marginal_error, rtol=1e-12, atol=1e-15)
    ref = numpy_reference(monkeypatch, T, "sparse", p, q, steps=16)
    np.testing.assert_allclose(got.marginal_error, ref.marginal_error, rtol=1e-8, atol=1e-15)


def test_an_auto_run_measures_the_rows_on_the_workers(client, monkeypatch):
    """``acceleration="auto"`` watches the errors through the kernel's own measure: the rows'
    errors come from the workers, and the rows' scaling is fetched once, for the result (it was
    fetched at every sweep when the controller measured them itself)."""
    T, p, q = problem(39, zero_targets=False)
    table = client.persist(blocks_of(T, "sparse"))
    calls = []
    submit = distributed.Client.submit

    def counted(self, func, *args, **kwargs):
        calls.append(func.__name__)
        return submit(self, func, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(distributed.Client, "submit", counted)
        got = balance_table(table, p, q, acceleration="auto", tol=1e-10)
    assert got.converged and calls.count("_worker_rows") >= 10
    assert calls.count("_lines_of") == 2  # u, from both workers, once
    ref = numpy_reference(monkeypatch, T, "sparse", p, q, acceleration="auto", tol=1e-10)
    assert (got.status, got.steps) == (ref.status, ref.steps)
    assert_equal_scalings(got, ref, rtol=1e-10)


@pytest.mark.parametrize("acceleration", ["anderson", "overrelax", "auto"])
def test_accelerated_runs_read_the_rows_where_needed(client, monkeypatch, acceleration):
    """Accelerations that read the rows' sums or scaling as arrays get them fetched (or, over-relaxed,
    sent back every sweep): the in-memory NumPy kernel's results."""
    T, p, q = problem(38, zero_targets=False)
    ref = numpy_reference(monkeypatch, T, "sparse", p, q, acceleration=acceleration)
    got = balance_table(blocks_of(T, "sparse"), p, q, acceleration=acceleration)
    assert (got.status, got.steps) == (ref.status, ref.steps)
    assert_equal_scalings(got, ref, rtol=1e-10)


def test_rows_left_on_a_worker_that_left(monkeypatch):
    """A worker restarted between sweeps, with the rows' scaling of the last sweep on it: the next
    sweep and the scaling's fetch recompute it from that sweep's ``v`` (no wait for the worker)."""
    with local_cluster() as c:
        rng = np.random.default_rng(39)
        T = random_table(rng, 240, 20)
        kernel = chunked.ChunkedKernel.from_input(c.persist(blocks_of(T, "sparse")))
        p = rng.dirichlet(np.ones(240))
        v, w = np.ones(20), rng.random(20) + 0.5
        r, u, _ = kernel._pass(v, np.ones(240), p, None)
        victim = next(a for a in kernel._held[1] if a)
        c.restart_workers([victim])
        out: dict = {}

        def sweep():
            out["next"] = kernel._pass(w, u, p, None)
            out["u"] = np.asarray(u)

        thread = threading.Thread(target=sweep, daemon=True)
        thread.start()
        thread.join(90)
        assert "u" in out, "a sweep waited for a worker that left"
        np.testing.assert_allclose(out["u"], p / (T @ v), rtol=1e-13)
        r2, u2, c2 = out["next"]
        np.testing.assert_allclose(r2, T @ w, rtol=1e-13)
        np.testing.assert_allclose(c2, T.T @ (p / (T @ w)), rtol=1e-12)
        assert kernel.margin_l1(u, r2, p, 0) == pytest.approx(l1_numpy(p / (T @ v), T @ w, p), rel=1e-12)
        assert victim not in kernel._held[1]


def test_lines_are_never_serialised():
    """A sweep's result sent (or spilled) keeps its column sums and errors and drops the rows' lines,
    whose readers then raise, and a sweep whose old lines were lost takes them from the client."""
    import pickle

    swept = chunked._Swept(np.arange(3.0), 0.5, 0.25, ([np.ones(4)], [np.full(4, 2.0)]))
    assert chunked._lines_of(swept, 1)[0].tolist() == [2.0] * 4
    copy = pickle.loads(pickle.dumps(swept))
    assert copy.c.tolist() == [0.0, 1.0, 2.0] and (copy.before, copy.after) == (0.5, 0.25) and copy.lines is None
    with pytest.raises(chunked._LinesLost, match="left their worker"):
        chunked._lines_of(copy, 0)
    assert dask.sizeof.sizeof(swept) > dask.sizeof.sizeof(copy) + 60


def test_spilled_lines_are_recomputed(client, monkeypatch):
    """The rows' lines of the last sweep lost on the workers (as if spilled): the next sweep and the
    scaling's fetch recompute them from that sweep's ``v``: the same results."""
    T, p, q = problem(40)
    kernel = chunked.ChunkedKernel.from_input(client.persist(blocks_of(T, "sparse")))
    v, w = np.ones(T.shape[1]), np.random.default_rng(40).random(T.shape[1]) + 0.5
    r, u, _ = kernel._pass(v, np.ones(T.shape[0]), p, None)

    def drop(dask_worker):
        for value in dask_worker.data.values():
            if isinstance(value, chunked._Swept):
                value.lines = None

    client.run(drop)
    recomputed = []
    row_sums = kernel.row_sums
    monkeypatch.setattr(kernel, "row_sums", lambda x: recomputed.append(x) or row_sums(x))
    r2, u2, c2 = kernel._pass(w, u, p, None)
    assert len(recomputed) == 1 and recomputed[0] is u.sweep.v
    want_u = np.where(p > 0, p / np.where(p > 0, T @ v, 1.0), 0.0)
    assert kernel.margin_l1(u, r2, p, 0) == pytest.approx(l1_numpy(want_u, T @ w, p), rel=1e-12)
    np.testing.assert_allclose(np.asarray(u), want_u, rtol=1e-13)
    np.testing.assert_allclose(r2, T @ w, rtol=1e-13)
