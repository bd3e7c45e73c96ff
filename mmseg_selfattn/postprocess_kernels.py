"""Triton kernels of the per-pixel post-processing on GPU (``postprocess.py`` dispatches).

In plain torch, query logits (n, Q, H, W) -> class probabilities, labels and unsure
pixels is a dozen full-resolution passes (synonym gather and max, scale, a strided
softmax over the class axis, argmax, a log-sum-exp over the queries for ``prob_thd``),
and the class areas of ``area_thd`` compare every label with every class. At VOC size
that was a quarter of the pipeline's GPU time. Here one kernel reads each query logit
once and writes the probabilities, labels and unsure flags, and one more reads the
labels once to count the class areas (integer atomics: deterministic).

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
                                  prob_thd, CLASSES: tl.constexpr, BLOCK: tl.constexpr,
                                  PROB_THD: tl.constexpr):
        image = tl.program_id(1).to(tl.int64)
        pixel = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        in_image = pixel < pixels
        classes = tl.arange(0, CLASSES)
        is_class = classes < num_classes
        logits_ptr += image * num_queries * pixels
        class_max = tl.full((CLASSES, BLOCK), float('-inf'), tl.float32)
        running_max = tl.full((BLOCK, ), float('-inf'), tl.float32)
        exp_sum = tl.zeros((BLOCK, ), tl.float32)
        for slot in range(max_synonyms):  # the slot-th synonym of every class
            query = tl.load(synonyms_ptr + slot * num_classes + classes, mask=is_class, other=-1)
            present = (query >= 0)[:, None] & in_image[None, :]
            values = tl.load(logits_ptr + query.to(tl.int64)[:, None] * pixels + pixel[None, :],
                             mask=present, other=float('-inf'))
            class_max = tl.maximum(class_max, values, propagate_nan=tl.PropagateNan.ALL)
            if PROB_THD:  # online sum of exp(s (l_q - max so far)) over all queries
                new_max = tl.maximum(running_max, tl.max(values, axis=0))
                new_max = tl.where(new_max == float('-inf'), 0.0, new_max)  # no query yet
                exp_sum = (exp_sum * tl.exp(scale * (running_max - new_max))
                           + tl.sum(tl.where(present, tl.exp(scale * (values - new_max[None, :])),
                                             0.0), axis=0))
                running_max = new_max
        class_max = tl.where(in_image[None, :], class_max, 0.0)  # lanes past the image
        best = tl.max(tl.where(is_class[:, None], class_max, float('-inf')), axis=0)
        weights = tl.where(is_class[:, None], tl.exp(scale * (class_max - best[None, :])), 0.0)
        probs = weights / tl.sum(weights, axis=0)[None, :]
        probs = tl.where(is_class[:, None], probs, float('-inf'))
        label = tl.argmax(probs, axis=0, tie_break_left=True)
        image_probs = probs_ptr + image * num_classes * pixels
        tl.store(image_probs + classes[:, None] * pixels + pixel[None, :], probs,
                 mask=is_class[:, None] & in_image[None, :])
        tl.store(labels_ptr + image * pixels + pixel, label.to(tl.int64), mask=in_image)
        if PROB_THD:
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


def _class_tile(num_classes: int) -> Tuple[int, int]:
    """(classes padded to a power of 2, pixels per program): tiles of <= 4096 values."""
    classes = triton.next_power_of_2(max(num_classes, 2))
    return classes, max(16, min(256, 4096 // classes))


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
    classes, block = _class_tile(num_classes)
    grid = (triton.cdiv(pixels, block), n)
    _pixel_predictions_kernel[grid](
        logits, synonym_table, probs, labels, labels if unsure is None else unsure, pixels,
        logits.shape[1], num_classes, synonym_table.shape[0], float(logit_scale),
        float(prob_thd), CLASSES=classes, BLOCK=block, PROB_THD=prob_thd > 0)
    return probs, labels, unsure


def class_areas(labels: Tensor, num_classes: int) -> Tensor:
    """(n, C) int32 pixel count of every class in each image's labels (n, H, W)."""
    flat = labels.flatten(1).contiguous()
    areas = torch.zeros((flat.shape[0], num_classes), dtype=torch.int32, device=labels.device)
    classes, _ = _class_tile(num_classes)
    block = max(16, min(1024, 16384 // classes))
    _class_areas_kernel[(triton.cdiv(flat.shape[1], block), flat.shape[0])](
        flat, areas, flat.shape[1], num_classes, CLASSES=classes, BLOCK=block)
    return areas
