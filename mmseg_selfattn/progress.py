"""Progress with ETAs: of the test loop (a hook) and of a set of runs (ablate, eval_all)."""
import sys
import time
from typing import Optional, TextIO

from mmengine.config import Config
from mmengine.hooks import Hook
from mmseg.registry import HOOKS
from tqdm import tqdm

COUNTS = '{n_fmt}/{total_fmt} images, {rate_noinv_fmt}, elapsed {elapsed}, ETA {remaining}'
BAR_FORMAT = '{desc}: {percentage:3.0f}%|{bar}| ' + COUNTS
LINE_FORMAT = '{desc}: {percentage:3.0f}% ' + COUNTS


@HOOKS.register_module()
class ProgressBarHook(Hook):
    """Progress of the test loop on rank 0: images done / total, images/s, elapsed time
    and ETA, to ``file`` (default stderr). A terminal gets a redrawn bar, anything else
    (CI logs) one line at every 10 %. With several ranks, the count is rank 0's times
    the number of ranks (the sampler gives them equal shares)."""

    priority = 'LOW'

    def __init__(self, file: Optional[TextIO] = None) -> None:
        self.file = file
        self.active = False

    def before_test(self, runner) -> None:
        self.active = runner.rank == 0
        if not self.active:
            return
        self.out = self.file or sys.stderr
        self.total = len(runner.test_loop.dataloader.dataset)
        self.ranks, self.done, self.start = runner.world_size, 0, time.perf_counter()
        self.bar = tqdm(total=self.total, desc='test', unit=' images', file=self.out,
                        bar_format=BAR_FORMAT, dynamic_ncols=True) \
            if self.out.isatty() else None

    def after_test_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if self.active:
            self.advance(min(self.total, self.done + len(outputs) * self.ranks))

    def after_test(self, runner) -> None:
        if self.active:
            self.advance(self.total)
            if self.bar is not None:
                self.bar.close()
            self.active = False

    def advance(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.done)
        elif done * 10 // max(self.total, 1) > self.done * 10 // max(self.total, 1):
            print(tqdm.format_meter(done, self.total, time.perf_counter() - self.start,
                                    prefix='test', unit=' images', bar_format=LINE_FORMAT),
                  file=self.out, flush=True)
        self.done = done


def with_progress(cfg: Config) -> None:
    """Adds :class:`ProgressBarHook` to ``cfg.custom_hooks`` unless it is there."""
    hooks = list(cfg.get('custom_hooks') or [])
    if not any(hook.get('type') in ('ProgressBarHook', ProgressBarHook) for hook in hooks):
        hooks.append(dict(type='ProgressBarHook'))
    cfg.custom_hooks = hooks


class RunSetProgress:
    """Elapsed time and ETA of a set of ``total`` runs; the ETA assumes that every run
    left takes the mean time of the runs timed so far."""

    def __init__(self, total: int) -> None:
        self.total, self.start, self.seconds = total, time.perf_counter(), []

    def timed(self, seconds: float) -> None:
        self.seconds.append(seconds)

    def status(self, index: int) -> str:
        """'elapsed M:SS, ETA M:SS' before run ``index`` (1-based) starts."""
        elapsed = tqdm.format_interval(time.perf_counter() - self.start)
        if not self.seconds:
            return f'elapsed {elapsed}, ETA ?'
        left = sum(self.seconds) / len(self.seconds) * (self.total - index + 1)
        return f'elapsed {elapsed}, ETA {tqdm.format_interval(left)}'
