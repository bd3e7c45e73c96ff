"""Batched torch DBSCAN against scikit-learn's DBSCAN(metric='cosine')."""
import numpy as np
import pytest
import torch
from sklearn.cluster import DBSCAN
from sklearn.metrics.pairwise import cosine_distances

from mmseg_selfattn.stages.dbscan import (components_by_closure, components_by_propagation,
                                          connected_components, cosine_distance, dbscan)


def blobs(seed: int, num_blobs: int = 4, per_blob: int = 30, num_noise: int = 20,
          dim: int = 8, spread: float = 0.15) -> torch.Tensor:
    """Gaussian blobs around random centres plus uniform-ish noise, shuffled, fp64."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_blobs, dim, generator=gen, dtype=torch.float64)
    points = [centre + spread * torch.randn(per_blob, dim, generator=gen, dtype=torch.float64)
              for centre in centres]
    points.append(torch.randn(num_noise, dim, generator=gen, dtype=torch.float64))
    points = torch.cat(points)
    return points[torch.randperm(len(points), generator=gen)]


def check_against_sklearn(points: torch.Tensor, labels: torch.Tensor, core: torch.Tensor,
                          eps: float, min_samples: int) -> None:
    """Core and noise exactly as sklearn; core clusters equal up to relabelling;
    every border point reached by a core point of its own cluster."""
    data = points.numpy()
    reference = DBSCAN(eps=eps, min_samples=min_samples, metric='cosine').fit(data)
    labels, core = labels.numpy(), core.numpy()
    reference_core = np.zeros(len(data), dtype=bool)
    reference_core[reference.core_sample_indices_] = True

    np.testing.assert_array_equal(core, reference_core)
    np.testing.assert_array_equal(labels == -1, reference.labels_ == -1)
    # a bijection between our and sklearn's labels on the core points
    pairs = set(zip(labels[core].tolist(), reference.labels_[core].tolist()))
    assert len({ours for ours, _ in pairs}) == len(pairs) == len({theirs for _, theirs in pairs})
    assert set(labels[labels >= 0].tolist()) == set(range(len(pairs)))  # labels are 0..K-1

    distance = cosine_distances(data)
    for border in np.flatnonzero(~core & (labels >= 0)):
        reaching = core & (labels == labels[border]) & (distance[border] <= eps)
        assert reaching.any(), f'border point {border} not reached by its cluster'


@pytest.mark.parametrize('seed', range(4))
@pytest.mark.parametrize('eps, min_samples', [(0.01, 3), (0.02, 6), (0.05, 8), (0.2, 4), (0.5, 10)])
def test_matches_sklearn(seed, eps, min_samples):
    points = blobs(seed)
    labels, core = dbscan(points[None], eps, min_samples)
    assert labels.dtype == torch.long and core.dtype == torch.bool
    check_against_sklearn(points, labels[0], core[0], eps, min_samples)


def test_has_border_points_and_several_clusters():
    """The random cases above are not trivial: they contain borders, noise and K > 1."""
    points = blobs(0)
    labels, core = dbscan(points[None], 0.02, 6)
    assert (~core & (labels >= 0)).sum() >= 5
    assert (labels == -1).any()
    assert labels.max() >= 2


def test_sklearn_numbering_on_core_points():
    """Clusters are numbered by their lowest-index core point, as sklearn does."""
    points = blobs(1)
    labels, core = dbscan(points[None], 0.08, 5)
    reference = DBSCAN(eps=0.08, min_samples=5, metric='cosine').fit(points.numpy())
    np.testing.assert_array_equal(labels[0][core[0]].numpy(),
                                  reference.labels_[core[0].numpy()])


def test_fp32_high_dim_matches_sklearn():
    gen = torch.Generator().manual_seed(7)
    centres = torch.randn(5, 64, generator=gen)
    points = (centres.repeat_interleave(20, 0) + 0.4 * torch.randn(100, 64, generator=gen))
    labels, core = dbscan(points[None], 0.15, 4)
    check_against_sklearn(points, labels[0], core[0], 0.15, 4)


def test_batch_equals_crops_one_at_a_time():
    crops = torch.stack([blobs(seed, num_blobs=3 + seed % 3, per_blob=20,
                               num_noise=100 - 20 * (3 + seed % 3)) for seed in range(5)])
    labels, core = dbscan(crops, 0.02, 4)
    assert len({int(crop_labels.max()) for crop_labels in labels}) > 1  # K differs per crop
    for index, crop in enumerate(crops):
        alone_labels, alone_core = dbscan(crop[None], 0.02, 4)
        assert torch.equal(labels[index], alone_labels[0])
        assert torch.equal(core[index], alone_core[0])


def test_border_point_joins_nearest_core():
    """A border point reached by two clusters joins the one of its nearest core point
    (sklearn would give it to the cluster it scans first, here the other one)."""
    angles = [0.0, 0.004, 0.008, 0.012, 0.016,  # cluster A
              0.058,  # border: 0.042 rad from A's edge, 0.040 from B's
              0.098, 0.102, 0.106, 0.110, 0.114]  # cluster B
    angles = torch.tensor(angles, dtype=torch.float64)
    points = torch.stack([angles.cos(), angles.sin()], -1)[None]
    eps = 1 - float(torch.tensor(0.045, dtype=torch.float64).cos())
    labels, core = dbscan(points, eps, 5)
    assert labels[0].tolist() == [0] * 5 + [1] + [1] * 5
    assert core[0].tolist() == [True] * 5 + [False] + [True] * 5
    check_against_sklearn(points[0], labels[0], core[0], eps, 5)


@pytest.mark.parametrize('min_samples, expected', [(1, 0), (2, -1)])
def test_single_point(min_samples, expected):
    labels, core = dbscan(torch.randn(3, 1, 8), 0.2, min_samples)
    assert labels.tolist() == [[expected]] * 3
    assert core.tolist() == [[expected == 0]] * 3


def test_identical_points_form_one_cluster():
    points = torch.randn(1, 8).expand(2, 50, 8).clone()
    labels, core = dbscan(points, 1e-6, 5)
    assert (labels == 0).all() and core.all()


def test_all_noise_when_min_samples_exceeds_n():
    labels, core = dbscan(torch.randn(2, 10, 8), 2.0, 11)
    assert (labels == -1).all() and not core.any()


def test_eps_two_is_one_cluster():
    points = blobs(3)
    labels, core = dbscan(points[None], 2.0, 4)
    assert (labels == 0).all() and core.all()


def test_zero_vectors_are_at_distance_one():
    """As sklearn: a zero row normalises to zero, so its distance to anything else is 1."""
    points = torch.randn(1, 6, 8)
    points[0, :3] = 0
    distance = cosine_distance(points)[0]
    assert torch.isfinite(distance).all()
    np.testing.assert_allclose(distance[0, 1:].numpy(), 1.0, atol=1e-6)
    labels, core = dbscan(points, 0.5, 2)
    assert (labels[0, :3] == -1).all()  # zero rows are not each other's neighbours
    labels, _ = dbscan(points, 1.0, 6)  # ... but within 1.0 of everything
    assert (labels == 0).all()


def test_empty_crop():
    labels, core = dbscan(torch.randn(2, 0, 8), 0.2, 4)
    assert labels.shape == core.shape == (2, 0)


def test_connected_components_long_chain():
    """A shuffled path graph is one component, found in few rounds."""
    num = 300
    order = torch.randperm(num, generator=torch.Generator().manual_seed(0))
    adjacency = torch.eye(num, dtype=torch.bool)
    adjacency[order[:-1], order[1:]] = True
    adjacency[order[1:], order[:-1]] = True
    roots = connected_components(adjacency[None])
    assert (roots == 0).all()


@pytest.mark.parametrize('density', [0.002, 0.006, 0.012])
def test_closure_and_propagation_find_the_same_components(density):
    """The GPU path (matrix squaring, no host sync) equals the CPU one on random graphs."""
    generator = torch.Generator().manual_seed(int(density * 1000))
    upper = torch.rand(3, 150, 150, generator=generator) < density
    adjacency = (upper | upper.transpose(1, 2)).triu(1)
    adjacency = adjacency | adjacency.transpose(1, 2)
    by_closure = components_by_closure(adjacency)
    assert torch.equal(by_closure, components_by_propagation(adjacency))
    assert 1 < len(by_closure[0].unique()) < 150  # neither trivial case


def test_deterministic():
    points = blobs(2)[None]
    first = dbscan(points, 0.08, 5)
    second = dbscan(points, 0.08, 5)
    assert all(torch.equal(a, b) for a, b in zip(first, second))

