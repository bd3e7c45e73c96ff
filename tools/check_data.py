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

This file also holds the checks that tools/test.py, sweep.py, eval_all.py and ablate.py
run before their first image (``key_value``, ``load_config``, ``check_launcher``,
``checked_runner``).
"""
import argparse
import functools
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
warnings.filterwarnings('ignore', 'Fail to import ``MultiScaleDeformableAttention``')  # mmcv-lite
warnings.filterwarnings('ignore', 'The draw is False')  # mmseg's hook, off in our configs
import mmseg_selfattn  # noqa: E402,F401  (mmcv.ops stand-in, registers datasets)

import numpy as np  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.runner import Runner  # noqa: E402
from mmengine.utils import track_parallel_progress, track_progress  # noqa: E402
from mmseg.registry import DATASETS  # noqa: E402
from PIL import Image  # noqa: E402

from mmseg_selfattn.benchmarks import (BENCHMARKS, METHOD_CONFIGS, dataset_cfg_of,  # noqa: E402
                                       method_config, set_data_dir)
from mmseg_selfattn.cli import (USER_FILE_ERRORS, UsageError, check_exists,  # noqa: E402
                                run_main, user_files)
from mmseg_selfattn.hooks import check_class_count, check_not_empty  # noqa: E402
from mmseg_selfattn.transforms import LoadCheckedAnnotations  # noqa: E402

IGNORE_INDEX = 255


# -- what every evaluating tool checks before its first image --------------------------
def key_value(text: str) -> str:
    """One ``--cfg-options`` item (``type=`` of the option): KEY=VALUE, else argparse's
    one-line error (mmengine's DictAction fails on anything else with a traceback)."""
    key, sep, _ = text.partition('=')
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f'{text!r} is not KEY=VALUE, e.g. model.slide_crop=336')
    return text


def load_config(path, cfg_options: Optional[dict] = None, option: str = 'CONFIG') -> Config:
    """``Config.fromfile(path)`` merged with ``--cfg-options``; a file that does not exist
    or does not run (a config is Python: any error executing it is the file's), an
    option the config cannot take (a list index beyond its end, a key below a number), or
    a config without a test set (``test_dataloader.dataset``) is a ``UsageError`` naming
    it."""
    check_exists(option, str(path))
    with user_files(f'{option} {path}', (Exception, )):
        cfg = Config.fromfile(str(path))
    if cfg_options:
        with user_files('--cfg-options', USER_FILE_ERRORS + (TypeError, )):
            cfg.merge_from_dict(cfg_options)
    loader = cfg.get('test_dataloader')
    dataset = loader.get('dataset') if isinstance(loader, dict) else None
    while isinstance(dataset, dict) and 'dataset' in dataset and 'data_root' not in dataset:
        dataset = dataset['dataset']  # as dataset_cfg_of looks through RepeatDataset
    if not isinstance(dataset, dict):
        raise UsageError(f'{option} {path}: no test set: the config needs '
                         'test_dataloader = dict(dataset=dict(type=..., data_root=...), ...)')
    return cfg


LAUNCHERS = {'pytorch': ('torchrun', ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')),
             'slurm': ('srun', ('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_NODELIST')),
             'mpi': ('mpirun', ('OMPI_COMM_WORLD_LOCAL_RANK', 'OMPI_COMM_WORLD_RANK',
                                'OMPI_COMM_WORLD_SIZE'))}


def check_launcher(launcher: str) -> None:
    """``--launcher X`` needs the environment its process starter sets."""
    starter, names = LAUNCHERS.get(launcher, ('', ()))
    missing = [name for name in names if name not in os.environ]
    if missing:
        raise UsageError(f'--launcher {launcher}: {", ".join(missing)} not set; start the '
                         f'tool with {starter} (one process per GPU), or leave out --launcher')


def check_data_folders(cfg: Config, what: str, hint: str = '') -> None:
    """``UsageError`` naming ``what`` (the config) and the first missing folder or split
    file of the test set, before anything is built."""
    problems = missing_paths(dataset_cfg_of(cfg))
    if problems:
        more = f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''
        first = problems[0].replace(': ', ' ', 1)  # 'data_root /x does not exist'
        raise UsageError(f'{what}: test data not found: {first}{more}; '
                         f'{hint or "set test_dataloader.dataset.data_root"}')


@contextmanager
def build_errors(what: str) -> Iterator[None]:
    """``user_files(what)`` for building a model, dataset or runner from a config: also an
    unknown or missing config key (the ``TypeError`` of the constructor's call)."""
    try:
        with user_files(what):
            yield
    except TypeError as error:
        message = str(error)
        if 'unexpected keyword argument' not in message and \
                'required positional argument' not in message:
            raise  # a bug of ours
        raise UsageError(f'{what}: {" ".join(message.split())}') from error


def checked_runner(cfg: Config, what: str, hint: str = '') -> Runner:
    """The Runner of ``cfg`` with its model and test loop built and the test set checked
    (folders and split file exist, the split lists images, the model has one class per
    dataset class), before the first image. A mistake in the config or the user's files
    (a value the model refuses, unknown keys, a dataset type that does not exist, missing
    weights) is a ``UsageError`` naming ``what``; errors of the test loop itself are not
    caught."""
    check_data_folders(cfg, what, hint)
    with build_errors(what):
        runner = Runner.from_cfg(cfg)
        dataset = runner.test_loop.dataloader.dataset  # builds the loop and dataset
        check_not_empty(dataset)  # what TestSetCheckHook checks again in before_test
        class_names = getattr(getattr(runner.model, 'module', runner.model),
                              'class_names', None)
        if class_names is not None:
            check_class_count(class_names, dataset)
    return runner


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


def missing_paths(dataset: dict) -> List[str]:
    """The folders and split file of ``dataset`` that do not exist."""
    root = Path(dataset.get('data_root') or '')
    prefixes = dataset.get('data_prefix') or {}
    wanted = [('data_root', root)]
    wanted += [(f'data_prefix.{key}', root / value) for key, value in prefixes.items()]
    if dataset.get('ann_file'):
        wanted.append(('ann_file', root / dataset['ann_file']))
    return [f'{key}: {path} does not exist' for key, path in wanted if not path.exists()]


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
