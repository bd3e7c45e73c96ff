"""mmseg_selfattn/diagnostics.py: the sheet's panels show the explain() maps they name, and
the summary's numbers equal those recomputed here from the recorded stage tensors; then
``tools/demo.py --diagnostics --json`` end to end (tiny random CLIP, in-process)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.collections import PathCollection
from matplotlib.colors import LogNorm, to_rgb
from matplotlib.contour import ContourSet
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmseg.registry import MODELS
from PIL import Image

from mmseg_selfattn.diagnostics import (NOISE_GREY, RANDOM_WEIGHTS_NOTE, diagnostics_sheet,
                                        diagnostics_summary)
from mmseg_selfattn.stages.outlier_suppression import rank_outliers

from conftest import TINY_ARCH, load_tool

REPO_ROOT = Path(__file__).resolve().parents[1]
CLIP_MEAN, CLIP_STD = [122.771, 116.746, 104.094], [68.501, 66.632, 70.323]
# resized by 1.6 / 1.595: windows of 64 px at a stride of 32, 8 x 8 patches of 8 px
PIPELINE = [dict(type='LoadImageFromFile'), dict(type='Resize', scale=(160, 96), keep_ratio=True),
            dict(type='PackSegInputs')]
CROP, PATCH = 64, 8
TAU, MIN_RATIO = 0.015, 1.6  # tau inside the tiny random ViT's A_ii range: a contour
ALL_STAGES = dict(
    apply_similarity_enhancement=True, similarity_enhancement_cfg=dict(layer=-2),
    apply_self_attn_enhancement=True,
    self_attn_enhancement_cfg=dict(min_self_attn_threshold=TAU),
    apply_outlier_suppression=True, outlier_suppression_cfg=dict(top_k=10, min_ratio=MIN_RATIO),
    apply_global_debias=True, apply_ctd=True)
STAGE_TITLES = ['input', 'prediction', 'self-attention A_ii', 'deficit e_i', 'outlier score r_i',
                'CTD clusters', 'cos(X, x_cls) before debias', 'cos(X, x_cls) after debias']
TINY = ['--pretrained', 'none', '--device', 'cpu', '--classes', 'sky;tree,forest;person',
        '--cfg-options', f'model.clip.arch={TINY_ARCH}',
        'model.similarity_enhancement_cfg.layer=-2']  # the tiny ViT has 3 blocks


def build(**stages):
    init_default_scope('mmseg')
    torch.manual_seed(0)
    model = MODELS.build(dict(
        type='SelfAttnCLIPSegmentor', clip=dict(arch=TINY_ARCH, pretrained=None),
        class_names=['sky', 'tree', 'road'], slide_crop=CROP, slide_stride=32,
        data_preprocessor=dict(type='SizeAgnosticSegDataPreProcessor', mean=CLIP_MEAN,
                               std=CLIP_STD, bgr_to_rgb=True), **stages)).eval()
    model.cfg = Config(dict(test_pipeline=PIPELINE))
    return model


def random_bgr(height=60, width=84, seed=0):
    return (np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8)


@pytest.fixture(scope='module')
def explained():
    return build(**ALL_STAGES).explain(random_bgr())


@pytest.fixture(scope='module')
def explained_off():
    return build().explain(random_bgr())


@pytest.fixture(scope='module')
def sheet(explained):
    return diagnostics_sheet(explained, title='noise.png | tiny', random_weights=True)


@pytest.fixture(scope='module')
def sheet_off(explained_off):
    return diagnostics_sheet(explained_off, title='noise.png | stages off')


def panel(figure, title):
    matches = [axes for axes in figure.axes if axes.get_title() == title]
    assert len(matches) == 1, [axes.get_title() for axes in figure.axes]
    return matches[0]


def texts(axes):
    return [text.get_text() for text in axes.texts]


def top_class_titles(stage_maps, count=3):
    areas = np.bincount(stage_maps.labels.numpy().ravel(), minlength=len(stage_maps.class_names))
    order = sorted(range(len(areas)), key=lambda c: -areas[c])[:count]
    return [f'p({stage_maps.class_names[c][0]})' for c in order]


def test_the_sheet_has_every_panel(sheet, explained):
    titles = [axes.get_title() for axes in sheet.axes if axes.get_title()]
    assert titles == STAGE_TITLES + top_class_titles(explained) + ['stage settings']
    figure_texts = {text.get_text(): text for text in sheet.texts}
    assert 'noise.png | tiny' in figure_texts
    assert to_rgb(figure_texts[RANDOM_WEIGHTS_NOTE].get_color()) == (1.0, 0.0, 0.0)


def test_no_random_weights_note_for_real_weights(sheet_off):
    assert RANDOM_WEIGHTS_NOTE not in [text.get_text() for text in sheet_off.texts]


def test_prediction_legend_lists_the_present_classes_and_their_areas(sheet, explained):
    labels = explained.labels.numpy()
    areas = 100 * np.bincount(labels.ravel(), minlength=3) / labels.size
    legend = [text.get_text() for text in panel(sheet, 'prediction').get_legend().get_texts()]
    expected = [f'{explained.class_names[c][0]}  {areas[c]:.1f}%'
                for c in np.argsort(-areas, kind='stable') if areas[c] > 0]
    assert legend == expected


def test_self_attention_panel_shows_a_ii_with_the_tau_contour(sheet, explained):
    axes = panel(sheet, 'self-attention A_ii')
    np.testing.assert_array_equal(axes.images[0].get_array(),
                                  explained.maps['self_attention'].numpy())
    contours = [artist for artist in axes.collections if isinstance(artist, ContourSet)]
    assert len(contours) == 1 and list(contours[0].levels) == [TAU]
    values = explained.maps['self_attention']
    assert values.min() < TAU < values.max()
    assert any(len(segment) for segment in contours[0].allsegs[0])  # a line is drawn
    assert f'tau = {TAU:g} (red contour)' in axes.get_xlabel()
    assert sheet.axes.index(axes) + 1 < len(sheet.axes)  # (its colour bar follows)


def test_outlier_markers_are_the_chosen_patch_centres(sheet, explained):
    axes = panel(sheet, 'outlier score r_i')
    assert isinstance(axes.images[0].norm, LogNorm)
    np.testing.assert_array_equal(axes.images[0].get_array(),
                                  explained.maps['outlier_score'].numpy())
    markers = [artist for artist in axes.collections if isinstance(artist, PathCollection)]
    assert len(markers) == 1
    offsets = np.asarray(markers[0].get_offsets())
    np.testing.assert_allclose(offsets, explained.outlier_points().numpy(), rtol=0, atol=1e-4)

    # the stage's own choice: the top_k recorded scores above min_ratio ...
    indices = explained.recorded['outlier_indices']
    scores = explained.recorded['outlier_scores']
    assert torch.equal(indices, rank_outliers(scores, 10, MIN_RATIO))
    assert (indices == -1).any() and (indices >= 0).any()  # min_ratio cut some windows short
    # ... whose patch centres, from the window boxes and the patch size, are the markers
    grid_w = CROP // PATCH
    centres = []
    for window, tokens in enumerate(indices.tolist()):
        y1, y2, x1, x2 = explained.window_boxes[window].tolist()
        for token in (t for t in tokens if t >= 0):
            row, col = divmod(token, grid_w)
            centres.append((x1 + (col + 0.5) * PATCH * (x2 - x1) / CROP,
                            y1 + (row + 0.5) * PATCH * (y2 - y1) / CROP))
    np.testing.assert_allclose(offsets, np.array(centres), rtol=0, atol=1e-3)
    assert f'{len(centres)} chosen' in axes.get_xlabel()


def test_ctd_panel_paints_ids_and_noise_grey(sheet, explained):
    axes = panel(sheet, 'CTD clusters')
    rgb = axes.images[0].get_array()
    ids = explained.window_mosaic('ctd_clusters').numpy()
    assert (ids < 0).any()
    np.testing.assert_allclose(rgb[ids < 0], np.broadcast_to(NOISE_GREY, rgb[ids < 0].shape))
    colours = {cluster: np.unique(rgb[ids == cluster].reshape(-1, 3), axis=0)
               for cluster in np.unique(ids)}
    assert all(len(colour) == 1 for colour in colours.values())  # one colour per id
    assert len({tuple(colour[0]) for colour in colours.values()}) == len(colours)


def test_cos_panels_share_one_colour_scale_and_p_panels_are_0_1(sheet, explained):
    before = panel(sheet, 'cos(X, x_cls) before debias').images[0]
    after = panel(sheet, 'cos(X, x_cls) after debias').images[0]
    assert before.get_clim() == after.get_clim()
    np.testing.assert_array_equal(after.get_array(),
                                  explained.maps['cls_similarity_after'].numpy())
    for title in top_class_titles(explained):
        image = panel(sheet, title).images[0]
        assert image.get_clim() == (0, 1)
        index = [f'p({names[0]})' for names in explained.class_names].index(title)
        np.testing.assert_array_equal(image.get_array(),
                                      explained.probabilities[index].numpy())


def test_stage_off_panels_say_so(sheet_off, explained_off):
    for title, stage in (('deficit e_i', 'self_attn_enhancement'),
                         ('outlier score r_i', 'outlier_suppression'), ('CTD clusters', 'ctd')):
        axes = panel(sheet_off, title)
        assert texts(axes) == [f'stage off (apply_{stage}=False)']
        assert not axes.images and not axes.collections
    axes = panel(sheet_off, 'self-attention A_ii')  # A_ii is shown, without tau
    assert 'stage off (apply_self_attn_enhancement=False)' in axes.get_xlabel()
    assert not [artist for artist in axes.collections if isinstance(artist, ContourSet)]
    np.testing.assert_array_equal(axes.images[0].get_array(),
                                  explained_off.maps['self_attention'].numpy())
    assert 'stage off' in panel(sheet_off, 'cos(X, x_cls) after debias').get_xlabel()


def test_summary_equals_values_recomputed_from_the_recorded_tensors(explained):
    summary = diagnostics_summary(explained)
    assert json.loads(json.dumps(summary)) == summary  # plain JSON values
    recorded = explained.recorded

    labels = explained.labels.numpy()
    counts = np.bincount(labels.ravel(), minlength=3)
    assert {c['index']: c['area_percent'] for c in summary['classes']} == pytest.approx(
        {c: 100 * counts[c] / labels.size for c in range(3) if counts[c]})
    assert [c['name'] for c in summary['classes']] == [
        explained.class_names[c['index']][0] for c in summary['classes']]

    a_ii = recorded['attention'].diagonal(dim1=-2, dim2=-1)[:, 1:].double()
    assert summary['self_attention'] == pytest.approx(dict(
        mean=a_ii.mean().item(), std=a_ii.std(correction=0).item(), min=a_ii.min().item(),
        max=a_ii.max().item(), threshold=TAU,
        fraction_below_threshold=(a_ii < TAU).double().mean().item()))
    # e_i = max(0, tau - A_ii) > 0 exactly where A_ii < tau
    assert summary['self_attention']['fraction_below_threshold'] == pytest.approx(
        (recorded['deficit'] > 0).double().mean().item())

    outliers = summary['outliers']
    per_window = [sum(index >= 0 for index in row) for row in recorded['outlier_indices'].tolist()]
    assert outliers['chosen_per_window'] == per_window
    assert outliers['total'] == sum(per_window) == len(explained.outlier_points())
    assert (outliers['top_k'], outliers['min_ratio']) == (10, MIN_RATIO)
    assert outliers['above_min_ratio'] == int((recorded['outlier_scores'] > MIN_RATIO).sum())

    ctd_labels = recorded['ctd_labels']
    assert summary['ctd']['clusters_per_window'] == [
        len(set(row) - {-1}) for row in ctd_labels.tolist()]
    assert summary['ctd']['noise_fraction'] == pytest.approx(
        (ctd_labels == -1).sum().item() / ctd_labels.numel())

    for when in ('before', 'after'):
        cos = torch.cosine_similarity(recorded[f'features_{when}_debias'].double(),
                                      recorded['x_cls'].double()[:, None], dim=-1)
        assert summary['cls_similarity'][f'mean_{when}'] == pytest.approx(cos.mean().item())
    assert summary['enabled_stages'] == ['similarity_enhancement', 'self_attn_enhancement',
                                         'outlier_suppression', 'global_debias', 'ctd']
    assert summary['settings']['self_attn_enhancement']['min_self_attn_threshold'] == TAU
    assert summary['num_windows'] == len(explained.window_boxes) == 8


def test_summary_with_every_stage_off(explained_off):
    summary = diagnostics_summary(explained_off)
    assert json.loads(json.dumps(summary)) == summary
    assert summary['self_attention']['threshold'] is None
    assert summary['self_attention']['fraction_below_threshold'] is None
    assert summary['outliers']['enabled'] is False and summary['outliers']['total'] is None
    assert summary['ctd'] == dict(enabled=False, clusters_per_window=None, noise_fraction=None)
    assert summary['cls_similarity']['mean_before'] == pytest.approx(
        summary['cls_similarity']['mean_after'])
    assert summary['enabled_stages'] == [] and summary['settings'] == {}


# -- tools/demo.py --diagnostics --json --------------------------------------------------------
@pytest.fixture(scope='module')
def demo():
    return load_tool('demo', 'demo_tool')


def save_image(path: Path, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 56, 3), np.uint8)).save(
        path)
    return str(path)


def test_demo_writes_one_sheet_and_one_json_per_image(demo, monkeypatch, capsys, tmp_path):
    images = [save_image(tmp_path / 'a' / 'img.jpg', 0), save_image(tmp_path / 'b' / 'img.png', 1)]
    out_dir = tmp_path / 'out'
    monkeypatch.setattr(sys, 'argv', ['demo.py', *images, '--out-dir', str(out_dir),
                                      '--diagnostics', '--json', *TINY])
    demo.main()
    stdout = capsys.readouterr().out
    assert 'prob_thd=0.1 and area_thd=0.1 set to 0' in stdout
    assert sorted(path.name for path in out_dir.iterdir()) == [
        'classes.txt', 'img_a.json', 'img_a_diagnostics.png', 'img_a_overlay.png',
        'img_b.json', 'img_b_diagnostics.png', 'img_b_overlay.png']
    for image, stem in zip(images, ('img_a', 'img_b')):
        with Image.open(out_dir / f'{stem}_diagnostics.png') as sheet:
            assert sheet.format == 'PNG' and sheet.width > 1000
        record = json.loads((out_dir / f'{stem}.json').read_text())
        assert record['image'] == image and record['random_weights'] is True
        assert record['config'].endswith('selfattn-full_vit-b16_voc21.py')
        assert record['image_size'] == [40, 56]
        assert record['enabled_stages'] == ['similarity_enhancement', 'self_attn_enhancement',
                                            'outlier_suppression', 'global_debias', 'ctd']
        assert {c['name'] for c in record['classes']} <= {'sky', 'tree, forest', 'person'}
        assert sum(c['area_percent'] for c in record['classes']) == pytest.approx(100)


def test_demo_json_without_the_sheet(demo, monkeypatch, tmp_path):
    image = save_image(tmp_path / 'photo.png', 2)
    out_dir = tmp_path / 'out'
    monkeypatch.setattr(sys, 'argv', ['demo.py', image, '--out-dir', str(out_dir), '--json',
                                      *TINY])
    demo.main()
    assert sorted(path.name for path in out_dir.iterdir()) == [
        'classes.txt', 'photo.json', 'photo_overlay.png']
    assert json.loads((out_dir / 'photo.json').read_text())['outliers']['total'] > 0


def test_scclip_sheet_shows_its_anomalies_instead_of_a_and_x_cls():
    stage_maps = build(attention='scclip', scclip_cfg=dict(
        pre_layer=1, post_layer=0, fusion_layers=(0, 1))).explain(random_bgr())
    summary = diagnostics_summary(stage_maps)
    assert summary['self_attention'] is None and summary['cls_similarity'] is None
    anomalies = stage_maps.recorded['anomalies']
    assert summary['methods']['scclip']['total'] == int(anomalies.sum()) > 0
    assert summary['methods']['scclip']['anomalies_per_window'] == anomalies.sum(1).tolist()
    json.dumps(summary)
    figure = diagnostics_sheet(stage_maps)
    score = panel(figure, 'SC-CLIP anomaly score (LOF)')
    assert np.allclose(score.images[0].get_array(), stage_maps.maps['anomaly_score'].numpy())
    assert panel(figure, 'SC-CLIP anomalies O').images[0].get_array().max() <= 1
    assert "attention='scclip' has no x_cls" in texts(panel(figure, 'cos(X, x_cls) before debias'))


def test_resclip_sheet_shows_rcs_attention_and_sfr_labels():
    stage_maps = build(apply_rcs=True, rcs_cfg=dict(layers=(0, 1)),
                       apply_sfr=True).explain(random_bgr())
    summary = diagnostics_summary(stage_maps)
    labels = stage_maps.recorded['sfr_labels']
    assert summary['methods']['sfr']['labels_per_window'] == [
        len(set(window.tolist())) for window in labels]
    rcs = stage_maps.recorded['rcs_attention'].diagonal(dim1=-2, dim2=-1)[:, 1:].double()
    assert summary['methods']['rcs']['self_attention_mean'] == pytest.approx(float(rcs.mean()))
    figure = diagnostics_sheet(stage_maps)
    shown = panel(figure, 'ResCLIP RCS: A_c diagonal').images[0].get_array()
    assert np.allclose(shown, stage_maps.maps['rcs_self_attention'].numpy())
    assert panel(figure, 'ResCLIP SFR: pass-1 labels').images
    assert panel(figure, 'self-attention A_ii').images  # the standard forward's A
