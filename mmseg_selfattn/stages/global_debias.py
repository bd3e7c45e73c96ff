"""Stage 5, global debiasing (SPEC §1.5): remove the image-level CLS from every token.

Feature form, with x_cls CLIP's projected CLS embedding (not normalised)::

    X_i <- X_i - factor * cos(X_i, x_cls) * x_cls

Logit form (SegEarth-OV style ``cls_token_lambda``), added to every location's
cosine logits cos(X_i, t_q) by the segmentor::

    logits[i, q] += lambda * cos(x_cls, t_q)

SegEarth-OV uses a negative lambda (subtracting the CLS's class evidence).
Zero-norm vectors have cosine 0, so nothing here can produce NaN.
"""
import torch
from mmseg.registry import MODELS
from torch import Tensor, nn

from ..config_checks import check_number
from ..startup_log import log_enabled
from .vectors import unit_vectors


def global_debias(features: Tensor, x_cls: Tensor, factor: float) -> Tensor:
    """X_i - factor * cos(X_i, x_cls) * x_cls for features (B, N, D) and x_cls (B, D).

    ``factor == 0`` returns ``features`` itself.
    """
    if factor == 0:
        return features
    x_cls = x_cls[:, None, :]  # (B, 1, D)
    cosines = (unit_vectors(features) * unit_vectors(x_cls)).sum(dim=-1, keepdim=True)
    return features - (factor * cosines).to(features.dtype) * x_cls.to(features.dtype)


def cls_logit_bias(x_cls: Tensor, queries: Tensor, cls_token_lambda: float) -> Tensor:
    """lambda * cos(x_cls, t_q): (B, D) and unit-norm text queries (Q, D) -> (B, 1, Q).

    Broadcasts over the locations of (B, N, Q) logits. ``queries`` are taken as given
    (L2-normalised, as the classifier uses them); x_cls is normalised here.
    """
    unit_cls = unit_vectors(x_cls)
    dtype = torch.promote_types(unit_cls.dtype, queries.dtype)
    return (cls_token_lambda * (unit_cls.to(dtype) @ queries.to(dtype).T))[:, None, :]


@MODELS.register_module()
class GlobalDebias(nn.Module):
    """Feature-level global debias, X_i -= factor * cos(X_i, x_cls) * x_cls.

    Args:
        factor: strength (0 = the stage returns its input unchanged).
    """
    cfg_key = 'global_debias_cfg'

    def __init__(self, factor: float = 0.2):
        super().__init__()
        self.factor = check_number(f'{self.cfg_key}.factor', factor, 0)
        log_enabled('Global Debias', self.extra_repr())

    def forward(self, features: Tensor, x_cls: Tensor) -> Tensor:
        """features (B, N, D), x_cls (B, D) -> (B, N, D)."""
        if features.shape[0] != x_cls.shape[0] or features.shape[-1] != x_cls.shape[-1]:
            raise ValueError(f'global debias: features {tuple(features.shape)} and x_cls '
                             f'{tuple(x_cls.shape)} disagree; expected (B, N, D) and (B, D).')
        return global_debias(features, x_cls, self.factor)

    def extra_repr(self) -> str:
        return f'factor={self.factor}'
