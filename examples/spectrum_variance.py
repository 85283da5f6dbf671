"""
Spectrum and variance of the k-step estimator
=============================================

Inspect a table's spectrum and predict the variance of the k-step balanced estimator.

The prediction sigma_k^2 / n is then checked against a quick simulation.
"""

import numpy as np

from databalance import balance_table, spectrum, variance_decomposition, variance_profile

P = np.array([[0.10, 0.05, 0.05], [0.05, 0.20, 0.05], [0.05, 0.05, 0.40]])
h = np.array([[1.0, 0, 2], [0, 3, 1], [2, 1, 0]])

spec = spectrum(P)
print(f"singular values {np.round(spec.singular_values, 6)}; maximal correlation s_2 = {spec.max_correlation:.4f}")
print(f"IPF shrinks the marginal error by about s_2^2 = {spec.ipf_rate:.4f} per sweep")

profile = variance_profile(P, h, max_steps=6)
print(f"sigma_k^2, k = 0..6: {np.round(profile.sigma2, 6)}; efficiency bound {profile.sigma2_limit:.6f}")
dec = variance_decomposition(P, h, max_steps=6)
print(f"share of Var(h) - sigma_inf^2 by singular direction: {np.round(dec.terms[0] / dec.terms[0].sum(), 3)}")

rng = np.random.default_rng(1)
n, reps = 5000, 4000
tables = rng.multinomial(n, P.ravel(), size=reps).reshape(reps, 3, 3) / n
truth = (P * h).sum()
simulated = {}
for k in (0, 1, 2, 4):
    balanced = balance_table(tables, P.sum(1), P.sum(0), steps=k).table if k else tables
    est = (balanced * h).sum(axis=(1, 2))
    sq = (est - truth) ** 2
    se = n * sq.std(ddof=1) / np.sqrt(reps)
    simulated[k] = n * sq.mean(), se
    print(f"k = {k}: simulated n MSE {n * sq.mean():.4f} +- {se:.4f} (MC SE)   "
          f"predicted sigma_k^2 {profile.sigma2[k]:.4f}")

# %%
# The predicted profile with the simulated points (error bars: 2 Monte Carlo standard errors).
import matplotlib.pyplot as plt

ax = profile.plot()
ks = list(simulated)
ax.errorbar(ks, [simulated[k][0] for k in ks], yerr=[2 * simulated[k][1] for k in ks], fmt="o",
            color="C3", capsize=3, label="simulated n MSE")
ax.legend()
plt.show()
