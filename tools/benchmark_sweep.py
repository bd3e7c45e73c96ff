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

from mmseg_selfattn.sweep import (check_grid, grid_points, parse_grid,  # noqa: E402
                                  pipeline_overrides)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config')
    parser.add_argument('--grid', nargs='+', required=True, metavar='KEY=V1,V2')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    parser.add_argument('--separate', default='all',
                        help="time 'all' points as separate runs, or only the first N")
    parser.add_argument('--work-dir', default='work_dirs/benchmark_sweep')
    parser.add_argument('--json', help='also write the report here')
    return parser.parse_args(argv)


def base_config(args) -> Config:
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
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


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    grid = check_grid(parse_grid(args.grid))
    points = grid_points(grid)
    count = len(points) if args.separate == 'all' else min(int(args.separate), len(points))
    cfg = base_config(args)
    runner = Runner.from_cfg(cfg)  # one model; each point of a separate run is a variant
    model = runner.model
    runner.call_hook('before_run')  # as runner.test() does (log files)
    test_loop = dict(type='TestLoop')
    timed_loop(runner, test_loop, model)  # warm-up: text embeddings, kernels, caches
    one = timed_loop(runner, test_loop, model)
    sweep = timed_loop(runner, dict(type='SweepLoop', points=points), model)
    separate = [timed_loop(runner, test_loop, model.with_pipeline(
        **pipeline_overrides(model._pipeline_kwargs, point))) for point in points[:count]]
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


if __name__ == '__main__':
    main()
