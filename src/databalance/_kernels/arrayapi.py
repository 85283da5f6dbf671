"""Tables and logits that follow the Python array API standard (PyTorch, JAX, CuPy, array-api-strict).

The same half-step loop (:mod:`databalance._ipf`) runs on these kernels; everything it touches stays
in the input's namespace and on its device. The kernels are *functional*: every step makes new
arrays and never writes into one, so that PyTorch autograd and ``jax.grad`` differentiate through
the unrolled steps (``steps=k``), and so that a :class:`~databalance._kernels.State` copied by
reference is a snapshot.

* :class:`ApiDenseKernel` -- a nonnegative table, 2-D or batched, used as is.
* :class:`ApiLogKernel` -- logits, balanced through the buffer ``exp(L + f + g)`` as in
  :class:`~databalance._kernels.log.LogKernel`: exponentiated once (each row's or column's maximum
  subtracted), plain scaling steps on it, a scaling that leaves ``[1/tau, tau]`` absorbed into the
  potentials (the buffer re-exponentiated), and an exact log-sum-exp step when a line's sum
  underflows. Deciding between these reads one device flag per sweep (:meth:`ApiLogKernel.rescale`:
  a plain half-step also bounds the next one's sums and scaling, and when the bounds are safe the
  next half-step takes the plain path without a read; with ``steps=None`` the flag rides with the
  convergence check; the decisions, hence the results, are those of reading every half-step).
  Under ``jax.jit`` (traced values, nothing can be read) every half-step is the exact log-sum-exp
  step instead, which needs no decision (two exponentials of the table per half-step rather than
  none).

What differs from the NumPy kernels, and why:

* Everything is computed in the input's dtype: float32 stays float32 on the device, potentials
  included (the NumPy log kernel keeps float64 potentials; devices without float64, and JAX by
  default, have none to offer). float32 logits of magnitude M therefore carry an absolute error of
  about ``M * 6e-8`` in ``logits + f + g``; for M near 1e4 the run stays finite and exact in its
  structural zeros, but its marginal error cannot go below ~1e-3 (the status says so). Pass
  float64 where the device has it to balance such logits tightly.
* Marginal errors are accumulated in the working dtype (NumPy: float64) and kept on the device.
* ``sums`` products are ``matmul`` with a vector (batched: a batch of matrix-vector products).

``array_api_compat`` is imported only when such an array arrives (:func:`namespace`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Top-level modules whose arrays are balanced here (NumPy, Dask and pandas have their own paths).
FRAMEWORKS = ("torch", "jax", "jaxlib", "cupy", "array_api_strict")
OTHER_PATHS = ("numpy", "dask", "pandas", "scipy", "builtins", "xarray")


def is_array_api(x) -> bool:
    """Whether ``x`` is an array to balance in its own namespace (without importing anything)."""
    if isinstance(x, np.ndarray):
        return False
    root = type(x).__module__.split(".")[0]
    if root in OTHER_PATHS:
        return False
    return root in FRAMEWORKS or hasattr(x, "__array_namespace__")


def namespace(*arrays) -> Any:
    """The (array-api-compat wrapped) namespace of arrays; raises ImportError with the extra's name."""
    try:
        import array_api_compat
    except ImportError:  # pragma: no cover - the extra is installed in the test environment
        raise ImportError("Balancing arrays other than NumPy's needs array-api-compat: "
                          "pip install 'databalance[array-api]'.") from None
    return array_api_compat.array_namespace(*arrays)


def device(x) -> Any:
    import array_api_compat

    return array_api_compat.device(x)


def is_traced(x) -> bool:
    """Whether ``x`` is a JAX tracer (under ``jax.jit`` or ``jax.grad``): its values cannot be read."""
    if not type(x).__module__.startswith("jax"):
        return False
    import jax

    return isinstance(x, jax.core.Tracer)


def requires_grad(x) -> bool:
    return bool(getattr(x, "requires_grad", False))


def to_numpy(x) -> np.ndarray:
    """A host copy of an array (detached from any autodiff graph)."""
    if isinstance(x, np.ndarray):
        return x
    root = type(x).__module__.split(".")[0]
    if root == "torch":
        return x.detach().cpu().numpy()
    if root == "cupy":
        return x.get()
    try:
        return np.asarray(x)
    except (TypeError, RuntimeError, ValueError):
        return np.from_dlpack(x)


def stop_gradient(x):
    """``x`` cut from the autodiff graph (a constant for the derivative)."""
    root = type(x).__module__.split(".")[0]
    if root == "torch":
        return x.detach()
    if root in ("jax", "jaxlib"):
        import jax

        return jax.lax.stop_gradient(x)
    return x


def numpy_dtype(xp, dtype) -> np.dtype:
    """The NumPy dtype of a namespace's real floating dtype."""
    return np.dtype(np.float32) if dtype == xp.float32 else np.dtype(np.float64)


def ratio(xp, p, s, positive):
    """p / s, with 0 on the lines whose target is 0 (``positive`` masks the others, or None)."""
    if positive is None:
        return p / s
    return xp.where(positive, p / xp.where(positive, s, 1.0), 0.0)


def finite_max(xp, a, axis: int):
    """Max along an axis, with 0 for lines that are entirely -inf."""
    peak = xp.max(a, axis=axis)
    return xp.where(xp.isinf(peak), 0.0, peak)


def add_potentials(xp, L, f, g):
    """``L + f[..., :, None] + g[..., None, :]``."""
    return L + f[..., :, None] + g[..., None, :]


def logsumexp_rows(xp, L, g):
    """``log(sum_j exp(L[..., i, j] + g[..., j]))``; -inf for lines with no mass."""
    t = L + g[..., None, :]
    peak = stop_gradient(finite_max(xp, t, -1))
    s = xp.sum(xp.exp(t - peak[..., None]), axis=-1)
    # log of a masked sum: a line with no mass gets -inf without a log(0) whose derivative, 1/0,
    # times a zero cotangent would be NaN under autodiff
    positive = s > 0
    return xp.where(positive, xp.log(xp.where(positive, s, 1.0)) + peak, -xp.inf)


def matvec(xp, A, v):
    return xp.matmul(A, v[..., None])[..., 0]


def vecmat(xp, u, A):
    return xp.matmul(u[..., None, :], A)[..., 0, :]


class ApiDenseKernel:
    """A nonnegative table of shape ``batch + (m, l)`` in namespace ``xp``; scalings ``u``, ``v``."""

    def __init__(self, table, xp, has_zeros: bool = True):
        self.xp = xp
        self.table = table
        self.has_zeros = has_zeros
        self.xdtype = table.dtype
        self.dtype = numpy_dtype(xp, table.dtype)
        self.device = device(table)
        self.shape = tuple(table.shape[-2:])
        self.batch = tuple(table.shape[:-2])
        self.first = 0  # the side whose frame sums give the total (the log kernel's first step's)
        self._start = None  # the starting scaling, once initial_state has set it
        self._frame_sums: dict = {}  # margin -> its sums of the table as stored (frame_sum)

    def asarray(self, x):
        """A NumPy value (a target, a scale) as an array of the working dtype on the device."""
        return self.xp.asarray(np.asarray(x, dtype=self.dtype), dtype=self.xdtype, device=self.device)

    def adopt(self, problem):
        """The problem with its targets moved to the device, and a mask of their positive entries
        in place of the NumPy indices of the zero ones."""
        from dataclasses import replace

        margins = []
        for m in problem.margins:
            target = self.asarray(m.target)
            margins.append(replace(m, target=target, zero=None if m.zero is None else target > 0))
        return replace(problem, margins=tuple(margins))

    # -- products -----------------------------------------------------------------------------------

    def row_sums(self, v):
        return matvec(self.xp, self.table, v)

    def col_sums(self, u):
        return vecmat(self.xp, u, self.table)

    def sums(self, j, state):
        if state.steps == 0 and self._start is not None:  # the equal starting scalings: no product
            return self.frame_sum(j) * self._start  # a power of two, so exactly the product's value
        return self.row_sums(state.factors[1]) if j == 0 else self.col_sums(state.factors[0])

    def sums_many(self, js, state) -> dict:
        return {j: self.sums(j, state) for j in js}

    def ones(self, n: int):
        return self.xp.ones(self.batch + (n,), dtype=self.xdtype, device=self.device)

    def frame_sum(self, j: int):
        """Margin ``j``'s sums of the table as stored (computed once)."""
        cache = self._frame_sums
        if j not in cache:
            cache[j] = self.row_sums(self.ones(self.shape[1])) if j == 0 else self.col_sums(self.ones(self.shape[0]))
        return cache[j]

    @property
    def frame_sums(self) -> list:
        return [self.frame_sum(0), self.frame_sum(1)]

    def input_sums(self) -> list:
        return self.frame_sums

    def line_sums(self) -> list:
        """Row and column sums of the input (iterate 0), for checks before the loop."""
        return self.input_sums()

    # -- the loop's state ---------------------------------------------------------------------------

    def initial_state(self):
        """Every scaling equal to ``total ** -1/2`` rounded to a power of two, as the NumPy kernel."""
        from . import State

        xp = self.xp
        total = stop_gradient(xp.sum(self.frame_sum(self.first), axis=-1, keepdims=True))
        scale = 2.0 ** xp.round(-xp.log2(total) / len(self.shape))
        self._start = scale
        return State([self.ones(n) * scale for n in self.shape])

    def rescale(self, j, margin, sums, state):
        state.factors[j] = ratio(self.xp, margin.target, sums, margin.zero)
        return sums

    def export(self, state, scales):
        if state.steps == 0:
            return [self.xp.ones_like(f) for f in state.factors]
        return [f * self.asarray(c) for f, c in zip(state.factors, scales, strict=True)]

    # -- support (host copies, before the loop and for feasibility only) ----------------------------

    def nonempty(self, j, masks=None):
        if masks is None:
            return to_numpy(stop_gradient(self.line_sums()[j])) > 0
        w = self.asarray(masks[1 - j])
        return to_numpy(stop_gradient(self.row_sums(w) if j == 0 else self.col_sums(w))) > 0

    def full_support(self) -> bool:
        return not self.has_zeros

    def support_size(self) -> int:
        return int(np.prod(self.batch + self.shape))

    def host_support(self):
        return to_numpy(stop_gradient(self.table)) > 0

    def pattern(self, b):
        from .dense import support_pattern_dense

        return support_pattern_dense(self.host_support()[b])


class ApiLogKernel(ApiDenseKernel):
    """Logits ``L`` (-inf: structural zero) balanced through the buffer ``exp(L + f + g)``."""

    def __init__(self, logits, xp, first: int, has_zeros: bool = True, *, traced: bool = False):
        super().__init__(logits, xp, has_zeros)
        self.logits = logits
        self.first = first
        self.traced = traced
        self.tiny, self.tau = (1e-100, 1e50) if self.dtype == np.float64 else (1e-15, 1e8)
        # The centre is a gauge: the iterates do not depend on it, so it is a constant for autodiff.
        centre = -stop_gradient(finite_max(xp, logits, -1 if first == 0 else -2))
        zero = xp.zeros(self.batch + (self.shape[1 - first],), dtype=self.xdtype, device=self.device)
        self.centre = centre
        self._frame = [centre, zero] if first == 0 else [zero, centre]
        # exp(L + centre) without adding the zero potential: one pass fewer over the table
        self.table = xp.exp(logits + (centre[..., :, None] if first == 0 else centre[..., None, :]))
        self.frame_sum(first)  # in the initial frame, before any step moves the buffer
        self._cleared = 0  # half-steps up to this one are proved plain (no read needed)
        self._pending: tuple | None = None  # (k, flag): does k + 1 or k + 2 risk a safeguard?
        self._targets: list = []

    def adopt(self, problem):
        problem = super().adopt(problem)
        self._targets = [m.target for m in problem.margins]
        return problem

    def _exponentiate(self, frame):
        return self.xp.exp(add_potentials(self.xp, self.logits, frame[0], frame[1]))

    def initial_state(self):
        state = super().initial_state()
        state.frame = list(self._frame)
        return state

    def input_sums(self):
        """Row and column sums of exp(L), undone from the first frame in log space (as LogKernel)."""
        xp = self.xp
        pot = self.centre
        shift = xp.min(pot, axis=-1, keepdims=True)
        weights = xp.exp(shift - pot)
        if self.first == 0:
            return [xp.exp(xp.log(self.frame_sum(0)) - pot), xp.exp(xp.log(self.col_sums(weights)) - shift)]
        return [xp.exp(xp.log(self.row_sums(weights)) - shift), xp.exp(xp.log(self.frame_sum(1)) - pot)]

    def nonempty(self, j, masks=None):
        """Lines with a finite logit (the buffer may underflow where the logits do not), counting
        only cells where the other margin's mask is True."""
        if not self.has_zeros:  # every line has mass (as LogKernel: no pass over the logits)
            full = np.ones(self.batch + (self.shape[j],), dtype=bool)
            return full if masks is None else full & np.any(masks[1 - j], axis=-1, keepdims=True)
        xp = self.xp
        support = xp.astype(~xp.isinf(stop_gradient(self.logits)), self.xdtype)
        w = self.ones(self.shape[1 - j]) if masks is None else self.asarray(masks[1 - j])
        return to_numpy(matvec(xp, support, w) if j == 0 else vecmat(xp, w, support)) > 0

    def rescale(self, j, margin, sums, state):
        """Half-step ``k = state.steps + 1``: plain, absorbed (a scaling out of ``[1/tau, tau]``) or
        exact (a positive target's line sum below ``tiny``), decided from one read of device flags.

        A plain half-step ``k >= 3`` that reads also reads whether half-step ``k + 1`` might need a
        safeguard (:meth:`_next_unsafe`, rigorous bounds); when it cannot, ``k + 1`` is plain without
        a read. An even plain half-step also leaves a device flag for the next two
        (:meth:`pending_flag`), which ``steps=None`` reads along with its convergence check
        (:meth:`deliver`). So ``steps=k`` reads one flag per sweep, ``steps=None`` (usually) only
        its error, and every decision is the one reading every half-step would take."""
        xp = self.xp
        p = margin.target
        positive = p > 0
        if self.traced:
            return self._exact_step(j, p, positive, state)
        k = state.steps + 1
        other = state.factors[1 - j]
        new = ratio(xp, p, sums, margin.zero)
        self._pending = None
        if k <= self._cleared:  # proved plain by an earlier half-step
            self._plain(k, j, new, state, positive)
            return sums
        flags = [xp.any(xp.logical_and(sums < self.tiny, positive)),
                 xp.logical_or(self._out_of_range(new, positive), self._out_of_range(other, other > 0))]
        predict = k >= 3 and len(self._targets) == 2  # both scalings set by a step, the other margin's last
        if predict:
            flags.append(self._next_unsafe(j, new, state.factors[j], other, positive))
        read = [bool(b) for b in to_numpy(xp.stack(flags))]  # the one read
        underflow, out_of_range = read[0], read[1]
        if underflow:
            return self._exact_step(j, p, positive, state)
        if not out_of_range:
            if predict and not read[2]:
                self._cleared = k + 1
            self._plain(k, j, new, state, positive)
            return sums
        state.frame[j] = state.frame[j] + xp.log(new)
        state.frame[1 - j] = state.frame[1 - j] + xp.log(other)
        self._reset(state)
        return new * sums

    def _plain(self, k, j, new, state, positive):
        """A plain half-step: the new scaling set; an even one leaves the flag of the next two."""
        if k >= 3 and k % 2 == 0 and len(self._targets) == 2:
            self._pending = (k, self._next_unsafe(j, new, state.factors[j], state.factors[1 - j], positive,
                                                  two=True))
        state.factors[j] = new

    def pending_flag(self):
        """The device flag an even plain half-step left (whether either of the next two might need a
        safeguard), for the loop to read with its error; None when there is none."""
        return None if self._pending is None else self._pending[1]

    def deliver(self, unsafe: bool) -> None:
        """The value of :meth:`pending_flag`, read by the loop right after that half-step."""
        if self._pending is not None and not unsafe:
            self._cleared = max(self._cleared, self._pending[0] + 2)
        self._pending = None

    def _next_unsafe(self, j, new, old, other, positive, two: bool = False):
        """Whether the next half-step (margin ``1 - j``) might find a sum below ``tiny`` or a scaling
        out of ``[1/tau, tau]``: a device flag, True whenever the next half-step's own checks could be.

        After the other margin's step, ``sum_i B_ij old_i = q_j / other_j`` (B the buffer). This step
        multiplies ``old_i`` by ``r_i = new_i / old_i`` (lines with a positive target; the others
        carry no mass), so the next sums lie in ``[min r, max r] * q / other`` and the next scaling
        in ``[other / max r, other / min r]``; a factor of 4 covers the rounding of the invariant.
        The next check of ``new`` itself is the one this step made (or the bounds that proved it).

        ``two``: the half-step after as well (margin ``j`` again). Its sums are ``sum_j B_ij w_j``
        with the next scaling ``w`` within ``other * [1 / max r, 1 / min r]``, so they lie in
        ``p / new * [1 / max r, 1 / min r]`` (``sum_j B_ij other_j = p_i / new_i`` after this step),
        and its scaling in ``new * [min r, max r]``."""
        xp = self.xp
        q = self._targets[1 - j]
        wanted = q > 0
        r = xp.where(positive, new / xp.where(positive, old, 1.0), 1.0)
        lo, hi = xp.min(r, axis=-1, keepdims=True), xp.max(r, axis=-1, keepdims=True)
        slack = 4.0
        risky = xp.logical_or(lo * q < (slack * self.tiny) * other,
                              xp.logical_or(other * slack > lo * self.tau, other * self.tau < hi * slack))
        flag = xp.any(xp.logical_and(risky, wanted))
        if not two:
            return flag
        p = self._targets[j]
        after = xp.logical_or(p < (slack * self.tiny) * new * hi,
                              xp.logical_or(new * hi * slack > self.tau, new * lo * self.tau < slack))
        return xp.logical_or(flag, xp.any(xp.logical_and(after, positive)))

    def _out_of_range(self, x, where):
        xp = self.xp
        return xp.logical_or(xp.any(x > self.tau), xp.any(xp.logical_and(x < 1 / self.tau, where)))

    def _reset(self, state):
        self.table = self._exponentiate(state.frame)
        state.factors = [self.xp.ones_like(f) for f in state.factors]

    def _exact_step(self, j, p, positive, state):
        """One log-sum-exp half-step, then the buffer is rebuilt on the new potentials."""
        xp = self.xp
        other = state.frame[1 - j] + xp.log(state.factors[1 - j])
        lines = self.logits if j == 0 else self.logits.mT
        lse = logsumexp_rows(xp, lines, other)
        state.frame[j] = xp.where(positive, xp.log(xp.where(positive, p, 1.0)) - lse, -xp.inf)
        state.frame[1 - j] = other
        self._reset(state)
        return p

    def export(self, state, scales):
        xp = self.xp
        if state.steps == 0:
            return [xp.zeros_like(f) for f in state.factors]
        return [pot + xp.log(f) + xp.log(self.asarray(c))
                for pot, f, c in zip(state.frame, state.factors, scales, strict=True)]

    def host_support(self):
        return ~np.isneginf(to_numpy(stop_gradient(self.logits)))


def scaled(xp, table, u, v):
    """``diag(u) @ table @ diag(v)`` over the last two axes."""
    return table * u[..., :, None] * v[..., None, :]


def returned_sums(xp, logits, f, g) -> list:
    """Row and column sums of ``exp(logits + f + g)``, the table a log result returns."""
    t = xp.exp(add_potentials(xp, logits, f, g))
    return [xp.sum(t, axis=-1), xp.sum(t, axis=-2)]

