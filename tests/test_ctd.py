"""CTD: planted clusters, the per-cluster shift, refine, degenerate inputs, config errors."""
import pytest
import torch
from mmseg.registry import MODELS

from mmseg_selfattn.stages.ctd import ClusterTokenDebias, cluster_token_debias

DIM = 16
GROUP_SIZES = (6, 5, 7)


def planted_crop(seed: int = 0):
    """3 tight direction groups (along e0, e1, e2) + 2 isolated tokens (e5, e6), shuffled.

    Returns features (N, D) fp64 and the planted group of every token (-1 = isolated).
    """
    gen = torch.Generator().manual_seed(seed)
    tokens, groups = [], []
    for group, size in enumerate(GROUP_SIZES):
        direction = torch.zeros(DIM, dtype=torch.float64)
        direction[group] = 1.0
        magnitude = 1 + torch.rand(size, 1, generator=gen, dtype=torch.float64)
        jitter = 0.02 * torch.randn(size, DIM, generator=gen, dtype=torch.float64)
        tokens.append(magnitude * (direction + jitter))
        groups += [group] * size
    isolated = torch.zeros(2, DIM, dtype=torch.float64)
    isolated[0, 5] = isolated[1, 6] = 1.5
    tokens.append(isolated)
    groups += [-1, -1]
    order = torch.randperm(len(groups), generator=gen)
    return torch.cat(tokens)[order], torch.tensor(groups)[order]


def cls_embedding() -> torch.Tensor:
    x_cls = torch.zeros(DIM, dtype=torch.float64)
    x_cls[[0, 1, 2, 7]] = torch.tensor([2.0, 1.0, -0.5, 0.3], dtype=torch.float64)
    return x_cls


def expected_debias(features, x_cls, groups, scale, refine):
    """Reference written token group by token group, independently of the module."""
    expected = features.clone()
    unit = x_cls / x_cls.norm()
    for group in set(groups.tolist()) - {-1}:
        members = groups == group
        prototype = features[members].mean(0)
        similarity = prototype @ x_cls / (prototype.norm() * x_cls.norm())
        shift = scale * similarity * unit
        expected[members] = (1 - refine) * features[members] + refine * prototype - shift
    return expected


def same_partition(labels: torch.Tensor, groups: torch.Tensor) -> bool:
    pairs = set(zip(labels.tolist(), groups.tolist()))
    return len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})


def test_planted_clusters_recovered_and_shifted():
    features, groups = planted_crop()
    x_cls = cls_embedding()
    ctd = ClusterTokenDebias(eps=0.2, min_samples=4, scale=0.5)
    out = ctd(features[None], x_cls[None])[0]

    labels = ctd.last_labels[0]
    assert torch.equal(labels == -1, groups == -1)
    assert same_partition(labels, groups)
    assert sorted(set(labels.tolist())) == [-1, 0, 1, 2]

    torch.testing.assert_close(out, expected_debias(features, x_cls, groups, 0.5, 0.0),
                               rtol=0, atol=1e-12)
    noise = groups == -1
    assert torch.equal(out[noise], features[noise])  # bitwise untouched
    # groups have different CLS similarity (the e2 group a negative one): shifts differ
    shifts = {(features - out)[groups == g][0] @ x_cls for g in range(3)}
    assert len(shifts) == 3


@pytest.mark.parametrize('refine', [0.3, 1.0])
def test_refine_mixes_towards_shifted_prototype(refine):
    features, groups = planted_crop(1)
    x_cls = cls_embedding()
    out = ClusterTokenDebias(scale=0.7, refine=refine)(features[None], x_cls[None])[0]
    torch.testing.assert_close(out, expected_debias(features, x_cls, groups, 0.7, refine),
                               rtol=0, atol=1e-12)
    unit = x_cls / x_cls.norm()
    for group in range(3):
        members = groups == group
        prototype = features[members].mean(0)
        shift = 0.7 * torch.cosine_similarity(prototype, x_cls, dim=0) * unit
        # a cluster's mean after CTD is its shifted prototype, whatever beta
        torch.testing.assert_close(out[members].mean(0), prototype - shift, rtol=0, atol=1e-12)


def test_pure_function_with_given_labels():
    features, groups = planted_crop(2)
    x_cls = cls_embedding()
    out = cluster_token_debias(features[None], x_cls[None], groups[None], 0.4, 0.2)[0]
    torch.testing.assert_close(out, expected_debias(features, x_cls, groups, 0.4, 0.2),
                               rtol=0, atol=1e-12)


def test_scale_and_refine_zero_is_identity():
    features = torch.randn(2, 10, DIM)
    ctd = ClusterTokenDebias(scale=0, refine=0)
    assert ctd(features, torch.randn(2, DIM)) is features
    assert ctd.last_labels is None


def test_batch_equals_crops_one_at_a_time():
    crops = [planted_crop(seed) for seed in range(3)]
    features = torch.stack([crop for crop, _ in crops])
    features[2, :, 3] += 5.0  # one crop collapses to a single cluster: K differs per crop
    x_cls = torch.stack([cls_embedding(), -cls_embedding(), torch.randn(DIM, dtype=torch.float64)])
    ctd = ClusterTokenDebias(scale=0.5, refine=0.25)
    batched = ctd(features, x_cls)
    batched_labels = ctd.last_labels
    assert batched_labels[2].max() != batched_labels[0].max()
    for index in range(3):
        alone = ctd(features[index:index + 1], x_cls[index:index + 1])
        assert torch.equal(ctd.last_labels[0], batched_labels[index])
        torch.testing.assert_close(batched[index], alone[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize('case', ['single_token', 'identical', 'all_noise', 'zero_cls',
                                  'zero_features'])
def test_degenerate_inputs_give_no_nan(case):
    torch.manual_seed(0)
    features, x_cls = torch.randn(2, 12, DIM), torch.randn(2, DIM)
    ctd = ClusterTokenDebias(eps=0.2, min_samples=4, scale=0.5, refine=0.5)
    if case == 'single_token':
        features = features[:, :1]
        ctd = ClusterTokenDebias(min_samples=1, scale=0.5, refine=0.5)
    elif case == 'identical':
        features = features[:, :1].expand(-1, 12, -1).clone()
    elif case == 'all_noise':
        ctd = ClusterTokenDebias(eps=0.2, min_samples=13, scale=0.5, refine=0.5)
    elif case == 'zero_cls':
        features = features[:, :1].expand(-1, 12, -1).clone()
        x_cls = torch.zeros_like(x_cls)
    elif case == 'zero_features':
        features = torch.zeros_like(features)
    out = ctd(features, x_cls)
    assert out.shape == features.shape and torch.isfinite(out).all()
    if case == 'single_token':
        assert (ctd.last_labels == 0).all()
        unit = x_cls / x_cls.norm(dim=-1, keepdim=True)
        similarity = torch.cosine_similarity(features[:, 0], x_cls, dim=-1)
        torch.testing.assert_close(out[:, 0], features[:, 0] - 0.5 * similarity[:, None] * unit)
    if case == 'identical':
        assert (ctd.last_labels == 0).all()
    if case == 'all_noise':
        assert (ctd.last_labels == -1).all()
        assert torch.equal(out, features)
    if case in ('zero_cls', 'zero_features'):
        torch.testing.assert_close(out, features)  # nothing to remove


def test_half_precision_keeps_dtype():
    features, groups = planted_crop()
    x_cls = cls_embedding()
    out = ClusterTokenDebias()(features[None].half(), x_cls[None].half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    expected = expected_debias(features, x_cls, groups, 0.5, 0.0)
    torch.testing.assert_close(out[0].double(), expected, rtol=0, atol=1e-2)


def test_built_from_registry():
    ctd = MODELS.build(dict(type='ClusterTokenDebias', eps=0.3, min_samples=2, scale=1.0,
                            refine=0.5))
    assert isinstance(ctd, ClusterTokenDebias) and ClusterTokenDebias.cfg_key == 'ctd_cfg'
    assert (ctd.eps, ctd.min_samples, ctd.scale, ctd.refine) == (0.3, 2, 1.0, 0.5)


@pytest.mark.parametrize('key, value, message', [
    ('eps', 0, r'ctd_cfg\.eps must be a number in \(0, 2\], got 0'),
    ('eps', 2.5, r'ctd_cfg\.eps must be a number in \(0, 2\], got 2\.5'),
    ('eps', 'big', r'ctd_cfg\.eps must be a number'),
    ('min_samples', 0, r'ctd_cfg\.min_samples must be an int >= 1, got 0'),
    ('min_samples', 2.0, r'ctd_cfg\.min_samples must be an int >= 1, got 2\.0'),
    ('scale', -0.1, r'ctd_cfg\.scale must be a number in \[0, inf\), got -0\.1'),
    ('refine', 1.5, r'ctd_cfg\.refine must be a number in \[0, 1\], got 1\.5'),
    ('refine', float('nan'), r'ctd_cfg\.refine must be a number'),
])
def test_invalid_config_names_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        ClusterTokenDebias(**{key: value})
