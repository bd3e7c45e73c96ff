"""Layer-wise self-attention enhancement (the seed's extension): earlier ViT blocks."""
import pytest
import torch

from mmseg_selfattn.sweep import predict_variants

from conftest import build_tiny_segmentor  # TINY_ARCH: 3 blocks, the last is the dense one


def build(**sa_cfg):
    return build_tiny_segmentor(
        apply_self_attn_enhancement=True, apply_global_debias=True,
        self_attn_enhancement_cfg=dict(min_self_attn_threshold=0.9, **sa_cfg))


def block_input(model, crops, index):
    encoder = model.pipeline.encoder
    x = encoder._embed(crops, (4, 4))
    for block in encoder.visual.transformer.resblocks[:index]:
        x = block(x)
    return x


def test_default_and_zero_strength_leave_the_encoding_bitwise():
    crops = torch.randn(2, 3, 32, 32)
    plain = build().pipeline.encode_crops(crops)
    for cfg in (dict(layers=[-1]), dict(layers=[0, -1], enhancement_strength=[0.0, 0.1])):
        model = build(**cfg)
        assert model.pipeline.block_edits == {}
        encoded = model.pipeline.encode_crops(crops)
        assert torch.equal(encoded.block_input, plain.block_input)


def test_explicit_block_without_boost_equals_the_fused_block():
    model = build()
    block = model.pipeline.encoder.visual.transformer.resblocks[0]
    x = block_input(model, torch.randn(2, 3, 32, 32), 0)
    explicit = model.pipeline.encoder._enhanced_block(block, x, 'attention', 0.0, 0.9)
    torch.testing.assert_close(explicit, block(x), atol=1e-5, rtol=1e-5)


def test_feature_mode_scales_the_blocks_output_by_its_own_deficit():
    model = build(layers=[1], enhancement_strength=0.7)
    assert model.pipeline.block_edits == {1: ('feature', 0.7, 0.9)}
    assert model.pipeline.self_attn_enhancement.strength == 0.0  # the dense block is not listed
    crops = torch.randn(2, 3, 32, 32)
    block = model.pipeline.encoder.visual.transformer.resblocks[1]
    x = block_input(model, crops, 1)
    normed = block.ln_1(x)
    _, weights = block.attn(normed, normed, normed, need_weights=True,
                            average_attn_weights=True)  # head-mean A of block 1, by torch
    deficit = (0.9 - weights.diagonal(dim1=-2, dim2=-1)[:, 1:]).clamp_min(0)
    out = block(x)
    expected = torch.cat([out[:, :1], out[:, 1:] * (1 + 0.7 * deficit)[..., None]], dim=1)
    encoder = model.pipeline.encoder
    torch.testing.assert_close(encoder._enhanced_block(block, x, 'feature', 0.7, 0.9),
                               expected, atol=1e-5, rtol=1e-5)
    # and the model's encoding runs block 1 that way
    assert not torch.equal(model.pipeline.encode_crops(crops).block_input,
                           build().pipeline.encode_crops(crops).block_input)


def test_attention_mode_boosts_the_blocks_diagonal():
    model = build(layers=[0, -1], enhancement_strength=[0.5, 0.2], mode='attention')
    assert model.pipeline.block_edits == {0: ('attention', 0.5, 0.9)}
    assert model.pipeline.self_attn_enhancement.strength == 0.2
    block = model.pipeline.encoder.visual.transformer.resblocks[0]
    x = block_input(model, torch.randn(2, 3, 32, 32), 0)
    boosted = model.pipeline.encoder._enhanced_block(block, x, 'attention', 0.5, 0.9)
    plain = block(x)
    assert not torch.allclose(boosted, plain, atol=1e-4)
    samples = model.predict(torch.randn(1, 3, 48, 48))
    assert torch.isfinite(samples[0].seg_logits.data).all()


@pytest.mark.parametrize('cfg, match', [
    (dict(layers=[3]), 'out of range'),
    (dict(layers=[-1, 2]), 'listed twice'),
    (dict(layers=[0, -1], enhancement_strength=[0.1]), '1 values for 2 layer'),
    (dict(layers=[]), 'non-empty list'),
    (dict(layers=['0']), 'non-empty list'),
    (dict(layers=[0, -1], enhancement_strength=[0.1, -1]), r'enhancement_strength\[1\]')])
def test_bad_layers_are_named(cfg, match):
    with pytest.raises(ValueError, match=match):
        build(**cfg)


def test_log_line_lists_layers(log_records):
    build(layers=[0, -1], enhancement_strength=[0.3, 0.1])
    assert ('[Self-Attention Enhancement] Enabled with strength=[0.3, 0.1], threshold=0.9, '
            'mode=feature, layers=[0, -1]') in log_records


def test_sweep_variants_with_other_layers_get_their_own_encoding():
    base = build()
    variants = [base.with_pipeline(self_attn_enhancement_cfg=cfg) for cfg in (
        dict(min_self_attn_threshold=0.9), dict(min_self_attn_threshold=0.9, layers=[0, -1]),
        dict(min_self_attn_threshold=0.9, layers=[1], mode='attention'))]
    inputs = torch.randn(1, 3, 40, 56)
    swept = [samples[0].seg_logits.data.clone()
             for samples in predict_variants(variants, inputs, None)]
    for variant, probs in zip(variants, swept):
        assert torch.equal(probs, variant.predict(inputs)[0].seg_logits.data)
    assert not torch.equal(swept[0], swept[1]) and not torch.equal(swept[1], swept[2])
