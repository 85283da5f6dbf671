"""Interleaved A/B of two versions of databalance on the same machine and table: per-sweep time of
`iterate_balance` and `balance_table` (40 half-steps) over the two-matvec loop, medians of 9 rounds.

Usage (one thread; OLD_SRC is the `src` folder of another checkout, e.g. a `git worktree` of an
earlier commit):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/ab_versions.py OLD_SRC NEW_SRC [n]
"""

from __future__ import annotations

import importlib
import itertools
import statistics
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits


def load(path: str):
    for name in [m for m in sys.modules if m.startswith("databalance")]:
        del sys.modules[name]
    sys.path.insert(0, path)
    try:
        return importlib.import_module("databalance")
    finally:
        sys.path.pop(0)


def main():
    old_src, new_src = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 4000
    rng = np.random.default_rng(0)
    grid = np.linspace(0, 1, n)
    K = np.exp(-((grid[:, None] - grid[None, :]) ** 2) / 0.05)
    a, b = rng.dirichlet(np.full(n, 5.0)), rng.dirichlet(np.full(n, 5.0))
    versions = {"old": load(old_src), "new": load(new_src)}

    def two_matvec(sweeps=20):
        u, v = np.ones(n), np.ones(n)
        for _ in range(sweeps):
            u = a / (K @ v)
            v = b / (K.T @ u)

    def iterate(db):
        it = db.iterate_balance(K, a, b)
        next(it)
        t0 = time.perf_counter()
        for _ in itertools.islice(it, 40):
            pass
        return time.perf_counter() - t0

    def table(db):
        t0 = time.perf_counter()
        db.balance_table(K, a, b, steps=40)
        return time.perf_counter() - t0

    ratios: dict[str, list[float]] = {}
    with threadpool_limits(1):
        for _ in range(9):
            t0 = time.perf_counter()
            two_matvec()
            base = time.perf_counter() - t0
            for name, db in versions.items():
                ratios.setdefault(f"{name} iterate_balance", []).append(iterate(db) / base)
                ratios.setdefault(f"{name} balance_table (with setup)", []).append(table(db) / base)
    print(f"n = {n}, 1 thread, time / two-matvec time, medians of 9 interleaved rounds")
    for key, values in ratios.items():
        print(f"  {key}: {statistics.median(values):.3f}")


if __name__ == "__main__":
    main()
