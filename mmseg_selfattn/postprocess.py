"""Query logits -> class probabilities and labels (SPEC §2), batched over images.

The published code takes softmax(s * l) over all queries q, the max over each
class's synonyms, and renormalises over classes. softmax is monotone in l and
its normaliser is shared by all queries, so (with m_c = max_{q in c} l_q)::

    max_{q in c} softmax(s l)_q = exp(s m_c - LSE_q(s l))
    renormalised over classes   = softmax_c(s m_c)

The same numbers from one synonym max on the logits and one softmax over the C
classes, instead of a softmax over all Q queries and a scatter. The
probability that ``prob_thd`` tests, max_q softmax(s l)_q, is
exp(s max_c m_c - LSE_q(s l)), computed only when ``prob_thd`` is set.
"""
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import postprocess_kernels


class SynonymMax:
    """Max over each class's queries (synonyms), one gather and one max per synonym count.

    Args:
        query_class: the class index of every query, classes numbered 0..C-1.
    """

    def __init__(self, query_class: Sequence[int]):
        queries_of = defaultdict(list)
        for query, cls in enumerate(query_class):
            queries_of[int(cls)].append(query)
        self._queries_of = dict(queries_of)
        self.num_classes = len(queries_of)
        self.num_queries = len(query_class)
        self.is_identity = list(query_class) == list(range(self.num_queries))
        classes_by_count = defaultdict(list)
        for cls in sorted(queries_of):
            classes_by_count[len(queries_of[cls])].append(cls)
        # (synonym count k, its classes, their queries class-major: k per class)
        self.groups = [(count, classes, [q for cls in classes for q in queries_of[cls]])
                       for count, classes in sorted(classes_by_count.items())]
        self._indices: Dict[str, List[Tuple[int, Tensor, Tensor]]] = {}
        self._tables: Dict[str, Tuple[Tensor, Tensor, Tensor]] = {}
        self.num_groups = sum(len(queries) > 1 for queries in self._queries_of.values())

    def __call__(self, logits: Tensor) -> Tensor:
        """(n, Q, ...) query logits -> (n, C, ...) class logits."""
        if self.is_identity:
            return logits
        out = logits.new_empty((logits.shape[0], self.num_classes, *logits.shape[2:]))
        for count, classes, queries in self._device_indices(logits.device):
            picked = logits.index_select(1, queries)
            if count > 1:
                picked = picked.unflatten(1, (-1, count)).amax(dim=2)
            out.index_copy_(1, classes, picked)
        return out

    def _device_indices(self, device: torch.device) -> List[Tuple[int, Tensor, Tensor]]:
        # cached per device: no host-to-device copies once warm (CUDA-graph safe)
        key = str(device)
        if key not in self._indices:
            self._indices[key] = [
                (count, torch.tensor(classes, device=device), torch.tensor(queries, device=device))
                for count, classes, queries in self.groups]
        return self._indices[key]

    def kernel_tables(self, device: torch.device) -> Tuple[Tensor, Tensor, Tensor]:
        """The grouping as ``postprocess_kernels`` reads it, int32 on ``device`` (cached):
        the first query of every class (C,); (class, start, end) of every class with
        more queries (G, 3), whose other queries are extras[start:end] (E,). Never empty:
        G and E are padded to 1 (the kernel is told the true G)."""
        key = str(device)
        if key not in self._tables:
            first, groups, extras = [], [], []
            for cls in range(self.num_classes):
                queries = self._queries_of[cls]
                first.append(queries[0])
                if len(queries) > 1:
                    groups.append((cls, len(extras), len(extras) + len(queries) - 1))
                    extras.extend(queries[1:])
            self._tables[key] = tuple(
                torch.tensor(values, dtype=torch.int32, device=device)
                for values in (first, groups or [(0, 0, 0)], extras or [0]))
        return self._tables[key]


def segment(query_logits: Tensor, synonym_max: SynonymMax, logit_scale: float,
            prob_thd: float = 0.0, area_thd: float = 0.0, bg_idx: Optional[int] = 0
            ) -> Tuple[Tensor, Tensor]:
    """Class probabilities and labels of a batch, as the SCLIP/NACLIP lineage computes them.

    Args:
        query_logits: (n, Q, H, W) cosine logits of every query.
        synonym_max: the query -> class grouping.
        logit_scale: softmax temperature s.
        prob_thd: pixels whose best query probability is below it go to ``bg_idx``.
        area_thd: SCLIP's small-class rule (``final_predictions``).

    Returns:
        probs: (n, C, H, W) float32, max over synonyms of softmax(s * logits) over all
            queries, renormalised to sum 1 per pixel (classes dropped by ``area_thd``: 0).
        labels: (n, H, W) long.
    """
    return final_predictions(*pixel_predictions(query_logits, synonym_max, logit_scale,
                                                prob_thd), prob_thd, area_thd, bg_idx)


def pixel_predictions(query_logits: Tensor, synonym_max: SynonymMax, logit_scale: float,
                      prob_thd: float = 0.0) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """The per-pixel part of ``segment``, so that a huge image can run band by band.

    Returns class probabilities (n, C, H, W), argmax labels (n, H, W) and, when
    ``prob_thd`` is set, the confidence (n, H, W) float32: the best query probability
    max_q softmax(s l)_q, which ``prob_thd`` tests (else None). On GPU one Triton kernel
    computes all three (``postprocess_kernels``).
    """
    if postprocess_kernels.supports(query_logits):
        return postprocess_kernels.pixel_predictions(query_logits, synonym_max, logit_scale,
                                                     prob_thd)
    scaled_class_logits = logit_scale * synonym_max(query_logits.float())
    probs = scaled_class_logits.softmax(dim=1)
    labels = probs.argmax(dim=1)
    confidence = None
    if prob_thd > 0:
        confidence = (scaled_class_logits.amax(dim=1)
                      - torch.logsumexp(logit_scale * query_logits.float(), dim=1)).exp()
    return probs, labels, confidence


def merged_pixel_predictions(patch_logits: Tensor, merge, rows: slice,
                             synonym_max: SynonymMax, logit_scale: float, prob_thd: float = 0.0
                             ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``pixel_predictions`` of the windows' patch logits merged by ``merge``
    (``sliding_window.WindowMerge``), output ``rows`` only. On GPU the kernel applies the
    merge's row taps itself: the full-resolution query logits are never written."""
    if postprocess_kernels.supports(patch_logits):
        return postprocess_kernels.pixel_predictions(
            merge.columns_merged(patch_logits, rows), synonym_max, logit_scale, prob_thd,
            merge.row_taps(rows))
    return pixel_predictions(merge(patch_logits, rows), synonym_max, logit_scale, prob_thd)


def final_predictions(probs: Tensor, labels: Tensor, confidence: Optional[Tensor],
                      prob_thd: float = 0.0, area_thd: float = 0.0, bg_idx: Optional[int] = 0
                      ) -> Tuple[Tensor, Tensor]:
    """The whole-image part of ``segment``, SCLIP's ``postprocess_result`` (also SC-CLIP's):

    1. ``area_thd`` (``classes_kept``): on the argmax labels, every class c != ``bg_idx``
       whose pixels are not more than ``area_thd`` x the pixels of all classes but
       ``bg_idx`` is dropped: its probabilities become 0 (``probs`` is changed in place
       and renormalised), and the argmax is taken again, so its pixels go to their
       next-best class (not necessarily ``bg_idx``);
    2. ``prob_thd``: pixels whose best query probability among the kept classes is
       below it -> ``bg_idx``.

    Args:
        probs, labels, confidence: ``pixel_predictions``' outputs (confidence may be None
            when ``prob_thd`` is 0).

    Returns:
        probs (n, C, H, W) and labels (n, H, W).
    """
    if area_thd > 0:
        kept = classes_kept(class_areas(labels, probs.shape[1]), area_thd, bg_idx)
        probs, labels, confidence = _drop_classes(probs, kept, confidence)
    if prob_thd > 0:
        labels = torch.where(confidence < prob_thd, bg_idx, labels)
    return probs, labels


def classes_kept(areas: Tensor, area_thd: float, bg_idx: int) -> Tensor:
    """(n, C) bool: the classes ``area_thd`` keeps, from the (n, C) pixel counts of the
    argmax labels. ``bg_idx`` is always kept and left out of the foreground area; a
    class is kept iff its count > area_thd x the foreground area (float32 product, as
    the published code compares)."""
    counts = areas.float()
    foreground = counts.sum(dim=1, keepdim=True) - counts[:, bg_idx:bg_idx + 1]
    kept = counts > area_thd * foreground
    kept[:, bg_idx] = True
    return kept


def _drop_classes(probs: Tensor, kept: Tensor, confidence: Optional[Tensor]
                  ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Probabilities of the classes not ``kept`` -> 0 (in place), the argmax of what is
    left, the confidence among the kept classes, and the probabilities renormalised.

    The best query probability of class c is p_c x (a per-pixel factor), so among the
    kept classes it is confidence x max_kept p / max p."""
    best = probs.amax(dim=1)
    probs.mul_(kept[:, :, None, None])
    labels = probs.argmax(dim=1)
    best_kept = probs.amax(dim=1)
    if confidence is not None:
        confidence = confidence * (best_kept / best.clamp_min(torch.finfo(best.dtype).tiny))
    total = probs.sum(dim=1, keepdim=True)
    probs.div_(torch.where(total > 0, total, 1.0))  # an all-dropped pixel stays 0, not NaN
    return probs, labels, confidence


def class_areas(labels: Tensor, num_classes: int) -> Tensor:
    """(n, C) pixel count of every class in each image's labels (n, H, W)."""
    if postprocess_kernels.supports(labels):
        return postprocess_kernels.class_areas(labels, num_classes)
    flat = labels.flatten(1)
    # compare-and-count: no bincount host sync, no atomics contending on C bins
    classes = torch.arange(num_classes, device=labels.device)[:, None]
    pixels_per_chunk = max(1, 2**26 // (num_classes * flat.shape[0]))  # bounds the bool temporary
    return sum((chunk[:, None, :] == classes).sum(dim=-1)  # (n, C)
               for chunk in flat.split(pixels_per_chunk, dim=1))


def finite_per_image(probs: Tensor) -> Tensor:
    """(n,) whether each image's probabilities (n, C, H, W) are finite: their sum is finite
    iff every term is (each is at most 1), and a sum needs no full-size temporary."""
    return torch.isfinite(probs.flatten(1).sum(dim=1))
