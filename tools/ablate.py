"""Run an ablation set (configs that add one stage at a time) and tabulate mIoU.

    python tools/ablate.py configs/ablation/camvid \\
        --cfg-options model.clip.pretrained=None test_dataloader.dataset.data_root=/data/camvid

ABLATION_SET is a folder of configs (run in name order) or a list of config files.
Every row is evaluated with mmengine's Runner, as tools/test.py does; the table
(markdown) is printed and written to ``<work-dir>/ablation.md``. Each row starts with a
line "[i/n] <config>: evaluating (elapsed, ETA of the set)"; a progress bar of the
row's test loop goes to stderr unless ``--no-progress``.

A mistake in the arguments or the user's files (a config or folder that does not exist,
a folder without configs, ``--work-dir`` naming a file, a value a row's model refuses,
test data that is not there) is one line on stderr, exit status 2: every config is read
before the first row runs, each row's model and data are checked before its first image.
"""
import argparse
import os.path as osp
import sys
import time
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
import mmseg_selfattn  # noqa: E402,F401  (mmcv.ops stand-in, registers modules)

from mmengine.config import DictAction  # noqa: E402

from mmseg_selfattn.cli import (UsageError, check_out_dir, key_value,  # noqa: E402
                                run_main, user_files)
from mmseg_selfattn.progress import RunSetProgress, with_progress  # noqa: E402
from mmseg_selfattn.stages import PIPELINE_STAGES  # noqa: E402
from mmseg_selfattn.tool_checks import (checked_runner, load_config,  # noqa: E402
                                        with_cfg_options)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Evaluate an ablation set, one row per config')
    parser.add_argument('ablation_set', nargs='+',
                        help='a folder of configs (name order) or config files')
    parser.add_argument('--work-dir', default='work_dirs/ablation')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, type=key_value,
                        help='applied to every config, e.g. model.clip.pretrained=None')
    parser.add_argument('--no-progress', action='store_true',
                        help="no progress bar of each row's test loop on stderr")
    return parser.parse_args(argv)


def config_files(ablation_set) -> list:
    files = []
    for entry in map(Path, ablation_set):
        if entry.is_dir():
            configs = sorted(entry.glob('*.py'))
            if not configs:
                raise UsageError(f'ABLATION_SET {entry}: a folder without config files (*.py)')
            files += configs
        elif entry.is_file():
            files.append(entry)
        else:
            raise UsageError(f'ABLATION_SET {entry}: no such folder or config file')
    return files


def stages_on(model_cfg) -> str:
    names = [name for name in PIPELINE_STAGES if model_cfg.get(f'apply_{name}', False)]
    return ' + '.join(names) or 'none (baseline)'


def weights_note(model_cfg) -> str:
    clip = model_cfg.get('clip', {})
    if clip.get('pretrained') in (None, 'none', 'None'):
        return (f"clip: {clip.get('arch')} with RANDOM weights (pretrained=None): these "
                'numbers only show that each row runs; they say nothing about the method.')
    return f"clip: {clip.get('arch')}, pretrained={clip.get('pretrained')}"


def evaluate(config: Path, args: argparse.Namespace, row: int):
    cfg = load_config(config, args.cfg_options)
    cfg.work_dir = osp.join(args.work_dir, config.stem)
    cfg.experiment_name = f'{config.stem}_{row}_{time.strftime("%Y%m%d_%H%M%S")}'
    if not args.no_progress:
        with_progress(cfg)
    start = time.perf_counter()
    runner = checked_runner(cfg, with_cfg_options(f'CONFIG {config}', args.cfg_options),
                            'set test_dataloader.dataset.data_root with --cfg-options')
    metrics = runner.test()
    return cfg, metrics, time.perf_counter() - start


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    check_out_dir('--work-dir', args.work_dir)
    rows, note = [], None
    files = config_files(args.ablation_set)
    for config in files:  # a broken config fails now, not after the rows before it
        load_config(config, args.cfg_options)
    progress = RunSetProgress(len(files))
    for index, config in enumerate(files):
        print(f'[{index + 1}/{len(files)}] {config.stem}: evaluating '
              f'({progress.status(index + 1)})', flush=True)
        cfg, metrics, seconds = evaluate(config, args, index)
        progress.timed(seconds)
        note = note or weights_note(cfg.model)
        rows.append(f'| {index} | {config.stem} | {stages_on(cfg.model)} | '
                    f"{metrics['mIoU']:.2f} | {metrics['mAcc']:.2f} | {metrics['aAcc']:.2f} | "
                    f'{seconds:.0f} |')
    table = '\n'.join([
        f'# Ablation: {" ".join(args.ablation_set)}', '', note, '',
        '| # | config | stages on | mIoU | mAcc | aAcc | time (s) |',
        '| --- | --- | --- | --- | --- | --- | --- |', *rows, ''])
    with user_files(f'--work-dir {args.work_dir}'):
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    out_file = Path(args.work_dir) / 'ablation.md'
    out_file.write_text(table)
    print('\n' + table)
    print(f'written to {out_file}')


if __name__ == '__main__':
    sys.exit(run_main(main))
