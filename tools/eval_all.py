"""Evaluate one method over the eight standard benchmarks (or a list of configs) and
write the results table.

    python tools/eval_all.py --method naclip [--benchmarks voc21 ade20k ...]
        [--data-root DIR] [--work-dir DIR] [--cfg-options KEY=VALUE ...] [--rerun]
    python tools/eval_all.py --configs A.py B.py ...
    bash tools/dist_eval_all.sh GPUS --method naclip ...    # torchrun, --launcher pytorch

Every entry runs mmseg's test loop (as ``tools/test.py`` does) and stores its metrics
in ``WORK_DIR/<entry>/result.json`` once it has finished. A rerun skips entries whose
result was produced by the same resolved config (after ``--cfg-options`` and
``--data-root``), so a killed run resumes where it stopped; ``--rerun`` forces them.
A failing entry is reported in the table, its traceback kept in
``WORK_DIR/<entry>/error.txt``, and the remaining entries still run (exit status 1).
The table (mIoU, mAcc, aAcc per entry and their average) is printed and written to
``WORK_DIR/results.md`` and ``WORK_DIR/results.csv``. Each entry's line "[eval_all i/n]"
gives the elapsed time and an ETA of the whole set; a progress bar of its test loop
goes to stderr unless ``--no-progress``.

A mistake in eval_all's own arguments (a ``--configs`` file that does not exist, two
configs of one name, ``--work-dir`` or ``--data-root`` not a folder, a malformed
``--cfg-options``) is one line on stderr, exit status 2, before any entry runs. A
mistake in one entry's config or data (a value the model refuses, missing test data)
fails that entry with one line, the others still run. A ``result.json`` that cannot be
read (truncated, not a result) is evaluated again, with a warning naming it.
"""
import argparse
import csv
import functools
import gc
import json
import os
import os.path as osp
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional

# Usable from a plain checkout; the package goes before mmseg (mmcv.ops stand-in).
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
import mmseg_selfattn  # noqa: E402,F401

import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402

from mmseg_selfattn.benchmarks import (BENCHMARKS, METHOD_CONFIGS,  # noqa: E402
                                       config_fingerprint, method_config,
                                       set_data_dir)
from mmseg_selfattn.clip_loader import reusing_loaded_models  # noqa: E402
from mmseg_selfattn.cli import (UsageError, check_exists, check_out_dir, exit_now,  # noqa: E402
                                key_value, run_main, user_files)
from mmseg_selfattn.hooks import with_test_set_checks  # noqa: E402
from mmseg_selfattn.progress import RunSetProgress, with_progress  # noqa: E402
from mmseg_selfattn.tool_checks import (check_launcher, checked_runner,  # noqa: E402
                                        load_config, with_cfg_options)

METRICS = ('mIoU', 'mAcc', 'aAcc')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Evaluate a method over the standard benchmarks and tabulate mIoU.')
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument('--method', choices=list(METHOD_CONFIGS),
                      help='configs/<method>_vit-b16_<benchmark>.py for each benchmark')
    what.add_argument('--configs', nargs='+', help='explicit config files, one entry each')
    parser.add_argument('--benchmarks', nargs='+', choices=list(BENCHMARKS),
                        default=list(BENCHMARKS),
                        help='benchmarks of --method (default: all eight)')
    parser.add_argument('--data-root', help='folder holding the datasets in the layout of '
                        'data/ (VOCdevkit/VOC2012, coco_stuff164k, ...); default: data/')
    parser.add_argument('--work-dir', help='default: work_dirs/eval_all/<method>')
    parser.add_argument('--rerun', action='store_true',
                        help='evaluate entries that already have a result again')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, type=key_value,
                        help='overrides merged into every config, as in tools/test.py')
    parser.add_argument('--no-progress', action='store_true',
                        help="no progress bar of each entry's test loop on stderr")
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher (one process per GPU)')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def entries_of(args: argparse.Namespace) -> Dict[str, Path]:
    """Entry name -> config file."""
    if args.method:
        return {bench: method_config(args.method, bench, REPO_ROOT / 'configs')
                for bench in BENCHMARKS if bench in args.benchmarks}  # papers' order
    entries = {}
    for config in args.configs:
        check_exists('--configs', config)
        name = Path(config).stem
        if name in entries:
            raise UsageError(f'--configs {entries[name]} {config}: two configs named {name!r} '
                             '(an entry and its folder are named by the file stem); rename one')
        entries[name] = Path(config)
    return entries


def resolved_config(config: Path, args: argparse.Namespace) -> Config:
    cfg = load_config(config, args.cfg_options)
    return set_data_dir(cfg, args.data_root and str(Path(args.data_root).resolve()))


def evaluate(name: str, cfg: Config, work_dir: Path, launcher: str, progress: bool,
             what: str = 'CONFIG') -> dict:
    """One entry's metrics; ``what`` names its config in a message about a user's mistake."""
    cfg.work_dir = str(work_dir)
    cfg.launcher = launcher
    if launcher != 'none' and cfg.get('model_wrapper_cfg') is None:
        cfg.model_wrapper_cfg = dict(type='InferenceOnlyWrapper')
    if 'visualizer' in cfg:  # one visualizer instance per entry, not the first one's
        cfg.visualizer['name'] = f'visualizer_{name}_{time.time_ns()}'
    with_test_set_checks(cfg)
    if progress:
        with_progress(cfg)
    start = time.perf_counter()
    runner = checked_runner(cfg, what, 'give --data-root DIR (the layout of '
                            'data/, see docs/benchmarks.md)')
    metrics = runner.test()
    result = dict(metrics={key: float(metrics[key]) for key in METRICS if key in metrics},
                  images=len(runner.test_dataloader.dataset),
                  seconds=round(time.perf_counter() - start, 1))
    del runner
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def write_json(path: Path, data: dict) -> None:
    """Atomically: a run killed while writing leaves no half-written result."""
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def table_rows(results: Dict[str, dict]) -> List[List[str]]:
    rows, done = [], []
    for name, result in results.items():
        if 'metrics' in result:
            done.append(result['metrics'])
            rows.append([name] + [f"{result['metrics'].get(key, float('nan')):.2f}"
                                  for key in METRICS] + [str(result['images']), ''])
        else:
            rows.append([name, '-', '-', '-', '-', result['error']])
    if done:
        label = 'average' if len(done) == len(results) else \
            f'average ({len(done)} of {len(results)})'
        rows.append([label] + [f'{sum(m[key] for m in done) / len(done):.2f}'
                               for key in METRICS] + ['', ''])
    return rows


def write_tables(results: Dict[str, dict], work_dir: Path, title: str) -> str:
    header = ['entry', *METRICS, 'images', 'error']
    rows = table_rows(results)
    with open(work_dir / 'results.csv', 'w', newline='') as file:
        csv.writer(file).writerows([header] + rows)
    lines = [f'# {title}', '', '| ' + ' | '.join(header) + ' |',
             '|' + ' --- |' * len(header)]
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
    if all(name in BENCHMARKS for name in results):  # the papers' one-row mIoU table
        miou = [f"{r['metrics']['mIoU']:.2f}" if 'metrics' in r else '-'
                for r in results.values()]
        average = rows[-1][1] if rows and rows[-1][0] == 'average' else '-'
        columns = [BENCHMARKS[name].column for name in results] + ['avg']
        lines += ['', "mIoU in the papers' column order:", '',
                  '| ' + ' | '.join(columns) + ' |', '|' + ' --- |' * len(columns),
                  '| ' + ' | '.join(miou + [average]) + ' |']
    text = '\n'.join(lines) + '\n'
    (work_dir / 'results.md').write_text(text)
    return text


def stored_result(result_file: Path, warn) -> Optional[dict]:
    """The stored result of an entry, or None (and a one-line warning naming the file)
    when it cannot be read or is not a finished entry's result: evaluated again then."""
    try:
        stored = json.loads(result_file.read_text())
        ok = (isinstance(stored, dict) and isinstance(stored.get('fingerprint'), str)
              and isinstance(stored.get('metrics'), dict)
              and all(isinstance(value, (int, float)) for value in stored['metrics'].values())
              and isinstance(stored.get('images'), int))
        problem = None if ok else 'not a result (fingerprint, metrics, images)'
    except (OSError, ValueError) as error:  # ValueError: invalid JSON / UTF-8
        stored, problem = None, ' '.join(f'{type(error).__name__}: {error}'.split())[:200]
    if problem is None:
        return stored
    warn(f'{result_file} cannot be read ({problem}); evaluating the entry again')
    return None


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    work_dir = Path(args.work_dir or osp.join('work_dirs', 'eval_all', args.method or 'configs'))
    check_out_dir('--work-dir', str(work_dir))
    check_exists('--data-root', args.data_root, 'folder')
    check_launcher(args.launcher)
    entries = entries_of(args)
    with user_files(f'--work-dir {work_dir}'):
        work_dir.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get('RANK', 0))  # set by torchrun; only rank 0 writes
    weights = set()

    say = functools.partial(print, flush=True) if rank == 0 else lambda *_: None
    warn = functools.partial(print, 'eval_all: warning:', file=sys.stderr, flush=True) \
        if rank == 0 else lambda *_: None
    results: Dict[str, dict] = {}
    runs = RunSetProgress(len(entries))

    def evaluate_entry(index: int, name: str, config: Path) -> None:
        entry_dir = work_dir / name
        entry_dir.mkdir(exist_ok=True)
        result_file = entry_dir / 'result.json'
        prefix = f'[eval_all {index}/{len(entries)}] {name}'
        try:
            cfg = resolved_config(config, args)
            key = config_fingerprint(cfg)  # not where logs go, how many GPUs
            weights.add(str(cfg.model.get('clip', {}).get('pretrained', '?')))
            stored = None
            if result_file.exists() and not args.rerun:
                stored = stored_result(result_file, warn)
            if stored is not None:
                if stored['fingerprint'] == key:
                    results[name] = stored
                    say(f'{prefix}: done earlier, kept ({result_file})')
                    return
                say(f'{prefix}: config changed since the stored result, evaluating again')
            say(f'{prefix}: evaluating {config} ({runs.status(index)})')
            result = evaluate(name, cfg, entry_dir, args.launcher, not args.no_progress,
                              with_cfg_options(f'CONFIG {config}', args.cfg_options))
            runs.timed(result['seconds'])
            result.update(config=str(config), fingerprint=key)
            if rank == 0:
                write_json(result_file, result)
                (entry_dir / 'error.txt').unlink(missing_ok=True)
            results[name] = result
        except Exception as error:  # noqa: BLE001  (reported; the others still run)
            message = str(error).splitlines()[0] if str(error) else ''
            if not isinstance(error, UsageError):  # a user's mistake needs no type name
                message = f'{type(error).__name__}: {message}'
            results[name] = dict(error=message[:200])
            if rank == 0:
                (entry_dir / 'error.txt').write_text(traceback.format_exc())
            say(f'{prefix}: FAILED, {message} (traceback: {entry_dir / "error.txt"})')

    with reusing_loaded_models():  # CLIP read and built once for all entries
        for index, (name, config) in enumerate(entries.items(), 1):
            evaluate_entry(index, name, config)

    if rank == 0:
        title = (f'{args.method or "configs"}: mIoU / mAcc / aAcc (%), CLIP weights '
                 f'(model.clip.pretrained): {", ".join(sorted(weights)) or "-"}')
        print(write_tables(results, work_dir, title), flush=True)
        print(f'tables: {work_dir / "results.md"}, {work_dir / "results.csv"}', flush=True)
    return 1 if any('error' in result for result in results.values()) else 0


if __name__ == '__main__':
    exit_now(run_main(main))  # no interpreter teardown after the results
