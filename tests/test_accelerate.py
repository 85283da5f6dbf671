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


@pytest.fixture
def controllers(monkeypatch):
    """The controllers the runs create, to inspect what they decided."""
    made = []
    init = _accelerate.Controller.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(_accelerate.Controller, "__init__", spy)
    return made


@pytest.mark.parametrize("eps", [1e-2, 1e-3])
def test_converged_result_equals_plain_ipf(eps, controllers):
    T = block_table(60, eps)
    p = np.full(60, 1 / 60)
    plain = db.balance_table(T, p, p)
    fast = db.balance_table(T, p, p, acceleration="auto")
    assert plain.converged and fast.converged
    assert controllers[-1].relaxed_from is not None and not controllers[-1].fell_back
    assert fast.steps < plain.steps / 3
    for res in (fast, plain):  # one read per half-step; a fused kernel reads once per sweep
        if db.which_kernel(T) == "numpy":
            assert res.passes == res.steps + 1
        else:
            assert res.passes <= res.steps // 2 + 3
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
    res = db.balance_table(T, p, p, acceleration="auto")
    ctl = controllers[-1]
    assert ctl.fell_back and ctl.omega is None and ctl.relaxed_from is not None
    assert res.converged
    assert l1_errors(res.table, p, p) <= 1e-10
    # the check comes after an e-fold of the plain rate (about 25 sweeps here, theta = 0.96); then
    # plain sweeps make up for the ground lost: at most about half of plain IPF's run
    fold = math.ceil(1 / (1 - ctl.theta))
    assert 20 <= fold <= 30
    assert res.steps <= 1.6 * plain.steps


def test_infeasible_in_the_limit_is_never_converged():
    """The targets need a positive entry to vanish: IPF converges sublinearly, never to tol."""
    T = np.array([[1.0, 1.0], [1.0, 0.0]])
    p = q = np.array([0.5, 0.5])
    with pytest.warns(db.ConvergenceWarning):
        res = db.balance_table(T, p, q, max_steps=3000, acceleration="auto")
    assert res.status in ("max_steps", "stalled")
    assert l1_errors(res.table, p, q) > 1e-10


def test_infeasible_support_raises():
    T = np.ones((40, 40))
    T[:20, 20:] = 0.0
    T[20:, :20] = 0.0
    p = np.full(40, 1 / 40)
    q = np.r_[np.full(20, 0.3 / 20), np.full(20, 0.7 / 20)]
    with pytest.raises(db.InfeasibleError):
        db.balance_table(T, p, q, acceleration="overrelax")


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
    with pytest.raises(ValueError, match="`acceleration` must be one of 'auto', 'overrelax', 'none'; got 'fast'"):
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
