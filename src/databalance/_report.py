"""The Markdown report and the terminal summary of `databalance reproduce`."""

from __future__ import annotations

import numpy as np


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(rows_i) + " |" for rows_i in rows]
    return "\n".join(lines)


def within(value, se, target, z=3.0, exact=0.0):
    """Within z Monte Carlo SE, or both zero to within ``exact`` (h(x) at odd k is exact)."""
    return abs(value - target) <= z * se + exact


def agreement(row) -> tuple[int, int]:
    """How many of the k reported (k = 0..K) have n MSE within 3 Monte Carlo SE of sigma_k^2, and K + 1."""
    exact = 1e-12 * row["sigma2"][0]
    triples = zip(row["nmse"], row["nmse_se"], row["sigma2"], strict=True)
    return sum(within(v, s, t, exact=exact) for v, s, t in triples), len(row["sigma2"])


def variance_section(res) -> str:
    parts = []
    for row in res["rows"]:
        exact = 1e-12 * row["sigma2"][0]
        ok, total = agreement(row)
        parts.append(f"**{row['case']}, n = {row['n']}** ({row['reps']} replications; "
                     f"{100 * row['kept']:.0f}% of samples had every row and column; "
                     f"k = 0..{total - 1} within 3 Monte Carlo SE of sigma_k^2: {ok}/{total})\n")
        triples = zip(row["nmse"], row["nmse_se"], row["sigma2"], strict=True)
        parts.append(_table(["k", "n MSE (Monte Carlo)", "MC SE", "sigma_k^2", "z"],
                            [[str(k), f"{v:.5f}", f"{s:.5f}", f"{t:.5f}",
                              "exact" if max(v, t) <= exact else f"{(v - t) / s:+.1f}"]
                             for k, (v, s, t) in enumerate(triples)]))
        parts.append("")
    return "\n".join(parts)


def spectrum_section(res) -> str:
    rows = []
    for r in res["rows"]:
        ex = np.array(r["excess"])
        s2 = r["singular_values"][1]
        ratio = ex[6] / ex[4] if ex[4] > 0 else float("nan")
        err = np.array(r["ipf_error"])
        above = np.flatnonzero(err > 1e-13)  # the last 8 half-steps before the floating-point floor
        a, b = (above[-9], above[-1]) if len(above) > 9 else (0, 0)
        observed = (err[b] / err[a]) ** (1 / (b - a)) if b > a else float("nan")
        rows.append([f"{r['s']:.1f}", ", ".join(f"{v:.4f}" for v in r["singular_values"]), f"{ratio:.4f}",
                     f"{s2**4:.4f}", f"{observed:.4f}", f"{r['predicted_rate']:.4f}"])
    return _table(["dependence s", "singular values", "(sigma_6^2 - sigma_inf^2) / (sigma_4^2 - sigma_inf^2)",
                   "s_2^4", "IPF error ratio per half-step (last 8 before 1e-13)", "s_2 of the balanced table"], rows)


def misspecified_section(res) -> str:
    rows = []
    for r in res["rows"]:
        mse = r["mse"]
        worse = [k for k in range(1, len(mse)) if mse[k] > mse[0]]
        rows.append([f"{r['s']:.1f}", f"{r['concentration']:.0f}", f"{r['noise']:.4f}", f"{mse[0]:.2e}",
                     f"{r['mse_iw']:.2e}", f"{mse[1]:.2e}", f"{mse[2]:.2e}", f"{mse[-1]:.2e}",
                     f"{r['predicted_mse'][2]:.2e}", f"{r['abs_bias'][-1]:.4f}",
                     ", ".join(map(str, worse)) if worse else "none"])
    return _table(["s", "Dirichlet concentration", "mean L1 error of targets", "MSE plain (k=0)",
                   "MSE importance-weighted", "MSE k=1", "MSE k=2", f"MSE k={res['K']}", "predicted MSE k=2",
                   f"mean abs bias k={res['K']}", "k with MSE above the plain mean"], rows)


def k_versus_n_section(res) -> str:
    rows = [[str(n), ", ".join(f"{v:.2e}" for v in mse), ", ".join(f"{v:.2e}" for v in pred), str(b), str(bp)]
            for n, mse, pred, b, bp in zip(res["n"], res["mse"], res["predicted_mse"], res["best"],
                                           res["best_predicted"], strict=True)]
    return _table(["n", f"MSE for k = 0..{res['K']} (Monte Carlo)", "predicted (bias^2 + variance / n)",
                   "best k observed", "best k predicted"], rows)


def coverage_section(res) -> str:
    se = np.sqrt(0.95 * 0.05 / res["reps"])
    rows = [[str(k)] + [f"{d['coverage'][j]:.3f}" for d in res["designs"]] + [f"{se:.3f}"]
            for j, k in enumerate(res["steps"])]
    return _table(["k"] + [f"coverage, {d['design']}" for d in res["designs"]] + ["binomial SE"], rows)


def _fixed(k, names) -> str:
    """The margin half-step k fixes (cycle order), marking the ends of sweeps."""
    if k == 0:
        return "none (sample mean)"
    name = names[(k - 1) % len(names)]
    return f"{name}, end of sweep {k // len(names)}" if k % len(names) == 0 else name


def many_margins_section(res) -> str:
    names = [str(tuple(m)) if len(m) > 1 else str(m[0]) for m in res["margins"]]
    keys = ", ".join(names)
    shape = " x ".join(map(str, res["shape"]))
    parts = []
    for row in res["rows"]:
        ok, total = agreement(row)
        parts.append(f"**{shape} table raked to ({keys}), n = {row['n']}** ({row['reps']} replications; "
                     f"{100 * row['kept']:.0f}% of samples had every margin cell; "
                     f"k = 0..{total - 1} within 3 Monte Carlo SE of sigma_k^2: {ok}/{total})\n")
        triples = zip(row["nmse"], row["nmse_se"], row["sigma2"], strict=True)
        parts.append(_table(["k", "step k fixes margin", "n MSE (Monte Carlo)", "MC SE", "sigma_k^2", "z"],
                            [[str(k), _fixed(k, names), f"{v:.5f}", f"{s:.5f}", f"{t:.5f}", f"{(v - t) / s:+.1f}"]
                             for k, (v, s, t) in enumerate(triples)]))
        parts.append("")
    parts.append(f"sigma_inf^2 = {res['rows'][0]['sigma2_limit']:.5f}; sweep_rate of the population table: "
                 f"{res['sweep_rate']:.4f}.\n")
    parts.append(_table(["n", "largest marginal error of one sample, sweeps 0, 1, 2, 4, 8",
                         "observed factor per sweep (last 5 sweeps above 1e-12)",
                         "sweep_rate of the sample's balanced table"],
                        [[str(r["n"]), ", ".join(f"{r['error'][m]:.1e}" for m in (0, 1, 2, 4, 8)),
                          f"{r['observed_rate']:.5f}", f"{r['predicted_rate']:.5f}"] for r in res["rows"]]))
    return "\n".join(parts)


SECTIONS = [
    ("variance_reduction", "1. Variance reduction: n MSE of the k-step estimator against sigma_k^2", variance_section,
     "sigma_k^2 is the exact first-order variance (variance_profile). Where the table has no tiny cells the "
     "Monte Carlo values agree with it within their standard errors once n is large; with many "
     "replications the O(1/n) higher-order term shows at n = 1000 and 10^4. On the 50 x 50 table with tiny "
     "cells it dominates for k >= 2 at small n, and many samples have an empty row or column (the "
     "estimator is undefined there; those samples are left out)."),
    ("spectrum", "2. The spectrum sets the rate", spectrum_section,
     "Tables (1 - s) p q^T + s P_A: singular values grow with s; sigma_k^2 - sigma_inf^2 shrinks by s_2^4 "
     "every two steps; IPF's marginal error shrinks by s_2 per half-step (s_2^2 per sweep), s_2 taken from "
     "the balanced table. The ratio reaches s_2 once the slowest direction dominates the error; where the "
     "start has little error along it, the floating-point floor can come first and the observed ratio "
     "stays between s_3 and s_2."),
    ("misspecified", "3. Misspecified marginals: when balancing hurts", misspecified_section,
     "Targets drawn from Dirichlet(c p), several draws per level with the MSE averaged over them. The bias "
     "of balancing towards wrong targets does not shrink with n, so with noisy targets a k >= 1 can have a "
     "larger MSE than the plain mean. Predicted MSE = bias^2 + variance / n (misspecified_profile)."),
    ("k_versus_n", "4. k versus n", k_versus_n_section,
     "Target for X off by 0.02 in two cells (p_x = (0.22, 0.30, 0.48), true (0.2, 0.3, 0.5)): more "
     "balancing pays at small n, where variance dominates; at large n the bias dominates and the plain "
     "mean (k = 0) wins. One rule gives the best k of both the Monte Carlo and the predicted curve: the "
     "smallest k whose MSE exceeds that curve's minimum by at most two Monte Carlo SE of the paired "
     "difference (every k is computed on the same samples), i.e. the fewest steps the simulation cannot "
     "tell from the best."),
    ("coverage", "5. Coverage of the confidence intervals", coverage_section,
     "Share of balanced_mean's 95% intervals that cover the true mean, per k, for a simple random sample "
     "and for a design that selects units with unequal probabilities pi (ratio 24 between extremes, "
     "varying within cells too) and passes the weights 1/pi as sample_weight; the targets are the "
     "population's marginals."),
    ("many_margins", "6. Many margins: sigma_k^2 with a joint and two one-way margins", many_margins_section,
     "A 3 x 4 x 5 table P (every pair of axes dependent, smallest cell 0.003) raked to its joint margin of axes "
     "(0, 1), then axis 2, then axis 0, with balance_margins and the population's margins as targets; h = "
     "x z / 4 + y + cos(x + y z). sigma_k^2 = Var_P(C_j(1) ... C_j(k) h) comes from variance_profile(P, h, "
     "margins=...); a sweep is three half-steps, and sigma_k^2 - sigma_inf^2 shrinks by about sweep_rate^2 per "
     "sweep. The last table follows one sample per n: IPF's marginal errors shrink per sweep by sweep_rate "
     "of the table the iteration converges to, which tends to that of P as n grows."),
]


def markdown(results, figures, *, quick, seed, seconds) -> str:
    text = [
        "# databalance: reproduction of *The Benefits of Balance*",
        "",
        f"Mode: {'quick' if quick else 'full'}; seed {seed}. Run time per experiment: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()) + ".",
        "",
        "All distributions are synthetic and built by the code (the documentation's theory page lists the "
        "reference values); numbers are in results.json.",
    ]
    for name, title, table, prose in SECTIONS:
        figure = f"![{name}]({name}.png)" if f"{name}.png" in figures else ""
        text += ["", f"## {title}", "", prose, "", figure, "", table(results[name])]
    return "\n".join(text) + "\n"


def summary(results) -> str:
    lines = ["", "Summary", "-------"]
    for row in results["variance_reduction"]["rows"]:
        ok, total = agreement(row)
        lines.append(f"variance  {row['case'][:34]:34s} n={row['n']:<6d} "
                     f"k=0..{total - 1} within 3 MC SE of sigma_k^2: {ok}/{total}")
    hurt = [r for r in results["misspecified"]["rows"] if any(m > r["mse"][0] for m in r["mse"][1:])]
    lines.append(f"misspecified  settings where some k >= 1 has a larger MSE than the plain mean: "
                 f"{len(hurt)}/{len(results['misspecified']['rows'])}")
    kn = results["k_versus_n"]
    best = zip(kn["n"], kn["best"], kn["best_predicted"], strict=True)
    lines.append("k vs n  best k observed / predicted: " + ", ".join(f"n={n}: {b}/{p}" for n, b, p in best))
    cov = results["coverage"]
    for d in cov["designs"]:
        pairs = zip(cov["steps"], d["coverage"], strict=True)
        lines.append(f"coverage  {d['design']}: " + ", ".join(f"k={k}: {c:.3f}" for k, c in pairs))
    for row in results["many_margins"]["rows"]:
        ok, total = agreement(row)
        lines.append(f"margins   3 margins (one joint), n={row['n']:<6d} k=0..{total - 1} within 3 MC SE of "
                     f"sigma_k^2: {ok}/{total}; per-sweep error factor {row['observed_rate']:.4f}, "
                     f"sweep_rate {row['predicted_rate']:.4f}")
    return "\n".join(lines)
