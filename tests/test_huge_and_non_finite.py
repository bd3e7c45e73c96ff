"""Huge images in bounded memory (banded merge, chunked crops) give the unbounded
outputs; non-finite values never spread between windows and are reported naming the image
and the stage that produced them."""
import pytest
import torch
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

from conftest import TINY_ARCH

CLASSES = ['sky, clouds', 'tree', 'road; street; lane', 'car']
ALL_STAGES = dict(
    apply_similarity_enhancement=True, similarity_enhancement_cfg=dict(layer=-2),
    apply_self_attn_enhancement=True, apply_outlier_suppression=True,
    outlier_suppression_cfg=dict(top_k=3), apply_global_debias=True, apply_ctd=True)


def build(**overrides):
    cfg = dict(type='SelfAttnCLIPSegmentor', clip=dict(arch=TINY_ARCH, pretrained=None),
               class_names=CLASSES, slide_crop=32, slide_stride=16, **ALL_STAGES)
    cfg.update(overrides)
    torch.manual_seed(0)
    return MODELS.build(cfg)


def samples_of(images, names, ori_shape=None):
    return [SegDataSample(metainfo=dict(img_path=name, img_shape=tuple(image.shape[-2:]),
                                        ori_shape=ori_shape or tuple(image.shape[-2:])))
            for image, name in zip(images, names)]


def predict(model, images, ori_shape=None):
    names = [f'img{i}.jpg' for i in range(len(images))]
    return model.predict(images, samples_of(images, names, ori_shape))


@pytest.mark.parametrize('thresholds', [dict(), dict(prob_thd=0.3, area_thd=0.2)])
def test_banded_merge_and_chunked_crops_equal_the_unbounded_path(thresholds):
    torch.manual_seed(1)
    images = torch.randn(2, 3, 70, 90)
    unbounded = build(max_merge_elements=None, **thresholds)
    # 3 crops per call (an image has 20 windows) and bands of 7 output rows
    rows_of_logits = 2 * 7 * 120  # images x queries (7) x width of the output
    bounded = build(max_merge_elements=rows_of_logits * 7, max_crops_per_forward=3,
                    **thresholds)
    assert len(bounded.engine.row_bands(rows_of_logits, 105)) == 15  # several bands
    expected = predict(unbounded, images, ori_shape=(105, 120))
    actual = predict(bounded, images, ori_shape=(105, 120))
    for one, other in zip(expected, actual):
        torch.testing.assert_close(other.seg_logits.data, one.seg_logits.data,
                                   atol=1e-6, rtol=0)
        assert torch.equal(other.pred_sem_seg.data, one.pred_sem_seg.data)
        argmax = other.seg_logits.data.argmax(dim=0)
        # the thresholds act (on whole-image class areas, not per band)
        assert (other.pred_sem_seg.data[0] != argmax).any() == bool(thresholds)


def test_non_finite_window_does_not_spread():
    model = build()
    image = torch.randn(1, 3, 48, 64)
    merge = model.engine.window_merge((48, 64), (48, 64), image.device)
    clean = model.engine.window_patch_logits(image, merge)
    broken = clean.clone()
    broken[0, 1, 2, 3] = float('nan')  # one logit of the first window
    merged = model.engine.merged_logits
    model.engine.window_patch_logits = lambda images, merge, encoded=None: broken
    try:
        out = merged(image, merge)[0]
    finally:
        del model.engine.window_patch_logits
    reached = merge.non_finite_pixels(broken)[0]
    y1, y2, x1, x2 = merge.windows[0]
    assert reached[y1:y2, x1:x2].all() and not reached.all()
    assert torch.isnan(out[:, reached]).all()
    torch.testing.assert_close(out[:, ~reached], merge(clean)[0][:, ~reached], atol=0, rtol=0)


def test_non_finite_input_pixels_name_the_image():
    model = build()
    images = torch.randn(2, 3, 40, 40)
    images[1, 0, 5, 7] = float('nan')
    images[1, 2, 0, 0] = float('inf')
    with pytest.raises(ValueError, match=r'img1\.jpg: 2 input values are NaN or inf'):
        predict(model, images)
    images[1] = 0.0
    assert len(predict(model, images)) == 2  # the same model carries on with finite input


@pytest.mark.parametrize('stage', ['global_debias', 'ctd'])
def test_non_finite_stage_output_names_the_image_and_the_stage(stage):
    model = build()
    module = getattr(model.pipeline, stage)
    original = module.forward

    def poisoned(features, *args):
        features = original(features, *args).clone()
        features[0, 0, 0] = float('inf')  # one token of one crop
        return features

    module.forward = poisoned
    with pytest.raises(FloatingPointError,
                       match=rf"img0\.jpg: the class probabilities are not finite; the first "
                             rf"NaN / inf values come from stage '{stage}'"):
        predict(model, torch.randn(1, 3, 40, 40))
    assert model.pipeline.stage_check is None  # the tracing check is off again


def test_pamr_path_reports_non_finite_input():
    model = build(pamr_steps=2, pamr_stride=(1, 2))
    images = torch.randn(1, 3, 40, 40)
    images[0, 1, 3, 3] = float('-inf')
    with pytest.raises(ValueError, match=r'img0\.jpg: 1 input values are NaN or inf'):
        predict(model, images)


def test_merge_bound_auto_per_device_and_bad_values():
    model = build()
    assert model.engine.max_merge_elements == 'auto'
    assert model.engine.merge_bound(torch.device('cpu')) == 2**25
    assert model.engine.merge_bound(torch.device('cuda')) == 2**27
    assert model.engine.row_bands(2**20, 100)[:2] == [slice(0, 32), slice(32, 64)]  # 2**25 on CPU
    for bad in ('none', 0, True, 2.5):
        with pytest.raises(ValueError, match=r"max_merge_elements must be an int >= 1, "
                                             r"'auto' or None, got"):
            build(max_merge_elements=bad)


@pytest.mark.parametrize('full_resolution', [dict(pamr_steps=2), dict(test_scales=(1.0, 0.5))])
def test_groups_bound_column_merged_rows_only_where_the_gpu_kernel_merges(monkeypatch,
                                                                          full_resolution):
    """Where the GPU kernel merges the rows itself, a group holds the column-merged mosaic
    rows (here 2 windows x 4 patches = 8 of 48 output rows) and so takes 6x the images;
    PAMR and multi-scale hold full-resolution logits and keep the tighter bound."""
    from mmseg_selfattn import postprocess_kernels
    images = [torch.randn(3, 48, 64) for _ in range(8)]
    bound = 7 * 64 * 48 * 2  # queries x width x output rows x 2 images
    sizes = {}
    for name, overrides in (('cpu', {}), ('gpu kernel', {}), ('full', full_resolution)):
        model = build(max_merge_elements=bound, max_crops_per_forward=1000, **overrides)
        monkeypatch.setattr(postprocess_kernels, 'supports', lambda _: name != 'cpu')
        groups = list(model.engine.image_groups(images))
        merge = groups[0][2]
        assert merge.mosaic_rows == 8 and merge.output_size == (48, 64)
        sizes[name] = [len(indices) for indices, _, _ in groups]
    assert sizes == {'cpu': [2, 2, 2, 2], 'gpu kernel': [8], 'full': [2, 2, 2, 2]}


def poison(model, stage='global_debias'):
    module = getattr(model.pipeline, stage)
    original = module.forward

    def poisoned(features, *args):
        features = original(features, *args).clone()
        features[0, 0, 0] = float('inf')
        return features

    module.forward = poisoned
    return lambda: setattr(module, 'forward', original)


def test_deferred_checks_raise_the_same_error_at_the_next_batch():
    """As the test loop runs it: a batch's check is made by the next predict (or at the
    end of the block), naming the earlier batch's image and the stage."""
    model = build()
    images = torch.randn(1, 3, 40, 40)
    with pytest.raises(FloatingPointError, match=r"bad\.jpg: .* stage 'global_debias'"):
        with model.finite_checks_deferred():
            assert len(predict(model, images)) == 1
            restore = poison(model)
            model.predict(images, samples_of(images, ['bad.jpg']))  # no error yet
            predict(model, images)  # raises for the batch before (img0.jpg's comes next)
    assert model._pending_finite_checks is None  # back to checking every call
    restore()
    predict(model, images)
    poison(model)
    with pytest.raises(FloatingPointError, match=r'img0\.jpg'):
        predict(model, images)
    with pytest.raises(FloatingPointError, match=r'img0\.jpg'):  # the last batch: at the end
        with model.finite_checks_deferred():
            predict(model, images)


def test_deferred_checks_pass_finite_batches():
    model = build()
    images = torch.randn(2, 3, 40, 40)
    expected = predict(model, images)
    with model.finite_checks_deferred():
        for _ in range(3):
            outputs = predict(model, images)
    for one, other in zip(expected, outputs):
        assert torch.equal(one.seg_logits.data, other.seg_logits.data)
