"""Pixel-Adaptive Mask Refinement (PAMR).

Araslanov & Roth, "Single-Stage Semantic Segmentation from Image Labels",
CVPR 2020; used unchanged by SCLIP / NACLIP to sharpen the upsampled logits
along image edges (``pamr_steps``, ``pamr_stride``).
"""
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import pamr_kernel
from .config_checks import check_int

Offset = Tuple[int, int]

# every dilation pads the full-resolution masks by that many pixels per side (the
# published settings use up to 24); beyond the image it only repeats the border
MAX_DILATION = 64


def neighbour_offsets(dilations: Sequence[int],
                      with_centre: bool = False) -> List[Offset]:
    """(dy, dx) of the 3x3 neighbourhood at every dilation, row-major.

    The order matches the published kernels; it does not affect the result.
    """
    offsets = []
    for d in dilations:
        for dy in (-d, 0, d):
            for dx in (-d, 0, d):
                if with_centre or (dy, dx) != (0, 0):
                    offsets.append((dy, dx))
    return offsets


def shifted_copies(x: Tensor, offsets: Sequence[Offset]) -> Iterator[Tensor]:
    """Yield ``x[..., i + dy, j + dx]`` for each offset, borders replicated.

    Replicate padding is index clamping, so one pad by the largest offset
    serves every dilation.
    """
    height, width = x.shape[-2:]
    pad = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    padded = F.pad(x, [pad] * 4, mode='replicate')
    for dy, dx in offsets:
        yield padded[..., pad + dy:pad + dy + height,
                     pad + dx:pad + dx + width]


def pixel_affinity(image: Tensor, dilations: Sequence[int]) -> Tensor:
    """Softmax-normalised affinity of every pixel to its P = 8 * len(dilations)
    neighbours.

    Args:
        image: (B, K, H, W) image (any normalisation; K colour channels).
        dilations: neighbourhood dilations.

    Returns:
        (B, P, H, W) weights summing to 1 over P, in fp32 or wider.
    """
    # the 1e-8 guard underflows in fp16: compute in at least fp32
    image = image.to(torch.promote_types(image.dtype, torch.float32))
    # std over all 9 * len(dilations) copies together (centre repeated per
    # dilation), exactly as the published LocalStDev
    local_std = torch.stack(
        list(shifted_copies(image, neighbour_offsets(dilations, True))),
        dim=2).std(dim=2, keepdim=True)  # (B, K, 1, H, W)
    neighbours = torch.stack(
        list(shifted_copies(image, neighbour_offsets(dilations))),
        dim=2)  # (B, K, P, H, W)
    logits = -(image.unsqueeze(2) - neighbours).abs() / (
        1e-8 + 0.1 * local_std)
    return F.softmax(logits.mean(dim=1), dim=1)


def pamr(image: Tensor,
         masks: Tensor,
         num_iter: int = 1,
         dilations: Sequence[int] = (1, )) -> Tensor:
    """Refine ``masks`` by propagating them along image-adaptive affinities.

    With x the image, N(i) the 8 neighbours of pixel i at each dilation d
    (offsets in {-d, 0, d}^2 minus the centre; borders replicated) and
    sigma_i the unbiased std of x over the 9 * len(dilations) dilated 3x3
    copies including the centre::

        a_ij = softmax_{j in N(i)}( mean_channels( -|x_i - x_j|
                                                   / (1e-8 + 0.1 sigma_i) ) )
        m_i  <- sum_{j in N(i)} a_ij m_j          (num_iter times)

    after ``m`` is resized bilinearly (align_corners=True) to the image.

    Args:
        image: (B, K, H, W) image guiding the refinement.
        masks: (B, C, h, w) per-class masks or logits.
        num_iter: propagation steps; 0 returns the resized masks.
        dilations: neighbourhood dilations.

    Returns:
        (B, C, H, W) refined masks in the dtype of ``masks``; on GPU each step is one
        kernel summing in fp32 (``pamr_kernel.py``).
    """
    masks = F.interpolate(
        masks, size=image.shape[-2:], mode='bilinear', align_corners=True)
    if num_iter == 0:
        return masks
    affinity = pixel_affinity(image, dilations)
    offsets = neighbour_offsets(dilations)
    if pamr_kernel.supports(masks):  # GPU: one fused kernel per step (pamr_kernel.py)
        for _ in range(num_iter):
            masks = pamr_kernel.pamr_step(masks, affinity, offsets)
        return masks
    affinity = affinity.to(masks.dtype).unsqueeze(2)
    for _ in range(num_iter):
        # accumulate per neighbour: never holds a (B, C, P, H, W) tensor
        refined = torch.zeros_like(masks)
        for weight, shifted in zip(
                affinity.unbind(1), shifted_copies(masks, offsets)):
            refined.addcmul_(weight, shifted)
        masks = refined
    return masks


class PAMR(nn.Module):
    """Pixel-Adaptive Mask Refinement; see :func:`pamr` for the formula.

    Parameter-free and deterministic; computes on the device of its inputs.

    Args:
        num_iter: propagation steps (``pamr_steps``).
        dilations: neighbourhood dilations (``pamr_stride``), an int or a
            sequence of ints in [1, ``MAX_DILATION``].
    """

    def __init__(self,
                 num_iter: int = 1,
                 dilations: Union[int, Sequence[int]] = (1, )) -> None:
        super().__init__()
        if isinstance(dilations, int):
            dilations = (dilations, )
        if num_iter < 0 or not dilations or not all(1 <= d <= MAX_DILATION for d in dilations):
            raise ValueError(f'PAMR needs num_iter >= 0 and dilations in [1, {MAX_DILATION}], '
                             f'got {num_iter} and {dilations}')
        self.num_iter = num_iter
        self.dilations = tuple(int(d) for d in dilations)

    def forward(self, image: Tensor, masks: Tensor) -> Tensor:
        """(B, K, H, W) image, (B, C, h, w) masks -> (B, C, H, W)."""
        return pamr(image, masks, self.num_iter, self.dilations)

    def extra_repr(self) -> str:
        return f'num_iter={self.num_iter}, dilations={self.dilations}'


def build_pamr(steps: int, stride: Sequence[int],
                dilations_alias: Optional[Sequence[int]]) -> Optional[PAMR]:
    steps = check_int('pamr_steps', steps, 0)
    key, value = (('pamr_stride', stride) if dilations_alias is None
                  else ('pamr_dilations', dilations_alias))
    dilations = tuple(value) if isinstance(value, (list, tuple)) else (value, )
    if not dilations or any(isinstance(d, bool) or not isinstance(d, int)
                            or not 1 <= d <= MAX_DILATION for d in dilations):
        raise ValueError(f'{key} must be an int or a non-empty list of ints in '
                         f'[1, {MAX_DILATION}] (PAMR dilations: each pads the full-size '
                         f'logits by that many pixels per side), got {value!r}.')
    return PAMR(steps, dilations) if steps else None
