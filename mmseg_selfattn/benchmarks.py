"""The eight standard benchmarks of training-free CLIP segmentation, in the papers'
column order, and where each one's data lives."""
import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Union

from mmengine.config import Config


@dataclass(frozen=True)
class Benchmark:
    """One column of the standard results table.

    Args:
        key: the name in config file names (``selfattn_vit-b16_<key>.py``).
        column: the papers' column header.
        data_root: the dataset root below the data folder (``data/`` by default).
        num_classes: classes scored by mIoU.
        num_val_images: size of the validation split.
        dataset_type: the registered dataset class.
    """
    key: str
    column: str
    data_root: str
    num_classes: int
    num_val_images: int
    dataset_type: str


BENCHMARKS: Dict[str, Benchmark] = {b.key: b for b in (
    Benchmark('voc21', 'VOC21', 'VOCdevkit/VOC2012', 21, 1449, 'PascalVOCDataset'),
    Benchmark('context60', 'PC60', 'VOCdevkit/VOC2010', 60, 5105, 'PascalContext60Dataset'),
    Benchmark('coco_object', 'Object', 'coco_stuff164k', 81, 5000, 'COCOObjectDataset'),
    Benchmark('voc20', 'VOC20', 'VOCdevkit/VOC2012', 20, 1449, 'PascalVOC20Dataset'),
    Benchmark('context59', 'PC59', 'VOCdevkit/VOC2010', 59, 5105, 'PascalContext59Dataset'),
    Benchmark('coco_stuff164k', 'Stuff', 'coco_stuff164k', 171, 5000, 'COCOStuffDataset'),
    Benchmark('cityscapes', 'City', 'cityscapes', 19, 500, 'CityscapesDataset'),
    Benchmark('ade20k', 'ADE', 'ade/ADEChallengeData2016', 150, 2000, 'ADE20KDataset'),
)}

# method -> config path below configs/, for each benchmark key
METHOD_CONFIGS: Dict[str, str] = {
    'sclip': 'methods/sclip/sclip_vit-b16_{}.py',
    'naclip': 'methods/naclip/naclip_vit-b16_{}.py',
    'clearclip': 'methods/clearclip/clearclip_vit-b16_{}.py',
    'scclip': 'methods/scclip/scclip_vit-b16_{}.py',
    'resclip': 'methods/resclip/resclip_vit-b16_{}.py',
    'rfclip': 'methods/rfclip/rfclip_vit-b16_{}.py',
    'rfclip-pamr': 'methods/rfclip/rfclip-pamr_vit-b16_{}.py',  # the paper's 45.5 setting
    'selfattn': 'selfattn/selfattn_vit-b16_{}.py',
    'selfattn-full': 'selfattn/selfattn-full_vit-b16_{}.py',
}

DEFAULT_DATA_DIR = 'data'


def method_config(method: str, benchmark: str, config_dir: Union[str, Path]) -> Path:
    """The config of ``method`` on ``benchmark`` below ``config_dir``."""
    if method not in METHOD_CONFIGS:
        raise ValueError(f'unknown method {method!r}; known: {", ".join(METHOD_CONFIGS)}.')
    if benchmark not in BENCHMARKS:
        raise ValueError(f'unknown benchmark {benchmark!r}; known: {", ".join(BENCHMARKS)}.')
    return Path(config_dir) / METHOD_CONFIGS[method].format(benchmark)


def dataset_cfg_of(cfg: Config) -> dict:
    """The dataset dict of ``cfg.test_dataloader``, looking through wrappers such as
    ``RepeatDataset``."""
    dataset = cfg.test_dataloader.dataset
    while 'dataset' in dataset and 'data_root' not in dataset:
        dataset = dataset.dataset
    return dataset


def set_data_dir(cfg: Config, data_dir: Optional[str]) -> Config:
    """Moves the test set's ``data_root`` from below ``data/`` (the layout of every
    dataset base) to below ``data_dir``: ``data/VOCdevkit/VOC2012`` ->
    ``<data_dir>/VOCdevkit/VOC2012``. Other roots are left as the config has them."""
    if data_dir is None:
        return cfg
    dataset = dataset_cfg_of(cfg)
    root = Path(dataset.get('data_root') or '')
    if root.parts[:1] == (DEFAULT_DATA_DIR, ):
        dataset['data_root'] = str(Path(data_dir).joinpath(*root.parts[1:]))
    return cfg


LOADER_ONLY_KEYS = ('num_workers', 'persistent_workers', 'pin_memory')


def config_fingerprint(cfg: Config, extra: str = '') -> str:
    """16 hex digits of everything in ``cfg`` that decides the metrics (not how many
    loader processes), plus ``extra``: what a resumed run checks before reusing results."""
    cfg = copy.deepcopy(cfg)
    for key in LOADER_ONLY_KEYS:
        cfg.test_dataloader.pop(key, None)
    return hashlib.sha256((cfg.pretty_text + extra).encode()).hexdigest()[:16]
