"""RF-CLIP, ReFocusing CLIP (AAAI 2026, arXiv 2511.16170, liblacklucy/RF-CLIP at c2b333e).

Contract: ``../shared/methods/rf-clip.md``. Three parts, batched over crops with every
statistic taken per crop (the published code assumes batch 1). z^b is the (1+N) x C
output of block b (0-based, b = 0..L-1) after the distraction filter, P(z) its patch rows
(row-major h x w), z_0 its CLS row, unit(v) = v / |v|.

1. Distraction filter Phi (``apply_distraction_filter``, ``distraction_filter_cfg``),
   an encoder option applied after every block, so it changes the residual stream (A,
   x_cls, the mid features) of every later block::

       p   = (f - min f) / max(sum(f - min f), 1e-8)          per patch token f (C,)
       phi = max_{c in D} p_c,  flagged iff phi > sigma / C
       f  <- (1 - alpha) f + alpha Box(f)      flagged tokens; Box = 3 x 3 grid mean,
                                                zero padding, always / 9; CLS unchanged

2. ``attention='rfclip'``: the reduced last block over two inputs, with the key-key
   attention of every layer averaged (``rfclip_features``)::

       G      = (1/L) sum_{b=0..L-1} z^b                       (all rows)
       S_ij   = cos(P(G)_i, P(G)_j),  S_ij <- 0 where S_ij < beta   (no row normalisation)
       u      in {z^{L-2}, G}, P(u) <- S P(u)  (CLS row kept)
       K^b_h  = softmax(k_b k_b^T / sqrt d) over 1+N tokens (k_b from ln_1(z^{b-1}))
       A_h(u) = (1/L) [sum_{b<L-1} K^b_h + K^{L-1}_h(u)] on patch rows and columns
       O(u)   = out_proj(concat_h A_h(u) P(v_h(u))),  X = ln_post(mean_u O(u)) proj

   The encoder keeps one running sum of K^b (B, H, N, N) and one of z^b (B, 1+N, C),
   never L maps.

3. Text refinement (``apply_text_refinement``, ``text_refinement_cfg``) and the global mix
   (``global_semantics_weight`` gamma, ``global_image``), CASS's: the queries are
   clustered once per class list (complete linkage on cosine distance, cut at
   ``cluster_threshold``), then per crop and cluster K: r = argmax_{q in K} g.t_q, the
   ``top_k`` patches with the largest X_n.t_r, m = unit(mean of their unit X_n),
   t~_r = unit((1 - a) t_r + a m); the other queries keep t_q. Logits
   l_nq = (1 - gamma) unit(X_n).t~_q + gamma unit(g).t_q.
"""
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config_checks import build_checked, check_bool, check_choice, check_int, check_number
from .scclip import layer_norm
from .startup_log import log_enabled

FILTER_KEY = 'distraction_filter_cfg'
RFCLIP_KEY = 'rfclip_cfg'
REFINE_KEY = 'text_refinement_cfg'
# the published distraction channels (clip/model.py), valid for OpenAI's ViT-B/16 only
PUBLISHED_CHANNELS = {'ViT-B-16': (4, 162, 189, 326, 429, 474, 633, 713)}
SHIFT_EPS = 1e-8  # max(sum(f - min f), 1e-8), as published
BRANCHES = ('block_input', 'layer_mean')
GLOBAL_IMAGES = ('whole', 'crop')


# -- 1. the distraction filter ----------------------------------------------------------------
def distraction_mask(patches: Tensor, channels: Tensor, sigma: float,
                     shift_by_min: bool = True) -> Tensor:
    """(B, N) bool: phi > sigma / C for patch tokens (B, N, C), computed in their dtype
    (fp16 on CUDA, as the published code decides). ``shift_by_min=False``: the paper's
    p = f / sum(f) instead of the code's min-shifted form."""
    width = patches.shape[-1]
    shifted = patches - patches.amin(dim=-1, keepdim=True) if shift_by_min else patches
    total = shifted.sum(dim=-1, keepdim=True).clamp_min(SHIFT_EPS)
    phi = (shifted.index_select(-1, channels) / total).amax(dim=-1)
    return phi > sigma / width


def box_mean(patches: Tensor, grid: Tuple[int, int]) -> Tensor:
    """3 x 3 grid mean with zero padding, always divided by 9: (B, N, C) -> (B, N, C)."""
    batch, num, width = patches.shape
    image = patches.transpose(1, 2).reshape(batch, width, *grid)
    box = F.avg_pool2d(image, 3, stride=1, padding=1, count_include_pad=True)
    return box.flatten(2).transpose(1, 2)


def distraction_filter(x: Tensor, grid: Tuple[int, int], channels: Tensor, sigma: float = 5.0,
                       alpha: float = 0.4, shift_by_min: bool = True) -> Tensor:
    """Phi on a block output x (B, 1+N, C): flagged patch tokens -> (1 - alpha) f +
    alpha Box(f) (Box over the unfiltered tokens); other tokens and the CLS unchanged."""
    patches = x[:, 1:]
    flagged = distraction_mask(patches, channels, sigma, shift_by_min)
    smoothed = (1 - alpha) * patches + alpha * box_mean(patches, grid)
    patches = torch.where(flagged[..., None], smoothed.to(x.dtype), patches)
    return torch.cat([x[:, :1], patches], dim=1)


class DistractionFilter(nn.Module):
    """Phi after every block (``apply_distraction_filter``), set by ``distraction_filter_cfg``.

    Args:
        channels: the residual-stream channels D; None = the published list of the arch
            (OpenAI ViT-B/16 only: ``PUBLISHED_CHANNELS``), any other arch needs a list.
        sigma: tau = sigma / C (published 5).
        alpha: the smoothing weight (published 0.4), in [0, 1]; 0 = identity.
        layers: 'all' (every block, the last included) or 0-based block indices.
        shift_by_min: the code's p = (f - min f) / sum(f - min f) (True) or the paper's
            f / sum(f) (False, a correction; off in the presets).
    """

    def __init__(self, channels: Optional[Sequence[int]] = None, sigma: float = 5.0,
                 alpha: float = 0.4, layers: Union[str, Sequence[int]] = 'all',
                 shift_by_min: bool = True):
        super().__init__()
        if channels is not None and (
                not isinstance(channels, (list, tuple)) or not channels
                or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in channels)):
            raise ValueError(f'{FILTER_KEY}.channels must be None (the published list of '
                             'OpenAI ViT-B/16) or a non-empty list of channel indices >= 0, '
                             f'got {channels!r}.')
        self.channels = None if channels is None else tuple(channels)
        self.sigma = check_number(f'{FILTER_KEY}.sigma', sigma, 0)
        self.alpha = check_number(f'{FILTER_KEY}.alpha', alpha, 0, 1)
        if not (layers == 'all' or (isinstance(layers, (list, tuple)) and all(
                isinstance(b, int) and not isinstance(b, bool) for b in layers))):
            raise ValueError(f"{FILTER_KEY}.layers must be 'all' or a list of 0-based block "
                             f'indices (negative from the end), got {layers!r}.')
        self.layers = layers if layers == 'all' else tuple(layers)
        self.shift_by_min = check_bool(f'{FILTER_KEY}.shift_by_min', shift_by_min)
        self.register_buffer('channel_index', torch.zeros(0, dtype=torch.long), persistent=False)
        self.blocks: Tuple[int, ...] = ()

    def resolve(self, arch: Optional[str], width: int, num_blocks: int) -> None:
        """Channels for the arch (or one error naming the key) and blocks for the ViT."""
        channels = self.channels
        if channels is None:
            if arch not in PUBLISHED_CHANNELS:
                raise ValueError(
                    f'{FILTER_KEY}.channels: RF-CLIP publishes distraction channels for '
                    f"OpenAI ViT-B/16 only ({list(PUBLISHED_CHANNELS)}), not for arch "
                    f'{arch!r}; give {FILTER_KEY}.channels=(...) for these weights.')
            channels = PUBLISHED_CHANNELS[arch]
        if max(channels) >= width:
            raise ValueError(f'{FILTER_KEY}.channels {list(channels)} must be below the '
                             f'residual width {width} of the ViT.')
        self.channel_index = torch.tensor(channels, dtype=torch.long,
                                          device=self.channel_index.device)
        layers = range(num_blocks) if self.layers == 'all' else self.layers
        blocks = []
        for layer in layers:
            index = layer + num_blocks if layer < 0 else layer
            if not 0 <= index < num_blocks:
                raise ValueError(f'{FILTER_KEY}.layers: block {layer} is out of range for a '
                                 f'ViT of {num_blocks} blocks.')
            blocks.append(index)
        self.blocks = tuple(sorted(set(blocks)))

    def forward(self, x: Tensor, grid: Tuple[int, int]) -> Tensor:
        return distraction_filter(x, grid, self.channel_index, self.sigma, self.alpha,
                                  self.shift_by_min)

    def extra_repr(self) -> str:
        return (f'channels={tuple(self.channel_index.tolist())}, sigma={self.sigma}, '
                f'alpha={self.alpha}, layers={self.layers}, shift_by_min={self.shift_by_min}')


def build_distraction_filter(enabled: bool, cfg: Optional[dict], arch: Optional[str],
                             width: int, num_blocks: int) -> Optional[DistractionFilter]:
    """The filter when ``apply_distraction_filter`` (checked either way), else None."""
    check_bool('apply_distraction_filter', enabled)
    module = build_checked(FILTER_KEY, cfg, DistractionFilter,
                           f', e.g. {FILTER_KEY}=dict(sigma=5.0, alpha=0.4)')
    if not enabled:
        return None
    module.resolve(arch, width, num_blocks)
    log_enabled('RF-CLIP distraction filter', module.extra_repr())
    return module


# -- 2. the rfclip last block -----------------------------------------------------------------
def propagation_matrix(guide_patches: Tensor, threshold: float,
                       normalize: bool = False) -> Tensor:
    """S (B, N, N) fp32: cos(P(G)_i, P(G)_j), 0 where below ``threshold`` (the diagonal,
    1, is kept for threshold <= 1). ``normalize=True`` (a correction): rows / their sum."""
    unit = F.normalize(guide_patches.float(), dim=-1)
    similarity = unit @ unit.transpose(-2, -1)
    similarity = similarity * (similarity >= threshold)
    if normalize:
        similarity = similarity / similarity.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return similarity


def key_attention(block: nn.Module, x: Tensor) -> Tensor:
    """K = softmax(k k^T / sqrt d) per head (B, H, T, T) fp32 of block's keys from x
    (B, T, C), x in fp32 and the block's weights cast to fp32."""
    attn = block.attn
    width = x.shape[-1]
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias.float()[width:2 * width]
    k = F.linear(layer_norm(block.ln_1, x), attn.in_proj_weight.float()[width:2 * width], bias)
    batch, tokens, _ = k.shape
    k = k.view(batch, tokens, attn.num_heads, -1).transpose(1, 2)
    return ((k @ k.transpose(-2, -1)) * k.shape[-1]**-0.5).softmax(dim=-1)


def reduced_kk_block(block: nn.Module, u: Tensor, kk_sum: Tensor, divisor: int) -> Tensor:
    """O(u) (B, N, C) fp32: out_proj(concat_h A_h P(v_h)), A_h = (kk_sum_h + K_h(u)[patches])
    / divisor; k, v from ln_1(u) of the last block; no residual, no FFN, q unused."""
    attn = block.attn
    batch, tokens, width = u.shape
    normed = layer_norm(block.ln_1, u)
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias.float()
    kv = F.linear(normed, attn.in_proj_weight.float()[width:],
                  None if bias is None else bias[width:])
    k, v = kv.view(batch, tokens, 2, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    own = ((k @ k.transpose(-2, -1)) * k.shape[-1]**-0.5).softmax(dim=-1)[..., 1:, 1:]
    probs = (kk_sum.float() + own) / divisor
    merged = (probs @ v[:, :, 1:]).transpose(1, 2).reshape(batch, tokens - 1, width)
    out_bias = None if attn.out_proj.bias is None else attn.out_proj.bias.float()
    return F.linear(merged, attn.out_proj.weight.float(), out_bias)


def rfclip_features(visual: nn.Module, block_input: Tensor, layer_mean: Tensor,
                    kk_sum: Tensor, kk_count: int, threshold: float = 0.4,
                    branches: Sequence[str] = BRANCHES, normalize: bool = False) -> Tensor:
    """RF-CLIP's patch features X (B, N, D) fp32 (module docstring, part 2).

    Args:
        visual: the CLIP image tower (its last block, ln_post and proj).
        block_input: z^{L-2} (B, 1+N, C), filtered.
        layer_mean: G (B, 1+N, C), the mean of the filtered z^0..z^{L-1}.
        kk_sum: sum of K^b over the kk layers (B, H, N, N), patch rows and columns.
        kk_count: the number of layers in ``kk_sum``; A divides by kk_count + 1.
    """
    guide = layer_mean.float()
    spread = propagation_matrix(guide[:, 1:], threshold, normalize)
    last = visual.transformer.resblocks[-1]
    inputs = {'block_input': block_input.float(), 'layer_mean': guide}
    outputs = []
    for name in branches:
        u = inputs[name]
        u = torch.cat([u[:, :1], spread @ u[:, 1:]], dim=1)
        outputs.append(reduced_kk_block(last, u, kk_sum, kk_count + 1))
    mixed = outputs[0] if len(outputs) == 1 else sum(outputs) / len(outputs)
    return layer_norm(visual.ln_post, mixed) @ visual.proj.float()


class RFCLIPHead(nn.Module):
    """RF-CLIP's last block (``attention='rfclip'``), set by ``rfclip_cfg``.

    Args:
        kk_layers: 'all' (blocks 0..L-2, published) or 0-based block indices of the
            earlier blocks whose key-key attention is averaged with the last block's.
        propagation_threshold: beta of S (published 0.4), in [-1, 1].
        branches: the inputs of the reduced block, a non-empty subset of
            ('block_input', 'layer_mean') (published: both, averaged).
        normalize_propagation: rows of S / their sum (a correction; the code has none).
    """

    def __init__(self, kk_layers: Union[str, Sequence[int]] = 'all',
                 propagation_threshold: float = 0.4, branches: Sequence[str] = BRANCHES,
                 normalize_propagation: bool = False):
        super().__init__()
        if not (kk_layers == 'all' or (isinstance(kk_layers, (list, tuple)) and all(
                isinstance(b, int) and not isinstance(b, bool) for b in kk_layers))):
            raise ValueError(f"{RFCLIP_KEY}.kk_layers must be 'all' or a list of 0-based "
                             f'block indices of the earlier blocks, got {kk_layers!r}.')
        self.kk_layers = kk_layers if kk_layers == 'all' else tuple(kk_layers)
        self.propagation_threshold = check_number(f'{RFCLIP_KEY}.propagation_threshold',
                                                  propagation_threshold, -1, 1)
        if (not isinstance(branches, (list, tuple)) or not branches
                or any(b not in BRANCHES for b in branches) or len(set(branches)) != len(branches)):
            raise ValueError(f'{RFCLIP_KEY}.branches must be a non-empty list of distinct '
                             f'names from {list(BRANCHES)}, got {branches!r}.')
        self.branches = tuple(branches)
        self.normalize_propagation = check_bool(f'{RFCLIP_KEY}.normalize_propagation',
                                                normalize_propagation)
        self.kk_blocks: Tuple[int, ...] = ()

    def resolve_layers(self, num_blocks: int) -> None:
        layers = range(num_blocks - 1) if self.kk_layers == 'all' else self.kk_layers
        blocks = []
        for layer in layers:
            index = layer + num_blocks if layer < 0 else layer
            if not 0 <= index <= num_blocks - 2:
                raise ValueError(f'{RFCLIP_KEY}.kk_layers: block {layer} must be in '
                                 f'[0, {num_blocks - 2}] (the last block\'s key-key attention '
                                 f'is always included; the ViT has {num_blocks} blocks).')
            blocks.append(index)
        if len(set(blocks)) != len(blocks):
            raise ValueError(f'{RFCLIP_KEY}.kk_layers must name each block once, got '
                             f'{self.kk_layers!r}.')
        self.kk_blocks = tuple(sorted(blocks))

    def forward(self, visual: nn.Module, encoded) -> Tensor:
        return rfclip_features(visual, encoded.block_input, encoded.layer_mean,
                               encoded.kk_sum, len(self.kk_blocks), self.propagation_threshold,
                               self.branches, self.normalize_propagation)

    def extra_repr(self) -> str:
        return (f'kk_layers={self.kk_layers}, propagation_threshold='
                f'{self.propagation_threshold}, branches={self.branches}, '
                f'normalize_propagation={self.normalize_propagation}')


def build_rfclip(attention: str, cfg: Optional[dict], num_blocks: int) -> Optional[RFCLIPHead]:
    """The head for ``attention='rfclip'``, else None (``rfclip_cfg`` checked either way)."""
    head = build_checked(RFCLIP_KEY, cfg, RFCLIPHead,
                         f", e.g. {RFCLIP_KEY}=dict(kk_layers='all', propagation_threshold=0.4)")
    if attention != 'rfclip':
        return None
    head.resolve_layers(num_blocks)
    log_enabled('RF-CLIP', head.extra_repr())
    return head


# -- 3. text refinement and the global mix ----------------------------------------------------
def complete_linkage_clusters(queries: Tensor, threshold: float) -> Tensor:
    """Flat clusters (Q,) long, labels 0.. in order of first appearance, of unit query
    vectors (Q, D): complete linkage on the cosine distance 1 - cos, every merge at a
    distance <= ``threshold`` (scipy's ``fcluster(linkage(..., 'complete', 'cosine'), t,
    'distance')``; complete linkage is monotone, so these are the clusters formed while
    the smallest inter-cluster distance is <= t). Ties: the first pair in row-major order.
    On the CPU in float64 (Q is a class list)."""
    vectors = queries.detach().double().cpu().numpy()
    num = len(vectors)
    if num == 0:
        return torch.zeros(0, dtype=torch.long)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.maximum(norms, 1e-300)
    distance = np.clip(1.0 - unit @ unit.T, 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    members = [[i] for i in range(num)]
    between = distance.copy()  # complete-linkage distance of the live clusters
    np.fill_diagonal(between, np.inf)
    alive = np.ones(num, dtype=bool)
    while alive.sum() > 1:
        masked = np.where(alive[:, None] & alive[None, :], between, np.inf)
        flat = int(np.argmin(masked))
        i, j = divmod(flat, num)
        if not masked[i, j] <= threshold:
            break
        members[i] = members[i] + members[j]
        alive[j] = False
        merged = np.maximum(between[i], between[j])
        between[i, :], between[:, i] = merged, merged
        between[i, i] = np.inf
    labels = np.empty(num, dtype=np.int64)
    order = sorted((min(members[i]), i) for i in np.flatnonzero(alive))
    for label, (_, i) in enumerate(order):
        labels[members[i]] = label
    return torch.from_numpy(labels)


def refined_queries(features: Tensor, global_embedding: Tensor, queries: Tensor,
                    clusters: Tensor, weight: float, top_k: int = 2) -> Tensor:
    """Per-crop query vectors t~ (B, Q, D) fp32 (module docstring, part 3).

    Args:
        features: unit patch features X^ (B, N, D).
        global_embedding: unit g^ (B, D).
        queries: unit t (Q, D).
        clusters: (Q,) cluster label of each query, labels 0..K-1.
    """
    batch, num, _ = features.shape
    count = int(clusters.max()) + 1 if clusters.numel() else 0
    member = clusters[None, :] == torch.arange(count, device=clusters.device)[:, None]  # (K, Q)
    scores = global_embedding @ queries.T  # (B, Q)
    masked = torch.where(member[None], scores[:, None, :], scores.new_tensor(float('-inf')))
    chosen = masked.argmax(dim=-1)  # (B, K): r of each cluster (the first of ties)
    targets = queries[chosen]  # (B, K, D)
    patch_scores = features @ targets.transpose(1, 2)  # (B, N, K)
    k = min(top_k, num)
    top = patch_scores.topk(k, dim=1).indices  # (B, k, K)
    picked = torch.gather(features[:, :, None, :].expand(-1, -1, count, -1), 1,
                          top[..., None].expand(-1, -1, -1, features.shape[-1]))
    mean = F.normalize(picked.mean(dim=1), dim=-1)  # (B, K, D)
    moved = F.normalize((1 - weight) * targets + weight * mean, dim=-1)
    refined = queries[None].expand(batch, -1, -1).clone()
    refined.scatter_(1, chosen[..., None].expand(-1, -1, queries.shape[-1]), moved)
    return refined


class TextRefinement(nn.Module):
    """CASS's per-crop text refinement (``apply_text_refinement``, ``text_refinement_cfg``).

    Args:
        cluster_threshold: h, the cosine-distance cut of the complete-linkage clusters
            (0: singletons, except identical queries), in [0, 2].
        weight: a (``mean_vector_weight``), in [0, 1]; 0 = the queries unchanged.
        top_k: patches averaged per cluster (published 2), an int >= 1 (clamped to N).
        linkage: 'complete' (the only published one).
    """

    def __init__(self, cluster_threshold: float = 0.1, weight: float = 0.03, top_k: int = 2,
                 linkage: str = 'complete'):
        super().__init__()
        self.cluster_threshold = check_number(f'{REFINE_KEY}.cluster_threshold',
                                              cluster_threshold, 0, 2)
        self.weight = check_number(f'{REFINE_KEY}.weight', weight, 0, 1)
        self.top_k = check_int(f'{REFINE_KEY}.top_k', top_k, 1)
        self.linkage = check_choice(f'{REFINE_KEY}.linkage', linkage, ['complete'])

    def extra_repr(self) -> str:
        return (f'cluster_threshold={self.cluster_threshold}, weight={self.weight}, '
                f'top_k={self.top_k}, linkage={self.linkage!r}')


def build_text_refinement(enabled: bool, cfg: Optional[dict]) -> Optional[TextRefinement]:
    check_bool('apply_text_refinement', enabled)
    module = build_checked(REFINE_KEY, cfg, TextRefinement,
                           f', e.g. {REFINE_KEY}=dict(cluster_threshold=0.1, weight=0.03)')
    if not enabled:
        return None
    log_enabled('RF-CLIP text refinement', module.extra_repr())
    return module


def rfclip_logits(features: Tensor, global_embedding: Optional[Tensor], queries: Tensor,
                  gamma: float, refinement: Optional[TextRefinement] = None,
                  clusters: Optional[Tensor] = None) -> Tensor:
    """l_nq = (1 - gamma) unit(X_n).t~_q + gamma unit(g).t_q, (B, N, Q) in the queries'
    dtype; t~ = t without refinement."""
    dtype = queries.dtype  # fp32 in the pipeline
    unit = F.normalize(features.to(dtype), dim=-1)
    global_unit = None if global_embedding is None else F.normalize(global_embedding.to(dtype),
                                                                   dim=-1)
    if refinement is not None:
        refined = refined_queries(unit, global_unit, queries, clusters, refinement.weight,
                                  refinement.top_k)
        logits = unit @ refined.transpose(1, 2)
    else:
        logits = unit @ queries.T
    if gamma:
        logits = (1 - gamma) * logits + gamma * (global_unit @ queries.T)[:, None, :]
    return logits
