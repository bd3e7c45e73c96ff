"""Convert COCO-Stuff164k masks to COCO-Object labels (80 thing classes + background).

    python tools/dataset_converters/coco_object.py data/coco_stuff164k --nproc 8
    python tools/dataset_converters/coco_object.py data/coco_stuff164k -o data/coco_object \
        --allow-partial

Input: the raw masks of ``stuffthingmaps_trainval2017.zip`` (single-channel PNGs of raw
ids: things 0..89 = COCO category id - 1, stuff 91..181, 255 unlabeled) under
``ROOT/annotations/{train2017,val2017}/*.png``, the layout mmseg documents for COCO-Stuff164k.

Output: ``OUT/annotations/<split>/<stem>_instanceTrainIds.png`` (uint8, same size, OUT
defaults to ROOT): 1..80 for the things in raw-id order, 0 for stuff and unlabeled pixels.
Only masks are written; the images stay under ``ROOT/images``.
"""
import argparse
import os
import os.path as osp
from glob import glob

import numpy as np
from mmengine.utils import mkdir_or_exist, track_parallel_progress, track_progress
from PIL import Image

COCO_STUFF164K_LEN = 123_287  # train2017 + val2017 masks of the full download
SPLITS = ('train2017', 'val2017')
OUTPUT_SUFFIX = '_instanceTrainIds.png'
# Outputs of this and of mmseg's coco_stuff164k converter, written beside the raw masks.
CONVERTED_SUFFIXES = ('_labelTrainIds.png', OUTPUT_SUFFIX)
# Raw ids 0..89 left unused by the 80 COCO thing categories (gaps in the category ids).
UNUSED_THING_IDS = frozenset({11, 25, 28, 29, 44, 65, 67, 68, 70, 82})
COCO_THING_IDS = tuple(raw for raw in range(90) if raw not in UNUSED_THING_IDS)
assert len(COCO_THING_IDS) == 80


def object_lut() -> np.ndarray:
    """256-entry raw id -> COCO-Object label table: thing i (raw-id order) -> i + 1, else 0."""
    lut = np.zeros(256, dtype=np.uint8)
    lut[list(COCO_THING_IDS)] = np.arange(1, len(COCO_THING_IDS) + 1)
    return lut


OBJECT_LUT = object_lut()


def convert_mask(src: str, dst: str) -> None:
    """Write the COCO-Object label PNG ``dst`` for the raw COCO-Stuff mask ``src``."""
    mask = np.asarray(Image.open(src))
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f'{src}: expected a single-channel uint8 mask of raw ids, '
                         f'got shape {mask.shape} dtype {mask.dtype}')
    Image.fromarray(OBJECT_LUT[mask]).save(dst, 'PNG')


def _convert_task(paths: tuple[str, str]) -> None:
    # One picklable argument per task, as track_(parallel_)progress calls func(task).
    convert_mask(*paths)


def find_raw_masks(root: str) -> dict[str, list[str]]:
    """Raw mask paths per split under ``root/annotations`` (converter outputs skipped)."""
    return {
        split: sorted(path for path in glob(osp.join(root, 'annotations', split, '*.png'))
                      if not path.endswith(CONVERTED_SUFFIXES))
        for split in SPLITS
    }


def output_path(src: str, out_dir: str, split: str) -> str:
    stem = osp.splitext(osp.basename(src))[0]
    return osp.join(out_dir, 'annotations', split, stem + OUTPUT_SUFFIX)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be >= 1, got {value}')
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Convert COCO-Stuff164k raw masks (annotations/{train2017,val2017}/*.png) '
        f'to COCO-Object labels: <stem>{OUTPUT_SUFFIX}, 0 background, 1..80 things.')
    parser.add_argument('coco_stuff_root', help='COCO-Stuff164k root holding annotations/')
    parser.add_argument('-o', '--out-dir',
                        help='output root (masks go to OUT/annotations/<split>); '
                        'default: COCO_STUFF_ROOT')
    parser.add_argument('--nproc', type=positive_int, default=min(8, os.cpu_count() or 1),
                        help='worker processes (default: %(default)s)')
    parser.add_argument('--allow-partial', action='store_true',
                        help=f'convert whatever masks exist instead of requiring all '
                        f'{COCO_STUFF164K_LEN:,} of train2017 + val2017')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    root = args.coco_stuff_root
    annotations = osp.join(root, 'annotations')
    if not osp.isdir(root):
        raise SystemExit(f'COCO-Stuff164k root not found: {root}')
    if not osp.isdir(annotations):
        raise SystemExit(f'no annotations/ folder in {root}: expected the raw masks of '
                         'stuffthingmaps_trainval2017.zip under '
                         f'{annotations}/{{train2017,val2017}}')

    masks = find_raw_masks(root)
    total = sum(len(paths) for paths in masks.values())
    counts = ', '.join(f'{split}: {len(paths):,}' for split, paths in masks.items())
    if total == 0:
        raise SystemExit(f'no raw masks (*.png) in {annotations}/{{train2017,val2017}}')
    if total != COCO_STUFF164K_LEN:
        if not args.allow_partial:
            raise SystemExit(
                f'partial COCO-Stuff164k in {root}: found {total:,} raw masks ({counts}), '
                f'expected {COCO_STUFF164K_LEN:,}; pass --allow-partial to convert what is there')
        print(f'warning: converting a partial COCO-Stuff164k: {total:,} raw masks ({counts}), '
              f'expected {COCO_STUFF164K_LEN:,}')

    out_dir = args.out_dir or root
    tasks = []
    for split, paths in masks.items():
        mkdir_or_exist(osp.join(out_dir, 'annotations', split))
        tasks += [(src, output_path(src, out_dir, split)) for src in paths]
    if args.nproc > 1:
        track_parallel_progress(_convert_task, tasks, args.nproc)
    else:
        track_progress(_convert_task, tasks)
    print(f'wrote {len(tasks):,} COCO-Object masks ({counts}) '
          f'to {osp.join(out_dir, "annotations")}')


if __name__ == '__main__':
    main()
