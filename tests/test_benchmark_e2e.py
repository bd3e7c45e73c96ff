"""tools/benchmark_e2e.py: real tools/test.py and tools/eval_all.py runs (tiny random CLIP,
fabricated VOC21) timed from outside, a failing variant reported with exit status 1, the
JSON equal to the table; the parsers on literal log lines; one-line argument errors.

The import floor's command is replaced by ``pass`` in the timed run (three imports of
torch and mmseg would double the time of this file); ``test_import_floor_code`` runs the
real one in this process."""
import contextlib
import io
import json
import os
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, load_tool
from mmseg_selfattn.cli import USAGE_EXIT_CODE, run_main

benchmark_e2e = load_tool('benchmark_e2e')
fabricate_benchmarks = load_tool('fabricate_benchmarks')

VOC = str(REPO_ROOT / 'configs/methods/naclip/naclip_vit-b16_voc21.py')
CAMVID = str(REPO_ROOT / 'configs/selfattn/selfattn_vit-b16_camvid.py')
FAST = ['model.clip.arch=ViT-Tiny-16-test', 'model.pamr_steps=0',
        'test_dataloader.num_workers=0', 'test_dataloader.persistent_workers=False']
TIMELINE = ('12/02 05:43:09 - mmengine - INFO - test timeline: start-up 7.41 s, loop 3.02 s '
            '(1449 images, 479.8 images/s), evaluation 0.12 s')
METRIC = ('12/02 05:43:09 - mmengine - INFO - Iter(test) [1449/1449]    aAcc: 4.5400  '
          'mIoU: 1.0000  mAcc: 4.9400  data_time: 0.0226  time: 0.1351')


@pytest.fixture(scope='module')
def voc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    fabricate_benchmarks.fabricate(root, num_images=3, seed=0, benchmarks=['voc21'])
    return root


@pytest.fixture(scope='module')
def e2e(voc_root, tmp_path_factory):
    """One run of the tool: the config as shipped, a variant whose model refuses it, and
    eval_all."""
    work_dir = tmp_path_factory.mktemp('e2e')
    argv = ['--configs', VOC, '--data-root', str(voc_root), '--work-dir', str(work_dir),
            '--json', str(work_dir / 'report.json'), '--pretrained', 'none', '--eval-all',
            '--cfg-options', *FAST, '--variants', 'bad:model.prob_thd=5']
    output = io.StringIO()
    with contextlib.redirect_stdout(output), pytest.MonkeyPatch.context() as patch:
        patch.setattr(benchmark_e2e, 'IMPORT_FLOOR_CODE', 'pass')
        status = benchmark_e2e.main(argv)
    print(output.getvalue())  # shown when a test fails
    report = json.loads((work_dir / 'report.json').read_text())
    return status, output.getvalue(), report, work_dir


def table_rows(output: str) -> dict:
    """Run name -> {column title: cell} of the printed table."""
    lines = [line for line in output.splitlines() if line.startswith('| ')]
    header = [cell.strip() for cell in lines[0].strip('|').split('|')]
    rows = {}
    for line in lines[1:]:
        cells = [cell.strip() for cell in line.strip('|').split('|')]
        if len(cells) == len(header) and cells[0] not in (header[0], '---'):
            rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_a_run_has_every_number(e2e, voc_root):
    status, _, report, work_dir = e2e
    assert status == 1  # the failing variant
    run = report['runs'][0]
    assert run['run'] == 'naclip_vit-b16_voc21-as-shipped-1' and run['returncode'] == 0
    for key in ('wall_s', 't_import_s', 'startup_s', 'loop_s', 'evaluation_s', 'exit_s',
                'loop_images_per_s', 'wall_images_per_s', 'model_only_images_per_s',
                'loop_share_of_model_only'):
        assert isinstance(run[key], float) and run[key] >= 0, key
    assert run['images'] == 3
    assert run['startup_s'] + run['loop_s'] + run['evaluation_s'] <= run['wall_s']
    assert 0 <= run['exit_s'] <= run['wall_s']
    assert run['wall_images_per_s'] == pytest.approx(3 / run['wall_s'])
    assert run['loop_share_of_model_only'] == pytest.approx(
        run['loop_images_per_s'] / run['model_only_images_per_s'])
    floor = report['t_import']
    assert floor['before_s'] > 0 and floor['after_s'] > 0
    assert run['t_import_s'] == floor['median_s'] == pytest.approx(
        (floor['before_s'] + floor['after_s']) / 2)
    log = Path(run['log'])
    assert log == work_dir / run['run'] / 'log.txt' and 'test timeline:' in log.read_text()
    command = run['command']
    assert command[1:3] == [str(REPO_ROOT / 'tools/test.py'), VOC]
    assert '--no-progress' in command and str(work_dir / run['run']) in command
    assert 'model.clip.pretrained=None' in command
    assert f'test_dataloader.dataset.data_root={voc_root}/VOCdevkit/VOC2012' in command
    assert report['commands'][0] == command
    assert {'torch', 'device', 'cpu_count'} <= set(report['machine'])


def test_the_table_shows_the_json_numbers(e2e):
    _, output, report, _ = e2e
    rows = table_rows(output)
    assert list(rows) == [run['run'] for run in report['runs']]
    for run in report['runs']:
        row = rows[run['run']]
        assert row['exit code'] == str(run['returncode'])
        for key, title, spec in benchmark_e2e.COLUMNS:
            if run[key] is None:
                assert row[title] == '-', title
            elif spec.endswith('%'):
                assert float(row[title].rstrip('%')) == pytest.approx(100 * run[key], abs=0.5)
            else:
                assert float(row[title]) == pytest.approx(run[key], abs=0.051), title


def test_a_failing_run_is_reported(e2e):
    status, output, report, _ = e2e
    failed = report['runs'][1]
    assert failed['run'] == 'naclip_vit-b16_voc21-bad-1' and failed['variant'] == 'bad'
    assert failed['returncode'] == USAGE_EXIT_CODE
    assert 'model.prob_thd=5' in failed['command']
    message = 'prob_thd must be a number in [0, 1], got 5.'
    assert any(message in line for line in failed['log_tail'])
    assert f"FAILED (exit code {USAGE_EXIT_CODE})" in output and message in output
    assert f"  {failed['run']}: failed" in output
    assert message in report['model_only']['naclip_vit-b16_voc21-bad']['error']
    assert failed['loop_s'] is None and failed['model_only_images_per_s'] is None


def test_eval_all_in_one_process(e2e, voc_root):
    _, output, report, work_dir = e2e
    result = report['eval_all']
    assert result['returncode'] == 0 and result['wall_s'] > 0
    assert result['command'][1] == str(REPO_ROOT / 'tools/eval_all.py')
    assert result['command'][result['command'].index('--data-root') + 1] == str(voc_root)
    assert 'model.prob_thd=5' not in result['command']  # the variants are test.py runs
    (entry, ) = result['entries']
    assert entry['name'] == 'naclip_vit-b16_voc21' and entry['images'] == 3
    assert entry['startup_s'] + entry['loop_s'] + entry['evaluation_s'] <= result['wall_s']
    assert Path(result['log']) == work_dir / 'eval_all' / 'log.txt'
    assert report['commands'][-1] == result['command']
    assert f"eval_all: 1 entries in one process, wall {result['wall_s']:.2f} s" in output
    assert f"  naclip_vit-b16_voc21: start-up {entry['startup_s']:.2f} s" in output


def test_import_floor_code():
    """The floor's imports work (in this process, where they are already done)."""
    exec(benchmark_e2e.IMPORT_FLOOR_CODE, {})
    assert 'import mmseg.apis' in benchmark_e2e.IMPORT_FLOOR_CODE


def test_targets_of_issue_22(e2e):
    _, output, report, _ = e2e
    run = report['runs'][0]
    assert [target['target'] for target in run['targets']] == [
        'wall <= T_import + 10 s', 'loop images/s >= 50% of model-only',
        'start-up <= T_import + 5 s']
    wall, loop, startup = run['targets']
    assert wall['limit'] == pytest.approx(run['t_import_s'] + 10)
    assert wall['met'] is (run['wall_s'] <= run['t_import_s'] + 10)
    assert loop['limit'] == pytest.approx(run['model_only_images_per_s'] / 2)
    assert startup['value'] == run['startup_s']
    line = next(line for line in output.splitlines() if line.startswith(f"  {run['run']}: "))
    assert f"wall <= T_import + 10 s: {'yes' if wall['met'] else 'no'} ({run['wall_s']:.2f} " \
        in line
    assert 'targets (issue 22)' in output


# -- parsers ---------------------------------------------------------------------------------
def test_parse_timeline():
    assert benchmark_e2e.parse_timeline(TIMELINE) == dict(
        startup_s=7.41, loop_s=3.02, images=1449, evaluation_s=0.12, images_per_s=479.8)
    no_rate = 'test timeline: start-up 1.00 s, loop 0.00 s (1 images, n/a images/s), ' \
              'evaluation 0.50 s'
    assert benchmark_e2e.parse_timeline(no_rate)['images_per_s'] is None
    for line in (METRIC, 'test timeline: start-up soon', ''):
        assert benchmark_e2e.parse_timeline(line) is None


@pytest.mark.parametrize('line, metric', [
    (METRIC, True),
    ('aAcc: 4.54, mIoU: 1.00, mAcc: 4.94', True),  # tools/test.py's own summary
    ('Iter(test) [3/3]  aAcc: nan  mIoU: nan  mAcc: nan', True),
    ("test_evaluator = dict(iou_metrics=['mIoU'], type='CheckedIoUMetric')", False),
    (TIMELINE, False),
    ('| Class | IoU | Acc |', False),
])
def test_metric_line(line, metric):
    assert benchmark_e2e.is_metric_line(line) is metric


def test_numbers_of_a_log():
    lines = [(5.0, 'loading'), (9.0, METRIC), (9.01, TIMELINE), (9.02, 'aAcc: 1, mIoU: 2')]
    process = benchmark_e2e.TimedProcess(['python'], 0, 11.5, lines)
    numbers = benchmark_e2e.run_numbers(process)
    assert numbers['exit_s'] == pytest.approx(2.5)  # from the first metric line
    assert numbers['loop_images_per_s'] == 479.8 and numbers['images'] == 1449
    assert numbers['wall_images_per_s'] == pytest.approx(1449 / 11.5)
    bare = benchmark_e2e.run_numbers(benchmark_e2e.TimedProcess(['python'], 1, 3.0, []))
    assert bare['startup_s'] is None and bare['exit_s'] is None and bare['returncode'] == 1


def test_lines_are_stamped_as_they_arrive(tmp_path):
    code = ('import sys, time; print("first"); sys.stderr.write("second\\n"); '
            'sys.stderr.flush(); time.sleep(0.5); print("third"); sys.exit(3)')
    process = benchmark_e2e.run_timed([sys.executable, '-c', code], tmp_path / 'run/log.txt')
    assert process.returncode == 3 and not process.timed_out
    assert [text for _, text in process.lines] == ['first', 'second', 'third']
    (first, _), (second, _), (third, _) = process.lines
    assert third - second >= 0.45 and third <= process.wall_s
    logged = (tmp_path / 'run/log.txt').read_text().splitlines()
    assert [line.split(maxsplit=1) for line in logged] == [
        [f'{at:.3f}', text] for at, text in process.lines]


def test_a_run_past_its_time_limit_is_killed(tmp_path):
    code = 'import time; print("started", flush=True); time.sleep(60)'
    process = benchmark_e2e.run_timed([sys.executable, '-c', code], tmp_path / 'log.txt',
                                      timeout=1)
    assert process.timed_out and process.returncode < 0
    assert process.lines[0][1] == 'started' and 1 <= process.wall_s < 10


def test_eval_all_entries():
    lines = ['[eval_all 1/2] a: evaluating a.py (elapsed 0 s)', METRIC, TIMELINE,
             '[eval_all 2/2] b: evaluating b.py (elapsed 9 s, ETA 9 s)',
             '[eval_all 2/2] b: FAILED, prob_thd must be ... (traceback: x/error.txt)']
    process = benchmark_e2e.TimedProcess(['python'], 1, 20.0, [(1.0, t) for t in lines])
    first, evaluating, failed = benchmark_e2e.eval_all_entries(process)
    assert first['name'] == 'a' and first['loop_s'] == 3.02 and not first['failed']
    assert evaluating['name'] == 'b' and evaluating['loop_s'] is None
    assert failed['failed'] and 'FAILED' in failed['line']


@pytest.mark.parametrize('text, name, options', [
    ('fp32:model.precision=fp32', 'fp32', ['model.precision=fp32']),
    ('no-pamr:model.pamr_steps=0,model.prob_thd=0.2', 'no-pamr',
     ['model.pamr_steps=0', 'model.prob_thd=0.2']),
    ('stride:model.pamr_stride=(8,16),x.y=a,b', 'stride', ['model.pamr_stride=(8,16)',
                                                           'x.y=a,b']),
])
def test_variant(text, name, options):
    parsed = benchmark_e2e.variant(text)
    assert (parsed.name, parsed.options) == (name, options)


@pytest.mark.parametrize('text', ['fp32', ':model.precision=fp32', 'fp32:', 'fp32:model',
                                  'two words:a=1', 'a/b:a=1'])
def test_malformed_variant(text):
    with pytest.raises(Exception, match='is not'):
        benchmark_e2e.variant(text)


def test_data_root_option(tmp_path):
    cfg = benchmark_e2e.load_config(VOC)
    assert benchmark_e2e.data_root_option(cfg, str(tmp_path)) == \
        f'test_dataloader.dataset.data_root={tmp_path}/VOCdevkit/VOC2012'
    moved = benchmark_e2e.load_config(VOC, {'test_dataloader.dataset.data_root': '/elsewhere'})
    assert benchmark_e2e.data_root_option(moved, str(tmp_path)) is None


def test_fabricated_data_is_kept_for_the_same_settings(tmp_path, capsys):
    args = benchmark_e2e.parse_args(['--configs', VOC, '--images', '2', '--small-sizes'])
    cfg = benchmark_e2e.load_config(VOC)
    benchmarks = benchmark_e2e.benchmarks_of(Path(VOC), cfg)
    assert benchmarks == ['voc21']
    data = benchmark_e2e.fabricated_data(tmp_path, benchmarks, args)
    split = data / 'VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt'
    assert len(split.read_text().split()) == 2
    benchmark_e2e.fabricated_data(tmp_path, benchmarks, args)
    assert 'kept from an earlier run' in capsys.readouterr().out
    args.images = 3
    benchmark_e2e.fabricated_data(tmp_path, benchmarks, args)
    assert len(split.read_text().split()) == 3


# -- argument errors -------------------------------------------------------------------------
def usage_error(argv, capsys) -> str:
    """The one stderr line of ``main(argv)`` run as its ``__main__`` does (exit status 2)."""
    code = run_main(lambda: benchmark_e2e.main(argv), prog='benchmark_e2e.py')
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == USAGE_EXIT_CODE, (code, out[-2000:], err[-2000:])
    assert len(lines) == 1 and lines[0].startswith('benchmark_e2e.py: error: '), err
    return lines[0]


@pytest.mark.parametrize('argv, expected', [
    (['--configs', 'nope.py'], '--configs nope.py: no such file'),
    (['--configs', VOC, VOC], 'two configs of one name'),
    (['--configs', VOC, '--data-root', '{file}'], '--data-root {file}: not a folder'),
    (['--configs', VOC, '--data-root', '{tmp}'],
     f'--configs {VOC}: test data not found: data_root {{tmp}}/VOCdevkit/VOC2012 does not'),
    (['--configs', VOC, '--data-root', '{tmp}', '--images', '3'],
     '--images, --real-counts and --small-sizes fabricate data'),
    (['--configs', VOC, '--json', '{tmp}/no/report.json'], 'no such folder {tmp}/no'),
    (['--configs', VOC, '--json', '{tmp}'], '--json {tmp}: is a folder'),
    (['--configs', VOC, '--work-dir', '{file}'], '--work-dir {file}: exists and is not a folder'),
    (['--configs', VOC, '--variants', 'a:model.prob_thd=0', 'a:model.prob_thd=1'],
     'names must differ'),
    (['--configs', VOC, '--variants', 'x:test_dataloader.dataset.pipeline.9.scale=1'],
     '--variants x: --cfg-options: Index 9 exceeds the length of list'),
    (['--configs', CAMVID], "data_root 'data/camvid' is not one tools/fabricate_benchmarks.py"),
    (['--configs', VOC, '--pretrained', 'nonesuch'], '--pretrained nonesuch: no such file'),
], ids=['config', 'same-stem', 'data-root-file', 'no-test-data', 'images-with-data-root',
        'json-folder-missing', 'json-is-folder', 'work-dir-file', 'same-variant',
        'variant-option', 'not-fabricated', 'pretrained'])
def test_usage_errors(argv, expected, tmp_path, capsys):
    (tmp_path / 'a_file').write_text('x')
    fill = dict(tmp=str(tmp_path), file=str(tmp_path / 'a_file'))
    argv = [item.format(**fill) for item in argv]
    if '--work-dir' not in argv:
        argv += ['--work-dir', str(tmp_path / 'work')]
    assert expected.format(**fill) in usage_error(argv, capsys)
    assert not (tmp_path / 'work').exists()


@pytest.mark.parametrize('argv, expected', [
    (['--configs', VOC, '--images', '0'], "argument --images: '0' is not an integer >= 1"),
    (['--configs', VOC, '--images', '2', '--real-counts'],
     'argument --real-counts: not allowed with argument --images'),
    (['--configs', VOC, '--variants', 'fp32'], "argument --variants: 'fp32' is not NAME:"),
    (['--configs', VOC, '--repeat', '0'], "argument --repeat: '0' is not an integer >= 1"),
    (['--configs', VOC, '--cfg-options', 'foo'], "argument --cfg-options: 'foo' is not KEY="),
    ([], 'the following arguments are required: --configs'),
])
def test_argparse_errors(argv, expected, capsys):
    with pytest.raises(SystemExit) as raised:
        benchmark_e2e.main(argv)
    err = capsys.readouterr().err
    assert raised.value.code == USAGE_EXIT_CODE and 'Traceback' not in err
    errors = [line for line in err.splitlines() if 'error:' in line]
    assert len(errors) == 1 and expected in errors[0], err


def test_json_not_writable(tmp_path, capsys):
    folder = tmp_path / 'read_only'
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.geteuid() == 0:
            pytest.skip('root writes anywhere')
        line = usage_error(['--configs', VOC, '--json', str(folder / 'r.json'),
                            '--work-dir', str(tmp_path / 'work')], capsys)
        assert 'cannot be written' in line
    finally:
        folder.chmod(0o700)


def test_targets_on_literal_numbers():
    run = dict(run='r', wall_s=12.0, loop_images_per_s=40.0, model_only_images_per_s=100.0,
               startup_s=None)
    run['targets'] = benchmark_e2e.targets_of(run, t_import=5.0)
    assert [target['met'] for target in run['targets']] == [True, False, None]
    assert benchmark_e2e.targets_text(run) == (
        '  r: wall <= T_import + 10 s: yes (12.00 <= 15.00); loop images/s >= 50% of '
        'model-only: no (40.00 < 50.00); start-up <= T_import + 5 s: n/a')
