"""Representations of the table being balanced: the only place that knows array types.

The half-step loop (:mod:`databalance._ipf`) asks a kernel for a handful of operations, listed in
:class:`Kernel`; :func:`kernel_for` picks the implementation for an input, and :func:`scaled_table`
and :func:`support_pattern` turn a result's data back into arrays of the input's kind.

* :class:`.dense.DenseKernel` -- a NumPy array, 2-D or batched (leading axes).
* :class:`.sparse.SparseKernel` -- a 2-D scipy.sparse matrix or array, never densified.
* :class:`.log.LogKernel` -- logits, balanced through a stabilised exponentiated buffer.
* :class:`.tensor.TensorKernel` -- a dense N-d table with one- and multi-way margins.
* :class:`.cells.CellKernel` -- a sparse N-d table given as its occupied cells (samples' cells).
* :class:`.chunked.ChunkedKernel` -- a 2-D Dask array partitioned along rows (imported lazily).
* :class:`.arrayapi.ApiDenseKernel`, :class:`.arrayapi.ApiLogKernel` -- PyTorch, JAX, CuPy (any
  array-API) tables and logits, computed in their namespace and on their device (imported lazily).

Mutable loop state (the scalings, and the log kernel's potentials) lives in a :class:`State`
that the loop owns and passes in; kernels keep only their input and workspace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp

from .cells import CellKernel
from .dense import DenseKernel, support_pattern_dense
from .log import LogKernel
from .sparse import SparseKernel, scaled_sparse, support_pattern_sparse
from .tensor import TensorKernel

__all__ = ["CellKernel", "DenseKernel", "Kernel", "LogKernel", "SparseKernel", "State", "TensorKernel", "is_sparse",
           "is_array_api", "kernel_for", "log_kernel", "scaled_table", "support_pattern"]


@dataclass
class State:
    """The loop's mutable state: one scaling per margin (broadcast over its axes), for kernels that
    move their frame (the log kernel) that frame, and the half-steps taken (0: the input itself)."""

    factors: list[np.ndarray]
    frame: Any = field(default=None)
    steps: int = 0
    fixed: int = -1  # the margin the last half-step fixed
    cache: Any = field(default=None)  # a kernel's results kept for a later call (.fused)


class Kernel(Protocol):
    """What the half-step loop needs of a table. Margin ``j`` is axis ``j`` of the table's own
    (trailing) axes: 0 for the rows, 1 for the columns."""

    dtype: np.dtype
    shape: tuple[int, ...]
    batch: tuple[int, ...]
    table: Any

    @property
    def frame_sums(self) -> list[np.ndarray]:
        """Each margin's sums of the table as stored (the first frame)."""

    def initial_state(self) -> State:
        """Equal starting scalings that bring the table's total near 1: the iterates do not depend
        on them, but they keep the products of tiny or huge tables and their scalings in range."""

    def input_sums(self) -> list[np.ndarray]:
        """Each margin's sums of the input table itself (iterate 0)."""

    def sums(self, j: int, state: State) -> np.ndarray:
        """Margin ``j``'s sums of the current table without its own scaling."""

    def sums_many(self, js: list[int], state: State) -> dict[int, np.ndarray]:
        """The sums of several margins (a kernel may share work among them)."""

    def rescale(self, j: int, margin: Any, sums: np.ndarray, state: State) -> np.ndarray:
        """Set margin ``j``'s scaling to ``margin.target / sums`` (0 on its zero targets); return
        its sums in the (possibly moved) frame."""

    def export(self, state: State, scales: list[np.ndarray]) -> list[np.ndarray]:
        """The result's scalings (potentials for the log kernel), each times its ``scales`` entry."""

    def nonempty(self, j: int, masks: list[np.ndarray] | None = None) -> np.ndarray:
        """Which cells of margin ``j`` have mass, counting only table cells where every other
        margin's mask is True."""

    def full_support(self) -> bool:
        """Whether any targets are feasible without a check (no zero entry, and margins that cannot
        conflict with each other)."""

    def support_size(self) -> int:
        """Entries a feasibility check would look at."""

    def pattern(self, b: tuple) -> sp.csr_array:
        """The support of batch problem ``b`` as a CSR pattern."""


def is_sparse(table) -> bool:
    """Whether ``table`` is a scipy.sparse matrix or array."""
    return sp.issparse(table)


def is_dask_array(table) -> bool:
    """Whether ``table`` is a Dask array (without importing dask): :mod:`.chunked` balances it."""
    return type(table).__module__.partition(".")[0] == "dask" and hasattr(table, "chunks")


def kernel_for(table) -> Kernel:
    """The kernel of a nonnegative table (validated by the kernel); the fused numba form when
    :func:`.fused.which_kernel` chooses it."""
    if is_dask_array(table):  # partitioned along rows (imports dask)
        from .chunked import ChunkedKernel

        return ChunkedKernel.from_input(table)
    from . import fused

    kernel = SparseKernel.from_input(table) if sp.issparse(table) else DenseKernel.from_input(table)
    return fused.accelerated(kernel)


def log_kernel(logits: np.ndarray, first: int, has_zeros: bool = True, line_max: np.ndarray | None = None) -> LogKernel:
    """The kernel of validated logits (fused when :func:`.fused.which_kernel` chooses it)."""
    from . import fused

    return fused.log_kernel(logits, first, has_zeros, line_max)


def is_array_api(table) -> bool:
    """Whether ``table`` is an array of another array-API namespace (PyTorch, JAX, CuPy, ...)."""
    from .arrayapi import is_array_api as check

    return check(table)


def scaled_table(table, u: np.ndarray, v: np.ndarray):
    """``diag(u) @ table @ diag(v)`` (over the last two axes); sparse tables keep format and pattern."""
    if sp.issparse(table):
        return scaled_sparse(table, u, v)
    if is_dask_array(table):  # lazy, block by block
        from .chunked import scaled_chunked

        return scaled_chunked(table, u, v)
    if is_array_api(table):
        from . import arrayapi

        return arrayapi.scaled(arrayapi.namespace(table), table, u, v)
    out = np.multiply(table, u[..., :, None])
    out *= v[..., None, :]
    return out


def support_pattern(table) -> sp.csr_array:
    """The strictly positive entries of a 2-D dense or sparse table as a sorted CSR pattern."""
    if is_dask_array(table):  # gathered from the blocks
        from .chunked import support_pattern_chunked

        return support_pattern_chunked(table)
    if is_array_api(table):
        from .arrayapi import to_numpy

        table = to_numpy(table)
    return support_pattern_sparse(table) if sp.issparse(table) else support_pattern_dense(table)
