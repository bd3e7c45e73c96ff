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
"""
import logging
import os
import zipfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import open_clip
import torch
from mmengine.logging import print_log
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

MODEL_CONFIG_DIR = Path(__file__).parent / 'model_configs'
open_clip.add_model_config(MODEL_CONFIG_DIR)  # tiny test archs beside open_clip's own

# Buffers that only OpenAI's TorchScript CLIP carries in its state dict.
_OPENAI_MARKER_KEYS = ('input_resolution', 'context_length', 'vocab_size')


def load_clip(arch: str = 'ViT-B-16',
              pretrained: Optional[str] = 'openai',
              quick_gelu: Optional[bool] = None,
              cache_dir: Optional[str] = None,
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
    _check_arch_name(arch)
    if isinstance(pretrained, str) and pretrained.lower() == 'none':
        pretrained = None
    if pretrained is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _create(arch, bool(quick_gelu))
    elif _is_tag(arch, pretrained):
        model = _from_tag(arch, pretrained, quick_gelu, cache_dir)
    else:
        model = _from_file(arch, pretrained, quick_gelu)
    check_dense_compatible(model, arch)
    return model.float().eval().requires_grad_(False)


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
    return open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu)


def _is_tag(arch: str, pretrained: str) -> bool:
    return bool(open_clip.get_pretrained_cfg(arch, pretrained)) and not os.path.isfile(pretrained)


def _from_tag(arch: str, tag: str, quick_gelu: Optional[bool],
              cache_dir: Optional[str]) -> open_clip.CLIP:
    if quick_gelu is None:  # open_clip only warns on a mismatch; we pick the tag's activation
        quick_gelu = bool(open_clip.get_pretrained_cfg(arch, tag).get('quick_gelu', False))
    try:
        return open_clip.create_model(
            arch, pretrained=tag, force_quick_gelu=quick_gelu, cache_dir=cache_dir)
    except Exception as error:  # network errors come in many types
        raise RuntimeError(
            f"Could not fetch the weights of clip.arch='{arch}', clip.pretrained='{tag}' "
            f'({type(error).__name__}: {error}). On an offline machine download the '
            "checkpoint elsewhere and pass clip.pretrained='/path/to/checkpoint' "
            "(an OpenAI .pt or an open_clip .pt/.bin/.safetensors), or clip.pretrained=None "
            'for random weights.') from error


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
        state_dict, is_openai = load_file(path, device='cpu'), False
    elif _is_torchscript(path):  # OpenAI's released .pt files
        state_dict, is_openai = torch.jit.load(path, map_location='cpu').state_dict(), True
    else:
        try:
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as error:
            raise ValueError(
                f"clip.pretrained='{path}' could not be read as a tensor state dict "
                f'({type(error).__name__}: {error}). Pass an OpenAI TorchScript archive or '
                'a state dict saved with torch.save / safetensors.') from error
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


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith('constants.pkl') or '/code/' in name
                   for name in archive.namelist())


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
