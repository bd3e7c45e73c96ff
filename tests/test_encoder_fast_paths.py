"""The encoder's fast paths equal the plain formulas: the explicit block that
``compile=True`` compiles, and the captured standard attention A."""
import pytest
import torch
import torch.nn.functional as F

from mmseg_selfattn.clip_loader import load_clip
from mmseg_selfattn.encoder import DenseCLIPEncoder, explicit_block, standard_attention

from conftest import TINY_ARCH


@pytest.fixture(scope='module')
def encoder():
    torch.manual_seed(0)
    return DenseCLIPEncoder(load_clip(TINY_ARCH, pretrained=None).visual.eval())


@pytest.mark.parametrize('quick_gelu', [False, True])
def test_explicit_block_equals_clips_block(quick_gelu):
    torch.manual_seed(1)
    visual = load_clip(TINY_ARCH, pretrained=None, quick_gelu=quick_gelu).visual.eval()
    x = torch.randn(3, 17, visual.transformer.width)
    with torch.no_grad():
        for block in visual.transformer.resblocks:
            torch.testing.assert_close(explicit_block(block, x), block(x), atol=1e-5, rtol=1e-5)


def test_standard_attention_is_the_head_mean_of_softmax(encoder):
    crops = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        encoded = encoder.encode(crops, capture_attention=True)
    q, k = encoded.q, encoded.k
    expected = F.softmax(q @ k.transpose(-2, -1) / q.shape[-1]**0.5, dim=-1).mean(dim=1)
    torch.testing.assert_close(encoded.attention, expected, atol=1e-6, rtol=1e-5)
    assert encoded.attention.dtype == torch.float32
    torch.testing.assert_close(encoded.attention.sum(-1), torch.ones(2, q.shape[2]))
    half = standard_attention(q.bfloat16(), k.bfloat16())
    assert half.dtype == torch.float32 and (half - expected).abs().max() < 2e-2


def test_run_block_is_clips_block_until_compiled(encoder):
    block = encoder.visual.transformer.resblocks[0]
    x = torch.randn(1, 7, encoder.visual.transformer.width)
    with torch.no_grad():
        assert torch.equal(encoder.run_block(block, x), block(x))
