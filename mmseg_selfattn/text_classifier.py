"""Text side of the classifier (SPEC §1.7): prompt-ensembled class-name embeddings.

A class line holds synonyms separated by ',' or ';'; every synonym is one query.
Each query is embedded with the 80 ImageNet templates: every prompt embedding
L2-normalised, averaged, re-normalised. Results are cached per class list and
device in memory, and on disk (``text_cache``), so a dataset's queries are embedded
once, not once per run.
"""
import logging
import os
import re
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import open_clip
import torch
import torch.nn.functional as F
from mmengine.logging import print_log
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import nn

from . import text_cache

ClassNames = Tuple[Tuple[str, ...], ...]  # one tuple of synonyms per class


def parse_class_names(lines: Sequence[str], source: str = 'class_names') -> ClassNames:
    """Class lines -> synonyms per class, for ``class_names`` lists and name files alike.

    Class i is the i-th line, so every line that could shift the later indices is an
    error naming ``source`` and the 1-based line:

    - a line naming no class (blank, or only ',' / ';') before the last class; blank
      lines after it (a trailing newline) are fine;
    - a line that is not a string;
    - two lines with the same first name or the same synonyms (compared as CLIP's
      tokenizer sees them: case and repeated spaces ignored): the later class could
      never be predicted.

    Different classes may share a synonym (the published coco_object list has 'bed' on
    the background line and as a class); a class whose synonyms all belong to an earlier
    class loses every tie to it, so it is logged as a warning.
    """
    if isinstance(lines, str) or not isinstance(lines, (list, tuple)):
        raise ValueError(f'{source} must be a list of class lines, e.g. '
                         f"['sky', 'road; street'] (or set name_path to a class-name file), "
                         f'got {lines!r}.')
    classes = []
    first_empty = None  # the first line naming no class since the last class
    for number, line in enumerate(lines, start=1):
        if not isinstance(line, str):
            raise ValueError(f'{source}, line {number}: a class line must be a string, '
                             f'got {line!r}.')
        synonyms = tuple(name.strip() for name in re.split(r'[,;]', line) if name.strip())
        if not synonyms:
            first_empty = first_empty or number
            continue
        if first_empty:
            raise ValueError(f'{source}, line {first_empty} names no class '
                             f'({lines[first_empty - 1]!r}): class indices follow the lines, '
                             'so only lines after the last class may be empty.')
        classes.append(synonyms)
    if not classes:
        raise ValueError(f'{source}: the class list is empty: give one class per line, synonyms '
                         "separated by ',' or ';'.")
    _check_repeated_classes(classes, source)
    return tuple(classes)


def _check_repeated_classes(classes: Sequence[Tuple[str, ...]], source: str) -> None:
    """Errors for two classes with the same first name or synonyms, a warning for a class
    hidden by an earlier one (see ``parse_class_names``); class i is on line i + 1."""
    # as CLIP's tokenizer sees a name: lower case, single spaces
    keys = [[' '.join(name.lower().split()) for name in synonyms] for synonyms in classes]
    synonym_sets = [frozenset(names) for names in keys]
    line_of_name, line_of_synonyms = {}, {}
    for line, (names, synonyms) in enumerate(zip(keys, synonym_sets), start=1):
        if names[0] in line_of_name:
            raise ValueError(f'{source}, lines {line_of_name[names[0]]} and {line} both name the '
                             f"class {classes[line - 1][0]!r}: merge them into one line "
                             "(synonyms separated by ',').")
        if synonyms in line_of_synonyms:
            raise ValueError(f'{source}, lines {line_of_synonyms[synonyms]} and {line} list the '
                             f'same synonyms {list(classes[line - 1])}: line {line} could never '
                             'be predicted; remove it.')
        line_of_name[names[0]], line_of_synonyms[synonyms] = line, line
    for line, synonyms in enumerate(synonym_sets, start=1):
        earlier = next((other for other in range(1, line)
                        if synonyms <= synonym_sets[other - 1]), None)
        if earlier:  # its score never exceeds the earlier class's, and ties go to the earlier
            print_log(f'{source}, line {line}: every synonym of {classes[line - 1][0]!r} is also '
                      f'on line {earlier} ({classes[earlier - 1][0]!r}, ...), which wins every '
                      f'tie: {classes[line - 1][0]!r} is never predicted.',
                      logger='current', level=logging.WARNING)


def read_classes(name_path: Optional[str], class_names: Optional[Sequence[str]]
                 ) -> ClassNames:
    """The classes of ``name_path`` (a class-name file) or ``class_names`` (the lines);
    exactly one of them is set."""
    if (name_path is None) == (class_names is None):
        raise ValueError('set exactly one of name_path (a class-name file) and '
                         'class_names (a list of class lines).')
    if class_names is not None:
        return parse_class_names(class_names)
    return read_class_file(name_path)


def read_class_file(path: str) -> ClassNames:
    """Classes of a name file (UTF-8, a BOM is skipped), by ``parse_class_names``'s rules."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f'name_path must be the path of a class-name file (a str), got {path!r}.')
    path = os.fspath(path)
    source = f'name_path={path!r}'
    if Path(path).is_dir():
        raise IsADirectoryError(f'{source} is a directory: give a text file with one class per '
                                "line (synonyms separated by ',' or ';').")
    if not Path(path).is_file():
        raise FileNotFoundError(f'{source} does not exist: give a text file with '
                                "one class per line (synonyms separated by ',' or ';').")
    raw = Path(path).read_bytes()
    try:
        # a BOM (Windows editors) is no part of the first name; 'utf-8-sig' would shift
        # the error offsets below past it
        text = raw.decode('utf-8').removeprefix('\ufeff')
    except UnicodeDecodeError as error:
        line = raw.count(b'\n', 0, error.start) + 1
        column = error.start - (raw.rfind(b'\n', 0, error.start) + 1) + 1
        raise ValueError(f'{source} is not UTF-8 text: byte 0x{raw[error.start]:02x} on line '
                         f'{line}, column {column}; save the file as UTF-8.') from None
    return parse_class_names(text.splitlines(), source)


def query_to_class_index(class_names: ClassNames) -> torch.Tensor:
    """(Q,) class index of every query, in query order."""
    return torch.tensor([index for index, synonyms in enumerate(class_names)
                         for _ in synonyms])


class TextClassifier(nn.Module):
    """Embeds class names with CLIP's text tower (weights shared with the CLIP model).

    Args:
        clip_model: an open_clip ``CLIP`` (or ``CustomTextCLIP``).
        arch: open_clip model name, for its tokenizer.
        batch_size: prompts per text-tower forward.
    """

    def __init__(self, clip_model: nn.Module, arch: str, batch_size: int = 512):
        super().__init__()
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.templates = OPENAI_IMAGENET_TEMPLATES
        self.batch_size = batch_size
        if hasattr(clip_model, 'text'):  # CustomTextCLIP: a self-contained text module
            self.text = clip_model.text
        else:
            self.token_embedding = clip_model.token_embedding
            self.positional_embedding = clip_model.positional_embedding
            self.transformer = clip_model.transformer
            self.ln_final = clip_model.ln_final
            self.text_projection = clip_model.text_projection
            self.register_buffer('attn_mask', clip_model.attn_mask, persistent=False)
            self.text_pool_type = clip_model.text_pool_type
        self._cache: Dict[Tuple[ClassNames, str], torch.Tensor] = {}
        self._weights_digest: Optional[str] = None  # of the text tower, for the disk cache

    @torch.no_grad()
    def query_embeddings(self, class_names: ClassNames) -> torch.Tensor:
        """(Q, D) unit-norm embedding of every synonym, on the text tower's device."""
        device = self._device()
        key = (class_names, str(device))
        if key not in self._cache:
            queries = [name for synonyms in class_names for name in synonyms]
            if self._weights_digest is None:
                self._weights_digest = text_cache.weights_digest(self)
            entry = text_cache.entry_name(self._weights_digest, class_names,
                                          [template('{}') for template in self.templates],
                                          device)
            embeddings = text_cache.load(entry, (len(queries), ))
            if embeddings is None:
                embeddings = self._embed(queries, device)
                text_cache.save(entry, embeddings)
            self._cache[key] = embeddings.to(device)
        return self._cache[key]

    def _embed(self, queries: Sequence[str], device: torch.device) -> torch.Tensor:
        """(Q, D) prompt-ensemble embeddings through the text tower."""
        prompts = [template(name) for name in queries for template in self.templates]
        tokens = self.tokenizer(prompts).to(device)
        embeddings = torch.cat([self.encode_text(chunk)
                                for chunk in tokens.split(self.batch_size)])
        embeddings = F.normalize(embeddings.float(), dim=-1)
        embeddings = embeddings.view(len(queries), len(self.templates), -1).mean(dim=1)
        return F.normalize(embeddings, dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLIP's ``encode_text``; for causal argmax-pooled towers the padding past the
        longest prompt is cut (it cannot reach the EOT token through the causal mask)."""
        if hasattr(self, 'text'):
            return self.text(tokens)
        if self.attn_mask is not None and self.text_pool_type == 'argmax':
            length = int(tokens.argmax(dim=-1).max()) + 1
            tokens, attn_mask = tokens[:, :length], self.attn_mask[:length, :length]
        else:
            length, attn_mask = tokens.shape[1], self.attn_mask
        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        x = self.ln_final(self.transformer(x, attn_mask=attn_mask))
        x = open_clip.transformer.text_global_pool(x, tokens, self.text_pool_type)
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x if self.text_projection is None else x @ self.text_projection

    def _device(self) -> torch.device:
        return next(self.parameters()).device
