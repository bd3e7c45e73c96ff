"""Class-specific thresholds (the seed's extension): a token's τ is its class's."""
import pytest
import torch
import torch.nn.functional as F
from mmseg.registry import MODELS

from conftest import TINY_ARCH

CLASSES = ['sky, clouds', 'tree', 'road; street']


def build(mode='feature', **sa_cfg):
    torch.manual_seed(0)
    return MODELS.build(dict(
        type='SelfAttnCLIPSegmentor', clip=dict(arch=TINY_ARCH, pretrained=None),
        class_names=CLASSES, slide_crop=32, slide_stride=16,
        apply_self_attn_enhancement=True, apply_outlier_suppression=True,
        apply_global_debias=True,
        self_attn_enhancement_cfg=dict(enhancement_strength=2.0, mode=mode, **sa_cfg)))


def test_deficit_uses_the_threshold_of_each_tokens_class():
    thresholds = {'clouds': 0.9, 'road': 0.02}  # synonyms name their class
    model = build(min_self_attn_threshold=0.3, class_thresholds=thresholds)
    crops = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    encoded = model.pipeline.encode_crops(crops)
    deficit, _ = model.pipeline.enhancement_inputs(encoded)
    # by hand: classes under the unenhanced dense features, then max(0, τ_c - A_ii)
    plain = model.pipeline.encoder.dense_features(encoded)
    queries = model.pipeline.text_classifier.query_embeddings(model.class_names)
    classes = torch.tensor([0, 0, 1, 2, 2])[(F.normalize(plain, dim=-1) @ queries.T).argmax(-1)]
    tau = torch.tensor([0.9, 0.3, 0.02])[classes]
    expected = (tau - encoded.attention.diagonal(dim1=-2, dim2=-1)[:, 1:]).clamp_min(0)
    torch.testing.assert_close(deficit, expected)
    assert len(classes.unique()) > 1  # the test sees several classes


@pytest.mark.parametrize('mode', ['feature', 'attention'])
def test_neutral_values_equal_the_plain_pipeline(mode):
    image = torch.randn(1, 3, 48, 48)
    plain = build(mode, min_self_attn_threshold=0.3).predict(image)[0].seg_logits.data
    for thresholds in (None, {}, {'tree': 0.3, 'sky': 0.3}):
        same = build(mode, min_self_attn_threshold=0.3,
                     class_thresholds=thresholds).predict(image)[0].seg_logits.data
        assert torch.equal(same, plain)
    other = build(mode, min_self_attn_threshold=0.3,
                  class_thresholds={'tree': 0.95}).predict(image)[0].seg_logits.data
    assert not torch.equal(other, plain) and torch.isfinite(other).all()


def test_unknown_classes_are_rejected_with_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown class\(es\) \['person'\]; the classes "
                       r"are \['sky', 'tree', 'road'\]"):
        build(class_thresholds={'person': 0.2, 'sky': 0.1})


@pytest.mark.parametrize('value', [[('sky', 0.1)], {'sky': 1.5}, {'sky': float('nan')},
                                   {3: 0.1}])
def test_bad_values_are_named(value):
    with pytest.raises(ValueError, match='self_attn_enhancement_cfg.class_thresholds'):
        build(class_thresholds=value)
