"""The fused sparse kernel (CSR/CSC) against scipy's products through the NumPy path."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

import databalance as db

from .test_fused import SETTINGS, STEPS, assert_same, both, problems

pytest.importorskip("numba")


@SETTINGS
@given(problems(holes=True), STEPS, st.sampled_from(["csr", "csc"]))
def test_sparse_matches_numpy(problem, steps, fmt):
    table, p, q = problem
    S = sp.csr_array(table).asformat(fmt)
    a, b = both(db.balance_table, S, p, q, steps=steps)
    assert_same(a, b, ["row_scaling", "col_scaling"], table.dtype)
    assert b.table.format == fmt



def test_power_law_rows_and_empty_rows_sparse():
    """Blocks of equal nonzeros: one row holding most entries, rows with none (zero targets)."""
    rng = np.random.default_rng(2)
    T = np.zeros((60, 50))
    T[7] = rng.random(50) + 0.1
    T[rng.random((60, 50)) < 0.05] = 1.0
    T[:, 0] += 0.5
    T[[3, 11]] = 0.0
    witness = T * rng.uniform(0.5, 2.0, T.shape)  # targets a table on this support has: feasible
    p, q = witness.sum(axis=1), witness.sum(axis=0)
    a, b = both(db.balance_table, sp.csr_array(T), p, q)
    assert b.converged
    assert_same(a, b, ["row_scaling", "col_scaling"], np.float64)
