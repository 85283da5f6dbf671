"""databalance: data balancing with variance predictions and standard errors.

Balancing rescales a joint table (or paired samples) so that its marginals match targets:
iterative proportional fitting, raking, Sinkhorn-Knopp.
"""

from ._errors import ConvergenceWarning, InfeasibleError
from .balance import (
    BalanceResult,
    LogBalanceResult,
    MarginsResult,
    balance_logits,
    balance_margins,
    balance_table,
    iterate_balance,
)
from .estimators import BalancedEstimate, BalancedEstimator, balanced_mean
from .spectral import SpectrumResult, conditional_mean, spectrum
from .variance import (
    MisspecifiedProfile,
    VarianceDecomposition,
    VarianceProfile,
    misspecified_profile,
    variance_decomposition,
    variance_profile,
)

__version__ = "0.1.0"

__all__ = [
    "BalanceResult",
    "BalancedEstimate",
    "BalancedEstimator",
    "ConvergenceWarning",
    "InfeasibleError",
    "LogBalanceResult",
    "MarginsResult",
    "MisspecifiedProfile",
    "SpectrumResult",
    "VarianceDecomposition",
    "VarianceProfile",
    "balance_logits",
    "balance_margins",
    "balance_table",
    "balanced_mean",
    "conditional_mean",
    "iterate_balance",
    "misspecified_profile",
    "spectrum",
    "variance_decomposition",
    "variance_profile",
]
