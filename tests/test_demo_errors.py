"""tools/demo.py on bad input: one clear line naming the argument or file, and distinct
outputs for inputs that share a file stem. Runs the tool in-process (tiny random CLIP)."""
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import load_tool

TINY = ['--pretrained', 'none', '--device', 'cpu', '--classes', 'sky;tree;person',
        '--cfg-options', 'model.clip.arch=ViT-Tiny-8-test',
        'model.similarity_enhancement_cfg.layer=-2']


@pytest.fixture(scope='module')
def demo():
    return load_tool('demo', 'demo_tool')


def run_demo(demo, monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, 'argv', ['demo.py', *args])
    demo.main()


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
    monkeypatch.setattr(sys, 'argv', ['demo.py', str(image)])
    with pytest.raises(SystemExit):
        demo.parse_args()
    assert f'error: IMAGE {image}: {message}' in capsys.readouterr().err


def test_corrupt_image_stops_with_one_line_naming_it(demo, monkeypatch, tmp_path):
    image = tmp_path / 'photo.jpg'
    image.write_bytes(b'not an image at all')
    with pytest.raises(SystemExit, match=rf'^error: {image}: not a readable image \(19 bytes '
                                         r'that cv2 cannot decode\)$'):
        run_demo(demo, monkeypatch, str(image), '--out-dir', str(tmp_path / 'out'), *TINY)


def test_overlay_names_are_unique(demo):
    names = demo.overlay_names(['a/img.jpg', 'b/img.png', 'x/a/img.bmp', 'cat.jpg', 'cat.jpg',
                                'dog.jpg'])
    assert names == ['img_a_overlay.png', 'img_b_overlay.png', 'img_a_2_overlay.png',
                     'cat_overlay.png', 'cat_2_overlay.png', 'dog_overlay.png']


def test_inputs_with_the_same_stem_give_distinct_overlays(demo, monkeypatch, tmp_path):
    first = save_image(tmp_path / 'a' / 'img.jpg', seed=0)
    second = save_image(tmp_path / 'b' / 'img.png', seed=1)
    out_dir = tmp_path / 'out'
    run_demo(demo, monkeypatch, first, second, '--out-dir', str(out_dir), *TINY)
    overlays = sorted(path.name for path in out_dir.glob('*_overlay.png'))
    assert overlays == ['img_a_overlay.png', 'img_b_overlay.png']
