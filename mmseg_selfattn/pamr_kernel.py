"""Triton kernel of one PAMR propagation step on GPU (``pamr.py`` dispatches).

In torch a step is one ``addcmul_`` per neighbour over a strided slice of the
replicate-padded masks: 16 passes over (B, C, H, W) per step at the published
dilations (8, 16), through torch's generic strided kernel. On an H200 that was 70 % of
the GPU time of a NACLIP VOC evaluation (93 us per pass at VOC size). Here one kernel
gathers, for a block of pixels and every class, the P neighbours with clamped indices
(replicate padding without the padded copy), weights them with the block's P affinities
(kept in L1 across the classes) and writes the step's output once, accumulating in fp32:

    m'_i = sum_{j in N(i)} a_ij m_j       (N(i): P neighbours, borders replicated)

Same formula as ``pamr.pamr``'s loop (tested against it on GPU); it sums in fp32 with
one rounding to the masks' dtype, where the torch loop rounds after every neighbour
(fp16 masks: the kernel is the more accurate of the two; fp32: the same additions in
the same order, up to fused multiply-adds). Only CUDA tensors; without Triton ``AVAILABLE`` is False and the torch
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

    # sizes are not specialised: one compilation per dtype and neighbour count, not one
    # per combination of image sides divisible by 16 or not
    @triton.jit(do_not_specialize=['channels', 'height', 'width'])
    def _pamr_step_kernel(masks_ptr, affinity_ptr, out_ptr, dy_ptr, dx_ptr, channels,
                          height, width, P: tl.constexpr, BLOCK: tl.constexpr):
        """One step for BLOCK pixels of one image, every class; the neighbours in the
        order of the torch loop. The block's P affinity rows (P * BLOCK * 4 bytes) stay
        in L1 across the classes, so DRAM sees every input and output once."""
        pixels = height * width
        image = tl.program_id(1).to(tl.int64)
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < pixels
        y = offsets // width
        x = offsets % width
        affinity = affinity_ptr + image * P * pixels + offsets
        for channel in range(channels):
            plane = masks_ptr + (image * channels + channel) * pixels
            refined = tl.zeros([BLOCK], dtype=tl.float32)
            for p in tl.static_range(P):
                ny = tl.minimum(tl.maximum(y + tl.load(dy_ptr + p), 0), height - 1)
                nx = tl.minimum(tl.maximum(x + tl.load(dx_ptr + p), 0), width - 1)
                weight = tl.load(affinity + p * pixels, mask=inside, other=0.0)
                value = tl.load(plane + ny * width + nx, mask=inside, other=0.0)
                refined += weight.to(tl.float32) * value.to(tl.float32)
            tl.store(out_ptr + (image * channels + channel) * pixels + offsets,
                     refined.to(out_ptr.dtype.element_ty), mask=inside)


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
                            P=len(offsets), BLOCK=BLOCK)
    return out
