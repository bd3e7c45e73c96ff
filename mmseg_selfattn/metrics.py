"""IoUMetric that reports ground-truth values it cannot score correctly, and keeps the
GPU busy: no host synchronisation per image."""
import logging
from typing import List, Optional, Sequence, Set, Tuple

import torch
from mmengine.logging import print_log
from mmseg.evaluation import IoUMetric
from mmseg.registry import METRICS

Areas = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@METRICS.register_module()
class CheckedIoUMetric(IoUMetric):
    """mmseg's ``IoUMetric`` (identical numbers) that warns once per label value that
    is neither a class index nor ``ignore_index``, naming the first label map with it.

    IoUMetric masks only ``ignore_index``, then histograms over 0..num_classes-1: such
    a pixel never counts as ground truth, but its prediction counts for the predicted
    class, lowering that class's IoU (a false positive no class can match).

    On a GPU, mmseg's version synchronises with the device six times per image (three
    boolean-mask selections, three ``.cpu()``), so the test loop cannot prepare the next
    batch while the GPU works. Here each image's areas stay on the device until
    :meth:`evaluate` (the same histograms: ignored pixels are moved outside the bins
    instead of selected away), and the label check of a batch is read one batch later
    from a pinned copy. On CPU, and with ``output_dir`` or ``format_only``, it is
    mmseg's code path.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reported_values: Set[int] = set()
        self.check_labels = True  # a sweep checks each label map with one point's metric
        self._pending_check: Optional[tuple] = None  # the last GPU batch's label check

    def process(self, data_batch: dict, data_samples: Sequence[dict]) -> None:
        num_classes = len(self.dataset_meta['classes'])
        self._finish_label_check()
        if self.format_only or self.output_dir is not None:  # mmseg's path: writes files
            if not self.format_only and self.check_labels:
                for data_sample in data_samples:
                    self._check_now(data_sample, num_classes)
            super().process(data_batch, data_samples)
            return
        on_device = []
        for data_sample in data_samples:
            pred_label = data_sample['pred_sem_seg']['data'].squeeze()
            if not pred_label.is_cuda or num_classes == 1:  # (histc's min == max case)
                if self.check_labels:
                    self._check_now(data_sample, num_classes)
                super().process(data_batch, [data_sample])
                continue
            label = data_sample['gt_sem_seg']['data'].squeeze().to(pred_label)
            self.results.append(device_areas(pred_label, label, num_classes,
                                             self.ignore_index))
            on_device.append(data_sample)
        if on_device and self.check_labels:
            self._start_label_check(on_device, num_classes)

    def evaluate(self, size: int) -> dict:
        self._finish_label_check()
        self.results = areas_on_cpu(self.results)  # before any gathering across ranks
        return super().evaluate(size)

    def compute_metrics(self, results: list) -> dict:
        return super().compute_metrics(areas_on_cpu(results))

    def _check_now(self, data_sample: dict, num_classes: int) -> None:
        self._warn_unscorable_values(data_sample['gt_sem_seg']['data'], num_classes,
                                     data_sample.get('seg_map_path', '<label map>'))

    def _start_label_check(self, data_samples: List[dict], num_classes: int) -> None:
        """Queues one flag per label map on the GPU, copied to pinned memory, read by
        the next batch (or :meth:`evaluate`) without waiting for this batch's work."""
        labels = [sample['gt_sem_seg']['data'] for sample in data_samples]
        flags = torch.stack([unscorable_mask(label, num_classes, self.ignore_index).any()
                             for label in labels])
        host_flags = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
        host_flags.copy_(flags, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        paths = [sample.get('seg_map_path', '<label map>') for sample in data_samples]
        self._pending_check = (host_flags, ready, labels, paths, num_classes)

    def _finish_label_check(self) -> None:
        if self._pending_check is None:
            return
        host_flags, ready, labels, paths, num_classes = self._pending_check
        self._pending_check = None
        ready.synchronize()
        for flagged, label, path in zip(host_flags.tolist(), labels, paths):
            if flagged:  # rare: the values themselves need a synchronisation
                self._warn_unscorable_values(label, num_classes, path)

    def _warn_unscorable_values(self, labels: torch.Tensor, num_classes: int,
                                path: str) -> None:
        unscorable = unscorable_mask(labels, num_classes, self.ignore_index)
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


def unscorable_mask(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    return ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)


def device_areas(pred_label: torch.Tensor, label: torch.Tensor, num_classes: int,
                 ignore_index: int) -> Areas:
    """``IoUMetric.intersect_and_union`` without leaving the device: the ignored pixels
    (and the non-matching ones, for the intersection) become -1, below histc's range,
    rather than being selected away (a boolean selection waits for the device). The
    same float32 counts; ``num_classes`` > 1 (histc's range must not be empty)."""
    valid = label != ignore_index
    outside = torch.full((), -1, dtype=pred_label.dtype, device=pred_label.device)
    pred_valid = torch.where(valid, pred_label, outside)
    label_valid = torch.where(valid, label, outside)
    intersect = torch.where(pred_valid == label_valid, pred_valid, outside)

    def histogram(values: torch.Tensor) -> torch.Tensor:
        return torch.histc(values.float(), bins=num_classes, min=0, max=num_classes - 1)

    area_intersect, area_pred_label, area_label = map(
        histogram, (intersect, pred_valid, label_valid))
    area_union = area_pred_label + area_label - area_intersect
    return area_intersect, area_union, area_pred_label, area_label


def areas_on_cpu(results: list) -> list:
    """The per-image area tuples with every tensor on the CPU, in one copy."""
    if not any(tensor.is_cuda for areas in results for tensor in areas):
        return results
    flat = [tensor for areas in results for tensor in areas]
    host = torch.stack([tensor.to(flat[0].device) for tensor in flat]).cpu().unbind(0)
    width = len(results[0])
    return [tuple(host[index:index + width]) for index in range(0, len(host), width)]
