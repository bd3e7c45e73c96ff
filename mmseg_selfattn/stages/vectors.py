"""Vector helpers shared by the stages."""
import torch
from torch import Tensor

from . import kernels


def unit_vectors(features: Tensor) -> Tensor:
    """L2-normalised in at least float32; zero vectors stay zero (cosine 0, never NaN)."""
    features = features.to(torch.promote_types(features.dtype, torch.float32))
    norms = features.norm(dim=-1, keepdim=True)
    return features / norms.clamp_min(torch.finfo(features.dtype).tiny)


def cosine_matrix(features: Tensor, distance: bool = False) -> Tensor:
    """(B, N, D) -> (B, N, N) cos(x_i, x_j) in float32 (float64 for float64 features); a
    zero vector has cosine 0 with everything. ``distance``: scikit-learn's cosine
    distance clip(1 - cos, 0, 2) instead, with a zero diagonal.

    On CUDA one Triton kernel (``kernels.cosine_matrix``, float32 accuracy on the tensor
    cores); fp16 rows go in as they are, with their inverse norms (their dot products
    cannot overflow float32), others are normalised first.
    """
    if kernels.supports_cosine(features):
        if features.dtype == torch.float16:
            inverse_norms = 1 / features.float().norm(dim=-1).clamp_min(
                torch.finfo(torch.float32).tiny)
            return kernels.cosine_matrix(features, inverse_norms, distance)
        return kernels.cosine_matrix(unit_vectors(features), distance=distance)
    unit = unit_vectors(features)
    cosine = unit @ unit.transpose(-2, -1)
    if not distance:
        return cosine
    cosine = (1 - cosine).clamp_(0, 2)
    cosine.diagonal(dim1=-2, dim2=-1).zero_()
    return cosine
