"""Tests of databalance.estimators: R's survey package, brute force, coverage, errors."""

import json
import pathlib
import shutil
import subprocess
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from databalance import BalancedEstimator, ConvergenceWarning, balance_table, balanced_mean

REFERENCE = json.loads((pathlib.Path(__file__).parent / "reference" / "survey_reference.json").read_text())


# -- against R's survey package (recorded by tests/reference/make_survey_reference.py) ------------


@pytest.mark.parametrize("name", ["codes_3x4", "labels_5x6"])
def test_converged_matches_r_survey(name):
    c = REFERENCE["cases"][name]
    p_x = c["p_x"] if name.startswith("labels") else [c["p_x"][k] for k in sorted(c["p_x"], key=int)]
    p_y = c["p_y"] if name.startswith("labels") else [c["p_y"][k] for k in sorted(c["p_y"], key=int)]
    est = balanced_mean(np.array(c["h"]), np.array(c["x"]), np.array(c["y"]), p_x, p_y, tol=1e-13,
                        linearization="survey")
    assert est.balance.converged
    np.testing.assert_allclose(est.estimate, c["r_estimate"], rtol=1e-8)
    # Same residuals as R once its 10 projection passes have converged (they have here): the SEs
    # agree to ~1e-10, far inside the 1% bar.
    np.testing.assert_allclose(est.standard_error, c["r_se"], rtol=1e-8)


def test_design_weights_differ_from_r_only_by_its_unweighted_residuals():
    c = REFERENCE["cases"]["weighted_3x4"]
    p_x = [c["p_x"][k] for k in sorted(c["p_x"], key=int)]
    p_y = [c["p_y"][k] for k in sorted(c["p_y"], key=int)]
    est = balanced_mean(np.array(c["h"]), np.array(c["x"]), np.array(c["y"]), p_x, p_y,
                        sample_weight=np.array(c["w"]), tol=1e-13, linearization="survey")
    np.testing.assert_allclose(est.estimate, c["r_estimate"], rtol=1e-8)
    # R residualises with unweighted category means even under design weights; we use the
    # design-weighted (Deville-Sarndal) ones. The SEs agree to a few percent.
    np.testing.assert_allclose(est.standard_error, c["r_se"], rtol=0.03)


@pytest.mark.skipif(shutil.which("Rscript") is None, reason="R is not installed")
def test_live_r_survey_on_fresh_data():
    if subprocess.run(["Rscript", "-e", "library(survey)"], capture_output=True).returncode != 0:
        pytest.skip("R's survey package is not installed")
    from .reference.make_survey_reference import r_rake

    rng = np.random.default_rng(11)
    n = 300
    x = rng.choice(["lo", "mid", "hi"], n, p=[0.3, 0.3, 0.4])
    y = rng.choice([0, 1], n, p=[0.6, 0.4])
    h = (x == "hi") * 2.0 + y + rng.normal(size=n)
    p_x, p_y = {"hi": 0.5, "lo": 0.2, "mid": 0.3}, {0: 0.5, 1: 0.5}
    r_est, r_se = r_rake(list(x), list(y), h, p_x, p_y)
    est = balanced_mean(h, x, y, p_x, p_y, tol=1e-13, linearization="survey")
    np.testing.assert_allclose(est.estimate, r_est, rtol=1e-8)
    np.testing.assert_allclose(est.standard_error, r_se, rtol=1e-3)


API = json.loads((pathlib.Path(__file__).parent / "reference" / "api_reference.json").read_text())


def r_convention_se(h, x, y, w, passes=10):
    """R survey's raking variance (svyrecvar): the score w (h - mean) residualised with *unweighted*
    category means of score / w, margin after margin (10 passes, as R does), then the
    with-replacement variance."""
    z = w * (h - w @ h)
    for _ in range(passes):
        for codes in (x, y):
            _, inv = np.unique(codes, return_inverse=True)
            means = np.bincount(inv, z / w) / np.bincount(inv)
            z = z - w * means[inv]
    n = len(h)
    return np.sqrt(n / (n - 1) * ((z - z.mean()) ** 2).sum())


@pytest.mark.parametrize("case", sorted(API["cases"]))
def test_r_api_examples(case):
    """R's own ?rake examples: the default SE is within 0.5% of R's where R's convention for design
    weights is ours (equal weights, apiclus1), and within 0.5% of R's convention otherwise."""
    c = API["cases"][case]
    H = np.column_stack([c["values"][v] for v in ("api00", "enroll")])
    r_est, r_se = np.array([c["r"][v] for v in ("api00", "enroll")]).T
    args = (H, np.array(c["x"]), np.array(c["y"]), c["p_x"], c["p_y"])
    w = np.array(c["w"])
    survey = balanced_mean(*args, sample_weight=w, tol=1e-13, linearization="survey")
    default = balanced_mean(*args, sample_weight=w, tol=1e-13)
    np.testing.assert_allclose(default.estimate, r_est, rtol=1e-9)
    # R residualises with unweighted category means even under unequal design weights (apistrat);
    # reimplemented here, it reproduces R's SE exactly, so that is the whole difference.
    bw = default.weights * len(w)
    r_like = [r_convention_se(H[:, j], np.array(c["x"]), np.array(c["y"]), bw / len(w)) for j in range(2)]
    np.testing.assert_allclose(r_like, r_se, rtol=1e-8)
    if np.ptp(w) == 0:
        # Exact but for R's 10 projection passes, which leave ~5e-8 on the joint-margin cases.
        np.testing.assert_allclose(survey.standard_error, r_se, rtol=1e-6)
        np.testing.assert_allclose(default.standard_error, r_se, rtol=5e-3)
    else:
        np.testing.assert_allclose(survey.standard_error, r_se, rtol=0.015)
        np.testing.assert_allclose(default.standard_error, survey.standard_error, rtol=5e-3)


def r_survey_ready():
    if shutil.which("Rscript") is None:
        return False
    return subprocess.run(["Rscript", "-e", "library(survey)"], capture_output=True).returncode == 0


@pytest.mark.skipif(not r_survey_ready(), reason="R with the survey package is not installed")
def test_live_r_api_examples(tmp_path):
    from .reference.make_api_reference import run_r

    live = run_r(tmp_path)
    for case, c in API["cases"].items():
        for v in ("api00", "enroll"):
            np.testing.assert_allclose(live[case][v], c["r"][v], rtol=1e-10)


# -- independent computations ----------------------------------------------------------------------


def sample_problem(seed, n=300, m=3, l=4):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, m, n)
    # y depends on x, but every cell has a fair chance of being sampled (a feasible pattern)
    y = np.where(rng.random(n) < 0.5, (x + rng.integers(0, 2, n)) % l, rng.integers(0, l, n))
    h = x - 0.5 * y + 0.3 * x * y + rng.normal(size=n)
    p_x = rng.dirichlet(np.full(m, 5.0))
    p_y = rng.dirichlet(np.full(l, 5.0))
    return h, x, y, p_x, p_y


def brute_force_influence(h, x, y, est, k, start, d):
    """R survey's residual C_1 ... C_k (h - est) at each sample, with groupby means of the
    design-weighted starting sample, on n-vectors."""
    g = h - est
    for j in range(k, 0, -1):
        codes = x if (j % 2 == 1) == (start == "x") else y
        num = np.bincount(codes, d * g)
        den = np.bincount(codes, d)
        g = g - (num / np.where(den > 0, den, 1))[codes]
    return g


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 2, 3, 6])
@pytest.mark.parametrize("start", ["x", "y"])
@pytest.mark.parametrize("weighted", [False, True])
def test_k_steps_estimate_and_survey_se_by_brute_force(seed, k, start, weighted):
    h, x, y, p_x, p_y = sample_problem(seed)
    n = len(h)
    d = np.random.default_rng(seed + 100).uniform(0.5, 2, n) if weighted else np.ones(n)
    est = balanced_mean(h, x, y, p_x, p_y, steps=k, start=start, sample_weight=d if weighted else None,
                        linearization="survey")
    # Estimate: the k-step table's weights spread evenly over each cell's (weighted) samples.
    T = np.zeros((3, 4))
    np.add.at(T, (x, y), d)
    Tk = balance_table(T, p_x, p_y, steps=k, start=start).table
    with np.errstate(invalid="ignore"):  # empty cells are 0 / 0 but hold no sample
        w = d * (Tk / T)[x, y]
    w /= w.sum()
    np.testing.assert_allclose(est.weights, w, rtol=1e-12)
    np.testing.assert_allclose(est.estimate, w @ h, rtol=1e-12)
    psi = brute_force_influence(h, x, y, est.estimate, k, start, d / d.sum())
    z = w * psi
    se = np.sqrt(n / (n - 1) * ((z - z.mean()) ** 2).sum())
    np.testing.assert_allclose(est.standard_error, se, rtol=1e-10)
    assert est.steps == k


def k_step_estimate(d, h, x, y, p_x, p_y, k, start):
    """The k-step (k=None: converged) estimate from per-sample weights, balanced sample by sample."""
    w = d / d.sum()
    p_x, p_y = p_x / p_x.sum(), p_y / p_y.sum()
    j = 0
    while j < (k if k is not None else 10**4):
        j += 1
        codes, target = (x, p_x) if (j % 2 == 1) == (start == "x") else (y, p_y)
        mass = np.bincount(codes, w, minlength=len(target))
        w = w * (target / np.where(mass > 0, mass, 1))[codes]
        if k is None and j % 2 == 0:
            error = max(np.abs(np.bincount(c, w, minlength=len(t)) - t).max() for c, t in ((x, p_x), (y, p_y)))
            if error < 1e-15:
                break
    return w @ h / w.sum()


def gateaux_influence(d, h, x, y, p_x, p_y, k, start, eps=1e-6):
    """The influence function as the Gateaux derivative: the derivative of the estimate as sample
    i's share of the normalised weights grows, (1 - e) d~ + e delta_i, by central differences."""
    dn = d / d.sum()
    out = np.empty(len(h))
    for i in range(len(h)):
        bump = -dn.copy()
        bump[i] += 1
        plus = k_step_estimate(dn + eps * bump, h, x, y, p_x, p_y, k, start)
        minus = k_step_estimate(dn - eps * bump, h, x, y, p_x, p_y, k, start)
        out[i] = (plus - minus) / (2 * eps)
    return out


@pytest.mark.parametrize("k", [1, 2, 5, None])
@pytest.mark.parametrize("start", ["x", "y"])
@pytest.mark.parametrize("weighted", [False, True])
def test_balanced_influence_is_the_gateaux_derivative(k, start, weighted):
    h, x, y, _, p_y = sample_problem(3, n=60)
    p_x = np.array([0.6, 0.3, 0.1])  # far from the sample's X marginal (~1/3 each)
    n = len(h)
    d = np.random.default_rng(5).uniform(0.5, 2, n) if weighted else np.ones(n)
    order = {"x": p_x, "y": p_y} if start == "x" else {"y": p_y, "x": p_x}
    fitted = BalancedEstimator(order, steps=k, tol=1e-14).fit({"x": x, "y": y}, d if weighted else None)
    est = fitted.mean(h)
    dn = d / d.sum()
    psi = fitted._contributions((h - est.estimate)[:, None])[:, 0] / dn
    ref = gateaux_influence(d, h, x, y, p_x, p_y, k, start)
    np.testing.assert_allclose(psi, ref, atol=1e-7 * np.abs(ref).max())
    z = dn * ref
    np.testing.assert_allclose(est.standard_error, np.sqrt(n / (n - 1) * ((z - z.mean()) ** 2).sum()), rtol=1e-6)


@pytest.mark.parametrize("k", [2, None])
def test_balanced_influence_with_a_zero_target(k):
    """A zero target empties a row of every later iterate: its samples get weight and influence 0."""
    h, x, y, _, p_y = sample_problem(3, n=60)
    p_x = np.array([0.6, 0.4, 0.0])
    fitted = BalancedEstimator({"x": p_x, "y": p_y}, steps=k, tol=1e-14).fit({"x": x, "y": y})
    est = fitted.mean(h)
    psi = fitted._contributions((h - est.estimate)[:, None])[:, 0] * len(h)
    ref = gateaux_influence(np.ones(len(h)), h, x, y, p_x, p_y, k, "x")
    np.testing.assert_allclose(psi, ref, atol=1e-7 * np.abs(ref).max())
    assert np.all(psi[x == 2] == 0)


def test_converged_balanced_se_is_the_limit_of_k_step_ses():
    h, x, y, p_x, p_y = sample_problem(0)
    conv = balanced_mean(h, x, y, p_x, p_y, tol=1e-14)
    far = balanced_mean(h, x, y, p_x, p_y, steps=400)
    np.testing.assert_allclose(far.estimate, conv.estimate, rtol=1e-12)
    np.testing.assert_allclose(far.standard_error, conv.standard_error, rtol=1e-9)


@pytest.mark.parametrize("k", [0, 1])
def test_conventions_agree_without_a_second_margin(k):
    """k = 0 is the plain mean and k = 1 post-stratification: both linearisations are the same."""
    h, x, y, p_x, p_y = sample_problem(1)
    d = np.random.default_rng(0).uniform(0.5, 2, len(h))
    a = balanced_mean(h, x, y, p_x, p_y, steps=k, sample_weight=d)
    b = balanced_mean(h, x, y, p_x, p_y, steps=k, sample_weight=d, linearization="survey")
    np.testing.assert_allclose(a.standard_error, b.standard_error, rtol=1e-12)


def test_converged_survey_se_is_the_limit_of_k_step_ses():
    h, x, y, p_x, p_y = sample_problem(0)
    conv = balanced_mean(h, x, y, p_x, p_y, tol=1e-13, linearization="survey")
    n = len(h)
    psi = brute_force_influence(h, x, y, conv.estimate, 400, "x", np.full(n, 1 / n))
    z = conv.weights * psi
    np.testing.assert_allclose(conv.standard_error, np.sqrt(n / (n - 1) * ((z - z.mean()) ** 2).sum()), rtol=1e-8)


def test_k0_is_the_sample_mean_with_its_usual_se():
    h, x, y, p_x, p_y = sample_problem(1)
    est = balanced_mean(h, x, y, p_x, p_y, steps=0)
    np.testing.assert_allclose(est.estimate, h.mean(), rtol=1e-14)
    np.testing.assert_allclose(est.standard_error, h.std(ddof=1) / np.sqrt(len(h)), rtol=1e-12)
    np.testing.assert_allclose(est.effective_sample_size, len(h))
    d = np.random.default_rng(0).uniform(0.5, 2, len(h))
    wtd = balanced_mean(h, x, y, p_x, p_y, steps=0, sample_weight=d)
    np.testing.assert_allclose(wtd.estimate, np.average(h, weights=d), rtol=1e-14)


@given(st.floats(-1e3, 1e3), st.sampled_from([0, 1, 2, None]))
def test_estimating_a_constant_returns_it(c, k):
    h, x, y, p_x, p_y = sample_problem(2)
    est = balanced_mean(np.full(len(h), c), x, y, p_x, p_y, steps=k)
    np.testing.assert_allclose(est.estimate, c, rtol=1e-12, atol=1e-12)
    assert est.standard_error < 1e-9 * (1 + abs(c))


def test_several_statistics_at_once_and_fit_once():
    h, x, y, p_x, p_y = sample_problem(3)
    H = np.column_stack([h, h**2, np.cos(h)])
    joint = balanced_mean(H, x, y, p_x, p_y, steps=3)
    fitted = BalancedEstimator({"x": p_x, "y": p_y}, steps=3).fit({"x": x, "y": y})
    for j in range(3):
        one = balanced_mean(H[:, j], x, y, p_x, p_y, steps=3)
        np.testing.assert_allclose(joint.estimate[j], one.estimate, rtol=1e-13)
        np.testing.assert_allclose(joint.standard_error[j], one.standard_error, rtol=1e-12)
        again = fitted.mean(H[:, j])
        np.testing.assert_allclose(again.estimate, one.estimate, rtol=1e-13)
        np.testing.assert_allclose(again.standard_error, one.standard_error, rtol=1e-12)


def test_interval_and_effective_sample_size():
    h, x, y, p_x, p_y = sample_problem(4)
    est = balanced_mean(h, x, y, p_x, p_y)
    lo, hi = est.confidence_interval(0.95)
    np.testing.assert_allclose([lo, hi], est.estimate + np.array([-1, 1]) * 1.959963984540054 * est.standard_error)
    lo90, hi90 = est.confidence_interval(0.9)
    assert lo < lo90 < hi90 < hi
    np.testing.assert_allclose(est.weights.sum(), 1.0)
    np.testing.assert_allclose(est.effective_sample_size, 1 / (est.weights**2).sum())
    assert est.effective_sample_size < len(h)


def test_labels_mappings_and_pandas():
    h, x, y, p_x, p_y = sample_problem(5)
    codes = balanced_mean(h, x, y, p_x, p_y, steps=2)
    names_x = np.array(["lo", "mid", "hi"])[x]
    names_y = np.array(["a", "b", "c", "d"])[y]
    tx = {"hi": p_x[2], "lo": p_x[0], "mid": p_x[1]}  # mapping order need not match code order
    ty = dict(zip("abcd", p_y, strict=True))
    labels = balanced_mean(h, names_x, names_y, tx, ty, steps=2)
    np.testing.assert_allclose(labels.estimate, codes.estimate, rtol=1e-13)
    np.testing.assert_allclose(labels.standard_error, codes.standard_error, rtol=1e-12)
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"h": h, "x": pd.Categorical(names_x), "y": names_y})
    viapd = balanced_mean(frame["h"], frame["x"], frame["y"], pd.Series(tx), pd.Series(ty), steps=2)
    np.testing.assert_allclose(viapd.estimate, codes.estimate, rtol=1e-13)


def test_totals_need_only_agree():
    h, x, y, p_x, p_y = sample_problem(6)
    a = balanced_mean(h, x, y, p_x, p_y)
    b = balanced_mean(h, x, y, 1000 * p_x, 1000 * p_y)
    np.testing.assert_allclose(a.estimate, b.estimate, rtol=1e-12)


def test_zero_target_category_gets_zero_weight():
    h, x, y, p_x, p_y = sample_problem(7)
    p_x = np.array([0.5, 0.5, 0.0])
    est = balanced_mean(h, x, y, p_x, p_y)
    assert np.all(est.weights[x == 2] == 0)
    np.testing.assert_allclose(est.estimate, est.weights @ h)


def test_empty_category_policy_drop():
    h, x, y, p_x, p_y = sample_problem(8)
    keep = x != 1
    with pytest.raises(ValueError, match=r"No sample has `x` = 1, but `p_x` gives it mass .* empty='drop'"):
        balanced_mean(h[keep], x[keep], y[keep], p_x, p_y)
    est = balanced_mean(h[keep], x[keep], y[keep], p_x, p_y, empty="drop")
    scaled = np.array([p_x[0], 0.0, p_x[2]]) / (1 - p_x[1])
    ref = balanced_mean(h[keep], x[keep], y[keep], scaled, p_y)
    np.testing.assert_allclose(est.estimate, ref.estimate, rtol=1e-12)


def test_inputs_are_not_mutated():
    h, x, y, p_x, p_y = sample_problem(9)
    d = np.ones(len(h))
    copies = [a.copy() for a in (h, x, y, p_x, p_y, d)]
    balanced_mean(h, x, y, p_x, p_y, sample_weight=d)
    for a, b in zip((h, x, y, p_x, p_y, d), copies, strict=True):
        np.testing.assert_array_equal(a, b)


# -- calibration (the full study is benchmarks/coverage_study.py) ---------------------------------

P_COV = np.array([[0.10, 0.06, 0.05, 0.04], [0.05, 0.12, 0.08, 0.05], [0.04, 0.06, 0.15, 0.20]])
H_COV = np.array([[1.0, 0.0, 2.0, 1.0], [0.0, 3.0, 1.0, 2.0], [2.0, 1.0, 0.0, 4.0]])


def test_intervals_cover_at_the_nominal_rate():
    rng = np.random.default_rng(31)
    n, reps = 500, 400
    p, q = P_COV.sum(1), P_COV.sum(0)
    truth = (P_COV * H_COV).sum()
    cells = np.arange(12)
    hits = {k: 0 for k in (0, 1, 2, None)}
    for _ in range(reps):
        c = rng.choice(cells, n, p=P_COV.ravel())
        x, y = c // 4, c % 4
        h = H_COV[x, y] + rng.normal(size=n)
        for k in hits:
            lo, hi = balanced_mean(h, x, y, p, q, steps=k).confidence_interval(0.95)
            hits[k] += lo <= truth <= hi
    tol = 3 * np.sqrt(0.95 * 0.05 / reps)  # three binomial standard errors
    for k, hit in hits.items():
        assert abs(hit / reps - 0.95) < tol, (k, hit / reps)


TABLE_A = np.array([[0.10, 0.05, 0.05], [0.05, 0.20, 0.05], [0.05, 0.05, 0.40]])
H_A = np.array([[1.0, 0.0, 2.0], [0.0, 3.0, 1.0], [2.0, 1.0, 0.0]])


def se_over_sd(estimates, ses):
    """mean reported SE / Monte Carlo SD of the estimates, and the Monte Carlo standard error of
    that ratio: the SD's relative error is sqrt((kurtosis - 1) / (4 R)), the mean SE's its own."""
    e, s = np.asarray(estimates), np.asarray(ses)
    reps = len(e)
    sd = e.std(ddof=1)
    c = e - e.mean()
    kurtosis = (c**4).mean() / (c**2).mean() ** 2
    ratio = s.mean() / sd
    rel = np.sqrt((kurtosis - 1) / (4 * reps) + s.var(ddof=1) / (reps * s.mean() ** 2))
    return ratio, ratio * rel


@pytest.mark.parametrize("targets", ["misspecified", "well-specified"])
def test_standard_errors_match_monte_carlo(targets):
    """Table A sampled, balanced towards its own marginals or towards p_X = (.6, .3, .1),
    p_Y = (.1, .3, .6): the mean reported SE is the Monte Carlo SD within 3 Monte Carlo SEs, for
    k = 1, 2, 5 and converged. R's convention is twice too large when the targets are wrong."""
    if targets == "misspecified":
        p_x, p_y = np.array([0.6, 0.3, 0.1]), np.array([0.1, 0.3, 0.6])
    else:
        p_x, p_y = TABLE_A.sum(1), TABLE_A.sum(0)
    rng = np.random.default_rng(8)
    n, reps = 1000, 250
    steps = (1, 2, 5, None)
    est, se = {k: [] for k in steps}, {k: [] for k in steps}
    survey_se = []
    for _ in range(reps):
        c = rng.choice(9, n, p=TABLE_A.ravel())
        x, y = c // 3, c % 3
        h = H_A[x, y]
        for k in steps:
            e = balanced_mean(h, x, y, p_x, p_y, steps=k)
            est[k].append(e.estimate)
            se[k].append(e.standard_error)
        survey_se.append(balanced_mean(h, x, y, p_x, p_y, linearization="survey").standard_error)
    for k in steps:
        ratio, mc_se = se_over_sd(est[k], se[k])
        assert abs(ratio - 1) < 3 * mc_se, (k, ratio, mc_se)
    survey_ratio, mc_se = se_over_sd(est[None], survey_se)
    if targets == "misspecified":
        assert survey_ratio > 1.5, survey_ratio  # about 2.1
    else:
        assert abs(survey_ratio - 1) < 3 * mc_se, survey_ratio


# -- errors ----------------------------------------------------------------------------------------

H, X, Y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])
PX = PY = [0.5, 0.5]


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"values": H[:3]}, ValueError, r"`x` has 4 entries but `values` has 3 samples"),
        ({"y": Y[:3]}, ValueError, r"`y` has 3 entries but `values` has 4 samples"),
        ({"values": np.array([1.0, np.nan, 3, 4])}, ValueError, r"`values` contains NaN or inf, first at sample 1"),
        ({"sample_weight": [1.0, 1.0, -1.0, 1.0]}, ValueError, r"`sample_weight` must be nonnegative; sample 2"),
        ({"sample_weight": [1.0, np.inf, 1.0, 1.0]}, ValueError,
         r"`sample_weight` contains NaN or inf, first at sample 1"),
        ({"sample_weight": [1.0, 1.0]}, ValueError, r"`sample_weight` has 2 entries but `values` has 4"),
        ({"x": np.array(["a", "a", "b", "c"]), "p_x": {"a": 0.5, "b": 0.5}}, ValueError,
         r"`x` has the label 'c', which `p_x` does not list"),
        ({"x": np.array(["a", "a", "b", "b"])}, TypeError, r"`x` holds labels of dtype <U1, but `p_x` is an array"),
        ({"x": np.array([0, 0, 1, 2])}, ValueError, r"`x` has code 2 at sample 3, outside 0..1"),
        ({"p_x": [0.3, 0.3, 0.4]}, ValueError, r"No sample has `x` = 2, but `p_x` gives it mass 0.4"),
        ({"p_y": [0.5, 0.6]}, ValueError, r"totals of `p_x` \(1.0\) and `p_y` \(1.1\) differ"),
        ({"steps": -2}, ValueError, r"`steps` must be >= 0"),
        ({"empty": "ignore"}, ValueError, r"`empty` must be 'error' or 'drop'"),
        ({"values": np.array(["a", "b", "c", "d"])}, TypeError, r"`values` must hold real numbers"),
        ({"sample_weight": ["1", "1", "2", "1"]}, TypeError, r"`sample_weight` must hold real numbers; got dtype <U1"),
        ({"x": np.array(["a", "a", "b", "b"]), "p_x": {"a": "0.5", "b": 0.5}}, TypeError,
         r"`p_x` maps 'a' to '0.5', which is not a real number"),
        ({"x": np.array(["a", "a", "b", "b"]), "p_x": {"a": np.nan, "b": 0.5}}, ValueError,
         r"`p_x` maps 'a' to nan; target masses must be finite and >= 0"),
        ({"p_y": ["0.5", "0.5"]}, TypeError, r"`p_y` must hold real numbers; got dtype <U3"),
        ({"x": np.array(["a", None, "b", "b"], dtype=object), "p_x": {"a": 0.5, "b": 0.5}}, ValueError,
         r"`x` has a missing label \(None\) at sample 1\. Every sample needs a category: drop .* `p_x`"),
        ({"x": np.array([0, np.nan, 1, 1])}, ValueError, r"`x` has a missing label \(nan\) at sample 1"),
        ({"y": np.array([0.0, 1.0, 0.0, np.nan]), "p_y": {0.0: 0.5, 1.0: 0.5}}, ValueError,
         r"`y` has a missing label \(nan\) at sample 3"),
        ({"x": np.column_stack([X, X])}, ValueError,
         r"`x` must have shape \(n,\), one entry per sample; got shape \(4, 2\)\. Pass a 1-D array"),
        ({"y": np.column_stack([Y, Y])}, ValueError, r"`y` must have shape \(n,\), one entry per sample"),
        ({"linearization": "robust"}, ValueError,
         r"`linearization` must be 'balanced' .* or 'survey' .*; got 'robust'"),
    ],
)
def test_errors(kwargs, exc, match):
    args = {"values": H, "x": X, "y": Y, "p_x": PX, "p_y": PY}
    args.update(kwargs)
    values, x, y, p_x, p_y = (args.pop(k) for k in ("values", "x", "y", "p_x", "p_y"))
    with pytest.raises(exc, match=match):
        balanced_mean(values, x, y, p_x, p_y, **args)


def test_mean_before_fit_and_wrong_length():
    with pytest.raises(RuntimeError, match=r"Call fit"):
        BalancedEstimator({"x": PX, "y": PY}).mean(H)
    with pytest.raises(ValueError, match=r"`values` has 3 entries but 4 samples were fitted"):
        BalancedEstimator({"x": PX, "y": PY}).fit({"x": X, "y": Y}).mean(H[:3])
    with pytest.raises(ValueError, match=r"`level` must be a number strictly between 0 and 1"):
        balanced_mean(H, X, Y, PX, PY).confidence_interval(95)


def test_missing_labels_in_pandas_categoricals():
    pd = pytest.importorskip("pandas")
    x = pd.Series(pd.Categorical(["a", "a", None, "b"]))
    with pytest.raises(ValueError, match=r"`x` has a missing label \(nan\) at sample 2"):
        balanced_mean(H, x, Y, {"a": 0.5, "b": 0.5}, PY)
    with pytest.raises(ValueError, match=r"`y` has a missing label \(<NA>\) at sample 0"):
        balanced_mean(H, X, pd.Series([pd.NA, 1, 0, 1], dtype=object), PX, {0: 0.5, 1: 0.5})


def test_labels_of_mixed_types_are_looked_up_without_sorting():
    h, x, y, p_x, p_y = sample_problem(5)
    names = np.array([1, "one", (2, "b")], dtype=object)[x]
    labels = balanced_mean(h, names, y, {1: p_x[0], "one": p_x[1], (2, "b"): p_x[2]}, p_y, steps=3)
    codes = balanced_mean(h, x, y, p_x, p_y, steps=3)
    np.testing.assert_allclose(labels.estimate, codes.estimate, rtol=1e-13)
    np.testing.assert_allclose(labels.standard_error, codes.standard_error, rtol=1e-12)


@pytest.mark.parametrize("k", [2, None])
@pytest.mark.parametrize("linearization", ["balanced", "survey"])
def test_huge_values_scale_exactly_and_never_give_nan(k, linearization):
    h, x, y, p_x, p_y = sample_problem(2)
    base = balanced_mean(h, x, y, p_x, p_y, steps=k, linearization=linearization)
    big = balanced_mean(h * 1e200, x, y, p_x, p_y, steps=k, linearization=linearization)
    np.testing.assert_allclose(big.estimate, base.estimate * 1e200, rtol=1e-12)
    np.testing.assert_allclose(big.standard_error, base.standard_error * 1e200, rtol=1e-10)
    tiny = balanced_mean(h * 1e-200, x, y, p_x, p_y, steps=k, linearization=linearization)
    np.testing.assert_allclose(tiny.standard_error, base.standard_error * 1e-200, rtol=1e-10)
    extreme = np.where(h > np.median(h), 1.7e308, -1.7e308)
    res = balanced_mean(extreme, x, y, p_x, p_y, steps=k, linearization=linearization)
    assert np.isfinite(res.estimate)
    assert res.standard_error > 0 and not np.isnan(res.standard_error)


@pytest.mark.parametrize("k", [3, None])
@pytest.mark.parametrize("linearization", ["balanced", "survey"])
def test_sparse_cell_table_gives_the_dense_answer(monkeypatch, k, linearization):
    import databalance.estimators as estimators

    h, x, y, p_x, p_y = sample_problem(6)
    d = np.random.default_rng(1).uniform(0.5, 2, len(h))
    dense = balanced_mean(h, x, y, p_x, p_y, steps=k, sample_weight=d, linearization=linearization)
    monkeypatch.setattr(estimators, "DENSE_CELLS", 0)
    sparse = balanced_mean(h, x, y, p_x, p_y, steps=k, sample_weight=d, linearization=linearization)
    assert [f.shape for f in sparse.balance.factors] == [(3,), (4,)]
    np.testing.assert_allclose(sparse.estimate, dense.estimate, rtol=1e-12)
    np.testing.assert_allclose(sparse.standard_error, dense.standard_error, rtol=1e-9)


# -- many margins ----------------------------------------------------------------------------------


def three_margin_problem(seed, n=80):
    """Columns a (3 levels), b (2), c (2), d (3); margins a, b and the joint (c, d); the targets
    differ from the sample's margins. Every (c, d) pair and every level is sampled."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 3, n)
    b = (a + rng.integers(0, 2, n)) % 2
    c = np.where(rng.random(n) < 0.6, b, rng.integers(0, 2, n))
    d = rng.integers(0, 3, n)
    c[:6], d[:6] = [0, 0, 0, 1, 1, 1], [0, 1, 2, 0, 1, 2]
    h = a - 0.7 * b + 0.5 * c * d + rng.normal(size=n)
    margins = {"a": np.array([0.5, 0.3, 0.2]), "b": np.array([0.45, 0.55]),
               ("c", "d"): np.array([[0.1, 0.2, 0.15], [0.25, 0.1, 0.2]])}
    return h, {"a": a, "b": b, "c": c, "d": d}, margins


def margin_codes(data):
    return [data["a"], data["b"], data["c"] * 3 + data["d"]]


def k_step_weights(d, codes, targets, k, tol=1e-15):
    """Per-sample weights after k half-steps (None: to convergence), margin after margin, by
    groupby sums on n-vectors: the definition, independent of the cell machinery."""
    w = d / d.sum()
    targets = [t.ravel() / t.sum() for t in targets]
    K, j = len(codes), 0
    while j < (k if k is not None else 10**5):
        m = j % K
        j += 1
        mass = np.bincount(codes[m], w, minlength=len(targets[m]))
        w = w * (targets[m] / np.where(mass > 0, mass, 1))[codes[m]]
        if k is None and j % K == 0:
            error = max(np.abs(np.bincount(c, w, minlength=len(t)) - t).sum()
                        for c, t in zip(codes, targets, strict=True))
            if error < tol:
                break
    return w / w.sum()


def gateaux_k(d, h, codes, targets, k, eps=1e-6):
    dn = d / d.sum()
    out = np.empty(len(h))
    for i in range(len(h)):
        bump = -dn.copy()
        bump[i] += 1
        plus = k_step_weights(dn + eps * bump, codes, targets, k) @ h
        minus = k_step_weights(dn - eps * bump, codes, targets, k) @ h
        out[i] = (plus - minus) / (2 * eps)
    return out


@pytest.mark.parametrize("k", [1, 2, 3, 5, None])
@pytest.mark.parametrize("weighted", [False, True])
def test_many_margins_estimate_and_balanced_influence_by_brute_force(k, weighted):
    h, data, margins = three_margin_problem(0)
    n = len(h)
    d = np.random.default_rng(1).uniform(0.5, 2, n) if weighted else np.ones(n)
    fitted = BalancedEstimator(margins, steps=k, tol=1e-14).fit(data, d if weighted else None)
    est = fitted.mean(h)
    codes, targets = margin_codes(data), list(margins.values())
    w = k_step_weights(d, codes, targets, k)
    np.testing.assert_allclose(fitted.weights_, w, rtol=1e-9)
    np.testing.assert_allclose(est.estimate, w @ h, rtol=1e-12)
    dn = d / d.sum()
    psi = fitted._contributions((h - est.estimate)[:, None])[:, 0] / dn
    ref = gateaux_k(d, h, codes, targets, k)
    np.testing.assert_allclose(psi, ref, atol=2e-7 * np.abs(ref).max())
    z = dn * ref
    np.testing.assert_allclose(est.standard_error, np.sqrt(n / (n - 1) * ((z - z.mean()) ** 2).sum()), rtol=1e-6)


def survey_residual(h, codes, est, k, dn):
    """C_1 ... C_k (h - est) with groupby means of the design-weighted starting sample; k = None:
    alternating projections until they stop moving (the least-squares residual)."""
    g = h - est
    K = len(codes)
    steps = k if k is not None else 4000 * K
    for j in range(steps, 0, -1):
        c = codes[(j - 1) % K]
        g = g - (np.bincount(c, dn * g) / np.maximum(np.bincount(c, dn), 1e-300))[c]
    return g


@pytest.mark.parametrize("k", [1, 2, 3, 5, None])
@pytest.mark.parametrize("weighted", [False, True])
def test_many_margins_survey_se_by_brute_force(k, weighted):
    h, data, margins = three_margin_problem(2)
    n = len(h)
    d = np.random.default_rng(3).uniform(0.5, 2, n) if weighted else np.ones(n)
    est = BalancedEstimator(margins, steps=k, tol=1e-14, linearization="survey").fit(
        data, d if weighted else None).mean(h)
    psi = survey_residual(h, margin_codes(data), est.estimate, k, d / d.sum())
    z = est.weights * psi
    np.testing.assert_allclose(est.standard_error, np.sqrt(n / (n - 1) * ((z - z.mean()) ** 2).sum()), rtol=1e-8)


def test_converged_many_margins_se_is_the_limit_of_k_step_ses():
    h, data, margins = three_margin_problem(4, n=300)
    conv = BalancedEstimator(margins, tol=1e-14).fit(data).mean(h)
    far = BalancedEstimator(margins, steps=600).fit(data).mean(h)
    np.testing.assert_allclose(far.estimate, conv.estimate, rtol=1e-12)
    np.testing.assert_allclose(far.standard_error, conv.standard_error, rtol=1e-8)


def test_two_margins_equal_balanced_mean_and_joint_margin_forms_agree():
    h, x, y, p_x, p_y = sample_problem(0)
    a = balanced_mean(h, x, y, p_x, p_y, steps=3)
    b = BalancedEstimator({"x": p_x, "y": p_y}, steps=3).fit({"x": x, "y": y}).mean(h)
    np.testing.assert_allclose([a.estimate, a.standard_error], [b.estimate, b.standard_error], rtol=1e-14)
    # A joint margin given as an N-d array, as a dict with tuple keys and as a MultiIndex Series.
    h, data, margins = three_margin_problem(5, n=200)
    ref = BalancedEstimator(margins).fit(data).mean(h)
    cd = margins[("c", "d")]
    as_dict = dict(margins)
    as_dict[("c", "d")] = {(i, j): cd[i, j] for j in (2, 0, 1) for i in (1, 0)}  # any order
    got = BalancedEstimator(as_dict).fit(data).mean(h)
    np.testing.assert_allclose([got.estimate, got.standard_error], [ref.estimate, ref.standard_error], rtol=1e-10)
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({k: np.array(["u", "v", "w"])[v] if k == "a" else v for k, v in data.items()})
    series = {"a": pd.Series(margins["a"], index=["u", "v", "w"]), "b": pd.Series(margins["b"]),
              ("c", "d"): pd.Series(cd.ravel(), index=pd.MultiIndex.from_product([[0, 1], [0, 1, 2]]))}
    viapd = BalancedEstimator(series).fit(frame).mean(frame.assign(h=h)["h"])
    np.testing.assert_allclose([viapd.estimate, viapd.standard_error], [ref.estimate, ref.standard_error],
                               rtol=1e-10)


def test_overlapping_consistent_margins_and_a_column_in_two_margins():
    h, data, margins = three_margin_problem(6, n=300)
    cd = margins[("c", "d")]
    over = {"a": margins["a"], ("c", "d"): cd, "c": cd.sum(1)}  # c appears twice, consistently
    fitted = BalancedEstimator(over, tol=1e-13).fit(data)
    assert fitted.balance_.converged
    w = k_step_weights(np.ones(300), [data["a"], data["c"] * 3 + data["d"], data["c"]], list(over.values()), None)
    np.testing.assert_allclose(fitted.weights_, w, rtol=1e-8)


def test_cells_are_the_occupied_combinations_only():
    rng = np.random.default_rng(0)
    n = 2000
    data = {f"v{i}": rng.integers(0, 50, n) for i in range(8)}  # 50^8 possible cells
    margins = {f"v{i}": np.full(50, 1 / 50) for i in range(8)}
    fitted = BalancedEstimator(margins, steps=3).fit(data)
    assert len(fitted._cells.mass) == n  # every sample its own cell, never 50^8
    w = k_step_weights(np.ones(n), list(data.values()), list(margins.values()), 3)
    np.testing.assert_allclose(fitted.weights_, w, rtol=1e-10)


# -- trimming and diagnostics ----------------------------------------------------------------------


def bounds_feasible(data, margins, low, high):
    """Whether some weights within [low, high] x mean meet every margin: a linear program."""
    from scipy.optimize import linprog

    codes = margin_codes(data)
    n = len(codes[0])
    rows, rhs = [], []
    for c, t in zip(codes, margins.values(), strict=True):
        t = t.ravel() / t.sum() * n
        rows += [(c == k).astype(float) for k in range(len(t))]
        rhs += list(t)
    return linprog(np.zeros(n), A_eq=np.array(rows), b_eq=rhs, bounds=(low, high), method="highs").status == 0


def test_bounds_met_with_margins_when_feasible():
    h, data, margins = three_margin_problem(7, n=400)
    free = BalancedEstimator(margins, tol=1e-12).fit(data).diagnostics_
    low, high = 0.9 * free.min_weight, 0.9 * free.max_weight
    assert bounds_feasible(data, margins, low, high)
    bounded = BalancedEstimator(margins, tol=1e-12, bounds=(low, high)).fit(data)
    diag = bounded.diagnostics_
    assert diag.bounds_met and bounded.balance_.converged
    assert diag.max_weight <= high * (1 + 1e-8) and diag.min_weight >= low * (1 - 1e-8)
    assert max(m.error for m in diag.margins) <= 1e-11
    assert "bounds met" in repr(bounded)
    # The standard error treats the bounded weights as design weights.
    same = BalancedEstimator(margins, tol=1e-12).fit(data, bounded.weights_).mean(h)
    np.testing.assert_allclose(bounded.mean(h).standard_error, same.standard_error, rtol=1e-8)


def test_bounds_that_cannot_hold_are_reported():
    h, data, margins = three_margin_problem(7, n=400)
    assert not bounds_feasible(data, margins, 0.5, 2.0)
    with pytest.warns(ConvergenceWarning, match=r"cannot both hold \(not after \d+ sweeps of raking with the weights "
                      r"clipped to the bounds\): the bounded weights still miss a margin by"):
        fitted = BalancedEstimator(margins, bounds=(0.5, 2.0)).fit(data)
    assert fitted.diagnostics_.bounds_met is False
    assert max(m.error for m in fitted.diagnostics_.margins) <= 1e-9  # the margins hold; the bounds not
    assert "bounds NOT met" in repr(fitted)


def test_no_bounds_is_unchanged_and_diagnostics():
    h, data, margins = three_margin_problem(8, n=300)
    fitted = BalancedEstimator(margins).fit(data)
    again = BalancedEstimator(margins, bounds=None).fit(data)
    np.testing.assert_array_equal(fitted.weights_, again.weights_)
    diag, w = fitted.diagnostics_, fitted.weights_
    assert diag.bounds_met is None
    np.testing.assert_allclose(diag.design_effect, len(w) * (w**2).sum())
    np.testing.assert_allclose(diag.effective_sample_size, 1 / (w**2).sum())
    np.testing.assert_allclose([diag.min_weight, diag.max_weight], [w.min() * len(w), w.max() * len(w)])
    joint = diag.margins[2]
    assert joint.key == ("c", "d") and joint.categories == ([0, 1], [0, 1, 2])
    achieved = np.zeros((2, 3))
    np.add.at(achieved, (data["c"], data["d"]), w)
    np.testing.assert_allclose(joint.achieved, achieved, atol=1e-12)
    np.testing.assert_allclose(joint.target, margins[("c", "d")])
    assert repr(fitted).startswith("BalancedEstimator(margins=['a', 'b', ('c', 'd')]): converged after ")
    assert "\n" not in repr(fitted)
    assert repr(BalancedEstimator(margins)).endswith("not fitted")


# -- many-margin errors ----------------------------------------------------------------------------


def many_margin_error_cases():
    _, data, margins = three_margin_problem(0, n=40)
    labelled = dict(data, a=np.array(["u", "v", "w"])[data["a"]])
    cd = margins[("c", "d")]
    as_dict = {(i, j): cd[i, j] for i in range(2) for j in range(3)}
    return [
        ({"margins": {**margins, "z": [0.5, 0.5]}}, ValueError, r"names the column 'z', which `data` lacks"),
        ({"margins": {**margins, ("c", "d"): cd[:, :2]}}, ValueError,
         r"`d` has code 2 at sample \d+, outside 0..1"),
        ({"margins": {**margins, ("c", "d"): cd.ravel()}}, ValueError,
         r"`margins\[\('c', 'd'\)\]` must be 2-D, one axis per column of the margin; got shape \(6,\)"),
        ({"margins": {**margins, "d": [0.3, 0.3, 0.2, 0.2]}}, ValueError,
         r"`margins\[\('c', 'd'\)\]` has 3 categories of 'd' but `margins\['d'\]` has 4"),
        ({"margins": {**margins, "a": {"u": 0.5, "v": 0.5}}, "data": labelled}, ValueError,
         r"`a` has the label 'w', which `margins\['a'\]` does not list"),
        ({"margins": {**margins, ("c", "d"): {k: v for k, v in as_dict.items() if k != (1, 2)}}}, ValueError,
         r"Sample \d+ has \(`c`, `d`\) = \(1, 2\), which `margins\[\('c', 'd'\)\]` does not list"),
        ({"margins": {**margins, ("c", "d"): as_dict | {(0, 0): 0.0, (0, 3): 0.1}}},
         ValueError, r"No sample has \(`c`, `d`\) = \(0, 3\), but `margins\[\('c', 'd'\)\]` gives it mass"),
        ({"margins": {**margins, "a": [0.4, 0.3, 0.2, 0.1]}}, ValueError,
         r"No sample has `a` = 3, but `margins\['a'\]` gives it mass 0.1"),
        ({"data": dict(data, a=np.where(np.arange(40) == 5, np.nan, data["a"]))}, ValueError,
         r"`a` has a missing label \(nan\) at sample 5"),
        ({"margins": {**margins, "c": [0.5, 0.5]}}, ValueError,
         r"`margins\[\('c', 'd'\)\]` and `margins\['c'\]` disagree on their common margin"),
        ({"margins": {**margins, "b": [0.5, 0.6]}}, ValueError, r"The totals of .* differ"),
        ({"margins": {**margins, ("c", "d"): {(0, 1, 2): 0.5}}}, ValueError,
         r"has the key \(0, 1, 2\), but a margin of 2 columns needs tuples of 2 labels"),
        ({"margins": {("a", "a"): np.ones((3, 3))}}, ValueError, r"key \('a', 'a'\) repeats a column"),
        ({"margins": {**margins, ("d", "c"): cd.T}}, ValueError, r"for the same columns; give each margin once"),
        ({"margins": {**margins, "c": {0: 0.45, 1: 0.55}}}, TypeError,
         r"The column 'c' is in margins given as mappings and as arrays"),
        ({"margins": [0.5, 0.5]}, TypeError, r"`margins` must be a mapping from a column name"),
        ({"margins": {}}, ValueError, r"`margins` is empty"),
        ({"data": [1, 2, 3]}, TypeError, r"`data` must be a pandas DataFrame or a mapping"),
        ({"data": dict(data, b=data["b"][:30])}, ValueError, r"The columns of `data` have different lengths"),
        ({"bounds": (1.2, 2.0)}, ValueError, r"`bounds` = \(1.2, 2.0\) must satisfy 0 <= low <= 1 <= high"),
        ({"bounds": (0.5, 2.0), "steps": 4}, ValueError, r"`bounds` needs `steps=None`"),
        ({"bounds": "wide"}, TypeError, r"`bounds` must be a pair \(low, high\)"),
    ], data, margins


@pytest.mark.parametrize("case", range(22))
def test_many_margin_errors(case):
    cases, data, margins = many_margin_error_cases()
    kwargs, exc, match = cases[case]
    kwargs = dict(kwargs)
    data = kwargs.pop("data", data)
    margins = kwargs.pop("margins", margins)
    copies = {k: np.array(v, copy=True) for k, v in data.items()} if isinstance(data, dict) else None
    with pytest.raises(exc, match=match):
        BalancedEstimator(margins, **kwargs).fit(data)
    if copies is not None:
        for k, v in copies.items():
            np.testing.assert_array_equal(data[k], v)


def test_empty_drop_with_a_joint_margin():
    h, data, margins = three_margin_problem(9, n=300)
    keep = ~((data["c"] == 1) & (data["d"] == 2))
    sub = {k: v[keep] for k, v in data.items()}
    cd = margins[("c", "d")]
    est = BalancedEstimator(margins, empty="drop").fit(sub)
    reduced = np.where(np.arange(6).reshape(2, 3) == 5, 0.0, cd)
    np.testing.assert_allclose(est.diagnostics_.margins[2].target, reduced / reduced.sum())
    assert est.balance_.converged  # the overlapping one-way margins are not touched by the drop


# -- R survey with three margins, one joint (recorded by tests/reference/make_many_reference.py) ----

MANY = json.loads((pathlib.Path(__file__).parent / "reference" / "many_reference.json").read_text())


def many_margins(targets):
    joint = {tuple(k.split("|")): v for k, v in targets["sch.wide+awards"].items()}
    return {"stype": targets["stype"], "comp.imp": targets["comp.imp"], ("sch.wide", "awards"): joint}


@pytest.mark.parametrize("sample", ["apisrs", "apistrat"])
def test_three_margins_with_a_joint_one_match_r_survey(sample):
    """Estimates equal to 1e-8 at every maxit (steps = 3 maxit); converged SEs within 1% (equal
    design weights, apisrs) and 3% (apistrat: R residualises with unweighted category means)."""
    c = MANY["cases"][sample]
    H = np.column_stack([c["values"][v] for v in ("api00", "api99")])
    margins = many_margins(MANY["targets"])
    for maxit, r in c["r"].items():
        steps = None if maxit == "0" else 3 * int(maxit)
        r_est, r_se = np.array([r[v] for v in ("api00", "api99")]).T
        est = BalancedEstimator(margins, steps=steps, tol=1e-13, linearization="survey").fit(
            c["columns"], np.array(c["w"])).mean(H)
        np.testing.assert_allclose(est.estimate, r_est, rtol=1e-8)
        if steps is None:
            np.testing.assert_allclose(est.standard_error, r_se, rtol=0.01 if sample == "apisrs" else 0.03)
            default = BalancedEstimator(margins, tol=1e-13).fit(c["columns"], np.array(c["w"])).mean(H)
            np.testing.assert_allclose(default.standard_error, r_se, rtol=0.01 if sample == "apisrs" else 0.03)


@pytest.mark.skipif(not r_survey_ready(), reason="R with the survey package is not installed")
def test_live_r_three_margins(tmp_path):
    from .reference.make_many_reference import run_r

    live, _ = run_r(tmp_path)
    for sample, c in MANY["cases"].items():
        for maxit, r in c["r"].items():
            for v in ("api00", "api99"):
                np.testing.assert_allclose(live[sample][maxit][v], r[v], rtol=1e-10)


def test_many_margin_intervals_cover_at_the_nominal_rate():
    """The fast, seeded version of benchmarks/coverage_study.py's three-margin section."""
    import importlib.util

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "coverage_study.py"
    spec = importlib.util.spec_from_file_location("coverage_study", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    reps = 200
    tol = 3 * np.sqrt(0.95 * 0.05 / reps)  # three binomial standard errors
    for k, coverage, *_ in study.many_margins(400, reps, seed=5):
        assert abs(coverage - 0.95) < tol, (k, coverage)


def test_estimation_guide_examples_run():
    import doctest

    pytest.importorskip("pandas")
    guide = pathlib.Path(__file__).parents[1] / "docs" / "guide" / "estimation.rst"
    result = doctest.testfile(str(guide), module_relative=False,
                              optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 10


# -- review regressions ----------------------------------------------------------------------------


def test_pandas_inputs_with_different_indexes_are_refused():
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"x": rng.integers(0, 2, 40), "y": rng.integers(0, 2, 40), "h": rng.normal(size=40)},
                      index=np.arange(100, 140))
    shuffled = df.sample(frac=1, random_state=0)
    with pytest.raises(ValueError, match="`x` has a different pandas index from `values`"):
        balanced_mean(df.h, shuffled.x, shuffled.y, [0.5, 0.5], [0.5, 0.5])
    with pytest.raises(ValueError, match="`sample_weight` has a different pandas index from `data`"):
        BalancedEstimator({"x": [0.5, 0.5], "y": [0.5, 0.5]}).fit(df, sample_weight=shuffled.h.abs() + 1)
    fitted = BalancedEstimator({"x": [0.5, 0.5], "y": [0.5, 0.5]}).fit(df)
    with pytest.raises(ValueError, match="index"):
        fitted.mean({"h": shuffled.h})
    assert balanced_mean(df.h, df.x, df.y, [0.5, 0.5], [0.5, 0.5]).estimate == pytest.approx(fitted.mean(df.h).estimate)


def test_bounds_keep_zero_target_weights_at_zero():
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        fitted = BalancedEstimator({"x": [0.5, 0.5, 0.0], "y": [0.2, 0.3, 0.5]}, bounds=(0.3, 3.0))
        fitted.fit({"x": x, "y": y})
    w = np.asarray(fitted.weights_)
    assert fitted.diagnostics_.bounds_met and np.all(w[x == 2] == 0)
    kept = w[x != 2] / w[x != 2].mean()
    assert kept.min() >= 0.3 * (1 - 1e-9) and kept.max() <= 3.0 * (1 + 1e-9)


def test_bounds_that_never_bind_change_nothing_in_the_summary():
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, 2, 400), rng.integers(0, 3, 400)
    h = x + y + rng.normal(size=400)
    margins = {"x": [0.5, 0.5], "y": [0.2, 0.3, 0.5]}
    plain = BalancedEstimator(margins).fit({"x": x, "y": y}).mean(h).summary()
    bounded = BalancedEstimator(margins, bounds=(0.01, 100.0)).fit({"x": x, "y": y}).mean(h).summary()
    stat_plain, stat_bounded = plain.statistics[0], bounded.statistics[0]
    assert stat_bounded.plain_standard_error == pytest.approx(stat_plain.plain_standard_error, rel=1e-9)
    assert stat_bounded.design_effect == pytest.approx(stat_plain.design_effect, rel=1e-6)


def test_drop_that_breaks_a_shared_margin_is_named():
    rng = np.random.default_rng(3)
    x, y, z = rng.integers(0, 2, 300), rng.integers(0, 3, 300), rng.integers(0, 2, 300)
    keep = ~((x == 1) & (y == 2))
    pxy = np.full((2, 3), 1 / 6)
    with pytest.raises(ValueError, match=r"after empty='drop'.*disagree"):
        BalancedEstimator({("x", "y"): pxy, "y": pxy.sum(0), "z": [0.5, 0.5]}, empty="drop").fit(
            {"x": x[keep], "y": y[keep], "z": z[keep]})


def test_weights_are_read_only():
    fitted = BalancedEstimator({"x": [0.5, 0.5], "y": [0.5, 0.5]}).fit({"x": [0, 1, 0, 1], "y": [0, 0, 1, 1]})
    with pytest.raises(ValueError, match="read-only"):
        fitted.weights_[0] = 1.0


# -- max_steps: the budget of a converged fit ---------------------------------------------------


def _associated_samples(n=2000, seed=4):
    """Three associated categorical columns: raking them to independent targets takes many sweeps."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 3, n)
    b = (a + (rng.random(n) < 0.2) * rng.integers(0, 3, n)) % 3
    c = (b + (rng.random(n) < 0.3)) % 2
    return {"a": a, "b": b, "c": c}, rng.normal(size=n) + a


THREE = {"a": [0.2, 0.3, 0.5], "b": [0.5, 0.3, 0.2], "c": [0.6, 0.4]}


def test_max_steps_stops_a_converged_fit_with_its_status_and_a_warning():
    data, _ = _associated_samples()
    converged = BalancedEstimator(THREE).fit(data)
    assert converged.balance_.status == "converged" and converged.balance_.steps > 7
    with pytest.warns(ConvergenceWarning, match="max_steps|half-steps"):
        capped = BalancedEstimator(THREE, max_steps=7).fit(data)
    assert capped.balance_.status == "max_steps" and capped.balance_.steps == 7
    # the capped fit's weights are the 7-step iterate's (an independent run of exactly 7 half-steps)
    np.testing.assert_allclose(capped.weights_, BalancedEstimator(THREE, steps=7).fit(data).weights_, rtol=1e-13)
    assert not np.allclose(capped.weights_, converged.weights_, rtol=1e-6)


def test_max_steps_is_ignored_by_a_finite_k_fit_and_passed_by_balanced_mean():
    data, h = _associated_samples()
    assert BalancedEstimator(THREE, steps=9, max_steps=2).fit(data).balance_.steps == 9
    x, y = data["a"], data["b"]
    with pytest.warns(ConvergenceWarning):
        capped = balanced_mean(h, x, y, THREE["a"], THREE["b"], tol=1e-15, max_steps=3)
    fixed = balanced_mean(h, x, y, THREE["a"], THREE["b"], steps=3)
    assert capped.estimate == pytest.approx(fixed.estimate, rel=1e-13)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_bad_max_steps_is_named_before_any_work(bad):
    with pytest.raises(ValueError, match=r"`max_steps` must be a positive integer"):
        BalancedEstimator(THREE, max_steps=bad).fit({"a": [0, 1], "b": [0, 1]})  # the data would fail later


def test_max_steps_caps_the_dask_samples_path(monkeypatch):
    dask = pytest.importorskip("dask")
    da = pytest.importorskip("dask.array")
    from databalance import estimators

    monkeypatch.setattr(estimators, "DASK_CELL_TABLE_MAX", 0)  # every sample its own cell: a pass per half-step
    data, _ = _associated_samples()
    lazy = {k: da.from_array(v, chunks=700) for k, v in data.items()}
    with dask.config.set(scheduler="sync"), pytest.warns(ConvergenceWarning):
        capped = BalancedEstimator(THREE, max_steps=5).fit(lazy)
    assert capped.balance_.status == "max_steps" and capped.balance_.steps == 5
    with dask.config.set(scheduler="sync"):
        got = np.asarray(capped.weights_.compute())
    np.testing.assert_allclose(got, BalancedEstimator(THREE, steps=5).fit(data).weights_, rtol=1e-12)


def test_max_steps_with_bounds_reports_the_last_raking_only():
    """The raking that seeds the trimming is capped silently (it needs more than 5 half-steps
    here); the last raking converges within the cap, the bounds hold, and nothing warns."""
    data, _ = _associated_samples()
    with pytest.warns(ConvergenceWarning):
        BalancedEstimator(THREE, max_steps=5).fit(data)  # the seeding raking alone would stop short
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        capped = BalancedEstimator(THREE, bounds=(0.1, 10.0), max_steps=5).fit(data)
    assert capped.balance_.status == "converged" and capped.diagnostics_.bounds_met
    w = np.asarray(capped.weights_)
    assert 0.1 * (1 - 1e-8) <= w.min() / w.mean() and w.max() / w.mean() <= 10.0 * (1 + 1e-8)
    for margin in capped.diagnostics_.margins:
        np.testing.assert_allclose(margin.achieved, margin.target, atol=1e-9)


def test_max_steps_capped_fit_standard_error_is_the_converged_form():
    """A capped fit is treated as converged: its standard error is the converged linearisation at
    the capped weights, not the finite-k one of the same number of steps."""
    data, h = _associated_samples()
    with pytest.warns(ConvergenceWarning):
        capped = BalancedEstimator(THREE, max_steps=7).fit(data).mean(h)
    finite = BalancedEstimator(THREE, steps=7).fit(data).mean(h)
    assert capped.estimate == pytest.approx(finite.estimate, rel=1e-12)
    assert np.isfinite(capped.standard_error) and capped.standard_error > 0
    assert capped.standard_error != pytest.approx(finite.standard_error, rel=1e-6)
