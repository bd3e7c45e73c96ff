"""Triton kernel of the captured standard attention on GPU.

The stages read the head mean of the last block's standard attention,

    A = mean_h softmax(q_h k_h^T / sqrt(d))                      (B, T, T), float32

In torch (``encoder.head_attention``) that is a logits GEMM over all heads, an fp32
softmax and a mean over the heads: three launches and, at one VOC image per call (6
crops of 197 tokens), 22 us of an H200, where the (B, H, T, T) logits and
probabilities go through memory. Here one program per (crop, block of query rows) loops
over the heads with a head's logits in registers: scaled and rounded to q's dtype as the
GEMM writes them, softmax in fp32, summed over the heads (with few crops, groups of heads
in parallel programs, then summed over the groups). q and k are read through their
strides (views of the fused qkv projection). fp16/bf16 rows of up to ``MAX_TOKENS``
tokens with a power-of-2 head width; the torch code runs otherwise, and without Triton
(``AVAILABLE`` False).
"""
import functools

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except ImportError:  # CPU-only installs
    AVAILABLE = False
ENABLED = AVAILABLE  # False: always the torch code (tests compare the two)
MAX_TOKENS = 256  # ViT-B/16 crops of 224 have 197; one program holds a row block's keys
ROWS = 16  # query rows per program
PROGRAMS_PER_SM = 4  # with fewer (row block, crop) programs the heads are split
MAX_GRID_CROPS = 65535

if AVAILABLE:

    @triton.jit
    def _standard_attention_kernel(q_ptr, k_ptr, out_ptr, tokens, heads, heads_per_program,
                                   crops, first_crop, scale, q_crop, q_head, q_token, k_crop,
                                   k_head, k_token, DIM: tl.constexpr, ROWS: tl.constexpr,
                                   KEYS: tl.constexpr):
        crop = first_crop + tl.program_id(1).to(tl.int64)
        group = tl.program_id(2)
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        keys = tl.arange(0, KEYS)
        dims = tl.arange(0, DIM)
        is_row, is_key = rows < tokens, keys < tokens
        total = tl.zeros((ROWS, KEYS), dtype=tl.float32)
        first = group * heads_per_program
        for head in range(first, tl.minimum(first + heads_per_program, heads)):
            q = tl.load(q_ptr + crop * q_crop + head * q_head + rows[:, None] * q_token
                        + dims[None, :], mask=is_row[:, None], other=0.0)
            k = tl.load(k_ptr + crop * k_crop + head * k_head + keys[None, :] * k_token
                        + dims[:, None], mask=is_key[None, :], other=0.0)
            logits = (tl.dot(q, k) * scale).to(q_ptr.dtype.element_ty).to(tl.float32)
            logits = tl.where(is_key[None, :], logits, float('-inf'))
            weights = tl.exp(logits - tl.max(logits, axis=1)[:, None])
            total += weights / tl.sum(weights, axis=1)[:, None]
        out = out_ptr + (group * crops + crop) * tokens * tokens
        tl.store(out + rows[:, None] * tokens + keys[None, :], total / heads,
                 mask=is_row[:, None] & is_key[None, :])


def supports(q: Tensor) -> bool:
    """Whether the kernel takes these (B, H, T, d) queries."""
    dim, tokens = q.shape[-1], q.shape[-2]
    return (ENABLED and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and 16 <= dim <= 128 and dim & (dim - 1) == 0 and 0 < tokens <= MAX_TOKENS)


def standard_attention(q: Tensor, k: Tensor) -> Tensor:
    """A (B, T, T) float32 from q and k (B, H, T, d) (``supports``).

    With few crops the heads are split into groups, summed in a fixed order afterwards
    (deterministic), so that there are programs for every SM."""
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        q, k = q.contiguous(), k.contiguous()
    crops, heads, tokens, dim = q.shape
    row_blocks = triton.cdiv(tokens, ROWS)
    heads_per_program = triton.cdiv(heads, min(heads, triton.cdiv(
        PROGRAMS_PER_SM * _multiprocessors(q.device), row_blocks * max(crops, 1))))
    groups = triton.cdiv(heads, heads_per_program)
    partial = torch.empty((groups, crops, tokens, tokens), dtype=torch.float32,
                          device=q.device)
    keys = max(16, triton.next_power_of_2(tokens))
    # the row blocks of a crop run side by side (its keys stay in L2); crops go on grid
    # axis 1, which holds at most 65,535 programs per launch
    for first in range(0, crops, MAX_GRID_CROPS):
        _standard_attention_kernel[(row_blocks, min(MAX_GRID_CROPS, crops - first), groups)](
            q, k, partial, tokens, heads, heads_per_program, crops, first, dim**-0.5,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            DIM=dim, ROWS=ROWS, KEYS=keys, num_warps=4)
    return partial[0] if groups == 1 else partial.sum(dim=0)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
