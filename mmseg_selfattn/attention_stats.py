"""Dataset-level statistics of what stages 3, 4 and 6 look at, to choose their settings
for a new dataset (``tools/analyze_attention.py``).

Per image, from the tensors a real ``explain()`` run recorded (``StageMaps.recorded``),
computed on the given device with the stages' own functions:

- self-attention (stage 3): the patch diagonal A_ii of the last block's standard
  attention, and which tokens ``self_attention_deficit`` boosts (e_i > 0, i.e.
  A_ii < τ) for every τ of a grid and the configured τ;
- outlier scores (stage 4): r_i = ``outlier_scores(A, eps)`` *without* and *with*
  self-attention enhancement ("with": A after ``boost_self_attention`` of its diagonal
  at the stage's strength and τ), and per window the number of tokens
  ``rank_outliers`` keeps above each ``min_ratio`` (uncapped, and capped at ``top_k``);
- clusters (stage 6): ``dbscan`` on the features CTD clusters (``features_before_debias``,
  after ``global_debias`` when that stage is on) for a grid of eps; when CTD is on also
  the labels it recorded.

Stage settings come from ``StageMaps.settings`` for the stages that are on, else from
the model config's ``<stage>_cfg`` over the stage's own defaults (``resolve_settings``).
Everything is deterministic; the per-image results are kept on the host (a few floats
per token) and summarised by ``summary()``; ``suggest_settings`` turns the summary into
suggested settings, each with the rule it used.
"""
import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from mmseg.registry import MODELS
from torch import Tensor

from .config_checks import init_defaults
from .stages import PIPELINE_STAGES
from .stages.dbscan import dbscan
from .stages.global_debias import global_debias
from .stages.outlier_suppression import outlier_scores, rank_outliers
from .stages.self_attn_enhancement import boost_self_attention, self_attention_deficit

TAU_GRID = (0.05, 0.10, 0.15, 0.20, 0.25, 0.30)
MIN_RATIO_GRID = (1.0, 2.0, 5.0, 10.0, 20.0)
EPS_GRID = (0.1, 0.15, 0.2, 0.3)
TUNED_STAGES = ('self_attn_enhancement', 'outlier_suppression', 'ctd')
QUANTILES = (0.01, 0.05, 0.1, 0.2, 0.25, 0.3, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999)
# the seed's tuning guidelines
TAU_GUIDELINE = (0.10, 0.25)
STRENGTH_GUIDELINE = (0.05, 0.3)
BOOSTED_FRACTION = (0.10, 0.20, 0.30)  # low, chosen, high share of boosted tokens
OUTLIER_QUANTILE = 0.99  # min_ratio: ~1 % of the patch tokens are candidates
TOP_K_WINDOW_QUANTILE = 0.95  # top_k: the cap binds in at most ~5 % of the windows
MAX_NOISE_FRACTION = 0.25  # eps: CTD leaves noise tokens untouched


def resolve_settings(enabled: Dict[str, dict], model_cfg) -> Dict[str, dict]:
    """Settings of the global debias and the tuned stages: ``{name: {'values': {...},
    'enabled': bool, 'source': str}}``. ``enabled`` is ``StageMaps.settings`` (enabled
    stage -> its settings); a stage that is off gets ``model_cfg['<name>_cfg']`` over the
    defaults of the stage's class."""
    model_cfg = model_cfg or {}
    resolved = {}
    for name in ('global_debias', ) + TUNED_STAGES:
        if name in enabled:
            resolved[name] = dict(values=dict(enabled[name]), enabled=True,
                                  source='stage on: StageMaps.settings')
            continue
        cfg = dict(model_cfg.get(f'{name}_cfg') or {})
        stage_type = cfg.pop('type', PIPELINE_STAGES[name])
        if isinstance(stage_type, str):
            stage_type = MODELS.get(stage_type) or PIPELINE_STAGES[name]
        resolved[name] = dict(values={**init_defaults(stage_type), **cfg}, enabled=False,
                              source=f'stage off: model.{name}_cfg over the stage defaults')
    return resolved


def _grid(values: Sequence[float], extra: Optional[float]) -> List[float]:
    """The grid plus ``extra`` (the configured value), sorted, without duplicates."""
    grid = {float(v) for v in values}
    if extra is not None:
        grid.add(float(extra))
    return sorted(grid)


def grid_key(value: float) -> str:
    """JSON key of a grid value: '0.15', '2', '1e-06'."""
    return f'{value:g}'


class AttentionStatistics:
    """Accumulates the statistics of images analysed one by one.

    Args:
        model_cfg: the model's config (``model.cfg.model``) for the stages that are off.
        device: where the statistics are computed (the model's device).
        tau_grid, min_ratio_grid, eps_grid: grids; the configured τ, min_ratio and eps
            are added to them.
    """

    def __init__(self, model_cfg=None, device='cpu', tau_grid=TAU_GRID,
                 min_ratio_grid=MIN_RATIO_GRID, eps_grid=EPS_GRID):
        self.model_cfg = model_cfg
        self.device = torch.device(device)
        self.grids = dict(tau=tau_grid, min_ratio=min_ratio_grid, eps=eps_grid)
        self.settings: Optional[Dict[str, dict]] = None
        self.images: List[dict] = []

    def _configure(self, stage_settings: Dict[str, dict]) -> None:
        self.settings = resolve_settings(stage_settings, self.model_cfg)
        enhancement = self.settings['self_attn_enhancement']['values']
        outliers = self.settings['outlier_suppression']['values']
        ctd = self.settings['ctd']['values']
        self.tau = float(enhancement['min_self_attn_threshold'])
        self.strength = float(enhancement['enhancement_strength'])
        self.score_eps = float(outliers['eps'])
        self.top_k = int(outliers['top_k'])
        self.min_ratio = None if outliers['min_ratio'] is None else float(outliers['min_ratio'])
        # the scores the stage uses: Ã with enhancement on and score_attention='enhanced'
        self.scored = ('with' if self.settings['self_attn_enhancement']['enabled']
                       and outliers.get('score_attention', 'enhanced') == 'enhanced'
                       and self.strength > 0 and self.tau > 0 else 'without')
        self.min_samples = int(ctd['min_samples'])
        self.ctd_eps = float(ctd['eps'])
        self.tau_grid = _grid(self.grids['tau'], self.tau)
        self.min_ratio_grid = _grid(self.grids['min_ratio'], self.min_ratio)
        self.eps_grid = _grid(self.grids['eps'], self.ctd_eps)
        debias = self.settings['global_debias']
        self.debias_factor = float(debias['values']['factor']) if debias['enabled'] else 0.0

    @torch.no_grad()
    def add(self, stage_maps, name: str = '') -> dict:
        """Adds one image's ``StageMaps``; returns its per-image results (host tensors)."""
        if self.settings is None:
            self._configure(stage_maps.settings)
        recorded = {key: value.to(self.device) for key, value in stage_maps.recorded.items()}
        attention = recorded['attention']
        num_tokens = attention.shape[-1] - 1
        self_attention = attention.diagonal(dim1=-2, dim2=-1)[:, 1:].float()  # (W, N)
        boosted = torch.stack([self_attention_deficit(attention, tau) > 0
                               for tau in self.tau_grid])  # (G, W, N)

        deficit = self_attention_deficit(attention, self.tau)
        enhanced = boost_self_attention(attention[:, None], deficit, self.strength)[:, 0]
        scores = {'without': outlier_scores(attention, self.score_eps),
                  'with': outlier_scores(enhanced, self.score_eps)}
        above, chosen = {}, {}
        for key, score in scores.items():  # tokens the stage keeps above each min_ratio
            above[key] = torch.stack([(rank_outliers(score, num_tokens, ratio) >= 0).sum(-1)
                                      for ratio in self.min_ratio_grid], dim=1)  # (W, R)
            chosen[key] = torch.stack([(rank_outliers(score, self.top_k, ratio) >= 0).sum(-1)
                                       for ratio in self.min_ratio_grid], dim=1)

        features = recorded['features_before_debias']
        if self.debias_factor:  # what CTD clusters: after the global debias
            features = global_debias(features, recorded['x_cls'], self.debias_factor)
        clusters, noise = [], []
        for eps in self.eps_grid:
            labels, _ = dbscan(features, eps, self.min_samples)
            clusters.append(labels.amax(dim=-1).clamp_min(-1) + 1)
            noise.append((labels < 0).float().mean(dim=-1))
        result = dict(
            name=name, windows=attention.shape[0], tokens=num_tokens,
            self_attention=self_attention.flatten(),
            boosted=boosted.flatten(1).sum(-1),  # (G,) tokens below each τ
            scores={key: value.flatten() for key, value in scores.items()},
            above=above, chosen=chosen,
            clusters=torch.stack(clusters, dim=1), noise=torch.stack(noise, dim=1))  # (W, E)
        if 'ctd_labels' in recorded:
            labels = recorded['ctd_labels']
            result['ctd_clusters'] = labels.amax(dim=-1).clamp_min(-1) + 1
            result['ctd_noise'] = (labels < 0).float().mean(dim=-1)
        result = _to_host(result)
        self.images.append(result)
        return result

    # -- summary -------------------------------------------------------------------------
    def values(self, key: str, sub: Optional[str] = None) -> np.ndarray:
        """A per-image result of all images, concatenated (numpy)."""
        parts = [image[key] if sub is None else image[key][sub] for image in self.images]
        return torch.cat(parts).numpy()

    def summary(self) -> dict:
        """JSON-ready statistics of all images added (see ``tools/analyze_attention.py``)."""
        if not self.images:
            raise ValueError('no image was analysed.')
        self_attention = self.values('self_attention').astype(np.float64)
        total = self_attention.size
        boosted = sum(image['boosted'] for image in self.images).tolist()
        fraction_below = {grid_key(tau): count / total
                          for tau, count in zip(self.tau_grid, boosted)}
        stats = dict(
            settings=self.settings,
            num_images=len(self.images),
            num_windows=int(sum(image['windows'] for image in self.images)),
            tokens_per_window=sorted({image['tokens'] for image in self.images}),
            self_attention=dict(
                **_describe(self_attention), tau=self.tau,
                fraction_below=fraction_below,
                fraction_below_tau=fraction_below[grid_key(self.tau)],
                histogram=_histogram(self_attention, np.linspace(
                    0, max(0.35, float(self_attention.max())), 71).tolist())),
            outlier_scores=self._outlier_summary(),
            clusters=self._cluster_summary(),
            per_image=[self._image_summary(image) for image in self.images])
        stats['suggested'] = suggest_settings(stats, self.values('self_attention'),
                                              self.values('scores', self.scored), self.scored)
        return stats

    def _outlier_summary(self) -> dict:
        summary = dict(eps=self.score_eps, strength=self.strength, tau=self.tau,
                       top_k=self.top_k, min_ratio=self.min_ratio,
                       min_ratio_grid=self.min_ratio_grid)
        for key in ('without', 'with'):
            scores = self.values('scores', key).astype(np.float64)
            positive = scores[scores > 0]
            low = float(positive.min()) if positive.size else 1e-3
            high = max(float(scores.max()), low * 10)
            edges = np.geomspace(low, high, 61).tolist()
            above = self.values('above', key)  # (windows, R)
            chosen = self.values('chosen', key)
            counts = {}
            for column, ratio in enumerate(self.min_ratio_grid):
                counts[grid_key(ratio)] = dict(
                    mean=float(above[:, column].mean()),
                    median=float(np.median(above[:, column])),
                    max=int(above[:, column].max()),
                    total=int(above[:, column].sum()),
                    windows_with_any=float((above[:, column] > 0).mean()),
                    mean_chosen=float(chosen[:, column].mean()))
            summary[key] = dict(**_describe(scores), histogram=_histogram(scores, edges),
                                counts_per_window=counts)
        if self.min_ratio is None:  # the stage keeps top_k in every window
            kept = sum(image['windows'] * min(self.top_k, image['tokens'])
                       for image in self.images) / sum(image['windows'] for image in self.images)
            summary['chosen_per_window_at_config'] = {'without': kept, 'with': kept}
        else:
            summary['chosen_per_window_at_config'] = {
                key: summary[key]['counts_per_window'][grid_key(self.min_ratio)]['mean_chosen']
                for key in ('without', 'with')}
        return summary

    def _cluster_summary(self) -> dict:
        clusters, noise = self.values('clusters'), self.values('noise')
        debias = ' after global_debias (factor ' \
            f'{self.debias_factor:g})' if self.debias_factor else ''
        summary = dict(
            min_samples=self.min_samples, eps=self.ctd_eps, eps_grid=self.eps_grid,
            grid_source=f"dbscan on recorded['features_before_debias']{debias}: "
            'the features CTD clusters',
            grid={grid_key(eps): _cluster_row(clusters[:, column], noise[:, column])
                  for column, eps in enumerate(self.eps_grid)},
            recorded=None)
        if all('ctd_clusters' in image for image in self.images):
            summary['recorded'] = dict(
                eps=self.ctd_eps, source="recorded['ctd_labels'] of the CTD stage",
                **_cluster_row(self.values('ctd_clusters'), self.values('ctd_noise')))
        return summary

    def _image_summary(self, image: dict) -> dict:
        column = self.min_ratio_grid.index(self.min_ratio) if self.min_ratio is not None \
            else None
        row = dict(image=image['name'], windows=image['windows'], tokens=image['tokens'],
                   mean_self_attention=float(image['self_attention'].double().mean()),
                   fraction_below_tau=float(image['boosted'][self.tau_grid.index(self.tau)])
                   / image['self_attention'].numel())
        for key in ('without', 'with'):
            row[f'max_score_{key}'] = float(image['scores'][key].max())
            if column is not None:
                row[f'outliers_above_min_ratio_{key}'] = float(
                    image['above'][key][:, column].double().mean())
        column = self.eps_grid.index(self.ctd_eps)
        row['clusters_at_eps'] = float(image['clusters'][:, column].double().mean())
        return row


def _to_host(value):
    if isinstance(value, Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: _to_host(item) for key, item in value.items()}
    return value


def _describe(values: np.ndarray) -> dict:
    return dict(count=int(values.size), mean=float(values.mean()),
                std=float(values.std()), min=float(values.min()), max=float(values.max()),
                quantiles={grid_key(q): float(np.quantile(values, q)) for q in QUANTILES})


def _histogram(values: np.ndarray, edges: List[float]) -> dict:
    counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=np.asarray(edges))
    return dict(edges=[float(edge) for edge in edges], counts=counts.tolist())


def _cluster_row(clusters: np.ndarray, noise: np.ndarray) -> dict:
    return dict(mean_clusters=float(clusters.mean()), median_clusters=float(np.median(clusters)),
                min_clusters=int(clusters.min()), max_clusters=int(clusters.max()),
                single_cluster_windows=float((clusters <= 1).mean()),
                mean_noise_fraction=float(noise.mean()),
                median_noise_fraction=float(np.median(noise)))


def _round(value: float, digits: int = 2) -> float:
    """``value`` to ``digits`` significant digits."""
    if value <= 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - int(math.floor(math.log10(value))))


def suggest_settings(stats: dict, self_attention: np.ndarray, scores: np.ndarray,
                     scored: str = 'without') -> dict:
    """Settings derived from the data, each with its rule (see the module's constants);
    ``scores`` are r_i ``scored`` ('without' / 'with') enhancement, as the stage scores."""
    low, chosen, high = (float(np.quantile(self_attention.astype(np.float64), q))
                         for q in BOOSTED_FRACTION)
    tau = min(max(_round(chosen), TAU_GUIDELINE[0]), TAU_GUIDELINE[1])
    tau_note = '' if TAU_GUIDELINE[0] <= chosen <= TAU_GUIDELINE[1] else (
        f' The data put it at {chosen:.4g}, outside the guideline '
        f'{TAU_GUIDELINE[0]}-{TAU_GUIDELINE[1]}: clamped; with τ = {tau:g} '
        f'{100 * float((self_attention < tau).mean()):.1f}% of the tokens are boosted.')
    suggestions = dict(min_self_attn_threshold=dict(
        value=tau, data_value=chosen, range=[low, high],
        rule=f'τ = the {BOOSTED_FRACTION[1]:.0%} quantile of the patch A_ii, so that about '
        f'{BOOSTED_FRACTION[1]:.0%} of the tokens are boosted ({BOOSTED_FRACTION[0]:.0%}'
        f'-{BOOSTED_FRACTION[2]:.0%}: τ in [{low:.4g}, {high:.4g}]), rounded to 2 '
        f'significant digits and kept in the seed\'s {TAU_GUIDELINE[0]}-{TAU_GUIDELINE[1]}.'
        + tau_note))
    suggestions['enhancement_strength'] = dict(
        value=0.1, rule='the default 0.1 (guideline '
        f'{STRENGTH_GUIDELINE[0]}-{STRENGTH_GUIDELINE[1]}): the attention statistics do not '
        'pin the strength; tune it on a few labelled images.')

    min_ratio = _round(float(np.quantile(scores.astype(np.float64), OUTLIER_QUANTILE)))
    per_window = _tokens_above_per_window(scores, stats, min_ratio)
    top_k = max(1, int(math.ceil(np.quantile(per_window, TOP_K_WINDOW_QUANTILE))))
    suggestions['min_ratio'] = dict(
        value=min_ratio, rule=f'the {OUTLIER_QUANTILE:.0%} quantile of r_i ({scored} '
        'enhancement: the attention the stage scores), 2 significant digits: about '
        f'{1 - OUTLIER_QUANTILE:.0%} of the patch tokens can be outliers',
        mean_outliers_per_window=float(per_window.mean()))
    suggestions['top_k'] = dict(
        value=top_k, rule=f'the {TOP_K_WINDOW_QUANTILE:.0%} quantile over windows of the '
        'number of tokens with r_i > the suggested min_ratio (at least 1): the cap binds in '
        f'at most ~{1 - TOP_K_WINDOW_QUANTILE:.0%} of the windows.')

    grid = stats['clusters']['grid']
    quiet = [key for key, row in grid.items() if row['mean_noise_fraction'] <= MAX_NOISE_FRACTION]
    split = [key for key in quiet if grid[key]['median_clusters'] >= 2]
    noise_rule = (f'at most {MAX_NOISE_FRACTION:.0%} noise tokens per window on average (CTD '
                  'leaves noise untouched)')
    if split:
        eps_key = min(split, key=float)
        eps_rule = (f'the smallest eps of the grid with {noise_rule} and at least 2 clusters '
                    'per window on median (one cluster shifts every token alike, like the '
                    'global debias).')
    elif quiet:
        eps_key = min(quiet, key=lambda key: (-grid[key]['mean_clusters'], float(key)))
        eps_rule = ('no eps of the grid gives >= 2 clusters per window on median with '
                    f'<= {MAX_NOISE_FRACTION:.0%} noise: the eps with the most clusters per '
                    f'window (mean) among those with {noise_rule}; try smaller eps '
                    '(--eps-grid).')
    else:
        eps_key = min(grid, key=lambda key: (grid[key]['mean_noise_fraction'], float(key)))
        eps_rule = (f'no eps of the grid has {noise_rule}: the eps with the least noise; try '
                    'larger eps (--eps-grid) or a smaller min_samples.')
    suggestions['eps'] = dict(value=float(eps_key), rule=eps_rule, **grid[eps_key])
    return suggestions


def _tokens_above_per_window(scores: np.ndarray, stats: dict, threshold: float) -> np.ndarray:
    """Tokens ``rank_outliers`` keeps above ``threshold`` in each window, from the flat
    scores of all windows."""
    counts, start = [], 0
    for image in stats['per_image']:
        size = image['windows'] * image['tokens']
        window_scores = torch.from_numpy(scores[start:start + size]).view(image['windows'], -1)
        counts.append((rank_outliers(window_scores, image['tokens'], threshold) >= 0).sum(-1))
        start += size
    return torch.cat(counts).numpy()
