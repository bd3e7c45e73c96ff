"""Triton kernel of one PAMR propagation step on GPU (``pamr.py`` dispatches).

In torch a step is one ``addcmul_`` per neighbour over a strided slice of the
replicate-padded masks: 16 passes over (B, C, H, W) per step at the published
dilations (8, 16), through torch's generic strided kernel. On an H200 that was 70 % of
the GPU time of a NACLIP VOC evaluation (93 us per pass at VOC size). Here one kernel
reads each pixel's P affinities once into registers, gathers the P neighbours of every
class with clamped indices (replicate padding without the padded copy) and writes the
step's output once, accumulating in fp32:

    m'_i = sum_{j in N(i)} a_ij m_j       (N(i): P neighbours, borders replicated)

Same formula as ``pamr.pamr``'s loop (tested against it on GPU); it sums in fp32 with
one rounding to the masks' dtype, where the torch loop rounds after every neighbour
(fp16 masks: the kernel is the more accurate of the two; fp32: equal up to the order of
the additions). Only CUDA tensors; without Triton ``AVAILABLE`` is False and the torch
loop runs.
"""
from typing import Sequence, Tuple

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except ImportError:  # CPU-only installs
    AVAILABLE = False
ENABLED = AVAILABLE  # False: always the torch loop (tests compare the two)

BLOCK = 256  # pixels per program

if AVAILABLE:

    @triton.jit
    def _pamr_step_kernel(masks_ptr, affinity_ptr, out_ptr, dy_ptr, dx_ptr, channels,
                          height, width, P: tl.constexpr, P_POW2: tl.constexpr,
                          BLOCK: tl.constexpr):
        """One step for BLOCK pixels of one image, every class: (P, BLOCK) affinities and
        neighbour indices in registers, reused by all classes."""
        pixels = height * width
        image = tl.program_id(1).to(tl.int64)
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < pixels
        neighbours = tl.arange(0, P_POW2)
        real = neighbours < P
        dy = tl.load(dy_ptr + neighbours, mask=real, other=0)
        dx = tl.load(dx_ptr + neighbours, mask=real, other=0)
        y = offsets // width
        x = offsets % width
        ny = tl.minimum(tl.maximum(y[None, :] + dy[:, None], 0), height - 1)
        nx = tl.minimum(tl.maximum(x[None, :] + dx[:, None], 0), width - 1)
        sources = ny * width + nx  # (P_POW2, BLOCK)
        tile = real[:, None] & inside[None, :]
        weights = tl.load(affinity_ptr + image * P * pixels + neighbours[:, None] * pixels
                          + offsets[None, :], mask=tile, other=0.0).to(tl.float32)
        for channel in range(channels):
            plane = (image * channels + channel) * pixels
            values = tl.load(masks_ptr + plane + sources, mask=tile, other=0.0)
            refined = tl.sum(weights * values.to(tl.float32), axis=0)
            tl.store(out_ptr + plane + offsets, refined.to(out_ptr.dtype.element_ty),
                     mask=inside)


def supports(masks: Tensor) -> bool:
    """Whether the kernel serves these masks (CUDA, Triton installed, fp16/bf16/fp32)."""
    return (ENABLED and masks.is_cuda
            and masks.dtype in (torch.float16, torch.bfloat16, torch.float32))


_OFFSET_TABLES = {}


def _offset_tables(offsets: Sequence[Tuple[int, int]], device) -> Tuple[Tensor, Tensor]:
    """(dy, dx) as int32 tensors on ``device``, made once per offset list and device
    (outside a CUDA graph capture: the first call runs eagerly)."""
    key = (tuple(offsets), str(device))
    tables = _OFFSET_TABLES.get(key)
    if tables is None:
        dy, dx = zip(*offsets)
        tables = (torch.tensor(dy, dtype=torch.int32, device=device),
                  torch.tensor(dx, dtype=torch.int32, device=device))
        if not (tables[0].is_cuda and torch.cuda.is_current_stream_capturing()):
            _OFFSET_TABLES[key] = tables
    return tables


def pamr_step(masks: Tensor, affinity: Tensor, offsets: Sequence[Tuple[int, int]]) -> Tensor:
    """One propagation step: (B, C, H, W) masks, (B, P, H, W) affinities of the P
    ``offsets`` (dy, dx) -> (B, C, H, W) in the masks' dtype."""
    batch, channels, height, width = masks.shape
    if affinity.shape != (batch, len(offsets), height, width):
        raise ValueError(f'affinity {tuple(affinity.shape)} does not match masks '
                         f'{tuple(masks.shape)} with {len(offsets)} neighbours')
    masks, affinity = masks.contiguous(), affinity.contiguous()
    out = torch.empty_like(masks)
    dy, dx = _offset_tables(offsets, masks.device)
    grid = (triton.cdiv(height * width, BLOCK), batch)
    _pamr_step_kernel[grid](masks, affinity, out, dy, dx, channels, height, width,
                            P=len(offsets), P_POW2=triton.next_power_of_2(len(offsets)),
                            BLOCK=BLOCK)
    return out
