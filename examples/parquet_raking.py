"""
Raking a Parquet dataset of samples with Dask
=============================================

Write a survey sample as a partitioned Parquet dataset (pyarrow), read it back lazily with
``dask.dataframe.read_parquet`` and rake it to three population margins, one of them joint. The
fit is one pass over the partitions (they are reduced to per-cell sums), each ``mean`` one more;
the weights stay a lazy Dask array. Needs ``pip install "databalance[dask]"``; the same code runs
on a ``distributed`` cluster when a ``Client`` is active. Not executed when the docs are built
(it writes files); run it with ``python examples/parquet_raking.py``.
"""

import tempfile

import numpy as np


def write_sample(folder: str, n: int, partitions: int, seed: int = 0) -> None:
    """A sample over-representing the young and the cities, as ``partitions`` Parquet files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    for part, rows in enumerate(np.array_split(np.arange(n), partitions)):
        k = len(rows)
        age = rng.choice(["18-34", "35-54", "55+"], k, p=[0.5, 0.3, 0.2])
        region = np.where(rng.random(k) < 0.7, "urban", "rural")
        sex = np.where(rng.random(k) < 0.45, "F", "M")
        income = 30 + 10 * (age == "35-54") + 5 * (age == "55+") + 8 * (region == "urban") + rng.normal(0, 12, k)
        owns_home = (rng.random(k) < 0.3 + 0.2 * (age != "18-34") - 0.1 * (region == "urban")).astype(float)
        table = pa.table({"age": age, "region": region, "sex": sex, "income": income, "owns_home": owns_home})
        pq.write_table(table, f"{folder}/part-{part:03d}.parquet")


def main(n: int = 20_000, partitions: int = 4, folder: str | None = None, plot: bool = True) -> dict:
    """Write, read and rake; print the estimates with their standard errors and return them."""
    import dask
    import dask.dataframe as dd

    from databalance import BalancedEstimator

    with tempfile.TemporaryDirectory() as tmp:
        folder = folder or tmp
        write_sample(folder, n, partitions)
        df = dd.read_parquet(folder)  # lazy: nothing is read yet
        margins = {
            "age": {"18-34": 0.30, "35-54": 0.35, "55+": 0.35},
            "region": {"urban": 0.55, "rural": 0.45},
            ("sex", "region"): {("F", "urban"): 0.28, ("M", "urban"): 0.27, ("F", "rural"): 0.23,
                                ("M", "rural"): 0.22},
        }
        with dask.config.set(scheduler="threads"):  # or an active distributed.Client
            raking = BalancedEstimator(margins).fit(df)  # one pass over the Parquet files
            est = raking.mean(df[["income", "owns_home"]])  # and one more
            plain = df[["income", "owns_home"]].mean().compute()
    print(repr(raking))
    print(f"weights: a lazy {type(raking.weights_).__name__} in {raking.weights_.numblocks[0]} partitions")
    low, high = est.confidence_interval(0.95)
    results = {}
    for name in ("income", "owns_home"):
        results[name] = (float(est.estimate[name]), float(est.standard_error[name]))
        print(f"{name:10s} sample mean {plain[name]:7.3f}   raked {est.estimate[name]:7.3f} "
              f"(SE {est.standard_error[name]:.3f}, 95% CI {low[name]:.3f} to {high[name]:.3f})")
    if plot:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 2.5))
        names = list(results)
        ax.errorbar([results[k][0] / plain[k] for k in names], names,
                    xerr=[1.96 * results[k][1] / plain[k] for k in names], fmt="o", capsize=4)
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("raked estimate / sample mean (95% CI)")
        fig.tight_layout()
    return results


if __name__ == "__main__":
    main()
