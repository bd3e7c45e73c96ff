"""Dynamic strength (the seed's extension): strength_mode='entropy' | 'cls_ratio'."""
import math

import pytest
import torch

from mmseg_selfattn.stages.self_attn_enhancement import SelfAttentionEnhancement

from conftest import build_tiny_segmentor


def attention_rows(rows):
    """(1, T, T) from a list of rows (each normalised to sum 1)."""
    attention = torch.tensor(rows, dtype=torch.float32)
    return (attention / attention.sum(-1, keepdim=True))[None]


def test_fixed_is_the_scalar_strength():
    stage = SelfAttentionEnhancement(enhancement_strength=0.2)
    assert stage.token_strength(torch.rand(2, 5, 5)) == 0.2


def test_entropy_strength_by_hand():
    # token 1 attends uniformly (H = log T), token 2 almost only to itself, token 3 to two
    attention = attention_rows([[1, 1, 1, 1], [1, 1, 1, 1], [1e-9, 1e-9, 1, 1e-9],
                                [1, 0, 0, 1]])
    stage = SelfAttentionEnhancement(enhancement_strength=0.3, strength_mode='entropy')
    strength = stage.token_strength(attention)[0]
    torch.testing.assert_close(strength, torch.tensor([0.3, 0.0, 0.3 * math.log(2) /
                                                       math.log(4)]), atol=1e-6, rtol=0)


def test_cls_ratio_strength_by_hand():
    attention = attention_rows([[1, 8, 0.5, 0.5], [1, 1, 1, 1], [1, 1, 4, 1], [1, 1, 1, 3]])
    stage = SelfAttentionEnhancement(enhancement_strength=0.5, strength_mode='cls_ratio',
                                     ratio_ref=2.0)
    a = attention[0]
    ratio = a[0, 1:] / (a.diagonal()[1:] + 1e-6)
    expected = 0.5 * torch.clamp(ratio / 2.0, max=1)
    torch.testing.assert_close(stage.token_strength(attention)[0], expected)
    assert expected[0] == 0.5 and expected[1] < 0.5  # r_1 = 3.2 is clamped, r_2 is not


def test_feature_mode_scales_each_token_by_its_own_strength():
    attention = torch.softmax(torch.randn(2, 17, 17) * 3, dim=-1)
    stage = SelfAttentionEnhancement(enhancement_strength=0.4, min_self_attn_threshold=0.9,
                                     strength_mode='entropy')
    features = torch.randn(2, 16, 8)
    deficit, strength = stage.deficit(attention), stage.token_strength(attention)
    out = stage.enhance_features(features, deficit, strength)
    torch.testing.assert_close(out, features * (1 + strength * deficit)[..., None])
    assert strength.std() > 0  # the tokens got different strengths


def build(**cfg):
    return build_tiny_segmentor(
        apply_self_attn_enhancement=True, apply_outlier_suppression=True,
        apply_global_debias=True, self_attn_enhancement_cfg=cfg)


@pytest.mark.parametrize('mode', ['feature', 'attention'])
def test_dynamic_modes_change_the_pipeline_and_fixed_is_the_default(mode):
    image = torch.randn(1, 3, 48, 48)
    base = dict(enhancement_strength=2.0, min_self_attn_threshold=0.9, mode=mode)
    default = build(**base).predict(image)[0].seg_logits.data
    fixed = build(**base, strength_mode='fixed').predict(image)[0].seg_logits.data
    assert torch.equal(default, fixed)
    for strength_mode in ('entropy', 'cls_ratio'):
        dynamic = build(**base, strength_mode=strength_mode).predict(image)[0]
        assert not torch.equal(dynamic.seg_logits.data, default)
        assert torch.isfinite(dynamic.seg_logits.data).all()


def test_log_line_names_a_dynamic_mode(log_records):
    SelfAttentionEnhancement(strength_mode='cls_ratio', ratio_ref=3.0)
    assert log_records[-1] == ('[Self-Attention Enhancement] Enabled with strength=0.1, '
                               'threshold=0.15, mode=feature, strength_mode=cls_ratio, '
                               'ratio_ref=3.0')


@pytest.mark.parametrize('cfg, key', [
    (dict(strength_mode='adaptive'), 'self_attn_enhancement_cfg.strength_mode'),
    (dict(strength_mode='cls_ratio', ratio_ref=0), 'self_attn_enhancement_cfg.ratio_ref'),
    (dict(ratio_ref=float('nan')), 'self_attn_enhancement_cfg.ratio_ref')])
def test_bad_values_are_named_at_build(cfg, key):
    with pytest.raises(ValueError, match=key.replace('.', r'\.')):
        build(**cfg)
