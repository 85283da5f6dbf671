"""Rake a survey sample to known population margins and report estimates with standard errors."""

import numpy as np

from databalance import BalancedEstimator

rng = np.random.default_rng(0)
n = 3000
# The sample over-represents the young and the city: its margins differ from the population's.
age = rng.choice(["18-34", "35-54", "55+"], n, p=[0.5, 0.3, 0.2])
region = np.where(rng.random(n) < 0.7, "urban", "rural")
income = 30 + 10 * (age == "35-54") + 5 * (age == "55+") + 8 * (region == "urban") + rng.normal(0, 12, n)
owns_home = (rng.random(n) < 0.3 + 0.2 * (age != "18-34") - 0.1 * (region == "urban")).astype(float)

population_age = {"18-34": 0.30, "35-54": 0.35, "55+": 0.35}
population_region = {"urban": 0.55, "rural": 0.45}

raking = BalancedEstimator(population_age, population_region).fit(age, region)
print(f"raking: {raking.balance_.status} after {raking.balance_.steps} half-steps")
for name, values in (("income", income), ("owns home", owns_home)):
    naive = values.mean(), values.std(ddof=1) / np.sqrt(n)
    est = raking.mean(values)
    lo, hi = est.confidence_interval(0.95)
    print(f"{name:10s} sample mean {naive[0]:7.3f} (SE {naive[1]:.3f})   raked {est.estimate:7.3f} "
          f"(SE {est.standard_error:.3f}, 95% CI {lo:.3f} to {hi:.3f})")
print(f"effective sample size of the raked weights: {raking.mean(income).effective_sample_size:.0f} of {n}")
