"""The dense encoder against independent re-derivations of each published formula."""
import copy

import pytest
import torch
import torch.nn.functional as F

from mmseg_selfattn.dense_attention import DENSE_VARIANTS, attention_probs, gaussian_window
from mmseg_selfattn.encoder import DenseCLIPEncoder, patch_embed_as_matmul

ATOL = 1e-5


def last_block_input(visual, images):
    """Input of the last block, captured from open_clip's own forward."""
    captured = {}
    hook = visual.transformer.resblocks[-1].register_forward_pre_hook(
        lambda module, args: captured.setdefault('x', args[0]))
    visual(images)
    hook.remove()
    return captured['x']


def reference_dense(visual, x, name, std=5.0, grid=None):
    """Re-derivation in the style of the published code (SCLIP / NACLIP / ClearCLIP):
    heads folded into the batch, torch.bmm, explicit softmax. ``grid``: the patch grid of
    ``x`` (default: the trained one)."""
    block = visual.transformer.resblocks[-1]
    attn = block.attn
    batch, tokens, width = x.shape
    heads = attn.num_heads
    head_dim = width // heads
    scale = head_dim**-0.5
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(batch, tokens, heads, head_dim).transpose(1, 2).reshape(
        batch * heads, tokens, head_dim) for t in (q, k, v))
    if name == 'maskclip':
        out = v
    else:
        if name == 'vanilla':
            weights = F.softmax(torch.bmm(q * scale, k.transpose(1, 2)), dim=-1)
        elif name == 'sclip':
            weights = (F.softmax(torch.bmm(q, q.transpose(1, 2)) * scale, dim=-1) +
                       F.softmax(torch.bmm(k, k.transpose(1, 2)) * scale, dim=-1))
        elif name == 'clearclip':
            weights = F.softmax(torch.bmm(q, q.transpose(1, 2)) * scale, dim=-1)
        elif name == 'naclip':
            h, w = grid or visual.grid_size
            ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
            ys, xs = ys.flatten().float(), xs.flatten().float()
            window = torch.exp(-((ys[:, None] - ys[None])**2 + (xs[:, None] - xs[None])**2) /
                               (2 * std**2))
            logits = torch.bmm(k, k.transpose(1, 2)) * scale
            logits[:, 1:, 1:] += window
            weights = F.softmax(logits, dim=-1)
        elif name == 'gated':
            gate = torch.sigmoid(torch.bmm(q, q.transpose(1, 2)) * scale)
            weights = F.softmax(gate * (torch.bmm(k, k.transpose(1, 2)) * scale), dim=-1)
        out = torch.bmm(weights, v)
    out = out.reshape(batch, heads, tokens, head_dim).transpose(1, 2).reshape(batch, tokens, width)
    out = attn.out_proj(out)
    if name in ('vanilla', 'sclip'):  # residual and FFN kept
        out = x + out
        out = out + block.mlp(block.ln_2(out))
    return visual.ln_post(out[:, 1:]) @ visual.proj


@pytest.mark.parametrize('name', sorted(DENSE_VARIANTS))
def test_variant_matches_published_formula(tiny_clip, images, name):
    visual = tiny_clip.visual
    encoder = DenseCLIPEncoder(visual, attention=name, gaussian_std=2.0)
    with torch.no_grad():
        ours = encoder.dense_features(encoder.encode(images))
        expected = reference_dense(visual, last_block_input(visual, images), name, std=2.0)
    assert ours.shape == (2, 16, tiny_clip.visual.output_dim)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize('name', ['sclip', 'naclip', 'gated'])
def test_explicit_probability_path_equals_fused(tiny_clip, images, name):
    """A probability hook forces the explicit softmax path; an identity hook changes nothing."""
    encoder = DenseCLIPEncoder(tiny_clip.visual, attention=name)
    with torch.no_grad():
        encoded = encoder.encode(images)
        fused = encoder.dense_features(encoded)
        explicit = encoder.dense_features(encoded, probs_hook=lambda probs: probs)
    torch.testing.assert_close(explicit, fused, atol=ATOL, rtol=0)


def test_vanilla_equals_open_clip_forward(tiny_clip, images):
    visual = tiny_clip.visual
    encoder = DenseCLIPEncoder(visual, attention='vanilla')
    visual.output_tokens = True
    try:
        with torch.no_grad():
            pooled, tokens = visual(images)
            encoded = encoder.encode(images)
            ours = encoder.dense_features(encoded)
    finally:
        visual.output_tokens = False
    torch.testing.assert_close(ours, tokens @ visual.proj, atol=ATOL, rtol=0)
    torch.testing.assert_close(encoded.x_cls, pooled, atol=ATOL, rtol=0)


def test_captured_attention_is_the_standard_head_mean(tiny_clip, images):
    visual = tiny_clip.visual
    encoder = DenseCLIPEncoder(visual, attention='naclip')
    block = visual.transformer.resblocks[-1]
    x = last_block_input(visual, images)
    with torch.no_grad():
        _, weights = block.attn(block.ln_1(x), block.ln_1(x), block.ln_1(x), need_weights=True,
                                average_attn_weights=True)
        encoded = encoder.encode(images, capture_attention=True, mid_layers=(0, -2))
    torch.testing.assert_close(encoded.attention, weights, atol=ATOL, rtol=0)
    assert torch.allclose(encoded.attention.sum(-1), torch.ones(2, 17))
    assert sorted(encoded.mid_features) == [0, 1]
    assert encoded.mid_features[0].shape == (2, 16, visual.transformer.width)


def test_positional_interpolation_identity_at_native_size(tiny_clip):
    encoder = DenseCLIPEncoder(tiny_clip.visual)
    native = encoder.positional_embedding(tuple(tiny_clip.visual.grid_size))
    assert torch.equal(native, tiny_clip.visual.positional_embedding)
    # bicubic resize: CLS untouched, new grid size, a resize back is close to the original
    wide = encoder.positional_embedding((4, 7))
    assert wide.shape == (1 + 28, tiny_clip.visual.transformer.width)
    assert torch.equal(wide[0], tiny_clip.visual.positional_embedding[0])


def test_resized_positional_embedding_is_kept_per_grid_and_never_stale(tiny_clip):
    visual = copy.deepcopy(tiny_clip.visual)
    encoder = DenseCLIPEncoder(visual)
    with torch.no_grad():
        first = encoder.positional_embedding((4, 7))
        assert encoder.positional_embedding((4, 7)) is first  # kept
        assert not torch.equal(encoder.positional_embedding((5, 7))[1:6], first[1:6])
        visual.positional_embedding.mul_(2.0)  # changed in place: a new version
        doubled = encoder.positional_embedding((4, 7))
        torch.testing.assert_close(doubled, 2 * first)
        visual.positional_embedding = torch.nn.Parameter(visual.positional_embedding + 1)
        shifted = encoder.positional_embedding((4, 7))  # a replaced table
    torch.testing.assert_close(shifted, doubled + 1)
    fresh = DenseCLIPEncoder(visual)
    assert torch.equal(shifted, fresh.positional_embedding((4, 7)))


@pytest.mark.parametrize('name', sorted(DENSE_VARIANTS))
def test_non_square_crops(tiny_clip, name):
    encoder = DenseCLIPEncoder(tiny_clip.visual, attention=name)
    crops = torch.randn(3, 3, 24, 56)
    with torch.no_grad():
        encoded = encoder.encode(crops, capture_attention=True)
        features = encoder.dense_features(encoded)
        # batched crops equal crops one at a time
        single = torch.cat([encoder.dense_features(encoder.encode(c[None])) for c in crops])
    assert encoded.grid == (3, 7)
    assert features.shape == (3, 21, tiny_clip.visual.output_dim)
    assert torch.isfinite(features).all()
    torch.testing.assert_close(features, single, atol=ATOL, rtol=0)


def test_logit_bias_reaches_every_term(tiny_clip, images):
    """A huge bias towards one key makes every token copy that key's value."""
    encoder = DenseCLIPEncoder(tiny_clip.visual, attention='sclip')
    encoded = encoder.encode(images)
    bias = torch.full((2, 17, 17), -1e4)
    bias[..., 3] = 0
    probs = attention_probs(encoder.variant, encoded.q, encoded.k, bias[:, None])
    assert torch.allclose(probs[..., 3], torch.full_like(probs[..., 3], 2.0))


def test_patch_embedding_matmul_equals_the_conv(tiny_clip):
    conv = tiny_clip.visual.conv1  # the GPU path's matmul, checked here on CPU
    crops = torch.randn(3, 3, 24, 40)
    expected = conv(crops).flatten(2).transpose(1, 2)
    torch.testing.assert_close(patch_embed_as_matmul(conv, crops, (3, 5)), expected,
                               atol=1e-5, rtol=1e-5)


def test_gaussian_window():
    window = gaussian_window((2, 3), std=1.0)
    assert window.shape == (7, 7)
    assert torch.all(window[0] == 0) and torch.all(window[:, 0] == 0)
    assert torch.allclose(window[1:, 1:].diagonal(), torch.ones(6))
    # patches (0,0) and (1,2): squared distance 5
    assert torch.isclose(window[1, 6], torch.exp(torch.tensor(-2.5)))


def test_bad_attention_name(tiny_clip):
    with pytest.raises(ValueError, match="attention='foo'.*clearclip"):
        DenseCLIPEncoder(tiny_clip.visual, attention='foo')


def test_mid_layer_out_of_range(tiny_clip, images):
    encoder = DenseCLIPEncoder(tiny_clip.visual)
    with pytest.raises(ValueError, match='mid layer 2 is out of range'):
        encoder.encode(images, mid_layers=(2, ))
