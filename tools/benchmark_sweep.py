"""What a grid sweep costs against one evaluation and against one run per grid point.

    python tools/benchmark_sweep.py CONFIG --grid KEY=V1,V2 ... [--cfg-options ...]
        [--separate all|N] [--json out.json]

In one process, on the same data and device, one model (CLIP built once, text
embeddings computed in a warm-up loop): (1) one evaluation of CONFIG (the test loop
tools/test.py runs), (2) the sweep of the grid (tools/sweep.py's ``SweepLoop``),
(3) one evaluation per grid point, each a ``with_pipeline`` variant of the model in
its own test loop (``--separate N`` times only the first N points and extrapolates to
all of them, saying so). Every loop builds its own dataloader and evaluator. Reports
the seconds of each test loop (data loading, inference and evaluation included),
sweep / one evaluation and separate runs / sweep, checks that each separately run point
has the sweep's metrics, and the peak memory of the sweep and of one evaluation (GPU:
max allocated; CPU: max RSS of the process, which only grows).

A mistake in the arguments (a missing config, a grid key or value that cannot be swept,
``--separate`` not 'all' or a positive number, an unusable ``--work-dir`` or ``--json``,
a test set that is missing or empty, a setting the model refuses) stops it before the
first loop with one line on stderr naming the argument or file, exit code 2
(docs/errors.md).
"""
import argparse
import gc
import json
import os.path as osp
import resource
import sys
import time
from typing import List, Optional

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
import mmseg_selfattn  # noqa: E402,F401

import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from mmseg_selfattn.cli import (UsageError, check_exists, check_out_dir,  # noqa: E402
                                check_out_file, key_value, run_main, user_files)
from mmseg_selfattn.hooks import check_not_empty  # noqa: E402
from mmseg_selfattn.sweep import (check_grid, grid_points, parse_grid,  # noqa: E402
                                  pipeline_overrides)
from mmseg_selfattn.tool_checks import read_config, with_cfg_options  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', metavar='CONFIG')
    parser.add_argument('--grid', nargs='+', required=True, metavar='KEY=V1,V2')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, type=key_value)
    parser.add_argument('--separate', default='all', type=separate,
                        help="time 'all' points as separate runs, or only the first N")
    parser.add_argument('--work-dir', default='work_dirs/benchmark_sweep')
    parser.add_argument('--json', help='also write the report here')
    return parser.parse_args(argv)


def separate(text: str) -> str:
    """--separate: 'all' or a positive integer."""
    if text != 'all' and not (text.isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'all' nor a positive integer")
    return text


def check_arguments(args) -> None:
    """``UsageError`` for the mistakes that can be seen before anything is read."""
    check_exists('CONFIG', args.config)
    check_out_dir('--work-dir', args.work_dir)
    check_out_file('--json', args.json)


def check_test_set(cfg: Config, config: str) -> None:
    """The test set can be read and is not empty (before the first timed loop, which
    would fail inside the data loader)."""
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    dataset_cfg = cfg.get('test_dataloader', {}).get('dataset')
    if not dataset_cfg:
        raise UsageError(f'CONFIG {config}: it has no test_dataloader.dataset (no test set)')
    with user_files(f'the test set of CONFIG {config}'):
        check_not_empty(DATASETS.build(dict(dataset_cfg, pipeline=[])))


def base_config(args) -> Config:
    cfg = read_config(args.config, args.cfg_options)
    if not isinstance(cfg.get('model'), dict):
        raise UsageError(f'CONFIG {args.config}: it has no model')
    cfg.work_dir = args.work_dir
    cfg.default_hooks.logger.interval = 10**6  # no per-iteration log lines
    return cfg


def timed_loop(runner: Runner, loop_cfg: dict, model) -> dict:
    """Seconds of one test loop of ``model`` (a fresh loop: its dataloader, workers and
    evaluator), its metrics and peak memory."""
    runner.model = model
    loop = runner.build_test_loop(dict(loop_cfg))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    metrics = loop.run()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if cuda else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    del loop
    gc.collect()
    return dict(seconds=seconds, metrics=metrics, peak_gib=peak)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    check_arguments(args)
    with user_files('--grid'):
        grid = check_grid(parse_grid(args.grid))
        points = grid_points(grid)
    count = len(points) if args.separate == 'all' else min(int(args.separate), len(points))
    cfg = base_config(args)
    check_test_set(cfg, args.config)
    with user_files(with_cfg_options(f'the model of CONFIG {args.config}',
                                     args.cfg_options)):  # a setting the model refuses
        runner = Runner.from_cfg(cfg)  # one model; each point of a separate run is a variant
    model = runner.model
    with user_files('--grid'):  # a value the model refuses, before the first loop
        variants = [model.with_pipeline(**pipeline_overrides(model.pipeline_settings, point))
                    for point in points]
    runner.call_hook('before_run')  # as runner.test() does (log files)
    test_loop = dict(type='MachineAwareTestLoop')
    timed_loop(runner, test_loop, model)  # warm-up: text embeddings, kernels, caches
    one = timed_loop(runner, test_loop, model)
    sweep = timed_loop(runner, dict(type='SweepLoop', points=points), model)
    separate = [timed_loop(runner, test_loop, variant) for variant in variants[:count]]
    mismatches = [index for index, run in enumerate(separate)
                  if {k: float(v) for k, v in run['metrics'].items()}
                  != {k: float(v) for k, v in sweep['metrics'][index].items()}]
    separate_seconds = sum(run['seconds'] for run in separate) * len(points) / count

    report = dict(
        config=args.config, points=len(points),
        grid={key: list(map(str, values)) for key, values in grid.items()},
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu',
        one_evaluation_s=one['seconds'], sweep_s=sweep['seconds'],
        separate_runs_s=separate_seconds, separate_runs_timed=count,
        sweep_over_one_evaluation=sweep['seconds'] / one['seconds'],
        separate_over_sweep=separate_seconds / sweep['seconds'],
        peak_gib_one_evaluation=one['peak_gib'], peak_gib_sweep=sweep['peak_gib'],
        metrics_mismatches=mismatches)
    print(f"{len(points)} points on {report['device']}:")
    print(f"  one evaluation    {one['seconds']:8.1f} s   peak {one['peak_gib']:.2f} GiB")
    print(f"  sweep             {sweep['seconds']:8.1f} s   peak {sweep['peak_gib']:.2f} GiB"
          f"   = {report['sweep_over_one_evaluation']:.2f}x one evaluation")
    extrapolated = '' if count == len(points) else f' (first {count} timed, extrapolated)'
    print(f"  separate runs     {separate_seconds:8.1f} s{extrapolated}"
          f"   = {report['separate_over_sweep']:.2f}x the sweep")
    print(f"  metrics of the separately run points equal the sweep's: "
          f"{'yes' if not mismatches else f'NO, points {mismatches}'}")
    if args.json:
        with open(args.json, 'w') as file:
            json.dump(report, file, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(run_main(main))
