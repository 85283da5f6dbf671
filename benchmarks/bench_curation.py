"""Speed of databalance.curation.metaclip_sample on a MetaCLIP-sized match table.

10^6 documents x 5 * 10^4 concepts with exactly 3 * 10^6 matches, concept frequencies Zipf-like
(the head concepts are matched by ~10^5 documents, most by a handful), cap t = 1000. The time is
the median of several runs of the whole call (input checks, probabilities, draw, counts), after
one warm-up run.

Usage (prints Markdown):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_curation.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp

from databalance.curation import metaclip_sample


def match_table(n_docs: int, n_concepts: int, nnz: int, seed: int = 0) -> sp.csr_array:
    """A CSR 0/1 table with exactly ``nnz`` distinct matches, concept c drawn with weight 1 / (c + 1)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_concepts + 1)
    weights /= weights.sum()
    codes = np.empty(0, dtype=np.int64)
    while len(codes) < nnz:  # top up what duplicates removed
        draw = rng.integers(0, n_docs, nnz) * n_concepts + rng.choice(n_concepts, nnz, p=weights)
        codes = np.unique(np.concatenate([codes, draw]))
    codes = np.sort(rng.choice(codes, nnz, replace=False))
    return sp.csr_array((np.ones(nnz), (codes // n_concepts, codes % n_concepts)), shape=(n_docs, n_concepts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=10**6)
    parser.add_argument("--concepts", type=int, default=5 * 10**4)
    parser.add_argument("--nnz", type=int, default=3 * 10**6)
    parser.add_argument("--cap", type=float, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    matches = match_table(args.docs, args.concepts, args.nnz)
    metaclip_sample(matches, args.cap, seed=0)  # warm-up
    times = []
    for r in range(args.repeats):
        start = time.perf_counter()
        res = metaclip_sample(matches, args.cap, seed=r)
        times.append(time.perf_counter() - start)
    print(f"| documents | concepts | matches | t | median s | min s | max s | kept | concepts above t |\n"
          f"|---|---|---|---|---|---|---|---|---|\n"
          f"| {args.docs:.0e} | {args.concepts:.0e} | {matches.nnz:.0e} | {args.cap:g} | {np.median(times):.3f} | "
          f"{min(times):.3f} | {max(times):.3f} | {int(res.kept.sum())} | {int((res.counts_before > args.cap).sum())}"
          " |")
    print(f"\n{res!r}")


if __name__ == "__main__":
    main()
