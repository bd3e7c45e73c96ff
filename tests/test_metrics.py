"""CheckedIoUMetric's device path: the same areas and mIoU as mmseg's IoUMetric, label
warnings as on CPU (one batch later on a GPU), no NaN, any device."""
import logging

import numpy as np
import pytest
import torch
from mmengine.logging import MMLogger
from mmseg.evaluation import IoUMetric

from mmseg_selfattn.metrics import CheckedIoUMetric, areas_on_cpu, device_areas

DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


def planted(rng, shape, num_classes, ignore_index, extra_values=()):
    """Labels with ignored pixels and values outside the classes; predictions that
    also leave the class range (an ignore prediction, a negative value)."""
    label = rng.integers(0, num_classes, shape)
    label[rng.random(shape) < 0.2] = ignore_index
    for value in extra_values:
        label[rng.random(shape) < 0.05] = value
    pred = rng.integers(0, num_classes, shape)

    agree = rng.random(shape) < 0.4  # many correct pixels: a real intersection
    pred[agree] = np.clip(label[agree], 0, num_classes - 1)
    pred.flat[:3] = [255, -1, num_classes]
    return torch.from_numpy(pred), torch.from_numpy(label)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('num_classes,ignore_index,shape', [
    (21, 255, (37, 53)), (2, 255, (5, 7)), (150, 255, (64, 48)), (19, -1, (20, 30)),
    (5, 0, (9, 11)), (7, 255, (0, 4))])
def test_device_areas_equal_intersect_and_union(device, num_classes, ignore_index, shape):
    rng = np.random.default_rng(num_classes)
    pred, label = planted(rng, shape, num_classes, ignore_index,
                          extra_values=(num_classes + 3, -5))
    expected = IoUMetric.intersect_and_union(pred, label, num_classes, ignore_index)
    got = device_areas(pred.to(device), label.to(device), num_classes, ignore_index)
    for mine, theirs in zip(got, expected):
        assert mine.device.type == device and mine.dtype == theirs.dtype
        assert torch.equal(mine.cpu(), theirs)


def test_areas_on_cpu_keeps_order_and_values():
    results = [tuple(torch.full((3, ), float(4 * image + field)) for field in range(4))
               for image in range(5)]
    moved = areas_on_cpu([tuple(t.to(DEVICES[-1]) for t in areas) for areas in results])
    assert len(moved) == 5
    for mine, theirs in zip(moved, results):
        assert all(t.device.type == 'cpu' for t in mine)
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
    assert areas_on_cpu([]) == []


class LogRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize('device', DEVICES)
def test_metric_on_device_scores_and_warns_like_iou_metric(device):
    rng = np.random.default_rng(3)
    meta = dict(classes=tuple(f'class {c}' for c in range(21)))
    checked, plain = CheckedIoUMetric(iou_metrics=['mIoU']), IoUMetric(iou_metrics=['mIoU'])
    checked.dataset_meta = plain.dataset_meta = meta
    batches = []
    for batch in range(3):
        samples = []
        for index in range(2):
            pred, label = planted(rng, (20 + index, 30), 21, 255)
            label[0, :2] = torch.tensor([37 if batch == 1 else 1, 40 if batch == 2 else 2])
            samples.append(dict(gt_sem_seg=dict(data=label[None]),
                                pred_sem_seg=dict(data=pred[None]),
                                seg_map_path=f'/data/labels_{batch}_{index}.png'))
        batches.append(samples)
    records = LogRecords()
    logger = MMLogger.get_current_instance()
    logger.addHandler(records)
    try:
        for samples in batches:
            checked.process({}, [{key: (dict(data=value['data'].to(device))
                                        if isinstance(value, dict) else value)
                                  for key, value in sample.items()} for sample in samples])
            plain.process({}, samples)
        mine = checked.evaluate(len(batches) * 2)
    finally:
        logger.removeHandler(records)
    theirs = plain.evaluate(len(batches) * 2)
    assert mine == theirs and np.isfinite(list(mine.values())).all()
    assert [message.split(' is not')[0] for message in records.messages] == [
        'label value 37 in /data/labels_1_0.png', 'label value 40 in /data/labels_2_0.png']
    assert checked.results == [] and checked._pending_check is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_gpu_batches_do_not_synchronise_per_image():
    """The areas stay on the device and the label check is queued: nothing in process
    waits for the GPU (torch's sync debug mode raises on a synchronising call)."""
    metric = CheckedIoUMetric(iou_metrics=['mIoU'])
    metric.dataset_meta = dict(classes=tuple(map(str, range(21))))
    rng = np.random.default_rng(0)
    samples = []
    for index in range(4):
        pred, label = planted(rng, (50, 60), 21, 255)
        samples.append(dict(gt_sem_seg=dict(data=label[None].cuda()),
                            pred_sem_seg=dict(data=pred[None].cuda()), seg_map_path=str(index)))
    metric.process({}, samples[:2])  # the first batch starts its check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        metric.process({}, samples[2:])  # reads the first check (ready), queues its own
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(t.is_cuda for areas in metric.results for t in areas)
    assert np.isfinite(metric.evaluate(4)['mIoU'])
