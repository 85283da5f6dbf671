"""Speed and memory of databalance.balance against its peers, in one run.

Usage (prints Markdown; RESULTS.md records the output and this command):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_balance.py [--quick]

Per-sweep times are slopes: the median time of a run of N2 sweeps minus that of N1 sweeps, over
N2 - N1, so that setup (validation, feasibility, POT's exponentiation) is not counted in them; setup
is reported separately and in the end-to-end rows.
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


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def slope(run, n1, n2, repeats):
    """(time per unit, intercept) from median times of run(n1) and run(n2)."""
    t1, t2 = median_time(lambda: run(n1), repeats), median_time(lambda: run(n2), repeats)
    per = (t2 - t1) / (n2 - n1)
    return per, t1 - per * n1


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
    rng = np.random.default_rng(seed)
    M = rng.random((n, n))
    reg = 0.05
    return M, reg, np.exp(-M / reg), rng.dirichlet(np.full(n, 5.0)), rng.dirichlet(np.full(n, 5.0))


def bench_dense(sizes, repeats):
    rows = []
    for n in sizes:
        M, reg, K, a, b = dense_problem(n)
        n1, n2 = 5, 15
        base, _ = slope(lambda s: two_matvec(K, a, b, s), n1, n2, repeats)
        ours, ours0 = slope(lambda s: db.balance_table(K, a, b, steps=2 * s), n1, n2, repeats)
        row = {"n": n, "two-matvec ms": 1e3 * base, "ours ms": 1e3 * ours, "ours/2mv": ours / base,
               "setup ours s": ours0}
        if ot is not None:
            pot, pot0 = slope(lambda s: ot.sinkhorn(a, b, M, reg, numItermax=s, stopThr=0.0),
                              n1, n2, max(3, repeats // 2))
            row.update({"POT ms": 1e3 * pot, "POT/ours": pot / ours, "setup POT s": pot0})
        paper, _ = slope(lambda s: paper_loop(K, a, b, s), 1, 3, 3)
        row.update({"paper ms": 1e3 * paper, "paper/ours": paper / ours})
        rows.append(row)
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

    out = {"n": n}
    t = median_time(ours, repeats)
    res, table = ours()
    out.update({"ours s": t, "ours sweeps": res.steps / 2, "ours L1": float(res.marginal_error[-1].max())})
    out["ours (logits) s"] = median_time(ours_logits, repeats)
    if ot is not None:
        tp = median_time(lambda: ot.sinkhorn(a, b, M, reg, stopThr=tol, numItermax=10_000), repeats)
        plan = ot.sinkhorn(a, b, M, reg, stopThr=tol, numItermax=10_000)
        l1 = max(np.abs(plan.sum(1) - a).sum(), np.abs(plan.sum(0) - b).sum())
        out.update({"POT s": tp, "POT L1": l1, "POT/ours": tp / t})
    tpaper = median_time(lambda: paper_loop(K, a, b, int(np.ceil(res.steps / 2))), 3)
    out.update({"paper s": tpaper, "paper/ours": tpaper / t})
    out["peak MB ours / table MB"] = f"{peak_mb(ours):.0f} / {K.nbytes / 2**20:.0f}"
    if ot is not None:
        out["peak MB POT"] = f"{peak_mb(lambda: ot.sinkhorn(a, b, M, reg, stopThr=tol)):.0f}"
    return out


def bench_log(n, repeats):
    rng = np.random.default_rng(1)
    L = rng.uniform(-50, 50, (n, n))
    a = b = np.full(n, 1.0 / n)
    K = np.exp(L - L.max())
    plain = median_time(lambda: two_matvec(K, a, b, 20), repeats)
    ours = median_time(lambda: db.balance_logits(L, a, b, steps=40), repeats)
    out = {"n": n, "20 plain sweeps s": plain, "ours 20 sweeps (with exp) s": ours, "ours/plain": ours / plain}
    if ot is not None:
        pot = median_time(lambda: ot.sinkhorn(a, b, -L, 1.0, method="sinkhorn_log", numItermax=20,
                                              stopThr=0.0), max(3, repeats // 2))
        out.update({"POT sinkhorn_log s": pot, "POT/ours": pot / ours})
    out["peak MB ours / table MB"] = f"{peak_mb(lambda: db.balance_logits(L, a, b, steps=40)):.0f} / {L.nbytes / 2**20:.0f}"
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

        def matvecs(s):
            u, v = np.ones(n), np.ones(n)
            for _ in range(s):
                u = K @ v
                v = KT @ u

        def ours_sweeps(s):
            # Time the iteration alone: setup is done when the generator yields iterate 0.
            it = db.iterate_balance(K, a, b)
            next(it)
            t0 = time.perf_counter()
            for _ in range(2 * s):
                next(it)
            return time.perf_counter() - t0

        base, _ = slope(matvecs, 2, 6, repeats)
        ours = statistics.median((ours_sweeps(6) - ours_sweeps(2)) / 4 for _ in range(repeats))
        setup = median_time(lambda: db.balance_table(K, a, b, steps=0), repeats)
        memory = K.data.nbytes + K.indices.nbytes + K.indptr.nbytes
        rows.append({"pattern": kind, "nnz": K.nnz, "K@v + K.T@u ms": 1e3 * base, "ours ms": 1e3 * ours,
                     "ours/matvecs": ours / base, "setup s (validation)": setup,
                     "feasibility check s": median_time(lambda: db.balance_table(K, a, b, steps=0).feasible, 1),
                     "peak MB / table MB": f"{peak_mb(lambda: db.balance_table(K, a, b, steps=4)):.0f} / {memory / 2**20:.0f}"})
    return rows


def markdown(rows):
    if isinstance(rows, dict):
        rows = [rows]
    keys = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script runs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    sizes = [500, 1000] if args.quick else [2000, 4000, 8000]
    big = sizes[-1]
    log_n = 1000 if args.quick else 4000
    sp_n, sp_nnz = (10**5, 10**6) if args.quick else (10**6, 10**7)
    blas = [(i["internal_api"], i.get("architecture"), i["version"]) for i in threadpool_info()]
    print(f"numpy {np.__version__}, scipy {sp.__name__ and __import__('scipy').__version__}, "
          f"POT {getattr(ot, '__version__', 'absent')}, BLAS {blas}\n")
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
                print(f"### Sparse CSR {sp_n}x{sp_n}, {sp_nnz} entries drawn, time per sweep (scipy is single-threaded)\n")
                print(markdown(bench_sparse(sp_n, sp_nnz, args.repeats)) + "\n")


if __name__ == "__main__":
    main()
