"""Stage 2, similarity enhancement: S against numpy, the bias, and its effect on the dense attention."""
import numpy as np
import pytest
import torch

from mmseg_selfattn.dense_attention import attention_probs
from mmseg_selfattn.encoder import DenseCLIPEncoder
from mmseg_selfattn.stages.similarity_enhancement import (SimilarityEnhancement,
                                                          mid_layer_similarity,
                                                          similarity_logit_bias)
from mmseg.registry import MODELS

ATOL = 1e-6


def numpy_cosine(features: np.ndarray) -> np.ndarray:
    """(B, N, C) -> (B, N, N), written independently of the package."""
    norms = np.sqrt((features**2).sum(-1, keepdims=True))
    return np.einsum('bic,bjc->bij', features / norms, features / norms)


def encode(tiny_clip, images, attention, layers=(0, 1)):
    encoder = DenseCLIPEncoder(tiny_clip.visual, attention=attention)
    with torch.no_grad():
        encoded = encoder.encode(images, mid_layers=layers)
    return encoder, encoded


def test_similarity_matches_numpy():
    torch.manual_seed(0)
    features = torch.randn(2, 6, 5, dtype=torch.float64)
    similarity = mid_layer_similarity([features])
    np.testing.assert_allclose(similarity.numpy(), numpy_cosine(features.numpy()), atol=1e-12)
    assert similarity.shape == (2, 6, 6) and similarity.dtype == torch.float64


def test_several_layers_average():
    torch.manual_seed(0)
    first, second = torch.randn(2, 6, 5), torch.randn(2, 6, 9)  # widths may differ
    expected = (numpy_cosine(first.numpy()) + numpy_cosine(second.numpy())) / 2
    np.testing.assert_allclose(mid_layer_similarity([first, second]).numpy(), expected,
                               atol=ATOL)
    stage = SimilarityEnhancement(layer=[0, 1], weight=2.0, temperature=0.5)
    bias = stage.attention_bias([first, second])
    np.testing.assert_allclose(bias[:, 1:, 1:].numpy(), 2.0 * expected / 0.5, atol=1e-5)


def test_bias_layout_and_dtype():
    torch.manual_seed(0)
    features = torch.randn(3, 4, 8)
    similarity = mid_layer_similarity([features])
    bias = similarity_logit_bias(similarity, weight=3.0, temperature=2.0)
    assert bias.shape == (3, 5, 5)
    assert torch.all(bias[:, 0] == 0) and torch.all(bias[:, :, 0] == 0)
    torch.testing.assert_close(bias[:, 1:, 1:], 3.0 * similarity / 2.0, atol=ATOL, rtol=0)
    half = similarity_logit_bias(mid_layer_similarity([features.to(torch.bfloat16)]), 1.0)
    assert half.dtype == torch.bfloat16


def test_zero_feature_gives_no_nan():
    features = torch.randn(1, 4, 8)
    features[0, 2] = 0
    similarity = mid_layer_similarity([features])
    assert torch.isfinite(similarity).all()
    assert torch.all(similarity[0, 2] == 0)


def test_add_self_similarity_false_zeroes_diagonal():
    torch.manual_seed(0)
    similarity = mid_layer_similarity([torch.randn(2, 5, 8)])
    with_self = similarity_logit_bias(similarity, 1.0, add_self_similarity=True)
    without = similarity_logit_bias(similarity, 1.0, add_self_similarity=False)
    assert torch.allclose(with_self[:, 1:, 1:].diagonal(dim1=-2, dim2=-1), torch.ones(2, 5))
    assert torch.all(without.diagonal(dim1=-2, dim2=-1) == 0)
    off_diagonal = ~torch.eye(6, dtype=torch.bool)
    assert torch.equal(with_self[:, off_diagonal], without[:, off_diagonal])


def test_threshold_masks_pairs_never_a_whole_row():
    torch.manual_seed(0)
    similarity = mid_layer_similarity([torch.randn(2, 6, 8)])
    bias = similarity_logit_bias(similarity, 1.0, threshold=0.2)
    patch_bias = bias[:, 1:, 1:]
    off_diagonal = ~torch.eye(6, dtype=torch.bool)
    dropped = (similarity < 0.2) & off_diagonal
    assert dropped.any() and (~dropped & off_diagonal).any()
    assert torch.all(patch_bias[dropped] == float('-inf'))
    assert torch.isfinite(patch_bias[~dropped]).all()
    assert torch.all(bias[:, 0] == 0) and torch.all(bias[:, :, 0] == 0)
    # threshold 1 keeps only each token's own entry (and CLS)
    strict = similarity_logit_bias(similarity, 1.0, threshold=1.0)[:, 1:, 1:]
    assert torch.isfinite(strict.diagonal(dim1=-2, dim2=-1)).all()
    assert torch.all(strict[:, off_diagonal] == float('-inf'))


@pytest.mark.parametrize('attention, row_sum', [('clearclip', 1), ('naclip', 1), ('sclip', 2),
                                                ('vanilla', 1), ('gated', 1)])
def test_masked_softmax_rows_finite(tiny_clip, images, attention, row_sum):
    encoder, encoded = encode(tiny_clip, images, attention)
    stage = SimilarityEnhancement(layer=[0, 1], weight=1.0, threshold=0.9)
    bias = stage.attention_bias([encoded.mid_features[0], encoded.mid_features[1]])
    assert (bias == float('-inf')).any()
    probs = attention_probs(encoder.variant, encoded.q, encoded.k, bias[:, None])
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(-1), torch.full(probs.shape[:-1], float(row_sum)))
    masked = (bias == float('-inf'))[:, None].expand_as(probs)
    assert torch.all(probs[masked] == 0)
    with torch.no_grad():
        features = encoder.dense_features(encoded, logit_bias=bias)
    assert torch.isfinite(features).all()


@pytest.mark.parametrize('attention', ['naclip', 'sclip', 'clearclip', 'maskclip'])
def test_weight_zero_is_bitwise_off(tiny_clip, images, attention):
    encoder, encoded = encode(tiny_clip, images, attention)
    stage = SimilarityEnhancement(layer=0, weight=0)
    bias = stage.attention_bias([encoded.mid_features[0]])
    assert bias is None
    with torch.no_grad():
        assert torch.equal(encoder.dense_features(encoded, logit_bias=bias),
                           encoder.dense_features(encoded))
    # threshold -1 drops nothing: still neutral
    assert SimilarityEnhancement(layer=0, weight=0, threshold=-1).attention_bias(
        [encoded.mid_features[0]]) is None


def test_weight_changes_dense_features(tiny_clip, images):
    encoder, encoded = encode(tiny_clip, images, 'naclip')
    bias = SimilarityEnhancement(layer=1, weight=5.0).attention_bias([encoded.mid_features[1]])
    with torch.no_grad():
        enhanced = encoder.dense_features(encoded, logit_bias=bias)
        plain = encoder.dense_features(encoded)
    assert not torch.allclose(enhanced, plain, atol=1e-3)


@pytest.mark.parametrize('attention', ['clearclip', 'sclip', 'naclip'])
@pytest.mark.parametrize('add_self_similarity', [True, False])
def test_huge_weight_attention_follows_similarity(tiny_clip, images, attention,
                                                  add_self_similarity):
    """With weight 1e4 the bias dominates: each patch attends to its most similar patch."""
    encoder, encoded = encode(tiny_clip, images, attention)
    mids = [encoded.mid_features[0], encoded.mid_features[1]]
    stage = SimilarityEnhancement(layer=[0, 1], weight=1e4, temperature=1.0,
                                  add_self_similarity=add_self_similarity)
    bias = stage.attention_bias(mids)
    probs = attention_probs(encoder.variant, encoded.q, encoded.k, bias[:, None])
    similarity = mid_layer_similarity(mids)
    if not add_self_similarity:  # the diagonal gets bias 0, like S_ii = 0
        similarity = similarity - torch.diag_embed(similarity.diagonal(dim1=-2, dim2=-1))
    expected = similarity.argmax(dim=-1)  # (B, N)
    patch_argmax = probs[:, :, 1:, 1:].argmax(dim=-1)  # (B, H, N)
    assert torch.equal(patch_argmax, expected[:, None].expand_as(patch_argmax))
    if add_self_similarity:
        assert torch.equal(expected, torch.arange(16).expand(2, 16))


def test_mid_feature_count_must_match_layers():
    stage = SimilarityEnhancement(layer=[0, 1])
    with pytest.raises(ValueError, match=r'similarity_enhancement_cfg: expected .* 2 layer'):
        stage.attention_bias([torch.randn(1, 4, 8)])


def test_build_from_registry_and_layers():
    stage = MODELS.build(dict(type='SimilarityEnhancement', layer=(0, -2), weight=0.5))
    assert isinstance(stage, SimilarityEnhancement)
    assert stage.layers == (0, -2)
    assert SimilarityEnhancement().layers == (-4, )
    assert SimilarityEnhancement.cfg_key == 'similarity_enhancement_cfg'


@pytest.mark.parametrize('cfg, message', [
    (dict(weight=-1), r'similarity_enhancement_cfg\.weight must be a number in \[0, inf\), '
                      r'got -1'),
    (dict(weight=float('inf')), r'similarity_enhancement_cfg\.weight must be'),
    (dict(temperature=0), r'similarity_enhancement_cfg\.temperature must be a number in '
                          r'\(0, inf\), got 0'),
    (dict(threshold=2), r'similarity_enhancement_cfg\.threshold must be a number in '
                        r'\[-1, 1\], got 2'),
    (dict(layer=[]), r'similarity_enhancement_cfg\.layer must be an int or a non-empty list'),
    (dict(layer=1.5), r'similarity_enhancement_cfg\.layer must be an int .*got 1\.5'),
    (dict(layer=[0, '1']), r'similarity_enhancement_cfg\.layer must be an int'),
    (dict(layer=True), r'similarity_enhancement_cfg\.layer must be an int'),
    (dict(add_self_similarity=1), r'similarity_enhancement_cfg\.add_self_similarity must be '
                                  r'True or False'),
])
def test_validation_errors(cfg, message):
    with pytest.raises(ValueError, match=message):
        SimilarityEnhancement(**cfg)
