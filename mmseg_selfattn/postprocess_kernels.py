"""Triton kernels of the per-pixel post-processing on GPU (``postprocess.py`` dispatches).

In plain torch, query logits (n, Q, H, W) -> class probabilities, labels and unsure
pixels is a dozen full-resolution passes (synonym gather and max, scale, a strided
softmax over the class axis, argmax, a log-sum-exp over the queries for ``prob_thd``),
and the class areas of ``area_thd`` compare every label with every class. At VOC size
that was a sixth of the pipeline's GPU time on an H200. Here one kernel reads the query
logits (a second time for ``prob_thd``, from L2) and writes the probabilities, labels
and unsure flags, and one more reads the labels once to count the class areas (integer
atomics: deterministic).

Same formulas as ``postprocess.pixel_predictions`` (tested against it on GPU):

    m_c    = max_{q in c} l_q                 (synonym max)
    p_c    = softmax_c(s m_c)                 (class probabilities)
    label  = argmax_c p_c                     (first of equal maxima)
    unsure = max_q softmax_q(s l)_q < prob_thd, where max_q softmax_q(s l)_q = 1 / z,
             z = sum_q exp(s (l_q - max_q l_q))

NaN logits give NaN probabilities, as in torch. Only CUDA tensors; without Triton
(CPU-only installs) ``AVAILABLE`` is False and the torch code runs.
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
    def _pixel_predictions_kernel(logits_ptr, synonyms_ptr, probs_ptr, labels_ptr, unsure_ptr,
                                  pixels, num_queries, num_classes, max_synonyms, scale,
                                  prob_thd, CLASSES: tl.constexpr, QUERIES: tl.constexpr,
                                  BLOCK: tl.constexpr, PROB_THD: tl.constexpr):
        image = tl.program_id(1).to(tl.int64)
        pixel = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        in_image = pixel < pixels
        classes = tl.arange(0, CLASSES)
        is_class = classes < num_classes
        logits_ptr += image * num_queries * pixels
        # synonym max: the slot-th synonym of every class at once (no exp in this loop)
        class_max = tl.full((CLASSES, BLOCK), float('-inf'), tl.float32)
        for slot in range(max_synonyms):
            query = tl.load(synonyms_ptr + slot * num_classes + classes, mask=is_class, other=-1)
            values = tl.load(logits_ptr + query.to(tl.int64)[:, None] * pixels + pixel[None, :],
                             mask=(query >= 0)[:, None] & in_image[None, :],
                             other=float('-inf'))
            class_max = tl.maximum(class_max, values, propagate_nan=tl.PropagateNan.ALL)
        class_max = tl.where(in_image[None, :], class_max, 0.0)  # lanes past the image
        class_max = tl.where(is_class[:, None], class_max, float('-inf'))  # padding rows
        best = tl.max(class_max, axis=0)
        weights = tl.exp(scale * (class_max - best[None, :]))  # padding rows: 0
        probs = weights / tl.sum(weights, axis=0)[None, :]
        label = tl.argmax(tl.where(is_class[:, None], probs, -1.0), axis=0, tie_break_left=True)
        tl.store(probs_ptr + image * num_classes * pixels + classes[:, None] * pixels
                 + pixel[None, :], probs, mask=is_class[:, None] & in_image[None, :])
        tl.store(labels_ptr + image * pixels + pixel, label.to(tl.int64), mask=in_image)
        if PROB_THD:  # z = sum over all queries of exp(s (l_q - max_q l_q)); best prob = 1 / z
            exp_sum = tl.zeros((BLOCK, ), tl.float32)
            for start in range(0, num_queries, QUERIES):
                rows = start + tl.arange(0, QUERIES)
                values = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * pixels
                                 + pixel[None, :],
                                 mask=(rows < num_queries)[:, None] & in_image[None, :],
                                 other=float('-inf'))
                exp_sum += tl.sum(tl.exp(scale * (values - best[None, :])), axis=0)
            tl.store(unsure_ptr + image * pixels + pixel, exp_sum * prob_thd > 1, mask=in_image)

    @triton.jit
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


# pixel_predictions tiles: (classes, pixels) values per program, and its warps
TILE, WARPS = 2048, 4  # fastest of 2048-16384 x 4-8 warps on an H200 (VOC21, ADE20K)


def _class_tile(num_classes: int, tile: int) -> Tuple[int, int]:
    """(classes padded to a power of 2, pixels per program): tiles of about ``tile``."""
    classes = triton.next_power_of_2(max(num_classes, 2))
    return classes, max(16, min(1024, tile // classes))


def pixel_predictions(query_logits: Tensor, synonym_table: Tensor, num_classes: int,
                      logit_scale: float, prob_thd: float = 0.0
                      ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``postprocess.pixel_predictions`` in one pass over the query logits.

    Args:
        query_logits: (n, Q, H, W) float32 CUDA.
        synonym_table: (S, C) int32: the s-th query of each class, -1 past its last.
    """
    logits = query_logits.float().contiguous()
    n, _, height, width = logits.shape
    pixels = height * width
    probs = logits.new_empty((n, num_classes, height, width))
    labels = torch.empty((n, height, width), dtype=torch.long, device=logits.device)
    unsure = (torch.empty((n, height, width), dtype=torch.bool, device=logits.device)
              if prob_thd > 0 else None)
    classes, block = _class_tile(num_classes, TILE)
    grid = (triton.cdiv(pixels, block), n)
    _pixel_predictions_kernel[grid](
        logits, synonym_table, probs, labels, labels if unsure is None else unsure, pixels,
        logits.shape[1], num_classes, synonym_table.shape[0], float(logit_scale),
        float(prob_thd), CLASSES=classes, QUERIES=max(1, TILE // block), BLOCK=block,
        PROB_THD=prob_thd > 0, num_warps=WARPS)
    return probs, labels, unsure


def class_areas(labels: Tensor, num_classes: int) -> Tensor:
    """(n, C) int32 pixel count of every class in each image's labels (n, H, W)."""
    flat = labels.flatten(1).contiguous()
    areas = torch.zeros((flat.shape[0], num_classes), dtype=torch.int32, device=labels.device)
    classes, block = _class_tile(num_classes, 16384)
    _class_areas_kernel[(triton.cdiv(flat.shape[1], block), flat.shape[0])](
        flat, areas, flat.shape[1], num_classes, CLASSES=classes, BLOCK=block)
    return areas

