"""The stages' Triton kernels (GPU) against the torch code they replace."""
import pytest
import torch

from mmseg_selfattn.stages import kernels
from mmseg_selfattn.stages.dbscan import components_by_closure, components_by_propagation
from mmseg_selfattn.stages.outlier_suppression import rank_outliers
from mmseg_selfattn.stages.vectors import cosine_matrix

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.AVAILABLE),
                                reason='the kernels run on CUDA with Triton')


def torch_path(function, *args, **kwargs):
    kernels.ENABLED = False
    try:
        return function(*args, **kwargs)
    finally:
        kernels.ENABLED = True


@pytest.mark.parametrize('num', [1, 2, 64, 65, 196, 300])
def test_closure_squaring_finds_the_torch_components(num):
    """The fused squaring (padded to its tile) gives the roots of bmm + clamp, on one long
    chain and on random graphs."""
    generator = torch.Generator().manual_seed(num)
    upper = torch.rand(4, num, num, generator=generator) < 1.5 / num
    adjacency = upper | upper.transpose(1, 2)
    order = torch.randperm(num, generator=generator)
    adjacency[0] = False
    adjacency[0, order[:-1], order[1:]] = adjacency[0, order[1:], order[:-1]] = True
    adjacency = adjacency.cuda()
    roots = components_by_closure(adjacency)
    assert torch.equal(roots, torch_path(components_by_closure, adjacency))
    assert (roots[0] == 0).all()
    assert torch.equal(roots.cpu(), components_by_propagation(adjacency.cpu()))
    assert components_by_closure(adjacency[:0]).shape == (0, num)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize('shape', [(3, 5, 20), (2, 64, 32), (2, 196, 768), (1, 130, 515)])
@pytest.mark.parametrize('distance', [False, True])
def test_cosine_kernel_is_float32_accurate(dtype, shape, distance):
    """Strided rows (a slice past the CLS token), zero rows, sizes off the tile."""
    batch, num, dim = shape
    generator = torch.Generator().manual_seed(num)
    tokens = torch.randn(batch, num + 1, dim, generator=generator) * 3
    tokens[0, 1] = 0
    features = tokens.to(dtype).cuda()[:, 1:]
    result = cosine_matrix(features, distance)
    unit = torch.nn.functional.normalize(features.double(), dim=-1)
    expected = unit @ unit.transpose(1, 2)
    if distance:
        expected = (1 - expected).clamp(0, 2)
        expected.diagonal(dim1=1, dim2=2).zero_()
    assert result.dtype == torch.float32 and result.shape == (batch, num, num)
    assert (result.double() - expected).abs().max() < 1e-5  # float32 sums of D products
    assert torch.allclose(result, torch_path(cosine_matrix, features, distance), atol=1e-5)
    assert torch.equal(result, cosine_matrix(features, distance))  # deterministic
    if not distance:
        assert (result[0, 0] == 0).all() and (result[0, :, 0] == 0).all()
    else:
        assert (result.diagonal(dim1=1, dim2=2) == 0).all()



@pytest.mark.parametrize('num', [1, 5, 196, 300, 1500])
@pytest.mark.parametrize('top_k', [0, 1, 10, 2000])
def test_top_indices_kernel_orders_as_the_stable_sort(num, top_k):
    """Many ties, NaN (first, as torch sorts them), infinities and -0.0."""
    generator = torch.Generator().manual_seed(num)
    scores = torch.randint(0, 7, (4, num), generator=generator).float() / 4
    scores[1, ::7] = float('nan')
    scores[2, ::5], scores[2, 1::9], scores[3, ::3] = float('inf'), -float('inf'), -0.0
    scores = scores.cuda()
    assert kernels.supports_top_indices(scores)
    indices = kernels.top_indices(scores, top_k)
    expected = scores.sort(dim=-1, descending=True, stable=True).indices[:, :top_k]
    assert indices.dtype == torch.long and torch.equal(indices, expected)
    for min_ratio in (None, 0.7):
        assert torch.equal(rank_outliers(scores, top_k, min_ratio),
                           torch_path(rank_outliers, scores, top_k, min_ratio))
