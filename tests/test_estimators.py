"""Tests of databalance.estimators: R's survey package, brute force, coverage, errors."""

import json
import pathlib
import shutil
import subprocess

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from databalance import BalancedEstimator, balance_table, balanced_mean

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
    fitted = BalancedEstimator(p_x, p_y, steps=3).fit(x, y)
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
    ty = dict(zip("abcd", p_y))
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
    for a, b in zip((h, x, y, p_x, p_y, d), copies):
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
        ({"sample_weight": [1.0, np.inf, 1.0, 1.0]}, ValueError, r"`sample_weight` contains NaN or inf, first at sample 1"),
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
        BalancedEstimator(PX, PY).mean(H)
    with pytest.raises(ValueError, match=r"`values` has 3 entries but 4 samples were fitted"):
        BalancedEstimator(PX, PY).fit(X, Y).mean(H[:3])
    with pytest.raises(ValueError, match=r"`level` must be a number strictly between 0 and 1"):
        balanced_mean(H, X, Y, PX, PY).confidence_interval(95)
