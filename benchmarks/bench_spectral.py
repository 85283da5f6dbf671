"""Speed of databalance.spectral: the variance profile against balancing, and a sparse spectrum.

Usage (prints Markdown; RESULTS.md records the output and this command):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_spectral.py [--only spectrum]
"""

from __future__ import annotations

import argparse
import os
import time
import tracemalloc

import numba
import numpy as np
import scipy.sparse as sp
from bench_balance import dense_problem, interleaved, markdown, timed
from scipy.sparse.linalg import svds
from threadpoolctl import threadpool_limits

import databalance as db


def cases(n):
    """(name, table, h): a weakly dependent table with noise h, and the strongly dependent
    transport table of bench_balance with a smooth h (sigma_k^2 converges slowly)."""
    rng = np.random.default_rng(0)
    grid = np.arange(n) / (n - 1)
    yield "gamma(2) table, h ~ N(0, 1)", rng.gamma(2.0, size=(n, n)), rng.standard_normal((n, n))
    yield "transport table (s_2 near 1), h = x y", dense_problem(n)[2], np.outer(grid, grid)


def profile_vs_balance(n, steps, repeats):
    rows = []
    for name, T, h in cases(n):
        P = T / T.sum()
        p, q = P.sum(1), P.sum(0)
        prof = db.variance_profile(P, h, max_steps=steps)
        t = interleaved({"variance_profile": lambda: timed(lambda: db.variance_profile(P, h, max_steps=steps)),
                         "balance_table": lambda: timed(lambda: db.balance_table(P, p, q, steps=steps))}, repeats)
        rows.append({"case": name, "n": n, "max_steps": steps, "variance_profile s": t["variance_profile"],
                     "balance_table s": t["balance_table"], "ratio": t["variance_profile"] / t["balance_table"],
                     "sigma2[100] / sigma2[0]": float(prof.sigma2[-1] / prof.sigma2[0])})
    return rows


def sparse_spectrum(n, nnz, rank, threads):
    """Top-``rank`` spectrum of a random n x n table: ``spectrum`` with the fused Gram product
    (numba) and with the NumPy one, and scipy's ``svds`` on the same rescaled CSR (what ``spectrum``
    ran before), each timed alone (seconds, and peak traced memory of the numba run)."""
    rng = np.random.default_rng(0)
    rows, cols = rng.integers(0, n, nnz), rng.integers(0, n, nnz)
    keep = np.concatenate([rows, np.arange(n)]), np.concatenate([cols, rng.permutation(n)])
    T = sp.csr_array((rng.random(len(keep[0])) + 0.1, keep), shape=(n, n))
    T.sum_duplicates()
    tr, tc = T.sum(axis=1), T.sum(axis=0)
    M = sp.csr_array((T.data / np.sqrt(tr)[np.repeat(np.arange(n), np.diff(T.indptr))] / np.sqrt(tc)[T.indices],
                      T.indices, T.indptr), shape=T.shape)
    out = {}
    with threadpool_limits(threads):
        numba.set_num_threads(threads)
        for name in ("numba", "numpy"):
            os.environ["DATABALANCE_KERNEL"] = name
            tracemalloc.start()
            t0 = time.perf_counter()
            spec = db.spectrum(T, rank=rank)
            out[name] = time.perf_counter() - t0
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            out[name + " s_2"] = float(spec.singular_values[1])
        del os.environ["DATABALANCE_KERNEL"]
        t0 = time.perf_counter()
        s = svds(M, k=rank, tol=0, v0=np.sqrt(tc / tc.sum()))[1]
        out["svds"] = time.perf_counter() - t0
    table_mb = (T.data.nbytes + T.indices.nbytes + T.indptr.nbytes) / 2**20
    return {"shape": f"{n} x {n}", "nnz": T.nnz, "rank": rank, "threads": threads,
            "fused s": out["numba"], "NumPy s": out["numpy"], "scipy svds s": out["svds"],
            "fused / svds": out["numba"] / out["svds"], "peak extra MB (fused)": round(peak / 2**20),
            "table MB": round(table_mb), "s_2": out["numba s_2"],
            "max |s - s_svds|": float(np.abs(np.sort(s)[::-1] - spec.singular_values).max())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="profile,spectrum", help="profile, spectrum or both")
    args = parser.parse_args()
    if "profile" in args.only:
        for threads in (1, 2):
            with threadpool_limits(threads):
                print(f"### variance_profile vs balance_table, {threads} thread(s)\n")
                print(markdown(profile_vs_balance(2000, 100, args.repeats)) + "\n", flush=True)
    if "spectrum" in args.only:
        print("### Top-10 spectrum of a sparse table\n")
        rows = [sparse_spectrum(n, 10 * n, 10, threads) for n in (10**5, 4 * 10**5) for threads in (1, 2)]
        print(markdown(rows) + "\n", flush=True)


if __name__ == "__main__":
    main()
