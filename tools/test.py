"""Evaluate a config on its test set: the MMSegmentation 1.x ``tools/test.py``.

    python tools/test.py CONFIG [CHECKPOINT] [--work-dir DIR] [--show-dir DIR]
        [--out DIR] [--no-progress] [--cfg-options KEY=VALUE ...] [--launcher pytorch]

CHECKPOINT is optional: the segmentor loads its CLIP weights itself, from
``model.clip.pretrained``. Multi-GPU: ``tools/dist_test.sh CONFIG GPUS``.
``--show-dir DIR`` writes ``DIR/<image stem>.png`` per image: photo, ground truth and
prediction side by side (mmseg_selfattn/visualization.py). A progress bar with an ETA
goes to stderr (mmseg_selfattn/progress.py) unless ``--no-progress``.

A mistake in the arguments or the user's files (a config or checkpoint that does not
exist, an output folder that is a file, a value the model refuses, test data that is not
there, a class list that does not fit the dataset) is one line on stderr, exit status 2,
before the first image (docs/errors.md).
"""
import argparse
import os
import os.path as osp
import sys
import time
from typing import List, Optional

# Usable from a plain checkout: the repo root goes on sys.path, and the
# package is imported before mmseg so that its mmcv.ops stand-in is in place.
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
import mmseg_selfattn  # noqa: E402,F401

from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402

from mmseg_selfattn.cli import (UsageError, check_exists, check_out_dir, exit_now,  # noqa: E402
                                key_value, run_main)
from mmseg_selfattn.hooks import with_test_set_checks  # noqa: E402
from mmseg_selfattn.progress import with_progress  # noqa: E402
from mmseg_selfattn.tool_checks import (check_launcher, checked_runner,  # noqa: E402
                                        load_config, with_cfg_options)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='MMSeg test (and eval) a training-free CLIP segmentor')
    parser.add_argument('config', help='test config file path')
    parser.add_argument(
        'checkpoint',
        nargs='?',
        default=None,
        help='checkpoint file (optional: the model loads CLIP itself)')
    parser.add_argument(
        '--work-dir',
        help='directory for logs and metrics; '
        'default work_dirs/<config stem>')
    parser.add_argument(
        '--out',
        type=str,
        help='directory to save the predicted label maps (png) in')
    parser.add_argument(
        '--show', action='store_true',
        help="show prediction results in a window (mmseg's SegVisualizationHook)")
    parser.add_argument(
        '--show-dir',
        help='directory to save one picture per image in: photo, ground truth and '
        'prediction side by side')
    parser.add_argument(
        '--wait-time', type=float, default=2, help='the interval of show (s)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction, type=key_value,
        help='override some settings in the used config, the key-value pair '
        'in xxx=yyy format will be merged into config file. If the value to '
        'be overwritten is a list, it should be like key="[a,b]" or key=a,b '
        'It also allows nested list/tuple values, e.g. key="[(a,b),(c,d)]" '
        'Note that the quotation marks are necessary and that no white space '
        'is allowed.')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    parser.add_argument('--no-progress', action='store_true',
                        help='no progress bar (images done, images/s, ETA) on stderr')
    # torch.distributed.launch passes --local-rank (torch>=2.0) or --local_rank
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if args.wait_time < 0:
        parser.error(f'argument --wait-time: must be >= 0 seconds, got {args.wait_time:g}')
    if args.show and sys.platform.startswith('linux') and not (
            os.environ.get('DISPLAY') or os.environ.get('WAYLAND_DISPLAY')):
        parser.error('--show needs a display (neither DISPLAY nor WAYLAND_DISPLAY is '
                     'set); use --show-dir DIR to write the pictures to files')
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def trigger_visualization_hook(cfg: Config,
                               args: argparse.Namespace) -> Config:
    """Switch on SegVisualizationHook's drawing and showing for --show."""
    default_hooks = cfg.default_hooks
    if 'visualization' not in default_hooks:
        raise UsageError(
            f'--show: CONFIG {args.config} has no default_hooks.visualization; add '
            "visualization=dict(type='SegVisualizationHook') or use --show-dir DIR")
    visualization_hook = default_hooks['visualization']
    visualization_hook['draw'] = True
    visualization_hook['show'] = True
    visualization_hook['wait_time'] = args.wait_time
    return cfg


class SteadyThroughputHook(Hook):
    """Images/s of the test loop after its first batch (which also pays for worker
    start-up, text embeddings and CUDA-graph capture). The metric's ``.cpu()`` ends
    each iteration, so the clock sees finished GPU work."""

    def before_test(self, runner) -> None:
        self.start, self.end, self.images = None, None, 0

    def after_test_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if self.start is None:
            self.start = time.perf_counter()
        else:
            self.images += len(outputs)
        self.end = time.perf_counter()


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    check_exists('CHECKPOINT', args.checkpoint)
    for option in ('--work-dir', '--show-dir', '--out'):
        check_out_dir(option, getattr(args, option[2:].replace('-', '_')))
    check_launcher(args.launcher)

    cfg = load_config(args.config, args.cfg_options)
    cfg.launcher = args.launcher

    # work_dir priority: CLI > config file > work_dirs/<config stem>
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])

    cfg.load_from = args.checkpoint

    if args.show:
        cfg = trigger_visualization_hook(cfg, args)
    if args.show_dir:
        cfg.custom_hooks = [*(cfg.get('custom_hooks') or []),
                            dict(type='SideBySideVisualizationHook', out_dir=args.show_dir)]

    if args.out is not None:
        cfg.test_evaluator['output_dir'] = args.out
        cfg.test_evaluator['keep_results'] = True

    if args.launcher != 'none' and cfg.get('model_wrapper_cfg') is None:
        cfg.model_wrapper_cfg = dict(type='InferenceOnlyWrapper')

    with_test_set_checks(cfg)  # also for configs without our default_runtime
    if not args.no_progress:
        with_progress(cfg)
    runner = checked_runner(
        cfg, with_cfg_options(f'CONFIG {args.config}', args.cfg_options),
        'set test_dataloader.dataset.data_root with --cfg-options')
    steady = SteadyThroughputHook()
    runner.register_hook(steady, priority='LOWEST')
    start = time.perf_counter()
    metrics = runner.test()
    seconds = time.perf_counter() - start

    if runner.rank == 0:  # IoUMetric reports percentages
        print(', '.join(f'{name}: {value:.2f}'
                        for name, value in metrics.items()), flush=True)
        images = len(runner.test_dataloader.dataset)
        print(f'{images} images in {seconds:.1f} s ({images / seconds:.1f} images/s, '
              'test loop incl. data loading and evaluation)', flush=True)
        if steady.images:
            loop = steady.end - steady.start
            print(f'after the first batch: {steady.images} images in {loop:.2f} s '
                  f'({steady.images / loop:.1f} images/s)', flush=True)
        if args.show_dir:
            print(f'pictures (image | ground truth | prediction): {args.show_dir}',
                  flush=True)


if __name__ == '__main__':
    exit_now(run_main(main))  # no interpreter teardown after the results
