"""tools/analyze_attention.py on real CamVid photos with a tiny random CLIP (CPU): the
report's numbers against values recomputed here from ``model.explain()``."""
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from PIL import Image

from conftest import REPO_ROOT, TINY_ARCH, camvid_root, load_tool
from mmseg_selfattn.cli import run_main

CONFIG = REPO_ROOT / 'configs/selfattn/selfattn-full_vit-b16_camvid.py'
# the 3-block tiny arch has no layer -4 for similarity enhancement; min_ratio set to test
# the configured-threshold path; τ grid inside the tiny model's A_ii range (~1/785)
OPTIONS = {'model.clip.arch': TINY_ARCH, 'model.similarity_enhancement_cfg.layer': -2,
           'model.outlier_suppression_cfg.min_ratio': 1.5}
TAUS = ('0.001', '0.0013', '0.05')
RATIOS = ('0.1', '1', '2')
EPS = 1e-6  # outlier_suppression's default eps
STRENGTH, TAU = 0.1, 0.15  # self_attn_enhancement defaults


TOOL = load_tool('analyze_attention')


def analyze(out_dir, *args):
    options = [f'{key}={value}' for key, value in OPTIONS.items()]
    return TOOL.main([str(CONFIG), '--pretrained', 'none', '--device', 'cpu', '--no-progress',
                      '--out-dir', str(out_dir), '--tau-grid', *TAUS, '--min-ratio-grid',
                      *RATIOS, *args, '--cfg-options', *options])


def analyze_error(capsys, monkeypatch, out_dir, *args) -> str:
    """The one stderr line of a run that stops on a mistake (exit code 2)."""
    monkeypatch.setattr(logging, 'raiseExceptions', False)  # mmengine's logger keeps the
    capsys.readouterr()  # stdout of an earlier test, closed since
    assert run_main(lambda: analyze(out_dir, *args), prog='analyze_attention.py') == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and 'Traceback' not in err, err
    assert lines[0].startswith('analyze_attention.py: error: ')
    return lines[0].removeprefix('analyze_attention.py: error: ')


@pytest.fixture(scope='module')
def dataset_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp('analyze')
    assert analyze(out_dir, '--data-root', str(camvid_root().parent), '--max-images', '3') == 0
    return out_dir, json.loads((out_dir / 'stats.json').read_text())


def report_row(report, first_cell):
    """The cells of the markdown table row starting with ``first_cell``."""
    for line in report.splitlines():
        cells = [cell.strip() for cell in line.strip('|').split('|')]
        if line.startswith('|') and cells[0] == first_cell:
            return cells
    raise AssertionError(f'no row {first_cell!r} in the report')


def test_writes_report_figures_and_stats(dataset_run):
    out_dir, stats = dataset_run
    for name in ('self_attention_hist.png', 'outlier_scores.png', 'clusters.png'):
        with Image.open(out_dir / name) as figure:
            assert figure.format == 'PNG' and figure.width > 400
    report = (out_dir / 'report.md').read_text()
    assert 'random CLIP weights' in report and '## Suggested settings' in report
    assert stats['run']['random_weights'] and stats['num_images'] == 3
    expected = sorted(camvid_root().joinpath('images/val').glob('*.png'))[:3]
    # the same files, whatever symlinks the paths went through
    assert [Path(path).resolve() for path in stats['run']['images']] == [
        path.resolve() for path in expected]
    # every stage of the full config is on: settings from the run, said so
    assert all(entry['enabled'] and entry['source'].startswith('stage on')
               for entry in stats['settings'].values())
    assert stats['outlier_scores']['min_ratio'] == 1.5
    # the configured τ, min_ratio and eps are added to the grids
    assert set(stats['self_attention']['fraction_below']) == {*TAUS, '0.15'}
    assert stats['outlier_scores']['min_ratio_grid'] == [0.1, 1.0, 1.5, 2.0]
    suggested = stats['suggested']
    assert 0.10 <= suggested['min_self_attn_threshold']['value'] <= 0.25
    assert suggested['top_k']['value'] >= 1 and suggested['min_ratio']['value'] > 0
    assert suggested['eps']['value'] in stats['clusters']['eps_grid']
    for key in ('min_self_attn_threshold', 'min_ratio', 'top_k', 'eps'):
        assert f"`{key} = {suggested[key]['value']:g}`" in report


def test_numbers_equal_those_recomputed_from_explain(dataset_run):
    from mmseg.apis import init_model
    out_dir, stats = dataset_run
    cfg = Config.fromfile(str(CONFIG))
    cfg.merge_from_dict(OPTIONS)
    cfg.model.clip.pretrained = None
    torch.manual_seed(0)  # the tool's default --seed: the same random weights
    model = init_model(cfg, None, 'cpu')
    self_attention, without, with_, clusters = [], [], [], []
    for path in stats['run']['images']:
        maps = model.explain(path)
        attention = maps.recorded['attention']  # (windows, T, T)
        self_attention.append(maps.windows['self_attention'].flatten())
        diagonal = attention.diagonal(dim1=-2, dim2=-1)[:, 1:]
        cls_row = attention[:, 0, 1:]
        without.append(cls_row / (diagonal + EPS))
        # enhancement: A_ii + s * e_i, the row rescaled to its original sum
        boost = STRENGTH * (TAU - diagonal).clamp_min(0)
        row_sum = attention[:, 1:].sum(-1)
        with_.append(cls_row / ((diagonal + boost) * row_sum / (row_sum + boost) + EPS))
        clusters.append(maps.recorded['ctd_labels'].amax(-1) + 1)
    self_attention = torch.cat(self_attention)
    report = (out_dir / 'report.md').read_text()

    for tau in (*TAUS, '0.15'):
        fraction = (self_attention < float(tau)).double().mean().item()
        assert stats['self_attention']['fraction_below'][tau] == pytest.approx(fraction,
                                                                                abs=1e-12)
        assert report_row(report, tau)[1] == f'{100 * fraction:.2f}%'
    assert 0 < stats['self_attention']['fraction_below']['0.0013'] < 1  # not trivial
    assert stats['self_attention']['mean'] == pytest.approx(
        self_attention.double().mean().item(), rel=1e-9)

    for ratio in ('1.5', '0.1', '2'):
        counts = [(torch.cat(scores) > float(ratio)).sum(-1) for scores in (without, with_)]
        means = [count.double().mean().item() for count in counts]
        for key, count in zip(('without', 'with'), counts):
            row = stats['outlier_scores'][key]['counts_per_window'][ratio]
            assert row['total'] == count.sum().item() and row['max'] == count.max().item()
            chosen = count.clamp(max=10).double().mean().item()  # top_k = 10
            assert row['mean_chosen'] == pytest.approx(chosen)
        first = f'{ratio} (config)' if ratio == '1.5' else ratio
        assert report_row(report, first)[1] == f'{means[0]:.3f} / {means[1]:.3f}'
    # the enhancement lowers every score, and changes the counts at 0.1
    assert (torch.cat(with_) < torch.cat(without)).all()
    assert 0 < stats['outlier_scores']['with']['counts_per_window']['0.1']['total'] < \
        stats['outlier_scores']['without']['counts_per_window']['0.1']['total']

    recorded = torch.cat(clusters).double()
    assert stats['clusters']['recorded']['mean_clusters'] == pytest.approx(
        recorded.mean().item())
    # DBSCAN of the grid at CTD's eps, on CTD's input, reproduces CTD's own labels
    ctd = {key: value for key, value in stats['clusters']['recorded'].items()
           if key not in ('eps', 'source')}
    assert stats['clusters']['grid']['0.2'] == ctd


def test_images_folder(dataset_run, tmp_path):
    _, dataset_stats = dataset_run
    folder = tmp_path / 'photos'
    folder.mkdir()
    first = dataset_stats['run']['images'][0]
    shutil.copy(first, folder / 'street.png')
    (folder / 'notes.txt').write_text('not an image')
    assert analyze(tmp_path / 'out', '--images', str(folder)) == 0
    stats = json.loads((tmp_path / 'out/stats.json').read_text())
    assert stats['run']['images'] == [str(folder / 'street.png')]
    image, reference = stats['per_image'][0], dataset_stats['per_image'][0]
    assert {k: v for k, v in image.items() if k != 'image'} == pytest.approx(
        {k: v for k, v in reference.items() if k != 'image'}, rel=1e-6)


def test_empty_folder_and_missing_data_are_clear_errors(tmp_path, capsys, monkeypatch):
    (tmp_path / 'empty').mkdir()
    line = analyze_error(capsys, monkeypatch, tmp_path / 'out', '--images',
                         str(tmp_path / 'empty'))
    assert line.startswith(f'--images {tmp_path / "empty"}: no images found in this folder '
                           '(looked for *.jpg, *.jpeg, *.png')
    line = analyze_error(capsys, monkeypatch, tmp_path / 'out', '--data-root', str(tmp_path))
    assert line == ('no images found: the test set CamVidDataset (images in '
                    f'{tmp_path / "camvid" / "images" / "val"}): the folder does not exist; '
                    'give --data-root (the folder holding the datasets) or --images')
    assert analyze_error(capsys, monkeypatch, tmp_path / 'out', '--data-root',
                         str(tmp_path / 'nowhere')) == \
        f'--data-root {tmp_path / "nowhere"}: no such folder'


def test_unreadable_image_is_named(tmp_path, capsys, monkeypatch):
    broken = tmp_path / 'broken.png'
    broken.write_bytes(b'\x89PNG not really')
    assert analyze_error(capsys, monkeypatch, tmp_path / 'out', '--images', str(broken)) == (
        f'cannot read image {broken}: not a readable image (15 bytes that cv2 cannot decode)')


def test_each_mistake_is_one_line_naming_its_argument(tmp_path, capsys, monkeypatch):
    image = tmp_path / 'street.png'
    Image.new('RGB', (32, 24)).save(image)
    a_file = tmp_path / 'notes.txt'
    a_file.write_text('not a config')
    images = ['--images', str(image)]
    cases = [
        (['--images', str(tmp_path / 'nope.png')],
         f'--images {tmp_path / "nope.png"}: no such file or folder'),
        ([*images, '--out-dir', str(a_file)], f'--out-dir {a_file}: exists and is not a folder'),
        ([*images, '--pretrained', str(tmp_path / 'w.pt')],
         f'--pretrained {tmp_path / "w.pt"}: no such file, and not an open_clip tag; give a '
         "checkpoint file, a tag such as openai, or 'none' for random weights"),
        ([*images, '--cfg-options', 'model.slide_crop=-5'],
         '--cfg-options model.slide_crop=-5: slide_crop must be an int >= 0, got -5.'),
        ([*images, '--cfg-options', 'model.ctd_cfg.eps=0'],
         '--cfg-options model.ctd_cfg.eps=0: ctd_cfg.eps must be a number in (0, 2], got 0.'),
        ([*images, '--cfg-options', 'model.crop_size=224'],
         '--cfg-options model.crop_size=224: SelfAttnCLIPSegmentor.__init__() got an '
         "unexpected keyword argument 'crop_size'"),
    ]
    for args, expected in cases:
        assert analyze_error(capsys, monkeypatch, tmp_path / 'out', *args) == expected
    for config, expected in ((tmp_path / 'nope.py', 'no such file'),
                             (a_file, 'Only py/yml/yaml/json type are supported now!')):
        capsys.readouterr()
        assert run_main(lambda: TOOL.main([str(config), '--no-progress'])) == 2
        assert capsys.readouterr().err.splitlines()[-1].endswith(
            f'error: CONFIG {config}: {expected}')


@pytest.mark.parametrize('option, value, message', [
    ('--tau-grid', '1.5', "'1.5' is not a number in [0, 1]"),
    ('--min-ratio-grid', 'nan', "'nan' is not a number >= 0"),
    ('--eps-grid', '0', "'0' is not a number in (0, 2]"),
    ('--max-images', '0', "'0' is not a positive integer"),
    ('--device', 'gpu', "'gpu' is not a device: use cpu, cuda or cuda:N"),
    ('--cfg-options', 'model.slide_crop', "'model.slide_crop' is not KEY=VALUE, "
     'e.g. model.slide_crop=336'),
])
def test_argparse_errors_name_the_argument(capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        TOOL.main([str(CONFIG), option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].endswith(f'error: argument {option}: {message}')
    assert 'Traceback' not in err


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    image = tmp_path / 'street.png'
    Image.new('RGB', (32, 24)).save(image)

    def broken(model, path):
        raise TypeError('explain() takes 2 positional arguments but 3 were given')

    monkeypatch.setattr(TOOL, 'explain_image', broken)
    with pytest.raises(TypeError, match='positional arguments'):
        run_main(lambda: analyze(tmp_path / 'out', '--images', str(image)))


def test_stages_off_take_the_config_cfgs_and_the_eps_grid_only():
    from types import SimpleNamespace

    from mmseg_selfattn.attention_stats import AttentionStatistics
    generator = torch.Generator().manual_seed(0)
    recorded = dict(attention=torch.randn(2, 17, 17, generator=generator).mul(3).softmax(-1),
                    features_before_debias=torch.randn(2, 16, 8, generator=generator),
                    x_cls=torch.randn(2, 8, generator=generator))
    maps = SimpleNamespace(settings={}, recorded=recorded)
    model_cfg = dict(self_attn_enhancement_cfg=dict(min_self_attn_threshold=0.2),
                     ctd_cfg=dict(eps=0.25, min_samples=3))
    summaries = []
    for _ in range(2):
        analysis = AttentionStatistics(model_cfg, 'cpu')
        analysis.add(maps, 'synthetic')
        summaries.append(analysis.summary())
    stats = summaries[0]
    assert json.dumps(stats) == json.dumps(summaries[1])  # deterministic
    assert all(not entry['enabled'] and entry['source'].startswith('stage off')
               for entry in stats['settings'].values())
    diagonal = recorded['attention'].diagonal(dim1=-2, dim2=-1)[:, 1:]
    assert stats['self_attention']['tau'] == 0.2
    assert stats['self_attention']['fraction_below_tau'] == pytest.approx(
        (diagonal < 0.2).double().mean().item())
    assert stats['outlier_scores']['eps'] == EPS and stats['outlier_scores']['top_k'] == 10
    clusters = stats['clusters']
    assert clusters['recorded'] is None and clusters['min_samples'] == 3
    assert clusters['eps_grid'] == [0.1, 0.15, 0.2, 0.25, 0.3]
    assert 'global_debias' not in clusters['grid_source']
