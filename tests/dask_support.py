"""What the Dask tests share: a real two-worker ``distributed.LocalCluster`` (started and closed by
the tests) and the in-memory NumPy kernel's results their tables are checked against. Dask is
imported only inside (this module is collected for doctests where Dask may be absent)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import scipy.sparse as sp

from databalance import balance_table


@contextmanager
def local_cluster(default_client: bool = True, n_workers: int = 2) -> Iterator:
    """A client of a LocalCluster of ``n_workers`` one-thread worker processes (1 GiB each), both
    closed after. ``default_client``: the client becomes dask's default (a worker can then be
    restarted by it)."""
    import distributed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster = distributed.LocalCluster(n_workers=n_workers, processes=True, threads_per_worker=1,
                                           dashboard_address=None, memory_limit="1GiB")
        client = distributed.Client(cluster, set_as_default=default_client)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def numpy_reference(monkeypatch, T, kind, p, q, **options):
    """The in-memory NumPy kernel's result (never numba): the independent reference."""
    with monkeypatch.context() as m:
        m.setenv("DATABALANCE_KERNEL", "numpy")
        return balance_table(sp.csr_array(T) if kind == "sparse" else T, p, q, **options)


def assert_equal_scalings(got, ref, rtol):
    """Equal scalings, exact zeros where the reference has them (the zero targets' lines)."""
    for g, r in ((got.row_scaling, ref.row_scaling), (got.col_scaling, ref.col_scaling)):
        g, r = np.asarray(g, float), np.asarray(r, float)
        assert np.array_equal(g == 0, r == 0)
        np.testing.assert_allclose(g[r != 0], r[r != 0], rtol=rtol, atol=0)


def assert_steps_like_numpy(monkeypatch, table, T, kind, p, q, start):
    """``balance_table`` of the Dask ``table`` after k = 1..5 half-steps and converged: the status,
    steps, scalings (1e-12) and errors of the in-memory NumPy kernel on ``T``."""
    for steps in [1, 2, 3, 4, 5, None]:
        ref = numpy_reference(monkeypatch, T, kind, p, q, steps=steps, start=start)
        got = balance_table(table, p, q, steps=steps, start=start)
        assert (got.status, got.steps) == (ref.status, ref.steps)
        assert_equal_scalings(got, ref, rtol=1e-12)
        np.testing.assert_allclose(got.marginal_error, ref.marginal_error, rtol=1e-8, atol=1e-15)
    assert ref.status == "converged"


def sparse_blocks(T, rows):
    """A Dask array of CSR row blocks of ``T``, each built by its own task."""
    import dask
    import dask.array as da

    parts = []
    for i in range(0, T.shape[0], rows):
        block = dask.delayed(lambda a, b: sp.csr_matrix(T[a:b]))(i, min(i + rows, T.shape[0]))
        parts.append(da.from_delayed(block, shape=(min(rows, T.shape[0] - i), T.shape[1]), dtype=T.dtype,
                                     meta=sp.csr_matrix((0, 0), dtype=T.dtype)))
    return da.concatenate(parts)
