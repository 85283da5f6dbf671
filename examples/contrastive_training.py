"""
Training a two-tower model with balanced contrastive losses
===========================================================

A small version of the paper's experiment: two encoders ("image" and "caption" towers) trained on
paired data with :func:`databalance.losses.balanced_contrastive_loss` for k = 0 (joint softmax),
1 (CLIP), 2 (double balancing) and 3, then compared on held-out pairs by

* **zero-shot accuracy**: classify an "image" by its nearest class "caption" (the caption view of
  the class's noiseless latent, like a prompt "a photo of a <class>"), and
* **retrieval accuracy**: the share of held-out images whose own caption is the nearest among 512.

The data are synthetic, so nothing needs downloading: 20 latent classes in 8 dimensions; each
sample's latent is its class centre plus noise, and its two views are different random maps of
the latent, one through ``tanh``, each with its own noise. The towers are linear maps to 16
dimensions followed by normalisation; temperature 0.1; Adam.

The documentation shows this script without running it (its build does not install PyTorch). Run
as is, it takes the quick mode (one seed, 4 epochs on 1024 pairs: it shows the mechanics, not the
comparison), which ``tests/test_examples.py`` runs. ``python examples/contrastive_training.py
--full`` runs 5 seeds and 30 epochs on 2048 pairs and prints means with standard errors;
benchmarks/RESULTS.md records that table and what it says about the paper's trend. Needs PyTorch.
"""

import sys
import time

import numpy as np
import torch

from databalance.losses import balanced_contrastive_loss

FULL = "--full" in sys.argv[1:]
SEEDS = range(5) if FULL else range(1)
EPOCHS = 30 if FULL else 4
KS = (0, 1, 2, 3)
CLASSES, LATENT, DIM, EMBED = 20, 8, 24, 16
N_TRAIN = 2048 if FULL else 1024
N_TEST, BATCH, TEMPERATURE = 512, 128, 0.1


def make_data(rng: np.random.Generator):
    centres = rng.standard_normal((CLASSES, LATENT)) * 1.5
    maps = rng.standard_normal((2, LATENT, DIM)) / np.sqrt(LATENT)

    def views(latent, noise):
        x = latent @ maps[0] + noise * rng.standard_normal((len(latent), DIM))
        y = np.tanh(latent @ maps[1]) + noise * rng.standard_normal((len(latent), DIM))
        return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)

    def split(n):
        labels = rng.integers(0, CLASSES, n)
        return (*views(centres[labels] + rng.standard_normal((n, LATENT)), 0.5), torch.tensor(labels))

    prompts = views(centres, 0.0)[1]  # the caption view of each class centre, without noise
    return split(N_TRAIN), split(N_TEST), prompts


def train(k: int, seed: int, data) -> tuple[float, float]:
    (x, y, _), (x_test, y_test, labels_test), prompts = data
    torch.manual_seed(seed)
    towers = [torch.nn.Linear(DIM, EMBED) for _ in range(2)]
    optimiser = torch.optim.Adam([p for t in towers for p in t.parameters()], lr=1e-2)

    def embed(tower, v):
        return torch.nn.functional.normalize(tower(v), dim=1)

    for _ in range(EPOCHS):
        order = torch.randperm(N_TRAIN)
        for start in range(0, N_TRAIN, BATCH):
            idx = order[start:start + BATCH]
            logits = embed(towers[0], x[idx]) @ embed(towers[1], y[idx]).T / TEMPERATURE
            loss = balanced_contrastive_loss(logits, k)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    with torch.no_grad():
        images, captions = embed(towers[0], x_test), embed(towers[1], y_test)
        zero_shot = ((images @ embed(towers[1], prompts).T).argmax(1) == labels_test).float().mean()
        retrieval = ((images @ captions.T).argmax(1) == torch.arange(N_TEST)).float().mean()
    return float(zero_shot), float(retrieval)


t0 = time.perf_counter()
results = {k: [] for k in KS}
for seed in SEEDS:
    data = make_data(np.random.default_rng(seed))
    for k in KS:
        results[k].append(train(k, seed, data))
print(f"{'full' if FULL else 'quick'} mode: {len(SEEDS)} seed(s), {EPOCHS} epochs, "
      f"{time.perf_counter() - t0:.1f} s")
print("| k | zero-shot accuracy | retrieval accuracy (1 of 512) | zero-shot - CLIP's (paired) | "
      "retrieval - CLIP's (paired) |")
print("|---|---|---|---|---|")


def mean_se(values: np.ndarray):
    """Mean and standard error over seeds (NaN with one seed)."""
    se = values.std(axis=0, ddof=1) / np.sqrt(len(values)) if len(values) > 1 else np.full(values.shape[1:], np.nan)
    return values.mean(axis=0), se


summary = {}
for k in KS:
    values = np.array(results[k])
    mean, se = mean_se(values)
    # The seeds draw different data sets, which moves every k alike: the difference to k = 1 on the
    # same seed is the sharper comparison.
    d_mean, d_se = mean_se(values - np.array(results[1]))
    summary[k] = (mean, se)
    print(f"| {k} | {mean[0]:.3f} +- {se[0]:.3f} | {mean[1]:.3f} +- {se[1]:.3f} | "
          f"{d_mean[0]:+.4f} +- {d_se[0]:.4f} | {d_mean[1]:+.4f} +- {d_se[1]:.4f} |")

# %%
# Accuracy against k (error bars: one standard error over seeds, in the full mode).
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
for i, name in enumerate(("zero-shot", "retrieval")):
    means = [summary[k][0][i] for k in KS]
    errors = [0 if np.isnan(summary[k][1][i]) else summary[k][1][i] for k in KS]
    ax.errorbar(KS, means, yerr=errors, marker="o", capsize=3, label=name)
ax.set(xlabel="k (half-steps of balancing in the loss)", ylabel="accuracy", xticks=KS,
       title="Two-tower model, synthetic paired data")
ax.legend()
plt.show()
