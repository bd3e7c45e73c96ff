"""The published methods' way of running CLIP, kept as a yardstick for speed and equality.

SCLIP / NACLIP / ClearCLIP / SC-CLIP convert CLIP to fp16 and send the sliding-window
crops through it one at a time. Blocks 1..L-1 are CLIP's own residual blocks, whose
``nn.MultiheadAttention`` takes torch's fused inference path; only the last block is
written by hand (``torch.bmm`` + softmax in the model's dtype). ``ReferenceEncoder``
does exactly that on the weights of a ``DenseCLIPEncoder`` and offers the same
interface, so ``tools/benchmark.py`` can swap it into a segmentor (with
``max_crops_per_forward=1``) and measure our speed-up at equal output.
"""
import copy
from collections import OrderedDict
from typing import List, Optional, Sequence, Set

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dense_attention import ProbsHook, gaussian_window
from .encoder import DenseCLIPEncoder, EncodedCrops
from .image_engine import ImageEngine
from .postprocess import finite_per_image
from .sliding_window import WindowMerge, published_slide_inference


class ReferenceEncoder(DenseCLIPEncoder):
    """CLIP's own blocks 1..L-1 and a hand-written (bmm) last block, on a copy of the tower
    in ``dtype``."""

    def __init__(self, encoder: DenseCLIPEncoder, dtype: torch.dtype = torch.float16):
        if encoder.variant is None:
            raise NotImplementedError("the reference loop has no published-style SC-CLIP "
                                      "block (attention='scclip'); tests/test_scclip.py "
                                      'holds its re-derivation.')
        visual = copy.deepcopy(encoder.visual).to(dtype)
        super().__init__(visual, encoder.attention_name, encoder.gaussian_std)
        self.dtype = dtype

    def encode(self, crops: Tensor, capture_attention: bool = False,
               mid_layers: Sequence[int] = (), block_edits: Optional[dict] = None
               ) -> EncodedCrops:
        if block_edits:
            raise NotImplementedError('the reference loop (published-style blocks) has no '
                                      'layer-wise self-attention enhancement of earlier '
                                      'blocks (self_attn_enhancement_cfg.layers).')
        visual = self.visual
        grid = (crops.shape[-2] // self.patch_size[0], crops.shape[-1] // self.patch_size[1])
        x = visual.conv1(crops.to(self.dtype)).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype) + torch.zeros_like(x[:, :1])
        x = visual.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding(grid))
        mid_layers = {self.block_index(layer) for layer in mid_layers}
        mid_features = {}
        for index, block in enumerate(visual.transformer.resblocks[:-1]):
            x = block(x)  # CLIP's block: nn.MultiheadAttention's fused inference path
            if index in mid_layers:
                mid_features[index] = x[:, 1:]
        last = visual.transformer.resblocks[-1]
        q, k, v = self._qkv(last, x)
        weights = F.softmax(_bmm_logits(q, k), dim=-1)
        standard = x + last.ls_1(self._merge_heads(last, _bmm(weights, v)))
        standard = standard + last.ls_2(last.mlp(last.ln_2(standard)))
        x_cls = visual.ln_post(standard[:, 0]) @ visual.proj
        attention = weights.float().mean(dim=1) if capture_attention else None
        return EncodedCrops(grid=grid, block_input=x, q=q, k=k, v=v, x_cls=x_cls,
                            attention=attention, mid_features=mid_features)

    def dense_features(self, encoded: EncodedCrops, logit_bias: Optional[Tensor] = None,
                       probs_hook: Optional[ProbsHook] = None) -> Tensor:
        q, k, v = encoded.q, encoded.k, encoded.v
        name = self.attention_name
        bias = 0 if logit_bias is None else logit_bias[:, None].to(q.dtype)
        if name == 'naclip':
            bias = bias + gaussian_window(encoded.grid, self.gaussian_std, q.device, q.dtype)
        if name == 'maskclip':
            heads = v
        else:
            if name == 'vanilla':
                weights = F.softmax(_bmm_logits(q, k) + bias, dim=-1)
            elif name == 'sclip':
                weights = (F.softmax(_bmm_logits(q, q) + bias, dim=-1) +
                           F.softmax(_bmm_logits(k, k) + bias, dim=-1))
            elif name == 'clearclip':
                weights = F.softmax(_bmm_logits(q, q) + bias, dim=-1)
            elif name == 'naclip':
                weights = F.softmax(_bmm_logits(k, k) + bias, dim=-1)
            else:  # gated
                gate = torch.sigmoid(_bmm_logits(q, q))
                weights = F.softmax(gate * _bmm_logits(k, k) + bias, dim=-1)
            if probs_hook is not None:
                weights = probs_hook(weights).to(v.dtype)
            heads = _bmm(weights, v)
        last = self.visual.transformer.resblocks[-1]
        x = self._merge_heads(last, heads)
        if self.variant.keep_residual:
            x = encoded.block_input + last.ls_1(x)
            x = x + last.ls_2(last.mlp(last.ln_2(x)))
        return self.visual.ln_post(x[:, 1:]) @ self.visual.proj


def _bmm_logits(a: Tensor, b: Tensor) -> Tensor:
    """Scaled a b^T per head with heads folded into the batch, as the published code."""
    batch, heads, tokens, dim = a.shape
    logits = torch.bmm(a.reshape(-1, tokens, dim), b.reshape(-1, tokens, dim).transpose(1, 2))
    return (logits * dim**-0.5).view(batch, heads, tokens, tokens)


def _bmm(weights: Tensor, v: Tensor) -> Tensor:
    batch, heads, tokens, dim = v.shape
    return torch.bmm(weights.reshape(-1, tokens, tokens), v.reshape(-1, tokens, dim)).view(
        batch, heads, tokens, dim)


def reference_loop(segmentor: nn.Module, dtype: torch.dtype = torch.float16):
    """A copy of ``segmentor`` that runs like the published code: ``ReferenceEncoder`` in
    ``dtype``, one crop per forward, each crop upsampled, padded into the image and
    added (``published_slide_inference``). Text embeddings, stages and post-processing
    are shared."""
    pipeline = copy.copy(segmentor.pipeline)
    pipeline._modules = OrderedDict(segmentor.pipeline._modules)
    pipeline.encoder = ReferenceEncoder(segmentor.pipeline.encoder, dtype)
    pipeline.compile = False  # eager, as the published code
    pipeline.vit_dtype = dtype
    engine = object.__new__(PublishedImageEngine)
    engine.__dict__.update(segmentor.engine.__dict__)
    engine.pipeline, engine.max_crops_per_forward, engine.cuda_graph = pipeline, 1, False
    reference = copy.copy(segmentor)
    reference._modules = OrderedDict(segmentor._modules)
    reference.pipeline, reference.engine, reference.vit_dtype = pipeline, engine, dtype
    return reference


class PublishedImageEngine(ImageEngine):
    """``ImageEngine`` whose window merge is the published one, image by image."""

    def merged_logits(self, images: Tensor, merge: WindowMerge, encoded=None) -> Tensor:
        return torch.stack(published_slide_inference(self, list(images),
                                                     [merge.output_size] * len(images)))

    def segment_images(self, images: Tensor, merge: WindowMerge,
                       encoded: Optional[Sequence[EncodedCrops]] = None):
        """Probabilities, labels and finite flags on the published merge (then PAMR)."""
        if encoded is not None:
            raise NotImplementedError('the reference loop encodes its crops itself, one at a '
                                      'time')
        logits = self.merged_logits(images, merge)
        if self.pamr is not None:
            logits = self.pamr_refined(images, logits)
        probs, labels = self.segment_logits(logits)
        return probs, labels, finite_per_image(probs)


def outlier_choices(segmentor: nn.Module, image: Tensor) -> List[Set[int]]:
    """The patch indices that outlier suppression chose in each window of one image
    (``slide_inference``, eager), in window order: the pipeline and the reference loop
    can be compared choice by choice (``tools/benchmark.py``)."""
    chosen = []

    def record(outlier_indices=None, **_):
        if outlier_indices is not None:
            chosen.extend(set(row[row >= 0].tolist()) for row in outlier_indices)

    segmentor.pipeline.recorder = record
    try:
        segmentor.engine.slide_inference(image)
    finally:
        segmentor.pipeline.recorder = None
    return chosen
