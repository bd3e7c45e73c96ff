"""Check a config's test set before waiting for an evaluation.

    python tools/check_data.py CONFIG [CONFIG ...] [--data-root DIR] [--nproc N]
        [--cfg-options KEY=VALUE ...]
    python tools/check_data.py --method naclip --data-root /datasets   # all eight

For each config: the folders and split file it needs, the number of images in the
split (against the full validation split of a standard benchmark), images and label maps
that are missing, label maps that cannot be used (unreadable, RGB, another size than
their image, values beyond 8 bits), and the label values of every label map after the dataset's encoding
(reduce_zero_label, label_map) against its classes: each must be a class index or the
ignore index 255. Exit status 1 when anything is missing or out of range.

A mistake in the arguments or the user's files (a config that does not exist or does
not parse, ``--data-root`` not a folder, a malformed ``--cfg-options``) is one line on
stderr, exit status 2 (docs/errors.md).
"""
import argparse
import functools
import os
import sys
from pathlib import Path
from typing import List, Optional, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
import mmseg_selfattn  # noqa: E402,F401  (mmcv.ops stand-in, registers datasets)

import numpy as np  # noqa: E402
from mmengine.config import DictAction  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.utils import track_parallel_progress, track_progress  # noqa: E402
from mmseg.registry import DATASETS  # noqa: E402
from PIL import Image  # noqa: E402

from mmseg_selfattn.benchmarks import (BENCHMARKS, METHOD_CONFIGS, dataset_cfg_of,  # noqa: E402
                                       method_config, set_data_dir)
from mmseg_selfattn.cli import check_exists, key_value, run_main  # noqa: E402
from mmseg_selfattn.tool_checks import build_errors, load_config, missing_paths  # noqa: E402
from mmseg_selfattn.transforms import LoadCheckedAnnotations  # noqa: E402

IGNORE_INDEX = 255


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Check the test data of configs.')
    parser.add_argument('configs', nargs='*', help='config files')
    parser.add_argument('--method', choices=list(METHOD_CONFIGS),
                        help='check the eight benchmark configs of this method')
    parser.add_argument('--data-root', help='folder holding the datasets in the layout '
                        'of data/ (VOCdevkit/VOC2012, coco_stuff164k, ...)')
    parser.add_argument('--nproc', type=int, default=min(8, os.cpu_count() or 1),
                        help='processes reading label maps')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, type=key_value,
                        help='overrides merged into every config')
    args = parser.parse_args(argv)
    if not args.configs and not args.method:
        parser.error('give CONFIG files or --method')
    if args.nproc < 1:
        parser.error(f'argument --nproc: must be >= 1, got {args.nproc}')
    return args


def read_label_map(info: dict) -> Tuple[str, np.ndarray, Optional[str]]:
    """The values of one label map after the dataset's encoding (as the test pipeline
    loads it), or the problem that stops it loading (unreadable, RGB, not the size of its
    image, values beyond 8 bits)."""
    results = dict(info, seg_fields=[])
    if Path(info['img_path']).is_file():
        with Image.open(info['img_path']) as image:  # reads the header only
            results['ori_shape'] = image.size[::-1]
    try:
        labels = LoadCheckedAnnotations()(results)['gt_seg_map']
    except ValueError as error:
        return info['seg_map_path'], np.zeros(0, np.uint8), str(error)
    return info['seg_map_path'], np.unique(labels), None


def check(config: Path, args: argparse.Namespace) -> List[str]:
    """Prints the report of one config; returns its problems."""
    cfg = load_config(config, args.cfg_options)
    set_data_dir(cfg, args.data_root)
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    dataset_cfg = dataset_cfg_of(cfg)
    print(f'== {config}\n   {dataset_cfg.get("type")} at {dataset_cfg.get("data_root")}')
    problems = missing_paths(dataset_cfg)
    if problems:
        return problems
    with build_errors(f'CONFIG {config}'):
        dataset = DATASETS.build(dict(dataset_cfg, pipeline=[], lazy_init=False))
    infos = [dataset.get_data_info(index) for index in range(len(dataset))]
    classes = dataset.metainfo['classes']
    benchmark = next((b for b in BENCHMARKS.values()
                      if b.dataset_type == dataset_cfg['type']), None)
    full = f' (full validation split: {benchmark.num_val_images})' if benchmark else ''
    print(f'   {len(infos)} images in the split{full}, {len(classes)} classes')
    if not infos:
        return ['the split holds no images (check data_prefix.img_path and the suffixes)']
    if benchmark and len(infos) != benchmark.num_val_images:
        print(f'   note: {len(infos)} of {benchmark.num_val_images} images: '
              'a partial split gives numbers not comparable to published ones')

    missing_images = [i['img_path'] for i in infos if not Path(i['img_path']).is_file()]
    missing_labels = [i['seg_map_path'] for i in infos if not Path(i['seg_map_path']).is_file()]
    for what, paths in (('images', missing_images), ('label maps', missing_labels)):
        if paths:
            problems.append(f'{len(paths)} {what} missing, e.g. {paths[0]}')
    present = [info for info in infos if Path(info['seg_map_path']).is_file()]
    read = functools.partial(track_parallel_progress, nproc=args.nproc) \
        if args.nproc > 1 and len(present) > 1 else track_progress
    label_maps = read(read_label_map, present) if present else []
    allowed = set(range(len(classes))) | {IGNORE_INDEX}
    outside = {}  # value -> (file count, first file)
    unreadable = [problem for _, _, problem in label_maps if problem]
    if unreadable:
        problems.append(f'{len(unreadable)} label map(s) cannot be used, e.g. {unreadable[0]}')
    for path, file_values, _ in label_maps:
        for value in set(file_values.tolist()) - allowed:
            count, first = outside.get(value, (0, path))
            outside[value] = (count + 1, first)
    for value, (count, first) in sorted(outside.items()):
        problems.append(f'label value {value} (as loaded, after reduce_zero_label / label_map) '
                        f'is neither a class index (0..{len(classes) - 1}) nor {IGNORE_INDEX} '
                        f'(ignore): {count} file(s), e.g. {first}')
    if present:
        print(f'   label maps read: {len(present)}, values in 0..{len(classes) - 1} '
              f'and {IGNORE_INDEX}' + (' except as listed below' if outside else ''))
    return problems


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    check_exists('--data-root', args.data_root, 'folder')
    for config in args.configs:  # all of them before the first report
        check_exists('CONFIG', config)
    configs = [Path(c) for c in args.configs]
    if args.method:
        configs += [method_config(args.method, key, REPO_ROOT / 'configs') for key in BENCHMARKS]
    failed = 0
    for config in configs:
        problems = check(config, args)
        for problem in problems:
            print(f'   PROBLEM: {problem}')
        print('   OK' if not problems else f'   {len(problems)} problem(s)', flush=True)
        failed += bool(problems)
    print(f'{len(configs) - failed} of {len(configs)} test sets OK')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(run_main(main))
