"""Speed of whole evaluations as a user runs them: where the wall time of tools/test.py goes.

    python tools/benchmark_e2e.py --configs configs/methods/naclip/naclip_vit-b16_voc21.py ...
        [--data-root DIR | --images 200 | --real-counts] [--small-sizes]
        [--pretrained none|openai|PATH] [--cfg-options KEY=VALUE ...]
        [--variants NAME:KEY=VALUE,KEY=VALUE ...] [--eval-all] [--repeat 1]
        [--model-only/--no-model-only] [--model-only-images 64] [--run-timeout 3600]
        [--work-dir work_dirs/benchmark_e2e] [--json FILE]

Every config (and every ``--variants`` entry of it: extra ``--cfg-options``, e.g.
``fp32:model.precision=fp32 no-pamr:model.pamr_steps=0``; the config itself is the
variant 'as shipped') runs ``--repeat`` times as ``tools/test.py CONFIG --no-progress
--work-dir WORK_DIR/<run> --cfg-options ...`` in a fresh process, its merged stdout and
stderr read line by line as they arrive and kept in ``WORK_DIR/<run>/log.txt``. The data:
``--data-root`` (a folder in the layout of ``data/``, mapped onto each config's
``data_root`` as ``tools/eval_all.py --data-root`` does), else what
``tools/fabricate_benchmarks.py --real-sizes`` writes for the configs' benchmarks into
``WORK_DIR/data`` (``--images`` per split, default 200, or ``--real-counts``; tiny
images with ``--small-sizes``; kept for the next run with the same settings).
``--pretrained`` (default 'none': random CLIP weights) becomes
``model.clip.pretrained``. ``--eval-all`` adds one ``tools/eval_all.py`` run of all the
configs in one process. One row per run:

- wall: from starting the process to its exit;
- T_import: the floor of any tool of this package, ``python -c "import torch,
  mmengine.runner; <mmcv.ops stand-in>; import mmseg.apis"`` (after one untimed run that
  warms the file cache), measured before the runs and after them; their median is used;
- start-up, loop, evaluation: the ``test timeline:`` line of ``TestTimelineHook``
  (mmseg_selfattn/hooks.py): process start to the first batch loaded, the loop, the
  metric's final computation;
- exit: from the arrival of the first metric line (mmengine's ``Iter(test) [n/n] aAcc:
  .. mIoU: ..``) to the process exit (printing, worker shutdown, interpreter exit);
- images/s over the loop and over the wall;
- loop / model-only: the loop's images/s over the model-only images/s of the same
  config and options, measured in this process after the runs: the first
  ``--model-only-images`` test images after the config's own pipeline, collated in
  batches of its batch size ('auto': this machine's), through ``model.test_step`` (data
  preprocessor + predict, what the test loop calls) on the GPU when there is one; 2
  batches of warm-up (with ``model.cuda_graph=True`` on a GPU: two whole passes, so
  the timed ones replay the captured shapes), the median of 3 timed passes.

With ``--repeat`` > 1 each variant also gets a median row. Then the targets of issue 22
for every run: wall <= T_import + 10 s, loop images/s >= 50% of model-only, start-up <=
T_import + 5 s. ``--json FILE`` writes every number, the machine and the commands run.

A failing run (non-zero exit, or killed after ``--run-timeout`` seconds) is reported
with the end of its log and the tool exits 1 after the others. A mistake in the
arguments (a config that does not exist, ``--data-root`` not a folder, a malformed
``--variants`` entry, ``--images`` below 1, an unusable ``--json`` path, an option a
config cannot take) is one line on stderr, exit status 2, before the first run.
"""
import argparse
import gc
import json
import os
import os.path as osp
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

# Usable from a plain checkout; the package goes before mmseg (mmcv.ops stand-in).
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
import mmseg_selfattn  # noqa: E402,F401

import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402

from mmseg_selfattn.benchmarks import (BENCHMARKS, DEFAULT_DATA_DIR,  # noqa: E402
                                       dataset_cfg_of, set_data_dir)
from mmseg_selfattn.cli import (UsageError, check_exists, check_out_dir,  # noqa: E402
                                check_out_file, check_pretrained, integer, key_value,
                                run_main, user_files)
from mmseg_selfattn.hooks import TIMELINE_PREFIX  # noqa: E402
from mmseg_selfattn.machine import resolve_test_loader  # noqa: E402
from mmseg_selfattn.tool_checks import check_data_folders, load_config  # noqa: E402

AS_SHIPPED = 'as shipped'
DEFAULT_IMAGES = 200
FABRICATION_SEED = 0
LOG_TAIL_LINES = 15
# mmcv-lite ships no compiled ops, and mmseg imports mmcv.ops at module level: without the
# package's stand-in installed first, ``import mmseg.apis`` fails. The stand-in's file is
# loaded on its own (not through mmseg_selfattn/__init__.py), so the floor holds torch,
# mmengine's runner and mmseg only.
IMPORT_FLOOR_CODE = (
    'import importlib.util, torch, mmengine.runner; '
    "spec = importlib.util.spec_from_file_location('standin', "
    "'mmseg_selfattn/mmcv_ops_standin.py'); standin = importlib.util.module_from_spec(spec); "
    'spec.loader.exec_module(standin); standin.install_mmcv_ops_standin(); import mmseg.apis')
TIMELINE = re.compile(re.escape(TIMELINE_PREFIX) + r' start-up (?P<startup>\d+(?:\.\d+)?) s, '
                      r'loop (?P<loop>\d+(?:\.\d+)?) s \((?P<images>\d+) images, '
                      r'(?P<rate>\d+(?:\.\d+)?|n/a) images/s\), evaluation '
                      r'(?P<evaluation>\d+(?:\.\d+)?) s')
METRIC_LINE = re.compile(r'\bmIoU:\s*(?:-?\d|nan)')  # mmengine's "Iter(test) [n/n] ... mIoU: 1.0"
EVAL_ALL_ENTRY = re.compile(r'^\[eval_all \d+/\d+\] (?P<name>\S+): (?P<what>evaluating|FAILED)')
VARIANT_NAME = re.compile(r'[A-Za-z0-9_.+-]+')


@dataclass
class Variant:
    """A named set of extra ``--cfg-options`` (KEY=VALUE strings)."""
    name: str
    options: List[str] = field(default_factory=list)

    @property
    def slug(self) -> str:
        return self.name.replace(' ', '-')


def variant(text: str) -> Variant:
    """One ``--variants`` item (argparse type): NAME:KEY=VALUE[,KEY=VALUE...]; a comma
    followed by another KEY= starts the next option, so values may hold commas."""
    name, sep, rest = text.partition(':')
    if not sep or not rest or not VARIANT_NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(
            f'{text!r} is not NAME:KEY=VALUE[,KEY=VALUE...] (NAME of letters, digits and '
            "_.+-), e.g. 'fp32:model.precision=fp32'")
    options = re.split(r',(?=[\w.-]+=)', rest)
    for option in options:
        key_value(option)
    return Variant(name, options)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--configs', nargs='+', required=True, help='config files to run')
    parser.add_argument('--data-root', help='datasets in the layout of data/; default: '
                        'fabricate them into WORK_DIR/data')
    count = parser.add_mutually_exclusive_group()
    count.add_argument('--images', type=integer(1),
                       help=f'fabricated images per split (default {DEFAULT_IMAGES})')
    count.add_argument('--real-counts', action='store_true',
                       help='fabricate the real validation split sizes')
    parser.add_argument('--small-sizes', action='store_true',
                        help='fabricate tiny images (default: the real sizes and formats)')
    parser.add_argument('--pretrained', default='none',
                        help="CLIP weights: 'none' (random, default), an open_clip tag "
                        'such as openai, or a checkpoint file')
    parser.add_argument('--cfg-options', nargs='+', type=key_value, default=[],
                        help='overrides for every run, as in tools/test.py')
    parser.add_argument('--variants', nargs='+', type=variant, default=[],
                        help="extra runs per config, NAME:KEY=VALUE,KEY=VALUE ... (e.g. "
                        "'fp32:model.precision=fp32' 'no-pamr:model.pamr_steps=0')")
    parser.add_argument('--eval-all', action='store_true',
                        help='also one tools/eval_all.py run over all the configs')
    parser.add_argument('--repeat', type=integer(1), default=1, help='runs per variant')
    parser.add_argument('--model-only', action=argparse.BooleanOptionalAction, default=True,
                        help="the model's images/s on the same config, for comparison")
    parser.add_argument('--model-only-images', type=integer(1), default=64,
                        help='images of the test set for the model-only images/s')
    parser.add_argument('--run-timeout', type=integer(1), default=3600,
                        help='seconds after which a run is killed (and failed)')
    parser.add_argument('--work-dir', default='work_dirs/benchmark_e2e')
    parser.add_argument('--json', help='write every number here')
    return parser.parse_args(argv)


# -- parsing a run's log -------------------------------------------------------------------
def parse_timeline(line: str) -> Optional[Dict[str, float]]:
    """start-up, loop, evaluation seconds and images of a ``test timeline:`` line; None for
    any other line."""
    match = TIMELINE.search(line)
    if match is None:
        return None
    return dict(startup_s=float(match['startup']), loop_s=float(match['loop']),
                images=int(match['images']), evaluation_s=float(match['evaluation']),
                images_per_s=None if match['rate'] == 'n/a' else float(match['rate']))


def is_metric_line(line: str) -> bool:
    """The line that reports the metrics (mmengine's ``Iter(test) [n/n] ... mIoU: ..``)."""
    return METRIC_LINE.search(line) is not None


@dataclass
class TimedProcess:
    """A finished child: its exit status, wall seconds, every output line with the seconds
    since its start at which it arrived, and whether it was killed at its time limit."""
    command: List[str]
    returncode: int
    wall_s: float
    lines: List[Tuple[float, str]]
    timed_out: bool = False

    def tail(self, count: int = LOG_TAIL_LINES) -> List[str]:
        return [text for _, text in self.lines[-count:]]


def run_timed(command: List[str], log_file: Path,
              timeout: Optional[float] = None) -> TimedProcess:
    """Runs ``command`` (unbuffered Python output) with stdout and stderr merged, stamping
    each line as it arrives (a reader thread; the wall ends when the process exits). The
    log file gets every line after its arrival time (seconds since the start). After
    ``timeout`` seconds the process and its children (its own process group) are killed."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    lines: List[Tuple[float, str]] = []
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, errors='replace', env=env, start_new_session=True)

    def read() -> None:
        with open(log_file, 'w') as log:
            for line in process.stdout:
                lines.append((time.perf_counter() - start, line.rstrip('\n')))
                log.write(f'{lines[-1][0]:9.3f}  {lines[-1][1]}\n')

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    timed_out = False
    try:
        returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    except KeyboardInterrupt:  # its own session does not get the terminal's Ctrl-C
        os.killpg(process.pid, signal.SIGKILL)
        raise
    if timed_out:
        os.killpg(process.pid, signal.SIGKILL)
        returncode = process.wait()
    wall = time.perf_counter() - start
    reader.join(timeout=60)  # a grandchild may hold the pipe a little longer
    return TimedProcess(command, returncode, wall, list(lines), timed_out)


def run_numbers(process: TimedProcess) -> dict:
    """The numbers of one tools/test.py run from its stamped lines (None where its log
    has no timeline or metric line)."""
    timeline = next((numbers for _, text in process.lines
                     if (numbers := parse_timeline(text)) is not None), None)
    metric_at = next((at for at, text in process.lines if is_metric_line(text)), None)
    numbers = dict(returncode=process.returncode, wall_s=process.wall_s, startup_s=None,
                   loop_s=None, evaluation_s=None, images=None, exit_s=None,
                   loop_images_per_s=None, wall_images_per_s=None)
    if timeline:
        numbers.update(timeline)
        numbers['loop_images_per_s'] = numbers.pop('images_per_s')  # of the unrounded loop
        numbers['wall_images_per_s'] = timeline['images'] / process.wall_s
    if metric_at is not None:
        numbers['exit_s'] = process.wall_s - metric_at
    return numbers


def eval_all_entries(process: TimedProcess) -> List[dict]:
    """One dict per entry of a tools/eval_all.py log: its name, timeline numbers, and
    whether it failed."""
    entries: List[dict] = []
    for _, text in process.lines:
        match = EVAL_ALL_ENTRY.match(text)
        if match and match['what'] == 'evaluating':
            entries.append(dict(name=match['name'], failed=False, startup_s=None,
                                loop_s=None, evaluation_s=None, images=None))
        elif match:  # FAILED
            entries.append(dict(name=match['name'], failed=True, line=text))
        elif entries and (numbers := parse_timeline(text)) is not None:
            entries[-1].update(numbers)
    return entries


# -- the floor, the data, the model --------------------------------------------------------
def import_floor_seconds(warm: bool) -> float:
    """Wall seconds of a process that only imports torch, mmengine's runner and mmseg
    (after one untimed run when ``warm``, to fill the file cache)."""
    if warm:
        import_floor_seconds(warm=False)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, '-c', IMPORT_FLOOR_CODE], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f'the import floor command failed: {done.stderr[-2000:]}')
    return seconds


def parse_cfg_options(items: Sequence[str]) -> dict:
    """KEY=VALUE strings as mmengine's DictAction parses them (the later of two equal
    keys wins)."""
    return {key: DictAction._parse_iterable(value)
            for key, value in (item.split('=', 1) for item in items)}


def data_root_option(cfg: Config, data_root: Optional[str]) -> Optional[str]:
    """The ``--cfg-options`` item that moves the config's test data below ``data_root``,
    as ``set_data_dir`` (``eval_all --data-root``) does; None when nothing moves."""
    if data_root is None:
        return None
    key, dataset = 'test_dataloader.dataset', cfg.test_dataloader.dataset
    while 'dataset' in dataset and 'data_root' not in dataset:  # as dataset_cfg_of does
        key, dataset = key + '.dataset', dataset.dataset
    before = dataset.get('data_root')
    set_data_dir(cfg, data_root)
    return None if dataset.get('data_root') == before else f'{key}.data_root={dataset.data_root}'


def benchmarks_of(config: Path, cfg: Config) -> List[str]:
    """The benchmarks whose fabricated root the config's test set reads."""
    root = Path(dataset_cfg_of(cfg).get('data_root') or '')
    keys = [key for key, bench in BENCHMARKS.items()
            if root == Path(DEFAULT_DATA_DIR) / bench.data_root]
    if not keys:
        raise UsageError(f'--configs {config}: its test set data_root {str(root)!r} is not '
                         'one tools/fabricate_benchmarks.py writes; give --data-root DIR')
    return keys[:1]


def fabricated_data(work_dir: Path, benchmarks: Sequence[str], args) -> Path:
    """WORK_DIR/data with the roots of ``benchmarks``, fabricated unless an earlier run
    left them with the same settings (``fabricated.json``)."""
    sys.path.insert(0, str(REPO_ROOT / 'tools'))
    import fabricate_benchmarks  # noqa: E402  (a tool module beside this one)
    data = work_dir / 'data'
    marker_file = data / 'fabricated.json'
    if data.exists() and not marker_file.exists():
        raise UsageError(f'--work-dir {work_dir}: {data} exists but was not fabricated by '
                         'this tool; remove it or give --data-root')
    marker = json.loads(marker_file.read_text()) if marker_file.exists() else {}
    settings = dict(images=None if args.real_counts else args.images or DEFAULT_IMAGES,
                    real_sizes=not args.small_sizes, seed=FABRICATION_SEED)
    for benchmark in benchmarks:
        folder = BENCHMARKS[benchmark].data_root
        if marker.get(folder) == settings:
            print(f'data: {data / folder} kept from an earlier run', flush=True)
            continue
        shutil.rmtree(data / folder, ignore_errors=True)
        start = time.perf_counter()
        written = fabricate_benchmarks.fabricate(
            data, settings['images'], FABRICATION_SEED, settings['real_sizes'], [benchmark],
            workers=min(8, os.cpu_count() or 1))
        print(f'data: fabricated {len(written[benchmark])} images in {data / folder} '
              f'({time.perf_counter() - start:.1f} s)', flush=True)
        marker[folder] = settings
        marker_file.write_text(json.dumps(marker, indent=1))
    return data


def model_only_images_per_s(cfg: Config, count: int, repeats: int = 3,
                            warmup: int = 2) -> dict:
    """Images/s of ``model.test_step`` on the first ``count`` test images after the
    config's pipeline, in batches of its batch size (this machine's for 'auto'), the
    median of ``repeats`` passes. Warm-up: ``warmup`` batches; with CUDA graphs on a GPU
    two whole passes instead (a shape is captured on its second sighting), so the timed
    passes replay, as a long evaluation does for its recurring shapes."""
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS, MODELS
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    items = [dataset[index] for index in range(min(count, len(dataset)))]
    batch_size = resolve_test_loader(cfg.test_dataloader).get('batch_size', 1)  # 'auto'
    batches = [pseudo_collate(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    model = MODELS.build(cfg.model).to(device).eval()
    if device == 'cuda' and cfg.model.get('cuda_graph', False):
        warmup = 2 * len(batches)
    passes = []
    with torch.no_grad():
        for batch in (batches * warmup)[:warmup]:
            model.test_step(batch)
        for _ in range(repeats):
            synchronize()
            start = time.perf_counter()
            for batch in batches:
                model.test_step(batch)
            synchronize()
            passes.append(time.perf_counter() - start)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return dict(images_per_s=len(items) / statistics.median(passes), images=len(items),
                batch_size=batch_size, device=device, passes_s=passes)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# -- the plan --------------------------------------------------------------------------------
@dataclass
class Planned:
    """A config with one variant: its options (for tools/test.py) and resolved config."""
    config: Path
    variant: Variant
    options: List[str]
    cfg: Config

    @property
    def name(self) -> str:
        return f'{self.config.stem}-{self.variant.slug}'


def check_arguments(args) -> List[Path]:
    """The configs, after the checks of the arguments that need no config read."""
    configs = [Path(config) for config in args.configs]
    for config in configs:
        check_exists('--configs', str(config))
    stems = [config.stem for config in configs]
    if len(set(stems)) < len(stems):
        raise UsageError(f'--configs {" ".join(args.configs)}: two configs of one name (runs '
                         'are named by the file stem); rename one')
    names = [item.name for item in args.variants]
    if len(set(names)) < len(names) or AS_SHIPPED.replace(' ', '-') in names:
        raise UsageError(f'--variants {" ".join(names)}: names must differ from each other '
                         f'and from {AS_SHIPPED!r}')
    check_exists('--data-root', args.data_root, 'folder')
    if args.data_root and (args.images or args.real_counts or args.small_sizes):
        raise UsageError('--images, --real-counts and --small-sizes fabricate data: leave them '
                         'out with --data-root')
    check_pretrained(args.pretrained)
    check_out_dir('--work-dir', args.work_dir)
    check_out_file('--json', args.json)
    if args.json and not os.access(args.json if osp.exists(args.json) else
                                   osp.dirname(args.json) or '.', os.W_OK):
        raise UsageError(f'--json {args.json}: cannot be written here (no permission)')
    return configs


def base_options(args) -> List[str]:
    pretrained = 'None' if args.pretrained.lower() == 'none' else args.pretrained
    return [f'model.clip.pretrained={pretrained}', *args.cfg_options]


def plan(args, configs: List[Path], data_root: Path) -> List[Planned]:
    """Every config x variant with its options and the config read with them (a
    mistake in an option is a ``UsageError`` before the first run)."""
    planned = []
    for config in configs:
        for item in [Variant(AS_SHIPPED)] + args.variants:
            options = base_options(args) + item.options
            try:
                cfg = load_config(config, parse_cfg_options(options), f'--configs {config}')
            except UsageError as error:  # an option of the variant (the base ones went first)
                if item.name == AS_SHIPPED:
                    raise
                raise UsageError(f'--variants {item.name}: {error}') from error
            moved = data_root_option(cfg, str(data_root))
            if args.data_root:
                check_data_folders(cfg, f'--configs {config}', 'give --data-root DIR in the '
                                   'layout of data/ (docs/benchmarks.md)')
            planned.append(Planned(config, item, options + ([moved] if moved else []), cfg))
    return planned


def configs_benchmarks(args, configs: List[Path]) -> List[str]:
    """The benchmarks to fabricate for ``configs`` (one per dataset root)."""
    keys = []
    for config in configs:
        cfg = load_config(config, parse_cfg_options(base_options(args)), f'--configs {config}')
        keys += [key for key in benchmarks_of(config, cfg) if key not in keys]
    return keys


# -- the report ------------------------------------------------------------------------------
COLUMNS = (('wall_s', 'wall s', '.2f'), ('t_import_s', 'T_import s', '.2f'),
           ('startup_s', 'start-up s', '.2f'), ('loop_s', 'loop s', '.2f'),
           ('evaluation_s', 'evaluation s', '.2f'), ('exit_s', 'exit s', '.2f'),
           ('images', 'images', 'd'), ('loop_images_per_s', 'images/s loop', '.1f'),
           ('wall_images_per_s', 'images/s wall', '.1f'),
           ('loop_share_of_model_only', 'loop / model-only', '.0%'))


def cell(value, spec: str) -> str:
    return '-' if value is None else format(value, spec)


def table(rows: List[dict]) -> str:
    header = ['run', 'exit code'] + [title for _, title, _ in COLUMNS]
    lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
    for row in rows:
        cells = [row['run'], cell(row.get('returncode'), 'd')]
        lines.append('| ' + ' | '.join(cells + [cell(row.get(key), spec)
                                                for key, _, spec in COLUMNS]) + ' |')
    return '\n'.join(lines)


def median_row(runs: List[dict]) -> dict:
    row = dict(run=f'{runs[0]["group"]} median of {len(runs)}', returncode=None)
    for key, _, _ in COLUMNS:
        values = [run[key] for run in runs if run.get(key) is not None]
        row[key] = statistics.median(values) if len(values) == len(runs) else None
    if row['images'] is not None:
        row['images'] = int(row['images'])
    return row


def targets_of(run: dict, t_import: float) -> List[dict]:
    """Issue 22's acceptance for one run: the target, the run's value, its limit, whether
    the limit is a maximum, and whether it is met (None: not measured)."""
    model_only = run['model_only_images_per_s']
    checks = (('wall <= T_import + 10 s', run['wall_s'], t_import + 10, True),
              ('loop images/s >= 50% of model-only', run['loop_images_per_s'],
               0.5 * model_only if model_only else None, False),
              ('start-up <= T_import + 5 s', run['startup_s'], t_import + 5, True))
    return [dict(target=name, value=value, limit=limit, maximum=maximum,
                 met=None if value is None or limit is None else
                 (value <= limit if maximum else value >= limit))
            for name, value, limit, maximum in checks]


def targets_text(run: dict) -> str:
    """'  <run>: <target>: yes (value <= limit); ...'."""
    parts = []
    for target in run['targets']:
        if target['met'] is None:
            parts.append(f"{target['target']}: n/a")
            continue
        sign = {(True, True): '<=', (True, False): '>', (False, True): '>=',
                (False, False): '<'}[target['maximum'], target['met']]
        parts.append(f"{target['target']}: {'yes' if target['met'] else 'no'} "
                     f"({target['value']:.2f} {sign} {target['limit']:.2f})")
    return f"  {run['run']}: " + '; '.join(parts)


def machine() -> dict:
    return dict(torch=torch.__version__, python=platform.python_version(),
                platform=platform.platform(), cpu_count=os.cpu_count(),
                device=(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'),
                gpus=torch.cuda.device_count(), cuda=torch.version.cuda)


def measure_model_only(args, planned: List[Planned]) -> Dict[str, dict]:
    """Planned name -> the model-only numbers (or an ``error``)."""
    results = {}
    for item in planned:
        try:
            results[item.name] = model_only_images_per_s(item.cfg, args.model_only_images)
            print(f"model-only {item.name}: {results[item.name]['images_per_s']:.1f} images/s "
                  f"({results[item.name]['images']} images on {results[item.name]['device']})",
                  flush=True)
        except Exception as error:  # noqa: BLE001  (reported; the runs still go)
            message = ' '.join(f'{type(error).__name__}: {error}'.split())[:300]
            results[item.name] = dict(error=message)
            print(f'model-only {item.name}: FAILED, {message}', flush=True)
    return results


def test_py_command(item: Planned, run_dir: Path) -> List[str]:
    return [sys.executable, str(REPO_ROOT / 'tools/test.py'), str(item.config),
            '--work-dir', str(run_dir), '--no-progress', '--cfg-options', *item.options]


def run_tests(args, planned: List[Planned], work_dir: Path) -> List[dict]:
    """Every planned variant ``--repeat`` times as a tools/test.py process."""
    runs = []
    total = len(planned) * args.repeat
    for item in planned:
        for repeat in range(1, args.repeat + 1):
            name = f'{item.name}-{repeat}'
            print(f'[{len(runs) + 1}/{total}] {name}: tools/test.py {item.config} '
                  f'({item.variant.name})', flush=True)
            process = run_timed(test_py_command(item, work_dir / name),
                                work_dir / name / 'log.txt', args.run_timeout)
            run = dict(run=name, group=item.name, config=str(item.config),
                       variant=item.variant.name, repeat=repeat, command=process.command,
                       log=str(work_dir / name / 'log.txt'), timed_out=process.timed_out,
                       **run_numbers(process))
            if process.returncode:
                run['log_tail'] = process.tail()
                why = (f'killed after {args.run_timeout} s' if process.timed_out
                       else f'exit code {process.returncode}')
                print(f'  FAILED ({why}); the end of {run["log"]}:\n'
                      + '\n'.join(f'    {line}' for line in run['log_tail']), flush=True)
            else:
                print(f'  wall {run["wall_s"]:.2f} s', flush=True)
            runs.append(run)
    return runs


def compare_with_model_only(runs: List[dict], model_only: Dict[str, dict]) -> None:
    """Adds each run's model-only images/s and its loop's share of them."""
    for run in runs:
        reference = model_only.get(run['group'], {}).get('images_per_s')
        run['model_only_images_per_s'] = reference
        run['loop_share_of_model_only'] = (run['loop_images_per_s'] / reference
                                           if reference and run['loop_images_per_s'] else None)


def run_eval_all(args, configs: List[Path], data_root: Path, work_dir: Path) -> dict:
    command = [sys.executable, str(REPO_ROOT / 'tools/eval_all.py'),
               '--configs', *map(str, configs), '--data-root', str(data_root),
               '--work-dir', str(work_dir / 'eval_all'), '--no-progress', '--rerun',
               '--cfg-options', *base_options(args)]
    print(f'eval_all: {len(configs)} config(s) in one process', flush=True)
    process = run_timed(command, work_dir / 'eval_all' / 'log.txt', args.run_timeout)
    result = dict(command=command, returncode=process.returncode, wall_s=process.wall_s,
                  timed_out=process.timed_out, log=str(work_dir / 'eval_all' / 'log.txt'),
                  entries=eval_all_entries(process))
    if process.returncode:
        result['log_tail'] = process.tail()
    return result


def print_report(report: dict) -> None:
    floor = report['t_import']
    print(f"\n# tools/test.py end to end on {report['machine']['device']} "
          f"(torch {report['machine']['torch']}, {report['machine']['cpu_count']} CPUs), "
          f"data {report['data_root']}")
    print(f"T_import {floor['median_s']:.2f} s (before the runs {floor['before_s']:.2f} s, "
          f"after {floor['after_s']:.2f} s)\n")
    rows = list(report['runs'])
    for name in dict.fromkeys(run['group'] for run in report['runs']):
        repeats = [run for run in report['runs'] if run['group'] == name]
        if len(repeats) > 1:
            rows.append(median_row(repeats))
    print(table(rows))
    if report['model_only']:
        print('\n| config, variant | model-only images/s | images | batch size | device |\n'
              '| --- | --- | --- | --- | --- |')
        for name, result in report['model_only'].items():
            if 'error' in result:
                print(f"| {name} | FAILED: {result['error']} | | | |")
            else:
                print(f"| {name} | {result['images_per_s']:.1f} | {result['images']} | "
                      f"{result['batch_size']} | {result['device']} |")
    if report.get('eval_all'):
        result = report['eval_all']
        print(f"\neval_all: {len(result['entries'])} entries in one process, wall "
              f"{result['wall_s']:.2f} s, exit code {result['returncode']} "
              f"(the separate runs above: {sum(r['wall_s'] for r in report['runs']):.2f} s)")
        for entry in result['entries']:
            if entry['failed']:
                print(f"  {entry['name']}: {entry['line']}")
            else:
                rate = (f"{entry['images'] / entry['loop_s']:.1f}" if entry['images'] and
                        entry['loop_s'] else '-')
                print(f"  {entry['name']}: start-up {cell(entry['startup_s'], '.2f')} s, loop "
                      f"{cell(entry['loop_s'], '.2f')} s ({cell(entry['images'], 'd')} images, "
                      f"{rate} images/s), evaluation {cell(entry['evaluation_s'], '.2f')} s")
        if result['returncode']:
            print('  FAILED; the end of its log:\n'
                  + '\n'.join(f'    {line}' for line in result['log_tail']))
    print(f"\ntargets (issue 22), T_import {floor['median_s']:.2f} s:")
    for run in report['runs']:
        print(targets_text(run) if not run['returncode'] else f"  {run['run']}: failed")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    configs = check_arguments(args)
    work_dir = Path(args.work_dir)
    data_root = Path(args.data_root or work_dir / 'data').resolve()
    benchmarks = [] if args.data_root else configs_benchmarks(args, configs)
    planned = plan(args, configs, data_root)  # every config read before anything is written
    with user_files(f'--work-dir {work_dir}', (OSError, )):
        work_dir.mkdir(parents=True, exist_ok=True)
        if benchmarks:
            fabricated_data(work_dir, benchmarks, args)

    t_before = import_floor_seconds(warm=True)
    print(f'T_import before the runs: {t_before:.2f} s', flush=True)
    runs = run_tests(args, planned, work_dir)
    eval_all = run_eval_all(args, configs, data_root, work_dir) if args.eval_all else None
    # after the runs: this process's CUDA context never shares the GPU with theirs
    model_only = measure_model_only(args, planned) if args.model_only else {}
    compare_with_model_only(runs, model_only)
    t_after = import_floor_seconds(warm=False)
    t_import = statistics.median([t_before, t_after])
    for run in runs:
        run['t_import_s'] = t_import
        run['targets'] = targets_of(run, t_import)

    report = dict(machine=machine(), date=time.strftime('%Y-%m-%d %H:%M:%S'),
                  data_root=str(data_root), work_dir=str(work_dir),
                  t_import=dict(before_s=t_before, after_s=t_after, median_s=t_import,
                                command=[sys.executable, '-c', IMPORT_FLOOR_CODE]),
                  model_only=model_only, runs=runs, eval_all=eval_all,
                  commands=[run['command'] for run in runs]
                  + ([eval_all['command']] if eval_all else []))
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f'json: {args.json}')
    failed = (any(run['returncode'] for run in runs) or (eval_all and eval_all['returncode'])
              or any('error' in result for result in model_only.values()))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(run_main(main))
