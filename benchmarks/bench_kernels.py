"""Per-sweep time of the fused numba kernels against the NumPy/SciPy forms (issue 11).

Usage (prints Markdown; RESULTS.md records the output and this command):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_kernels.py [--quick]
        [--only dense,log] [--repeats 5]

(sparse tables: benchmarks/bench_sparse.py)

Every comparison is interleaved (rounds in which each contender runs a few times in a row after a
pause; medians over all timed calls), with the thread count set for both sides: BLAS threads
(threadpoolctl) for the NumPy forms, ``numba.set_num_threads`` for the fused kernels.

* dense: the NumPy two-matvec sweep ``u = p / (T @ v); v = q / (T.T @ u)`` against the library's
  half-step loop (errors and all) on the fused kernel and on the NumPy kernel, per sweep (the
  loop's sweeps timed after two untimed ones: the steady state).
* variance: ``variance_profile(T, h, max_steps=20)`` on the fused passes against BLAS products.
* log: ``balance_logits(L, steps=40)`` (20 sweeps, from the logits: exponentiation included)
  against 20 fused sweeps plus one ``np.exp`` of the table, and against the NumPy log kernel.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numba
import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_info, threadpool_limits

import databalance as db
from databalance import _ipf
from databalance import _kernels as kernels
from databalance._kernels import fused


def interleaved(fns: dict, repeats: int, rounds: int = 3) -> dict:
    """Median seconds per call of each function: ``rounds`` rounds, each running every function in
    turn, ``repeats`` timed calls in a row after one untimed call and a pause. The pause lets the
    other contender's threads stop spinning (OpenBLAS's after a product, OpenMP's after a parallel
    region): on two cores they would otherwise take a core from the next contender."""
    times: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            time.sleep(PAUSE)
            fn()
            for _ in range(repeats):
                t0 = time.perf_counter()
                own = fn()  # a function may time its steady part itself (and return the seconds)
                times[name].append(own if isinstance(own, float) else time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


#: Seconds between contenders (OpenBLAS's threads spin for about 2^28 cycles after a product).
PAUSE = 0.5


def loop_sweeps(kernel, p, q, sweeps: int, warm: int = 2):
    """A function running ``warm + sweeps`` sweeps of the library's half-step loop on ``kernel``
    and returning the seconds of the last ``sweeps``: the steady state, without the loop's setup
    and first sweeps (whose first column sums are a plain product on every kernel)."""
    problem = _ipf.Problem.from_targets([p, q], ["p_x", "p_y"], np.ones(kernel.batch), kernel.dtype)

    def go() -> float:
        it = _ipf.half_steps(kernel, problem)
        for _ in range(2 * warm + 1):
            next(it)
        t0 = time.perf_counter()
        for _ in range(2 * sweeps):
            next(it)
        return time.perf_counter() - t0

    return go


def under(name: str, fn):
    """``fn`` as a contender run with ``DATABALANCE_KERNEL=name`` (returning nothing)."""
    def go():
        os.environ[fused.ENV] = name
        try:
            fn()
        finally:
            del os.environ[fused.ENV]
    return go


def kernel_of(table, name: str):
    os.environ[fused.ENV] = name
    try:
        return kernels.kernel_for(table)
    finally:
        del os.environ[fused.ENV]


def bench_dense(sizes, repeats, sweeps):
    rows = []
    for n in sizes:
        for dtype in (np.float64, np.float32):
            rng = np.random.default_rng(0)
            T = rng.random((n, n), dtype=dtype) + dtype(0.01)
            p = np.full(n, 1 / n, dtype)
            fast, slow = kernel_of(T, "numba"), kernel_of(T, "numpy")
            assert type(fast).__name__ == "FusedDenseKernel"

            def bare():
                v = np.ones(n, dtype)
                for _ in range(sweeps):
                    u = p / (T @ v)
                    v = p / (T.T @ u)

            for nt in (1, 2):
                numba.set_num_threads(nt)
                with threadpool_limits(nt):
                    loop_sweeps(fast, p, p, 2)()  # compile / warm
                    t = interleaved({"bare": bare, "fused": loop_sweeps(fast, p, p, sweeps),
                                     "numpy": loop_sweeps(slow, p, p, sweeps)}, repeats)
                per_sweep = (1e3 * t[k] / sweeps for k in ("bare", "numpy", "fused"))
                rows.append((f"{n}^2", np.dtype(dtype).name, nt, *per_sweep, t["fused"] / t["bare"]))
    print("| table | dtype | threads | NumPy two-matvec ms/sweep | loop, NumPy kernel | loop, fused kernel "
          "| fused / two-matvec |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.2f} |")


def bench_log(n, repeats, sweeps=20):
    rng = np.random.default_rng(2)
    print("| table | dtype | threads | 20 fused sweeps + np.exp ms | balance_logits fused ms | ratio | "
          "20 NumPy sweeps + np.exp ms | balance_logits NumPy ms | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype in (np.float64, np.float32):
        L = (rng.normal(size=(n, n)) * 3).astype(dtype)
        p = np.full(n, 1 / n)
        E = np.exp(L)
        fast, slow = kernel_of(E, "numba"), kernel_of(E, "numpy")
        plain_fast, plain_slow = loop_sweeps(fast, p.astype(dtype), p.astype(dtype), sweeps), \
            loop_sweeps(slow, p.astype(dtype), p.astype(dtype), sweeps)

        def logits(name):
            return under(name, lambda: db.balance_logits(L, p, p, steps=2 * sweeps))

        for nt in (1, 2):
            numba.set_num_threads(nt)
            with threadpool_limits(nt):
                logits("numba")()
                t = interleaved({"exp": lambda: np.exp(L), "plain_fast": plain_fast, "plain_slow": plain_slow,
                                 "log_fast": logits("numba"), "log_slow": logits("numpy")}, repeats)
            base_f = t["exp"] + t["plain_fast"]
            base_s = t["exp"] + t["plain_slow"]
            print(f"| {n}^2 | {np.dtype(dtype).name} | {nt} | {1e3 * base_f:.0f} | {1e3 * t['log_fast']:.0f} | "
                  f"{t['log_fast'] / base_f:.2f} | {1e3 * base_s:.0f} | {1e3 * t['log_slow']:.0f} | "
                  f"{t['log_slow'] / base_s:.2f} |")


def bench_variance(n, repeats, steps=20):
    """variance_profile's chains on fused passes (one read per two steps) against BLAS products
    (one read per step), on a slowly mixing table (s_2 about 0.99: no chain stops early)."""
    rng = np.random.default_rng(3)
    T = rng.random((n, n)) * 0.01
    T[: n // 2, : n // 2] += 1.0
    T[n // 2 :, n // 2 :] += 1.0
    h = rng.normal(size=(n, n))
    print("| table | threads | variance_profile, BLAS products ms | fused passes ms | ratio |")
    print("|---|---|---|---|---|")
    profiles(T, h, steps, repeats, lambda nt, t: f"| {n}^2 | {nt} | {1e3 * t['numpy']:.0f} | "
                                                 f"{1e3 * t['numba']:.0f} | {t['numba'] / t['numpy']:.2f} |")


def profiles(T, h, steps, repeats, row):
    """variance_profile on the NumPy and the fused kernels, interleaved, on one and two threads:
    prints ``row(threads, median seconds by kernel)``."""
    def profile(name):
        return under(name, lambda: db.variance_profile(T, h, max_steps=steps))

    for nt in (1, 2):
        numba.set_num_threads(nt)
        with threadpool_limits(nt):
            t = interleaved({"numpy": profile("numpy"), "numba": profile("numba")}, repeats)
        print(row(nt, t))


def bench_variance_sparse(n, nnz, repeats, steps=10):
    """variance_profile of a CSR table (``h`` per stored entry) on the sparse kernel's threaded
    gathers (one per step) against scipy's products (one per step, one thread)."""
    rng = np.random.default_rng(4)
    rows, cols = rng.integers(0, n, nnz), rng.integers(0, n, nnz)
    keep = np.concatenate([rows, np.arange(n)]), np.concatenate([cols, rng.permutation(n)])
    T = sp.csr_array((rng.random(len(keep[0])) + 0.1, keep), shape=(n, n))
    T.sum_duplicates()
    h = rng.normal(size=T.nnz)
    print("| table | nnz | threads | variance_profile, scipy products ms | threaded gathers ms | ratio |")
    print("|---|---|---|---|---|---|")
    profiles(T, h, steps, repeats, lambda nt, t: f"| {n} x {n} | {T.nnz} | {nt} | {1e3 * t['numpy']:.0f} | "
                                                 f"{1e3 * t['numba']:.0f} | {t['numba'] / t['numpy']:.2f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="dense,log,variance")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    only = args.only.split(",")
    info = ", ".join(f"{d['internal_api']} {d.get('architecture')} ({d['num_threads']} threads max)"
                     for d in threadpool_info() if d["user_api"] == "blas")
    print(f"BLAS: {info}; numba {numba.__version__}, threading layer {numba.config.THREADING_LAYER}; "
          f"medians of 3 rounds x {args.repeats} timed calls per contender\n")
    if "dense" in only:
        bench_dense([1000] if args.quick else [4000, 8000], args.repeats, 10)
        print()
    if "log" in only:
        bench_log(1000 if args.quick else 4000, args.repeats)
        print()
    if "variance" in only:
        bench_variance(1000 if args.quick else 4000, args.repeats)
        print()
        bench_variance_sparse(10**4 if args.quick else 10**6, 10**5 if args.quick else 10**7, args.repeats)


if __name__ == "__main__":
    main()
