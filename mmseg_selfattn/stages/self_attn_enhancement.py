"""Stage 3: self-attention enhancement (SPEC §1.3), the seed's method.

From the last block's standard attention A (head mean, CLS at index 0) each
patch token i gets a self-attention deficit

    e_i = max(0, τ - A_ii)                 τ = ``min_self_attn_threshold``

and, with strength s = ``enhancement_strength``:

- ``mode='feature'``:   X_i <- (1 + s e_i) X_i
- ``mode='attention'``: in the dense attention P (after softmax, every head)
  P_ii <- P_ii + s e_i, then row i is rescaled to its original row sum (1 for
  one softmax, 2 for sclip's sum of two); the head outputs P @ V and the rest
  of the dense block are recomputed by the encoder. maskclip has no P: no-op.

Tokens with A_ii >= τ (e_i = 0) and the CLS row are untouched in both modes.

Honest note: 1 + s e_i > 0, so rescaling X_i leaves cos(X_i, t) unchanged for
every text query t. ``mode='feature'`` changes the segmentation only through
later stages that mix or shift features: neighbour averaging (outlier
suppression), the fixed-size CLS subtraction (global debias removes
factor * cos(X_i, x_cls) * x_cls, whose size does not grow with |X_i|, so a
longer X_i is debiased relatively less; likewise CTD), and cluster prototypes
(means of differently scaled tokens). ``mode='attention'`` changes the
features directly.

``enhancement_strength=0`` or ``min_self_attn_threshold=0`` is neutral: the
features come back unchanged and ``probs_hook`` is None.
"""
import math
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from mmseg.registry import MODELS
from torch import Tensor, nn

from ..config_checks import check_choice, check_number
from ..startup_log import log_enabled

CFG_KEY = 'self_attn_enhancement_cfg'
MODES = ('feature', 'attention')
STRENGTH_MODES = ('fixed', 'entropy', 'cls_ratio')
Strength = Union[float, Tensor]  # s, or s_i per patch token (B, N)


def self_attention_deficit(attention: Tensor, threshold: float) -> Tensor:
    """e (B, N): max(0, threshold - A_ii) for the patch tokens of A (B, T, T)."""
    patch_self_attention = attention.diagonal(dim1=-2, dim2=-1)[..., 1:]
    return (threshold - patch_self_attention).clamp_min(0)


def enhance_features(features: Tensor, deficit: Tensor, strength: Strength) -> Tensor:
    """X_i <- (1 + strength * e_i) X_i for features (B, N, D) and deficit (B, N); a
    per-token strength is (B, N)."""
    if not isinstance(strength, Tensor) and strength == 0:
        return features
    scale = 1 + strength * deficit.to(features.dtype)
    return features * scale.unsqueeze(-1)


def boost_self_attention(probs: Tensor, deficit: Tensor, strength: Strength) -> Tensor:
    """P_ii <- P_ii + strength * e_i for the patch tokens, same boost for every head,
    then each boosted row rescaled to its original sum (B, H, T, T).

    Rows with no boost (CLS, e_i = 0) are returned bitwise unchanged. The sums
    are taken from P itself, so sclip's rows keep summing to 2. Computed in fp32.
    """
    boost = strength * deficit.float()  # (B, N)
    boost = torch.nn.functional.pad(boost, (1, 0))[:, None, :]  # (B, 1, T), CLS: 0
    original = probs.float()
    diagonal = torch.diag_embed(boost)  # (B, 1, T, T)
    boosted = original + diagonal
    original_sum = original.sum(dim=-1, keepdim=True)
    boosted_sum = boosted.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    rescaled = (boosted * (original_sum / boosted_sum)).to(probs.dtype)
    return torch.where((boost > 0).unsqueeze(-1), rescaled, probs)


def enhanced_attention(attention: Tensor, deficit: Tensor, strength: Strength) -> Tensor:
    """Ã (B, T, T): the standard attention A with its patch diagonal boosted,
    Ã_ii = A_ii + strength * e_i, each boosted row rescaled to its original sum (the
    CLS row is unchanged). Outlier suppression scores with it (``score_attention``)."""
    return boost_self_attention(attention[:, None], deficit, strength)[:, 0]


def token_strength(attention: Tensor, strength: float, strength_mode: str = 'fixed',
                   ratio_ref: float = 1.0) -> Strength:
    """Dynamic strength (the seed's extension) from the standard attention A (B, T, T):

    - 'fixed':     s
    - 'entropy':   s_i = s * H_i / log T, H_i the entropy of token i's row of A: tokens
                   with diffuse attention get more (a one-hot row 0, a uniform row s);
    - 'cls_ratio': s_i = s * min(1, r_i / ratio_ref), r_i = A[cls,i] / (A[i,i] + 1e-6):
                   tokens dominated by the CLS get more.
    """
    if strength_mode == 'fixed':
        return strength
    attention = attention.float()
    if strength_mode == 'entropy':
        rows = attention[:, 1:]  # the patch tokens' rows (B, N, T)
        entropy = -(rows * rows.clamp_min(torch.finfo(rows.dtype).tiny).log()).sum(dim=-1)
        return strength * entropy / math.log(attention.shape[-1])
    ratio = attention[:, 0, 1:] / (attention.diagonal(dim1=-2, dim2=-1)[:, 1:] + 1e-6)
    return strength * (ratio / ratio_ref).clamp(max=1)


def self_attention_stats(attention: Tensor, threshold: float) -> Dict[str, float]:
    """mean, std (ddof=0), min, max of the patch diagonal A_ii (i >= 1) of A (B, T, T)
    or (T, T), and the fraction of patch tokens with A_ii < threshold."""
    if attention.dim() not in (2, 3) or attention.shape[-1] != attention.shape[-2]:
        raise ValueError(f'attention must be (T, T) or (B, T, T), got {tuple(attention.shape)}.')
    if attention.shape[-1] < 2:
        raise ValueError('attention has no patch tokens (T = 1): no statistics.')
    patch_self_attention = attention.diagonal(dim1=-2, dim2=-1)[..., 1:].double().flatten()
    return {
        'mean': patch_self_attention.mean().item(),
        'std': patch_self_attention.std(correction=0).item(),
        'min': patch_self_attention.min().item(),
        'max': patch_self_attention.max().item(),
        'below_threshold': (patch_self_attention < threshold).double().mean().item(),
    }


@MODELS.register_module()
class SelfAttentionEnhancement(nn.Module):
    """Boosts patch tokens whose self-attention A_ii is below a threshold (SPEC §1.3).

    Segmentor use: ``deficit = stage.deficit(encoded.attention)``; then in
    ``'attention'`` mode pass ``stage.probs_hook(deficit)`` as ``probs_hook`` to
    ``DenseCLIPEncoder.dense_features``, in ``'feature'`` mode apply
    ``stage.enhance_features(X, deficit)`` to its output. The methods do not
    look at ``mode``; the caller picks by it.

    Args:
        enhancement_strength: s >= 0 (0 = off).
        min_self_attn_threshold: τ in [0, 1]; tokens with A_ii < τ are boosted.
        mode: ``'feature'`` or ``'attention'``.
        strength_mode: ``'fixed'`` (s for every token), ``'entropy'`` or ``'cls_ratio'``
            (a strength s_i per token, ``token_strength``).
        ratio_ref: r_i at which 'cls_ratio' reaches the full strength s, > 0.
        layers: ViT blocks to enhance (0-based, negative from the end; -1 = the dense
            last block, the default). In an earlier block, 'attention' mode boosts that
            block's softmax attention diagonal (rows renormalised) and 'feature' mode
            scales its output tokens by (1 + s e_i), e_i from that block's own attention
            (fixed strength, ``min_self_attn_threshold``); ``enhancement_strength`` may
            then be one value per layer.
        class_thresholds: {class name: τ in [0, 1]}: a token's τ is that of its class
            (argmax under the unenhanced features; the segmentor resolves the names);
            other classes use ``min_self_attn_threshold``.
    """
    cfg_key = CFG_KEY

    def __init__(self,
                 enhancement_strength: float = 0.1,
                 min_self_attn_threshold: float = 0.15,
                 mode: str = 'feature',
                 strength_mode: str = 'fixed',
                 ratio_ref: float = 1.0,
                 class_thresholds: Optional[Dict[str, float]] = None,
                 layers: Sequence[int] = (-1, )):
        super().__init__()
        self.layers = _check_layers(layers)
        self.layer_strengths = _check_strengths(enhancement_strength, len(self.layers))
        # s of the dense last block; set by resolve_layers when the layer list names it
        # otherwise than -1
        self.strength = dict(zip(self.layers, self.layer_strengths)).get(-1, 0.0)
        self.threshold = check_number(f'{CFG_KEY}.min_self_attn_threshold',
                                      min_self_attn_threshold, 0, 1)
        self.mode = check_choice(f'{CFG_KEY}.mode', mode, MODES)
        self.strength_mode = check_choice(f'{CFG_KEY}.strength_mode', strength_mode,
                                          STRENGTH_MODES)
        self.ratio_ref = check_number(f'{CFG_KEY}.ratio_ref', ratio_ref, 0, math.inf,
                                      low_open=True, high_open=True)
        self.class_thresholds = _check_class_thresholds(class_thresholds)
        log_enabled('Self-Attention Enhancement', self.extra_repr())

    def resolve_layers(self, num_blocks: int) -> Dict[int, float]:
        """Checks the layers against a ViT of ``num_blocks`` blocks, sets ``strength`` (the
        dense last block's, 0 if not listed) and returns {earlier block index: s} of the
        earlier blocks with s > 0 (none when τ = 0)."""
        resolved = {}
        for layer, strength in zip(self.layers, self.layer_strengths):
            index = layer + num_blocks if layer < 0 else layer
            if not 0 <= index < num_blocks:
                raise ValueError(f'{CFG_KEY}.layers: block {layer} is out of range: the ViT '
                                 f'has {num_blocks} blocks (0..{num_blocks - 1}, or -1 for the '
                                 'dense last block).')
            if index in resolved:
                raise ValueError(f'{CFG_KEY}.layers: block {index} is listed twice '
                                 f'({list(self.layers)}).')
            resolved[index] = strength
        self.strength = resolved.pop(num_blocks - 1, 0.0)
        return {index: strength for index, strength in resolved.items()
                if strength > 0 and self.threshold > 0}

    @property
    def is_neutral(self) -> bool:
        """True when no token can change (strength 0, or every threshold 0)."""
        return self.strength == 0 or (self.threshold == 0 and not any(
            (self.class_thresholds or {}).values()))

    def deficit(self, attention: Tensor) -> Tensor:
        """e (B, N) from the standard attention A (B, T, T)."""
        return self_attention_deficit(attention, self.threshold)

    def token_strength(self, attention: Tensor) -> Strength:
        """s, or s_i (B, N) per patch token with a dynamic ``strength_mode``."""
        return token_strength(attention, self.strength, self.strength_mode, self.ratio_ref)

    def enhance_features(self, features: Tensor, deficit: Tensor,
                         strength: Optional[Strength] = None) -> Tensor:
        """'feature' mode: X (B, N, D) -> (1 + s e_i) X_i (``strength``: s or s_i, default
        s); the input itself when neutral."""
        if self.is_neutral:
            return features
        return enhance_features(features, deficit,
                                self.strength if strength is None else strength)

    def probs_hook(self, deficit: Tensor, strength: Optional[Strength] = None
                   ) -> Optional[Callable[[Tensor], Tensor]]:
        """'attention' mode: edit of the dense attention P (B, H, T, T) for
        ``dense_features(probs_hook=...)``; None when neutral."""
        if self.is_neutral:
            return None
        strength = self.strength if strength is None else strength
        return lambda probs: boost_self_attention(probs, deficit, strength)

    def get_self_attention_stats(self, attn_weights: Tensor) -> Dict[str, float]:
        """Statistics of the patch diagonal of A (B, T, T) or (T, T): keys ``mean, std,
        min, max, below_threshold`` (Python floats; std with ddof=0)."""
        return self_attention_stats(attn_weights, self.threshold)

    def extra_repr(self) -> str:
        dynamic = '' if self.strength_mode == 'fixed' else (
            f', strength_mode={self.strength_mode}'
            + (f', ratio_ref={self.ratio_ref}' if self.strength_mode == 'cls_ratio' else ''))
        classes = '' if not self.class_thresholds else (
            f', class_thresholds={self.class_thresholds}')
        strength = (self.layer_strengths[0] if len(self.layer_strengths) == 1
                    else list(self.layer_strengths))
        layers = '' if self.layers == (-1, ) else f', layers={list(self.layers)}'
        return (f'strength={strength}, threshold={self.threshold}, mode={self.mode}'
                + layers + dynamic + classes)


def _check_layers(layers) -> Tuple[int, ...]:
    values = tuple(layers) if isinstance(layers, (list, tuple)) else (layers, )
    if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ValueError(f'{CFG_KEY}.layers must be a non-empty list of ViT block indices '
                         f'(-1 = the dense last block), got {layers!r}.')
    return values


def _check_strengths(strength, num_layers: int) -> Tuple[float, ...]:
    key = f'{CFG_KEY}.enhancement_strength'
    if isinstance(strength, (list, tuple)):
        if len(strength) != num_layers:
            raise ValueError(f'{key}: {len(strength)} values for {num_layers} layer(s); give '
                             'one number, or one per entry of layers.')
        return tuple(check_number(f'{key}[{i}]', value, 0, math.inf, high_open=True)
                     for i, value in enumerate(strength))
    value = check_number(key, strength, 0, math.inf, high_open=True)
    return (value, ) * num_layers


def _check_class_thresholds(value) -> Optional[Dict[str, float]]:
    key = f'{CFG_KEY}.class_thresholds'
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(name, str) for name in value):
        raise ValueError(f"{key} must be a dict {{class name: threshold}}, e.g. "
                         f"{{'person': 0.2, 'sky': 0.1}}, got {value!r}.")
    return {name: check_number(f'{key}[{name!r}]', tau, 0, 1) for name, tau in value.items()}
