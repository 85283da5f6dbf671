"""Accelerated convergence for ``steps=None``: over-relaxed IPF with a rate estimated on the fly.

Plain IPF shrinks the marginal error by about ``theta = s_2^2`` per sweep near the solution, which
takes tens of thousands of sweeps when ``s_2`` is near 1. Over-relaxation replaces each scaling
by ``old * (new / old) ** omega``: a step of the dual block coordinate descent (the log scalings)
lengthened by ``omega``. For two blocks the linearised iteration is the SOR of a consistently
ordered system, so Young's theory gives the best factor ``omega = 2 / (1 + sqrt(1 - theta))`` and
the rate ``omega - 1`` per sweep: at ``theta = 0.998`` (``s_2 = 0.999``), 0.91 instead of 0.998.

* ``theta`` is estimated from plain sweeps (the ratio of successive errors, once it is steady).
  Refining it from the relaxed sweeps' rate (inverting Young's relation) was tried and dropped:
  far from the solution that rate is not the linear one, and the refined factors were worse.
* Every line whose relaxed step would not decrease the dual objective gets the plain step
  (:func:`databalance._kernels.fused.relaxed_ratio`): the objective decreases at every half-step,
  so the iteration converges whenever plain IPF does (Thibault et al. 2017, Lehmann et al. 2021).
* When the relaxed sweeps do not beat the plain rate, the run falls back to plain IPF for good.

The loop, its errors and its status rules are :mod:`databalance._ipf`'s, unchanged: this module
only wraps the kernel so that its ``rescale`` takes the relaxed step. Errors are measured on the
iterates themselves (the margin a relaxed step sets is not exact), so a run is "converged" only
when every marginal is within ``tol``. The wrapper also counts the passes over the table.

Measured alternatives (benchmarks/RESULTS.md): Anderson acceleration on the log potentials and a
Newton/CG method on the dual were not built; over-relaxation reached the bars with one read per
sweep on the fused kernels (its rule runs inside their pass), which neither alternative can.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ._ipf import l1
from ._kernels.fused import relaxed_ratio

#: The choices of ``acceleration``: "auto" relaxes once the estimated plain rate per sweep is at
#: least THETA_AUTO (below it plain IPF converges in a few dozen sweeps), "overrelax" whatever the
#: estimate, "none" never.
CHOICES = ("auto", "overrelax", "none")
THETA_AUTO = 0.5
#: Plain sweeps before the first estimate, and the most spent waiting for a steady one.
WARMUP_MIN, WARMUP_MAX = 4, 40
#: The fewest sweeps between two progress checks.
WINDOW = 8
#: The largest factor used (the rate omega - 1 stays below 0.99).
OMEGA_MAX = 1.99


def young_omega(theta: float) -> float:
    """The over-relaxation factor for a plain rate ``theta`` per sweep: Young's best factor
    ``2 / (1 + sqrt(1 - theta))`` moved a tenth of the way towards 2. At the best factor the rate
    ``omega - 1`` is a double eigenvalue, which the errors approach only slowly (like
    ``n (omega - 1)^n``); slightly above it the rate is ``omega - 1`` from the start (measured:
    10-15% fewer sweeps, benchmarks/RESULTS.md)."""
    best = 2.0 / (1.0 + math.sqrt(max(0.0, 1.0 - theta)))
    return min(OMEGA_MAX, best + 0.1 * (2.0 - best))


class Controller:
    """Chooses the factor from the errors of one margin (the first the loop fixes) seen before
    each of its steps: one value per sweep."""

    def __init__(self, mode: str, batch: tuple[int, ...], dtype):
        self.mode = mode
        self.batch = batch
        self.errors: list[float] = []
        self.omega: np.ndarray | None = None  # None: plain steps
        self.theta = math.nan
        self.relaxed_from: int | None = None  # the sweep at which relaxation started
        self.fell_back = False
        self.floor = 1e3 * float(np.finfo(dtype).eps)

    def observe(self, error: float) -> None:
        """The error before the next sweep; decide the factor for it."""
        self.errors.append(error)
        if self.mode == "none" or self.fell_back or not math.isfinite(error) or error <= self.floor:
            return
        if self.omega is None:
            self._warmup()
        else:
            self._adapt()

    def _warmup(self) -> None:
        e = self.errors
        s = len(e) - 1
        if s < WARMUP_MIN:
            return
        ratios = [e[i] / e[i - 1] for i in range(s - 2, s + 1) if e[i - 1] > 0]
        if len(ratios) < 3 or max(ratios) >= 1.0:
            if s >= WARMUP_MAX:
                self.fell_back = True  # no steady decrease to extrapolate: plain IPF
            return
        steady = max(ratios) - min(ratios) <= 0.1 * (1.0 - max(ratios))
        if not steady and s < WARMUP_MAX:
            return
        theta = max(ratios)
        if self.mode == "auto" and theta < THETA_AUTO:
            self.fell_back = True  # fast enough: plain IPF
            return
        self._set(theta)
        self.relaxed_from = s

    def _set(self, theta: float) -> None:
        self.theta = theta
        self.omega = np.full(self.batch + (1,), young_omega(theta))

    def _adapt(self) -> None:
        """Every e-fold of the plain rate: fall back to plain IPF for good when the errors are
        behind what plain sweeps would have reached (a transient growth of the relaxed errors is
        gone by then when the factor suits the table)."""
        e = self.errors
        s = len(e) - 1
        assert self.relaxed_from is not None
        n = s - self.relaxed_from
        plain_fold = max(WINDOW, math.ceil(1.0 / (1.0 - self.theta)))
        if n >= plain_fold and n % plain_fold == 0 and not e[s] <= e[self.relaxed_from] * self.theta**n:
            self.omega, self.fell_back = None, True


class Accelerated:
    """A kernel whose ``rescale`` takes the over-relaxed step the controller asks for, and which
    counts the passes over the table; everything else is the wrapped kernel's."""

    def __init__(self, kernel, mode: str, problem_first: int = 0):
        self.kernel = kernel
        self.controller = Controller(mode, kernel.batch, kernel.dtype)
        self.watch = problem_first
        self._plain_reads = 0

    def __getattr__(self, name):
        return getattr(self.kernel, name)

    @property
    def passes(self) -> int:
        """Reads of the table by the iteration's sums (fused kernels count their own)."""
        reads = getattr(self.kernel, "reads", None)
        return self._plain_reads if reads is None else int(reads)

    def sums(self, j, state):
        self._plain_reads += 1
        return self.kernel.sums(j, state)

    def sums_many(self, js, state):
        self._plain_reads += 1
        return self.kernel.sums_many(js, state)

    def rescale(self, j, margin, sums, state):
        ctl = self.controller
        if j == self.watch and ctl.mode != "none":
            err = l1(state.factors[j], sums, margin.target, len(self.kernel.batch))
            ctl.observe(float(np.max(err)) if state.steps > 0 else math.inf)
        omega = ctl.omega
        if omega is None:
            return self.kernel.rescale(j, margin, sums, state)
        relaxed = getattr(self.kernel, "relaxed_rescale", None)
        if relaxed is not None:  # the fused kernels apply the rule inside their pass
            return relaxed(j, margin, sums, state, omega)
        new = relaxed_ratio(state.factors[j], margin.target, sums, margin.zero, omega)
        # the kernel's own rescale (the log kernel's range checks), to the margin sums wanted
        return self.kernel.rescale(j, dataclasses.replace(margin, target=new * sums), sums, state)


def wrap(kernel, acceleration: str, steps: int | None, first: int = 0) -> Accelerated:
    """The kernel to run: relaxed for ``steps=None`` unless ``acceleration="none"``; exact
    ``steps=k`` runs are never relaxed."""
    return Accelerated(kernel, "none" if steps is not None else acceleration, first)
