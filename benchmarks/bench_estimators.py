"""Speed and memory of databalance.BalancedEstimator on 10^7 samples raked to four margins (50, 100
and 1000 levels, and a 20 x 50 joint margin): fit with steps = 12 plus one `mean` with its SE; R
survey's `rake` on 10^5 of the same samples for scale.

Usage (prints Markdown; RESULTS.md records the output and this command):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_estimators.py [--n N] [--r-n N]
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import statistics
import subprocess
import tempfile
import time
import tracemalloc

import numpy as np

import databalance as db

LEVELS = {"a": 50, "b": 100, "c": 1000, "d": 20, "e": 50}


def problem(n, seed=0):
    rng = np.random.default_rng(seed)
    data = {name: rng.integers(0, size, n) for name, size in LEVELS.items()}
    data["b"] = (2 * data["a"] + rng.integers(0, 10, n)) % LEVELS["b"]  # dependent columns
    values = 0.01 * data["a"] - 0.002 * data["c"] + rng.standard_normal(n)
    margins = {name: rng.dirichlet(np.full(LEVELS[name], 50.0)) for name in ("a", "b", "c")}
    margins[("d", "e")] = rng.dirichlet(np.full(LEVELS["d"] * LEVELS["e"], 50.0)).reshape(20, 50)
    return data, values, margins


def r_rake_seconds(data, values, margins, steps):
    """Wall time of R survey's rake (maxit = steps / 4 sweeps) plus svymean, inside R."""
    if shutil.which("Rscript") is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        d = pathlib.Path(d)
        np.savetxt(d / "s.csv", np.column_stack([data[k] for k in LEVELS] + [values]), delimiter=",",
                   header=",".join(list(LEVELS) + ["h"]), comments="", fmt=["%d"] * 5 + ["%.17g"])
        for name in ("a", "b", "c"):
            np.savetxt(d / f"{name}.csv", np.column_stack([np.arange(LEVELS[name]), margins[name]]),
                       delimiter=",", header=f"{name},Freq", comments="", fmt=["%d", "%.17g"])
        de = margins[("d", "e")]
        np.savetxt(d / "de.csv", de, delimiter=",", fmt="%.17g")
        script = f"""suppressMessages(library(survey))
s <- read.csv('{d}/s.csv')
for (v in c('a', 'b', 'c', 'd', 'e')) s[[v]] <- factor(s[[v]])
m <- lapply(c('a', 'b', 'c'), function(v) {{
  x <- read.csv(file.path('{d}', paste0(v, '.csv')))
  x[[v]] <- factor(x[[v]], levels = levels(s[[v]]))
  x[!is.na(x[[v]]), ] }})
de <- as.matrix(read.csv('{d}/de.csv', header = FALSE))
tab <- xtabs(~d + e, s)
rows <- as.integer(rownames(tab)) + 1
cols <- as.integer(colnames(tab)) + 1
tab[, ] <- de[rows, cols]
des <- suppressWarnings(svydesign(id = ~1, data = s))
t0 <- Sys.time()
ctrl <- list(maxit = {steps // 4}, epsilon = 1e-300)
r <- suppressWarnings(rake(des, list(~a, ~b, ~c, ~d + e), c(m, list(tab)), control = ctrl))
est <- svymean(~h, r)
cat(as.numeric(difftime(Sys.time(), t0, units = 'secs')), '\\n')
"""
        (d / "run.R").write_text(script)
        out = subprocess.run(["Rscript", str(d / "run.R")], capture_output=True, text=True)
        if out.returncode != 0:
            return f"R failed: {out.stderr.strip()[-300:]}"
        return float(out.stdout.split()[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10**7)
    parser.add_argument("--r-n", type=int, default=10**5)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    data, values, margins = problem(args.n)
    inputs = values.nbytes + sum(a.nbytes for a in data.values())

    def run():
        return db.BalancedEstimator(margins, steps=args.steps).fit(data).mean(values)

    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        est = run()
        times.append(time.perf_counter() - t0)
    tracemalloc.start()
    run()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    try:
        from threadpoolctl import threadpool_info

        blas = ", ".join(f"{i['internal_api']} {i.get('version')} ({i['num_threads']} threads)"
                         for i in threadpool_info())
    except ImportError:
        blas = "threadpoolctl not installed"
    small, small_values, _ = problem(args.r_n)
    r_seconds = r_rake_seconds(small, small_values, margins, args.steps)
    t0 = time.perf_counter()
    db.BalancedEstimator(margins, steps=args.steps).fit(small).mean(small_values)
    ours_small = time.perf_counter() - t0
    print(f"BLAS (threadpoolctl): {blas}\n")
    print("| n | margins | steps | median s | min s | peak extra MB | input MB | peak / input | estimate | SE |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.n} | 50, 100, 1000, 20 x 50 | {args.steps} | {statistics.median(times):.2f} | {min(times):.2f} | "
          f"{peak / 2**20:.0f} | {inputs / 2**20:.0f} | {peak / inputs:.2f} | {est.estimate:.6f} | "
          f"{est.standard_error:.2e} |")
    print(f"\nn = {args.r_n}: databalance {ours_small:.2f} s; R survey rake (maxit = {args.steps // 4}) + svymean "
          f"{r_seconds if isinstance(r_seconds, str) else f'{r_seconds:.2f} s'}")


if __name__ == "__main__":
    main()
