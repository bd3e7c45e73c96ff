"""Prevention (SPEC §1.4, score_attention): outlier suppression scores with the attention
that self-attention enhancement boosted, so enhanced tokens are less often outliers."""
import numpy as np
import pytest
import torch
from mmseg.registry import MODELS

from mmseg_selfattn.stages.outlier_suppression import OutlierSuppression
from mmseg_selfattn.stages.self_attn_enhancement import (enhanced_attention,
                                                         self_attention_deficit)

from conftest import TINY_ARCH

GRID, THRESHOLD, MIN_RATIO = (4, 4), 0.15, 1.0


def planted_attention(seed=0):
    """(1, 17, 17) rows summing to 1: tokens 1-8 attend weakly to themselves
    (A_ii = 0.02..0.04) with r_i = 1.2..4.5; tokens 9-16 have A_ii = 0.3, r_i = 0.05."""
    rng = np.random.default_rng(seed)
    diagonal = np.r_[np.linspace(0.02, 0.04, 8), np.full(8, 0.3)]
    cls_row = diagonal * np.r_[np.linspace(1.2, 4.5, 8), np.full(8, 0.05)]
    attention = rng.uniform(0.5, 1.5, (17, 17))
    attention[0, 1:], attention[0, 0] = cls_row, 1 - cls_row.sum()
    for i in range(1, 17):  # the planted diagonal, the rest of the row spread to sum 1
        others = [j for j in range(17) if j != i]
        attention[i, others] *= (1 - diagonal[i - 1]) / attention[i, others].sum()
        attention[i, i] = diagonal[i - 1]
    assert attention.min() > 0
    return torch.tensor(attention, dtype=torch.float32)[None]


@pytest.mark.parametrize('strength', [0.3, 1.0, 3.0])
def test_detected_outliers_drop_by_the_predicted_amount(strength):
    attention = planted_attention()
    assert torch.allclose(attention.sum(-1), torch.ones(1, 17))
    deficit = self_attention_deficit(attention, THRESHOLD)
    stage = OutlierSuppression(top_k=16, min_ratio=MIN_RATIO)
    features = torch.randn(1, 16, 8)
    stage(features, attention, GRID)
    original = int((stage.last_outlier_indices >= 0).sum())
    stage(features, enhanced_attention(attention, deficit, strength), GRID)
    enhanced = int((stage.last_outlier_indices >= 0).sum())
    # predicted by hand: Ã_ii = (A_ii + s e_i) / (1 + s e_i), Ã[cls, i] = A[cls, i]
    a = attention[0].double().numpy()
    diag, cls_row = np.diag(a)[1:], a[0, 1:]
    e = np.maximum(0, THRESHOLD - diag)
    predicted = cls_row / ((diag + strength * e) / (1 + strength * e) + 1e-6)
    assert original == int((cls_row / (diag + 1e-6) > MIN_RATIO).sum()) == 8
    assert enhanced == int((predicted > MIN_RATIO).sum())
    assert enhanced < original  # the boost prevents some outliers
    torch.testing.assert_close(stage.last_scores[0].double(), torch.from_numpy(predicted),
                               rtol=1e-5, atol=1e-6)


def test_enhanced_attention_rows_keep_their_sums_and_the_cls_row():
    attention = planted_attention(seed=1)
    deficit = self_attention_deficit(attention, THRESHOLD)
    boosted = enhanced_attention(attention, deficit, 0.5)
    torch.testing.assert_close(boosted.sum(-1), attention.sum(-1))
    assert torch.equal(boosted[:, 0], attention[:, 0])
    assert torch.equal(boosted[:, 9:], attention[:, 9:])  # A_ii >= tau: untouched


def build(**overrides):
    cfg = dict(type='SelfAttnCLIPSegmentor', clip=dict(arch=TINY_ARCH, pretrained=None),
               class_names=['sky', 'tree', 'road'], slide_crop=32, slide_stride=16,
               apply_self_attn_enhancement=True, apply_outlier_suppression=True,
               self_attn_enhancement_cfg=dict(enhancement_strength=2.0,
                                              min_self_attn_threshold=0.5))
    cfg.update(overrides)
    torch.manual_seed(0)
    return MODELS.build(cfg)


@pytest.mark.parametrize('mode', ['feature', 'attention'])
def test_segmentor_scores_with_the_enhanced_attention_in_both_modes(mode):
    model = build(self_attn_enhancement_cfg=dict(enhancement_strength=2.0,
                                                 min_self_attn_threshold=0.5, mode=mode))
    crops = torch.randn(3, 3, 32, 32)
    encoded = model.pipeline.encode_crops(crops)
    deficit = model.pipeline.self_attn_enhancement.deficit(encoded.attention)
    model.pipeline.stage_patch_logits(encoded)
    assert model.pipeline.outliers_score_enhanced
    expected = model.pipeline.outlier_suppression.last_scores.clone()
    stage = OutlierSuppression()
    stage(torch.randn(3, 16, 4), enhanced_attention(encoded.attention, deficit, 2.0), (4, 4))
    assert torch.equal(expected, stage.last_scores)


@pytest.mark.parametrize('overrides', [
    dict(outlier_suppression_cfg=dict(score_attention='original')),
    dict(apply_self_attn_enhancement=False),
    dict(self_attn_enhancement_cfg=dict(enhancement_strength=0.0))])
def test_original_scores_when_asked_or_without_enhancement(overrides):
    model = build(**overrides)
    assert not model.pipeline.outliers_score_enhanced
    encoded = model.pipeline.encode_crops(torch.randn(2, 3, 32, 32), capture_attention=True)
    model.pipeline.stage_patch_logits(encoded)
    stage = OutlierSuppression()
    stage(torch.randn(2, 16, 4), encoded.attention, (4, 4))
    assert torch.equal(model.pipeline.outlier_suppression.last_scores, stage.last_scores)


def test_score_attention_is_validated():
    with pytest.raises(ValueError, match='outlier_suppression_cfg.score_attention'):
        build(outlier_suppression_cfg=dict(score_attention='boosted'))
