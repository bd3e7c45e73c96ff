"""One picture and one JSON-ready summary of what every stage did on one image.

``diagnostics_sheet(model.explain(image))`` draws a 4 x 3 sheet (``matplotlib.figure.Figure``,
no pyplot state, safe under Agg) with these panels, all in the image's pixel coordinates:

- ``input`` and ``prediction`` (the labels over the photo, legend: class and area %)
- ``self-attention A_ii`` with the contour at tau = min_self_attn_threshold (stage 3)
- ``deficit e_i`` = max(0, tau - A_ii) (stage 3)
- ``outlier score r_i`` = A[cls, i] / (A[i, i] + eps) (Ã, the boosted attention, with
  ``score_attention='enhanced'`` and stage 3 on), log colour scale, the tokens
  stage 4 chose ringed (``StageMaps.outlier_points``)
- ``CTD clusters``: stage 6's DBSCAN ids (``window_mosaic``), one colour per id, noise grey
- ``cos(X, x_cls) before debias`` / ``after debias``: entering stage 5 / leaving stage 6,
  on one colour scale
- ``p(<class>)`` for the three classes with the largest predicted area (probabilities 0..1)
- ``stage settings``: every stage on or off, with the settings of those on

A panel whose stage is off keeps its title and says ``stage off (apply_<stage>=False)``.
``diagnostics_summary`` gives the numbers behind the sheet as plain Python values.
"""
import warnings
from typing import List, Sequence

import imgviz
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import LogNorm, Normalize, to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .explain import StageMaps

STAGES = ('similarity_enhancement', 'self_attn_enhancement', 'outlier_suppression',
          'global_debias', 'ctd')
RANDOM_WEIGHTS_NOTE = 'RANDOM WEIGHTS: pipeline check, not a segmentation'
NOISE_GREY = np.array([0.62, 0.62, 0.62])
# tab10 without its grey (noise is grey)
CLUSTER_COLOURS = np.array([to_rgb(f'C{index}') for index in range(10) if index != 7])
LEGEND_ENTRIES = 8  # prediction legend rows; the remaining classes are summed up
TOP_CLASSES = 3


def display_name(synonyms: Sequence[str]) -> str:
    """'tree, forest'; long synonym lists (VOC's background) end in '...'."""
    return ', '.join(synonyms[:2]) + (', ...' if len(synonyms) > 2 else '')


def stage_off(stage: str) -> str:
    return f'stage off (apply_{stage}=False)'


def class_areas(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Share of the image (%) of every class."""
    return 100.0 * np.bincount(labels.ravel(), minlength=num_classes) / labels.size


def top_classes(stage_maps: StageMaps, count: int = TOP_CLASSES) -> List[int]:
    """The ``count`` classes with the largest predicted area; if fewer are predicted, the
    rest by mean probability."""
    areas = class_areas(stage_maps.labels.numpy(), len(stage_maps.class_names))
    mean_prob = stage_maps.probabilities.float().mean(dim=(1, 2)).numpy()
    order = sorted(range(len(areas)), key=lambda c: (-areas[c], -mean_prob[c], c))
    return order[:count]


# -- summary -------------------------------------------------------------------------------
def diagnostics_summary(stage_maps: StageMaps) -> dict:
    """JSON-serialisable numbers of one image, from the recorded stage tensors.

    Keys: ``image_size`` [H, W], ``num_windows``, ``patch_grid`` [h, w]; ``classes``
    (every predicted class, largest area first: index, name, area_percent);
    ``self_attention`` (mean / std (population) / min / max of the patch A_ii over all
    windows, ``threshold`` tau and ``fraction_below_threshold`` when stage 3 is on, else
    None); ``outliers`` (``chosen_per_window``, ``total``, ``top_k``, ``min_ratio`` and
    ``above_min_ratio``, the number of patches of all windows with r_i > min_ratio, when
    set); ``ctd`` (``clusters_per_window``: distinct ids >= 0, ``noise_fraction``);
    ``cls_similarity`` (mean cos(X_i, x_cls) before and after debias); ``settings``
    (enabled stage -> its settings) and ``enabled_stages``.
    """
    recorded, settings = stage_maps.recorded, stage_maps.settings
    names = [display_name(synonyms) for synonyms in stage_maps.class_names]
    areas = class_areas(stage_maps.labels.numpy(), len(names))
    present = [c for c in np.argsort(-areas, kind='stable') if areas[c] > 0]
    classes = [dict(index=int(c), name=names[c], area_percent=float(areas[c]))
               for c in present]

    self_attention = None  # SC-CLIP computes no standard last-block attention
    if 'attention' in recorded:
        self_attn = recorded['attention'].diagonal(dim1=-2, dim2=-1)[:, 1:].double()
        tau = settings.get('self_attn_enhancement', {}).get('min_self_attn_threshold')
        self_attention = dict(
            mean=float(self_attn.mean()), std=float(self_attn.std(correction=0)),
            min=float(self_attn.min()), max=float(self_attn.max()),
            threshold=None if tau is None else float(tau),
            fraction_below_threshold=None if tau is None else float(
                (self_attn < tau).double().mean()))

    outliers = dict(enabled='outlier_suppression' in settings, chosen_per_window=None,
                    total=None, top_k=None, min_ratio=None, above_min_ratio=None)
    if outliers['enabled']:
        stage = settings['outlier_suppression']
        outliers.update(top_k=stage.get('top_k'), min_ratio=stage.get('min_ratio'))
    if 'outlier_indices' in recorded:
        chosen = (recorded['outlier_indices'] >= 0).sum(dim=1)
        outliers.update(chosen_per_window=chosen.tolist(), total=int(chosen.sum()))
        scores = recorded['outlier_scores'].double()
        outliers.update(score_median=float(scores.median()), score_max=float(scores.max()))
        if outliers['min_ratio'] is not None:
            outliers['above_min_ratio'] = int((scores > outliers['min_ratio']).sum())

    ctd = dict(enabled='ctd' in settings, clusters_per_window=None, noise_fraction=None)
    if 'ctd_labels' in recorded:
        labels = recorded['ctd_labels']
        ctd.update(clusters_per_window=[int(window[window >= 0].unique().numel())
                                        for window in labels],
                   noise_fraction=float((labels < 0).double().mean()))

    cls_similarity = None  # SC-CLIP: no x_cls
    if 'x_cls' in recorded:
        x_cls = F.normalize(recorded['x_cls'].double(), dim=-1)[:, None]
        cls_similarity = {
            f'mean_{when}': float((F.normalize(recorded[f'features_{when}_debias'].double(),
                                               dim=-1) * x_cls).sum(dim=-1).mean())
            for when in ('before', 'after')}
    methods = {}
    if 'anomalies' in recorded:
        chosen = recorded['anomalies'].sum(dim=1)
        scores = recorded['anomaly_scores'].double()
        methods['scclip'] = dict(anomalies_per_window=chosen.tolist(), total=int(chosen.sum()),
                                 lof_median=float(scores.median()),
                                 lof_max=float(scores.max()))
    if 'rcs_attention' in recorded:
        diagonal = recorded['rcs_attention'].diagonal(dim1=-2, dim2=-1)[:, 1:].double()
        methods['rcs'] = dict(self_attention_mean=float(diagonal.mean()))
    if 'sfr_labels' in recorded:
        labels = recorded['sfr_labels']
        methods['sfr'] = dict(labels_per_window=[int(window.unique().numel())
                                                 for window in labels])
    features = recorded['features_before_debias']
    return _jsonable(dict(
        image_size=list(stage_maps.image.shape[:2]),
        num_windows=int(features.shape[0]),
        patch_grid=list(stage_maps._layout['grid']),
        classes=classes, self_attention=self_attention, outliers=outliers, ctd=ctd,
        cls_similarity=cls_similarity, methods=methods,
        enabled_stages=[stage for stage in STAGES if stage in settings],
        settings=settings))


def _jsonable(value):
    """Tuples -> lists, numpy / torch scalars -> Python numbers, other objects -> str."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (np.generic, torch.Tensor)) and np.ndim(value) == 0:
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# -- sheet ---------------------------------------------------------------------------------
def diagnostics_sheet(stage_maps: StageMaps, title: str = '',
                      random_weights: bool = False, opacity: float = 0.5,
                      dpi: int = 100) -> Figure:
    """The 4 x 3 panel sheet of one image (see the module docstring); ``title`` heads it
    (image name, config), ``random_weights`` adds a red warning under it. Save it with
    ``figure.savefig(path)``."""
    summary = diagnostics_summary(stage_maps)
    height, width = stage_maps.image.shape[:2]
    width_in = 19.0
    # a map ~ (column - colour bar) wide, its title and subtitle, the legend, the title
    map_height = (width_in / 4 - 1.0) * min(1.5, max(0.5, height / width))
    figure = Figure(figsize=(width_in, 3 * (map_height + 0.8) + 1.9), dpi=dpi,
                    layout='constrained')
    top = 1 - 0.9 / figure.get_figheight()  # room for the title lines
    figure.get_layout_engine().set(rect=(0, 0, 1, top), h_pad=0.06, w_pad=0.06)
    figure.text(0.5, 1 - 0.12 / figure.get_figheight(), title, ha='center', va='top',
                fontsize=14, weight='bold')
    if random_weights:
        figure.text(0.5, 1 - 0.5 / figure.get_figheight(), RANDOM_WEIGHTS_NOTE, ha='center',
                    va='top', fontsize=13, weight='bold', color='red')
    axes = iter(figure.subplots(3, 4).ravel())
    sheet = _Sheet(figure, stage_maps, summary)
    sheet.input(next(axes))
    sheet.prediction(next(axes), opacity)
    sheet.self_attention(next(axes))
    sheet.deficit(next(axes))
    sheet.outlier_score(next(axes))
    sheet.ctd_clusters(next(axes))
    sheet.cls_similarity(next(axes), next(axes))
    for cls in top_classes(stage_maps):
        sheet.probability(next(axes), cls)
    sheet.settings_panel(next(axes))
    for spare in axes:
        spare.set_axis_off()
    return figure


class _Sheet:
    """Draws the panels of one sheet (each method one panel)."""

    def __init__(self, figure: Figure, stage_maps: StageMaps, summary: dict):
        self.figure, self.maps, self.summary = figure, stage_maps, summary
        height, width = stage_maps.image.shape[:2]
        self.extent = (0, width, height, 0)  # pixel x covers [x, x + 1): outlier_points
        self.names = [display_name(synonyms) for synonyms in stage_maps.class_names]
        self.settings = stage_maps.settings

    # helpers
    def _frame(self, axes, title: str, subtitle: str = '') -> None:
        axes.set_title(title, fontsize=12)
        axes.set_xticks([])
        axes.set_yticks([])
        axes.set_xlabel(subtitle, fontsize=9)

    def _off(self, axes, title: str, stage: str, note: str = '') -> None:
        """A panel whose stage is off: the title and a centred note instead of a map."""
        self._frame(axes, title)
        axes.text(0.5, 0.5, note or stage_off(stage), ha='center', va='center', fontsize=11,
                  color='0.35', transform=axes.transAxes, wrap=True)
        for spine in axes.spines.values():
            spine.set_color('0.8')

    def _heat(self, axes, values: torch.Tensor, title: str, subtitle: str = '',
              cmap: str = 'viridis', norm=None):
        self._frame(axes, title, subtitle)
        image = axes.imshow(values.numpy(), cmap=cmap, norm=norm, extent=self.extent,
                            interpolation='nearest')
        bar = self.figure.colorbar(image, ax=axes, shrink=0.9, pad=0.02)
        bar.ax.tick_params(labelsize=8)
        return image, bar

    # panels
    def input(self, axes) -> None:
        height, width = self.maps.image.shape[:2]
        self._frame(axes, 'input', f'{width} x {height} px, '
                    f'{self.summary["num_windows"]} windows of '
                    f'{self.summary["patch_grid"][0]} x {self.summary["patch_grid"][1]} patches')
        axes.imshow(self.maps.image, extent=self.extent)

    def prediction(self, axes, opacity: float) -> None:
        labels = self.maps.labels.numpy()
        colours = imgviz.label_colormap()[np.arange(len(self.names)) % 256]
        blend = (1 - opacity) * self.maps.image + opacity * colours[labels]
        classes = self.summary['classes']
        self._frame(axes, 'prediction', f'{len(classes)} classes predicted')
        axes.imshow(blend.astype(np.uint8), extent=self.extent, interpolation='nearest')
        handles = [Patch(facecolor=colours[c['index']] / 255, edgecolor='0.3',
                         label=f'{_shorten(c["name"], 22)}  {c["area_percent"]:.1f}%')
                   for c in classes[:LEGEND_ENTRIES]]
        rest = classes[LEGEND_ENTRIES:]
        if rest:
            handles.append(Patch(facecolor='white', edgecolor='0.3', label=(
                f'{len(rest)} more  {sum(c["area_percent"] for c in rest):.1f}%')))
        axes.legend(handles=handles, loc='upper center', bbox_to_anchor=(0.5, -0.09),
                    ncol=min(2, len(handles)), fontsize=8, frameon=False, handlelength=1.2,
                    borderaxespad=0, columnspacing=1.0)

    def self_attention(self, axes) -> None:
        if self.summary['self_attention'] is None:  # SC-CLIP: its anomaly score instead
            return self.anomaly_score(axes)
        title, stats = 'self-attention A_ii', self.summary['self_attention']
        tau = stats['threshold']
        values = self.maps.maps['self_attention']
        if tau is None:
            subtitle = (f'{stage_off("self_attn_enhancement")}\n'
                        f'no tau; patch A_ii mean {stats["mean"]:.3g}')
            self._heat(axes, values, title, subtitle)
            return
        below = stats['fraction_below_threshold']
        contour = ('red contour' if 0 < below < 1 else
                   f'no contour: all patches {"below" if below == 1 else "above"} tau')
        subtitle = (f'tau = {tau:g} ({contour})\n{100 * below:.1f}% of patches below tau, '
                    f'mean {stats["mean"]:.3g}')
        _, bar = self._heat(axes, values, title, subtitle)
        with warnings.catch_warnings():  # a map entirely above or below tau: no line
            warnings.simplefilter('ignore')
            axes.contour(np.arange(values.shape[1]) + 0.5, np.arange(values.shape[0]) + 0.5,
                         values.numpy(), levels=[tau], colors='red', linewidths=1.2)
        low, high = bar.mappable.get_clim()
        if low <= tau <= high:
            bar.ax.axhline(tau, color='red', linewidth=1.5)

    def anomaly_score(self, axes) -> None:
        stats = self.summary['methods'].get('scclip')
        if stats is None:
            return self._off(axes, 'self-attention A_ii', '', 'not computed')
        self._heat(axes, self.maps.maps['anomaly_score'], 'SC-CLIP anomaly score (LOF)',
                   f'of the last block\'s input; {stats["total"]} anomalies replaced\n'
                   f'LOF median {stats["lof_median"]:.3g}, max {stats["lof_max"]:.3g}',
                   cmap='magma')

    def deficit(self, axes) -> None:
        title = 'deficit e_i'
        if 'deficit' not in self.maps.maps and 'anomaly' in self.maps.maps:
            return self._heat(axes, self.maps.maps['anomaly'], 'SC-CLIP anomalies O',
                              'share of the windows replacing the patch', cmap='Reds',
                              norm=Normalize(0, 1))
        if 'deficit' not in self.maps.maps and 'rcs_self_attention' in self.maps.maps:
            return self._heat(axes, self.maps.maps['rcs_self_attention'],
                              'ResCLIP RCS: A_c diagonal',
                              'head mean of the rcs_cfg.layers blocks,\n'
                              'mixed into the last block')
        if 'deficit' not in self.maps.maps:
            return self._off(axes, title, 'self_attn_enhancement')
        tau = self.summary['self_attention']['threshold']
        stage = self.settings['self_attn_enhancement']
        self._heat(axes, self.maps.maps['deficit'], title,
                   f'max(0, tau - A_ii), tau = {tau:g}\nstrength '
                   f'{stage.get("enhancement_strength")}, mode {stage.get("mode")}', cmap='magma')

    def outlier_score(self, axes) -> None:
        title = 'outlier score r_i'
        if 'outlier_score' not in self.maps.maps:
            note = ('' if 'outlier_suppression' not in self.settings
                    else 'stage on, nothing recorded')
            return self._off(axes, title, 'outlier_suppression', note)
        values = self.maps.maps['outlier_score']
        positive = values[values > 0]
        high = float(values.max()) if len(positive) else 1.0
        low = float(positive.min()) if len(positive) else high / 10
        low = min(max(low, high * 1e-6), high / 10)  # at least one decade, at most six
        outliers = self.summary['outliers']
        points = self.maps.outlier_points().numpy()
        ratio = outliers['min_ratio']
        score = ('Ã[cls,i] / (Ã[i,i] + eps), Ã boosted' if self.maps.outliers_score_enhanced
                 else 'A[cls,i] / (A[i,i] + eps)')
        subtitle = (f'{score}, log scale\n{outliers["total"]} chosen '
                    f'(cyan rings): top_k {outliers["top_k"]} per window'
                    + ('' if ratio is None else f' with r_i > {ratio:g}'))
        self._heat(axes, values, title, subtitle, cmap='magma', norm=LogNorm(low, high))
        axes.scatter(points[:, 0], points[:, 1], s=40, facecolors='none', edgecolors='cyan',
                     linewidths=1.3)
        axes.set_xlim(0, self.extent[1])
        axes.set_ylim(self.extent[2], 0)

    def ctd_clusters(self, axes) -> None:
        title = 'CTD clusters'
        if 'ctd_clusters' not in self.maps.windows and 'sfr_labels' in self.maps.windows:
            return self.sfr_labels(axes)
        if 'ctd_clusters' not in self.maps.windows:
            note = ('' if 'ctd' not in self.settings
                    else 'stage on, nothing clustered (scale = refine = 0)')
            return self._off(axes, title, 'ctd', note)
        ids = self.maps.window_mosaic('ctd_clusters').numpy()
        palette = CLUSTER_COLOURS
        rgb = np.where((ids >= 0)[..., None], palette[np.maximum(ids, 0) % len(palette)],
                       NOISE_GREY)
        ctd = self.summary['ctd']
        counts = ctd['clusters_per_window']
        count = (f'{min(counts)}' if min(counts) == max(counts)
                 else f'{min(counts)}-{max(counts)}')
        self._frame(axes, title, f'{count} clusters per window (colour = id, per window)\n'
                    f'noise (grey) {100 * ctd["noise_fraction"]:.1f}%')
        axes.imshow(rgb, extent=self.extent, interpolation='nearest')

    def sfr_labels(self, axes) -> None:
        ids = self.maps.window_mosaic('sfr_labels').numpy()
        palette = CLUSTER_COLOURS
        counts = self.summary['methods']['sfr']['labels_per_window']
        self._frame(axes, 'ResCLIP SFR: pass-1 labels',
                    f'{min(counts)}-{max(counts)} queries per window (colour = query)\n'
                    'the feedback that builds the affinity')
        axes.imshow(palette[ids % len(palette)], extent=self.extent, interpolation='nearest')

    def cls_similarity(self, before_axes, after_axes) -> None:
        maps = self.maps.maps
        if self.summary['cls_similarity'] is None:  # SC-CLIP
            for axes, when in ((before_axes, 'before'), (after_axes, 'after')):
                self._off(axes, f'cos(X, x_cls) {when} debias', '',
                          "attention='scclip' has no x_cls")
            return
        before, after = maps['cls_similarity_before'], maps['cls_similarity_after']
        norm = Normalize(float(min(before.min(), after.min())),
                         float(max(before.max(), after.max())))
        means = self.summary['cls_similarity']
        debias = [stage for stage in ('global_debias', 'ctd') if stage in self.settings]
        self._heat(before_axes, before, 'cos(X, x_cls) before debias',
                   f'entering global debias; mean {means["mean_before"]:.3f}',
                   cmap='coolwarm', norm=norm)
        note = (f'after {" + ".join(debias)}; ' if debias else
                'stage off (apply_global_debias=False, apply_ctd=False)\nsame as before; ')
        self._heat(after_axes, after, 'cos(X, x_cls) after debias',
                   f'{note}mean {means["mean_after"]:.3f}', cmap='coolwarm', norm=norm)

    def probability(self, axes, cls: int) -> None:
        area = next((c['area_percent'] for c in self.summary['classes']
                     if c['index'] == cls), 0.0)
        values = self.maps.probabilities[cls].float()
        self._heat(axes, values, f'p({self.names[cls]})',
                   f'area {area:.1f}%, mean p {float(values.mean()):.3f}', cmap='inferno',
                   norm=Normalize(0, 1))

    def settings_panel(self, axes) -> None:
        self._frame(axes, 'stage settings')
        axes.set_axis_off()
        lines = []
        for stage in STAGES:
            if stage not in self.settings:
                lines.append(f'{stage}: off')
                continue
            lines.append(f'{stage}: on')
            items = [f'{key}={value}' for key, value in self.settings[stage].items()]
            lines.extend(_wrap(items, width=44, indent='  '))
        axes.text(0.0, 1.0, '\n'.join(lines), ha='left', va='top', fontsize=8.5,
                  family='monospace', transform=axes.transAxes)


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3].rstrip(' ,') + '...'


def _wrap(items: Sequence[str], width: int, indent: str) -> List[str]:
    lines, line = [], indent
    for item in items:
        if len(line) > len(indent) and len(line) + len(item) + 2 > width:
            lines.append(line.rstrip(', '))
            line = indent
        line += item + ', '
    if len(line) > len(indent):
        lines.append(line.rstrip(', '))
    return lines

