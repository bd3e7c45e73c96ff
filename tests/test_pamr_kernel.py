"""The Triton PAMR step (GPU) against the torch loop it replaces."""
import pytest
import torch

from mmseg_selfattn import pamr_kernel
from mmseg_selfattn.pamr import pamr

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and pamr_kernel.AVAILABLE),
    reason='the kernel runs on CUDA with Triton')


def torch_loop(*args, **kwargs):
    pamr_kernel.ENABLED = False
    try:
        return pamr(*args, **kwargs)
    finally:
        pamr_kernel.ENABLED = True


def inputs(batch, classes, size, mask_size, dtype, seed=0):
    generator = torch.Generator(device='cuda').manual_seed(seed)
    image = torch.randn(batch, 3, *size, device='cuda', generator=generator)
    masks = torch.randn(batch, classes, *mask_size, device='cuda', generator=generator)
    return image, masks.to(dtype)


@pytest.mark.parametrize('dilations', [(1, ), (8, 16), (1, 2, 3)])  # P = 8, 16, 24
@pytest.mark.parametrize('shape', [(2, 21, (75, 101), (19, 26)), (1, 3, (5, 9), (2, 3)),
                                   (3, 1, (40, 33), (40, 33))])
def test_fp32_kernel_equals_the_torch_loop(dilations, shape):
    image, masks = inputs(*shape, torch.float32)
    assert pamr_kernel.supports(masks)
    refined = pamr(image, masks, 10, dilations)
    torch.testing.assert_close(refined, torch_loop(image, masks, 10, dilations),
                               atol=2e-6, rtol=1e-5)
    assert refined.dtype == masks.dtype and refined.shape[-2:] == image.shape[-2:]


def test_fp16_kernel_is_at_least_as_accurate_as_the_fp16_torch_loop():
    image, masks = inputs(2, 21, (96, 128), (24, 32), torch.float16)
    exact = torch_loop(image, masks.float(), 10, (8, 16))  # the same inputs, fp32 steps
    kernel = pamr(image, masks, 10, (8, 16))
    loop = torch_loop(image, masks, 10, (8, 16))
    assert kernel.dtype == torch.float16
    # both start from the same fp16 resize; the kernel rounds once per step
    kernel_error = (kernel.float() - exact).abs()
    assert kernel_error.mean() <= (loop.float() - exact).abs().mean()
    assert kernel_error.max() < 2e-2  # a wrong neighbour or weight errs by O(1)


def test_kernel_inside_a_cuda_graph_equals_eager():
    image, masks = inputs(2, 5, (33, 47), (9, 12), torch.float32, seed=1)
    eager = pamr(image, masks, 3, (1, 2))
    static_image, static_masks = image.clone(), masks.clone()
    pamr(static_image, static_masks, 3, (1, 2))  # warm-up: compiles, makes the tables
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = pamr(static_image, static_masks, 3, (1, 2))
    static_masks.copy_(2 * masks)
    graph.replay()
    torch.testing.assert_close(static_out, pamr(image, 2 * masks, 3, (1, 2)))
    static_masks.copy_(masks)
    graph.replay()
    assert torch.equal(static_out, eager)


def test_bad_affinity_shape_is_refused():
    masks = torch.zeros(1, 2, 4, 4, device='cuda')
    with pytest.raises(ValueError, match='affinity'):
        pamr_kernel.pamr_step(masks, torch.zeros(1, 7, 4, 4, device='cuda'), [(0, 1)] * 8)
