"""Sliding-window inference: window placement and the recomposition of crop logits.

The published methods upsample every crop's patch-grid logits bilinearly to the crop,
add them into the image, divide by the number of windows covering each pixel and
resize to the original image (``published_slide_inference``, kept for the reference
loop). Every one of those steps is linear and separable along rows and columns, so
``WindowMerge`` does them all at once: with the windows' patch logits laid out as a
mosaic M (window rows x window columns), Y = R (M C^T) with fixed matrices R and C, i.e.
two plain matrix products from the patch logits to the output. Each output row mixes only
a few rows of M C^T (bilinear taps), so on GPU the post-processing kernel applies R
itself (``row_taps``) and the full-resolution query logits are never written.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .config_checks import check_int


def sliding_windows(height: int, width: int, crop: int,
                    stride: int) -> List[Tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of every window, as mmseg/SCLIP place them; all of one size,
    shrunk to the image where it is smaller than the crop. ``crop=0``: the whole image."""
    if crop == 0:
        return [(0, height, 0, width)]
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    windows = []
    for row in range(rows):
        for col in range(cols):
            y2, x2 = min(row * stride + crop, height), min(col * stride + crop, width)
            windows.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return windows


def pad_to_patch_multiple(crops: Tensor, patch_size: Tuple[int, int]):
    """Zero-pad (B, C, H, W) evenly on both sides to multiples of the patch size;
    returns the padded crops and the (left, top) offsets."""
    height, width = crops.shape[-2:]
    pad_h, pad_w = -height % patch_size[0], -width % patch_size[1]
    left, top = pad_w // 2, pad_h // 2
    if pad_h or pad_w:
        crops = F.pad(crops, (left, pad_w - left, top, pad_h - top))
    return crops, (left, top)


def linear_resize_matrix(size_in: int, size_out: int, device=None) -> Tensor:
    """(size_out, size_in): 1-D linear interpolation exactly as ``F.interpolate``
    (align_corners=False) computes it; bilinear resizing of X is M_rows X M_cols^T."""
    eye = torch.eye(size_in, device=device)
    return F.interpolate(eye[:, None], size=size_out, mode='linear', align_corners=False)[:, 0].T


class WindowMerge:
    """Cuts the windows of images of one size and merges their patch logits.

    Windows (``crop > 0``) are zero-padded evenly to multiples of the patch, their logits
    upsampled to the padded crop and the padding cut off, as SCLIP's ``forward_slide``
    does. The whole image (``crop=0``) goes to the ViT as the published code feeds it:
    the patch embedding's stride drops the rows and columns past the last whole patch,
    and the grid's logits are resized straight to the output size (sides shorter than
    one patch are padded to one).

    Args:
        size: (H, W) of the images.
        output_size: (H', W') of the merged logits (e.g. the original image size).
        crop, stride: the sliding window (``crop=0``: whole image).
        patch_size: the ViT's (ph, pw).
    """

    def __init__(self, size: Tuple[int, int], output_size: Tuple[int, int], crop: int,
                 stride: int, patch_size: Tuple[int, int], device=None):
        self.output_size = tuple(output_size)
        self.windows = sliding_windows(*size, crop, stride)
        self.num_windows = len(self.windows)
        self.patch_size = patch_size
        self.whole_image = crop == 0
        y1, y2, x1, x2 = self.windows[0]
        self.crop_size = (y2 - y1, x2 - x1)
        if self.whole_image:  # whole patches only, at least one
            self.grid = tuple(max(1, side // patch)
                              for side, patch in zip(self.crop_size, patch_size))
        else:
            self.grid = tuple(-(-side // patch) for side, patch in zip(self.crop_size,
                                                                     patch_size))
        # (h, w) of the crops ``cut`` returns
        self.cut_size = tuple(cells * patch for cells, patch in zip(self.grid, patch_size))
        # where the patches lie in a window: the padding before the first patch and the
        # window pixels per patch (the whole image's grid is stretched over it)
        self.pad_offset = (0, 0) if self.whole_image else tuple(
            (cut - side) // 2 for cut, side in zip(self.cut_size, self.crop_size))
        self.patch_extent = tuple(side / cells if self.whole_image else float(patch)
                                  for side, cells, patch in zip(self.crop_size, self.grid,
                                                                patch_size))
        # windows form a grid, row-major: window j = (row span r, column span c)
        self.row_spans = list(dict.fromkeys((y1, y2) for y1, y2, _, _ in self.windows))
        self.col_spans = list(dict.fromkeys((x1, x2) for _, _, x1, x2 in self.windows))
        assert self.windows == [(y1, y2, x1, x2) for y1, y2 in self.row_spans
                                for x1, x2 in self.col_spans], 'windows form a grid'
        # (H', rows * h) and (W', cols * w): upsample, place, average, resize
        # built on the CPU and copied: on a GPU, the taps' count would wait for the device
        row_matrix, col_matrix = (
            self._axis_matrix(spans, size[axis], output_size[axis], axis, 'cpu')
            for axis, spans in enumerate((self.row_spans, self.col_spans)))
        self.mosaic_rows = row_matrix.shape[1]
        row_taps = _nonzero_taps(row_matrix)
        self._row_taps_cpu = row_taps[0]  # band spans without a device sync
        self.row_matrix, self.col_matrix, *row_taps = (
            tensor.to(device, non_blocking=True) for tensor in (row_matrix, col_matrix,
                                                                *row_taps))
        self._row_taps = tuple(row_taps)

    def _axis_matrix(self, spans, size, output_size, axis, device) -> Tensor:
        grid = self.grid[axis]
        if self.whole_image:  # the grid's logits straight to the output size
            return linear_resize_matrix(grid, output_size, device)
        length, padded = spans[0][1] - spans[0][0], self.cut_size[axis]
        offset = self.pad_offset[axis]
        upsample = linear_resize_matrix(grid, padded, device)[offset:offset + length]
        coverage = torch.zeros(size, device=device)
        for start, end in spans:
            coverage[start:end] += 1
        blocks = []
        for start, end in spans:
            block = torch.zeros(size, grid, device=device)
            block[start:end] = upsample
            blocks.append(block / coverage[:, None])
        resize = linear_resize_matrix(size, output_size, device)
        return resize @ torch.cat(blocks, dim=1)

    def cut(self, images: Tensor, windows: slice = slice(None)) -> Tensor:
        """(n, 3, H, W) -> crops (n * windows, 3, h, w) of ``cut_size``, image-major;
        ``windows`` picks a range of each image's windows (huge images are cut chunk by
        chunk)."""
        if self.whole_image:  # the stride drops what is past the last whole patch
            crops = images[..., :self.cut_size[0], :self.cut_size[1]]
        else:
            crops = torch.stack([images[..., y1:y2, x1:x2] for y1, y2, x1, x2 in
                                 self.windows[windows]], dim=1).flatten(0, 1)
        return pad_to_patch_multiple(crops, self.patch_size)[0]

    def __call__(self, patch_logits: Tensor, rows: slice = slice(None)) -> Tensor:
        """(n * windows, Q, h, w) patch-grid logits -> (n, Q, H', W') merged logits, or
        only the output ``rows`` (a band of a huge image): Y = R (M C^T).

        Non-finite logits count as 0 here: in a matrix product 0 x NaN is NaN, so one bad
        window would spread over the whole image; ``non_finite_pixels`` marks its own
        pixels instead.
        """
        span = self.mosaic_span(rows)
        return self.row_matrix[rows, span] @ self.columns_merged(patch_logits, rows)

    def columns_merged(self, patch_logits: Tensor, rows: slice = slice(None)) -> Tensor:
        """M C^T (n, Q, mosaic rows, W'), float32: the windows merged along columns, one
        GEMM; only the mosaic rows that the output ``rows`` read (``mosaic_span``)."""
        return self.mosaic(patch_logits)[:, :, self.mosaic_span(rows)] @ self.col_matrix.T

    def row_taps(self, rows: slice = slice(None)) -> Tuple[Tensor, Tensor]:
        """R[rows] as taps: (H' rows, T) int32 rows of ``columns_merged(..., rows)`` and
        their (H' rows, T) float32 weights; output row y = sum_t weight[y, t] * row tap[y, t]
        (a row with fewer taps repeats one with weight 0)."""
        taps, weights = self._row_taps
        return taps[rows] - self.mosaic_span(rows).start, weights[rows]

    def mosaic_span(self, rows: slice = slice(None)) -> slice:
        """The mosaic rows that the output ``rows`` read."""
        taps = self._row_taps_cpu[rows]
        return slice(int(taps.min()), int(taps.max()) + 1) if taps.numel() else slice(0, 0)

    def mosaic(self, patch_logits: Tensor) -> Tensor:
        """(n * windows, Q, h, w) patch logits -> the mosaic M (n, Q, rows * h, cols * w),
        float32, non-finite logits as 0."""
        logits = patch_logits.float().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        logits = logits.unflatten(0, (-1, len(self.row_spans), len(self.col_spans)))
        n, rows, cols, queries, h, w = logits.shape  # (n, r, c, Q, h, w)
        return logits.permute(0, 3, 1, 4, 2, 5).reshape(n, queries, rows * h, cols * w)

    def non_finite_pixels(self, patch_logits: Tensor, rows: slice = slice(None)) -> Tensor:
        """(n, H' rows, W') bool: the output pixels that a window with a non-finite patch
        logit reaches (its own pixels, not the whole image)."""
        bad_windows = ~torch.isfinite(patch_logits).flatten(1).all(dim=1)
        bad_windows = bad_windows.float().view(-1, len(self.row_spans), len(self.col_spans))
        reached = (_reach(self.row_matrix[rows], len(self.row_spans)) @ bad_windows
                   @ _reach(self.col_matrix, len(self.col_spans)).T)
        return reached > 0


def _nonzero_taps(matrix: Tensor) -> Tuple[Tensor, Tensor]:
    """(rows, T) int32 column indices of each row's nonzeros, ascending, and their values,
    T = the most nonzeros of a row; shorter rows repeat their first index with weight 0."""
    nonzero = matrix != 0
    taps = max(1, int(nonzero.sum(dim=1).max()))
    columns = nonzero.int().argsort(dim=1, descending=True, stable=True)[:, :taps]
    is_tap = nonzero.gather(1, columns)
    weights = torch.where(is_tap, matrix.gather(1, columns), 0.0)
    columns = torch.where(is_tap, columns, columns[:, :1])
    return columns.int().contiguous(), weights.contiguous()


def _reach(axis_matrix: Tensor, windows: int) -> Tensor:
    """(outputs, windows) 0/1: whether a window contributes to an output row / column."""
    return (axis_matrix.unflatten(1, (windows, -1)).abs().sum(dim=2) > 0).float()


def published_slide_inference(engine, images: Sequence[Tensor],
                              output_sizes: Optional[Sequence[Tuple[int, int]]] = None
                              ) -> List[Tensor]:
    """SCLIP/NACLIP's ``forward_slide``: one crop at a time, upsample, pad into the image,
    add, divide by the count, resize to the output size; with ``slide_crop=0`` their
    ``forward_feature`` of the whole image: its whole patches, the grid's logits resized
    straight to the output size. ``engine``: an ``ImageEngine`` (its windows and
    pipeline)."""
    pipeline = engine.pipeline
    outputs = []
    for index, image in enumerate(images):
        height, width = image.shape[-2:]
        output_size = (height, width) if output_sizes is None else tuple(output_sizes[index])
        if engine.slide_crop == 0:
            ph, pw = pipeline.encoder.patch_size
            crop = image[None, :, :max(ph, height // ph * ph), :max(pw, width // pw * pw)]
            crop = pad_to_patch_multiple(crop, (ph, pw))[0]
            logits = F.interpolate(pipeline.crop_patch_logits(crop), size=output_size,
                                   mode='bilinear')
            outputs.append(logits[0])
            continue
        summed, count = 0, image.new_zeros((1, height, width))
        for y1, y2, x1, x2 in sliding_windows(height, width, engine.slide_crop,
                                              engine.slide_stride):
            crop, (left, top) = pad_to_patch_multiple(image[None, :, y1:y2, x1:x2],
                                                      pipeline.encoder.patch_size)
            logits = pipeline.crop_logits(crop)[0, :, top:top + y2 - y1, left:left + x2 - x1]
            summed = summed + F.pad(logits, (x1, width - x2, y1, height - y2))
            count[:, y1:y2, x1:x2] += 1
        logits = (summed / count)[None]
        if output_size != (height, width):
            logits = F.interpolate(logits, size=output_size, mode='bilinear')
        outputs.append(logits[0])
    return outputs


def check_window(crop: int, stride: int) -> Tuple[int, int]:
    crop = check_int('slide_crop', crop, 0)
    if crop:
        stride = check_int('slide_stride', stride, 1)
        if stride > crop:
            raise ValueError(f'slide_stride={stride} > slide_crop={crop} leaves pixels '
                             'uncovered; use 0 < slide_stride <= slide_crop.')
    return crop, stride
