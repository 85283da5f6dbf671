"""Figures of `databalance reproduce` (needs matplotlib: pip install "databalance[plot]").

matplotlib is imported only when a figure is drawn, and only through its object-oriented API (a
``Figure`` with its own Agg canvas): importing this module neither needs matplotlib nor changes the
backend of a process that uses pyplot itself.
"""

from __future__ import annotations

import numpy as np


def _figure(**kwargs):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(layout="constrained", **kwargs)
    FigureCanvasAgg(fig)
    return fig


def draw(results, out) -> list[str]:
    """Write the six PNG figures into the folder ``out``; return their file names.

    Raises ImportError (naming matplotlib) when matplotlib is not installed.
    """
    import matplotlib  # noqa: F401  (fail here, before any figure, when it is missing)

    names = []
    for name, fn in (("variance_reduction.png", _variance), ("spectrum.png", _spectrum),
                     ("misspecified.png", _misspecified), ("k_versus_n.png", _k_versus_n),
                     ("coverage.png", _coverage), ("many_margins.png", _many_margins)):
        fn(results).savefig(out / name, dpi=110, bbox_inches="tight")
        names.append(name)
    return names


def _variance(results):
    rows = results["variance_reduction"]["rows"]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig = _figure(figsize=(5.4 * len(cases), 4.4))
    axes = fig.subplots(1, len(cases))
    for ax, case in zip(np.atleast_1d(axes), cases, strict=True):
        mine = [r for r in rows if r["case"] == case]
        sigma2 = np.array(mine[0]["sigma2"])
        k = np.arange(len(sigma2))
        exact_zeros = np.any(sigma2 <= 1e-12 * sigma2[0])
        ax.plot(k, sigma2, "k-", lw=2, label=r"$\sigma_k^2$ (theory)")
        for j, r in enumerate(mine):
            ax.errorbar(k + 0.08 * (j - 1), r["nmse"], yerr=2 * np.array(r["nmse_se"]), fmt="o", ms=4,
                        capsize=2, label=f"n = {r['n']:,} (Monte Carlo, ±2 SE)")
        # Exact zeros (h depends on x only: odd k are exact) cannot be shown on a log axis.
        ax.set_yscale("linear" if exact_zeros else "log")
        ax.set_title(case + (r" ($\sigma_k^2 = 0$ at odd k)" if exact_zeros else ""), fontsize=10)
        ax.set_xlabel("k (half-steps of balancing)")
        ax.set_ylabel(r"$n \times$ MSE")
        ax.legend(fontsize=8)
    fig.suptitle("Variance of the k-step balanced estimator", fontsize=12)
    return fig


def _spectrum(results):
    rows = results["spectrum"]["rows"]
    fig = _figure(figsize=(16, 4.4))
    axes = fig.subplots(1, 3)
    floor = 1e-16  # float64 resolution: predictions below it are not drawn
    for r in rows:
        sv = r["singular_values"]
        axes[0].plot(range(1, len(sv) + 1), sv, "o-", label=f"s = {r['s']}")
        ex = np.array(r["excess"])
        k = np.arange(len(ex))
        line, = axes[1].semilogy(k[ex > floor], ex[ex > floor], "o", ms=4, label=f"s = {r['s']}")
        s2 = sv[1]
        if ex[2] > floor:
            pred = ex[2] * s2 ** (2 * (k[2:] - 2))
            axes[1].semilogy(k[2:][pred > floor], pred[pred > floor], "-", color=line.get_color(), lw=1)
        err = np.array(r["ipf_error"])
        steps = np.arange(len(err))
        line, = axes[2].semilogy(steps[err > floor], err[err > floor], "o", ms=3, label=f"s = {r['s']}")
        anchor = 10 if err[10] > floor else 4  # past the first, pre-asymptotic steps
        pred = err[anchor] * r["predicted_rate"] ** (steps[anchor:] - anchor)
        axes[2].semilogy(steps[anchor:][pred > floor], pred[pred > floor], "-", color=line.get_color(), lw=1)
    axes[0].set_xticks(range(1, len(rows[0]["singular_values"]) + 1))
    axes[0].set(xlabel="j", ylabel=r"singular value $s_j$", title="Spectrum of the conditional-mean operator")
    axes[1].set(xlabel="k", ylabel=r"$\sigma_k^2 - \sigma_\infty^2$",
                title=r"Variance excess (dots) and $s_2^{2k}$ decay (lines)")
    axes[2].set(xlabel="half-step", ylabel="largest L1 marginal error",
                title=r"IPF error (dots) and predicted rate $s_2$ per half-step (lines)")
    for ax in axes:
        ax.legend(fontsize=8)
    return fig


def _misspecified(results):
    from matplotlib import ticker

    res = results["misspecified"]
    rows = res["rows"]
    levels = sorted({r["s"] for r in rows})
    fig = _figure(figsize=(5.4 * len(levels), 4.4))
    axes = fig.subplots(1, len(levels), sharey=True)
    for ax, s in zip(np.atleast_1d(axes), levels, strict=True):
        mine = sorted((r for r in rows if r["s"] == s), key=lambda r: r["noise"])
        noise = [r["noise"] for r in mine]
        ax.loglog(noise, [r["mse"][0] for r in mine], "ko-", label="plain mean (k = 0)")
        ax.loglog(noise, [r["mse_iw"] for r in mine], "s--", color="gray", label="importance-weighted")
        for k, c in ((1, "C0"), (2, "C1"), (res["K"], "C3")):
            ax.loglog(noise, [r["mse"][k] for r in mine], "o-", color=c, label=f"balanced, k = {k}")
            ax.loglog(noise, [r["predicted_mse"][k] for r in mine], ":", color=c, lw=3, alpha=0.6)
        ax.plot([], [], "k:", lw=3, alpha=0.6, label=r"predicted: bias$^2$ + variance / n")
        ax.set(xlabel=f"L1 error of the targets (mean of {mine[0]['draws']} draws)",
               title=f"dependence s = {s}")
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_ylabel("MSE")
        ax.legend(fontsize=8)
    fig.suptitle(f"Balancing towards wrong marginals, n = {res['n']}", fontsize=12)
    return fig


def _k_versus_n(results):
    res = results["k_versus_n"]
    mse = np.array(res["mse"])
    relative = mse / mse.min(axis=1, keepdims=True)  # MSE is dominated by n; compare k within each n
    fig = _figure(figsize=(7.2, 4.6))
    ax = fig.subplots()
    im = ax.imshow(np.log10(relative.T), origin="lower", aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(res["n"])), [f"{n:,}" for n in res["n"]], rotation=30)
    ax.set_yticks(range(res["K"] + 1))
    # Both marks use the same rule: the fewest steps within 2 paired Monte Carlo SE of the curve's minimum.
    ax.plot(range(len(res["n"])), res["best"], "wo", ms=9, label="best k, observed")
    ax.plot(range(len(res["n"])), res["best_predicted"], "rx", ms=9, mew=2, label="best k, predicted")
    ax.set(xlabel="n", ylabel="k (half-steps)", title="MSE relative to the best k at each n (wrong X target)")
    fig.colorbar(im, ax=ax, label="log10(MSE / smallest MSE at this n)")
    ax.legend(fontsize=8, loc="upper right")
    return fig


def _coverage(results):
    res = results["coverage"]
    se = np.sqrt(0.95 * 0.05 / res["reps"])
    fig = _figure(figsize=(6.4, 4))
    ax = fig.subplots()
    x = np.arange(len(res["steps"]))
    for j, d in enumerate(res["designs"]):
        ax.errorbar(x + 0.12 * (2 * j - 1), d["coverage"], yerr=2 * se, fmt="os"[j % 2], capsize=4,
                    label=f"{d['design']} (±2 binomial SE)")
    ax.axhline(0.95, color="k", ls="--", label="nominal 95%")
    ax.set_xticks(x, [str(k) for k in res["steps"]])
    ax.set_ylim(0.85, 1.0)
    ax.set(xlabel="k", ylabel="coverage", title=f"95% intervals of balanced_mean (n = {res['n']})")
    ax.legend(fontsize=8)
    return fig


def _many_margins(results):
    res = results["many_margins"]
    rows = res["rows"]
    K = len(res["margins"])
    fig = _figure(figsize=(12, 4.4))
    left, right = fig.subplots(1, 2)
    sigma2 = np.array(rows[0]["sigma2"])
    k = np.arange(len(sigma2))
    left.plot(k, sigma2, "k-", lw=2, label=r"$\sigma_k^2$ (variance_profile)")
    left.axhline(rows[0]["sigma2_limit"], color="gray", ls="--", lw=1, label=r"$\sigma_\infty^2$")
    for j, r in enumerate(rows):
        left.errorbar(k + 0.08 * (j - 1), r["nmse"], yerr=2 * np.array(r["nmse_se"]), fmt="o", ms=4, capsize=2,
                      label=f"n = {r['n']:,} (Monte Carlo, ±2 SE)")
    for end in range(K, len(k), K):
        left.axvline(end, color="gray", lw=0.5, alpha=0.5)
    left.set_yscale("log")
    left.set(xlabel=f"k (half-steps; a sweep is {K}, thin lines end each sweep)", ylabel=r"$n \times$ MSE",
             title="Variance of the k-step estimator, three margins (one joint)")
    left.legend(fontsize=8)
    floor = 1e-16  # float64 resolution
    for r in rows:
        err = np.array(r["error"])
        sweeps = np.arange(len(err))
        line, = right.semilogy(sweeps[err > floor], err[err > floor], "o", ms=3,
                               label=f"n = {r['n']:,}: observed {r['observed_rate']:.4f} per sweep")
        pred = err[2] * r["predicted_rate"] ** (sweeps[2:] - 2)  # anchored past the first sweeps
        right.semilogy(sweeps[2:][pred > floor], pred[pred > floor], "-", color=line.get_color(), lw=1,
                       label=f"sweep_rate {r['predicted_rate']:.4f}")
    right.set(xlabel="sweep", ylabel="largest L1 marginal error (relative)",
              title=f"One sample per n: IPF error (dots), sweep_rate (lines); P's is {res['sweep_rate']:.4f}")
    right.legend(fontsize=8)
    return fig
