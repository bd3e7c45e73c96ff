"""Bad test data gives one clear error naming the file, or a correct result (issue
"Reliability: every bad input gets one clear error or a correct result")."""
import logging
import math
from pathlib import Path
from typing import Dict, Union

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.registry import init_default_scope
from mmengine.runner import Runner
from mmseg.datasets.transforms import LoadAnnotations, Resize
from mmseg.evaluation import IoUMetric
from mmseg.registry import DATASETS
from PIL import Image

from mmseg_selfattn.metrics import CheckedIoUMetric
from mmseg_selfattn.transforms import (AtLeastOnePixelResize, LoadCheckedAnnotations,
                                       LoadCheckedImageFromFile)
from test_runner import CAMVID_CONFIG, VOC_CONFIG, runner_config

FileContent = Union[bytes, np.ndarray]


def write(path: Path, content: FileContent) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        Image.fromarray(content).save(path)
    return path


def voc_folder(root: Path, samples: Dict[str, tuple]) -> Path:
    """VOC2012 layout: name -> (image, label map), each an array or raw file bytes."""
    (root / 'JPEGImages').mkdir(parents=True, exist_ok=True)
    for name, (image, labels) in samples.items():
        write(root / 'JPEGImages' / f'{name}.jpg', image)
        write(root / 'SegmentationClass' / f'{name}.png', labels)
    split = root / 'ImageSets' / 'Segmentation' / 'val.txt'
    split.parent.mkdir(parents=True, exist_ok=True)
    split.write_text(''.join(f'{name}\n' for name in samples))
    return root


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)


def random_labels(height: int, width: int, classes: int = 21, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, (height, width), np.uint8)


def voc_dataset(root: Path):
    """The VOC21 config's test dataset (its own pipeline) on ``root``."""
    cfg = Config.fromfile(str(VOC_CONFIG))
    init_default_scope('mmseg')
    return DATASETS.build(dict(cfg.test_dataloader.dataset, data_root=str(root)))


# -- 1. images that cannot be read ------------------------------------------------------

@pytest.mark.parametrize('content, problem', [
    (b'', r'not a readable image \(0 bytes\)'),
    (b'\xff\xd8 not really a jpeg' * 20, r'not a readable image \(400 bytes that cv2 cannot '
                                         r'decode\)'),
])
def test_empty_or_corrupt_image_names_the_file(tmp_path, content, problem):
    root = voc_folder(tmp_path / 'VOC2012', {'bad': (content, random_labels(8, 8))})
    with pytest.raises(ValueError, match=rf'.*JPEGImages/bad\.jpg: {problem}'):
        voc_dataset(root)[0]


def test_missing_image_names_the_file(tmp_path):
    root = voc_folder(tmp_path / 'VOC2012', {'ok': (random_image(8, 8), random_labels(8, 8))})
    (root / 'ImageSets/Segmentation/val.txt').write_text('not_there\n')
    with pytest.raises(FileNotFoundError, match=r'JPEGImages/not_there\.jpg'):
        voc_dataset(root)[0]


def test_checked_image_loader_reads_like_mmcv(tmp_path):
    from mmcv.transforms import LoadImageFromFile
    path = str(write(tmp_path / 'photo.png', random_image(5, 7)))
    checked, plain = LoadCheckedImageFromFile()(dict(img_path=path)), LoadImageFromFile()(
        dict(img_path=path))
    assert np.array_equal(checked['img'], plain['img'])
    assert checked['ori_shape'] == plain['ori_shape'] == (5, 7)
    empty = str(write(tmp_path / 'empty.png', b''))
    assert LoadCheckedImageFromFile(ignore_empty=True)(dict(img_path=empty)) is None


# -- 2. images too thin for the test resize ---------------------------------------------

def test_resize_never_produces_a_zero_side():
    resize = AtLeastOnePixelResize(scale=(2048, 336), keep_ratio=True)
    for shape, expected in [((1, 5000), (1, 2048)), ((5000, 1), (2048, 1))]:
        assert resize(dict(img=np.zeros((*shape, 3), np.uint8)))['img'].shape[:2] == expected
    image = random_image(375, 500)
    ours, mmseg = resize(dict(img=image.copy())), Resize(scale=(2048, 336),
                                                         keep_ratio=True)(dict(img=image))
    assert np.array_equal(ours['img'], mmseg['img'])
    assert ours['scale_factor'] == mmseg['scale_factor']


def test_thin_images_give_a_result_through_the_runner(tmp_path):
    root = voc_folder(tmp_path / 'VOC2012', {
        'row': (random_image(1, 5000), random_labels(1, 5000)),
        'column': (random_image(5000, 1, seed=1), random_labels(5000, 1, seed=1)),
    })
    assert voc_dataset(root)[0]['data_samples'].gt_sem_seg.shape == (1, 5000)
    metrics = Runner.from_cfg(runner_config(VOC_CONFIG, root, tmp_path / 'work')).test()
    assert math.isfinite(metrics['mIoU']) and 0.0 <= metrics['mIoU'] <= 100.0


# -- 3. label maps that do not fit their image ------------------------------------------

@pytest.mark.parametrize('labels, message', [
    (np.zeros((12, 10, 3), np.uint8),
     r'bad\.png: label map of shape \(12, 10, 3\) has 3 channels.*its image is 12 x 10'),
    (np.zeros((10, 12), np.uint8),
     r'bad\.png: label map is 10 x 12 \(H x W\) but its image .*bad\.jpg is 12 x 10'),
    (np.full((12, 10), 300, np.uint16), r'bad\.png: label value 300 does not fit'),
    (b'', r'bad\.png: not a readable image \(0 bytes\)'),
])
def test_label_map_that_does_not_fit_names_the_file(tmp_path, labels, message):
    root = voc_folder(tmp_path / 'VOC2012', {'bad': (random_image(12, 10), labels)})
    with pytest.raises(ValueError, match=message):
        voc_dataset(root)[0]


@pytest.mark.parametrize('reduce_zero_label, label_map', [
    (False, None), (True, None), (False, {11: 255}), (True, {3: 0, 0: 1, 11: 255})])
def test_checked_annotations_encode_like_mmseg(tmp_path, reduce_zero_label, label_map):
    labels = random_labels(6, 9, classes=256)
    labels[0, :4] = [0, 1, 254, 255]
    path = str(write(tmp_path / 'labels.png', labels))

    def load(transform):
        return transform(dict(seg_map_path=path, reduce_zero_label=reduce_zero_label,
                              label_map=label_map, seg_fields=[]))['gt_seg_map']

    assert np.array_equal(load(LoadCheckedAnnotations()), load(LoadAnnotations()))


def test_annotations_skipped_without_a_label_map():
    """mmseg.apis.inference_model drops only the type 'LoadAnnotations' (tools/demo.py)."""
    assert LoadCheckedAnnotations()(dict(img_path='x.jpg')) == dict(img_path='x.jpg')


# -- 4. label values that are no class --------------------------------------------------

class LogRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_label_values_outside_the_classes_warn_once_and_score_like_iou_metric():
    rng = np.random.default_rng(0)
    samples = []
    for index in range(3):
        labels = torch.from_numpy(rng.integers(0, 21, (1, 20, 30)))
        labels[0, 0, :3] = torch.tensor([37, 255, 40 if index else 37])
        samples.append(dict(gt_sem_seg=dict(data=labels),
                            pred_sem_seg=dict(data=torch.from_numpy(rng.integers(0, 21,
                                                                               (1, 20, 30)))),
                            seg_map_path=f'/data/labels_{index}.png'))
    meta = dict(classes=tuple(f'class {c}' for c in range(21)))
    checked, plain = CheckedIoUMetric(iou_metrics=['mIoU']), IoUMetric(iou_metrics=['mIoU'])
    checked.dataset_meta = plain.dataset_meta = meta
    records = LogRecords()
    logger = MMLogger.get_current_instance()
    logger.addHandler(records)
    try:
        for sample in samples:
            checked.process({}, [sample])
            plain.process({}, [sample])
    finally:
        logger.removeHandler(records)

    assert len(records.messages) == 2  # once per value, not per image
    assert records.messages[0].startswith(
        'label value 37 in /data/labels_0.png is not a class index (0..20) nor the ignore '
        'index 255: IoUMetric never counts these pixels as ground truth')
    assert records.messages[1].startswith('label value 40 in /data/labels_1.png')
    assert checked.compute_metrics(checked.results) == plain.compute_metrics(plain.results)
    # what the warning says: a pixel labelled 37 is a false positive of its prediction (3)
    _, union, predicted, labelled = IoUMetric.intersect_and_union(
        torch.tensor([3, 3]), torch.tensor([37, 3]), 21, 255)
    assert (predicted[3], labelled[3], union[3]) == (2, 1, 2)


def test_configs_use_the_checked_data_path():
    cfg = Config.fromfile(str(VOC_CONFIG))
    pipeline = [step['type'] for step in cfg.test_dataloader.dataset.pipeline]
    assert pipeline == ['LoadCheckedImageFromFile', 'AtLeastOnePixelResize',
                        'LoadCheckedAnnotations', 'PackSegInputs']
    assert cfg.test_evaluator.type == 'CheckedIoUMetric'


# -- 5. empty test sets -----------------------------------------------------------------

@pytest.mark.parametrize('runtime_hook', [True, False])
def test_empty_split_fails_before_the_test_loop(tmp_path, runtime_hook):
    from mmseg_selfattn.hooks import with_test_set_checks
    root = voc_folder(tmp_path / 'VOC2012', {})
    cfg = runner_config(VOC_CONFIG, root, tmp_path / 'work')
    if not runtime_hook:  # a config without our default_runtime, as tools/test.py runs it
        cfg.custom_hooks = []
        with_test_set_checks(cfg)
    with pytest.raises(ValueError, match=(
            r'the test dataset PascalVOCDataset is empty: its split file '
            rf'{root}/ImageSets/Segmentation/val\.txt lists no image \(data_root=.*VOC2012.*'
            r'data_prefix=.*JPEGImages')):
        Runner.from_cfg(cfg).test()


def test_image_folder_without_matching_files_fails_before_the_test_loop(tmp_path):
    root = tmp_path / 'camvid'
    write(root / 'images/val/frame.jpg', random_image(8, 8))  # CamVid images are .png
    (root / 'annotations/val').mkdir(parents=True)
    cfg = runner_config(CAMVID_CONFIG, root, tmp_path / 'work')
    with pytest.raises(ValueError, match=(
            rf"CamVidDataset is empty: no file ends in '\.png' under {root}/images/val")):
        Runner.from_cfg(cfg).test()
