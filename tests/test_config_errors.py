"""Every bad config value fails when the model is built, with one error naming the key (or
file and line) and what is allowed: never a deep traceback, never silently wrong output."""
import math
import re

import pytest
import torch
from mmseg.registry import MODELS

from mmseg_selfattn import text_classifier
from mmseg_selfattn.text_classifier import read_class_file

from conftest import REPO_ROOT, TINY_ARCH

INF, NAN = math.inf, math.nan
CLASS_FILES = sorted((REPO_ROOT / 'configs' / 'class_names').glob('*.txt'))


def build(**overrides):
    cfg = dict(type='SelfAttnCLIPSegmentor', clip=dict(arch=TINY_ARCH, pretrained=None),
               class_names=['sky', 'road'], slide_crop=32, slide_stride=16)
    cfg.update(overrides)
    torch.manual_seed(0)
    return MODELS.build(cfg)


def with_key(key: str, value) -> dict:
    """Segmentor overrides that set ``key`` ('logit_scale' or '<stage>_cfg.<name>'), with
    the stage switched on (stage values are checked when the stage is built)."""
    if '.' not in key:
        return {key: value}
    cfg_key, name = key.split('.')
    cfg = {name: value}
    if cfg_key == 'similarity_enhancement_cfg' and name != 'layer':
        cfg['layer'] = 0  # the tiny ViT has 3 blocks
    return {'apply_' + cfg_key[:-len('_cfg')]: True, cfg_key: cfg}


NUMERIC_KEYS = [
    'gaussian_std', 'logit_scale', 'prob_thd', 'area_thd', 'cls_token_lambda', 'bg_idx',
    'slide_crop', 'slide_stride', 'max_crops_per_forward', 'pamr_steps', 'pamr_stride',
    'similarity_enhancement_cfg.layer', 'similarity_enhancement_cfg.weight',
    'similarity_enhancement_cfg.temperature', 'similarity_enhancement_cfg.threshold',
    'self_attn_enhancement_cfg.enhancement_strength',
    'self_attn_enhancement_cfg.min_self_attn_threshold',
    'outlier_suppression_cfg.top_k', 'outlier_suppression_cfg.min_ratio',
    'outlier_suppression_cfg.neighbour_decontamination', 'outlier_suppression_cfg.eps',
    'global_debias_cfg.factor',
    'ctd_cfg.eps', 'ctd_cfg.min_samples', 'ctd_cfg.scale', 'ctd_cfg.refine',
]


@pytest.mark.parametrize('value', [INF, -INF, NAN], ids=['inf', '-inf', 'nan'])
@pytest.mark.parametrize('key', NUMERIC_KEYS)
def test_non_finite_numbers_are_refused(key, value):
    with pytest.raises(ValueError, match=rf'^{re.escape(key)} must be .*, got {value!r}\.$'):
        build(**with_key(key, value))


@pytest.mark.parametrize('overrides, message', [
    # numbers out of a range where they break the computation
    (dict(pamr_steps=1, pamr_stride=10**6),
     'pamr_stride must be an int or a non-empty list of ints in [1, 64] (PAMR dilations: '
     'each pads the full-size logits by that many pixels per side), got 1000000.'),
    (dict(pamr_steps=1, pamr_dilations=(8, 100)), 'pamr_dilations must be an int or a '
                                                  'non-empty list of ints in [1, 64]'),
    (dict(gaussian_std=1e200), 'gaussian_std must be a number in [0.01, 10000.0], got 1e+200.'),
    (dict(gaussian_std=1e-30), 'gaussian_std must be a number in [0.01, 10000.0], got 1e-30.'),
    (dict(logit_scale=10**400), 'logit_scale must be a number in (0, inf), got 1000'),
    # wrong types
    (dict(gaussian_std='5'), "gaussian_std must be a number in [0.01, 10000.0], got '5'."),
    (dict(attention=['naclip']), "attention=['naclip'] is not a dense variant; choose one of "
                                 "['clearclip', 'gated', 'maskclip', 'naclip', 'rfclip', "
                                 "'scclip', 'sclip', 'vanilla']."),
    (dict(precision=['fp16']), "precision must be one of ['fp32', 'fp16', 'bf16', 'auto'], got "
                               "['fp16']."),
    (dict(prob_thd=0.5, bg_idx='0'), "bg_idx must be a class index in [0, 1] (it receives the "
                                     "pixels dropped by prob_thd / area_thd), got '0'."),
    (dict(logit_scale=True), 'logit_scale must be a number in (0, inf), got True.'),
    (dict(pamr_steps=1, pamr_stride=None), 'pamr_stride must be an int or a non-empty list'),
    (dict(pamr_steps=1, pamr_stride=[True]), 'pamr_stride must be an int or a non-empty list'),
    (dict(apply_ctd=1), 'apply_ctd must be True or False, got 1.'),
    (dict(compile='yes'), "compile must be True or False, got 'yes'."),
    (dict(cuda_graph=1), 'cuda_graph must be True or False, got 1.'),
    (dict(clip='ViT-B-16'), "clip must be a dict, e.g. clip=dict(arch='ViT-B-16', "
                            "pretrained='openai'), got 'ViT-B-16'."),
    (dict(ctd_cfg=[1]), 'ctd_cfg must be a dict, e.g. ctd_cfg=dict(eps=0.2, min_samples=4, '
                        'scale=0.5, refine=0.0) (the defaults), got [1].'),
    (dict(global_debias_cfg='x'), "global_debias_cfg must be a dict, e.g. "
                                  "global_debias_cfg=dict(factor=0.2) (the defaults), got 'x'."),
    (dict(ctd_cfg=dict(type=3)), "ctd_cfg.type must be a name registered in mmseg's MODELS or "
                                 "a class, got 3."),
    # class names
    (dict(class_names='sky;road'), "class_names must be a list of class lines, e.g. ['sky', "
                                   "'road; street'] (or set name_path to a class-name file), "
                                   "got 'sky;road'."),
    (dict(class_names=['sky', None]), 'class_names, line 2: a class line must be a string, '
                                      'got None.'),
    (dict(class_names=['sky', ' , ,', 'road']),
     "class_names, line 2 names no class (' , ,'): class indices follow the lines, so only "
     'lines after the last class may be empty.'),
    (dict(class_names=['', 'sky']), "class_names, line 1 names no class ('')"),
    (dict(class_names=['sky', 'road', 'Sky, cloud']),
     "class_names, lines 1 and 3 both name the class 'Sky': merge them into one line "
     "(synonyms separated by ',')."),
    (dict(class_names=['sky; cloud', 'road', 'cloud,  SKY']),
     "class_names, lines 1 and 3 list the same synonyms ['cloud', 'SKY']: line 3 could never "
     'be predicted; remove it.'),
    (dict(class_names=[' ', '']), 'class_names: the class list is empty'),
    (dict(class_names=None, name_path=123), 'name_path must be the path of a class-name file '
                                            '(a str), got 123.'),
])
def test_bad_config_fails_at_build(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build(**overrides)


@pytest.mark.parametrize('content, message', [
    (b'sky\n , ,\nroad\n', ", line 2 names no class (' , ,')"),
    (b'sky\n\nroad\n', ", line 2 names no class ('')"),
    (b'sky\nroad\nsky\n', ", lines 1 and 3 both name the class 'sky'"),
    (b'sky, cloud\nroad\ncloud; sky\n', ", lines 1 and 3 list the same synonyms"),
    (b'sky\nstra\xdfe\n', ' is not UTF-8 text: byte 0xdf on line 2, column 5; save the file '
                          'as UTF-8.'),
    (b'\xef\xbb\xbf\n', ': the class list is empty'),
])
def test_bad_class_file_names_file_and_line(tmp_path, content, message):
    path = tmp_path / 'names.txt'
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"name_path='{path}'{message}")):
        build(class_names=None, name_path=str(path))


def test_missing_name_path_or_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"name_path='{tmp_path / 'nope.txt'}' does not exist: give a text file")):
        build(class_names=None, name_path=str(tmp_path / 'nope.txt'))
    with pytest.raises(IsADirectoryError, match=re.escape(
            f"name_path='{tmp_path}' is a directory: give a text file")):
        build(class_names=None, name_path=str(tmp_path))


def test_bom_and_trailing_blank_lines_are_fine(tmp_path):
    path = tmp_path / 'names.txt'
    path.write_bytes('\ufeffsky, cloud\r\nroad\r\n\r\n  \n'.encode())
    assert read_class_file(path) == (('sky', 'cloud'), ('road', ))
    model = build(class_names=('sky', 'road', ''))
    assert model.class_names == (('sky', ), ('road', ))


def test_boundary_values_still_build():
    model = build(gaussian_std=1e4, pamr_steps=1, pamr_stride=64, logit_scale=1e3,
                  cls_token_lambda=-0.3, apply_ctd=True, ctd_cfg=dict(eps=2, refine=1))
    assert model.engine.pamr.dilations == (64, ) and model.pipeline.ctd.refine == 1.0
    assert build(gaussian_std=0.01).pipeline.encoder.gaussian_std == 0.01


@pytest.mark.parametrize('path', CLASS_FILES, ids=lambda path: path.name)
def test_published_class_files_load_unchanged(path, monkeypatch):
    warnings = []
    monkeypatch.setattr(text_classifier, 'print_log',
                        lambda message, **kwargs: warnings.append(message))
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert len(read_class_file(str(path))) == len(lines)
    # coco_object's background line lists 'bed', which is also a class of its own
    expected = ([f"name_path='{path}', line 61: every synonym of 'bed' is also on line 1 "
                 "('sky', ...), which wins every tie: 'bed' is never predicted."]
                if path.name == 'coco_object.txt' else [])
    assert warnings == expected
