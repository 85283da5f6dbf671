"""The fused numba kernels against the NumPy path; which kernel runs; the library without numba."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import databalance as db
from databalance import _kernels as kernels
from databalance._kernels import fused

numba = pytest.importorskip("numba")

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextlib.contextmanager
def kernel_choice(value: str | None):
    """Set DATABALANCE_KERNEL for the block (hypothesis cannot take function-scoped fixtures)."""
    old = os.environ.get(fused.ENV)
    if value is None:
        os.environ.pop(fused.ENV, None)
    else:
        os.environ[fused.ENV] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(fused.ENV, None)
        else:
            os.environ[fused.ENV] = old


def both(fn, *args, **kwargs):
    """``fn`` run on the NumPy kernels and on the fused ones (a run that does not converge warns on
    both: the comparison of their statuses is the test)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", db.ConvergenceWarning)
        with kernel_choice("numpy"):
            a = fn(*args, **kwargs)
        with kernel_choice("numba"):
            b = fn(*args, **kwargs)
    return a, b


def tolerance(dtype) -> float:
    return 1e-12 if dtype == np.float64 else 2e-5


def assert_same(a, b, names, dtype):
    if dtype == np.float32 and (a.steps, a.status) != (b.steps, b.status):
        # float32 sums added in another order can put a converged run's stopping test on either
        # side of tol (1e-5) when the error crosses it within float32's resolution: only then
        for res in (a, b):
            assert res.converged or (res.status == "stalled" and res.marginal_error[..., -1, :].max() <= 1.05e-5)
        assert abs(a.steps - b.steps) <= 2
        return
    assert a.steps == b.steps
    assert a.status == b.status
    rtol = tolerance(dtype)
    for name in names:
        x, y = getattr(a, name), getattr(b, name)
        finite = np.isfinite(x)
        np.testing.assert_array_equal(y[~finite], x[~finite])  # -inf potentials of zero targets
        scale = np.max(np.abs(x[finite]), initial=0)
        if name.endswith("_potential"):  # logs: an absolute difference is the entries' relative one
            scale = max(scale, 1.0)
        np.testing.assert_allclose(y[finite], x[finite], rtol=rtol, atol=rtol * scale, err_msg=name)
    np.testing.assert_allclose(b.marginal_error, a.marginal_error, rtol=rtol, atol=rtol * 10)


@st.composite
def problems(draw, batch: bool = False, holes: bool = False):
    """A table (positive, or with holes: structural zeros) and targets built as the margins of a
    random table on the same support (so feasible), some of them zero; in float32 or float64."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    m, l = draw(st.integers(1, 70)), draw(st.integers(1, 40))
    shape = ((draw(st.integers(1, 3)),) if batch else ()) + (m, l)
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    support = rng.random(shape) < (0.6 if holes else 2.0)
    support[..., 0, :] = support[..., :, 0] = True
    table = np.where(support, rng.random(shape) + 0.05, 0.0)
    witness = np.where(support, rng.random(shape) + 0.05, 0.0)
    if draw(st.booleans()) and m > 1:  # a zero row target
        witness[..., rng.integers(1, m), :] = 0.0
    if draw(st.booleans()) and l > 1:  # a zero column target
        witness[..., :, rng.integers(1, l)] = 0.0
    witness *= rng.uniform(0.5, 50.0) / witness.sum(axis=(-2, -1), keepdims=True)
    return table.astype(dtype), witness.sum(axis=-1), witness.sum(axis=-2)


STEPS = st.one_of(st.none(), st.integers(1, 9))


@SETTINGS
@given(problems(), STEPS, st.sampled_from("CF"), st.sampled_from("xy"))
def test_dense_matches_numpy(problem, steps, order, start):
    table, p, q = problem
    table = np.asarray(table, order=order)
    a, b = both(db.balance_table, table, p, q, steps=steps, start=start)
    assert_same(a, b, ["row_scaling", "col_scaling"], table.dtype)


@SETTINGS
@given(problems(batch=True), STEPS, st.sampled_from("CF"))
def test_batched_matches_numpy(problem, steps, order):
    table, p, q = problem
    if order == "F":  # each problem's columns contiguous
        table = np.ascontiguousarray(np.swapaxes(table, -1, -2)).swapaxes(-1, -2)
    a, b = both(db.balance_table, table, p, q, steps=steps)
    assert_same(a, b, ["row_scaling", "col_scaling"], table.dtype)


@SETTINGS
@given(problems(batch=True, holes=True), STEPS, st.sampled_from("xy"), st.floats(0.5, 3.0))
def test_logits_match_numpy(problem, steps, start, spread):
    table, p, q = problem
    holes = table == 0
    with np.errstate(divide="ignore"):
        logits = (np.log(table.astype(np.float64)) * spread).astype(table.dtype)
    a, b = both(db.balance_logits, logits, p, q, steps=steps, start=start)
    assert_same(a, b, ["row_potential", "col_potential"], table.dtype)
    assert np.isneginf(b.log_table)[holes].all()
    np.testing.assert_array_equal(np.isneginf(b.log_table), np.isneginf(a.log_table))


def test_fused_pass_reads_the_table_once_per_sweep():
    rng = np.random.default_rng(0)
    T = rng.random((40, 30))
    problem = db._ipf.Problem.from_targets([np.full(40, 1 / 40), np.full(30, 1 / 30)], ["p_x", "p_y"], np.ones(()),
                                          T.dtype)
    with kernel_choice("numba"):
        kernel = kernels.kernel_for(T)
    assert isinstance(kernel, fused.FusedDenseKernel)
    it = db._ipf.half_steps(kernel, problem)
    for _ in range(41):  # iterate 0 and 40 half-steps
        next(it)
    # the first row step's sums come from the frame's; one plain read for the first column step;
    # then one fused read per sweep (the last serves the error of iterate 40)
    assert kernel.reads == 1 + 20


@SETTINGS
@given(problems(batch=True), st.sampled_from("CF"), st.booleans())
def test_products_match_blas(problem, order, rows):
    """The fused kernel's own products (numba, no BLAS) equal the NumPy kernel's."""
    table, _, _ = problem
    if order == "F":
        table = np.ascontiguousarray(np.swapaxes(table, -1, -2)).swapaxes(-1, -2)
    fast, slow = fused.FusedDenseKernel(table), kernels.DenseKernel(table)
    m, l = table.shape[-2:]
    x = np.random.default_rng(0).random(table.shape[:-2] + ((l,) if rows else (m,))).astype(table.dtype)
    got, want = (fast.row_sums(x), slow.row_sums(x)) if rows else (fast.col_sums(x), slow.col_sums(x))
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=tolerance(table.dtype))


def test_fused_kernel_never_calls_blas(monkeypatch):
    """Every product of a fused run goes through numba: a BLAS product on a few cores leaves
    threads spinning that slow the next parallel region down."""
    def refuse(self, x):
        raise AssertionError("a BLAS product in a fused run")

    monkeypatch.setattr(kernels.DenseKernel, "row_sums", refuse)
    monkeypatch.setattr(kernels.DenseKernel, "col_sums", refuse)
    rng = np.random.default_rng(3)
    for T in (rng.random((70, 50)), np.asfortranarray(rng.random((70, 50))), rng.random((2, 70, 50))):
        with kernel_choice("numba"):
            done = db.balance_table(T, np.full(70, 1 / 70), np.full(50, 1 / 50))
            logits = db.balance_logits(np.log(T), np.full(70, 1 / 70), np.full(50, 1 / 50), steps=7)
        assert done.converged and logits.steps == 7


def test_thread_counts_agree():
    rng = np.random.default_rng(1)
    T = rng.random((3, 67, 45))
    p, q = np.full(67, 1 / 67), np.full(45, 1 / 45)
    results = []
    for nt in (1, 2):
        numba.set_num_threads(nt)
        with kernel_choice("numba"):
            results.append(db.balance_table(T, p, q, steps=11))
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    np.testing.assert_allclose(results[0].row_scaling, results[1].row_scaling, rtol=1e-13)
    np.testing.assert_allclose(results[0].col_scaling, results[1].col_scaling, rtol=1e-13)


def test_infeasible_stays_unconverged_with_fused_kernels():
    T = np.ones((64, 64))
    T[:32, 32:] = 0.0
    T[32:, :32] = 0.0
    T[0, 40] = 1e-3  # one link: feasible only through it, so the scalings diverge slowly
    p = np.full(64, 1 / 64)
    q = np.r_[np.full(32, 0.25 / 32), np.full(32, 0.75 / 32)]
    with kernel_choice("numba"), pytest.raises(db.InfeasibleError):
        db.balance_table(T, p, q)


def test_which_kernel_and_the_environment_variable():
    big = np.ones((300, 300))
    with kernel_choice(None):
        assert db.which_kernel(np.ones((3, 3))) == "numpy"
        assert db.which_kernel(big) == "numba"
        assert db.which_kernel(sp.random(1000, 1000, density=0.1, format="csr")) == "numpy"  # scipy's faster
        assert db.which_kernel(big[:, ::2]) == "numpy"  # neither order: the NumPy kernel
    with kernel_choice("numpy"):
        assert db.which_kernel(big) == "numpy"
        assert type(kernels.kernel_for(big)) is kernels.DenseKernel
    with kernel_choice("numba"):
        assert db.which_kernel(np.ones((3, 3))) == "numba"
        assert db.which_kernel(np.ones((3, 3), dtype=np.int64)) == "numba"
        assert db.which_kernel(np.asfortranarray(big)) == "numba"
        assert db.which_kernel(sp.random(10, 10, density=0.5, format="csc")) == "numba"
        assert db.which_kernel(sp.random(10, 10, density=0.5, format="coo")) == "numpy"
    with kernel_choice("fast"), pytest.raises(ValueError, match="DATABALANCE_KERNEL is 'fast'.*'auto'"):
        db.which_kernel(big)


def test_relaxed_ratio_decreases_the_dual_objective():
    rng = np.random.default_rng(3)
    old = rng.uniform(0.01, 100, 500)
    s = rng.uniform(0.01, 100, 500)
    p = rng.uniform(0.0, 1.0, 500)
    p[:20] = 0
    zero = np.nonzero(p == 0)
    for omega in (1.0, 1.5, 1.9):
        new = fused.relaxed_ratio(old, p, s, zero, omega)
        pos = p > 0

        def dual(x, pos=pos):
            return s[pos] * x[pos] - p[pos] * np.log(x[pos])

        assert (dual(new) <= dual(old) + 1e-12 * np.abs(dual(old))).all()
        assert (new[~pos] == 0).all()
    np.testing.assert_array_equal(fused.relaxed_ratio(old, p, s, zero, None)[p > 0], (p / s)[p > 0])


def run_without_numba(code: str, env_value: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop(fused.ENV, None)
    if env_value is not None:
        env[fused.ENV] = env_value
    prelude = "import sys\nsys.modules['numba'] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_library_works_without_numba():
    out = run_without_numba("""
        import numpy as np, scipy.sparse as sp
        import databalance as db
        T = np.random.default_rng(0).random((400, 300))
        assert db.which_kernel(T) == "numpy"
        r = db.balance_table(T, np.full(400, 1 / 400), np.full(300, 1 / 300))
        s = db.balance_table(sp.csr_array(T), np.full(400, 1 / 400), np.full(300, 1 / 300))
        g = db.balance_logits(np.log(T), np.full(400, 1 / 400), np.full(300, 1 / 300))
        assert r.converged and s.converged and g.converged
        assert "numba" not in sys.modules or sys.modules["numba"] is None
        print("ok")
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_forcing_numba_without_numba_is_a_clear_error():
    out = run_without_numba("""
        import numpy as np
        import databalance as db
        db.balance_table(np.ones((3, 3)), [1, 1, 1], [1, 1, 1])
    """, env_value="numba")
    assert out.returncode != 0
    assert "DATABALANCE_KERNEL=numba asks for the numba kernels, but numba is not installed" in out.stderr


def _steps_in_child(seed: int) -> tuple[str, int, float]:
    """Balancing in a child process: the table's kernel and steps, and a log result's table (its
    validation and in-place scaling are one-off numba passes, on any size with PER_THREAD = 1)."""
    T = np.random.default_rng(seed).random((300, 250))
    r = db.balance_table(T, np.full(300, 1 / 300), np.full(250, 1 / 250))
    logits = db.balance_logits(np.log(T), np.full(300, 1 / 300), np.full(250, 1 / 250), steps=4)
    return db.which_kernel(T), r.steps, float(logits.table.sum())


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_forked_workers_after_parallel_kernels():
    """A child forked after the parent ran numba's threads (GNU OpenMP cannot start threads there)
    balances with a kernel that works, and gets the parent's numbers."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    old = fused.PER_THREAD
    fused.PER_THREAD = 1  # the one-off passes too, in the parent and (inherited) in the children
    try:
        with kernel_choice("numba"):
            db.balance_table(np.random.default_rng(0).random((3, 67, 45)), np.full(67, 1 / 67),
                             np.full(45, 1 / 45), steps=5)
            _, expected, total = _steps_in_child(1)
            with ProcessPoolExecutor(2, mp_context=mp.get_context("fork")) as pool:
                results = list(pool.map(_steps_in_child, [1, 1]))
    finally:
        fused.PER_THREAD = old
    layer = numba.threading_layer()
    for kernel, steps, table_total in results:
        assert steps == expected
        assert table_total == pytest.approx(total, rel=1e-12)
        assert kernel == ("numpy" if layer == "omp" else "numba")


@SETTINGS
@given(problems(batch=True), st.sampled_from("CF"))
def test_float64_sums_match_numpy(problem, order):
    """The fused kernel's float64 sums of the scaled table (one read) equal the NumPy kernel's and
    those of the table the scalings give, entry by entry rounded as it is returned."""
    table, _, _ = problem
    if order == "F":
        table = np.ascontiguousarray(np.swapaxes(table, -1, -2)).swapaxes(-1, -2)
    rng = np.random.default_rng(1)
    for dtype in {table.dtype, np.dtype(np.float64)}:  # the dense kernel's scalings; the log kernel's
        u = rng.random(table.shape[:-1]).astype(dtype)
        v = rng.random(table.shape[:-2] + table.shape[-1:]).astype(dtype)
        got = fused.FusedDenseKernel(table).float64_sums([u, v])
        want = kernels.DenseKernel(table).float64_sums([u, v])
        returned = table.copy()
        kernels.log.scale_buffer(returned, [u, v])
        returned = returned.astype(np.float64)
        if dtype == table.dtype:
            np.testing.assert_array_equal(returned, kernels.scaled_table(table, u, v))
        for g, w, axis in zip(got, want, (-1, -2), strict=True):
            assert g.dtype == np.float64 and g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=1e-13, atol=1e-300)
            np.testing.assert_allclose(g, returned.sum(axis=axis), rtol=1e-13, atol=1e-300)


@SETTINGS
@given(problems(batch=True), st.sampled_from("CF"), st.booleans())
def test_scale_in_place_equals_numpy_products(problem, order, overflow):
    """The log result's table scaled in place by one threaded numba pass equals NumPy's two
    in-place products with float64 scalings to the bit (C and F order, batched, float32 and
    float64), and says whether an entry overflowed."""
    table, _, _ = problem
    if order == "F" and table.ndim == 2:
        table = np.asfortranarray(table)
    rng = np.random.default_rng(2)
    u = rng.random(table.shape[:-1]) * 3
    v = rng.random(table.shape[:-2] + table.shape[-1:]) * 2
    if overflow:
        u.flat[0] = np.finfo(table.dtype).max
        v[...] = np.maximum(v, 4.0)
    want = table.copy(order="K")
    with np.errstate(over="ignore"):
        np.multiply(want, u[..., :, None], out=want, casting="same_kind")
        np.multiply(want, v[..., None, :], out=want, casting="same_kind")
    got = table.copy(order="K")
    old = fused.PER_THREAD
    fused.PER_THREAD = 1  # the numba pass (on two threads from two entries) whatever the size
    try:
        with kernel_choice("numba"):
            finite = fused.scale_in_place(got, u, v)
    finally:
        fused.PER_THREAD = old
    assert finite == bool(np.isfinite(want).all())
    np.testing.assert_array_equal(got, want)


def test_scale_in_place_declines_what_it_cannot_do_in_place():
    table = np.random.default_rng(3).random((2, 40, 30))
    ones = np.ones((2, 40)), np.ones((2, 30))
    old = fused.PER_THREAD
    fused.PER_THREAD = 8
    try:
        with kernel_choice("numba"):
            assert fused.scale_in_place(table[:, ::2], ones[0][:, ::2], ones[1]) is None  # lines not contiguous
            assert fused.scale_in_place(np.asfortranarray(table), *ones) is None
            assert fused.scale_in_place(table.astype(">f8"), *ones) is None  # another byte order
            assert fused.line_extremes(table.astype(">f8"), -1) is None
            assert fused.scale_in_place(table.astype(np.float16), *ones) is None
            huge = np.full((2, 40, 30), 1e306)  # finite entries whose sum overflows: still finite
            assert fused.scale_in_place(huge, *ones) is True
            assert fused.scale_in_place(huge, np.full((2, 40), 1e3), ones[1]) is False
        with kernel_choice("numpy"):
            assert fused.scale_in_place(table, *ones) is None
    finally:
        fused.PER_THREAD = old
    with kernel_choice("numba"):
        assert fused.scale_in_place(table, *ones) is None  # small: NumPy's products


@SETTINGS
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 3), st.booleans())
def test_chain_pass_matches_products(m, l, d, zero_step):
    """On several threads whatever the table's size."""
    rng = np.random.default_rng(m * 100 + l)
    W = rng.random((m, l))
    x = np.zeros((l, d)) if zero_step else rng.normal(size=(l, d))
    base, scale = rng.normal(size=(m, d)), (np.zeros(m) if zero_step else rng.random(m) + 0.5)
    old = fused.PER_THREAD
    fused.PER_THREAD = 8
    try:
        y, product = fused.chain_pass(W, x, base, scale)
    finally:
        fused.PER_THREAD = old
    np.testing.assert_allclose(y, base - scale[:, None] * (W @ x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(product, W.T @ y, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(problems(), st.sampled_from("CF"), st.sampled_from("xy"), st.sampled_from([(), (2,)]))
def test_variance_profile_on_fused_passes_matches_numpy(problem, order, start, extra):
    """variance_profile's chains on fused passes (one read per two steps) against BLAS products."""
    table, _, _ = problem
    table = table.astype(np.float64)
    if order == "F":
        table = np.asfortranarray(table)
    h = np.random.default_rng(table.size).normal(size=table.shape + extra)
    with kernel_choice("numpy"):
        a = db.variance_profile(table, h, max_steps=9, start=start).sigma2
    with kernel_choice("numba"):
        b = db.variance_profile(table, h, max_steps=9, start=start).sigma2
    np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12 * np.abs(a).max())


@SETTINGS
@given(st.integers(2, 60), st.integers(2, 60), st.floats(0.05, 0.6), st.sampled_from("xy"),
       st.sampled_from([(), (3,)]), st.integers(0, 2**32 - 1))
def test_sparse_variance_profile_on_fused_passes_matches_numpy(m, l, density, start, extra, seed):
    """variance_profile of a CSR table on the sparse kernel's threaded gathers against scipy's
    products (h given per stored entry), with blocks on every thread."""
    rng = np.random.default_rng(seed)
    T = sp.random_array((m, l), density=density, rng=rng, format="csr")
    T = sp.csr_array(T + sp.csr_array((np.ones(max(m, l)), (np.arange(max(m, l)) % m, np.arange(max(m, l)) % l)),
                                      shape=(m, l)))  # every row and column has mass
    h = rng.normal(size=(T.nnz,) + extra)
    with kernel_choice("numpy"):
        a = db.variance_profile(T, h, max_steps=9, start=start).sigma2
    from databalance._kernels import fused_sparse

    old, products, calls = fused_sparse.PER_THREAD, fused_sparse.line_products, []
    fused_sparse.PER_THREAD = 8
    fused_sparse.line_products = lambda table: calls.append(table.nnz) or products(table)
    try:
        with kernel_choice("numba"):
            b = db.variance_profile(T, h, max_steps=9, start=start).sigma2
    finally:
        fused_sparse.PER_THREAD, fused_sparse.line_products = old, products
    assert calls  # the threaded gathers ran
    np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12 * np.abs(a).max())


def test_a_line_sum_that_underflows_to_zero_meets_the_safeguards():
    """A lead line whose sum underflows to exactly 0 (its mass sits in a column whose target is 0):
    the fused pass divides as IEEE does and the log kernel's exact step takes over, as in NumPy."""
    n = 64
    L = np.zeros((n, n))
    L[0, 1:] = -800.0
    q = np.full(n, 1.0 / (n - 1))
    q[0] = 0.0
    p = np.full(n, 1.0 / n)
    a, b = both(db.balance_logits, L, p, q)
    assert a.converged and b.converged
    assert_same(a, b, ["row_potential", "col_potential"], np.float64)


def test_copies_of_a_log_result_do_not_scale_the_buffer_twice():
    import copy
    import dataclasses

    rng = np.random.default_rng(0)
    L = rng.normal(size=(300, 300)) * 3
    p = np.full(300, 1 / 300)
    with kernel_choice("numba"):
        r = db.balance_logits(L, p, p)
    want = np.exp(r.log_table)
    c, d = copy.copy(r), dataclasses.replace(r)
    for res in (r, c, d, r, c):
        np.testing.assert_allclose(res.table, want, rtol=1e-12, atol=0)


@SETTINGS
@given(st.integers(1, 30), st.integers(1, 30), st.integers(0, 2), st.sampled_from([np.float32, np.float64]),
       st.sampled_from("CF"), st.sampled_from([-1, -2]), st.sampled_from([None, np.nan, -np.nan, np.inf, -np.inf]))
def test_line_extremes_equal_numpy(m, l, batch, dtype, order, axis, special):
    """The maxima of the contiguous lines and the minimum from ordered integer keys equal NumPy's
    max and min, a NaN of either sign shows in them (so validation sees it), and -inf and +inf
    keep their places; other lines are declined."""
    rng = np.random.default_rng(m * 1000 + l * 10 + batch)
    shape = (batch + 1,) * min(batch, 1) + (m, l)
    table = (rng.normal(size=shape) * 30).astype(dtype)
    table.flat[rng.integers(table.size)] = -0.0
    if special is not None:
        table.flat[rng.integers(table.size)] = special
    if order == "F" and table.ndim == 2:
        table = np.asfortranarray(table)
    old = fused.PER_THREAD
    fused.PER_THREAD = 1
    try:
        with kernel_choice("numba"):
            found = fused.line_extremes(table, axis)
    finally:
        fused.PER_THREAD = old
    contiguous = (table.flags.c_contiguous and axis == -1) or (table.ndim == 2 and table.flags.f_contiguous
                                                               and axis == -2)
    if not contiguous:
        assert found is None
        return
    assert found is not None
    line, low = found
    assert line.dtype == table.dtype and line.shape == np.max(table, axis=axis).shape
    if special is not None and np.isnan(special):
        assert np.isnan(line).any() or np.isnan(low)
        return
    np.testing.assert_array_equal(line, np.max(table, axis=axis))
    assert low == table.min()


def test_balance_logits_names_nan_and_inf_found_by_the_key_extremes():
    rng = np.random.default_rng(5)
    L = rng.normal(size=(300, 200))
    p, q = np.full(300, 1 / 300), np.full(200, 1 / 200)
    old = fused.PER_THREAD
    fused.PER_THREAD = 1
    try:
        with kernel_choice("numba"):
            for value, message in ((np.nan, "contains NaN"), (-np.nan, "contains NaN"), (np.inf, r"contains \+inf")):
                for start, at in (("x", (123, 45)), ("y", (40, 7)), ("x", (299, 199))):
                    bad = L.copy()
                    bad[at] = value
                    with pytest.raises(ValueError, match=rf"{message}, first at index \({at[0]}, {at[1]}\)"):
                        db.balance_logits(bad, p, q, steps=2, start=start)
            with_zero = L.copy()
            with_zero[7, 8] = -np.inf
            got = db.balance_logits(with_zero, p, q, steps=6)
            assert got.table[7, 8] == 0.0
    finally:
        fused.PER_THREAD = old
    with kernel_choice("numpy"):
        want = db.balance_logits(with_zero, p, q, steps=6)
    np.testing.assert_allclose(got.table, want.table, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("l", [5, 1000, 4097])
def test_row_sums_do_not_depend_on_the_row_blocks(dtype, l):
    """A row's sum is the same bits whichever block (thread) and place in a group of rows sums it:
    results do not change with the thread count."""
    rng = np.random.default_rng(l)
    T = rng.random((1, 37, l)).astype(dtype) * 1e3
    x = (rng.random((1, l)) * 3).astype(dtype)
    p, old, w = np.full((1, 37), 1 / 37, dtype), np.ones((1, 37), dtype), np.ones(1)
    runs = []
    with kernel_choice("numba"):
        for nblocks in (1, 2, 3, 5, 16):
            r = np.empty((1, 37), dtype)
            fused.compiled(fused._lead_products)(T, x, nblocks, dtype(0), r)
            r2, u, acc = np.empty((1, 37), dtype), np.empty((1, 37), dtype), np.empty((nblocks, l))
            fused.compiled(fused._dense_pass)(T, x, old, p, w, nblocks, dtype(0), r2, u, acc)
            runs.append((r, r2, u))
    for r, r2, u in runs[1:]:
        np.testing.assert_array_equal(r, runs[0][0])
        np.testing.assert_array_equal(r2, runs[0][1])
        np.testing.assert_array_equal(u, runs[0][2])
    np.testing.assert_array_equal(runs[0][0], runs[0][1])


def test_float32_exp_rows_against_the_exact_exponential():
    """The float32 exponential of the fused log kernel: within 1.4 units of least precision of the
    exact exponential (float64) over the whole range (NumPy's float32 exp: 2.5 here), 0, inf and NaN
    exactly where NumPy's float32 exp gives them, subnormal results within one subnormal step; the
    addends added in float32 first, in place or not."""
    exp_rows = fused.compiled(fused._exp_rows, parallel=False, exact=True)
    x = np.concatenate([np.linspace(-120.0, 95.0, 400_001), [-np.inf, np.inf, np.nan, -0.0, 0.0],
                        np.nextafter(np.float32([88.72284, -103.97208, -87.33655]), np.float32(0))])
    x = x.astype(np.float32)
    rng = np.random.default_rng(1)
    a, c = np.float32([0.0, 1.5]), rng.normal(size=x.size).astype(np.float32)
    L = np.stack([x, x - c])  # row 1 plus its addends 1.5 and c: x + 1.5
    out, bits = np.empty_like(L), np.empty(2 * x.size, np.int32)
    exp_rows(L, a, np.zeros_like(c), 0, 1, out, bits)
    exp_rows(L, a, c, 1, 2, out, bits)
    with np.errstate(over="ignore", invalid="ignore"):
        for got, arg in ((out[0], x), (out[1], (x - c) + np.float32(1.5) + c)):
            numpy32, exact = np.exp(arg), np.exp(arg.astype(np.float64))
            for same in (np.isnan, np.isinf, lambda v: v == 0):
                np.testing.assert_array_equal(same(got), same(numpy32))
            normal = np.isfinite(numpy32) & (numpy32 >= np.finfo(np.float32).tiny)
            ulp = np.abs(got[normal] - exact[normal]) / np.spacing(exact[normal].astype(np.float32))
            assert ulp.max() <= 1.4
            assert (np.abs(got[~normal & (numpy32 < 1)] - exact[~normal & (numpy32 < 1)]) <= 2.0 ** -149).all()
    inplace = L[:1].copy()
    exp_rows(inplace, a, np.zeros_like(c), 0, 1, inplace, bits)
    np.testing.assert_array_equal(inplace, out[:1])


@pytest.mark.parametrize("order", "CF")
@pytest.mark.parametrize("start", "xy")
def test_float32_logits_with_resets_match_numpy(start, order):
    """float32 logits with line offsets of +-40 (scalings beyond float32's tau of 1e8): the buffer is
    re-exponentiated on moved potentials (the float64 sum, then the float32 exponential in place),
    and the fused kernel agrees with NumPy's."""
    rng = np.random.default_rng(5)
    L = (rng.normal(size=(300, 200)) * 3 + rng.uniform(-40, 40, 300)[:, None]
         + rng.uniform(-40, 40, 200)).astype(np.float32)  # scalings of e^+-40 on both sides
    L = np.asarray(L, order=order)  # F: the rows are strided, NumPy's exp takes them
    L[rng.random(L.shape) < 0.05] = -np.inf
    p, q = rng.dirichlet(np.ones(300)), rng.dirichlet(np.ones(200))
    resets = []
    original = fused.FusedLogKernel._exponentiate

    def counted(self, frame):
        resets.append(1)
        return original(self, frame)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused.FusedLogKernel, "_exponentiate", counted)
        a, b = both(db.balance_logits, L, p, q, steps=30, start=start)
    assert len(resets) > 1  # the first exponentiation and at least one reset in the fused run
    assert_same(a, b, ["row_potential", "col_potential"], np.float32)
    np.testing.assert_array_equal(np.isneginf(a.log_table), np.isneginf(b.log_table))


@pytest.mark.parametrize("kernel", ["numpy", "numba"])
def test_float32_final_errors_are_measured_once_in_float64(kernel):
    """A float32 run of k half-steps leaves its final errors to the float64 measurement of the
    table it returns (no pass over the table for working sums no step uses): they are finite and
    equal the float64 sums of the returned table, and the fused kernel makes one pass fewer than
    for float64."""
    rng = np.random.default_rng(3)
    T = rng.random((300, 200)) + 0.01
    p, q = rng.dirichlet(np.ones(300)), rng.dirichlet(np.ones(200))
    calls = {
        "table": lambda t, k: db.balance_table(t, p, q, steps=k),
        "logits": lambda t, k: db.balance_logits(np.log(t), p, q, steps=k),
        "margins": lambda t, k: db.balance_margins(t, {0: p, 1: q}, steps=k),
        "sparse": lambda t, k: db.balance_table(sp.csr_array(t), p, q, steps=k),
    }
    with kernel_choice(kernel):
        for name, call in calls.items():
            for k in (1, 2, 5, 6):
                res = call(T.astype(np.float32), k)
                table = np.asarray(res.table.toarray() if sp.issparse(res.table) else res.table, np.float64)
                want = [np.abs(table.sum(axis=1) - p).sum(), np.abs(table.sum(axis=0) - q).sum()]
                np.testing.assert_allclose(res.marginal_error[-1], want, rtol=1e-6, atol=1e-12, err_msg=name)
                assert np.isfinite(res.marginal_error).all()
                if name in ("table", "logits") and kernel == "numba":
                    # saved: the plain product after k = 1, the pass after an even k (after an odd
                    # k > 1 the last pass has already given the other margin's sums)
                    assert res.passes == call(T, k).passes - (k == 1 or k % 2 == 0)
        cube = rng.random((12, 10, 8)).astype(np.float32) + 0.01
        targets = {0: p[:12] / p[:12].sum(), 1: np.full(10, 0.1), 2: q[:8] / q[:8].sum()}
        for k in (2, 3, 6):  # three margins: the tensor kernel
            res = db.balance_margins(cube, targets, steps=k)
            table = np.asarray(res.table, np.float64)
            want = [np.abs(table.sum(axis=tuple(a for a in range(3) if a != j)) - targets[j]).sum() for j in range(3)]
            np.testing.assert_allclose(res.marginal_error[-1], want, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_exponentiation_on_two_threads_equals_one_thread(dtype):
    """The buffer (first exponentiation and a reset on moved potentials) and its first row sums
    are bitwise the same on one thread and on two (each thread its own rows and scratch); the
    column sums, added up per thread, to rounding."""
    rng = np.random.default_rng(8)
    L = (rng.normal(size=(1600, 1400)) * 4).astype(dtype)  # above two threads' worth of entries
    L[rng.random(L.shape) < 0.01] = -np.inf
    f, g = rng.normal(size=1600) * 3, rng.normal(size=1400) * 3
    got = []
    for nt in (1, 2):
        with fused._using(nt):
            assert fused.threads() == nt
            kernel = fused.FusedLogKernel(L, 0)
            first = kernel.table.copy()
            kernel._exponentiate([f, g])
            got.append((first, kernel.table.copy(), *kernel.frame_sums))
    for one, two in zip(got[0][:3], got[1][:3], strict=True):
        np.testing.assert_array_equal(one, two)
    np.testing.assert_allclose(got[0][3], got[1][3], rtol=1e-13)


def test_skipping_the_final_working_sums_changes_nothing_else():
    """A float32 run of k half-steps with its final working sums skipped returns the same table,
    scalings, steps, status and errors as the same run computing them (then replaced)."""
    rng = np.random.default_rng(4)
    T = (rng.random((400, 300)) + 0.01).astype(np.float32)
    p, q = rng.dirichlet(np.ones(400)), rng.dirichlet(np.ones(300))
    run = db._ipf.run

    def unskipped(*args, **kwargs):
        return run(*args, **{**kwargs, "remeasured": False})

    for kernel in ("numpy", "numba"):
        with kernel_choice(kernel):
            for k in (1, 2, 3, 6):
                for fn, arg in ((db.balance_table, T), (db.balance_logits, np.log(T))):
                    a = fn(arg, p, q, steps=k)
                    with pytest.MonkeyPatch.context() as mp:
                        mp.setattr(db._ipf, "run", unskipped)
                        b = fn(arg, p, q, steps=k)
                    np.testing.assert_array_equal(a.table, b.table)
                    np.testing.assert_array_equal(a.marginal_error, b.marginal_error)
                    assert (a.steps, a.status) == (b.steps, b.status)
