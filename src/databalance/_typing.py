"""Type aliases of the public data parameters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

#: A nonnegative table: anything ``numpy.asarray`` reads as a real array, or a scipy.sparse
#: matrix/array.
TableLike = npt.ArrayLike | sp.spmatrix | sp.sparray

#: A target marginal: an array of masses indexed by integer codes (or, for the sample-level API,
#: a mapping label -> mass such as a dict or a pandas Series).
Marginal = npt.ArrayLike | Mapping[Any, float]

#: Per-sample values or labels.
SampleArray = npt.ArrayLike | Sequence[Any] | np.ndarray
