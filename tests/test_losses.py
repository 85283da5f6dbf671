"""The balanced contrastive losses: k = 1 is CLIP's cross-entropy, k = 0 the joint softmax, k >= 2
the alternated log-softmax (written out independently here), in every namespace, with gradients."""

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from databalance.losses import balanced_contrastive_loss


def log_softmax(a, axis):
    peak = a.max(axis=axis, keepdims=True)
    return a - peak - np.log(np.exp(a - peak).sum(axis=axis, keepdims=True))


def by_hand(L, k):
    """-1/2 [mean log(n Q_x[i, i]) + mean log(n Q_y[i, i])]: log-softmax alternated k times over
    rows and columns (minus log n each time, uniform targets), from both starts; k = 0 joint."""
    n = L.shape[-1]
    i = np.arange(n)
    if k == 0:
        flat = L.reshape(L.shape[:-2] + (-1,))
        joint = L - (np.log(np.exp(flat - flat.max(-1, keepdims=True)).sum(-1)) + flat.max(-1))[..., None, None]
        return -(joint[..., i, i] + np.log(n)).mean(-1)
    halves = []
    for first in (-1, -2):
        Q, axis = L, first
        for _ in range(k):
            Q = log_softmax(Q, axis) - np.log(n)
            axis = -3 - axis  # -1 <-> -2
        halves.append((Q[..., i, i] + np.log(n)).mean(-1))
    return -(halves[0] + halves[1]) / 2


logit_matrices = st.integers(1, 7).flatmap(
    lambda n: hnp.arrays(np.float64, st.sampled_from([(n, n), (2, n, n)]), elements=st.floats(-30, 30)))
#: JAX compiles every operation anew for each shape: the namespaces are compared on a few shapes.
few_shapes = st.sampled_from([(1, 1), (4, 4), (2, 4, 4)]).flatmap(
    lambda shape: hnp.arrays(np.float64, shape, elements=st.floats(-30, 30)))


@given(L=logit_matrices, k=st.integers(0, 4))
def test_numpy_loss_equals_alternated_log_softmax(L, k):
    np.testing.assert_allclose(balanced_contrastive_loss(L, k, reduction="none"), by_hand(L, k), rtol=0,
                               atol=1e-12 * max(1.0, np.abs(L).max()))


def test_k1_is_the_clip_cross_entropy_in_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(0)
    L = torch.tensor(rng.standard_normal((16, 16)) * 10)
    labels = torch.arange(16)
    clip = (F.cross_entropy(L, labels) + F.cross_entropy(L.T, labels)) / 2
    assert abs(float(balanced_contrastive_loss(L, 1)) - float(clip)) < 1e-12


def frameworks():
    out = []
    torch = pytest.importorskip("torch")
    out.append((torch.asarray, contextlib.nullcontext))
    jax = pytest.importorskip("jax")
    out.append((jax.numpy.asarray, lambda: jax.enable_x64(True)))
    xp = pytest.importorskip("array_api_strict")
    out.append((xp.asarray, contextlib.nullcontext))
    return out


@settings(max_examples=10)
@given(L=few_shapes, k=st.integers(0, 3))
def test_every_namespace_gives_the_numpy_loss(L, k):
    from databalance._kernels.arrayapi import to_numpy

    expected = balanced_contrastive_loss(L, k, reduction="none")
    for convert, x64 in frameworks():
        with x64():
            got = balanced_contrastive_loss(convert(L), k, reduction="none")
            assert type(got) is type(convert(L))
            np.testing.assert_allclose(to_numpy(got), expected, rtol=0, atol=1e-12 * max(1.0, np.abs(L).max()))


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_torch_gradcheck(k):
    torch = pytest.importorskip("torch")
    L = torch.tensor(np.random.default_rng(k).standard_normal((2, 5, 5)) * 3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: balanced_contrastive_loss(x, k), (L,), eps=1e-6, atol=1e-7)


def test_jax_grad_against_central_differences():
    jax = pytest.importorskip("jax")
    with jax.enable_x64(True):
        L = jax.numpy.asarray(np.random.default_rng(1).standard_normal((4, 4)) * 3)
        grad = np.asarray(jax.grad(lambda x: balanced_contrastive_loss(x, 2))(L))
        e = np.zeros((4, 4))
        e[1, 2] = 1e-6
        fd = (float(balanced_contrastive_loss(L + e, 2)) - float(balanced_contrastive_loss(L - e, 2))) / 2e-6
        assert grad[1, 2] == pytest.approx(fd, rel=1e-6)


def test_float32_stays_float32():
    torch = pytest.importorskip("torch")
    L = torch.randn(3, 8, 8)
    for k in (0, 1, 2):
        loss = balanced_contrastive_loss(L, k)
        assert loss.dtype == torch.float32 and loss.ndim == 0
    assert balanced_contrastive_loss(L, 2, reduction="none").shape == (3,)


def test_balancing_lowers_the_loss_of_a_diagonal_batch():
    """A batch whose pairs score highest is fit better by each balancing step (the paper's trend)."""
    rng = np.random.default_rng(0)
    L = rng.standard_normal((32, 32)) + 3 * np.eye(32)
    losses = [float(balanced_contrastive_loss(L, k)) for k in range(4)]
    assert losses == sorted(losses, reverse=True)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="`logits` must be a square matrix of pairs"):
        balanced_contrastive_loss(np.zeros((3, 4)), 1)
    with pytest.raises(ValueError, match="`k` must be an integer >= 0"):
        balanced_contrastive_loss(np.zeros((3, 3)), -1)
    with pytest.raises(ValueError, match="`k` must be an integer >= 0"):
        balanced_contrastive_loss(np.zeros((3, 3)), 1.5)
    with pytest.raises(ValueError, match="`reduction` must be 'mean'"):
        balanced_contrastive_loss(np.zeros((3, 3)), 1, reduction="sum")
    with pytest.raises(ValueError, match=r"`logits` contains NaN"):
        balanced_contrastive_loss(np.full((2, 2), np.nan), 1)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_every_k_checks_the_entries(k):
    """NaN, +inf and (outside NumPy) integer logits are refused for k = 0 too (it does not balance)."""
    torch = pytest.importorskip("torch")
    for bad in (np.nan, np.inf):
        for arr in (np.array([[bad, 0.0], [0.0, 0.0]]), torch.tensor([[bad, 0.0], [0.0, 0.0]])):
            with pytest.raises(ValueError, match="`logits` contains (NaN|\\+inf), first at index \\(0, 0\\)"):
                balanced_contrastive_loss(arr, k)
    with pytest.raises(TypeError, match="`logits` is a torch array of dtype torch.int64"):
        balanced_contrastive_loss(torch.ones(3, 3, dtype=torch.int64), k)


def test_guide_page_examples_run():
    import doctest
    import pathlib

    pytest.importorskip("torch")
    page = pathlib.Path(__file__).parents[1] / "docs" / "guide" / "array_api.rst"
    result = doctest.testfile(str(page), module_relative=False,
                              optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
