"""The `databalance reproduce` command: runs, is deterministic, and its report shows the claims."""

import json
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import databalance
from databalance import reproduce
from databalance.cli import main


def test_quick_reproduction_writes_report_and_figures(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["reproduce", "--out", str(tmp_path), "--quick", "--seed", "3", "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert "Summary" in out and "[6/6] many_margins done" in out
    report = (tmp_path / "report.md").read_text()
    for name in ("variance_reduction", "spectrum", "misspecified", "k_versus_n", "coverage", "many_margins"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
        assert f"({name}.png)" in report
    results = json.loads((tmp_path / "results.json").read_text())
    # Table A at n = 10^4: n MSE within Monte Carlo error of sigma_k^2 for every k reported, and the
    # report counts every k.
    row = next(r for r in results["variance_reduction"]["rows"]
               if r["case"] == "3x3 table A, reference h" and r["n"] == 10**4)
    assert len(row["sigma2"]) == len(row["nmse"]) == results["variance_reduction"]["K"] + 1 == 9
    for k in range(9):
        assert abs(row["nmse"][k] - row["sigma2"][k]) < 3 * row["nmse_se"][k], k
    assert "k = 0..8 within 3 Monte Carlo SE of sigma_k^2: 9/9" in report
    # Coverage has both designs, each within 4 binomial SE of 95% at every k.
    cov = results["coverage"]
    assert [d["design"] for d in cov["designs"]] == ["simple random sample",
                                                     "unequal selection probabilities, weights 1/pi"]
    for d in cov["designs"]:
        assert np.all(np.abs(np.array(d["coverage"]) - 0.95) < 4 * np.sqrt(0.95 * 0.05 / cov["reps"])), d
    # ... and a setting where balancing increases the MSE.
    assert any(max(r["mse"][1:]) > r["mse"][0] for r in results["misspecified"]["rows"])
    # Three margins (one joint) at n = 10^4: every k = 0..9 within 3 Monte Carlo SE of sigma_k^2, counted
    # in the report; IPF's per-sweep error factor is the sweep_rate of the table it converges to.
    many = results["many_margins"]
    row = next(r for r in many["rows"] if r["n"] == 10**4)
    assert len(row["sigma2"]) == len(row["nmse"]) == many["K"] + 1 == 10
    for k in range(10):
        assert abs(row["nmse"][k] - row["sigma2"][k]) < 3 * row["nmse_se"][k], k
    assert "), n = 10000** (150 replications; 100% of samples had every margin cell; " \
           "k = 0..9 within 3 Monte Carlo SE of sigma_k^2: 10/10)" in report
    for r in many["rows"]:
        assert r["observed_rate"] == pytest.approx(r["predicted_rate"], rel=1e-3)
    assert row["predicted_rate"] == pytest.approx(many["sweep_rate"], abs=0.02)
    # Parallel runs give the numbers of a serial call with the same seed (experiment i gets seed + i).
    assert json.dumps(results["spectrum"]) == json.dumps(reproduce.EXPERIMENTS["spectrum"](True, 3 + 1))
    assert json.dumps(many) == json.dumps(reproduce.EXPERIMENTS["many_margins"](True, 3 + 5))


@pytest.mark.parametrize("name", ["spectrum", "k_versus_n", "misspecified"])
def test_same_seed_same_numbers(name):
    a = reproduce.EXPERIMENTS[name](True, 11)
    b = reproduce.EXPERIMENTS[name](True, 11)
    assert json.dumps(a) == json.dumps(b)


def test_missing_matplotlib_gives_a_clear_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert reproduce._figures({}, tmp_path) == []
    assert 'pip install "databalance[plot]"' in capsys.readouterr().err


def test_without_matplotlib_doctests_collect_and_reproduce_explains(tmp_path):
    """In a fresh process where importing matplotlib fails: collecting the package's doctests works,
    and a reproduction writes its report and says how to get the figures."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["matplotlib"] = None  # what an environment without matplotlib looks like
        import pytest
        code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "--rootdir", {str(tmp_path)!r},
                            "--doctest-modules", {str(pathlib.Path(databalance.__file__).parent)!r}])
        assert code == 0, code
        from databalance import reproduce
        reproduce.EXPERIMENTS = {{"spectrum": reproduce.EXPERIMENTS["spectrum"]}}
        reproduce._report.SECTIONS = [s for s in reproduce._report.SECTIONS if s[0] == "spectrum"]
        reproduce._report.summary = lambda results: "summary"
        reproduce.run({str(tmp_path / "out")!r}, quick=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "error" not in proc.stdout.lower(), proc.stdout
    assert 'matplotlib is not installed, so the report has tables but no figures. ' \
           'Install it with: pip install "databalance[plot]"' in proc.stderr
    assert (tmp_path / "out" / "report.md").exists() and not list((tmp_path / "out").glob("*.png"))


def test_figures_leave_the_process_backend_alone(tmp_path):
    """Drawing must not switch matplotlib's backend for the whole process (pyplot users keep theirs)."""
    script = textwrap.dedent(f"""
        import pathlib
        import matplotlib
        matplotlib.use("svg")
        from databalance import _figures, reproduce
        results = {{name: reproduce.EXPERIMENTS[name](True, 0) for name in ("spectrum", "k_versus_n")}}
        out = pathlib.Path({str(tmp_path)!r})
        _figures._spectrum(results).savefig(out / "s.png")
        _figures._k_versus_n(results).savefig(out / "k.png")
        print(matplotlib.get_backend())
    """)
    pytest.importorskip("matplotlib")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "svg"
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_best_k_rule_is_the_same_for_both_curves():
    # The fewest steps within the tolerance of the minimum: k = 1 here, not the argmin k = 2.
    assert reproduce.best_k([3.0, 1.05, 1.0, 1.2], [0.5, 0.1, 0.0, 0.1]) == 1
    assert reproduce.best_k([3.0, 1.2, 1.0, 1.2], [0.5, 0.1, 0.0, 0.1]) == 2
    # A predicted curve whose minimum is elsewhere: the tolerance is per k, the minimum the curve's own.
    assert reproduce.best_k([1.0, 2.0, 3.0], [0.0, 5.0, 5.0]) == 0
    res = reproduce.EXPERIMENTS["k_versus_n"](True, 5)
    for m, band, b, bp, pred in zip(res["mse"], res["band"], res["best"], res["best_predicted"],
                                    res["predicted_mse"], strict=True):
        assert b == reproduce.best_k(m, band) and bp == reproduce.best_k(pred, band)
        assert band[int(np.argmin(m))] == 0


def test_weighted_design_recovers_the_population():
    """Weights 1/pi undo the unequal selection: the weighted cell shares estimate COVERAGE_P and the
    weighted mean of h its population mean, within Monte Carlo error."""
    rng = np.random.default_rng(2)
    n = 200_000
    x, y, h, w = reproduce.draw_sample(rng, n, weighted=True)
    assert w.max() / w.min() == 24
    shares = np.zeros_like(reproduce.COVERAGE_P)
    np.add.at(shares, (x, y), w)
    shares /= shares.sum()
    # Ratio-estimator SE of a share: sqrt(sum d^2 (1{c} - share)^2) / sum d, per cell.
    d = w / w.sum()
    for (i, j), share in np.ndenumerate(shares):
        se = np.sqrt((d**2 * (((x == i) & (y == j)) - share) ** 2).sum())
        assert abs(share - reproduce.COVERAGE_P[i, j]) < 4 * se, (i, j)
    mean = (d * h).sum()
    se = np.sqrt((d**2 * (h - mean) ** 2).sum())
    assert abs(mean - (reproduce.COVERAGE_P * reproduce.COVERAGE_H).sum()) < 4 * se
    # Without the design, no weights and the population's own cell shares.
    x, y, h, w = reproduce.draw_sample(rng, 1000, weighted=False)
    assert w is None and h.shape == (1000,)


def test_weak_dependence_table_matches_theory():
    P = reproduce.weak_dependence_table()
    assert P.shape == (50, 50)
    np.testing.assert_allclose(P.sum(), 1.0)
    # Reference values of the theory page: row marginal between 0.0015 and 0.0385 (rounded), s_2 = 0.0408645
    assert 0.00145 < P.sum(1).min() < 0.0015 and 0.0385 < P.sum(1).max() < 0.0386
    from databalance import spectrum

    np.testing.assert_allclose(spectrum(P).max_correlation, 0.0408645, atol=1e-7)


def test_many_margin_estimates_are_balance_margins_at_every_k():
    """One-step calls on the previous iterate give balance_margins(counts, margins, steps=k)."""
    P, h = reproduce.many_margins_table()
    targets = {key: reproduce.margin_of(P, key) for key in reproduce.MANY_MARGINS}
    counts = np.random.default_rng(4).multinomial(500, P.ravel()).reshape(P.shape) / 500
    est = reproduce.margin_step_estimates(counts, targets, h, 7)
    direct = [(counts * h).sum()] + [(databalance.balance_margins(counts, targets, steps=k).table * h).sum()
                                     for k in range(1, 8)]
    np.testing.assert_allclose(est, direct, rtol=1e-13)
    assert list(targets) == [(0, 1), 2, 0]
    np.testing.assert_allclose(targets[(0, 1)], P.sum(axis=2))


def test_many_margin_samples_kept_only_when_balancing_is_defined():
    """The filter agrees with balance_margins: a margin cell with a positive target and no sample is
    refused by both."""
    P, h = reproduce.many_margins_table()
    targets = {key: reproduce.margin_of(P, key) for key in reproduce.MANY_MARGINS}
    counts = np.random.default_rng(5).multinomial(1000, P.ravel()).reshape(P.shape) / 1000
    assert reproduce.has_every_margin_cell(counts, targets)
    counts[:, :, 3] = 0  # axis 2's category 3 is empty
    assert not reproduce.has_every_margin_cell(counts, targets)
    with pytest.raises(ValueError, match=r"Margin 2 cell 3 of `table` is empty .* no rescaling can reach"):
        databalance.balance_margins(counts, targets, steps=2)
    target = targets[2].copy()
    target[3] = 0.0  # a target of 0 needs no sample
    assert reproduce.has_every_margin_cell(counts, {2: target})


def test_many_margin_table_and_its_profile_by_brute_force():
    """The experiment's table has no tiny cell, and its sigma_k^2 and sigma_inf^2 equal explicit
    conditional-mean projections on the full array (independent of variance_profile's code)."""
    P, h = reproduce.many_margins_table()
    assert P.shape == (3, 4, 5) and 0.003 < P.min() and P.sum() == pytest.approx(1)

    def remove_mean(f, keep):  # C_j f = f - E[f | the margin's axes]
        axes = tuple(a for a in range(3) if a not in keep)
        return f - (P * f).sum(axis=axes, keepdims=True) / P.sum(axis=axes, keepdims=True)

    keeps = [(0, 1), (2,), (0,)]
    prof = databalance.variance_profile(P, h, max_steps=9, margins=list(reproduce.MANY_MARGINS))
    for k in range(10):
        f = h - (P * h).sum()
        for j in reversed(range(k)):  # the last step's operator acts first
            f = remove_mean(f, keeps[j % 3])
        assert prof.sigma2[k] == pytest.approx((P * f**2).sum(), rel=1e-10), k
    # sigma_inf^2: the weighted least-squares residual on functions of (x, y) plus functions of z.
    rows = []
    for keep in keeps:
        codes = np.ravel_multi_index(np.indices(P.shape)[list(keep)], [P.shape[a] for a in keep]).ravel()
        rows.append(np.eye(codes.max() + 1)[codes])
    X, w = np.hstack(rows), np.sqrt(P.ravel())
    coef = np.linalg.lstsq(X * w[:, None], h.ravel() * w, rcond=None)[0]
    assert prof.sigma2_limit == pytest.approx((P.ravel() * (h.ravel() - X @ coef) ** 2).sum(), rel=1e-6)


@pytest.fixture
def instant_experiments(monkeypatch):
    """Two instant experiments and no report or figures: only run()'s own bookkeeping is tested."""
    monkeypatch.setattr(reproduce, "EXPERIMENTS", {"first": lambda quick, seed: {"seed": seed},
                                                   "second": lambda quick, seed: {"seed": seed}})
    monkeypatch.setattr(reproduce, "_figures", lambda results, out: [])
    monkeypatch.setattr(reproduce._report, "markdown", lambda *args, **kwargs: "report")
    monkeypatch.setattr(reproduce._report, "summary", lambda results: "Summary")


def test_progress_callback_and_bad_progress(tmp_path, instant_experiments):
    calls = []
    results = reproduce.run(tmp_path / "a", seed=4, log=lambda msg: None,
                            progress=lambda done, values: calls.append((done, values.shape)))
    assert results == {"first": {"seed": 4}, "second": {"seed": 5}}
    assert calls == [(1, (1,)), (2, (1,))]
    with pytest.raises(TypeError, match=r"`progress` must be True, False or a callable"):
        reproduce.run(tmp_path / "b", log=lambda msg: None, progress="bar")
    assert not (tmp_path / "b").exists()  # refused before anything is created


def test_cli_progress_draws_on_stderr_and_keeps_the_lines_on_stdout(tmp_path, instant_experiments, capsys,
                                                                    monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # without tqdm: the plain line
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    assert main(["reproduce", "--out", str(tmp_path), "--progress"]) == 0
    captured = capsys.readouterr()
    assert "reproduce: experiments done: step 2" in captured.err
    assert "[2/2] second done" in captured.out and "Summary" in captured.out
    assert main(["reproduce", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "[2/2] second done" in captured.out
