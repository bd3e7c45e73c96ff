"""Every published-method preset against the settings of its public repository
(../shared/PUBLISHED_SETTINGS.md and, for SC-CLIP and ResCLIP, ../shared/methods/sc-clip.md and
../shared/methods/resclip.md, transcribed below and checked against those files)."""
import re
from pathlib import Path

import pytest
from mmengine.config import Config

from conftest import REPO_ROOT
from mmseg_selfattn.benchmarks import BENCHMARKS, dataset_cfg_of, method_config

CONFIGS = REPO_ROOT / 'configs'
SETTINGS_FILE = REPO_ROOT.parent / 'shared' / 'PUBLISHED_SETTINGS.md'
SCCLIP_FILE = REPO_ROOT.parent / 'shared' / 'methods' / 'sc-clip.md'
RESCLIP_FILE = REPO_ROOT.parent / 'shared' / 'methods' / 'resclip.md'

# "Defaults of each segmentor class"
CLASS_DEFAULTS = {
    'sclip': dict(attention='sclip', logit_scale=40, prob_thd=0, area_thd=0, slide_crop=224,
                  slide_stride=112, pamr_steps=0, pamr_stride=(8, 16)),
    'naclip': dict(attention='naclip', gaussian_std=5, logit_scale=40, prob_thd=0, area_thd=0,
                   slide_crop=224, slide_stride=112, pamr_steps=10, pamr_stride=(8, 16)),
    'clearclip': dict(attention='clearclip', logit_scale=50, prob_thd=0, area_thd=0,
                      slide_crop=448, slide_stride=224, pamr_steps=0),
    # sc-clip.md §5 (SCLIP's segmentor) and §3 (its five arguments and hard-coded values)
    'scclip': dict(attention='scclip', logit_scale=40, prob_thd=0, area_thd=0, slide_crop=224,
                   slide_stride=112, pamr_steps=0, pamr_stride=(8, 16), precision='auto',
                   scclip_cfg=dict(anomaly_neighbours=30, anomaly_contamination=0.05,
                                   pre_layer=8, post_layer=3, similarity_threshold=0.4,
                                   similarity_scale=3.0, fusion_layers=(3, 4, 5, 6, 7, 8, 9),
                                   cls_residual=0.3)),
    # resclip.md §3 (ResCLIPSegmentation's defaults; NACLIP's arch and attention, PAMR off,
    # both modules always on)
    'resclip': dict(attention='naclip', gaussian_std=5, logit_scale=40, prob_thd=0, area_thd=0,
                    slide_crop=224, slide_stride=112, pamr_steps=0, pamr_stride=(8, 16),
                    apply_rcs=True, apply_sfr=True),
}
# "Per-dataset settings": short side and what each dataset config sets over the defaults
PER_DATASET = {
    'voc21': dict(sclip=dict(short=336, logit_scale=65, prob_thd=0.1, area_thd=0.1),
                  naclip=dict(short=336, prob_thd=0.1, slide_crop=0),
                  clearclip=dict(short=448, prob_thd=0.5)),
    'voc20': dict(sclip=dict(short=336), naclip=dict(short=336, slide_crop=0),
                  clearclip=dict(short=448)),
    'context60': dict(sclip=dict(short=336, logit_scale=50, prob_thd=0.1),
                      naclip=dict(short=336, prob_thd=0.1),
                      clearclip=dict(short=448, prob_thd=0.15)),
    'context59': dict(sclip=dict(short=336), naclip=dict(short=336), clearclip=dict(short=448)),
    'coco_object': dict(sclip=dict(short=336, logit_scale=50, prob_thd=0.1),
                        naclip=dict(short=336, prob_thd=0.1),
                        clearclip=dict(short=448, prob_thd=0.4)),
    'coco_stuff164k': dict(sclip=dict(short=448), naclip=dict(short=336),
                           clearclip=dict(short=448)),
    'cityscapes': dict(sclip=dict(short=560), naclip=dict(short=560),
                       clearclip=dict(short=448, slide_crop=224)),
    'ade20k': dict(sclip=dict(short=336), naclip=dict(short=336), clearclip=dict(short=448)),
}
# sc-clip.md §5, "Segmentor defaults and per-benchmark settings"
SCCLIP_PER_DATASET = {
    'voc21': dict(short=336, logit_scale=50, prob_thd=0.15, area_thd=0.1),
    'context60': dict(short=336, prob_thd=0.15),
    'coco_object': dict(short=336, logit_scale=55, prob_thd=0.35),
    'voc20': dict(short=336),
    'context59': dict(short=336),
    'coco_stuff164k': dict(short=336),
    'cityscapes': dict(short=560),
    'ade20k': dict(short=336),
}
for bench, settings in SCCLIP_PER_DATASET.items():
    PER_DATASET[bench]['scclip'] = settings
# resclip.md §4: short, slide_crop, prob_thd, temp_thd, (tau_r, lambda_r), (tau_s, lambda_s)
RESCLIP_TABLE = {
    'voc21': (336, 0, 0.1, 0.50, (2.0, 0.3), (2.2, 0.7)),
    'context60': (336, 224, 0.1, 0.30, (2.0, 0.3), (1.8, 0.7)),
    'coco_object': (336, 224, 0.1, 0.11, (2.0, 0.4), (1.8, 0.7)),
    'voc20': (336, 0, 0, 0.10, (2.0, 0.6), (2.1, 0.6)),
    'context59': (336, 224, 0, 0.25, (2.0, 0.4), (1.8, 0.7)),
    'coco_stuff164k': (336, 224, 0, 0.11, (2.0, 0.4), (1.8, 0.7)),
    'cityscapes': (560, 224, 0, 0.10, (2.0, 0.2), (2.1, 0.6)),
    'ade20k': (336, 224, 0, 0.25, (2.0, 0.3), (2.1, 0.7)),
}
for bench, (short, crop, prob, temp, (tau_r, lam_r), (tau_s, lam_s)) in RESCLIP_TABLE.items():
    PER_DATASET[bench]['resclip'] = dict(
        short=short, slide_crop=crop, prob_thd=prob,
        rcs_cfg=dict(layers=(5, 6, 7, 8), weight=lam_r, scale=tau_r),
        sfr_cfg=dict(weight=lam_s, scale=tau_s, threshold=temp, line_decay=True,
                     exact_line_of_sight=False, blur_std=None, pamr_steps=10,
                     pamr_stride=(8, 16), half_precision_affinity=True))
# "Published mIoU": the SCLIP and NACLIP READMEs; ClearCLIP's per-benchmark figures are
# its paper's (PUBLISHED_SETTINGS gives their average, 38.1)
PUBLISHED_MIOU = {
    'sclip': (59.63, 31.74, 33.52, 81.54, 34.46, 22.77, 32.34, 16.45),
    'naclip': (64.07, 34.99, 36.19, 83.03, 38.35, 25.69, 38.27, 19.05),
    'clearclip': (51.8, 32.6, 33.0, 80.9, 35.9, 23.9, 30.0, 16.7),
    # sc-clip.md §6: the radar chart of the SC-CLIP README (figs/scclip.jpg)
    'scclip': (64.6, 36.8, 37.7, 84.3, 40.1, 26.6, 41.0, 20.1),
    # resclip.md §5: the README figures' "NACLIP + ResCLIP" row (the main results)
    'resclip': (61.1, 33.5, 35.0, 86.0, 36.8, 24.7, 35.9, 18.0),
}
RESCLIP_BASE_MIOU = (58.9, 32.2, 33.2, 79.7, 35.2, 23.3, 35.5, 17.4)  # §5's NACLIP row
CLASS_FILES = dict(coco_stuff164k='coco_stuff')
PRESETS = [(method, bench) for method in CLASS_DEFAULTS for bench in BENCHMARKS]


def expected_settings(method: str, bench: str) -> dict:
    settings = dict(CLASS_DEFAULTS[method], **PER_DATASET[bench][method])
    settings.pop('short')
    return settings


@pytest.mark.parametrize('method, bench', PRESETS, ids=[f'{m}-{b}' for m, b in PRESETS])
def test_preset_matches_published_settings(method, bench):
    path = method_config(method, bench, CONFIGS)
    cfg = Config.fromfile(str(path))
    for key, value in expected_settings(method, bench).items():
        actual = cfg.model[key]
        if key == 'scclip_cfg':
            actual = dict(actual, fusion_layers=tuple(actual['fusion_layers']))
        if key == 'rcs_cfg':
            actual = dict(actual, layers=tuple(actual['layers']))
        if key == 'sfr_cfg':
            actual = dict(actual, pamr_stride=tuple(actual['pamr_stride']))
        assert (tuple(actual) if key == 'pamr_stride' else actual) == value, key
    resize = [t for t in dataset_cfg_of(cfg)['pipeline']
              if t['type'] == 'AtLeastOnePixelResize']
    assert resize == [dict(type='AtLeastOnePixelResize',
                           scale=(2048, PER_DATASET[bench][method]['short']), keep_ratio=True)]
    assert dataset_cfg_of(cfg)['type'] == BENCHMARKS[bench].dataset_type
    assert Path(cfg.model.name_path).stem == CLASS_FILES.get(bench, bench)
    assert cfg.model.bg_idx == 0  # background (or the first class) takes unsure pixels
    miou = PUBLISHED_MIOU[method][list(BENCHMARKS).index(bench)]
    header = path.read_text().split('\n_base_ = ')[0]
    assert f'Published mIoU with OpenAI\'s ViT-B/16 weights: {miou} (' in header


def test_clearclip_paper_figures_average_to_the_published_average():
    assert round(sum(PUBLISHED_MIOU['clearclip']) / 8, 1) == 38.1


def test_scclip_presets_build_the_scclip_head():
    """The preset's scclip_cfg reaches the head unchanged (ViT-B/16 has 12 blocks: the
    layers are valid), and the standard last block is not run."""
    from mmseg_selfattn.scclip import SCCLIPHead
    cfg = Config.fromfile(str(method_config('scclip', 'voc21', CONFIGS)))
    head = SCCLIPHead(**cfg.model.scclip_cfg)
    head.resolve_layers(12)
    assert (head.pre_layer, head.post_layer, head.fusion_layers) == (8, 3, tuple(range(3, 10)))


SCCLIP_ROW_TO_BENCH = {'VOC21': 'voc21', 'Context60': 'context60', 'COCO-Object': 'coco_object',
                       'VOC20': 'voc20', 'Context59': 'context59',
                       'COCO-Stuff164k': 'coco_stuff164k', 'Cityscapes': 'cityscapes',
                       'ADE20K': 'ade20k'}


@pytest.mark.skipif(not SCCLIP_FILE.is_file(), reason=f'{SCCLIP_FILE} not beside the repo')
def test_scclip_transcription_matches_the_method_file():
    text = SCCLIP_FILE.read_text().replace('**', '')
    rows = [[cell.strip() for cell in line.strip().strip('|').split('|')]
            for line in text.splitlines() if line.startswith('| ')]
    per_dataset = {SCCLIP_ROW_TO_BENCH[row[0]]: parse_cell(row[1]) for row in rows
                   if row[0] in SCCLIP_ROW_TO_BENCH and len(row) == 3}
    assert per_dataset == SCCLIP_PER_DATASET
    defaults = next(row for row in rows if row[0].startswith('SC-CLIP ('))
    crop, stride = map(int, re.findall(r'\d+', defaults[4]))
    assert (float(defaults[1]), float(defaults[2]), defaults[3], crop, stride) == (
        40, 0, 'none', CLASS_DEFAULTS['scclip']['slide_crop'],
        CLASS_DEFAULTS['scclip']['slide_stride'])
    assert defaults[5].startswith('off')
    header = next(index for index, row in enumerate(rows) if row[:2] == ['VOC21', 'PC60'])
    published = tuple(map(float, rows[header + 2][:8]))
    assert published == PUBLISHED_MIOU['scclip']
    assert float(rows[header + 2][8]) == round(sum(published) / 8, 1) == 43.9
    # §3: the code's defaults are the preset's scclip_cfg
    code = {row[0].strip('`'): row[2] for row in rows if row[0].startswith('`')}
    cfg = CLASS_DEFAULTS['scclip']['scclip_cfg']
    assert (float(code['pre_adjust_idx']), float(code['post_adjust_idx'])) == (
        cfg['pre_layer'], cfg['post_layer'])
    assert tuple(range(*map(int, code['multi_start_idx`, `multi_end_idx'].split(', ')))) == \
        cfg['fusion_layers']
    assert (float(code['res_cls']), float(code['beta'])) == (cfg['cls_residual'],
                                                            cfg['similarity_threshold'])
    assert code['n_neighbors`, `contamination'] == '30, 0.05'


def parse_cell(cell: str) -> dict:
    return {key: float(value) for key, value in
            re.findall(r'(short|logit_scale|prob_thd|area_thd|slide_crop) (\d+(?:\.\d+)?)', cell)}


ROW_TO_BENCH = {'VOC21': 'voc21', 'VOC20': 'voc20', 'Context60': 'context60',
                'Context59': 'context59', 'COCO-Object': 'coco_object',
                'COCO-Stuff164k': 'coco_stuff164k', 'Cityscapes': 'cityscapes',
                'ADE20K': 'ade20k'}


@pytest.mark.skipif(not SETTINGS_FILE.is_file(), reason=f'{SETTINGS_FILE} not beside the repo')
def test_transcription_matches_published_settings_file():
    rows = [[cell.strip() for cell in line.strip().strip('|').split('|')]
            for line in SETTINGS_FILE.read_text().splitlines() if line.startswith('| ')]
    per_dataset = {ROW_TO_BENCH[row[0].split()[0]]: row[3:6] for row in rows
                   if row[0].split()[0] in ROW_TO_BENCH and len(row) == 6}
    assert set(per_dataset) == set(BENCHMARKS)
    for bench, cells in per_dataset.items():
        for method, cell in zip(('sclip', 'naclip', 'clearclip'), cells):
            assert parse_cell(cell) == PER_DATASET[bench][method], (bench, method)

    defaults = {row[0].split()[0].lower(): row for row in rows
                if row[0].split()[0].lower() in CLASS_DEFAULTS}
    for method, row in defaults.items():
        crop, stride = map(int, re.findall(r'\d+', row[4]))
        pamr = 10 if '10 steps' in row[5] else 0
        assert (float(row[1]), float(row[2]), crop, stride, pamr) == (
            CLASS_DEFAULTS[method]['logit_scale'], CLASS_DEFAULTS[method]['prob_thd'],
            CLASS_DEFAULTS[method]['slide_crop'], CLASS_DEFAULTS[method]['slide_stride'],
            CLASS_DEFAULTS[method]['pamr_steps'])
        assert row[6].startswith(CLASS_DEFAULTS[method]['attention'])

    published = {row[0].split(',')[0].lower(): tuple(map(float, row[1:9])) for row in rows
                 if row[0].startswith(('SCLIP, repo', 'NACLIP, repo'))}
    assert published == {m: PUBLISHED_MIOU[m] for m in ('sclip', 'naclip')}
    assert 'ClearCLIP 38.1' in SETTINGS_FILE.read_text()


def test_resclip_presets_build_rcs_and_sfr():
    """The preset's rcs_cfg / sfr_cfg reach the modules unchanged (ViT-B/16's 12 blocks:
    blocks 5..8 are valid), and each leaf names both published numbers."""
    from mmseg_selfattn.resclip import build_resclip
    for index, bench in enumerate(BENCHMARKS):
        path = method_config('resclip', bench, CONFIGS)
        cfg = Config.fromfile(str(path))
        rcs, sfr = build_resclip(cfg.model.attention, cfg.model.apply_rcs, cfg.model.rcs_cfg,
                                 cfg.model.apply_sfr, cfg.model.sfr_cfg, 12)
        short, crop, prob, temp, (tau_r, lam_r), (tau_s, lam_s) = RESCLIP_TABLE[bench]
        assert (rcs.layers, rcs.scale, rcs.weight) == ((5, 6, 7, 8), tau_r, lam_r)
        assert (sfr.scale, sfr.weight, sfr.threshold) == (tau_s, lam_s, temp)
        assert sfr.pamr is not None and (sfr.pamr.num_iter, sfr.pamr.dilations) == (10, (8, 16))
        assert f'NACLIP alone {RESCLIP_BASE_MIOU[index]};' in path.read_text()


RESCLIP_ROW_TO_BENCH = {'VOC21': 'voc21', 'Context60': 'context60',
                        'COCO-Object': 'coco_object', 'VOC20': 'voc20',
                        'Context59': 'context59', 'COCO-Stuff164k': 'coco_stuff164k',
                        'Cityscapes': 'cityscapes', 'ADE20K': 'ade20k'}


@pytest.mark.skipif(not RESCLIP_FILE.is_file(), reason=f'{RESCLIP_FILE} not beside the repo')
def test_resclip_transcription_matches_the_method_file():
    text = RESCLIP_FILE.read_text().replace('**', '')
    rows = [[cell.strip() for cell in line.strip().strip('|').split('|')]
            for line in text.splitlines() if line.startswith('| ')]
    table = {}
    for row in rows:
        if row[0] in RESCLIP_ROW_TO_BENCH and len(row) == 7:
            tau_r, lam_r = map(float, row[5].split(', '))
            tau_s, lam_s = map(float, row[6].split(', '))
            table[RESCLIP_ROW_TO_BENCH[row[0]]] = (int(row[1]), int(row[2]), float(row[3]),
                                                   float(row[4]), (tau_r, lam_r),
                                                   (tau_s, lam_s))
    assert table == RESCLIP_TABLE
    b16 = next(index for index, row in enumerate(rows) if row[0] == 'ViT-B/16')
    naclip = next(row for row in rows[b16:] if row[0] == 'NACLIP')
    main = next(row for row in rows[b16:] if row[0] == '+ ResCLIP (main)')
    assert tuple(map(float, naclip[1:9])) == RESCLIP_BASE_MIOU
    assert tuple(map(float, main[1:9])) == PUBLISHED_MIOU['resclip']
    assert float(main[9]) == 41.38  # 331 / 8 = 41.375, rounded half up
    assert abs(sum(PUBLISHED_MIOU['resclip']) / 8 - 41.38) <= 0.005 + 1e-9
    defaults = {row[0]: row[1] for row in rows if row[0].startswith('`')}
    assert defaults['`slide_crop` / `slide_stride`, `logit_scale`, `prob_thd`'] == \
        '224 / 112, 40, 0.0'
    assert defaults['`pamr_steps` / `pamr_stride`'] == '0 / (8, 16)'
