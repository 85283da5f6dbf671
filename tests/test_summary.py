"""Results that read well: labelled outputs, summary(), short reprs, missing-label errors."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from databalance import BalancedEstimate, BalancedEstimator, balanced_mean
from databalance._summary import LabelledValues, Summary


def problem(seed=0, n=400, weighted=False):
    rng = np.random.default_rng(seed)
    x = rng.choice(["lo", "mid", "hi"], n, p=[0.5, 0.3, 0.2])
    y = rng.integers(0, 3, n)
    h = (x == "hi") * 2.0 + 0.5 * y + rng.normal(size=n)
    g = (y == 1) + 0.3 * rng.normal(size=n)
    margins = {"x": {"lo": 0.3, "mid": 0.3, "hi": 0.4}, "y": [0.2, 0.3, 0.5]}
    d = rng.uniform(0.5, 2.0, n) if weighted else None
    return {"x": x, "y": y}, np.column_stack([h, g]), margins, d


# -- labels ----------------------------------------------------------------------------------------


def test_pandas_input_gives_labelled_outputs_equal_to_numpy_ones():
    pd = pytest.importorskip("pandas")
    data, H, margins, _ = problem(1)
    index = pd.Index([f"r{i}" for i in range(len(H))], name="respondent")
    df = pd.DataFrame({**data, "income": H[:, 0], "owner": H[:, 1]}, index=index)
    fitted = BalancedEstimator(margins).fit(df)
    plain = BalancedEstimator(margins).fit(data)
    assert isinstance(fitted.weights_, pd.Series) and fitted.weights_.index is index
    np.testing.assert_array_equal(fitted.weights_.to_numpy(), plain.weights_)
    est = fitted.mean(df[["income", "owner"]])
    ref = plain.mean(H)
    assert isinstance(est.estimate, pd.Series) and list(est.estimate.index) == ["income", "owner"]
    np.testing.assert_allclose(est.estimate.to_numpy(), ref.estimate, rtol=1e-14)
    np.testing.assert_allclose(est.standard_error.to_numpy(), ref.standard_error, rtol=1e-13)
    lo, hi = est.confidence_interval(0.9)
    ref_lo, ref_hi = ref.confidence_interval(0.9)
    assert list(lo.index) == ["income", "owner"]
    np.testing.assert_allclose(lo.to_numpy(), ref_lo, rtol=1e-13)
    np.testing.assert_allclose(hi.to_numpy(), ref_hi, rtol=1e-13)
    assert est.weights.index is index
    # One column stays a float; a DataFrame with another index is refused, not matched by position.
    assert isinstance(fitted.mean(df["income"]).estimate, float)
    with pytest.raises(ValueError, match=r"The index of `values` differs from that of the fitted data"):
        fitted.mean(df[["income"]].iloc[::-1])


def test_balanced_mean_keeps_the_index_of_its_pandas_input():
    pd = pytest.importorskip("pandas")
    data, H, margins, _ = problem(2)
    index = pd.RangeIndex(100, 100 + len(H))
    est = balanced_mean(pd.Series(H[:, 0], index=index), data["x"], data["y"], margins["x"], margins["y"])
    assert isinstance(est.weights, pd.Series) and est.weights.index is index
    np.testing.assert_array_equal(est.weights.to_numpy(),
                                  balanced_mean(H[:, 0], data["x"], data["y"], margins["x"], margins["y"]).weights)


def test_mapping_values_give_a_labelled_container_and_numpy_stays_numpy():
    data, H, margins, _ = problem(3)
    fitted = BalancedEstimator(margins).fit(data)
    est = fitted.mean({"income": H[:, 0], "owner": H[:, 1]})
    ref = fitted.mean(H)
    assert isinstance(est.estimate, LabelledValues) and list(est.estimate) == ["income", "owner"]
    assert est.estimate["owner"] == ref.estimate[1]
    np.testing.assert_array_equal(np.asarray(est.standard_error), ref.standard_error)
    lo, _ = est.confidence_interval()
    np.testing.assert_array_equal(np.asarray(lo), ref.confidence_interval()[0])
    assert type(ref.estimate) is np.ndarray and type(fitted.weights_) is np.ndarray
    with pytest.raises(KeyError):
        est.estimate["missing"]


@pytest.mark.parametrize("values, match", [
    ({}, r"`values` is an empty mapping"),
    ({"a": np.ones(400), "b": np.ones(3)}, r"The statistics in `values` have different lengths"),
    ({"a": np.full(400, np.nan)}, r"`values` contains NaN or inf, first at sample 0"),
    ({"a": np.ones((400, 2))}, r"`values\['a'\]` must have shape \(n,\), one entry per sample"),
])
def test_bad_mapping_values(values, match):
    data, _, margins, _ = problem(3)
    with pytest.raises(ValueError, match=match):
        BalancedEstimator(margins).fit(data).mean(values)


def test_numpy_input_never_imports_pandas():
    script = textwrap.dedent("""
        import sys
        import numpy as np
        import databalance
        rng = np.random.default_rng(0)
        x, y = rng.integers(0, 2, 100), rng.integers(0, 3, 100)
        est = databalance.BalancedEstimator({"x": [.5, .5], "y": [.2, .3, .5]}).fit({"x": x, "y": y})
        m = est.mean(rng.normal(size=(100, 2)))
        est.mean({"a": rng.normal(size=100)}).summary()
        print(repr(m), est.summary(), sep="\\n")
        assert "pandas" not in sys.modules, "pandas was imported"
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# -- summary ---------------------------------------------------------------------------------------


def plain_standard_error(h, d):
    """The textbook with-replacement SE of a (design-)weighted mean, written out independently."""
    n = len(h)
    if d is None:
        return np.std(h, ddof=1) / np.sqrt(n)
    p = d / d.sum()
    m = np.sum(p * h)
    z = n * p * (h - m)  # each sample's contribution to n * (estimate - mean), mean 0
    return np.sqrt(np.sum(z**2) / (n - 1) / n)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("steps", [None, 3])
def test_summary_numbers_against_independent_computations(weighted, steps):
    data, H, margins, d = problem(4, weighted=weighted)
    fitted = BalancedEstimator(margins, steps=steps).fit(data, d)
    s = fitted.summary({"income": H[:, 0], "owner": H[:, 1]}, level=0.9)
    w = fitted.weights_
    n = len(w)
    assert s.n == n and s.steps == fitted.balance_.steps and s.status == fitted.balance_.status
    assert s.effective_sample_size == pytest.approx(w.sum() ** 2 / np.sum(w**2), rel=1e-12)
    assert s.design_effect == pytest.approx(n * np.sum(w**2) / w.sum() ** 2, rel=1e-12)
    assert s.min_weight == pytest.approx(w.min() * n) and s.max_weight == pytest.approx(w.max() * n)
    assert s.weight_ratio == pytest.approx(w.max() / w.min(), rel=1e-12)
    # Achieved shares by a groupby of the weights; the largest deviation found by brute force.
    for m, key in zip(s.margins, ["x", "y"], strict=True):
        cats = list(m.categories)
        achieved = np.array([w[np.asarray(data[key]) == c].sum() for c in cats])
        np.testing.assert_allclose(m.achieved, achieved, atol=1e-14)
        target = np.array([margins[key][c] for c in cats]) if key == "x" else np.asarray(margins[key])
        np.testing.assert_allclose(m.target, target / target.sum(), rtol=1e-14)
        dev = np.abs(achieved - target / target.sum())
        assert m.largest_deviation == pytest.approx(dev.max(), abs=1e-15)
        assert m.error == pytest.approx(dev.sum(), abs=1e-14)
    z = 1.6448536269514722  # the 95th percentile of N(0, 1)
    for j, stat in enumerate(s.statistics):
        est = fitted.mean(H[:, j])
        assert stat.name == ["income", "owner"][j]
        # The same numbers up to the rounding of a matrix product against a vector product.
        assert stat.estimate == pytest.approx(est.estimate, rel=1e-14)
        assert stat.standard_error == pytest.approx(est.standard_error, rel=1e-13)
        assert stat.low == pytest.approx(est.estimate - z * est.standard_error, rel=1e-12)
        assert stat.high == pytest.approx(est.estimate + z * est.standard_error, rel=1e-12)
        plain = plain_standard_error(H[:, j], d)
        assert stat.plain_standard_error == pytest.approx(plain, rel=1e-10)
        # ... which is also the k = 0 estimator's SE, computed by the linearisation machinery.
        k0 = BalancedEstimator(margins, steps=0).fit(data, d).mean(H[:, j]).standard_error
        assert stat.plain_standard_error == pytest.approx(k0, rel=1e-10)
        assert stat.design_effect == pytest.approx((est.standard_error / plain) ** 2, rel=1e-10)


def test_summary_of_an_estimate_equals_the_estimators_and_is_a_frozen_readable_object():
    data, H, margins, _ = problem(5)
    fitted = BalancedEstimator(margins).fit(data)
    a = fitted.mean(H[:, 0]).summary()
    b = fitted.summary(H[:, 0])
    assert [s.design_effect for s in a.statistics] == [s.design_effect for s in b.statistics]
    assert a.statistics[0].name == "value"
    text = str(a)
    for fact in ("converged after", "Effective sample size (Kish)", "Design effect (Kish)", "ratio",
                 "Margin 'x'", "Margin 'y'", "largest deviation", "95% low", "deff"):
        assert fact in text, fact
    assert f"{a.statistics[0].design_effect:.3f}" in text
    with pytest.raises(AttributeError):
        a.n = 3
    assert fitted.summary().statistics == ()
    with pytest.raises(ValueError, match=r"`level` must be a number strictly between 0 and 1"):
        fitted.summary(H[:, 0], level=1.5)
    with pytest.raises(RuntimeError, match=r"Call fit\(data\) before summary"):
        BalancedEstimator(margins).summary()


def test_a_constant_statistic_has_no_design_effect():
    data, H, margins, _ = problem(5)
    stat = BalancedEstimator(margins).fit(data).summary(np.full(len(H), 2.0)).statistics[0]
    assert stat.plain_standard_error == 0 and np.isnan(stat.design_effect)


def test_summary_html_escapes_labels_and_text_truncates_long_margins():
    rng = np.random.default_rng(6)
    n = 300
    labels = np.array(["<b>bold</b>", "a&b", "plain"])
    x = labels[rng.integers(0, 3, n)]
    y = rng.integers(0, 20, n)
    fitted = BalancedEstimator({"x": dict.fromkeys(labels, 1 / 3), "y": np.full(20, 0.05)}).fit({"x": x, "y": y})
    s = fitted.summary({"<i>h</i>": rng.normal(size=n)})
    page = s._repr_html_()
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page and "a&amp;b" in page
    assert "&lt;i&gt;h&lt;/i&gt;" in page and page.count("<table>") == 4
    text = str(s)
    assert "... 12 more categories (see .margins)" in text
    assert len(s.margins[1].categories) == 20  # all of them stay in the attributes


def test_an_estimate_not_made_by_mean_cannot_be_summarised():
    data, H, margins, _ = problem(5)
    est = BalancedEstimator(margins).fit(data).mean(H[:, 0])
    bare = BalancedEstimate(est.estimate, est.standard_error, est.weights, est.steps, est.balance)
    with pytest.raises(ValueError, match=r"was not made by BalancedEstimator.mean"):
        bare.summary()


# -- short reprs -----------------------------------------------------------------------------------


def short(obj, *facts):
    text = repr(obj)
    assert len(text.splitlines()) <= 3 and len(text) <= 400, text
    assert "array(" not in text and "[[" not in text, text
    for fact in facts:
        assert fact in text, (fact, text)
    return text


def test_reprs_are_short_and_say_what_matters():
    rng = np.random.default_rng(7)
    n = 10_000
    data = {"x": rng.integers(0, 50, n), "y": rng.integers(0, 40, n)}
    margins = {"x": np.full(50, 0.02), ("y",): np.full(40, 0.025)}
    fitted = BalancedEstimator(margins).fit(data)
    H = rng.normal(size=(n, 5))
    short(fitted, "converged", "n = 10000")
    short(fitted.diagnostics_, "n=10000", "effective sample size", "2 margins", "largest error")
    short(fitted.diagnostics_.margins[0], "key='x'", "shape (50,)", "largest deviation")
    short(fitted.mean(H[:, 0]), "estimate=", "standard_error=", "converged after", "n = 10000")
    short(fitted.mean(H), "5 statistics", "0: ", "... 2 more", "n = 10000")
    short(fitted.mean({"a": H[:, 0], "b": H[:, 1]}), "'a': ", "'b': ")
    s = fitted.summary(H)
    short(s, "converged", "2 margins", "5 statistics")
    short(s.margins[0], "50 categories")
    short(s.statistics[0], "design effect")


# -- missing labels (issue 13, "Bad input") ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["numpy", "pandas"])
@pytest.mark.parametrize("target", ["array", "mapping"])
@pytest.mark.parametrize("missing", ["nan", "none"])
def test_missing_labels_name_the_column_and_the_first_sample(kind, target, missing):
    rng = np.random.default_rng(8)
    n = 30
    codes = rng.integers(0, 3, n)
    margins = {"x": [0.2, 0.3, 0.5], "region": [0.5, 0.5]}
    region = rng.integers(0, 2, n)
    if target == "array":
        col = codes.astype(float) if missing == "nan" else codes.astype(object)
    else:
        col = np.array(["u", "v", "w"], dtype=object)[codes]
        margins["region"] = {"N": 0.5, "S": 0.5}
        region = np.array(["N", "S"], dtype=object)[region]
    col[[7, 12]] = np.nan if missing == "nan" else None
    data = {"x": col, "region": region}
    if kind == "pandas":
        pd = pytest.importorskip("pandas")
        data = pd.DataFrame(data, index=np.arange(100, 100 + n))
    # pandas itself turns None into NaN in some columns; either way the sample and column are named.
    shown = r"nan" if missing == "nan" else (r"None" if kind == "numpy" else r"(None|nan)")
    with pytest.raises(ValueError, match=rf"`x` has a missing label \({shown}\) at sample 7\. Every sample"):
        BalancedEstimator(margins).fit(data)
    with pytest.raises(ValueError, match=rf"`x` has a missing label \({shown}\) at sample 7\."):
        balanced_mean(np.ones(n), data["x"], data["region"], margins["x"], margins["region"])


def test_missing_labels_in_a_joint_margin_and_pandas_nullable_columns():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"a": pd.array([0, 1] * 6, dtype="Int64"), "b": pd.array(["p", "q", "r"] * 4, dtype="string")})
    df.loc[5, "a"] = pd.NA
    df.loc[3, "b"] = pd.NA
    joint = {(i, s): 1 / 6 for i in (0, 1) for s in "pqr"}
    with pytest.raises(ValueError, match=r"`a` has a missing label \((<NA>|nan)\) at sample 5"):
        BalancedEstimator({("a", "b"): joint}).fit(df)
    with pytest.raises(ValueError, match=r"`b` has a missing label \(<NA>\) at sample 3"):
        BalancedEstimator({"b": {"p": 0.3, "q": 0.3, "r": 0.4}}).fit(df)
    with pytest.raises(ValueError, match=r"`a` has a missing label \((<NA>|nan)\) at sample 5"):
        BalancedEstimator({"a": [0.5, 0.5]}).fit(df)


def test_summary_is_exported_type():
    data, H, margins, _ = problem(9)
    assert isinstance(BalancedEstimator(margins).fit(data).summary(), Summary)
