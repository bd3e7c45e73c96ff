import importlib.util
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.logging import MMLogger

REPO_ROOT = Path(__file__).resolve().parents[1]
# no on-disk text-embedding cache in tests (tests/test_text_cache.py turns it on itself)
os.environ['MMSEG_SELFATTN_CACHE'] = 'off'
sys.path.insert(0, str(REPO_ROOT))

import mmseg_selfattn  # noqa: E402,F401  (installs the mmcv.ops stand-in first)
from mmseg_selfattn.clip_loader import load_clip  # noqa: E402

TINY_ARCH = 'ViT-Tiny-8-test'


def build_tiny_segmentor(**overrides):
    """The tiny-arch segmentor of the stage tests (3 classes, 32-pixel windows, stride 16),
    built after seeding 0; ``overrides`` are model keys."""
    from mmseg.registry import MODELS
    torch.manual_seed(0)
    return MODELS.build(dict(dict(
        type='SelfAttnCLIPSegmentor', clip=dict(arch=TINY_ARCH, pretrained=None),
        class_names=['sky', 'tree', 'road'], slide_crop=32, slide_stride=16), **overrides))


def load_tool(name: str, module_name: str = None):
    """``tools/<name>.py`` as a module, registered in ``sys.modules`` (under
    ``module_name``, default ``name``) so that pickling its functions by name works."""
    module_name = module_name or name
    path = REPO_ROOT / 'tools' / f'{name}.py'
    loaded = sys.modules.get(module_name)
    if loaded is not None and Path(getattr(loaded, '__file__', '')) == path:
        return loaded  # one module object: pickling its functions by name finds them
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def camvid_root() -> Path:
    """The shared CamVid val split (../shared/data/camvid beside the checkout)."""
    return Path(os.environ.get('MMSEG_SELFATTN_CAMVID',
                               REPO_ROOT.parent / 'shared' / 'data' / 'camvid'))


@pytest.fixture(scope='session')
def tiny_clip():
    torch.manual_seed(0)
    return load_clip(TINY_ARCH, pretrained=None)


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


@pytest.fixture
def log_records():
    """Records reaching mmengine's current logger (what print_log(logger='current') uses)."""
    records = []

    class ListHandler(logging.Handler):

        def emit(self, record):
            records.append(record.getMessage())

    logger = MMLogger.get_current_instance()
    handler, level = ListHandler(level=logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def runner_config(config, data_root, work_dir, model=None, **dataset):
    cfg = Config.fromfile(str(config))
    cfg.work_dir = str(work_dir)
    cfg.model.clip = dict(arch=TINY_ARCH, pretrained=None)
    if model is not None:
        cfg.model = model
    cfg.test_dataloader.num_workers = 0
    cfg.test_dataloader.persistent_workers = False
    cfg.test_dataloader.dataset.data_root = str(data_root)
    cfg.test_dataloader.dataset.update(dataset)
    cfg.default_hooks.logger.interval = 1
    return cfg
