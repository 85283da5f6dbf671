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


def r_rake_seconds(data, values, margins, steps, names=("a", "b", "c", "de")):
    """Wall time of R survey's rake (maxit = steps / len(names) sweeps) plus svymean, inside R, on
    the margins ``names`` ("de" is the joint d x e margin as one factor)."""
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
        # The joint margin as one factor with 20 x 50 levels: R's rake cross-tabulates a formula
        # ~d + e over its own levels and fails here ("total number of levels >= 2^31").
        np.savetxt(d / "de.csv", np.column_stack([np.arange(de.size), de.ravel()]), delimiter=",",
                   header="de,Freq", comments="", fmt=["%d", "%.17g"])
        script = f"""suppressMessages(library(survey))
s <- read.csv('{d}/s.csv')
s$de <- s$d * 50 + s$e
for (v in c('a', 'b', 'c', 'de')) s[[v]] <- factor(s[[v]])
m <- lapply(c({", ".join(repr(v) for v in names)}), function(v) {{
  x <- read.csv(file.path('{d}', paste0(v, '.csv')))
  x[[v]] <- factor(x[[v]], levels = levels(s[[v]]))
  x <- x[!is.na(x[[v]]), ]
  x$Freq <- x$Freq / sum(x$Freq) * nrow(s)
  x }})
des <- suppressWarnings(svydesign(id = ~1, data = s))
t0 <- Sys.time()
ctrl <- list(maxit = {steps // len(names)}, epsilon = 1e-300)
r <- suppressWarnings(rake(des, list({", ".join("~" + v for v in names)}), m, control = ctrl))
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
    r_full = r_rake_seconds(small, small_values, margins, args.steps)
    t0 = time.perf_counter()
    db.BalancedEstimator(margins, steps=args.steps).fit(small).mean(small_values)
    ours_small = time.perf_counter() - t0
    # R's variance step tabulates the cross-product of every margin's levels (5e9 > 2^31 with all
    # four), so it is also timed with three margins, ours alongside on the same three.
    three = {k: margins[k] for k in ("a", "b", ("d", "e"))}
    r_three = r_rake_seconds(small, small_values, margins, 3 * (args.steps // 4), names=("a", "b", "de"))
    t0 = time.perf_counter()
    db.BalancedEstimator(three, steps=3 * (args.steps // 4)).fit(small).mean(small_values)
    ours_three = time.perf_counter() - t0
    print(f"BLAS (threadpoolctl): {blas}\n")
    print("| n | margins | steps | median s | min s | peak extra MB | input MB | peak / input | estimate | SE |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.n} | 50, 100, 1000, 20 x 50 | {args.steps} | {statistics.median(times):.2f} | {min(times):.2f} | "
          f"{peak / 2**20:.0f} | {inputs / 2**20:.0f} | {peak / inputs:.2f} | {est.estimate:.6f} | "
          f"{est.standard_error:.2e} |")

    def show(r):
        return r if isinstance(r, str) or r is None else f"{r:.2f} s"

    print(f"\nn = {args.r_n}, four margins: databalance {ours_small:.2f} s; R survey rake + svymean "
          f"{show(r_full)}")
    print(f"n = {args.r_n}, three margins (50, 100, 20 x 50), {3 * (args.steps // 4)} half-steps: databalance "
          f"{ours_three:.2f} s; R survey rake (maxit = {args.steps // 4}) + svymean {show(r_three)}")


if __name__ == "__main__":
    main()
