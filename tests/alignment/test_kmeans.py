"""Reference tests of k-means: scikit-learn's Lloyd from the same initial centroids, a NumPy
k-means++ and spherical Lloyd, blob recovery, chunking, determinism and empty clusters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from modalign.alignment import KMeansResult, assign, kmeans


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def blobs(per: int, centers: Tensor, std: float, seed: int) -> tuple[Tensor, Tensor]:
    """``per`` Gaussian points around each centre; returns ``(x, true labels)``."""
    k, d = centers.shape
    x = centers.repeat_interleave(per, dim=0) + std * randn(k * per, d, seed=seed)
    return x, torch.arange(k).repeat_interleave(per)


def sklearn_lloyd(x: Tensor, init: Tensor, iterations: int, tol: float) -> KMeans:
    return KMeans(init.shape[0], init=init.numpy(), n_init=1, algorithm="lloyd", max_iter=iterations, tol=tol).fit(
        x.numpy()
    )


def assert_same_as_sklearn(got: KMeansResult, want: KMeans) -> None:
    np.testing.assert_array_equal(got.assignments.numpy(), want.labels_)
    np.testing.assert_allclose(got.centroids.numpy(), want.cluster_centers_, atol=1e-9, rtol=0)
    assert got.inertia == pytest.approx(want.inertia_, rel=1e-9)
    assert got.iterations == want.n_iter_


@pytest.mark.parametrize(("n", "d", "k"), [(60, 2, 3), (150, 5, 7), (40, 3, 10)])
@pytest.mark.parametrize(("iterations", "tol"), [(1, 0.0), (3, 0.0), (300, 0.0), (300, 1e-2)])
def test_lloyd_equals_sklearn_from_the_same_init(n: int, d: int, k: int, iterations: int, tol: float) -> None:
    x = randn(n, d, seed=n + k) + 3.0  # off the origin: exercises the centring
    init = x[torch.randperm(n, generator=torch.Generator().manual_seed(k))[:k]].clone()
    got = kmeans(x, k, init=init, iterations=iterations, tol=tol, chunk_size=16)
    assert_same_as_sklearn(got, sklearn_lloyd(x, init, iterations, tol))


def test_empty_cluster_is_reseeded_like_sklearn() -> None:
    x, _ = blobs(20, torch.tensor([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]], dtype=torch.float64), 1.0, seed=1)
    init = torch.tensor([[0.5, 0.5], [100.0, 100.0], [5.0, 1.0]], dtype=torch.float64)  # cluster 1 gets no point
    for iterations in (1, 2, 100):
        got = kmeans(x, 3, init=init, iterations=iterations, tol=0.0)
        assert_same_as_sklearn(got, sklearn_lloyd(x, init, iterations, 0.0))
    assert torch.bincount(kmeans(x, 3, init=init).assignments, minlength=3).min() > 0


def test_several_empty_clusters_take_the_farthest_points_in_order() -> None:
    x = randn(30, 2, seed=2)
    init = torch.tensor([[0.0, 0.0], [50.0, 0.0], [0.1, 0.0], [0.0, 50.0]], dtype=torch.float64)
    got = kmeans(x, 4, init=init, iterations=1)
    first = assign(x, init)  # only clusters 0 and 2 receive points
    assert set(first.tolist()) == {0, 2}
    far = ((x - init[first]) ** 2).sum(1).argsort(descending=True)[:2]
    torch.testing.assert_close(got.centroids[1], x[far[0]])  # first empty cluster: farthest point
    torch.testing.assert_close(got.centroids[3], x[far[1]])  # second: the next farthest
    for c in (0, 2):
        keep = (first == c) & ~torch.isin(torch.arange(30), far)
        torch.testing.assert_close(got.centroids[c], x[keep].mean(0))


def numpy_kmeans_plus_plus(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """D^2 seeding (Arthur & Vassilvitskii 2007) with the same uniforms and inverse CDF."""
    gen = torch.Generator().manual_seed(seed)
    weights = np.ones(x.shape[0])
    centers = []
    for _ in range(k):
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        cum = np.cumsum(weights)
        i = min(int(np.searchsorted(cum, u * cum[-1], side="right")), x.shape[0] - 1)
        centers.append(x[i])
        d2 = ((x - x[i]) ** 2).sum(1)
        weights = d2 if len(centers) == 1 else np.minimum(weights, d2)
    return np.stack(centers)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_initialisation_is_seeded_kmeans_plus_plus(seed: int) -> None:
    x = randn(80, 3, seed=seed)
    got = kmeans(x, 6, seed=seed, iterations=0)
    np.testing.assert_allclose(got.centroids.numpy(), numpy_kmeans_plus_plus(x.numpy(), 6, seed), atol=1e-12)
    assert got.iterations == 0
    torch.testing.assert_close(got.assignments, assign(x, got.centroids), atol=0, rtol=0)


def test_determinism_for_a_seed_and_chunking_does_not_matter() -> None:
    x = randn(300, 4, seed=3)
    a, b = kmeans(x, 5, seed=11), kmeans(x, 5, seed=11)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.assignments, b.assignments)
    assert not torch.equal(kmeans(x, 5, seed=12, iterations=0).centroids, kmeans(x, 5, seed=11, iterations=0).centroids)
    for chunk in (1, 7, 64):
        c = kmeans(x, 5, seed=11, chunk_size=chunk)
        assert torch.equal(c.assignments, a.assignments) and c.iterations == a.iterations
        torch.testing.assert_close(c.centroids, a.centroids, atol=1e-12, rtol=0)
        assert c.inertia == pytest.approx(a.inertia, rel=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_well_separated_blobs_are_recovered(seed: int) -> None:
    centers = 20.0 * torch.eye(4, 3, dtype=torch.float64)
    x, labels = blobs(25, centers, 1.0, seed=seed)
    got = kmeans(x, 4, seed=seed)
    assert adjusted_rand_score(labels.numpy(), got.assignments.numpy()) == 1.0
    order = got.assignments[::25]
    torch.testing.assert_close(got.centroids[order], centers, atol=0.6, rtol=0)


def test_inertia_is_the_sum_of_squared_distances() -> None:
    x = randn(120, 3, seed=4)
    got = kmeans(x, 4, seed=0)
    assert got.inertia == pytest.approx(float(((x - got.centroids[got.assignments]) ** 2).sum()), rel=1e-12)


def numpy_spherical_lloyd(x: np.ndarray, init: np.ndarray, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = init / np.linalg.norm(init, axis=1, keepdims=True)
    labels = np.full(len(x), -1)
    for _ in range(iterations):
        new_labels = (xn @ c.T).argmax(1)
        sums = np.stack([xn[new_labels == j].sum(0) for j in range(len(c))])
        c = sums / np.linalg.norm(sums, axis=1, keepdims=True)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
    return c, (xn @ c.T).argmax(1)


def test_spherical_equals_a_numpy_cosine_lloyd() -> None:
    x = randn(90, 4, seed=5)
    init = x[:3].clone()
    got = kmeans(x, 3, init=init, spherical=True, tol=0.0, iterations=100)
    want_c, want_labels = numpy_spherical_lloyd(x.numpy(), init.numpy(), 100)
    np.testing.assert_allclose(got.centroids.numpy(), want_c, atol=1e-12)
    np.testing.assert_array_equal(got.assignments.numpy(), want_labels)
    torch.testing.assert_close(got.centroids.norm(dim=1), torch.ones(3, dtype=torch.float64))
    xn = F.normalize(x, dim=1)
    inertia = float((2 - 2 * (xn * got.centroids[got.assignments]).sum(1)).sum())
    assert got.inertia == pytest.approx(inertia, rel=1e-10)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 5))
def test_spherical_ignores_row_scale(seed: int, k: int) -> None:
    x = randn(40, 3, seed=seed)
    scale = 0.1 + 10.0 * torch.rand(40, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    a = kmeans(x, k, seed=seed, spherical=True)
    b = kmeans(x * scale, k, seed=seed, spherical=True)
    assert torch.equal(a.assignments, b.assignments)
    torch.testing.assert_close(a.centroids, b.centroids, atol=1e-10, rtol=0)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 5))
def test_translation_far_from_the_origin_changes_nothing(seed: int, k: int) -> None:
    x = randn(50, 3, seed=seed)
    offset = torch.tensor([1e6, -2e6, 5e5], dtype=torch.float64)
    a = kmeans(x, k, seed=seed)
    b = kmeans(x + offset, k, seed=seed)
    assert torch.equal(a.assignments, b.assignments)
    torch.testing.assert_close(b.centroids - offset, a.centroids, atol=1e-8, rtol=0)


def test_float32_input_gives_float32_centroids() -> None:
    x = randn(64, 3, seed=6)
    got = kmeans(x.float(), 3, seed=0)
    assert got.centroids.dtype == torch.float32 and got.assignments.dtype == torch.long
    ref = kmeans(x, 3, seed=0)
    assert torch.equal(got.assignments, ref.assignments)


def test_no_gradient_and_input_untouched() -> None:
    x = randn(30, 2, seed=7).requires_grad_()
    before = x.detach().clone()
    got = kmeans(x, 3)
    assert not got.centroids.requires_grad and torch.equal(x.detach(), before)


def test_memory_grows_with_the_chunk_not_with_n_times_k() -> None:
    n, d, k, chunk = 240, 4, 16, 12
    x = randn(n, d, seed=8)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        kmeans(x, k, iterations=2, chunk_size=chunk)
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < largest <= max(n, chunk * k, chunk * d) * x.element_size() < n * k * x.element_size() // 4


def test_assign_equals_brute_force() -> None:
    x, c = randn(70, 5, seed=9), randn(6, 5, seed=10)
    np.testing.assert_array_equal(assign(x, c, chunk_size=8).numpy(), torch.cdist(x, c).argmin(1).numpy())
    cos = F.normalize(x, dim=1) @ F.normalize(c, dim=1).T
    np.testing.assert_array_equal(assign(x, c, spherical=True, chunk_size=8).numpy(), cos.argmax(1).numpy())


@pytest.mark.parametrize(
    ("x", "k", "kwargs", "match"),
    [
        (torch.zeros(5), 2, {}, r"\[N, D\].*\(5,\)"),
        (torch.zeros(5, 2), 0, {}, "k >= 1"),
        (torch.zeros(5, 2), 2, {"chunk_size": 0}, "chunk_size"),
        (torch.zeros(5, 2), 2, {"init": torch.zeros(3, 2)}, r"init must be \[k, D\] = \[2, 2\].*\(3, 2\)"),
        (torch.zeros(3, 2), 4, {}, r"at least k=4 rows, got 3"),
    ],
)
def test_kmeans_bad_inputs_raise(x: Tensor, k: int, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        kmeans(x, k, **kwargs)  # type: ignore[arg-type]


def test_assign_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(2, 2\)"):
        assign(torch.zeros(4, 3), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="chunk_size"):
        assign(torch.zeros(4, 3), torch.zeros(2, 3), chunk_size=0)
