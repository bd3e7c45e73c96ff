"""The eight benchmarks' dataset configs on fabricated folders in the real on-disk formats:
file names, suffixes, split files, VOC's palette PNGs, and each benchmark's label
encoding (reduce_zero_label, ignore 255)."""
import sys
from pathlib import Path

import numpy as np
import pytest
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmseg.datasets import PascalVOCDataset
from mmseg.datasets.transforms import LoadAnnotations
from mmseg.registry import DATASETS
from PIL import Image

from conftest import REPO_ROOT
from mmseg_selfattn.benchmarks import (BENCHMARKS, METHOD_CONFIGS, dataset_cfg_of, method_config,
                                       set_data_dir)
from mmseg_selfattn.datasets import (COCOObjectDataset, PascalContext59Dataset,
                                     PascalContext60Dataset, PascalVOC20Dataset)

sys.path.insert(0, str(REPO_ROOT / 'tools'))
from fabricate_benchmarks import fabricate  # noqa: E402

CONFIGS = REPO_ROOT / 'configs'
# PUBLISHED_SETTINGS.md: background becomes ignore (reduce_zero_label) on these three
REDUCE_ZERO_LABEL = dict(voc21=False, context60=False, coco_object=False, voc20=True,
                         context59=True, coco_stuff164k=False, cityscapes=False, ade20k=True)
# the lineage's class-name files rename a few classes of the datasets' own tuples
RENAMED = {('boat', 'ship'), ('diningtable', 'table'), ('tvmonitor', 'television monitor'),
           ('bed ', 'bed')}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    return root, fabricate(root, num_images=3, seed=0)


def encoded(raw: np.ndarray, reduce_zero_label: bool) -> np.ndarray:
    """The label map IoUMetric should see: 0 -> 255 and k -> k - 1 when reducing."""
    if not reduce_zero_label:
        return raw
    out = raw.astype(np.int64) - 1
    out[(raw == 0) | (raw == 255)] = 255
    return out.astype(np.uint8)


CASES = [(method, bench) for method in METHOD_CONFIGS for bench in BENCHMARKS]


@pytest.mark.parametrize('method, benchmark', CASES, ids=[f'{m}-{b}' for m, b in CASES])
def test_config_loads_the_real_layout(method, benchmark, data_dir):
    """The config's own test pipeline: the image resized to the protocol's short side,
    the label map at its original size with the benchmark's encoding."""
    root, written = data_dir
    cfg = set_data_dir(Config.fromfile(str(method_config(method, benchmark, CONFIGS))), root)
    init_default_scope('mmseg')
    dataset = DATASETS.build(dataset_cfg_of(cfg))
    short_side = next(t['scale'][1] for t in dataset_cfg_of(cfg)['pipeline']
                      if t['type'] == 'AtLeastOnePixelResize')

    assert type(dataset).__name__ == BENCHMARKS[benchmark].dataset_type
    assert len(dataset.metainfo['classes']) == BENCHMARKS[benchmark].num_classes
    assert dataset.metainfo['reduce_zero_label'] is REDUCE_ZERO_LABEL[benchmark]
    labels_of = {Path(image): Path(label) for image, label in written[benchmark]}
    # the split only: training images and raw masks beside the label maps are skipped
    assert len(dataset) == len(labels_of) == 3
    for index in range(len(dataset)):
        info = dataset.get_data_info(index)
        label_file = labels_of[Path(info['img_path'])]
        assert Path(info['seg_map_path']) == label_file
        sample = dataset[index]
        assert min(sample['inputs'].shape[-2:]) == short_side
        gt = sample['data_samples'].gt_sem_seg.data[0].numpy()
        raw = np.array(Image.open(label_file))
        np.testing.assert_array_equal(gt, encoded(raw, REDUCE_ZERO_LABEL[benchmark]))
        values = set(np.unique(gt).tolist())
        assert values <= set(range(BENCHMARKS[benchmark].num_classes)) | {255}


def test_voc_label_maps_are_palette_pngs(data_dir):
    _, written = data_dir
    for _, label_file in written['voc21']:
        image = Image.open(label_file)
        assert image.mode == 'P'  # as released; indices are the labels
        palette = np.array(image.getpalette()[:21 * 3]).reshape(21, 3)
        np.testing.assert_array_equal(palette, PascalVOCDataset.METAINFO['palette'])


def test_reduce_zero_label_really_drops_background(data_dir):
    """VOC20 scores no background: VOC21's 0 pixels are ignored, class k is k - 1."""
    root, written = data_dir
    gts = {}
    for benchmark in ('voc21', 'voc20'):
        cfg = set_data_dir(Config.fromfile(str(method_config('sclip', benchmark, CONFIGS))),
                           root)
        init_default_scope('mmseg')
        dataset = DATASETS.build(dict(dataset_cfg_of(cfg), pipeline=[LoadAnnotations()]))
        gts[benchmark] = dataset[0]['gt_seg_map']
    background = gts['voc21'] == 0
    assert background.any() and (gts['voc20'][background] == 255).all()
    labelled = (gts['voc21'] > 0) & (gts['voc21'] < 255)
    np.testing.assert_array_equal(gts['voc20'][labelled], gts['voc21'][labelled] - 1)


def first_names(class_file: Path):
    return [line.replace(';', ',').split(',')[0].strip()
            for line in class_file.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize('benchmark', list(BENCHMARKS))
def test_dataset_classes_match_the_class_name_file(benchmark):
    cfg = Config.fromfile(str(method_config('naclip', benchmark, CONFIGS)))
    classes = DATASETS.get(dataset_cfg_of(cfg)['type']).METAINFO['classes']
    names = first_names(Path(cfg.model.name_path))
    assert len(names) == len(classes) == BENCHMARKS[benchmark].num_classes
    for index, (name, query) in enumerate(zip(classes, names)):
        if index == 0 and name == 'background':
            continue  # the background line holds stuff words (sky, wall, ...)
        same = name.replace(' ', '') == query.replace(' ', '')
        assert same or (name, query) in RENAMED, (index, name, query)


@pytest.mark.parametrize('dataset_cls, classes', [
    (PascalVOC20Dataset, 20), (PascalContext60Dataset, 60), (PascalContext59Dataset, 59),
    (COCOObjectDataset, 81)])
def test_new_datasets_metainfo(dataset_cls, classes):
    meta = dataset_cls.METAINFO
    assert len(meta['classes']) == len(meta['palette']) == classes
    assert len(set(meta['classes'])) == classes
    assert DATASETS.get(dataset_cls.__name__) is dataset_cls
    assert (meta['classes'][0] == 'background') is (classes in (60, 81))


@pytest.mark.parametrize('dataset_cls, wrong', [
    (PascalVOC20Dataset, False), (PascalContext60Dataset, True),
    (PascalContext59Dataset, False), (COCOObjectDataset, True)])
def test_wrong_reduce_zero_label_is_refused(dataset_cls, wrong, tmp_path):
    kwargs = dict(ann_file='val.txt') if dataset_cls is not COCOObjectDataset else {}
    with pytest.raises(ValueError, match=f'{dataset_cls.__name__}: reduce_zero_label must '
                                         f'be {not wrong}'):
        dataset_cls(data_root=str(tmp_path), reduce_zero_label=wrong, lazy_init=True, **kwargs)


def test_data_dir_moves_only_roots_below_data(tmp_path):
    cfg = Config.fromfile(str(method_config('selfattn', 'ade20k', CONFIGS)))
    assert dataset_cfg_of(set_data_dir(cfg, '/datasets'))['data_root'] == \
        '/datasets/ade/ADEChallengeData2016'
    cfg = Config.fromfile(str(method_config('selfattn', 'ade20k', CONFIGS)))
    cfg.test_dataloader.dataset.data_root = '/my/ade'
    assert dataset_cfg_of(set_data_dir(cfg, '/datasets'))['data_root'] == '/my/ade'
    cfg = Config.fromfile(str(CONFIGS / 'benchmark/camvid_throughput.py'))  # RepeatDataset
    assert dataset_cfg_of(set_data_dir(cfg, str(tmp_path)))['data_root'] == \
        str(tmp_path / 'camvid')
