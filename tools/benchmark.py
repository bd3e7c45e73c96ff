"""Time the segmentor: milliseconds per image for encoding and for each stage.

    python tools/benchmark.py                                  # full pipeline, ViT-B/16, CPU
    python tools/benchmark.py --image-size 375 500 --num-images 4 --repeats 5 --json

The image is resized like the configs' pipeline (short side 336), then run through
``predict`` with the config's sliding window. Each stage is timed inside the
pipeline (CUDA-synchronised on GPU), and the whole pipeline is also compared with
the same model with stages 2-6 switched off, so the overhead of the stages is
measured end to end as well. Weights are random unless --pretrained is given
(speed does not depend on them).
"""
import argparse
import json
import os.path as osp
import resource
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
import mmseg_selfattn  # noqa: E402,F401

import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402

from mmseg_selfattn.stages import PIPELINE_STAGES  # noqa: E402

DEFAULT_CONFIG = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))),
                          'configs/selfattn/selfattn-full_vit-b16_voc21.py')


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--config', default=DEFAULT_CONFIG)
    parser.add_argument('--pretrained', default='none', help="CLIP weights ('none': random)")
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--image-size', nargs=2, type=int, default=(375, 500),
                        metavar=('H', 'W'), help='original image size (VOC: 375 500)')
    parser.add_argument('--short-side', type=int, default=336,
                        help='resize like the test pipeline (0: keep the size)')
    parser.add_argument('--num-images', type=int, default=2, help='images per timed pass')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--json', action='store_true', help='print one JSON object')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    return parser.parse_args()


class StageTimer:
    """``segmentor.timer``: accumulates wall time per stage name."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == 'cuda'
        self.seconds = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str):
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.seconds[stage] += time.perf_counter() - start

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def build_model(args, stages_on: bool):
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.model.clip.pretrained = None if args.pretrained.lower() == 'none' else args.pretrained
    if not stages_on:
        for name in PIPELINE_STAGES:
            cfg.model[f'apply_{name}'] = False
    cfg.model.pop('data_preprocessor', None)
    return MODELS.build(cfg.model).to(args.device).eval(), cfg


def make_images(args) -> torch.Tensor:
    height, width = args.image_size
    if args.short_side:
        scale = args.short_side / min(height, width)
        height, width = round(height * scale), round(width * scale)
    generator = torch.Generator().manual_seed(0)
    return torch.randn(args.num_images, 3, height, width, generator=generator).to(args.device)


def time_passes(model, images, args):
    """Median seconds of one pass over the images, and per-stage seconds of that pass."""
    timer = StageTimer(torch.device(args.device))
    model.timer = timer
    for _ in range(args.warmup):
        model.predict(images)
    timer.seconds.clear()
    totals = []
    for _ in range(args.repeats):
        timer._sync()
        start = time.perf_counter()
        model.predict(images)
        timer._sync()
        totals.append(time.perf_counter() - start)
    model.timer = None
    per_stage = {name: seconds / args.repeats for name, seconds in timer.seconds.items()}
    return statistics.median(totals), per_stage


def peak_memory_mb(device: torch.device) -> float:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    args = parse_args()
    torch.set_grad_enabled(False)
    images = make_images(args)
    full, cfg = build_model(args, stages_on=True)
    bare, _ = build_model(args, stages_on=False)
    full_seconds, per_stage = time_passes(full, images, args)
    bare_seconds, bare_stage = time_passes(bare, images, args)

    per_image = 1000 / args.num_images
    stage_names = ['encode', *[n for n in PIPELINE_STAGES if n in per_stage], 'dense_block',
                   'classify']
    bare_encoding = sum(bare_stage.get(n, 0.0) for n in ('encode', 'dense_block', 'classify'))
    stages_cost = sum(per_stage.get(n, 0.0) for n in PIPELINE_STAGES)
    report = dict(
        config=args.config, arch=cfg.model.clip.arch, device=str(images.device),
        torch=torch.__version__, threads=torch.get_num_threads(),
        image_size=list(images.shape[-2:]), num_images=args.num_images,
        crop=cfg.model.slide_crop, stride=cfg.model.slide_stride,
        ms_per_image_full=full_seconds * per_image, ms_per_image_stages_off=bare_seconds *
        per_image, images_per_s_full=args.num_images / full_seconds,
        ms_per_image_by_stage={n: per_stage.get(n, 0.0) * per_image for n in stage_names},
        stages_overhead_end_to_end=full_seconds / bare_seconds - 1,
        stages_overhead_vs_bare_encoding=stages_cost / bare_encoding,
        peak_memory_mb=peak_memory_mb(images.device))
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{report['arch']} on {report['device']} ({report['threads']} threads), "
          f"{args.num_images} image(s) of {tuple(report['image_size'])}, "
          f"crop {report['crop']} / stride {report['stride']}")
    print(f"full pipeline: {report['ms_per_image_full']:.1f} ms/image "
          f"({report['images_per_s_full']:.2f} images/s); stages 2-6 off: "
          f"{report['ms_per_image_stages_off']:.1f} ms/image")
    print('| stage | ms / image |\n| --- | --- |')
    for name, ms in report['ms_per_image_by_stage'].items():
        print(f'| {name} | {ms:.2f} |')
    print(f"stages 2-6 vs bare encoding (encode + dense block + classify, stages off): "
          f"{100 * report['stages_overhead_vs_bare_encoding']:+.1f}% by stage timers, "
          f"{100 * report['stages_overhead_end_to_end']:+.1f}% end to end")
    print(f"peak memory: {report['peak_memory_mb']:.0f} MB")


if __name__ == '__main__':
    main()
