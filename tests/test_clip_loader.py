"""Weights sources of SPEC §4: round trips through every checkpoint format, clear errors."""
import pytest
import torch
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file

from mmseg_selfattn.clip_loader import load_clip
from mmseg_selfattn.encoder import DenseCLIPEncoder

from conftest import TINY_ARCH


def features(model, images):
    encoder = DenseCLIPEncoder(model.visual, attention='sclip')
    with torch.no_grad():
        return encoder.dense_features(encoder.encode(images)), model.encode_text(
            torch.arange(1, 78)[None])


def uses_quick_gelu(model):
    return isinstance(model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)


@pytest.fixture(scope='module')
def openai_model():
    """Random model of the tiny arch as OpenAI builds it (QuickGELU)."""
    torch.manual_seed(3)
    return load_clip(TINY_ARCH, pretrained=None, quick_gelu=True)


def assert_same_outputs(loaded, reference, images):
    for ours, expected in zip(features(loaded, images), features(reference, images)):
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


def test_openai_state_dict_round_trip(openai_model, images, tmp_path):
    """OpenAI's state dicts: fp16 with marker buffers; must come back with QuickGELU."""
    state_dict = {k: v.half() for k, v in openai_model.state_dict().items()}
    state_dict.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77),
                      vocab_size=torch.tensor(49408))
    torch.save(state_dict, tmp_path / 'openai.pt')
    loaded = load_clip(TINY_ARCH, str(tmp_path / 'openai.pt'))
    assert uses_quick_gelu(loaded)
    reference = load_clip(TINY_ARCH, None, quick_gelu=True)
    reference.load_state_dict({k: v.half().float() for k, v in openai_model.state_dict().items()})
    assert_same_outputs(loaded, reference, images)


def test_openai_torchscript_round_trip(openai_model, images, tmp_path):
    archive = torch.jit.trace(openai_model, (images[:1], torch.arange(1, 78)[None]),
                              strict=False, check_trace=False)
    archive.save(str(tmp_path / 'ViT-openai.pt'))
    loaded = load_clip(TINY_ARCH, str(tmp_path / 'ViT-openai.pt'))
    assert uses_quick_gelu(loaded)
    assert_same_outputs(loaded, openai_model, images)


@pytest.mark.parametrize('suffix', ['.pt', '.bin', '.safetensors'])
def test_open_clip_state_dict_round_trip(tiny_clip, images, tmp_path, suffix):
    path = tmp_path / f'open_clip_model{suffix}'
    state_dict = {k: v.contiguous() for k, v in tiny_clip.state_dict().items()}
    if suffix == '.safetensors':
        save_file(state_dict, str(path))
    else:
        torch.save({'state_dict': {f'module.{k}': v for k, v in state_dict.items()}}, path)
    loaded = load_clip(TINY_ARCH, str(path))
    assert not uses_quick_gelu(loaded)  # open_clip-trained: plain GELU
    assert_same_outputs(loaded, tiny_clip, images)


def test_quick_gelu_override(tiny_clip, tmp_path):
    torch.save(tiny_clip.state_dict(), tmp_path / 'm.pt')
    assert uses_quick_gelu(load_clip(TINY_ARCH, str(tmp_path / 'm.pt'), quick_gelu=True))


def test_wrong_architecture_is_a_clear_error(tmp_path):
    other = load_clip('ViT-B-32', None)
    torch.save(other.state_dict(), tmp_path / 'b32.pt')
    with pytest.raises(ValueError, match=r"does not fit clip.arch='ViT-Tiny-8-test'.*"
                       r"width 768, patch 32, 12 layers(.|\n)*Set clip.arch"):
        load_clip(TINY_ARCH, str(tmp_path / 'b32.pt'))


def test_missing_file_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="neither a file nor an open_clip tag.*None"):
        load_clip('ViT-B-16', '/nowhere/ViT-B-16.pt')


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="clip.arch='ViT-X-99' is not an open_clip model"):
        load_clip('ViT-X-99', None)


def test_non_vit_arch_is_rejected():
    with pytest.raises(ValueError, match="clip.arch='RN50' is not supported.*not a ViT"):
        load_clip('RN50', None)


def test_garbage_file_is_a_clear_error(tmp_path):
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='could not be read as a tensor state dict'):
        load_clip(TINY_ARCH, str(tmp_path / 'junk.pt'))


def test_offline_tag_download_is_a_clear_error(monkeypatch):
    import open_clip

    def offline(*args, **kwargs):
        raise RuntimeError('Failed to download weights for tag')

    monkeypatch.setattr(open_clip, 'create_model', offline)
    with pytest.raises(RuntimeError, match=r"Could not fetch .*pretrained='openai'.*"
                       r"clip.pretrained='/path/to/checkpoint'"):
        load_clip('ViT-B-16', 'openai')


@pytest.mark.parametrize('arch', ['ViT-B-16', 'ViT-L-14'])
def test_real_archs_build(arch):
    """The exact published architectures build and pass the dense-compatibility check."""
    model = load_clip(arch, None)
    assert model.visual.output_dim == {'ViT-B-16': 512, 'ViT-L-14': 768}[arch]


def test_random_weights_are_seeded():
    a, b = load_clip(TINY_ARCH, None), load_clip(TINY_ARCH, None)
    c = load_clip(TINY_ARCH, None, seed=1)
    assert torch.equal(a.visual.proj, b.visual.proj)
    assert not torch.equal(a.visual.proj, c.visual.proj)
