"""model.explain(): stage maps of a real run, equal to the stages' own tensors."""
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmseg.registry import MODELS

from mmseg_selfattn.stages.outlier_suppression import outlier_scores, rank_outliers
from mmseg_selfattn.stages.self_attn_enhancement import enhanced_attention

from conftest import TINY_ARCH

CLIP_MEAN, CLIP_STD = [122.771, 116.746, 104.094], [68.501, 66.632, 70.323]
ALL_STAGES = dict(apply_similarity_enhancement=True,
                  similarity_enhancement_cfg=dict(layer=-2),  # 3-block tiny arch
                  apply_self_attn_enhancement=True, apply_outlier_suppression=True,
                  apply_global_debias=True, apply_ctd=True)


def build(pipeline=None, **overrides):
    init_default_scope('mmseg')
    cfg = dict(type='SelfAttnCLIPSegmentor', clip=dict(arch=TINY_ARCH, pretrained=None),
               class_names=['sky', 'tree', 'road'], slide_crop=32, slide_stride=16,
               data_preprocessor=dict(type='SizeAgnosticSegDataPreProcessor', mean=CLIP_MEAN,
                                      std=CLIP_STD, bgr_to_rgb=True))
    cfg.update(overrides)
    torch.manual_seed(0)
    model = MODELS.build(cfg).eval()
    if pipeline is not None:  # as mmseg's init_model sets it
        model.cfg = Config(dict(test_pipeline=pipeline))
    return model


def random_bgr(height, width, seed=0):
    return (np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8)


@pytest.fixture(scope='module')
def model():
    return build(**ALL_STAGES)


@pytest.fixture(scope='module')
def explained(model):
    return model.explain(random_bgr(50, 70))


def crops_of(model, image_bgr):
    """The model's own normalised crops of an image used at its own size."""
    data = model.data_preprocessor(dict(inputs=[torch.from_numpy(image_bgr).permute(2, 0, 1)]),
                                   False)
    merge = model.engine.window_merge(image_bgr.shape[:2], image_bgr.shape[:2], torch.device('cpu'))
    return merge.cut(data['inputs']), merge


def test_maps_have_the_image_size_and_every_stage(explained):
    assert set(explained.maps) == {'self_attention', 'deficit', 'outlier_score', 'outlier',
                                   'cls_similarity_before', 'cls_similarity_after'}
    assert all(value.shape == (50, 70) for value in explained.maps.values())
    assert explained.probabilities.shape == (3, 50, 70)
    assert explained.labels.shape == (50, 70) and explained.image.shape == (50, 70, 3)
    assert all(torch.isfinite(value).all() for value in explained.maps.values())
    num_windows = len(explained.window_boxes)
    assert explained.windows['ctd_clusters'].shape == (num_windows, 4, 4)
    assert explained.windows['outlier_indices'].shape == (num_windows, 10)


def test_window_values_equal_the_stage_tensors(model, explained):
    crops, _ = crops_of(model, random_bgr(50, 70))
    encoded = model.pipeline.encoder.encode(crops, capture_attention=True, mid_layers=(1, ))
    own_diagonal = encoded.attention.diagonal(dim1=-2, dim2=-1)[:, 1:].reshape(-1, 4, 4)
    torch.testing.assert_close(explained.windows['self_attention'], own_diagonal)
    stage = model.pipeline.self_attn_enhancement
    torch.testing.assert_close(explained.windows['deficit'],
                               stage.deficit(encoded.attention).reshape(-1, 4, 4))
    # prevention (score_attention='enhanced', the default): r_i from the boosted Ã
    scores = outlier_scores(enhanced_attention(encoded.attention,
                                               stage.deficit(encoded.attention), stage.strength))
    assert not torch.allclose(scores, outlier_scores(encoded.attention))
    torch.testing.assert_close(explained.windows['outlier_score'], scores.reshape(-1, 4, 4))
    indices = rank_outliers(scores, 10)
    assert torch.equal(explained.windows['outlier_indices'], indices)
    chosen = explained.windows['outlier'].flatten(1)
    assert chosen.sum(dim=1).tolist() == [10.0] * len(indices)
    assert bool(chosen.gather(1, indices).eq(1).all())
    # the last crop batch's stage outputs are what the stages kept
    model.pipeline.crop_patch_logits(crops)
    assert torch.equal(explained.windows['ctd_clusters'].flatten(1), model.pipeline.ctd.last_labels)


def test_cls_similarity_before_and_after_debias(model, explained):
    recorded = explained.recorded
    unit_cls = F.normalize(recorded['x_cls'], dim=-1)[:, None]
    for when in ('before', 'after'):
        expected = (F.normalize(recorded[f'features_{when}_debias'], dim=-1) * unit_cls).sum(-1)
        torch.testing.assert_close(explained.windows[f'cls_similarity_{when}'].flatten(1),
                                   expected)
    # global debias lowers the CLS similarity of every token with a positive one
    before = explained.windows['cls_similarity_before']
    after = model.pipeline.global_debias(recorded['features_before_debias'], recorded['x_cls'])
    after = (F.normalize(after, dim=-1) * unit_cls).sum(-1).view_as(before)
    assert bool((after[before > 0.05] < before[before > 0.05]).all())


def test_probabilities_and_labels_are_those_of_predict(model, explained):
    image = random_bgr(50, 70)
    data = model.data_preprocessor(dict(inputs=[torch.from_numpy(image).permute(2, 0, 1)]),
                                   False)
    sample = model.predict(data['inputs'])[0]
    assert torch.equal(sample.seg_logits.data, explained.probabilities)
    assert torch.equal(sample.pred_sem_seg.data[0], explained.labels)
    assert model.pipeline.recorder is None  # explain() leaves the model as it was


def test_single_window_map_is_the_bilinear_upsampled_grid():
    model = build(slide_crop=0, apply_self_attn_enhancement=True)
    result = model.explain(random_bgr(32, 48))  # a patch multiple: no padding
    assert result.windows['self_attention'].shape == (1, 4, 6)
    expected = F.interpolate(result.windows['self_attention'][None], size=(32, 48),
                             mode='bilinear')[0, 0]
    torch.testing.assert_close(result.maps['self_attention'], expected, atol=1e-6, rtol=1e-5)
    assert 'outlier_score' not in result.maps and 'ctd_clusters' not in result.windows
    # with both debias stages off the classifier sees the features entering stage 5
    assert torch.equal(result.maps['cls_similarity_before'], result.maps['cls_similarity_after'])
    assert set(result.settings) == {'self_attn_enhancement'}


def test_maps_are_at_the_original_size_after_the_pipeline_resize(tmp_path):
    pipeline = [dict(type='LoadImageFromFile'),
                dict(type='Resize', scale=(2048, 40), keep_ratio=True),
                dict(type='PackSegInputs')]
    model = build(pipeline, **ALL_STAGES)
    path = tmp_path / 'photo.png'
    cv2.imwrite(str(path), random_bgr(60, 90, seed=3))
    result = model.explain(path)
    assert result.image.shape == (60, 90, 3)
    assert np.array_equal(result.image, random_bgr(60, 90, seed=3)[..., ::-1])
    assert all(value.shape == (60, 90) for value in result.maps.values())
    assert result.probabilities.shape == (3, 60, 90)
    # windows are placed on the 40 x 60 resized image; boxes are in original pixels
    assert result.window_boxes[:, [1, 3]].max(dim=0).values.tolist() == [60.0, 90.0]


def test_window_mosaic_tiles_non_overlapping_windows():
    model = build(slide_crop=16, slide_stride=16, **ALL_STAGES)
    result = model.explain(random_bgr(32, 48))
    clusters = result.windows['ctd_clusters']  # (6 windows, 2, 2), 8 px patches
    mosaic = result.window_mosaic('ctd_clusters')
    expected = clusters.view(2, 3, 2, 2).permute(0, 2, 1, 3).reshape(4, 6)
    assert torch.equal(mosaic, expected.repeat_interleave(8, 0).repeat_interleave(8, 1))


def test_outlier_points_are_the_chosen_patch_centres(explained):
    points = explained.outlier_points()
    indices = explained.windows['outlier_indices']
    assert points.shape == (int((indices >= 0).sum()), 2)
    boxes = explained.window_boxes
    expected = []
    for window, row in enumerate(indices.tolist()):
        y1, _, x1, _ = boxes[window].tolist()
        expected += [(x1 + (token % 4 + 0.5) * 8, y1 + (token // 4 + 0.5) * 8)
                     for token in row if token >= 0]
    torch.testing.assert_close(points, torch.tensor(expected))


def test_explain_with_pamr_and_in_attention_mode():
    model = build(pamr_steps=2, pamr_stride=(1, 2), apply_self_attn_enhancement=True,
                  self_attn_enhancement_cfg=dict(mode='attention'))
    result = model.explain(random_bgr(40, 40))
    assert result.probabilities.shape == (3, 40, 40)
    assert torch.allclose(result.probabilities.sum(0), torch.ones(40, 40), atol=1e-5)


def test_bad_input_is_named():
    model = build()
    with pytest.raises(ValueError, match='explain.. takes an image file path'):
        model.explain(np.zeros((4, 4)))
    with pytest.raises(ValueError, match='explain.. takes an image file path'):
        model.explain(42)


def test_one_start_up_line_per_enabled_stage(log_records):
    build(**ALL_STAGES, pamr_steps=1)
    tags = [record.split(']')[0] + ']' for record in log_records if record.startswith('[')]
    assert tags == ['[Encoder]', '[Classifier]', '[PAMR]', '[Similarity Enhancement]',
                    '[Self-Attention Enhancement]', '[Outlier Suppression]',
                    '[Global Debias]', '[CTD]']
    assert ('[Self-Attention Enhancement] Enabled with strength=0.1, threshold=0.15, '
            'mode=feature') in log_records
    log_records.clear()
    build()
    assert not [record for record in log_records if 'Enabled with' in record]


# -- the maps of SC-CLIP and ResCLIP ---------------------------------------------------------
def test_scclip_maps_are_its_anomaly_scores_and_set():
    from mmseg_selfattn.scclip import anomaly_mask, lof_scores
    model = build(attention='scclip',
                  scclip_cfg=dict(pre_layer=1, post_layer=0, fusion_layers=(0, 1)))
    image = random_bgr(50, 70, seed=3)
    explained = model.explain(image)
    # no standard last block: no A, no x_cls, so neither map
    assert {'anomaly_score', 'anomaly'} <= set(explained.maps)
    assert not {'self_attention', 'cls_similarity_before'} & set(explained.maps)
    crops, _ = crops_of(model, image)
    head = model.pipeline.scclip
    with torch.no_grad():
        encoded = model.pipeline.encode_crops(crops)
    scores = lof_scores(encoded.block_input[:, 1:].float(), head.anomaly_neighbours)
    grid = encoded.grid
    assert torch.equal(explained.windows['anomaly_score'], scores.unflatten(1, grid))
    assert torch.equal(explained.windows['anomaly'],
                       anomaly_mask(scores, head.anomaly_contamination).float().unflatten(1, grid))
    assert explained.windows['anomaly'].sum() > 0
    probabilities = model.predict(crops_input(model, image))[0].seg_logits.data
    assert torch.equal(explained.probabilities, probabilities)


def test_resclip_maps_are_its_rcs_attention_and_pass1_labels():
    model = build(apply_rcs=True, rcs_cfg=dict(layers=(0, 1)), apply_sfr=True)
    image = random_bgr(50, 70, seed=4)
    explained = model.explain(image)
    crops, _ = crops_of(model, image)
    with torch.no_grad():
        encoded = model.pipeline.encode_crops(crops)
    a_c = encoded.attention_means[(0, 1)].mean(dim=1)
    assert torch.equal(explained.windows['rcs_self_attention'],
                       a_c.diagonal(dim1=-2, dim2=-1)[:, 1:].unflatten(1, encoded.grid))
    labels = explained.windows['sfr_labels']
    assert labels.dtype == torch.long and labels.shape == (len(crops), *encoded.grid)
    assert 0 <= labels.min() and labels.max() < 3  # query indices
    assert explained.window_mosaic('sfr_labels').shape == image.shape[:2]
    assert 'self_attention' in explained.maps  # the standard forward's A still exists
    probabilities = model.predict(crops_input(model, image))[0].seg_logits.data
    assert torch.equal(explained.probabilities, probabilities)


def crops_input(model, image_bgr):
    return model.data_preprocessor(
        dict(inputs=[torch.from_numpy(image_bgr).permute(2, 0, 1)]), False)['inputs']
