"""Build an open_clip CLIP model from an arch name and a weights source (SPEC §4).

``pretrained`` is one of
  * ``None`` / ``'none'``: random weights of the exact architecture;
  * an open_clip tag (``'openai'``, ``'laion2b_s34b_b88k'``...), downloaded by open_clip;
  * a local file: an OpenAI checkpoint (TorchScript archive or plain state dict)
    or an open_clip state dict (``.pt``/``.pth``/``.bin``/``.safetensors``).

OpenAI's CLIPs were trained with QuickGELU; open_clip's plain arch configs use
nn.GELU. Building an OpenAI checkpoint without QuickGELU silently changes every
feature, so the activation is chosen from the weights' format unless
``quick_gelu`` is given explicitly.

A tag whose weights are not in the local cache fails at once when offline
(``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` set, or the download host not reachable
within a few seconds) instead of through open_clip's ~45 s of download retries.
Weights holding NaN / inf are refused, whatever their source.
"""
import copy
import functools
import logging
import os
import socket
import threading
import urllib.parse
import urllib.request
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import open_clip
import torch
from mmengine.logging import print_log
from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

from .cli import UserSetupError
from .config_checks import check_int

MODEL_CONFIG_DIR = Path(__file__).parent / 'model_configs'
open_clip.add_model_config(MODEL_CONFIG_DIR)  # tiny test archs beside open_clip's own

# Buffers that only OpenAI's TorchScript CLIP carries in its state dict.
_OPENAI_MARKER_KEYS = ('input_resolution', 'context_length', 'vocab_size')

_OFFLINE_ENV_VARS = ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE')
_REACHABILITY_TIMEOUT_S = 3.0


_REUSED: Optional[Dict[tuple, open_clip.CLIP]] = None  # reusing_loaded_models(): loaded CLIPs


@contextmanager
def reusing_loaded_models():
    """Within it, ``load_clip`` returns a copy of the model it loaded before with the same
    arguments (a weights file also unchanged: same size and modification time), so that
    tools/eval_all.py reads and builds CLIP once for all its entries. The copies are
    independent (the segmentor casts and moves its own)."""
    global _REUSED
    outer, _REUSED = _REUSED, ({} if _REUSED is None else _REUSED)
    try:
        yield
    finally:
        _REUSED = outer


def _reuse_key(arch, pretrained, quick_gelu, cache_dir, seed) -> Optional[tuple]:
    if _REUSED is None:
        return None
    source = os.fspath(pretrained) if isinstance(pretrained, os.PathLike) else pretrained
    if isinstance(source, str) and os.path.isfile(source):
        stat = os.stat(source)
        source = (os.path.realpath(source), stat.st_size, stat.st_mtime_ns)
    return (arch, source, quick_gelu, None if cache_dir is None else os.fspath(cache_dir),
            seed)


def load_clip(arch: str = 'ViT-B-16',
              pretrained: Union[str, os.PathLike, None] = 'openai',
              quick_gelu: Optional[bool] = None,
              cache_dir: Union[str, os.PathLike, None] = None,
              seed: int = 0) -> open_clip.CLIP:
    """Return a frozen fp32 CLIP in eval mode on the CPU.

    Args:
        arch: open_clip model name with a standard ViT image tower.
        pretrained: weights source, see the module docstring.
        quick_gelu: force the activation; ``None`` chooses it from the weights.
        cache_dir: open_clip's download cache for tags.
        seed: seeds the random initialisation of ``pretrained=None``, so that runs
            with random weights are reproducible (the global RNG is left untouched).
    """
    _check_arguments(arch, pretrained, quick_gelu, cache_dir, seed)
    _check_arch_name(arch)
    key = _reuse_key(arch, pretrained, quick_gelu, cache_dir, seed)
    if key is not None and key in _REUSED:
        print_log(f'CLIP {arch}: the weights loaded before in this process', logger='current',
                  level=logging.INFO)
        return copy.deepcopy(_REUSED[key])
    model = _load(arch, pretrained, quick_gelu, cache_dir, seed)
    if key is not None:
        _REUSED[key] = copy.deepcopy(model)
    return model


def _load(arch, pretrained, quick_gelu, cache_dir, seed) -> open_clip.CLIP:
    if isinstance(pretrained, os.PathLike):
        pretrained = os.fspath(pretrained)
    if isinstance(pretrained, str) and pretrained.lower() == 'none':
        pretrained = None
    if pretrained is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _create(arch, bool(quick_gelu))
        print_log(f'CLIP {arch}: random weights (pretrained=None, seed {seed})',
                  logger='current', level=logging.INFO)
    elif _is_tag(arch, pretrained):
        model = _from_tag(arch, pretrained, quick_gelu, cache_dir)
    else:
        model = _from_file(arch, pretrained, quick_gelu)
    if pretrained is not None:
        _check_finite(model.state_dict(), pretrained)
    check_dense_compatible(model, arch)
    return model.float().eval().requires_grad_(False)


def _check_finite(state_dict: Dict[str, torch.Tensor], pretrained: str) -> None:
    """Raise if a floating tensor holds NaN / inf, naming the first offending tensors."""
    # a sum is non-finite iff an element is (or the sum overflows, hence the exact recount):
    # >10x faster than isfinite().all() on ViT-B/16 (~0.03 s single-threaded)
    counts = {key: int((~torch.isfinite(value)).sum()) for key, value in state_dict.items()
              if value.is_floating_point() and not torch.isfinite(value.sum())}
    bad = {key: count for key, count in counts.items() if count}
    if not bad:
        return
    if len(bad) == 1:
        (key, count), = bad.items()
        found = f"tensor '{key}' holds {count} NaN / inf values"
    else:
        listed = ', '.join(f"'{key}' ({count})" for key, count in list(bad.items())[:5])
        found = (f'{len(bad)} tensors hold NaN / inf values: {listed}'
                 f'{", ..." if len(bad) > 5 else ""}')
    raise ValueError(f"clip.pretrained='{pretrained}': {found}; the checkpoint is corrupt.")


def _check_arguments(arch, pretrained, quick_gelu, cache_dir, seed) -> None:
    if not isinstance(arch, str):
        raise ValueError(f"clip.arch must be an open_clip model name (str) such as 'ViT-B-16', "
                         f'got {arch!r}.')
    if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):
        raise ValueError('clip.pretrained must be None, an open_clip tag or a checkpoint path '
                         f'(str), got {pretrained!r}.')
    if quick_gelu is not None and not isinstance(quick_gelu, bool):
        raise ValueError(f'clip.quick_gelu must be True, False or None (auto), got {quick_gelu!r}.')
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise ValueError(f'clip.cache_dir must be None or a folder path (str), got {cache_dir!r}.')
    check_int('clip.seed', seed, 0)


def check_dense_compatible(model: torch.nn.Module, arch: str) -> None:
    """Raise unless the image tower is a ViT whose blocks the dense encoder understands."""
    visual = getattr(model, 'visual', None)
    problems = []
    if not isinstance(visual, VisionTransformer):
        problems.append(f'image tower is {type(visual).__name__}, not a ViT')
    else:
        if visual.attn_pool is not None or visual.pool_type != 'tok':
            problems.append('pooling is not the CLS token')
        if visual.final_ln_after_pool:
            problems.append('final_ln_after_pool=True')
        if visual.proj is None:
            problems.append('no output projection')
        for block in visual.transformer.resblocks:
            if type(block) is not ResidualAttentionBlock or not isinstance(
                    block.attn, torch.nn.MultiheadAttention):
                problems.append(f'blocks are {type(block).__name__} (needs the standard '
                                'ResidualAttentionBlock with nn.MultiheadAttention)')
                break
    if problems:
        raise ValueError(f"clip.arch='{arch}' is not supported: " + '; '.join(problems) +
                         '. Use an open_clip ViT config with the standard block, e.g. '
                         "'ViT-B-16', 'ViT-B-32', 'ViT-L-14'.")


def _check_arch_name(arch: str) -> None:
    if arch not in open_clip.list_models():
        vits = [name for name in open_clip.list_models() if name.startswith('ViT-')]
        raise ValueError(f"clip.arch='{arch}' is not an open_clip model config. "
                         f'ViT archs available: {", ".join(vits[:30])}, ...')


def _create(arch: str, quick_gelu: bool) -> open_clip.CLIP:
    """The arch with random weights (the callers load weights or log that there are
    none): open_clip's "No pretrained weights loaded" warning is silenced here."""
    quiet = logging.Filter()
    quiet.filter = lambda record: not record.getMessage().startswith('No pretrained weights')
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        return open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu)
    finally:
        root.removeFilter(quiet)


# the initialisers of torch.nn.init, also where a module imported them by name
# (nn.MultiheadAttention's xavier_uniform_)
_INITIALISERS = ('uniform_', 'normal_', 'trunc_normal_', 'constant_', 'ones_', 'zeros_',
                 'eye_', 'dirac_', 'xavier_uniform_', 'xavier_normal_', 'kaiming_uniform_',
                 'kaiming_normal_', 'orthogonal_', 'sparse_')


@contextmanager
def _initialisation_skipped():
    """Build modules without drawing their random initial weights (1.5-2 s of a
    ViT-B/16 on CPU, wasted when a checkpoint overwrites every tensor next): the
    initialisers leave their tensor as allocated meanwhile."""
    modules = (torch.nn.init, torch.nn.modules.activation)
    saved = [(module, name, getattr(module, name)) for module in modules
             for name in _INITIALISERS if hasattr(module, name)]
    for module, name, _ in saved:
        setattr(module, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for module, name, function in saved:
            setattr(module, name, function)


def _is_tag(arch: str, pretrained: str) -> bool:
    return bool(open_clip.get_pretrained_cfg(arch, pretrained)) and not os.path.isfile(pretrained)


def _from_tag(arch: str, tag: str, quick_gelu: Optional[bool],
              cache_dir: Optional[str]) -> open_clip.CLIP:
    tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
    if quick_gelu is None:  # open_clip only warns on a mismatch; we pick the tag's activation
        quick_gelu = bool(tag_cfg.get('quick_gelu', False))
    if not _is_cached(tag_cfg, cache_dir):
        offline_reason = _offline_reason(_download_url(tag_cfg))
        if offline_reason:  # open_clip would retry the download for ~45 s before failing
            raise _fetch_error(arch, tag, f'{offline_reason} and the weights are not in the '
                               'local cache')
    try:
        return open_clip.create_model(
            arch, pretrained=tag, force_quick_gelu=quick_gelu, cache_dir=cache_dir)
    except Exception as error:  # network errors come in many types
        raise _fetch_error(arch, tag, f'{type(error).__name__}: {error}') from error


class WeightsUnavailableError(RuntimeError, UserSetupError):
    """The weights of an open_clip tag cannot be fetched (offline, download failed)."""


def _fetch_error(arch: str, tag: str, reason: str) -> RuntimeError:
    return WeightsUnavailableError(
        f"Could not fetch the weights of clip.arch='{arch}', clip.pretrained='{tag}' "
        f'({reason}). On an offline machine download the '
        "checkpoint elsewhere and pass clip.pretrained='/path/to/checkpoint' "
        "(an OpenAI .pt or an open_clip .pt/.bin/.safetensors), or clip.pretrained=None "
        'for random weights.')


def _uses_hf_hub(tag_cfg: dict) -> bool:
    """Whether open_clip.download_pretrained fetches this tag from the Hugging Face hub."""
    return open_clip.pretrained.has_hf_hub() and bool(tag_cfg.get('hf_hub'))


def _is_cached(tag_cfg: dict, cache_dir: Optional[str]) -> bool:
    """Whether open_clip finds the tag's weights without the network (its own lookup order)."""
    if 'file' in tag_cfg:
        return True
    if _uses_hf_hub(tag_cfg):
        from huggingface_hub import try_to_load_from_cache
        repo_id, filename = os.path.split(tag_cfg['hf_hub'])
        filename = filename or HF_WEIGHTS_NAME
        return any(isinstance(try_to_load_from_cache(repo_id, name, cache_dir=cache_dir), str)
                   for name in [*_get_safe_alternatives(filename), filename])
    url_cache = cache_dir or os.path.expanduser('~/.cache/clip')
    return os.path.isfile(os.path.join(url_cache, os.path.basename(tag_cfg.get('url', ''))))


def _download_url(tag_cfg: dict) -> str:
    if _uses_hf_hub(tag_cfg):
        from huggingface_hub import constants
        return f"{constants.ENDPOINT}/{tag_cfg['hf_hub']}"
    return tag_cfg.get('url', '')


def _offline_reason(url: str) -> str:
    """Why ``url`` cannot be downloaded now ('' when it may be)."""
    for name in _OFFLINE_ENV_VARS:
        if os.environ.get(name, '').upper() in ('1', 'ON', 'YES', 'TRUE'):
            return f'{name}={os.environ[name]}'
    if not url:
        return ''
    host, port = _connect_address(url)
    return '' if _host_reachable(host, port) else f'{host}:{port} is unreachable'


def _connect_address(url: str) -> Tuple[str, int]:
    """(host, port) a download of ``url`` connects to first: its proxy, if one is set."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname):
        parts = urllib.parse.urlsplit(proxy if '://' in proxy else f'http://{proxy}')
    return parts.hostname, parts.port or (443 if parts.scheme == 'https' else 80)


@functools.lru_cache(maxsize=None)
def _host_reachable(host: str, port: int) -> bool:
    """One TCP connect, bounded by _REACHABILITY_TIMEOUT_S; the answer is kept per process."""
    reached = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=_REACHABILITY_TIMEOUT_S).close()
            reached.append(True)
        except OSError:
            pass

    # a thread, since DNS look-ups ignore socket timeouts
    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(_REACHABILITY_TIMEOUT_S)
    return bool(reached)


def _from_file(arch: str, path: str, quick_gelu: Optional[bool]) -> open_clip.CLIP:
    if not os.path.isfile(path):
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise FileNotFoundError(
            f"clip.pretrained='{path}' is neither a file nor an open_clip tag of '{arch}'. "
            f'Pass a checkpoint path, one of the tags {tags}, or None for random weights.')
    state_dict, is_openai = read_checkpoint(path)
    if quick_gelu is None:
        quick_gelu = is_openai
    print_log(f'CLIP {arch} from {path}: {"OpenAI" if is_openai else "open_clip"} format, '
              f'{"QuickGELU" if quick_gelu else "GELU"}', logger='current', level=logging.INFO)
    with _initialisation_skipped():  # every tensor is overwritten below (strict)
        model = _create(arch, quick_gelu)
    # TorchScript archives also store buffers open_clip keeps out of its state dict (attn_mask)
    non_persistent = {name for name, _ in model.named_buffers()} - set(model.state_dict())
    state_dict = {key: value for key, value in state_dict.items() if key not in non_persistent}
    _check_state_dict_matches(model, state_dict, arch, path)
    model.load_state_dict(state_dict, strict=True)
    return model


def read_checkpoint(path: str) -> Tuple[Dict[str, torch.Tensor], bool]:
    """Read a CLIP checkpoint; return (open_clip-keyed state dict, is_openai_format)."""
    if str(path).endswith('.safetensors'):
        from safetensors.torch import load_file
        with _reading(path, 'a safetensors file'):
            state_dict, is_openai = load_file(path, device='cpu'), False
    elif _is_torchscript(path):  # OpenAI's released .pt files
        with _reading(path, 'a TorchScript archive'):
            state_dict, is_openai = torch.jit.load(path, map_location='cpu').state_dict(), True
    else:
        with _reading(path, 'a tensor state dict'):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
        state_dict = checkpoint.get('state_dict', checkpoint) if isinstance(checkpoint,
                                                                              dict) else None
        if not isinstance(state_dict, dict):
            raise ValueError(f"clip.pretrained='{path}' holds a {type(checkpoint).__name__}, "
                             'not a state dict.')
        # OpenAI's own state dicts carry their marker buffers or are stored in fp16.
        is_openai = any(key in state_dict for key in _OPENAI_MARKER_KEYS) or (
            state_dict.get('visual.conv1.weight', torch.empty(0)).dtype == torch.float16)
    state_dict = {_strip_prefix(key): value for key, value in state_dict.items()
                  if key not in _OPENAI_MARKER_KEYS}
    return state_dict, is_openai


@contextmanager
def _reading(path: str, kind: str):
    """Turn a reader's failure on a corrupt file into one error naming the file."""
    try:
        yield
    except Exception as error:  # each reader raises its own types
        raise ValueError(
            f"clip.pretrained='{path}' could not be read as {kind} "
            f'({type(error).__name__}: {error}): the file is truncated or corrupt. Download it '
            'again, or pass an OpenAI TorchScript archive or a state dict saved with '
            'torch.save / safetensors.') from error


def _is_torchscript(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith('constants.pkl') or '/code/' in name
                       for name in archive.namelist())
    except zipfile.BadZipFile:  # not a zip, or a broken one: torch.load reports it
        return False


def _strip_prefix(key: str) -> str:
    return key[len('module.'):] if key.startswith('module.') else key


def _check_state_dict_matches(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor],
                              arch: str, path: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [f'{key}: checkpoint {tuple(state_dict[key].shape)} vs '
                  f'{arch} {tuple(value.shape)}'
                  for key, value in expected.items()
                  if key in state_dict and state_dict[key].shape != value.shape]
    if missing or unexpected or mismatched:
        lines = ([f'shape {m}' for m in mismatched[:5]] + [f'missing {k}' for k in missing[:5]] +
                 [f'unexpected {k}' for k in unexpected[:5]])
        raise ValueError(
            f"clip.pretrained='{path}' does not fit clip.arch='{arch}' "
            f'({len(mismatched)} shape mismatches, {len(missing)} missing, '
            f'{len(unexpected)} unexpected keys; checkpoint {_describe_vit(state_dict)}):\n  ' +
            '\n  '.join(lines) + '\nSet clip.arch to the checkpoint\'s architecture.')


def _describe_vit(state_dict: Dict[str, torch.Tensor]) -> str:
    conv = state_dict.get('visual.conv1.weight')
    if conv is None:
        return 'has no ViT image tower'
    layers = len({key.split('.')[3] for key in state_dict
                  if key.startswith('visual.transformer.resblocks.')})
    return f'looks like a ViT of width {conv.shape[0]}, patch {conv.shape[-1]}, {layers} layers'
