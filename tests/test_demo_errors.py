"""tools/demo.py on bad input: one line on stderr naming the argument or file, exit code 2,
no traceback; and distinct outputs for inputs that share a file stem. Runs the tool
in-process (tiny random CLIP)."""
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT, load_tool
from mmseg_selfattn.cli import run_main

TINY = ['--pretrained', 'none', '--device', 'cpu', '--classes', 'sky;tree;person',
        '--cfg-options', 'model.clip.arch=ViT-Tiny-8-test',
        'model.similarity_enhancement_cfg.layer=-2']


@pytest.fixture(scope='module')
def demo():
    return load_tool('demo', 'demo_tool')


@pytest.fixture(autouse=True)
def no_logging_errors(monkeypatch):
    """mmengine's logger keeps writing to the sys.stdout of the test that made it, closed
    since: without this, logging prints 'Logging error' tracebacks on stderr."""
    monkeypatch.setattr(logging, 'raiseExceptions', False)


def usage_error(demo, capsys, *args: str) -> str:
    """The one stderr line of a demo run that stops on a mistake (exit code 2)."""
    capsys.readouterr()
    assert run_main(lambda: demo.main(list(args)), prog='demo.py') == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and 'Traceback' not in err, err
    assert lines[0].startswith('demo.py: error: ')
    return lines[0].removeprefix('demo.py: error: ')


def save_image(path: Path, seed: int = 0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 32, 3), np.uint8)).save(
        path)
    return str(path)


@pytest.mark.parametrize('value', ['1.5', '-0.1', 'nan', 'inf', 'half'])
def test_opacity_outside_0_1_is_an_argument_error(demo, monkeypatch, capsys, value):
    monkeypatch.setattr(sys, 'argv', ['demo.py', '--opacity', value])
    with pytest.raises(SystemExit) as exit_info:
        demo.parse_args()
    assert exit_info.value.code == 2
    assert f"argument --opacity: '{value}' is not a number in [0, 1]" in capsys.readouterr().err


def test_opacity_bounds_are_accepted(demo, monkeypatch):
    for value in ('0', '1', '0.25'):
        monkeypatch.setattr(sys, 'argv', ['demo.py', '--opacity', value])
        assert demo.parse_args().opacity == float(value)


@pytest.mark.parametrize('content, message', [
    (None, 'no such file'), (b'', 'not a readable image (0 bytes)')])
def test_missing_or_empty_image_fails_before_the_model_loads(demo, monkeypatch, capsys,
                                                              tmp_path, content, message):
    image = tmp_path / 'photo.jpg'
    if content is not None:
        image.write_bytes(content)
    monkeypatch.setattr(demo, 'init_model', None)  # never reached
    assert usage_error(demo, capsys, str(image), '--out-dir', str(tmp_path / 'out')) == \
        f'IMAGE {image}: {message}'


def test_corrupt_image_stops_with_one_line_naming_it(demo, capsys, tmp_path):
    image = tmp_path / 'photo.jpg'
    image.write_bytes(b'not an image at all')
    assert usage_error(demo, capsys, str(image), '--out-dir', str(tmp_path / 'out'), *TINY) \
        == f'{image}: not a readable image (19 bytes that cv2 cannot decode)'


CLASSES_HELP = "give classes separated by ';', synonyms of a class by ','"


@pytest.mark.parametrize('classes, message', [
    ('', "--classes '': no class names; " + CLASSES_HELP),
    (';;', "--classes ';;': no class names; " + CLASSES_HELP),
    (' , ;', "--classes ' , ;': no class names; " + CLASSES_HELP),
    ('sky;;road', "--classes 'sky;;road': class 2 is empty (nothing between two ';'); "
     + CLASSES_HELP),
    ('sky;road;Sky', "--classes 'sky;road;Sky', classes 1 and 3 both name the class 'Sky': "
     "merge them into one class (synonyms separated by ',')."),
])
def test_classes_without_a_class_name_the_option(demo, monkeypatch, capsys, tmp_path, classes,
                                                  message):
    monkeypatch.setattr(demo, 'init_model', None)  # fails before the model loads
    line = usage_error(demo, capsys, '--classes', classes, '--out-dir', str(tmp_path / 'out'))
    assert line.startswith(message) and 'classes.txt' not in line
    assert not (tmp_path / 'out').exists()  # nothing written


def test_a_last_semicolon_is_no_empty_class(demo):
    assert demo.class_lines('sky;tree,forest;') == ['sky', 'tree,forest']


def write(path: Path, content: bytes) -> str:
    path.write_bytes(content)
    return str(path)


def error_cases(tmp_path: Path):
    """(arguments, the error line or a regex of it) of mistakes found before the model
    loads, or while it is built from the config."""
    image = save_image(tmp_path / 'photo.png')
    out = str(tmp_path / 'out')
    a_file = write(tmp_path / 'notes.txt', b'sky\n')
    tiny_model = ['--pretrained', 'none', '--device', 'cpu', '--classes', 'sky;road',
                  '--cfg-options', 'model.clip.arch=ViT-Tiny-8-test']
    no_classes = TINY[:4] + TINY[6:]  # the tiny model, classes from --class-file
    return [
        (['--config', str(tmp_path / 'nope.py')], f'--config {tmp_path / "nope.py"}: no such file'),
        (['--config', a_file], f'--config {a_file}: Only py/yml/yaml/json type are supported now!'),
        ([image, '--out-dir', a_file], f'--out-dir {a_file}: exists and is not a folder'),
        ([image, '--out-dir', f'{a_file}/sub'],
         f'--out-dir {a_file}/sub: {a_file} is not a folder'),
        ([image, '--class-file', str(tmp_path / 'none.txt')],
         f'--class-file {tmp_path / "none.txt"}: no such file'),
        ([image, '--out-dir', out, '--class-file', write(tmp_path / 'empty.txt', b''),
          *no_classes],
         f'--class-file {tmp_path / "empty.txt"}: the class list is empty: give one class per '
         "line, synonyms separated by ',' or ';'."),
        ([image, '--out-dir', out, '--class-file', write(tmp_path / 'latin.txt', b'caf\xe9\n'),
          *no_classes],
         f'--class-file {tmp_path / "latin.txt"} is not UTF-8 text: byte 0xe9 on line 1, '
         'column 4; save the file as UTF-8.'),
        ([image, '--pretrained', str(tmp_path / 'w.pt')],
         f'--pretrained {tmp_path / "w.pt"}: no such file, and not an open_clip tag; give a '
         "checkpoint file, a tag such as openai, or 'none' for random weights"),
        ([image, '--out-dir', out, *tiny_model[2:], '--pretrained', a_file, *tiny_model[6:],
          'model.similarity_enhancement_cfg.layer=-2'],
         re.compile(rf"clip\.pretrained='{re.escape(a_file)}' could not be read as a tensor "
                    r'state dict \(.*\): the file is truncated or corrupt\..*')),
        ([image, '--out-dir', out, *tiny_model, 'model.similarity_enhancement_cfg.layer=-2',
          'model.slide_crop=-5'],
         '--cfg-options model.slide_crop=-5: slide_crop must be an int >= 0, got -5.'),
        ([image, '--out-dir', out, *tiny_model, 'model.similarity_enhancement_cfg.layer=-2',
          'model.crop_size=224'],
         "--cfg-options model.crop_size=224: SelfAttnCLIPSegmentor.__init__() got an "
         "unexpected keyword argument 'crop_size'"),
        ([image, '--out-dir', out, *tiny_model],  # the config's layer -4 of 3 blocks
         re.compile(r'--config \S+selfattn-full_vit-b16_voc21\.py: '
                    r'similarity_enhancement_cfg\.layer: mid layer -4 is out of range: .*')),
        ([image, '--out-dir', out, *tiny_model, 'model.slide_crop.size=3'],
         re.compile(r"--cfg-options: slide_crop=\{'size': 3\} in child config cannot inherit "
                    'from base .*')),
        ([image, '--config', str(REPO_ROOT / 'configs/_base_/datasets/voc21.py')],
         re.compile(r'--config \S+voc21\.py: not a segmentor config of this package \(it has '
                    r'no model\.clip\); give e\.g\. configs/selfattn/\S+\.py')),
    ]


def test_each_mistake_is_one_line_naming_its_argument(demo, capsys, tmp_path):
    for args, expected in error_cases(tmp_path):
        line = usage_error(demo, capsys, *args)
        if isinstance(expected, str):
            assert line == expected, args
        else:
            assert expected.fullmatch(line), (args, line)


@pytest.mark.parametrize('option, value, message', [
    ('--device', 'gpu', "'gpu' is not a device: use cpu, cuda or cuda:N"),
    ('--cfg-options', 'model.slide_crop', "'model.slide_crop' is not KEY=VALUE, "
     'e.g. model.slide_crop=336'),
    ('--cfg-options', '=3', "'=3' is not KEY=VALUE, e.g. model.slide_crop=336"),
])
def test_argparse_errors_name_the_argument(demo, capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        demo.main([option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].endswith(f'error: argument {option}: {message}')
    assert 'Traceback' not in err


def test_cuda_without_a_gpu_is_an_argument_error(demo, monkeypatch, capsys):
    monkeypatch.setattr(demo.torch.cuda, 'device_count', lambda: 0)
    with pytest.raises(SystemExit):
        demo.main(['--device', 'cuda'])
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "error: argument --device: 'cuda': no CUDA GPU is visible here; use cpu")


def test_a_bug_keeps_its_traceback(demo, monkeypatch, tmp_path):
    """A TypeError of the package's own (not a key the user set) is not a user mistake."""
    def broken(*args, **kwargs):
        raise TypeError("resize() got an unexpected keyword argument 'antialias'")

    monkeypatch.setattr(demo, 'init_model', broken)
    with pytest.raises(TypeError, match='antialias'):
        run_main(lambda: demo.main([save_image(tmp_path / 'photo.png'), '--out-dir',
                                    str(tmp_path / 'out'), *TINY]))
    monkeypatch.setattr(demo, 'init_model', lambda *args, **kwargs: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        run_main(lambda: demo.main([save_image(tmp_path / 'photo.png'), '--out-dir',
                                    str(tmp_path / 'out'), *TINY]))


def test_the_script_prints_one_line_and_exits_2(monkeypatch, capsys, tmp_path):
    """``python tools/demo.py --classes ''``, in-process: the ``__main__`` block."""
    import runpy
    monkeypatch.setattr(sys, 'argv', ['tools/demo.py', '--classes', '', '--out-dir',
                                      str(tmp_path / 'out')])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO_ROOT / 'tools/demo.py'), run_name='__main__')
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "demo.py: error: --classes '': no class names; give classes separated by ';', "
        "synonyms of a class by ',', e.g. 'background;cat,kitten;dog'\n")


def test_overlay_names_are_unique(demo):
    names = demo.overlay_names(['a/img.jpg', 'b/img.png', 'x/a/img.bmp', 'cat.jpg', 'cat.jpg',
                                'dog.jpg'])
    assert names == ['img_a_overlay.png', 'img_b_overlay.png', 'img_a_2_overlay.png',
                     'cat_overlay.png', 'cat_2_overlay.png', 'dog_overlay.png']


def test_inputs_with_the_same_stem_give_distinct_overlays(demo, tmp_path):
    first = save_image(tmp_path / 'a' / 'img.jpg', seed=0)
    second = save_image(tmp_path / 'b' / 'img.png', seed=1)
    out_dir = tmp_path / 'out'
    assert demo.main([first, second, '--out-dir', str(out_dir), *TINY]) == 0
    overlays = sorted(path.name for path in out_dir.glob('*_overlay.png'))
    assert overlays == ['img_a_overlay.png', 'img_b_overlay.png']
