"""databalance: data balancing with variance predictions and standard errors.

Balancing rescales a joint table (or paired samples) so that its marginals match targets:
iterative proportional fitting, raking, Sinkhorn-Knopp.
"""

from ._errors import ConvergenceWarning, InfeasibleError
from ._kernels.fused import which_kernel
from ._summary import LabelledValues, MarginSummary, StatisticSummary, Summary
from .balance import (
    BalanceResult,
    CellsResult,
    LogBalanceResult,
    MarginsResult,
    balance_logits,
    balance_margins,
    balance_table,
    iterate_balance,
)
from .curation import CurationResult, metaclip_sample
from .estimators import BalancedEstimate, BalancedEstimator, Diagnostics, MarginCheck, balanced_mean
from .losses import balanced_contrastive_loss
from .spectral import SpectrumResult, conditional_mean, spectrum
from .variance import (
    MisspecifiedProfile,
    VarianceDecomposition,
    VarianceProfile,
    misspecified_profile,
    variance_decomposition,
    variance_profile,
)

__version__ = "0.2.0"

__all__ = [
    "BalanceResult",
    "BalancedEstimate",
    "BalancedEstimator",
    "CellsResult",
    "ConvergenceWarning",
    "CurationResult",
    "Diagnostics",
    "InfeasibleError",
    "LabelledValues",
    "LogBalanceResult",
    "MarginCheck",
    "MarginSummary",
    "MarginsResult",
    "MisspecifiedProfile",
    "SpectrumResult",
    "StatisticSummary",
    "Summary",
    "VarianceDecomposition",
    "VarianceProfile",
    "balance_logits",
    "balance_margins",
    "balance_table",
    "balanced_contrastive_loss",
    "balanced_mean",
    "conditional_mean",
    "iterate_balance",
    "metaclip_sample",
    "misspecified_profile",
    "spectrum",
    "variance_decomposition",
    "variance_profile",
    "which_kernel",
]
