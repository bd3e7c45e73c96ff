"""tools/fabricate_benchmarks.py --real-sizes, --real-counts, --benchmarks, --workers:
real formats and size distributions, label maps in the benchmarks' encodings, files that
do not depend on the number of processes, one-line argument errors."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import load_tool

fabricate_benchmarks = load_tool('fabricate_benchmarks')  # Pool workers pickle by name


def is_voc_size(width: int, height: int) -> bool:
    """A size of VOC_SIZES: one side 500, the other in [250, 500]."""
    return max(width, height) == 500 and 250 <= min(width, height) <= 500


def files_of(root: Path) -> dict:
    return {path.relative_to(root): path.read_bytes()
            for path in sorted(root.rglob('*')) if path.is_file()}


@pytest.fixture(scope='module')
def voc_and_cityscapes(tmp_path_factory):
    """The CLI's --benchmarks voc21 cityscapes --images 4 --real-sizes, and its output."""
    out = tmp_path_factory.mktemp('real')
    fabricate_benchmarks.main([str(out), '--benchmarks', 'voc21', 'cityscapes',
                               '--images', '4', '--real-sizes', '--workers', '2'])
    return out


def test_only_the_roots_of_the_benchmarks_given(voc_and_cityscapes):
    assert sorted(path.name for path in voc_and_cityscapes.iterdir()) == [
        'VOCdevkit', 'cityscapes']
    assert [path.name for path in (voc_and_cityscapes / 'VOCdevkit').iterdir()] == ['VOC2012']


def test_voc_jpegs_at_real_sizes_with_palette_labels(voc_and_cityscapes):
    root = voc_and_cityscapes / 'VOCdevkit' / 'VOC2012'
    names = (root / 'ImageSets/Segmentation/val.txt').read_text().split()
    assert names == [f'2008_{i:06d}' for i in range(4)]
    for name in names:
        image = Image.open(root / 'JPEGImages' / f'{name}.jpg')
        label = Image.open(root / 'SegmentationClass' / f'{name}.png')
        assert image.format == 'JPEG' and image.mode == 'RGB'
        assert is_voc_size(*image.size), image.size
        assert 30_000 < (root / 'JPEGImages' / f'{name}.jpg').stat().st_size < 300_000
        assert label.format == 'PNG' and label.mode == 'P' and label.size == image.size
        values = np.unique(np.array(label))
        assert set(values.tolist()) <= set(range(21)) | {255}
        assert 255 in values and len(values) > 2  # void frame, several regions


def test_cityscapes_pngs_at_2048x1024(voc_and_cityscapes):
    images = sorted((voc_and_cityscapes / 'cityscapes/leftImg8bit/val').rglob('*.png'))
    assert len(images) == 4
    for path in images:
        image = Image.open(path)
        assert image.format == 'PNG' and image.mode == 'RGB' and image.size == (2048, 1024)
        stem = path.name.replace('_leftImg8bit.png', '')
        label_dir = voc_and_cityscapes / 'cityscapes/gtFine/val' / path.parent.name
        label = np.array(Image.open(label_dir / f'{stem}_gtFine_labelTrainIds.png'))
        assert label.shape == (1024, 2048)
        assert set(np.unique(label).tolist()) <= set(range(19)) | {255}
        raw = np.array(Image.open(label_dir / f'{stem}_gtFine_labelIds.png'))
        assert raw.shape == (1024, 2048) and raw.max() < 34


def test_files_do_not_depend_on_workers_nor_on_other_roots(tmp_path):
    kwargs = dict(num_images=5, seed=3, real_sizes=True)
    one = fabricate_benchmarks.fabricate(tmp_path / 'one', benchmarks=['voc21', 'ade20k'],
                                         workers=1, **kwargs)
    two = fabricate_benchmarks.fabricate(tmp_path / 'two', benchmarks=['voc21', 'ade20k'],
                                         workers=2, **kwargs)
    ade = fabricate_benchmarks.fabricate(tmp_path / 'ade', benchmarks=['ade20k'], workers=2,
                                         **kwargs)
    assert list(one) == ['voc21', 'ade20k'] and list(ade) == ['ade20k']
    assert files_of(tmp_path / 'one') == files_of(tmp_path / 'two')
    assert [(image.name, label.name) for image, label in two['ade20k']] == [
        (image.name, label.name) for image, label in one['ade20k']]
    ade_files = files_of(tmp_path / 'ade')
    assert ade_files and all(files_of(tmp_path / 'one')[name] == data
                             for name, data in ade_files.items())
    fabricate_benchmarks.fabricate(tmp_path / 'seed4', benchmarks=['ade20k'],
                                   **dict(kwargs, seed=4))
    assert files_of(tmp_path / 'seed4').keys() == ade_files.keys()
    assert files_of(tmp_path / 'seed4') != ade_files
    for image, label in one['ade20k']:
        assert Image.open(image).format == 'JPEG'
        assert Image.open(image).size == Image.open(label).size
        assert np.array(Image.open(label)).max() <= 150


@pytest.mark.parametrize('mix, shares', [
    ('VOC_SIZES', {(500, 375): .45, (500, 333): .15, (375, 500): .15, (333, 500): .05}),
    ('COCO_SIZES', {(640, 480): .45, (640, 427): .25, (480, 640): .12, (427, 640): .08}),
    ('ADE20K_SIZES', {(683, 512): .50, (512, 683): .15, (512, 512): .15}),
    ('CITYSCAPES_SIZES', {(2048, 1024): 1.}),
])
def test_size_distributions(mix, shares):
    sizes = fabricate_benchmarks.real_sizes(getattr(fabricate_benchmarks, mix), 20000,
                                            np.random.default_rng(0))
    heights, widths = sizes.T
    for (width, height), share in shares.items():
        assert np.mean((widths == width) & (heights == height)) == pytest.approx(share, abs=.015)
    assert np.all(widths / heights <= 2) and np.all(heights / widths <= 2)
    if mix == 'ADE20K_SIZES':
        assert sizes.min() >= 256 and sizes.max() <= 1024
        assert len(np.unique(sizes, axis=0)) > 1000  # many distinct sizes in the rest
    if mix == 'VOC_SIZES':
        assert all(is_voc_size(w, h) for h, w in sizes[:500])
        assert len(np.unique(sizes, axis=0)) > 200


def test_real_counts():
    counts = fabricate_benchmarks.real_counts()
    assert counts == dict(voc21=1449, context60=5105, coco_object=5000, voc20=1449,
                          context59=5105, coco_stuff164k=5000, cityscapes=500, ade20k=2000)
    assert fabricate_benchmarks.parse_args(['out', '--real-counts']).num_images is None
    assert fabricate_benchmarks.parse_args(['out']).num_images == 3


def test_real_counts_are_what_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fabricate_benchmarks, 'real_counts',
                        lambda: dict(voc21=2, voc20=2, ade20k=3))
    fabricate_benchmarks.main([str(tmp_path), '--real-counts', '--benchmarks', 'voc20',
                               'ade20k'])
    assert capsys.readouterr().out.splitlines() == ['voc20: 2 images', 'ade20k: 3 images']
    voc = tmp_path / 'VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt'
    assert voc.read_text().split() == ['2008_000000', '2008_000001']
    assert len(list((tmp_path / 'ade/ADEChallengeData2016/images/validation').iterdir())) == 3


@pytest.mark.parametrize('argv, expected', [
    (['--images', '3', '--real-counts'],
     'error: argument --real-counts: not allowed with argument --images'),
    (['--benchmarks', 'voc21', 'voc2012'], "error: argument --benchmarks: invalid choice: "
     "'voc2012' (choose from 'voc21', 'context60',"),
    (['--workers', '0'], "error: argument --workers: '0' is not an integer >= 1"),
], ids=['images-and-real-counts', 'unknown-benchmark', 'no-workers'])
def test_argument_errors(argv, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        fabricate_benchmarks.main([str(tmp_path / 'out'), *argv])
    err = capsys.readouterr().err
    assert raised.value.code == 2 and 'Traceback' not in err
    errors = [line for line in err.splitlines() if 'error:' in line]
    assert len(errors) == 1 and expected in errors[0], err
    assert not (tmp_path / 'out').exists()


def test_unknown_benchmark_in_the_python_api(tmp_path):
    with pytest.raises(ValueError, match='unknown benchmark.*nope; known: voc21, context60'):
        fabricate_benchmarks.fabricate(tmp_path, benchmarks=['voc21', 'nope'])
