"""Tests of databalance.spectral: the spectrum against the reference values of the theory page,
dense against sparse for every shape, orthonormality, pairing, and the rate it predicts; the rate of
one sweep over many margins against explicit operators on the full table."""

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given

from databalance import balance_table, conditional_mean, spectral, spectrum
from databalance._joint import Cells
from databalance.spectral import cyclic_rate

from .strategies import joint_distributions

P_A = np.array([[0.10, 0.05, 0.05], [0.05, 0.20, 0.05], [0.05, 0.05, 0.40]])


def assert_valid_triplets(spec, P, atol=1e-9):
    """Orthonormal singular functions in L2(P_X), L2(P_Y), paired by E[beta_j | X] = s_j alpha_j."""
    P = np.asarray(P.toarray() if sp.issparse(P) else P, dtype=float)
    P = P / P.sum()
    p, q = P.sum(1), P.sum(0)
    A, B, s = spec.x_functions, spec.y_functions, spec.singular_values
    np.testing.assert_allclose(s[0], 1, atol=atol)
    np.testing.assert_allclose(A[:, 0], 1, atol=atol)
    np.testing.assert_allclose(B[:, 0], 1, atol=atol)
    np.testing.assert_allclose(A.T @ (p[:, None] * A), np.eye(A.shape[1]), atol=atol)
    np.testing.assert_allclose(B.T @ (q[:, None] * B), np.eye(B.shape[1]), atol=atol)
    np.testing.assert_allclose((P / p[:, None]) @ B, A * s, atol=atol)
    np.testing.assert_allclose((P / q[None, :]).T @ A, B * s, atol=atol)


def test_reference_case_a():
    np.testing.assert_allclose(spectrum(P_A).singular_values, [1, 0.613504, 0.353163], atol=1e-6)


@pytest.mark.parametrize("s", [0.0, 0.3, 0.7, 0.95])
def test_two_by_two_max_correlation(s):
    P = np.array([[1 + s, 1 - s], [1 - s, 1 + s]]) / 4
    spec = spectrum(P)
    np.testing.assert_allclose(spec.max_correlation, s, atol=1e-12)
    np.testing.assert_allclose(spec.spectral_gap, 1 - s, atol=1e-12)
    np.testing.assert_allclose(spec.ipf_rate, s**2, atol=1e-12)


def test_weak_dependence_50_by_50_table():
    i = np.arange(50)
    T = (i[:, None] + 1) * (i[None, :] + 1) + 25.0
    T = T / T.sum(axis=0, keepdims=True)
    from scipy.stats import binom

    w = 0.8 * binom.pmf(i, 49, 0.7) + 0.2 / 50
    spec = spectrum(T * w[None, :])
    np.testing.assert_allclose(spec.max_correlation, 0.0408645, atol=1e-6)
    assert np.all(spec.singular_values[2:] < 1e-10)  # rank 2


def test_independence_has_no_correlation():
    P = np.outer([0.2, 0.3, 0.5], [0.1, 0.6, 0.3])
    spec = spectrum(P)
    np.testing.assert_allclose(spec.singular_values[1:], 0, atol=1e-12)
    assert spec.predicted_steps(1e-10) == 1


@given(joint_distributions())
def test_spectrum_is_orthonormal_with_top_value_one(P):
    spec = spectrum(P)
    assert_valid_triplets(spec, P)
    # the public operator agrees with the explicit conditional means
    np.testing.assert_allclose(conditional_mean(P, given="x") @ spec.y_functions,
                               spec.x_functions * spec.singular_values, atol=1e-9)
    np.testing.assert_allclose(conditional_mean(P, given="y") @ spec.x_functions,
                               spec.y_functions * spec.singular_values, atol=1e-9)
    assert 0 <= spec.spectral_gap <= 1


def test_disconnected_support_is_reported():
    P = np.array([[0.3, 0.2, 0.0], [0.1, 0.1, 0.0], [0.0, 0.0, 0.3]])
    spec = spectrum(P)
    assert spec.n_components == 2
    np.testing.assert_allclose(spec.max_correlation, 1.0, atol=1e-12)
    # The repeated s = 1 block is still an orthonormal, correctly paired basis.
    assert_valid_triplets(spec, P, atol=1e-10)


def test_conditional_mean_operator():
    T = np.array([[1.0, 3.0], [2.0, 2.0]])
    mu = conditional_mean(T, given="x")
    np.testing.assert_allclose(mu @ np.array([0.0, 1.0]), [0.75, 0.5])
    np.testing.assert_allclose(mu @ np.eye(2), T / T.sum(1, keepdims=True))  # several functions at once
    nu = conditional_mean(sp.csr_array(T), given="y")
    np.testing.assert_allclose(nu @ np.array([1.0, 0.0]), [1 / 3, 3 / 5])


# -- sparse spectrum -------------------------------------------------------------------------------


def _sparse_pattern_table(shape, seed):
    """A random sparse-ish table whose every row and column has mass (a wrapped diagonal)."""
    rng = np.random.default_rng(seed)
    m, l = shape
    P = rng.gamma(0.5, size=shape) * (rng.random(shape) < 0.3)
    n = max(m, l)
    P[np.arange(n) % m, np.arange(n) % l] += 1.0
    return P


@pytest.fixture(params=["lapack", "arpack"])
def solver(request, monkeypatch):
    """Each component's values by LAPACK (small components, the default here) or by ARPACK on the
    Gram matrix (what large components get)."""
    if request.param == "arpack":
        monkeypatch.setattr(spectral, "DENSE_LINES", 0)
    return request.param


@pytest.mark.parametrize("shape", [(60, 40), (40, 60), (50, 50), (5, 9), (9, 5), (7, 7)])
def test_sparse_spectrum_matches_dense_for_every_shape(shape, solver):
    # Regression: m < l failed with "`v0` must have shape (m,)", an argument the user never passed.
    P = _sparse_pattern_table(shape, seed=sum(shape))
    rank = min(6, min(shape) - 1)
    dense = spectrum(P)
    sparse = spectrum(sp.csr_array(P), rank=rank)
    np.testing.assert_allclose(sparse.singular_values, dense.singular_values[:rank], atol=1e-9)
    assert_valid_triplets(sparse, P, atol=1e-8)
    # Same functions up to the sign convention (each is fixed by its largest x-entry).
    np.testing.assert_allclose(sparse.x_functions, dense.x_functions[:, :rank], atol=1e-6)
    np.testing.assert_allclose(sparse.y_functions, dense.y_functions[:, :rank], atol=1e-6)
    assert sparse.n_components == dense.n_components == 1


def test_sparse_spectrum_of_other_formats():
    P = _sparse_pattern_table((8, 12), seed=1)
    ref = spectrum(P).singular_values[:4]
    for S in (sp.coo_array(P), sp.csc_array(P), sp.lil_array(P), sp.csr_matrix(P)):
        np.testing.assert_allclose(spectrum(S, rank=4).singular_values, ref, atol=1e-9)


def _block_diagonal_table(n_blocks, seed):
    """A support with ``n_blocks`` components (random 3 x 4 blocks), rows and columns shuffled."""
    rng = np.random.default_rng(seed)
    P = sp.block_diag([rng.gamma(2.0, size=(3, 4)) for _ in range(n_blocks)], format="csr")
    return P[rng.permutation(P.shape[0])][:, rng.permutation(P.shape[1])].tocsr()


@pytest.mark.parametrize("rank", [1, 7, 40, 46])
def test_many_components_sparse_matches_dense(rank, solver):
    # The s = 1 block (one pair per component) is exact, ARPACK only computes the rest.
    S = _block_diagonal_table(40, seed=rank)
    dense = spectrum(S.toarray(), rank=rank)
    sparse = spectrum(S, rank=rank)
    assert sparse.n_components == dense.n_components == 40
    np.testing.assert_allclose(sparse.singular_values, dense.singular_values, atol=1e-9)
    assert np.all(sparse.singular_values[: min(rank, 40)] == 1)
    assert_valid_triplets(sparse, S, atol=1e-8)
    assert_valid_triplets(dense, S, atol=1e-8)


# -- the Lanczos sweeps on the sparse kernel's threaded products (numba) -----------------------------


def _random_csr(shape, density, seed, empty_lines=True):
    rng = np.random.default_rng(seed)
    T = sp.random_array(shape, density=density, rng=rng, format="csr")
    if empty_lines:  # a few empty rows and columns: lines of no nonzero
        T = sp.csr_array(T.multiply(rng.random(shape[1]) > 0.1).multiply((rng.random(shape[0]) > 0.1)[:, None]))
    return T


@pytest.mark.parametrize("seed", range(6))
def test_line_products_equal_scipys(monkeypatch, seed):
    """The sparse kernel's threaded gathers for chains of products (CSR and CSC, 1-D and 2-D),
    blocks on every thread, the other margin's from the tiled copy."""
    pytest.importorskip("numba")
    from databalance._kernels import fused_sparse

    monkeypatch.setattr(fused_sparse, "PER_THREAD", 50)  # blocks on every thread, however small the matrix
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(1, 300)), int(rng.integers(1, 200)))
    M = _random_csr(shape, float(rng.uniform(0.001, 0.3)), seed)
    for T in (M, sp.csc_array(M)):
        rows, cols = fused_sparse.line_products(T)
        for x, y in ((rng.standard_normal(shape[1]), rng.standard_normal(shape[0])),
                     (rng.standard_normal((shape[1], 3)), rng.standard_normal((shape[0], 3)))):
            np.testing.assert_allclose(rows(x), M @ x, rtol=1e-12, atol=1e-12 * max(1.0, np.abs(M @ x).max()))
            np.testing.assert_allclose(cols(y), M.T @ y, rtol=1e-12, atol=1e-12 * max(1.0, np.abs(M.T @ y).max()))


@pytest.mark.parametrize("shape, blocks", [((240, 160), 1), ((160, 240), 1), ((240, 160), 6)])
def test_sparse_spectrum_on_the_threaded_products_equals_numpy_and_dense(monkeypatch, shape, blocks):
    pytest.importorskip("numba")
    from databalance._kernels import fused, fused_sparse

    rng = np.random.default_rng(sum(shape) + blocks)
    parts = [_sparse_pattern_table((shape[0] // blocks, shape[1] // blocks), seed=b) for b in range(blocks)]
    P = sp.csr_array(sp.block_diag(parts, format="csr") * rng.uniform(0.5, 1.5))
    monkeypatch.setattr(fused_sparse, "PER_THREAD", 50)
    monkeypatch.setattr(spectral, "DENSE_LINES", 0)  # ARPACK on the Gram product, as large tables
    calls = []
    real = fused_sparse.line_products
    monkeypatch.setattr(fused_sparse, "line_products", lambda T: calls.append(T.nnz) or real(T))
    runs = {}
    for name in ("numba", "numpy"):
        monkeypatch.setenv(fused.ENV, name)
        runs[name] = spectrum(P, rank=blocks + 7)
    dense = spectrum(P.toarray(), rank=blocks + 7)
    np.testing.assert_allclose(runs["numba"].singular_values, runs["numpy"].singular_values, rtol=0, atol=1e-12)
    np.testing.assert_allclose(runs["numba"].singular_values, dense.singular_values, rtol=0, atol=1e-10)
    assert runs["numba"].n_components == blocks
    assert len(calls) == blocks  # the threaded gathers ran, once per component (only under numba)
    assert_valid_triplets(runs["numba"], P, atol=1e-8)


@pytest.mark.parametrize("shape, rank", [((5, 4), 3), ((4, 5), 3), ((30, 20), 12), ((20, 30), 19)])
def test_sparse_spectrum_of_a_rank_deficient_table(shape, rank, solver):
    """Regression: an independence table (s = 0 beyond the first) and a rank-2 table: the functions
    of s = 0 were not orthogonal to the constants (E[beta_2] = -0.99) nor paired."""
    rng = np.random.default_rng(sum(shape))
    P = np.outer(rng.random(shape[0]) + 0.1, rng.random(shape[1]) + 0.1)
    if shape[0] > 5:
        P += np.outer(rng.random(shape[0]), rng.random(shape[1]))  # rank 2
    sparse = spectrum(sp.csr_array(P), rank=rank)
    np.testing.assert_allclose(sparse.singular_values, spectrum(P, rank=rank).singular_values, atol=1e-9)
    assert_valid_triplets(sparse, P, atol=1e-9)
    P = P / P.sum()
    np.testing.assert_allclose((P / P.sum(0)).T @ sparse.x_functions, sparse.y_functions * sparse.singular_values,
                               atol=1e-9)  # E[alpha_j | Y] = s_j beta_j too


@pytest.mark.parametrize("blocks, shape", [(8, (6, 5)), (12, (4, 3)), (5, (30, 25))])
def test_values_repeated_across_identical_components_are_all_found(blocks, shape, solver):
    """Regression: ARPACK on the whole table missed copies of a value that identical components
    repeat (an error of 0.16, silently); each component is now solved on its own."""
    B = np.random.default_rng(blocks).gamma(2.0, size=shape)
    S = sp.block_diag([B] * blocks, format="csr")
    rank = min(S.shape) - 1
    np.testing.assert_allclose(spectrum(S, rank=rank).singular_values, spectrum(S.toarray(), rank=rank).singular_values,
                               atol=1e-9)
    assert_valid_triplets(spectrum(S, rank=rank), S, atol=1e-8)


def test_dense_rank_truncates():
    spec = spectrum(P_A, rank=2)
    assert spec.singular_values.shape == (2,) and spec.x_functions.shape == (3, 2)
    np.testing.assert_allclose(spec.singular_values, [1, 0.613504], atol=1e-6)


# -- convergence rate ------------------------------------------------------------------------------


def test_ipf_rate_predicts_the_observed_decay():
    rng = np.random.default_rng(3)
    T = rng.gamma(2.0, size=(6, 5)) + np.eye(6, 5) * 3
    p_x, p_y = rng.dirichlet(np.full(6, 5.0)), rng.dirichlet(np.full(5, 5.0))
    res = balance_table(T, p_x, p_y, steps=40)
    limit = balance_table(T, p_x, p_y, tol=1e-14)
    rate = spectrum(limit.table).ipf_rate
    err = res.marginal_error.max(axis=1)
    # s_2^2 per sweep (two half-steps), as the theory page says.
    observed = err[22:32] / err[20:30]
    np.testing.assert_allclose(observed, rate, rtol=1e-3)
    predicted = spectrum(limit.table).predicted_steps(1e-10, initial_error=err[20])
    actual = 20 + int(np.argmax(err[20:] <= 1e-10)) if (err[20:] <= 1e-10).any() else None
    assert actual is not None and abs(predicted + 20 - actual) <= 2


def test_predicted_steps_edge_cases():
    assert spectrum(P_A).predicted_steps(1e-3, initial_error=1e-4) == 0
    disconnected = spectrum([[1.0, 0.0], [0.0, 1.0]])
    assert disconnected.predicted_steps(1e-10) == np.iinfo(np.int64).max


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: spectrum(sp.csr_array(P_A)), ValueError, r"`rank` is required for a sparse table.*at most 2"),
        (lambda: spectrum(sp.csr_array(P_A), rank=3), ValueError, r"`rank` must be < min\(m, l\) = 3"),
        (lambda: spectrum(P_A, rank=4), ValueError, r"`rank` must be <= min\(m, l\) = 3"),
        (lambda: spectrum(P_A, rank=0), ValueError, r"`rank` must be a positive integer; got 0"),
        (lambda: spectrum(P_A, rank=1.5), ValueError, r"`rank` must be a positive integer; got 1.5"),
        (lambda: spectrum([[0.0, 0.0], [0.0, 0.0]]), ValueError, r"`table` has total mass 0"),
        (lambda: spectrum([[1.0, -1.0], [1.0, 1.0]]), ValueError, r"`table` must be nonnegative"),
        (lambda: spectrum([[1.0, np.nan], [1.0, 1.0]]), ValueError, r"`table` contains NaN"),
        (lambda: spectrum([[1.0, np.inf], [1.0, 1.0]]), ValueError, r"`table` contains an infinite value"),
        (lambda: spectrum([[1e308, 1e308], [1.0, 1.0]]), ValueError, r"row sums of `table` overflow"),
        (lambda: spectrum(sp.csr_array([[1.0, -2.0], [1.0, 1.0]])), ValueError,
         r"`table` must be finite and nonnegative; found -2.0 at index \(0, 1\)"),
        (lambda: spectrum([1.0, 2.0]), ValueError, r"`table` must have 2 dimensions"),
        (lambda: spectrum(sp.coo_array(np.ones(3)), rank=1), ValueError, r"`table` must be 2-D"),
        (lambda: spectrum([[1 + 1j, 1], [1, 1]]), TypeError, r"`table` has dtype complex128"),
        (lambda: spectrum(sp.csr_array(np.ones((2, 2), dtype=complex)), rank=1), TypeError,
         r"`table` has dtype complex128"),
        (lambda: spectrum(np.array([["a", "b"]], dtype=object)), TypeError, r"`table` could not be read"),
        (lambda: spectrum(np.ma.masked_array(P_A, mask=P_A > 0.3)), TypeError, r"`table` is a masked array"),
        (lambda: spectrum([[1.0, 0.0], [0.0, 0.0]]), ValueError, r"Row 1 of `table` is empty"),
        (lambda: spectrum([[1.0, 0.0], [1.0, 0.0]]), ValueError, r"Column 1 of `table` is empty"),
        (lambda: conditional_mean(P_A, given="z"), ValueError, r"`given` must be 'x' or 'y'; got 'z'"),
        (lambda: conditional_mean([[1.0, 0.0], [0.0, 0.0]]), ValueError, r"Row 1 of `table` is empty"),
    ],
)
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# -- many margins: the rate of one sweep -----------------------------------------------------------


def _projection_matrix(P, axes):
    """E[. | the variables in axes] as an explicit (cells x cells) matrix on the flattened table."""
    w = P.ravel()
    n = w.size
    codes = np.ravel_multi_index(tuple(np.indices(P.shape)[a].ravel() for a in axes), [P.shape[a] for a in axes])
    same = codes[:, None] == codes[None, :]
    E = same * w[None, :]
    den = E.sum(1, keepdims=True)
    return np.divide(E, den, out=np.zeros((n, n)), where=den > 0)


def brute_force_rate(P, margins):
    """Spectral radius of C_1 ... C_K on the span of the margins' functions, with every operator an
    explicit matrix on the full table: the span's L2(P) projection from least squares."""
    P = P / P.sum()
    n = P.size
    T = np.eye(n)
    for axes in margins:
        T = T @ (np.eye(n) - _projection_matrix(P, axes))
    idx = np.indices(P.shape)
    columns = []
    for axes in margins:
        codes = np.ravel_multi_index(tuple(idx[a].ravel() for a in axes), [P.shape[a] for a in axes])
        columns.append(np.eye(codes.max() + 1)[codes])
    X = np.column_stack(columns)
    w = np.sqrt(P.ravel())
    support = w > 0
    # Projection onto the span in L2(P), restricted to the support (T acts on functions there).
    Xs = X[support] * w[support, None]
    Q, s, _ = np.linalg.svd(Xs, full_matrices=False)
    Q = Q[:, s > 1e-10 * s[0]]
    proj = (Q @ Q.T) / w[support][:, None] * w[support][None, :]
    Ts = T[np.ix_(support, support)]
    return np.abs(np.linalg.eigvals(Ts @ proj)).max()


@pytest.mark.parametrize("shape, margins, zeros", [
    ((3, 4), [(0,), (1,)], False),
    ((3, 4, 2), [(0, 1), (2,)], False),
    ((2, 3, 2, 2), [(0, 1), (2,), (3,)], False),
    ((2, 3, 4), [(1,), (0, 2), (1, 2)], False),
    ((3, 3, 3), [(0,), (1,), (2,)], True),
    ((2, 2, 3), [(2,), (0,), (1, 2)], True),
])
def test_cyclic_rate_matches_explicit_operators(shape, margins, zeros):
    rng = np.random.default_rng(len(shape) + 10 * len(margins))
    P = rng.gamma(1.5, size=shape)
    if zeros:
        P[rng.random(shape) < 0.2] = 0.0
    got = cyclic_rate(Cells.from_table(P, margins))
    np.testing.assert_allclose(got, brute_force_rate(P, margins), atol=1e-10)
    assert 0 <= got < 1


def test_cyclic_rate_of_two_margins_is_s2_squared():
    for P in (P_A, np.random.default_rng(3).gamma(1.0, size=(6, 4))):
        cells = Cells.from_table(P, [(0,), (1,)])
        np.testing.assert_allclose(cyclic_rate(cells), spectrum(P).ipf_rate, rtol=1e-10)
    # A disconnected support: the component indicators lie in both margins' spans and are not
    # a direction of convergence; the rate is the largest s_j^2 below 1.
    P = np.array([[0.3, 0.2, 0.0], [0.1, 0.1, 0.0], [0.0, 0.0, 0.3]])
    s = spectrum(P).singular_values
    np.testing.assert_allclose(cyclic_rate(Cells.from_table(P, [(0,), (1,)])), s[s < 1 - 1e-12].max() ** 2,
                               rtol=1e-10)


def test_cyclic_rate_of_independent_margins_is_zero():
    P = np.einsum("i,j,k->ijk", [0.2, 0.8], [0.1, 0.3, 0.6], [0.5, 0.25, 0.25])
    assert cyclic_rate(Cells.from_table(P, [(0,), (1,), (2,)])) < 1e-12


def test_repr_is_short_and_names_s2():
    small = repr(spectrum(P_A))
    assert small == "SpectrumResult(singular values [1, 0.6135, 0.3532]; s_2 = 0.6135, 1 component(s), table 3 x 3)"
    big = repr(spectrum(np.random.default_rng(0).random((300, 400)) + 0.01))
    assert len(big.splitlines()) == 1 and len(big) < 200 and "... (300 in all)" in big and "table 300 x 400" in big
