"""Settings that follow the machine: ``'auto'`` in a config means this machine's value.

- ``model.precision='auto'``: fp16 where CUDA is available when the model is built (as
  the published code runs: OpenAI's ``clip.load`` keeps fp16 weights on CUDA), else fp32.
- ``test_dataloader.batch_size='auto'``: 16 images per batch on a GPU machine, 1 on CPU.
- ``test_dataloader.num_workers='auto'``: on a GPU machine, the CPUs of this process less
  two (the main process and the pin-memory thread), at least 2 and at most 12; on CPU 2
  (at most the CPUs). With torchrun the CPUs are shared by ``LOCAL_WORLD_SIZE`` ranks.

An explicit value is used as it is. ``MachineAwareTestLoop`` (the configs' test loop)
resolves the loader's values when it builds the loader, so mmengine's plain
``Runner.from_cfg`` works on the configs.
"""
import contextlib
import os

import torch
from mmengine.runner import TestLoop
from mmseg.registry import LOOPS

AUTO = 'auto'
GPU_BATCH_SIZE = 16
MAX_GPU_WORKERS = 12  # measured on an H200 host: 12 workers feed ~1,500 VOC images/s
CPU_WORKERS = 2


def cpus_per_process() -> int:
    """CPUs this process may use, shared among the ranks of this host."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        ranks = max(1, int(os.environ.get('LOCAL_WORLD_SIZE', '1')))
    except ValueError:
        ranks = 1
    return max(1, cpus // ranks)


def resolve_precision(precision: str) -> str:
    """'auto' -> 'fp16' with CUDA available, else 'fp32'; anything else unchanged."""
    if precision != AUTO:
        return precision
    return 'fp16' if torch.cuda.is_available() else 'fp32'


def resolve_test_loader(loader: dict, cuda: bool = None) -> dict:
    """A copy of a test dataloader cfg with ``'auto'`` batch_size / num_workers resolved
    for this machine (``cuda``: default, whether CUDA is available); other values are
    checked: one error naming the key and what it takes."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    loader = dict(loader)
    cpus = cpus_per_process()
    automatic = dict(
        batch_size=GPU_BATCH_SIZE if cuda else 1,
        num_workers=(max(2, min(MAX_GPU_WORKERS, cpus - 2)) if cuda
                     else min(CPU_WORKERS, cpus)))
    for key, lowest in (('batch_size', 1), ('num_workers', 0)):
        if key not in loader:
            continue
        value = loader[key]
        if value == AUTO:
            loader[key] = automatic[key]
        elif isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise ValueError(f"test_dataloader.{key} must be an int >= {lowest} or 'auto' "
                             f'(this machine: {automatic[key]}), got {value!r}.')
    if loader.get('num_workers') == 0 and loader.get('persistent_workers'):
        loader['persistent_workers'] = False  # torch refuses it without workers
    return loader


@LOOPS.register_module()
class MachineAwareTestLoop(TestLoop):
    """mmengine's ``TestLoop`` whose dataloader cfg may say ``'auto'`` for its
    ``batch_size`` and ``num_workers`` (``resolve_test_loader``), and which never waits
    for the GPU batch by batch: a segmentor with ``finite_checks_deferred`` (ours) checks
    each batch's probabilities while the next batch runs, the last one before the
    metrics are computed."""

    def __init__(self, runner, dataloader, evaluator, fp16: bool = False):
        if isinstance(dataloader, dict):
            dataloader = resolve_test_loader(dataloader)
        super().__init__(runner, dataloader, evaluator, fp16)

    def run(self) -> dict:
        deferred = getattr(self._segmentor(), 'finite_checks_deferred', None)
        with deferred() if deferred is not None else contextlib.nullcontext():
            return super().run()

    def run_iter(self, idx, data_batch) -> None:
        super().run_iter(idx, data_batch)
        if idx == len(self.dataloader) - 1:  # before the metrics (run computes them next)
            check = getattr(self._segmentor(), 'check_deferred_finite', None)
            if check is not None:
                check()

    def _segmentor(self):
        return getattr(self.runner.model, 'module', self.runner.model)  # distributed wrapper
