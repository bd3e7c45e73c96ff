"""ResCLIP's two modules as pure, batched functions (Yang et al., CVPR 2025;
contract: ``shared/methods/resclip.md``).

Notation as in SPEC.md, per head: s = 1/sqrt(d), T = 1 + N tokens (CLS at 0), patch
grid h x w, N = h * w, B crops. All functions work on the device of their inputs,
batched over B, without Python loops over tokens.

RCS, residual cross-correlation self-attention (both passes)::

    A^l = softmax(s q k^T)            per head, block l (blocks ``RCS_LAYERS``)
    A_c = mean_l A^l                  (B, H, T, T)
    P  <- τ_r ((1 - λ_r) P + λ_r A_c)  on the dense attention P, after its softmax

SFR, semantic feedback refinement (pass 2 only), on every dense logit term G::

    G  <- τ_s ((1 - λ_s) G + λ_s Ŝ)    before naclip's window ω and stage 2's bias

Ŝ (B, T, T) is built from pass 1's patch labels c (``patch_labels``) by
``sfr_matrix``: label agreement E, the published line-of-sight decay, a 1-D Gaussian
blur of every row along the raster index, row normalisation, zero CLS row and
column, one max per crop.

Published quirks reproduced by default, corrections offered by a flag:
- line of sight (``exact_line_of_sight=False``): step 1/M, not 1/d_ij, so only
  the first d_ij/M of the segment p_i -> p_j is checked;
- fp16 affinity (``half_precision=True``): Ŝ is cast to float16 and λ_s Ŝ is
  computed in half, also in fp32 runs.
"""
import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config_checks import build_checked, check_bool, check_number
from .dense_attention import ProbsHook
from .pamr import PAMR, build_pamr
from .startup_log import log_enabled

# 0-based indices of ResCLIP's RCS blocks (6..9), hard-coded also for ViT-L/14's 24
RCS_LAYERS = (5, 6, 7, 8)
# pass 1's feedback map is PAMR-refined whatever ``pamr_steps`` is
PASS1_PAMR_STEPS = 10
PASS1_PAMR_DILATIONS = (8, 16)
ROW_SUM_EPS = 1e-8  # SFR's rows / (row sum + eps)


# -- RCS ----------------------------------------------------------------------------------
def head_probs(q: Tensor, k: Tensor) -> Tensor:
    """A^l = softmax(s q k^T) per head, (B, H, T, T) fp32, from (B, H, T, d).

    q is scaled before the matmul (in q's dtype, as torch's multi-head attention does
    when it returns weights); the softmax is taken in fp32.
    """
    scale = q.shape[-1]**-0.5
    return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1, dtype=torch.float32)


def block_head_probs(block: nn.Module, x: Tensor) -> Tensor:
    """``head_probs`` of an open_clip ``ResidualAttentionBlock`` from its input x (B, T, C):
    q, k = in_proj(ln_1(x)), split into the block's heads."""
    attn = block.attn
    width = x.shape[-1]
    qk = F.linear(block.ln_1(x), attn.in_proj_weight[:2 * width], attn.in_proj_bias[:2 * width])
    batch, tokens, _ = qk.shape
    q, k = qk.view(batch, tokens, 2, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    return head_probs(q, k)


class AttentionMean:
    """Running mean of per-head attention maps, added block by block: holds one fp32 sum,
    never L maps. ``value()`` is A_c."""

    def __init__(self) -> None:
        self.total: Optional[Tensor] = None
        self.count = 0

    def add(self, probs: Tensor) -> None:
        """Add one block's (B, H, T, T) map (not modified)."""
        probs = probs.float()
        self.total = probs.clone() if self.total is None else self.total.add_(probs)
        self.count += 1

    def value(self) -> Tensor:
        """A_c = sum / count, (B, H, T, T) fp32."""
        if self.total is None:
            raise ValueError('AttentionMean.value(): no attention map was added')
        return self.total / self.count


def rcs_attention(per_head_probs: Sequence[Tensor]) -> Tensor:
    """A_c = mean over the given blocks of A^l, (B, H, T, T) fp32 (no head mean)."""
    mean = AttentionMean()
    for probs in per_head_probs:
        mean.add(probs)
    return mean.value()


def rcs_mix(probs: Tensor, a_c: Tensor, weight: float, scale: float) -> Tensor:
    """P <- τ_r ((1 - λ_r) P + λ_r A_c), with λ_r = ``weight``, τ_r = ``scale``.

    probs (B, H, T, T) is the dense attention after its softmax (rows sum to 1, 2 for
    sclip); rows of the result sum to τ_r (τ_r (2 - λ_r) for sclip). Computed in fp32 at
    least, returned in the dtype of ``probs``. λ_r = 0, τ_r = 1 returns P bitwise.
    """
    compute = torch.promote_types(probs.dtype, torch.float32)
    mixed = (1 - weight) * probs.to(compute) + weight * a_c.to(compute)
    return (scale * mixed).to(probs.dtype)


def rcs_hook(a_c: Tensor, weight: float, scale: float) -> ProbsHook:
    """``rcs_mix`` as a ``dense_attention`` probs hook (applied before stage 3's hook)."""
    def hook(probs: Tensor) -> Tensor:
        return rcs_mix(probs, a_c, weight, scale)
    return hook


# -- SFR: the logit transform -------------------------------------------------------------
def sfr_logits(logits: Tensor, s_hat: Tensor, weight: float, scale: float,
               half_precision: bool = True) -> Tensor:
    """G <- τ_s ((1 - λ_s) G + λ_s Ŝ), with λ_s = ``weight``, τ_s = ``scale``.

    Args:
        logits: (B, H, T, T) one dense logit term G (scaled, before ω and any bias).
        s_hat: Ŝ, (B, T, T) (broadcast over heads) or broadcastable to ``logits``.
        half_precision: as published, Ŝ is cast to float16 and λ_s Ŝ computed in half
            (in fp32 runs this rounds that term only); False: all in fp32.

    Returns:
        In fp32 at least. λ_s = 0, τ_s = 1 returns fp32 G bitwise.
    """
    if s_hat.dim() == logits.dim() - 1:
        s_hat = s_hat.unsqueeze(-3)  # one map for every head
    compute = torch.promote_types(logits.dtype, torch.float32)
    term = weight * (s_hat.half() if half_precision else s_hat.to(compute))
    return scale * ((1 - weight) * logits.to(compute) + term.to(compute))


# -- SFR: pass 1's feedback labels --------------------------------------------------------
def pass1_pamr() -> PAMR:
    """The PAMR of pass 1: 10 steps, dilations (8, 16), whatever ``pamr_steps`` is."""
    return PAMR(PASS1_PAMR_STEPS, PASS1_PAMR_DILATIONS)


def pixel_labels(query_logits: Tensor, logit_scale: float, threshold: float) -> Tensor:
    """y = argmax_q p_q with p = softmax_q(logit_scale * l) over all Q queries; y = 0
    (query 0) where max_q p_q < ``threshold``. (B, Q, H, W) -> (B, H, W) long."""
    probs = (logit_scale * query_logits.float()).softmax(dim=1)
    labels = probs.argmax(dim=1)
    return torch.where(probs.amax(dim=1) < threshold, torch.zeros_like(labels), labels)


def patch_mode(labels: Tensor, patch: Union[int, Tuple[int, int]], num_labels: int) -> Tensor:
    """c_n = the most frequent pixel label over patch n's p x p block, (B, H, W) ->
    (B, H // p, W // p) long.

    Pixels beyond h p, w p are ignored; ties go to the smallest label (as CPU
    ``torch.mode``). Counted per patch by one scatter-add, (B, h, w, num_labels).
    """
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    batch, height, width = labels.shape
    h, w = height // ph, width // pw
    blocks = labels[:, :h * ph, :w * pw].reshape(batch, h, ph, w, pw)
    blocks = blocks.permute(0, 1, 3, 2, 4).reshape(batch, h, w, ph * pw)
    counts = torch.zeros(batch, h, w, num_labels, dtype=torch.int32, device=labels.device)
    counts.scatter_add_(-1, blocks, torch.ones_like(blocks, dtype=torch.int32))
    return counts.argmax(dim=-1)  # first maximum: the smallest label


def patch_labels(query_logits_crop_size: Tensor, crops: Tensor, logit_scale: float,
                 threshold: float, patch: Union[int, Tuple[int, int]],
                 pamr: Optional[nn.Module] = None) -> Tensor:
    """Pass 1's feedback labels c, one per patch.

    Args:
        query_logits_crop_size: (B, Q, H, W) pass-1 logits of every query, already
            bilinear at the crop size.
        crops: (B, 3, H, W) the normalised crops (PAMR's guide).
        logit_scale: softmax temperature (the segmentor's ``logit_scale``).
        threshold: ``temp_thd``; pixels with max p below it get query 0.
        patch: the ViT's patch size p (int or (ph, pw)).
        pamr: the refinement, ``pass1_pamr()`` for the published one; None skips it.

    Returns:
        (B, H // ph, W // pw) long query indices.
    """
    if query_logits_crop_size.shape[-2:] != crops.shape[-2:]:
        raise ValueError(f'patch_labels: logits {tuple(query_logits_crop_size.shape[-2:])} '
                         f'are not at the crop size {tuple(crops.shape[-2:])}')
    logits = query_logits_crop_size if pamr is None else pamr(crops, query_logits_crop_size)
    labels = pixel_labels(logits, logit_scale, threshold)
    return patch_mode(labels, patch, query_logits_crop_size.shape[1])


# -- SFR: the affinity Ŝ ------------------------------------------------------------------
def grid_points(h: int, w: int, device=None) -> Tensor:
    """(N, 2) float32 (row, column) of every patch, raster order."""
    rows, cols = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                                torch.arange(w, device=device, dtype=torch.float32),
                                indexing='ij')
    return torch.stack([rows.flatten(), cols.flatten()], dim=-1)


def chebyshev_distance(h: int, w: int, device=None) -> Tensor:
    """d_ij = max(|Δrow|, |Δcol|) between patches, (N, N) float32."""
    points = grid_points(h, w, device)
    return (points[:, None] - points[None]).abs().amax(dim=-1)


def line_of_sight(labels: Tensor, exact: bool = False) -> Tensor:
    """V_ij: every label at the rounded points of the segment p_i -> p_j equals c_i,
    (B, h, w) -> (B, N, N) bool.

    Points round(p_i (1 - t_m) + p_j t_m), m = 0..d_ij, in float32, rounded half to even.
    Published (``exact=False``): t_m = m / M, M = max(h, w) - 1, so only the first d_ij / M
    of the segment is checked. ``exact=True``: t_m = m / d_ij, the whole segment.

    One step m at a time over all pairs: memory O(B N^2), M + 1 steps.
    """
    batch, h, w = labels.shape
    flat = labels.reshape(batch, h * w)
    points = grid_points(h, w, labels.device)
    start, end = points[:, None], points[None]  # (N, 1, 2), (1, N, 2)
    distance = chebyshev_distance(h, w, labels.device)
    steps = max(h, w) - 1
    # all float32 on the device (no host copies: CUDA-graph safe): t_m = f32(m) / f32(M)
    # and 1 - t_m in float32, as the page's "float32" says
    ratios = torch.arange(steps + 1, device=labels.device, dtype=torch.float32)
    if not exact:
        ratios = ratios / max(steps, 1)  # a 1 x 1 grid has only d = 0: t_0 = 0
    own = flat[:, :, None]  # c_i
    visible = torch.ones(batch, h * w, h * w, dtype=torch.bool, device=labels.device)
    for m in range(steps + 1):
        # exact: t = m / d_ij (d = 0 occurs only at m = 0)
        t = (ratios[m] / distance.clamp(min=1)).unsqueeze(-1) if exact else ratios[m]
        point = (start * (1 - t) + end * t).round()  # (N, N, 2), half to even
        rows = point[..., 0].clamp(0, h - 1).long()  # exact: m > d_ij overshoots (masked)
        cols = point[..., 1].clamp(0, w - 1).long()
        seen = flat[:, rows * w + cols]  # (B, N, N)
        visible &= (seen == own) | (distance < m)  # steps beyond d_ij are not checked
    return visible


def label_affinity(labels: Tensor, line_decay: bool = True,
                   exact_line_of_sight: bool = False) -> Tensor:
    """E_ij = [c_i = c_j], and with ``line_decay`` (``delete_same_entity``)
    E_ij <- E_ij exp(-d_ij / M) where V_ij fails; (B, h, w) -> (B, N, N) float32."""
    batch, h, w = labels.shape
    flat = labels.reshape(batch, h * w)
    affinity = (flat[:, :, None] == flat[:, None]).float()
    if line_decay:
        distance = chebyshev_distance(h, w, labels.device)
        decay = torch.exp(-distance / max(max(h, w) - 1, 1))
        visible = line_of_sight(labels, exact_line_of_sight)
        affinity = torch.where(visible, affinity, affinity * decay)
    return affinity


def blur_width(num_patches: int, std: float) -> int:
    """K = min(N, floor(6σ + 1)), made odd by taking one less (31 for σ = 5)."""
    width = min(num_patches, math.floor(6 * std + 1))
    return max(width - (1 - width % 2), 1)


def gaussian_kernel(width: int, std: float, device=None) -> Tensor:
    """Normalised 1-D Gaussian of odd ``width`` and std σ, (width,) float32."""
    offsets = torch.arange(width, device=device, dtype=torch.float32) - width // 2
    kernel = torch.exp(-offsets.square() / (2 * std**2))
    return kernel / kernel.sum()


def raster_blur(rows: Tensor, std: float) -> Tensor:
    """Blur every row of (B, N, N) along its last (flattened raster) index: 1-D, wrapping
    across grid rows, zero padding, ``gaussian_kernel(blur_width(N, σ), σ)``."""
    batch, count, length = rows.shape
    width = blur_width(length, std)
    kernel = gaussian_kernel(width, std, rows.device).view(1, 1, width)
    blurred = F.conv1d(rows.reshape(batch * count, 1, length), kernel, padding=width // 2)
    return blurred.view(batch, count, length)


def sfr_matrix(labels: Tensor, gaussian_std: float, line_decay: bool = True,
               exact_line_of_sight: bool = False) -> Tensor:
    """Ŝ from pass 1's patch labels c (B, h, w): (B, T, T) float32, T = 1 + h w.

    Ŝ = normalise(pad_CLS(rownorm(relu(blur_σ(E))))): E = ``label_affinity``; each row
    blurred along the raster index (``raster_blur``); rows / (row sum + 1e-8); zero CLS
    row and column; divided by its single max per crop (a zero map stays zero).
    """
    affinity = label_affinity(labels, line_decay, exact_line_of_sight)
    rows = raster_blur(affinity, gaussian_std).relu()  # relu: a no-op for E >= 0
    rows = rows / (rows.sum(dim=-1, keepdim=True) + ROW_SUM_EPS)
    s_hat = F.pad(rows, (1, 0, 1, 0))
    peak = s_hat.amax(dim=(-2, -1), keepdim=True)
    return s_hat / torch.where(peak > 0, peak, torch.ones_like(peak))


# -- the config: rcs_cfg / sfr_cfg (CropPipeline) -----------------------------------------
RCS_CFG_KEY, SFR_CFG_KEY = 'rcs_cfg', 'sfr_cfg'
# dense variants ResCLIP plugs into (naclip = ResCLIP's own 'resclip' branch)
RESCLIP_ATTENTIONS = ('naclip', 'sclip', 'clearclip', 'vanilla')


class ResidualCrossCorrelation:
    """RCS (``apply_rcs``, ``rcs_cfg``): P <- τ_r ((1 - λ_r) P + λ_r A_c) in the dense last
    block (both passes), A_c the per-head mean attention of blocks ``layers``.

    Args:
        layers: 0-based blocks 0..L-2 whose per-head softmax(q k^T) is averaged (the
            published 5..8 = blocks 6-9, also for ViT-L/14); checked against the ViT by
            ``resolve_layers``.
        weight: λ_r in [0, 1].
        scale: τ_r >= 0 (rows of P then sum to τ_r; τ_r (2 - λ_r) for sclip).
    """

    def __init__(self, layers: Sequence[int] = RCS_LAYERS, weight: float = 0.3,
                 scale: float = 2.0):
        key = RCS_CFG_KEY
        if (not isinstance(layers, (list, tuple)) or not layers
                or any(isinstance(layer, bool) or not isinstance(layer, int)
                       for layer in layers)):
            raise ValueError(f'{key}.layers must be a non-empty list of ints (0-based block '
                             f'indices 0..L-2), got {layers!r}.')
        if len(set(layers)) != len(layers):
            raise ValueError(f'{key}.layers must name each block once, got {list(layers)}.')
        self.layers = tuple(layers)
        self.weight = check_number(f'{key}.weight', weight, 0, 1)
        self.scale = check_number(f'{key}.scale', scale, 0)
        self.recorder = None  # explain(): records A_c (head mean)

    def resolve_layers(self, num_blocks: int) -> None:
        """One ValueError naming the key unless every layer is a block 0..L-2."""
        bad = [layer for layer in self.layers if not 0 <= layer <= num_blocks - 2]
        if bad:
            raise ValueError(f'{RCS_CFG_KEY}.layers: {bad} out of range; the ViT has '
                             f'{num_blocks} blocks and RCS averages earlier ones: use '
                             f'0..{num_blocks - 2} (0-based), got {list(self.layers)}.')

    def hook(self, encoded) -> ProbsHook:
        """The probs hook of the dense block for ``encoded`` (its A_c captured)."""
        a_c = encoded.attention_means[self.layers]
        if self.recorder is not None:
            self.recorder(rcs_attention=a_c.mean(dim=1))
        return rcs_hook(a_c, self.weight, self.scale)

    def __repr__(self) -> str:
        return f'ResidualCrossCorrelation({self.extra_repr()})'

    def extra_repr(self) -> str:
        return f'layers={self.layers}, weight={self.weight}, scale={self.scale}'


class SemanticFeedback:
    """SFR (``apply_sfr``, ``sfr_cfg``): pass 1 (the dense block with RCS, stages 2-6
    off) -> patch labels -> Ŝ; pass 2: every dense logit term G <- τ_s ((1 - λ_s) G +
    λ_s Ŝ), before naclip's window and stage 2's bias.

    Args:
        weight: λ_s in [0, 1].
        scale: τ_s >= 0.
        threshold: ``temp_thd`` in [0, 1]: pass-1 pixels whose best query probability is
            below it get query 0.
        line_decay: ``delete_same_entity``: E_ij exp(-d_ij / M) where the line of sight
            fails (every published config).
        exact_line_of_sight: check the whole segment p_i -> p_j (the published code checks
            only its first d_ij / M).
        blur_std: σ of the raster blur; None = ``gaussian_std`` (published).
        pamr_steps / pamr_stride: pass 1's PAMR (published 10, (8, 16), whatever the
            segmentor's ``pamr_steps``); 0 steps = none.
        half_precision_affinity: λ_s Ŝ computed in float16 as published; False: fp32.
    """

    def __init__(self, weight: float = 0.7, scale: float = 1.8, threshold: float = 0.3,
                 line_decay: bool = True, exact_line_of_sight: bool = False,
                 blur_std: Optional[float] = None, pamr_steps: int = PASS1_PAMR_STEPS,
                 pamr_stride: Sequence[int] = PASS1_PAMR_DILATIONS,
                 half_precision_affinity: bool = True):
        key = SFR_CFG_KEY
        self.weight = check_number(f'{key}.weight', weight, 0, 1)
        self.scale = check_number(f'{key}.scale', scale, 0)
        self.threshold = check_number(f'{key}.threshold', threshold, 0, 1)
        self.line_decay = check_bool(f'{key}.line_decay', line_decay)
        self.exact_line_of_sight = check_bool(f'{key}.exact_line_of_sight',
                                               exact_line_of_sight)
        self.blur_std = None if blur_std is None else check_number(
            f'{key}.blur_std', blur_std, 0, low_open=True)
        self.half_precision_affinity = check_bool(f'{key}.half_precision_affinity',
                                                   half_precision_affinity)
        self.recorder = None  # explain(): records pass 1's patch labels
        try:
            self.pamr = build_pamr(pamr_steps, pamr_stride, None)
        except ValueError as error:
            raise ValueError(f'{key}.{error}') from None
        self.pamr_steps = pamr_steps
        self.pamr_stride = tuple(pamr_stride) if isinstance(pamr_stride, (list, tuple)) \
            else (pamr_stride, )

    def affinity(self, pass1_logits: Tensor, crops: Tensor, logit_scale: float,
                 patch: Tuple[int, int], gaussian_std: float) -> Tensor:
        """Ŝ (B, T, T) from pass 1's query logits on the patch grid (B, Q, h, w) and the
        normalised crops (B, 3, H, W): bilinear to the crop size, PAMR, labels, Ŝ."""
        logits = F.interpolate(pass1_logits, size=crops.shape[-2:], mode='bilinear')
        labels = patch_labels(logits, crops, logit_scale, self.threshold, patch, self.pamr)
        if self.recorder is not None:
            self.recorder(sfr_labels=labels.flatten(1))
        std = gaussian_std if self.blur_std is None else self.blur_std
        return sfr_matrix(labels, std, self.line_decay, self.exact_line_of_sight)

    def transform(self, s_hat: Tensor):
        """Pass 2's ``logit_transform`` for ``dense_attention``."""
        def transform(logits: Tensor) -> Tensor:
            return sfr_logits(logits, s_hat, self.weight, self.scale,
                              self.half_precision_affinity)
        return transform

    def __repr__(self) -> str:
        return f'SemanticFeedback({self.extra_repr()})'

    def extra_repr(self) -> str:
        return (f'weight={self.weight}, scale={self.scale}, threshold={self.threshold}, '
                f'line_decay={self.line_decay}, '
                f'exact_line_of_sight={self.exact_line_of_sight}, blur_std={self.blur_std}, '
                f'pamr_steps={self.pamr_steps}, pamr_stride={self.pamr_stride}, '
                f'half_precision_affinity={self.half_precision_affinity}')


def _build_part(enabled, cfg, key: str, cls: type, switch: str):
    check_bool(switch, enabled)
    part = build_checked(key, cfg, cls)  # checked even when off: a typo never passes
    return part if enabled else None


def build_resclip(attention: str, apply_rcs, rcs_cfg: Optional[dict], apply_sfr,
                  sfr_cfg: Optional[dict], num_blocks: int
                  ) -> Tuple[Optional[ResidualCrossCorrelation], Optional[SemanticFeedback]]:
    """ResCLIP's RCS and SFR for the pipeline (None where off), their cfgs checked either
    way; one ValueError naming the key. Each enabled part logs its start-up line."""
    rcs = _build_part(apply_rcs, rcs_cfg, RCS_CFG_KEY, ResidualCrossCorrelation, 'apply_rcs')
    sfr = _build_part(apply_sfr, sfr_cfg, SFR_CFG_KEY, SemanticFeedback, 'apply_sfr')
    if (rcs is not None or sfr is not None) and attention not in RESCLIP_ATTENTIONS:
        switches = ' and '.join(name for name, part in (('apply_rcs=True', rcs),
                                                        ('apply_sfr=True', sfr)) if part)
        raise ValueError(f'{switches} (ResCLIP) needs attention in {list(RESCLIP_ATTENTIONS)}, '
                         f'got attention={attention!r}: ResCLIP edits the dense softmax '
                         'attention (logits and P) of these variants only.')
    if rcs is not None:
        rcs.resolve_layers(num_blocks)
        log_enabled('ResCLIP RCS', rcs.extra_repr())
    if sfr is not None:
        log_enabled('ResCLIP SFR', sfr.extra_repr())
    return rcs, sfr
