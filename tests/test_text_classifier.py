import pytest
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

import open_clip
from mmseg_selfattn.text_classifier import (TextClassifier, parse_class_names,
                                            query_to_class_index, read_class_file)

from conftest import TINY_ARCH


def test_parse_class_names_splits_synonyms():
    classes = parse_class_names(['sky', ' person, people ;man', 'road', '', ' '])
    assert classes == (('sky', ), ('person', 'people', 'man'), ('road', ))
    assert query_to_class_index(classes).tolist() == [0, 1, 1, 1, 2]


def test_empty_and_missing_class_files(tmp_path):
    (tmp_path / 'empty.txt').write_text('\n \n')
    with pytest.raises(ValueError, match='class list is empty'):
        read_class_file(str(tmp_path / 'empty.txt'))
    with pytest.raises(FileNotFoundError, match="name_path='.*nope.txt' does not exist"):
        read_class_file(str(tmp_path / 'nope.txt'))


def test_truncated_text_encoding_equals_open_clip(tiny_clip):
    classifier = TextClassifier(tiny_clip, TINY_ARCH)
    tokens = open_clip.get_tokenizer(TINY_ARCH)(['a photo of a cat.', 'a bad photo of the sky.'])
    with torch.no_grad():
        torch.testing.assert_close(classifier.encode_text(tokens), tiny_clip.encode_text(tokens),
                                   atol=1e-5, rtol=0)


def test_prompt_ensemble_and_cache(tiny_clip):
    classifier = TextClassifier(tiny_clip, TINY_ARCH)
    classes = (('cat', 'kitten'), ('grass', ))
    embeddings = classifier.query_embeddings(classes)
    assert embeddings.shape == (3, tiny_clip.text_projection.shape[1])
    # independent: each prompt L2-normalised, averaged, re-normalised
    tokenizer = open_clip.get_tokenizer(TINY_ARCH)
    with torch.no_grad():
        prompts = [t('kitten') for t in OPENAI_IMAGENET_TEMPLATES]
        expected = F.normalize(F.normalize(tiny_clip.encode_text(tokenizer(prompts)), dim=-1)
                               .mean(0), dim=0)
    torch.testing.assert_close(embeddings[1], expected, atol=1e-5, rtol=0)
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80
    assert classifier.query_embeddings(classes) is embeddings  # cached
    assert classifier.query_embeddings((('cat', ), )) is not embeddings
