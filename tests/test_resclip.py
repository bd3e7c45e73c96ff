"""ResCLIP (apply_rcs / apply_sfr) against an independent one-crop-at-a-time re-derivation of
the published forward, written from ../shared/methods/resclip.md §1: open_clip's blocks with
nn.MultiheadAttention's per-head weights for A^l, the last block one head at a time, pass 1
with its PAMR and the pixel-loop labels, Ŝ by the plain loops of test_resclip_formulas,
pass 2 with the transformed logits and ω added after, RCS in both passes."""
import math
import re

import pytest
import torch
import torch.nn.functional as F
from mmseg.registry import MODELS

from mmseg_selfattn.dense_attention import gaussian_window
from mmseg_selfattn.pamr import PAMR

from conftest import TINY_ARCH
from test_resclip_formulas import reference_patch_labels, reference_sfr

B16_ARCH = 'ViT-Tiny-16-test'  # ViT-B/16's patch and 14 x 14 grid, 2 blocks
TERMS = {'naclip': (('k', 'k'), ), 'sclip': (('q', 'q'), ('k', 'k')),
         'clearclip': (('q', 'q'), ), 'vanilla': (('q', 'k'), )}
RESIDUAL = {'naclip': False, 'sclip': True, 'clearclip': False, 'vanilla': True}


def build(arch=TINY_ARCH, **overrides):
    torch.manual_seed(0)
    return MODELS.build(dict(dict(
        type='SelfAttnCLIPSegmentor', clip=dict(arch=arch, pretrained=None),
        class_names=['sky', 'tree', 'road'], slide_crop=32, slide_stride=16,
        apply_rcs=True, rcs_cfg=dict(layers=(0, 1)), apply_sfr=True), **overrides))


# -- the re-derivation, one crop --------------------------------------------------------------
def ref_last_block(visual, z, attention, std, a_c=None, rcs=(0.3, 2.0), s_hat=None,
                   sfr=(0.7, 1.8)):
    """The dense last block of one crop, z (T, C): one head at a time."""
    block = visual.transformer.resblocks[-1]
    attn = block.attn
    width = z.shape[-1]
    heads = attn.num_heads
    d = width // heads
    y = block.ln_1(z)
    qkv = y @ attn.in_proj_weight.T + attn.in_proj_bias
    q_all, k_all, v_all = qkv.split(width, dim=-1)
    outs = []
    for h in range(heads):
        part = slice(h * d, (h + 1) * d)
        src = {'q': q_all[:, part], 'k': k_all[:, part]}
        p = 0
        for a, b in TERMS[attention]:
            g = src[a] @ src[b].T / math.sqrt(d)
            if s_hat is not None:  # SFR: λ_s Ŝ in half precision, as published
                lam, tau = sfr
                g = tau * ((1 - lam) * g + (lam * s_hat.half()).float())
            if attention == 'naclip':  # ω after SFR: not scaled
                g = g + window(z.shape[0], std)
            p = p + g.softmax(-1)
        if a_c is not None:
            lam, tau = rcs
            p = tau * ((1 - lam) * p + lam * a_c[h])
        outs.append(p @ v_all[:, part])
    out = torch.cat(outs, -1) @ attn.out_proj.weight.T + attn.out_proj.bias
    if RESIDUAL[attention]:
        out = z + out
        out = out + block.mlp(block.ln_2(out))
    return visual.ln_post(out[1:]) @ visual.proj


GRID = {}


def window(tokens, std):
    h, w = GRID['grid']
    assert h * w + 1 == tokens
    out = torch.zeros(tokens, tokens)
    for i in range(h * w):
        for j in range(h * w):
            dist = (i // w - j // w)**2 + (i % w - j % w)**2
            out[i + 1, j + 1] = math.exp(-dist / (2 * std**2))
    return out


def reference(model, crop, attention='naclip', layers=(0, 1), rcs=(0.3, 2.0), sfr=(0.7, 1.8),
              threshold=0.3, std=5.0, logit_scale=40.0):
    """Pass-2 query logits (Q, h, w) of one crop (3, H, W), and pass 1's labels."""
    encoder = model.pipeline.encoder
    visual = encoder.visual
    p = encoder.patch_size[0]
    grid = (crop.shape[-2] // p, crop.shape[-1] // p)
    GRID['grid'] = grid
    x = visual.conv1(crop[None]).flatten(2).transpose(1, 2)[0]
    x = torch.cat([visual.class_embedding[None], x]) + encoder.positional_embedding(grid)
    x = visual.ln_pre(x)[None]
    maps = []
    for index, block in enumerate(visual.transformer.resblocks[:-1]):
        if index in layers:  # A^l: the block's own per-head weights
            y = block.ln_1(x)
            maps.append(block.attn(y, y, y, need_weights=True,
                                   average_attn_weights=False)[1][0])
        x = block(x)
    z = x[0]
    a_c = sum(maps) / len(maps) if maps else None
    texts = model.pipeline.text_classifier.query_embeddings(model.class_names)

    def classify(features):
        logits = F.normalize(features, dim=-1) @ texts.T  # (N, Q)
        return logits.T.reshape(-1, *grid)

    pass1 = classify(ref_last_block(visual, z, attention, std, a_c, rcs))
    up = F.interpolate(pass1[None], size=crop.shape[-2:], mode='bilinear')
    refined = PAMR(10, (8, 16))(crop[None], up)[0]
    labels = reference_patch_labels(refined, logit_scale, threshold, p)
    s_hat = torch.tensor(reference_sfr(labels, std, True, False), dtype=torch.float32)
    pass2 = classify(ref_last_block(visual, z, attention, std, a_c, rcs, s_hat, sfr))
    return pass2, labels


def crops_of(size, count=2, seed=9):
    return torch.randn(count, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('attention', ['naclip', 'sclip', 'clearclip', 'vanilla'])
def test_pipeline_equals_the_published_derivation(attention):
    model = build(attention=attention)
    crops = crops_of((32, 48))
    with torch.no_grad():
        ours = model.pipeline.crop_patch_logits(crops)
        for b in range(len(crops)):
            expected, _ = reference(model, crops[b], attention)
            torch.testing.assert_close(ours[b], expected, rtol=1e-4, atol=1e-5)


def test_pipeline_equals_the_derivation_on_the_b16_grid():
    """14 x 14 patches of 16 (the published crop), other weights and thresholds."""
    model = build(B16_ARCH, rcs_cfg=dict(layers=(0, ), weight=0.4, scale=2.0),
                  sfr_cfg=dict(weight=0.6, scale=2.1, threshold=0.1))
    crop = crops_of((224, 224), 1, seed=3)
    with torch.no_grad():
        ours = model.pipeline.crop_patch_logits(crop)[0]
        expected, labels = reference(model, crop[0], layers=(0, ), rcs=(0.4, 2.0),
                                     sfr=(0.6, 2.1), threshold=0.1)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    assert len({label for row in labels for label in row}) > 1  # Ŝ is not trivial


def test_off_equals_naclip_bitwise_and_neutral_values_equal_the_base():
    crops = crops_of((32, 32), 3)
    base = build(apply_rcs=False, apply_sfr=False)
    plain = build(apply_rcs=False, apply_sfr=False, rcs_cfg=None, sfr_cfg=None)
    with torch.no_grad():
        expected = plain.pipeline.crop_patch_logits(crops)
        assert torch.equal(base.pipeline.crop_patch_logits(crops), expected)
        for overrides in (dict(apply_sfr=False, rcs_cfg=dict(layers=(0, ), weight=0.0,
                                                              scale=1.0)),
                          dict(apply_rcs=False, sfr_cfg=dict(weight=0.0, scale=1.0)),
                          dict(rcs_cfg=dict(layers=(1, ), weight=0.0, scale=1.0),
                               sfr_cfg=dict(weight=0.0, scale=1.0))):
            ours = build(**overrides).pipeline.crop_patch_logits(crops)
            torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
        # and the modules do something otherwise
        assert not torch.allclose(build().pipeline.crop_patch_logits(crops), expected,
                                  atol=1e-4)


def test_batched_equals_one_crop_at_a_time():
    model = build(sfr_cfg=dict(threshold=0.5))
    crops = crops_of((32, 40), 4, seed=5)
    with torch.no_grad():
        batched = model.pipeline.crop_patch_logits(crops)
        alone = torch.cat([model.pipeline.crop_patch_logits(crop[None]) for crop in crops])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)


def test_only_the_running_mean_of_the_rcs_blocks_is_kept():
    pipeline = build().pipeline
    encoded = pipeline.encode_crops(crops_of((32, 32)))
    assert list(encoded.attention_means) == [(0, 1)]
    a_c = encoded.attention_means[(0, 1)]
    assert a_c.shape == (2, 2, 17, 17) and a_c.dtype == torch.float32
    torch.testing.assert_close(a_c.sum(-1), torch.ones(2, 2, 17))


def test_stages_after_resclip_and_sweeps():
    """Stages 2-6 run after pass 2 (stage 3 in 'feature' mode); with_pipeline / sweeps give
    the same logits as a segmentor built with those settings."""
    from mmseg_selfattn.sweep import predict_variants
    image = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(11)) * 255
    stages = dict(apply_self_attn_enhancement=True,
                  self_attn_enhancement_cfg=dict(mode='feature'),
                  apply_outlier_suppression=True, apply_global_debias=True,
                  apply_similarity_enhancement=True, similarity_enhancement_cfg=dict(layer=0))
    full = build(**stages).predict(image)[0].seg_logits.data
    assert torch.isfinite(full).all()
    base = build(apply_rcs=False, apply_sfr=False)
    variants = (base, base.with_pipeline(apply_rcs=True, apply_sfr=True),
                base.with_pipeline(apply_rcs=True, apply_sfr=True, logit_scale=10.0))
    alone = [build().predict(image)[0].seg_logits.data,
             build(logit_scale=10.0).predict(image)[0].seg_logits.data]
    swept = [samples[0].seg_logits.data for samples in predict_variants(variants, image, None)]
    torch.testing.assert_close(swept[1], alone[0])
    torch.testing.assert_close(swept[2], alone[1])
    assert variants[1].pipeline.dense_key != variants[2].pipeline.dense_key


def test_segmentor_end_to_end_on_an_odd_size_image():
    model = build()
    image = torch.rand(1, 3, 37, 53, generator=torch.Generator().manual_seed(10)) * 255
    first = model.predict(image)[0].seg_logits.data
    assert first.shape == (3, 37, 53) and torch.isfinite(first).all()
    assert torch.equal(model.predict(image)[0].seg_logits.data, first)
    assert model.extract_feat(image).shape == (1, 5 * 7, 32)
    whole = build(slide_crop=0).predict(image)[0].seg_logits.data  # whole image, padded
    assert torch.isfinite(whole).all()


@pytest.mark.parametrize('overrides, message', [
    (dict(rcs_cfg=dict(layers=(0, 2))), 'rcs_cfg.layers: [2] out of range; the ViT has 3 '
                                        'blocks'),
    (dict(rcs_cfg=dict(layers=())), 'rcs_cfg.layers must be a non-empty list of ints'),
    (dict(rcs_cfg=dict(layers=(0, 0))), 'rcs_cfg.layers must name each block once'),
    (dict(rcs_cfg=dict(layers=(0, ), weight=1.5)), 'rcs_cfg.weight must be a number in [0, 1]'),
    (dict(rcs_cfg=dict(layers=(0, ), scale=-1)), 'rcs_cfg.scale must be a number in [0, inf)'),
    (dict(rcs_cfg=dict(layers=(0, ), tau=2)), "rcs_cfg: unknown key(s) ['tau']"),
    (dict(sfr_cfg=dict(weight=math.nan)), 'sfr_cfg.weight must be a number in [0, 1]'),
    (dict(sfr_cfg=dict(threshold=2)), 'sfr_cfg.threshold must be a number in [0, 1]'),
    (dict(sfr_cfg=dict(blur_std=0)), 'sfr_cfg.blur_std must be a number in (0, inf)'),
    (dict(sfr_cfg=dict(line_decay=1)), 'sfr_cfg.line_decay must be True or False'),
    (dict(sfr_cfg=dict(pamr_steps=-1)), 'sfr_cfg.pamr_steps must be an int >= 0'),
    (dict(sfr_cfg=dict(pamr_stride=(0, ))), 'sfr_cfg.pamr_stride must be an int or a non-empty'),
    (dict(sfr_cfg=[1]), 'sfr_cfg must be a dict'),
    (dict(apply_rcs=1), 'apply_rcs must be True or False'),
    (dict(attention='maskclip'), "apply_rcs=True and apply_sfr=True (ResCLIP) needs attention in "
                                 "['naclip', 'sclip', 'clearclip', 'vanilla'], got "
                                 "attention='maskclip'"),
    (dict(attention='gated', apply_rcs=False), "apply_sfr=True (ResCLIP) needs attention in"),
    (dict(apply_self_attn_enhancement=True, self_attn_enhancement_cfg=dict(mode='attention')),
     "apply_rcs=True cannot combine with apply_self_attn_enhancement=True in mode='attention'"),
])
def test_bad_cfg_fails_at_build_with_one_line(overrides, message):
    with pytest.raises(ValueError, match='^' + re.escape(message)) as error:
        build(**overrides)
    assert '\n' not in str(error.value)


def test_scclip_is_refused_and_cfgs_are_checked_when_off():
    with pytest.raises(ValueError, match=re.escape("got attention='scclip'")):
        build(attention='scclip', scclip_cfg=dict(pre_layer=1, post_layer=0,
                                                  fusion_layers=(0, 1)))
    with pytest.raises(ValueError, match=re.escape("sfr_cfg: unknown key(s) ['temp_thd']")):
        build(apply_sfr=False, sfr_cfg=dict(temp_thd=0.3))
    # the default layers 5..8 are ViT-B's: checked against the ViT only when RCS is on
    assert build(apply_rcs=False, rcs_cfg=None).pipeline.rcs is None
    # SFR with stage 3's 'attention' mode composes (SFR keeps the row sums)
    model = build(apply_rcs=False, apply_self_attn_enhancement=True,
                  self_attn_enhancement_cfg=dict(mode='attention'))
    with torch.no_grad():
        assert torch.isfinite(model.pipeline.crop_patch_logits(crops_of((32, 32)))).all()


def test_gaussian_window_matches_the_reference_window():
    GRID['grid'] = (3, 4)
    torch.testing.assert_close(gaussian_window((3, 4), 5.0), window(13, 5.0))
