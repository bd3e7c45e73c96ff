"""Stage 4, outlier suppression (SPEC §1.4): replace tokens that look like the CLS.

A patch token that attends to the CLS much more than to itself carries global
rather than local content. With the standard last-block attention A (CLS at
index 0) its score is::

    r_i = A[cls, i] / (A[i, i] + eps)

The ``top_k`` patch tokens with the highest r_i (only those with
r_i > ``min_ratio`` when it is set) are outliers O. Each outlier is replaced by
an average of its clean 8-neighbours C(i) = {j in 8-nbhd(i) on the h x w grid,
j not in O}::

    x_i <- sum_{j in C(i)} w_ij x_j
    'mean':            w_ij = 1 / |C(i)|
    'inverse_cosine':  w_ij = softmax_{j in C(i)} (1 - cos(x_i, x_j))

An outlier with C(i) empty keeps its value. Optional neighbour decontamination
(tau = ``neighbour_decontamination``) removes the outlier's direction from each
clean neighbour j, summed over all outliers i that border j::

    x_j <- x_j - tau * sum_{i in O, j in C(i)} cos(x_i, x_j) * x_i

Replacement and decontamination both read the original features (the
pre-replacement x_i and x_j) and are applied together, so neither depends on
the order of the tokens or of the two steps.
"""
from typing import Dict, Optional, Tuple

import torch
from mmseg.registry import MODELS
from torch import Tensor, nn

from ..config_checks import check_choice, check_int, check_number
from ..startup_log import log_enabled
from . import kernels
from .vectors import unit_vectors

INTERPOLATIONS = ('mean', 'inverse_cosine')
SCORE_ATTENTIONS = ('enhanced', 'original')
# (row, col) offsets of the 8-neighbourhood, row-major, centre excluded
NEIGHBOUR_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def outlier_scores(attention: Tensor, eps: float = 1e-6) -> Tensor:
    """r_i = A[cls, i] / (A[i, i] + eps) of the patch tokens: (B, T, T) -> (B, N).

    Computed in at least float32: in half precision a tiny A[i, i] would overflow r_i.
    """
    attention = attention.to(torch.promote_types(attention.dtype, torch.float32))
    cls_to_patch = attention[:, 0, 1:]
    patch_self = attention.diagonal(dim1=-2, dim2=-1)[:, 1:]
    return cls_to_patch / (patch_self + eps)


def rank_outliers(scores: Tensor, top_k: int, min_ratio: Optional[float] = None) -> Tensor:
    """Indices (B, k), k = min(top_k, N), of the highest scores per crop, descending.

    Ties go to the lower token index (stable sort: deterministic on every device).
    With ``min_ratio`` set, ranks whose score is not > min_ratio are -1 (trailing).
    """
    top_k = min(top_k, scores.shape[-1])
    if kernels.supports_top_indices(scores):  # one small kernel, no sort
        indices = kernels.top_indices(scores, top_k)
    else:
        indices = scores.sort(dim=-1, descending=True, stable=True).indices[:, :top_k]
    if min_ratio is not None:
        indices = indices.masked_fill(scores.gather(1, indices) <= min_ratio, -1)
    return indices


def outlier_mask_from_indices(indices: Tensor, num_tokens: int) -> Tensor:
    """(B, k) token indices, -1 = none -> (B, N) bool mask."""
    mask = torch.zeros(indices.shape[0], num_tokens + 1, dtype=torch.bool, device=indices.device)
    mask.scatter_(1, torch.where(indices >= 0, indices, num_tokens), True)  # -1 -> spare column
    return mask[:, :num_tokens]


def select_outliers(scores: Tensor, top_k: int, min_ratio: Optional[float] = None) -> Tensor:
    """(B, N) bool mask of the top_k scores per crop (only those > min_ratio if set)."""
    return outlier_mask_from_indices(rank_outliers(scores, top_k, min_ratio), scores.shape[-1])


_NEIGHBOUR_TABLES: Dict[Tuple[Tuple[int, int], str], Tuple[Tensor, Tensor]] = {}


def _grid_neighbours(grid: Tuple[int, int], device: str) -> Tuple[Tensor, Tensor]:
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
    rows, cols = rows.reshape(-1, 1), cols.reshape(-1, 1)  # (N, 1)
    offsets = torch.tensor(NEIGHBOUR_OFFSETS)
    neighbour_rows, neighbour_cols = rows + offsets[:, 0], cols + offsets[:, 1]  # (N, 8)
    in_grid = ((neighbour_rows >= 0) & (neighbour_rows < h)
               & (neighbour_cols >= 0) & (neighbour_cols < w))
    neighbour_index = torch.where(in_grid, neighbour_rows * w + neighbour_cols, rows * w + cols)
    return neighbour_index.to(device), in_grid.to(device)


def grid_neighbours(grid: Tuple[int, int], device=None) -> Tuple[Tensor, Tensor]:
    """The 8-neighbourhood of every patch of a row-major h x w grid.

    Returns:
        neighbour_index: (N, 8) long, token index of each neighbour in
            ``NEIGHBOUR_OFFSETS`` order; slots outside the grid point at the patch itself.
        in_grid: (N, 8) bool, False for those outside slots (borders have 5, corners 3).

    Built on the host once per grid and device and cached (read-only): no host-to-device
    copy per call, so the stage can run inside a CUDA graph.
    """
    key = (tuple(grid), str(torch.device(device or 'cpu')))
    if key not in _NEIGHBOUR_TABLES:
        _NEIGHBOUR_TABLES[key] = _grid_neighbours(*key)
    return _NEIGHBOUR_TABLES[key]


def neighbour_cosines(features: Tensor, neighbour_index: Tensor) -> Tensor:
    """cos(x_i, x_j) for each token i and neighbour slot: (B, N, D) -> (B, N, 8)."""
    unit = unit_vectors(features)
    # one gather per slot keeps memory at O(B N D) instead of O(8 B N D)
    return torch.stack([(unit * unit[:, neighbour_index[:, slot]]).sum(dim=-1)
                        for slot in range(neighbour_index.shape[1])], dim=-1)


def weighted_neighbour_sum(features: Tensor, neighbour_index: Tensor, weights: Tensor) -> Tensor:
    """sum over slots of weights[b, i, slot] * x_{neighbour(i, slot)}: -> (B, N, D)."""
    weights = weights.to(features.dtype)
    total = torch.zeros_like(features)
    for slot in range(neighbour_index.shape[1]):
        total = total + weights[..., slot, None] * features[:, neighbour_index[:, slot]]
    return total


def replace_outliers(features: Tensor, outlier_mask: Tensor, grid: Tuple[int, int],
                     interpolation: str = 'mean', candidates: Optional[Tensor] = None) -> Tensor:
    """Each outlier x_i <- average of its clean in-grid 8-neighbours (see module docstring).

    Args:
        features: (B, N, D) patch features X.
        outlier_mask: (B, N) bool.
        grid: (h, w) with h * w = N.
        interpolation: 'mean' (uniform weights) or 'inverse_cosine'
            (softmax(1 - cos(x_i, x_j)) over the clean neighbours).
        candidates: (B, k) distinct token indices (-1 = none) that contain every
            outlier, e.g. ``rank_outliers``'s: only these rows are computed. Default:
            all N tokens.

    Returns:
        (B, N, D); clean tokens and outliers without a clean neighbour unchanged.
    """
    check_choice('interpolation', interpolation, INTERPOLATIONS)
    batch, num, dim = features.shape
    if candidates is None:
        candidates = torch.arange(num, device=features.device).expand(batch, num)
    neighbour_index, in_grid = grid_neighbours(grid, features.device)
    rows = candidates.clamp_min(0)  # (B, k)
    neighbours = neighbour_index[rows]  # (B, k, 8)
    clean_neighbour = in_grid[rows] & ~outlier_mask.gather(1, neighbours.flatten(1)).view_as(
        neighbours)
    has_clean = clean_neighbour.any(dim=-1)  # (B, k)
    neighbour_features = _gather_rows(features, neighbours.flatten(1)).unflatten(1, (-1, 8))
    own_features = _gather_rows(features, rows)  # (B, k, D)
    if interpolation == 'mean':
        weights = clean_neighbour / clean_neighbour.sum(dim=-1, keepdim=True).clamp_min(1)
    else:
        cosines = (unit_vectors(own_features)[:, :, None] *
                   unit_vectors(neighbour_features)).sum(dim=-1)  # (B, k, 8)
        logits = (1 - cosines).masked_fill(~clean_neighbour, float('-inf'))
        # rows without a clean neighbour are all -inf: give them finite logits, weights 0
        logits = logits.masked_fill(~has_clean[..., None], 0.0)
        weights = logits.softmax(dim=-1) * clean_neighbour
    interpolated = (weights[..., None].to(features.dtype) * neighbour_features).sum(dim=2)
    replace = (candidates >= 0) & outlier_mask.gather(1, rows) & has_clean
    values = torch.where(replace[..., None], interpolated, own_features)
    # write back; rows of absent candidates (-1) go to a spare row that is cut off
    target = torch.where(candidates >= 0, candidates, num)
    padded = torch.cat([features, features.new_zeros(batch, 1, dim)], dim=1)
    return padded.scatter(1, target[..., None].expand(-1, -1, dim), values)[:, :num]


def _gather_rows(features: Tensor, index: Tensor) -> Tensor:
    """features (B, N, D), index (B, M) -> (B, M, D)."""
    return features.gather(1, index[..., None].expand(-1, -1, features.shape[-1]))


def decontaminate_neighbours(features: Tensor, outlier_mask: Tensor, grid: Tuple[int, int],
                             tau: float) -> Tensor:
    """Each clean neighbour x_j <- x_j - tau * sum_i cos(x_i, x_j) * x_i over the outliers i
    bordering j (contributions of several outliers add up); x_i are the given, unreplaced
    features. Outliers themselves are unchanged. tau == 0 returns ``features`` itself."""
    if tau == 0:
        return features
    neighbour_index, in_grid = grid_neighbours(grid, features.device)
    # the 8-neighbourhood is symmetric: j's outlier neighbours are the outliers bordering j
    outlier_neighbour = in_grid & outlier_mask[:, neighbour_index] & ~outlier_mask[..., None]
    weights = tau * neighbour_cosines(features, neighbour_index) * outlier_neighbour
    return features - weighted_neighbour_sum(features, neighbour_index, weights)


@MODELS.register_module()
class OutlierSuppression(nn.Module):
    """Replaces the top-k tokens by A[cls, i] / A[i, i] with their clean neighbours' average.

    Args:
        top_k: outliers per crop (0 = stage does nothing; more than N = all tokens).
        min_ratio: if set, only tokens with r_i > min_ratio can be outliers.
        interpolation: 'mean' or 'inverse_cosine' neighbour weights.
        neighbour_decontamination: tau of the clean-neighbour correction (0 = off).
        eps: added to A[i, i] in the score.
        score_attention: 'enhanced' (prevention): with self-attention enhancement on,
            the segmentor passes Ã (``enhanced_attention``: the diagonal boost of stage 3)
            instead of A, so enhanced tokens are less often outliers; 'original': A.
            The stage scores whatever attention it is given.

    Diagnostics of the latest call: ``last_scores`` (B, N) r_i, and
    ``last_outlier_indices`` (B, min(top_k, N)) long patch indices sorted by descending
    score, -1 where ``min_ratio`` left fewer than top_k outliers.
    """
    cfg_key = 'outlier_suppression_cfg'

    def __init__(self, top_k: int = 10, min_ratio: Optional[float] = None,
                 interpolation: str = 'mean', neighbour_decontamination: float = 0.0,
                 eps: float = 1e-6, score_attention: str = 'enhanced'):
        super().__init__()
        key = self.cfg_key
        self.top_k = check_int(f'{key}.top_k', top_k, 0)
        self.min_ratio = (None if min_ratio is None
                          else check_number(f'{key}.min_ratio', min_ratio, 0))
        self.interpolation = check_choice(f'{key}.interpolation', interpolation, INTERPOLATIONS)
        self.neighbour_decontamination = check_number(
            f'{key}.neighbour_decontamination', neighbour_decontamination, 0)
        self.eps = check_number(f'{key}.eps', eps, 0, low_open=True)
        self.score_attention = check_choice(f'{key}.score_attention', score_attention,
                                            SCORE_ATTENTIONS)
        self.last_scores: Optional[Tensor] = None
        self.last_outlier_indices: Optional[Tensor] = None
        log_enabled('Outlier Suppression', self.extra_repr())

    def forward(self, features: Tensor, attention: Tensor, grid: Tuple[int, int]) -> Tensor:
        """features (B, N, D), attention A (B, 1+N, 1+N), grid (h, w) -> features (B, N, D)."""
        batch, num_tokens = features.shape[:2]
        h, w = grid
        if h * w != num_tokens or tuple(attention.shape) != (batch, 1 + num_tokens,
                                                             1 + num_tokens):
            raise ValueError(f'outlier suppression: features {tuple(features.shape)}, attention '
                             f'{tuple(attention.shape)} and grid {tuple(grid)} disagree; '
                             'expected (B, h*w, D) and (B, 1+h*w, 1+h*w).')
        scores = outlier_scores(attention, self.eps)
        indices = rank_outliers(scores, self.top_k, self.min_ratio)
        self.last_scores, self.last_outlier_indices = scores.detach(), indices.detach()
        if self.top_k == 0:
            return features
        outlier_mask = outlier_mask_from_indices(indices, num_tokens)
        replaced = replace_outliers(features, outlier_mask, grid, self.interpolation,
                                    candidates=indices)
        decontaminated = decontaminate_neighbours(features, outlier_mask, grid,
                                                  self.neighbour_decontamination)
        # replacement touches only outliers, decontamination only clean tokens
        return torch.where(outlier_mask[..., None], replaced, decontaminated)

    def extra_repr(self) -> str:
        return (f'top_k={self.top_k}, min_ratio={self.min_ratio}, '
                f'interpolation={self.interpolation}, '
                f'neighbour_decontamination={self.neighbour_decontamination}, eps={self.eps}, '
                f'score_attention={self.score_attention}')
