"""Evaluate a grid of stage settings in one pass over the test set.

    python tools/sweep.py CONFIG --grid KEY=V1,V2,... [KEY=...] [--grid-file GRID.py]
        [--work-dir DIR] [--cfg-options ...] [--data-root R] [--rerun] [--launcher pytorch]

    python tools/sweep.py configs/selfattn/selfattn-full_vit-b16_camvid.py --grid \\
        self_attn_enhancement_cfg.enhancement_strength=0.05,0.1,0.2,0.3 \\
        self_attn_enhancement_cfg.min_self_attn_threshold=0.10,0.15,0.20,0.25

Every batch is encoded once (blocks 1..L-1); each grid point then runs its own last
block, stages 2-6, classifier and post-processing into its own IoU metric, so its
numbers equal a ``tools/test.py`` run with ``--cfg-options`` of that point. Grid keys
are model keys: any ``<stage>_cfg.<key>``, the ``apply_<stage>`` switches,
``cls_token_lambda``, ``logit_scale``, ``prob_thd``, ``area_thd``, ``bg_idx``,
``attention``, ``gaussian_std`` and PAMR's ``pamr_steps`` / ``pamr_stride``. Keys that
change the encoder's input or weights (window, short side, arch, weights, precision)
are refused. ``--grid-file`` is a Python file defining ``grid = {KEY: [values]}``; a
config may define ``sweep_grid`` the same way.

Writes ``<work-dir>/sweep.md`` and ``sweep.csv`` (mIoU, mAcc, aAcc per point, best
first, with the ``--cfg-options`` that reproduce each) and ``sweep.json``. Progress is
saved every ``--save-every`` batches: a killed sweep, run again with the same
arguments, resumes there (``--rerun`` starts over). Multi-GPU:
``torchrun --nproc_per_node=N tools/sweep.py CONFIG --grid ... --launcher pytorch``.

A mistake in the arguments or the user's files (a config or grid file that does not
exist, an empty grid or value, a refused key or value, test data that is not there) is
one line on stderr, exit status 2, before the first image (docs/errors.md).
"""
import argparse
import csv
import json
import os
import os.path as osp
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
import mmseg_selfattn  # noqa: E402,F401  (mmcv.ops stand-in, registers modules)

from mmengine.config import Config, DictAction  # noqa: E402

from mmseg_selfattn.benchmarks import config_fingerprint, set_data_dir  # noqa: E402
from mmseg_selfattn.cli import (UsageError, check_exists, check_out_dir, exit_now,  # noqa: E402
                                key_value, run_main, user_files)
from mmseg_selfattn.hooks import with_test_set_checks  # noqa: E402
from mmseg_selfattn.progress import with_progress  # noqa: E402
from mmseg_selfattn.sweep import (cfg_options, check_grid,  # noqa: E402
                                  format_value, grid_points, parse_grid)
from mmseg_selfattn.tool_checks import (check_launcher, checked_runner,  # noqa: E402
                                        load_config, with_cfg_options)

METRICS = ('mIoU', 'mAcc', 'aAcc')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config')
    parser.add_argument('--grid', nargs='+', default=[], metavar='KEY=V1,V2',
                        help='an axis of the grid, e.g. ctd_cfg.eps=0.1,0.2,0.3')
    parser.add_argument('--grid-file', help="a Python file defining grid = {KEY: [values]}")
    parser.add_argument('--work-dir', help='default: work_dirs/sweep/<config stem>')
    parser.add_argument('--data-root', help='folder holding the data/ tree of the config')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, type=key_value,
                        help='applied to the config before the grid, e.g. '
                        'model.clip.pretrained=/path/to/ViT-B-16.pt')
    parser.add_argument('--batch-size', type=int,
                        help="images per batch (default: the config's); a test.py run "
                        'with the same batch size gives the same metrics')
    parser.add_argument('--save-every', type=int, default=20,
                        help='save the progress every N batches (resume point)')
    parser.add_argument('--rerun', action='store_true', help='ignore a saved progress')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    for option, value in (('--save-every', args.save_every), ('--batch-size', args.batch_size)):
        if value is not None and value < 1:
            parser.error(f'argument {option}: must be >= 1, got {value}')
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def grid_source(args: argparse.Namespace) -> str:
    """Where the grid comes from, as the user wrote it (for messages)."""
    sources = (['--grid'] if args.grid else []) + (
        [f'--grid-file {args.grid_file}'] if args.grid_file else [])
    return ' / '.join(sources) or f'sweep_grid of CONFIG {args.config}'


def read_grid(args: argparse.Namespace, cfg: Config) -> Dict[str, list]:
    grid = cfg.get('sweep_grid') or {}
    if not isinstance(grid, dict):
        raise UsageError(f'CONFIG {args.config}: sweep_grid must be a dict '
                         f'{{KEY: [values]}}, got {type(grid).__name__}')
    grid = dict(grid)
    if args.grid_file:
        check_exists('--grid-file', args.grid_file)
        with user_files(f'--grid-file {args.grid_file}', (Exception, )):  # Python: its errors
            file_grid = Config.fromfile(args.grid_file).get('grid')
        if not isinstance(file_grid, dict):
            raise UsageError(f'--grid-file {args.grid_file}: expected a Python file defining '
                             'grid = {KEY: [values]}, e.g. grid = {"ctd_cfg.eps": [0.1, 0.2]}'
                             + ('' if file_grid is None else
                                f'; its grid is a {type(file_grid).__name__}'))
        grid.update(file_grid)
    with user_files('--grid'):
        grid.update(parse_grid(args.grid))
    for item in args.grid:
        key, _, values = item.partition('=')
        if '' in grid.get(key, ()):
            raise UsageError(f'--grid {item!r}: an empty value; expected KEY=V1,V2,... with '
                             'no empty item (e.g. ctd_cfg.eps=0.1,0.2)')
    with user_files(grid_source(args)):
        return check_grid(grid)


def sweep_config(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config, args.cfg_options)
    set_data_dir(cfg, args.data_root and str(Path(args.data_root).resolve()))
    if args.batch_size is not None:
        cfg.test_dataloader.batch_size = args.batch_size
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or osp.join(
        'work_dirs', 'sweep', Path(args.config).stem)
    if args.launcher != 'none' and cfg.get('model_wrapper_cfg') is None:
        cfg.model_wrapper_cfg = dict(type='InferenceOnlyWrapper')
    return cfg


def fingerprint(cfg: Config, points: list, world_size: int) -> str:
    """Config (less loader processes and work dir), grid and world size."""
    cfg = Config(cfg.to_dict())
    cfg.pop('work_dir', None)
    return config_fingerprint(cfg, repr(points) + str(world_size))


def write_tables(grid: Dict[str, list], points: list, metrics: list, work_dir: Path,
                 title: str, config: str = 'CONFIG') -> str:
    order = sorted(range(len(points)), key=lambda i: -metrics[i].get('mIoU', float('-inf')))
    header = ['rank', 'point', *grid, *METRICS]
    rows = [[str(rank), str(index)] + [format_value(points[index][key]) for key in grid]
            + [f"{metrics[index].get(key, float('nan')):.2f}" for key in METRICS]
            for rank, index in enumerate(order, 1)]
    with open(work_dir / 'sweep.csv', 'w', newline='') as file:
        csv.writer(file).writerows([header + ['cfg_options']] + [
            row + [cfg_options(points[int(row[1])])] for row in rows])
    best = order[0]
    lines = [f'# {title}', '', '| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
    lines += ['', f"best: point {best}, mIoU {metrics[best].get('mIoU', float('nan')):.2f}; "
              'reproduce with', '', '```bash',
              f'python tools/test.py {config} --cfg-options {cfg_options(points[best])}', '```']
    text = '\n'.join(lines) + '\n'
    (work_dir / 'sweep.md').write_text(text)
    (work_dir / 'sweep.json').write_text(json.dumps(
        [dict(point=points[i], metrics=metrics[i]) for i in range(len(points))], indent=2))
    return text


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    check_out_dir('--work-dir', args.work_dir)
    check_exists('--data-root', args.data_root, 'folder')
    check_launcher(args.launcher)
    cfg = sweep_config(args)
    check_out_dir('work_dir of the config', cfg.work_dir)
    grid = read_grid(args, cfg)
    points = grid_points(grid)
    work_dir = Path(cfg.work_dir)
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    state_file = work_dir / 'sweep_state.pth'
    if args.rerun:
        for stale in work_dir.glob('sweep_state.pth.rank*'):
            stale.unlink()
    cfg.test_cfg = dict(type='SweepLoop', points=points, state_file=str(state_file),
                        fingerprint=fingerprint(cfg, points, world_size),
                        save_every=args.save_every)
    with_test_set_checks(cfg)
    if not args.no_progress:
        with_progress(cfg)
    start = time.perf_counter()
    what = with_cfg_options(f'CONFIG {args.config}', args.cfg_options)
    runner = checked_runner(cfg, what, 'give --data-root DIR or set '
                            'test_dataloader.dataset.data_root with --cfg-options')
    with user_files(grid_source(args)):  # each point's pipeline: a refused value fails here
        runner.test_loop._variants(getattr(runner.model, 'module', runner.model))
    metrics = [{key: float(value) for key, value in point.items()} for point in runner.test()]
    seconds = time.perf_counter() - start
    if runner.rank == 0:
        weights = cfg.model.get('clip', {}).get('pretrained')
        title = (f'sweep of {args.config}: {len(points)} points, '
                 f'{len(runner.test_dataloader.dataset)} images, {seconds:.1f} s'
                 + ('; RANDOM weights: the numbers only show that each point runs'
                    if weights in (None, 'none', 'None') else f'; weights {weights}'))
        print(write_tables(grid, points, metrics, work_dir, title, args.config), flush=True)


if __name__ == '__main__':
    exit_now(run_main(main))  # no interpreter teardown after the results
