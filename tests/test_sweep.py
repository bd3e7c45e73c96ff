"""tools/sweep.py: one pass, every point equal to its own tools/test.py run; refused keys;
resuming after an interruption."""
import json
import time

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner
from mmseg.registry import METRICS

from mmseg_selfattn import sweep as sweep_module
from mmseg_selfattn.cli import UsageError
from mmseg_selfattn.metrics import CheckedIoUMetric
from mmseg_selfattn.sweep import check_grid, grid_points, parse_grid, pipeline_overrides

from conftest import REPO_ROOT, TINY_ARCH, camvid_root, load_tool

CONFIG = REPO_ROOT / 'configs/selfattn/selfattn-full_vit-b16_camvid.py'
# 3 small CamVid photos (short side 96), 6 windows of 8 x 8 patches each
SMALL = [f'model.clip.arch={TINY_ARCH}', 'model.clip.pretrained=None',
         'model.similarity_enhancement_cfg.layer=-2', 'model.slide_crop=64',
         'model.slide_stride=32', 'test_dataloader.dataset.pipeline.1.scale=(2048,96)',
         f'test_dataloader.dataset.data_root={camvid_root()}',
         'test_dataloader.dataset.indices=3', 'test_dataloader.num_workers=0',
         'test_dataloader.persistent_workers=False',
         'test_evaluator.type=AccumulatorRecordingIoUMetric']
GRID = ['attention=naclip,sclip', 'outlier_suppression_cfg.top_k=0,20',
        'global_debias_cfg.factor=0.5']


@METRICS.register_module()
class AccumulatorRecordingIoUMetric(CheckedIoUMetric):
    """Keeps the per-image accumulators (intersection, union, prediction and label areas)
    of every evaluation, in order."""
    runs = []

    def compute_metrics(self, results):
        AccumulatorRecordingIoUMetric.runs.append([tuple(t.clone() for t in r) for r in results])
        return super().compute_metrics(results)


class Interrupted(Exception):
    """Stands for a kill in the middle of the sweep."""


sweep_tool = load_tool('sweep')


def run_sweep(work_dir, *extra):
    AccumulatorRecordingIoUMetric.runs.clear()
    sweep_tool.main([str(CONFIG), '--grid', *GRID, '--work-dir', str(work_dir),
                     '--no-progress', '--cfg-options', *SMALL, *extra])
    return json.loads((work_dir / 'sweep.json').read_text())


def independent_run(point, work_dir):
    """What tools/test.py does with --cfg-options of the point."""
    cfg = Config.fromfile(str(CONFIG))
    options = {}
    for option in SMALL + [f'model.{key}={value}' for key, value in point.items()]:
        key, _, value = option.partition('=')
        options[key] = sweep_tool.DictAction._parse_iterable(value)
    cfg.merge_from_dict(options)
    cfg.work_dir = str(work_dir)
    AccumulatorRecordingIoUMetric.runs.clear()
    metrics = Runner.from_cfg(cfg).test()
    return metrics, AccumulatorRecordingIoUMetric.runs[0]


@pytest.fixture(scope='module')
def swept(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp('sweep')
    results = run_sweep(work_dir)
    return work_dir, results, list(AccumulatorRecordingIoUMetric.runs)


def test_every_point_equals_an_independent_run(swept, tmp_path):
    _, results, accumulators = swept
    assert [r['point'] for r in results] == [
        dict(attention=a, **{'outlier_suppression_cfg.top_k': k,
                             'global_debias_cfg.factor': 0.5})
        for a in ('naclip', 'sclip') for k in (0, 20)]
    assert len({json.dumps(r['metrics']) for r in results}) > 1  # the points differ
    for index, result in enumerate(results):
        metrics, own = independent_run(result['point'], tmp_path / str(index))
        assert result['metrics'] == pytest.approx(metrics, abs=0, rel=0)
        assert len(own) == len(accumulators[index]) == 3
        for image_sweep, image_own in zip(accumulators[index], own):
            assert all(torch.equal(a, b) for a, b in zip(image_sweep, image_own))


def test_tables_are_sorted_and_give_the_reproducing_options(swept):
    work_dir, results, _ = swept
    table = (work_dir / 'sweep.md').read_text()
    best = max(range(len(results)), key=lambda i: results[i]['metrics']['mIoU'])
    assert f'best: point {best}' in table
    assert sweep_module.cfg_options(results[best]['point']) in table
    rows = (work_dir / 'sweep.csv').read_text().splitlines()[1:]
    mious = [float(row.split(',')[5]) for row in rows]
    assert mious == sorted(mious, reverse=True) and len(rows) == 4


def test_an_interrupted_sweep_resumes(swept, tmp_path, monkeypatch):
    _, clean, _ = swept
    calls, interrupt = [], [True]
    original = sweep_module.predict_variants

    def interrupted_after_two_batches(*args):
        calls.append(1)
        if len(calls) == 3 and interrupt and interrupt.pop():
            raise Interrupted
        return original(*args)

    monkeypatch.setattr(sweep_module, 'predict_variants', interrupted_after_two_batches)
    with pytest.raises(Interrupted):
        run_sweep(tmp_path, '--save-every', '1')
    assert (tmp_path / 'sweep_state.pth.rank0').is_file()
    calls.clear()
    resumed = run_sweep(tmp_path, '--save-every', '1')
    assert len(calls) == 1  # only the third batch ran again
    assert resumed == clean
    calls.clear()
    assert run_sweep(tmp_path) == clean and not calls  # finished: nothing runs again
    assert run_sweep(tmp_path, '--rerun') == clean and len(calls) == 3


def test_a_state_that_cannot_be_read_starts_over(swept, tmp_path, capsys):
    """A truncated state file (a disk full) no longer stops the sweep until --rerun: a
    warning names it and the sweep starts over."""
    _, clean, _ = swept
    state_file = tmp_path / 'sweep_state.pth.rank0'
    torch.save(dict(fingerprint='0123', batches=2, results=[[]] * 4), state_file)
    state_file.write_bytes(state_file.read_bytes()[:100])
    capsys.readouterr()
    # a logger of its own: mmengine reuses one of the same name (config stem and time to
    # the second), whose stream would be an earlier test's capture
    assert run_sweep(tmp_path, f'experiment_name=unreadable_{time.time_ns()}') == clean
    output = capsys.readouterr()
    warnings = [line for line in (output.out + output.err).splitlines()
                if 'cannot be read' in line]
    assert len(warnings) == 1, output
    assert f'sweep: the saved progress {state_file} cannot be read (' in warnings[0]
    assert warnings[0].endswith('starting over')
    assert len(AccumulatorRecordingIoUMetric.runs[0]) == 3  # all three images again
    assert torch.load(state_file, weights_only=False)['batches'] == 3


@pytest.mark.parametrize('key, message', [
    ('slide_crop', 'sliding window'),
    ('model.clip.pretrained', 'CLIP architecture and weights'),
    ('precision', "ViT's dtype"),
    ('class_names', 'class list'),
    ('test_dataloader.dataset.pipeline', 'not a model key'),
    ('max_crops_per_forward', 'speed setting'),
    ('test_scales', 'scales resize the image'),
    ('bogus', 'a grid varies'),
    ('attention.sub', 'a grid varies'),
    ('ctd_cfg.eps.deeper', 'a grid varies'),
])
def test_refused_keys_say_why(key, message):
    with pytest.raises(ValueError, match=message):
        check_grid({key: [1, 2]})


def test_grid_parsing_and_points():
    grid = check_grid(parse_grid(['model.ctd_cfg.eps=0.1,0.2', 'attention=naclip',
                                  'pamr_stride=(8,16),(4,8)']))
    assert grid == {'ctd_cfg.eps': [0.1, 0.2], 'attention': ['naclip'],
                    'pamr_stride': [(8, 16), (4, 8)]}
    points = grid_points(grid)
    assert len(points) == 4 and points[1] == {'ctd_cfg.eps': 0.1, 'attention': 'naclip',
                                              'pamr_stride': (4, 8)}
    overrides = pipeline_overrides({'ctd_cfg': dict(eps=0.3, min_samples=2)}, points[0])
    assert overrides['ctd_cfg'] == dict(eps=0.1, min_samples=2)
    with pytest.raises(ValueError, match='expected KEY=V1,V2'):
        parse_grid(['ctd_cfg.eps'])
    with pytest.raises(ValueError, match='the grid is empty'):
        check_grid({})


def test_bad_stage_values_fail_before_the_first_image(tmp_path):
    """A user's mistake (UsageError: one line, exit 2 from the command line)."""
    with pytest.raises(UsageError, match=r'--grid: ctd_cfg: unknown key\(s\) \[.bogus.\]'):
        sweep_tool.main([str(CONFIG), '--grid', 'ctd_cfg.bogus=1', '--work-dir', str(tmp_path),
                         '--no-progress', '--cfg-options', *SMALL])
    with pytest.raises(UsageError, match='--grid: self_attn_enhancement_cfg.enhancement_str'):
        sweep_tool.main([str(CONFIG), '--grid',
                         'self_attn_enhancement_cfg.enhancement_strength=-1',
                         '--work-dir', str(tmp_path), '--no-progress', '--cfg-options', *SMALL])


def test_stages_run_from_the_flattened_graph_inputs():
    """What a variant's CUDA graph reads (x_cls, attention, memoised X) gives the same
    logits as the full encodings."""
    from mmseg_selfattn.cuda_graphs import flatten_encoded
    torch.manual_seed(0)
    model = build_full_model()
    variant = model.with_pipeline(outlier_suppression_cfg=dict(top_k=3))
    crops = torch.randn(4, 3, 32, 32)
    encoded = [model.pipeline.encode_crops(crops, True, (1, ))]
    expected = variant.pipeline.stage_patch_logits(encoded[0])  # fills the dense memo
    tensors, rebuild = flatten_encoded(encoded, variant.pipeline.dense_key)
    assert len(tensors) == 3
    rebuilt = rebuild([tensor.clone() for tensor in tensors])
    assert rebuilt[0].q is None
    assert torch.equal(variant.pipeline.stage_patch_logits(rebuilt[0]), expected)


def build_full_model():
    from mmseg.registry import MODELS
    return MODELS.build(dict(
        type='SelfAttnCLIPSegmentor', clip=dict(arch=TINY_ARCH, pretrained=None),
        class_names=['sky', 'tree'], slide_crop=32, slide_stride=16,
        apply_similarity_enhancement=True, similarity_enhancement_cfg=dict(layer=-2),
        apply_self_attn_enhancement=True, apply_outlier_suppression=True,
        apply_global_debias=True, apply_ctd=True))
