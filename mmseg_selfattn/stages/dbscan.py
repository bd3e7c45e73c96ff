"""DBSCAN on cosine distance, batched over crops, in torch (used by CTD, SPEC §1.6).

Same definitions as scikit-learn's ``DBSCAN(eps, min_samples, metric='cosine')``:

    d(x_i, x_j) = clip(1 - <x_i/|x_i|, x_j/|x_j|>, 0, 2)          (zero rows stay zero)
    Nb(i)       = {j : d(x_i, x_j) <= eps}, i itself always included
    core(i)     = |Nb(i)| >= min_samples
    clusters    = connected components of the core points under d <= eps
    border i    = non-core point with a core point in Nb(i): joins the cluster of its
                  nearest core neighbour (ties -> lowest index)
    noise       = everything else, label -1

scikit-learn gives a border point to whichever cluster reaches it first in its
scan order; "nearest core" is one deterministic choice among the valid ones.
Clusters are numbered 0..K-1 per crop in the order of their lowest-index core
point, which is scikit-learn's numbering too.

Connected components, two exact ways to the same roots:

- CPU: min-label propagation over the core-core adjacency with hooking and
  pointer jumping (a Shiloach-Vishkin style scheme): each round is O(B N^2)
  elementwise work and it takes O(log N) rounds in practice, with one
  convergence test per round.
- GPU: the transitive closure by ceil(log2 N) boolean matrix squarings (fp16
  tensor-core matmuls of 0/1 matrices, clamped to 1 in the same Triton kernel,
  ``kernels.py``): a fixed amount of work, no host sync, so it can be
  captured in a CUDA graph.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels
from .vectors import cosine_matrix


def cosine_distance(features: Tensor) -> Tensor:
    """(B, N, D) -> (B, N, N) cosine distance in [0, 2], as scikit-learn computes it.

    In float32 (float64 for float64 features; ``cosine_matrix``); the diagonal is 0 (a
    point is its own neighbour, also a zero vector).
    """
    return cosine_matrix(features, distance=True)  # zero rows: cosine 0, as sklearn's


def connected_components(adjacency: Tensor) -> Tensor:
    """Root of every node's component: the lowest node index in it.

    Args:
        adjacency: (B, N, N) symmetric bool.

    Returns:
        (B, N) long; nodes with no edge are their own root.
    """
    if adjacency.is_cuda:
        return components_by_closure(adjacency)
    return components_by_propagation(adjacency)


def components_by_closure(adjacency: Tensor) -> Tensor:
    """``connected_components`` from reachability R = (I + adjacency)^(2^r) > 0, with
    2^r >= N - 1 (no host sync)."""
    num = adjacency.shape[-1]
    eye = torch.eye(num, dtype=torch.bool, device=adjacency.device)
    squarings = max(num - 1, 1).bit_length()
    if kernels.supports(adjacency):  # one launch per squaring, clamp fused
        pad = kernels.padded_size(num) - num
        reach = F.pad((adjacency | eye).half(), (0, pad, 0, pad))
        for _ in range(squarings):
            reach = kernels.square_clamped(reach)
        reach = reach[..., :num, :num]
    else:
        # fp16 matmul of 0/1 entries on GPU; CPU half matmuls are slow, use fp32 there
        reach = (adjacency | eye).to(torch.float16 if adjacency.is_cuda else torch.float32)
        for _ in range(squarings):
            # 0/1 entries: a path count > 0 stays > 0
            reach = torch.bmm(reach, reach).clamp_(max=1)
    index = torch.arange(num, device=adjacency.device)
    return torch.where(reach > 0, index, num).amin(dim=-1)


def components_by_propagation(adjacency: Tensor) -> Tensor:
    """``connected_components`` by label propagation, stopping at convergence."""
    batch, num = adjacency.shape[:2]
    roots = torch.arange(num, device=adjacency.device).expand(batch, num).contiguous()
    # N rounds of plain min-propagation always converge; hooking makes it far fewer
    for _ in range(num):
        # int32 halves the (B, N, N) temporary; indices < N fit
        neighbour_min = torch.where(adjacency, roots.int()[:, None, :], num).amin(-1).long()
        neighbour_min = torch.minimum(neighbour_min, roots)
        # hook: the root of i adopts the smallest label seen by i
        hooked = roots.scatter_reduce(1, roots, neighbour_min, reduce='amin')
        hooked = torch.minimum(hooked, neighbour_min)
        # pointer jumping, twice: labels point ever closer to the component root
        hooked = hooked.gather(1, hooked)
        hooked = hooked.gather(1, hooked)
        if torch.equal(hooked, roots):
            break
        roots = hooked
    return roots


def dbscan(features: Tensor, eps: float, min_samples: int) -> Tuple[Tensor, Tensor]:
    """DBSCAN with cosine distance on each of B crops at once.

    Args:
        features: (B, N, D) token features (any float dtype, any device).
        eps: neighbourhood radius in cosine distance, in (0, 2].
        min_samples: neighbourhood size (self included) that makes a core point.

    Returns:
        labels: (B, N) long, clusters 0..K-1 per crop, -1 for noise.
        core: (B, N) bool, the core points.
    """
    if features.dim() != 3:
        raise ValueError(f'dbscan expects features of shape (B, N, D), got {tuple(features.shape)}')
    batch, num = features.shape[:2]
    device = features.device
    if num == 0:
        return (torch.empty(batch, 0, dtype=torch.long, device=device),
                torch.empty(batch, 0, dtype=torch.bool, device=device))

    distance = cosine_distance(features)  # (B, N, N)
    neighbours = distance <= eps
    core = neighbours.sum(-1) >= min_samples  # (B, N)

    core_links = neighbours & core[:, :, None] & core[:, None, :]
    roots = connected_components(core_links)
    index = torch.arange(num, device=device)
    is_root = core & (roots == index)
    cluster_of_root = is_root.long().cumsum(-1) - 1  # roots numbered 0..K-1 in index order
    core_labels = torch.where(core, cluster_of_root.gather(1, roots), -1)

    # border points: the cluster of the nearest core neighbour (argmin takes the first tie)
    core_distance = distance.masked_fill(~(neighbours & core[:, None, :]), float('inf'))
    nearest_distance, nearest_core = core_distance.min(-1)
    reached = torch.isfinite(nearest_distance)
    labels = torch.where(core, core_labels,
                         torch.where(reached, core_labels.gather(1, nearest_core), -1))
    return labels, core
