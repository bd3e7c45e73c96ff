"""Stage 3, self-attention enhancement: deficit, both modes, stats, log line, config errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmseg_selfattn.encoder import DenseCLIPEncoder
from mmseg_selfattn.stages.self_attn_enhancement import (SelfAttentionEnhancement,
                                                         boost_self_attention, enhance_features,
                                                         self_attention_deficit)
from mmseg.registry import MODELS

ATOL = 1e-6
THRESHOLD = 0.15
# patch diagonal A_ii of the hand-made attention: tokens 1, 3 are below 0.15, 2, 4 are not
DIAGONAL = torch.tensor([0.5, 0.05, 0.30, 0.10, 0.15])


def hand_made_attention(batch: int = 2) -> torch.Tensor:
    """(B, T, T) row-stochastic map, T = 5, with the patch diagonal DIAGONAL[1:]."""
    tokens = DIAGONAL.numel()
    off_diagonal = (1 - DIAGONAL) / (tokens - 1)
    attention = off_diagonal[:, None].expand(tokens, tokens).clone()
    attention.diagonal().copy_(DIAGONAL)
    return attention.expand(batch, tokens, tokens).clone()


def hand_made_probs(row_sum: int, heads: int = 3) -> torch.Tensor:
    """(B=2, H, T, T) dense attention; sclip-like = sum of two softmaxes (rows sum to 2)."""
    torch.manual_seed(0)
    probs = sum(torch.randn(2, heads, 5, 5).softmax(dim=-1) for _ in range(row_sum))
    return probs


def test_deficit():
    deficit = self_attention_deficit(hand_made_attention(), THRESHOLD)
    expected = torch.tensor([0.10, 0.0, 0.05, 0.0])
    assert deficit.shape == (2, 4)
    torch.testing.assert_close(deficit, expected.expand(2, 4), atol=ATOL, rtol=0)
    assert torch.all(self_attention_deficit(hand_made_attention(), 0.0) == 0)


def test_feature_mode_changes_only_low_tokens_by_the_exact_factor():
    torch.manual_seed(0)
    features = torch.randn(2, 4, 8)
    stage = SelfAttentionEnhancement(enhancement_strength=2.0, min_self_attn_threshold=THRESHOLD)
    enhanced = stage.enhance_features(features, stage.deficit(hand_made_attention()))
    factor = 1 + 2.0 * (THRESHOLD - DIAGONAL[1:])  # for tokens below the threshold
    below = DIAGONAL[1:] < THRESHOLD
    torch.testing.assert_close(enhanced[:, below], features[:, below] * factor[below, None],
                               atol=ATOL, rtol=0)
    assert torch.equal(enhanced[:, ~below], features[:, ~below])  # A_ii >= τ: untouched


def test_feature_mode_keeps_cosine_logits_but_fixed_subtraction_sees_it():
    """The honest note: (1 + s e_i) X_i has the same cosine to any text vector; only a
    later stage with a fixed-size subtraction (global debias, CTD) turns it into a change."""
    torch.manual_seed(0)
    features = torch.randn(2, 4, 16)
    texts = F.normalize(torch.randn(7, 16), dim=-1)
    deficit = self_attention_deficit(hand_made_attention(), THRESHOLD)
    enhanced = enhance_features(features, deficit, strength=5.0)

    def cosine_logits(x):
        return F.normalize(x, dim=-1) @ texts.T

    assert not torch.allclose(enhanced, features)
    torch.testing.assert_close(cosine_logits(enhanced), cosine_logits(features), atol=ATOL,
                               rtol=0)
    # global-debias-like fixed-size removal of a CLS direction c: now the scale matters
    cls_direction = torch.randn(16)
    debiased_before = cosine_logits(features - cls_direction)
    debiased_after = cosine_logits(enhanced - cls_direction)
    below = DIAGONAL[1:] < THRESHOLD
    assert not torch.allclose(debiased_after[:, below], debiased_before[:, below], atol=1e-3)
    torch.testing.assert_close(debiased_after[:, ~below], debiased_before[:, ~below], atol=ATOL,
                               rtol=0)


@pytest.mark.parametrize('row_sum', [1, 2])
def test_attention_mode_boosts_diagonal_and_keeps_row_sums(row_sum):
    probs = hand_made_probs(row_sum)
    deficit = self_attention_deficit(hand_made_attention(), THRESHOLD)
    boosted = boost_self_attention(probs, deficit, strength=3.0)
    assert torch.isfinite(boosted).all()
    torch.testing.assert_close(boosted.sum(-1), probs.sum(-1), atol=ATOL, rtol=0)
    torch.testing.assert_close(boosted.sum(-1), torch.full((2, 3, 5), float(row_sum)),
                               atol=1e-5, rtol=0)
    below = torch.cat([torch.tensor([False]), DIAGONAL[1:] < THRESHOLD])  # over T, CLS first
    diagonal, old_diagonal = boosted.diagonal(dim1=-2, dim2=-1), probs.diagonal(dim1=-2, dim2=-1)
    assert torch.all(diagonal[..., below] > old_diagonal[..., below])
    assert torch.equal(boosted[:, :, ~below], probs[:, :, ~below])  # CLS and A_ii >= τ rows
    # exact formula for a boosted row: (P_i + s e_i δ_i) * sum(P_i) / (sum(P_i) + s e_i)
    token = 1
    boost = 3.0 * deficit[:, token - 1, None]  # (B, 1)
    row = probs[:, :, token].clone()
    row[..., token] += boost
    expected = row * (row_sum / (row_sum + boost))[..., None]
    torch.testing.assert_close(boosted[:, :, token], expected, atol=1e-5, rtol=0)


def test_boost_is_finite_on_zero_rows():
    probs = torch.zeros(1, 1, 3, 3)
    boosted = boost_self_attention(probs, torch.tensor([[0.2, 0.0]]), strength=1.0)
    assert torch.isfinite(boosted).all()


def test_neutral_settings():
    features = torch.randn(2, 4, 8)
    deficit = self_attention_deficit(hand_made_attention(), THRESHOLD)
    for cfg in (dict(enhancement_strength=0.0), dict(min_self_attn_threshold=0.0)):
        stage = SelfAttentionEnhancement(**cfg)
        assert stage.probs_hook(deficit) is None
        assert stage.enhance_features(features, stage.deficit(hand_made_attention())) is features
    assert enhance_features(features, deficit, 0.0) is features


def _encoder_case(tiny_clip, images, attention):
    encoder = DenseCLIPEncoder(tiny_clip.visual, attention=attention)
    with torch.no_grad():
        encoded = encoder.encode(images, capture_attention=True)
    return encoder, encoded


@pytest.mark.parametrize('attention', ['naclip', 'sclip'])
def test_real_encoder_strength_zero_is_bitwise_off(tiny_clip, images, attention):
    encoder, encoded = _encoder_case(tiny_clip, images, attention)
    stage = SelfAttentionEnhancement(enhancement_strength=0.0, mode='attention')
    hook = stage.probs_hook(stage.deficit(encoded.attention))
    assert hook is None
    with torch.no_grad():
        assert torch.equal(encoder.dense_features(encoded, probs_hook=hook),
                           encoder.dense_features(encoded))


@pytest.mark.parametrize('attention', ['naclip', 'sclip'])
@pytest.mark.parametrize('mode', ['attention', 'feature'])
def test_real_encoder_changes_only_low_self_attention_tokens(tiny_clip, images, attention,
                                                             mode):
    encoder, encoded = _encoder_case(tiny_clip, images, attention)
    patch_self_attention = encoded.attention.diagonal(dim1=-2, dim2=-1)[:, 1:]
    threshold = patch_self_attention.median().item()  # about half the tokens below
    below = patch_self_attention < threshold
    assert below.any() and (~below).any()
    stage = SelfAttentionEnhancement(enhancement_strength=5.0, min_self_attn_threshold=threshold,
                                     mode=mode)
    deficit = stage.deficit(encoded.attention)
    with torch.no_grad():
        plain = encoder.dense_features(encoded, probs_hook=lambda probs: probs)
        if mode == 'attention':
            enhanced = encoder.dense_features(encoded, probs_hook=stage.probs_hook(deficit))
        else:
            enhanced = stage.enhance_features(plain, deficit)
        # no token below the threshold: nothing changes
        low = SelfAttentionEnhancement(enhancement_strength=5.0,
                                       min_self_attn_threshold=patch_self_attention.min().item(),
                                       mode=mode)
        low_deficit = low.deficit(encoded.attention)
        unchanged = (encoder.dense_features(encoded, probs_hook=low.probs_hook(low_deficit))
                     if mode == 'attention' else low.enhance_features(plain, low_deficit))
    assert torch.isfinite(enhanced).all()
    changed = (enhanced - plain).abs().amax(dim=-1) > 1e-4
    assert torch.equal(changed, below)
    torch.testing.assert_close(unchanged, plain, atol=1e-6, rtol=0)


def test_attention_mode_is_a_no_op_for_maskclip(tiny_clip, images):
    encoder, encoded = _encoder_case(tiny_clip, images, 'maskclip')
    stage = SelfAttentionEnhancement(enhancement_strength=5.0, min_self_attn_threshold=1.0,
                                     mode='attention')
    with torch.no_grad():
        assert torch.equal(
            encoder.dense_features(encoded,
                                   probs_hook=stage.probs_hook(stage.deficit(encoded.attention))),
            encoder.dense_features(encoded))


def test_stats_match_numpy():
    stage = SelfAttentionEnhancement(min_self_attn_threshold=THRESHOLD)
    attention = hand_made_attention()
    attention[1, 2, 2] = 0.02  # make the two crops differ
    patch_diagonal = np.concatenate([np.diag(a)[1:] for a in attention.numpy()])
    expected = dict(mean=patch_diagonal.mean(), std=patch_diagonal.std(),
                    min=patch_diagonal.min(), max=patch_diagonal.max(),
                    below_threshold=(patch_diagonal < THRESHOLD).mean())
    stats = stage.get_self_attention_stats(attention)
    assert set(stats) == {'mean', 'std', 'min', 'max', 'below_threshold'}
    assert all(type(value) is float for value in stats.values())
    for key, value in expected.items():
        assert stats[key] == pytest.approx(float(value), abs=1e-6), key
    assert stats['below_threshold'] == pytest.approx(5 / 8)
    single = stage.get_self_attention_stats(hand_made_attention()[0])  # (T, T)
    assert single['below_threshold'] == pytest.approx(0.5)
    assert single['min'] == pytest.approx(0.05) and single['max'] == pytest.approx(0.30)
    with pytest.raises(ValueError, match='attention must be'):
        stage.get_self_attention_stats(torch.ones(2, 3))


def test_log_line_emitted_once_with_values(log_records):
    SelfAttentionEnhancement(enhancement_strength=0.3, min_self_attn_threshold=0.2,
                             mode='attention')
    expected = ('[Self-Attention Enhancement] Enabled with strength=0.3, threshold=0.2, '
                'mode=attention')
    assert [r for r in log_records if 'Self-Attention Enhancement' in r] == [expected]
    log_records.clear()
    SelfAttentionEnhancement()
    assert log_records == ['[Self-Attention Enhancement] Enabled with strength=0.1, '
                           'threshold=0.15, mode=feature']


def test_build_from_registry():
    stage = MODELS.build(dict(type='SelfAttentionEnhancement', enhancement_strength=0.5,
                              mode='attention'))
    assert isinstance(stage, SelfAttentionEnhancement)
    assert (stage.strength, stage.threshold, stage.mode) == (0.5, 0.15, 'attention')
    assert SelfAttentionEnhancement.cfg_key == 'self_attn_enhancement_cfg'


@pytest.mark.parametrize('cfg, message', [
    (dict(enhancement_strength=-1), r'self_attn_enhancement_cfg\.enhancement_strength must be '
                                    r'a number in \[0, inf\), got -1'),
    (dict(enhancement_strength=float('nan')), r'self_attn_enhancement_cfg\.enhancement_strength'),
    (dict(min_self_attn_threshold=1.5), r'self_attn_enhancement_cfg\.min_self_attn_threshold '
                                        r'must be a number in \[0, 1\], got 1\.5'),
    (dict(min_self_attn_threshold=-0.1), r'self_attn_enhancement_cfg\.min_self_attn_threshold'),
    (dict(mode='both'), r"self_attn_enhancement_cfg\.mode must be one of \['feature', "
                        r"'attention'\], got 'both'"),
])
def test_validation_errors(cfg, message):
    with pytest.raises(ValueError, match=message):
        SelfAttentionEnhancement(**cfg)
