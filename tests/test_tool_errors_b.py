"""tools/benchmark.py, benchmark_sweep.py and peak_memory.py on a user's mistake: one line on
stderr naming the argument or file, exit code 2, no traceback; a bug keeps its traceback.
In-process (tiny random CLIP where a model is built), and each ``__main__`` block once."""
import logging
import runpy
import sys

import pytest

from conftest import REPO_ROOT, camvid_root, load_tool
from mmseg_selfattn.cli import run_main

TOOLS = {name: load_tool(name, f'{name}_tool')
         for name in ('benchmark', 'benchmark_sweep', 'peak_memory')}
CAMVID = str(REPO_ROOT / 'configs/selfattn/selfattn-full_vit-b16_camvid.py')
VOC = REPO_ROOT / 'configs/selfattn/selfattn-full_vit-b16_voc21.py'
TINY = ['model.clip.arch=ViT-Tiny-8-test', 'model.clip.pretrained=None',
        'model.similarity_enhancement_cfg.layer=-2']


@pytest.fixture(autouse=True)
def no_logging_errors(monkeypatch):
    """mmengine's logger keeps writing to the sys.stdout of the test that made it, closed
    since: without this, logging prints 'Logging error' tracebacks on stderr."""
    monkeypatch.setattr(logging, 'raiseExceptions', False)


def usage_error(capsys, tool: str, *args: str) -> str:
    capsys.readouterr()
    assert run_main(lambda: TOOLS[tool].main(list(args)), prog=f'{tool}.py') == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and 'Traceback' not in err, err
    assert lines[0].startswith(f'{tool}.py: error: ')
    return lines[0].removeprefix(f'{tool}.py: error: ')


def test_benchmark_mistakes(capsys, tmp_path):
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'photos').mkdir()
    (tmp_path / 'photos' / 'a.jpg').write_bytes(b'not a jpeg')
    cpu = ['--device', 'cpu', '--cfg-options', *TINY]
    cases = [
        (['--config', str(tmp_path / 'nope.py')], f'--config {tmp_path / "nope.py"}: no such file'),
        (['--image-dir', str(tmp_path / 'nope')],
         f'--image-dir {tmp_path / "nope"}: no such folder'),
        (['--image-dir', str(tmp_path / 'empty')],
         f'--image-dir {tmp_path / "empty"}: no images in this folder (looked for *.jpg, *.jpeg, '
         '*.png, *.bmp, *.tif, *.tiff, *.webp)'),
        (['--image-dir', str(tmp_path / 'photos'), *cpu],
         f'--image-dir {tmp_path / "photos"}: {tmp_path / "photos" / "a.jpg"} is not a readable '
         'image'),
        (['--latency-images', '9'], '--latency-images 9: at most --num-images (8)'),
        (['--json', str(tmp_path)], f'--json {tmp_path}: is a folder; give a file path'),
        (['--json', str(tmp_path / 'no' / 'out.json')],
         f'--json {tmp_path / "no" / "out.json"}: no such folder {tmp_path / "no"}'),
        (['--pretrained', 'w.pt'], "--pretrained w.pt: no such file, and not an open_clip tag; "
         "give a checkpoint file, a tag such as openai, or 'none' for random weights"),
        ([*cpu, 'model.slide_crop=-5'], f'the model of --config {VOC} with --cfg-options: '
         'slide_crop must be an int >= 0, got -5.'),
    ]
    for args, expected in cases:
        assert usage_error(capsys, 'benchmark', *args) == expected, args


def test_benchmark_sweep_mistakes(capsys, tmp_path):
    (tmp_path / 'a_file').write_text('')
    grid = ['--grid', 'apply_ctd=True,False']
    data = f'test_dataloader.dataset.data_root={camvid_root()}'
    work = ['--work-dir', str(tmp_path / 'work')]
    cases = [
        ([str(tmp_path / 'nope.py'), *grid], f'CONFIG {tmp_path / "nope.py"}: no such file'),
        ([CAMVID, '--grid', 'apply_ctd'], "--grid 'apply_ctd': expected KEY=V1,V2,... "
         '(e.g. self_attn_enhancement_cfg.enhancement_strength=0.05,0.1)'),
        ([CAMVID, '--grid', 'apply_ctd='], "--grid 'apply_ctd=': expected KEY=V1,V2,... "
         '(e.g. self_attn_enhancement_cfg.enhancement_strength=0.05,0.1)'),
        ([CAMVID, '--grid', 'slide_crop=224,336'], "--grid: grid key 'slide_crop' cannot be "
         'swept in one pass: the sliding window decides which crops the encoder sees. Run one '
         'evaluation (or one sweep) per value instead.'),
        ([CAMVID, *grid, '--work-dir', str(tmp_path / 'a_file')],
         f'--work-dir {tmp_path / "a_file"}: exists and is not a folder'),
        ([CAMVID, *grid, '--json', str(tmp_path)],
         f'--json {tmp_path}: is a folder; give a file path'),
        ([CAMVID, *grid, *work, '--cfg-options', *TINY,
          f'test_dataloader.dataset.data_root={tmp_path / "nowhere"}'],
         f'the test set of CONFIG {CAMVID}: {tmp_path / "nowhere" / "images" / "val"}: '
         'No such file or directory'),
        ([CAMVID, '--grid', 'ctd_cfg.eps=-1,0.2', *work, '--cfg-options', *TINY, data],
         '--grid: ctd_cfg.eps must be a number in (0, 2], got -1.'),
        ([CAMVID, *grid, *work, '--cfg-options', *TINY, data, 'model.slide_crop=-1'],
         f'the model of CONFIG {CAMVID} with --cfg-options: slide_crop must be an int >= 0, '
         'got -1.'),
    ]
    for args, expected in cases:
        assert usage_error(capsys, 'benchmark_sweep', *args) == expected, args


def test_peak_memory_mistakes(capsys, tmp_path):
    cases = [
        (['--config', str(tmp_path / 'nope.py')], f'--config {tmp_path / "nope.py"}: no such file'),
        (['--json', str(tmp_path)], f'--json {tmp_path}: is a folder; give a file path'),
        (['--json', str(tmp_path / 'no' / 'r.jsonl')],
         f'--json {tmp_path / "no" / "r.jsonl"}: no such folder {tmp_path / "no"}'),
        (['--device', 'cpu', '--size', '40', '50', '--cfg-options', *TINY, 'model.slide_crop=-1'],
         f'the model of --config {VOC} with --cfg-options: slide_crop must be an int >= 0, '
         'got -1.'),
    ]
    for args, expected in cases:
        assert usage_error(capsys, 'peak_memory', *args) == expected, args


@pytest.mark.parametrize('tool, args, message', [
    ('benchmark', ['--num-images', '0'], "argument --num-images: '0' is not an integer >= 1"),
    ('benchmark', ['--batch-sizes', '8', 'x'], "argument --batch-sizes: 'x' is not an integer "
     '>= 1'),
    ('benchmark', ['--image-size', '0', '5'], "argument --image-size: '0' is not an integer >= 1"),
    ('benchmark', ['--device', 'gpu'], "argument --device: 'gpu' is not a device: use cpu, cuda "
     'or cuda:N'),
    ('benchmark', ['--cfg-options', 'x'], "argument --cfg-options: 'x' is not KEY=VALUE, e.g. "
     'model.slide_crop=336'),
    ('benchmark_sweep', [CAMVID, '--grid', 'apply_ctd=True', '--separate', '0'],
     "argument --separate: '0' is neither 'all' nor a positive integer"),
    ('peak_memory', ['--size', '0', '10'], "argument --size: '0' is not a positive integer"),
    ('peak_memory', ['--precision', 'fp8'], "argument --precision: invalid choice: 'fp8'"),
])
def test_argparse_errors_name_the_argument(capsys, tool, args, message):
    with pytest.raises(SystemExit) as exit_info:
        TOOLS[tool].main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f'error: {message}' in err.splitlines()[-1] and 'Traceback' not in err


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(*args, **kwargs):
        raise TypeError("measure() got an unexpected keyword argument 'precision'")

    monkeypatch.setattr(TOOLS['benchmark'], 'measure', broken)
    with pytest.raises(TypeError, match='precision'):
        run_main(lambda: TOOLS['benchmark'].main(['--device', 'cpu']))


@pytest.mark.parametrize('tool, args, message', [
    ('benchmark', ['--config', 'nope.py'], '--config nope.py: no such file'),
    ('benchmark_sweep', ['nope.py', '--grid', 'apply_ctd=True'], 'CONFIG nope.py: no such file'),
    ('peak_memory', ['--config', 'nope.py'], '--config nope.py: no such file'),
    ('analyze_attention', ['nope.py'], 'CONFIG nope.py: no such file'),
])
def test_the_scripts_print_one_line_and_exit_2(monkeypatch, capsys, tool, args, message):
    """``python tools/<tool>.py ...``, in-process: the ``__main__`` block."""
    monkeypatch.setattr(sys, 'argv', [f'tools/{tool}.py', *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO_ROOT / 'tools' / f'{tool}.py'), run_name='__main__')
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f'{tool}.py: error: {message}\n'
