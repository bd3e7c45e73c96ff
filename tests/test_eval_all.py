"""tools/eval_all.py on fabricated benchmarks (tools/fabricate_benchmarks.py) with a
tiny random CLIP: the table, resuming after a real kill, failing entries, fingerprints."""
import contextlib
import csv
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, TINY_ARCH, load_tool


eval_all = load_tool('eval_all')
fabricate_benchmarks = load_tool('fabricate_benchmarks')

FAST = ['--cfg-options', f'model.clip.arch={TINY_ARCH}', 'model.clip.pretrained=None',
        'test_dataloader.num_workers=0', 'test_dataloader.persistent_workers=False']
METRICS = ('mIoU', 'mAcc', 'aAcc')


def run_main(argv):
    """eval_all.main in-process; returns (exit status, printed output)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = eval_all.main([str(a) for a in argv])
    output = buffer.getvalue()
    print(output)  # shown by pytest when a test fails
    return status, output


def read_csv(work_dir: Path):
    with open(work_dir / 'results.csv', newline='') as file:
        rows = list(csv.DictReader(file))
    return {row['entry']: row for row in rows}


def read_result(work_dir: Path, name: str) -> dict:
    return json.loads((work_dir / name / 'result.json').read_text())


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    samples = fabricate_benchmarks.fabricate(root, num_images=3, seed=0)
    assert all(len(files) == 3 for files in samples.values())
    return root


@pytest.fixture(scope='module')
def voc_ade_run(data_root, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp('voc_ade')
    status, output = run_main(['--method', 'naclip', '--benchmarks', 'voc21', 'ade20k',
                               '--data-root', data_root, '--work-dir', work_dir, *FAST])
    return status, output, work_dir


def test_table_over_two_benchmarks(voc_ade_run):
    status, output, work_dir = voc_ade_run
    assert status == 0
    assert (work_dir / 'results.md').is_file() and (work_dir / 'results.csv').is_file()
    rows = read_csv(work_dir)
    assert list(rows) == ['voc21', 'ade20k', 'average']
    for name in ('voc21', 'ade20k', 'average'):
        for key in METRICS:
            assert 0.0 <= float(rows[name][key]) <= 100.0, (name, key, rows[name])
        assert rows[name]['error'] == ''
    for key in METRICS:
        mean = (float(rows['voc21'][key]) + float(rows['ade20k'][key])) / 2
        assert float(rows['average'][key]) == pytest.approx(mean, abs=0.0051)
    for name in ('voc21', 'ade20k'):
        assert rows[name]['images'] == '3'
        result = read_result(work_dir, name)
        assert set(result['metrics']) == set(METRICS)
        for key in METRICS:
            assert rows[name][key] == f"{result['metrics'][key]:.2f}"
        assert result['images'] == 3
        assert len(result['fingerprint']) == 16
        assert not (work_dir / name / 'error.txt').exists()
    markdown = (work_dir / 'results.md').read_text()
    assert '| VOC21 | ADE | avg |' in markdown
    papers_row = f"| {rows['voc21']['mIoU']} | {rows['ade20k']['mIoU']} | " \
                 f"{rows['average']['mIoU']} |"
    assert papers_row in markdown
    assert 'done earlier' not in output


def _wait_for(condition, process, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f'eval_all exited ({process.returncode}) before the kill:\n'
                        f'{log.read_text()[-4000:]}')
        if time.monotonic() > deadline:
            pytest.fail(f'timed out after {timeout} s waiting for eval_all:\n'
                        f'{log.read_text()[-4000:]}')
        time.sleep(0.2)


def test_killed_run_resumes_without_redoing_finished_entries(data_root, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(data_root / 'VOCdevkit', data / 'VOCdevkit')
    context = data / 'VOCdevkit' / 'VOC2010'
    split = (context / 'ImageSets/SegmentationContext/val.txt').read_text().split()
    blocking = context / 'JPEGImages' / f'{split[0]}.jpg'
    original = blocking.read_bytes()  # the label map has this image's size
    blocking.unlink()
    os.mkfifo(blocking)  # opening it for reading blocks until a writer comes: never
    work_dir, log = tmp_path / 'work', tmp_path / 'killed.log'
    argv = ['--method', 'naclip', '--benchmarks', 'voc21', 'context60',
            '--data-root', str(data), '--work-dir', str(work_dir), *FAST]
    voc_result = work_dir / 'voc21' / 'result.json'
    process = None
    try:
        with open(log, 'w') as log_file:
            process = subprocess.Popen([sys.executable, str(REPO_ROOT / 'tools/eval_all.py'),
                                        *argv], cwd=REPO_ROOT, stdout=log_file,
                                       stderr=subprocess.STDOUT)
        _wait_for(lambda: voc_result.is_file()
                  and '[eval_all 2/2] context60: evaluating' in log.read_text(),
                  process, log)
        time.sleep(0.5)  # context60 is blocked on the FIFO: still running
        assert process.poll() is None, log.read_text()[-4000:]
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        if stat.S_ISFIFO(os.lstat(blocking).st_mode):
            blocking.unlink()
            blocking.write_bytes(original)  # a real JPEG again
    assert not (work_dir / 'context60' / 'result.json').exists()
    assert not (work_dir / 'results.csv').exists()  # it never got to the table
    kept_mtime, kept_text = voc_result.stat().st_mtime_ns, voc_result.read_text()

    status, output = run_main(argv)
    assert status == 0
    assert '[eval_all 1/2] voc21: done earlier, kept' in output
    assert '[eval_all 2/2] context60: evaluating' in output
    assert voc_result.stat().st_mtime_ns == kept_mtime
    assert voc_result.read_text() == kept_text
    assert (work_dir / 'context60' / 'result.json').is_file()
    rows = read_csv(work_dir)
    assert list(rows) == ['voc21', 'context60', 'average']
    voc = json.loads(kept_text)['metrics']
    for key in METRICS:
        assert rows['voc21'][key] == f'{voc[key]:.2f}'
        assert 0.0 <= float(rows['context60'][key]) <= 100.0
    assert '| VOC21 | PC60 | avg |' in (work_dir / 'results.md').read_text()


def test_failing_benchmark_is_reported_and_the_rest_still_run(data_root, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(data_root / 'VOCdevkit', data / 'VOCdevkit')  # no cityscapes
    work_dir = tmp_path / 'work'
    status, output = run_main(['--method', 'naclip', '--benchmarks', 'cityscapes', 'voc21',
                               '--data-root', data, '--work-dir', work_dir, *FAST])
    assert status == 1
    assert '[eval_all 2/2] cityscapes: FAILED' in output  # papers' order
    error_file = work_dir / 'cityscapes' / 'error.txt'
    assert error_file.is_file()
    traceback_text = error_file.read_text()
    assert traceback_text.startswith('Traceback (most recent call last)')
    assert str(data / 'cityscapes') in traceback_text
    assert not (work_dir / 'cityscapes' / 'result.json').exists()
    assert (work_dir / 'voc21' / 'result.json').is_file()
    rows = read_csv(work_dir)
    assert list(rows) == ['voc21', 'cityscapes', 'average (1 of 2)']
    assert rows['cityscapes']['error'] != ''
    assert all(rows['cityscapes'][key] == '-' for key in METRICS)
    voc = read_result(work_dir, 'voc21')['metrics']
    for key in METRICS:
        assert rows['voc21'][key] == f'{voc[key]:.2f}'
        assert rows['average (1 of 2)'][key] == f'{voc[key]:.2f}'
    assert rows['voc21']['error'] == ''
    assert '| VOC21 | City | avg |' in (work_dir / 'results.md').read_text()


def test_changed_cfg_option_or_rerun_evaluates_again(voc_ade_run, data_root, tmp_path):
    _, _, first_dir = voc_ade_run
    work_dir = tmp_path / 'work'
    shutil.copytree(first_dir, work_dir)
    result_file = work_dir / 'voc21' / 'result.json'
    before = read_result(work_dir, 'voc21')
    argv = ['--method', 'naclip', '--benchmarks', 'voc21', '--data-root',
            data_root, '--work-dir', work_dir, *FAST]

    status, output = run_main(argv + ['model.prob_thd=0.5'])
    assert status == 0
    assert 'done earlier' not in output
    assert 'voc21: config changed since the stored result, evaluating again' in output
    changed = read_result(work_dir, 'voc21')
    assert changed['fingerprint'] != before['fingerprint']

    status, output = run_main(argv + ['model.prob_thd=0.5'])  # unchanged: kept
    assert status == 0 and 'voc21: done earlier, kept' in output
    assert read_result(work_dir, 'voc21') == changed

    mtime = result_file.stat().st_mtime_ns
    status, output = run_main(argv + ['model.prob_thd=0.5', '--rerun'])
    assert status == 0
    assert 'done earlier' not in output and 'voc21: evaluating' in output
    assert result_file.stat().st_mtime_ns != mtime
    assert read_result(work_dir, 'voc21')['fingerprint'] == changed['fingerprint']


def test_explicit_configs_are_entries_named_by_stem(data_root, tmp_path):
    configs = [REPO_ROOT / 'configs/selfattn/selfattn_vit-b16_voc21.py',
               REPO_ROOT / 'configs/methods/sclip/sclip_vit-b16_voc20.py']
    work_dir = tmp_path / 'work'
    status, output = run_main(['--configs', *configs, '--data-root', data_root,
                               '--work-dir', work_dir, *FAST])
    assert status == 0
    names = ['selfattn_vit-b16_voc21', 'sclip_vit-b16_voc20']
    rows = read_csv(work_dir)
    assert list(rows) == names + ['average']
    for name, config in zip(names, configs):
        result = read_result(work_dir, name)
        assert result['config'] == str(config)
        assert result['images'] == 3
        for key in METRICS:
            assert rows[name][key] == f"{result['metrics'][key]:.2f}"
    assert not (work_dir / 'voc21').exists() and not (work_dir / 'voc20').exists()
    assert "papers' column order" not in (work_dir / 'results.md').read_text()


def test_unreadable_result_is_evaluated_again(voc_ade_run, data_root, tmp_path, capsys):
    """A truncated result.json (a disk full, a copy cut short) is neither a failure nor
    kept: the entry is evaluated again, with one warning naming the file."""
    _, _, first_dir = voc_ade_run
    work_dir = tmp_path / 'work'
    shutil.copytree(first_dir, work_dir)
    result_file = work_dir / 'voc21' / 'result.json'
    before = read_result(work_dir, 'voc21')
    result_file.write_text(result_file.read_text()[:25])
    capsys.readouterr()
    status, output = run_main(['--method', 'naclip', '--benchmarks', 'voc21', 'ade20k',
                               '--data-root', data_root, '--work-dir', work_dir, *FAST])
    warnings = [line for line in capsys.readouterr().err.splitlines() if 'warning' in line]
    assert status == 0
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f'eval_all: warning: {result_file} cannot be read '
                                  '(JSONDecodeError: ')
    assert warnings[0].endswith('evaluating the entry again')
    assert '[eval_all 1/2] voc21: evaluating' in output
    assert '[eval_all 2/2] ade20k: done earlier, kept' in output
    assert 'FAILED' not in output
    after = read_result(work_dir, 'voc21')
    assert after['fingerprint'] == before['fingerprint']
    assert after['metrics'] == pytest.approx(before['metrics'])
