"""Dask benchmarks (issue 12): raked estimates of lazily generated samples on a LocalCluster against
the in-memory estimator, and row-partitioned balancing of a sparse table against the in-memory
sparse kernel.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_dask.py samples --n 10000000
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_dask.py table --nnz 50000000

``samples``: four margins (a, b of 100 levels, c of 1000, the joint (e, f) of 20 x 50: 10^10
combinations, so the Dask samples path), the samples generated chunk by chunk on the workers from
a seed (never materialised on the client); a fit with ``steps=12`` and one ``mean`` with its
standard error. Reports the in-memory path's time (same samples, one process) with its default
threads and with numba's and the BLAS's threads limited to one (its samples per second per core),
the cluster's (2 worker processes x 1 thread: samples per second per core = n / (wall x 2)), their
CPU seconds (all threads; the workers' and the client's for the cluster) and samples per CPU
second, and two ratios: per core by wall time, cluster against the one-thread in-memory run (the
bar's ratio, >= 0.5), and samples per CPU second; the fit's and the mean's times, and the peak
resident memory of every process (VmHWM). ``--cluster-only`` skips
the in-memory run (for sizes one process cannot hold); ``--compare-mean`` also times the ``mean``
again with its passes compiled and with NumPy's, alternating, on the same fit and cluster.

``table``: a sparse table with ``--nnz`` stored entries, each row block built by a task on the
workers; seconds per sweep (two half-steps) of ``balance_table`` on the Dask array (one map over
the blocks per sweep by the futures API; with ``--plain`` also as one graph per sweep, and the
two-map kernel) and on the same table as one in-memory CSR matrix, over ``--sweeps`` sweeps and in
the steady state (sweeps ``--sweeps`` to ``2 * --sweeps`` timed inside each run from per-step
timestamps, after both kernels built their tiled copies; the Dask blocks build theirs only from
sweep ``chunked.HELD_BUILD_AFTER``; the difference of two runs' times, printed too, varies with the
one-off build of the in-memory copy), and the largest relative difference of the scalings.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import time

import numba
import numpy as np

#: The issue's margins (1e10 possible cells: at n samples about n occupied ones) and a survey-sized
#: configuration (4e4 possible cells) where the cell table is small.
CONFIGS = {"bar": {"a": 100, "b": 100, "c": 1000, "e": 20, "f": 50},
           "small": {"a": 10, "b": 10, "c": 20, "e": 4, "f": 5}}
SIZES = dict(CONFIGS["bar"])
COLUMNS = list(SIZES)


#: The generated codes' dtype: uint16 (the codes are below 1000; a quarter of int64's bytes to
#: write, hold and read in every pass over lazily generated samples); ``--wide-codes``: int64, as
#: before 2026-12-06 15:40 UTC. The same codes either way, and the in-memory run gets the same
#: columns as the cluster.
CODE_DTYPE = [np.uint16]


@numba.njit
def _mix(x):
    """splitmix64's output function: 64 well-mixed bits of a 64-bit counter."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@numba.njit
def _draws(seed, block, i, k):
    """Draw k (64 bits) of sample i of a block: a counter-based generator (splitmix64 of the seed,
    block, sample and draw), so that any column of any block is made alone, in any order."""
    key = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(block)) * np.uint64(0xD1B54A32D192ED03)
    return _mix(key + np.uint64(i) * np.uint64(4) + np.uint64(k))


@numba.njit
def _level(x, shift, size):
    """A level in [0, size) from the 16 bits of ``x`` at ``shift`` (multiply and shift, no division:
    a bias below size / 2^16)."""
    return (((x >> np.uint64(shift)) & np.uint64(0xFFFF)) * size) >> np.uint64(16)


@numba.njit
def _fill_codes(out, seed, block, sizes):
    """Codes of a, b, c, e, f as rows of ``out``, from 16-bit fields of two draws per sample; a and
    b the smaller of two such levels (low codes over-represented, so that the sample's margins
    differ from the uniform targets)."""
    for i in range(out.shape[1]):
        x, y = _draws(seed, block, i, 0), _draws(seed, block, i, 1)
        out[0, i] = min(_level(x, 0, sizes[0]), _level(x, 16, sizes[0]))
        out[1, i] = min(_level(x, 32, sizes[1]), _level(x, 48, sizes[1]))
        out[2, i] = _level(y, 0, sizes[2])
        out[3, i] = _level(y, 16, sizes[3])
        out[4, i] = _level(y, 32, sizes[4])


@numba.njit
def _fill_values(out, seed, block, sizes):
    """Sample i's statistic: a / |a| + c / |c| - e / |e| (the codes it needs drawn again: a few
    operations) plus noise of mean 0 and variance 1 (the centred sum of four 16-bit uniforms,
    scaled)."""
    scale = np.sqrt(3.0) / 65536.0
    for i in range(out.shape[0]):
        x, y, z = _draws(seed, block, i, 0), _draws(seed, block, i, 1), _draws(seed, block, i, 2)
        a = min(_level(x, 0, sizes[0]), _level(x, 16, sizes[0]))
        noise = (float(z & np.uint64(0xFFFF)) + float((z >> np.uint64(16)) & np.uint64(0xFFFF))
                 + float((z >> np.uint64(32)) & np.uint64(0xFFFF)) + float(z >> np.uint64(48)) - 131070.0) * scale
        out[i] = a / sizes[0] + _level(y, 0, sizes[2]) / sizes[2] - _level(y, 16, sizes[3]) / sizes[3] + noise


def generate(block: int, rows: int, seed: int) -> np.ndarray:
    """Block ``block`` of the samples: codes of a, b, c, e, f (:data:`CODE_DTYPE`) as columns, from a
    counter-based generator in one compiled loop (4-5 ns per sample here, the values 8 ns: every
    pass over lazily generated samples pays it; before 2026-12-06 18:40 UTC NumPy's generator and
    remainders took 20-70 ns per sample on the workers, the values 15-80 ns, and needed the codes)."""
    out = np.empty((len(COLUMNS), rows), dtype=CODE_DTYPE[0])
    _fill_codes(out, np.uint64(seed), np.uint64(block), np.array(list(SIZES.values()), np.uint64))
    return out.T


def values_of(block: int, rows: int, seed: int) -> np.ndarray:
    """Block ``block`` of the samples' statistic, made without the block's codes (the generator draws
    the few it needs again), as a column read from storage would be."""
    out = np.empty(rows)
    _fill_values(out, np.uint64(seed), np.uint64(block), np.array(list(SIZES.values()), np.uint64))
    return out


def margins() -> dict:
    s = SIZES
    return {"a": np.full(s["a"], 1 / s["a"]), "b": np.full(s["b"], 1 / s["b"]), "c": np.full(s["c"], 1 / s["c"]),
            ("e", "f"): np.full((s["e"], s["f"]), 1 / (s["e"] * s["f"]))}


def peak_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def _threads(count: int | None):
    """numba's and the BLAS's threads limited to ``count`` inside (None: their defaults)."""
    if count is None:
        yield
        return
    import numba
    from threadpoolctl import threadpool_limits

    before = numba.get_num_threads()
    numba.set_num_threads(count)
    try:
        with threadpool_limits(count):
            yield
    finally:
        numba.set_num_threads(before)


def in_memory(n: int, chunk: int, seed: int, steps: int, local: str | None = None,
              threads: int | None = None) -> tuple[float, tuple]:
    """The in-memory estimator on the samples; with ``local`` (a Dask scheduler name) the Dask path
    on the same in-memory samples wrapped as Dask arrays, on that scheduler in this process. With
    ``threads``, numba and the BLAS run that many threads (the per-core figure: one)."""
    import dask
    import dask.array as da

    from databalance import BalancedEstimator

    blocks = [generate(i, min(chunk, n - i * chunk), seed) for i in range((n + chunk - 1) // chunk)]
    h = np.concatenate([values_of(i, len(b), seed) for i, b in enumerate(blocks)])
    codes = np.concatenate(blocks)
    del blocks
    data = {c: np.ascontiguousarray(codes[:, j]) for j, c in enumerate(COLUMNS)}
    if local is not None:
        data = {c: da.from_array(v, chunks=chunk) for c, v in data.items()}
        h = da.from_array(h, chunks=chunk)
    with dask.config.set(scheduler=local or "threads"), _threads(threads):
        start, cpu = time.perf_counter(), time.process_time()
        est = BalancedEstimator(margins(), steps=steps).fit(data).mean(h)
        CPU.append(time.process_time() - cpu)  # every thread of this process
        return time.perf_counter() - start, (est.estimate, est.standard_error)


def on_cluster(client, n: int, chunk: int, seed: int, steps: int, persist: bool = False,
               compare: bool = False) -> tuple[float, tuple]:
    import dask.array as da

    from databalance import BalancedEstimator

    nblocks = (n + chunk - 1) // chunk
    rows = tuple(min(chunk, n - i * chunk) for i in range(nblocks))
    ids = da.arange(nblocks, chunks=1)
    codes = da.map_blocks(lambda b: generate(int(b[0]), rows[int(b[0])], seed), ids, dtype=CODE_DTYPE[0],
                          chunks=(rows, (len(COLUMNS),)), new_axis=1)
    h = da.map_blocks(lambda b: values_of(int(b[0]), rows[int(b[0])], seed), ids, dtype=np.float64,
                      chunks=(rows,))
    data = {c: codes[:, j] for j, c in enumerate(COLUMNS)}
    if persist:  # generated once, held by the workers: the estimator's own throughput
        import distributed

        codes, h = client.persist([codes, h])
        distributed.wait([codes, h])
        data = {c: codes[:, j] for j, c in enumerate(COLUMNS)}
    before = sum(client.run(time.process_time).values()) + time.process_time()
    start = time.perf_counter()
    fitted = BalancedEstimator(margins(), steps=steps).fit(data)
    middle = time.perf_counter()
    est = fitted.mean(h)
    end = time.perf_counter()
    CPU.append(sum(client.run(time.process_time).values()) + time.process_time() - before)  # workers and client
    print(f"  n = {n:.3g}: fit {middle - start:.2f} s, mean {end - middle:.2f} s ({type(fitted._dask_fit).__name__}); "
          f"client peak so far {peak_mb():.0f} MB", flush=True)
    if compare:  # the mean again, its passes compiled and NumPy's, alternating (same fit, same cluster)
        for order in (("numba", "numpy"), ("numpy", "numba")):
            for kernel in order:
                os.environ["DATABALANCE_KERNEL"] = kernel
                try:
                    t0 = time.perf_counter()
                    again = fitted.mean(h)
                    MEANS.setdefault(kernel, []).append(time.perf_counter() - t0)
                finally:
                    del os.environ["DATABALANCE_KERNEL"]
                MEANS.setdefault("rel", []).append(max(abs(again.estimate / est.estimate - 1),
                                                       abs(again.standard_error / est.standard_error - 1)))
    return end - start, (est.estimate, est.standard_error)


#: With ``--compare-mean``: the seconds of each repeated ``mean`` per kernel, and the largest
#: relative difference of its estimate and SE from the timed run's.
MEANS: dict[str, list[float]] = {}


#: CPU seconds of every timed run, in order: on a machine shared with other jobs the wall time of a
#: process says little about its cost; its CPU time (all its threads; the workers' and the client's
#: for the cluster) does.
CPU: list[float] = []


def samples(args) -> None:
    import distributed
    from threadpoolctl import threadpool_info

    SIZES.update(CONFIGS[args.config])
    CODE_DTYPE[0] = np.int64 if args.wide_codes else np.uint16
    print(f"margins {args.config}: {SIZES}, steps={args.steps}; codes generated as {np.dtype(CODE_DTYPE[0])}")

    print("BLAS:", [(i["internal_api"], i.get("architecture"), i["num_threads"]) for i in threadpool_info()])
    local: list[tuple[float, float]] = []
    if args.local and not args.cluster_only:  # the Dask path in this process, before the cluster starts
        for _ in range(args.repeat):
            local.append((in_memory(args.n, args.chunk, args.seed, args.steps, args.local)[0], CPU[-1]))
    # (wall, CPU) of every run; in rounds: in memory (default threads), in memory (one thread), the
    # cluster, so that the machine's load changes alike for the three (its workers idle meanwhile)
    runs: dict[str, list[tuple[float, float]]] = {"memory": [], "memory1": [], "cluster": []}
    ref = None
    # The workers get SIZES with the generator: cloudpickle sends a script's functions by value.
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, memory_limit="2GiB",
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        # untimed: numba's compilation (or its load from the disk cache) in this process and the workers
        warm = min(args.n, 2 * 10**5)
        on_cluster(client, warm, min(args.chunk, warm // 2), args.seed, args.steps)
        if not args.cluster_only:
            in_memory(warm, min(args.chunk, warm // 2), args.seed, args.steps)
            in_memory(warm, min(args.chunk, warm // 2), args.seed, args.steps, threads=1)
        for _ in range(args.repeat):
            if not args.cluster_only:
                for label, threads in (("memory", None), ("memory1", 1)):
                    t, ref = in_memory(args.n, args.chunk, args.seed, args.steps, threads=threads)
                    runs[label].append((t, CPU[-1]))
            t, got = on_cluster(client, args.n, args.chunk, args.seed, args.steps, args.persist, args.compare_mean)
            runs["cluster"].append((t, CPU[-1]))
        workers = client.run(peak_mb)
    wall = {k: statistics.median(t for t, _ in v) for k, v in runs.items() if v}
    cpu = {k: statistics.median(c for _, c in v) for k, v in runs.items() if v}
    for label in ("memory", "memory1") if ref is not None else ():
        print(f"in memory ({'numba and BLAS threads limited to 1' if label == 'memory1' else 'default threads'}): "
              f"n = {args.n:.3g}, median {wall[label]:.2f} s of {[round(t, 2) for t, _ in runs[label]]}, "
              f"{args.n / wall[label]:.3g} samples/s (one process), CPU {cpu[label]:.2f} s "
              f"({args.n / cpu[label]:.3g} samples per CPU second); estimate {ref[0]:.10g} SE {ref[1]:.6g}")
    if local:
        t, c = statistics.median(t for t, _ in local), statistics.median(c for _, c in local)
        print(f"Dask path, scheduler {args.local!r}, same samples as in-memory Dask arrays: median {t:.2f} s "
              f"of {[round(x, 2) for x, _ in local]}, CPU {c:.2f} s; in memory (one thread) / Dask = "
              f"{wall['memory1'] / t:.2f} (wall), {cpu['memory1'] / c:.2f} (CPU)")
    per_core = args.n / wall["cluster"] / 2
    how = "persisted" if args.persist else "generated lazily by the passes that read them"
    print(f"cluster (2 workers x 1 thread, samples {how}): median {wall['cluster']:.2f} s of "
          f"{[round(t, 2) for t, _ in runs['cluster']]}, {per_core:.3g} samples/s/core; CPU (workers + client) "
          f"{cpu['cluster']:.2f} s, {args.n / cpu['cluster']:.3g} samples per CPU second; estimate {got[0]:.10g} "
          f"SE {got[1]:.6g}")
    print(f"peak memory: client {peak_mb():.0f} MB (with the in-memory runs' data), workers "
          + ", ".join(f"{v:.0f} MB" for v in workers.values()))
    if MEANS:
        compiled, plain = statistics.median(MEANS["numba"]), statistics.median(MEANS["numpy"])
        print(f"mean alone on the cluster: compiled passes median {compiled:.2f} s of {MEANS['numba']}, NumPy passes "
              f"median {plain:.2f} s of {MEANS['numpy']}; compiled / NumPy = {compiled / plain:.2f}; largest relative "
              f"difference of estimate and SE from the timed run {max(MEANS['rel']):.2g}")
    if ref is not None:
        one = args.n / wall["memory1"]  # the in-memory path's samples/s on one core (one thread)
        print(f"samples/s/core, cluster (n / (wall x 2 workers)) / in memory on one thread (n / wall): "
              f"{per_core / one:.2f}  <- the bar (>= 0.5)")
        print(f"samples per CPU second, cluster / in memory: {cpu['memory1'] / cpu['cluster']:.2f} (one thread), "
              f"{cpu['memory'] / cpu['cluster']:.2f} (default threads)")
        print(f"(older figure: cluster per core / in memory's default-threads wall as one core: "
              f"{per_core / (args.n / wall['memory']):.2f}); relative differences: estimate "
              f"{abs(got[0] / ref[0] - 1):.2g}, SE {abs(got[1] / ref[1] - 1):.2g}")


def sparse_block(block: int, rows: int, cols: int, per_row: int, seed: int):
    import scipy.sparse as sp

    rng = np.random.default_rng([seed, block])
    indices = rng.integers(0, cols, rows * per_row).astype(np.int32)
    data = rng.random(rows * per_row) + 0.1
    indptr = np.arange(0, rows * per_row + 1, per_row, dtype=np.int64)
    out = sp.csr_matrix((data, indices, indptr), shape=(rows, cols))
    out.sum_duplicates()
    return out


def _per_sweep(run, sweeps: int, repeat: int, steady: bool = False) -> tuple:
    """(median seconds of a run with 0 steps, median seconds per sweep, the same counting the run's
    fixed costs, the last result, and with ``steady`` the median seconds per sweep in the steady
    state, else None). A sweep's time is the difference between runs of ``sweeps`` and of one
    sweep, over ``sweeps - 1``: both pay the setup (validation, the Dask blocks' checks and frame
    sums) and the final float64 check of the marginal errors, which the older figure (``steps=2
    sweeps`` minus ``steps=0``, over ``sweeps``) spread over the sweeps. Both also pay the one-off
    builds the kernels make after ``fused_sparse.BUILD_AFTER`` passes (the in-memory kernel's
    tiled copy, the Dask blocks' tiled copies on the workers) when ``sweeps`` is beyond it; the
    steady state is the difference between runs of ``2 * sweeps`` and of ``sweeps`` sweeps, over
    ``sweeps``: both runs pay the builds, and the sweeps measured all read the copies."""
    zero, one, full, double, within = [], [], [], [], []
    result = None
    runs = ((0, zero), (2, one), (2 * sweeps, full)) + (((4 * sweeps, double),) if steady else ())
    for _ in range(repeat):
        for k, times in runs:
            stamps: dict = {}
            start = time.perf_counter()
            result = run(k, lambda step, errors, stamps=stamps: stamps.__setitem__(step, time.perf_counter()))
            times.append(time.perf_counter() - start)
            if k == 4 * sweeps:  # the steady state inside the run: half-steps 2 * sweeps to 4 * sweeps
                within.append((stamps[4 * sweeps] - stamps[2 * sweeps]) / sweeps)
    zero_m, one_m, full_m = (statistics.median(t) for t in (zero, one, full))
    # The steady state as the difference of two runs' medians ((t(4s) - t(2s)) / s) swung by +-50%
    # between repetitions: both runs include a one-off build (the in-memory tiled copy) whose time
    # varied 0.16-0.52 s from run to run. Timed inside each run (per-step timestamps), it does not.
    steady_m = statistics.median(within) if steady else None
    global _DIFFERENCE
    _DIFFERENCE = (statistics.median(double) - full_m) / sweeps if steady else None
    return zero_m, (full_m - one_m) / (sweeps - 1), (full_m - zero_m) / sweeps, result, steady_m


_DIFFERENCE = None


@contextlib.contextmanager
def _plain_kernel():
    """Dask tables balanced by the two-map kernel (a row map, then a column map and its tree sum)."""
    from databalance._kernels import chunked

    original = chunked.ChunkedKernel.__dict__["from_input"]
    chunked.ChunkedKernel.from_input = classmethod(lambda cls, t: original.__func__(cls, t, plain=True))
    try:
        yield
    finally:
        chunked.ChunkedKernel.from_input = original


@contextlib.contextmanager
def _rows_to_client():
    """Dask tables balanced by the futures sweep that sends every sweep's rows' sums to the client
    (before the rows stayed on the workers: ``chunked.ROWS_ON_WORKERS = False``)."""
    from databalance._kernels import chunked

    chunked.ROWS_ON_WORKERS = False
    try:
        yield
    finally:
        chunked.ROWS_ON_WORKERS = True


@contextlib.contextmanager
def _graph_sweep():
    """Dask tables balanced by the one-map sweep as one graph per sweep (``dask.compute``; the
    kernel before the futures API, held blocks and their tiled copies)."""
    from databalance._kernels import chunked

    original = chunked.FusedChunkedKernel._submitted
    chunked.FusedChunkedKernel._submitted = lambda self, *args: None
    chunked.ROWS_ON_WORKERS = False  # else the sweep keeps the rows on the workers by the futures API
    try:
        yield
    finally:
        chunked.FusedChunkedKernel._submitted = original
        chunked.ROWS_ON_WORKERS = True


def table(args) -> None:
    import dask
    import dask.array as da
    import distributed
    import scipy.sparse as sp
    from threadpoolctl import threadpool_info

    from databalance import balance_table
    from databalance._kernels import chunked

    print("BLAS:", [(i["internal_api"], i.get("architecture"), i["num_threads"]) for i in threadpool_info()])
    rows = args.nnz // args.per_row
    nblocks = (rows + args.block_rows - 1) // args.block_rows
    sizes = [min(args.block_rows, rows - i * args.block_rows) for i in range(nblocks)]
    p = np.full(rows, 1 / rows)
    q = np.random.default_rng(1).dirichlet(np.ones(args.cols))
    parts = [da.from_delayed(dask.delayed(sparse_block)(i, r, args.cols, args.per_row, args.seed),
                             shape=(r, args.cols), dtype=np.float64, meta=sp.csr_matrix((0, 0)))
             for i, r in enumerate(sizes)]
    lazy = da.concatenate(parts)
    print(f"sparse table {rows} x {args.cols}, {args.nnz:.3g} nnz in {nblocks} row blocks; {args.sweeps} sweeps")
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, memory_limit=args.memory,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        def timed_run(k, progress=None):
            return balance_table(built, p, q, steps=k, progress=progress)

        start = time.perf_counter()
        built = client.persist(lazy)  # the blocks built on the workers once, as a user would
        distributed.wait(built)
        build = time.perf_counter() - start
        start = time.perf_counter()
        balance_table(built, p, q, steps=2 * args.sweeps)  # untimed: numba compiles (or loads) on the workers
        warm = time.perf_counter() - start
        setup, sweep, with_fixed, got, steady = _per_sweep(timed_run,
                                                           args.sweeps, args.repeat, steady=True)
        diff = _DIFFERENCE
        if args.plain:  # interleaved with the rows kept on the workers, run after run
            old_runs, new_runs = [], []
            for _ in range(args.repeat):
                with _rows_to_client():
                    old_runs.append(_per_sweep(timed_run,
                                               args.sweeps, 1, steady=True))
                new_runs.append(_per_sweep(timed_run,
                                           args.sweeps, 1, steady=True))
            sweep_rows = statistics.median(r[1] for r in old_runs)
            steady_rows = statistics.median(r[4] for r in old_runs)
            sweep_new = statistics.median(r[1] for r in new_runs)
            steady_new = statistics.median(r[4] for r in new_runs)
        if args.plain:
            with _graph_sweep():
                _, sweep_graph, fixed_graph, _, steady_graph = _per_sweep(
                    timed_run, args.sweeps, args.repeat, steady=True)
            with _plain_kernel():
                _, sweep_plain, fixed_plain, _, _ = _per_sweep(timed_run,
                                                               args.sweeps, args.repeat)
        workers = client.run(peak_mb)
    print(f"  dask (2 workers x 1 thread; futures, blocks held balanced; tiled copies only from sweep "
          f"{chunked.HELD_BUILD_AFTER}): blocks "
          f"built in {build:.2f} s; a first untimed run {warm:.2f} s; setup (checks, frame sums) {setup:.2f} s, "
          f"per sweep {sweep:.3f} s "
          f"({with_fixed:.3f} s with the fixed costs spread), steady state {steady:.3f} s (timed inside the runs; "
          f"as the difference of two runs {diff:.3f} s); workers' peak "
          + ", ".join(f"{v:.0f} MB" for v in workers.values()))
    if args.plain:
        print(f"  dask, rows sent to the client every sweep (before), interleaved with the rows kept on the workers: "
              f"per sweep {sweep_rows:.3f} s against {sweep_new:.3f} s, steady state {steady_rows:.3f} s against "
              f"{steady_new:.3f} s; kept / sent {steady_new / steady_rows:.2f} steady")
        print(f"  dask, one graph per sweep (dask.compute; the kernel before the futures API): per sweep "
              f"{sweep_graph:.3f} s ({fixed_graph:.3f} s), steady state {steady_graph:.3f} s; futures / graph "
              f"{sweep / sweep_graph:.2f} per sweep, {steady / steady_graph:.2f} steady")
        print(f"  dask, two maps per sweep (the kernel before the one-map sweep): per sweep {sweep_plain:.3f} s "
              f"({fixed_plain:.3f} s); futures / two maps = {sweep / sweep_plain:.2f}")
    if args.cluster_only:
        return
    csr = sp.csr_array(sp.vstack([sparse_block(i, r, args.cols, args.per_row, args.seed) for i, r in
                                  enumerate(sizes)], format="csr"))
    def timed_memory(k, progress=None):
        return balance_table(csr, p, q, steps=k, progress=progress)

    balance_table(csr, p, q, steps=2 * args.sweeps)  # untimed, as on the cluster
    setup_m, sweep_m, fixed_m, ref, steady_m = _per_sweep(timed_memory, args.sweeps,
                                                          args.repeat, steady=True)
    print(f"  in memory (one process): setup {setup_m:.2f} s, per sweep {sweep_m:.3f} s ({fixed_m:.3f} s with the "
          f"fixed costs spread; both include the build of its tiled copy), steady state (copy built; timed inside "
          f"the runs) {steady_m:.3f} s (as the difference of two runs {_DIFFERENCE:.3f} s); peak {peak_mb():.0f} MB")
    rel = max(np.abs(got.row_scaling / ref.row_scaling - 1).max(), np.abs(got.col_scaling / ref.col_scaling - 1).max())
    print(f"  per sweep, dask / in memory: {sweep / sweep_m:.2f} ({with_fixed / fixed_m:.2f} with the fixed costs "
          f"spread); steady states, dask / in memory: {steady / steady_m:.2f} (the bar: within 2x); dask per "
          f"sweep / in-memory steady state: {sweep / steady_m:.2f}; largest relative difference of the scalings "
          f"{rel:.2g}")
    if args.plain:
        print(f"  rows sent to the client (before) / in-memory steady state: {sweep_rows / steady_m:.2f} per sweep, "
              f"{steady_rows / steady_m:.2f} steady; rows kept on the workers (interleaved with it): "
              f"{sweep_new / steady_m:.2f} per sweep, {steady_new / steady_m:.2f} steady")
        print(f"  one graph per sweep (before) / in-memory steady state: {sweep_graph / steady_m:.2f} per sweep, "
              f"{steady_graph / steady_m:.2f} steady")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("samples")
    s.add_argument("--n", type=int, default=10**7)
    s.add_argument("--chunk", type=int, default=10**6)
    s.add_argument("--steps", type=int, default=12)
    s.add_argument("--repeat", type=int, default=3)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--cluster-only", action="store_true")
    s.add_argument("--config", choices=list(CONFIGS), default="bar")
    s.add_argument("--local", choices=["sync", "threads"], help="also time the Dask path in this process on "
                   "the in-memory samples with this scheduler (no cluster: the per-core cost of the path itself)")
    s.add_argument("--persist", action="store_true", help="generate the samples once and persist them on the "
                   "workers before timing (else they are generated lazily by the passes that read them)")
    s.add_argument("--wide-codes", action="store_true", help="generate the codes as int64 (the benchmark before "
                   "2026-12-06 15:40 UTC; the same codes, four times the bytes)")
    s.add_argument("--compare-mean", action="store_true", help="after each timed run, time the mean again with "
                   "its passes compiled and with NumPy (DATABALANCE_KERNEL=numpy), alternating")
    t = sub.add_parser("table")
    t.add_argument("--nnz", type=int, default=5 * 10**7)
    t.add_argument("--per-row", type=int, default=50)
    t.add_argument("--cols", type=int, default=100_000)
    t.add_argument("--block-rows", type=int, default=100_000)
    t.add_argument("--sweeps", type=int, default=10)
    t.add_argument("--repeat", type=int, default=3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--memory", default="4GiB", help="memory limit per worker")
    t.add_argument("--cluster-only", action="store_true")
    t.add_argument("--plain", action="store_true", help="also time the one-map sweep as one graph per sweep "
                   "(the kernel before the futures API) and the two-map kernel (two computes per sweep)")
    args = parser.parse_args()
    samples(args) if args.what == "samples" else table(args)


if __name__ == "__main__":
    main()
