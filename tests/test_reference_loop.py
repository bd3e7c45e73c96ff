"""The published-style reference loop (the benchmark's yardstick) gives our outputs."""
import pytest
import torch
from mmseg.registry import MODELS

from mmseg_selfattn.dense_attention import DENSE_VARIANTS
from mmseg_selfattn.reference_loop import ReferenceEncoder, outlier_choices, reference_loop
from mmseg_selfattn.stages import PIPELINE_STAGES

from conftest import TINY_ARCH


def build(**overrides):
    cfg = dict(type='SelfAttnCLIPSegmentor', clip=dict(arch=TINY_ARCH, pretrained=None),
               class_names=['sky', 'tree, bush', 'road'], slide_crop=32, slide_stride=16,
               similarity_enhancement_cfg=dict(layer=1),
               ctd_cfg=dict(eps=0.5, min_samples=3), **overrides)
    return MODELS.build(cfg)


@pytest.mark.parametrize('attention', sorted(DENSE_VARIANTS))
@pytest.mark.parametrize('mode', ['feature', 'attention'])
def test_reference_loop_equals_batched_pipeline_in_fp32(attention, mode):
    stages = {f'apply_{name}': True for name in PIPELINE_STAGES}
    if attention == 'maskclip':
        stages['apply_similarity_enhancement'] = False  # maskclip has no logits
    model = build(attention=attention, self_attn_enhancement_cfg=dict(mode=mode), **stages)
    reference = reference_loop(model, torch.float32)
    image = torch.randn(3, 40, 56, generator=torch.Generator().manual_seed(0))
    ours = model.engine.slide_inference(image)
    theirs = reference.engine.slide_inference(image)
    assert (ours - theirs).abs().max() <= 1e-4
    assert isinstance(reference.pipeline.encoder, ReferenceEncoder)
    assert reference.engine.max_crops_per_forward == 1
    assert model.pipeline.encoder is not reference.pipeline.encoder  # the original is untouched


def test_reference_encoder_in_half_precision_is_close():
    model = build()
    reference = reference_loop(model, torch.bfloat16)  # fp16 matmuls are slow on CPU
    image = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert reference.pipeline.encoder.visual.proj.dtype == torch.bfloat16
    assert model.pipeline.encoder.visual.proj.dtype == torch.float32
    difference = model.engine.slide_inference(image) - reference.engine.slide_inference(image)
    assert difference.abs().max() < 0.05


def test_reference_loop_runs_clips_own_blocks_one_crop_at_a_time():
    """Like the published code: blocks 1..L-1 are CLIP's modules (fused MHA path), called
    once per crop with a batch of one; only the last block is written by hand."""
    model = build(apply_self_attn_enhancement=True, apply_outlier_suppression=True)
    reference = reference_loop(model, torch.float32)
    blocks = reference.pipeline.encoder.visual.transformer.resblocks
    batches = {index: [] for index in range(len(blocks))}
    for index, block in enumerate(blocks):
        block.register_forward_hook(
            lambda module, inputs, output, index=index: batches[index].append(len(inputs[0])))
    reference.engine.slide_inference(
        torch.randn(3, 40, 56, generator=torch.Generator().manual_seed(2)))
    windows = 2 * 3  # 40 x 56 with crop 32, stride 16
    assert all(batches[index] == [1] * windows for index in range(len(blocks) - 1))
    assert batches[len(blocks) - 1] == []  # the last block is the hand-written one


def test_reference_loop_predict_equals_pipeline():
    stages = {f'apply_{name}': True for name in PIPELINE_STAGES}
    model = build(prob_thd=0.1, **stages)
    reference = reference_loop(model, torch.float32)
    images = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(3))
    ours, theirs = model.predict(images), reference.predict(images)
    for a, b in zip(ours, theirs):
        assert (a.seg_logits.data - b.seg_logits.data).abs().max() <= 1e-4
        same = (a.pred_sem_seg.data == b.pred_sem_seg.data).float().mean()
        assert same >= 0.99


def test_outlier_choices_of_pipeline_and_reference_agree_in_fp32():
    model = build(apply_outlier_suppression=True, outlier_suppression_cfg=dict(top_k=4))
    image = torch.randn(3, 40, 56, generator=torch.Generator().manual_seed(4))
    ours = outlier_choices(model, image)
    assert len(ours) == 6 and all(len(chosen) == 4 for chosen in ours)  # 6 windows
    assert outlier_choices(reference_loop(model, torch.float32), image) == ours
    fewer = outlier_choices(model.with_pipeline(outlier_suppression_cfg=dict(top_k=2)), image)
    assert all(small < big for small, big in zip(fewer, ours))  # the two highest of the four
    assert model.pipeline.recorder is None
