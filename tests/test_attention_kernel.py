"""The captured-attention Triton kernel (GPU) against the torch code it replaces."""
import pytest
import torch

from mmseg_selfattn import attention_kernel
from mmseg_selfattn.encoder import standard_attention

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and attention_kernel.AVAILABLE),
                                reason='the kernel runs on CUDA with Triton')


def torch_path(*args):
    attention_kernel.ENABLED = False
    try:
        return standard_attention(*args)
    finally:
        attention_kernel.ENABLED = True


def qk(crops, heads, tokens, dim, dtype, seed=0):
    """q and k as views of one fused qkv projection, as the encoder makes them."""
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(crops, tokens, 3, heads, dim, generator=generator).to(dtype).cuda()
    qkv = qkv.permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1]


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('shape', [(6, 12, 197, 64), (384, 12, 197, 64), (2, 3, 5, 16),
                                   (1, 2, 250, 32), (2, 4, 256, 128)])
def test_kernel_equals_the_torch_head_mean(dtype, shape):
    """Equal up to the rounding of a rare logit to the other side of a half-precision
    step (the GEMMs sum in different orders): a few ulp of the dtype, relatively."""
    q, k = qk(*shape, dtype)
    assert attention_kernel.supports(q)
    attention = standard_attention(q, k)
    expected = torch_path(q, k)
    assert attention.dtype == torch.float32 and attention.shape == expected.shape
    ulp = torch.finfo(dtype).eps
    assert torch.allclose(attention, expected, rtol=8 * ulp, atol=1e-7)
    assert (attention - expected).abs().mean() < 1e-3 * ulp  # flips are rare
    assert torch.allclose(attention.sum(-1), torch.ones(()), atol=1e-5)
    assert torch.equal(attention, standard_attention(q, k))  # deterministic


def test_nan_query_gives_a_nan_row_as_torch():
    q, k = qk(2, 3, 40, 16, torch.float16)
    q = q.clone()
    q[1, 2, 7, 3] = float('nan')
    attention = standard_attention(q, k)
    assert torch.equal(attention.isnan(), torch_path(q, k).isnan())
    assert attention[1, 7].isnan().all() and attention.isnan().sum() == 40


@pytest.mark.parametrize('shape, dtype', [((1, 2, 257, 16), torch.float16),
                                          ((1, 2, 20, 24), torch.float16),
                                          ((1, 2, 20, 16), torch.float32)])
def test_other_shapes_and_dtypes_run_the_torch_code(shape, dtype):
    q, k = qk(*shape, dtype)
    assert not attention_kernel.supports(q)
    assert torch.equal(standard_attention(q, k), torch_path(q, k))


def test_crops_beyond_one_launch_grid(monkeypatch):
    """More crops than a launch's grid axis holds go in several launches, same result."""
    q, k = qk(5, 12, 197, 64, torch.float16)
    whole = standard_attention(q, k)
    monkeypatch.setattr(attention_kernel, 'MAX_GRID_CROPS', 2)
    assert torch.equal(standard_attention(q, k), whole)
