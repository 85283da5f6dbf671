"""Coverage of balanced_mean's 95% intervals: seeded simulations, written to benchmarks/COVERAGE.md.

Usage:  python benchmarks/coverage_study.py [--reps 2000] [--n 2000] [--weighted-n 1000 4000]

1. Equal-probability samples of a 3 x 4 table without tiny cells; h(x, y) = H[x, y] + N(0, 1); the
   targets are the true marginals. For each k: the share of 95% intervals that cover the true mean
   P(h), with its binomial standard error, and the mean reported SE against the Monte Carlo SD of
   the estimates and the first-order prediction.
2. The same population sampled with unequal probabilities: row X = 2 (45% of the population) is
   sampled at 1/50 of the others' rate, and its samples carry design weights 50 times larger
   (``sample_weight``). The design-weighted sample matches the targets in expectation, so the
   estimator is consistent, but at moderate n the heavily weighted cells hold only a few samples
   each, and the normal intervals under-cover until n is large.
3. Three margins, one of them joint: a 3 x 3 x 2 x 2 population table P4 over (a, b, c, d), raked
   to the margins a, b and (c, d) (BalancedEstimator), k in {1, 3, 6, converged}.

``--sections many`` reruns only section 3 and replaces it in COVERAGE.md.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

from databalance import BalancedEstimator, InfeasibleError, balanced_mean, variance_profile

P = np.array([[0.10, 0.06, 0.05, 0.04], [0.05, 0.12, 0.08, 0.05], [0.04, 0.06, 0.15, 0.20]])
H = np.array([[1.0, 0.0, 2.0, 1.0], [0.0, 3.0, 1.0, 2.0], [2.0, 1.0, 0.0, 4.0]])
STEPS = (0, 1, 2, 4, None)
#: Inclusion rates by row in the unequal-probability study: row 2 is under-sampled 50-fold.
RATES = np.array([1.0, 1.0, 1 / 50])


#: The three-margin population: (a, b, c, d) with 3, 3, 2, 2 levels, every cell >= 0.005 (seeded).
P4 = np.random.default_rng(7).dirichlet(np.full(36, 3.0)).reshape(3, 3, 2, 2) * 0.82 + 0.005
H4 = np.random.default_rng(8).normal(0.0, 1.5, (3, 3, 2, 2)).round(2)
MANY_STEPS = (1, 3, 6, None)


def many_margins(n, reps, seed):
    """Coverage of BalancedEstimator's intervals, margins a, b, (c, d); targets the true margins."""
    rng = np.random.default_rng(seed)
    margins = {"a": P4.sum((1, 2, 3)), "b": P4.sum((0, 2, 3)), ("c", "d"): P4.sum((0, 1))}
    truth = (P4 * H4).sum()
    hit = dict.fromkeys(MANY_STEPS, 0)
    est = {k: [] for k in MANY_STEPS}
    se = {k: [] for k in MANY_STEPS}
    for _ in range(reps):
        cell = rng.choice(36, n, p=P4.ravel())
        a, b, c, d = np.unravel_index(cell, P4.shape)
        h = H4[a, b, c, d] + rng.standard_normal(n)
        data = {"a": a, "b": b, "c": c, "d": d}
        for k in MANY_STEPS:
            e = BalancedEstimator(margins, steps=k).fit(data).mean(h)
            lo, hi = e.confidence_interval(0.95)
            hit[k] += lo <= truth <= hi
            est[k].append(e.estimate)
            se[k].append(e.standard_error)
    return [(_label(k), *_binomial(hit[k], reps), np.mean(se[k]), np.std(est[k], ddof=1)) for k in MANY_STEPS]


def many_section(n, reps, seed) -> list[str]:
    lines = [
        "## Three margins, one of them joint",
        "",
        f"Command: `python benchmarks/coverage_study.py --sections many --reps {reps} --many-n {n} --seed {seed}`",
        "",
        "A 3 x 3 x 2 x 2 population over (a, b, c, d) (every cell >= 0.005), h = H4[a, b, c, d] + N(0, 1), "
        "equal-probability samples raked to the margins a, b and the joint (c, d) (`BalancedEstimator`, "
        f"default linearisation; a sweep is 3 half-steps). {reps} replications of n = {n}. Binomial SE of a "
        f"coverage near 0.95: {np.sqrt(0.95 * 0.05 / reps):.4f}.",
        "",
        "| k | coverage | its SE | mean reported SE | Monte Carlo SD of estimate |",
        "|---|---|---|---|---|",
    ]
    return lines + [f"| {k} | {cov:.4f} | {cse:.4f} | {mse:.5f} | {sd:.5f} |"
                    for k, cov, cse, mse, sd in many_margins(n, reps, seed + 10)]


def _label(k):
    return "converged" if k is None else str(k)


def _binomial(hits, reps):
    cov = hits / reps
    return cov, np.sqrt(cov * (1 - cov) / reps)


def equal_probability(n, reps, seed):
    rng = np.random.default_rng(seed)
    p, q = P.sum(1), P.sum(0)
    truth = (P * H).sum()
    est = {k: [] for k in STEPS}
    se = {k: [] for k in STEPS}
    hit = {k: 0 for k in STEPS}
    for _ in range(reps):
        c = rng.choice(12, n, p=P.ravel())
        x, y = c // 4, c % 4
        h = H[x, y] + rng.standard_normal(n)
        for k in STEPS:
            e = balanced_mean(h, x, y, p, q, steps=k)
            lo, hi = e.confidence_interval(0.95)
            hit[k] += lo <= truth <= hi
            est[k].append(e.estimate)
            se[k].append(e.standard_error)
    # First-order prediction: sigma_k^2 of h = H[x, y] + noise is sigma_k^2(H) + 1 (noise is
    # orthogonal to every function of (x, y)); the limit for k = None.
    prof = variance_profile(P, H, max_steps=4)
    predicted = {k: np.sqrt((prof.sigma2[k] if k is not None else prof.sigma2_limit) + 1.0) / np.sqrt(n)
                 for k in STEPS}
    return [(_label(k), *_binomial(hit[k], reps), np.mean(se[k]), np.std(est[k], ddof=1), predicted[k])
            for k in STEPS]


def unequal_probability(n, reps, seed, steps=(2, None)):
    """Coverage with design weights 1 / rate, for both linearisations."""
    rng = np.random.default_rng(seed)
    p, q = P.sum(1), P.sum(0)
    truth = (P * H).sum()
    sampled = (P * RATES[:, None]).ravel()
    sampled /= sampled.sum()
    runs = [(k, lin) for k in steps for lin in ("balanced", "survey")]
    hit = dict.fromkeys(runs, 0)
    est = {r: [] for r in runs}
    se = {r: [] for r in runs}
    rare = []
    infeasible = 0
    while len(rare) < reps:
        c = rng.choice(12, n, p=sampled)
        x, y = c // 4, c % 4
        h = H[x, y] + rng.standard_normal(n)
        d = 1 / RATES[x]
        try:
            fits = {run: balanced_mean(h, x, y, p, q, steps=run[0], sample_weight=d, linearization=run[1])
                    for run in runs}
        except InfeasibleError:  # row 2's few samples missed the cells raking needs: redraw, count
            infeasible += 1
            continue
        rare.append(np.count_nonzero(x == 2))
        for run, e in fits.items():
            lo, hi = e.confidence_interval(0.95)
            hit[run] += lo <= truth <= hi
            est[run].append(e.estimate)
            se[run].append(e.standard_error)
    rows = [(_label(k), lin, *_binomial(hit[k, lin], reps), np.mean(se[k, lin]), np.std(est[k, lin], ddof=1))
            for k, lin in runs]
    return rows, float(np.mean(rare)), infeasible


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2000)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--weighted-n", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--many-n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--sections", choices=["all", "many"], default="all")
    args = parser.parse_args()
    out = pathlib.Path(__file__).parent / "COVERAGE.md"
    if args.sections == "many":
        old = out.read_text()
        head = old.split("## Three margins, one of them joint")[0].rstrip("\n")
        text = head + "\n\n" + "\n".join(many_section(args.many_n, args.reps, args.seed)) + "\n"
        print(text)
        out.write_text(text)
        return
    command = (f"python benchmarks/coverage_study.py --reps {args.reps} --n {args.n} "
               f"--weighted-n {' '.join(map(str, args.weighted_n))} --seed {args.seed}")
    lines = [
        "# Coverage of balanced_mean's 95% intervals",
        "",
        f"Command: `{command}`",
        "",
        "## Equal-probability samples",
        "",
        "3 x 4 table (every cell >= 0.04), h = H[x, y] + N(0, 1), targets = the true marginals, default "
        f"linearisation. {args.reps} replications of n = {args.n}. Binomial SE of a coverage near 0.95: "
        f"{np.sqrt(0.95 * 0.05 / args.reps):.4f}.",
        "",
        "| k | coverage | its SE | mean reported SE | Monte Carlo SD of estimate | sqrt((sigma_k^2 + 1) / n) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {k} | {cov:.4f} | {cse:.4f} | {mse:.5f} | {sd:.5f} | {pred:.5f} |"
              for k, cov, cse, mse, sd, pred in equal_probability(args.n, args.reps, args.seed)]
    lines += [
        "",
        "## Heavily weighted cells with few samples",
        "",
        "The same population; row X = 2 (45% of it) is sampled at 1/50 of the other rows' rate and its "
        "samples get design weights 50 (the others 1), passed as `sample_weight`; targets = the true "
        "marginals. The weighted sample matches the targets in expectation, so both linearisations "
        f"estimate the right thing; {args.reps} replications per n.",
        "",
        "| n | mean samples in row 2 | redrawn (infeasible) | k | linearization | coverage | its SE "
        "| mean reported SE | Monte Carlo SD of estimate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, n in enumerate(args.weighted_n):
        rows, rare, infeasible = unequal_probability(n, args.reps, args.seed + 1 + i)
        lines += [f"| {n} | {rare:.1f} | {infeasible} | {k} | {lin} | {cov:.4f} | {cse:.4f} | {mse:.5f} | {sd:.5f} |"
                  for k, lin, cov, cse, mse, sd in rows]
    lines += [
        "",
        "With a few samples per heavily weighted cell the linearisation is first-order only: the "
        "reported SE misses higher-order terms (compare its mean with the Monte Carlo SD), it is itself "
        "noisy, and the estimate's distribution is skewed, so the normal interval covers less than "
        "95%. Coverage returns to nominal as those cells fill up. Samples whose row 2 missed the cells "
        "raking needs (no balanced table exists) are redrawn and counted in the table.",
    ]
    lines += ["", *many_section(args.many_n, args.reps, args.seed)]
    text = "\n".join(lines) + "\n"
    print(text)
    out.write_text(text)


if __name__ == "__main__":
    main()
