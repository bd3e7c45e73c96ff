"""The Triton post-processing kernels (GPU) against the torch code they replace."""
import pytest
import torch

from mmseg_selfattn import postprocess_kernels
from mmseg_selfattn.postprocess import (SynonymMax, class_areas, merged_pixel_predictions,
                                        pixel_predictions, segment)
from mmseg_selfattn.sliding_window import WindowMerge

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and postprocess_kernels.AVAILABLE),
    reason='the kernels run on CUDA with Triton')

QUERY_CLASSES = {
    'one query per class': list(range(21)),
    'synonyms': [0, 0, 0, 1, 2, 2, 3, 0, 4, 4, 4, 4, 5],
    'one class': [0, 0, 0],
    '171 classes': [c for c in range(171) for _ in range(1 + c % 3)],
    'skewed, like VOC21': [0] * 26 + list(range(1, 21)) + [5, 9, 9, 0],
}


def torch_path(function, *args):
    postprocess_kernels.ENABLED = False
    try:
        return function(*args)
    finally:
        postprocess_kernels.ENABLED = True


@pytest.mark.parametrize('name', sorted(QUERY_CLASSES))
@pytest.mark.parametrize('prob_thd', [0.0, 0.4])
def test_pixel_predictions_kernel_equals_torch(name, prob_thd):
    synonym_max = SynonymMax(QUERY_CLASSES[name])
    generator = torch.Generator(device='cuda').manual_seed(0)
    logits = 0.1 * torch.randn(3, synonym_max.num_queries, 37, 53, device='cuda',
                               generator=generator)
    probs, labels, confidence = pixel_predictions(logits, synonym_max, 40.0, prob_thd)
    ref_probs, ref_labels, ref_confidence = torch_path(pixel_predictions, logits, synonym_max,
                                                       40.0, prob_thd)
    assert probs.shape == ref_probs.shape and labels.dtype == torch.long
    assert (probs - ref_probs).abs().max() <= 1e-5  # exp() rounds differently
    assert (labels == ref_labels).float().mean() >= 0.999  # near-ties may flip
    if prob_thd:
        assert 0 < (ref_confidence < prob_thd).float().mean() < 1
        assert (confidence - ref_confidence).abs().max() <= 1e-5
    else:
        assert confidence is None and ref_confidence is None
    again = pixel_predictions(logits, synonym_max, 40.0, prob_thd)
    assert torch.equal(again[0], probs) and torch.equal(again[1], labels)  # deterministic


@pytest.mark.parametrize('name', ['synonyms', 'skewed, like VOC21'])
@pytest.mark.parametrize('size, output_size, rows', [
    ((60, 90), (60, 90), slice(None)),  # VOC-like overlap, no resize
    ((60, 90), (75, 101), slice(None)),  # resized to the original image
    ((60, 90), (75, 101), slice(30, 47)),  # one band of a huge image
])
def test_kernel_merging_rows_itself_equals_torch_on_merged_logits(name, size, output_size, rows):
    synonym_max = SynonymMax(QUERY_CLASSES[name])
    merge = WindowMerge(size, output_size, 32, 16, (8, 8), device='cuda')
    generator = torch.Generator(device='cuda').manual_seed(2)
    patch_logits = 0.1 * torch.randn(2 * merge.num_windows, synonym_max.num_queries, *merge.grid,
                                     device='cuda', generator=generator).half()
    probs, labels, confidence = merged_pixel_predictions(patch_logits, merge, rows,
                                                         synonym_max, 40.0, 0.2)
    ref_probs, ref_labels, ref_confidence = torch_path(
        pixel_predictions, merge(patch_logits, rows), synonym_max, 40.0, 0.2)
    assert probs.shape == ref_probs.shape == (2, synonym_max.num_classes,
                                              *torch.empty(output_size)[rows].shape)
    assert (probs - ref_probs).abs().max() <= 1e-5
    assert (labels == ref_labels).float().mean() >= 0.999
    assert 0 < (ref_confidence < 0.2).float().mean() < 1
    assert (confidence - ref_confidence).abs().max() <= 1e-5
    again = merged_pixel_predictions(patch_logits, merge, rows, synonym_max, 40.0, 0.2)
    assert all(torch.equal(a, b) for a, b in zip(again, (probs, labels, confidence)))


def test_nan_logits_give_nan_probabilities_of_their_pixel_only():
    synonym_max = SynonymMax(QUERY_CLASSES['synonyms'])
    logits = torch.randn(2, synonym_max.num_queries, 9, 11, device='cuda')
    logits[1, 4, 3, 5] = float('nan')  # the first query of class 2
    logits[0, 10, 2, 2] = float('nan')  # a later synonym of class 4
    probs, _, confidence = pixel_predictions(logits, synonym_max, 40.0, 0.2)
    assert torch.isnan(probs[1, :, 3, 5]).all() and torch.isnan(probs[0, :, 2, 2]).all()
    assert torch.isfinite(probs).sum() == probs.numel() - 2 * synonym_max.num_classes
    ref_confidence = torch_path(pixel_predictions, logits, synonym_max, 40.0, 0.2)[2]
    assert torch.equal(confidence.isnan(), ref_confidence.isnan())
    assert ((confidence - ref_confidence).abs().nan_to_num() <= 1e-5).all()


@pytest.mark.parametrize('num_classes', [1, 21, 171])
def test_class_areas_kernel_counts_every_label(num_classes):
    generator = torch.Generator(device='cuda').manual_seed(1)
    labels = torch.randint(0, num_classes, (4, 61, 77), device='cuda', generator=generator)
    labels[2] = 0  # one class only
    areas = class_areas(labels, num_classes)
    assert torch.equal(areas.long(), torch_path(class_areas, labels, num_classes).long())
    assert (areas.sum(dim=1) == 61 * 77).all()


def test_segment_with_thresholds_equals_torch():
    synonym_max = SynonymMax(QUERY_CLASSES['synonyms'])
    logits = 0.1 * torch.randn(2, synonym_max.num_queries, 40, 60, device='cuda')
    probs, labels = segment(logits, synonym_max, 40.0, 0.3, 0.2, 0)
    ref_probs, ref_labels = torch_path(segment, logits, synonym_max, 40.0, 0.3, 0.2, 0)
    assert (probs - ref_probs).abs().max() <= 1e-5
    assert (labels == ref_labels).float().mean() >= 0.999


def test_pipeline_with_kernels_equals_torch_post_processing():
    from mmseg.registry import MODELS
    from conftest import TINY_ARCH
    model = MODELS.build(dict(
        type='SelfAttnCLIPSegmentor', clip=dict(arch=TINY_ARCH, pretrained=None),
        class_names=['sky, clouds', 'tree', 'road; street; lane'], slide_crop=32,
        slide_stride=16, prob_thd=0.1, area_thd=0.1)).cuda().eval()
    images = torch.randn(2, 3, 40, 56, device='cuda')
    fast = model.predict(images)
    slow = torch_path(model.predict, images)
    for a, b in zip(fast, slow):
        assert (a.seg_logits.data - b.seg_logits.data).abs().max() <= 1e-5
        assert (a.pred_sem_seg.data == b.pred_sem_seg.data).float().mean() >= 0.999
