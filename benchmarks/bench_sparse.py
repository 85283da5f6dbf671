"""Per-sweep time of the fused sparse kernels against scipy's two products (issue 11).

Usage (prints Markdown; RESULTS.md records the output and this command):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_sparse.py [--quick]
        [--nnz 1e7,5e7] [--repeats 3] [--sweeps 2] [--mode interleaved,isolated] [--no-floors]
        [--no-short]

The default run takes about 3 minutes on a quiet two-core machine.

Tables 10^6 x 10^6 CSR (columns uniform; rows uniform, or lengths from a Zipf law). Contenders,
each timed over ``--sweeps`` sweeps and reported per sweep:

* ``scipy``: the bare sweep ``u = p / (K @ v); v = q / (K.T @ u)`` (scipy.sparse is single-threaded);
* ``loop, scipy kernel``: the library's half-step loop (errors and all) on the NumPy/SciPy kernel;
* ``loop, tiled``: the loop on the fused kernel with the tiled copy (a threaded gather over the
  stored lines, then the other margin's sums block of other lines by block from the tiled copy;
  its one-off build is timed separately);
* ``loop, transposed``: the loop on the fused kernel with the transposed pattern (two threaded
  gathers per sweep; its one-off build is timed separately);
* ``loop, accumulators``: the loop on the fused kernel with per-thread accumulators (one pass).

numba's thread count is set for each row (1, 2); BLAS is held to one thread (threadpoolctl) so no
OpenBLAS worker spins beside numba's threads. ``interleaved``: each repeat runs every contender in
turn (medians over repeats); ``isolated``: each contender's repeats run back to back, alone. The
floors (skipped by ``--no-floors``): each pass alone (scipy's ``K @ v`` and ``K.T @ u``, the fused
kernel's lead pass, its other pass from the tiled copy and from the transposed pattern, a streaming
read of the values and indices), 1 thread (wall and CPU time: under load, the CPU time is the
steadier) and 2 threads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numba
import numpy as np
import scipy.sparse as sp
from bench_kernels import loop_sweeps  # the same steady-state timing (benchmarks/ is on the path)
from threadpoolctl import threadpool_info, threadpool_limits

import databalance as db
from databalance._kernels import fused
from databalance._kernels import fused_sparse as fs
from databalance._kernels.fused import compiled
from databalance._kernels.sparse import SparseKernel

#: The layouts timed per sweep (``adaptive`` is ``tiled`` once built: see the short runs).
LAYOUTS = ("tiled", "transposed", "accumulators")


def power_law_csr(n, nnz, rng, alpha=1.2):
    """n x n CSR, ``nnz`` entries: row lengths from a Zipf-like law (a few rows hold many entries),
    columns uniform, indices unsorted within rows; or uniform rows when alpha is None."""
    if alpha is None:
        lengths = np.full(n, nnz // n)
        lengths[: nnz - lengths.sum()] += 1
    else:
        w = (np.arange(1, n + 1, dtype=np.float64)) ** -(1 / alpha)
        lengths = np.floor(w / w.sum() * nnz).astype(np.int64)
        lengths = np.minimum(lengths, n)
        short = nnz - lengths.sum()
        lengths[np.argsort(lengths, kind="stable")[: short]] += 1
        rng.shuffle(lengths)
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=indptr[1:])
    indices = rng.integers(0, n, size=int(indptr[-1]), dtype=np.int32)
    indptr = indptr.astype(np.int32) if indptr[-1] < 2**31 else indptr
    data = rng.random(indices.size) + 0.1
    out = sp.csr_array((data, indices, indptr), shape=(n, n))
    out.has_sorted_indices = False
    return out


def timed(fns: dict, repeats: int, mode: str) -> dict:
    """Median seconds of each function (its own timing when it returns one): ``interleaved``
    (each repeat runs all in turn) or ``isolated`` (each function's repeats back to back)."""
    times: dict = {name: [] for name in fns}

    def once(name, fn):
        t0 = time.perf_counter()
        own = fn()
        times[name].append(own if isinstance(own, float) else time.perf_counter() - t0)

    if mode == "interleaved":
        for _ in range(repeats):
            for name, fn in fns.items():
                once(name, fn)
    else:
        for name, fn in fns.items():
            for _ in range(repeats):
                once(name, fn)
    return {name: statistics.median(ts) for name, ts in times.items()}


def table(n, nnz, kind):
    rng = np.random.default_rng(1)
    K = power_law_csr(n, nnz, rng, None if kind == "uniform" else 1.2)
    # lines without mass are given target 0 (the loop's ratio needs mass on every other line)
    p = np.where(np.diff(K.indptr) > 0, 1.0, 0.0)
    q = np.where(np.bincount(K.indices, minlength=n) > 0, 1.0, 0.0)
    return K, p / p.sum(), q / q.sum()


def bench_table(n, nnz, kind, repeats, sweeps, modes, rows, builds):
    """One table's rows (per thread count and mode) and its copies' builds."""
    K, p, q = table(n, nnz, kind)
    KT = K.T
    slow = SparseKernel.from_input(K)
    fast = {layout: fs.FusedSparseKernel(K, layout) for layout in LAYOUTS}

    def bare():
        v = np.ones(n)
        for _ in range(sweeps):
            with np.errstate(divide="ignore", invalid="ignore"):
                u = p / (K @ v)
                v = q / (KT @ u)

    fns = {"scipy": bare, "loop, scipy kernel": loop_sweeps(slow, p, q, sweeps, warm=1)}
    fns.update({f"loop, {layout}": loop_sweeps(fast[layout], p, q, sweeps, warm=1) for layout in LAYOUTS})
    tiny = sp.csr_array(np.eye(3, dtype=K.dtype))
    fs.transposed_pattern(*fs.FusedSparseKernel(tiny)._lines, 3)  # compiled (or loaded) before timing
    fs.tiled_pattern(*fs.FusedSparseKernel(tiny)._lines, 3)
    for nt in (1, 2):
        numba.set_num_threads(nt)
        copies = {"transposed": lambda: fs.transposed_pattern(*fast["transposed"]._lines, n),
                  "tiled": lambda: fs.tiled_pattern(*fast["tiled"]._lines, n)}
        built = {}
        for name, build in copies.items():
            t0 = time.perf_counter()
            copy = build()
            built[name] = (time.perf_counter() - t0, sum(a.nbytes for a in copy if isinstance(a, np.ndarray)))
            del copy
        t0 = time.perf_counter()
        K.tocsc()
        builds.append((kind, nnz, nt, built["tiled"][0], built["transposed"][0], time.perf_counter() - t0,
                       built["tiled"][1], built["transposed"][1], K.data.nbytes + K.indices.nbytes + K.indptr.nbytes))
        for layout in LAYOUTS:
            loop_sweeps(fast[layout], p, q, 1, warm=1)()  # compile, build the copy
        for mode in modes:
            t = timed(fns, repeats, mode)
            base = t["scipy"]
            rows.append((kind, nnz, nt, mode, *(1e3 * t[k] / sweeps for k in fns),
                         *(t[f"loop, {layout}"] / base for layout in LAYOUTS)))


def short_runs(n, nnz, kind, repeats, runs=(1, 4, 16, 64)):
    """Whole ``balance_table(K, p, q, steps=2k)`` calls (validation, the copy's build included):
    the scipy kernel against the fused kernel's adaptive and tiled layouts, two threads."""
    K, p, q = table(n, nnz, kind)
    out = []
    numba.set_num_threads(2)

    def call(kernel, layout, k):
        def go():
            os.environ[fused.ENV] = kernel
            fs.DEFAULT_LAYOUT = layout
            try:
                db.balance_table(K, p, q, steps=2 * k, acceleration="none")
            finally:
                del os.environ[fused.ENV]
                fs.DEFAULT_LAYOUT = "adaptive"
        return go

    call("numba", "adaptive", 1)()  # compile
    for k in runs:
        fns = {"scipy": call("numpy", "adaptive", k), "adaptive": call("numba", "adaptive", k),
               "tiled": call("numba", "tiled", k)}
        t = timed(fns, max(1, repeats // (1 + k // 16)), "interleaved")
        out.append((kind, nnz, k, t["scipy"], t["adaptive"], t["tiled"]))
    return out


def bench(n, nnzs, repeats, sweeps, modes, floors, short):
    rows, builds, floor_rows, shorts = [], [], [], []
    for nnz in nnzs:
        for kind in ("uniform", "power-law"):
            bench_table(n, nnz, kind, repeats, sweeps, modes, rows, builds)
            if short and nnz == nnzs[0]:
                shorts += short_runs(n, nnz, kind, repeats)
            if floors:
                floor_rows += measure_floors(table(n, nnz, kind)[0], kind, repeats)
    names = ["scipy K@v + K.T@u", "loop, scipy kernel"] + [f"loop, {layout}" for layout in LAYOUTS]
    print("Per sweep, ms (ratios: the fused loop over scipy's bare two products, same run):\n")
    print("| rows | nnz | threads | mode | " + " | ".join(names) + " | "
          + " | ".join(f"{layout} / scipy" for layout in LAYOUTS) + " |")
    print("|---|---|---|---|" + "---|" * (len(names) + len(LAYOUTS)))
    for r in rows:
        print(f"| {r[0]} | {r[1]:.0e} | {r[2]} | {r[3]} | " + " | ".join(f"{x:.1f}" for x in r[4:4 + len(names)])
              + " | " + " | ".join(f"{x:.2f}" for x in r[4 + len(names):]) + " |")
    print("\nThe copies' one-off builds (threaded counting sorts) against scipy's `K.tocsc()`:\n")
    print("| rows | nnz | threads | tiled build s | transposed build s | scipy tocsc s | tiled MB | transposed MB "
          "| table MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for b in builds:
        print(f"| {b[0]} | {b[1]:.0e} | {b[2]} | {b[3]:.3f} | {b[4]:.3f} | {b[5]:.3f} | {b[6] / 2**20:.0f} | "
              f"{b[7] / 2**20:.0f} | {b[8] / 2**20:.0f} |")
    if shorts:
        print("\nWhole calls `balance_table(K, p, q, steps=2k, acceleration='none')`, 2 threads, seconds "
              f"(adaptive builds the tiled copy in pass {fs.BUILD_AFTER + 1}):\n")
        print("| rows | nnz | sweeps k | scipy kernel | adaptive | tiled | adaptive / scipy "
              "| tiled / scipy |")
        print("|---|---|---|---|---|---|---|---|")
        for r in shorts:
            print(f"| {r[0]} | {r[1]:.0e} | {r[2]} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.3f} | {r[4] / r[3]:.2f} | "
                  f"{r[5] / r[3]:.2f} |")
    if floor_rows:
        print("\nEach pass alone, minima, ms: 1 thread wall / CPU, 2 threads wall (scipy is single-threaded):\n")
        names = ["scipy K@v", "scipy K.T@u", "lead pass (gather)", "other pass, tiled", "other pass, transposed",
                 "streaming read of values + indices"]
        print("| rows | nnz | " + " | ".join(f"{x}, 1 thread" for x in names) + " | "
              + " | ".join(f"{x}, 2 threads" for x in names[2:]) + " |")
        print("|---|---|" + "---|" * (len(names) + len(names) - 2))
        for f in floor_rows:
            one = " | ".join(f"{f[2 + 2 * i]:.1f} / {f[3 + 2 * i]:.1f}" for i in range(len(names)))
            print(f"| {f[0]} | {f[1]:.0e} | {one} | " + " | ".join(f"{x:.1f}" for x in f[2 + 2 * len(names):]) + " |")


def _stream(indptr, indices, data, bounds, out):
    for t in numba.prange(bounds.size - 1):
        for i in range(bounds[t], bounds[t + 1]):
            s = 0.0
            for k in range(indptr[i], indptr[i + 1]):
                s += data[k] * indices[k]
            out[i] = s


def measure_floors(K, kind, repeats):
    """Each pass alone, 1 thread (wall and CPU time, minima) and 2 threads (wall, minimum): scipy's
    two products, the kernel's lead pass (a gather over the stored lines), the other margin's sums
    from the tiled copy and from the transposed pattern, a streaming read of values + indices."""
    n = K.shape[0]
    v = np.random.default_rng(0).random(n)
    KT = K.T
    ip, ix = fs._unsigned(K.indptr), fs._unsigned(K.indices)
    out = np.empty(n)
    stream = numba.njit(_stream, parallel=True, fastmath=True)
    gather = compiled(fs._gather)
    tiled, transposed = fs.FusedSparseKernel(K, "tiled"), fs.FusedSparseKernel(K, "transposed")
    tiled.col_sums(v), transposed.col_sums(v)  # built, compiled

    bounds = {nt: fs._block_bounds(K.indptr, nt) for nt in (1, 2)}  # outside the timings, as the kernel's

    def lead():
        gather(ip, ix, K.data, v, bounds[numba.get_num_threads()], out)

    fns = {"Kv": lambda: K @ v, "KTu": lambda: KT @ v, "lead": lead, "tiled": lambda: tiled.col_sums(v),
           "transposed": lambda: transposed.col_sums(v),
           "stream": lambda: stream(ip, ix, K.data, bounds[numba.get_num_threads()], out)}
    fs_per_thread, fs.PER_THREAD = fs.PER_THREAD, 1  # every pass split among the threads set
    try:
        row = [kind, K.nnz]
        for nt in (1, 2):
            numba.set_num_threads(nt)
            for f in fns.values():
                f()
            for name, f in fns.items():
                if nt == 2 and name in ("Kv", "KTu"):
                    continue
                walls, cpus = [], []
                for _ in range(max(3, repeats)):
                    c0, t0 = time.process_time(), time.perf_counter()
                    f()
                    walls.append(time.perf_counter() - t0)
                    cpus.append(time.process_time() - c0)
                row += [1e3 * min(walls)] + ([1e3 * min(cpus)] if nt == 1 else [])
    finally:
        fs.PER_THREAD = fs_per_thread
    return [tuple(row)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="10^5 x 10^5, 10^6 nonzeros")
    ap.add_argument("--nnz", default="1e7,5e7", help="sizes, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sweeps", type=int, default=2)
    ap.add_argument("--mode", default="interleaved,isolated")
    ap.add_argument("--no-floors", action="store_true")
    ap.add_argument("--no-short", action="store_true", help="skip the whole short calls")
    args = ap.parse_args()
    info = ", ".join(f"{d['internal_api']} {d.get('architecture')} ({d['num_threads']} threads max)"
                     for d in threadpool_info() if d["user_api"] == "blas")
    print(f"BLAS: {info} (held to 1 thread); numba {numba.__version__}, threading layer "
          f"{numba.config.THREADING_LAYER}; medians of {args.repeats} repeats of {args.sweeps} sweeps\n")
    n = 10**5 if args.quick else 10**6
    nnzs = [10**6] if args.quick else [int(float(x)) for x in args.nnz.split(",")]
    with threadpool_limits(1):
        bench(n, nnzs, args.repeats, args.sweeps, args.mode.split(","), not args.no_floors, not args.no_short)
    print(f"\nthreading layer used: {numba.threading_layer()}")


if __name__ == "__main__":
    main()
