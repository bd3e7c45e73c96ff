"""Stage 2: similarity enhancement of the dense attention (SPEC §1.2).

The patch features x_i^mid of one or more mid blocks say which tokens look
alike before the last block mixes them. Their cosine similarity, averaged
over the configured layers,

    S_ij = mean_l cos(x_i^l, x_j^l)                      (i, j patch tokens)

is added to the dense attention logits of every head (and of both terms of
sclip) before the softmax:

    logits_ij += weight * S_ij / temperature

- ``add_self_similarity=False``: the diagonal gets no bias (S_ii = 1 would
  otherwise favour every token's own value).
- ``threshold``: entries with S_ij < threshold are dropped (bias -inf). A
  token's own entry is never dropped (S_ii = 1 by definition; rounding must
  not remove it at threshold = 1), and the CLS row and column get bias 0, so
  no row is ever fully masked and the softmax never produces NaN.

``weight=0`` without a threshold is the neutral setting: ``attention_bias``
returns None and the pipeline is bitwise the one without this stage.
"""
import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from mmseg.registry import MODELS
from torch import Tensor, nn

from ..config_checks import check_bool, check_number
from ..startup_log import log_enabled
from .vectors import cosine_matrix

CFG_KEY = 'similarity_enhancement_cfg'


def mid_layer_similarity(mid_features: Sequence[Tensor]) -> Tensor:
    """S (B, N, N): cosine similarity of the patch features, averaged over the layers.

    Args:
        mid_features: one (B, N, C) tensor per mid layer (C may differ per layer).

    Returns:
        S in the dtype of the first layer's features, computed in float32
        (``cosine_matrix``). A zero feature vector has similarity 0 to everything (no NaN).
    """
    if len(mid_features) == 0:
        raise ValueError('mid_layer_similarity needs the features of at least one layer.')
    similarity = None
    for features in mid_features:
        layer_similarity = cosine_matrix(features)
        similarity = layer_similarity if similarity is None else similarity + layer_similarity
    return (similarity / len(mid_features)).to(mid_features[0].dtype)


def similarity_logit_bias(similarity: Tensor,
                          weight: float,
                          temperature: float = 1.0,
                          add_self_similarity: bool = True,
                          threshold: Optional[float] = None) -> Tensor:
    """Attention logit bias (B, T, T), T = 1 + N, from the patch similarity S (B, N, N).

    bias_ij = weight * S_ij / temperature on the patch block; 0 on the diagonal
    if not ``add_self_similarity``; -inf where S_ij < ``threshold`` (off the
    diagonal); 0 on the CLS row and column. Same dtype and device as S.
    """
    num_patches = similarity.shape[-1]
    bias = similarity * (weight / temperature)
    own_token = torch.eye(num_patches, dtype=torch.bool, device=similarity.device)
    if threshold is not None and threshold > -1:
        dropped = (similarity < threshold) & ~own_token
        bias = bias.masked_fill(dropped, float('-inf'))
    if not add_self_similarity:
        bias = bias.masked_fill(own_token, 0)
    return F.pad(bias, (1, 0, 1, 0))  # CLS row and column: bias 0


@MODELS.register_module()
class SimilarityEnhancement(nn.Module):
    """Mid-layer similarity as an extra dense-attention logit (SPEC §1.2).

    Build with ``MODELS.build(dict(type='SimilarityEnhancement', **cfg))``; the
    segmentor passes ``attention_bias(...)`` as ``logit_bias`` to
    ``DenseCLIPEncoder.dense_features``.

    Args:
        layer: 0-based ViT block index, or a non-empty list of them, whose patch
            outputs give S (negative counts from the end; never the last block,
            checked against the ViT by the segmentor via ``encoder.block_index``).
        weight: scale of the bias, >= 0 (0 without threshold = off).
        temperature: divides the bias, > 0.
        add_self_similarity: keep the diagonal S_ii in the bias.
        threshold: None, or drop (mask) token pairs with S_ij below it, in [-1, 1].
    """
    cfg_key = CFG_KEY

    def __init__(self,
                 layer: Union[int, Sequence[int]] = -4,
                 weight: float = 1.0,
                 temperature: float = 1.0,
                 add_self_similarity: bool = True,
                 threshold: Optional[float] = None):
        super().__init__()
        self.layers: Tuple[int, ...] = _check_layers(f'{CFG_KEY}.layer', layer)
        self.weight = check_number(f'{CFG_KEY}.weight', weight, 0, math.inf, high_open=True)
        self.temperature = check_number(f'{CFG_KEY}.temperature', temperature, 0, math.inf,
                                        low_open=True, high_open=True)
        self.add_self_similarity = check_bool(f'{CFG_KEY}.add_self_similarity',
                                               add_self_similarity)
        self.threshold = None if threshold is None else check_number(
            f'{CFG_KEY}.threshold', threshold, -1, 1)
        log_enabled('Similarity Enhancement', self.extra_repr())

    @property
    def is_neutral(self) -> bool:
        """True when the bias would change nothing (weight 0, no effective threshold)."""
        return self.weight == 0 and (self.threshold is None or self.threshold <= -1)

    def attention_bias(self, mid_features: Sequence[Tensor]) -> Optional[Tensor]:
        """Logit bias (B, T, T) from the patch features (B, N, C) of ``self.layers``,
        given in that order; None when the stage is neutral."""
        if self.is_neutral:
            return None
        if len(mid_features) != len(self.layers):
            raise ValueError(f'{CFG_KEY}: expected the features of {len(self.layers)} '
                             f'layer(s) {list(self.layers)}, got {len(mid_features)}.')
        return similarity_logit_bias(mid_layer_similarity(mid_features), self.weight,
                                     self.temperature, self.add_self_similarity, self.threshold)

    def extra_repr(self) -> str:
        return (f'layers={self.layers}, weight={self.weight}, temperature={self.temperature}, '
                f'add_self_similarity={self.add_self_similarity}, threshold={self.threshold}')


def _check_layers(key: str, layer) -> Tuple[int, ...]:
    layers = tuple(layer) if isinstance(layer, (list, tuple)) else (layer, )
    if not layers or any(isinstance(index, bool) or not isinstance(index, int)
                         for index in layers):
        raise ValueError(f'{key} must be an int or a non-empty list of ints (0-based ViT block '
                         f'indices, negative from the end, not the last block), got {layer!r}.')
    return layers

