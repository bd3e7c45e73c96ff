"""Vector helpers shared by the stages."""
import torch
from torch import Tensor


def unit_vectors(features: Tensor) -> Tensor:
    """L2-normalised in at least float32; zero vectors stay zero (cosine 0, never NaN)."""
    features = features.to(torch.promote_types(features.dtype, torch.float32))
    norms = features.norm(dim=-1, keepdim=True)
    return features / norms.clamp_min(torch.finfo(features.dtype).tiny)
