"""Weights sources of SPEC §4: round trips through every checkpoint format, clear errors."""
import copy
import os
import socket
import time
import zipfile

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file

from mmseg_selfattn import clip_loader
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


def test_a_checkpoint_load_skips_random_initialisation_and_restores_it(tiny_clip, tmp_path,
                                                                       monkeypatch):
    torch.save(tiny_clip.state_dict(), tmp_path / 'm.pt')
    initialisers = {(module, name): getattr(module, name)
                    for module in (torch.nn.init, torch.nn.modules.activation)
                    for name in dir(module) if name.endswith('_') and not name.startswith('_')}
    drawn = []
    original = torch.nn.init.normal_
    monkeypatch.setattr(torch.nn.init, 'normal_',
                        lambda tensor, *a, **k: drawn.append(1) or original(tensor, *a, **k))
    loaded = load_clip(TINY_ARCH, str(tmp_path / 'm.pt'))
    assert not drawn  # open_clip's init_parameters draws with nn.init.normal_
    for key, value in tiny_clip.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    load_clip(TINY_ARCH, None)  # random weights draw them
    assert drawn
    torch.save({'visual.conv1.weight': torch.zeros(1)}, tmp_path / 'bad.pt')
    with pytest.raises(ValueError):  # an error inside the build restores the initialisers
        load_clip(TINY_ARCH, str(tmp_path / 'bad.pt'))
    monkeypatch.undo()
    assert all(getattr(module, name) is function
               for (module, name), function in initialisers.items())


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


def test_offline_tag_download_is_a_clear_error(monkeypatch, no_offline_env):
    def offline(*args, **kwargs):
        raise RuntimeError('Failed to download weights for tag')

    monkeypatch.setattr(clip_loader, '_host_reachable', lambda host, port: True)
    monkeypatch.setattr(open_clip, 'create_model', offline)
    with pytest.raises(RuntimeError, match=r"Could not fetch .*pretrained='openai'.*"
                       r"clip.pretrained='/path/to/checkpoint'"):
        load_clip('ViT-B-16', 'openai')
    # a tool reports it as the user's mistake: one line, not a traceback
    from mmseg_selfattn.cli import UsageError, user_files
    with pytest.raises(UsageError, match=r"^Could not fetch [^\n]*pretrained='openai'[^\n]*$"):
        with user_files('--pretrained openai'):
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


# --- NaN / inf weights ---------------------------------------------------------------------

def with_nan_proj(model):
    """A copy of ``model`` whose visual.proj holds 3 NaN / inf values."""
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.visual.proj[0, :2] = float('nan')
        broken.visual.proj[1, 0] = float('-inf')
    return broken


def save_openai_torchscript(model, path, images):
    torch.jit.trace(model, (images[:1], torch.arange(1, 78)[None]), strict=False,
                    check_trace=False).save(str(path))


def save_openai_state_dict(model, path, images):
    state_dict = {k: v.half() for k, v in model.state_dict().items()}
    state_dict.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77),
                      vocab_size=torch.tensor(49408))
    torch.save(state_dict, path)


def save_open_clip(model, path, images):
    state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == '.safetensors':
        save_file(state_dict, str(path))
    else:
        torch.save({'state_dict': state_dict}, path)


@pytest.mark.parametrize('save, name', [
    (save_openai_torchscript, 'ViT-openai.pt'), (save_openai_state_dict, 'openai_sd.pt'),
    (save_open_clip, 'model.pt'), (save_open_clip, 'model.bin'),
    (save_open_clip, 'model.safetensors')])
def test_non_finite_weights_are_refused(openai_model, images, tmp_path, save, name):
    path = tmp_path / name
    save(with_nan_proj(openai_model), path, images)
    with pytest.raises(ValueError, match=f"^clip.pretrained='{path}': tensor 'visual.proj' holds "
                       '3 NaN / inf values; the checkpoint is corrupt.$'):
        load_clip(TINY_ARCH, str(path))


def test_non_finite_weights_list_the_first_tensors(tiny_clip, tmp_path):
    state_dict = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    state_dict['visual.proj'][0, 0] = float('inf')
    state_dict['text_projection'][:, :2] = float('nan')
    torch.save(state_dict, tmp_path / 'm.pt')
    with pytest.raises(ValueError, match=r"m.pt': 2 tensors hold NaN / inf values: "
                       r"'text_projection' \(\d+\), 'visual.proj' \(1\); the checkpoint is "
                       'corrupt'):
        load_clip(TINY_ARCH, str(tmp_path / 'm.pt'))


def test_non_finite_tag_weights_are_refused(tiny_clip, monkeypatch, no_offline_env):
    broken = with_nan_proj(tiny_clip)
    monkeypatch.setattr(clip_loader, '_host_reachable', lambda host, port: True)
    monkeypatch.setattr(open_clip, 'create_model', lambda *args, **kwargs: broken)
    with pytest.raises(ValueError, match="clip.pretrained='openai': tensor 'visual.proj' holds 3"):
        load_clip('ViT-B-16', 'openai')


def test_finite_weights_whose_sum_overflows_pass():
    clip_loader._check_finite({'w': torch.full((4,), 3e38)}, '/x.pt')


# --- corrupt files -------------------------------------------------------------------------

def corrupt_torchscript_pickle(path):
    """Replace the archive's module pickle by junk; the zip itself stays valid."""
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(path, 'w') as archive:
        for name, data in entries.items():
            archive.writestr(name, b'\xff' * 40 if name.endswith('/data.pkl') else data)


@pytest.mark.parametrize('name, corrupt, kind', [
    ('m.safetensors', lambda path: path.write_bytes(path.read_bytes()[:-1000]),
     'a safetensors file'),
    ('m.safetensors', lambda path: path.write_bytes(bytes(range(256)) * 8), 'a safetensors file'),
    ('m.bin', lambda path: path.write_bytes(path.read_bytes()[:1000]), 'a tensor state dict'),
    ('ViT-openai.pt', corrupt_torchscript_pickle, 'a TorchScript archive')])
def test_corrupt_file_is_a_clear_error(openai_model, images, tmp_path, name, corrupt, kind):
    path = tmp_path / name
    if 'openai' in name:
        save_openai_torchscript(openai_model, path, images)
    else:
        save_open_clip(openai_model, path, images)
    corrupt(path)
    with pytest.raises(ValueError, match=f"clip.pretrained='{path}' could not be read as {kind} "
                       r"\(.*\): the file is truncated or corrupt"):
        load_clip(TINY_ARCH, str(path))


# --- argument types ------------------------------------------------------------------------

@pytest.mark.parametrize('kwargs, message', [
    (dict(quick_gelu='yes'), r"clip.quick_gelu must be True, False or None \(auto\), got 'yes'"),
    (dict(quick_gelu=1), r'clip.quick_gelu must be True, False or None \(auto\), got 1'),
    (dict(seed='a'), "clip.seed must be an int >= 0, got 'a'"),
    (dict(seed=True), 'clip.seed must be an int >= 0, got True'),
    (dict(seed=1.5), 'clip.seed must be an int >= 0, got 1.5'),
    (dict(seed=-1), 'clip.seed must be an int >= 0, got -1'),
    (dict(arch=123), r"clip.arch must be an open_clip model name \(str\).*got 123"),
    (dict(pretrained=['x']), r"clip.pretrained must be None, an open_clip tag or a checkpoint "
                             r"path \(str\), got \['x'\]"),
    (dict(cache_dir=5), r'clip.cache_dir must be None or a folder path \(str\), got 5')])
def test_wrong_argument_types_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_clip(**{'arch': TINY_ARCH, 'pretrained': None, **kwargs})


def test_pretrained_may_be_a_path_object(tiny_clip, tmp_path):
    torch.save(tiny_clip.state_dict(), tmp_path / 'm.pt')
    assert not uses_quick_gelu(load_clip(TINY_ARCH, tmp_path / 'm.pt'))


# --- offline tags fail fast ----------------------------------------------------------------

@pytest.fixture
def no_offline_env(monkeypatch):
    for name in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE', 'https_proxy', 'HTTPS_PROXY',
                 'http_proxy', 'HTTP_PROXY'):
        monkeypatch.delenv(name, raising=False)


def refuse_download(*args, **kwargs):
    raise AssertionError('open_clip was asked to download')


@pytest.mark.parametrize('variable', ['HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE'])
def test_offline_env_fails_fast(monkeypatch, tmp_path, no_offline_env, variable):
    monkeypatch.setenv(variable, '1')
    monkeypatch.setattr(clip_loader, '_host_reachable', refuse_download)  # no probe needed
    monkeypatch.setattr(open_clip, 'create_model', refuse_download)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=f"pretrained='openai' \\({variable}=1 and the weights "
                       r"are not in the local cache\).*clip.pretrained='/path/to/checkpoint'"):
        load_clip('ViT-B-16', 'openai', cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize('source, host', [('hf_hub', 'huggingface.co'),
                                          ('url', 'openaipublic.azureedge.net')])
def test_unreachable_host_fails_fast(monkeypatch, tmp_path, no_offline_env, source, host):
    if source == 'url':
        monkeypatch.setattr(open_clip.pretrained, 'has_hf_hub', lambda necessary=False: False)
    probed = []
    monkeypatch.setattr(clip_loader, '_host_reachable',
                        lambda *address: probed.append(address) or False)
    monkeypatch.setattr(open_clip, 'create_model', refuse_download)
    with pytest.raises(RuntimeError, match=f"\\({host}:443 is unreachable and the weights are "
                       r"not in the local cache\).*clip.pretrained='/path/to/checkpoint'"):
        load_clip('ViT-B-16', 'openai', cache_dir=str(tmp_path))
    assert probed == [(host, 443)]


def test_tag_fails_within_10s_without_network(tmp_path, no_offline_env):
    """The real probe, end to end; on a machine with network there is nothing to test."""
    clip_loader._host_reachable.cache_clear()
    if clip_loader._host_reachable('huggingface.co', 443):
        pytest.skip('huggingface.co is reachable')
    start = time.perf_counter()
    with pytest.raises(RuntimeError,
                       match="huggingface.co:443 is unreachable.*/path/to/checkpoint"):
        load_clip('ViT-B-16', 'laion2b_s34b_b88k', cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 10


def cache_hf_file(cache_dir, repo_id, filename):
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text('0123abcd')
    (repo / 'snapshots' / '0123abcd').mkdir(parents=True)
    (repo / 'snapshots' / '0123abcd' / filename).write_bytes(b'weights')


@pytest.mark.parametrize('source', ['hf_hub', 'url'])
def test_cached_tag_is_not_refused_offline(tiny_clip, monkeypatch, tmp_path, no_offline_env,
                                           source):
    if source == 'url':
        monkeypatch.setattr(open_clip.pretrained, 'has_hf_hub', lambda necessary=False: False)
        (tmp_path / 'ViT-B-16.pt').write_bytes(b'weights')  # open_clip's URL cache layout
    else:
        cache_hf_file(tmp_path, 'timm/vit_base_patch16_clip_224.openai',
                      'open_clip_model.safetensors')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    calls = []
    monkeypatch.setattr(open_clip, 'create_model',
                        lambda *args, **kwargs: calls.append(kwargs) or tiny_clip)
    load_clip('ViT-B-16', 'openai', cache_dir=str(tmp_path))
    assert calls == [dict(pretrained='openai', force_quick_gelu=True, cache_dir=str(tmp_path))]


def test_reachable_host_leaves_the_download_to_open_clip(tiny_clip, monkeypatch, tmp_path,
                                                         no_offline_env):
    monkeypatch.setattr(clip_loader, '_host_reachable', lambda host, port: True)
    calls = []
    monkeypatch.setattr(open_clip, 'create_model',
                        lambda *args, **kwargs: calls.append(kwargs) or tiny_clip)
    load_clip('ViT-B-16', 'laion2b_s34b_b88k', cache_dir=str(tmp_path))
    assert calls == [dict(pretrained='laion2b_s34b_b88k', force_quick_gelu=False,
                          cache_dir=str(tmp_path))]


def test_host_probe():
    with socket.create_server(('127.0.0.1', 0)) as server:
        port = server.getsockname()[1]
        assert clip_loader._host_reachable.__wrapped__('127.0.0.1', port)
    assert not clip_loader._host_reachable.__wrapped__('127.0.0.1', port)  # closed now


def test_reused_models_are_independent_copies_of_unchanged_files(tiny_clip, tmp_path):
    path = tmp_path / 'tiny.pt'
    torch.save(tiny_clip.state_dict(), path)
    reads = []
    original = clip_loader._load

    def counted(*args):
        reads.append(args[1])
        return original(*args)

    clip_loader._load = counted
    try:
        with clip_loader.reusing_loaded_models():
            first = load_clip(TINY_ARCH, str(path))
            first.visual.proj.data.zero_()  # a user of one copy changes it
            second = load_clip(TINY_ARCH, str(path))
            assert len(reads) == 1  # read once
            assert torch.equal(second.visual.proj, tiny_clip.visual.proj)
            other_seed = load_clip(TINY_ARCH, None, seed=1)
            assert len(reads) == 2 and not torch.equal(other_seed.visual.proj,
                                                       second.visual.proj)
            stamp = path.stat().st_mtime_ns
            torch.save({k: v + 1 for k, v in tiny_clip.state_dict().items()}, path)
            os.utime(path, ns=(stamp + 10**9, stamp + 10**9))  # coarse file-system clocks
            changed = load_clip(TINY_ARCH, str(path))  # same path, new content: read again
            assert len(reads) == 3
            assert torch.equal(changed.visual.proj, tiny_clip.visual.proj + 1)
        load_clip(TINY_ARCH, str(path))  # outside: no reuse
        assert len(reads) == 4
    finally:
        clip_loader._load = original
