"""Progress with ETAs (mmseg_selfattn/progress.py): the test-loop hook, and the per-entry
lines of tools/eval_all.py."""
import contextlib
import io
import re
from types import SimpleNamespace

import pytest
from mmengine.config import Config

from conftest import TINY_ARCH, load_tool
from mmseg_selfattn.progress import ProgressBarHook, RunSetProgress, with_progress

LINE = re.compile(r'^test: +(\d+)% (\d+)/(\d+) images, +[\d.]+ images/s, '
                  r'elapsed [\d:]+, ETA [\d:]+$')


class Terminal(io.StringIO):

    def isatty(self):
        return True


def run_loop(hook, images, batches, rank=0, world_size=1):
    dataset = list(range(images))
    runner = SimpleNamespace(rank=rank, world_size=world_size,
                             test_loop=SimpleNamespace(dataloader=SimpleNamespace(dataset=dataset)))
    hook.before_test(runner)
    for index in range(batches):
        hook.after_test_iter(runner, index, outputs=[None])
    hook.after_test(runner)


def test_plain_lines_at_every_tenth_when_not_a_terminal():
    stream = io.StringIO()
    run_loop(ProgressBarHook(file=stream), images=20, batches=20)
    matches = [LINE.match(line) for line in stream.getvalue().splitlines()]
    assert all(matches), stream.getvalue()
    assert [(int(m[1]), int(m[2]), int(m[3])) for m in matches] == [
        (10 * tenth, 2 * tenth, 20) for tenth in range(1, 11)]
    assert '\r' not in stream.getvalue()


def test_bar_on_a_terminal_reaches_n_of_n():
    stream = Terminal()
    run_loop(ProgressBarHook(file=stream), images=7, batches=7)
    text = stream.getvalue()
    assert '\r' in text and '|' in text
    assert ' 0/7 images' in text and 'ETA ?' in text  # drawn at the start
    final = text.rstrip('\n').split('\r')[-1]
    assert re.search(r'100%\|.*\| 7/7 images, +[\d.]+ images/s, elapsed [\d:]+, ETA [\d:]+',
                     final), final


def test_rank_zero_only_counting_all_ranks():
    quiet = io.StringIO()
    run_loop(ProgressBarHook(file=quiet), images=20, batches=10, rank=1, world_size=2)
    assert quiet.getvalue() == ''
    stream = io.StringIO()  # 5 images over 2 ranks: rank 0 gets 3 (the sampler pads)
    run_loop(ProgressBarHook(file=stream), images=5, batches=3, world_size=2)
    counts = [int(LINE.match(line)[2]) for line in stream.getvalue().splitlines()]
    assert counts == [2, 4, 5]


def test_with_progress_adds_the_hook_once():
    cfg = Config(dict(custom_hooks=[dict(type='TestSetCheckHook')]))
    with_progress(cfg)
    with_progress(cfg)
    assert cfg.custom_hooks == [dict(type='TestSetCheckHook'), dict(type='ProgressBarHook')]


def test_run_set_eta_from_the_mean_run_time():
    runs = RunSetProgress(total=4)
    assert re.fullmatch(r'elapsed 00:0\d, ETA \?', runs.status(1))
    runs.timed(10.0)
    runs.timed(20.0)
    assert runs.status(3).endswith('ETA 00:30')  # runs 3 and 4 left, 15 s each


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    load_tool('fabricate_benchmarks').fabricate(root, num_images=3, seed=0)
    return root


def test_eval_all_prints_entries_with_eta_and_a_bar_per_entry(data_root, tmp_path, capsys):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = load_tool('eval_all').main([
            '--method', 'naclip', '--benchmarks', 'voc21', 'voc20', '--data-root',
            str(data_root), '--work-dir', str(tmp_path), '--cfg-options',
            f'model.clip.arch={TINY_ARCH}', 'model.clip.pretrained=None',
            'test_dataloader.num_workers=0', 'test_dataloader.persistent_workers=False'])
    assert status == 0
    output, err = stdout.getvalue(), capsys.readouterr().err
    assert re.search(r'\[eval_all 1/2\] voc21: evaluating \S+ \(elapsed [\d:]+, ETA \?\)',
                     output), output
    assert re.search(r'\[eval_all 2/2\] voc20: evaluating \S+ \(elapsed [\d:]+, '
                     r'ETA [\d:]+\)', output), output
    final_lines = [line for line in err.splitlines() if LINE.match(line)
                   and LINE.match(line)[2] == '3']
    assert len(final_lines) == 2, err  # one test loop per entry, each to 3/3
