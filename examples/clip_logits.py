"""
CLIP logits balanced for k = 1 and 2 steps
==========================================

Balance a batch of CLIP-style logit matrices for k = 1, 2 steps, and the paper's losses.

Rows are images, columns are captions; the reference table of a batch is softmax over all cells
and both targets are uniform. k = 1 balances rows only (each row a softmax: the usual CLIP loss
averages it with its mirror); k = 2 balances rows then columns, in log space.
"""

import numpy as np

from databalance import balance_logits

rng = np.random.default_rng(0)
batches, n, dim, temperature = 4, 64, 32, 0.07
images = rng.standard_normal((batches, n, dim))
texts = images + 0.8 * rng.standard_normal((batches, n, dim))  # matched pairs are correlated
images /= np.linalg.norm(images, axis=-1, keepdims=True)
texts /= np.linalg.norm(texts, axis=-1, keepdims=True)
logits = (images @ texts.transpose(0, 2, 1) / temperature).astype(np.float32)
uniform = np.full(n, 1.0 / n, dtype=np.float32)
diag = np.arange(n)


def loss(k: int) -> np.ndarray:
    """-mean_i log of the balanced table's diagonal (times n), averaged with the mirror order."""
    if k == 0:
        log_joint = logits - np.log(np.exp(logits.astype(np.float64)).sum(axis=(1, 2), keepdims=True))
        return -(log_joint[:, diag, diag] + np.log(n)).mean(axis=1)
    x_first = balance_logits(logits, uniform, uniform, steps=k, start="x").log_table
    y_first = balance_logits(logits, uniform, uniform, steps=k, start="y").log_table
    return -0.5 * ((x_first + y_first)[:, diag, diag] + 2 * np.log(n)).mean(axis=1)


for k in (0, 1, 2):
    print(f"k = {k}: loss per batch {np.round(loss(k), 4)}")
res = balance_logits(logits, uniform, uniform, steps=2)
print(f"after 2 steps, dtype {res.log_table.dtype}, column sums {np.exp(res.log_table[0]).sum(axis=0)[:3]}")

# %%
# The column marginal of the first batch (times n, so 1 is uniform): k = 1 fixes only the rows,
# k = 2 brings the columns to exactly uniform.
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(7, 3.5), layout="constrained")
raw = np.exp(logits[0].astype(np.float64))
ax.plot(n * (raw / raw.sum()).sum(axis=0), ".", label="k = 0 (softmax over all cells)")
for k, marker in ((1, "x"), (2, "o")):
    cols = np.exp(balance_logits(logits, uniform, uniform, steps=k).log_table[0]).sum(axis=0)
    ax.plot(n * cols, marker, mfc="none", label=f"k = {k}")
ax.set(xlabel="caption (column)", ylabel="n x column mass", title="Balancing the columns of one batch")
ax.legend()
plt.show()
