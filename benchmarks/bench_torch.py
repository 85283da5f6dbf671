"""k-step balancing of PyTorch logits with backward: databalance against a hand-written torch loop.

Usage (prints Markdown; RESULTS.md records the output and this command):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_torch.py [--quick] [--threads 1 2]

The paper's setting: a batch of 64 logit matrices of 512 x 512 (float32, CPU), k = 2 half-steps
towards uniform marginals, forward and backward of a loss on the diagonal. The peer is the loop a
user would write: ``log_softmax`` alternated on the two axes (minus log n, the uniform targets).
Two comparisons: one start (``balance_logits(..., steps=2)``, loss from the potentials) against one
alternated loop, and the full loss (:func:`databalance.losses.balanced_contrastive_loss`, both
starts) against two loops. Every repeat runs all contenders in turn (this machine is shared); the
table reports medians and the median of the per-repeat ratios.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch
from threadpoolctl import threadpool_info

from databalance import balance_logits
from databalance.losses import balanced_contrastive_loss


def hand_loop(L, k, first):
    """Q after k alternated log-softmax steps towards uniform 1/n marginals; -mean log(n Q_ii)."""
    n = L.shape[-1]
    Q, axis = L, first
    for _ in range(k):
        Q = Q.log_softmax(axis) - math.log(n)
        axis = -3 - axis
    return -(torch.diagonal(Q, dim1=-2, dim2=-1) + math.log(n)).mean()


def ours_one(L, k, uniform):
    res = balance_logits(L, uniform, uniform, steps=k)
    diag = torch.diagonal(L, dim1=-2, dim2=-1)
    return -(diag + res.row_potential + res.col_potential + math.log(L.shape[-1])).mean()


def timed(fn, L):
    L.grad = None
    t0 = time.perf_counter()
    fn(L).backward()
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch of 4 matrices of 128 x 128")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--k", type=int, nargs="+", default=[2])
    args = parser.parse_args()
    batch, n = (4, 128) if args.quick else (64, 512)
    torch.manual_seed(0)
    L = (torch.randn(batch, n, n) * 3).requires_grad_(True)
    uniform = np.full(n, 1.0 / n, dtype=np.float32)
    blas = [(i["internal_api"], i.get("architecture"), i["version"]) for i in threadpool_info()]
    print(f"torch {torch.__version__}, float32 CPU, batch {batch} x {n} x {n}, BLAS {blas}\n")
    for k in args.k:
        # the two sides compute the same numbers
        with torch.no_grad():
            a, b = ours_one(L, k, uniform), hand_loop(L, k, -1)
            c, d = balanced_contrastive_loss(L, k), (hand_loop(L, k, -1) + hand_loop(L, k, -2)) / 2
        print(f"k = {k}: |ours - loop| one start {abs(float(a - b)):.2g}, loss {abs(float(c - d)):.2g}\n")
        fns = {
            "balance_logits, one start": lambda x: ours_one(x, k, uniform),
            "torch loop, one start": lambda x: hand_loop(x, k, -1),
            "balanced_contrastive_loss": lambda x: balanced_contrastive_loss(x, k),
            "torch loop, both starts": lambda x: (hand_loop(x, k, -1) + hand_loop(x, k, -2)) / 2,
        }
        print("| threads | k | contender | median s (fwd+bwd) | ratio to the loop (median of pairs) |")
        print("|---|---|---|---|---|")
        for threads in args.threads:
            torch.set_num_threads(threads)
            times: dict[str, list[float]] = {name: [] for name in fns}
            for fn in fns.values():  # warm-up
                timed(fn, L)
            for _ in range(args.repeats):
                for name, fn in fns.items():
                    times[name].append(timed(fn, L))
            pairs = {"balance_logits, one start": "torch loop, one start",
                     "balanced_contrastive_loss": "torch loop, both starts"}
            for name, ts in times.items():
                peer = pairs.get(name)
                ratios = [] if peer is None else [a / b for a, b in zip(ts, times[peer], strict=True)]
                ratio = f"{statistics.median(ratios):.2f}" if ratios else ""
                print(f"| {threads} | {k} | {name} | {statistics.median(ts):.3f} | {ratio} |")
        print()


if __name__ == "__main__":
    main()
