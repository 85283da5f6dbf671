"""A real two-worker ``distributed.LocalCluster`` for the Dask tests, started and closed by them."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def local_cluster(default_client: bool = True) -> Iterator:
    """A client of a LocalCluster of two one-thread worker processes (1 GiB each), both closed after.
    ``default_client``: the client becomes dask's default (a worker can then be restarted by it)."""
    import distributed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster = distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None,
                                           memory_limit="1GiB")
        client = distributed.Client(cluster, set_as_default=default_client)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
