"""Dataset-level attention statistics, to choose τ, min_ratio / top_k and CTD's eps for a
new dataset.

    python tools/analyze_attention.py CONFIG [--images DIR_OR_FILE ...] [--data-root DIR]
        [--max-images N] [--out-dir DIR] [--pretrained TAG|PATH|none]
        [--cfg-options KEY=VALUE ...] [--device cuda|cpu] [--no-progress]

Every image (the config's test set, or ``--images``: folders and/or files) goes through a
real run of the model (``model.explain``); from the tensors the stages recorded, with
the stages' own functions (``mmseg_selfattn/attention_stats.py``):

- the patch self-attention A_ii of the last block and the share of tokens below each τ
  (the tokens self-attention enhancement boosts);
- the outlier scores r_i = A[cls, i] / (A[i, i] + eps) without and with self-attention
  enhancement, and the outliers per window above each min_ratio;
- DBSCAN cluster counts and noise per window for a grid of eps (and CTD's own labels
  when CTD is on).

Writes to ``--out-dir`` (default ``work_dirs/analyze_attention/<config stem>``):
``report.md`` (tables and suggested settings with their rules), ``stats.json`` (all
numbers), ``self_attention_hist.png``, ``outlier_scores.png`` and ``clusters.png``.
Stage settings are those of the run for the stages that are on, else the config's
``<stage>_cfg``. Statistics with random weights (``--pretrained none``) only show that
the pipeline runs: the report says so.

A mistake in the arguments or in the user's files (a missing config, data folder or image,
an image folder without images, an undecodable image, an ``--out-dir`` that is a file, a
setting the model refuses, grid values out of range) stops the tool with one line on stderr
naming the argument or file, exit code 2 (docs/errors.md lists them).
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
import mmseg_selfattn  # noqa: E402,F401  (mmcv.ops stand-in, registers the segmentor)

import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from tqdm import tqdm  # noqa: E402

from mmseg_selfattn.attention_stats import (EPS_GRID, MAX_NOISE_FRACTION,  # noqa: E402
                                            MIN_RATIO_GRID, TAU_GRID, AttentionStatistics,
                                            grid_key)
from mmseg_selfattn.benchmarks import dataset_cfg_of, set_data_dir  # noqa: E402
from mmseg_selfattn.cli import (UsageError, check_exists, check_out_dir,  # noqa: E402
                                check_pretrained, key_value, number, positive_int,
                                run_main, torch_device, user_files)
from mmseg_selfattn.progress import BAR_FORMAT, LINE_FORMAT  # noqa: E402
from mmseg_selfattn.tool_checks import (check_segmentor_config, model_settings,  # noqa: E402
                                        read_config)
from mmseg_selfattn.transforms import decode_image_file  # noqa: E402

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
PER_IMAGE_ROWS = 50  # rows of the per-image table in report.md (all in stats.json)


class AnalyzeError(UsageError):
    """A problem with the input that stops the analysis (one line, exit 2)."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', metavar='CONFIG', help='config file (its model and test set)')
    parser.add_argument('--images', nargs='+', metavar='DIR_OR_FILE',
                        help='image folders (their *.jpg, *.png, ... files, sorted) and/or '
                        "image files, instead of the config's test set")
    parser.add_argument('--data-root', help='folder holding the datasets in the layout of '
                        'data/ (as tools/test.py and eval_all.py take it)')
    parser.add_argument('--max-images', type=positive_int, help='the first N images only')
    parser.add_argument('--out-dir', help='default: work_dirs/analyze_attention/<config stem>')
    parser.add_argument('--pretrained', help="open_clip tag, checkpoint path, or 'none' for "
                        "random weights (default: the config's)")
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, type=key_value,
                        help='override config keys, e.g. model.slide_crop=336')
    parser.add_argument('--device', type=torch_device,
                        default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='cpu, cuda or cuda:N')
    parser.add_argument('--seed', type=int, default=0,
                        help='torch seed set before the model is built (random weights)')
    parser.add_argument('--tau-grid', nargs='+', type=number(0, 1), default=list(TAU_GRID),
                        help='self-attention thresholds τ, in [0, 1]')
    parser.add_argument('--min-ratio-grid', nargs='+', type=number(0, math.inf),
                        default=list(MIN_RATIO_GRID), help='outlier score ratios, >= 0')
    parser.add_argument('--eps-grid', nargs='+', type=number(0, 2, low_open=True),
                        default=list(EPS_GRID),
                        help='DBSCAN eps (cosine distance), in (0, 2]')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar on stderr')
    return parser.parse_args(argv)


def check_arguments(args: argparse.Namespace) -> None:
    """``UsageError`` for the mistakes that can be seen before anything is read."""
    check_exists('CONFIG', args.config)
    check_exists('--data-root', args.data_root, 'folder')
    check_out_dir('--out-dir', args.out_dir, parents=True)
    check_pretrained(args.pretrained)


def build_config(args: argparse.Namespace) -> Config:
    cfg = read_config(args.config, args.cfg_options)
    check_segmentor_config(cfg, f'CONFIG {args.config}',
                           'configs/selfattn/selfattn-full_vit-b16_voc21.py')
    if args.pretrained is not None:
        cfg.model.clip.pretrained = None if args.pretrained.lower() == 'none' \
            else args.pretrained
    if not args.images and not cfg.get('test_dataloader'):
        raise UsageError(f'CONFIG {args.config}: it has no test_dataloader (no test set); '
                         'give --images')
    return set_data_dir(cfg, args.data_root and str(Path(args.data_root).resolve()))


# -- inputs ---------------------------------------------------------------------------------
def listed_images(entries: Sequence[str]) -> List[str]:
    """Files of ``--images``: each folder's image files (sorted, not recursive), each file
    as given."""
    paths = []
    for entry in map(Path, entries):
        if entry.is_dir():
            found = sorted(str(path) for path in entry.iterdir()
                           if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise AnalyzeError(f'--images {entry}: no images found in this folder (looked '
                                   f'for {", ".join("*" + s for s in IMAGE_SUFFIXES)})')
            paths += found
        elif entry.is_file():
            paths.append(str(entry))
        else:
            raise AnalyzeError(f'--images {entry}: no such file or folder')
    return paths


def dataset_images(cfg: Config) -> List[str]:
    """Image paths of the config's test set, in the dataset's order."""
    from mmseg.registry import DATASETS
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    dataset_cfg = dataset_cfg_of(cfg)
    root = Path(dataset_cfg.get('data_root') or '')
    folder = root / (dataset_cfg.get('data_prefix') or {}).get('img_path', '')
    where = f"the test set {dataset_cfg['type']} (images in {folder})"
    if not folder.is_dir():
        raise AnalyzeError(f'no images found: {where}: the folder does not exist; give '
                           '--data-root (the folder holding the datasets) or --images')
    with user_files(f"the test set {dataset_cfg['type']} of CONFIG"):
        dataset = DATASETS.build(dict(dataset_cfg, pipeline=[], lazy_init=False))
    paths = [dataset.get_data_info(index)['img_path'] for index in range(len(dataset))]
    if not paths:
        raise AnalyzeError(f'no images found in {where} (check data_prefix, img_suffix and '
                           'ann_file)')
    return paths


def progress(items: Sequence, enabled: bool, desc: str = 'analyze') -> Iterator:
    """``items`` with progress on stderr: images done / total, rate, elapsed and ETA (a bar
    on a terminal, one line every 10 % otherwise), as the test loop's progress."""
    if not enabled:
        yield from items
        return
    out, total = sys.stderr, len(items)
    if out.isatty():
        yield from tqdm(items, total=total, desc=desc, unit=' images', file=out,
                        bar_format=BAR_FORMAT, dynamic_ncols=True)
        return
    start = time.perf_counter()
    for done, item in enumerate(items, 1):
        yield item
        if done * 10 // total > (done - 1) * 10 // total:
            print(tqdm.format_meter(done, total, time.perf_counter() - start, prefix=desc,
                                    unit=' images', bar_format=LINE_FORMAT),
                  file=out, flush=True)


def explain_image(model, path: str):
    """``model.explain(path)``; an image that cannot be read stops with its name."""
    try:
        return model.explain(path)
    except (OSError, ValueError) as error:
        try:
            decode_image_file(path, 'color', 'cv2', None)
        except (OSError, ValueError) as unreadable:
            raise AnalyzeError(f'cannot read image {path}: '
                               f'{str(unreadable).removeprefix(f"{path}: ")}') from error
        raise


# -- outputs --------------------------------------------------------------------------------
def pct(value: float) -> str:
    return f'{100 * value:.2f}%'


def num(value) -> str:
    return 'None' if value is None else f'{value:.4g}'


def table(header: Sequence[str], rows: Iterable[Sequence]) -> List[str]:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
    return lines + ['| ' + ' | '.join(str(cell) for cell in row) + ' |' for row in rows]


def plot_self_attention(stats: dict, values: np.ndarray, path: Path, title: str) -> None:
    """Left: A_ii over the τ range with the τ lines; right: zoomed to the data (0.1 % to
    99.9 % quantiles), where the τ lines inside it are drawn too."""
    attention = stats['self_attention']
    suggested = stats['suggested']['min_self_attn_threshold']['value']
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    low, high = np.quantile(values, [0.001, 0.999])
    high = max(high, low + 1e-6)
    for axes, bins in ((full, attention['histogram']['edges']),
                       (zoom, np.linspace(low, high, 61))):
        axes.hist(np.clip(values, bins[0], bins[-1]), bins=bins, color='tab:blue', alpha=0.8)
        top = axes.get_ylim()[1]
        for tau_key, fraction in attention['fraction_below'].items():
            tau = float(tau_key)
            if not bins[0] <= tau <= bins[-1]:
                continue
            configured = tau == attention['tau']
            colour = 'tab:red' if configured else 'dimgrey'
            axes.axvline(tau, color=colour, linestyle='-' if configured else '--',
                         linewidth=1.5 if configured else 1)
            axes.text(tau, top * 0.97, f' τ={tau:g}\n {100 * fraction:.1f}%', fontsize=7,
                      va='top', color=colour)
        if bins[0] <= suggested <= bins[-1]:
            axes.axvline(suggested, color='tab:green', linestyle=':', linewidth=1.5,
                         label=f'suggested τ={suggested:g}')
        outside = '' if bins[0] <= attention['tau'] <= bins[-1] else ' (off this axis)'
        axes.plot([], [], color='tab:red', label=f"config τ={attention['tau']:g}{outside}")
        axes.set_xlabel('patch self-attention A_ii (last block, head mean)')
        axes.set_ylabel('tokens')
        axes.legend(fontsize=8, loc='center right')
    full.set_title('τ range (labels: share of tokens below τ)', fontsize=9)
    zoom.set_title('zoom: 0.1 % to 99.9 % of the tokens', fontsize=9)
    fig.suptitle(f'{title}: A_ii of {attention["count"]} patch tokens', fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_outlier_scores(stats: dict, scores: dict, path: Path, title: str) -> None:
    outliers = stats['outlier_scores']
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    positive = np.concatenate([s[s > 0] for s in scores.values()])
    edges = np.geomspace(positive.min(), max(positive.max(), positive.min() * 10), 61)
    for (key, values), colour in zip(scores.items(), ('tab:blue', 'tab:orange')):
        left.hist(np.clip(values, edges[0], edges[-1]), bins=edges, histtype='step',
                  color=colour, linewidth=1.5, label=f'{key} enhancement')
    left.set_xscale('log')
    left.set_yscale('log')
    for ratio in outliers['min_ratio_grid']:
        configured = ratio == outliers['min_ratio']
        left.axvline(ratio, color='tab:red' if configured else 'grey',
                     linestyle='-' if configured else '--', linewidth=1)
    if outliers['min_ratio'] is not None:
        left.plot([], [], color='tab:red', label=f"config min_ratio={outliers['min_ratio']:g}")
    suggested = stats['suggested']['min_ratio']['value']
    left.axvline(suggested, color='tab:green', linestyle=':', linewidth=1.5,
                 label=f'suggested min_ratio={suggested:g}')
    left.set_xlabel(f"r_i = A[cls,i] / (A[i,i] + {outliers['eps']:g})  (grey: min_ratio grid)")
    left.set_ylabel('tokens')
    left.legend(fontsize=8)
    left.set_title('outlier scores', fontsize=9)

    ratios = outliers['min_ratio_grid']
    x = np.arange(len(ratios))
    for offset, (key, colour) in zip((-0.2, 0.2), (('without', 'tab:blue'),
                                                   ('with', 'tab:orange'))):
        means = [outliers[key]['counts_per_window'][grid_key(r)]['mean'] for r in ratios]
        bars = right.bar(x + offset, means, width=0.4, color=colour,
                         label=f'{key} enhancement')
        right.bar_label(bars, fmt='%.3g', fontsize=7)
    right.axhline(outliers['top_k'], color='tab:red', linestyle='--', linewidth=1,
                  label=f"top_k={outliers['top_k']}")
    right.set_yscale('symlog', linthresh=1)
    right.set_xticks(x, [f'{r:g}' for r in ratios])
    right.set_xlabel('min_ratio')
    right.set_ylabel('tokens with r_i > min_ratio per window (mean)')
    right.set_title(f"enhancement: strength {outliers['strength']:g}, τ {outliers['tau']:g}",
                    fontsize=9)
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_clusters(stats: dict, analysis: AttentionStatistics, path: Path, title: str) -> None:
    clusters = stats['clusters']
    counts, noise = analysis.values('clusters'), analysis.values('noise')
    labels = [f'{eps:g}' for eps in clusters['eps_grid']]
    boxes = [counts[:, column] for column in range(counts.shape[1])]
    noise_means = [row['mean_noise_fraction'] for row in clusters['grid'].values()]
    if clusters['recorded'] is not None:
        labels.append(f"CTD\n(recorded,\neps {clusters['eps']:g})")
        boxes.append(analysis.values('ctd_clusters'))
        noise_means.append(clusters['recorded']['mean_noise_fraction'])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    left.boxplot(boxes, showmeans=True)
    left.set_xticks(range(1, len(labels) + 1), labels)
    left.set_xlabel('DBSCAN eps (cosine distance)')
    left.set_ylabel('clusters per window')
    left.set_title(f"min_samples {clusters['min_samples']}", fontsize=9)
    colours = ['tab:blue'] * len(clusters['eps_grid']) + ['tab:orange'] * (
        len(labels) - len(clusters['eps_grid']))
    bars = right.bar(range(len(labels)), noise_means, color=colours)
    right.bar_label(bars, labels=[f'{100 * value:.1f}%' for value in noise_means], fontsize=7)
    right.axhline(MAX_NOISE_FRACTION, color='grey', linestyle='--', linewidth=1,
                  label=f'{MAX_NOISE_FRACTION:.0%} (eps rule)')
    right.set_xticks(range(len(labels)), labels)
    right.set_ylim(0, 1)
    right.set_xlabel('DBSCAN eps (cosine distance)')
    right.set_ylabel('noise tokens per window (mean fraction)')
    right.legend(fontsize=8)
    right.set_title(f"suggested eps {stats['suggested']['eps']['value']:g}", fontsize=9)
    fig.suptitle(f"{title}\n{clusters['grid_source']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(stats: dict, path: Path) -> None:
    run, attention = stats['run'], stats['self_attention']
    outliers, clusters, suggested = (stats['outlier_scores'], stats['clusters'],
                                     stats['suggested'])
    lines = [f"# Attention statistics: {run['config']}", '',
             f"- images: {stats['num_images']} ({run['source']}), windows: "
             f"{stats['num_windows']}, patch tokens per window: "
             f"{', '.join(map(str, stats['tokens_per_window']))}",
             f"- weights: {run['weights']}; device {run['device']}; "
             f"{run['seconds']:.1f} s (model set-up {run['model_seconds']:.1f} s, "
             f"{run['seconds_per_image']:.2f} s per image, the first one with the text "
             'embeddings)']
    if run['random_weights']:
        lines.append('- **note: random CLIP weights (`--pretrained none`)**: these numbers '
                     'show the pipeline running, not the statistics of a trained CLIP; do '
                     'not tune on them.')
    lines += ['', '## Stage settings used', '']
    lines += table(['stage', 'on', 'source', 'settings'], [
        (name, 'yes' if entry['enabled'] else 'no', entry['source'],
         ', '.join(f'{key}={value!r}' for key, value in entry['values'].items()))
        for name, entry in stats['settings'].items()])

    quantiles = attention['quantiles']
    lines += ['', '## Self-attention A_ii (stage 3)', '',
              'Patch diagonal of the last block\'s standard attention (head mean), all '
              'windows of all images. Tokens with A_ii < τ get the deficit '
              'e_i = τ - A_ii (`self_attention_deficit`) and are boosted.', '']
    lines += table(['tokens', 'mean', 'std', 'min', '5%', '25%', 'median', '75%', '95%',
                    'max'],
                   [(attention['count'], num(attention['mean']), num(attention['std']),
                     num(attention['min']), num(quantiles['0.05']), num(quantiles['0.25']),
                     num(quantiles['0.5']), num(quantiles['0.75']), num(quantiles['0.95']),
                     num(attention['max']))])
    lines += ['']
    rows = []
    for tau_key, fraction in attention['fraction_below'].items():
        marks = ['config'] if float(tau_key) == attention['tau'] else []
        if float(tau_key) == suggested['min_self_attn_threshold']['value']:
            marks.append('suggested')
        rows.append((tau_key, pct(fraction), ', '.join(marks)))
    lines += table(['τ', 'tokens with A_ii < τ (boosted)', ''], rows)

    lines += ['', '## Outlier scores r_i (stage 4)', '',
              f"r_i = A[cls,i] / (A[i,i] + eps), eps = {outliers['eps']:g} "
              '(`outlier_scores`). *with enhancement*: A after `boost_self_attention` of '
              f"its diagonal at strength {outliers['strength']:g} and τ {outliers['tau']:g} "
              "(each boosted row rescaled to its sum), what the stage scores with "
              "`score_attention='enhanced'` (the default) and stage 3 on; *without*: A as "
              "recorded, what it scores with `'original'` or stage 3 off.", '']
    lines += table(['scores', 'mean', 'median', '90%', '95%', '99%', '99.9%', 'max'], [
        (key, num(outliers[key]['mean']), *(num(outliers[key]['quantiles'][q]) for q in
                                            ('0.5', '0.9', '0.95', '0.99', '0.999')),
         num(outliers[key]['max'])) for key in ('without', 'with')])
    lines += ['', 'Tokens per window with r_i > min_ratio (what `rank_outliers` keeps before '
              f"the top_k cap), without / with enhancement; chosen: capped at top_k = "
              f"{outliers['top_k']}. Config min_ratio: {num(outliers['min_ratio'])}"
              + (' (the stage keeps top_k tokens in every window)'
                 if outliers['min_ratio'] is None else '') + '.', '']
    rows = []
    for ratio in outliers['min_ratio_grid']:
        without, with_ = (outliers[key]['counts_per_window'][grid_key(ratio)]
                          for key in ('without', 'with'))
        mark = ' (config)' if ratio == outliers['min_ratio'] else ''
        rows.append((f'{ratio:g}{mark}', f"{without['mean']:.3f} / {with_['mean']:.3f}",
                     f"{without['median']:g} / {with_['median']:g}",
                     f"{without['max']} / {with_['max']}",
                     f"{pct(without['windows_with_any'])} / {pct(with_['windows_with_any'])}",
                     f"{without['mean_chosen']:.3f} / {with_['mean_chosen']:.3f}"))
    lines += table(['min_ratio', 'mean per window', 'median', 'max', 'windows with any',
                    'chosen per window (top_k)'], rows)

    lines += ['', '## Clusters (stage 6)', '', f"Grid: {clusters['grid_source']}; DBSCAN on "
              f"cosine distance, min_samples = {clusters['min_samples']}. "
              + ("CTD: the labels the CTD stage recorded (`recorded['ctd_labels']`)."
                 if clusters['recorded'] is not None else
                 'CTD is on but recorded no labels (scale = refine = 0: it does nothing): grid '
                 'only.' if stats['settings']['ctd']['enabled'] else 'CTD is off: grid only.'),
              '']
    rows = [(f'{eps} (grid)', *cluster_cells(row)) for eps, row in clusters['grid'].items()]
    if clusters['recorded'] is not None:
        rows.append((f"{clusters['eps']:g} (CTD, recorded)",
                     *cluster_cells(clusters['recorded'])))
    lines += table(['eps', 'clusters per window: mean', 'median', 'min', 'max',
                    'windows with <= 1 cluster', 'noise tokens (mean)'], rows)

    lines += ['', f'## Per image (first {PER_IMAGE_ROWS}; all in stats.json)', '']
    ratio_note = outliers['min_ratio'] is not None
    header = ['image', 'windows', 'mean A_ii', f"A_ii < τ={attention['tau']:g}",
              'max r_i without / with']
    if ratio_note:
        header.append(f"r_i > {outliers['min_ratio']:g} per window without / with")
    header.append(f"clusters per window (eps {clusters['eps']:g})")
    rows = []
    for image in stats['per_image'][:PER_IMAGE_ROWS]:
        row = [Path(image['image']).name, image['windows'], num(image['mean_self_attention']),
               pct(image['fraction_below_tau']),
               f"{num(image['max_score_without'])} / {num(image['max_score_with'])}"]
        if ratio_note:
            row.append(f"{image['outliers_above_min_ratio_without']:.3f} / "
                       f"{image['outliers_above_min_ratio_with']:.3f}")
        row.append(f"{image['clusters_at_eps']:.2f}")
        rows.append(row)
    lines += table(header, rows)

    tau, top_k = suggested['min_self_attn_threshold'], suggested['top_k']
    min_ratio, eps = suggested['min_ratio'], suggested['eps']
    lines += ['', '## Suggested settings', '']
    if run['random_weights']:
        lines += ['(From random weights: illustrative only.)', '']
    lines += [f"- `min_self_attn_threshold = {tau['value']:g}`: {tau['rule']}",
              f"- `enhancement_strength = {suggested['enhancement_strength']['value']:g}`: "
              f"{suggested['enhancement_strength']['rule']}",
              f"- `min_ratio = {min_ratio['value']:g}`: {min_ratio['rule']} "
              f"({min_ratio['mean_outliers_per_window']:.2f} tokens per window on average "
              'here).',
              f"- `top_k = {top_k['value']}`: {top_k['rule']}",
              f"- `eps = {eps['value']:g}` (min_samples {clusters['min_samples']}): "
              f"{eps['rule']} At this eps: {eps['median_clusters']:g} clusters per window on "
              f"median, {pct(eps['mean_noise_fraction'])} noise.",
              '', '```python', 'model = dict(',
              '    self_attn_enhancement_cfg=dict(enhancement_strength='
              f"{suggested['enhancement_strength']['value']:g}, "
              f"min_self_attn_threshold={tau['value']:g}),",
              f"    outlier_suppression_cfg=dict(top_k={top_k['value']}, "
              f"min_ratio={min_ratio['value']:g}),",
              f"    ctd_cfg=dict(eps={eps['value']:g}, min_samples={clusters['min_samples']}))",
              '```', '', 'Figures: `self_attention_hist.png`, `outlier_scores.png`, '
              '`clusters.png`; raw numbers: `stats.json`.', '']
    path.write_text('\n'.join(lines))


def cluster_cells(row: dict) -> List[str]:
    return [f"{row['mean_clusters']:.2f}", f"{row['median_clusters']:g}",
            str(row['min_clusters']), str(row['max_clusters']),
            pct(row['single_cluster_windows']), pct(row['mean_noise_fraction'])]


# -- main -----------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> Path:
    start = time.perf_counter()
    check_arguments(args)
    cfg = build_config(args)
    if args.images:
        paths, source = listed_images(args.images), f"--images {' '.join(args.images)}"
    else:
        paths = dataset_images(cfg)
        source = f"test set {dataset_cfg_of(cfg)['type']} at {dataset_cfg_of(cfg)['data_root']}"
    if args.max_images:
        paths = paths[:args.max_images]
    out_dir = Path(args.out_dir or Path('work_dirs', 'analyze_attention', Path(args.config).stem))
    with user_files(f'--out-dir {out_dir}'):
        out_dir.mkdir(parents=True, exist_ok=True)

    from mmseg.apis import init_model
    torch.manual_seed(args.seed)
    with model_settings(args, cfg, 'CONFIG', clip_options=('pretrained', )):
        model = init_model(cfg, None, device=args.device)
    model_seconds = time.perf_counter() - start
    random_weights = cfg.model.clip.get('pretrained') is None
    if random_weights:
        print('note: random CLIP weights (--pretrained none): the statistics show the '
              'pipeline running, not those of a trained CLIP.', flush=True)
    device = next(model.parameters()).device
    analysis = AttentionStatistics(cfg.model, device, args.tau_grid, args.min_ratio_grid,
                                   args.eps_grid)
    for path in progress(paths, not args.no_progress):
        analysis.add(explain_image(model, path), path)
    image_seconds = time.perf_counter() - start - model_seconds
    stats = analysis.summary()
    seconds = time.perf_counter() - start
    clip = cfg.model.clip
    stats['run'] = dict(
        config=args.config, source=source, images=paths, device=str(device),
        random_weights=random_weights, seed=args.seed,
        weights=f"{clip.get('arch')} " + ('random (--pretrained none)' if random_weights
                                          else f"pretrained={clip.get('pretrained')}"),
        seconds=seconds, model_seconds=model_seconds, seconds_per_image=image_seconds / len(
            paths))
    stats = {'run': stats.pop('run'), **stats}
    (out_dir / 'stats.json').write_text(json.dumps(stats, indent=1, default=str))

    title = f"{Path(args.config).name}: {len(paths)} images" + (
        ', RANDOM WEIGHTS' if random_weights else '')
    plot_self_attention(stats, analysis.values('self_attention'),
                        out_dir / 'self_attention_hist.png', title)
    plot_outlier_scores(stats, {key: analysis.values('scores', key) for key in
                                ('without', 'with')}, out_dir / 'outlier_scores.png', title)
    plot_clusters(stats, analysis, out_dir / 'clusters.png', title)
    write_report(stats, out_dir / 'report.md')
    suggested = {key: stats['suggested'][key]['value']
                 for key in ('min_self_attn_threshold', 'min_ratio', 'top_k', 'eps')}
    print(f"{len(paths)} images in {seconds:.1f} s: "
          f"{pct(stats['self_attention']['fraction_below_tau'])} of the tokens below "
          f"τ={stats['self_attention']['tau']:g}; suggested "
          + ', '.join(f'{key}={value:g}' for key, value in suggested.items())
          + f"\nreport: {out_dir / 'report.md'}", flush=True)
    return out_dir


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the analysis; a mistake in the arguments or files raises ``UsageError``
    (``run_main`` prints it as one line and returns 2)."""
    run(parse_args(argv))
    return 0


if __name__ == '__main__':
    sys.exit(run_main(main))
