"""Converged solves of slowly mixing tables (s_2 near 1): plain IPF, over-relaxed IPF, Anderson-
accelerated IPF (what ``acceleration="auto"`` runs), POT (issue 11).

Usage (prints Markdown; RESULTS.md records the output and this command):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_slow_mixing.py [--n 1000]
        [--repeats 3] [--threads 2] [--cases block,transport:0.0002] [--pot-log] [--pot-scaling]

Two families, at strengths chosen so that the balanced table's s_2 is about 0.99, 0.997 and 0.999
(measured and printed: ``spectrum(result.table, rank=3)``):

* block: two diagonal blocks of uniform(0, 1) entries joined by entries eps * uniform(0, 1),
  balanced to uniform targets;
* transport: the entropic kernel ``exp(-(x_i - y_j)^2 / reg)`` on a grid of [0, 1], balanced to two
  smooth non-uniform densities (``reg`` small: slow mixing); ours from the logits ``-M / reg``
  (``balance_logits``: the kernel spans hundreds of orders of magnitude), POT from ``M`` and ``reg``
  (its ``sinkhorn`` at the two larger ``reg`` only: below, ``exp(-M / reg)`` underflows to 0 for most
  entries; ``--pot-log`` adds ``method="sinkhorn_log"`` at the largest, ``--pot-scaling``
  ``sinkhorn_epsilon_scaling``, which took minutes and did not reach the tolerance).

Every solver runs to an L1 marginal error of 1e-10 (relative to the mass). POT stops on the L2 norm
of its column error (checked every 10 iterations), a weaker test at the same threshold: its L1
error on return is measured here and printed. Table reads: two per plain sweep, one per fused
sweep (``result.passes``), two per POT iteration plus one per error check. Times are medians of
interleaved repeats, setup included for every solver (one exponentiation of the cost for POT).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numba
import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

import databalance as db

try:
    import ot
except ImportError:  # pragma: no cover
    ot = None

TOL = 1e-10


def block(n, eps, rng):
    T = rng.random((n, n)) * eps
    h = n // 2
    T[:h, :h] += rng.random((h, h))
    T[h:, h:] += rng.random((n - h, n - h))
    p = np.full(n, 1 / n)
    return T, p, p, None


def transport(n, reg, rng):
    x = np.linspace(0, 1, n)
    M = (x[:, None] - x[None, :]) ** 2
    a = np.exp(-((x - 0.3) ** 2) / 0.02) + 0.2
    b = np.exp(-((x - 0.7) ** 2) / 0.05) + 0.2
    a, b = a / a.sum(), b / b.sum()
    return np.exp(-M / reg), a, b, M


def l1_error(table, p, q):
    return max(np.abs(table.sum(axis=1) - p).sum(), np.abs(table.sum(axis=0) - q).sum()) / p.sum()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default="block,transport")
    ap.add_argument("--pot-log", action="store_true")
    ap.add_argument("--pot-scaling", action="store_true")
    args = ap.parse_args()
    n = args.n
    numba.set_num_threads(args.threads)
    info = ", ".join(f"{d['internal_api']} {d.get('architecture')}" for d in threadpool_info()
                     if d["user_api"] == "blas")
    print(f"n = {n}, tol = {TOL:g}, {args.threads} threads (BLAS {info}; numba kernel: "
          f"{db.which_kernel(np.ones((n, n)))}); medians of {args.repeats} interleaved repeats\n")
    print("| table | s_2 | solver | status | table reads | reads vs plain | seconds | time vs plain | final L1 error |")
    print("|---|---|---|---|---|---|---|---|---|")
    cases = [("block", block, 5e-3), ("block", block, 5e-4), ("transport", transport, 2e-3),
             ("transport", transport, 5e-4), ("transport", transport, 2e-4)]
    chosen = args.cases.split(",")
    for name, make, strength in (c for c in cases if c[0] in chosen or f"{c[0]}:{c[2]:g}" in chosen):
        T, p, q, M = make(n, strength, np.random.default_rng(0))
        runs = {}

        def ours(acc):
            def go():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", db.ConvergenceWarning)
                    if M is None:
                        r = db.balance_table(T, p, q, tol=TOL, max_steps=10**6, acceleration=acc)
                    else:  # exp(-M / reg) spans hundreds of orders of magnitude: the log domain
                        r = db.balance_logits(-M / strength, p, q, tol=TOL, max_steps=10**6, acceleration=acc)
                return r.status, r.passes, l1_error(r.table, p, q), r
            return go

        solvers = {"IPF (plain)": ours("none"), "IPF (acceleration='overrelax')": ours("overrelax"),
                   "IPF (acceleration='anderson' = 'auto')": ours("anderson")}
        if ot is not None and M is not None and strength >= 5e-4:
            reg = strength

            def pot(fn):
                def go():
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        G, log = fn(p, q, M, reg, numItermax=10**6, stopThr=TOL, log=True)
                    its = int(log.get("niter", len(log.get("err", [])) * 10))
                    return "-", 2 * its + its // 10, l1_error(G, p, q), None
                return go

            solvers["POT sinkhorn"] = pot(ot.sinkhorn)
            if args.pot_log and strength >= 2e-3:
                def log_domain(a, b, M, reg, **kw):
                    return ot.sinkhorn(a, b, M, reg, method="sinkhorn_log", **kw)

                solvers["POT sinkhorn_log"] = pot(log_domain)

            def scaling(a, b, M, reg, numItermax, **kw):  # at most 200 x 100 inner iterations
                return ot.bregman.sinkhorn_epsilon_scaling(a, b, M, reg, numItermax=200, numInnerItermax=100, **kw)

            if args.pot_scaling:
                solvers["POT sinkhorn_epsilon_scaling"] = pot(scaling)
        elif ot is not None and M is None:  # POT on the table itself: its kernel is the table (M = -log T, reg = 1)
            Mt = -np.log(T)

            def pot_table():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    G, log = ot.sinkhorn(p, q, Mt, 1.0, numItermax=10**6, stopThr=TOL, log=True)
                its = int(log.get("niter", len(log.get("err", [])) * 10))
                return "-", 2 * its + its // 10, l1_error(G, p, q), None

            solvers["POT sinkhorn"] = pot_table
        times = {k: [] for k in solvers}
        with threadpool_limits(args.threads):
            for _ in range(args.repeats):
                for k, fn in solvers.items():
                    t0 = time.perf_counter()
                    runs[k] = fn()
                    times[k].append(time.perf_counter() - t0)
        s2 = db.spectrum(runs["IPF (plain)"][3].table, rank=3).singular_values[1]
        base_reads, base_time = runs["IPF (plain)"][1], statistics.median(times["IPF (plain)"])
        for k in solvers:
            status, reads, err, _ = runs[k]
            t = statistics.median(times[k])
            print(f"| {name} ({strength:g}) | {s2:.4f} | {k} | {status} | {reads} | {base_reads / reads:.1f}x fewer | "
                  f"{t:.3f} | {base_time / t:.1f}x less | {err:.1e} |")


if __name__ == "__main__":
    main()
