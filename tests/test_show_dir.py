"""tools/test.py --show-dir: one picture per test image, photo | ground truth | prediction
painted with the dataset's palette (mmseg_selfattn/visualization.py)."""
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT, TINY_ARCH, camvid_root, load_tool
from mmseg_selfattn.datasets import CamVidDataset
from mmseg_selfattn.visualization import picture_names, random_weights, render_sample

CAMVID_CONFIG = REPO_ROOT / 'configs/selfattn/selfattn_vit-b16_camvid.py'


def load_test_tool():
    return load_tool('test', 'tools_test')  # not 'test': the standard library's package


def paint(labels: np.ndarray, palette) -> np.ndarray:
    """The expected panel: palette colours, black where the label is no class."""
    painted = np.zeros(labels.shape + (3, ), np.uint8)
    for label, colour in enumerate(palette):
        painted[labels == label] = colour
    return painted


def locate(picture: np.ndarray, panel: np.ndarray, rows, columns):
    """(top, left) of the first place where ``panel`` appears in ``picture`` unchanged."""
    height, width = panel.shape[:2]
    for top in rows:
        for left in columns:
            window = picture[top:top + height, left:left + width]
            if window.shape == panel.shape and np.array_equal(window[0], panel[0]) \
                    and np.array_equal(window, panel):
                return top, left
    raise AssertionError('panel not found in the picture')


def assert_side_by_side(picture: np.ndarray, image: np.ndarray, gt_panel: np.ndarray,
                        pred_panel: np.ndarray) -> None:
    """The photo, then the GT panel, then the prediction panel: all unscaled, same rows."""
    height, width = image.shape[:2]
    top, left = locate(picture, image, range(picture.shape[0] - height + 1), range(64))
    right_of = range(left + width, picture.shape[1] - width + 1)
    _, gt_left = locate(picture, gt_panel, [top], right_of)
    _, pred_left = locate(picture, pred_panel, [top], range(gt_left + width,
                                                            picture.shape[1] - width + 1))
    assert left + width <= gt_left and gt_left + width <= pred_left


def test_show_dir_writes_one_picture_per_image(tmp_path, monkeypatch, capsys):
    root, vis, preds = camvid_root(), tmp_path / 'vis', tmp_path / 'preds'
    monkeypatch.setenv('LOCAL_RANK', '0')
    monkeypatch.setattr(sys, 'argv', [
        'test.py', str(CAMVID_CONFIG), '--work-dir', str(tmp_path / 'work'), '--show-dir',
        str(vis), '--out', str(preds), '--no-progress', '--cfg-options',
        f'model.clip.arch={TINY_ARCH}', 'model.clip.pretrained=None',
        f'test_dataloader.dataset.data_root={root}', 'test_dataloader.dataset.indices=3',
        'test_dataloader.num_workers=0', 'test_dataloader.persistent_workers=False'])
    load_test_tool().main()
    assert '3/3 images' not in capsys.readouterr().err  # --no-progress

    stems = [path.stem for path in sorted((root / 'images/val').glob('*.png'))[:3]]
    assert sorted(path.name for path in vis.iterdir()) == [f'{stem}.png' for stem in stems]
    palette = CamVidDataset.METAINFO['palette']
    for stem in stems:
        image = np.asarray(Image.open(root / 'images/val' / f'{stem}.png').convert('RGB'))
        gt = np.asarray(Image.open(root / 'annotations/val' / f'{stem}.png'))
        gt = np.where(gt == CamVidDataset.UNLABELLED, 255, gt)
        pred = np.asarray(Image.open(preds / f'{stem}.png'))
        assert gt.shape == pred.shape == image.shape[:2] == (360, 480)
        assert (gt == 255).any()  # black in the GT panel
        picture = np.asarray(Image.open(vis / f'{stem}.png'))
        assert picture.ndim == 3 and picture.shape[2] == 3
        assert_side_by_side(picture, image, paint(gt, palette), paint(pred, palette))


def test_render_sample_panels_and_legend():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 40, 3), np.uint8)
    gt = np.zeros((30, 40), np.int64)
    gt[10:, :] = 1
    gt[:, :5] = 255
    pred = np.full((30, 40), 2)
    pred[:15, 20:] = 1
    classes = ('red', 'green', 'blue', 'yellow')
    palette = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]]
    picture = render_sample(image, gt, pred, classes, palette, 'sample.png  [random weights]')

    assert picture.dtype == np.uint8 and picture.shape[2] == 3
    assert_side_by_side(picture, image, paint(gt, palette), paint(pred, palette))
    top, _ = locate(picture, image, range(picture.shape[0] - 29), range(64))
    legend = picture[top + 30:]

    def shown(colour):
        return np.all(legend == colour, axis=-1).any()

    assert all(shown(colour) for colour in palette[:3])  # in GT or prediction
    assert not shown(palette[3])  # in neither


def test_render_sample_refuses_label_maps_of_another_size():
    image = np.zeros((30, 40, 3), np.uint8)
    with pytest.raises(ValueError, match=r'ground truth is 15x20 but the image 30x40'):
        render_sample(image, np.zeros((15, 20), int), np.zeros((30, 40), int), ('a', ),
                      [[1, 2, 3]])


def test_picture_names_are_unique():
    assert picture_names(['a/x.png', 'b/x.jpg', 'c/y.png', 'd/x.png']) == {
        'a/x.png': 'x.png', 'b/x.jpg': 'x_2.png', 'c/y.png': 'y.png', 'd/x.png': 'x_3.png'}


def test_random_weights():
    assert random_weights(dict(clip=dict(arch=TINY_ARCH, pretrained=None)))
    assert random_weights(dict(clip=dict(pretrained='None')))
    assert not random_weights(dict(clip=dict(pretrained='openai')))
    assert not random_weights(dict(type='OracleSegmentor'))


def test_show_without_display_fails_clearly(monkeypatch):
    monkeypatch.setattr(sys, 'platform', 'linux')
    monkeypatch.delenv('DISPLAY', raising=False)
    monkeypatch.delenv('WAYLAND_DISPLAY', raising=False)
    monkeypatch.setenv('LOCAL_RANK', '0')
    monkeypatch.setattr(sys, 'argv', ['test.py', str(CAMVID_CONFIG), '--show'])
    with pytest.raises(SystemExit) as exit_info:
        load_test_tool().parse_args()
    assert exit_info.value.code == 2
