"""tools/check_data.py on fabricated benchmarks (tools/fabricate_benchmarks.py)."""
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT, load_tool


check_data = load_tool('check_data')  # --nproc > 1 pickles its functions by name
fabricate_benchmarks = load_tool('fabricate_benchmarks')

ADE_CONFIG = REPO_ROOT / 'configs/methods/naclip/naclip_vit-b16_ade20k.py'
VOC_CONFIG = REPO_ROOT / 'configs/methods/naclip/naclip_vit-b16_voc21.py'


@pytest.fixture(scope='module')
def fabricated(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    return root, fabricate_benchmarks.fabricate(root, num_images=3, seed=0)


def sections(output: str) -> dict:
    """Config file name -> its lines of the report."""
    reports, current = {}, None
    for line in output.splitlines():
        if line.startswith('== '):
            current = reports.setdefault(line[3:].rsplit('/', 1)[-1], [])
        elif current is not None:
            current.append(line)
    return reports


def test_fabricated_benchmarks_are_ok(fabricated, capsys):
    root, _ = fabricated
    assert check_data.main(['--method', 'naclip', '--data-root', str(root),
                            '--nproc', '1']) == 0
    output = capsys.readouterr().out
    reports = sections(output)
    assert sorted(reports) == sorted(f'naclip_vit-b16_{key}.py'
                                     for key in check_data.BENCHMARKS)
    for name, lines in reports.items():
        assert any(line.strip().startswith('3 images in the split') for line in lines), name
        assert '   OK' in lines, (name, lines)
        assert not any('PROBLEM' in line for line in lines), (name, lines)
    assert '8 of 8 test sets OK' in output


@pytest.mark.parametrize('nproc', [1, 2])
def test_label_value_out_of_range(fabricated, tmp_path, capsys, nproc):
    root, samples = fabricated
    shutil.copytree(root / 'ade', tmp_path / 'ade')
    label_file = tmp_path / samples['ade20k'][1][1].relative_to(root)
    labels = np.array(Image.open(label_file))
    assert labels.max() <= 150
    labels[5:9, 5:9] = 200  # ADE20K: 1..150 are classes; 200 -> 199 after reduce_zero_label
    Image.fromarray(labels).save(label_file)

    assert check_data.main([str(ADE_CONFIG), '--data-root', str(tmp_path),
                            '--nproc', str(nproc)]) == 1
    output = capsys.readouterr().out
    problems = [line for line in output.splitlines() if 'PROBLEM' in line]
    assert len(problems) == 1, output
    assert 'label value 199 ' in problems[0]
    assert '0..149' in problems[0]
    assert '1 file(s)' in problems[0] and str(label_file) in problems[0]
    assert '0 of 1 test sets OK' in output


def test_missing_label_map(fabricated, tmp_path, capsys):
    root, samples = fabricated
    shutil.copytree(root / 'VOCdevkit', tmp_path / 'VOCdevkit')
    label_file = tmp_path / samples['voc21'][1][1].relative_to(root)
    label_file.unlink()

    assert check_data.main([str(VOC_CONFIG), '--data-root', str(tmp_path),
                            '--nproc', '2']) == 1
    output = capsys.readouterr().out
    assert f'PROBLEM: 1 label maps missing, e.g. {label_file}' in output
    assert 'images missing' not in output
    assert 'label maps read: 2' in output  # the other two are still checked
    assert '0 of 1 test sets OK' in output


def test_missing_dataset_folder(fabricated, tmp_path, capsys):
    root, _ = fabricated
    data = tmp_path / 'data'
    shutil.copytree(root, data)
    shutil.rmtree(data / 'ade')

    assert check_data.main(['--method', 'naclip', '--data-root', str(data),
                            '--nproc', '2']) == 1
    output = capsys.readouterr().out
    reports = sections(output)
    ade = reports['naclip_vit-b16_ade20k.py']
    missing = data / 'ade' / 'ADEChallengeData2016'
    assert f'   PROBLEM: data_root: {missing} does not exist' in ade
    assert '   OK' not in ade
    for name, lines in reports.items():
        if name != 'naclip_vit-b16_ade20k.py':
            assert '   OK' in lines, (name, lines)
    assert '7 of 8 test sets OK' in output


def test_label_map_of_another_size_than_its_image(fabricated, tmp_path, capsys):
    root, samples = fabricated
    shutil.copytree(root / 'ade', tmp_path / 'ade')
    image_file, label_file = (tmp_path / path.relative_to(root)
                              for path in samples['ade20k'][0])
    Image.open(image_file).resize((30, 20)).save(image_file)

    assert check_data.main([str(ADE_CONFIG), '--data-root', str(tmp_path),
                            '--nproc', '1']) == 1
    output = capsys.readouterr().out
    problems = [line for line in output.splitlines() if 'PROBLEM' in line]
    assert len(problems) == 1, output
    assert '1 label map(s) cannot be used' in problems[0]
    assert str(label_file) in problems[0] and 'is 20 x 30' in problems[0]


def test_rgb_label_map_is_reported(fabricated, tmp_path, capsys):
    root, samples = fabricated
    shutil.copytree(root / 'ade', tmp_path / 'ade')
    label_file = tmp_path / samples['ade20k'][2][1].relative_to(root)
    Image.open(label_file).convert('RGB').save(label_file)

    assert check_data.main([str(ADE_CONFIG), '--data-root', str(tmp_path),
                            '--nproc', '2']) == 1
    output = capsys.readouterr().out
    assert f'PROBLEM: 1 label map(s) cannot be used, e.g. {label_file}: label map of shape' \
        in output and '3 channels' in output
