"""CamVidDataset on the shared CamVid split, and every config under configs/ (parses,
matches its dataset's classes, builds with the tiny arch)."""
import os
from pathlib import Path

import numpy as np
import pytest
from mmengine.config import Config
from mmengine.registry import init_default_scope
from PIL import Image

import mmseg_selfattn  # noqa: F401  (mmcv.ops stand-in, registers datasets)
from mmseg.datasets.transforms import LoadAnnotations
from mmseg.registry import DATASETS, MODELS
from mmseg_selfattn.benchmarks import dataset_cfg_of
from mmseg_selfattn.datasets import CamVidDataset

from conftest import TINY_ARCH

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / 'configs'
CAMVID_ROOT = Path(
    os.environ.get('MMSEG_SELFATTN_CAMVID',
                   Path(__file__).resolve().parents[2] / 'shared/data/camvid'))
ATTENTIONS = ('vanilla', 'maskclip', 'sclip', 'clearclip', 'naclip', 'gated')

needs_camvid = pytest.mark.skipif(
    not (CAMVID_ROOT / 'images' / 'val').is_dir(),
    reason=f'CamVid not found at {CAMVID_ROOT} (set MMSEG_SELFATTN_CAMVID)')


def build_camvid(**kwargs) -> CamVidDataset:
    return CamVidDataset(
        data_root=str(CAMVID_ROOT),
        data_prefix=dict(
            img_path='images/val', seg_map_path='annotations/val'),
        pipeline=[LoadAnnotations()],
        test_mode=True,
        **kwargs)


def leaf_configs():
    return sorted(p for p in CONFIG_DIR.rglob('*.py')
                  if '_base_' not in p.parts)


def test_camvid_metainfo():
    meta = CamVidDataset.METAINFO
    assert len(meta['classes']) == 11 and len(meta['palette']) == 11
    assert meta['classes'][0] == 'sky' and meta['classes'][-1] == 'bicyclist'
    assert CamVidDataset.get_label_map() == {11: 255}
    assert DATASETS.get('CamVidDataset') is CamVidDataset


def test_camvid_refuses_reduce_zero_label():
    with pytest.raises(ValueError, match='reduce_zero_label'):
        CamVidDataset(reduce_zero_label=True, lazy_init=True)


@needs_camvid
def test_camvid_loads_and_maps_unlabelled_to_255():
    dataset = build_camvid()
    assert len(dataset) == 101
    assert len(dataset.metainfo['classes']) == 11
    assert len(dataset.metainfo['palette']) == 11
    assert dataset.metainfo['reduce_zero_label'] is False

    info = dataset.get_data_info(0)
    assert Path(info['img_path']).name == Path(info['seg_map_path']).name
    raw = np.array(Image.open(info['seg_map_path']))
    assert (raw == 11).any(), 'pick a sample that has unlabelled pixels'

    gt = dataset[0]['gt_seg_map']
    assert gt.shape == raw.shape == (360, 480)
    np.testing.assert_array_equal(gt[raw == 11], 255)
    np.testing.assert_array_equal(gt[raw != 11], raw[raw != 11])
    assert set(np.unique(gt)) <= set(range(11)) | {255}


@needs_camvid
def test_camvid_class_subset_keeps_unlabelled_ignored():
    dataset = build_camvid(metainfo=dict(classes=('road', 'car')))
    assert dataset.label_map[3] == 0 and dataset.label_map[8] == 1
    assert dataset.label_map[11] == 255 and dataset.label_map[0] == 255
    assert len(dataset.metainfo['palette']) == 2

    results = LoadAnnotations()(dict(dataset.get_data_info(0)))
    assert set(np.unique(results['gt_seg_map'])) <= {0, 1, 255}


@pytest.mark.parametrize(
    'path', leaf_configs(), ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_config_parses_and_builds_with_the_tiny_arch(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # {{fileDirname}} must not depend on the CWD
    cfg = Config.fromfile(str(path))
    assert cfg.model.type == 'SelfAttnCLIPSegmentor'
    dataset = dataset_cfg_of(cfg)
    dataset_cls = DATASETS.get(dataset.type)
    assert dataset_cls is not None, dataset.type

    name_path = Path(cfg.model.name_path)
    assert name_path.is_absolute() and name_path.is_file()
    class_lines = [
        line for line in name_path.read_text().splitlines() if line.strip()
    ]
    assert len(class_lines) == len(dataset_cls.METAINFO['classes'])
    assert any(hook['type'] == 'TestSetCheckHook' for hook in cfg.custom_hooks)

    cfg.model.clip = dict(arch=TINY_ARCH, pretrained=None)
    cfg.model.similarity_enhancement_cfg.layer = -2  # the tiny ViT has 3 blocks
    cfg.model.scclip_cfg.update(pre_layer=-2, post_layer=0, fusion_layers=(0, 1))
    cfg.model.rcs_cfg.update(layers=(0, 1))  # ResCLIP's blocks 5..8 do not exist
    # RF-CLIP's channels are ViT-B/16's (768 wide; the tiny ViT is 64)
    cfg.model.distraction_filter_cfg.update(channels=(4, 16, 40))
    init_default_scope(cfg.default_scope)
    model = MODELS.build(cfg.model)
    assert len(model.class_names) == len(dataset_cls.METAINFO['classes'])
    assert (model.engine.slide_crop, model.engine.logit_scale) == (cfg.model.slide_crop,
                                                     cfg.model.logit_scale)


def test_base_configs_parse():
    for path in sorted((CONFIG_DIR / '_base_').rglob('*.py')):
        Config.fromfile(str(path))


def test_voc21_settings():
    cfg = Config.fromfile(
        str(CONFIG_DIR / 'selfattn' / 'selfattn_vit-b16_voc21.py'))
    model = cfg.model
    assert (model.logit_scale, model.prob_thd, model.area_thd,
            model.bg_idx) == (65.0, 0.1, 0.1, 0)
    assert model.attention == 'naclip'
    resize = cfg.test_dataloader.dataset.pipeline[1]
    assert resize == dict(type='AtLeastOnePixelResize', scale=(2048, 336), keep_ratio=True)


@pytest.mark.parametrize('attention', ATTENTIONS)
def test_attention_variant_configs(attention):
    path = CONFIG_DIR / 'attention' / f'vit-b16_voc21_{attention}.py'
    cfg = Config.fromfile(str(path))
    assert cfg.model.attention == attention
    assert Path(cfg.model.name_path).name == 'voc21.txt'
    assert cfg.model.logit_scale == 65.0


def test_camvid_class_names_follow_dataset_order():
    lines = (CONFIG_DIR / 'class_names' / 'camvid.txt').read_text()
    first_names = [line.split(',')[0].strip() for line in lines.splitlines()]
    assert tuple(first_names) == CamVidDataset.METAINFO['classes']
