"""
A large sparse co-occurrence table (MetaCLIP-style curation)
============================================================

Balance a large sparse caption x keyword co-occurrence table (MetaCLIP-style curation).

One Y-step rescales every keyword (column) to a capped count t, which flattens the keyword
distribution; the induced caption (row) marginal says how to resample the captions. The table is
never densified: 200 000 x 20 000 dense would take 32 GB.
"""

import numpy as np
import scipy.sparse as sp

from databalance import balance_table

rng = np.random.default_rng(0)
captions, keywords, matches = 200_000, 20_000, 1_000_000
# Keyword popularity is heavy-tailed, as in web data.
popularity = 1.0 / np.arange(1, keywords + 1)
cols = rng.choice(keywords, matches, p=popularity / popularity.sum())
rows = rng.integers(0, captions, matches)
table = sp.csr_array((np.ones(matches), (rows, cols)), shape=(captions, keywords))
table.sum_duplicates()

counts = table.sum(axis=0)
t = 50.0  # the cap on each keyword's count, as in the paper's reproduction of MetaCLIP
target_y = np.minimum(counts, t)
# Captions keep their own mass as the X target; only the Y-step is taken (steps=1, start="y").
target_x = table.sum(axis=1) * target_y.sum() / table.sum()
result = balance_table(table, target_x, target_y, steps=1, start="y")
balanced = result.table

sampling = np.asarray(balanced.sum(axis=1)).ravel()
sampling /= sampling.sum()
print(f"table: {table.shape[0]:,} x {table.shape[1]:,}, {table.nnz:,} nonzeros, sparse out: {sp.issparse(balanced)}")
print(f"keyword counts before: max {counts.max():.0f}, median {np.median(counts):.0f}")
print(f"keyword counts after one Y-step: max {balanced.sum(axis=0).max():.1f} (cap {t:.0f})")
print(f"captions with the largest resampling weight keep {np.sort(sampling)[-1000:].sum():.1%} of the mass")

# %%
# Keyword counts by popularity rank before and after the Y-step: the heavy head is capped at t,
# the tail is untouched.
import matplotlib.pyplot as plt

order = np.argsort(counts)[::-1]
rank = np.arange(1, keywords + 1)
fig, ax = plt.subplots(figsize=(7, 3.5), layout="constrained")
ax.loglog(rank, counts[order], label="before")
ax.loglog(rank, np.asarray(balanced.sum(axis=0)).ravel()[order], "--", label="after one Y-step")
ax.axhline(t, color="grey", lw=0.8)
ax.set(xlabel="keyword rank", ylabel="count", title="Keyword counts capped at t = 50")
ax.legend()
plt.show()
