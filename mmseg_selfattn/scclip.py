"""SC-CLIP, Self-Calibrated CLIP (arXiv 2411.15869, SuleBai/SC-CLIP): ``attention='scclip'``.

The published forward (``../shared/methods/sc-clip.md`` §2), batched over crops with
every statistic taken per crop. z^b is the (1+N) x C residual-stream output of block b
(0-based, b = 0..L-2), P(z) its patch rows, z_0 its CLS row; the standard last block
never runs (no A, no x_cls)::

    Y      = P(z^{L-2})                        (the last block's input)
    LOF_i  = (1/k) sum_{j in kNN_i} kappa_i / kappa_j   (squared distances; kappa_i: to the
                                                k-th neighbour; the code's reduced form)
    O      = {i : LOF_i > quantile(LOF, 1 - contamination)}        (linear, strict >)
    R_O    = each i in O -> mean of its in-grid 8-neighbours outside O
    S^pre  = cos(R_O(P(z^pre))),  S^post = cos(P(z^post))          (not resolved)
    Thr(S) = S * [S >= beta]  (diagonal kept),  Agg(W, Y)_i = sum_j W_ij y_j / (sum_j W_ij + 1e-6)
    G      = softmax_row(tau (S^pre - mean S^pre)), entries below the mean -inf; all heads
    Att(U) = out_proj(concat_h 1/2 [G + softmax(k_h k_h^T / sqrt d)] v_h),  k, v of ln_1(U)
    F1     = Agg(Thr(S^post), Att(Agg(Thr(S^pre), R_O(Y))) + lambda z^{L-2}_0)
    M      = sum_{b in fusion} z^b,  F2 = Agg(Thr(S^post), Att(P(M)) + lambda M_0)
    X      = ln_post(F1 + F2) proj

Deliberate departures from the published code (docs/stages.md): crops batched (the
quantile, the mean of S^pre, the outlier sets and the kNN per crop; the code assumes one
crop); fp32 from the last block's input on (the code runs fp16 on CUDA: rounding and
boundary outlier choices may differ); non-square grids use the row-major grid (the code
crashes there); k is clamped to N - 1, divisions and fully masked rows are guarded (the
code fails for N < 31 and for an empty O).
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from mmseg.registry import MODELS
from torch import Tensor, nn

from .config_checks import build_checked, check_int, check_number
from .startup_log import log_enabled
from .stages.outlier_suppression import replace_outliers
from .stages.vectors import cosine_matrix

CFG_KEY = 'scclip_cfg'
AGG_EPS = 1e-6  # Agg's denominator term, as published


# -- anomaly detection and resolution ---------------------------------------------------------
def lof_scores(features: Tensor, neighbours: int) -> Tensor:
    """SC-CLIP's LOF per crop: (B, N, C) -> (B, N), in fp32.

    d_ij = |y_i - y_j|^2 (the difference form, not the Gram form), kNN_i = the k nearest
    tokens but i itself (k = min(neighbours, N - 1)), kappa_i = d to the k-th of them, and
    LOF_i = (1/k) sum_{j in kNN_i} kappa_i / kappa_j. N = 1 (no neighbour): all 0.
    kappa_j is floored at 1e-12 x the crop's largest kappa (duplicate tokens: no inf/NaN).
    """
    features = features.float()
    batch, num, _ = features.shape
    k = min(neighbours, num - 1)
    if k < 1:
        return features.new_zeros(batch, num)
    distances = torch.cdist(features, features,
                            compute_mode='donot_use_mm_for_euclid_dist').square()
    knn_distances, knn_index = distances.topk(k + 1, dim=-1, largest=False)  # ascending
    knn_index = knn_index[..., 1:]  # the first is the token itself
    kappa = knn_distances[..., -1]  # (B, N)
    floor = kappa.amax(dim=-1, keepdim=True) * 1e-12 + torch.finfo(kappa.dtype).tiny
    neighbour_kappa = kappa.clamp_min(floor).gather(1, knn_index.flatten(1)).view_as(knn_index)
    return (kappa[..., None] / neighbour_kappa).mean(dim=-1)


def anomaly_mask(scores: Tensor, contamination: float) -> Tensor:
    """O: (B, N) bool, scores strictly above their crop's ``torch.quantile`` at
    1 - contamination (linear interpolation). contamination 0: O empty."""
    threshold = torch.quantile(scores, 1 - contamination, dim=-1, keepdim=True)
    return scores > threshold


def anomaly_candidates(scores: Tensor, contamination: float) -> Tensor:
    """(B, m) indices of the m highest scores per crop, m a bound on |O| (the tokens above a
    linear quantile at position p = (N - 1)(1 - c) are at most N - 1 - floor(p)), so that
    ``replace_outliers`` computes only those rows."""
    num = scores.shape[-1]
    count = min(num, num - int((num - 1) * (1 - contamination)))  # one spare
    return scores.topk(count, dim=-1).indices


# -- similarities and aggregation -------------------------------------------------------------
def threshold_similarity(similarity: Tensor, beta: float) -> Tensor:
    """Thr(S) = S * [S >= beta], the diagonal always kept (so beta > 1 gives W = I)."""
    own = torch.eye(similarity.shape[-1], dtype=torch.bool, device=similarity.device)
    return similarity * ((similarity >= beta) | own)


def aggregate(weights: Tensor, features: Tensor) -> Tensor:
    """Agg(W, Y)_i = sum_j W_ij y_j / (sum_j W_ij + 1e-6): (B, N, N), (B, N, C) -> (B, N, C)."""
    return (weights @ features) / (weights.sum(dim=-1, keepdim=True) + AGG_EPS)


def calibration_weights(similarity: Tensor, scale: float) -> Tensor:
    """G = softmax_row(tau (S - S_bar)), entries with S_ij < S_bar at -inf; S_bar the mean of
    the crop's N^2 entries. The diagonal is never masked (S_ii = 1 >= S_bar unless rounding
    or a zero token; no row is ever fully masked)."""
    mean = similarity.mean(dim=(-2, -1), keepdim=True)
    own = torch.eye(similarity.shape[-1], dtype=torch.bool, device=similarity.device)
    logits = (scale * (similarity - mean)).masked_fill((similarity < mean) & ~own, float('-inf'))
    return logits.softmax(dim=-1)


# -- the calibrated last block ----------------------------------------------------------------
def layer_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    """``norm`` applied in fp32 whatever the dtype of its weights."""
    weight = None if norm.weight is None else norm.weight.float()
    bias = None if norm.bias is None else norm.bias.float()
    return F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps)


def calibrated_attention(block: nn.Module, patches: Tensor, calibration: Tensor) -> Tensor:
    """Att(U): the last block's attention over patch rows U (B, N, C) only, with
    P_h = 1/2 [G + softmax(k_h k_h^T / sqrt d)] (G (B, N, N) shared by the heads), then
    out_proj; no residual, no FFN (q is never needed)."""
    attn = block.attn
    batch, num, width = patches.shape
    heads = attn.num_heads
    weight = attn.in_proj_weight.float()[width:]
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias.float()[width:]
    kv = F.linear(layer_norm(block.ln_1, patches), weight, bias)
    k, v = kv.view(batch, num, 2, heads, -1).permute(2, 0, 3, 1, 4)  # each (B, H, N, d)
    key_attention = ((k @ k.transpose(-2, -1)) * k.shape[-1]**-0.5).softmax(dim=-1)
    probs = 0.5 * (calibration[:, None] + key_attention)
    merged = (probs @ v).transpose(1, 2).reshape(batch, num, width)
    out_bias = None if attn.out_proj.bias is None else attn.out_proj.bias.float()
    return F.linear(merged, attn.out_proj.weight.float(), out_bias)


def scclip_features(visual: nn.Module, block_input: Tensor, pre_patches: Tensor,
                    post_patches: Tensor, fusion_sum: Optional[Tensor],
                    grid: Tuple[int, int], neighbours: int = 30, contamination: float = 0.05,
                    threshold: float = 0.4, scale: float = 3.0,
                    cls_residual: float = 0.3, record=None) -> Tensor:
    """SC-CLIP's patch features X (B, N, D) in fp32 (module docstring).

    Args:
        visual: the CLIP image tower (its last block, ln_post and proj).
        block_input: z^{L-2} (B, 1+N, C), the last block's input.
        pre_patches / post_patches: P(z^pre), P(z^post) (B, N, C).
        fusion_sum: M = sum of the fusion layers' z^b (B, 1+N, C), or None (F2 = 0).
        grid: (h, w), h * w = N, row-major.
        record: ``explain()``'s recorder, given the LOF scores and the anomaly mask O.
    """
    patches, cls = block_input[:, 1:].float(), block_input[:, :1].float()
    scores = lof_scores(patches, neighbours)
    outliers = anomaly_mask(scores, contamination)
    candidates = anomaly_candidates(scores, contamination)
    if record is not None:
        record(anomaly_scores=scores, anomalies=outliers)
    resolved = replace_outliers(patches, outliers, grid, 'mean', candidates)
    pre = replace_outliers(pre_patches.float(), outliers, grid, 'mean', candidates)
    pre_similarity = cosine_matrix(pre).float()
    post_weights = threshold_similarity(cosine_matrix(post_patches.float()).float(), threshold)
    calibration = calibration_weights(pre_similarity, scale)
    last = visual.transformer.resblocks[-1]
    calibrated = aggregate(threshold_similarity(pre_similarity, threshold), resolved)
    features = aggregate(post_weights,
                         calibrated_attention(last, calibrated, calibration) + cls_residual * cls)
    if fusion_sum is not None:
        fusion = fusion_sum.float()
        features = features + aggregate(
            post_weights,
            calibrated_attention(last, fusion[:, 1:], calibration) + cls_residual * fusion[:, :1])
    return layer_norm(visual.ln_post, features) @ visual.proj.float()


# -- the config -------------------------------------------------------------------------------
@MODELS.register_module()
class SCCLIPHead(nn.Module):
    """The SC-CLIP last block (``attention='scclip'``), configured by ``scclip_cfg``.

    Args:
        anomaly_neighbours: LOF's k (``n_neighbors``), an int >= 1 (clamped to N - 1).
        anomaly_contamination: the flagged fraction, in [0, 1] (0: O empty).
        pre_layer: block of S^pre, of the second R_O and of G (``pre_adjust_idx``).
        post_layer: block of S^post (``post_adjust_idx``).
        similarity_threshold: beta of Thr, >= 0 (above 1: W = I).
        similarity_scale: tau of G, >= 0.
        fusion_layers: blocks summed into M (``range(multi_start_idx, multi_end_idx)``);
            () = no second branch.
        cls_residual: lambda (``res_cls``) of the CLS rows added to every patch.

    Layers are 0-based block indices 0..L-2 (negative: from the end, -2 = L-2); they are
    checked against the ViT by ``resolve_layers``.
    """
    cfg_key = CFG_KEY

    def __init__(self, anomaly_neighbours: int = 30, anomaly_contamination: float = 0.05,
                 pre_layer: int = 8, post_layer: int = 3, similarity_threshold: float = 0.4,
                 similarity_scale: float = 3.0,
                 fusion_layers: Sequence[int] = (3, 4, 5, 6, 7, 8, 9),
                 cls_residual: float = 0.3):
        super().__init__()
        key = CFG_KEY
        self.anomaly_neighbours = check_int(f'{key}.anomaly_neighbours', anomaly_neighbours, 1)
        self.anomaly_contamination = check_number(f'{key}.anomaly_contamination',
                                                  anomaly_contamination, 0, 1)
        self.pre_layer = _check_layer(f'{key}.pre_layer', pre_layer)
        self.post_layer = _check_layer(f'{key}.post_layer', post_layer)
        self.similarity_threshold = check_number(f'{key}.similarity_threshold',
                                                 similarity_threshold, 0)
        self.similarity_scale = check_number(f'{key}.similarity_scale', similarity_scale, 0)
        if (not isinstance(fusion_layers, (list, tuple))
                or any(isinstance(layer, bool) or not isinstance(layer, int)
                       for layer in fusion_layers)):
            raise ValueError(f'{key}.fusion_layers must be a list of ints (0-based block '
                             'indices, negative from the end; () = no fusion branch), got '
                             f'{fusion_layers!r}.')
        self.fusion_layers = tuple(fusion_layers)
        self.cls_residual = check_number(f'{key}.cls_residual', cls_residual)
        self.recorder = None  # explain(): records the LOF scores and O

    def resolve_layers(self, num_blocks: int) -> None:
        """Layer indices -> 0-based blocks 0..L-2 of a ``num_blocks``-block ViT, or one
        ValueError naming the key."""
        self.pre_layer = _block_index(f'{CFG_KEY}.pre_layer', self.pre_layer, num_blocks)
        self.post_layer = _block_index(f'{CFG_KEY}.post_layer', self.post_layer, num_blocks)
        fusion = tuple(_block_index(f'{CFG_KEY}.fusion_layers', layer, num_blocks)
                       for layer in self.fusion_layers)
        if len(set(fusion)) != len(fusion):
            raise ValueError(f'{CFG_KEY}.fusion_layers must name each block once, got '
                             f'{list(self.fusion_layers)} (blocks {list(fusion)}).')
        self.fusion_layers = fusion

    def forward(self, visual: nn.Module, encoded) -> Tensor:
        """X (B, N, D) fp32 from ``DenseCLIPEncoder.encode``'s output with this head's
        ``mid_features`` (pre, post) and ``layer_sums`` (fusion) captured."""
        return scclip_features(
            visual, encoded.block_input, encoded.mid_features[self.pre_layer],
            encoded.mid_features[self.post_layer],
            encoded.layer_sums[self.fusion_layers] if self.fusion_layers else None,
            encoded.grid, self.anomaly_neighbours, self.anomaly_contamination,
            self.similarity_threshold, self.similarity_scale, self.cls_residual,
            self.recorder)

    def extra_repr(self) -> str:
        return (f'anomaly_neighbours={self.anomaly_neighbours}, '
                f'anomaly_contamination={self.anomaly_contamination}, '
                f'pre_layer={self.pre_layer}, post_layer={self.post_layer}, '
                f'similarity_threshold={self.similarity_threshold}, '
                f'similarity_scale={self.similarity_scale}, '
                f'fusion_layers={self.fusion_layers}, cls_residual={self.cls_residual}')


def _check_layer(key: str, layer) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f'{key} must be an int (a 0-based block index, negative from the '
                         f'end), got {layer!r}.')
    return layer


def _block_index(key: str, layer: int, num_blocks: int) -> int:
    index = layer + num_blocks if layer < 0 else layer
    if not 0 <= index <= num_blocks - 2:
        raise ValueError(f'{key} must be a block in [0, {num_blocks - 2}] or '
                         f'[-{num_blocks}, -2] (the ViT has {num_blocks} blocks; SC-CLIP reads '
                         f'blocks 0..L-2 and replaces the last), got {layer!r}.')
    return index


def build_scclip(attention: str, cfg: Optional[dict], num_blocks: int) -> Optional[SCCLIPHead]:
    """The SC-CLIP head for ``attention='scclip'`` (layers resolved for the ViT), else None.
    ``scclip_cfg``'s keys and values are checked either way (a typo never passes)."""
    head = build_checked(CFG_KEY, cfg, SCCLIPHead,
                         f', e.g. {CFG_KEY}=dict(pre_layer=8, post_layer=3, ...)')
    if attention != 'scclip':
        return None
    head.resolve_layers(num_blocks)
    log_enabled('SC-CLIP', head.extra_repr())
    return head
