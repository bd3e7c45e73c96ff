"""IoUMetric that reports ground-truth values it cannot score correctly."""
import logging
from typing import Sequence, Set

import torch
from mmengine.logging import print_log
from mmseg.evaluation import IoUMetric
from mmseg.registry import METRICS


@METRICS.register_module()
class CheckedIoUMetric(IoUMetric):
    """mmseg's ``IoUMetric`` (identical numbers) that warns once per label value that
    is neither a class index nor ``ignore_index``, naming the first label map with it.

    IoUMetric masks only ``ignore_index``, then histograms over 0..num_classes-1: such
    a pixel never counts as ground truth, but its prediction counts for the predicted
    class, lowering that class's IoU (a false positive no class can match).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reported_values: Set[int] = set()
        self.check_labels = True  # a sweep checks each label map with one point's metric

    def process(self, data_batch: dict, data_samples: Sequence[dict]) -> None:
        if not self.format_only and self.check_labels:
            num_classes = len(self.dataset_meta['classes'])
            for data_sample in data_samples:
                self._warn_unscorable_values(data_sample['gt_sem_seg']['data'], num_classes,
                                             data_sample.get('seg_map_path', '<label map>'))
        super().process(data_batch, data_samples)

    def _warn_unscorable_values(self, labels: torch.Tensor, num_classes: int,
                                path: str) -> None:
        unscorable = ((labels < 0) | (labels >= num_classes)) & (labels != self.ignore_index)
        if not unscorable.any():  # the common case: a few elementwise ops, no sort
            return
        for value in torch.unique(labels[unscorable]).tolist():
            if value in self.reported_values:
                continue
            self.reported_values.add(value)
            print_log(
                f'label value {value} in {path} is not a class index (0..{num_classes - 1}) '
                f'nor the ignore index {self.ignore_index}: IoUMetric never counts these '
                'pixels as ground truth, but counts their predictions as false positives '
                'of the predicted classes (lowering those IoUs). Map the value to a class '
                'or to the ignore index (warned once per value).',
                logger='current', level=logging.WARNING)
