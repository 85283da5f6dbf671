"""databalance: data balancing with variance predictions and standard errors.

Balancing rescales a joint table (or paired samples) so that its marginals match targets:
iterative proportional fitting, raking, Sinkhorn-Knopp.
"""

from ._validation import InfeasibleError
from .balance import (
    BalanceResult,
    ConvergenceWarning,
    LogBalanceResult,
    balance_logits,
    balance_table,
    iterate_balance,
)

__version__ = "0.1.0"

__all__ = [
    "BalanceResult",
    "ConvergenceWarning",
    "InfeasibleError",
    "LogBalanceResult",
    "balance_logits",
    "balance_table",
    "iterate_balance",
]
