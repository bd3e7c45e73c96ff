"""tools/dataset_converters: the COCO-Object converter and the wrapper for mmseg's converters."""
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

CONVERTERS_DIR = Path(__file__).resolve().parents[1] / 'tools' / 'dataset_converters'
# The 10 raw ids in 0..89 that no COCO thing category uses, as the COCO-Stuff README lists.
UNUSED_IDS = {11, 25, 28, 29, 44, 65, 67, 68, 70, 82}


def load_script(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so that worker processes can unpickle its functions
    spec.loader.exec_module(module)
    return module


coco_object = load_script(CONVERTERS_DIR / 'coco_object.py', 'converters_coco_object')
mmseg_converter = load_script(CONVERTERS_DIR / 'mmseg_converter.py', 'converters_mmseg_converter')


def expected_labels(raw: np.ndarray) -> np.ndarray:
    """Per-pixel expectation from a dict: thing i (raw-id order) -> i + 1, anything else -> 0."""
    things = [raw_id for raw_id in range(90) if raw_id not in UNUSED_IDS]
    label_of = {raw_id: index + 1 for index, raw_id in enumerate(things)}
    return np.vectorize(lambda value: label_of.get(int(value), 0), otypes=[np.uint8])(raw)


def fabricate_coco_stuff(root: Path) -> dict[Path, np.ndarray]:
    """Raw masks in train2017/val2017 covering every id 0..255; returns path -> mask."""
    rng = np.random.default_rng(0)
    all_ids = rng.permutation(256).astype(np.uint8).reshape(16, 16)
    masks = {
        root / 'annotations' / 'train2017' / '000000000009.png': all_ids,
        root / 'annotations' / 'train2017' / '000000000025.png':
            rng.integers(0, 256, (7, 11), dtype=np.uint8),
        root / 'annotations' / 'val2017' / '000000000139.png':
            np.array([[0, 89, 90, 91], [181, 255, 11, 82]], dtype=np.uint8),
    }
    for path, mask in masks.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(path)
    # An output of mmseg's coco_stuff164k converter: must not be taken for a raw mask.
    Image.fromarray(all_ids).save(
        root / 'annotations' / 'val2017' / '000000000139_labelTrainIds.png')
    return masks


def output_of(raw_path: Path, raw_root: Path, out_root: Path) -> Path:
    relative = raw_path.relative_to(raw_root).with_name(raw_path.stem + '_instanceTrainIds.png')
    return out_root / relative


@pytest.mark.parametrize('nproc, separate_out', [(1, False), (2, True)])
def test_converts_raw_masks_to_object_labels(tmp_path, capsys, nproc, separate_out):
    root = tmp_path / 'coco_stuff164k'
    masks = fabricate_coco_stuff(root)
    out_root = tmp_path / 'coco_object' if separate_out else root
    out_args = ['-o', str(out_root)] if separate_out else []

    coco_object.main([str(root), *out_args, '--allow-partial', '--nproc', str(nproc)])

    assert 'partial' in capsys.readouterr().out
    written = sorted(out_root.glob('annotations/*/*_instanceTrainIds.png'))
    assert written == sorted(output_of(path, root, out_root) for path in masks)
    for raw_path, raw in masks.items():
        label = np.asarray(Image.open(output_of(raw_path, root, out_root)))
        assert label.dtype == np.uint8 and label.shape == raw.shape
        np.testing.assert_array_equal(label, expected_labels(raw))
    first = np.asarray(Image.open(written[0]))
    assert set(np.unique(first)) == set(range(81))  # the all-ids mask hits every label


def test_rerun_skips_converter_outputs(tmp_path):
    root = tmp_path / 'coco_stuff164k'
    masks = fabricate_coco_stuff(root)
    coco_object.main([str(root), '--allow-partial', '--nproc', '1'])

    found = coco_object.find_raw_masks(str(root))
    assert sorted(Path(p) for paths in found.values() for p in paths) == sorted(masks)


def test_full_count_needs_no_flag(tmp_path, monkeypatch):
    root = tmp_path / 'coco_stuff164k'
    masks = fabricate_coco_stuff(root)
    monkeypatch.setattr(coco_object, 'COCO_STUFF164K_LEN', len(masks))

    coco_object.main([str(root), '--nproc', '1'])

    assert len(list(root.glob('annotations/*/*_instanceTrainIds.png'))) == len(masks)


def test_lut_matches_mmseg_coco_stuff_train_ids():
    mmseg_dir = Path(importlib.util.find_spec('mmseg').submodule_search_locations[0])
    spec = importlib.util.spec_from_file_location(
        'mmseg_coco_stuff164k', mmseg_dir / '.mim/tools/dataset_converters/coco_stuff164k.py')
    mmseg_coco_stuff = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mmseg_coco_stuff)
    things = {raw: train_id + 1
              for raw, train_id in mmseg_coco_stuff.clsID_to_trID.items() if train_id < 80}

    lut = coco_object.object_lut()
    assert lut.shape == (256,) and lut.dtype == np.uint8
    assert {raw: int(lut[raw]) for raw in coco_object.COCO_THING_IDS} == things
    assert all(lut[raw] == 0 for raw in range(256) if raw not in things)


def test_partial_download_is_refused(tmp_path):
    root = tmp_path / 'coco_stuff164k'
    fabricate_coco_stuff(root)

    with pytest.raises(SystemExit) as error:
        coco_object.main([str(root), '--nproc', '1'])

    message = str(error.value.code)
    assert '123,287' in message and '--allow-partial' in message and str(root) in message
    assert 'train2017: 2' in message and 'val2017: 1' in message
    assert not list(root.glob('**/*_instanceTrainIds.png'))


@pytest.mark.parametrize('layout', ['no_root', 'no_annotations', 'no_masks'])
def test_missing_input_names_the_path(tmp_path, layout):
    root = tmp_path / 'coco_stuff164k'
    if layout != 'no_root':
        root.mkdir()
    if layout == 'no_masks':
        (root / 'annotations' / 'train2017').mkdir(parents=True)

    with pytest.raises(SystemExit) as error:
        coco_object.main([str(root), '--allow-partial', '--nproc', '1'])

    assert str(root) in str(error.value.code)


def test_wrapper_unknown_name_lists_available():
    with pytest.raises(SystemExit) as error:
        mmseg_converter.main(['no_such_dataset'])

    message = str(error.value.code)
    assert 'no_such_dataset' in message
    assert all(name in message for name in ('pascal_context', 'coco_stuff164k', 'cityscapes'))


def test_wrapper_pascal_context_needs_detail():
    if importlib.util.find_spec('detail') is not None:
        pytest.skip('the Detail API is installed')
    with pytest.raises(SystemExit) as error:
        mmseg_converter.main(['pascal_context', 'data/VOCdevkit', 'trainval_merged.json'])

    message = str(error.value.code)
    assert "'detail'" in message and 'detail-api' in message


@pytest.mark.parametrize('name', ['coco_stuff164k', 'coco_stuff164k.py'])
def test_wrapper_runs_converter_help(capsys, monkeypatch, name):
    standin_installs = []
    monkeypatch.setattr(mmseg_converter, 'install_mmcv_ops_standin',
                        lambda: standin_installs.append(True))
    argv_before = list(sys.argv)
    with pytest.raises(SystemExit) as error:
        mmseg_converter.main([name, '--help'])

    assert error.value.code == 0
    help_text = capsys.readouterr().out
    assert 'coco_path' in help_text and '--nproc' in help_text
    assert sys.argv == argv_before
    assert standin_installs == [True]
