"""The library's warning and error classes (their messages are worded in :mod:`._validation`)."""

from __future__ import annotations

__all__ = ["ConvergenceWarning", "InfeasibleError"]


class ConvergenceWarning(RuntimeWarning):
    """A balancing run stopped before reaching its tolerance (status "max_steps" or "stalled")."""


class InfeasibleError(ValueError):
    """The zero pattern of the table cannot carry the target marginals; the balanced table does not exist."""
