"""balance_table and balance_logits on array-API inputs (array-api-strict, PyTorch, JAX; CuPy on a
GPU): the same numbers as the NumPy path, in the input's namespace, dtype and device; bad input."""

import contextlib
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from databalance import ConvergenceWarning, InfeasibleError, balance_logits, balance_table

from .strategies import balancing_problems

pytest.importorskip("array_api_compat")


def _strict():
    xp = pytest.importorskip("array_api_strict")
    return xp, contextlib.nullcontext, lambda a: xp.asarray(a)


def _torch():
    torch = pytest.importorskip("torch")
    return torch, contextlib.nullcontext, lambda a: torch.asarray(a)


def _jax():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    return jnp, lambda: jax.enable_x64(True), lambda a: jnp.asarray(a)


def _cupy():
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            raise RuntimeError
    except Exception:
        pytest.skip("CuPy is installed but no CUDA GPU is available")
    return cupy, contextlib.nullcontext, lambda a: cupy.asarray(a)


BACKENDS = {"array_api_strict": _strict, "torch": _torch, "jax": _jax, "cupy": _cupy}


@pytest.fixture(params=list(BACKENDS), scope="module")
def backend(request):
    """(namespace module, float64 context, converter from NumPy) for each framework."""
    xp, x64, convert = BACKENDS[request.param]()
    with x64():
        yield request.param, xp, convert


def host(x):
    from databalance._kernels.arrayapi import to_numpy

    return to_numpy(x)


def assert_close(actual, expected, rtol=1e-12):
    actual, expected = host(actual), np.asarray(expected)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(actual), finite)
    np.testing.assert_array_equal(actual[~finite], expected[~finite])
    scale = np.max(np.abs(expected[finite]), initial=1.0)
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=0, atol=rtol * scale)


def same_type(result, like):
    return type(result) is type(like)


# -- the same numbers as NumPy ---------------------------------------------------------------------

steps_option = st.one_of(st.none(), st.integers(0, 7))
#: JAX compiles every operation anew for each shape: a few shapes keep its cache warm.
sides = st.sampled_from([1, 2, 5])
batches = st.sampled_from([(), (2,)])


@st.composite
def positive_problems(draw):
    """A strictly positive (possibly batched) table and positive targets of total 1."""
    m, l, batch = draw(sides), draw(sides), draw(batches)
    element = st.floats(0.05, 20.0)
    table = draw(hnp.arrays(np.float64, batch + (m, l), elements=element))
    p_x = draw(hnp.arrays(np.float64, batch + (m,), elements=element))
    p_y = draw(hnp.arrays(np.float64, batch + (l,), elements=element))
    return table, p_x / p_x.sum(axis=-1, keepdims=True), p_y / p_y.sum(axis=-1, keepdims=True)
#: Each example runs in three frameworks whose eager dispatch costs 0.1-2 ms per operation (JAX's
#: the most, and it compiles every operation anew for each shape): few examples, small tables, bounded runs.
few = settings(max_examples=8)


@few
@given(problem=positive_problems(), steps=steps_option, start=st.sampled_from("xy"))
def test_table_equals_numpy(backend, problem, steps, start):
    _, _, convert = backend
    table, p_x, p_y = problem
    ref = balance_table(table, p_x, p_y, steps=steps, start=start, acceleration="none")
    res = balance_table(convert(table), p_x, p_y, steps=steps, start=start)
    assert (res.steps, res.status) == (ref.steps, ref.status)
    assert same_type(res.table, convert(table)) and same_type(res.row_scaling, convert(table))
    assert_close(res.table, ref.table)
    assert_close(res.marginal_error, ref.marginal_error)


@few
@given(problem=balancing_problems(max_side=6), steps=steps_option)
def test_table_with_zeros_equals_numpy(backend, problem, steps):
    _, _, convert = backend
    table, p_x, p_y = problem
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # both paths warn alike; compared below
        ref = balance_table(table, p_x, p_y, steps=steps, max_steps=400, acceleration="none")
        res = balance_table(convert(table), convert(p_x), convert(p_y), steps=steps, max_steps=400)
    assert (res.steps, res.status) == (ref.steps, ref.status)
    assert_close(res.table, ref.table)
    assert res.feasible == ref.feasible


@st.composite
def logit_problems(draw, holes: bool = True):
    """Logits spanning up to +-60 (some -inf off a covering set of cells) and positive targets."""
    m, l, batch = draw(sides), draw(sides), draw(batches)
    scale = draw(st.sampled_from([1.0, 10.0, 60.0]))
    L = draw(hnp.arrays(np.float64, batch + (m, l), elements=st.floats(-1, 1))) * scale
    if holes and draw(st.booleans()):  # structural zeros, off the cells (i, i mod l): no line is empty
        holes = draw(hnp.arrays(np.bool_, batch + (m, l)))
        keep = np.zeros((m, l), bool)
        keep[np.arange(m), np.arange(m) % l] = True
        keep[np.arange(l) % m, np.arange(l)] = True
        L = np.where(holes & ~keep, -np.inf, L)
    p_x = draw(hnp.arrays(np.float64, (m,), elements=st.floats(0.05, 1)))
    p_y = draw(hnp.arrays(np.float64, (l,), elements=st.floats(0.05, 1)))
    return L, p_x / p_x.sum(), p_y / p_y.sum()


@few
@given(problem=logit_problems(), steps=st.integers(0, 7), start=st.sampled_from("xy"))
def test_logits_steps_equal_numpy(backend, problem, steps, start):
    _, _, convert = backend
    L, p_x, p_y = problem
    ref = balance_logits(L, p_x, p_y, steps=steps, start=start)
    res = balance_logits(convert(L), p_x, p_y, steps=steps, start=start)
    assert res.status == "completed" and same_type(res.log_table, convert(L))
    assert_close(res.log_table, ref.log_table)
    assert_close(res.table, ref.table)
    assert_close(res.marginal_error, ref.marginal_error)


@few
@given(problem=logit_problems(holes=False))
def test_logits_converged_equal_numpy(backend, problem):
    _, _, convert = backend
    L, p_x, p_y = problem
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # both paths warn alike; compared below
        ref = balance_logits(L, p_x, p_y, max_steps=400, acceleration="none")
        res = balance_logits(convert(L), p_x, p_y, max_steps=400)
    assert (res.steps, res.status) == (ref.steps, ref.status)
    assert_close(res.table, ref.table, rtol=1e-11)


def test_underflow_takes_the_exact_step_as_numpy(backend):
    """Column 1 is 1e4 below column 0 in every row: after the row step its sum underflows, and both
    paths take the exact log-sum-exp step; absorbing scalings is exercised by the 200-wide span."""
    _, _, convert = backend
    L = np.array([[1e4, 0.0, 5.0], [1e4, 1.0, -200.0], [9990.0, -np.inf, 3.0]])
    p = np.array([0.2, 0.3, 0.5])
    for steps in (1, 2, 3, None):
        ref = balance_logits(L, p, p, steps=steps, acceleration="none")
        res = balance_logits(convert(L), p, p, steps=steps)
        assert (res.steps, res.status) == (ref.steps, ref.status)
        assert_close(res.log_table, ref.log_table)
    assert host(res.log_table)[2, 1] == -np.inf


def test_jit_of_k_steps_equals_numpy():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    rng = np.random.default_rng(3)
    L = rng.standard_normal((2, 5, 4)) * 20
    L[0, 1, 2] = -np.inf
    p_x, p_y = np.full(5, 0.2), np.full(4, 0.25)
    with jax.enable_x64(True):
        jitted = jax.jit(lambda x: balance_logits(x, p_x, p_y, steps=3).log_table)
        assert_close(jitted(jnp.asarray(L)), balance_logits(L, p_x, p_y, steps=3).log_table)
        table = jax.jit(lambda x: balance_table(x, p_x, p_y, steps=4).table)(jnp.exp(jnp.asarray(L)))
        assert_close(table, balance_table(np.exp(L), p_x, p_y, steps=4).table)


# -- host reads: one per sweep ---------------------------------------------------------------------


def extreme_logits(rng, dtype=np.float64):
    """Offsets spanning hundreds of orders of magnitude and a structural zero: exact steps and
    absorptions early, slow progress after (in float32 some later half-steps are not proved safe)."""
    L = rng.uniform(-300, 300, (6, 1)) + rng.uniform(-300, 300, (1, 5)) + rng.standard_normal((6, 5)) * 30
    L[0, 3] = -np.inf
    return L.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_half_step_proved_safe_would_have_passed_its_own_checks(monkeypatch, dtype):
    """The log kernel skips the read of a half-step that the one before proved safe: on problems
    that absorb and take exact steps, every skipped half-step's own flags are False (the decisions
    are those of reading every half-step), and the results equal the NumPy path's."""
    torch = pytest.importorskip("torch")
    from databalance._kernels import arrayapi

    original = arrayapi.ApiLogKernel.rescale
    skipped = []

    def checked(self, j, margin, sums, state):
        if not self.traced and state.steps + 1 <= self._cleared:
            xp, p = self.xp, margin.target
            other, new = state.factors[1 - j], arrayapi.ratio(xp, p, sums, margin.zero)
            flags = xp.stack([xp.any(xp.logical_and(sums < self.tiny, p > 0)),
                              self._out_of_range(new, p > 0), self._out_of_range(other, other > 0)])
            skipped.append(arrayapi.to_numpy(flags).any())
        return original(self, j, margin, sums, state)

    monkeypatch.setattr(arrayapi.ApiLogKernel, "rescale", checked)
    rng = np.random.default_rng(4)
    p_x, p_y = np.full(6, 1 / 6), np.array([0.1, 0.2, 0.3, 0.2, 0.2])
    for _ in range(3):
        L = extreme_logits(rng, dtype)
        for steps in (7, None):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                res = balance_logits(torch.asarray(L), p_x, p_y, steps=steps, max_steps=300)
                with monkeypatch.context() as m:  # every half-step reads its own flags
                    m.setattr(arrayapi.ApiLogKernel, "_next_unsafe", lambda self, *a, **kw: self.xp.asarray(True))
                    each = balance_logits(torch.asarray(L), p_x, p_y, steps=steps, max_steps=300)
                ref = balance_logits(L, p_x, p_y, steps=steps, max_steps=300, acceleration="none")
            assert (res.steps, res.status) == (each.steps, each.status)
            np.testing.assert_array_equal(host(res.log_table), host(each.log_table))
            if dtype == np.float64:  # (float32: NumPy keeps float64 potentials; compared elsewhere)
                assert (res.steps, res.status) == (ref.steps, ref.status)
                assert_close(res.log_table, ref.log_table)
    assert len(skipped) > 20 and not any(skipped)


def test_host_reads_one_per_sweep(monkeypatch):
    """Counting the kernel's and the loop's transfers to the host (``to_numpy``): steps=k reads one
    flag per sweep (was one per half-step); steps=None one per sweep, the largest error and the
    kernel's flag together (was three)."""
    torch = pytest.importorskip("torch")
    from databalance._kernels import arrayapi

    reads = []
    original = arrayapi.to_numpy
    monkeypatch.setattr(arrayapi, "to_numpy", lambda x: reads.append(1) or original(x))
    L = torch.asarray(np.random.default_rng(0).standard_normal((16, 16)))
    p = np.full(16, 1 / 16)

    def count(steps):
        reads.clear()
        res = balance_logits(L, p, p, steps=steps, tol=1e-12)
        return len(reads), res.steps

    base, _ = count(2)
    for k in (10, 50):
        assert count(k)[0] - base <= (k - 2) // 2 + 1
    n, steps = count(None)
    assert steps > 20 and n - base <= steps // 2 + 3  # the error's, carrying the kernel's flag


# -- dtype, device, results ------------------------------------------------------------------------


def test_float32_stays_float32_on_device(backend):
    name, xp, convert = backend
    rng = np.random.default_rng(0)
    L = rng.standard_normal((3, 8, 6)).astype(np.float32) * 5
    p_x, p_y = np.full(8, 1 / 8, np.float32), np.full(6, 1 / 6, np.float32)
    res = balance_logits(convert(L), p_x, p_y)
    ref = balance_logits(L, p_x, p_y, acceleration="none")
    assert res.status == "converged" and res.log_table.dtype == xp.float32 and res.row_potential.dtype == xp.float32
    assert_close(res.table, ref.table, rtol=1e-5)
    tab = balance_table(convert(np.exp(L)), p_x, p_y, steps=5)
    assert tab.table.dtype == xp.float32
    assert_close(tab.table, balance_table(np.exp(L), p_x, p_y, steps=5).table, rtol=1e-5)


def test_strict_arrays_stay_on_their_device():
    """array-api-strict refuses to combine arrays of different devices: a loop that made any
    array on the default device would fail here. 'no_float64' also has no float64 to fall back on."""
    xp = pytest.importorskip("array_api_strict")
    for name, dtype in (("device1", xp.float64), ("no_float64", xp.float32)):
        dev = next(d for d in xp.__array_namespace_info__().devices() if name in repr(d))
        rng = np.random.default_rng(1)
        L = xp.asarray(rng.standard_normal((2, 4, 3)), dtype=dtype, device=dev)
        p_x = xp.asarray(np.full(4, 0.25), dtype=dtype, device=dev)
        res = balance_logits(L, p_x, np.full(3, 1 / 3), steps=None)
        assert res.status == "converged" and res.log_table.device == dev and res.table.dtype == dtype
        tab = balance_table(xp.exp(L), p_x, np.full(3, 1 / 3))
        assert tab.table.device == dev and tab.marginal_error.device == dev


def test_float32_logits_of_size_1e4(backend):
    """Row and column offsets of size 1e4 that the potentials must cancel: in float32 the run stays
    finite, structural zeros stay exact, and the status is honest (float32 potentials round
    ``L + f + g`` by ~1e-3, so the balance stalls near that error instead of claiming 1e-5)."""
    _, xp, convert = backend
    rng = np.random.default_rng(0)
    L = rng.uniform(-1e4, 1e4, (6, 1)) + rng.uniform(-1e4, 1e4, (1, 5)) + rng.uniform(-3, 3, (6, 5))
    L[0, 1] = -np.inf
    L = L.astype(np.float32)
    p_x, p_y = np.full(6, 1 / 6), np.full(5, 0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        res = balance_logits(convert(L), p_x, p_y, max_steps=400)
    out = host(res.table)
    assert res.table.dtype == xp.float32 and out[0, 1] == 0 and np.isfinite(out).all()
    final = host(res.marginal_error)[-1]
    assert res.status in ("converged", "stalled") and (res.status == "converged") == bool(final.max() <= 1e-5)
    ref = balance_logits(L.astype(np.float64), p_x, p_y).table
    np.testing.assert_allclose(out, ref, atol=1e-3 * ref.max())


def test_result_repr_and_feasibility(backend):
    _, _, convert = backend
    T = np.array([[1.0, 0.0], [0.0, 1.0]])
    res = balance_table(convert(T), [0.5, 0.5], [0.5, 0.5], steps=2)
    assert "status='completed', steps=2" in repr(res) and res.feasible
    assert not balance_table(convert(T), [0.7, 0.3], [0.5, 0.5], steps=2).feasible
    with pytest.raises(InfeasibleError, match="table"):
        balance_table(convert(T), [0.7, 0.3], [0.5, 0.5])


def test_progress_hears_host_copies_of_the_errors(backend):
    _, _, convert = backend
    seen = []
    balance_table(convert(np.ones((2, 3))), [0.5, 0.5], [0.2, 0.3, 0.5], progress=lambda k, e: seen.append(e))
    assert len(seen) >= 2 and all(isinstance(e, np.ndarray) for e in seen) and seen[-1].shape == (2,)


def test_torch_result_has_gradient_and_input_is_not_mutated():
    torch = pytest.importorskip("torch")
    T = torch.rand(2, 3, 4, dtype=torch.float64, requires_grad=True)
    before = T.detach().clone()
    res = balance_table(T, np.full(3, 1 / 3), np.full(4, 0.25), steps=3)
    assert res.table.requires_grad and res.marginal_error.device == T.device
    res.table.sum().backward()
    assert torch.equal(T.detach(), before) and T.grad is not None


# -- bad input -------------------------------------------------------------------------------------


def test_mixed_namespaces_are_refused():
    torch = pytest.importorskip("torch")
    jnp = pytest.importorskip("jax.numpy")
    with pytest.raises(TypeError, match="`p_x` is a jax array but `table` is a torch array"):
        balance_table(torch.ones(2, 2), jnp.asarray([0.5, 0.5]), [0.5, 0.5])
    with pytest.raises(TypeError, match="`p_y` is a torch array but `logits` is a jax array"):
        balance_logits(jnp.zeros((2, 2)), [0.5, 0.5], torch.asarray([0.5, 0.5]))


def test_targets_on_another_device_are_refused():
    xp = pytest.importorskip("array_api_strict")
    dev = next(d for d in xp.__array_namespace_info__().devices() if "device1" in repr(d))
    with pytest.raises(ValueError, match="`p_y` is on device .*device1.* but `table` is on"):
        balance_table(xp.ones((2, 2)), [0.5, 0.5], xp.asarray([0.5, 0.5], device=dev))


@pytest.mark.parametrize("dtype", ["int64", "complex128", "float16"])
def test_non_float_dtypes_are_refused(dtype):
    torch = pytest.importorskip("torch")
    table = torch.ones(2, 2, dtype=getattr(torch, dtype))
    with pytest.raises(TypeError, match="`table` is a torch array of dtype torch." + dtype):
        balance_table(table, [0.5, 0.5], [0.5, 0.5])
    with pytest.raises(TypeError, match="`logits` is a torch array of dtype"):
        balance_logits(table, [0.5, 0.5], [0.5, 0.5])
    with pytest.raises(TypeError, match="`p_x` is a torch array of dtype"):
        balance_table(torch.ones(2, 2), torch.ones(2, dtype=getattr(torch, dtype)), [0.5, 0.5])


def test_requires_grad_targets_are_refused():
    torch = pytest.importorskip("torch")
    p = torch.full((2,), 0.5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(TypeError, match="`p_x` requires gradients"):
        balance_logits(torch.zeros(2, 2, dtype=torch.float64), p, [0.5, 0.5], steps=2)


def test_bad_values_and_shapes_are_named(backend):
    _, _, convert = backend
    with pytest.raises(ValueError, match=r"`table` must be nonnegative; found -1.0 at index \(0, 1\)"):
        balance_table(convert(np.array([[1.0, -1.0], [1.0, 1.0]])), [0.5, 0.5], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"`table` contains NaN, first at index \(1, 0\)"):
        balance_table(convert(np.array([[1.0, 1.0], [np.nan, 1.0]])), [0.5, 0.5], [0.5, 0.5])
    with pytest.raises(ValueError, match="`table` contains an infinite value"):
        balance_table(convert(np.array([[1.0, np.inf], [1.0, 1.0]])), [0.5, 0.5], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"`logits` contains \+inf"):
        balance_logits(convert(np.array([[1.0, np.inf], [1.0, 1.0]])), [0.5, 0.5], [0.5, 0.5])
    with pytest.raises(ValueError, match="`logits` must have at least 2 dimensions"):
        balance_logits(convert(np.zeros(3)), [0.5, 0.5], [0.5, 0.5])
    with pytest.raises(ValueError, match="`p_x` has shape"):
        balance_table(convert(np.ones((2, 2))), [1.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="Row 1 of `table` is empty but `p_x\\[1\\]`"):
        balance_table(convert(np.array([[1.0, 1.0], [0.0, 0.0]])), [0.5, 0.5], [0.5, 0.5])


def test_overrelaxation_is_numpy_only():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="`acceleration='overrelax'` is available for NumPy"):
        balance_logits(torch.zeros(2, 2), [0.5, 0.5], [0.5, 0.5], acceleration="overrelax")


def test_steps_none_under_jit_is_refused():
    jax = pytest.importorskip("jax")
    with pytest.raises(TypeError, match="`logits` is traced by JAX .*jax.jit.*`steps=None`"):
        jax.jit(lambda x: balance_logits(x, [0.5, 0.5], [0.5, 0.5]).log_table)(jax.numpy.zeros((2, 2)))


def test_steps_none_under_vmap_is_refused_naming_the_batch_alternative():
    jax = pytest.importorskip("jax")
    with pytest.raises(TypeError, match="`logits` is traced by JAX .*jax.vmap.*stacked arrays"):
        jax.vmap(lambda x: balance_logits(x, [0.5, 0.5], [0.5, 0.5]).log_table)(jax.numpy.zeros((3, 2, 2)))


# -- optional dependencies -------------------------------------------------------------------------


def run_blocked(code: str, blocked: list[str]) -> subprocess.CompletedProcess:
    prelude = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)


def test_numpy_path_needs_none_of_the_optional_packages():
    done = run_blocked("""
        import numpy as np
        import databalance as db
        from databalance.losses import balanced_contrastive_loss
        res = db.balance_logits(np.zeros((3, 3)), np.full(3, 1 / 3), np.full(3, 1 / 3))
        assert res.status == "converged"
        print(float(balanced_contrastive_loss(np.eye(3), 2)))
        assert "array_api_compat" not in sys.modules or sys.modules["array_api_compat"] is None
        """, ["array_api_compat", "torch", "jax", "cupy", "array_api_strict"])
    assert done.returncode == 0, done.stderr
    assert float(done.stdout)


def test_missing_array_api_compat_names_the_extra():
    pytest.importorskip("torch")
    done = run_blocked("""
        import torch
        import databalance as db
        db.balance_table(torch.ones(2, 2), [0.5, 0.5], [0.5, 0.5])
        """, ["array_api_compat"])
    assert done.returncode != 0 and "pip install 'databalance[array-api]'" in done.stderr
