"""Speed and memory of databalance.balanced_mean on 10^7 samples with 1000 x 1000 categories.

Usage (prints Markdown; RESULTS.md records the output and this command):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_estimators.py [--n N]
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc

import numpy as np

import databalance as db


def problem(n, m, l, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, m, n)
    y = (x + rng.integers(0, l // 10, n)) % l  # each x meets a tenth of the y's: a sparse co-occurrence
    values = 0.001 * x - 0.002 * y + rng.standard_normal(n)
    p_x = rng.dirichlet(np.full(m, 50.0))
    p_y = rng.dirichlet(np.full(l, 50.0))
    return values, x, y, p_x, p_y


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10**7)
    parser.add_argument("--categories", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    values, x, y, p_x, p_y = problem(args.n, args.categories, args.categories)
    inputs = values.nbytes + x.nbytes + y.nbytes
    run = lambda: db.balanced_mean(values, x, y, p_x, p_y, steps=args.steps)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        est = run()
        times.append(time.perf_counter() - t0)
    tracemalloc.start()
    run()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"| n | categories | steps | median s | min s | peak extra MB | input MB | peak / input | estimate | SE |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.n} | {args.categories} x {args.categories} | {args.steps} | {statistics.median(times):.2f} | "
          f"{min(times):.2f} | {peak / 2**20:.0f} | {inputs / 2**20:.0f} | {peak / inputs:.2f} | "
          f"{est.estimate:.6f} | {est.standard_error:.2e} |")


if __name__ == "__main__":
    main()
