"""Runner hooks of the evaluation loop."""
import os
import time
from typing import Optional, Sequence

from mmengine.config import Config
from mmengine.dataset import BaseDataset
from mmengine.hooks import Hook
from mmseg.registry import HOOKS


@HOOKS.register_module()
class TestSetCheckHook(Hook):
    """Fails before the first test image when the test set cannot give a meaningful
    mIoU, with one error naming what is wrong:

    - the dataset is empty (an empty split file, or no file with the image suffix
      under the image folder): the loop would end in an obscure IoUMetric assertion.
      Only a dataset built with ``serialize_data=False`` (as in clip_test.py) gets
      here: mmengine's serialisation of an empty list fails while building the loop
      ("need at least one array to concatenate");
    - the model's class list and the dataset's classes differ in number: mIoU pairs
      predicted label k with the dataset's class k, so a class too many or too few
      shifts or drops classes silently. Models without ``class_names`` are not checked.
    """

    def before_test(self, runner) -> None:
        dataset = runner.test_loop.dataloader.dataset
        check_not_empty(dataset)
        model = getattr(runner.model, 'module', runner.model)  # distributed wrapper
        class_names = getattr(model, 'class_names', None)
        if class_names is not None:
            check_class_count(class_names, dataset)


@HOOKS.register_module()
class ReleaseLoaderWorkersHook(Hook):
    """Shuts the test loader's worker processes down as soon as the test ends.

    With ``persistent_workers=True`` they otherwise live until the interpreter exits,
    where each was measured to take 5 s (torch's worker status-check interval) to go:
    an H200 run with 12 workers ended 62 s after printing its metrics, 12 s with 2.
    """
    priority = 'LOWEST'

    def after_test(self, runner) -> None:
        release_loader_workers(runner.test_loop.dataloader)


def seconds_since_process_start() -> float:
    """Seconds since this process started (Linux: its start in /proc against the boot
    clock, 10 ms resolution); elsewhere since this module was imported."""
    try:
        with open('/proc/self/stat') as file:  # field 22, after the parenthesised name
            start_ticks = int(file.read().rpartition(')')[2].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf('SC_CLK_TCK')
    except (OSError, ValueError, IndexError, AttributeError):
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()
TIMELINE_PREFIX = 'test timeline:'


@HOOKS.register_module()
class TestTimelineHook(Hook):
    """Where the time of an evaluation goes, one log line on rank 0 after the metrics::

        test timeline: start-up 7.41 s, loop 3.02 s (1449 images, 479.8 images/s),
        evaluation 0.12 s

    - start-up: from the process start (for a later test of the same process, as in
      tools/eval_all.py: from the end of the previous one) to the first batch, loaded;
    - loop: from there to the end of the last batch's hooks (the metric's per-batch
      work included);
    - evaluation: the metric's final computation, to the end of the test epoch.

    tools/benchmark_e2e.py reads this line; the process exit comes after it.
    """
    priority = 'VERY_LOW'
    _previous_end: Optional[float] = None  # perf_counter at the end of the last test

    def before_test(self, runner) -> None:
        since = (seconds_since_process_start() if TestTimelineHook._previous_end is None
                 else time.perf_counter() - TestTimelineHook._previous_end)
        self.started = time.perf_counter() - since
        self.first = self.last = None
        self.images = 0

    def before_test_iter(self, runner, batch_idx, data_batch=None) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def after_test_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self.images += len(outputs) if outputs is not None else 0
        self.last = time.perf_counter()

    def after_test_epoch(self, runner, metrics=None) -> None:
        now = time.perf_counter()
        TestTimelineHook._previous_end = now
        if runner.rank != 0 or self.first is None:
            return
        loop = self.last - self.first
        rate = f'{self.images / loop:.1f} images/s' if loop > 0 else 'n/a images/s'
        runner.logger.info(
            f'{TIMELINE_PREFIX} start-up {self.first - self.started:.2f} s, loop {loop:.2f} s '
            f'({self.images} images, {rate}), evaluation {now - self.last:.2f} s')

    def after_test(self, runner) -> None:
        TestTimelineHook._previous_end = time.perf_counter()


def release_loader_workers(loader) -> None:
    """Ends a DataLoader's persistent workers now (a no-op without any); the next
    iteration starts new ones."""
    iterator = getattr(loader, '_iterator', None)
    if iterator is not None and hasattr(iterator, '_shutdown_workers'):
        iterator._shutdown_workers()
        loader._iterator = None


def check_not_empty(dataset: BaseDataset) -> None:
    if len(dataset) > 0:
        return
    ann_file = getattr(dataset, 'ann_file', '')
    data_prefix = getattr(dataset, 'data_prefix', {})
    why = (f'its split file {ann_file} lists no image' if ann_file else
           f"no file ends in {getattr(dataset, 'img_suffix', '')!r} under "
           f"{data_prefix.get('img_path', '')}")
    raise ValueError(
        f'the test dataset {type(dataset).__name__} is empty: {why} '
        f"(data_root={getattr(dataset, 'data_root', None)!r}, "
        f'data_prefix={data_prefix!r}, ann_file={ann_file!r}).')


def check_class_count(class_names: Sequence, dataset: BaseDataset) -> None:
    dataset_classes = dataset.metainfo.get('classes') or ()
    if len(class_names) == len(dataset_classes):
        return
    first_names = ', '.join(synonyms[0] if isinstance(synonyms, tuple) else synonyms
                            for synonyms in class_names[:3])
    raise ValueError(
        f'the model has {len(class_names)} classes ({first_names}, ...; from '
        f'model.name_path / model.class_names) but the test dataset '
        f'{type(dataset).__name__} has {len(dataset_classes)} '
        f'({", ".join(dataset_classes[:3])}, ...): every class line must match one '
        'dataset class, in label order. Use the class-name file of this dataset.')


def with_test_set_checks(cfg: Config) -> None:
    """Adds :class:`TestSetCheckHook` to ``cfg.custom_hooks`` unless it is there."""
    hooks = list(cfg.get('custom_hooks') or [])
    if not any(hook.get('type') in ('TestSetCheckHook', TestSetCheckHook) for hook in hooks):
        hooks.append(dict(type='TestSetCheckHook'))
    cfg.custom_hooks = hooks
