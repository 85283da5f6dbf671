"""Speed of databalance.balance_margins on a dense 3-d table with three one-way and one two-way margin.

Usage (prints Markdown; RESULTS.md records the output and this command):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_margins.py [--n 200] [--repeats 7]

The bar (issue 9): one sweep (K = 4 half-steps) costs at most 1.5x the time of reading the table
once per margin with NumPy (``T.sum(axis=...)`` for each margin). A sweep of balance_margins is
timed as a slope between runs of 4 (S + 2) and 8 half-steps, so validation and setup are excluded.
The textbook loop (the whole table rescaled in place at every half-step, as ipfn does) and ipfn
itself (when installed) are timed alongside for scale.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

import databalance as db

try:
    from ipfn import ipfn
except ImportError:  # pragma: no cover
    ipfn = None


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def problem(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    T = rng.gamma(2.0, size=(n, n, n))
    Q = rng.gamma(2.0, size=(n, n, n))
    Q /= Q.sum()
    margins = {0: Q.sum((1, 2)), 1: Q.sum((0, 2)), 2: Q.sum((0, 1)), (0, 1): Q.sum(2)}
    return T, margins


def read_once_per_margin(T, margins):
    for key in margins:
        axes = (key,) if isinstance(key, int) else key
        T.sum(axis=tuple(a for a in range(T.ndim) if a not in axes))


def textbook(T, margins, sweeps):
    P = T / T.sum()
    for _ in range(sweeps):
        for key, target in margins.items():
            axes = (key,) if isinstance(key, int) else key
            other = tuple(a for a in range(P.ndim) if a not in axes)
            P *= np.expand_dims(target / P.sum(axis=other), other)
    return P


def run_ipfn(T, margins, sweeps):
    keys = list(margins)
    dims = [[k] if isinstance(k, int) else list(k) for k in keys]
    solver = ipfn.ipfn(T.copy(), [margins[k] for k in keys], dims, max_iteration=sweeps, convergence_rate=0.0)
    return solver.iteration()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sweeps", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    T, margins = problem(args.n)
    K, S = len(margins), args.sweeps
    print(f"Table {T.shape} float64 ({T.nbytes / 2**20:.0f} MB), margins {list(margins)}; medians of "
          f"{args.repeats} interleaved repeats, per sweep (K = {K} half-steps).")
    print("BLAS:", ", ".join(f"{i['internal_api']} {i.get('architecture', '?')} ({i['num_threads']} threads max)"
                             for i in threadpool_info() if i["user_api"] == "blas"))
    print()
    print("| threads | read once per margin ms | balance_margins ms/sweep | ratio | textbook ms/sweep | "
          + ("ipfn ms/sweep |" if ipfn else ""))
    print("|---|---|---|---|---|" + ("---|" if ipfn else ""))
    for threads in args.threads:
        with threadpool_limits(threads):
            times: dict[str, list[float]] = {"read": [], "ours": [], "textbook": [], "ipfn": []}
            for _ in range(args.repeats):
                times["read"].append(timed(lambda: read_once_per_margin(T, margins)))
                times["ours"].append((timed(lambda: db.balance_margins(T, margins, steps=K * (S + 2)))
                                      - timed(lambda: db.balance_margins(T, margins, steps=2 * K))) / S)
                times["textbook"].append(timed(lambda: textbook(T, margins, 1)))
                if ipfn is not None:
                    times["ipfn"].append(timed(lambda: run_ipfn(T, margins, 1)))
            med = {k: 1e3 * statistics.median(v) for k, v in times.items() if v}
            row = (f"| {threads} | {med['read']:.1f} | {med['ours']:.1f} | {med['ours'] / med['read']:.2f} | "
                   f"{med['textbook']:.1f} |")
            print(row + (f" {med['ipfn']:.1f} |" if ipfn else ""))


if __name__ == "__main__":
    main()
