"""Accelerated convergence for ``steps=None``: Anderson acceleration or over-relaxed IPF, started
from a rate estimated on the fly.

Plain IPF shrinks the marginal error by about ``theta = s_2^2`` per sweep near the solution, which
takes tens of thousands of sweeps when ``s_2`` is near 1. Both methods start after a few plain
sweeps, once the ratio of successive errors (the estimate of ``theta``) is steady, and only when
it is at least ``THETA_AUTO`` ("auto"; below it plain IPF converges in a few dozen sweeps).

* **Anderson** (:class:`Anderson`, what "auto" runs): type-II Anderson acceleration of the sweep
  map on the log scalings of one margin, memory ``MEMORY``, safeguarded by the dual objective
  (an extrapolation that does not decrease it is replaced by the plain step, and the memory is
  restarted). The check uses the sums the next half-step computes anyway, so an accepted step
  costs no read; a rejected one costs one.
* **Over-relaxation** (``"overrelax"``): each scaling becomes ``old * (new / old) ** omega``, a
  step of the dual block coordinate descent lengthened by ``omega``. For two blocks the
  linearised iteration is the SOR of a consistently ordered system, so Young's theory gives the
  best factor ``omega = 2 / (1 + sqrt(1 - theta))`` and the rate ``omega - 1`` per sweep. Every
  line whose relaxed step would not decrease the dual objective gets the plain step
  (:func:`databalance._kernels.fused.relaxed_ratio`; Thibault et al. 2017, Lehmann et al. 2021).
  Refining ``theta`` from the relaxed sweeps' rate was tried and dropped (far from the solution
  that rate is not the linear one).
* Either way, when the accelerated sweeps fall behind what plain sweeps would have reached, the
  run falls back to plain IPF for good.

Measured (benchmarks/bench_slow_mixing.py, 1000^2 tables to an L1 error of 1e-10, table reads of
the fused kernel): near-block-diagonal tables, s_2 = 0.990 / 0.999, plain 529 / 4103 reads,
over-relaxation 53 / 151, Anderson 9 / 9; entropic transport kernels, s_2 = 0.989 / 0.997 /
0.999, plain 1071 / 4285 / 10712, over-relaxation 139 / 466 / 1122, Anderson 44 / 91 / 157. A
Newton-CG method on the dual, prototyped, took as many reads as Anderson on the block tables and
5-45x more on the transport kernel (its Hessian's condition number grows like 1 / (1 - s_2^2),
and far from the solution its steps are short); it was not built.

The loop, its errors and its status rules are :mod:`databalance._ipf`'s, unchanged: this module
only wraps the kernel so that its ``rescale`` takes the accelerated step. Errors are measured on
the iterates themselves (an extrapolated or relaxed scaling does not set its margin exactly), so a
run is "converged" only when every marginal is within ``tol``. The wrapper also counts the passes
over the table. On the fused kernels both methods keep one read per sweep: over-relaxation runs
inside their pass, and Anderson extrapolates the margin whose sums the pass accumulates.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from ._ipf import l1
from ._kernels.fused import relaxed_ratio

#: The choices of ``acceleration``: "auto" accelerates (AUTO_METHOD) once the estimated plain rate
#: per sweep is at least THETA_AUTO (below it plain IPF converges in a few dozen sweeps);
#: "overrelax" and "anderson" whatever the estimate; "none" never.
CHOICES = ("auto", "overrelax", "anderson", "none")
THETA_AUTO = 0.5
#: Plain sweeps before the first estimate, and the most spent waiting for a steady one.
WARMUP_MIN, WARMUP_MAX = 4, 40
#: The fewest sweeps between two progress checks.
WINDOW = 8
#: The largest factor used (the rate omega - 1 stays below 0.99).
OMEGA_MAX = 1.99
#: What "auto" uses once the plain rate is slow: "anderson" (measured: 3-17x fewer reads than
#: over-relaxation on every slow case of benchmarks/bench_slow_mixing.py; benchmarks/RESULTS.md).
AUTO_METHOD = "anderson"
#: Anderson's memory: the differences of this many past iterates enter the least squares (16
#: measured 2-3x fewer reads than 8 on entropic transport kernels, whose spectra have many values
#: near 1, and 4.6x fewer than 3 on a sparse banded table). It keeps 2 (MEMORY + 1) vectors of
#: the extrapolated margin's length and costs O(MEMORY) vector operations per sweep. RIDGE: the
#: Tikhonov term, relative to the mean squared norm of the differences.
MEMORY = 16
RIDGE = 1e-10
#: Anderson's history (2 (memory + 1) float64 vectors of the extrapolated margin's length) may
#: take as many bytes as the table, or this many when the table is smaller; the memory is cut to
#: fit (a table of a few rows and very many columns), and "auto" over-relaxes instead when not
#: even a memory of 2 fits.
HISTORY_FLOOR = 1 << 26


def anderson_memory(kernel, margin: int) -> int:
    """Anderson's memory for extrapolating ``margin``'s scaling: ``MEMORY``, or fewer so that its
    history fits in ``max(table bytes, HISTORY_FLOOR)`` (below 2: none fits)."""
    length = int(np.prod(kernel.batch, dtype=np.int64)) * int(kernel.shape[margin])
    budget = max(int(kernel.support_size()) * np.dtype(kernel.dtype).itemsize, HISTORY_FLOOR)
    return min(MEMORY, budget // (16 * max(length, 1)) - 1)


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
        self.method = AUTO_METHOD if mode == "auto" else mode  # "overrelax", "anderson" or "none"
        self.batch = batch
        self.errors: list[float] = []
        self.omega: np.ndarray | None = None  # None: plain steps
        self.anderson = False  # Anderson steps on (the margin :class:`Accelerated` chooses)
        self.theta = math.nan
        self.relaxed_from: int | None = None  # the sweep at which relaxation started
        self.fell_back = False
        self.floor = 1e3 * float(np.finfo(dtype).eps)

    def observe(self, error: float) -> None:
        """The error before the next sweep; decide the factor for it."""
        self.errors.append(error)
        if self.mode == "none" or self.fell_back or not math.isfinite(error) or error <= self.floor:
            return
        if self.omega is None and not self.anderson:
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
        if self.method == "anderson":
            self.anderson = True
        else:
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
            self.omega, self.anderson, self.fell_back = None, False, True


class Anderson:
    """Anderson acceleration (type II) of the sweep map on one margin's log scalings ``x``.

    A sweep maps ``x`` (the scaling ``v`` of the margin fixed second) to ``G(x)``: the other
    margin's plain step, then this margin's plain step ``g = log(target / sums)``. With the last
    ``MEMORY`` + 1 pairs ``(x_i, g_i)`` and residuals ``f_i = g_i - x_i``, the next iterate is
    ``g_k - dG gamma``, ``gamma`` minimising ``|f_k - dF gamma|^2 + ridge |gamma|^2`` (``dF``,
    ``dG``: differences of successive ``f`` and ``g``).

    The safeguard (:meth:`check`): the dual objective with the other margin eliminated,
    ``Psi(v) = sum(p log(T v)) - sum(q log v)`` (convex; plain IPF decreases it every sweep), is
    evaluated at the extrapolated iterate from the sums the next half-step computes anyway. If it
    did not decrease, that problem's scaling is replaced by the plain step ``g_k`` (one more read of
    the table) and its memory cleared (restart). Everything is per problem of a batch; lines with
    a zero target are left out (their scaling stays 0). Potentials are absolute (the log kernel's
    frame added), so a change of frame between steps is harmless.
    """

    def __init__(self, memory: int = MEMORY):
        self.memory = int(memory)
        self.pending: tuple[np.ndarray, np.ndarray] | None = None  # (x_k, g_k) of the last extrapolation
        self.log_sums: np.ndarray | None = None  # log(T v) at x_k, absolute
        self.accepted = 0
        self.rejected = 0
        self.restart()

    @staticmethod
    def _log(scaling, frame, live) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.log(np.asarray(scaling, np.float64))
            if frame is not None:
                x = x + frame
        return np.where(live, x, 0.0)

    def restart(self, which=None) -> None:
        """Forget the memory (of the problems where ``which`` is True; of all when None): only the
        last pair counts for them, with the ones that follow."""
        if which is None:
            self.time = 0  # pairs recorded since the last full restart, minus 1
            self.last: tuple[np.ndarray, np.ndarray] | None = None  # (f, g) of the last pair
            # differences of successive f and g, in a ring of ``memory`` slots (slot axis first),
            # their Gram matrix, and when each slot was written
            self.dF: np.ndarray | None = None
            self.dG: np.ndarray | None = None
            self.gram: np.ndarray | None = None
            self.written = np.full(self.memory, -1)
            self.since: Any = 0  # per problem: the differences written after this time count
        else:
            self.since = np.where(which, self.time, self.since)

    def step(self, old: np.ndarray, frame, target: np.ndarray, sums: np.ndarray,
             batch_ndim: int) -> np.ndarray | None:
        """The scaling to install (in the frame of ``old``) from this margin's sums; None for the
        plain step (taken by the kernel's own rescale, so exactly plain IPF's)."""
        live = np.broadcast_to(np.asarray(target) > 0, np.shape(old))
        x = self._log(old, frame, live)
        with np.errstate(divide="ignore", invalid="ignore"):
            g = np.where(live, np.log(np.asarray(target, np.float64)) - np.log(np.asarray(sums, np.float64)), 0.0)
        if frame is not None:
            g = np.where(live, g + frame, 0.0)
        self.pending = None
        if not (np.isfinite(x).all() and np.isfinite(g).all()):
            self.restart()  # an empty line, or an overflow: a plain step
            return None
        f = g - x
        if self.last is None:
            self.last = (f, g)
            return None
        # one more difference into the ring, and its row of the Gram matrix: O(memory x lines)
        self.time += 1
        slot = self.time % self.memory
        if self.dF is None:
            self.dF = np.zeros((self.memory,) + f.shape)
            self.dG = np.zeros((self.memory,) + f.shape)
            self.gram = np.zeros(f.shape[:-1] + (self.memory, self.memory))
        assert self.dG is not None and self.gram is not None
        np.subtract(f, self.last[0], out=self.dF[slot])
        np.subtract(g, self.last[1], out=self.dG[slot])
        self.written[slot] = self.time
        self.last = (f, g)
        row = np.einsum("s...n,...n->...s", self.dF, self.dF[slot])
        self.gram[..., slot, :] = row
        self.gram[..., :, slot] = row
        valid = self.written > np.reshape(self.since, np.shape(self.since) + (1,))  # batch + (memory,)
        if not valid.any():
            return None
        A = self.gram * (valid[..., :, None] & valid[..., None, :])
        b = np.einsum("s...n,...n->...s", self.dF, f) * valid
        scale = np.trace(A, axis1=-2, axis2=-1) / np.maximum(valid.sum(axis=-1), 1)
        # the ridge on the counted differences; 1 on the others (their coefficients come out 0)
        ridge = np.where(valid, (RIDGE * scale + np.finfo(np.float64).tiny)[..., None], 1.0)
        A = A + ridge[..., :, None] * np.eye(self.memory)
        gamma = np.linalg.solve(A, b[..., None])[..., 0]
        x_new = g - np.einsum("s...n,...s->...n", self.dG, gamma)
        with np.errstate(over="ignore", invalid="ignore", under="ignore", divide="ignore"):
            # the level of x is free (G(x + c) = G(x) + c, and the objective ignores it): the
            # extrapolated scaling is rescaled to this margin's mass 1, the plain step's, so that it
            # cannot drift out of range; one that still overflows (a wild shape) is not tried
            # (the mass is sum(target * exp(x_new - g)): g = log(target / sums) in the same frame)
            d = np.where(live, x_new - g, -np.inf)
            top = d.max(axis=-1, keepdims=True)
            x_new = x_new - top - np.log((np.asarray(target) * np.exp(d - top)).sum(axis=-1, keepdims=True))
            new = np.where(live, np.exp(x_new - (0.0 if frame is None else frame)), 0.0).astype(old.dtype)
            reach = np.where(live, np.abs(x_new - g), 0.0).max(axis=-1)
        # a step that moves a scaling from the plain one by more than e^reach_max (a quarter of the
        # dtype's exponent range), or underflows one to 0, is no iterate to try (and the plain
        # step, installed if it is rejected, must stay representable next to it)
        reach_max = 0.25 * math.log(float(np.finfo(old.dtype).max))
        wild = ~(reach <= reach_max) | ~np.isfinite(new).all(axis=-1) | (live & (new == 0)).any(axis=-1)
        if wild.all():
            self.restart()
            return None
        if wild.any():
            self.restart(wild)
            new = np.where(wild[..., None], _plain(old, target, sums), new)
        self.pending = (x, g)
        return new

    @staticmethod
    def absolute_log_sums(sums, target, frame) -> np.ndarray:
        """``log(T v)`` out of the log kernel's frame (0 on lines with a zero target)."""
        live = np.broadcast_to(np.asarray(target) > 0, np.shape(sums))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(live, np.log(np.asarray(sums, np.float64)) - (0.0 if frame is None else frame), 0.0)

    def check(self, state, margin_v: int, target_v, sums, target, frame, frame_v, batch_ndim: int, eps: float):
        """At the other margin's step, with its ``sums = T v``: the problems whose objective rose since
        the last extrapolation (True), whose scaling ``v`` is then set to the plain step. Returns
        None when nothing was rejected."""
        live = np.broadcast_to(np.asarray(target) > 0, np.shape(sums))
        logr = self.absolute_log_sums(sums, target, frame)
        before, self.log_sums = self.log_sums, logr
        if self.pending is None or before is None:
            self.pending = None
            return None
        x_old, g_old = self.pending
        self.pending = None
        live_v = np.broadcast_to(np.asarray(target_v) > 0, np.shape(state.factors[margin_v]))
        x = self._log(state.factors[margin_v], frame_v, live_v)
        pw = np.where(live, np.asarray(target, np.float64), 0.0)
        qw = np.where(live_v, np.asarray(target_v, np.float64), 0.0)
        with np.errstate(invalid="ignore"):
            change = (pw * (logr - before)).sum(axis=-1) - (qw * (x - x_old)).sum(axis=-1)
        rose = ~(change <= 64 * eps)  # within rounding: accepted (NaN: rejected)
        self.accepted += int(rose.size - rose.sum())
        self.rejected += int(rose.sum())
        if not rose.any():
            return None
        self.restart(rose)
        with np.errstate(over="ignore"):
            plain = np.where(live_v, np.exp(g_old - (0.0 if frame_v is None else frame_v)), 0.0)
        mask = np.reshape(rose, rose.shape + (1,))
        state.factors[margin_v] = np.where(mask, plain, state.factors[margin_v]).astype(state.factors[margin_v].dtype)
        return rose


def _plain(old, target, sums) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(np.asarray(target) > 0, target / sums, 0.0)
    return np.broadcast_to(out, np.shape(old)).astype(np.asarray(old).dtype)


class Accelerated:
    """A kernel whose ``rescale`` takes the Anderson or over-relaxed step the controller asks for,
    and which counts the passes over the table; everything else is the wrapped kernel's."""

    def __init__(self, kernel, mode: str, problem_first: int = 0):
        self.kernel = kernel
        self.controller = Controller(mode, kernel.batch, kernel.dtype)
        self.watch = problem_first
        self._plain_reads = 0
        # Anderson extrapolates the scaling of the margin whose sums a fused pass accumulates (not
        # its lead), so that the pass keeps its one read per sweep; else the sweep's second margin
        lead = getattr(kernel, "lead", None)
        self.anderson_margin = 1 - (problem_first if lead is None else lead)
        memory = anderson_memory(kernel, self.anderson_margin)
        if memory < 2 and self.controller.method == "anderson":
            if mode == "auto":  # its history would outgrow the table: over-relaxation instead
                self.controller.method = "overrelax"
            memory = 2  # asked for by name: the smallest memory that extrapolates
        self.anderson = Anderson(memory)
        self._targets: dict[int, np.ndarray] = {}
        self._other_error = 0.0

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
        # the kernel's own measure where it has one (the Dask table kernel's rows' errors come from
        # the workers, where those rows stay)
        distance = getattr(self.kernel, "margin_l1", l1)
        if ctl.method == "anderson" and j != self.watch and not ctl.fell_back:
            # Anderson's progress shows in both margins (an extrapolation that stands still leaves
            # the watched one exact): the controller sees the larger error of the two
            err = distance(state.factors[j], sums, margin.target, len(self.kernel.batch))
            self._other_error = float(np.max(err))
        if j == self.watch and ctl.mode != "none":
            err = distance(state.factors[j], sums, margin.target, len(self.kernel.batch))
            ctl.observe(max(float(np.max(err)), self._other_error) if state.steps > 0 else math.inf)
        if ctl.anderson:
            if j != self.anderson_margin:  # the other margin: was the last extrapolation a descent?
                return self.kernel.rescale(j, margin, self._checked(j, margin, sums, state), state)
            frame = None if state.frame is None else state.frame[j]
            self._targets[j] = margin.target
            new = self.anderson.step(state.factors[j], frame, margin.target, sums, len(self.kernel.batch))
            if new is None:
                return self.kernel.rescale(j, margin, sums, state)
            return self.kernel.rescale(j, dataclasses.replace(margin, target=new * sums), sums, state)
        omega = ctl.omega
        if omega is None:
            return self.kernel.rescale(j, margin, sums, state)
        relaxed = getattr(self.kernel, "relaxed_rescale", None)
        if relaxed is not None:  # the fused kernels apply the rule inside their pass
            return relaxed(j, margin, sums, state, omega)
        new = relaxed_ratio(state.factors[j], margin.target, sums, margin.zero, omega)
        # the kernel's own rescale (the log kernel's range checks), to the margin sums wanted
        return self.kernel.rescale(j, dataclasses.replace(margin, target=new * sums), sums, state)

    def _checked(self, j, margin, sums, state):
        """The sums ``T v`` after :meth:`Anderson.check`: recomputed (one read) when it replaced an
        extrapolated scaling by the plain step."""
        o = self.anderson_margin
        frames = state.frame if state.frame is not None else (None, None)
        targets = self._targets
        rose = self.anderson.check(state, o, targets.get(o), sums, margin.target, frames[j], frames[o],
                                   len(self.kernel.batch), float(np.finfo(self.kernel.dtype).eps))
        if rose is None:
            return sums
        sums = self.sums(j, state)
        frames = state.frame if state.frame is not None else (None, None)
        self.anderson.log_sums = self.anderson.absolute_log_sums(sums, margin.target, frames[j])
        return sums


def wrap(kernel, acceleration: str, steps: int | None, first: int = 0) -> Accelerated:
    """The kernel to run: accelerated for ``steps=None`` unless ``acceleration="none"``; exact
    ``steps=k`` runs are never accelerated."""
    return Accelerated(kernel, "none" if steps is not None else acceleration, first)
