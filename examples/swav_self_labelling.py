"""
SwaV-style balanced soft assignments in PyTorch
===============================================

Self-labelling (SwaV, DINO) assigns a batch of B samples to K prototypes with *soft codes* whose
cluster masses are (near) equal: a few Sinkhorn sweeps of ``exp(scores / eps)`` towards uniform
marginals over the samples and over the prototypes. This is :func:`databalance.balance_logits`
with ``steps=6`` (three sweeps) on the score matrix, run in PyTorch where the scores live; the
codes are targets (computed without gradient), and the swapped-prediction loss trains the
prototypes.

As in SwaV's Sinkhorn, each sweep normalises the prototypes' masses first and the samples' last, so
that every sample's code is a distribution over the prototypes (sums to 1 exactly); the prototypes'
masses are then near-equal, up to what three sweeps achieve (their spread is printed below; more
sweeps shrink it).

The batch below is imbalanced on purpose (one latent cluster holds half the samples): plain
softmax codes pile onto its prototype, balanced codes spread the batch near-evenly.

Needs PyTorch (``pip install torch``).
"""

import numpy as np
import torch

from databalance import balance_logits

torch.manual_seed(0)
B, K, dim, eps, temperature = 256, 8, 16, 0.05, 0.1

# A batch with one dominant cluster: half the samples near centre 0, the rest spread over the others.
centres = torch.nn.functional.normalize(torch.randn(K, dim), dim=1)
labels = torch.cat([torch.zeros(B // 2, dtype=torch.long), torch.randint(1, K, (B - B // 2,))])
z = torch.nn.functional.normalize(centres[labels] + 0.6 * torch.randn(B, dim), dim=1)
views = [torch.nn.functional.normalize(z + 0.2 * torch.randn(B, dim), dim=1) for _ in range(2)]
prototypes = torch.nn.Parameter(torch.nn.functional.normalize(centres + 0.3 * torch.randn(K, dim), dim=1))


def codes(scores: torch.Tensor, half_steps: int = 6) -> torch.Tensor:
    """Balanced soft assignments: rows (samples) of mass 1/B, columns (prototypes) of mass 1/K;
    the last half-step fixes the rows, so each row times B is a distribution over prototypes."""
    uniform_b, uniform_k = np.full(B, 1 / B), np.full(K, 1 / K)
    with torch.no_grad():
        res = balance_logits(scores / eps, uniform_b, uniform_k, steps=half_steps, start="y")
    return res.table * B


scores = [v @ prototypes.T for v in views]
q = [codes(s) for s in scores]
plain = torch.softmax(scores[0].detach() / eps, dim=1)
mass_plain, mass_balanced = plain.mean(0) * K, q[0].mean(0) * K
print("cluster mass x K, plain softmax:", np.round(mass_plain.numpy(), 2))
print("cluster mass x K, balanced     :", np.round(mass_balanced.numpy(), 2))
spread = float(mass_balanced.max() - mass_balanced.min())
print(f"balanced cluster masses x K span {float(mass_balanced.min()):.2f}..{float(mass_balanced.max()):.2f} "
      f"(spread {spread:.2f}; plain softmax {float(mass_plain.max() - mass_plain.min()):.2f})")
print(f"rows of the codes sum to 1 (largest deviation {float((q[0].sum(1) - 1).abs().max()):.1e})")

# The swapped prediction loss: predict view 2's codes from view 1's scores and vice versa.
log_p = [torch.log_softmax(s / temperature, dim=1) for s in scores]
loss = -0.5 * ((q[1] * log_p[0]).sum(1).mean() + (q[0] * log_p[1]).sum(1).mean())
loss.backward()
print(f"swapped-prediction loss {float(loss.detach()):.4f}; gradient norm on the prototypes {float(prototypes.grad.norm()):.3g}")

# %%
# Cluster masses: the plain softmax gives the dominant cluster's prototype most of the batch; three
# balancing sweeps spread the batch near-evenly (the last half-step fixes the samples, so the
# prototypes' masses keep a small spread), which is what keeps self-labelling from collapsing.
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(7, 3.5), layout="constrained")
x = np.arange(K)
ax.bar(x - 0.2, mass_plain.numpy(), width=0.4, label="softmax(scores / eps)")
ax.bar(x + 0.2, mass_balanced.numpy(), width=0.4, label="balanced, 3 sweeps")
ax.axhline(1.0, color="k", lw=0.8)
ax.set(xlabel="prototype", ylabel="K x cluster mass", title="Soft assignments of an imbalanced batch")
ax.legend()
plt.show()
