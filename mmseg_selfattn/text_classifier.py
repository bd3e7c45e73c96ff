"""Text side of the classifier (SPEC §1.7): prompt-ensembled class-name embeddings.

A class line holds synonyms separated by ',' or ';'; every synonym is one query.
Each query is embedded with the 80 ImageNet templates: every prompt embedding
L2-normalised, averaged, re-normalised. Results are cached per class list and
device, so a dataset's queries are embedded once.
"""
import re
from pathlib import Path
from typing import Dict, Sequence, Tuple

import open_clip
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import nn

ClassNames = Tuple[Tuple[str, ...], ...]  # one tuple of synonyms per class


def parse_class_names(lines: Sequence[str]) -> ClassNames:
    """Class lines -> synonyms per class; blank lines are skipped."""
    classes = []
    for line in lines:
        synonyms = tuple(name.strip() for name in re.split(r'[,;]', line) if name.strip())
        if synonyms:
            classes.append(synonyms)
    if not classes:
        raise ValueError('the class list is empty: give one class per line, synonyms '
                         "separated by ',' or ';'.")
    return tuple(classes)


def read_class_file(path: str) -> ClassNames:
    if not Path(path).is_file():
        raise FileNotFoundError(f"name_path='{path}' does not exist: give a text file with "
                                "one class per line (synonyms separated by ',' or ';').")
    return parse_class_names(Path(path).read_text(encoding='utf-8').splitlines())


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

    @torch.no_grad()
    def query_embeddings(self, class_names: ClassNames) -> torch.Tensor:
        """(Q, D) unit-norm embedding of every synonym, on the text tower's device."""
        device = self._device()
        key = (class_names, str(device))
        if key not in self._cache:
            queries = [name for synonyms in class_names for name in synonyms]
            prompts = [template(name) for name in queries for template in self.templates]
            tokens = self.tokenizer(prompts).to(device)
            embeddings = torch.cat([self.encode_text(chunk)
                                    for chunk in tokens.split(self.batch_size)])
            embeddings = F.normalize(embeddings.float(), dim=-1)
            embeddings = embeddings.view(len(queries), len(self.templates), -1).mean(dim=1)
            self._cache[key] = F.normalize(embeddings, dim=-1)
        return self._cache[key]

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
