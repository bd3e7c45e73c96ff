"""RF-CLIP's presets (configs/methods/rfclip/) against its published settings,
../shared/methods/rf-clip.md §4, transcribed below and checked against that file."""
import re
from pathlib import Path

import pytest
from mmengine.config import Config

from conftest import REPO_ROOT
from mmseg_selfattn.benchmarks import BENCHMARKS, METHOD_CONFIGS, dataset_cfg_of, method_config

CONFIGS = REPO_ROOT / 'configs'
RFCLIP_FILE = REPO_ROOT.parent / 'shared' / 'methods' / 'rf-clip.md'
CHANNELS = (4, 162, 189, 326, 429, 474, 633, 713)
# rf-clip.md §4: short, slide_crop (0 = whole), prob_thd, gamma, a, h
TABLE = {
    'voc21': (336, 0, 0.1, 0.1, 0.03, 0.10),
    'context60': (336, 224, 0.1, 0.25, 0.04, 0.09),
    'coco_object': (336, 224, 0.1, 0.25, 0.01, 0.10),
    'voc20': (336, 224, 0.0, 0.4, 0.02, 0.10),
    'context59': (336, 224, 0.0, 0.25, 0.04, 0.09),
    'coco_stuff164k': (336, 0, 0.0, 0.2, 0.02, 0.02),  # 0 at c2b333
    'cityscapes': (560, 224, 0.0, 0.1, 0.03, 0.14),
    'ade20k': (336, 224, 0.0, 0.3, 0.05, 0.06),
}
ROW_TO_BENCH = {'VOC21': 'voc21', 'Context60': 'context60', 'COCO-Object': 'coco_object',
                'VOC20': 'voc20', 'Context59': 'context59', 'COCO-Stuff164k': 'coco_stuff164k',
                'Cityscapes': 'cityscapes', 'ADE20K': 'ade20k'}
CLASS_FILES = dict(coco_stuff164k='coco_stuff')


@pytest.mark.parametrize('bench', list(BENCHMARKS))
@pytest.mark.parametrize('pamr', [False, True])
def test_preset_matches_the_published_settings(bench, pamr):
    short, crop, prob, gamma, a, h = TABLE[bench]
    path = method_config('rfclip-pamr' if pamr else 'rfclip', bench, CONFIGS)
    cfg = Config.fromfile(str(path))
    model = cfg.model
    assert model.attention == 'rfclip'
    assert dict(model.rfclip_cfg, branches=tuple(model.rfclip_cfg.branches)) == dict(
        kk_layers='all', propagation_threshold=0.4, branches=('block_input', 'layer_mean'),
        normalize_propagation=False)
    assert model.apply_distraction_filter is True
    assert dict(model.distraction_filter_cfg,
                channels=tuple(model.distraction_filter_cfg.channels)) == dict(
        channels=CHANNELS, sigma=5.0, alpha=0.4, layers='all', shift_by_min=True)
    assert model.apply_text_refinement is True
    assert model.text_refinement_cfg == dict(cluster_threshold=h, weight=a, top_k=2,
                                             linkage='complete')
    assert model.global_semantics_weight == gamma
    assert model.global_image == ('crop' if bench == 'cityscapes' else 'whole')
    assert (model.slide_crop, model.slide_stride) == (crop, 112)
    assert (model.logit_scale, model.prob_thd, model.area_thd, model.bg_idx) == (40, prob, 0, 0)
    assert (model.pamr_steps, tuple(model.pamr_stride)) == ((10 if pamr else 0), (8, 16))
    assert model.cuda_graph is False
    resize = [t for t in dataset_cfg_of(cfg)['pipeline'] if t['type'] == 'AtLeastOnePixelResize']
    assert resize == [dict(type='AtLeastOnePixelResize', scale=(2048, short), keep_ratio=True)]
    assert dataset_cfg_of(cfg)['type'] == BENCHMARKS[bench].dataset_type
    assert Path(model.name_path).stem == CLASS_FILES.get(bench, bench)
    header = path.read_text().split('\n_base_ = ')[0]
    assert 'not published per benchmark' in header
    assert re.findall(r'\b\d\d\.\d\b', header) == (['45.5', '44.2'] if pamr else ['44.2', '45.5'])


def test_eval_all_knows_both_methods():
    assert METHOD_CONFIGS['rfclip'] == 'methods/rfclip/rfclip_vit-b16_{}.py'
    assert METHOD_CONFIGS['rfclip-pamr'] == 'methods/rfclip/rfclip-pamr_vit-b16_{}.py'


def test_preset_builds_on_vit_b16():
    """The published channels resolve for ViT-B-16 (width 768, 12 blocks); the head, the
    filter and the refinement get the preset's values."""
    from mmseg_selfattn.rfclip import (build_distraction_filter, build_rfclip,
                                       build_text_refinement)
    model = Config.fromfile(str(method_config('rfclip', 'ade20k', CONFIGS))).model
    head = build_rfclip(model.attention, model.rfclip_cfg, 12)
    assert head.kk_blocks == tuple(range(11))
    flt = build_distraction_filter(True, model.distraction_filter_cfg, 'ViT-B-16', 768, 12)
    assert tuple(flt.channel_index.tolist()) == CHANNELS and flt.blocks == tuple(range(12))
    refine = build_text_refinement(True, model.text_refinement_cfg)
    assert (refine.cluster_threshold, refine.weight, refine.top_k) == (0.06, 0.05, 2)


def test_transcription_matches_the_method_file():
    assert RFCLIP_FILE.is_file(), f'{RFCLIP_FILE} is not beside the repo'
    text = RFCLIP_FILE.read_text().replace('**', '')
    rows = [[cell.strip() for cell in line.strip().strip('|').split('|')]
            for line in text.splitlines() if line.startswith('| ')]
    # the row has 8 cells: benchmark, dataset class, short, slide, prob_thd, gamma, a, h
    table = {}
    for row in rows:
        if row[0] in ROW_TO_BENCH:
            assert len(row) == 8, row
            crop = 0 if row[3].startswith('0') else int(row[3].split('/')[0])
            table[ROW_TO_BENCH[row[0]]] = (int(row[2]), crop, float(row[4]), float(row[5]),
                                           float(row[6]), float(row[7]))
    assert table == TABLE
    assert '𝒟 = {4, 162, 189, 326, 429, 474, 633, 713}' in text
    assert 'Paper 8-benchmark averages: 44.2, or 45.5 with PAMR' in text


@pytest.mark.parametrize('bench', ['voc21', 'context60', 'cityscapes'])
def test_preset_model_runs_on_the_tiny_arch(bench):
    """The preset's model keys together (its channels replaced: the tiny ViT is 64 wide)
    build and predict finite probabilities; the whole-image pass runs once per batch."""
    import torch
    from mmseg.registry import MODELS
    model = Config.fromfile(str(method_config('rfclip-pamr', bench, CONFIGS))).model.to_dict()
    model.update(clip=dict(arch='ViT-Tiny-8-test', pretrained=None), name_path=None,
                 class_names=['sky', 'tree', 'road'], precision='fp32', data_preprocessor=None,
                 distraction_filter_cfg=dict(model['distraction_filter_cfg'],
                                             channels=(5, 17, 40)))
    if model['slide_crop']:
        model.update(slide_crop=32, slide_stride=16)
    torch.manual_seed(0)
    segmentor = MODELS.build(model)
    calls = []
    original = segmentor.pipeline.image_embeddings
    segmentor.pipeline.image_embeddings = lambda images: calls.append(len(images)) or \
        original(images)
    torch.manual_seed(1)
    out = segmentor.predict(torch.randn(2, 3, 40, 56))
    assert all(torch.isfinite(sample.seg_logits.data).all() for sample in out)
    assert calls == ([2] if model['slide_crop'] and model['global_image'] == 'whole' else [])
