"""WindowMerge (two matrix products) equals upsample-pad-add-divide-resize done directly."""
import pytest
import torch
import torch.nn.functional as F

from mmseg_selfattn.sliding_window import (WindowMerge, linear_resize_matrix,
                                           pad_to_patch_multiple, sliding_windows)


def direct_merge(patch_logits, size, output_size, crop, stride, patch):
    """The published recomposition, written out."""
    height, width = size
    windows = sliding_windows(height, width, crop, stride)
    summed = torch.zeros(patch_logits.shape[1], height, width, dtype=torch.float64)
    count = torch.zeros(1, height, width, dtype=torch.float64)
    for logits, (y1, y2, x1, x2) in zip(patch_logits.double(), windows):
        padded, (left, top) = pad_to_patch_multiple(torch.zeros(1, 1, y2 - y1, x2 - x1), patch)
        upsampled = F.interpolate(logits[None], size=padded.shape[-2:], mode='bilinear')[0]
        summed[:, y1:y2, x1:x2] += upsampled[:, top:top + y2 - y1, left:left + x2 - x1]
        count[:, y1:y2, x1:x2] += 1
    return F.interpolate((summed / count)[None], size=output_size, mode='bilinear')[0]


@pytest.mark.parametrize('size, output_size, crop, stride', [
    ((50, 70), (50, 70), 32, 16),  # overlapping grid, no resize
    ((50, 70), (75, 105), 32, 16),  # resized up to the original image
    ((50, 70), (31, 44), 32, 24),  # resized down, uneven overlap
    ((20, 13), (40, 26), 32, 16),  # smaller than a crop: one padded window
    ((24, 40), (24, 40), 0, 16),  # whole image
])
def test_window_merge_equals_direct_recomposition(size, output_size, crop, stride):
    patch = (8, 8)
    merge = WindowMerge(size, output_size, crop, stride, patch)
    generator = torch.Generator().manual_seed(0)
    patch_logits = torch.randn(2 * merge.num_windows, 5, *merge.grid, generator=generator)
    merged = merge(patch_logits)
    assert merged.shape == (2, 5, *output_size)
    for image in range(2):
        own = patch_logits[image * merge.num_windows:(image + 1) * merge.num_windows]
        expected = direct_merge(own, size, output_size, crop, stride, patch)
        torch.testing.assert_close(merged[image].double(), expected, atol=1e-5, rtol=0)


def test_cut_orders_crops_image_major():
    images = torch.arange(2 * 3 * 40 * 40, dtype=torch.float32).view(2, 3, 40, 40)
    merge = WindowMerge((40, 40), (40, 40), 32, 16, (8, 8))
    crops = merge.cut(images)
    assert crops.shape == (2 * merge.num_windows, 3, 32, 32)
    y1, y2, x1, x2 = merge.windows[1]
    assert torch.equal(crops[merge.num_windows + 1], images[1, :, y1:y2, x1:x2])


def test_linear_resize_matrix_is_bilinear():
    x = torch.randn(1, 1, 6, 9)
    rows, cols = linear_resize_matrix(6, 17), linear_resize_matrix(9, 4)
    torch.testing.assert_close(rows @ x[0, 0] @ cols.T,
                               F.interpolate(x, size=(17, 4), mode='bilinear')[0, 0],
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize('size, output_size, crop, stride', [
    ((50, 70), (50, 70), 32, 16),
    ((50, 70), (75, 105), 32, 16),
    ((50, 70), (31, 44), 32, 24),
    ((24, 40), (24, 40), 0, 16),
])
@pytest.mark.parametrize('rows', [slice(None), slice(0, 1), slice(7, 23), slice(20, None)])
def test_row_taps_of_the_column_merged_mosaic_give_the_merge(size, output_size, crop, stride,
                                                             rows):
    """Output row y = sum_t weight[y, t] * columns_merged[tap[y, t]] (what the GPU kernel
    computes) for every output band, and the taps hold every nonzero of R."""
    merge = WindowMerge(size, output_size, crop, stride, (8, 8))
    patch_logits = torch.randn(2 * merge.num_windows, 3, *merge.grid,
                               generator=torch.Generator().manual_seed(1))
    columns = merge.columns_merged(patch_logits, rows)
    taps, weights = merge.row_taps(rows)
    assert taps.dtype == torch.int32 and taps.shape == weights.shape
    assert 0 <= taps.min() and taps.max() < columns.shape[2] <= merge.mosaic_rows
    tapped = (columns[:, :, taps.long()] * weights[:, :, None]).sum(dim=3)
    expected = merge(patch_logits, rows)
    assert tapped.shape == expected.shape == (2, 3, *torch.empty(output_size)[rows].shape)
    torch.testing.assert_close(tapped, expected, atol=1e-6, rtol=0)
    nonzeros = (merge.row_matrix[rows] != 0).sum(dim=1)
    assert torch.equal((weights != 0).sum(dim=1), nonzeros)
