"""'auto' settings follow the machine (mmseg_selfattn/machine.py); an explicit value is
kept; the timeline hook's line; PAMR over a group equals PAMR image by image; the
pooled pipeline calls' chunk shapes."""
import subprocess
import sys
import time

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner

from mmseg_selfattn import machine
from mmseg_selfattn.hooks import TIMELINE_PREFIX, seconds_since_process_start
from mmseg_selfattn.image_engine import _chunks
from mmseg_selfattn.pamr import PAMR

from conftest import REPO_ROOT, build_tiny_segmentor, load_tool, runner_config

VOC_PRESET = REPO_ROOT / 'configs/methods/naclip/naclip_vit-b16_voc21.py'


@pytest.fixture(scope='module')
def voc_root(tmp_path_factory):
    """One fabricated VOC2012 image and label map (tools/fabricate_benchmarks.py)."""
    root = tmp_path_factory.mktemp('fabricated')
    load_tool('fabricate_benchmarks').fabricate(root, num_images=1, seed=0)
    return root / 'VOCdevkit' / 'VOC2012'


@pytest.mark.parametrize('cuda, cpus, expected', [
    (True, 16, (16, 12)), (True, 8, (16, 6)), (True, 3, (16, 2)), (True, 64, (16, 12)),
    (False, 16, (1, 2)), (False, 1, (1, 1))])
def test_auto_loader_settings(monkeypatch, cuda, cpus, expected):
    monkeypatch.setattr(machine, 'cpus_per_process', lambda: cpus)
    loader = machine.resolve_test_loader(dict(batch_size='auto', num_workers='auto',
                                              persistent_workers=True), cuda=cuda)
    assert (loader['batch_size'], loader['num_workers']) == expected
    assert loader['persistent_workers'] is True


def test_explicit_loader_values_are_kept_and_checked():
    loader = machine.resolve_test_loader(dict(batch_size=3, num_workers=0,
                                              persistent_workers=True), cuda=True)
    assert (loader['batch_size'], loader['num_workers']) == (3, 0)
    assert loader['persistent_workers'] is False  # torch refuses it without workers
    for key, value in (('batch_size', 0), ('batch_size', 'big'), ('num_workers', -1),
                       ('num_workers', True)):
        with pytest.raises(ValueError, match=rf"test_dataloader.{key} must be an int .* or "
                                             r"'auto' \(this machine: \d+\), got"):
            machine.resolve_test_loader({key: value})


def test_ranks_of_a_host_share_its_cpus(monkeypatch):
    available = machine.cpus_per_process()
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    assert machine.cpus_per_process() == max(1, available // 2)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', 'x')
    assert machine.cpus_per_process() == available


def test_auto_precision(monkeypatch):
    assert build_tiny_segmentor(precision='auto').vit_dtype == (
        torch.float16 if torch.cuda.is_available() else torch.float32)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert machine.resolve_precision('auto') == 'fp16'
    assert machine.resolve_precision('bf16') == 'bf16'
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert machine.resolve_precision('auto') == 'fp32'


def test_presets_ship_auto_and_the_loop_resolves_it(voc_root, tmp_path, monkeypatch):
    cfg = Config.fromfile(str(VOC_PRESET))
    assert cfg.model.precision == 'auto'
    assert cfg.test_dataloader.batch_size == cfg.test_dataloader.num_workers == 'auto'
    cfg = runner_config(VOC_PRESET, voc_root, tmp_path)
    cfg.model.pamr_steps = 0
    cfg.test_dataloader.batch_size = cfg.test_dataloader.num_workers = 'auto'
    monkeypatch.setattr(machine, 'cpus_per_process', lambda: 1)  # one worker process
    runner = Runner.from_cfg(cfg)  # mmengine's plain Runner: the config's loop resolves
    loader = runner.test_dataloader
    cuda = torch.cuda.is_available()
    assert loader.batch_size == (16 if cuda else 1)
    assert loader.num_workers == (2 if cuda else 1)
    assert 0 <= runner.test()['mIoU'] <= 100


def test_timeline_line(voc_root, tmp_path, capsys):
    cfg = runner_config(VOC_PRESET, voc_root, tmp_path)
    cfg.model.pamr_steps = 0
    Runner.from_cfg(cfg).test()
    lines = [line for line in capsys.readouterr().out.splitlines() if TIMELINE_PREFIX in line]
    assert len(lines) == 1, lines
    numbers = lines[0].split(TIMELINE_PREFIX)[1]
    assert 'start-up' in numbers and '(1 images,' in numbers and 'evaluation' in numbers


def test_seconds_since_process_start():
    code = ('import time; time.sleep(0.5); from mmseg_selfattn.hooks import '
            'seconds_since_process_start as s; print(s())')
    started = time.perf_counter()
    elapsed = float(subprocess.check_output([sys.executable, '-c', code], cwd=REPO_ROOT))
    assert 0.5 <= elapsed <= time.perf_counter() - started + 0.05
    assert 0 < seconds_since_process_start()


@pytest.mark.parametrize('total, size, expected', [
    (18, 8, [8, 8, 2]), (64, 64, [64]), (45, 64, [32, 8, 4, 1]), (1, 64, [1]),
    (130, 64, [64, 64, 2]), (7, 4, [4, 2, 1])])
def test_pipeline_call_shapes(total, size, expected):
    slices = _chunks(total, size)
    assert [s.stop - s.start for s in slices] == expected
    assert slices[0].start == 0 and all(a.stop == b.start for a, b in zip(slices, slices[1:]))
    assert slices[-1].stop == total


def test_pamr_of_a_group_equals_pamr_image_by_image():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 30, 41, generator=generator)
    logits = torch.randn(3, 5, 30, 41, generator=generator)
    refine = PAMR(4, (1, 3))
    engine = build_tiny_segmentor(pamr_steps=4, pamr_stride=(1, 3)).engine
    one_by_one = torch.cat([refine(image[None], image_logits[None])
                            for image, image_logits in zip(images, logits)])
    # equal up to the rounding of reductions vectorised over more images (~6e-8)
    torch.testing.assert_close(engine.pamr_refined(images, logits), one_by_one, atol=1e-6,
                               rtol=0)
    assert not torch.allclose(one_by_one, logits, atol=1e-3)  # PAMR changed the logits
