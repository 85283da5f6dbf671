"""Plots of results (databalance.plotting and the results' plot methods) and MisspecifiedProfile.best_k.

Every plot is drawn on a bare matplotlib Figure (its own Agg canvas: no backend is touched), and
the data it drew is compared with the result's own numbers. The import guard and the backend are
checked in fresh processes.
"""

import doctest
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from databalance import (
    balance_margins,
    balance_table,
    misspecified_profile,
    spectrum,
    variance_profile,
)
from databalance.plotting import plot_balance

P3 = np.array([[0.10, 0.05, 0.05], [0.05, 0.20, 0.05], [0.05, 0.05, 0.40]])
H3 = np.array([[1.0, 0.0, 2.0], [0.0, 3.0, 1.0], [2.0, 1.0, 0.0]])


@pytest.fixture
def ax():
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure()
    FigureCanvasAgg(fig)
    return fig.add_subplot()


def _random_problem(seed, shape=(4, 5)):
    rng = np.random.default_rng(seed)
    P = rng.gamma(2.0, size=shape)
    return P / P.sum(), rng.normal(size=shape)


# -- plot_balance ----------------------------------------------------------------------------------


def test_plot_balance_draws_every_margins_error_per_half_step(ax):
    res = balance_table(P3, [0.3, 0.3, 0.4], [0.4, 0.3, 0.3], steps=12)
    assert plot_balance(res, ax) is ax
    assert [line.get_label() for line in ax.lines] == ["p_x (rows)", "p_y (columns)"]
    for j, line in enumerate(ax.lines):
        np.testing.assert_array_equal(line.get_xdata(), np.arange(13))
        np.testing.assert_array_equal(line.get_ydata(), res.marginal_error[:, j])
    assert ax.get_yscale() == "log"
    assert ax.get_xlabel() == "k (half-steps)"


def test_plot_balance_rate_line_has_the_given_slope_through_the_last_error(ax):
    res = balance_table(P3, [0.3, 0.3, 0.4], [0.4, 0.3, 0.3], steps=12)
    s2 = spectrum(res.table).max_correlation
    plot_balance(res, ax, rate=s2)
    predicted = ax.lines[-1]
    assert predicted.get_label() == f"predicted: {s2:.3g} per half-step"
    k, y = np.asarray(predicted.get_xdata()), np.asarray(predicted.get_ydata())
    worst = res.marginal_error.max(axis=1)
    assert k[-1] == 12 and y[-1] == worst[-1]
    np.testing.assert_allclose(y[1:] / y[:-1], s2, rtol=1e-12)
    assert y.max() <= worst.max()  # never drawn above the data
    # The prediction is honest: over the last sweeps the measured error falls by s_2^2 per sweep.
    np.testing.assert_allclose(worst[-1] / worst[-3], s2**2, rtol=0.05)


def test_plot_balance_of_many_margins_and_of_a_batch(ax):
    rng = np.random.default_rng(0)
    T = rng.gamma(2.0, size=(3, 4, 5))
    res = balance_margins(T, {0: np.ones(3) / 3, 1: np.ones(4) / 4, (1, 2): np.ones((4, 5)) / 20}, steps=5)
    plot_balance(res, ax)
    assert [line.get_label() for line in ax.lines] == ["margin 0", "margin 1", "margin (1, 2)"]
    for j, line in enumerate(ax.lines):
        np.testing.assert_array_equal(line.get_ydata(), res.marginal_error[:, j])

    batch = balance_table(T, np.ones(4) / 4, np.ones(5) / 5, steps=6)  # 3 tables of 4 x 5
    ax.clear()
    plot_balance(batch, ax)
    assert ax.lines[0].get_label() == "p_x (rows) (largest over the batch)"
    for j, line in enumerate(ax.lines):
        np.testing.assert_array_equal(line.get_ydata(), batch.marginal_error[..., j].max(axis=0))


def test_plot_balance_rate_line_ends_where_the_errors_become_exact_zeros(ax):
    # An independent table reaches its targets exactly in two half-steps: the line stops at k = 1.
    res = balance_table(np.ones((2, 3)), [0.5, 0.5], [0.2, 0.3, 0.5], steps=4)
    assert res.marginal_error[0].all() and res.marginal_error[1, 0] == 0 and not res.marginal_error[2:].any()
    plot_balance(res, ax, rate=0.5)
    k, y = ax.lines[-1].get_xdata(), ax.lines[-1].get_ydata()
    worst = res.marginal_error.max(axis=1)
    assert list(k) == [0, 1] and list(y) == [worst[1] / 0.5, worst[1]]
    ax.clear()
    plot_balance(balance_table(np.ones((2, 2)), [0.5, 0.5], [0.5, 0.5], steps=2), ax, rate=0.5)
    assert len(ax.lines) == 2


@pytest.mark.parametrize("rate", [0, -0.5, 1.5, np.inf, np.nan, True, "0.5"])
def test_plot_balance_rejects_a_bad_rate(ax, rate):
    res = balance_table(P3, [0.3, 0.3, 0.4], [0.4, 0.3, 0.3], steps=2)
    with pytest.raises(ValueError, match=r"`rate` must be the predicted error factor per half-step, a number in "
                                         r"\(0, 1\]"):
        plot_balance(res, ax, rate=rate)
    assert not ax.lines  # nothing drawn before the check


def test_plot_balance_rejects_what_is_not_a_balancing_result(ax):
    with pytest.raises(TypeError, match=r"`result` must be a balancing result with a `marginal_error` array of "
                                        r"shape \(\.\.\., steps \+ 1, K\).*got ndarray"):
        plot_balance(np.zeros((3, 2)), ax)
    with pytest.raises(TypeError, match="got SpectrumResult"):
        plot_balance(spectrum(P3), ax)


def test_every_plot_rejects_an_ax_that_is_not_an_axes():
    pytest.importorskip("matplotlib")
    res = balance_table(P3, [0.3, 0.3, 0.4], [0.4, 0.3, 0.3], steps=2)
    prof = misspecified_profile(P3, H3, [0.3, 0.3, 0.4], [0.4, 0.3, 0.3], max_steps=2)
    message = r"`ax` must be a matplotlib Axes .*or None for a new one; got str"
    for draw in (lambda: plot_balance(res, "axes"), lambda: spectrum(P3).plot("axes"),
                 lambda: variance_profile(P3, H3, max_steps=2).plot("axes"), lambda: prof.plot(10, "axes")):
        with pytest.raises(TypeError, match=message):
            draw()


# -- the results' plot methods ---------------------------------------------------------------------


def test_spectrum_plot_draws_the_singular_values_and_marks_s2(ax):
    res = spectrum(P3)
    assert res.plot(ax) is ax
    values, s2 = ax.lines
    np.testing.assert_array_equal(values.get_xdata(), [1, 2, 3])
    np.testing.assert_array_equal(values.get_ydata(), res.singular_values)
    assert list(s2.get_xdata()) == [2] and list(s2.get_ydata()) == [res.max_correlation]
    assert s2.get_label() == f"$s_2$ = {res.max_correlation:.4g}"


def test_spectrum_plot_of_a_disconnected_table_says_so(ax):
    res = spectrum(np.array([[1.0, 0.0], [0.0, 1.0]]))
    res.plot(ax)
    assert "(2 components)" in ax.get_title()
    assert list(ax.lines[1].get_ydata()) == [1.0]


def test_variance_profile_plot_draws_sigma2_and_its_limit(ax):
    prof = variance_profile(P3, H3, max_steps=6)
    assert prof.plot(ax) is ax
    curve, limit = ax.lines
    np.testing.assert_array_equal(curve.get_xdata(), np.arange(7))
    np.testing.assert_array_equal(curve.get_ydata(), prof.sigma2)
    assert list(limit.get_ydata()) == [prof.sigma2_limit] * 2


def test_variance_profile_plot_of_several_functions_draws_each(ax):
    P, h = _random_problem(1)
    H = np.stack([h, h**2], axis=-1)
    prof = variance_profile(P, H, max_steps=4)
    prof.plot(ax)
    assert len(ax.lines) == 4
    for i in range(2):
        curve, limit = ax.lines[2 * i : 2 * i + 2]
        np.testing.assert_array_equal(curve.get_ydata(), prof.sigma2[:, i])
        assert list(limit.get_ydata()) == [prof.sigma2_limit[i]] * 2
        assert curve.get_color() == limit.get_color()


def test_misspecified_plot_draws_bias2_variance_over_n_and_mse(ax):
    prof = misspecified_profile(P3, H3, [0.3, 0.3, 0.4], [0.4, 0.3, 0.3], max_steps=6)
    n = 50
    assert prof.plot(n, ax) is ax
    bias2, variance, mse, best = ax.lines
    np.testing.assert_array_equal(bias2.get_ydata(), prof.bias**2)
    np.testing.assert_array_equal(variance.get_ydata(), prof.variance / n)
    np.testing.assert_array_equal(mse.get_ydata(), prof.mse(n))
    assert list(best.get_xdata()) == [prof.best_k(n)] * 2
    assert best.get_label() == f"best k = {prof.best_k(n)}"
    assert "n = 50" in ax.get_title()


def test_misspecified_plot_of_several_functions_needs_function(ax):
    P, h = _random_problem(2, shape=(3, 3))
    prof = misspecified_profile(P, np.stack([h, h**2], axis=-1), [0.2, 0.3, 0.5], [0.4, 0.4, 0.2], max_steps=4)
    with pytest.raises(ValueError, match=r"This profile holds 2 functions: pass `function` = an index in 0\.\.1"):
        prof.plot(10, ax)
    with pytest.raises(ValueError, match=r"an index in 0\.\.1 to choose the one to plot; got 2"):
        prof.plot(10, ax, function=2)
    assert not ax.lines
    prof.plot(10, ax, function=1)
    np.testing.assert_array_equal(ax.lines[2].get_ydata(), prof.mse(10)[:, 1])
    assert list(ax.lines[3].get_xdata()) == [prof.best_k(10)[1]] * 2

    single = misspecified_profile(P, h, [0.2, 0.3, 0.5], [0.4, 0.4, 0.2], max_steps=4)
    with pytest.raises(ValueError, match="this profile holds one; leave it out"):
        single.plot(10, ax, function=0)
    with pytest.raises(ValueError, match="`n` must be a positive integer; got 0"):
        single.plot(0, ax)


# -- best_k ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_best_k_is_the_argmin_of_the_predicted_mse(seed):
    """Wrong targets: best_k equals an explicit search over k of bias^2 + variance / n, for n from
    tiny to huge; it is > 0 for small n (balancing helps), and 0 once the bias dominates."""
    P, h = _random_problem(seed)
    rng = np.random.default_rng(100 + seed)
    p_x = P.sum(1) * rng.uniform(0.8, 1.2, size=4)
    p_y = P.sum(0) * rng.uniform(0.8, 1.2, size=5)
    prof = misspecified_profile(P, h, p_x / p_x.sum(), p_y / p_y.sum(), max_steps=8)
    chosen = []
    for n in (1, 10, 100, 10**3, 10**4, 10**6, 10**9):
        mse = [prof.bias[k] ** 2 + prof.variance[k] / n for k in range(9)]
        explicit = min(range(9), key=lambda k, mse=mse: (mse[k], k))
        assert prof.best_k(n) == explicit
        chosen.append(prof.best_k(n))
    assert chosen[0] > 0
    assert chosen[-1] == 0
    assert isinstance(chosen[0], int)


def test_best_k_on_the_documented_two_by_two_case():
    prof = misspecified_profile(np.array([[0.3, 0.2], [0.1, 0.4]]), [[1, 0], [0, 0]], [0.6, 0.4], [0.4, 0.6],
                                max_steps=6)
    # mse(100) = 0.0021, 0.005328, 0.001074, ... : the minimum at k = 2 (computed by hand from
    # bias = 0, .06, .0273 and variance = .21, .1728, .0330).
    assert prof.best_k(100) == 2
    assert prof.best_k(1000) == 0


def test_best_k_with_correct_targets_is_the_last_step_or_where_the_profile_stops_changing():
    """Correct targets: no bias (to rounding), the variance is sigma_k^2 itself, and best_k is the
    largest k computed while sigma_k^2 still falls (here it falls at every step up to k = 8,
    whatever n); run longer, it is the first k of the converged plateau."""
    P, h = _random_problem(0)
    short = misspecified_profile(P, h, P.sum(1), P.sum(0), max_steps=8)
    sigma2 = variance_profile(P, h, max_steps=8).sigma2
    np.testing.assert_allclose(short.variance, sigma2, rtol=1e-12)
    assert np.abs(short.bias).max() < 1e-15
    assert np.all(np.diff(sigma2) < 0)
    assert [short.best_k(n) for n in (1, 100, 10**8)] == [8, 8, 8]

    long = misspecified_profile(P, h, P.sum(1), P.sum(0), max_steps=40)
    best = long.best_k(100)
    mse = long.mse(100)
    assert 8 < best < 40
    assert np.all(mse[best:] <= mse.min() * (1 + 1e-12))  # nothing after it is better than rounding
    assert mse[best - 1] > mse.min() * (1 + 1e-12)


def test_best_k_of_several_functions_is_one_k_per_function():
    P, h = _random_problem(3, shape=(3, 3))
    both = misspecified_profile(P, np.stack([h, 5 * h**2], axis=-1), [0.2, 0.3, 0.5], [0.4, 0.4, 0.2],
                                max_steps=5)
    for n in (1, 30, 10**5):
        best = both.best_k(n)
        assert best.shape == (2,)
        for i in range(2):
            assert best[i] == int(np.argmin(both.mse(n)[:, i]))


def test_best_k_rejects_a_bad_n():
    prof = misspecified_profile(P3, H3, [0.3, 0.3, 0.4], [0.4, 0.3, 0.3], max_steps=2)
    for n in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="`n` must be a positive integer"):
            prof.best_k(n)


# -- matplotlib absent, the backend, the guide -----------------------------------------------------


def _run(script: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_without_matplotlib_every_plot_says_how_to_install_it(tmp_path):
    proc = _run("""
        import sys
        sys.modules["matplotlib"] = None  # what an environment without matplotlib looks like
        import numpy as np
        from databalance import balance_table, misspecified_profile, spectrum, variance_profile
        from databalance.plotting import plot_balance
        P = np.array([[.3, .2], [.1, .4]])
        draws = [lambda: plot_balance(balance_table(P, [.5, .5], [.5, .5], steps=2)),
                 lambda: spectrum(P).plot(), lambda: variance_profile(P, P, max_steps=2).plot(),
                 lambda: misspecified_profile(P, P, [.6, .4], [.4, .6], max_steps=2).plot(10)]
        for draw in draws:
            try:
                draw()
            except ImportError as err:
                print(err)
        # Input is still checked first.
        try:
            plot_balance(balance_table(P, [.5, .5], [.5, .5], steps=2), rate=2)
        except ValueError as err:
            print("ValueError", err)
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    message = 'matplotlib is not installed, so nothing can be plotted. Install it with: pip install "databalance[plot]"'
    assert proc.stdout.count(message) == 4, proc.stdout
    assert "ValueError `rate` must be" in proc.stdout


def test_plots_leave_the_backend_alone_and_import_pyplot_only_if_the_caller_did(tmp_path):
    pytest.importorskip("matplotlib")
    proc = _run("""
        import sys
        import matplotlib
        from databalance import spectrum
        ax = spectrum([[.3, .2], [.1, .4]]).plot()
        print("pyplot" if "matplotlib.pyplot" in sys.modules else "no pyplot")
        ax.figure.savefig("bare.png")
        matplotlib.use("svg")
        import matplotlib.pyplot as plt
        ax = spectrum([[.3, .2], [.1, .4]]).plot()
        print(matplotlib.get_backend(), ax.figure.number in plt.get_fignums())
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["no pyplot", "svg True"]
    assert (tmp_path / "bare.png").read_bytes()[:4] == b"\x89PNG"


def test_spectrum_guide_examples_run():
    """docs/guide/spectrum.rst: its >>> examples run and print what the page says."""
    pytest.importorskip("matplotlib")
    page = pathlib.Path(__file__).parents[1] / "docs" / "guide" / "spectrum.rst"
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    result = doctest.testfile(str(page), module_relative=False, optionflags=flags, raise_on_error=False)
    assert result.attempted >= 10
    assert result.failed == 0
