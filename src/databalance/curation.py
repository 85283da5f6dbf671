"""MetaCLIP-style balanced sampling from a sparse document x concept match table.

MetaCLIP (Xu et al., *Demystifying CLIP Data*, ICLR 2024) curates a corpus by capping how often any
concept (a metadata entry) occurs: a concept matched by ``count_c`` documents is sampled with
probability ``min(1, t / count_c)``, and a document is kept when any of its concepts is sampled. In
balancing terms this is one Y half-step towards the capped concept counts (theory page, section
'Balancing'; the user guide's "Curation" page works through the numbers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from . import _validation as check

__all__ = ["CurationResult", "metaclip_sample"]


@dataclass(frozen=True, eq=False)
class CurationResult:
    """The outcome of :func:`metaclip_sample`.

    Attributes
    ----------
    t : float
        The cap per concept.
    keep_probability : ndarray, shape (n_documents,)
        ``1 - prod_c (1 - min(1, t / count_c))`` over each document's concepts (0 for a document
        with none).
    kept : ndarray of bool, shape (n_documents,)
        The seeded draw: document i is kept with probability ``keep_probability[i]``, independently.
    counts_before : ndarray of int64, shape (n_concepts,)
        ``count_c``: the documents matching concept c.
    expected_counts : ndarray, shape (n_concepts,)
        The expected number of kept documents matching c: ``sum`` of ``keep_probability`` over them.
        At least ``min(count_c, t)``: a document can also be kept through another concept.
    counts_after : ndarray of int64, shape (n_concepts,)
        The kept documents matching c in this draw.
    """

    t: float
    keep_probability: np.ndarray = field(repr=False)
    kept: np.ndarray = field(repr=False)
    counts_before: np.ndarray = field(repr=False)
    expected_counts: np.ndarray = field(repr=False)
    counts_after: np.ndarray = field(repr=False)

    @cached_property
    def indices(self) -> np.ndarray:
        """The kept documents' row numbers, increasing."""
        return np.flatnonzero(self.kept)

    @property
    def capped_counts(self) -> np.ndarray:
        """``min(count_c, t)``: the concept counts a perfectly balanced sample would have."""
        return np.minimum(self.counts_before, self.t)

    @property
    def expected_excess(self) -> np.ndarray:
        """``expected_counts - min(count_c, t)`` (nonnegative): how far the expectation overshoots the cap."""
        return self.expected_counts - self.capped_counts

    def __repr__(self) -> str:
        n, over = len(self.kept), int((self.counts_before > self.t).sum())
        excess = self.expected_excess
        worst = int(np.argmax(excess)) if excess.size else 0
        return (f"CurationResult(t={self.t:g}): kept {int(self.kept.sum())} of {n} documents (expected "
                f"{self.keep_probability.sum():.1f}); {over} of {len(self.counts_before)} concepts above the cap\n"
                f"  largest expected excess over min(count, t): {excess[worst] if excess.size else 0.0:.3g} "
                f"(concept {worst}); largest count after: {self.counts_after.max(initial=0)} drawn, "
                f"{self.expected_counts.max(initial=0.0):.1f} expected")


def metaclip_sample(matches, t: float, *, seed=None) -> CurationResult:
    """Sample documents so that no concept is matched by many more than ``t`` of them (MetaCLIP).

    Concept c, matched by ``count_c`` documents, is sampled with probability
    ``q_c = min(1, t / count_c)``; a document is kept if any of its concepts is sampled, i.e. with
    probability ``1 - prod_c (1 - q_c)`` over its concepts -- exactly MetaCLIP's balancing. Head
    concepts are cut down to about ``t`` documents, tail concepts (``count_c <= t``) keep all of
    theirs.

    Parameters
    ----------
    matches : scipy.sparse matrix or array, shape (n_documents, n_concepts)
        Document i matches concept c where the entry is nonzero (the values themselves, e.g. how
        often the concept occurs, are not used; stored zeros are not matches). Never densified.
        Dense input is refused: wrap a small dense table with ``scipy.sparse.csr_array``.
    t : float
        The cap per concept, > 0 (MetaCLIP: 20 000 for 400M pairs).
    seed : None, int or numpy.random.Generator
        Seeds the draw (``numpy.random.default_rng(seed)``); the probabilities do not depend on it.

    Returns
    -------
    CurationResult
        Keep probabilities, the draw, and the concept counts before, expected after and drawn.

    Raises
    ------
    TypeError
        ``matches`` not scipy.sparse, or not real numbers; ``t`` or ``seed`` of the wrong type.
    ValueError
        ``matches`` not 2-D or with a negative, NaN or infinite entry (named by row and column);
        ``t`` not a positive finite number; a negative ``seed``.

    Notes
    -----
    One uniform number per document decides it, rather than MetaCLIP's one per (document, concept)
    pair: the kept set has the same distribution. The cost is a few passes over the nonzeros
    (10^6 documents x 5 * 10^4 concepts with 3 * 10^6 matches: about 0.3 s; benchmarks/bench_curation.py).

    ``q`` is the column scaling of one Y half-step of balancing (:func:`~databalance.balance_table`
    with ``start="y", steps=1``) of the 0/1 match table towards the capped counts
    ``min(count_c, t)``. That half-step keeps each (document, concept) match with probability
    ``q_c`` and gives document i the mass ``sum_c q_c``; MetaCLIP keeps the document once, with
    probability ``1 - prod_c (1 - q_c) <= sum_c q_c`` (equal for a document with one concept).

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp
    >>> from databalance.curation import metaclip_sample
    >>> matches = sp.csr_array(np.array([[1, 0], [1, 0], [1, 0], [1, 1], [0, 1]]))
    >>> res = metaclip_sample(matches, 2, seed=0)
    >>> res.keep_probability.round(3)
    array([0.5, 0.5, 0.5, 1. , 1. ])
    >>> res.counts_before, res.expected_counts
    (array([4, 2]), array([2.5, 2. ]))
    """
    csr = check.match_table(matches)
    cap = check.concept_cap(t)
    rng = check.random_seed(seed)
    docs, concepts = _matched_pairs(csr)
    n_docs, n_concepts = csr.shape
    counts = np.bincount(concepts, minlength=n_concepts)
    with np.errstate(divide="ignore"):  # q_c = 1 gives log 0 = -inf: the document is kept for sure
        log_skip = np.log1p(-np.minimum(1.0, cap / np.maximum(counts, 1)))
    # The log-sum is <= 0; abs(expm1) is 1 - prod exactly, and +0.0 (not -0.0) for a document with no concept.
    keep = np.abs(np.expm1(np.bincount(docs, weights=log_skip[concepts], minlength=n_docs)))
    kept = rng.random(n_docs) < keep
    expected = np.bincount(concepts, weights=keep[docs], minlength=n_concepts)
    after = np.bincount(concepts[kept[docs]], minlength=n_concepts)
    return CurationResult(cap, keep, kept, counts.astype(np.int64), expected, after.astype(np.int64))


def _matched_pairs(csr) -> tuple[np.ndarray, np.ndarray]:
    """(document, concept) of every nonzero entry of a canonical CSR table."""
    rows = np.repeat(np.arange(csr.shape[0], dtype=np.int64), np.diff(csr.indptr))
    cols = csr.indices
    nonzero = csr.data != 0
    if not nonzero.all():
        rows, cols = rows[nonzero], cols[nonzero]
    return rows, cols
