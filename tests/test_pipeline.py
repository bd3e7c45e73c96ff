"""The six-stage pipeline wired in the segmentor: order, neutral settings, end to end."""
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner
from mmseg.registry import MODELS

from mmseg_selfattn.stages import PIPELINE_STAGES

from conftest import REPO_ROOT, TINY_ARCH, camvid_root

CLASSES = ['sky, clouds', 'tree', 'road; street', 'car']
ALL_STAGES_ON = {f'apply_{name}': True for name in PIPELINE_STAGES}
# a mid layer that exists in the 3-block tiny ViT; CTD settings that form clusters there
TINY_STAGE_CFGS = dict(similarity_enhancement_cfg=dict(layer=1),
                       ctd_cfg=dict(eps=0.5, min_samples=3, scale=0.5))


def build(**overrides):
    cfg = dict(type='SelfAttnCLIPSegmentor', clip=dict(arch=TINY_ARCH, pretrained=None),
               class_names=CLASSES, slide_crop=32, slide_stride=16, **TINY_STAGE_CFGS)
    cfg.update(overrides)
    return MODELS.build(cfg)


@pytest.fixture(scope='module')
def inputs():
    return torch.randn(1, 3, 40, 56, generator=torch.Generator().manual_seed(5))


def query_logits(model, inputs):
    return model.engine.slide_inference(inputs[0])


def test_stages_run_in_the_spec_order(inputs):
    model = build(**ALL_STAGES_ON, self_attn_enhancement_cfg=dict(mode='attention'))
    calls = []

    @contextmanager
    def record(stage):
        calls.append(stage)
        yield

    model.pipeline.timer = record
    model.pipeline.crop_logits(inputs[:, :, :32, :32])
    assert calls == ['encode', 'similarity_enhancement', 'self_attn_enhancement', 'dense_block',
                     'outlier_suppression', 'global_debias', 'ctd', 'classify']
    # feature mode runs after the dense block
    model = build(**ALL_STAGES_ON)
    calls.clear()
    model.pipeline.timer = record
    model.pipeline.crop_logits(inputs[:, :, :32, :32])
    assert calls.index('self_attn_enhancement') > calls.index('dense_block')


@pytest.mark.parametrize('stage, neutral_cfg', [
    ('similarity_enhancement', dict(layer=1, weight=0.0)),
    ('self_attn_enhancement', dict(enhancement_strength=0.0)),
    ('self_attn_enhancement', dict(min_self_attn_threshold=0.0)),
    ('self_attn_enhancement', dict(enhancement_strength=0.0, mode='attention')),
    ('self_attn_enhancement', dict(min_self_attn_threshold=0.0, mode='attention')),
    ('outlier_suppression', dict(top_k=0)),
    ('global_debias', dict(factor=0.0)),
    ('ctd', dict(scale=0.0, refine=0.0)),
])
@pytest.mark.parametrize('attention', ['naclip', 'sclip'])
def test_neutral_setting_is_bitwise_identity(inputs, stage, neutral_cfg, attention):
    """Each stage at its neutral value equals the pipeline without it, bit for bit."""
    others = {f'apply_{name}': True for name in PIPELINE_STAGES if name != stage}
    without = build(attention=attention, **others)
    with_neutral = build(attention=attention, **others, **{
        f'apply_{stage}': True, f'{stage}_cfg': neutral_cfg})
    expected = query_logits(without, inputs)
    assert torch.equal(query_logits(with_neutral, inputs), expected)
    # and the stage at a real setting does change the result (the test can fail)
    active = build(attention=attention, **ALL_STAGES_ON,
                   self_attn_enhancement_cfg=dict(mode=neutral_cfg.get('mode', 'feature'),
                                                  min_self_attn_threshold=1.0))
    assert not torch.equal(query_logits(active, inputs), expected)


def test_each_stage_changes_the_logits(inputs):
    baseline = query_logits(build(), inputs)
    for name in ('similarity_enhancement', 'outlier_suppression', 'global_debias', 'ctd'):
        changed = query_logits(build(**{f'apply_{name}': True}), inputs)
        assert not torch.allclose(changed, baseline), name
        assert torch.isfinite(changed).all()


def test_feature_mode_self_attention_alone_keeps_the_cosines(inputs):
    """SPEC §1.3: rescaling X_i leaves cos(X_i, t) unchanged; only later stages see it."""
    strong = dict(enhancement_strength=5.0, min_self_attn_threshold=1.0)
    baseline = query_logits(build(), inputs)
    alone = query_logits(build(apply_self_attn_enhancement=True,
                               self_attn_enhancement_cfg=strong), inputs)
    torch.testing.assert_close(alone, baseline, atol=1e-5, rtol=0)
    debias_only = query_logits(build(apply_global_debias=True), inputs)
    with_debias = query_logits(build(apply_global_debias=True, apply_self_attn_enhancement=True,
                                     self_attn_enhancement_cfg=strong), inputs)
    assert (with_debias - debias_only).abs().max() > 1e-4


def test_attention_mode_changes_the_logits_on_its_own(inputs):
    baseline = query_logits(build(), inputs)
    boosted = query_logits(build(apply_self_attn_enhancement=True, self_attn_enhancement_cfg=dict(
        mode='attention', enhancement_strength=5.0, min_self_attn_threshold=1.0)), inputs)
    assert (boosted - baseline).abs().max() > 1e-4


def test_cls_token_lambda_adds_the_cls_logits(inputs):
    crops = inputs[:, :, :32, :32]
    plain, biased = build(), build(cls_token_lambda=-0.3)
    encoded = plain.pipeline.encoder.encode(crops)
    queries = plain.pipeline.text_classifier.query_embeddings(plain.class_names)
    cls_cos = torch.nn.functional.normalize(encoded.x_cls, dim=-1) @ queries.T
    features = plain.pipeline.encoder.dense_features(encoded)
    torch.testing.assert_close(biased.pipeline.classify(features, encoded.x_cls),
                               plain.pipeline.classify(features) - 0.3 * cls_cos[:, None],
                               atol=1e-6,
                               rtol=0)


def test_self_attention_stats_reachable_from_the_segmentor(inputs):
    model = build(apply_self_attn_enhancement=True)
    attention = model.pipeline.encoder.encode(inputs[:, :, :32, :32],
                                              capture_attention=True).attention
    stats = model.pipeline.self_attn_enhancement.get_self_attention_stats(attention)
    diagonal = attention[:, 1:, 1:].diagonal(dim1=-2, dim2=-1)
    assert stats['mean'] == pytest.approx(diagonal.mean().item(), rel=1e-5)
    assert stats['below_threshold'] == pytest.approx((diagonal < 0.15).float().mean().item())


def test_full_pipeline_deterministic_and_finite(inputs):
    model = build(**ALL_STAGES_ON)
    first, second = model.predict(inputs), model.predict(inputs)
    assert torch.equal(first[0].seg_logits.data, second[0].seg_logits.data)
    assert torch.isfinite(first[0].seg_logits.data).all()


def tiny_cfg_options(data_root, images):
    return [
        f'model.clip.arch={TINY_ARCH}', 'model.clip.pretrained=None',
        'model.similarity_enhancement_cfg.layer=1', f'test_dataloader.dataset.data_root={data_root}',
        f'test_dataloader.dataset.indices={images}', 'test_dataloader.num_workers=0',
        'test_dataloader.persistent_workers=False'
    ]


def test_full_pipeline_through_runner_on_camvid(tmp_path):
    cfg = Config.fromfile(str(REPO_ROOT / 'configs/selfattn/selfattn-full_vit-b16_camvid.py'))
    cfg.model.clip = dict(arch=TINY_ARCH, pretrained=None)
    cfg.model.similarity_enhancement_cfg.layer = 1
    cfg.test_dataloader.dataset.update(data_root=str(camvid_root()), indices=3)
    cfg.test_dataloader.update(num_workers=0, persistent_workers=False)
    cfg.work_dir = str(tmp_path)
    assert all(cfg.model[f'apply_{name}'] for name in PIPELINE_STAGES)
    metrics = Runner.from_cfg(cfg).test()
    print(f"CamVid val[:3], all stages on, random tiny CLIP: mIoU {metrics['mIoU']:.2f}")
    assert 0.0 <= metrics['mIoU'] < 100.0


def test_ablation_tool_prints_the_six_row_table(tmp_path):
    command = [sys.executable, str(REPO_ROOT / 'tools/ablate.py'),
               str(REPO_ROOT / 'configs/ablation/camvid'), '--work-dir', str(tmp_path),
               '--cfg-options', *tiny_cfg_options(camvid_root(), 2)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith('| ') and
            line[2].isdigit()]
    assert [row.split('|')[2].strip() for row in rows] == [
        '0_baseline', '1_similarity', '2_self_attn', '3_outlier', '4_global_debias', '5_ctd']
    assert 'RANDOM weights' in run.stdout
    assert 'ctd' in rows[-1] and 'none (baseline)' in rows[0]
    assert (tmp_path / 'ablation.md').read_text().count('\n| ') >= 7
