"""metaclip_sample against a brute-force per-document loop, Monte Carlo of MetaCLIP's own per-match
draws, the Y half-step of balance_table, and every input error."""

from __future__ import annotations

import doctest
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from databalance import balance_table
from databalance.curation import CurationResult, metaclip_sample

DOCS = Path(__file__).resolve().parents[1] / "docs" / "guide" / "curation.rst"


def random_matches(seed: int, n: int = 60, m: int = 8, density: float = 0.25) -> np.ndarray:
    """A 0/1-like document x concept table with a few heavy concepts, empty documents and counts > 1."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(m, 0.5))  # skewed concept frequencies
    dense = (rng.random((n, m)) < density * m * weights).astype(np.float64)
    dense *= rng.integers(1, 4, size=(n, m))  # how often a concept occurs: not used
    return dense


def brute_force(dense: np.ndarray, t: float):
    """MetaCLIP's definition, one document at a time."""
    n, m = dense.shape
    counts = [sum(1 for i in range(n) if dense[i, c] != 0) for c in range(m)]
    keep = []
    for i in range(n):
        skip = 1.0
        for c in range(m):
            if dense[i, c] != 0:
                skip *= 1 - min(1.0, t / counts[c])
        keep.append(1 - skip)
    expected = [sum(keep[i] for i in range(n) if dense[i, c] != 0) for c in range(m)]
    return np.array(counts), np.array(keep), np.array(expected)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("t", [1, 2.5, 7, 1000])
def test_probabilities_and_expected_counts_match_a_brute_force_loop(seed, t):
    dense = random_matches(seed)
    counts, keep, expected = brute_force(dense, t)
    res = metaclip_sample(sp.csr_array(dense), t, seed=seed)
    np.testing.assert_array_equal(res.counts_before, counts)
    np.testing.assert_allclose(res.keep_probability, keep, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(res.expected_counts, expected, rtol=1e-12, atol=1e-12)
    drawn = dense[res.kept] != 0
    np.testing.assert_array_equal(res.counts_after, drawn.sum(axis=0))
    np.testing.assert_array_equal(res.indices, np.flatnonzero(res.kept))
    # A document is kept only if it has a concept; a concept at or below the cap keeps every document.
    assert not res.kept[(dense != 0).sum(axis=1) == 0].any()
    low = (counts > 0) & (counts <= t)
    np.testing.assert_array_equal(res.counts_after[low], counts[low])
    # Never below the cap-level count: documents are also kept through their other concepts.
    assert (res.expected_excess >= -1e-12).all()
    np.testing.assert_array_equal(res.capped_counts, np.minimum(counts, t))


def test_drawn_counts_average_to_the_expected_counts():
    """400 seeded draws: the mean drawn count of each concept is within 5 Monte Carlo standard errors
    of ``expected_counts`` (documents are independent: Var = sum_i p_i (1 - p_i) over c's documents)."""
    dense = random_matches(11, n=200, m=10)
    reps = 400
    draws = np.array([metaclip_sample(sp.csr_array(dense), 4, seed=s).counts_after for s in range(reps)])
    res = metaclip_sample(sp.csr_array(dense), 4, seed=0)
    p, member = res.keep_probability, dense != 0
    se = np.sqrt((member * (p * (1 - p))[:, None]).sum(axis=0) / reps)
    assert (np.abs(draws.mean(axis=0) - res.expected_counts) <= 5 * se + 1e-12).all()


def test_per_document_draw_matches_metaclips_per_match_draw():
    """MetaCLIP draws one uniform per (document, concept) match; one per document with the combined
    probability keeps each document with the same probability (Monte Carlo, 5 standard errors)."""
    dense = random_matches(3, n=40, m=6)
    t = 3
    res = metaclip_sample(sp.csr_array(dense), t, seed=0)
    q = np.minimum(1.0, t / np.maximum(res.counts_before, 1))
    rng = np.random.default_rng(5)
    reps = 4000
    per_match = ((rng.random((reps, *dense.shape)) < q) & (dense != 0)).any(axis=2).mean(axis=0)
    p = res.keep_probability
    assert (np.abs(per_match - p) <= 5 * np.sqrt(p * (1 - p) / reps) + 1e-12).all()


def test_seeded_draws_are_reproducible():
    matches = sp.csr_array(random_matches(0, n=500))
    a = metaclip_sample(matches, 5, seed=42)
    np.testing.assert_array_equal(a.kept, metaclip_sample(matches, 5, seed=42).kept)
    np.testing.assert_array_equal(a.kept, metaclip_sample(matches, 5, seed=np.random.default_rng(42)).kept)
    b = metaclip_sample(matches, 5, seed=43)
    assert (a.kept != b.kept).any()
    np.testing.assert_array_equal(a.keep_probability, b.keep_probability)


def test_any_sparse_format_duplicates_and_stored_zeros_give_the_same_result():
    dense = random_matches(4)
    reference = metaclip_sample(sp.csr_array(dense), 3, seed=1)
    coo = sp.coo_array(dense)
    rows, cols, data = coo.row, coo.col, coo.data
    duplicated = sp.coo_array((np.concatenate([data, data[:5]]), (np.concatenate([rows, rows[:5]]),
                                                                  np.concatenate([cols, cols[:5]]))), shape=dense.shape)
    stored_zeros = sp.csr_array((np.concatenate([data, [0.0]]), (np.concatenate([rows, [0]]),
                                                                 np.concatenate([cols, [7]]))), shape=dense.shape)
    for matches in (sp.csc_array(dense), sp.coo_matrix(dense), sp.lil_array(dense), sp.csr_matrix(dense != 0),
                    duplicated, stored_zeros, sp.csr_array(dense.astype(np.int32))):
        res = metaclip_sample(matches, 3, seed=1)
        np.testing.assert_allclose(res.keep_probability, reference.keep_probability, rtol=1e-14)
        np.testing.assert_array_equal(res.kept, reference.kept)
        np.testing.assert_array_equal(res.counts_after, reference.counts_after)


def test_input_is_not_modified():
    matches = sp.csr_array((np.array([1.0, 2.0, 0.0]), np.array([1, 0, 1]), np.array([0, 2, 3])), shape=(2, 2))
    assert not matches.has_canonical_format
    before = (matches.data.copy(), matches.indices.copy(), matches.indptr.copy())
    metaclip_sample(matches, 1, seed=0)
    for a, b in zip(before, (matches.data, matches.indices, matches.indptr), strict=True):
        np.testing.assert_array_equal(a, b)


def test_one_y_half_step_of_balancing_towards_the_capped_counts():
    """The half-step's column scaling is MetaCLIP's q_c, its column sums the cap min(count_c, t), and
    its row sums bound the keep probabilities (union bound; equal for single-concept documents)."""
    dense = (random_matches(7) != 0).astype(np.float64)
    t = 3
    res = metaclip_sample(sp.csr_array(dense), t, seed=0)
    used = res.counts_before > 0
    T = dense[:, used]
    capped = res.capped_counts[used].astype(np.float64)
    p_x = np.full(T.shape[0], capped.sum() / T.shape[0])  # only its total matters for one Y-step
    step = balance_table(sp.csr_array(T), p_x, capped, start="y", steps=1)
    table = step.table.toarray()
    np.testing.assert_allclose(table.sum(axis=0), capped, rtol=1e-12)
    q = table.max(axis=0)  # the 0/1 entries of column c became q_c
    np.testing.assert_allclose(q, np.minimum(1, t / res.counts_before[used]), rtol=1e-12)
    mass = table.sum(axis=1)
    assert (res.keep_probability <= mass + 1e-12).all()
    single = T.sum(axis=1) == 1
    np.testing.assert_allclose(res.keep_probability[single], mass[single], rtol=1e-12)


def test_repr_is_short():
    res = metaclip_sample(sp.csr_array(random_matches(0, n=1000, m=30)), 5, seed=0)
    text = repr(res)
    assert len(text.splitlines()) <= 3 and len(text) < 400
    assert text.startswith(f"CurationResult(t=5): kept {res.kept.sum()} of 1000 documents")
    assert isinstance(res, CurationResult)


def test_empty_table():
    res = metaclip_sample(sp.csr_array((3, 4)), 2, seed=0)
    np.testing.assert_array_equal(res.keep_probability, 0)
    assert not res.kept.any() and res.counts_after.sum() == 0
    assert "kept 0 of 3 documents" in repr(res)


M = sp.csr_array(np.eye(3))


@pytest.mark.parametrize(("matches", "t", "seed", "error", "match"), [
    (np.eye(3), 1, 0, TypeError, r"`matches` must be a scipy.sparse matrix or array .* got ndarray\. Wrap a small "
                                 r"dense table with `scipy.sparse.csr_array\(matches\)`"),
    (sp.coo_array(np.ones(3)), 1, 0, ValueError, r"`matches` must be 2-D \(documents x concepts\); got shape \(3,\)"),
    (sp.csr_array(np.eye(2, dtype=complex)), 1, 0, TypeError, r"`matches` has dtype complex128"),
    (sp.csr_array(np.array([[1.0, 0], [0, -2.0]])), 1, 0, ValueError,
     r"`matches` must be finite and nonnegative; found -2\.0 at \(document 1, concept 1\)"),
    (sp.csc_array(np.array([[1.0, 0], [-1.0, 1.0]])), 1, 0, ValueError, r"found -1\.0 at \(document 1, concept 0\)"),
    (sp.coo_array(np.array([[1.0, np.nan]])), 1, 0, ValueError, r"found nan at \(document 0, concept 1\)"),
    (sp.lil_array(np.array([[0.0, 1.0], [np.inf, 0]])), 1, 0, ValueError, r"found inf at \(document 1, concept 0\)"),
    (sp.csr_array(np.array([[0, -1]], dtype=np.int8)), 1, 0, ValueError, r"found -1\.0 at \(document 0, concept 1\)"),
    (M, 0, 0, ValueError, r"`t` \(the cap per concept\) must be a positive finite number, e\.g\. 20000; got 0"),
    (M, -5.0, 0, ValueError, r"got -5\.0"),
    (M, np.inf, 0, ValueError, r"positive finite number, e\.g\. 20000; got inf"),
    (M, np.nan, 0, ValueError, r"positive finite number, e\.g\. 20000; got nan"),
    (M, "50", 0, TypeError, r"`t` \(the cap per concept\) must be a number; got str"),
    (M, True, 0, TypeError, r"must be a number; got bool"),
    (M, 1, -1, ValueError, r"`seed` must be a nonnegative int; got -1"),
    (M, 1, 1.5, TypeError, r"`seed` must be None, a nonnegative int or a numpy.random.Generator; got float"),
    (M, 1, np.random.RandomState(0), TypeError, r"got RandomState"),
])
def test_bad_input(matches, t, seed, error, match):
    with pytest.raises(error, match=match):
        metaclip_sample(matches, t, seed=seed)


def test_guide_page_numbers():
    """The numbers printed on the user guide's curation page are what the code gives."""
    result = doctest.testfile(str(DOCS), module_relative=False, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 5 and result.failed == 0
