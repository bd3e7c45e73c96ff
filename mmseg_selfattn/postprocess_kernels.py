"""Triton kernels of the per-pixel post-processing on GPU (``postprocess.py`` dispatches).

In plain torch, query logits (n, Q, H, W) -> class probabilities, labels and pixel
confidences is a dozen full-resolution passes (synonym gather and max, scale, a strided
softmax over the class axis, argmax, a log-sum-exp over the queries for ``prob_thd``),
and the class areas of ``area_thd`` compare every label with every class. At VOC size
that was a sixth of the pipeline's GPU time on an H200. Here one kernel reads every query
logit once and writes the probabilities, labels and confidences, and one more reads the
labels once to count the class areas (integer atomics: deterministic).

The pixel kernel reads rows of query logits through row taps: output row y is
sum_t weight[y, t] * input row tap[y, t]. With the sliding-window merge's taps its input
is the column-merged mosaic (``WindowMerge.columns_merged``, a few rows per window), so
the merge's last matrix product happens in registers and the full-resolution query
logits (2 GB for 64 VOC images) are never written or read. Plain query logits use the
identity taps.

Same formulas as ``postprocess.pixel_predictions`` (tested against it on GPU):

    m_c    = max_{q in c} l_q                 (synonym max)
    p_c    = softmax_c(s m_c)                 (class probabilities)
    label  = argmax_c p_c                     (first of equal maxima)
    confidence = max_q softmax_q(s l)_q = 1 / z, z = sum_q exp(s (l_q - max_q l_q))
             (accumulated online, one read; only when prob_thd is set)

The first query of every class is read as one (classes, pixels) tile; the other synonyms
a few rows at a time into their class, so skewed synonym counts (VOC's background has
26) cost little padding. NaN logits give NaN probabilities, as in torch. Only CUDA tensors;
without Triton (CPU-only installs) ``AVAILABLE`` is False and the torch code runs.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except ImportError:  # CPU-only installs
    AVAILABLE = False
ENABLED = AVAILABLE  # False: always the torch code (tests compare the two)

if AVAILABLE:

    @triton.jit
    def _tapped_rows(logits_ptr, offsets, mask, taps_ptr, weights_ptr, values, row_length,
                     TAPS: tl.constexpr):
        """values + sum_t weight_t * logits[offsets + tap_t * row_length] (a padding tap
        repeats a row of its output row with weight 0: a cached read)."""
        for t in tl.static_range(TAPS):
            weight = tl.load(weights_ptr + t)
            row = tl.load(taps_ptr + t).to(tl.int64)
            values += weight * tl.load(logits_ptr + offsets + row * row_length,
                                       mask=mask, other=0.0)
        return values

    @triton.jit
    def _max_with_nan(values, axis):
        """tl.max along ``axis``, NaN if any value is NaN (as torch's amax)."""
        nan = tl.max((values != values).to(tl.int32), axis=axis) > 0
        return tl.where(nan, float('nan'), tl.max(values, axis=axis))

    @triton.jit
    def _add_exps(top, exp_sum, values, scale):
        """Online sum_q exp(s (l_q - top)) over the rows of ``values`` (-inf rows add 0):
        the new top (running max) and sum."""
        new_top = tl.maximum(top, tl.max(values, axis=0))
        exp_sum = (exp_sum * tl.exp(scale * (top - new_top))
                   + tl.sum(tl.exp(scale * (values - new_top[None, :])), axis=0))
        return new_top, exp_sum

    # sizes are not specialised (Triton would compile again for each combination of
    # sizes divisible by 16 or not: seconds per new image size of a dataset)
    @triton.jit(do_not_specialize=['height', 'width', 'input_rows', 'num_queries',
                                   'num_classes', 'num_groups'])
    def _pixel_predictions_kernel(logits_ptr, taps_ptr, weights_ptr, first_ptr, groups_ptr,
                                  extras_ptr, probs_ptr, labels_ptr, confidence_ptr, height,
                                  width, input_rows, num_queries, num_classes, num_groups,
                                  scale, CLASSES: tl.constexpr, EXTRAS: tl.constexpr,
                                  TAPS: tl.constexpr, BLOCK: tl.constexpr,
                                  PROB_THD: tl.constexpr):
        blocks_per_row = tl.cdiv(width, BLOCK)
        row = tl.program_id(0) // blocks_per_row
        column = (tl.program_id(0) % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
        in_row = column < width
        image = tl.program_id(1).to(tl.int64)
        query_stride = (tl.zeros((), tl.int64) + input_rows) * width  # args of 1 are constexpr
        logits_ptr += image * num_queries * query_stride
        taps_ptr += row * TAPS
        weights_ptr += row * TAPS
        classes = tl.arange(0, CLASSES)
        is_class = classes < num_classes
        # the first query of every class: one (classes, pixels) tile
        first = tl.load(first_ptr + classes, mask=is_class, other=0).to(tl.int64)
        class_max = _tapped_rows(logits_ptr, first[:, None] * query_stride + column[None, :],
                                 is_class[:, None] & in_row[None, :], taps_ptr, weights_ptr,
                                 tl.zeros((CLASSES, BLOCK), tl.float32), width, TAPS)
        class_max = tl.where(is_class[:, None], class_max, float('-inf'))  # padding rows
        if PROB_THD:  # z = sum_q exp(s (l_q - top)), top = max_q l_q: online, one read
            top = tl.max(class_max, axis=0)
            exp_sum = tl.sum(tl.exp(scale * (class_max - top[None, :])), axis=0)
        # the other synonyms of each class that has more, EXTRAS rows at a time
        for group in range(num_groups):
            cls = tl.load(groups_ptr + 3 * group)
            end = tl.load(groups_ptr + 3 * group + 2)
            synonym_max = tl.full((BLOCK, ), float('-inf'), tl.float32)
            for start in range(tl.load(groups_ptr + 3 * group + 1), end, EXTRAS):
                extra = start + tl.arange(0, EXTRAS)
                is_extra = extra < end
                query = tl.load(extras_ptr + extra, mask=is_extra, other=0).to(tl.int64)
                values = _tapped_rows(logits_ptr, query[:, None] * query_stride + column[None, :],
                                      is_extra[:, None] & in_row[None, :], taps_ptr, weights_ptr,
                                      tl.zeros((EXTRAS, BLOCK), tl.float32), width, TAPS)
                values = tl.where(is_extra[:, None], values, float('-inf'))
                synonym_max = tl.maximum(synonym_max, _max_with_nan(values, 0),
                                         propagate_nan=tl.PropagateNan.ALL)
                if PROB_THD:
                    top, exp_sum = _add_exps(top, exp_sum, values, scale)
            class_max = tl.where(classes[:, None] == cls,
                                 tl.maximum(class_max, synonym_max[None, :],
                                            propagate_nan=tl.PropagateNan.ALL), class_max)
        best = tl.max(class_max, axis=0)
        weights = tl.exp(scale * (class_max - best[None, :]))  # padding rows: 0
        probs = weights / tl.sum(weights, axis=0)[None, :]
        label = tl.argmax(tl.where(is_class[:, None], probs, -1.0), axis=0, tie_break_left=True)
        pixel = row * width + column
        pixels = (tl.zeros((), tl.int64) + height) * width
        tl.store(probs_ptr + image * num_classes * pixels + classes[:, None] * pixels
                 + pixel[None, :], probs, mask=is_class[:, None] & in_row[None, :])
        tl.store(labels_ptr + image * pixels + pixel, label.to(tl.int64), mask=in_row)
        if PROB_THD:  # best query probability 1 / z
            tl.store(confidence_ptr + image * pixels + pixel, 1.0 / exp_sum, mask=in_row)

    @triton.jit(do_not_specialize=['pixels', 'num_classes'])
    def _class_areas_kernel(labels_ptr, areas_ptr, pixels, num_classes, CLASSES: tl.constexpr,
                            BLOCK: tl.constexpr):
        image = tl.program_id(1).to(tl.int64)
        pixel = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        label = tl.load(labels_ptr + image * pixels + pixel, mask=pixel < pixels, other=-1)
        classes = tl.arange(0, CLASSES)
        counts = tl.sum((classes[:, None] == label[None, :]).to(tl.int32), axis=1)
        tl.atomic_add(areas_ptr + image * num_classes + classes, counts,
                      mask=(classes < num_classes) & (counts > 0))


def supports(tensor: Tensor) -> bool:
    """Whether the kernels run on this tensor's device."""
    return ENABLED and tensor.is_cuda


# pixel_predictions: (classes, pixels) values per program, values per warp (the warps
# follow the tile: VOC21 runs 1, ADE20K 4), and the extra synonyms read at once. Fastest
# of tiles 512-4096 x 1-4 warps x 4-32 extras on an H200 (64 VOC-size images, VOC21 and
# ADE20K classes, with and without prob_thd).
TILE, VALUES_PER_WARP, EXTRAS = 1024, 1024, 8


def _class_tile(num_classes: int, tile: int) -> Tuple[int, int]:
    """(classes padded to a power of 2, pixels per program): tiles of about ``tile``."""
    classes = triton.next_power_of_2(max(num_classes, 2))
    return classes, max(16, min(1024, tile // classes))


def pixel_predictions(query_logits: Tensor, synonym_max, logit_scale: float,
                      prob_thd: float = 0.0, row_taps: Optional[Tuple[Tensor, Tensor]] = None
                      ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``postprocess.pixel_predictions`` in one pass over the query logits.

    Args:
        query_logits: (n, Q, K, W) CUDA rows of query logits (float32 is read as is).
        synonym_max: the ``postprocess.SynonymMax`` of the queries.
        row_taps: (H, T) int32 input rows and (H, T) float32 weights of each output row
            (``WindowMerge.row_taps``); None: output row y is input row y.

    Returns:
        probs (n, C, H, W) float32, labels (n, H, W) long, confidence (n, H, W) float32
        (the best query probability) when ``prob_thd`` > 0, else None.
    """
    logits = query_logits.float().contiguous()
    n, num_queries, input_rows, width = logits.shape
    if row_taps is None:
        row_taps = (torch.arange(input_rows, dtype=torch.int32, device=logits.device)[:, None],
                    torch.ones((input_rows, 1), device=logits.device))
    taps, weights = (tensor.contiguous() for tensor in row_taps)
    height, num_classes = taps.shape[0], synonym_max.num_classes
    probs = logits.new_empty((n, num_classes, height, width))
    labels = torch.empty((n, height, width), dtype=torch.long, device=logits.device)
    confidence = (logits.new_empty((n, height, width)) if prob_thd > 0 else None)
    classes, block = _class_tile(num_classes, TILE)
    block = min(block, max(16, triton.next_power_of_2(width)))
    first, groups, extras = synonym_max.kernel_tables(logits.device)
    _pixel_predictions_kernel[(height * triton.cdiv(width, block), n)](
        logits, taps, weights, first, groups, extras, probs, labels,
        probs if confidence is None else confidence, height, width, input_rows, num_queries,
        num_classes, synonym_max.num_groups, float(logit_scale),
        CLASSES=classes, EXTRAS=min(EXTRAS, classes), TAPS=taps.shape[1], BLOCK=block,
        PROB_THD=prob_thd > 0, num_warps=max(1, classes * block // VALUES_PER_WARP))
    return probs, labels, confidence


def class_areas(labels: Tensor, num_classes: int) -> Tensor:
    """(n, C) int32 pixel count of every class in each image's labels (n, H, W)."""
    flat = labels.flatten(1).contiguous()
    areas = torch.zeros((flat.shape[0], num_classes), dtype=torch.int32, device=labels.device)
    classes, block = _class_tile(num_classes, 16384)
    _class_areas_kernel[(triton.cdiv(flat.shape[1], block), flat.shape[0])](
        flat, areas, flat.shape[1], num_classes, CLASSES=classes, BLOCK=block)
    return areas

