"""A user's mistake in a tool's arguments or files is one line on stderr naming the
argument or file, exit status 2, no traceback; a bug keeps its traceback (issue 20).

The tools run in-process (``run_main(lambda: tool.main(argv))``, what their ``__main__``
does) on fabricated benchmarks and the tiny random CLIP; two cases also run as
subprocesses, as a user starts them."""
import subprocess
import sys
import uuid

import pytest
import torch

from mmseg_selfattn.cli import USAGE_EXIT_CODE, run_main
from mmseg_selfattn.sweep import read_state

from conftest import REPO_ROOT, TINY_ARCH, camvid_root, load_tool

test_tool = load_tool('test', 'tools_test')  # not the stdlib's test package
sweep_tool = load_tool('sweep', 'tools_sweep')
eval_all = load_tool('eval_all', 'tools_eval_all')
check_data = load_tool('check_data', 'tools_check_data')
ablate = load_tool('ablate', 'tools_ablate')
fabricate_benchmarks = load_tool('fabricate_benchmarks', 'tools_fabricate_benchmarks')

VOC = str(REPO_ROOT / 'configs/methods/naclip/naclip_vit-b16_voc21.py')
FAST = [f'model.clip.arch={TINY_ARCH}', 'model.clip.pretrained=None',
        'test_dataloader.num_workers=0', 'test_dataloader.persistent_workers=False']


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """Fabricated benchmarks (one image each) and the broken files a user may give."""
    root = tmp_path_factory.mktemp('tool_errors')
    data = root / 'data'
    fabricate_benchmarks.fabricate(data, num_images=1, seed=0)
    (root / 'a_file.txt').write_text('not a folder\n')
    (root / 'bad_syntax.py').write_text('x = = 1\n')
    (root / 'bad_name.py').write_text('x = undefined_name\n')
    (root / 'no_test_set.py').write_text('model = dict(type="SelfAttnCLIPSegmentor")\n')
    (root / 'no_grid.py').write_text('x = 1\n')
    (root / 'empty_split.txt').write_text('')
    (root / 'config.txt').write_text('x = 1\n')
    (root / 'folder.py').mkdir()
    (root / 'list_grid.py').write_text(  # also without mmseg's visualization hook
        f"_base_ = ['{VOC}']\nsweep_grid = [1]\n"
        "default_hooks = dict(_delete_=True, timer=dict(type='IterTimerHook'))\n")
    (root / 'empty_folder').mkdir()
    (root / 'a').mkdir()
    (root / 'b').mkdir()
    for folder in ('a', 'b'):
        (root / folder / 'same.py').write_text(f"_base_ = ['{VOC}']\n")
    return dict(root=root, data=data, voc=data / 'VOCdevkit' / 'VOC2012',
                file=root / 'a_file.txt')


def expand(argv, files):
    """``argv`` with {root}, {data}, {voc}, {file} filled in, and a new experiment name
    after ``--cfg-options``: mmengine reuses the logger of a name (config stem and time
    to the second), whose stream would be the previous test's closed capture."""
    argv = [str(item).format(**{k: str(v) for k, v in files.items()}) for item in argv]
    if '--cfg-options' in argv:
        argv.insert(argv.index('--cfg-options') + 1, f'experiment_name={uuid.uuid4().hex}')
    return argv


def usage_error(tool, argv, capsys, prog='tool.py'):
    """Runs ``tool.main(argv)`` as its ``__main__`` does; returns the one stderr line."""
    code = run_main(lambda: tool.main(argv), prog=prog)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == USAGE_EXIT_CODE, (code, out[-2000:], err[-2000:])
    assert len(lines) == 1, err
    assert 'Traceback' not in out + err
    assert lines[0].startswith(f'{prog}: error: ')
    return lines[0]


def runner_tool_error(tool, prog, argv, expected, files, tmp_path, capsys, monkeypatch):
    """``usage_error`` of a tool that starts a Runner, outside torchrun, with a work dir
    in ``tmp_path``; each of ``expected`` is in the line."""
    for name in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(name, raising=False)
    argv = expand(argv, files)
    if '--work-dir' not in argv:
        argv += ['--work-dir', str(tmp_path / 'work')]
    line = usage_error(tool, argv, capsys, prog)
    for text in expand(expected, files):
        assert text in line


def argparse_error(tool, argv, capsys):
    """argparse's own errors: exit status 2, usage and one error line."""
    with pytest.raises(SystemExit) as raised:
        tool.main(argv)
    err = capsys.readouterr().err
    assert raised.value.code == 2 and 'Traceback' not in err
    return err.strip().splitlines()[-1]


# -- tools/test.py -----------------------------------------------------------------------
VOC_DATA = ['--cfg-options', *FAST, 'test_dataloader.dataset.data_root={voc}']


@pytest.mark.parametrize('argv, expected', [
    (['nope.py'], ['CONFIG nope.py: no such file']),
    ([VOC, '{root}/no.pth'], ['CHECKPOINT {root}/no.pth: no such file']),
    ([VOC, '--work-dir', '{file}'], ['--work-dir {file}: exists and is not a folder']),
    ([VOC, '--show-dir', '{file}'], ['--show-dir {file}: exists and is not a folder']),
    ([VOC, '--out', '{file}'], ['--out {file}: exists and is not a folder']),
    (['{root}/folder.py'], ['CONFIG {root}/folder.py: not a file']),
    (['{root}/config.txt'], ['CONFIG {root}/config.txt: Only py/yml/yaml/json type']),
    (['{root}/bad_syntax.py'], ['CONFIG {root}/bad_syntax.py: invalid syntax']),
    (['{root}/bad_name.py'], ["CONFIG {root}/bad_name.py: name 'undefined_name' is not defined"]),
    (['{root}/no_test_set.py'], ['CONFIG {root}/no_test_set.py: no test set']),
    (['{root}/list_grid.py', '--show'],
     ['--show: CONFIG {root}/list_grid.py has no default_hooks.visualization']),
    ([VOC, '--cfg-options', 'test_dataloader.dataset.pipeline.9.scale=1'],
     ['--cfg-options: Index 9 exceeds the length of list']),
    ([VOC, '--launcher', 'pytorch'], ['--launcher pytorch: RANK', 'torchrun']),
    ([VOC, '--cfg-options', *FAST, 'test_dataloader.dataset.data_root={root}/none'],
     [f'CONFIG {VOC} with --cfg-options: test data not found: data_root {{root}}/none does '
      'not exist', 'test_dataloader.dataset.data_root']),
    ([VOC, *VOC_DATA, 'model.prob_thd=5'],
     [f'CONFIG {VOC} with --cfg-options: prob_thd must be a number in [0, 1], got 5.']),
    ([VOC, *VOC_DATA, 'model.nosuchkey=1'], ["unexpected keyword argument 'nosuchkey'"]),
    ([VOC, *VOC_DATA, f'model.name_path={REPO_ROOT}/configs/class_names/voc20.txt'],
     ['the model has 20 classes', 'PascalVOCDataset has 21']),
    ([VOC, *VOC_DATA, 'test_dataloader.dataset.ann_file={root}/empty_split.txt'],
     ['the test dataset PascalVOCDataset is empty', 'empty_split.txt']),
], ids=['config', 'checkpoint', 'work-dir', 'show-dir', 'out', 'folder', 'not-python',
        'syntax', 'name-error', 'no-test-set', 'show-without-hook', 'cfg-options-index',
        'launcher', 'data-root', 'refused-value', 'unknown-key', 'class-count', 'empty-split'])
def test_test_py(argv, expected, files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('DISPLAY', ':0')  # --show needs one
    runner_tool_error(test_tool, 'test.py', argv, expected, files, tmp_path, capsys,
                      monkeypatch)


@pytest.mark.parametrize('argv, expected', [
    ([VOC, '--cfg-options', 'model.prob_thd'],
     "argument --cfg-options: 'model.prob_thd' is not KEY=VALUE, e.g. model.slide_crop=336"),
    ([VOC, '--cfg-options', '=3'],
     "argument --cfg-options: '=3' is not KEY=VALUE, e.g. model.slide_crop=336"),
    ([VOC, '--wait-time', '-1'], 'argument --wait-time: must be >= 0 seconds, got -1'),
])
def test_test_py_argparse(argv, expected, capsys):
    assert argparse_error(test_tool, argv, capsys).endswith(f'error: {expected}')


def test_a_bug_keeps_its_traceback(files, tmp_path, monkeypatch):
    """A TypeError of ours while the runner is built is not a user's mistake."""
    def bug(dataset):
        raise TypeError("'NoneType' object is not subscriptable")

    monkeypatch.setitem(test_tool.checked_runner.__globals__, 'check_not_empty', bug)
    argv = expand([VOC, '--work-dir', str(tmp_path), *VOC_DATA], files)
    with pytest.raises(TypeError, match='not subscriptable'):
        run_main(lambda: test_tool.main(argv))


def test_a_bug_in_config_checks_keeps_its_traceback(monkeypatch):
    def bug(*args, **kwargs):
        raise IndexError('list index out of range')

    monkeypatch.setitem(sweep_tool.main.__globals__, 'grid_points', bug)
    with pytest.raises(IndexError):
        run_main(lambda: sweep_tool.main([VOC, '--grid', 'prob_thd=0.1,0.2']))


# -- tools/sweep.py ----------------------------------------------------------------------
SWEEP = [VOC, '--grid', 'prob_thd=0.1,0.2']


@pytest.mark.parametrize('argv, expected', [
    (['nope.py', '--grid', 'prob_thd=0.1'], ['CONFIG nope.py: no such file']),
    ([VOC], [f'sweep_grid of CONFIG {VOC}: the grid is empty']),
    ([VOC, '--grid', 'prob_thd='], ["--grid 'prob_thd=': expected KEY=V1,V2"]),
    ([VOC, '--grid', 'prob_thd=,'], ["--grid 'prob_thd=,': an empty value"]),
    ([VOC, '--grid', 'prob_thd=0.1,,0.2'], ["--grid 'prob_thd=0.1,,0.2': an empty value"]),
    ([VOC, '--grid', 'slide_crop=224,336'], ["--grid: grid key 'slide_crop' cannot be swept"]),
    ([VOC, '--grid-file', '{root}/nope.py'], ['--grid-file {root}/nope.py: no such file']),
    ([VOC, '--grid-file', '{root}/no_grid.py'],
     ['--grid-file {root}/no_grid.py: expected a Python file defining grid = {{KEY: [values]}}']),
    ([VOC, '--grid-file', '{root}/bad_syntax.py'], ['--grid-file {root}/bad_syntax.py']),
    (['{root}/list_grid.py'],
     ['CONFIG {root}/list_grid.py: sweep_grid must be a dict {{KEY: [values]}}, got list']),
    ([*SWEEP, '--data-root', '{root}/none'], ['--data-root {root}/none: no such folder']),
    ([*SWEEP, '--data-root', '{root}/empty_folder'],
     [f'CONFIG {VOC} with --cfg-options: test data not found: data_root '
      '{root}/empty_folder/VOCdevkit/VOC2012 does not exist', 'give --data-root DIR']),
    ([*SWEEP, '--work-dir', '{file}'], ['--work-dir {file}: exists and is not a folder']),
    ([*SWEEP, '--launcher', 'pytorch'], ['--launcher pytorch: RANK']),
    ([*SWEEP, '--data-root', '{data}', '--cfg-options', *FAST, 'model.prob_thd=7'],
     [f'CONFIG {VOC} with --cfg-options: prob_thd must be a number in [0, 1], got 7.']),
    ([VOC, '--grid', 'ctd_cfg.bogus=1', '--data-root', '{data}'],
     ["--grid: ctd_cfg: unknown key(s) ['bogus']"]),
], ids=['config', 'no-grid', 'no-values', 'empty-value', 'empty-middle-value',
        'refused-key', 'grid-file', 'grid-file-without-grid', 'grid-file-syntax',
        'sweep-grid-not-a-dict',
        'data-root', 'data-folder-missing', 'work-dir', 'launcher', 'refused-value',
        'refused-grid-value'])
def test_sweep_py(argv, expected, files, tmp_path, capsys, monkeypatch):
    for name in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(name, raising=False)
    argv = expand(argv, files)
    if '--work-dir' not in argv:
        argv += ['--work-dir', str(tmp_path / 'work')]
    argv += ['--no-progress']
    if '--cfg-options' not in argv:
        argv += ['--cfg-options', *FAST]
    line = usage_error(sweep_tool, argv, capsys, 'sweep.py')
    for text in expand(expected, files):
        assert text in line


@pytest.mark.parametrize('option', ['--save-every', '--batch-size'])
def test_sweep_py_argparse(option, capsys):
    assert argparse_error(sweep_tool, [*SWEEP, option, '0'], capsys).endswith(
        f'error: argument {option}: must be >= 1, got 0')


def test_sweep_state_that_cannot_be_read_starts_over(tmp_path, log_records):
    """read_state: None for a state file that is not one (a warning names the file) or
    belongs to another sweep (silently); the state itself when it is fine."""
    good = dict(fingerprint='f', batches=2, results=[[], []])
    cases = dict(garbage=b'\x00not a torch file', empty=b'')
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    torch.save(good, tmp_path / 'good')
    (tmp_path / 'truncated').write_bytes((tmp_path / 'good').read_bytes()[:40])
    torch.save([1, 2], tmp_path / 'a_list')
    torch.save(dict(good, results=[[]]), tmp_path / 'one_point')
    torch.save(dict(fingerprint='f'), tmp_path / 'no_batches')
    for name in ('garbage', 'empty', 'truncated', 'a_list', 'one_point', 'no_batches'):
        log_records.clear()
        assert read_state(str(tmp_path / name), 'f', 2) is None, name
        warnings = [r for r in log_records if 'cannot be read' in r]
        assert len(warnings) == 1 and str(tmp_path / name) in warnings[0], log_records
        assert 'starting over' in warnings[0] and '\n' not in warnings[0]
    log_records.clear()
    assert read_state(str(tmp_path / 'good'), 'another sweep', 2) is None
    assert read_state(str(tmp_path / 'good'), 'f', 2) == good
    assert not [r for r in log_records if 'cannot be read' in r]


# -- tools/eval_all.py -------------------------------------------------------------------
@pytest.mark.parametrize('argv, expected', [
    (['--configs', '{root}/nope.py'], ['--configs {root}/nope.py: no such file']),
    (['--configs', '{root}/a/same.py', '{root}/b/same.py'],
     ["--configs {root}/a/same.py {root}/b/same.py: two configs named 'same'"]),
    (['--method', 'naclip', '--work-dir', '{file}'],
     ['--work-dir {file}: exists and is not a folder']),
    (['--method', 'naclip', '--data-root', '{root}/none'],
     ['--data-root {root}/none: no such folder']),
    (['--method', 'naclip', '--data-root', '{file}'], ['--data-root {file}: not a folder']),
    (['--method', 'naclip', '--launcher', 'pytorch'], ['--launcher pytorch: RANK']),
], ids=['config', 'same-stem', 'work-dir', 'data-root', 'data-root-file', 'launcher'])
def test_eval_all_py(argv, expected, files, tmp_path, capsys, monkeypatch):
    runner_tool_error(eval_all, 'eval_all.py', argv, expected, files, tmp_path, capsys,
                      monkeypatch)
    assert not (tmp_path / 'work' / 'voc21').exists()  # nothing ran


def test_eval_all_py_argparse(capsys):
    assert argparse_error(eval_all, ['--method', 'naclip', '--cfg-options', 'x'], capsys) \
        .endswith("error: argument --cfg-options: 'x' is not KEY=VALUE, e.g. "
                  'model.slide_crop=336')


def test_eval_all_reports_an_entrys_mistake_in_one_line(files, tmp_path, capsys):
    """A value the model refuses fails each entry with the one-line message (no type
    name), the entries still run, exit status 1."""
    argv = ['--method', 'naclip', '--benchmarks', 'voc21', 'ade20k', '--data-root',
            str(files['data']), '--work-dir', str(tmp_path), '--no-progress',
            '--cfg-options', *FAST, 'model.prob_thd=5']
    assert run_main(lambda: eval_all.main(argv)) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if 'FAILED' in line]
    assert len(failed) == 2, out
    for line, name in zip(failed, ('voc21', 'ade20k')):
        assert line.startswith(f'[eval_all {failed.index(line) + 1}/2] {name}: FAILED, CONFIG ')
        assert 'with --cfg-options: prob_thd must be a number in [0, 1], got 5.' in line
        assert 'ValueError' not in line and 'UsageError' not in line
        assert (tmp_path / name / 'error.txt').is_file()
    assert 'Traceback' not in out


@pytest.mark.parametrize('content, problem', [
    (b'{"fingerprint": "0123", "metr', 'JSONDecodeError'),
    (b'', 'JSONDecodeError'),
    (b'[1, 2]', 'not a result'),
    (b'{"fingerprint": "0123"}', 'not a result'),
    (b'{"fingerprint": "0123", "metrics": {"mIoU": "high"}, "images": 3}', 'not a result'),
    (b'\xff\xfe{}', 'UnicodeDecodeError'),
    (None, 'IsADirectoryError'),
], ids=['truncated', 'empty', 'a-list', 'no-metrics', 'metric-not-a-number', 'not-utf8',
        'a-folder'])
def test_eval_all_result_that_cannot_be_read_is_evaluated_again(content, problem, tmp_path):
    result_file = tmp_path / 'result.json'
    if content is None:
        result_file.mkdir()
    else:
        result_file.write_bytes(content)
    warnings = []
    assert eval_all.stored_result(result_file, warnings.append) is None
    assert len(warnings) == 1 and '\n' not in warnings[0]
    assert warnings[0].startswith(f'{result_file} cannot be read ({problem}')
    assert warnings[0].endswith('evaluating the entry again')
    good = dict(fingerprint='0123', metrics=dict(mIoU=1.5, mAcc=2, aAcc=3.0), images=3)
    result_file.rmdir() if content is None else result_file.unlink()
    eval_all.write_json(result_file, good)
    assert eval_all.stored_result(result_file, warnings.append) == good and len(warnings) == 1


# -- tools/check_data.py -----------------------------------------------------------------
@pytest.mark.parametrize('argv, expected', [
    (['nope.py'], ['CONFIG nope.py: no such file']),
    ([VOC, 'nope.py'], ['CONFIG nope.py: no such file']),
    (['--method', 'naclip', '--data-root', '{root}/none'],
     ['--data-root {root}/none: no such folder']),
    (['{root}/bad_syntax.py'], ['CONFIG {root}/bad_syntax.py: invalid syntax']),
    (['{root}/no_test_set.py'], ['CONFIG {root}/no_test_set.py: no test set']),
    ([VOC, '--data-root', '{data}', '--cfg-options', 'test_dataloader.dataset.type=Nope'],
     [f'CONFIG {VOC}: Nope is not in the mmseg::dataset registry']),
], ids=['config', 'second-config', 'data-root', 'syntax', 'no-test-set', 'dataset-type'])
def test_check_data_py(argv, expected, files, capsys):
    line = usage_error(check_data, expand(argv, files), capsys, 'check_data.py')
    for text in expand(expected, files):
        assert text in line


@pytest.mark.parametrize('argv, expected', [
    (['--method', 'naclip', '--nproc', '0'], 'argument --nproc: must be >= 1, got 0'),
    ([], 'give CONFIG files or --method'),
    ([VOC, '--cfg-options', 'foo'], "argument --cfg-options: 'foo' is not KEY=VALUE"),
])
def test_check_data_py_argparse(argv, expected, capsys):
    assert expected in argparse_error(check_data, argv, capsys)


# -- tools/fabricate_benchmarks.py -------------------------------------------------------
@pytest.mark.parametrize('argv, expected', [
    (['{file}'], ['OUT {file}: exists and is not a folder']),
    (['{file}/below'], ['{file}/below/VOCdevkit/VOC2012/JPEGImages: Not a directory']),
], ids=['a-file', 'below-a-file'])
def test_fabricate_benchmarks_py(argv, expected, files, capsys):
    line = usage_error(fabricate_benchmarks, expand(argv, files), capsys,
                       'fabricate_benchmarks.py')
    for text in expand(expected, files):
        assert text in line


@pytest.mark.parametrize('option, value, expected', [
    ('--images', '0', 'argument --images: must be >= 1, got 0'),
    ('--seed', '-1', 'argument --seed: must be >= 0, got -1'),
])
def test_fabricate_benchmarks_py_argparse(option, value, expected, tmp_path, capsys):
    assert argparse_error(fabricate_benchmarks, [str(tmp_path), option, value],
                          capsys).endswith(expected)
    assert not list(tmp_path.iterdir())


# -- tools/ablate.py ---------------------------------------------------------------------
CAMVID_SET = str(REPO_ROOT / 'configs/ablation/camvid')


@pytest.mark.parametrize('argv, expected', [
    (['{root}/nope'], ['ABLATION_SET {root}/nope: no such folder or config file']),
    (['{root}/empty_folder'], ['ABLATION_SET {root}/empty_folder: a folder without config']),
    ([CAMVID_SET, '--work-dir', '{file}'], ['--work-dir {file}: exists and is not a folder']),
    ([CAMVID_SET, '{root}/bad_name.py'], ["CONFIG {root}/bad_name.py: name 'undefined_name'"]),
    ([CAMVID_SET, '--cfg-options', *FAST, 'test_dataloader.dataset.data_root={root}/none'],
     ['with --cfg-options: test data not found: data_root {root}/none does not exist']),
    ([CAMVID_SET, '--cfg-options', *FAST, f'test_dataloader.dataset.data_root={camvid_root()}',
      'model.logit_scale=-1'], ['with --cfg-options: logit_scale must be a number']),
], ids=['missing', 'empty-folder', 'work-dir', 'broken-config', 'data-root', 'refused-value'])
def test_ablate_py(argv, expected, files, tmp_path, capsys):
    argv = expand(argv, files)
    if '--work-dir' not in argv:
        argv += ['--work-dir', str(tmp_path / 'work')]
    line = usage_error(ablate, argv + ['--no-progress'], capsys, 'ablate.py')
    for text in expand(expected, files):
        assert text in line
    assert not (tmp_path / 'work' / 'ablation.md').exists()


# -- as a user starts them ---------------------------------------------------------------
@pytest.mark.parametrize('argv, expected', [
    (['tools/test.py', 'nope.py'], 'test.py: error: CONFIG nope.py: no such file'),
    (['tools/sweep.py', VOC, '--grid', 'prob_thd=0.1', '--data-root', '{root}/empty_folder',
      '--work-dir', '{root}/sweep', '--cfg-options', *FAST],
     f'sweep.py: error: CONFIG {VOC} with --cfg-options: test data not found: data_root '
     '{root}/empty_folder/VOCdevkit/VOC2012 does not exist'),
], ids=['test.py', 'sweep.py'])
def test_command_line(argv, expected, files):
    run = subprocess.run([sys.executable, *expand(argv, files)], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=300)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == USAGE_EXIT_CODE, run.stderr[-3000:]
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(expand([expected], files)[0])
