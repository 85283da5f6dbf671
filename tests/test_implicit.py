"""Gradients through balancing: the unrolled k-step map and the implicit derivative of the converged
result, against central finite differences (torch.autograd.gradcheck in float64, and the same check
for jax.grad), and the adjoint solve against a dense least-squares solution."""

import warnings

import numpy as np
import pytest

from databalance import ConvergenceWarning, balance_logits, balance_table

pytest.importorskip("array_api_compat")

RNG = np.random.default_rng(7)
P_X = np.array([0.1, 0.2, 0.3, 0.4])
P_Y = np.array([0.25, 0.15, 0.35, 0.25])
WEIGHTS = RNG.standard_normal((2, 4, 4))


def torch_case():
    torch = pytest.importorskip("torch")
    logits = torch.tensor(RNG.standard_normal((2, 4, 4)) * 2, requires_grad=True)
    table = torch.tensor(RNG.uniform(0.2, 2.0, (2, 4, 4)), requires_grad=True)
    return torch, logits, table, torch.tensor(WEIGHTS)


@pytest.mark.parametrize("steps", [1, 2, 5, None])
def test_torch_gradcheck_logits(steps):
    torch, logits, _, w = torch_case()

    def loss(x):  # a gauge-invariant output: the balanced log-table, weighted
        return (balance_logits(x, P_X, P_Y, steps=steps, tol=1e-14, max_steps=5000).log_table * w).sum()

    assert torch.autograd.gradcheck(loss, (logits,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("steps", [2, 3, None])
def test_torch_gradcheck_table(steps):
    torch, _, table, w = torch_case()

    def balanced(x):
        return balance_table(x, P_X, P_Y, steps=steps, tol=1e-14, max_steps=5000).table * w

    assert torch.autograd.gradcheck(balanced, (table,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_torch_gradcheck_with_zeros_and_a_zero_target():
    """Structural zeros (-inf), and a column whose target is 0 (emptied by every column step)."""
    torch = pytest.importorskip("torch")
    L = RNG.standard_normal((4, 5))
    L[0, 1] = L[2, 3] = -np.inf
    logits = torch.tensor(L, requires_grad=True)
    p_y = np.array([0.3, 0.2, 0.0, 0.25, 0.25])
    w = torch.tensor(RNG.standard_normal((4, 5)))

    def loss(x):
        return (balance_logits(x, P_X, p_y, tol=1e-14).table * w).sum()

    assert torch.autograd.gradcheck(loss, (logits,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_implicit_memory_does_not_hold_the_iterations():
    """steps=None keeps one graph node (the implicit function), whatever the number of steps."""
    torch, logits, _, _ = torch_case()
    res = balance_logits(logits, P_X, P_Y, tol=1e-13)
    assert res.steps > 20
    node = res.row_potential.grad_fn
    assert type(node).__name__ == "ConvergedBackward"
    assert all(fn is None or type(fn).__name__ == "AccumulateGrad" for fn, _ in node.next_functions)


def jax_setup():
    jax = pytest.importorskip("jax")
    return jax, jax.numpy


@pytest.mark.parametrize("steps", [2, 3, None])
@pytest.mark.parametrize("log", [True, False])
def test_jax_grad_against_central_differences(steps, log):
    jax, jnp = jax_setup()
    with jax.enable_x64(True):
        x0 = jnp.asarray(RNG.standard_normal((2, 4, 4)) if log else RNG.uniform(0.2, 2.0, (2, 4, 4)))
        w = jnp.asarray(WEIGHTS)

        def loss(x):
            if log:
                return jnp.sum(balance_logits(x, P_X, P_Y, steps=steps, tol=1e-14).log_table * w)
            return jnp.sum(balance_table(x, P_X, P_Y, steps=steps, tol=1e-14).table * w)

        grad = np.asarray(jax.grad(loss)(x0))
        h = 1e-6
        for index in [(0, 0, 0), (0, 2, 1), (1, 3, 3), (1, 1, 2)]:
            e = np.zeros(x0.shape)
            e[index] = h
            fd = (float(loss(x0 + e)) - float(loss(x0 - e))) / (2 * h)
            assert grad[index] == pytest.approx(fd, rel=1e-5, abs=1e-8)


def test_jax_grad_of_jitted_k_steps():
    jax, jnp = jax_setup()
    with jax.enable_x64(True):
        x0 = jnp.asarray(RNG.standard_normal((3, 5)))
        p_x, p_y = np.full(3, 1 / 3), np.full(5, 0.2)

        def f(x):
            return jnp.sum(balance_logits(x, p_x, p_y, steps=2).table ** 2)

        np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(f))(x0)), np.asarray(jax.grad(f)(x0)), rtol=1e-12)


def test_adjoint_solves_the_dense_system():
    """(lambda, mu) against the minimum-norm solution of [[D_r, P], [P^T, D_c]] z = (a, b) by dense
    least squares; lambda_i + mu_j (all the gradient uses) must agree."""
    from databalance._implicit import adjoint

    P = balance_table(RNG.uniform(0.1, 1.0, (4, 6)), P_X, np.full(6, 1 / 6)).table
    a, b = RNG.standard_normal(4), RNG.standard_normal(6)
    b += (a.sum() - b.sum()) / 6  # a gauge-consistent cotangent: sum a == sum b
    J = np.block([[np.diag(P.sum(1)), P], [P.T, np.diag(P.sum(0))]])
    z = np.linalg.lstsq(J, np.concatenate([a, b]), rcond=None)[0]
    lam, mu = adjoint(np, P, a, b)
    np.testing.assert_allclose(lam[:, None] + mu[None, :], z[:4, None] + z[None, 4:], atol=1e-9)
    np.testing.assert_allclose(J @ np.concatenate([lam, mu]), np.concatenate([a, b]), atol=1e-9)


def test_unsolved_adjoint_warns(monkeypatch):
    from databalance import _implicit

    monkeypatch.setattr(_implicit, "MAX_ITERATIONS", 1)
    P = balance_table(RNG.uniform(0.1, 1.0, (5, 5)), np.full(5, 0.2), np.full(5, 0.2)).table
    with pytest.warns(ConvergenceWarning, match="adjoint system .* conjugate-gradient"):
        _implicit.adjoint(np, P, RNG.standard_normal(5), RNG.standard_normal(5))


def test_no_gradient_no_custom_function():
    torch = pytest.importorskip("torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = balance_logits(torch.zeros(3, 3, dtype=torch.float64), np.full(3, 1 / 3), np.full(3, 1 / 3))
    assert res.row_potential.grad_fn is None


def unconverged_case():
    rng = np.random.default_rng(3)
    L = rng.standard_normal((5, 5)) * 3
    p_x, p_y = rng.random(5), rng.random(5)
    return L, p_x, p_y * p_x.sum() / p_y.sum()


def test_torch_backward_refuses_an_unconverged_run():
    """The implicit derivative holds at the fixed point only: a run stopped by max_steps raises in
    backward, naming the status and the way out (steps=k)."""
    torch = pytest.importorskip("torch")
    L, p_x, p_y = unconverged_case()
    x = torch.tensor(L, requires_grad=True)
    with pytest.warns(ConvergenceWarning):
        res = balance_logits(x, p_x, p_y, max_steps=2, tol=1e-12)
    assert res.status == "max_steps"
    with pytest.raises(RuntimeError, match="status 'max_steps' after 2 half-steps.*`steps=k`"):
        res.table.sum().backward()


def test_jax_grad_refuses_an_unconverged_run():
    jax, jnp = jax_setup()
    L, p_x, p_y = unconverged_case()
    with jax.enable_x64(True), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with pytest.raises(RuntimeError, match="status 'max_steps'.*larger `max_steps`"):
            jax.grad(lambda x: jnp.sum(balance_logits(x, p_x, p_y, max_steps=3, tol=1e-12).table))(jnp.asarray(L))


def test_torch_double_backward_through_the_fixed_point():
    """A gradient penalty (create_graph=True) differentiated again: the implicit path agrees with the
    unrolled k-step map once both have converged (k = 40 and 80 agree to 1e-13 here)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    L0, w = rng.standard_normal((4, 5)), torch.tensor(rng.standard_normal((4, 5)))
    p_x, p_y = np.full(4, 0.25), np.full(5, 0.2)

    def penalty_gradient(steps):
        x = torch.tensor(L0, requires_grad=True)
        res = balance_logits(x, p_x, p_y, steps=steps, tol=1e-13)
        g, = torch.autograd.grad((res.table * w).sum(), x, create_graph=True)
        return torch.autograd.grad((g ** 2).sum(), x)[0]

    np.testing.assert_allclose(penalty_gradient(None).numpy(), penalty_gradient(80).numpy(), atol=1e-10)


@pytest.mark.parametrize("steps", [1, 2, None])
def test_gradient_of_an_empty_row_with_zero_target_is_zero(steps):
    """A row of -inf logits whose target is 0: its gradient is 0 (not NaN) in PyTorch and JAX, and
    the two frameworks agree on every other entry."""
    torch = pytest.importorskip("torch")
    jax, jnp = jax_setup()
    rng = np.random.default_rng(5)
    L = rng.standard_normal((4, 5))
    L[1, :] = -np.inf
    p_x, p_y, w = np.array([0.3, 0.0, 0.3, 0.4]), np.full(5, 0.2), rng.standard_normal((4, 5))
    x = torch.tensor(L, requires_grad=True)
    (balance_logits(x, p_x, p_y, steps=steps, tol=1e-13).table * torch.tensor(w)).sum().backward()
    with jax.enable_x64(True):
        g = np.asarray(jax.grad(lambda y: jnp.sum(balance_logits(y, p_x, p_y, steps=steps, tol=1e-13).table * w))(
            jnp.asarray(L)))
    assert np.isfinite(g).all() and np.isfinite(x.grad.numpy()).all()
    assert (g[1] == 0).all() and (x.grad.numpy()[1] == 0).all()
    np.testing.assert_allclose(g, x.grad.numpy(), atol=1e-12)
