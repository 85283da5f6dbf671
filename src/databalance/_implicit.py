"""Gradients of the converged balance (``steps=None``) by implicit differentiation.

At the fixed point the balanced table ``P = diag(e^f) exp(L) diag(e^g)`` has row sums ``p`` and
column sums ``q``: ``H(f, g, L) = (P 1 - p, P^T 1 - q) = 0``. Its Jacobian in the potentials is the
symmetric matrix ``J = [[D_r, P], [P^T, D_c]]`` (``D_r``, ``D_c`` the row and column sums), singular
along the gauge ``(1, -1)`` (adding c to f and -c to g changes nothing). For output cotangents
``(a, b)`` of ``(f, g)`` the vector-Jacobian product is

    L_bar = -P * (lambda[:, None] + mu[None, :])   where   J (lambda, mu) = (a, b).

The system is solved on its Schur complement: eliminating ``lambda = D_r^-1 (a - P mu)`` leaves
``(D_c - P^T D_r^-1 P) mu = b - P^T D_r^-1 a``, which, scaled by ``D_c^-1/2`` on both sides, is
``(I - M^T M) y = rhs`` with ``M = D_r^-1/2 P D_c^-1/2``: its eigenvalues are ``1 - s_i^2``, ``s_i``
the singular values of ``M`` (the theory page, "The spectral closed form"), the one zero eigenvalue (``s_1 = 1``, vector
``sqrt(c)``) is the gauge and is projected out, and conjugate gradients converge at a rate set by
``s_2`` -- faster than the forward iteration, whose rate is ``s_2^2`` per sweep. Only products with
``P`` and ``P^T`` are used, so memory is O(table) whatever the number of forward iterations.

The projection drops the gauge component of the cotangents (``sum a - sum b``): gradients of
gauge-invariant outputs (``log_table``, ``table``, differences of potentials) are exact; a function
of ``f`` alone is differentiated as if the gauge were fixed by ``sum f = sum g``-type balance of the
cotangents (documented in the guide). Targets are constants (validation refuses targets that
require gradients). A table (``balance_table``) is the logits' case with ``L = log T``, ``f = log u``,
``g = log v``: ``T_bar = -u v (lambda + mu)``, defined at zero entries too (the derivative of adding
mass to a structural zero, one-sided).

PyTorch: a :class:`torch.autograd.Function` whose forward runs the loop without a graph. JAX: a
``jax.custom_vjp`` (the loop needs concrete values: it works under ``jax.grad``, not under
``jax.jit``). Imported only when such an array arrives.
"""

from __future__ import annotations

import warnings

from . import _validation as check
from ._errors import ConvergenceWarning
from ._kernels import arrayapi as api

#: Conjugate-gradient budget and relative residual of the adjoint solve, by dtype.
MAX_ITERATIONS = 1000
RTOL = {"float64": 1e-11, "float32": 1e-5}


def needs_gradient(data) -> bool:
    """Whether the framework will differentiate through ``data`` (a JAX tracer counts: under
    ``jax.jit`` the implicit path raises a clear error from inside)."""
    if api.requires_grad(data):
        import torch

        return torch.is_grad_enabled()
    return api.is_traced(data)


def converged(data, solve, *, log: bool, tol: float):
    """``solve(data)`` (which returns ``(a, b), extra``: potentials or scalings, and ``extra``, whose
    first item is the run's :class:`~databalance._ipf.Outcome`) with the derivative of ``(a, b)``
    given by the implicit function theorem. That derivative holds at the fixed point only: the
    backward raises (:func:`~databalance._validation.api_implicit_unconverged`) when the run did
    not converge. In PyTorch the backward is itself differentiable (``create_graph=True``: the adjoint
    solve is recorded, and the saved potentials lead back to this function, so second derivatives
    are those of the fixed point; that graph holds the conjugate-gradient iterations)."""
    if type(data).__module__.split(".")[0] == "torch":
        return _torch(data, solve, log, tol)
    return _jax(data, solve, log, tol)


def _refuse_unconverged(box: dict, log: bool, tol: float) -> None:
    outcome = box["extra"][0]
    if outcome.status != "converged":
        raise check.api_implicit_unconverged("logits" if log else "table", outcome.status, outcome.steps, tol)


def _torch(data, solve, log, tol):
    import torch

    box: dict = {}

    class Converged(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            with torch.no_grad():
                (a, b), box["extra"] = solve(x.detach())
            ctx.save_for_backward(x, a, b)
            return a, b

        @staticmethod
        def backward(ctx, a_bar, b_bar):
            _refuse_unconverged(box, log, tol)
            x, a, b = ctx.saved_tensors
            return vjp(x, a, b, a_bar, b_bar, log=log)

    a, b = Converged.apply(data)
    return (a, b), box["extra"]


def _jax(data, solve, log, tol):
    import jax

    box: dict = {}

    @jax.custom_vjp
    def run(x):
        out, box["extra"] = solve(x)
        return out

    def forward(x):
        out, box["extra"] = solve(x)
        return out, (x, out[0], out[1])

    def backward(residuals, cotangents):
        _refuse_unconverged(box, log, tol)
        x, a, b = residuals
        return (vjp(x, a, b, cotangents[0], cotangents[1], log=log),)

    run.defvjp(forward, backward)
    out = run(data)
    return out, box["extra"]


def vjp(x, a, b, a_bar, b_bar, *, log: bool):
    """The cotangent of the input (logits, or table) from those of the result's potentials (or
    scalings) ``a, b``."""
    xp = api.namespace(x)
    if log:
        P = xp.exp(x + a[..., :, None] + b[..., None, :])
        lam, mu = adjoint(xp, P, a_bar, b_bar)
        return -P * (lam[..., :, None] + mu[..., None, :])
    P = x * a[..., :, None] * b[..., None, :]
    lam, mu = adjoint(xp, P, a_bar * a, b_bar * b)
    return -(a[..., :, None] * b[..., None, :]) * (lam[..., :, None] + mu[..., None, :])


def adjoint(xp, P, a, b):
    """``(lambda, mu)`` with ``[[D_r, P], [P^T, D_c]] (lambda, mu) = (a, b)`` up to the gauge, by
    conjugate gradients on the scaled Schur complement (batched over leading axes; lines with no
    mass, the zero targets', get 0)."""
    r = xp.sum(P, axis=-1)
    c = xp.sum(P, axis=-2)
    rpos, cpos = r > 0, c > 0
    r_inv = xp.where(rpos, 1.0 / xp.where(rpos, r, 1.0), 0.0)
    sc = xp.sqrt(c)
    sc_inv = xp.where(cpos, 1.0 / xp.where(cpos, sc, 1.0), 0.0)
    a = xp.where(rpos, a, 0.0)
    b = xp.where(cpos, b, 0.0)
    gauge = sc / xp.sqrt(xp.sum(c, axis=-1, keepdims=True))

    def project(y):
        return y - xp.sum(y * gauge, axis=-1, keepdims=True) * gauge

    def operator(y):
        z = api.matvec(xp, P, y * sc_inv) * r_inv
        return y - api.vecmat(xp, z, P) * sc_inv

    rhs = project((b - api.vecmat(xp, a * r_inv, P)) * sc_inv)
    y = xp.zeros_like(rhs)
    res = rhs
    d = res
    rs = xp.sum(res * res, axis=-1, keepdims=True)
    scale = xp.sqrt(xp.max(rs))
    rtol = RTOL["float32" if P.dtype == xp.float32 else "float64"]
    worst = 0.0
    for iteration in range(1, MAX_ITERATIONS + 1):  # noqa: B007 -- reported when the budget runs out
        worst = float(api.to_numpy(xp.sqrt(xp.max(rs)) / xp.where(scale > 0, scale, 1.0)))
        if worst <= rtol:
            break
        Ad = operator(d)
        dAd = xp.sum(d * Ad, axis=-1, keepdims=True)
        alpha = xp.where(dAd > 0, rs / xp.where(dAd > 0, dAd, 1.0), 0.0)
        y = y + alpha * d
        res = project(res - alpha * Ad)
        rs_new = xp.sum(res * res, axis=-1, keepdims=True)
        beta = xp.where(rs > 0, rs_new / xp.where(rs > 0, rs, 1.0), 0.0)
        d = res + beta * d
        rs = rs_new
    else:
        warnings.warn(check.api_adjoint_unsolved(MAX_ITERATIONS, worst), ConvergenceWarning, stacklevel=2)
    mu = y * sc_inv
    lam = (a - api.matvec(xp, P, mu)) * r_inv
    return lam, mu
