"""Every published-method preset against the settings of its public repository
(../shared/PUBLISHED_SETTINGS.md, transcribed below and checked against that file)."""
import re
from pathlib import Path

import pytest
from mmengine.config import Config

from conftest import REPO_ROOT
from mmseg_selfattn.benchmarks import BENCHMARKS, dataset_cfg_of, method_config

CONFIGS = REPO_ROOT / 'configs'
SETTINGS_FILE = REPO_ROOT.parent / 'shared' / 'PUBLISHED_SETTINGS.md'

# "Defaults of each segmentor class"
CLASS_DEFAULTS = {
    'sclip': dict(attention='sclip', logit_scale=40, prob_thd=0, area_thd=0, slide_crop=224,
                  slide_stride=112, pamr_steps=0, pamr_stride=(8, 16)),
    'naclip': dict(attention='naclip', gaussian_std=5, logit_scale=40, prob_thd=0, area_thd=0,
                   slide_crop=224, slide_stride=112, pamr_steps=10, pamr_stride=(8, 16)),
    'clearclip': dict(attention='clearclip', logit_scale=50, prob_thd=0, area_thd=0,
                      slide_crop=448, slide_stride=224, pamr_steps=0),
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
# "Published mIoU": the SCLIP and NACLIP READMEs; ClearCLIP's per-benchmark figures are
# its paper's (PUBLISHED_SETTINGS gives their average, 38.1)
PUBLISHED_MIOU = {
    'sclip': (59.63, 31.74, 33.52, 81.54, 34.46, 22.77, 32.34, 16.45),
    'naclip': (64.07, 34.99, 36.19, 83.03, 38.35, 25.69, 38.27, 19.05),
    'clearclip': (51.8, 32.6, 33.0, 80.9, 35.9, 23.9, 30.0, 16.7),
}
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
