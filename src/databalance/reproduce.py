"""Reproduce the paper's claims on synthetic distributions: experiments, report and figures.

Each experiment is a function of (quick, seed) returning a plain dict of numbers; it depends on
nothing but its seed, so results do not depend on ``--jobs``. :func:`run` runs them (in
parallel if asked), writes ``report.md`` and, with matplotlib, PNG figures.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
from scipy.stats import binom

from . import _progress, _report
from .balance import balance_margins, balance_table, iterate_balance
from .estimators import balanced_mean
from .spectral import spectrum
from .variance import misspecified_profile, variance_profile

__all__ = ["EXPERIMENTS", "run"]

# -- the tables of the theory page's reference values ----------------------------------------------

P_A = np.array([[0.10, 0.05, 0.05], [0.05, 0.20, 0.05], [0.05, 0.05, 0.40]])
H_A = np.array([[1.0, 0.0, 2.0], [0.0, 3.0, 1.0], [2.0, 1.0, 0.0]])


def weak_dependence_table(size: int = 50) -> np.ndarray:
    """The paper's illustration: T[i, j] proportional to (i + 1)(j + 1) + 25 within each column,
    columns weighted by a binomial mixture (bias 0.5 in the paper's notebook, here 0.8 / 0.2)."""
    i = np.arange(size)
    T = (i[:, None] + 1) * (i[None, :] + 1) + size / 2
    T = T / T.sum(axis=0, keepdims=True)
    w = 0.8 * binom.pmf(i, size - 1, 0.7) + 0.2 / size
    return T * w[None, :]


def dependence_family(s: float) -> np.ndarray:
    """(1 - s) p q^T + s P_A: the marginals of P_A at every s, dependence growing with s."""
    p, q = P_A.sum(1), P_A.sum(0)
    return (1 - s) * np.outer(p, q) + s * P_A


# -- Monte Carlo of the k-step estimator -----------------------------------------------------------


def sample_tables(P, n, reps, rng, p_x=None, p_y=None):
    """Empirical tables of ``reps`` samples of size n, keeping those whose every line with a
    positive target has a sample (the estimator is undefined otherwise); and the kept share."""
    p_x = P.sum(1) if p_x is None else p_x
    p_y = P.sum(0) if p_y is None else p_y
    counts = rng.multinomial(n, P.ravel() / P.sum(), size=reps).reshape(reps, *P.shape).astype(float)
    ok = ((counts.sum(2) > 0) | (p_x == 0)).all(1) & ((counts.sum(1) > 0) | (p_y == 0)).all(1)
    return counts[ok] / n, float(ok.mean())


def k_step_estimates(tables, h, p_x, p_y, max_steps):
    """Estimates P_n^(k)(h) for k = 0..max_steps, shape (max_steps + 1, reps)."""
    out = np.empty((max_steps + 1, len(tables)))
    for k, it in zip(range(max_steps + 1), iterate_balance(tables, p_x, p_y), strict=False):
        out[k] = np.einsum("rxy,xy->r", it.table, h)
    return out


def nmse(estimates, truth, n):
    """n * MSE per row and its Monte Carlo standard error."""
    sq = (estimates - truth) ** 2
    return n * sq.mean(axis=1), n * sq.std(axis=1, ddof=1) / np.sqrt(sq.shape[1])


# -- the experiments -------------------------------------------------------------------------------


def variance_reduction(quick: bool, seed: int) -> dict:
    """Experiment 1: Monte Carlo n * MSE of the k-step estimator against sigma_k^2."""
    rng = np.random.default_rng(seed)
    K = 8
    big = weak_dependence_table()
    grid = np.arange(50) / 49
    cases = [("3x3 table A, reference h", P_A, H_A),
             ("3x3 table A, h = 1{x = 0}", P_A, np.repeat([[1.0], [0.0], [0.0]], 3, axis=1)),
             ("50x50 weak dependence, h = x y", big, np.outer(grid, grid))]
    ns = [10**3, 10**4] if quick else [10**3, 10**4, 10**5]
    reps = {True: (2000, 1000), False: (200_000, 20_000)}[quick]  # (3 x 3, 50 x 50) replications
    out = []
    for name, P, h in cases:
        p, q = P.sum(1), P.sum(0)
        prof = variance_profile(P, h, max_steps=K)
        truth = float((P * h).sum())
        for n in ns:
            R = reps[0] if P.size < 100 else reps[1]
            tables, kept = sample_tables(P, n, R, rng)
            est = k_step_estimates(tables, h, p, q, K)
            value, se = nmse(est, truth, n)
            out.append({"case": name, "n": n, "reps": len(tables), "kept": kept, "nmse": value.tolist(),
                        "nmse_se": se.tolist(), "sigma2": prof.sigma2.tolist(),
                        "sigma2_limit": prof.sigma2_limit})
    return {"rows": out, "K": K}


def spectrum_decay(quick: bool, seed: int) -> dict:
    """Experiment 2: singular values across dependence, sigma_k^2 decay, IPF's rate."""
    levels = [0.1, 0.3, 0.6, 0.9]
    K = 12
    rows = []
    for s in levels:
        P = dependence_family(s)
        spec = spectrum(P)
        prof = variance_profile(P, H_A, max_steps=K)
        # IPF towards targets away from P's marginals, its error per half-step, and the rate
        # predicted from the spectrum of the balanced table.
        p_x, p_y = np.array([0.4, 0.35, 0.25]), np.array([0.3, 0.3, 0.4])
        run = balance_table(P, p_x, p_y, steps=30)
        limit = balance_table(P, p_x, p_y, tol=1e-14)
        rows.append({"s": s, "singular_values": spec.singular_values.tolist(),
                     "excess": (prof.sigma2 - prof.sigma2_limit).tolist(),
                     "ipf_error": run.marginal_error.max(axis=1).tolist(),
                     "predicted_rate": spectrum(limit.table).max_correlation})
    return {"rows": rows, "K": K}


def importance_weighted(tables, p_x, p_y, h):
    """sum w h with w = p_x(x) p_y(y) / (P_n,X(x) P_n,Y(y)), normalised: reweighting each margin
    separately, with no balancing."""
    rows = tables.sum(axis=2)
    cols = tables.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = tables * np.where(rows > 0, p_x / rows, 0)[:, :, None] * np.where(cols > 0, p_y / cols, 0)[:, None, :]
    return np.einsum("rxy,xy->r", w, h) / w.sum(axis=(1, 2))


def misspecified(quick: bool, seed: int) -> dict:
    """Experiment 3: targets corrupted with Dirichlet noise; plain, importance-weighted, balanced.

    Each noise level averages several independent corruptions (one corruption alone mixes the
    size of the error with its direction)."""
    rng = np.random.default_rng(seed)
    n = 5000
    reps, draws = (400, 3) if quick else (5000, 10)
    K = 8
    rows = []
    for s in ([0.3, 0.9] if quick else [0.1, 0.5, 0.9]):
        P = dependence_family(s)
        p, q = P.sum(1), P.sum(0)
        truth = float((P * H_A).sum())
        for conc in ([1e4, 300] if quick else [1e5, 1e4, 1e3, 300, 100]):
            noise, mse, mse_iw, predicted, bias = [], [], [], [], []
            for _ in range(draws):
                p_t, q_t = rng.dirichlet(conc * p), rng.dirichlet(conc * q)
                tables, _ = sample_tables(P, n, reps, rng)
                est = k_step_estimates(tables, H_A, p_t, q_t, K)
                pred = misspecified_profile(P, H_A, p_t, q_t, max_steps=K)
                noise.append(np.abs(p_t - p).sum() + np.abs(q_t - q).sum())
                mse.append(((est - truth) ** 2).mean(axis=1))
                mse_iw.append(((importance_weighted(tables, p_t, q_t, H_A) - truth) ** 2).mean())
                predicted.append(pred.mse(n))
                bias.append(np.abs(pred.bias))
            rows.append({"s": s, "concentration": conc, "draws": draws, "noise": float(np.mean(noise)),
                         "mse": np.mean(mse, axis=0).tolist(), "mse_iw": float(np.mean(mse_iw)),
                         "predicted_mse": np.mean(predicted, axis=0).tolist(),
                         "abs_bias": np.mean(bias, axis=0).tolist()})
    return {"rows": rows, "n": n, "K": K}


def k_versus_n(quick: bool, seed: int) -> dict:
    """Experiment 4: MSE over (n, k) when the X target is off by 0.02 in two cells."""
    rng = np.random.default_rng(seed)
    P = dependence_family(0.6)
    p_t, q_t = np.array([0.22, 0.30, 0.48]), P.sum(0)  # true P_X = (0.2, 0.3, 0.5)
    truth = float((P * H_A).sum())
    K = 6
    ns = [100, 300, 1000, 3000, 10000, 30000, 100000]
    reps = 1000 if quick else 20_000
    pred = misspecified_profile(P, H_A, p_t, q_t, max_steps=K)
    mse, mse_se, band, best, best_pred = [], [], [], [], []
    for n in ns:
        tables, _ = sample_tables(P, n, reps, rng, p_t, q_t)
        sq = (k_step_estimates(tables, H_A, p_t, q_t, K) - truth) ** 2
        m, se = sq.mean(axis=1), sq.std(axis=1, ddof=1) / np.sqrt(sq.shape[1])
        # Every k is computed on the same samples, so the resolution of the comparison is the Monte
        # Carlo SE of the paired difference with the observed minimum (much smaller than se).
        diff = sq - sq[np.argmin(m)]
        tolerance = 2 * diff.std(axis=1, ddof=1) / np.sqrt(sq.shape[1])
        predicted = pred.mse(n)
        mse.append(m.tolist())
        mse_se.append(se.tolist())
        band.append(tolerance.tolist())
        best.append(best_k(m, tolerance))
        best_pred.append(best_k(predicted, tolerance))
    return {"n": ns, "K": K, "mse": mse, "mse_se": mse_se, "band": band, "best": best,
            "best_predicted": best_pred, "predicted_mse": [pred.mse(n).tolist() for n in ns]}


def best_k(mse, tolerance) -> int:
    """The rule for both the observed and the predicted curve: the smallest k whose MSE exceeds the
    curve's minimum by at most ``tolerance[k]`` (two Monte Carlo SE of the paired difference), i.e.
    the fewest steps that Monte Carlo cannot tell from the best.

    Examples
    --------
    >>> best_k([3.0, 1.05, 1.0, 1.2], [0.5, 0.1, 0.0, 0.1])  # k = 1 is within 0.1 of the minimum
    1
    """
    mse = np.asarray(mse)
    return int(np.flatnonzero(mse - mse.min() <= np.asarray(tolerance))[0])


# Selection probability of a population unit, up to a constant: by cell (rows x, columns y) times 3
# when the unit's noise z is positive, so that the design weights 1 / pi also vary within cells
# (ratio 24 between the extremes).
COVERAGE_P = np.array([[0.10, 0.06, 0.05, 0.04], [0.05, 0.12, 0.08, 0.05], [0.04, 0.06, 0.15, 0.20]])
COVERAGE_H = np.array([[1.0, 0.0, 2.0, 1.0], [0.0, 3.0, 1.0, 2.0], [2.0, 1.0, 0.0, 4.0]])
SELECTION = np.array([[1.0, 2.0, 4.0, 8.0], [2.0, 4.0, 8.0, 1.0], [4.0, 8.0, 1.0, 2.0]])


def draw_sample(rng, n, weighted):
    """n units from the population (cell ~ COVERAGE_P, h = COVERAGE_H[cell] + z, z ~ N(0, 1)): a simple
    random sample, or one with selection probability pi = SELECTION[cell] * (3 if z > 0 else 1),
    returned with the design weights 1 / pi.

    Selecting a unit with probability proportional to pi draws its cell from P * SELECTION
    (normalised) and, independently, the sign of z with odds 3 : 1 for positive.
    """
    P = COVERAGE_P * SELECTION if weighted else COVERAGE_P
    c = rng.choice(P.size, n, p=P.ravel() / P.sum())
    x, y = c // P.shape[1], c % P.shape[1]
    z = np.abs(rng.standard_normal(n))
    if not weighted:
        z *= rng.choice([-1.0, 1.0], n)
        return x, y, COVERAGE_H[x, y] + z, None
    z *= np.where(rng.random(n) < 0.75, 1.0, -1.0)
    return x, y, COVERAGE_H[x, y] + z, 1 / (SELECTION[x, y] * np.where(z > 0, 3.0, 1.0))


def coverage(quick: bool, seed: int) -> dict:
    """Experiment 5: coverage of balanced_mean's 95% intervals per k, for a simple random sample and
    for a design with unequal selection probabilities (weights 1 / pi passed as sample_weight)."""
    rng = np.random.default_rng(seed)
    p, q = COVERAGE_P.sum(1), COVERAGE_P.sum(0)
    truth = float((COVERAGE_P * COVERAGE_H).sum())
    n, reps = (500, 200) if quick else (2000, 1000)  # replications per design
    steps = [0, 1, 2, 4, None]
    designs = []
    for name, weighted in (("simple random sample", False), ("unequal selection probabilities, weights 1/pi", True)):
        hits = np.zeros(len(steps))
        for _ in range(reps):
            x, y, h, w = draw_sample(rng, n, weighted)
            for j, k in enumerate(steps):
                lo, hi = balanced_mean(h, x, y, p, q, steps=k, sample_weight=w).confidence_interval(0.95)
                hits[j] += lo <= truth <= hi
        designs.append({"design": name, "coverage": (hits / reps).tolist()})
    return {"steps": ["converged" if k is None else k for k in steps], "designs": designs, "reps": reps, "n": n}


# -- many margins: a 3 x 4 x 5 table raked to a joint and two one-way margins ----------------------

MANY_MARGINS = ((0, 1), 2, 0)  # the cycle order: the joint margin (0, 1), then axis 2, then axis 0


def many_margins_table() -> tuple[np.ndarray, np.ndarray]:
    """The 3 x 4 x 5 table P and the function h of the many-margin experiment.

    log P(x, y, z) = 0.4 [(x - 1)(z - 2) + 0.8 (y - 1.5)(z - 2) + 0.7 (x - 1)(y - 1.5)] + const
    (every pair of axes dependent; smallest cell 0.0031, so about 3 samples at n = 1000), and
    h = x z / 4 + y + cos(x + y z), which no sum of functions of the margins reproduces.

    Examples
    --------
    >>> P, h = many_margins_table()
    >>> P.shape, round(float(P.min()), 4), round(float((P * h).sum()), 4)
    ((3, 4, 5), 0.0031, 2.4167)
    """
    x, y, z = np.meshgrid(np.arange(3), np.arange(4), np.arange(5), indexing="ij")
    P = np.exp(0.4 * ((x - 1) * (z - 2) + 0.8 * (y - 1.5) * (z - 2) + 0.7 * (x - 1) * (y - 1.5)))
    return P / P.sum(), x * z / 4 + y + np.cos(x + y * z)


def margin_of(table, axes) -> np.ndarray:
    """The sub-table of ``table`` on ``axes`` (an int or a sorted tuple), axes in that order."""
    keep = (axes,) if isinstance(axes, int) else axes
    return table.sum(axis=tuple(a for a in range(table.ndim) if a not in keep))


def margin_step_estimates(table, targets, h, max_steps) -> np.ndarray:
    """P_n^(k)(h) for k = 0..max_steps, where P_n^(k) is ``balance_margins(table, targets, steps=k)``.

    Each half-step is one ``balance_margins`` call on the previous iterate with that step's margin
    alone: the same numbers (to rounding; tests/test_reproduce.py checks it) for max_steps calls of
    one step instead of max_steps calls of up to max_steps steps, each of which re-validates every
    margin."""
    keys = list(targets)
    out = np.empty(max_steps + 1)
    out[0] = (table * h).sum()
    current = table
    for k in range(1, max_steps + 1):
        key = keys[(k - 1) % len(keys)]
        current = balance_margins(current, {key: targets[key]}, steps=1).table
        out[k] = (current * h).sum()
    return out


def has_every_margin_cell(counts, targets) -> bool:
    """Whether every margin cell with a positive target holds a sample (otherwise no rescaling can
    reach the target and the k-step estimator is undefined)."""
    return all(bool(((margin_of(counts, key) > 0) | (target == 0)).all()) for key, target in targets.items())


def sweep_decay(table, targets, h, sweeps) -> dict:
    """Raking ``table`` for ``sweeps`` sweeps: the largest marginal error after each sweep, the
    observed per-sweep factor (geometric mean over the last 5 sweeps above 1e-12, before the
    floating-point floor), and ``sweep_rate`` of the limit, the table IPF converges to."""
    K = len(targets)
    errors = balance_margins(table, targets, steps=K * sweeps).marginal_error[::K].max(axis=1)
    above = np.flatnonzero(errors > 1e-12)
    a, b = above[-6], above[-1]
    limit = balance_margins(table, targets).table
    rate = variance_profile(limit, h, max_steps=0, margins=list(targets)).sweep_rate
    return {"error": errors.tolist(), "observed_rate": float((errors[b] / errors[a]) ** (1 / (b - a))),
            "predicted_rate": rate}


def many_margins(quick: bool, seed: int) -> dict:
    """Experiment 6: n * MSE of the k-step estimator raked to three margins (one joint) against
    sigma_k^2, and the per-sweep decay of IPF's marginal errors against ``sweep_rate``."""
    rng = np.random.default_rng(seed)
    P, h = many_margins_table()
    targets = {key: margin_of(P, key) for key in MANY_MARGINS}
    K = 3 * len(MANY_MARGINS)  # three sweeps
    prof = variance_profile(P, h, max_steps=K, margins=list(MANY_MARGINS))
    truth = float((P * h).sum())
    ns = [10**3, 10**4] if quick else [10**3, 10**4, 10**5]
    reps = 150 if quick else 3000  # each replication costs K balance_margins calls of one step
    rows = []
    for n in ns:
        counts = rng.multinomial(n, P.ravel(), size=reps).reshape(reps, *P.shape) / n
        ok = np.array([has_every_margin_cell(c, targets) for c in counts])
        est = np.array([margin_step_estimates(c, targets, h, K) for c in counts[ok]]).T
        value, se = nmse(est, truth, n)
        rows.append({"n": n, "reps": int(ok.sum()), "kept": float(ok.mean()), "nmse": value.tolist(),
                     "nmse_se": se.tolist(), "sigma2": prof.sigma2.tolist(), "sigma2_limit": prof.sigma2_limit,
                     **sweep_decay(counts[ok][0], targets, h, sweeps=30)})
    return {"rows": rows, "K": K, "margins": [list(m) if isinstance(m, tuple) else [m] for m in MANY_MARGINS],
            "shape": list(P.shape), "sweep_rate": prof.sweep_rate}


EXPERIMENTS = {
    "variance_reduction": variance_reduction,
    "spectrum": spectrum_decay,
    "misspecified": misspecified,
    "k_versus_n": k_versus_n,
    "coverage": coverage,
    "many_margins": many_margins,
}


def _run_one(args):
    name, quick, seed = args
    t0 = time.perf_counter()
    result = EXPERIMENTS[name](quick, seed)
    return name, result, time.perf_counter() - t0


def run(out: pathlib.Path, *, quick: bool = False, seed: int = 0, jobs: int = 1, log=print,
        progress: Any = None) -> dict:
    """Run every experiment, write ``out/report.md``, ``out/results.json`` and the figures.

    Parameters
    ----------
    out : path
        Folder for the outputs, created if missing.
    quick : bool
        Fewer replications and sizes: about 10 seconds instead of minutes.
    seed : int
        Experiment i runs with seed ``seed + i``, so the numbers do not depend on ``jobs``.
    jobs : int
        Experiments run in this many processes.
    log : callable
        Receives the text lines: the plan, one line per finished experiment ("[i/6] name done in
        s"), the summary and the report's path.
    progress : bool or callable, optional
        As everywhere in databalance (see :func:`balance_table`): a callable ``f(done, values)``
        called after each experiment with the number done so far and an array holding that
        experiment's seconds; ``True`` for a progress bar (tqdm when installed, else a line on
        stderr); ``False``/``None`` (default) for none. Independent of ``log``.

    Returns
    -------
    dict
        Each experiment's numbers (what ``results.json`` holds), by experiment name.

    Raises
    ------
    TypeError
        ``progress`` neither a bool nor a callable (before anything runs).

    Examples
    --------
    Each experiment is a plain function of (quick, seed); the spectrum one is instant:

    >>> from databalance.reproduce import EXPERIMENTS
    >>> rows = EXPERIMENTS["spectrum"](True, 0)["rows"]
    >>> [round(r["singular_values"][1], 3) for r in rows]
    [0.061, 0.184, 0.368, 0.552]
    """
    tasks = [(name, quick, seed + i) for i, name in enumerate(EXPERIMENTS)]
    reporter = _progress.reporter(progress, "reproduce: experiments done", len(tasks), what="seconds")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results, seconds = {}, {}
    log(f"Running {len(tasks)} experiments ({'quick' if quick else 'full'}, seed {seed}, {jobs} job(s))")
    try:
        with ProcessPoolExecutor(max_workers=jobs) if jobs > 1 else contextlib.nullcontext() as pool:
            done = (pool.map if pool is not None else map)(_run_one, tasks)
            for i, (name, result, sec) in enumerate(done, start=1):
                results[name], seconds[name] = result, sec
                log(f"  [{i}/{len(tasks)}] {name} done in {sec:.1f} s")
                if reporter is not None:
                    reporter[0](i, np.array([sec]))
    finally:
        if reporter is not None:
            reporter[1]()
    (out / "results.json").write_text(json.dumps(results, indent=1))
    figures = _figures(results, out)
    (out / "report.md").write_text(_report.markdown(results, figures, quick=quick, seed=seed, seconds=seconds))
    log(_report.summary(results))
    log(f"Report: {out / 'report.md'}")
    return results


def _figures(results, out) -> list[str]:
    from . import _figures

    try:
        return _figures.draw(results, out)
    except ImportError as err:
        if not (err.name or "").startswith("matplotlib"):
            raise
        print("matplotlib is not installed, so the report has tables but no figures. "
              'Install it with: pip install "databalance[plot]"', file=sys.stderr)
        return []
