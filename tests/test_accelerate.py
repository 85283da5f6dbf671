"""Accelerated convergence (``acceleration=``): same limit as plain IPF, honest status, fallback."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import databalance as db
from databalance import _accelerate


def block_table(n: int, eps: float, seed: int = 0, batch: tuple = ()) -> np.ndarray:
    """Two diagonal blocks linked by entries of size ``eps``: s_2 near 1 - c eps when balanced to
    uniform targets (a slowly mixing table)."""
    rng = np.random.default_rng(seed)
    T = rng.random(batch + (n, n)) * eps
    h = n // 2
    T[..., :h, :h] += rng.random(batch + (h, h))
    T[..., h:, h:] += rng.random(batch + (n - h, n - h))
    return T


def l1_errors(table: np.ndarray, p, q) -> float:
    """The largest marginal error of a returned table, computed here (not by the library)."""
    total = np.sum(p)
    rows = np.abs(table.sum(axis=-1) - p).sum(axis=-1) / total
    cols = np.abs(table.sum(axis=-2) - q).sum(axis=-1) / total
    return float(max(np.max(rows), np.max(cols)))


def instances(monkeypatch, cls) -> list:
    """The instances of ``cls`` created from now on (its ``__init__`` spied on)."""
    made = []
    init = cls.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(cls, "__init__", spy)
    return made


@pytest.fixture
def wrappers(monkeypatch):
    """The accelerated kernels the runs create."""
    return instances(monkeypatch, _accelerate.Accelerated)


@pytest.fixture
def controllers(monkeypatch):
    """The controllers the runs create, to inspect what they decided."""
    return instances(monkeypatch, _accelerate.Controller)


@pytest.mark.parametrize("method", ["auto", "overrelax", "anderson"])
@pytest.mark.parametrize("eps", [1e-2, 1e-3])
def test_converged_result_equals_plain_ipf(eps, method, controllers, wrappers):
    T = block_table(60, eps)
    p = np.full(60, 1 / 60)
    plain = db.balance_table(T, p, p, acceleration="none")
    fast = db.balance_table(T, p, p, acceleration=method)
    assert plain.converged and fast.converged
    assert controllers[-1].relaxed_from is not None and not controllers[-1].fell_back
    assert controllers[-1].method == ("anderson" if method == "auto" else method)
    assert fast.steps < plain.steps / 3
    extra = wrappers[-1].anderson.rejected  # a rejected extrapolation costs one read
    fused = db.which_kernel(T) == "numba"  # e.g. DATABALANCE_KERNEL=numba
    for res, more in ((fast, extra), (plain, 0)):
        if fused:  # one read per sweep, one plain product at the start
            assert res.passes <= res.steps // 2 + 2 + more
        else:  # one read per half-step
            assert res.passes == res.steps + 1 + more
    assert l1_errors(fast.table, p, p) <= 1e-10
    # both within tol of the same limit: their tables differ by about tol (relative to the mass)
    assert np.abs(fast.table - plain.table).sum() <= 4e-10
    assert fast.marginal_error[-1].max() <= 1e-10


def test_exact_steps_are_never_relaxed():
    T = block_table(30, 1e-3)
    p = np.full(30, 1 / 30)
    for k in (1, 2, 7, 40):
        a = db.balance_table(T, p, p, steps=k, acceleration="none")
        b = db.balance_table(T, p, p, steps=k, acceleration="overrelax")
        np.testing.assert_array_equal(a.row_scaling, b.row_scaling)
        np.testing.assert_array_equal(a.col_scaling, b.col_scaling)
        np.testing.assert_array_equal(a.marginal_error, b.marginal_error)


def test_fast_mixing_table_falls_back_to_plain_ipf(controllers):
    rng = np.random.default_rng(4)
    T = rng.random((30, 20)) + 0.5
    p, q = rng.random(30) + 0.2, rng.random(20) + 0.2
    q *= p.sum() / q.sum()
    a = db.balance_table(T, p, q, acceleration="none")
    b = db.balance_table(T, p, q, acceleration="auto")  # fast mixing: plain
    assert controllers[-1].omega is None
    assert a.steps == b.steps
    np.testing.assert_array_equal(a.row_scaling, b.row_scaling)


def test_a_bad_factor_falls_back_and_still_converges(controllers, monkeypatch):
    """A factor far above the best one (rate 0.99 per sweep where plain IPF has 0.96) is caught by
    the progress check, which returns to plain IPF; the run converges, a few windows late."""
    monkeypatch.setattr(_accelerate, "young_omega", lambda theta: 1.99)
    T = block_table(60, 1e-2)
    p = np.full(60, 1 / 60)
    plain = db.balance_table(T, p, p, acceleration="none")
    res = db.balance_table(T, p, p, acceleration="overrelax")
    ctl = controllers[-1]
    assert ctl.fell_back and ctl.omega is None and ctl.relaxed_from is not None
    assert res.converged
    assert l1_errors(res.table, p, p) <= 1e-10
    # the check comes after an e-fold of the plain rate (about 25 sweeps here, theta = 0.96); then
    # plain sweeps make up for the ground lost: at most about half of plain IPF's run
    fold = math.ceil(1 / (1 - ctl.theta))
    assert 20 <= fold <= 30
    assert res.steps <= 1.6 * plain.steps


@pytest.mark.parametrize("method", ["auto", "overrelax", "anderson"])
def test_infeasible_in_the_limit_is_never_converged(method):
    """The targets need a positive entry to vanish: IPF converges sublinearly, never to tol."""
    T = np.array([[1.0, 1.0], [1.0, 0.0]])
    p = q = np.array([0.5, 0.5])
    with pytest.warns(db.ConvergenceWarning):
        res = db.balance_table(T, p, q, max_steps=3000, acceleration=method)
    assert res.status in ("max_steps", "stalled")
    assert l1_errors(res.table, p, q) > 1e-10


@pytest.mark.parametrize("method", ["overrelax", "anderson"])
def test_infeasible_support_raises(method):
    T = np.ones((40, 40))
    T[:20, 20:] = 0.0
    T[20:, :20] = 0.0
    p = np.full(40, 1 / 40)
    q = np.r_[np.full(20, 0.3 / 20), np.full(20, 0.7 / 20)]
    with pytest.raises(db.InfeasibleError):
        db.balance_table(T, p, q, acceleration=method)


def test_logits_sparse_and_batches(controllers):
    T = block_table(40, 1e-3, seed=1, batch=(2,))
    p = np.full(40, 1 / 40)
    plain = db.balance_table(T, p, p, acceleration="none")
    fast = db.balance_table(T, p, p, acceleration="auto")
    assert fast.converged and fast.steps < plain.steps / 3
    assert l1_errors(fast.table, p, p) <= 1e-10

    L = np.log(T[0]) * 1.0
    L[0, -1] = -np.inf
    logits = db.balance_logits(L, p, p, acceleration="auto")
    logits_plain = db.balance_logits(L, p, p, acceleration="none")
    assert logits.converged and logits.steps < logits_plain.steps / 3
    assert l1_errors(logits.table, p, p) <= 1e-10
    assert np.isneginf(logits.log_table[0, -1])

    S = sp.csr_array(np.where(T[1] > 5e-4, T[1], 0.0))
    sparse = db.balance_table(S, p, p, acceleration="auto")
    sparse_plain = db.balance_table(S, p, p, acceleration="none")
    assert sparse.converged and sparse.steps < sparse_plain.steps / 3
    assert l1_errors(sparse.table.toarray(), p, p) <= 1e-10


def test_float32_convergence_is_measured_in_float64():
    T = block_table(50, 1e-2).astype(np.float32)
    p = np.full(50, 1 / 50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", db.ConvergenceWarning)
        res = db.balance_table(T, p, p, tol=1e-5, acceleration="auto")
    assert res.table.dtype == np.float32
    if res.converged:
        assert l1_errors(res.table.astype(np.float64), p, p) <= 1e-5


def test_fused_kernels_relax_inside_their_pass(controllers):
    pytest.importorskip("numba")
    import os

    from databalance._kernels import fused

    T = block_table(64, 1e-3, seed=2)
    p = np.full(64, 1 / 64)
    os.environ[fused.ENV] = "numba"
    try:
        fast = db.balance_table(T, p, p, acceleration="auto")
        plain = db.balance_table(T, p, p, acceleration="none")
    finally:
        del os.environ[fused.ENV]
    numpy_fast = db.balance_table(T, p, p, acceleration="auto")  # small: the NumPy kernel
    assert fast.converged and plain.converged and numpy_fast.converged
    # one read per sweep, relaxed or not
    assert fast.passes <= fast.steps // 2 + 3
    assert fast.passes < plain.passes / 3
    assert l1_errors(fast.table, p, p) <= 1e-10
    assert np.abs(fast.table - numpy_fast.table).sum() <= 4e-10


def test_bad_acceleration_option():
    expected = "`acceleration` must be one of 'auto', 'overrelax', 'anderson', 'none'; got 'fast'"
    with pytest.raises(ValueError, match=expected):
        db.balance_table(np.ones((2, 2)), [1, 1], [1, 1], acceleration="fast")
    with pytest.raises(ValueError, match="`acceleration` must be one of"):
        db.balance_logits(np.zeros((2, 2)), [1, 1], [1, 1], acceleration=None)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(st.floats(_accelerate.THETA_AUTO, 0.9999))
def test_the_factor_beats_the_plain_rate(theta):
    """Young's theory for two blocks: at a factor between the best one and 2 the relaxed rate per
    sweep is omega - 1, below the plain rate theta wherever "auto" relaxes."""
    omega = _accelerate.young_omega(theta)
    best = 2.0 / (1.0 + math.sqrt(1.0 - theta))
    assert best <= omega < 2.0
    assert omega - 1.0 < theta


# -- Anderson acceleration --------------------------------------------------------------------------


def lstsq_extrapolation(xs, gs):
    """Type-II Anderson's next iterate from pairs (x_i, g_i), by NumPy's least squares (no ridge)."""
    X, G = np.stack(xs, axis=-1), np.stack(gs, axis=-1)
    F = G - X
    dF, dG = np.diff(F, axis=-1), np.diff(G, axis=-1)
    gamma = np.linalg.lstsq(dF, F[:, -1], rcond=None)[0]
    return G[:, -1] - dG @ gamma


def test_anderson_step_is_the_least_squares_extrapolation():
    rng = np.random.default_rng(3)
    n, memory = 9, 3
    target = rng.random((2, n)) + 0.1
    target[1, 4] = 0.0  # a zero target: its scaling stays 0 and it is left out
    aa = _accelerate.Anderson(memory)
    xs, gs = [[], []], [[], []]
    old = np.where(target > 0, rng.random((2, n)) + 0.5, 0.0)
    for k in range(7):
        sums = rng.random((2, n)) + 0.5
        if k == 5:  # problem 0 restarts: only the pair that follows counts with the new one
            aa.restart(np.array([True, False]))
            xs[0], gs[0] = xs[0][-1:], gs[0][-1:]
        new = aa.step(old, None, target, sums, 1)
        if new is None:  # the plain step, left to the kernel
            assert k == 0
            new = np.where(target > 0, target / sums, 0.0)
        for b in range(2):
            live = target[b] > 0
            xs[b].append(np.log(old[b][live]))
            gs[b].append(np.log(target[b][live] / sums[b][live]))
            xs[b], gs[b] = xs[b][-(memory + 1):], gs[b][-(memory + 1):]
            if len(xs[b]) == 1:
                np.testing.assert_allclose(new[b][live], np.exp(gs[b][-1]), rtol=1e-12)
            else:  # the same up to its level, which sets the margin's mass to 1 (the plain step's)
                expected = np.exp(lstsq_extrapolation(xs[b], gs[b]))
                level = new[b][live] / expected
                np.testing.assert_allclose(level, level[0], rtol=1e-6)
                assert np.sum(new[b] * sums[b]) == pytest.approx(1.0, rel=1e-12)
            assert np.all(new[b][~live] == 0)
        old = new


def test_anderson_step_on_a_frame_is_frame_free():
    """With the log kernel's potentials (a frame), the same absolute scalings come out."""
    rng = np.random.default_rng(5)
    n = 6
    target = rng.random(n) + 0.1
    frame = rng.normal(size=n) * 30
    a, b = _accelerate.Anderson(4), _accelerate.Anderson(4)
    old = rng.random(n) + 0.5
    for _ in range(5):
        sums = rng.random(n) + 0.5
        plain_frame = a.step(old, None, target, sums, 0)
        framed = b.step(old * np.exp(-frame), frame, target, sums * np.exp(frame), 0)
        if plain_frame is None:  # the first pair: the plain step, left to the kernel
            assert framed is None
            plain_frame = target / sums
        else:
            np.testing.assert_allclose(framed * np.exp(frame), plain_frame, rtol=1e-9)
        old = plain_frame


def overshooting(monkeypatch, factor):
    """Make every extrapolation ``factor`` times longer (in log space) than Anderson's."""
    step = _accelerate.Anderson.step

    def longer(self, old, frame, target, sums, nb):
        new = step(self, old, frame, target, sums, nb)
        if new is None or self.pending is None:
            return new
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(new > 0, old * (new / np.where(old > 0, old, 1.0)) ** factor, 0.0)
        return out.astype(new.dtype)

    monkeypatch.setattr(_accelerate.Anderson, "step", longer)


def test_a_rejected_extrapolation_takes_the_plain_step(monkeypatch, wrappers):
    """Extrapolations 30 times too long raise the dual objective: the safeguard replaces them by
    the plain step (one more read each) and the run still converges to plain IPF's limit."""
    T = block_table(60, 1e-2)
    p = np.full(60, 1 / 60)
    q = np.linspace(1, 2, 60)
    q /= q.sum()
    plain = db.balance_table(T, p, q, acceleration="none")
    overshooting(monkeypatch, 30.0)
    res = db.balance_table(T, p, q, acceleration="anderson")
    aa = wrappers[-1].anderson
    assert aa.rejected > 0
    assert res.converged and l1_errors(res.table, p, q) <= 1e-10
    assert np.abs(res.table - plain.table).sum() <= 4e-10
    assert res.passes == res.steps + 1 + aa.rejected
    # after a rejection the iterate is a plain IPF iterate: deliberately broken extrapolations
    # cost a few sweeps more than plain IPF (measured: 162 against 141 half-steps)
    assert res.steps <= 1.25 * plain.steps + 10


def test_anderson_objective_decreases_on_accepted_steps(monkeypatch, wrappers):
    """The dual objective Psi(v) = sum(p log(T v)) - sum(q log v), computed here from the returned
    iterates, never rises along a run (plain steps and accepted extrapolations alike)."""
    T = block_table(40, 1e-2, seed=7)
    p = np.full(40, 1 / 40)
    q = np.linspace(1, 3, 40)
    q /= q.sum()
    psi = []
    for k in range(2, 40, 2):  # every iterate after a column step: the columns' scaling v
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", db.ConvergenceWarning)
            res = db.balance_table(T, p, q, steps=None, max_steps=k, acceleration="anderson")
        v = res.col_scaling
        psi.append(float(np.sum(p * np.log(T @ v)) - np.sum(q * np.log(v))))
    assert wrappers[-1].controller.anderson
    assert all(b <= a + 1e-13 for a, b in zip(psi, psi[1:], strict=False))


@pytest.mark.parametrize("method", ["anderson", "overrelax"])
def test_batched_problems_match_each_problem(method):
    """A batch of a slow, a slower and a fast problem: each converges to its own limit, as alone."""
    T = np.stack([block_table(30, e, seed=s) for s, e in enumerate((1e-2, 1e-3, 1.0))])
    p = np.full(30, 1 / 30)
    res = db.balance_table(T, p, p, acceleration=method)
    assert res.converged
    for b in range(3):
        alone = db.balance_table(T[b], p, p, acceleration="none")
        assert np.abs(res.table[b] - alone.table).sum() <= 4e-10
    assert l1_errors(res.table, p, p) <= 1e-10


def test_anderson_with_zero_targets_and_structural_zeros():
    T = block_table(50, 1e-3, seed=9)
    T[3, :] = 0.0
    T[:, 7] = 0.0
    T[10:20, 30:40] = 0.0
    p = np.full(50, 1.0)
    p[3] = 0.0
    q = np.linspace(1, 2, 50)
    q[7] = 0.0
    q[11] = 0.0
    q *= p.sum() / q.sum()
    plain = db.balance_table(T, p, q, acceleration="none")
    res = db.balance_table(T, p, q, acceleration="anderson")
    assert res.converged and res.steps < plain.steps / 2
    assert l1_errors(res.table, p, q) <= 1e-10
    assert np.all(res.table[3] == 0) and np.all(res.table[:, [7, 11]] == 0)
    assert np.abs(res.table - plain.table).sum() / p.sum() <= 4e-10


def test_anderson_on_transport_logits_moves_frames():
    """exp(-M / reg) spans hundreds of orders of magnitude: the log kernel absorbs scalings into its
    potentials (new frames) as the run goes; Anderson's potentials are absolute, so it converges."""
    n, reg = 150, 1e-3
    x = np.linspace(0, 1, n)
    M = (x[:, None] - x[None, :]) ** 2
    a = np.exp(-((x - 0.3) ** 2) / 0.02) + 0.2
    b = np.exp(-((x - 0.7) ** 2) / 0.05) + 0.2
    a, b = a / a.sum(), b / b.sum()
    plain = db.balance_logits(-M / reg, a, b, acceleration="none")
    res = db.balance_logits(-M / reg, a, b, acceleration="auto")
    assert plain.converged and res.converged
    assert res.steps < plain.steps / 4
    assert l1_errors(res.table, a, b) <= 1e-10
    # the limit, closer: within tol of the margins a table is within about tol / (1 - s_2^2) of it,
    # and plain IPF's sweeps to tol tell 1 / (1 - s_2^2) ~ sweeps / log(error_0 / tol)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", db.ConvergenceWarning)
        limit = db.balance_logits(-M / reg, a, b, acceleration="none", tol=1e-14, max_steps=100_000)
    conditioning = plain.steps / 2 / math.log(1e10)
    for r in (res, plain):
        assert np.abs(r.table - limit.table).sum() <= 4e-10 * conditioning


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("start", ["x", "y"])
def test_fused_kernels_keep_one_read_per_sweep_with_anderson(order, start, monkeypatch, wrappers):
    pytest.importorskip("numba")
    from databalance._kernels import fused

    T = np.asarray(block_table(64, 1e-3, seed=2), order=order)
    p = np.full(64, 1 / 64)
    q = np.linspace(1, 2, 64)
    q /= q.sum()
    numpy_res = db.balance_table(T, p, q, start=start, acceleration="anderson")  # small: NumPy kernel
    monkeypatch.setenv(fused.ENV, "numba")
    fast = db.balance_table(T, p, q, start=start, acceleration="anderson")
    plain = db.balance_table(T, p, q, start=start, acceleration="none")
    assert fast.converged and plain.converged and numpy_res.converged
    rejected = wrappers[-2].anderson.rejected
    assert fast.passes <= fast.steps // 2 + 3 + rejected
    assert fast.passes < plain.passes / 2
    assert l1_errors(fast.table, p, q) <= 1e-10
    assert np.abs(fast.table - numpy_res.table).sum() <= 4e-10


def test_array_api_inputs_refuse_anderson():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="`acceleration='anderson'` is available for NumPy and scipy.sparse"):
        db.balance_table(torch.ones(2, 2, dtype=torch.float64), [0.5, 0.5], [0.5, 0.5], acceleration="anderson")


@settings(max_examples=25, deadline=None)
@given(st.integers(4, 24), st.integers(4, 24), st.floats(1e-4, 1.0), st.integers(0, 2**31 - 1),
       st.sampled_from(["auto", "anderson", "overrelax"]))
def test_accelerated_limit_is_plain_ipfs(m, l, eps, seed, method):
    """Random near-block tables and positive targets: the accelerated run is converged exactly when
    plain IPF is, its table within tol of the targets (checked here) and of plain IPF's table."""
    rng = np.random.default_rng(seed)
    T = rng.random((m, l)) * eps
    T[: m // 2, : l // 2] += rng.random((m // 2, l // 2))
    T[m // 2:, l // 2:] += rng.random((m - m // 2, l - l // 2))
    p, q = rng.random(m) + 0.1, rng.random(l) + 0.1
    q *= p.sum() / q.sum()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", db.ConvergenceWarning)
        plain = db.balance_table(T, p, q, acceleration="none", max_steps=200_000)
        fast = db.balance_table(T, p, q, acceleration=method, max_steps=200_000)
    assert plain.converged and fast.converged
    assert l1_errors(fast.table, p, q) <= 1e-10
    # two tables within tol of the same margins: the KL projection's limit to about tol (times the
    # conditioning, 1 / (1 - s_2), which eps bounds here)
    assert np.abs(fast.table - plain.table).sum() / p.sum() <= 1e-10 * (4 + 2 / eps)


def test_anderson_without_progress_falls_back_to_plain_ipf(monkeypatch, controllers):
    """Extrapolations that leave the scaling where it was pass the objective check (no rise) but
    make no progress: the progress check, one e-fold of the plain rate later, returns to plain IPF."""
    step = _accelerate.Anderson.step

    def standing_still(self, old, frame, target, sums, nb):
        new = step(self, old, frame, target, sums, nb)
        return old.copy() if self.pending is not None else new

    T = block_table(60, 1e-2)
    p = np.full(60, 1 / 60)
    plain = db.balance_table(T, p, p, acceleration="none")
    monkeypatch.setattr(_accelerate.Anderson, "step", standing_still)
    res = db.balance_table(T, p, p, acceleration="anderson")
    ctl = controllers[-1]
    assert ctl.fell_back and not ctl.anderson and ctl.relaxed_from is not None
    assert res.converged and l1_errors(res.table, p, p) <= 1e-10
    fold = max(_accelerate.WINDOW, math.ceil(1 / (1 - ctl.theta)))
    assert res.steps <= plain.steps + 2 * (fold + 2)


def test_anderson_on_a_sparse_banded_table():
    """A tridiagonal table (a chain of lines: s_2 very near 1) in CSR, a few entries per line."""
    rng = np.random.default_rng(0)
    n = 50
    T = sp.diags([rng.random(n - 1) + 0.5, rng.random(n) + 0.5, rng.random(n - 1) + 0.5], [-1, 0, 1], format="csr")
    p = np.ones(n)
    q = 1 + 0.1 * np.sin(np.arange(n))
    q *= p.sum() / q.sum()
    plain = db.balance_table(T, p, q, acceleration="none", max_steps=100_000)
    res = db.balance_table(T, p, q, acceleration="auto", max_steps=100_000)
    assert plain.converged and res.converged
    assert res.steps < plain.steps / 10
    dense = res.table.toarray()
    assert l1_errors(dense, p, q) <= 1e-10
    conditioning = plain.steps / 2 / math.log(1e10)
    assert np.abs(dense - plain.table.toarray()).sum() / n <= 4e-10 * conditioning


def test_acceleration_without_numba():
    """numba blocked: the NumPy kernels run, and both methods still converge (no optional import)."""
    import subprocess
    import sys

    code = """
import sys
sys.modules["numba"] = None
import numpy as np
import databalance as db
rng = np.random.default_rng(0)
T = rng.random((300, 300)) * 1e-3
T[:150, :150] += rng.random((150, 150))
T[150:, 150:] += rng.random((150, 150))
p = np.full(300, 1 / 300)
assert db.which_kernel(T) == "numpy"
plain = db.balance_table(T, p, p, acceleration="none")
for method in ("auto", "anderson", "overrelax"):
    res = db.balance_table(T, p, p, acceleration=method)
    assert res.converged and res.steps * 5 < plain.steps, (method, res.steps, plain.steps)
    assert res.passes >= res.steps + 1
    assert np.abs(res.table - plain.table).sum() < 4e-9
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_anderson_history_never_outgrows_the_table(monkeypatch):
    """A few rows and many columns: the history of the long margin's scalings is cut to fit the
    table's size (or the floor); when not even a memory of 2 fits, "auto" over-relaxes instead."""
    from databalance import _accelerate as acc
    from databalance import _kernels as kernels

    monkeypatch.setattr(acc, "HISTORY_FLOOR", 0)
    wide, tall = kernels.DenseKernel(np.ones((4, 1000))), kernels.DenseKernel(np.ones((40, 1000)))
    assert acc.anderson_memory(wide, 1) == 1 and acc.anderson_memory(tall, 1) == acc.MEMORY
    assert acc.anderson_memory(tall, 0) == acc.MEMORY
    assert acc.Accelerated(wide, "auto").controller.method == "overrelax"
    assert acc.Accelerated(wide, "anderson").anderson.memory == 2  # asked for by name
    assert acc.Accelerated(tall, "auto").controller.method == "anderson"
    rng = np.random.default_rng(0)
    T = rng.random((4, 1000)) * 0.05
    T[:2, :500] += 1.0
    T[2:, 500:] += 1.0
    p, q = np.full(4, 0.25), np.full(1000, 1e-3)
    plain = db.balance_table(T, p, q)
    fast = db.balance_table(T, p, q, acceleration="auto")
    assert fast.converged and np.abs(fast.table - plain.table).sum() <= 2e-10
