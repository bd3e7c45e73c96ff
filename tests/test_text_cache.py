"""The on-disk cache of text embeddings: a hit gives the same tensor without the text
tower; any changed input (weights, activation, classes, templates) misses."""
import pytest
import torch

from mmseg_selfattn import text_cache
from mmseg_selfattn.clip_loader import load_clip
from mmseg_selfattn.text_classifier import TextClassifier, parse_class_names

from conftest import TINY_ARCH

CLASSES = parse_class_names(['sky, clouds', 'tree', 'road'])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(text_cache.ENV, str(tmp_path / 'cache'))
    return tmp_path / 'cache'


def classifier(seed=0, quick_gelu=False):
    return TextClassifier(load_clip(TINY_ARCH, None, quick_gelu=quick_gelu, seed=seed),
                          TINY_ARCH)


def forbid_text_tower(monkeypatch, model):
    def refuse(tokens):
        raise AssertionError('the text tower ran: a cache hit was expected')
    monkeypatch.setattr(model, 'encode_text', refuse)


def test_second_classifier_reads_the_entry_bitwise(cache, monkeypatch):
    first = classifier().query_embeddings(CLASSES)
    assert len(list(cache.glob('*.pt'))) == 1 and not list(cache.glob('*.tmp'))
    again = classifier()
    forbid_text_tower(monkeypatch, again)
    assert torch.equal(again.query_embeddings(CLASSES), first)


@pytest.mark.parametrize('change', ['weights', 'activation', 'classes', 'templates'])
def test_a_changed_input_never_reads_a_stale_entry(cache, change, monkeypatch):
    classifier().query_embeddings(CLASSES)
    model = classifier(seed=1 if change == 'weights' else 0,
                       quick_gelu=change == 'activation')
    classes = parse_class_names(['sky', 'tree', 'road']) if change == 'classes' else CLASSES
    if change == 'templates':
        model.templates = model.templates[:1]
    cached = model.query_embeddings(classes)
    monkeypatch.setenv(text_cache.ENV, 'off')  # the reference is computed
    fresh = classifier(seed=1 if change == 'weights' else 0, quick_gelu=change == 'activation')
    fresh.templates = model.templates
    assert torch.equal(cached, fresh.query_embeddings(classes))
    assert len(list(cache.glob('*.pt'))) == 2  # a new entry, the old one untouched


def test_an_entry_that_cannot_be_read_is_computed_again(cache):
    expected = classifier().query_embeddings(CLASSES)
    for content in (b'', b'not a tensor file'):
        for entry in cache.glob('*.pt'):
            entry.write_bytes(content)
        assert torch.equal(classifier().query_embeddings(CLASSES), expected)
    torch.save(torch.full((4, 32), float('nan')), next(cache.glob('*.pt')))  # bad values
    assert torch.equal(classifier().query_embeddings(CLASSES), expected)


def test_off_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(text_cache.ENV, 'off')
    assert text_cache.cache_dir() is None
    classifier().query_embeddings(CLASSES)
    monkeypatch.delenv(text_cache.ENV)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    assert text_cache.cache_dir() == tmp_path / 'mmseg_selfattn' / 'text_embeddings'
    assert not list(tmp_path.rglob('*.pt'))


def test_an_unwritable_folder_is_no_error(tmp_path, monkeypatch):
    blocker = tmp_path / 'file'
    blocker.write_text('')
    monkeypatch.setenv(text_cache.ENV, str(blocker / 'cache'))  # below a file
    assert classifier().query_embeddings(CLASSES).shape == (4, 32)
