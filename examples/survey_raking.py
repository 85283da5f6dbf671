"""
Raking a survey sample to three margins, one of them joint
==========================================================

Rake a survey sample to known population margins (one of them joint) and report estimates with
standard errors and the diagnostics a survey statistician checks before trusting the weights."""

import numpy as np

from databalance import BalancedEstimator

rng = np.random.default_rng(0)
n = 3000
# The sample over-represents the young and the city: its margins differ from the population's.
age = rng.choice(["18-34", "35-54", "55+"], n, p=[0.5, 0.3, 0.2])
region = np.where(rng.random(n) < 0.7, "urban", "rural")
income = 30 + 10 * (age == "35-54") + 5 * (age == "55+") + 8 * (region == "urban") + rng.normal(0, 12, n)
owns_home = (rng.random(n) < 0.3 + 0.2 * (age != "18-34") - 0.1 * (region == "urban")).astype(float)

sex = np.where(rng.random(n) < 0.45, "F", "M")
population_age = {"18-34": 0.30, "35-54": 0.35, "55+": 0.35}
population_region = {"urban": 0.55, "rural": 0.45}
# A joint margin: sex x region from the census (its region totals agree with population_region).
population_sex_region = {("F", "urban"): 0.28, ("M", "urban"): 0.27, ("F", "rural"): 0.23, ("M", "rural"): 0.22}

data = {"age": age, "region": region, "sex": sex}
raking = BalancedEstimator({"age": population_age, "region": population_region,
                            ("sex", "region"): population_sex_region}).fit(data)
print(repr(raking))
for name, values in (("income", income), ("owns home", owns_home)):
    naive = values.mean(), values.std(ddof=1) / np.sqrt(n)
    est = raking.mean(values)
    lo, hi = est.confidence_interval(0.95)
    print(f"{name:10s} sample mean {naive[0]:7.3f} (SE {naive[1]:.3f})   raked {est.estimate:7.3f} "
          f"(SE {est.standard_error:.3f}, 95% CI {lo:.3f} to {hi:.3f})")
d = raking.diagnostics_
print(f"effective sample size {d.effective_sample_size:.0f} of {n} (design effect {d.design_effect:.2f}); "
      f"weights {d.min_weight:.2f} to {d.max_weight:.2f} x their mean")
for check in d.margins:
    print(f"  margin {check.key}: largest relative L1 error {check.error:.1e}")

# %%
# Estimates with 95% intervals: raking moves the estimate towards the population and widens the
# interval by the design effect.
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 2, figsize=(8, 2.6), layout="constrained")
for ax, (name, values) in zip(axes, (("income", income), ("owns home", owns_home))):
    est = raking.mean(values)
    half = 1.96 * values.std(ddof=1) / np.sqrt(n)
    ax.errorbar([values.mean(), est.estimate], [1, 0], xerr=[half, 1.96 * est.standard_error], fmt="o",
                capsize=4)
    ax.set(yticks=[1, 0], yticklabels=["sample mean", "raked"], ylim=(-0.6, 1.6), title=name)
plt.show()
