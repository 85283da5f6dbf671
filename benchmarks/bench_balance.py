"""Speed and memory of databalance.balance against its peers, in one run.

Usage (prints Markdown; RESULTS.md records the output and this command):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_balance.py [--quick]

This machine is shared and its speed drifts, so every comparison is interleaved: each repeat runs
all contenders in turn and the table reports medians over repeats. Per-sweep times exclude setup:
dense `balance_table` and POT are timed as the slope between runs of N + 10 and 10 sweeps
(validation, and POT's exponentiation of the cost matrix, excluded); sparse as `iterate_balance`
after its first item. Setup
is reported separately, and the end-to-end rows include everything.
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_info, threadpool_limits

import databalance as db

try:
    import ot
except ImportError:  # pragma: no cover
    ot = None


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_time(fn, repeats):
    return statistics.median(timed(fn) for _ in range(repeats))


def interleaved(fns: dict, repeats: int) -> dict:
    """Median time of each function, the functions run in turn within every repeat so that slow
    drifts of this shared machine hit all of them alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(fn())
    return {name: statistics.median(ts) for name, ts in times.items()}


def iteration_time(make_iterator, half_steps):
    """Seconds for ``half_steps`` half-steps of an iterator whose setup is already done."""
    it = make_iterator()
    next(it)
    t0 = time.perf_counter()
    for _ in range(half_steps):
        next(it)
    return time.perf_counter() - t0


def peak_mb(fn):
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def two_matvec(K, a, b, sweeps):
    u, v = np.ones(K.shape[0]), np.ones(K.shape[1])
    for _ in range(sweeps):
        u = a / (K @ v)
        v = b / (K.T @ u)
    return u, v


def paper_loop(K, a, b, sweeps):
    P = K / K.sum()
    for _ in range(sweeps):
        P = P * (a / P.sum(axis=1))[:, None]
        P = P * (b / P.sum(axis=0))[None, :]
    return P


def dense_problem(n, seed=0):
    """Entropic transport between two random histograms on a line: cost (x_i - y_j)^2, reg 0.05.
    Strong dependence (s_2 near 1), so a converged solve takes many sweeps."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(0, 1, n)
    M = (grid[:, None] - grid[None, :]) ** 2
    reg = 0.05
    return M, reg, np.exp(-M / reg), rng.dirichlet(np.full(n, 5.0)), rng.dirichlet(np.full(n, 5.0))


def bench_dense(sizes, repeats):
    rows = []
    for n in sizes:
        M, reg, K, a, b = dense_problem(n)
        sweeps = 10
        fns = {
            "two-matvec": lambda: timed(lambda: two_matvec(K, a, b, sweeps)) / sweeps,
            "ours": lambda: (timed(lambda: db.balance_table(K, a, b, steps=2 * (sweeps + 10)))
                             - timed(lambda: db.balance_table(K, a, b, steps=20))) / sweeps,
            "paper": lambda: timed(lambda: paper_loop(K, a, b, 2)) / 2,
        }
        if ot is not None:  # per iteration as a slope, so that POT's setup (exp of M) is excluded
            fns["POT"] = lambda: (timed(lambda: ot.sinkhorn(a, b, M, reg, numItermax=sweeps + 10, stopThr=0.0))
                                  - timed(lambda: ot.sinkhorn(a, b, M, reg, numItermax=10, stopThr=0.0))) / sweeps
        t = interleaved(fns, repeats)
        row = {"n": n, "two-matvec ms": 1e3 * t["two-matvec"], "ours ms": 1e3 * t["ours"],
               "ours/2mv": t["ours"] / t["two-matvec"]}
        if ot is not None:
            row.update({"POT ms": 1e3 * t["POT"], "POT/ours": t["POT"] / t["ours"]})
        row.update({"paper ms": 1e3 * t["paper"], "paper/ours": t["paper"] / t["ours"],
                    "setup ours ms": 1e3 * median_time(lambda: db.balance_table(K, a, b, steps=0), repeats)})
        rows.append(row)
    return rows


def paired_ratios(sizes, repeats, sweeps=10):
    """Median over repeats of the per-pair ratio ours / two-matvec, each pair timed back to back
    (the most drift-robust figure here); ours is the iteration alone (`iterate_balance` after its
    first item), so setup is excluded as it is from the two-matvec loop."""
    rows = []
    for n in sizes:
        _, _, K, a, b = dense_problem(n)
        ratios = []
        for _ in range(repeats):
            base = timed(lambda: two_matvec(K, a, b, sweeps))
            ours = iteration_time(lambda: db.iterate_balance(K, a, b), 2 * sweeps)
            ratios.append(ours / base)
        q1, med, q3 = np.percentile(ratios, [25, 50, 75])
        rows.append({"n": n, "pairs": repeats, "median ours/2mv": med, "quartiles": f"{q1:.3f}-{q3:.3f}"})
    return rows


def bench_converged(n, repeats):
    M, reg, K, a, b = dense_problem(n)
    tol = 1e-9

    def ours():
        res = db.balance_table(K, a, b, tol=tol)
        return res, res.table

    def ours_logits():
        res = db.balance_logits(-M / reg, a, b, tol=tol)
        return res, res.table

    res, _ = ours()
    sweeps = int(np.ceil(res.steps / 2))
    fns = {"ours": lambda: timed(ours), "ours (logits)": lambda: timed(ours_logits),
           "paper": lambda: timed(lambda: paper_loop(K, a, b, sweeps))}
    if ot is not None:
        fns["POT"] = lambda: timed(lambda: ot.sinkhorn(a, b, M, reg, stopThr=tol, numItermax=10_000))
    t = interleaved(fns, repeats)
    out = {"n": n, "ours s": t["ours"], "sweeps": res.steps / 2,
           "ours L1": float(res.marginal_error[-1].max()), "ours from logits s": t["ours (logits)"]}
    if ot is not None:
        plan = ot.sinkhorn(a, b, M, reg, stopThr=tol, numItermax=10_000)
        l1 = max(np.abs(plan.sum(1) - a).sum(), np.abs(plan.sum(0) - b).sum())
        out.update({"POT s": t["POT"], "POT L1": l1, "POT/ours": t["POT"] / t["ours"]})
    out.update({"paper s (same sweeps)": t["paper"], "paper/ours": t["paper"] / t["ours"]})
    out["peak MB ours / table MB"] = f"{peak_mb(ours):.0f} / {K.nbytes / 2**20:.0f}"
    if ot is not None:
        out["peak MB POT"] = f"{peak_mb(lambda: ot.sinkhorn(a, b, M, reg, stopThr=tol)):.0f}"
    return out


def bench_log(n, repeats):
    rng = np.random.default_rng(1)
    L = rng.uniform(-50, 50, (n, n))
    a = b = np.full(n, 1.0 / n)
    K = np.exp(L - L.max())
    fns = {"plain": lambda: timed(lambda: two_matvec(K, a, b, 20)),
           "ours": lambda: timed(lambda: db.balance_logits(L, a, b, steps=40))}
    if ot is not None:
        fns["POT"] = lambda: timed(lambda: ot.sinkhorn(a, b, -L, 1.0, method="sinkhorn_log", numItermax=20,
                                                       stopThr=0.0))
    t = interleaved(fns, repeats)
    plain, ours = t["plain"], t["ours"]
    out = {"n": n, "20 plain sweeps s": plain, "ours 20 sweeps (with exp) s": ours, "ours/plain": ours / plain}
    if ot is not None:
        out.update({"POT sinkhorn_log s": t["POT"], "POT/ours": t["POT"] / ours})
    peak = peak_mb(lambda: db.balance_logits(L, a, b, steps=40))
    out["peak MB ours / table MB"] = f"{peak:.0f} / {L.nbytes / 2**20:.0f}"
    return out


def sparse_problem(n, nnz, kind, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        rows, cols = rng.integers(0, n, nnz), rng.integers(0, n, nnz)
    else:  # power-law degrees: index density proportional to (i + 1) ** -0.8
        w = (np.arange(n) + 1.0) ** -0.8
        cdf = np.cumsum(w) / w.sum()
        rows = np.searchsorted(cdf, rng.random(nnz))
        cols = rng.permutation(n)[np.searchsorted(cdf, rng.random(nnz))]
    K = sp.csr_array((rng.random(nnz) + 0.5, (rows, cols)), shape=(n, n))
    K.sum_duplicates()
    a = (K.sum(axis=1) > 0).astype(float)
    b = (K.sum(axis=0) > 0).astype(float)
    return K, a / a.sum(), b / b.sum()


def bench_sparse(n, nnz, repeats):
    rows = []
    for kind in ("uniform", "power-law"):
        K, a, b = sparse_problem(n, nnz, kind)
        KT = K.T

        def matvecs():
            u, v = np.ones(n), np.ones(n)
            t0 = time.perf_counter()
            for _ in range(4):
                u = K @ v
                v = KT @ u
            return (time.perf_counter() - t0) / 4

        t = interleaved({"matvecs": matvecs,
                         "ours": lambda: iteration_time(lambda: db.iterate_balance(K, a, b), 8) / 4}, repeats)
        base, ours = t["matvecs"], t["ours"]
        setup = median_time(lambda: db.balance_table(K, a, b, steps=0), repeats)
        memory = K.data.nbytes + K.indices.nbytes + K.indptr.nbytes
        rows.append({"pattern": kind, "nnz": K.nnz, "K@v + K.T@u ms": 1e3 * base, "ours ms": 1e3 * ours,
                     "ours/matvecs": ours / base, "setup s (validation)": setup,
                     "feasibility check s": median_time(lambda: db.balance_table(K, a, b, steps=0).feasible, 1),
                     "peak MB / table MB":
                         f"{peak_mb(lambda: db.balance_table(K, a, b, steps=4)):.0f} / {memory / 2**20:.0f}"})
    return rows


def markdown(rows):
    if isinstance(rows, dict):
        rows = [rows]
    keys = list(rows[0])

    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script runs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--paired", action="store_true", help="only the paired per-sweep ratios (dense)")
    args = parser.parse_args()
    sizes = [500, 1000] if args.quick else [2000, 4000, 8000]
    big = sizes[-1]
    log_n = 1000 if args.quick else 4000
    sp_n, sp_nnz = (10**5, 10**6) if args.quick else (10**6, 10**7)
    blas = [(i["internal_api"], i.get("architecture"), i["version"]) for i in threadpool_info()]
    print(f"numpy {np.__version__}, scipy {sp.__name__ and __import__('scipy').__version__}, "
          f"POT {getattr(ot, '__version__', 'absent')}, BLAS {blas}\n")
    if args.paired:
        for threads in args.threads:
            with threadpool_limits(threads):
                print(f"### Dense per-sweep ratio, paired, {threads} thread(s)\n")
                print(markdown(paired_ratios(sizes, args.repeats)) + "\n", flush=True)
        return
    for threads in args.threads:
        with threadpool_limits(threads):
            print(f"## {threads} thread(s)\n")
            print("### Dense, time per sweep (two half-steps)\n")
            print(markdown(bench_dense(sizes, args.repeats)) + "\n")
            print(f"### Dense {big}x{big}, converged solve end to end (tol 1e-9, L1)\n")
            print(markdown(bench_converged(big, args.repeats)) + "\n")
            print(f"### Log domain {log_n}x{log_n}, logits uniform in [-50, 50], 20 sweeps\n")
            print(markdown(bench_log(log_n, args.repeats)) + "\n")
            if threads == args.threads[0]:
                print(f"### Sparse CSR {sp_n}x{sp_n}, {sp_nnz} entries drawn, time per sweep "
                      "(scipy is single-threaded)\n")
                print(markdown(bench_sparse(sp_n, sp_nnz, args.repeats)) + "\n")


if __name__ == "__main__":
    main()
