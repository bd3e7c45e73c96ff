"""Dense CLIP image encoder: stage 1 of the pipeline (SPEC §1.1).

``encode`` runs the ViT on a batch of crops (positional embedding resized
bicubically to the crop's grid; blocks 1..L-1 untouched, through torch's fused
attention) and captures what the later stages need from the last block.
``dense_features`` then recomputes the last block in the configured dense
variant (``dense_attention.DENSE_VARIANTS``) to give the patch features X.
"""
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn

from . import attention_kernel
from .config_checks import check_number
from .dense_attention import (DENSE_VARIANTS, LogitTransform, ProbsHook, dense_attention,
                              gaussian_window)
from .resclip import AttentionMean
from .stages.self_attn_enhancement import boost_self_attention, self_attention_deficit

BlockEdit = Tuple[str, float, float]  # (mode, strength, threshold) of an earlier block
# dense_attention's variants plus SC-CLIP (scclip.py: its own last block, no standard one)
# and RF-CLIP (rfclip.py: its reduced two-branch block over the multi-layer kk attention)
ATTENTIONS = (*DENSE_VARIANTS, 'scclip', 'rfclip')
# naclip's window std in patches: below this the window is the identity, above it flat
GAUSSIAN_STD_RANGE = (0.01, 1e4)
MAX_RESIZED_POSITIONS = 64  # interpolated positional embeddings kept (one per patch grid)


@dataclass
class EncodedCrops:
    """What ``DenseCLIPEncoder.encode`` captures for B crops (T = 1 + N tokens)."""
    grid: Tuple[int, int]  # patch grid (h, w), N = h * w
    block_input: torch.Tensor  # (B, T, C) input of the last block
    # the standard last block (None when encoded without it: attention='scclip')
    q: Optional[torch.Tensor]  # (B, H, T, d) last block, per head
    k: Optional[torch.Tensor]
    v: Optional[torch.Tensor]
    x_cls: Optional[torch.Tensor]  # (B, D) projected CLS output of the standard forward
    attention: Optional[torch.Tensor] = None  # (B, T, T) standard softmax(q k^T), head mean
    mid_features: Dict[int, torch.Tensor] = field(default_factory=dict)  # block -> (B, N, C)
    # blocks -> (B, T, C) fp32 sum of their whole outputs, CLS row included (SC-CLIP's M)
    layer_sums: Dict[Tuple[int, ...], torch.Tensor] = field(default_factory=dict)
    # blocks -> (B, H, T, T) fp32 mean of their per-head softmax(q k^T) (ResCLIP's A_c)
    attention_means: Dict[Tuple[int, ...], torch.Tensor] = field(default_factory=dict)
    # the crops (B, 3, H, W) as given to ``CropPipeline.encode_crops`` (ResCLIP's PAMR guide)
    crops: Optional[torch.Tensor] = None
    # RF-CLIP: (B, T, C) fp32 mean of every block's (filtered) output, G; (B, H, N, N) fp32
    # sum of the kk layers' softmax(k k^T) on patch rows and columns
    layer_mean: Optional[torch.Tensor] = None
    kk_sum: Optional[torch.Tensor] = None
    # (B, D) CLIP embedding of each crop's whole image (RF-CLIP's global_image='whole'),
    # set by ``CropPipeline.attach_image_embeddings``
    global_embedding: Optional[torch.Tensor] = None
    # dense-block outputs X by the settings that decide them: segmentor variants with
    # equal dense settings share one (tools/sweep.py)
    dense_memo: Dict[tuple, torch.Tensor] = field(default_factory=dict)


def patch_embed_as_matmul(conv: nn.Conv2d, crops: torch.Tensor,
                          grid: Tuple[int, int]) -> torch.Tensor:
    """``conv(crops).flatten(2).transpose(1, 2)`` for a conv with kernel = stride, as one
    matmul over the unfolded patches: (B, 3, H, W) -> (B, h * w, C)."""
    (ph, pw), (h, w) = conv.kernel_size, grid
    patches = crops.unflatten(2, (h, ph)).unflatten(4, (w, pw))  # (B, 3, h, ph, w, pw)
    patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(crops.shape[0], h * w, -1)
    return F.linear(patches, conv.weight.flatten(1), conv.bias)


def head_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) per head, (B, H, T, T) fp32, from (B, H, T, d).

    The scale is applied inside the matmul (before the rounding to q's dtype) and the
    softmax reads the half-precision logits straight into fp32: three passes over the
    (B, H, T, T) logits instead of six. The keys are zero-padded to a multiple of 8
    (logits -inf, weight 0): rows of 197 tokens would send cuBLAS to its unaligned
    kernels; the result is a view of the first T columns."""
    batch, heads, tokens, dim = q.shape
    padded = tokens + -tokens % 8
    keys = F.pad(k.reshape(-1, tokens, dim), (0, 0, 0, padded - tokens))
    logits = torch.baddbmm(q.new_zeros(()), q.reshape(-1, tokens, dim), keys.transpose(1, 2),
                           beta=0, alpha=dim**-0.5)
    logits[..., tokens:] = float('-inf')
    # fp32 softmax: the stages divide by A_ii
    probs = logits.softmax(dim=-1, dtype=torch.float32)[..., :tokens]
    return probs.view(batch, heads, tokens, tokens)


def standard_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """A (B, T, T) fp32: the head mean of ``head_attention`` (on GPU in one Triton
    kernel, ``attention_kernel.py``)."""
    if attention_kernel.supports(q):
        return attention_kernel.standard_attention(q, k)
    return head_attention(q, k).mean(dim=1)


def explicit_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An open_clip residual block written out: LN, qkv, fused attention, out-projection,
    residual, LN, MLP, residual (what ``torch.compile`` fuses)."""
    q, k, v = DenseCLIPEncoder._qkv(block, x)
    heads = F.scaled_dot_product_attention(q, k, v)
    x = x + block.ls_1(DenseCLIPEncoder._merge_heads(block, heads))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


class DenseCLIPEncoder(nn.Module):
    """Wraps an open_clip ``VisionTransformer`` (weights shared, not copied).

    Args:
        visual: the CLIP image tower.
        attention: dense variant of the last block, a key of ``DENSE_VARIANTS``, or
            'scclip' (the last block is ``scclip.SCCLIPHead``'s, run by the pipeline).
        gaussian_std: std (in patches) of naclip's neighbourhood window, in
            ``GAUSSIAN_STD_RANGE``.
    """

    def __init__(self, visual: VisionTransformer, attention: str = 'naclip',
                 gaussian_std: float = 5.0):
        super().__init__()
        if not isinstance(attention, str) or attention not in ATTENTIONS:
            raise ValueError(f'attention={attention!r} is not a dense variant; '
                             f'choose one of {sorted(ATTENTIONS)}.')
        self.visual = visual
        self.variant = DENSE_VARIANTS.get(attention)  # None: scclip
        self.attention_name = attention
        self.gaussian_std = check_number('gaussian_std', gaussian_std, *GAUSSIAN_STD_RANGE)
        self.patch_size = visual.patch_size  # (ph, pw)
        self.num_blocks = len(visual.transformer.resblocks)
        self._resized_positions = {}  # grid -> (table stamp, embedding): see positional_embedding

    # -- stage 1: the standard forward, captured -------------------------------------------
    def encode(self, crops: torch.Tensor, capture_attention: bool = False,
               mid_layers: Sequence[int] = (),
               block_edits: Optional[Dict[int, BlockEdit]] = None,
               layer_sums: Sequence[Tuple[int, ...]] = (),
               last_block: bool = True,
               attention_means: Sequence[Tuple[int, ...]] = (),
               distraction_filter: Optional[nn.Module] = None,
               kk_layers: Optional[Sequence[int]] = None) -> EncodedCrops:
        """Run the ViT on crops (B, 3, H, W), H and W multiples of the patch size.

        Args:
            capture_attention: also return the head-averaged standard attention A.
            mid_layers: 0-based indices of blocks (not the last) whose patch outputs
                are returned in ``mid_features``.
            block_edits: {block index (not the last): (mode, strength, threshold)}:
                layer-wise self-attention enhancement of earlier blocks; only these
                blocks leave torch's fused attention.
            layer_sums: tuples of 0-based block indices (not the last): the fp32 sum of
                each tuple's whole block outputs (CLS row included) is returned in
                ``layer_sums`` under that tuple (SC-CLIP's fusion sum M); only the running
                sums are kept.
            last_block: also run the standard last block (q/k/v, x_cls); False leaves
                them None (SC-CLIP never runs it) and needs ``capture_attention=False``.
            attention_means: tuples of 0-based block indices (not the last): the fp32 mean
                of each tuple's per-head attention softmax(q k^T) (B, H, T, T) is returned
                in ``attention_means`` under that tuple (ResCLIP's A_c). These blocks run
                explicitly (one attention, its weights kept); only running sums are kept.
            distraction_filter: RF-CLIP's Phi (``rfclip.DistractionFilter``), applied to the
                output of each of its ``blocks`` (so A, x_cls and the mid features of every
                later block see it; the CLS row is never changed).
            kk_layers: RF-CLIP: 0-based earlier blocks whose per-head softmax(k k^T) is
                summed on patch rows and columns (``kk_sum``); also runs the whole standard
                last block and returns G (``layer_mean``, the mean of all block outputs).
                Needs ``last_block`` and takes no ``block_edits``.
        """
        block_edits = block_edits or {}
        if capture_attention and not last_block:
            raise ValueError('capture_attention needs the standard last block (last_block).')
        ph, pw = self.patch_size
        if crops.shape[-2] % ph or crops.shape[-1] % pw:
            raise ValueError(f'crop size {tuple(crops.shape[-2:])} is not a multiple of the '
                             f'patch size {self.patch_size}')
        grid = (crops.shape[-2] // ph, crops.shape[-1] // pw)
        blocks = self.visual.transformer.resblocks
        mid_layers = {self.block_index(layer) for layer in mid_layers}
        layer_sums = {tuple(self.block_index(layer) for layer in layers): tuple(layers)
                      for layers in layer_sums}

        means = {tuple(self.block_index(layer) for layer in layers): AttentionMean()
                 for layers in attention_means}

        filtered = () if distraction_filter is None else set(distraction_filter.blocks)
        if kk_layers is not None and (not last_block or block_edits):
            raise ValueError('kk_layers (RF-CLIP) needs the standard last block and takes no '
                             'block_edits.')
        kk_layers = None if kk_layers is None else set(kk_layers)
        kk_sum = layer_total = None

        x = self._embed(crops, grid)
        mid_features, sums = {}, {}
        for index, block in enumerate(blocks[:-1]):
            edit = block_edits.get(index)
            keep = [mean for layers, mean in means.items() if index in layers]
            if kk_layers is not None:
                if index in kk_layers or keep:
                    q, k, v = self._qkv(block, x)
                    if index in kk_layers:
                        kk = head_attention(k, k)[..., 1:, 1:]
                        kk_sum = kk if kk_sum is None else kk_sum.add_(kk)
                    if keep:  # a sweep's ResCLIP variant shares this encoding
                        probs = head_attention(q, k)
                        for mean in keep:
                            mean.add(probs)
                        heads = probs.to(v.dtype) @ v
                    else:
                        heads = F.scaled_dot_product_attention(q, k, v)
                    x = x + block.ls_1(self._merge_heads(block, heads))
                    x = x + block.ls_2(block.mlp(block.ln_2(x)))
                else:
                    x = self.run_block(block, x)
            elif edit is not None:
                x = self._enhanced_block(block, x, *edit, keep=keep)
            elif keep:
                x = self._enhanced_block(block, x, None, 0.0, 0.0, keep=keep)
            else:
                x = self.run_block(block, x)
            if index in filtered:
                x = distraction_filter(x, grid)
            if kk_layers is not None:
                layer_total = x.float() if layer_total is None else layer_total + x
            if index in mid_layers:
                mid_features[index] = x[:, 1:]
            for layers in layer_sums:
                if index in layers:
                    sums[layers] = x.float() if layers not in sums else sums[layers] + x
        sums = {requested: sums[layers] for layers, requested in layer_sums.items()
                if layers}
        attention_means = {tuple(requested): means[tuple(self.block_index(layer)
                                                         for layer in requested)].value()
                           for requested in attention_means}
        if not last_block:
            return EncodedCrops(grid=grid, block_input=x, q=None, k=None, v=None, x_cls=None,
                                mid_features=mid_features, layer_sums=sums,
                                attention_means=attention_means)
        last = blocks[-1]
        q, k, v = self._qkv(last, x)
        layer_mean = None
        if kk_layers is not None:  # RF-CLIP: the whole standard last block, for G
            out = x + last.ls_1(self._merge_heads(last, F.scaled_dot_product_attention(q, k,
                                                                                      v)))
            out = out + last.ls_2(last.mlp(last.ln_2(out)))
            cls_token = out[:, :1]
            if self.num_blocks - 1 in filtered:
                out = distraction_filter(out, grid)
            layer_total = out.float() if layer_total is None else layer_total + out
            layer_mean = layer_total / self.num_blocks
            if kk_sum is None:  # no earlier kk layer: a zero sum
                kk_sum = q.new_zeros(q.shape[0], q.shape[1], grid[0] * grid[1],
                                     grid[0] * grid[1], dtype=torch.float32)
        else:
            # CLS output of the standard forward: only its query row is needed.
            cls_heads = F.scaled_dot_product_attention(q[:, :, :1], k, v)
            cls_token = x[:, :1] + last.ls_1(self._merge_heads(last, cls_heads))
            cls_token = cls_token + last.ls_2(last.mlp(last.ln_2(cls_token)))
        x_cls = self.visual.ln_post(cls_token[:, 0]) @ self.visual.proj

        attention = standard_attention(q, k) if capture_attention else None
        return EncodedCrops(grid=grid, block_input=x, q=q, k=k, v=v, x_cls=x_cls,
                            attention=attention, mid_features=mid_features, layer_sums=sums,
                            attention_means=attention_means, layer_mean=layer_mean,
                            kk_sum=kk_sum)

    def run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """An earlier block as CLIP runs it (torch's fused attention); ``compile_blocks``
        swaps in a compiled explicit version."""
        return block(x)

    def compile_blocks(self) -> None:
        """Blocks 1..L-1 through ``torch.compile`` of ``explicit_block`` (one graph for
        all blocks): LayerNorm, residual adds and bias fused into fewer kernels (GPU)."""
        # emulate_precision_casts: round between fused ops as eager does (half precision),
        # so the compiled blocks give eager's numbers, not more precise different ones
        self.run_block = torch.compile(explicit_block, fullgraph=True, dynamic=False,
                                       options={'emulate_precision_casts': True})

    def _enhanced_block(self, block: nn.Module, x: torch.Tensor, mode: Optional[str],
                        strength: float, threshold: float,
                        keep: Sequence[AttentionMean] = ()) -> torch.Tensor:
        """An earlier block with self-attention enhancement from its own attention A:
        'attention' boosts the diagonal of its softmax attention (rows renormalised),
        'feature' scales its output patch tokens by (1 + s e_i); ``mode=None``: the block
        as it is, explicitly. Its per-head attention (before any boost) is added to every
        running mean of ``keep`` (ResCLIP's RCS)."""
        q, k, v = self._qkv(block, x)
        probs = head_attention(q, k)
        for mean in keep:
            mean.add(probs)
        if mode is None:
            x = x + block.ls_1(self._merge_heads(block, probs.to(v.dtype) @ v))
            return x + block.ls_2(block.mlp(block.ln_2(x)))
        deficit = self_attention_deficit(probs.mean(dim=1), threshold)
        if mode == 'attention':
            probs = boost_self_attention(probs, deficit, strength)
        x = x + block.ls_1(self._merge_heads(block, probs.to(v.dtype) @ v))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        if mode == 'feature':
            scale = (1 + strength * deficit).to(x.dtype)[..., None]
            x = torch.cat([x[:, :1], x[:, 1:] * scale], dim=1)
        return x

    # -- stage 1b: the dense last block ---------------------------------------------------
    def dense_features(self, encoded: EncodedCrops, logit_bias: Optional[torch.Tensor] = None,
                       probs_hook: Optional[ProbsHook] = None,
                       logit_transform: Optional[LogitTransform] = None) -> torch.Tensor:
        """Patch features X (B, N, D) of the last block recomputed in the dense variant.

        Args:
            logit_bias: (B, T, T) extra attention logits for every head (stage 2).
            probs_hook: edits the dense attention P (B, H, T, T) before P @ V (stage 3,
                ResCLIP's RCS).
            logit_transform: edits each scaled logit term before naclip's window and
                ``logit_bias`` are added (ResCLIP's SFR).
        """
        if self.variant is None:
            raise ValueError(f'attention={self.attention_name!r} has its own last block: '
                             'scclip.SCCLIPHead / rfclip.RFCLIPHead (CropPipeline.dense_block '
                             'runs it).')
        last = self.visual.transformer.resblocks[-1]
        bias = None if logit_bias is None else logit_bias.unsqueeze(1).to(encoded.q.dtype)
        if self.variant.gaussian_window:
            window = gaussian_window(encoded.grid, self.gaussian_std, encoded.q.device,
                                     encoded.q.dtype)
            bias = window if bias is None else bias + window
        heads = dense_attention(self.variant, encoded.q, encoded.k, encoded.v, bias, probs_hook,
                                logit_transform)
        x = self._merge_heads(last, heads)
        if self.variant.keep_residual:
            x = encoded.block_input + last.ls_1(x)
            x = x + last.ls_2(last.mlp(last.ln_2(x)))
        return self.visual.ln_post(x[:, 1:]) @ self.visual.proj

    # -- helpers ---------------------------------------------------------------------------
    def block_index(self, layer: int) -> int:
        """0-based index of a mid block (negative counts from the end); the last block is
        the dense one and cannot be a mid layer."""
        index = layer + self.num_blocks if layer < 0 else layer
        if not 0 <= index < self.num_blocks - 1:
            raise ValueError(f'mid layer {layer} is out of range: the ViT has '
                             f'{self.num_blocks} blocks and the last one is the dense block; '
                             f'use 0..{self.num_blocks - 2} (or negative indices).')
        return index

    def _embed(self, crops: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        visual = self.visual
        x = self._patch_embed(crops, grid)  # (B, N, C)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding(grid).to(x.dtype)
        return visual.ln_pre(x)

    def _patch_embed(self, crops: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """conv1 (kernel = stride = patch) as one matmul over the unfolded patches on GPU,
        where cuDNN picks a slow non-tensor-core kernel for it in half precision."""
        if crops.is_cuda:
            return patch_embed_as_matmul(self.visual.conv1, crops, grid)
        return self.visual.conv1(crops).flatten(2).transpose(1, 2)

    def positional_embedding(self, grid: Tuple[int, int]) -> torch.Tensor:
        """(1+N, C) positional embedding for a patch grid, as SCLIP / NACLIP / ClearCLIP
        compute it (DINO's rule): the trained table as it is when the token count is the
        trained one (their test; so also for a 7 x 28 grid of a 14 x 14 table), else
        bicubic ``F.interpolate`` by the scale factors ((g_h + 0.1) / n_h,
        (g_w + 0.1) / n_w), not to a target size, which samples other source positions."""
        pos = self.visual.positional_embedding
        native = tuple(self.visual.grid_size)
        if grid[0] * grid[1] == native[0] * native[1]:
            return pos
        # torch's CUDA bicubic kernel loops over the C channels in each of the g_h * g_w
        # threads (2.4 ms per call at VOC's grids on an H200): kept per grid, keyed on the
        # table itself and its version (a replaced, moved or reloaded table computes again)
        grid = tuple(grid)
        cached = self._resized_positions.get(grid)
        if cached is not None and cached[0][0] is pos and cached[0][1] == pos._version:
            return cached[1]
        stamp = (pos, pos._version)
        resized = self._resized_position_table(pos, grid, native)
        capturing = pos.is_cuda and torch.cuda.is_current_stream_capturing()
        if not (capturing  # a graph's pool owns what it allocates
                or (torch.is_grad_enabled() and pos.requires_grad)):
            if len(self._resized_positions) >= MAX_RESIZED_POSITIONS:
                self._resized_positions.pop(next(iter(self._resized_positions)))
            self._resized_positions[grid] = (stamp, resized)
        return resized

    @staticmethod
    def _resized_position_table(pos: torch.Tensor, grid: Tuple[int, int],
                                native: Tuple[int, int]) -> torch.Tensor:
        patch_pos = pos[1:].reshape(1, *native, -1).permute(0, 3, 1, 2)
        scale = tuple((size + 0.1) / trained for size, trained in zip(grid, native))
        patch_pos = F.interpolate(patch_pos.float(), scale_factor=scale, mode='bicubic',
                                  align_corners=False).to(pos.dtype)
        assert tuple(patch_pos.shape[-2:]) == tuple(grid), (patch_pos.shape, grid)
        return torch.cat([pos[:1], patch_pos[0].flatten(1).transpose(0, 1)], dim=0)

    @staticmethod
    def _qkv(block: nn.Module, x: torch.Tensor):
        attn = block.attn
        qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        batch, tokens, _ = qkv.shape
        qkv = qkv.view(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]  # each (B, H, T, d)

    @staticmethod
    def _merge_heads(block: nn.Module, heads: torch.Tensor) -> torch.Tensor:
        batch, _, tokens, _ = heads.shape
        merged = heads.transpose(1, 2).reshape(batch, tokens, -1)
        return F.linear(merged, block.attn.out_proj.weight, block.attn.out_proj.bias)
