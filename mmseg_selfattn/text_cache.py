"""On-disk cache of the prompt-ensemble text embeddings: a second run on the same class
list embeds nothing (80 templates x every query through the text tower costs minutes on
a CPU for COCO-Stuff's 171 classes).

An entry's name is the SHA-256 of everything the embeddings depend on: the text tower's
weights (their bytes, dtypes and shapes, so any checkpoint, tag or random seed gives its
own entries), its activation, the class list with synonyms, the prompt templates, the
device kind and the torch version. A changed input therefore never reads a stale entry.
Entries are written atomically (a temporary file renamed into place); one that cannot be
read is computed again.

Folder: ``$MMSEG_SELFATTN_CACHE`` if set (``off`` disables the cache), else
``$XDG_CACHE_HOME/mmseg_selfattn/text_embeddings`` (``~/.cache`` by default).
"""
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

ENV = 'MMSEG_SELFATTN_CACHE'


def cache_dir() -> Optional[Path]:
    """The cache folder, or None when ``$MMSEG_SELFATTN_CACHE`` is ``off`` (or empty)."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in ('', 'off', 'none', '0') else Path(value)
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return Path(base) / 'mmseg_selfattn' / 'text_embeddings'


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's tensors (names, dtypes, shapes, bytes) and of its
    activation functions (QuickGELU or GELU is no weight)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict(keep_vars=False).items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f'{name}|{tensor.dtype}|{tuple(tensor.shape)}|'.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    activations = sorted({type(child).__name__ for child in module.modules()
                          if 'gelu' in type(child).__name__.lower()
                          or 'relu' in type(child).__name__.lower()})
    digest.update(repr(activations).encode())
    return digest.hexdigest()


def entry_name(weights: str, class_names, templates: Sequence[str],
               device: torch.device) -> str:
    """The file name of the embeddings of ``class_names`` with these ``templates``
    (their text, e.g. 'a photo of a {}.') and weights digest, computed on ``device``."""
    kind = device.type
    if kind == 'cuda':
        kind += ':' + torch.cuda.get_device_name(device)
    text = repr((weights, tuple(map(tuple, class_names)), tuple(templates), kind,
                 torch.__version__))
    return hashlib.sha256(text.encode()).hexdigest() + '.pt'


def load(name: str, shape: Sequence[int]) -> Optional[torch.Tensor]:
    """The cached (Q, D) float32 embeddings, or None (no cache, no entry, or an entry
    that cannot be read or has another shape or non-finite values)."""
    folder = cache_dir()
    if folder is None or not (folder / name).is_file():
        return None
    try:
        tensor = torch.load(folder / name, map_location='cpu', weights_only=True)
    except Exception:  # noqa: BLE001  (a truncated or foreign file: compute again)
        return None
    if (not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float32
            or tuple(tensor.shape[:1]) != tuple(shape[:1]) or not torch.isfinite(tensor).all()):
        return None
    return tensor


def save(name: str, tensor: torch.Tensor) -> None:
    """Writes an entry atomically; a folder that cannot be written is skipped (the
    embeddings are then computed again next time)."""
    folder = cache_dir()
    if folder is None:
        return
    temporary = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, suffix='.tmp')
        with os.fdopen(handle, 'wb') as file:
            torch.save(tensor.detach().cpu().float().contiguous(), file)
        os.replace(temporary, folder / name)
    except OSError:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
