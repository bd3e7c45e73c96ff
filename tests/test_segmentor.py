"""Whole-image inference of the registered segmentor."""
import pytest
import torch
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

from mmseg_selfattn.sliding_window import pad_to_patch_multiple, sliding_windows

from conftest import TINY_ARCH

CLASSES = ['sky, clouds', 'tree', 'road; street; lane']


def build(**overrides):
    cfg = dict(type='SelfAttnCLIPSegmentor', clip=dict(arch=TINY_ARCH, pretrained=None),
               class_names=CLASSES, slide_crop=32, slide_stride=16)
    cfg.update(overrides)
    torch.manual_seed(0)
    return MODELS.build(cfg)


@pytest.fixture(scope='module')
def segmentor():
    return build()


def test_sliding_windows_cover_the_image_with_equal_crops():
    windows = sliding_windows(50, 70, 32, 16)
    assert {(y2 - y1, x2 - x1) for y1, y2, x1, x2 in windows} == {(32, 32)}
    covered = torch.zeros(50, 70)
    for y1, y2, x1, x2 in windows:
        covered[y1:y2, x1:x2] += 1
    assert covered.min() >= 1
    assert windows[-1][1] == 50 and windows[-1][3] == 70
    assert sliding_windows(20, 70, 32, 16)[0][:2] == (0, 20)  # shorter than a crop
    assert sliding_windows(50, 70, 0, 16) == [(0, 50, 0, 70)]


def test_batched_crops_equal_crop_by_crop(segmentor):
    image = torch.randn(3, 50, 70)
    batched = segmentor.engine.slide_inference(image)
    segmentor.engine.max_crops_per_forward = 1
    try:
        one_by_one = segmentor.engine.slide_inference(image)
    finally:
        segmentor.engine.max_crops_per_forward = 64
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=0)
    # and equal to averaging crop_logits of each window by hand
    expected = torch.zeros_like(batched)
    count = torch.zeros(1, 50, 70)
    for y1, y2, x1, x2 in sliding_windows(50, 70, 32, 16):
        expected[:, y1:y2, x1:x2] += segmentor.pipeline.crop_logits(image[None, :, y1:y2, x1:x2])[0]
        count[:, y1:y2, x1:x2] += 1
    torch.testing.assert_close(batched, expected / count, atol=1e-5, rtol=0)


@pytest.mark.parametrize('size', [(20, 13), (5, 40), (32, 32), (8, 8)])
def test_images_smaller_than_a_crop(segmentor, size):
    samples = segmentor.predict(torch.randn(1, 3, *size))
    assert samples[0].pred_sem_seg.data.shape == (1, *size)
    assert torch.isfinite(samples[0].seg_logits.data).all()


def test_padding_is_centred_and_cut():
    crops, (left, top) = pad_to_patch_multiple(torch.ones(1, 3, 13, 20), (8, 8))
    assert crops.shape[-2:] == (16, 24) and (left, top) == (2, 1)
    assert crops[..., top:top + 13, left:left + 20].eq(1).all() and crops.sum() == 3 * 13 * 20


def test_whole_image_mode(segmentor):
    whole = build(slide_crop=0)
    logits = whole.engine.slide_inference(torch.randn(3, 24, 40))
    assert logits.shape == (6, 24, 40)  # 6 queries


def test_predict_outputs_follow_the_published_postprocessing(segmentor):
    inputs = torch.randn(2, 3, 40, 48)
    samples = segmentor.predict(inputs)
    for image, sample in zip(inputs, samples):
        logits = segmentor.engine.slide_inference(image)
        probs = (40.0 * logits).softmax(0)
        per_class = torch.stack([probs[0:2].max(0).values, probs[2], probs[3:6].max(0).values])
        torch.testing.assert_close(sample.seg_logits.data,
                                   per_class / per_class.sum(0, keepdim=True))
        assert torch.equal(sample.pred_sem_seg.data[0], per_class.argmax(0))


def test_resized_to_original_shape(segmentor):
    sample = SegDataSample(metainfo=dict(img_shape=(40, 48), ori_shape=(80, 96)))
    padded = torch.randn(1, 3, 48, 56)  # batch padding beyond img_shape is dropped
    out = segmentor.predict(padded, [sample])[0]
    assert out.pred_sem_seg.data.shape == (1, 80, 96)
    assert out.seg_logits.data.shape == (3, 80, 96)


def test_prob_and_area_thresholds_send_pixels_to_background(segmentor):
    # queries: 0-1 -> class 0, 2 -> class 1, 3-5 -> class 2; logit_scale 40
    logits = torch.zeros(1, 6, 4, 5)
    logits[0, 2] = 0.1  # class 1 confident everywhere (p = e^4 / (e^4 + 5) = 0.92) ...
    logits[0, 3, 0, 0] = 0.2  # ... but class 2 wins one pixel (5% of the area)
    logits[0, 2, 3, 4] = 0.01  # one unsure pixel of class 1 (p = 0.23)
    _, plain = segmentor.engine.segment_logits(logits)
    assert plain[0, 0, 0] == 2 and plain[0, 3, 4] == 1 and (plain == 1).sum() == 19
    segmentor.engine.prob_thd, segmentor.engine.area_thd = 0.5, 0.1
    try:
        _, labels = segmentor.engine.segment_logits(logits)
    finally:
        segmentor.engine.prob_thd, segmentor.engine.area_thd = 0.0, 0.0
    assert labels[0, 0, 0] == 0 and labels[0, 3, 4] == 0
    assert (labels == 1).sum() == 18


def test_segment_logits_is_the_published_softmax_then_synonym_max(segmentor):
    logits = torch.randn(2, 6, 7, 9) * 0.1
    probs, labels = segmentor.engine.segment_logits(logits)
    query_probs = (40.0 * logits).softmax(1)
    per_class = torch.stack([query_probs[:, 0:2].amax(1), query_probs[:, 2],
                             query_probs[:, 3:6].amax(1)], dim=1)
    torch.testing.assert_close(probs, per_class / per_class.sum(1, keepdim=True))
    assert torch.equal(labels, per_class.argmax(1))


def test_pamr_runs_on_logits():
    refined = build(pamr_steps=2, pamr_stride=(1, 2))
    plain = build()
    inputs = torch.randn(1, 3, 40, 48)
    a = refined.predict(inputs)[0].seg_logits.data
    b = plain.predict(inputs)[0].seg_logits.data
    assert a.shape == b.shape and torch.isfinite(a).all() and not torch.allclose(a, b)


def test_deterministic(segmentor):
    inputs = torch.randn(1, 3, 40, 48)
    a = segmentor.predict(inputs)[0].seg_logits.data
    b = segmentor.predict(inputs)[0].seg_logits.data
    assert torch.equal(a, b)


def test_name_path_file(tmp_path):
    (tmp_path / 'names.txt').write_text('cat\ndog, puppy\n')
    model = build(class_names=None, name_path=str(tmp_path / 'names.txt'))
    assert model.class_names == (('cat', ), ('dog', 'puppy'))


@pytest.mark.parametrize('overrides, message', [
    (dict(attention='bogus'), "attention='bogus' is not a dense variant"),
    (dict(slide_stride=40), 'slide_stride=40 > slide_crop=32'),
    (dict(slide_crop=-1), 'slide_crop must be an int >= 0'),
    (dict(logit_scale=0), r'logit_scale must be a number in \(0'),
    (dict(prob_thd=1.5), r'prob_thd must be a number in \[0, 1\]'),
    (dict(prob_thd=0.1, bg_idx=7), r'bg_idx must be a class index in \[0, 2\]'),
    (dict(pamr_steps=-1), 'pamr_steps must be an int >= 0'),
    (dict(pamr_steps=1, pamr_stride=(0, )), 'pamr_stride'),
    (dict(class_names=None), 'set exactly one of name_path'),
    (dict(name_path='/no/such/file.txt', class_names=None), "name_path='/no/such/file.txt'"),
    (dict(apply_ctd='yes'), 'apply_ctd must be True or False'),
    (dict(apply_ctd=True, ctd_cfg=dict(eps=0)), r'ctd_cfg.eps must be a number in \(0, 2\]'),
    (dict(self_attn_enhancement_cfg=dict(strenght=1)),
     r"self_attn_enhancement_cfg: unknown key\(s\) \['strenght'\]; allowed: "
     r"\['enhancement_strength'"),
    (dict(apply_self_attn_enhancement=True, self_attn_enhancement_cfg=dict(mode='both')),
     'self_attn_enhancement_cfg.mode must be one of'),
    (dict(apply_self_attn_enhancement=True,
          self_attn_enhancement_cfg=dict(enhancement_strength=-0.1)),
     'self_attn_enhancement_cfg.enhancement_strength'),
    (dict(apply_self_attn_enhancement=True,
          self_attn_enhancement_cfg=dict(min_self_attn_threshold=1.5)),
     r'self_attn_enhancement_cfg.min_self_attn_threshold must be a number in \[0, 1\]'),
    (dict(apply_outlier_suppression=True, outlier_suppression_cfg=dict(top_k=-1)),
     'outlier_suppression_cfg.top_k must be an int >= 0'),
    (dict(apply_global_debias=True, global_debias_cfg=dict(factor=-1)),
     'global_debias_cfg.factor'),
    (dict(apply_similarity_enhancement=True, attention='maskclip'), 'needs attention logits'),
    (dict(apply_similarity_enhancement=True, similarity_enhancement_cfg=dict(layer=5)),
     'similarity_enhancement_cfg.layer: mid layer 5 is out of range'),
    (dict(similarity_enhancement_cfg=dict(type='NoSuchStage')), 'type is not registered'),
    (dict(cls_token_lambda='a'), 'cls_token_lambda must be a number'),
    (dict(compile='yes'), 'compile must be True or False'),
    (dict(clip=dict(arch='RN50', pretrained=None)), "clip.arch='RN50' is not supported"),
])
def test_bad_config_fails_at_build(overrides, message):
    with pytest.raises((ValueError, NotImplementedError, FileNotFoundError), match=message):
        build(**overrides)


def test_training_is_refused(segmentor):
    with pytest.raises(NotImplementedError, match='training-free'):
        segmentor.loss(torch.zeros(1, 3, 32, 32), [SegDataSample()])


def test_extract_feat_and_forward(segmentor):
    assert segmentor.extract_feat(torch.randn(2, 3, 30, 40)).shape == (2, 20, 32)
    assert segmentor._forward(torch.randn(2, 3, 30, 40)).shape == (2, 6, 30, 40)


def test_mmcv_ops_standin_is_installed():
    import mmcv.ops
    import mmseg.models.losses.focal_loss  # noqa: F401  imports mmcv.ops at module level
    from mmseg.apis import init_model  # noqa: F401
    assert getattr(mmcv.ops, '__mmseg_selfattn_standin__', False)
    with pytest.raises(RuntimeError, match='needs the compiled mmcv ops'):
        mmcv.ops.sigmoid_focal_loss(torch.zeros(1), torch.zeros(1))
    values = torch.arange(16.).view(1, 1, 4, 4)
    corners = mmcv.ops.point_sample(values, torch.tensor([[[0.125, 0.125], [0.875, 0.875]]]))
    assert corners.flatten().tolist() == [0.0, 15.0]


def test_inference_wrapper_delegates_test_step():
    from mmseg_selfattn import InferenceOnlyWrapper
    wrapper = InferenceOnlyWrapper(build(data_preprocessor=dict(
        type='mmseg.SegDataPreProcessor', mean=[122.771, 116.746, 104.094],
        std=[68.501, 66.632, 70.323], bgr_to_rgb=True)))
    data = dict(inputs=[torch.randint(0, 255, (3, 24, 40), dtype=torch.uint8)],
                data_samples=[SegDataSample(metainfo=dict(img_shape=(24, 40),
                                                          ori_shape=(24, 40)))])
    out = wrapper.test_step(data)
    assert out[0].pred_sem_seg.data.shape == (1, 24, 40)


def test_mixed_size_batch_equals_images_one_by_one(segmentor):
    sizes = [(40, 48), (24, 56), (48, 30)]
    images = [torch.randn(3, *size, generator=torch.Generator().manual_seed(i))
              for i, size in enumerate(sizes)]
    padded = torch.zeros(3, 3, 48, 56)
    for slot, image in zip(padded, images):
        slot[:, :image.shape[1], :image.shape[2]] = image
    samples = [SegDataSample(metainfo=dict(img_shape=size, ori_shape=size)) for size in sizes]
    segmentor.engine.max_crops_per_forward = 5  # chunks mix crops of different images
    try:
        batched = segmentor.predict(padded, samples)
    finally:
        segmentor.engine.max_crops_per_forward = 64
    for image, sample in zip(images, batched):
        single = segmentor.predict(image[None])[0]
        torch.testing.assert_close(sample.seg_logits.data, single.seg_logits.data, atol=1e-5,
                                   rtol=0)
        assert torch.equal(sample.pred_sem_seg.data, single.pred_sem_seg.data)


def test_bf16_autocast_is_close_to_fp32():
    inputs = torch.randn(1, 3, 40, 48, generator=torch.Generator().manual_seed(3))
    fp32 = build().engine.slide_inference(inputs[0])
    bf16 = build(precision='bf16').engine.slide_inference(inputs[0])
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    assert (bf16 - fp32).abs().max() < 0.05  # cosine logits, bf16 has ~3 digits


def test_unknown_precision_is_rejected():
    with pytest.raises(ValueError, match=r"precision must be one of \['fp32', 'fp16', 'bf16', 'auto'\]"):
        build(precision='fp64')


def test_checkpoint_with_the_keys_before_the_pipeline_split_loads():
    """Before crop_pipeline.py the encoder and text classifier were the segmentor's own
    children (keys ``encoder.*``, ``text_classifier.*``): such checkpoints still load."""
    model = build(apply_global_debias=True)
    old_layout = {key.removeprefix('pipeline.'): value + 1.0
                  for key, value in model.state_dict().items()}
    assert any(key.startswith('encoder.visual.') for key in old_layout)
    model.load_state_dict(old_layout, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, old_layout[key.removeprefix('pipeline.')]), key
