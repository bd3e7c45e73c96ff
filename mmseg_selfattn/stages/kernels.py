"""Triton kernels of the stages on GPU: cosine matrices, DBSCAN's closure squaring, top-k.

At one VOC image per call (6 crops of 196 tokens) the stages' GPU work is a few dozen
small kernels, and on an H200 two kinds took half of it:

- ``components_by_closure`` squares the reachability matrix R ceil(log2 N) times,
  R <- min(R @ R, 1). In torch that is a batched matmul plus a clamp per squaring, and
  with N = 196 (not a multiple of 8) cuBLAS picks an unaligned kernel: 16 launches, about
  50 us. ``square_clamped`` is one launch per squaring with the clamp in its epilogue, on
  matrices padded to a multiple of the tile (zero rows and columns: nodes without edges,
  cut off afterwards). Entries are 0/1 fp16; their products sum exactly in fp32.
- cosine matrices in float32 (similarity enhancement, DBSCAN's distance) went through
  cuBLAS's SIMT float32 GEMMs at about 25 us each. ``cosine_matrix`` is one launch that
  reads the rows as they are (strided), accumulates their dot products on the tensor
  cores (fp16/bf16 products are exact in fp32; float32 runs as three TF32 products,
  ``tf32x3``, to about 2^-22) and scales by the inverse norms in its epilogue,
  optionally as DBSCAN's distance clip(1 - cos, 0, 2) with a zero diagonal.
- outlier suppression's top-k: torch's stable sort compiled to one slow kernel (10 us for
  6 rows of 196); pairwise comparisons in inductor fused unpredictably into their
  consumers (20 us). ``top_indices`` counts each token's place among all others in
  registers and writes the first k.

Only CUDA tensors; without Triton ``AVAILABLE`` is False and the torch code runs.
"""
from typing import Optional

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except ImportError:  # CPU-only installs
    AVAILABLE = False
ENABLED = AVAILABLE  # False: always the torch code (tests compare the two)
TILE = 64  # closure: output tile and inner step
COSINE_TILE, COSINE_STEP = 64, 64  # half rows take twice the step
COSINE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TOP_MAX_TOKENS = 8192  # top_indices: a program compares a chunk of tokens with all N

if AVAILABLE:

    @triton.jit
    def _square_clamped_kernel(reach_ptr, out_ptr, size, BLOCK: tl.constexpr):
        matrix = tl.program_id(0).to(tl.int64) * size * size
        rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        cols = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
        paths = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for start in range(0, size, BLOCK):
            inner = start + tl.arange(0, BLOCK)
            left = tl.load(reach_ptr + matrix + rows[:, None] * size + inner[None, :])
            right = tl.load(reach_ptr + matrix + inner[:, None] * size + cols[None, :])
            paths += tl.dot(left, right)
        tl.store(out_ptr + matrix + rows[:, None] * size + cols[None, :],
                 tl.minimum(paths, 1.0).to(tl.float16))

    @triton.jit
    def _cosine_kernel(x_ptr, scale_ptr, out_ptr, num, dim, batch_stride, row_stride,
                       SCALED: tl.constexpr, DISTANCE: tl.constexpr, TF32X3: tl.constexpr,
                       BLOCK: tl.constexpr, STEP: tl.constexpr):
        batch = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        cols = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
        is_row, is_col = rows < num, cols < num
        base = x_ptr + batch * batch_stride
        values = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for start in range(0, dim, STEP):
            inner = start + tl.arange(0, STEP)
            in_dim = inner < dim
            left = tl.load(base + rows[:, None] * row_stride + inner[None, :],
                           mask=is_row[:, None] & in_dim[None, :], other=0.0)
            right = tl.load(base + cols[None, :] * row_stride + inner[:, None],
                            mask=is_col[None, :] & in_dim[:, None], other=0.0)
            if TF32X3:  # float32 rows
                values = tl.dot(left, right, values, input_precision='tf32x3')
            else:  # fp16 or bf16 rows: exact products
                values = tl.dot(left, right, values)
        if SCALED:  # x_i . x_j / (|x_i| |x_j|)
            row_scale = tl.load(scale_ptr + batch * num + rows, mask=is_row, other=0.0)
            col_scale = tl.load(scale_ptr + batch * num + cols, mask=is_col, other=0.0)
            values = values * row_scale[:, None] * col_scale[None, :]
        if DISTANCE:
            values = tl.minimum(tl.maximum(1 - values, 0.0), 2.0)
            values = tl.where(rows[:, None] == cols[None, :], 0.0, values)
        tl.store(out_ptr + batch * num * num + rows[:, None] * num + cols[None, :], values,
                 mask=is_row[:, None] & is_col[None, :])


    @triton.jit
    def _top_indices_kernel(scores_ptr, out_ptr, num, top_k, KEYS: tl.constexpr,
                            CHUNK: tl.constexpr):
        crop = tl.program_id(0).to(tl.int64)
        mine = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
        other = tl.arange(0, KEYS)
        score = tl.load(scores_ptr + crop * num + mine, mask=mine < num, other=0.0)
        others = tl.load(scores_ptr + crop * num + other, mask=other < num, other=0.0)
        nan, nan_other = score != score, others != others
        tie = (others[None, :] == score[:, None]) | (nan_other[None, :] & nan[:, None])
        ahead = ((others[None, :] > score[:, None]) | (nan_other[None, :] & ~nan[:, None])
                 | (tie & (other[None, :] < mine[:, None])))  # j goes before i
        rank = tl.sum((ahead & (other < num)[None, :]).to(tl.int32), axis=1)
        tl.store(out_ptr + crop * top_k + rank, mine.to(tl.int64),
                 mask=(mine < num) & (rank < top_k))


def supports(tensor: Tensor) -> bool:
    """Whether the kernels run on this tensor's device."""
    return ENABLED and tensor.is_cuda


def supports_cosine(features: Tensor) -> bool:
    """Whether ``cosine_matrix`` takes these (B, N, D) features."""
    return supports(features) and features.dtype in COSINE_DTYPES


def padded_size(num: int) -> int:
    """The matrix side ``square_clamped`` takes: ``num`` rounded up to a multiple of
    ``TILE``."""
    return -(-num // TILE) * TILE


def square_clamped(reach: Tensor) -> Tensor:
    """min(R @ R, 1) of (B, n, n) contiguous 0/1 fp16 CUDA matrices, n a multiple of
    ``TILE`` (``padded_size``)."""
    batch, size = reach.shape[:2]
    squared = torch.empty_like(reach)
    if squared.numel():
        _square_clamped_kernel[(batch, size // TILE, size // TILE)](reach, squared, size,
                                                                     BLOCK=TILE)
    return squared


def cosine_matrix(rows: Tensor, inverse_norms: Optional[Tensor] = None,
                  distance: bool = False) -> Tensor:
    """(B, N, N) float32 dot products of the (B, N, D) CUDA rows (fp16, bf16 or float32;
    may be strided), times ``inverse_norms`` (B, N) of both rows if given: the cosine
    matrix of unit rows, or of any rows with their inverse norms. ``distance``: clip(1 -
    cos, 0, 2) with a zero diagonal instead."""
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    batch, num, dim = rows.shape
    out = torch.empty((batch, num, num), dtype=torch.float32, device=rows.device)
    if out.numel():
        tiles = triton.cdiv(num, COSINE_TILE)
        scale = rows if inverse_norms is None else inverse_norms.float().contiguous()
        _cosine_kernel[(batch, tiles, tiles)](
            rows, scale, out, num, dim, rows.stride(0), rows.stride(1),
            SCALED=inverse_norms is not None, DISTANCE=distance,
            TF32X3=rows.dtype == torch.float32, BLOCK=COSINE_TILE,
            STEP=COSINE_STEP if rows.dtype == torch.float32 else 2 * COSINE_STEP)
    return out



def supports_top_indices(scores: Tensor) -> bool:
    """Whether ``top_indices`` takes these (B, N) scores."""
    return (supports(scores) and scores.dtype == torch.float32
            and scores.shape[-1] <= TOP_MAX_TOKENS)


def top_indices(scores: Tensor, top_k: int) -> Tensor:
    """(B, k) long indices of the k = min(top_k, N) highest of the (B, N) float32 CUDA
    scores, descending, as a stable descending sort orders them (NaN first, ties to the
    lower index): each token's place is counted from comparisons with all others, and
    the first k places are written (the places are distinct, so no write conflicts)."""
    scores = scores.contiguous()
    batch, num = scores.shape
    top_k = min(top_k, num)
    indices = torch.empty((batch, top_k), dtype=torch.long, device=scores.device)
    if indices.numel():
        keys = max(16, triton.next_power_of_2(num))
        chunk = max(1, min(64, 8192 // keys))
        _top_indices_kernel[(batch, triton.cdiv(num, chunk))](scores, indices, num, top_k,
                                                               KEYS=keys, CHUNK=chunk)
    return indices
