"""PAMR: match a kernel-based re-implementation of the published code and
check the behaviour on constant, edge and degenerate inputs."""
import pytest
import torch
import torch.nn.functional as F

from mmseg_selfattn.pamr import PAMR, pixel_affinity

# 3x3 positions of the 8 neighbours, row-major without the centre
NEIGHBOURS = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]


def one_hot_kernels(positions, centre=0.0, dtype=torch.float32):
    kernel = torch.zeros(len(positions), 1, 3, 3, dtype=dtype)
    for i, (r, c) in enumerate(positions):
        kernel[i, 0, 1, 1] = centre
        kernel[i, 0, r, c] += 1.0
    return kernel


def local_conv(x, kernel, dilations):
    """(B, K, H, W) -> (B, K, P, H, W), as the published LocalAffinity."""
    kernel = kernel.to(x.dtype)
    b, k, h, w = x.shape
    x = x.reshape(b * k, 1, h, w)
    out = [
        F.conv2d(F.pad(x, [d] * 4, mode='replicate'), kernel, dilation=d)
        for d in dilations
    ]
    return torch.cat(out, 1).reshape(b, k, -1, h, w)


def reference_pamr(image, masks, num_iter, dilations):
    """Straightforward transcription of the published PAMR."""
    masks = F.interpolate(
        masks, size=image.shape[-2:], mode='bilinear', align_corners=True)
    diff = local_conv(image, -one_hot_kernels(NEIGHBOURS, centre=-1.0),
                      dilations)  # centre +1, neighbour -1
    all_nine = [(r, c) for r in range(3) for c in range(3)]
    std = local_conv(image, one_hot_kernels(all_nine), dilations).std(
        2, keepdim=True)
    affinity = F.softmax((-diff.abs() / (1e-8 + 0.1 * std)).mean(
        1, keepdim=True), 2)
    for _ in range(num_iter):
        masks = (local_conv(masks, one_hot_kernels(NEIGHBOURS), dilations) *
                 affinity).sum(2)
    return masks


def test_reference_kernels_are_the_published_ones():
    diff = -one_hot_kernels(NEIGHBOURS, centre=-1.0)
    assert torch.all(diff[:, 0, 1, 1] == 1)
    assert torch.all(diff.sum((1, 2, 3)) == 0)
    assert diff[0, 0, 0, 0] == -1 and diff[7, 0, 2, 2] == -1


# fp64 checks the math; fp32 only differs by summation order (10 steps of
# 32-term sums drift a few ulp, hence the small rtol)
@pytest.mark.parametrize('dtype,atol,rtol', [(torch.float32, 1e-6, 1e-5),
                                             (torch.float64, 1e-12, 0)])
@pytest.mark.parametrize('num_iter,dilations', [(1, (1, )), (3, (1, 2)),
                                                (10, (2, 4, 8, 12))])
def test_matches_reference(num_iter, dilations, dtype, atol, rtol):
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 37, 29, generator=gen, dtype=dtype)
    masks = torch.randn(2, 5, 10, 8, generator=gen, dtype=dtype)
    out = PAMR(num_iter, dilations)(image, masks)
    ref = reference_pamr(image, masks, num_iter, dilations)
    assert out.shape == (2, 5, 37, 29) and out.dtype == dtype
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


def test_dilation_larger_than_image_and_int_dilation():
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 6, 5, generator=gen)
    masks = torch.rand(1, 2, 3, 3, generator=gen)
    out = PAMR(2, 8)(image, masks)
    torch.testing.assert_close(
        out, reference_pamr(image, masks, 2, (8, )), atol=1e-6, rtol=0)


def test_constant_image_gives_uniform_affinity_and_no_nan():
    image = torch.full((1, 3, 16, 16), 0.7)
    affinity = pixel_affinity(image, (1, 2))
    torch.testing.assert_close(affinity, torch.full_like(affinity, 1 / 16))
    masks = torch.rand(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    out = PAMR(1, (1, ))(image, masks)
    assert torch.isfinite(out).all()
    # refinement = plain mean of the 8 replicate-padded neighbours
    padded = F.pad(masks, [1] * 4, mode='replicate')
    box = F.avg_pool2d(padded, 3, stride=1) * 9
    torch.testing.assert_close(out, (box - masks) / 8)


def test_constant_image_half_precision_has_no_nan():
    image = torch.zeros(1, 3, 8, 8, dtype=torch.float16)
    masks = torch.rand(1, 2, 4, 4).half()
    out = PAMR(3, (1, 2))(image, masks)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_constant_masks_stay_constant():
    image = torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(3))
    masks = torch.ones(2, 3, 5, 6) * torch.tensor([0.2, -1.0, 3.0]).view(
        1, 3, 1, 1)
    out = PAMR(5, (1, 2, 4))(image, masks)
    expected = masks[..., :1, :1].expand(2, 3, 20, 24)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_sharp_edge_blocks_bleeding_but_smooths_unsupported_mask():
    height, width, edge = 24, 24, 12
    image = torch.zeros(1, 3, height, width)
    image[..., edge:] = 1.0  # vertical edge between columns 11 and 12
    aligned = torch.zeros(1, 1, height, width)
    aligned[..., edge:] = 1.0
    out = PAMR(10, (1, 2))(image, aligned)
    assert out[..., :edge].max() < 1e-3  # left side stays ~0
    assert out[..., edge:].min() > 1 - 1e-3  # right side stays ~1

    # a horizontal mask edge has no support in the image: it gets smoothed
    unsupported = torch.zeros(1, 1, height, width)
    unsupported[..., edge:, :] = 1.0
    out = PAMR(10, (1, 2))(image, unsupported)
    assert out[..., edge - 1, :].min() > 0.2
    assert out[..., edge, :].max() < 0.8


def test_num_iter_zero_returns_resized_masks():
    image = torch.rand(1, 3, 17, 13)
    masks = torch.rand(1, 4, 5, 4)
    out = PAMR(0)(image, masks)
    expected = F.interpolate(
        masks, size=(17, 13), mode='bilinear', align_corners=True)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_deterministic_and_parameter_free():
    module = PAMR(2, (1, 3))
    assert not list(module.parameters())
    image = torch.rand(1, 3, 15, 15)
    masks = torch.rand(1, 3, 7, 7)
    assert torch.equal(module(image, masks), module(image, masks))


@pytest.mark.parametrize('num_iter,dilations', [(-1, (1, )), (1, ()),
                                                (1, (0, ))])
def test_rejects_bad_config(num_iter, dilations):
    with pytest.raises(ValueError):
        PAMR(num_iter, dilations)
