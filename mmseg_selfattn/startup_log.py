"""Start-up lines: one per enabled part of the pipeline, with its settings.

The format is the seed's: ``[Self-Attention Enhancement] Enabled with strength=0.1,
threshold=0.15, mode=feature``.
"""
from mmengine.logging import print_log


def log_enabled(title: str, settings: str) -> None:
    print_log(f'[{title}] Enabled with {settings}', logger='current')
