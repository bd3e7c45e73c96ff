"""Dense variants of the last block's attention (SPEC §3), described as data.

Each variant is a sum of softmax terms over (query source, key source) pairs
of the head's q/k, scaled by 1/sqrt(head_dim), and says whether the last
block keeps its residual and FFN:

| name      | attention                                  | residual / FFN |
| --------- | ------------------------------------------ | -------------- |
| vanilla   | softmax(q k^T)                             | kept           |
| maskclip  | identity (value embedding only)            | dropped        |
| sclip     | softmax(q q^T) + softmax(k k^T)            | kept           |
| clearclip | softmax(q q^T)                             | dropped        |
| naclip    | softmax(k k^T + gaussian window)           | dropped        |
| gated     | softmax(sigmoid(q q^T) * (k k^T))          | dropped        |

Extra logits (``logit_bias``, e.g. stage 2's similarity) are added to every
term before its softmax; a ``logit_transform`` (ResCLIP's SFR) edits each term's
scaled logits before that bias. Without a probability hook or a transform the
terms run through fused ``scaled_dot_product_attention``; the explicit path
materialises P for hooks that edit it (stage 3, attention mode; ResCLIP's RCS).
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

ProbsHook = Callable[[torch.Tensor], torch.Tensor]
# (B, H, T, T) fp32 scaled logits of one term -> the same, before the bias (ResCLIP's SFR)
LogitTransform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DenseVariant:
    terms: Tuple[Tuple[str, str], ...]  # (query source, key source) of each softmax term
    keep_residual: bool  # keep the last block's residual and FFN
    gaussian_window: bool = False  # naclip: neighbourhood prior on the patch grid
    gated: bool = False  # one term softmax(sigmoid(q q^T) * (k k^T))

    @property
    def row_sum(self) -> int:
        """Row sum of the attention P: the number of softmax terms."""
        return 1 if self.gated else len(self.terms)


DENSE_VARIANTS: Dict[str, DenseVariant] = {
    'vanilla': DenseVariant(terms=(('q', 'k'), ), keep_residual=True),
    'maskclip': DenseVariant(terms=(), keep_residual=False),
    'sclip': DenseVariant(terms=(('q', 'q'), ('k', 'k')), keep_residual=True),
    'clearclip': DenseVariant(terms=(('q', 'q'), ), keep_residual=False),
    'naclip': DenseVariant(terms=(('k', 'k'), ), keep_residual=False, gaussian_window=True),
    'gated': DenseVariant(terms=(('q', 'q'), ('k', 'k')), keep_residual=False, gated=True),
}


def gaussian_window(grid: Tuple[int, int], std: float, device=None,
                    dtype=torch.float32) -> torch.Tensor:
    """NACLIP's prior, (1+N, 1+N): exp(-|p - p'|^2 / (2 std^2)) between patches, 0 for CLS."""
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                                torch.arange(w, device=device, dtype=torch.float32),
                                indexing='ij')
    rows, cols = rows.flatten(), cols.flatten()
    squared = (rows[:, None] - rows[None]).square() + (cols[:, None] - cols[None]).square()
    return F.pad(torch.exp(-squared / (2 * std**2)), (1, 0, 1, 0)).to(dtype)


def dense_attention(variant: DenseVariant,
                    q: torch.Tensor,
                    k: torch.Tensor,
                    v: torch.Tensor,
                    logit_bias: Optional[torch.Tensor] = None,
                    probs_hook: Optional[ProbsHook] = None,
                    logit_transform: Optional[LogitTransform] = None) -> torch.Tensor:
    """Head outputs of a dense variant.

    Args:
        q, k, v: (B, H, T, d) per-head projections of the last block's input.
        logit_bias: added to the scaled logits of every term, broadcastable to
            (B, H, T, T); may contain -inf (never a whole row).
        probs_hook: edits the summed attention P (B, H, T, T) before P @ V.
        logit_transform: edits each term's scaled fp32 logits (B, H, T, T) before
            ``logit_bias`` is added (ResCLIP's SFR: before naclip's window too).

    Returns:
        (B, H, T, d).
    """
    if not variant.terms:  # maskclip: each token keeps its own value
        return v
    sources = {'q': q, 'k': k}
    if probs_hook is None and logit_transform is None and not variant.gated:
        return sum(F.scaled_dot_product_attention(sources[a], sources[b], v, attn_mask=logit_bias)
                   for a, b in variant.terms)
    probs = attention_probs(variant, q, k, logit_bias, logit_transform)
    if probs_hook is not None:
        probs = probs_hook(probs)
    return probs @ v


def attention_probs(variant: DenseVariant,
                    q: torch.Tensor,
                    k: torch.Tensor,
                    logit_bias: Optional[torch.Tensor] = None,
                    logit_transform: Optional[LogitTransform] = None) -> torch.Tensor:
    """The variant's attention P (B, H, T, T), softmax in fp32; rows sum to ``row_sum``.
    ``logit_transform`` edits each term's scaled logits, before the bias (not with
    ``gated``: its product of terms has no single logit to transform)."""
    scale = q.shape[-1]**-0.5
    sources = {'q': q, 'k': k}
    logits = [(sources[a] @ sources[b].transpose(-2, -1)).float() * scale
              for a, b in variant.terms]
    if logit_transform is not None:
        if variant.gated:
            raise ValueError('a logit transform does not apply to the gated variant')
        logits = [logit_transform(term) for term in logits]
    if variant.gated:
        logits = [torch.sigmoid(logits[0]) * logits[1]]
    if logit_bias is not None:
        logits = [term + logit_bias.float() for term in logits]
    return sum(term.softmax(dim=-1) for term in logits).to(q.dtype)
