"""test_scales (the seed's multi-scale extension): the pipeline at every scale, query
logits averaged at the output size before post-processing."""
import pytest
import torch
import torch.nn.functional as F
from mmseg.registry import MODELS

from conftest import TINY_ARCH

STAGES = dict(apply_self_attn_enhancement=True, apply_outlier_suppression=True,
              apply_global_debias=True, apply_ctd=True)


def build(**overrides):
    cfg = dict(type='SelfAttnCLIPSegmentor', clip=dict(arch=TINY_ARCH, pretrained=None),
               class_names=['sky', 'tree', 'road; street'], slide_crop=32, slide_stride=16,
               prob_thd=0.2, area_thd=0.05, **STAGES)
    cfg.update(overrides)
    torch.manual_seed(0)
    return MODELS.build(cfg)


@pytest.fixture(scope='module')
def images():
    return torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(0))


def test_one_scale_twice_equals_single_scale(images):
    single = build().predict(images)
    twice = build(test_scales=(1.0, 1.0)).predict(images)
    for a, b in zip(single, twice):
        torch.testing.assert_close(a.seg_logits.data, b.seg_logits.data, atol=1e-6, rtol=0)
        assert torch.equal(a.pred_sem_seg.data, b.pred_sem_seg.data)


@pytest.mark.parametrize('max_crops', [64, 2])  # crops of all scales in one call / per scale
def test_average_of_the_scales_by_hand(images, max_crops):
    scales = (0.75, 1.0, 1.5)
    model = build(test_scales=scales, max_crops_per_forward=max_crops)
    outputs = model.predict(images)
    reference = build()
    for image, output in zip(images, outputs):
        logits = 0
        for scale in scales:
            size = (round(40 * scale), round(56 * scale))
            scaled = F.interpolate(image[None], size=size, mode='bilinear', align_corners=False)
            logits = logits + reference.engine.slide_inference(scaled[0], output_size=(40, 56))
        probs, labels = reference.engine.segment_logits((logits / len(scales))[None])
        torch.testing.assert_close(output.seg_logits.data, probs[0], atol=1e-5, rtol=0)
        assert (output.pred_sem_seg.data[0] != labels[0]).float().mean() < 1e-3
    assert not torch.allclose(outputs[0].seg_logits.data,
                              build().predict(images)[0].seg_logits.data, atol=1e-3)


def test_multiscale_with_pamr_runs_and_sums_to_one(images):
    outputs = build(test_scales=(0.5, 1.0), pamr_steps=2, pamr_stride=(1, 2)).predict(images)
    for output in outputs:
        assert torch.allclose(output.seg_logits.data.sum(0), torch.ones(40, 56), atol=1e-5)


@pytest.mark.parametrize('scales', [(), (0.0, 1.0), (1.0, float('nan')), ('1',), (True,), 9])
def test_bad_scales_are_named(scales):
    with pytest.raises(ValueError, match='test_scales must be'):
        build(test_scales=scales)
