"""CTD, cluster-based token debiasing: stage 6 of the pipeline (SPEC §1.6).

The patch tokens X of each crop are clustered with DBSCAN on cosine distance
(``eps``, ``min_samples``; noise label -1, see ``dbscan.py``). For each cluster
k with token set C_k:

    p_k     = mean_{i in C_k} X_i                       (prototype)
    s_k     = cos(p_k, x_cls)
    shift_k = scale * s_k * x_cls / |x_cls|
    X_i    <- (1 - beta) X_i + beta p_k - shift_k      for i in C_k, beta = refine

With beta = 0 this is SPEC's X_i <- X_i - shift_k. With beta > 0 the token is
pulled towards the prototype of the *already shifted* cluster, p_k - shift_k
(the mean of the shifted tokens), so the refine step does not re-introduce the
CLS component that the shift removed. Noise tokens are returned untouched.
A zero x_cls gives no shift; an empty or zero prototype gives s_k = 0.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from mmseg.registry import MODELS
from torch import Tensor, nn

from ..config_checks import check_int, check_number
from ..startup_log import log_enabled
from .dbscan import dbscan


def cluster_prototypes(features: Tensor, labels: Tensor) -> Tensor:
    """Mean feature of every cluster, gathered back to its tokens.

    Clusters are padded to N slots per crop (K <= N), so no host sync is needed
    to learn K; noise tokens go to an extra slot that is never read back. The sums
    are one membership matmul (deterministic, unlike a float scatter-add).

    Args:
        features: (B, N, D).
        labels: (B, N) long, 0..K-1 or -1 for noise.

    Returns:
        (B, N, D) p_{label(i)} for every token i (zeros for noise tokens).
    """
    batch, num, dim = features.shape
    slots = torch.where(labels < 0, num, labels)  # noise -> slot N
    membership = (slots[:, None, :] == torch.arange(num + 1, device=features.device)[:, None]
                  ).to(features.dtype)  # (B, N + 1 slots, N tokens)
    sums = membership @ features
    counts = membership.sum(dim=-1, keepdim=True)
    prototypes = sums / counts.clamp_min(1)  # empty slots stay 0
    prototypes[:, num] = 0
    return prototypes.gather(1, slots[..., None].expand(-1, -1, dim))


def cluster_token_debias(features: Tensor, x_cls: Tensor, labels: Tensor,
                         scale: float, refine: float = 0.0) -> Tensor:
    """Shift every clustered token along x_cls by its cluster's CLS similarity.

    Args:
        features: (B, N, D) patch features X.
        x_cls: (B, D) CLS image embedding.
        labels: (B, N) long cluster labels, -1 = noise (untouched).
        scale: strength of the shift (SPEC ``scale``).
        refine: beta in [0, 1], pull towards the shifted cluster prototype.

    Returns:
        (B, N, D) debiased features, same dtype as ``features``.
    """
    # accumulate cluster sums in fp32 or wider (fp16 sums of many tokens overflow)
    work = features.to(torch.promote_types(features.dtype, torch.float32))
    prototypes = cluster_prototypes(work, labels)  # (B, N, D) p_k per token
    cls_direction = F.normalize(x_cls.to(work.dtype), dim=-1)[:, None, :]  # (B, 1, D)
    similarity = (F.normalize(prototypes, dim=-1) * cls_direction).sum(-1, keepdim=True)
    shift = scale * similarity * cls_direction  # (B, N, D) shift_k per token
    if refine:
        debiased = (1 - refine) * work + refine * prototypes - shift
    else:
        debiased = work - shift
    return torch.where((labels < 0)[..., None], features, debiased.to(features.dtype))


@MODELS.register_module()
class ClusterTokenDebias(nn.Module):
    """CTD stage (``apply_ctd`` / ``ctd_cfg``): DBSCAN, then per-cluster debiasing.

    Args:
        eps: DBSCAN radius in cosine distance, in (0, 2].
        min_samples: DBSCAN neighbourhood size (self included) for a core point, >= 1.
        scale: shift strength, >= 0.
        refine: beta in [0, 1], pull of each token towards its shifted prototype.

    ``last_labels`` keeps the (B, N) cluster labels of the latest call (None when
    the stage is a no-op) for diagnostics.
    """
    cfg_key = 'ctd_cfg'

    def __init__(self, eps: float = 0.2, min_samples: int = 4, scale: float = 0.5,
                 refine: float = 0.0):
        super().__init__()
        self.eps = check_number(f'{self.cfg_key}.eps', eps, 0, 2, low_open=True)
        self.min_samples = check_int(f'{self.cfg_key}.min_samples', min_samples, 1)
        self.scale = check_number(f'{self.cfg_key}.scale', scale, 0)
        self.refine = check_number(f'{self.cfg_key}.refine', refine, 0, 1)
        self.last_labels: Optional[Tensor] = None
        log_enabled('CTD', self.extra_repr())

    def forward(self, features: Tensor, x_cls: Tensor) -> Tensor:
        """features (B, N, D), x_cls (B, D) -> debiased features (B, N, D)."""
        if self.scale == 0 and self.refine == 0:
            self.last_labels = None
            return features
        labels, _ = dbscan(features.detach(), self.eps, self.min_samples)
        self.last_labels = labels
        return cluster_token_debias(features, x_cls, labels, self.scale, self.refine)

    def extra_repr(self) -> str:
        return (f'eps={self.eps}, min_samples={self.min_samples}, scale={self.scale}, '
                f'refine={self.refine}')
