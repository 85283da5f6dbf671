"""Progress reports for long runs: a user's callback, a tqdm bar, or a plain line on stderr.

``progress=`` accepts ``False``/``None`` (silent), a callable ``f(step, errors)`` called after every
step with the step number and that step's errors (an array), or ``True``: a tqdm progress bar when
tqdm is installed (imported only then), otherwise a line on stderr at most every half second.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from . import _validation as check

Progress = Callable[[int, np.ndarray], Any]


class _Line:
    """A plain progress line on stderr, rewritten in place at most every ``every`` seconds."""

    def __init__(self, desc: str, what: str, every: float = 0.5):
        self.desc, self.what, self.every, self.last = desc, what, every, 0.0
        self.state: tuple[int, float] | None = None

    def __call__(self, step: int, errors: np.ndarray) -> None:
        self.state = (step, float(np.max(errors)))
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._write("")

    def _write(self, end: str) -> None:
        if self.state is not None:
            sys.stderr.write(f"\r{self.desc}: step {self.state[0]}, {self.what} {self.state[1]:.3g}{end}")
            sys.stderr.flush()

    def close(self) -> None:
        self._write("\n")


class _Bar:
    """A tqdm bar whose postfix shows the largest value reported (an error, by default)."""

    def __init__(self, tqdm, desc: str, total: int | None, what: str):
        self.bar = tqdm(total=total, desc=desc, unit="step", leave=False)
        self.what = what

    def __call__(self, step: int, errors: np.ndarray) -> None:
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix_str(f"{self.what} {float(np.max(errors)):.3g}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def reporter(progress, desc: str, total: int | None = None, what: str = "largest error"):
    """A (report, close) pair for ``progress`` (validated), or None when silent; ``what`` names the
    value shown (the largest of what each step reports)."""
    progress = check.progress_option(progress)
    if progress is None:
        return None
    if progress is True:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            line = _Line(desc, what)
            return line, line.close
        bar = _Bar(tqdm, desc, total, what)
        return bar, bar.close
    return progress, lambda: None
