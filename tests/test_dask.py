"""Dask collections: estimators from per-cell sufficient statistics and row-partitioned tables,
checked against the in-memory paths on the threaded scheduler and on a two-process LocalCluster."""

import gc
import os
import pathlib
import re
import runpy
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import scipy.sparse as sp

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
dd = pytest.importorskip("dask.dataframe")
pd = pytest.importorskip("pandas")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from databalance import BalancedEstimator, ConvergenceWarning, InfeasibleError, balance_table, balanced_mean  # noqa: E402
from databalance._kernels.chunked import ChunkedWarning  # noqa: E402

from .dask_support import (  # noqa: E402
    assert_equal_scalings,
    assert_steps_like_numpy,
    local_cluster,
    numpy_reference,
    sparse_blocks,
)

RTOL = 1e-10


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("distributed")
    with local_cluster(default_client=False) as client:
        yield client


@pytest.fixture(params=["threads", "cluster"])
def scheduler(request):
    """Run the test body on the threaded scheduler, then with the LocalCluster's client active."""
    if request.param == "threads":
        with dask.config.set(scheduler="threads"):
            yield "threads"
    else:
        client = request.getfixturevalue("cluster")
        with client.as_current(), dask.config.set(scheduler=client):
            yield "cluster"


def close(a, b, rtol=RTOL):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=0)


def sample(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 3, n)
    y = rng.integers(0, 4, n)
    h = np.column_stack([x + y + rng.normal(size=n) + 100.0, (rng.random(n) < 0.3 + 0.1 * x).astype(float)])
    d = rng.uniform(0.5, 2.0, n)
    return x, y, h, d


PX, PY = [0.2, 0.3, 0.5], [0.1, 0.2, 0.3, 0.4]


@pytest.mark.parametrize("steps", [None, 3])
@pytest.mark.parametrize("linearization", ["balanced", "survey"])
@pytest.mark.parametrize("weighted", [False, True])
def test_balanced_mean_equals_in_memory(scheduler, steps, linearization, weighted):
    x, y, h, d = sample()
    sw = d if weighted else None
    chunks = (700,)  # uneven: the last partition is shorter
    ref = balanced_mean(h, x, y, PX, PY, steps=steps, sample_weight=sw, linearization=linearization)
    got = balanced_mean(da.from_array(h, chunks=chunks + (-1,)), da.from_array(x, chunks=chunks),
                        da.from_array(y, chunks=chunks), PX, PY, steps=steps, linearization=linearization,
                        sample_weight=None if sw is None else da.from_array(sw, chunks=chunks))
    close(got.estimate, ref.estimate)
    close(got.standard_error, ref.standard_error)
    assert got.steps == ref.steps and got.balance.status == ref.balance.status
    assert isinstance(got.weights, da.Array) and got.weights.chunks == ((700,) * 5 + (500,),)
    close(got.weights.compute(), ref.weights, rtol=1e-12)
    ours, theirs = got.summary().statistics, ref.summary().statistics
    for a, b in zip(ours, theirs, strict=True):
        close(a.plain_standard_error, b.plain_standard_error)
        close(a.design_effect, b.design_effect)
    close(got.effective_sample_size, ref.effective_sample_size, rtol=1e-12)


def survey_frame(n=3000, seed=1):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "age": rng.choice(["18-34", "35-54", "55+"], n, p=[0.5, 0.3, 0.2]),
        "region": np.where(rng.random(n) < 0.7, "urban", "rural"),
        "sex": np.where(rng.random(n) < 0.45, "F", "M"),
        "income": 30 + rng.normal(0, 12, n),
        "owns": (rng.random(n) < 0.4).astype(float),
        "w": rng.uniform(0.2, 3.0, n),
    })


MARGINS = {
    "age": {"18-34": 0.30, "35-54": 0.35, "55+": 0.35},
    "region": {"urban": 0.55, "rural": 0.45},
    ("sex", "region"): {("F", "urban"): 0.28, ("M", "urban"): 0.27, ("F", "rural"): 0.23, ("M", "rural"): 0.22},
}


@pytest.mark.parametrize("steps", [None, 5])
def test_estimator_dataframe_equals_pandas(scheduler, steps):
    df = survey_frame()
    ref = BalancedEstimator(MARGINS, steps=steps).fit(df, df["w"])
    ddf = dd.from_pandas(df, npartitions=4)
    fitted = BalancedEstimator(MARGINS, steps=steps).fit(ddf, ddf["w"])
    got, want = fitted.mean(ddf[["income", "owns"]]), ref.mean(df[["income", "owns"]])
    assert list(got.estimate.index) == ["income", "owns"]  # a Dask DataFrame gives pandas Series
    close(got.estimate, want.estimate)
    close(got.standard_error, want.standard_error)
    close(fitted.weights_.compute(), ref.weights_.to_numpy(), rtol=1e-12)
    a, b = fitted.diagnostics_, ref.diagnostics_
    assert a.n == b.n
    close([a.design_effect, a.min_weight, a.max_weight], [b.design_effect, b.min_weight, b.max_weight], rtol=1e-12)
    for m, r in zip(a.margins, b.margins, strict=True):
        close(m.achieved, r.achieved, rtol=1e-12)
    one = fitted.mean(ddf["income"])
    close(one.estimate, want.estimate["income"])
    named = fitted.mean({"inc": ddf["income"]})
    close(np.asarray(named.standard_error), [want.standard_error["income"]])


def test_empty_partitions_and_repeated_means():
    df = survey_frame(1200)
    ddf = dd.from_pandas(df, npartitions=3)
    empty = ddf[ddf["income"] > 1e9]  # every partition empty
    with_empty = dd.concat([ddf.partitions[0], empty.partitions[1], ddf.partitions[1], ddf.partitions[2],
                            empty.partitions[0]])
    with dask.config.set(scheduler="threads"):
        fitted = BalancedEstimator(MARGINS).fit(with_empty)
        got = fitted.mean(with_empty["income"])
        w = fitted.weights_.compute()
    want = BalancedEstimator(MARGINS).fit(df).mean(df["income"])
    close(got.estimate, want.estimate)
    close(got.standard_error, want.standard_error)
    close(w, want.weights.to_numpy(), rtol=1e-12)


def test_many_margins_integer_codes_equal_in_memory():
    rng = np.random.default_rng(3)
    n = 6000
    data = {"a": rng.integers(0, 5, n), "b": rng.integers(0, 7, n), "c": rng.integers(0, 3, n)}
    h = data["a"] * 0.3 - data["b"] * 0.1 + rng.normal(size=n)
    margins = {"a": np.full(5, 0.2), ("b", "c"): rng.dirichlet(np.ones(21)).reshape(7, 3)}
    ref = BalancedEstimator(margins, steps=None).fit(data).mean(h)
    with dask.config.set(scheduler="threads"):
        lazy = {k: da.from_array(v, chunks=1000) for k, v in data.items()}
        got = BalancedEstimator(margins).fit(lazy).mean(da.from_array(h, chunks=1000))
    close(got.estimate, ref.estimate)
    close(got.standard_error, ref.standard_error)


def test_large_values_scaled_exactly():
    """Values near 1e200 (squares overflow) give the in-memory estimate and SE."""
    x, y, h, _ = sample(1000)
    big = h[:, 0] * 1e200
    ref = balanced_mean(big, x, y, PX, PY)
    with dask.config.set(scheduler="threads"):
        got = balanced_mean(da.from_array(big, chunks=300), da.from_array(x, chunks=300),
                            da.from_array(y, chunks=300), PX, PY)
    close(got.estimate, ref.estimate)
    assert np.isfinite(got.standard_error)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(6, 60), parts=st.integers(1, 5), steps=st.sampled_from([0, 1, 2, 5, None]),
       value=st.floats(-1e6, 1e6), seed=st.integers(0, 2**31))
def test_constant_and_equality_property(n, parts, steps, value, seed):
    """A constant's balanced mean is the constant with SE 0; any h gives the in-memory result."""
    rng = np.random.default_rng(seed)
    x, y = np.arange(n) % 2, (np.arange(n) // 2) % 3  # every category sampled
    h = rng.normal(size=n)
    chunks = max(1, -(-n // parts))
    X, Y = da.from_array(x, chunks=chunks), da.from_array(y, chunks=chunks)
    with dask.config.set(scheduler="sync"):
        const = balanced_mean(da.full(n, value, chunks=chunks), X, Y, [0.3, 0.7], [0.2, 0.3, 0.5], steps=steps)
        got = balanced_mean(da.from_array(h, chunks=chunks), X, Y, [0.3, 0.7], [0.2, 0.3, 0.5], steps=steps)
    assert const.estimate == pytest.approx(value, rel=1e-12, abs=1e-12)
    assert const.standard_error <= 1e-9 * max(1.0, abs(value))
    ref = balanced_mean(h, x, y, [0.3, 0.7], [0.2, 0.3, 0.5], steps=steps)
    close(got.estimate, ref.estimate, rtol=1e-9)
    close(got.standard_error, ref.standard_error, rtol=1e-9)


def test_empty_drop_and_steps_zero():
    df = survey_frame(800)
    margins = dict(MARGINS, age={"18-34": 0.3, "35-54": 0.3, "55+": 0.3, "90+": 0.1})
    ddf = dd.from_pandas(df, npartitions=2)
    with dask.config.set(scheduler="threads"):
        got = BalancedEstimator(margins, empty="drop").fit(ddf).mean(ddf["income"])
        plain = BalancedEstimator(MARGINS, steps=0).fit(ddf).mean(ddf["income"])
    ref = BalancedEstimator(margins, empty="drop").fit(df).mean(df["income"])
    close(got.estimate, ref.estimate)
    close(got.standard_error, ref.standard_error)
    close(plain.estimate, df["income"].mean())
    close(plain.standard_error, df["income"].std(ddof=1) / np.sqrt(len(df)))


# -- errors ----------------------------------------------------------------------------------------


@pytest.fixture(params=["cells", "samples"])
def either_path(request, monkeypatch):
    """The test body on the cell path, then on the samples path."""
    if request.param == "samples":
        from databalance import estimators

        monkeypatch.setattr(estimators, "DASK_CELL_TABLE_MAX", 0)
    return request.param


def test_unseen_label_raises_at_compute_naming_column_and_label(either_path):
    df = survey_frame(600)
    df.loc[450, "age"] = "90+"
    ddf = dd.from_pandas(df, npartitions=3)
    with dask.config.set(scheduler="threads"), pytest.raises(
            ValueError, match=r"`age` has the label '90\+', which `margins\['age'\]` does not list.*Dask partition 2"):
        BalancedEstimator(MARGINS).fit(ddf)


def test_unlisted_joint_combination_named(either_path):
    df = survey_frame(600)
    margins = dict(MARGINS)
    margins[("sex", "region")] = {k: v for k, v in MARGINS[("sex", "region")].items() if k != ("M", "rural")}
    margins["region"] = {"urban": 0.55, "rural": 0.45}
    with dask.config.set(scheduler="threads"), pytest.raises(
            ValueError, match=r"(Some sample|Sample \d+) has \(`sex`, `region`\) = \('M', 'rural'\)"):
        # the totals disagree first unless the joint target still sums to the others' total
        margins[("sex", "region")][("F", "rural")] = 0.45
        BalancedEstimator(margins).fit(dd.from_pandas(df, npartitions=2))


def test_nan_in_values_raises(either_path):
    x, y, h, _ = sample(900)
    h = h[:, 0].copy()
    h[700] = np.nan
    with dask.config.set(scheduler="threads"), pytest.raises(
            ValueError, match=r"`values` contains NaN or inf, first at sample 100.*Dask partition 2"):
        balanced_mean(da.from_array(h, chunks=300), da.from_array(x, chunks=300), da.from_array(y, chunks=300),
                      PX, PY)


def test_missing_label_and_bad_codes_raise(either_path):
    x, y, h, d = sample(900)
    labels = np.array(["a", "b", "c"], dtype=object)[x]
    labels[310] = None
    with dask.config.set(scheduler="threads"):
        with pytest.raises(ValueError, match=r"`x` has a missing label \(None\) at sample 10.*partition 1"):
            balanced_mean(da.from_array(h[:, 0], chunks=300), da.from_array(labels, chunks=300),
                          da.from_array(y, chunks=300), dict(zip("abc", PX, strict=True)), PY)
        with pytest.raises(ValueError, match=r"`y` has code 4 at sample \d+, outside 0..3"):
            balanced_mean(da.from_array(h[:, 0], chunks=300), da.from_array(x, chunks=300),
                          da.from_array(np.where(np.arange(900) == 5, 4, y), chunks=300), PX, PY)
        d = d.copy()
        d[400] = -1.0
        with pytest.raises(ValueError, match=r"`sample_weight` must be nonnegative; sample 100.*partition 1"):
            balanced_mean(da.from_array(h[:, 0], chunks=300), da.from_array(x, chunks=300),
                          da.from_array(y, chunks=300), PX, PY, sample_weight=da.from_array(d, chunks=300))


def test_input_errors_before_any_work():
    x, y, h, _ = sample(900)
    X, Y, H = (da.from_array(a, chunks=300) for a in (x, y, h[:, 0]))
    with pytest.raises(ValueError, match=r"`bounds` \(trimming\) is not available for Dask input"):
        BalancedEstimator({"x": PX, "y": PY}, bounds=(0.5, 2.0)).fit({"x": X, "y": Y})
    with pytest.raises(TypeError, match=r"`x` is a ndarray but other inputs are Dask collections"):
        balanced_mean(H, x, Y, PX, PY)
    with pytest.raises(ValueError, match=r"`margins` names the column 'z', which `data` lacks"):
        BalancedEstimator({"x": PX, "z": PY}).fit({"x": X, "y": Y})
    with pytest.raises(ValueError, match=r"`data\['y'\]` has 899 rows but `data\['x'\]` has 900"):
        BalancedEstimator({"x": PX, "y": PY}).fit({"x": X, "y": Y[:-1]})
    unknown = dd.from_pandas(pd.Series(y), npartitions=2)
    with pytest.raises(ValueError, match=r"`data\['y'\]` has 2 partitions but `data\['x'\]` has 3"):
        BalancedEstimator({"x": PX, "y": PY}).fit({"x": dd.from_pandas(pd.Series(x), npartitions=3), "y": unknown})
    with dask.config.set(scheduler="threads"):
        fitted = BalancedEstimator({"x": PX, "y": PY}).fit({"x": X, "y": Y})
        with pytest.raises(TypeError, match=r"fitted on Dask collections: give `values` as a Dask array"):
            fitted.mean(h[:, 0])
    in_memory = BalancedEstimator({"x": PX, "y": PY}).fit({"x": x, "y": y})
    with pytest.raises(TypeError, match=r"fitted in memory: give `values` as an in-memory array"):
        in_memory.mean(H)


def test_many_cells_warn(monkeypatch):
    """The warning is caught where the library issues it: Python's warning filters and handler are
    process-wide and not thread-safe (a thread leaving a ``catch_warnings`` block restores what it
    saw on entry), and with other tests' threads about ``pytest.warns`` missed it twice in CI."""
    from databalance import estimators

    monkeypatch.setattr(estimators, "MANY_CELLS", 10)
    issued = []
    monkeypatch.setattr(estimators.warnings, "warn", lambda message, category=UserWarning, **kw:
                        issued.append((str(message), category)))
    rng = np.random.default_rng(0)
    data = {c: da.from_array(rng.permutation(np.arange(200) % 50), chunks=50) for c in ("a", "b")}
    with dask.config.set(scheduler="threads"):
        BalancedEstimator({"a": np.full(50, 0.02), "b": np.full(50, 0.02)}).fit(data)
    assert any(category is UserWarning and re.search(r"The 200 samples fall into 195 distinct cells", message)
               for message, category in issued), issued


@pytest.mark.parametrize("levels", [3, 40])  # a lookup table, a search among the cells' keys
def test_data_changed_between_fit_and_mean(levels):
    rng = np.random.default_rng(0)
    x, y = np.arange(400) % 2, np.arange(400) % levels
    x[y == 1] = 0  # the combination (1, 1) never occurs
    state = {"x": x}  # X reads it whenever it is computed
    X = da.arange(4, chunks=1).map_blocks(lambda b: state["x"][100 * b[0]:100 * (b[0] + 1)], chunks=((100,) * 4,),
                                          dtype=x.dtype)
    Y = da.from_array(y, chunks=100)
    with dask.config.set(scheduler="threads"):
        fitted = BalancedEstimator({"x": [0.5, 0.5], "y": np.full(levels, 1 / levels)}, steps=4).fit({"x": X, "y": Y})
        state["x"] = np.where(np.arange(400) == 1, 1, x)  # now sample 1 is in the unseen cell (1, 1)
        with pytest.raises(ValueError, match=r"combination that the fit did not see.*Dask partition 0"):
            fitted.mean(da.from_array(rng.normal(size=400), chunks=100))


def test_rechunked_inputs_align():
    """Inputs with known but different chunks are rechunked to the data's: same result."""
    x, y, h, _ = sample(1000)
    ref = balanced_mean(h[:, 0], x, y, PX, PY)
    with dask.config.set(scheduler="threads"):
        got = balanced_mean(da.from_array(h[:, 0], chunks=170), da.from_array(x, chunks=250),
                            da.from_array(y, chunks=400), PX, PY)
    close(got.estimate, ref.estimate)
    close(got.standard_error, ref.standard_error)


# -- the samples path: no cell table (issue 12) ------------------------------------------------------


@pytest.fixture
def samples_path(monkeypatch):
    """Every Dask fit takes the samples path (the samples are their own cells on the workers)."""
    from databalance import estimators

    monkeypatch.setattr(estimators, "DASK_CELL_TABLE_MAX", 0)


def three_margins(n=1500, seed=4):
    """Three margins, one joint (a x b), targets apart from the sample's, two statistics, design weights."""
    rng = np.random.default_rng(seed)
    data = {"x": rng.integers(0, 4, n), "y": np.minimum(rng.integers(0, 5, n), rng.integers(0, 5, n)),
            "a": rng.integers(0, 3, n), "b": rng.integers(0, 2, n)}
    h = np.column_stack([data["x"] + data["y"] - data["a"] * data["b"] + rng.normal(size=n),
                         (rng.random(n) < 0.2 + 0.1 * data["a"]).astype(float)])
    margins = {"x": rng.dirichlet(np.full(4, 5.0)), "y": np.full(5, 0.2),
               ("a", "b"): rng.dirichlet(np.full(6, 5.0)).reshape(3, 2)}
    return data, h, rng.uniform(0.5, 2.0, n), margins


UNEQUAL = (400, 0, 700, 1, 399)  # partitions of unequal size, one empty


def lazy(data, h, d, chunks=UNEQUAL):
    return ({k: da.from_array(v, chunks=(chunks,)) for k, v in data.items()}, da.from_array(h, chunks=(chunks, -1)),
            da.from_array(d, chunks=(chunks,)))


def assert_same_fit(fitted, ref, chunks=((400, 0, 700, 1, 399),)):
    """Weights, status, steps, every margin's error history, diagnostics: the in-memory fit's."""
    a, b = fitted.balance_, ref.balance_
    assert (a.status, a.steps) == (b.status, b.steps)
    np.testing.assert_allclose(a.marginal_error, b.marginal_error, rtol=1e-8, atol=1e-15)
    for f, g in zip(a.factors, b.factors, strict=True):
        close(f, g, rtol=1e-12)
    w = fitted.weights_
    assert isinstance(w, da.Array) and w.chunks == chunks
    close(w.compute(), ref.weights_, rtol=1e-12)
    p, q = fitted.diagnostics_, ref.diagnostics_
    assert p.n == q.n
    close([p.design_effect, p.effective_sample_size, p.min_weight, p.max_weight],
          [q.design_effect, q.effective_sample_size, q.min_weight, q.max_weight], rtol=1e-12)
    for m, r in zip(p.margins, q.margins, strict=True):
        np.testing.assert_allclose(m.achieved, r.achieved, rtol=1e-12, atol=1e-15)
        assert m.error == pytest.approx(r.error, rel=1e-6, abs=1e-14)


def assert_same_mean(got, want):
    close(got.estimate, want.estimate)
    close(got.standard_error, want.standard_error)
    for s, t in zip(got.summary().statistics, want.summary().statistics, strict=True):
        close(s.plain_standard_error, t.plain_standard_error)
        close(s.design_effect, t.design_effect)


def one_pass_per_step(monkeypatch):
    from databalance import _dask_samples

    monkeypatch.setattr(_dask_samples, "TABLES_MAX", 0)


@pytest.mark.parametrize(("steps", "tables"), [(0, True), (1, True), (2, True), (3, True), (5, True), (None, True),
                                               (2, False), (3, False), (5, False)])
@pytest.mark.parametrize("linearization", ["balanced", "survey"])
@pytest.mark.parametrize("weighted", [False, True])
def test_samples_path_equals_in_memory(samples_path, monkeypatch, steps, tables, linearization, weighted):
    """With the two-way tables (the recursion on the client) and without (one pass per step)."""
    if not tables:
        one_pass_per_step(monkeypatch)
    data, h, d, margins = three_margins()
    sw = d if weighted else None
    ref = BalancedEstimator(margins, steps=steps, linearization=linearization).fit(data, sw)
    X, H, D = lazy(data, h, d)
    with dask.config.set(scheduler="threads"):
        fitted = BalancedEstimator(margins, steps=steps, linearization=linearization).fit(X, D if weighted else None)
        assert type(fitted._dask_fit).__name__ == "SamplesFit"
        assert_same_fit(fitted, ref)
        assert_same_mean(fitted.mean(H), ref.mean(h))
        one = fitted.mean(H[:, 1])  # one statistic: floats
        close(one.estimate, ref.mean(h[:, 1]).estimate)


@pytest.mark.parametrize("steps", [2])
def test_samples_path_on_the_cluster(samples_path, scheduler, steps):
    """The threaded scheduler and the two-process LocalCluster give the in-memory result."""
    data, h, d, margins = three_margins(900, seed=5)
    ref = BalancedEstimator(margins, steps=steps).fit(data, d)
    X, H, D = lazy(data, h, d, chunks=(500, 0, 400))
    fitted = BalancedEstimator(margins, steps=steps).fit(X, D)
    close(fitted.weights_.compute(), ref.weights_, rtol=1e-12)
    assert_same_mean(fitted.mean(H), ref.mean(h))


def test_samples_path_dataframe_labels_and_empty_drop(samples_path):
    """Labelled columns of a Dask DataFrame, a joint margin sharing a column, empty='drop'."""
    df = survey_frame(1000)
    margins = dict(MARGINS, age={"18-34": 0.3, "35-54": 0.3, "55+": 0.3, "90+": 0.1})
    ddf = dd.from_pandas(df, npartitions=3)
    ref = BalancedEstimator(margins, empty="drop").fit(df, df["w"])
    with dask.config.set(scheduler="threads"):
        fitted = BalancedEstimator(margins, empty="drop").fit(ddf, ddf["w"])
        got = fitted.mean(ddf[["income", "owns"]])
    want = ref.mean(df[["income", "owns"]])
    assert list(got.estimate.index) == ["income", "owns"]
    close(got.estimate, want.estimate)
    close(got.standard_error, want.standard_error)
    close(fitted.weights_.compute(), ref.weights_.to_numpy(), rtol=1e-12)
    assert fitted.balance_.status == ref.balance_.status == "converged"
    close(fitted.diagnostics_.margins[0].target, ref.diagnostics_.margins[0].target, rtol=1e-15)


def test_samples_path_not_converged_warns(samples_path, monkeypatch):
    """A tolerance below float64's resolution cannot be certified: the in-memory status and
    warning, and the standard error of the run treated as converged."""
    from databalance import _ipf

    monkeypatch.setattr(_ipf, "STALL_PATIENCE", 10)  # stalls sooner (fewer passes), in memory alike
    data, h, d, margins = three_margins(300, seed=6)
    with pytest.warns(ConvergenceWarning, match=r"stalled"):
        ref = BalancedEstimator(margins, tol=1e-18).fit(data)
    X, H, _ = lazy(data, h, d, chunks=(150, 150))
    with dask.config.set(scheduler="sync"), pytest.warns(ConvergenceWarning, match=r"stalled"):
        fitted = BalancedEstimator(margins, tol=1e-18).fit(X)
    assert fitted.balance_.status == "stalled"
    assert fitted._if_steps is None  # linearised at the limit, as in memory
    with dask.config.set(scheduler="sync"):
        got = fitted.mean(H)
    want = ref.mean(h)
    close(got.estimate, want.estimate, rtol=1e-9)
    close(got.standard_error, want.standard_error, rtol=1e-9)


@pytest.mark.parametrize("tables", [True, False])
def test_samples_path_pass_counts(samples_path, monkeypatch, tables):
    """A fit with steps=k is k + 1 passes over the samples; a mean 2, or k + 1 when the two-way
    tables would be too large."""
    from databalance import _dask_samples

    calls = []
    original = _dask_samples.run

    def counted(samples, task, *args, **kwargs):
        # A task carries no Dask collection (else every partition's task would compute it whole).
        assert len(dask.delayed(task, pure=True).__dask_graph__()) == 1
        calls.append(type(task).__name__)
        return original(samples, task, *args, **kwargs)

    monkeypatch.setattr(_dask_samples, "run", counted)
    if not tables:
        one_pass_per_step(monkeypatch)
    data, h, d, margins = three_margins(400, seed=7)
    X, H, _ = lazy(data, h, d, chunks=(200, 200))
    cases = ((0, 1, 2), (5, 6, 2 if tables else 6)) + (((None, None, 2),) if tables else ())
    with dask.config.set(scheduler="sync"):
        for steps, fit_passes, mean_passes in cases:
            calls.clear()
            fitted = BalancedEstimator(margins, steps=steps).fit(X)
            fit = len(calls)
            calls.clear()
            fitted.mean(H)
            expected = fitted.balance_.steps + 1 if fit_passes is None else fit_passes
            assert (fit, len(calls)) == (expected, mean_passes), (steps, calls)


def test_additive_coefficients_equal_additive_fit():
    """The normal equations' solution on per-level tables equals LSQR on the cells (additive_fit)."""
    from databalance._dask_samples import FirstMoments, Samples, SamplesFit, additive_coefficients
    from databalance._joint import Cells, additive_fit

    rng = np.random.default_rng(8)
    n, sizes = 2000, [4, 6, 3]
    codes = [rng.integers(0, s, n) for s in sizes]
    codes[2][codes[0] == 3] = 0  # overlapping margins: a level pair never seen
    v = rng.uniform(0.1, 2.0, n)
    g = rng.normal(size=(n, 2)) + codes[0][:, None] * 0.5
    samples = Samples(None, [], None, [(s,) for s in sizes])
    fit = SamplesFit(samples, n, float(n), [np.ones(s) for s in sizes], float(v.sum()), [], [], [], None, False, ())
    first = FirstMoments(fit, "limit")(codes, v, g)  # survey measure: the design weights v
    coefficients = additive_coefficients(fit, first["level_h"], first["level_1"], first["pairs"])
    ours = sum(c[code] for c, code in zip(coefficients, codes, strict=True))
    theirs = additive_fit(Cells(codes, [(s,) for s in sizes], v), v, v[:, None] * g / v.sum())
    close(ours, theirs, rtol=1e-10)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(8, 80), cuts=st.lists(st.integers(0, 80), max_size=4), steps=st.sampled_from([0, 1, 3, None]),
       seed=st.integers(0, 2**31))
def test_samples_path_equal_across_chunkings(n, cuts, steps, seed):
    """Any partitioning (empty partitions included) gives the in-memory estimate and SE."""
    from databalance import estimators

    rng = np.random.default_rng(seed)
    x, y = np.arange(n) % 2, (np.arange(n) // 2) % 3  # every category sampled
    h = rng.normal(size=n)
    bounds = sorted(min(c, n) for c in cuts)
    chunks = tuple(np.diff([0, *bounds, n]))
    margins = {"x": [0.3, 0.7], "y": [0.2, 0.3, 0.5]}
    ref = BalancedEstimator(margins, steps=steps).fit({"x": x, "y": y}).mean(h)
    saved, estimators.DASK_CELL_TABLE_MAX = estimators.DASK_CELL_TABLE_MAX, 0
    try:
        with dask.config.set(scheduler="sync"):
            got = BalancedEstimator(margins, steps=steps).fit(
                {"x": da.from_array(x, chunks=(chunks,)), "y": da.from_array(y, chunks=(chunks,))}).mean(
                da.from_array(h, chunks=(chunks,)))
    finally:
        estimators.DASK_CELL_TABLE_MAX = saved
    close(got.estimate, ref.estimate, rtol=1e-9)
    close(got.standard_error, ref.standard_error, rtol=1e-9)


def test_samples_path_converged_se_refuses_huge_tables(samples_path, monkeypatch):
    from databalance import _dask_samples

    monkeypatch.setattr(_dask_samples, "TABLES_MAX", 5)
    x, y, h, _ = sample(600)
    X, Y, H = (da.from_array(a, chunks=300) for a in (x, y, h[:, 0]))
    with dask.config.set(scheduler="sync"):
        fitted = BalancedEstimator({"x": PX, "y": PY}).fit({"x": X, "y": Y})
        with pytest.raises(ValueError, match=r"needs the margins' pairwise two-way tables and the normal equations "
                                             r"over all their categories: 49 entries here, more than the 5.*Give "
                                             r"`steps=k`"):
            fitted.mean(H)


def test_samples_path_large_values_scaled_exactly(samples_path):
    x, y, h, _ = sample(1000)
    big = h[:, 0] * 1e200
    ref = balanced_mean(big, x, y, PX, PY, steps=3)
    with dask.config.set(scheduler="threads"):
        got = balanced_mean(da.from_array(big, chunks=300), da.from_array(x, chunks=300),
                            da.from_array(y, chunks=300), PX, PY, steps=3)
    close(got.estimate, ref.estimate)
    close(got.standard_error, ref.standard_error)


def test_path_chosen_by_the_number_of_combinations():
    """Up to DASK_CELL_TABLE_MAX combinations the cell table; beyond, the samples."""
    from databalance import estimators

    x, y, h, _ = sample(600)
    X, Y = da.from_array(x, chunks=300), da.from_array(y, chunks=300)
    with dask.config.set(scheduler="sync"):
        cells = BalancedEstimator({"x": PX, "y": PY}).fit({"x": X, "y": Y})
        saved, estimators.DASK_CELL_TABLE_MAX = estimators.DASK_CELL_TABLE_MAX, 11
        try:
            samples = BalancedEstimator({"x": PX, "y": PY}).fit({"x": X, "y": Y})
        finally:
            estimators.DASK_CELL_TABLE_MAX = saved
    assert type(cells._dask_fit).__name__ == "_DaskFit" and type(samples._dask_fit).__name__ == "SamplesFit"
    assert estimators.DASK_CELL_TABLE_MAX == 2**22


# -- tables ----------------------------------------------------------------------------------------


def random_table(rng, m, n, zeros=0.3):
    T = rng.random((m, n))
    T[T < zeros] = 0.0
    T[np.arange(m), rng.integers(0, n, m)] = 1.0  # no empty row
    T[rng.integers(0, m, n), np.arange(n)] = 1.0  # no empty column
    return T


@pytest.mark.parametrize("steps", [None, 5])
@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_chunked_table_equals_in_memory(scheduler, steps, kind):
    rng = np.random.default_rng(5)
    T = random_table(rng, 250, 30)
    p, q = rng.dirichlet(np.ones(250)), rng.dirichlet(np.ones(30))
    ref = balance_table(sp.csr_array(T) if kind == "sparse" else T, p, q, steps=steps, start="y")
    table = sparse_blocks(T, 60) if kind == "sparse" else da.from_array(T, chunks=(60, 30))
    got = balance_table(table, p, q, steps=steps, start="y")
    assert (got.status, got.steps) == (ref.status, ref.steps)
    close(got.row_scaling, ref.row_scaling, rtol=1e-12)
    close(got.col_scaling, ref.col_scaling, rtol=1e-12)
    np.testing.assert_allclose(got.marginal_error, ref.marginal_error, rtol=1e-8, atol=1e-15)
    assert isinstance(got.table, da.Array)
    dense = got.table.compute()
    if kind == "sparse":
        assert sp.issparse(dense)
        dense = dense.toarray()
    close(dense, ref.table.toarray() if kind == "sparse" else ref.table, rtol=1e-12)


def test_float32_table_stays_float32():
    rng = np.random.default_rng(2)
    T = random_table(rng, 80, 12).astype(np.float32)
    p, q = rng.dirichlet(np.ones(80)), rng.dirichlet(np.ones(12))
    with dask.config.set(scheduler="threads"):
        got = balance_table(da.from_array(T, chunks=(20, 12)), p, q, steps=6)
        out = got.table.compute()
    ref = balance_table(T, p, q, steps=6)
    assert out.dtype == np.float32 and got.row_scaling.dtype == np.float32
    np.testing.assert_allclose(out, ref.table, rtol=1e-5)


def test_column_chunks_rechunked_with_warning():
    rng = np.random.default_rng(4)
    T = random_table(rng, 60, 20)
    p, q = rng.dirichlet(np.ones(60)), rng.dirichlet(np.ones(20))
    with dask.config.set(scheduler="threads"):
        with pytest.warns(ChunkedWarning, match=r"split into 4 chunks along its columns; it is rechunked"):
            got = balance_table(da.from_array(T, chunks=(15, 5)), p, q)
    close(got.row_scaling, balance_table(T, p, q).row_scaling, rtol=1e-12)


def test_chunked_table_errors():
    T = np.ones((40, 6))
    T[33, 2] = -1.0
    p, q = np.full(40, 1 / 40), np.full(6, 1 / 6)
    with dask.config.set(scheduler="threads"):
        with pytest.raises(ValueError, match=r"`table` must be nonnegative; found -1.0 at index \(13, 2\).*"
                                             r"block starting at row 20"):
            balance_table(da.from_array(T, chunks=(20, 6)), p, q)
        T[33, 2] = np.inf
        with pytest.raises(ValueError, match=r"`table` contains an infinite value, first at index \(13, 2\)"):
            balance_table(da.from_array(T, chunks=(20, 6)), p, q)
        with pytest.raises(ValueError, match=r"`table` must be 2-D when it is a Dask array"):
            balance_table(da.ones((2, 4, 4), chunks=2), np.full(4, .25), np.full(4, .25))
        # a zero pattern that cannot carry the targets: the same InfeasibleError as in memory
        bad = np.ones((4, 4))
        bad[:2, 2:] = bad[2:, :2] = 0
        with pytest.raises(InfeasibleError):
            balance_table(da.from_array(bad, chunks=(2, 4)), [.4, .4, .1, .1], [.25] * 4)
        empty_row = np.ones((4, 4))
        empty_row[1] = 0
        with pytest.raises(ValueError, match=r"Row 1 of `table` is empty"):
            balance_table(da.from_array(empty_row, chunks=(2, 4)), [.25] * 4, [.25] * 4)


@settings(max_examples=15, deadline=None)
@given(m=st.integers(2, 30), n=st.integers(2, 8), rows=st.integers(1, 12), steps=st.integers(0, 6),
       seed=st.integers(0, 2**31))
def test_chunked_equals_dense_property(m, n, rows, steps, seed):
    rng = np.random.default_rng(seed)
    T = rng.random((m, n)) + 0.01
    p, q = rng.dirichlet(np.ones(m)), rng.dirichlet(np.ones(n))
    with dask.config.set(scheduler="sync"):
        got = balance_table(da.from_array(T, chunks=(rows, n)), p, q, steps=steps)
    ref = balance_table(T, p, q, steps=steps)
    close(got.row_scaling, ref.row_scaling, rtol=1e-12)
    close(got.col_scaling, ref.col_scaling, rtol=1e-12)


# -- the fused sweep: one map over the blocks per sweep (issue 12, DASK-SPEED) ----------------------


def zero_target_problem(rng, m=240, n=30, dtype=np.float64):
    T = random_table(rng, m, n).astype(dtype)
    p, q = rng.dirichlet(np.ones(m)), rng.dirichlet(np.ones(n))
    p[[3, 77]] = 0.0  # zero targets: those rows are emptied, as in memory
    q[5] = 0.0
    return T, p / p.sum(), q / q.sum()


def dask_table(T, kind, rows=50):
    return sparse_blocks(T, rows) if kind == "sparse" else da.from_array(T, chunks=(rows, T.shape[1]))


@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize("start", ["x", "y"])
def test_fused_sweep_equals_numpy_kernel(monkeypatch, kind, start):
    from databalance._kernels.chunked import ChunkedKernel, FusedChunkedKernel

    rng = np.random.default_rng(11)
    T, p, q = zero_target_problem(rng)
    table = dask_table(T, kind)
    with dask.config.set(scheduler="threads"):
        kernel = ChunkedKernel.from_input(table)
        assert type(kernel) is FusedChunkedKernel
        assert_steps_like_numpy(monkeypatch, table, T, kind, p, q, start)


def test_fused_sweep_float32(monkeypatch):
    rng = np.random.default_rng(12)
    T, p, q = zero_target_problem(rng, dtype=np.float32)
    for kind in ["dense", "sparse"]:
        with dask.config.set(scheduler="threads"):
            got = balance_table(dask_table(T, kind), p, q, steps=6)
        ref = numpy_reference(monkeypatch, T, kind, p, q, steps=6)
        assert got.row_scaling.dtype == np.float32 and got.col_scaling.dtype == np.float32
        assert_equal_scalings(got, ref, rtol=2e-5)  # float32 sums added in another order


def test_fused_sweep_on_the_cluster(monkeypatch, cluster):
    rng = np.random.default_rng(13)
    T, p, q = zero_target_problem(rng)
    ref = numpy_reference(monkeypatch, T, "dense", p, q, steps=7, start="y")
    with cluster.as_current(), dask.config.set(scheduler=cluster):
        for kind in ["dense", "sparse"]:
            got = balance_table(dask_table(T, kind), p, q, steps=7, start="y")
            assert_equal_scalings(got, ref, rtol=1e-12)
        from databalance._kernels.chunked import ChunkedKernel

        kernel = ChunkedKernel.from_input(dask_table(T, "sparse"))
        workers = set(cluster.scheduler_info()["workers"])
        assert all(w is not None and set(w) <= workers for w in kernel._placement())  # each block's holder
    with dask.config.set(scheduler="threads"):
        assert ChunkedKernel.from_input(dask_table(T, "sparse"))._placement() == [None] * 5  # any thread


def test_overrelaxed_sweeps_equal_numpy_kernel(monkeypatch):
    rng = np.random.default_rng(14)
    T, p, q = zero_target_problem(rng, m=200, n=40)
    for kind in ["dense", "sparse"]:
        ref = numpy_reference(monkeypatch, T, kind, p, q, acceleration="overrelax", tol=1e-12)
        with dask.config.set(scheduler="threads"):
            got = balance_table(dask_table(T, kind), p, q, acceleration="overrelax", tol=1e-12)
        assert (got.status, got.steps) == (ref.status, ref.steps)
        assert_equal_scalings(got, ref, rtol=1e-10)


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_one_compute_per_sweep(monkeypatch, kind):
    rng = np.random.default_rng(15)
    T, p, q = zero_target_problem(rng)
    table = dask_table(T, kind)
    calls = []
    compute = dask.compute

    def counted(*args, **kwargs):
        calls.append(1)
        return compute(*args, **kwargs)

    monkeypatch.setattr(dask, "compute", counted)
    counts = {}
    with dask.config.set(scheduler="threads"):
        for steps in (4, 24):
            calls.clear()
            result = balance_table(table, p, q, steps=steps)
            counts[steps] = (len(calls), result.passes)
    assert counts[24][0] - counts[4][0] == 10  # ten more sweeps, ten more computes
    assert counts[24][1] - counts[4][1] == 10  # and ten more reads of the blocks


def test_plain_kernel_takes_two_computes_per_sweep(monkeypatch):
    """The two-map kernel (``plain=True``) still gives the same iterates, at two computes a sweep."""
    from databalance._kernels import chunked

    rng = np.random.default_rng(16)
    T, p, q = zero_target_problem(rng)
    table = dask_table(T, "sparse")
    with dask.config.set(scheduler="threads"):
        kernel = chunked.ChunkedKernel.from_input(table, plain=True)
        fused = chunked.ChunkedKernel.from_input(table)
        v = rng.random(T.shape[1])
        u = rng.random(T.shape[0])
        r, u_new, c = fused._pass(v, u, p, None)
        np.testing.assert_allclose(r, kernel.row_sums(v), rtol=1e-13)
        np.testing.assert_allclose(c, kernel.col_sums(u_new), rtol=1e-13)
        np.testing.assert_allclose(r, T @ v, rtol=1e-13)
        np.testing.assert_allclose(c, T.T @ u_new, rtol=1e-13)
        expected = np.divide(p, r, out=np.zeros_like(p), where=p > 0)
        np.testing.assert_array_equal(u_new, expected)
        # over-relaxed: the rule of the in-memory kernels, line by line
        from databalance._kernels.fused import relaxed_ratio

        r, u_new, c = fused._pass(v, u, p, np.array([1.5]))
        np.testing.assert_allclose(u_new, relaxed_ratio(u, p, T @ v, np.flatnonzero(p == 0), 1.5), rtol=1e-13)
        np.testing.assert_allclose(c, T.T @ u_new, rtol=1e-13)


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_block_task_without_numba_equals_compiled(monkeypatch, kind):
    """A block's task in a process where numba cannot run (or is refused) gives the compiled pass's
    results to rounding; the threaded scheduler's concurrent tasks serialise under a threading layer
    not known to be thread-safe."""
    pytest.importorskip("numba")
    from databalance._kernels import chunked, fused

    rng = np.random.default_rng(17)
    T, p, q = zero_target_problem(rng)
    block = chunked._prepared(sp.csr_matrix(T) if kind == "sparse" else T, np.float64)
    v, old = rng.random(T.shape[1]), rng.random(T.shape[0])
    for w in (1.0, 1.4):
        compiled = chunked._fused_block(block, v, old, p, w, True)
        monkeypatch.setattr(fused, "_FORK_UNSAFE", True)
        plain = chunked._fused_block(block, v, old, p, w, True)
        monkeypatch.setattr(fused, "_FORK_UNSAFE", False)
        (lines, c), (plain_lines, plain_c) = compiled, plain
        np.testing.assert_allclose(np.atleast_2d(plain_lines)[0], np.atleast_2d(lines)[0], rtol=1e-13)  # r
        if plain_lines.ndim == 2:  # u sent back (else the client recomputes it: the plain rule)
            np.testing.assert_allclose(plain_lines[1], lines[1], rtol=1e-13)
        np.testing.assert_allclose(plain_c, c, rtol=1e-13)
    monkeypatch.setattr(fused, "_LAYER", "workqueue")
    ref = numpy_reference(monkeypatch, T, kind, p, q, steps=5)
    with dask.config.set(scheduler="threads"):
        got = balance_table(dask_table(T, kind, rows=20), p, q, steps=5)
    assert_equal_scalings(got, ref, rtol=1e-12)


def test_kernel_choice_follows_the_environment(monkeypatch):
    from databalance._kernels import chunked, fused

    table = da.from_array(np.ones((8, 3)), chunks=(4, 3))
    with dask.config.set(scheduler="threads"):
        monkeypatch.setenv("DATABALANCE_KERNEL", "numpy")
        assert chunked.ChunkedKernel.from_input(table).compiled is False
        monkeypatch.setenv("DATABALANCE_KERNEL", "numba")
        monkeypatch.setattr(fused, "numba_installed", lambda: False)
        with pytest.raises(ImportError, match=r"DATABALANCE_KERNEL=numba asks for the numba kernels, but numba is "
                                              r"not installed"):
            balance_table(table, np.full(8, 1 / 8), np.full(3, 1 / 3))
        monkeypatch.setenv("DATABALANCE_KERNEL", "auto")
        kernel = chunked.ChunkedKernel.from_input(table)
        assert kernel.compiled is False and isinstance(kernel, chunked.FusedChunkedKernel)
        assert chunked.ChunkedKernel.from_input(table.map_blocks(sp.csr_matrix)).compiled is False


# -- without dask, and the example ------------------------------------------------------------------


def test_library_works_without_dask():
    code = ("import sys; sys.modules['dask'] = None; sys.modules['distributed'] = None\n"
            "import numpy as np; from databalance import balanced_mean, balance_table\n"
            "r = np.random.default_rng(0); x, y = r.integers(0, 2, 50), r.integers(0, 3, 50)\n"
            "e = balanced_mean(x + y + r.normal(size=50), x, y, [.5, .5], [.2, .3, .5])\n"
            "b = balance_table(np.ones((3, 3)), [.2, .3, .5], [.3, .3, .4])\n"
            "assert np.isfinite(e.standard_error) and b.converged\n"
            "assert 'dask' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_guide_page_examples_run():
    import doctest

    page = pathlib.Path(__file__).parents[1] / "docs" / "guide" / "dask.rst"
    result = doctest.testfile(str(page), module_relative=False,
                              optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_parquet_example_runs(tmp_path, capsys):
    pytest.importorskip("pyarrow")
    pytest.importorskip("matplotlib")
    path = pathlib.Path(__file__).parents[1] / "examples" / "parquet_raking.py"
    main = runpy.run_path(str(path))["main"]
    results = main(n=3000, partitions=3, folder=str(tmp_path), plot=False)
    out = capsys.readouterr().out
    assert "raked" in out and "income" in out
    # the same samples in memory give the same estimates
    df = pd.read_parquet(tmp_path)
    margins = {"age": {"18-34": 0.30, "35-54": 0.35, "55+": 0.35}, "region": {"urban": 0.55, "rural": 0.45},
               ("sex", "region"): {("F", "urban"): 0.28, ("M", "urban"): 0.27, ("F", "rural"): 0.23,
                                   ("M", "rural"): 0.22}}
    ref = BalancedEstimator(margins).fit(df).mean(df["income"])
    close(results["income"], (ref.estimate, ref.standard_error))


def test_infeasible_two_margins_raise_on_either_path(either_path):
    """Two margins whose occupied cells cannot carry the targets: InfeasibleError, as in memory (the
    samples path decides it by max-flow on the two-way table's support, one more pass), never a
    'failed' fit with estimates."""
    xs = np.array([0, 0, 1, 1, 0, 1] * 20)
    ys = np.array([0, 1, 1, 1, 0, 1] * 20)
    margins = {"x": np.array([0.5, 0.5]), "y": np.array([0.9, 0.1])}
    with pytest.raises(InfeasibleError):
        BalancedEstimator(margins).fit({"x": xs, "y": ys})
    data = {"x": da.from_array(xs, chunks=40), "y": da.from_array(ys, chunks=40)}
    with dask.config.set(scheduler="sync"), pytest.raises(InfeasibleError, match="cannot carry the targets"):
        BalancedEstimator(margins).fit(data)


def test_converged_se_refuses_normal_equations_the_client_cannot_hold(samples_path, monkeypatch):
    """The converged SE of the samples path solves dense normal equations over every margin's
    levels on the client: beyond TABLES_MAX entries it refuses by name (steps=k needs none)."""
    from databalance import _dask_samples

    monkeypatch.setattr(_dask_samples, "TABLES_MAX", 20)  # 2 + 3 levels: 25 entries
    rng = np.random.default_rng(0)
    xs, ys = rng.integers(0, 2, 300), rng.integers(0, 3, 300)
    data = {"x": da.from_array(xs, chunks=100), "y": da.from_array(ys, chunks=100)}
    margins = {"x": np.array([0.4, 0.6]), "y": np.array([0.2, 0.3, 0.5])}
    with dask.config.set(scheduler="sync"):
        fit = BalancedEstimator(margins).fit(data)
        with pytest.raises(ValueError, match="normal equations over all their categories: 25 entries.*`steps=k`"):
            fit.mean(da.from_array(rng.normal(size=300), chunks=100))
        est = BalancedEstimator(margins, steps=4).fit(data).mean(da.from_array(rng.normal(size=300), chunks=100))
    assert np.isfinite(est.standard_error)


@pytest.mark.parametrize("code", [5, -1])
def test_codes_changed_between_passes_get_the_first_pass_error(samples_path, monkeypatch, code):
    """Without the cache of encoded codes, the samples path checks integer codes' range in every
    pass: a code that changed since the fit's first pass gets the same error (column, code,
    partition), not a broadcast error or a silently clipped weight."""
    from databalance import _dask_samples

    monkeypatch.setattr(_dask_samples, "CACHE_FRACTION", 0.0)
    rng = np.random.default_rng(0)
    x, y = np.arange(400) % 2, np.arange(400) % 3
    state = {"x": x}
    X = da.arange(4, chunks=1).map_blocks(lambda b: state["x"][100 * b[0]:100 * (b[0] + 1)], chunks=((100,) * 4,),
                                          dtype=x.dtype)
    Y = da.from_array(y, chunks=100)
    with dask.config.set(scheduler="sync"):
        fitted = BalancedEstimator({"x": [0.5, 0.5], "y": np.full(3, 1 / 3)}, steps=4).fit({"x": X, "y": Y})
        state["x"] = np.where(np.arange(400) == 250, code, x)
        with pytest.raises(ValueError, match=rf"`x`.*{code}.*Dask partition 2"):
            fitted.mean(da.from_array(rng.normal(size=400), chunks=100))
        with pytest.raises(ValueError, match=rf"`x`.*{code}.*Dask partition 2"):
            fitted.weights_.compute()


@pytest.mark.parametrize("steps", [0, 3])
def test_cell_masses_of_the_samples_path_stay_lazy(samples_path, steps):
    """``balance_.cell_masses`` (one per sample) stays a lazy Dask array after any number of steps:
    nothing of length n reaches the client."""
    rng = np.random.default_rng(1)
    data = {"x": da.from_array(rng.integers(0, 2, 300), chunks=100),
            "y": da.from_array(rng.integers(0, 3, 300), chunks=100)}
    with dask.config.set(scheduler="sync"):
        fit = BalancedEstimator({"x": [0.4, 0.6], "y": [0.2, 0.3, 0.5]}, steps=steps).fit(data)
        masses = fit.balance_.cell_masses
        assert isinstance(masses, da.Array) and masses.shape == (300,)
        np.testing.assert_allclose(float(masses.sum().compute()), 1.0 if steps else 300.0, rtol=1e-12)


def test_tables_of_every_step_together_are_bounded(samples_path, monkeypatch):
    """A pass's tables fit, but not those of every step together: the fit stops gathering them (the
    client holds at most TABLES_MAX entries) and the mean takes one pass per step, same result."""
    from databalance import _dask_samples

    # three margins of 4, 5 and 6 levels: a step's tables hold 4 x 11 to 6 x 9 entries
    monkeypatch.setattr(_dask_samples, "TABLES_MAX", 150)
    data, h, d, margins = three_margins()
    ref = BalancedEstimator(margins, steps=7).fit(data, d)
    X, H, D = lazy(data, h, d)
    with dask.config.set(scheduler="threads"):
        fitted = BalancedEstimator(margins, steps=7).fit(X, D)
        assert fitted._dask_fit.iterate_tables == {}
        assert_same_mean(fitted.mean(H), ref.mean(h))


# -- the samples path's cache of encoded codes (issue 12, DASK-SPEED) ---------------------------------


def counted_columns(data, chunks, calls):
    """The columns as Dask arrays whose every partition's load is counted in ``calls``."""
    def load(block, name):
        calls.append(name)
        return block

    return {k: da.from_array(v, chunks=(chunks,)).map_blocks(load, k, dtype=v.dtype, meta=v[:0]) for k, v in
            data.items()}


@pytest.mark.parametrize("steps", [None, 3])
def test_cached_codes_read_once_and_equal_uncached(samples_path, monkeypatch, steps):
    from databalance import _dask_samples

    data, h, d, margins = three_margins()
    chunks = (400, 0, 700, 1, 399)
    results = {}
    for fraction in (0.0, _dask_samples.CACHE_FRACTION):
        monkeypatch.setattr(_dask_samples, "CACHE_FRACTION", fraction)
        calls: list = []
        with dask.config.set(scheduler="threads"):
            fitted = BalancedEstimator(margins, steps=steps).fit(counted_columns(data, chunks, calls),
                                                                  sample_weight=da.from_array(d, chunks=(chunks,)))
            est = fitted.mean(da.from_array(h, chunks=(chunks, -1)))
        passes = fitted.balance_.steps + 1
        results[fraction] = (est.estimate, est.standard_error, calls.count("x") / len(chunks), passes)
    cached, uncached = results[_dask_samples.CACHE_FRACTION], results[0.0]
    close(cached[0], uncached[0], rtol=1e-13)
    close(cached[1], uncached[1], rtol=1e-13)
    assert 0.75 <= cached[2] <= 1  # every partition loaded once at most (the empty one may not be)
    assert uncached[2] >= uncached[3] + 2 > 3  # without the cache: in every pass of the fit and of the mean


def test_cached_codes_with_unknown_partition_lengths(samples_path):
    """A DataFrame's partitions (lengths unknown): the codes are cached after the first pass (the
    columns loaded twice), and the estimate is the in-memory one."""
    data, h, d, margins = three_margins(n=900)
    frame = pd.DataFrame({**data, "h": h[:, 0]})
    ddf = dd.from_pandas(frame, npartitions=3).clear_divisions()
    lazy_frame = ddf.map_partitions(lambda part: part)  # lengths unknown to Dask
    with dask.config.set(scheduler="threads"):
        got = balanced_mean(lazy_frame["h"], lazy_frame["x"], lazy_frame["y"], margins["x"], margins["y"], steps=4)
    ref = balanced_mean(frame["h"].to_numpy(), data["x"], data["y"], margins["x"], margins["y"], steps=4)
    close(got.estimate, ref.estimate)
    close(got.standard_error, ref.standard_error)


def test_cache_falls_back_when_codes_do_not_fit(samples_path, monkeypatch):
    from databalance import _dask_samples

    data, h, d, margins = three_margins(n=600)
    columns = {k: da.from_array(v, chunks=200) for k, v in data.items()}
    assert _dask_samples.code_dtype([4, 5, 6]) == np.uint8 and _dask_samples.code_dtype([300]) == np.uint16
    assert _dask_samples.code_dtype([70_000]) == np.uint32
    budget = [600 * 3 * 1 - 1]  # three margins' uint8 codes: one byte too many
    monkeypatch.setattr(_dask_samples, "cache_budget", lambda: float(budget[0]))
    samples = _dask_samples.Samples(None, list(columns.values()), None, [(4,), (5,), (6,)])
    assert _dask_samples.cached(samples, (200,) * 3, validate=False).encoded is None  # not built (no plan)
    ref = BalancedEstimator(margins, steps=2).fit(data).mean(h[:, 0])
    for fits in (False, True):
        budget[0] = 600 * 3 - 1 + fits
        with dask.config.set(scheduler="threads"):
            fitted = BalancedEstimator(margins, steps=2).fit(columns)
            est = fitted.mean(da.from_array(h[:, 0], chunks=200))
        assert (fitted._dask_fit.samples.encoded is not None) == fits
        close(est.estimate, ref.estimate)
        close(est.standard_error, ref.standard_error)


def test_cache_budget_of_the_cluster(cluster):
    from databalance import _dask_samples

    with cluster.as_current(), dask.config.set(scheduler=cluster):
        limits = sum(w["memory_limit"] for w in cluster.scheduler_info()["workers"].values())
        assert _dask_samples.cache_budget() == pytest.approx(_dask_samples.CACHE_FRACTION * limits)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("pairs_of", [None, 0, 2])
def test_compiled_weight_pass_equals_numpy(weighted, scaled, pairs_of):
    pytest.importorskip("numba")
    from databalance._dask_samples import WeightSums

    rng = np.random.default_rng(21)
    sizes, n = [3, 7, 300], 5000
    codes = [rng.integers(0, s, n) for s in sizes]
    d = rng.uniform(0.5, 2.0, n) if weighted else None
    factors = [rng.uniform(0.1, 3.0, s) for s in sizes] if scaled else None
    want = WeightSums(factors, sizes, pairs_of)(codes, d, None)
    for dtype in (np.intp, np.uint16):  # as encoded in every pass, as cached
        got = WeightSums(factors, sizes, pairs_of, compiled=True)([c.astype(dtype) for c in codes], d, None)
        for a, b in zip(got["sums"], want["sums"], strict=True):
            np.testing.assert_array_equal(a, b)  # the same products, added in the same order
        assert (got["min_u"], got["max_u"]) == (want["min_u"], want["max_u"])
        close(got["u2"], want["u2"], rtol=1e-13)
        assert ("tables" in got) == (pairs_of is not None)
        for a, b in zip(got.get("tables", []), want.get("tables", []), strict=True):
            np.testing.assert_array_equal(a, b)
    empty = WeightSums(factors, sizes, pairs_of, compiled=True)([np.zeros(0, np.uint16)] * 3, None, None)
    assert all(s.sum() == 0 for s in empty["sums"]) and empty["min_u"] == np.inf


def test_samples_path_equal_with_and_without_numba(samples_path, monkeypatch):
    pytest.importorskip("numba")
    data, h, d, margins = three_margins()
    columns, values, design = lazy(data, h, d)
    results = []
    for kernel in ("numpy", "numba"):
        monkeypatch.setenv("DATABALANCE_KERNEL", kernel)
        with dask.config.set(scheduler="threads"):
            fitted = BalancedEstimator(margins, steps=5).fit(columns, sample_weight=design)
            results.append((fitted.mean(values), fitted.diagnostics_))
    (a, da_), (b, db_) = results
    close(a.estimate, b.estimate, rtol=1e-13)
    close(a.standard_error, b.standard_error, rtol=1e-13)
    close(da_.effective_sample_size, db_.effective_sample_size, rtol=1e-13)


STEPS_TABLES = [(0, True), (1, True), (2, True), (3, True), (4, True), (5, True), (None, True), (2, False),
                (5, False)]


def mean_with_kernel(monkeypatch, fitted, values, kernel):
    """``fitted.mean(values)`` with ``DATABALANCE_KERNEL=kernel``, and whether its passes ran compiled."""
    from databalance import _dask_samples

    flags = []
    original = _dask_samples.run

    def spy(samples, task, *args, **kwargs):
        flags.append(task.compiled)
        return original(samples, task, *args, **kwargs)

    monkeypatch.setattr(_dask_samples, "run", spy)
    monkeypatch.setenv("DATABALANCE_KERNEL", kernel)
    try:
        return fitted.mean(values), flags
    finally:
        monkeypatch.setattr(_dask_samples, "run", original)
        monkeypatch.delenv("DATABALANCE_KERNEL")


@pytest.mark.parametrize(("steps", "tables"), STEPS_TABLES)
@pytest.mark.parametrize("linearization", ["balanced", "survey"])
@pytest.mark.parametrize("weighted", [False, True])
def test_compiled_mean_equals_numpy_path(samples_path, monkeypatch, steps, tables, linearization, weighted):
    """A mean's compiled passes (first moments, the one-pass-per-step sums, the terms) give the
    NumPy passes' estimate, SE, plain SE and design effect to 1e-12, and the in-memory ones."""
    pytest.importorskip("numba")
    if not tables:
        one_pass_per_step(monkeypatch)
    data, h, d, margins = three_margins(seed=11)
    X, H, D = lazy(data, h, d)
    ref = BalancedEstimator(margins, steps=steps, linearization=linearization).fit(data, d if weighted else None)
    with dask.config.set(scheduler="sync"):
        fitted = BalancedEstimator(margins, steps=steps, linearization=linearization).fit(X, D if weighted else None)
        compiled, flags = mean_with_kernel(monkeypatch, fitted, H, "numba")
        plain, plain_flags = mean_with_kernel(monkeypatch, fitted, H, "numpy")
    assert all(flags) and flags and not any(plain_flags) and len(flags) == len(plain_flags)
    close(compiled.estimate, plain.estimate, rtol=1e-12)
    close(compiled.standard_error, plain.standard_error, rtol=1e-12)
    for s, t in zip(compiled.summary().statistics, plain.summary().statistics, strict=True):
        close(s.plain_standard_error, t.plain_standard_error, rtol=1e-12)
        close(s.design_effect, t.design_effect, rtol=1e-12)
    assert_same_mean(compiled, ref.mean(h))


@pytest.mark.parametrize("linearization", ["balanced", "survey"])
@pytest.mark.parametrize("tables", [True, False])
def test_compiled_mean_with_a_zero_target(samples_path, monkeypatch, linearization, tables):
    """A level with target 0: its samples' scaling becomes 0, so the compiled chain rebuilds the
    iterate from its scalings at the steps after (as the NumPy pass does)."""
    pytest.importorskip("numba")
    if not tables:
        one_pass_per_step(monkeypatch)
    data, h, d, margins = three_margins(seed=12)
    margins["x"] = np.array([0.0, 0.3, 0.3, 0.4])
    X, H, D = lazy(data, h, d)
    ref = BalancedEstimator(margins, steps=5, linearization=linearization).fit(data, d)
    with dask.config.set(scheduler="sync"):
        fitted = BalancedEstimator(margins, steps=5, linearization=linearization).fit(X, D)
        compiled, flags = mean_with_kernel(monkeypatch, fitted, H, "numba")
        plain, _ = mean_with_kernel(monkeypatch, fitted, H, "numpy")
    assert all(flags)
    close(compiled.estimate, plain.estimate, rtol=1e-12)
    close(compiled.standard_error, plain.standard_error, rtol=1e-12)
    assert_same_mean(compiled, ref.mean(h))


@pytest.mark.parametrize(("steps", "tables"), STEPS_TABLES)
@pytest.mark.parametrize("linearization", ["balanced", "survey"])
def test_compiled_mean_tasks_equal_numpy(samples_path, monkeypatch, steps, tables, linearization):
    """Each task of a mean on one partition's codes, compact (as cached) or not: the per-level
    sums and tables are the NumPy task's exactly (the same products added in the same order), the
    estimate and the moments of the terms to 1e-13."""
    pytest.importorskip("numba")
    from databalance import _dask_samples
    from databalance._dask_samples import FirstMoments, StepSums, Terms

    if not tables:
        one_pass_per_step(monkeypatch)
    data, h, d, margins = three_margins(700, seed=13)
    X, _, D = lazy(data, h, d, chunks=(350, 350))
    with dask.config.set(scheduler="sync"):
        fit = BalancedEstimator(margins, steps=steps, linearization=linearization).fit(X, D)._dask_fit.shipped
    codes = [data["x"], data["y"], data["a"] * 2 + data["b"]]
    k = int(fit.steps or 0)
    mode = "limit" if fit.steps is None else "none" if k == 0 else "tables" if tables else "passes"
    rng = np.random.default_rng(14)
    mus = {} if mode in ("none", "limit") else {
        l_step: rng.normal(size=(fit.samples.sizes[(l_step - 1) % 3], 2)) for l_step in range(k, 0, -1)}
    coefficients = [rng.normal(size=(size, 2)) for size in fit.samples.sizes] if mode == "limit" else None
    estimate, plain, scale = np.array([0.3, -0.1]), np.array([0.2, 0.5]), np.array([4.0, 1.0])
    tasks = [FirstMoments(fit, mode), Terms(fit, mus, coefficients, estimate, plain, scale)]
    tasks += [StepSums(fit, j, {l: mu for l, mu in mus.items() if l > j}, estimate, scale) for j in range(1, k)]
    for task in tasks:
        want = task(codes, d, h)
        for dtype in (np.intp, np.uint16, np.uint8):
            got = _dask_samples.replace(task, compiled=True)([c.astype(dtype) for c in codes], d, h)
            assert got.keys() == want.keys()
            for key in want:
                if key.startswith("moments"):
                    assert got[key][0] == want[key][0]
                    close(got[key][1], want[key][1], rtol=1e-13)
                    close(got[key][2], want[key][2], rtol=1e-13)
                elif key in ("est", "plain"):
                    close(got[key], want[key], rtol=1e-13)
                elif isinstance(want[key], list):
                    for a, b in zip(got[key], want[key], strict=True):
                        np.testing.assert_array_equal(a, b)
                else:
                    np.testing.assert_array_equal(got[key], want[key])
    empty = [np.zeros(0, np.uint16)] * 3
    for task in tasks:  # an empty partition (group)
        got = _dask_samples.replace(task, compiled=True)(empty, None, np.zeros((0, 2)))
        want = task([c.astype(np.intp) for c in empty], None, np.zeros((0, 2)))
        assert got.keys() == want.keys()


@pytest.mark.parametrize("tables", [True, False])
@pytest.mark.parametrize("values_fit", [True, False])
def test_mean_reads_its_values_once_when_they_fit(samples_path, monkeypatch, tables, values_fit):
    """With the codes cached, a mean's values are read once for all its passes (2, or k + 1 with
    one pass per step) when codes and values fit the cache's budget; else once per pass. Same
    results either way."""
    from databalance import _dask_samples

    if not tables:
        one_pass_per_step(monkeypatch)
    data, h, d, margins = three_margins(seed=15)
    X, H, _ = lazy(data, h, d)
    reads = []

    def read(block):
        reads.append(len(block))
        return block

    values = H.map_blocks(read, dtype=np.float64, meta=np.empty((0, 2)))
    with dask.config.set(scheduler="sync"):
        fitted = BalancedEstimator(margins, steps=4).fit(X)
        assert fitted._dask_fit.samples.encoded is not None  # the codes are cached
        codes_bytes = len(h) * 3  # three margins of uint8 codes
        budget = codes_bytes + (len(h) * 16 if values_fit else 1)
        monkeypatch.setattr(_dask_samples, "cache_budget", lambda: budget)
        calls = []
        original = _dask_samples.run
        monkeypatch.setattr(_dask_samples, "run", lambda *a, **k: calls.append(1) or original(*a, **k))
        got = fitted.mean(values)
    assert len(calls) == (2 if tables else 5)
    assert len([r for r in reads if r]) == 4 * (1 if values_fit else len(calls))  # UNEQUAL: 4 not empty
    assert sum(reads) == len(h) * (1 if values_fit else len(calls))
    assert_same_mean(got, BalancedEstimator(margins, steps=4).fit(data).mean(h))


def test_dask_paths_work_without_numba():
    """numba blocked: the table's one-map sweep with BLAS/scipy products, the samples path's NumPy
    passes (the cache of codes included), both equal to the in-memory results."""
    code = ("import sys; sys.modules['numba'] = None\n"
            "import numpy as np, dask, dask.array as da\n"
            "from databalance import balance_table, BalancedEstimator\n"
            "from databalance import estimators\n"
            "from databalance._kernels import chunked\n"
            "estimators.DASK_CELL_TABLE_MAX = 0\n"
            "r = np.random.default_rng(0); T = r.random((60, 7)) + 0.1\n"
            "p, q = np.full(60, 1 / 60), np.full(7, 1 / 7)\n"
            "with dask.config.set(scheduler='threads'):\n"
            "    k = chunked.ChunkedKernel.from_input(da.from_array(T, chunks=(20, 7)))\n"
            "    got = balance_table(da.from_array(T, chunks=(20, 7)), p, q, steps=9)\n"
            "    x, y = r.integers(0, 3, 300), r.integers(0, 4, 300); h = x + r.normal(size=300)\n"
            "    m = {'x': np.full(3, 1 / 3), 'y': np.full(4, .25)}\n"
            "    cols = {'x': da.from_array(x, chunks=100), 'y': da.from_array(y, chunks=100)}\n"
            "    est = BalancedEstimator(m, steps=4).fit(cols).mean(da.from_array(h, chunks=100))\n"
            "assert type(k) is chunked.FusedChunkedKernel and not k.compiled\n"
            "ref = balance_table(T, p, q, steps=9)\n"
            "assert np.allclose(got.row_scaling, ref.row_scaling, rtol=1e-12, atol=0)\n"
            "want = BalancedEstimator(m, steps=4).fit({'x': x, 'y': y}).mean(h)\n"
            "assert np.isclose(est.estimate, want.estimate, rtol=1e-10, atol=0)\n"
            "assert np.isclose(est.standard_error, want.standard_error, rtol=1e-10, atol=0)\n"
            "assert 'numba' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_grouped_partitions():
    from databalance._dask_samples import GROUP_MAX, grouped

    assert grouped((5, 5, 5, 5), 2) == (((0, 5), (1, 5)), ((2, 5), (3, 5)))
    assert grouped((5, 0, 5), 8) == (((0, 5),), ((1, 0), (2, 5)))  # at most one group a partition
    big = grouped((GROUP_MAX // 2,) * 8, 1)  # at most GROUP_MAX samples a group
    assert len(big) == 4 and all(sum(n for _, n in g) == GROUP_MAX for g in big)
    assert [p for g in grouped((3, 9, 1, 7, 2), 3) for p, _ in g] == [0, 1, 2, 3, 4]  # consecutive, in order
    assert len(grouped((GROUP_MAX // 2,) * 12, 4)) == 8  # six needed by size: eight, two per thread


def test_errors_in_a_group_name_their_partition(samples_path, monkeypatch):
    from databalance import _dask_samples

    monkeypatch.setattr(_dask_samples, "threads_available", lambda: 1)  # one group of six partitions
    x, y, h, _ = sample(600)
    h = h[:, 0].copy()
    h[430] = np.nan
    cols = {"x": da.from_array(x, chunks=100), "y": da.from_array(y, chunks=100)}
    with dask.config.set(scheduler="threads"):
        fitted = BalancedEstimator({"x": PX, "y": PY}, steps=3).fit(cols)
        assert len(fitted._dask_fit.samples.groups) == 1
        with pytest.raises(ValueError, match=r"`values` contains NaN or inf, first at sample 30.*Dask partition 4"):
            fitted.mean(da.from_array(h, chunks=100))
        d = np.ones(600)
        d[250] = -1.0
        with pytest.raises(ValueError, match=r"sample_weight.*Dask partition 2"):
            BalancedEstimator({"x": PX, "y": PY}, steps=3).fit(cols, sample_weight=da.from_array(d, chunks=100))
        bad = x.copy()
        bad[510] = 7
        with pytest.raises(ValueError, match=r"`x`.*7.*Dask partition 5"):
            BalancedEstimator({"x": PX, "y": PY}, steps=3).fit({"x": da.from_array(bad, chunks=100), "y": cols["y"]})


# -- review regressions (lead) ---------------------------------------------------------------------------


def test_design_weights_of_unknown_lengths_with_cached_codes(samples_path, scheduler):
    """Regression: columns of known lengths but design weights of unknown ones (a Series whose
    divisions were cleared): the cached codes were regrouped and the weights could not follow."""
    pd = pytest.importorskip("pandas")
    dd = pytest.importorskip("dask.dataframe")
    x, y, _, d = sample(800, seed=5)
    data, margins = {"x": x, "y": y}, {"x": PX, "y": PY}
    weights = dd.from_pandas(pd.Series(d), npartitions=8).clear_divisions()
    lazy_data = {k: da.from_array(v, chunks=100) for k, v in data.items()}
    got = BalancedEstimator(margins, steps=3).fit(lazy_data, sample_weight=weights)
    ref = BalancedEstimator(margins, steps=3).fit(data, sample_weight=d)
    close(got.diagnostics_.effective_sample_size, ref.diagnostics_.effective_sample_size)


def test_a_refit_after_the_data_changed_sees_the_new_data(samples_path, scheduler, tmp_path):
    """Regression: on the cluster, a second fit of the same graph (the same keys) after the data
    changed found the first fit's cached codes still held on the workers, and used them."""
    path = str(tmp_path / "x.npy")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 800)
    x = da.from_delayed(dask.delayed(np.load, pure=True)(path), shape=(800,), dtype=np.int64).rechunk(100)
    data = {"x": x, "y": da.from_array(y, chunks=100)}
    margins = {"x": [0.3, 0.7], "y": [0.2, 0.3, 0.5]}
    est = BalancedEstimator(margins, steps=4)
    for values in (rng.integers(0, 2, 800), np.where(np.arange(800) < 400, 0, 1)):
        np.save(path, values)
        est.fit(data)
        ref = BalancedEstimator(margins, steps=4).fit({"x": values, "y": y})
        close(est.diagnostics_.effective_sample_size, ref.diagnostics_.effective_sample_size)


def test_a_fused_table_sweep_after_a_worker_is_replaced():
    """Regression: a sweep's block tasks were pinned to the workers that held the blocks at the first
    sweep; after one of them was replaced, its tasks waited forever."""
    import threading

    pytest.importorskip("distributed")
    from databalance._kernels.chunked import ChunkedKernel

    with local_cluster() as client, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        T = np.random.default_rng(0).random((400, 20))
        kernel = ChunkedKernel.from_input(da.from_array(T, chunks=(50, 20)))
        p = np.full(400, 1 / 400)
        victim = next(where[0] for where in kernel._placement() if where)
        client.restart_workers([victim])
        out: dict = {}
        thread = threading.Thread(target=lambda: out.setdefault("sweep", kernel._pass(np.ones(20), np.ones(400), p,
                                                                                      None)), daemon=True)
        thread.start()
        thread.join(60)
        assert "sweep" in out, "the sweep waited for a worker that left"
        np.testing.assert_allclose(out["sweep"][0], T.sum(axis=1), rtol=1e-12)


# -- the samples path's passes submitted as futures (issue 12, DASK-SAMPLES) ------------------------


def spy_submitted(monkeypatch):
    """Counts the passes submitted as futures (:func:`_dask_samples._submitted`)."""
    from databalance import _dask_samples

    calls = []
    original = _dask_samples._submitted

    def spy(client, samples, task, values):
        calls.append((type(task).__name__, values is not None))
        return original(client, samples, task, values)

    monkeypatch.setattr(_dask_samples, "_submitted", spy)
    return calls


@pytest.mark.parametrize(("steps", "linearization", "weighted", "tables"),
                         [(3, "balanced", True, True), (6, "balanced", False, True), (None, "balanced", True, True),
                          (5, "survey", True, True), (4, "balanced", True, False), (0, "balanced", False, True)])
def test_submitted_passes_equal_in_memory(samples_path, monkeypatch, cluster, steps, linearization, weighted, tables):
    """On the LocalCluster every pass over the cached codes (and design weights and values) is
    submitted as futures; the fit and the mean equal the in-memory ones (a joint margin, design
    weights, finite k with tables or one pass per step, the converged linearisation)."""
    if not tables:
        one_pass_per_step(monkeypatch)
    calls = spy_submitted(monkeypatch)
    data, h, d, margins = three_margins(seed=31)
    ref = BalancedEstimator(margins, steps=steps, linearization=linearization).fit(data, d if weighted else None)
    X, H, D = lazy(data, h, d)
    with cluster.as_current(), dask.config.set(scheduler=cluster):
        fitted = BalancedEstimator(margins, steps=steps, linearization=linearization).fit(X, D if weighted else None)
        samples = fitted._dask_fit.samples
        assert samples.encoded is not None and samples.design_cached == weighted
        fit_passes = len(calls)
        assert fit_passes == fitted.balance_.steps + 1  # every pass of the fit, the first one's included
        assert_same_fit(fitted, ref)
        close(fitted.diagnostics_.effective_sample_size, ref.diagnostics_.effective_sample_size)
        assert_same_mean(fitted.mean(H), ref.mean(h))
    mean_calls = calls[fit_passes:]
    assert mean_calls and all(with_values for _, with_values in mean_calls)  # the values held too
    assert len(mean_calls) == (2 if tables or not steps else steps + 1)


def test_submitted_passes_add_a_workers_groups_there(samples_path, monkeypatch, cluster):
    """More groups than workers: one task per worker thread and pass over the groups that worker
    holds, their partial sums added there as it goes (one result per worker to the client), and
    the result is the in-memory one."""
    distributed = pytest.importorskip("distributed")
    from databalance import _dask_samples

    monkeypatch.setattr(_dask_samples, "GROUP_MAX", 200)
    data, h, d, margins = three_margins(1200, seed=32)
    X, H, D = lazy(data, h, d, chunks=(100,) * 12)
    with cluster.as_current(), dask.config.set(scheduler=cluster):
        with distributed.get_task_stream(cluster) as stream:
            fitted = BalancedEstimator(margins, steps=4).fit(X, D)
            got = fitted.mean(H)
        groups = fitted._dask_fit.samples.groups
    assert len(groups) == 6  # 1200 / 200, a multiple of the two threads
    names = [s["key"][0] if isinstance(s["key"], tuple) else s["key"] for s in stream.data]
    passes = [k for k in names if k.startswith("databalance-pass-")]
    count = fitted.balance_.steps + 1 + 2
    # one per worker (one thread each) and pass; the first pass's groups may not be computed yet when
    # it is submitted (no holder known: a task per group, placed by the scheduler)
    assert 2 * count <= len(passes) <= 6 + 2 * (count - 1)
    assert not [k for k in names if k.startswith("databalance-sum-")]
    assert_same_mean(got, BalancedEstimator(margins, steps=4).fit(data, d).mean(h))


@pytest.mark.parametrize("groups", [2, 6])
def test_cached_groups_spread_over_the_workers(samples_path, monkeypatch, cluster, groups):
    """Group g of the cached codes is computed and held on worker g modulo the workers (sorted by
    address; every task of its graph restricted there, loosely: the scheduler may still let an idle
    worker steal a partition's task, whose result then moves), so a pass's tasks run on both
    workers in equal numbers; the results are the in-memory ones."""
    distributed = pytest.importorskip("distributed")
    from databalance import _dask_samples

    monkeypatch.setattr(_dask_samples, "GROUP_MAX", 1200 // groups)
    data, h, d, margins = three_margins(1200, seed=38)
    X, H, D = lazy(data, h, d, chunks=(100,) * 12)
    workers = sorted(cluster.scheduler_info()["workers"])
    with cluster.as_current(), dask.config.set(scheduler=cluster):
        with distributed.get_task_stream(cluster) as stream:
            fitted = BalancedEstimator(margins, steps=3).fit(X, D)
        samples = fitted._dask_fit.samples
        assert len(samples.groups) == groups and len(samples.held) == groups
        holders = cluster.who_has(list(samples.held))
        assert [list(holders[f.key]) for f in samples.held] == [[workers[g % 2]] for g in range(groups)]
        got = fitted.mean(H)
    passes = [s["worker"] for s in stream.data if str(s["key"]).startswith("databalance-pass-")]
    assert sorted(passes.count(w) for w in workers) == [len(passes) // 2] * 2
    assert_same_mean(got, BalancedEstimator(margins, steps=3).fit(data, d).mean(h))


def test_graph_passes_on_the_local_schedulers(samples_path, monkeypatch):
    """Without a distributed client the passes stay one graph each (no futures), and equal."""
    calls = spy_submitted(monkeypatch)
    data, h, d, margins = three_margins(seed=33)
    X, H, D = lazy(data, h, d)
    for scheduler in ("sync", "threads"):
        with dask.config.set(scheduler=scheduler):
            fitted = BalancedEstimator(margins, steps=3).fit(X, D)
            assert fitted._dask_fit.samples.design_cached
            got = fitted.mean(H)
        assert_same_mean(got, BalancedEstimator(margins, steps=3).fit(data, d).mean(h))
    assert calls == []


@pytest.mark.parametrize("design_fits", [True, False])
def test_design_weights_cached_with_the_codes(samples_path, monkeypatch, design_fits):
    """The design weights are read once (kept with the codes) when codes and weights fit the budget;
    else read in every pass; the results are the same."""
    from databalance import _dask_samples

    data, h, d, margins = three_margins(1000, seed=34)
    budget = 1000 * 3 * 1 + (1000 * 8 if design_fits else 7999)  # three uint8 codes (+ float64 weights)
    monkeypatch.setattr(_dask_samples, "cache_budget", lambda: float(budget))
    loads = []
    design = da.from_array(d, chunks=250).map_blocks(lambda b: loads.append(len(b)) or b, dtype=np.float64)
    with dask.config.set(scheduler="threads"):
        fitted = BalancedEstimator(margins, steps=4).fit({k: da.from_array(v, chunks=250) for k, v in data.items()},
                                                           sample_weight=design)
        assert fitted._dask_fit.samples.encoded is not None
        assert fitted._dask_fit.samples.design_cached == design_fits
        got = fitted.mean(da.from_array(h, chunks=(250, -1)))
    fit_loads = sum(loads)
    if design_fits:
        assert fit_loads <= 2 * len(d)  # the cache, and the lazy weights' check of the cell masses at most
    else:
        assert fit_loads >= (fitted.balance_.steps + 1) * len(d)  # every pass
    assert_same_mean(got, BalancedEstimator(margins, steps=4).fit(data, d).mean(h))


def test_step_tables_only_with_earlier_steps_margins(samples_path):
    """Step l's two-way tables are gathered only with the margins of steps 1..l-1 (what the mean's
    recursion reads): none at step 1, one at step 2, every other margin from step K + 1 on."""
    data, h, d, margins = three_margins(600, seed=35)
    X, H, D = lazy(data, h, d, chunks=(300, 300))
    with dask.config.set(scheduler="sync"):
        fitted = BalancedEstimator(margins, steps=5).fit(X, D)
    fit = fitted._dask_fit
    sizes = fit.samples.sizes
    gathered = {l_step: [b for b, t in enumerate(tables) if t.size] for l_step, (_, tables) in
                fit.iterate_tables.items()}
    assert gathered == {1: [], 2: [0], 3: [0, 1], 4: [1, 2], 5: [0, 2]}
    for l_step, (_, tables) in fit.iterate_tables.items():
        for b in gathered[l_step]:
            assert tables[b].size == sizes[(l_step - 1) % 3] * sizes[b]
    assert_same_mean(fitted.mean(H), BalancedEstimator(margins, steps=5).fit(data, d).mean(h))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("wanted", [(), (1,), (0, 2)])
def test_compiled_weight_pass_with_some_tables_equals_numpy(weighted, wanted):
    pytest.importorskip("numba")
    from databalance._dask_samples import TABLE_BLOCK, WeightSums

    rng = np.random.default_rng(36)
    sizes, n = [3, 7, 300], 2 * TABLE_BLOCK + 123  # blocks of the tables' weights: two full, one partial
    codes = [rng.integers(0, s, n) for s in sizes]
    d = rng.uniform(0.5, 2.0, n) if weighted else None
    factors = [rng.uniform(0.1, 3.0, s) for s in sizes]
    a = 1 if 1 not in wanted else 0
    want = WeightSums(factors, sizes, a, False, wanted)(codes, d, None)
    got = WeightSums(factors, sizes, a, True, wanted)([c.astype(np.uint16) for c in codes], d, None)
    for b, (x, y) in enumerate(zip(got["tables"], want["tables"], strict=True)):
        assert x.size == (sizes[a] * sizes[b] if b in wanted and b != a else 0)
        np.testing.assert_array_equal(x, y)
    for x, y in zip(got["sums"], want["sums"], strict=True):
        np.testing.assert_array_equal(x, y)
    close(got["u2"], want["u2"], rtol=1e-13)
    full = WeightSums(factors, sizes, a, False)(codes, d, None)["tables"]  # every table: the same where wanted
    for b in wanted:
        np.testing.assert_array_equal(want["tables"][b], full[b])


@pytest.mark.parametrize("pairs_of", [None, 2])
def test_compiled_weight_pass_adds_into_an_earlier_result(pairs_of):
    """A worker's groups share one result: a compiled pass over the second group adds its sums and
    tables into the first group's arrays in place, and equals one pass over both groups (the
    samples' order); u^2 and the extremes combine."""
    pytest.importorskip("numba")
    from databalance._dask_samples import WeightSums

    rng = np.random.default_rng(48)
    sizes, n = [4, 9, 300], 5000
    codes = [rng.integers(0, s, n).astype(np.uint16) for s in sizes]
    d = rng.uniform(0.5, 2.0, n)
    factors = [rng.uniform(0.1, 3.0, s) for s in sizes]
    task = WeightSums(factors, sizes, pairs_of, True)
    assert task.accumulates and not WeightSums(factors, sizes, pairs_of, False).accumulates
    whole = task(codes, d, None)
    first = task([c[:1800] for c in codes], d[:1800], None)
    arrays = [id(x) for x in first["sums"] + first.get("tables", [])]
    both = task([c[1800:] for c in codes], d[1800:], None, first)
    assert [id(x) for x in both["sums"] + both.get("tables", [])] == arrays  # in place
    for x, y in zip(both["sums"] + both.get("tables", []), whole["sums"] + whole.get("tables", []), strict=True):
        np.testing.assert_array_equal(x, y)  # the samples added in the same order
    close(both["u2"], whole["u2"], rtol=1e-14)
    assert (both["min_u"], both["max_u"]) == (whole["min_u"], whole["max_u"])


def _slow_passes(dask_worker=None):
    """On a worker: its pass tasks wait 3 s first (a worker can be lost while one runs)."""
    import time as clock

    from databalance import _dask_samples

    original = _dask_samples._groups_pass
    _dask_samples._groups_pass = lambda *a, **k: clock.sleep(3) or original(*a, **k)


@pytest.mark.parametrize("on_disk", [False, True])
@pytest.mark.parametrize("during", [False, True])
def test_submitted_mean_after_a_worker_is_replaced(samples_path, monkeypatch, on_disk, during):
    """A worker holding cached groups (in memory or on its disk) is replaced, between the fit and
    the mean or while a pass of the mean runs (its tasks are pinned to the groups' workers, never
    stolen: a group on disk would move into memory; a pinned worker that leaves cancels the pass):
    the groups are made again elsewhere from the columns, the pass runs again where they now are,
    no hang, and the in-memory result."""
    import threading

    pytest.importorskip("distributed")
    from databalance import _dask_samples

    if on_disk:
        monkeypatch.setattr(_dask_samples, "CACHE_FRACTION", 1e-12)
    data, h, d, margins = three_margins(800, seed=37)
    X, H, D = lazy(data, h, d, chunks=(200,) * 4)
    with local_cluster() as client, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = BalancedEstimator(margins, steps=3).fit(X, D)
        assert fitted._dask_fit.samples.spilled == on_disk
        homes = fitted._dask_fit.samples.homes
        assert homes and all(homes.values())
        victim = next(iter(homes.values()))[0]
        out: dict = {}
        thread = threading.Thread(target=lambda: out.setdefault("mean", fitted.mean(H)), daemon=True)
        if during:
            client.run(_slow_passes)
            thread.start()
            time.sleep(1.0)  # the first pass's tasks are running (3 s each)
        client.restart_workers([victim])
        if not during:
            thread.start()
        thread.join(120)
        assert "mean" in out, "the mean waited for a worker that left"
        assert_same_mean(out["mean"], BalancedEstimator(margins, steps=3).fit(data, d).mean(h))


def spill_files(client) -> dict:
    """Each worker's files of spilled groups (:class:`_dask_samples.Spilled`) in its local directory."""
    import glob

    return client.run(lambda dask_worker: sorted(glob.glob(os.path.join(dask_worker.local_directory,
                                                                        "databalance-*.npy-group"))))


@pytest.mark.parametrize("steps, tables", [(5, True), (5, False), (None, True)])
def test_codes_and_values_spilled_to_the_workers_disks(samples_path, monkeypatch, steps, tables):
    """Codes (with the design weights) and a mean's values that do not fit the workers' memory
    budget are written to files in the workers' local directories, once, and every later pass reads
    them there (submitted as futures); the results equal the in-memory ones; the values' files go
    when the mean returns, the codes' when the fit is dropped."""
    pytest.importorskip("distributed")
    from databalance import _dask_samples

    monkeypatch.setattr(_dask_samples, "CACHE_FRACTION", 1e-12)  # nothing fits the memory budget
    monkeypatch.setattr(_dask_samples, "GROUP_MAX", 300)
    if not tables:
        one_pass_per_step(monkeypatch)
    calls = spy_submitted(monkeypatch)
    data, h, d, margins = three_margins(1200, seed=43)
    X, H, D = lazy(data, h, d, chunks=(100,) * 12)
    with local_cluster() as client:
        fitted = BalancedEstimator(margins, steps=steps).fit(X, D)
        samples = fitted._dask_fit.samples
        assert samples.spilled and samples.design_cached and len(samples.groups) == 4
        files = spill_files(client)
        assert sorted(len(f) for f in files.values()) == [2, 2]  # a file a group, two groups a worker
        sizes = [os.path.getsize(f) for names in files.values() for f in names]
        # per group of 300: three margins' uint8 codes and the design weights, each from a multiple of 64 bytes
        assert sizes == [3 * 320 + 300 * 8] * 4
        held = client.run(lambda dask_worker, keys=[f.key for f in samples.held]: [
            type(dask_worker.data[k][0]).__name__ for k in keys if k in dask_worker.data])
        assert sorted(sum(held.values(), [])) == ["Spilled"] * 4, held  # the workers hold files, not arrays
        got = fitted.mean(H)
        assert calls and all(with_values for name, with_values in calls if name != "WeightSums")  # values held
        settled(lambda: [len(f) for f in spill_files(client).values()] == [2, 2])  # the values' files released
        ref = BalancedEstimator(margins, steps=steps).fit(data, d)
        assert_same_fit(fitted, ref, chunks=((100,) * 12,))
        assert_same_mean(got, ref.mean(h))
        del fitted, samples, got
        gc.collect()
        settled(lambda: not any(spill_files(client).values()))  # the codes' files with the fit


def settled(condition, timeout: float = 10.0) -> None:
    """Wait until ``condition()`` holds (a released key reaches the workers a moment later)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.05)


def test_disk_fraction_zero_keeps_nothing_on_disk(samples_path, monkeypatch):
    pytest.importorskip("distributed")
    from databalance import _dask_samples

    monkeypatch.setattr(_dask_samples, "CACHE_FRACTION", 1e-12)
    monkeypatch.setattr(_dask_samples, "DISK_FRACTION", 0.0)
    data, h, d, margins = three_margins(600, seed=44)
    X, H, D = lazy(data, h, d, chunks=(200,) * 3)
    with local_cluster() as client:
        assert _dask_samples.disk_budget() == 0.0
        fitted = BalancedEstimator(margins, steps=3).fit(X, D)
        assert fitted._dask_fit.samples.encoded is None  # every pass reads the columns
        got = fitted.mean(H)
        assert not any(spill_files(client).values())
    assert_same_mean(got, BalancedEstimator(margins, steps=3).fit(data, d).mean(h))


def test_disk_budget_of_the_cluster(samples_path, monkeypatch):
    """The smallest free space of the workers' local directories, times DISK_FRACTION; codes that
    exceed it are not cached at all (without a client nothing goes to disk)."""
    pytest.importorskip("distributed")
    from databalance import _dask_samples

    assert _dask_samples.disk_budget() == 0.0
    monkeypatch.setattr(_dask_samples, "CACHE_FRACTION", 1e-12)
    data, h, d, margins = three_margins(600, seed=45)
    X, H, D = lazy(data, h, d, chunks=(200,) * 3)
    with local_cluster() as client:
        free = client.run(lambda dask_worker: shutil.disk_usage(dask_worker.local_directory).free)
        assert _dask_samples.disk_budget() == pytest.approx(_dask_samples.DISK_FRACTION * min(free.values()),
                                                            rel=1e-3)
        monkeypatch.setattr(_dask_samples, "disk_budget", lambda: 600 * 3 - 1.0)  # codes one byte too many
        fitted = BalancedEstimator(margins, steps=3).fit(X)
        assert fitted._dask_fit.samples.encoded is None and not any(spill_files(client).values())
        monkeypatch.setattr(_dask_samples, "disk_budget", lambda: 600 * 3 + 600 * 8 - 1.0)  # codes, not design
        fitted = BalancedEstimator(margins, steps=3).fit(X, D)
        samples = fitted._dask_fit.samples
        assert samples.spilled and not samples.design_cached
        assert_same_mean(fitted.mean(H), BalancedEstimator(margins, steps=3).fit(data, d).mean(h))


def test_spilled_groups_made_a_few_at_a_time(samples_path, monkeypatch):
    """Groups kept on disk are made at most two per worker thread at once (the next submitted as one
    is done, so the workers never hold every partition's codes), all of them end on disk, and an
    error in a group (a label not listed, NaN values) names its partition."""
    distributed = pytest.importorskip("distributed")
    from databalance import _dask_samples

    monkeypatch.setattr(_dask_samples, "CACHE_FRACTION", 1e-12)
    monkeypatch.setattr(_dask_samples, "GROUP_MAX", 100)
    waits: list = []
    wait = distributed.wait
    monkeypatch.setattr(distributed, "wait", lambda fs, **kw: (kw.get("return_when") == "FIRST_COMPLETED" and
                                                              waits.append(len(fs))) or wait(fs, **kw))
    x, y, h, _ = sample(1200)
    h = h[:, 0].copy()
    cols = {"x": da.from_array(x, chunks=100), "y": da.from_array(y, chunks=100)}
    with local_cluster() as client:
        fitted = BalancedEstimator({"x": PX, "y": PY}, steps=3).fit(cols)
        assert len(fitted._dask_fit.samples.groups) == 12 and sum(map(len, spill_files(client).values())) == 12
        assert waits and max(waits) == 4  # two groups per worker thread in the making
        got = fitted.mean(da.from_array(h, chunks=100))
        nan = h.copy()
        nan[430] = np.nan
        with pytest.raises(ValueError, match=r"`values` contains NaN or inf, first at sample 30.*Dask partition 4"):
            fitted.mean(da.from_array(nan, chunks=100))
        bad = x.copy()
        bad[1010] = 7
        with pytest.raises(ValueError, match=r"`x`.*7.*Dask partition 10"):
            BalancedEstimator({"x": PX, "y": PY}, steps=3).fit({"x": da.from_array(bad, chunks=100), "y": cols["y"]})
    ref = BalancedEstimator({"x": PX, "y": PY}, steps=3).fit({"x": x, "y": y}).mean(h)
    close(got.estimate, ref.estimate)
    close(got.standard_error, ref.standard_error)


def test_an_error_while_groups_are_made_releases_them(samples_path, monkeypatch):
    """Review: a label not listed in one group while the groups are streamed to disk raises, and
    every group persisted so far is released (files and futures), not held by the error."""
    pytest.importorskip("distributed")
    from databalance import _dask_samples

    monkeypatch.setattr(_dask_samples, "CACHE_FRACTION", 1e-12)
    monkeypatch.setattr(_dask_samples, "GROUP_MAX", 100)
    x, y, _, _ = sample(1200)
    x = x.copy()
    x[150] = 7
    with local_cluster() as client:
        with pytest.raises(ValueError, match=r"`x`.*7.*Dask partition 1"):
            BalancedEstimator({"x": PX, "y": PY}, steps=3).fit({"x": da.from_array(x, chunks=100),
                                                                "y": da.from_array(y, chunks=100)})
        gc.collect()
        settled(lambda: not any(spill_files(client).values()) and not client.futures)


def test_passes_after_a_worker_left_keep_groups_on_disk(samples_path, monkeypatch):
    """Review: after a worker holding spilled groups is replaced, a pass asks where the groups are
    again (they were made anew on the workers present) instead of sending one task, over all the
    lost worker's groups, wherever (those groups would have moved, into memory); and a mean's
    values, spilled too, are placed where the codes are now (placed at the lost worker, they had
    arrived in the pass's worker's memory)."""
    pytest.importorskip("distributed")
    from databalance import _dask_samples

    monkeypatch.setattr(_dask_samples, "CACHE_FRACTION", 1e-12)
    monkeypatch.setattr(_dask_samples, "GROUP_MAX", 100)
    data, h, d, margins = three_margins(1200, seed=48)
    X, H, D = lazy(data, h, d, chunks=(100,) * 12)
    seen: list = []
    original = _dask_samples._submitted

    def spy(client, samples, task, values):
        out = original(client, samples, task, values)
        if values is not None and not seen:  # the values' blocks after the mean's first pass
            seen.append(client.run(lambda dask_worker, keys=[f.key for f in values.futures]: [
                type(dask_worker.data[k][0]).__name__ for k in keys if k in dask_worker.data]))
        return out

    monkeypatch.setattr(_dask_samples, "_submitted", spy)
    with local_cluster(n_workers=3) as client, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = BalancedEstimator(margins, steps=3).fit(X, D)
        samples = fitted._dask_fit.samples
        victim = next(iter(samples.homes.values()))[0]
        client.restart_workers([victim])
        settled(lambda: victim not in client.nthreads() and len(client.nthreads()) == 3, 60)
        got = fitted.mean(H)
        kinds = client.run(lambda dask_worker, keys=[f.key for f in samples.held]: [
            type(dask_worker.data[k][0]).__name__ for k in keys if k in dask_worker.data])
        assert sorted(sum(kinds.values(), [])) == ["Spilled"] * 12  # none moved into memory
        assert sorted(sum(seen[0].values(), [])) == ["Spilled"] * 12  # the values' blocks neither
        assert not {w for ws in samples.homes.values() for w in ws} - set(client.nthreads())
    assert_same_mean(got, BalancedEstimator(margins, steps=3).fit(data, d).mean(h))


def test_a_worker_restarted_at_its_address_holds_no_stale_groups(samples_path, monkeypatch):
    """Workers with fixed ports (``dask worker --worker-port``): a worker restarted by its nanny comes
    back at the same address, so ``_submitted``'s check (homes' workers still in the cluster) passes
    and the stale homes are used: groups recomputed elsewhere are fetched into the pinned worker."""
    distributed = pytest.importorskip("distributed")
    from distributed import Nanny, Scheduler, SpecCluster

    from databalance import _dask_samples

    monkeypatch.setattr(_dask_samples, "CACHE_FRACTION", 1e-12)
    monkeypatch.setattr(_dask_samples, "GROUP_MAX", 100)
    data, h, d, margins = three_margins(1200, seed=48)
    X, H, D = lazy(data, h, d, chunks=(100,) * 12)
    opts = {"nthreads": 1, "memory_limit": "1GiB", "host": "127.0.0.1"}
    workers = {i: {"cls": Nanny, "options": {**opts, "worker_port": 47311 + i}} for i in range(3)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster = SpecCluster(workers=workers, scheduler={"cls": Scheduler,
                                                          "options": {"dashboard_address": None, "host": "127.0.0.1"}})
        client = distributed.Client(cluster)
    try:
        fitted = BalancedEstimator(margins, steps=3).fit(X, D)
        samples = fitted._dask_fit.samples
        victim = next(iter(samples.homes.values()))[0]
        before = {k: list(w) for k, w in samples.homes.items()}
        client.restart_workers([victim])
        settled(lambda: victim in client.nthreads() and len(client.nthreads()) == 3, 60)
        time.sleep(3)
        now = {k: list(w) for k, w in client.who_has(list(samples.held)).items()}
        assert any(before[k] != now[k] for k in now)  # the restarted worker's groups were made elsewhere
        got = fitted.mean(H)
        kinds = client.run(lambda dask_worker, keys=[f.key for f in samples.held]: [
            type(dask_worker.data[k][0]).__name__ for k in keys if k in dask_worker.data])
    finally:
        client.close()
        cluster.close()
    assert_same_mean(got, BalancedEstimator(margins, steps=3).fit(data, d).mean(h))
    assert sorted(sum(kinds.values(), [])) == ["Spilled"] * 12


@pytest.mark.parametrize("on_disk", [False, True])
def test_two_thread_workers_add_their_groups_in_place(samples_path, monkeypatch, on_disk):
    """Two-thread workers (two chains per worker, each accumulating its groups in place), design
    weights, a mean (tables): equal to the in-memory result."""
    distributed = pytest.importorskip("distributed")
    from databalance import _dask_samples

    if on_disk:
        monkeypatch.setattr(_dask_samples, "CACHE_FRACTION", 1e-12)
    monkeypatch.setattr(_dask_samples, "GROUP_MAX", 100)
    data, h, d, margins = three_margins(1600, seed=51)
    X, H, D = lazy(data, h, d, chunks=(100,) * 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster = distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=2,
                                           dashboard_address=None, memory_limit="1GiB")
        client = distributed.Client(cluster)
    try:
        fitted = BalancedEstimator(margins, steps=4).fit(X, D)
        assert fitted._dask_fit.samples.spilled == on_disk
        assert len(fitted._dask_fit.samples.groups) == 16
        got = fitted.mean(H)
    finally:
        client.close()
        cluster.close()
    ref = BalancedEstimator(margins, steps=4).fit(data, d)
    assert_same_mean(got, ref.mean(h))


def test_spill_edge_cases_from_review(samples_path, monkeypatch, tmp_path):
    """Review: CACHE_FRACTION = 0 turns the cache off (not onto disk); a mean's values are not
    written to disk when its passes would not read them (design weights not cached: the passes
    are graphs); object-dtype values get the values' error; a short write is an error that says
    what to do."""
    pytest.importorskip("distributed")
    from databalance import _dask_samples

    data, h, d, margins = three_margins(600, seed=49)
    X, H, D = lazy(data, h, d, chunks=(200,) * 3)
    ref = BalancedEstimator(margins, steps=3).fit(data, d)
    with local_cluster() as client:
        monkeypatch.setattr(_dask_samples, "CACHE_FRACTION", 0.0)
        assert BalancedEstimator(margins, steps=3).fit(X, D)._dask_fit.samples.encoded is None
        assert not any(spill_files(client).values())
        monkeypatch.setattr(_dask_samples, "CACHE_FRACTION", 1e-12)
        monkeypatch.setattr(_dask_samples, "disk_budget", lambda: 600 * 3 + 600 * 8 - 1.0)  # codes, not design
        fitted = BalancedEstimator(margins, steps=3).fit(X, D)
        assert fitted._dask_fit.samples.spilled and not fitted._dask_fit.samples.design_cached
        made: list = []
        on_disk = _dask_samples._on_disk
        monkeypatch.setattr(_dask_samples, "_on_disk", lambda *a: made.append(1) or on_disk(*a))
        assert_same_mean(fitted.mean(H[:, 0]), ref.mean(h[:, 0]))
        assert not made
        with pytest.raises(TypeError, match="real numbers"):
            fitted.mean(da.from_array(h[:, 0].astype(object), chunks=200))
    monkeypatch.setattr(os.path, "getsize", lambda path: 0)  # the system lost the end of the write
    with pytest.raises(OSError, match=r"0 of 10 bytes written.*DISK_FRACTION = 0"):
        _dask_samples.Spilled([np.arange(10, dtype=np.uint8)], str(tmp_path))
    monkeypatch.undo()
    assert not list(tmp_path.iterdir())


def test_codes_encoded_in_the_compact_dtype():
    """The cache's encoding computes integer codes (and a joint margin's keys) in its compact dtype,
    equal to the int64 ones; a label out of range, even one a cast would wrap, is the first pass's
    error, checked before any cast, in later passes too; looked-up labels stay int64."""
    from databalance import _dask_samples
    from databalance.estimators import _plan

    rng = np.random.default_rng(47)
    plan = _plan({"x": np.full(4, 0.25), ("a", "b"): np.full((30, 20), 1 / 600)}, None)
    blocks = [rng.integers(0, 4, 500), rng.integers(0, 30, 500), rng.integers(0, 20, 500)]
    for validate in (True, False):
        wide = _dask_samples._margin_codes(plan, blocks, 3, validate)
        compact = _dask_samples._margin_codes(plan, blocks, 3, validate, np.uint16)
        assert [c.dtype for c in compact] == [np.uint16] * 2
        for w, c in zip(wide, compact, strict=True):
            np.testing.assert_array_equal(w, c)
        for bad in (-1, 65536 + 2, 30):
            labels = blocks[1].astype(np.int64)
            labels[7] = bad
            with pytest.raises(ValueError, match=rf"`a` has code {bad} at sample 7.*Dask partition 3"):
                _dask_samples._margin_codes(plan, [blocks[0], labels, blocks[2]], 3, validate, np.uint16)
    mapped = _plan({"x": {"p": 0.5, "q": 0.5}}, None)
    (codes,) = _dask_samples._margin_codes(mapped, [np.array(["q", "p", "q"])], 0, True, np.uint8)
    assert codes.dtype == np.int64 and codes.tolist() == [1, 0, 1]


def test_spilled_arrays(tmp_path):
    """A spilled group reads back its arrays (dtypes, shapes, empty ones); pickled it is its arrays
    (sent to another worker, it needs no file there); its file goes with it; a failed write says
    what to do."""
    import pickle

    from databalance._dask_samples import Spilled, unspilled

    arrays = [np.arange(5, dtype=np.uint16), np.zeros(0, np.uint8), np.arange(6.0).reshape(3, 2)]
    group = Spilled(arrays, str(tmp_path))
    (path,) = list(tmp_path.iterdir())
    for got in (group.load(), unspilled(group), pickle.loads(pickle.dumps(group))):
        assert [(a.dtype, a.shape) for a in got] == [(a.dtype, a.shape) for a in arrays]
        for a, b in zip(got, arrays, strict=True):
            np.testing.assert_array_equal(a, b)
            assert type(a) is np.ndarray and a.flags.aligned and a.ctypes.data % 8 == 0
    loaded = group.load()
    assert not loaded[0].flags.writeable  # mapped read-only: a pass cannot change the cache
    assert all(offset % 64 == 0 for _, _, offset in group.layout)
    assert unspilled(arrays) is arrays
    del group
    gc.collect()
    assert not path.exists()
    pieces = Spilled([[np.arange(3, dtype=np.uint8), np.arange(3, 10, dtype=np.uint8)], [np.ones((2, 2))]],
                     str(tmp_path))  # a group's partitions, written one after the other
    joined, ones = pieces.load()
    assert joined.dtype == np.uint8 and joined.tolist() == list(range(10))
    np.testing.assert_array_equal(ones, np.ones((2, 2)))
    with pytest.raises(OSError, match="DISK_FRACTION = 0"):
        Spilled(arrays, str(tmp_path / "missing"))


def test_dataframe_columns_with_a_joint_margin_on_the_samples_path(samples_path):
    """A Dask DataFrame's columns arrive read-only and a joint margin's codes are computed (writable):
    the compiled passes take both (they once failed to type a tuple of the two)."""
    rng = np.random.default_rng(41)
    n = 6000
    df = pd.DataFrame({"a": rng.integers(0, 20, n), "b": rng.integers(0, 15, n), "c": rng.integers(0, 4, n),
                       "d": rng.integers(0, 5, n), "h": rng.normal(size=n)})
    margins = {"a": np.full(20, 1 / 20), "b": np.full(15, 1 / 15), ("c", "d"): np.full((4, 5), 1 / 20)}
    ref = BalancedEstimator(margins, steps=3).fit(df[["a", "b", "c", "d"]]).mean(df["h"])
    ddf = dd.from_pandas(df, npartitions=4)
    with dask.config.set(scheduler="sync"):
        got = BalancedEstimator(margins, steps=3).fit(ddf[["a", "b", "c", "d"]]).mean(ddf["h"])
    assert_same_mean(got, ref)


def _worker_keys(client) -> set:
    import gc
    import time

    gc.collect()
    time.sleep(1.0)  # the releases reach the workers
    gc.collect()
    return {str(k) for keys in client.run(lambda dask_worker: list(dask_worker.data)).values() for k in keys}


def test_a_failed_mean_leaves_no_results_on_the_cluster(cluster, samples_path):
    """A pass whose task raises (NaN in values) releases its futures before the error goes on: the
    client keeps the erred future's exception, whose traceback would hold them."""
    data, h, d, margins = three_margins(800, seed=43)
    X, H, D = lazy(data, h, d, chunks=(200,) * 4)
    bad = h.copy()
    bad[500] = np.nan
    with cluster.as_current(), dask.config.set(scheduler=cluster):
        fitted = BalancedEstimator(margins, steps=3).fit(X, D)
        before = _worker_keys(cluster)
        with pytest.raises(ValueError, match="NaN"):
            fitted.mean(lazy(data, bad, d, chunks=(200,) * 4)[1])
        for _ in range(10):  # the releases reach the workers in their own time
            left = _worker_keys(cluster) - before
            if not left:
                break
        assert not left, f"left on the cluster after the failed mean: {sorted(left)[:5]}"
