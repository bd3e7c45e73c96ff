"""Persistent loader workers end with the test (no stall at the interpreter's exit)."""
import torch
from mmengine.config import Config
from torch.utils.data import DataLoader

from mmseg_selfattn.hooks import ReleaseLoaderWorkersHook, release_loader_workers

from conftest import REPO_ROOT


class FakeRunner:
    def __init__(self, loader):
        self.test_loop = type('Loop', (), {'dataloader': loader})()


def test_release_ends_persistent_workers_and_the_loader_still_works():
    loader = DataLoader(list(range(8)), batch_size=2, num_workers=2, persistent_workers=True)
    assert [int(b.sum()) for b in loader] == [1, 5, 9, 13]
    workers = list(loader._iterator._workers)
    assert all(worker.is_alive() for worker in workers)  # kept for the next epoch
    ReleaseLoaderWorkersHook().after_test(FakeRunner(loader))
    assert loader._iterator is None
    assert not any(worker.is_alive() for worker in workers)
    assert [int(b.sum()) for b in loader] == [1, 5, 9, 13]  # new workers on demand
    release_loader_workers(loader)
    release_loader_workers(DataLoader(torch.arange(4)))  # no workers: nothing to do


def test_every_config_runs_the_hook():
    cfg = Config.fromfile(str(REPO_ROOT / 'configs' / 'methods' / 'naclip'
                              / 'naclip_vit-b16_voc21.py'))
    assert dict(type='ReleaseLoaderWorkersHook') in cfg.custom_hooks
