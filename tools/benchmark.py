"""Speed of the segmentor, and of the published-style reference loop on the same weights.

    python tools/benchmark.py                                   # ViT-B/16, VOC-sized images
    python tools/benchmark.py --device cuda --precision fp16 bf16 --batch-sizes 1 64 \
        --cuda-graph --json out.json
    python tools/benchmark.py --image-dir data/camvid/images/val --scaling

Images (random, or read from --image-dir) are resized like the configs' test pipeline
(short side 336) and segmented with ``predict`` (sliding window, all stages of the
config, post-processing), after warm-up, CUDA-synchronised. Reported per precision:

- latency: ms per image, one image per call; throughput: images/s at each batch size;
- ms per image of encoding and of every stage (stage timers, batch 1), and the
  overhead of stages 2-6 over the same model with them off;
- the reference loop (``mmseg_selfattn/reference_loop.py``: fp16/bf16/fp32 copy of CLIP,
  crops one at a time through CLIP's own blocks and a hand-written last block, like
  SCLIP/NACLIP's code), our speed-up over it, the max abs difference of the query logits
  between the two, and how many outlier choices differ;
- peak memory (GPU: max_memory_allocated at batch 1; CPU: max RSS of the process).

A mistake in the arguments (a missing config or image folder, numbers out of range, an
unusable ``--json`` path, a setting the model refuses) stops it before the first timing
with one line on stderr naming the argument or file, exit code 2 (docs/errors.md).
"""
import argparse
import gc
import json
import os.path as osp
import resource
import statistics
import sys
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
import mmseg_selfattn  # noqa: E402,F401

import cv2  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from mmengine.config import DictAction  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402

from mmseg_selfattn.cli import (UsageError, check_exists, check_out_file,  # noqa: E402
                                check_pretrained, integer, key_value, run_main,
                                torch_device, user_files)
from mmseg_selfattn.reference_loop import outlier_choices, reference_loop  # noqa: E402
from mmseg_selfattn.sliding_window import sliding_windows  # noqa: E402
from mmseg_selfattn.stages import PIPELINE_STAGES  # noqa: E402
from mmseg_selfattn.tool_checks import (check_segmentor_config, read_config,  # noqa: E402
                                        with_cfg_options)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / 'configs/selfattn/selfattn-full_vit-b16_voc21.py'
DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}
PEAK_TFLOPS = 790  # H200 dense bf16, the arithmetic floor
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--config', default=str(DEFAULT_CONFIG))
    parser.add_argument('--pretrained', default='none', help="CLIP weights ('none': random)")
    parser.add_argument('--device', type=torch_device,
                        default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='cpu, cuda or cuda:N')
    parser.add_argument('--precision', nargs='+', default=['fp32'], choices=list(DTYPES))
    parser.add_argument('--image-size', nargs=2, type=integer(1), default=(375, 500),
                        metavar=('H', 'W'))
    parser.add_argument('--image-dir', help='read images from here instead (e.g. CamVid val)')
    parser.add_argument('--short-side', type=integer(0), default=336, help='0 keeps the size')
    parser.add_argument('--num-images', type=integer(1), default=8,
                        help='distinct images for the throughput runs')
    parser.add_argument('--latency-images', type=integer(1), default=4,
                        help='of those, how many for latency, stage timers and the reference')
    parser.add_argument('--batch-sizes', nargs='+', type=integer(1), default=[1, 8])
    parser.add_argument('--max-crops-per-forward', type=integer(1), default=None)
    parser.add_argument('--cuda-graph', action='store_true',
                        help='model.cuda_graph=True: the pipeline as CUDA graphs (GPU)')
    parser.add_argument('--compile', action='store_true', help='model.compile=True')
    parser.add_argument('--warmup', type=integer(0), default=2)
    parser.add_argument('--repeats', type=integer(1), default=5)
    parser.add_argument('--no-reference', action='store_true', help='skip the reference loop')
    parser.add_argument('--no-stages', action='store_true', help='stages 2-6 off')
    parser.add_argument('--scaling', action='store_true',
                        help='also images/s vs short side and vs batch size')
    parser.add_argument('--profile', action='store_true',
                        help='print the top kernels of one batched pass and of one image '
                        '(CUDA graphs off), and the kernels the stages add to one image')
    parser.add_argument('--json', help='write the report here')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, type=key_value)
    return parser.parse_args(argv)


def check_arguments(args: argparse.Namespace) -> None:
    """``UsageError`` for the mistakes that can be seen before the first timing."""
    check_exists('--config', args.config)
    check_exists('--image-dir', args.image_dir, 'folder')
    if args.image_dir and not image_files(args.image_dir, args.num_images):
        raise UsageError(f'--image-dir {args.image_dir}: no images in this folder (looked '
                         f'for {", ".join("*" + s for s in IMAGE_SUFFIXES)})')
    if args.latency_images > args.num_images:
        raise UsageError(f'--latency-images {args.latency_images}: at most --num-images '
                         f'({args.num_images})')
    check_pretrained(args.pretrained)
    check_out_file('--json', args.json)


class StageTimer:
    """``segmentor.pipeline.timer``: wall time per stage (synchronising the GPU around each)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str):
        synchronize(self.device)
        start = time.perf_counter()
        yield
        synchronize(self.device)
        self.seconds[stage] += time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def build_model(args, precision: str, stages_on: bool = True):
    cfg = model_cfg(args)
    cfg.model.clip.pretrained = None if args.pretrained.lower() == 'none' else args.pretrained
    cfg.model.precision = precision
    if args.max_crops_per_forward:
        cfg.model.max_crops_per_forward = args.max_crops_per_forward
    cfg.model.cuda_graph = cfg.model.get('cuda_graph', False) or args.cuda_graph
    cfg.model.compile = cfg.model.get('compile', False) or args.compile
    for name in PIPELINE_STAGES:
        cfg.model[f'apply_{name}'] &= stages_on and not args.no_stages
    cfg.model.pop('data_preprocessor', None)
    with user_files(with_cfg_options(f'the model of --config {args.config}',
                                     args.cfg_options)):  # a setting the model refuses
        model = MODELS.build(cfg.model)
    return model.to(args.device).eval(), cfg


def image_files(folder: str, count: int) -> List[Path]:
    """The first ``count`` image files of ``folder`` (sorted)."""
    return sorted(path for path in Path(folder).iterdir()
                  if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)[:count]


def load_images(args, short_side: int):
    """Normalised (3, H, W) images on the device, resized to the short side."""
    mean = torch.tensor([122.771, 116.746, 104.094]).view(3, 1, 1)
    std = torch.tensor([68.501, 66.632, 70.323]).view(3, 1, 1)
    if args.image_dir:
        raw = []
        for path in image_files(args.image_dir, args.num_images):
            array = cv2.imread(str(path))
            if array is None:
                raise UsageError(f'--image-dir {args.image_dir}: {path} is not a readable image')
            raw.append(torch.from_numpy(array[..., ::-1].copy()).permute(2, 0, 1).float())
    else:
        generator = torch.Generator().manual_seed(0)
        raw = [torch.rand(3, *args.image_size, generator=generator) * 255
               for _ in range(args.num_images)]
    images = []
    for image in raw:
        if short_side:
            scale = short_side / min(image.shape[-2:])
            size = [round(s * scale) for s in image.shape[-2:]]
            image = F.interpolate(image[None], size=size, mode='bilinear')[0]
        images.append(((image - mean) / std).to(args.device))
    return images


def as_batch(images):
    """Pad a list of images into one tensor with per-image metas, as the preprocessor does."""
    height = max(i.shape[-2] for i in images)
    width = max(i.shape[-1] for i in images)
    batch = images[0].new_zeros((len(images), 3, height, width))
    samples = []
    for slot, image in zip(batch, images):
        slot[:, :image.shape[-2], :image.shape[-1]] = image
        shape = tuple(image.shape[-2:])
        samples.append(SegDataSample(metainfo=dict(img_shape=shape, ori_shape=shape)))
    return batch, samples


def seconds_per_image(model, images, batch_size: int, args) -> float:
    """Median over repeats of one pass over the images, per image."""
    device = images[0].device
    batches = [as_batch(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    for _ in range(args.warmup):
        for batch, samples in batches:
            model.predict(batch, samples)
    passes = []
    for _ in range(args.repeats):
        synchronize(device)
        start = time.perf_counter()
        for batch, samples in batches:
            model.predict(batch, samples)
        synchronize(device)
        passes.append(time.perf_counter() - start)
    return statistics.median(passes) / len(images)


def overhead(model, bare, images, batch_size: int, args) -> float:
    """Time of ``model`` over ``bare`` minus 1: the median ratio of passes timed in turn
    (one pass of each per round), so that a clock or load change hits both alike."""
    seconds_per_image(bare, images, batch_size, args)  # warm-up (and CUDA graph capture)
    once = argparse.Namespace(**{**vars(args), 'warmup': 0, 'repeats': 1})
    ratios = [seconds_per_image(model, images, batch_size, once)
              / seconds_per_image(bare, images, batch_size, once)
              for _ in range(max(3, args.repeats))]
    return statistics.median(ratios) - 1


def stage_breakdown(model, images, args) -> dict:
    """ms per image in each stage, one image per call."""
    model.pipeline.timer = StageTimer(images[0].device)
    model.predict(*as_batch(images[:1]))  # warm-up: the timed path is eager (not compiled)
    timer = model.pipeline.timer = StageTimer(images[0].device)
    for image in images:
        model.predict(*as_batch([image]))
    model.pipeline.timer = None
    return {name: 1000 * seconds / len(images) for name, seconds in timer.seconds.items()}


def peak_memory_mb(model, images) -> float:
    device = images[0].device
    if device.type != 'cuda':
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    model.predict(*as_batch(images[:1]))
    return torch.cuda.max_memory_allocated(device) / 2**20


def vit_gmacs_per_crop(model, crop_hw) -> float:
    """Multiply-accumulates of one crop through the ViT (patch embedding + blocks)."""
    visual = model.pipeline.encoder.visual
    width, layers = visual.transformer.width, len(visual.transformer.resblocks)
    patch = visual.patch_size[0]
    tokens = 1 + (crop_hw[0] // patch) * (crop_hw[1] // patch)
    per_block = 12 * tokens * width**2 + 2 * tokens**2 * width
    return (layers * per_block + 3 * patch**2 * tokens * width) / 1e9


def crops_per_image(images, cfg) -> float:
    crop, stride = cfg.model.slide_crop, cfg.model.slide_stride
    return statistics.mean(len(sliding_windows(*i.shape[-2:], crop, stride)) for i in images)


def measure(args, precision: str) -> dict:
    model, cfg = build_model(args, precision)
    images = load_images(args, args.short_side)
    report = dict(precision=precision, image_size=list(images[0].shape[-2:]),
                  crops_per_image=crops_per_image(images, cfg))
    few = images[:args.latency_images]
    latency = seconds_per_image(model, few, 1, args)
    report['latency_ms'] = 1000 * latency
    # before the big batches: CUDA graphs keep their memory pool
    report['peak_memory_mb_batch1'] = peak_memory_mb(model, few)
    report['throughput_images_per_s'] = {
        batch_size: 1 / seconds_per_image(model, images, batch_size, args)
        for batch_size in args.batch_sizes}
    best = max(report['throughput_images_per_s'].values())
    crop = min(cfg.model.slide_crop or 10**9, *images[0].shape[-2:])
    vit_gflop_per_image = report['crops_per_image'] * 2 * vit_gmacs_per_crop(
        model, (crop, crop))  # 2 FLOP (multiply + add) per MAC
    floor_ms = vit_gflop_per_image * 1e9 / (PEAK_TFLOPS * 1e12) * 1e3
    report.update(vit_gflop_per_image=vit_gflop_per_image, floor_ms_per_image=floor_ms,
                  fraction_of_floor=floor_ms / (1000 / best))
    report['ms_per_image_by_stage'] = stage_breakdown(model, few, args)
    if not args.no_stages:
        bare, _ = build_model(args, precision, stages_on=False)
        report['stages_overhead_latency'] = overhead(model, bare, few, 1, args)
        report['stages_overhead_throughput'] = overhead(model, bare, images,
                                                        max(args.batch_sizes), args)
        if args.profile and images[0].is_cuda:
            stage_kernels(model, bare, images[:1])
        del bare
    if not args.no_reference:
        reference = reference_loop(model, DTYPES[precision])
        report['reference_ms'] = 1000 * seconds_per_image(reference, few, 1, args)
        report['speedup_latency'] = report['reference_ms'] / report['latency_ms']
        report['speedup_throughput'] = best * report['reference_ms'] / 1000
        ours = [model.engine.slide_inference(image) for image in few]
        theirs = [reference.engine.slide_inference(image) for image in few]
        report['max_abs_logit_diff'] = max((a - b).abs().max().item()
                                           for a, b in zip(ours, theirs))
        report['max_abs_logit'] = max(a.abs().max().item() for a in ours)
        if model.pipeline.outlier_suppression is not None:  # discrete choices: a near tie can swap
            pairs = [(a, b) for image in few for a, b in zip(outlier_choices(model, image),
                                                             outlier_choices(reference, image))]
            report['outliers_differing'] = sum(len(a - b) for a, b in pairs)
            report['outliers_total'] = sum(len(a) for a, _ in pairs)
    if args.scaling:
        report['scaling'] = scaling(model, cfg, args)
    if args.profile:
        for count in sorted({max(args.batch_sizes), 1}, reverse=True):
            profile(model, images[:count])
    return report


def profile(model, images) -> None:
    """Top kernels of one ``predict`` of ``images``, launched eagerly (CUDA graphs off, so
    that every kernel is visible; ``compile`` stays on), the total GPU time and the number
    of kernels."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    batch = as_batch(images)
    cuda = images[0].is_cuda
    graphs, model.engine.cuda_graph = model.engine.cuda_graph, False
    try:
        for _ in range(2):  # warm-up (compiles the eager shapes)
            model.predict(*batch)
        synchronize(images[0].device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with torch_profile(activities=activities) as prof:
            model.predict(*batch)
            synchronize(images[0].device)
    finally:
        model.engine.cuda_graph = graphs
    sort = 'self_cuda_time_total' if cuda else 'self_cpu_time_total'
    print(f'\n# profile of one predict of {len(images)} image(s), eager launches')
    print(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=90))
    if cuda:
        kernels = sum(event.device_type == torch.autograd.DeviceType.CUDA
                      for event in prof.events())
        print(f'{kernels} GPU kernels and copies')


def gpu_kernels(model, images, calls: int = 20):
    """Launches and GPU us of each kernel (two Counters by kernel name) per ``predict`` of
    ``images``, as the model runs (inside its CUDA graph replays when ``cuda_graph`` is
    on)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    batch = as_batch(images)
    for _ in range(2):
        model.predict(*batch)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            model.predict(*batch)
        torch.cuda.synchronize()
    launches, micros = Counter(), Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            launches[event.name] += 1 / calls
            micros[event.name] += event.device_time_total / calls
    return launches, micros


def stage_kernels(model, bare, images) -> None:
    """The GPU kernels that stages 2-6 add to one ``predict``: the model's kernels minus
    those of the same model with the stages off (CUDA graphs as configured)."""
    (launches, micros), (bare_launches, bare_micros) = (gpu_kernels(m, images)
                                                        for m in (model, bare))
    print(f'\n# kernels per predict of {len(images)} image(s): {sum(launches.values()):.0f} '
          f'({sum(micros.values()):.0f} us of GPU time), stages off '
          f'{sum(bare_launches.values()):.0f} ({sum(bare_micros.values()):.0f} us)')
    print('| us added | launches added | kernel |\n| --- | --- | --- |')
    names = sorted(set(micros) | set(bare_micros), key=lambda n: bare_micros[n] - micros[n])
    for name in names[:25]:
        print(f'| {micros[name] - bare_micros[name]:.1f} | '
              f'{launches[name] - bare_launches[name]:.0f} | {name[:100]} |')


def scaling(model, cfg, args) -> dict:
    sides = {}
    for short_side in (336, 448, 672, 1024):
        images = load_images(args, short_side)
        sides[short_side] = dict(
            crops_per_image=crops_per_image(images, cfg),
            latency_images_per_s=1 / seconds_per_image(model, images[:args.latency_images], 1,
                                                       args),
            batched_images_per_s=1 / seconds_per_image(model, images, max(args.batch_sizes),
                                                       args))
    images = load_images(args, args.short_side)
    batches = {}
    for batch_size in (1, 4, 16, 64, 256):
        repeated = (images * (-(-batch_size // len(images))))[:max(batch_size, len(images))]
        batches[batch_size] = 1 / seconds_per_image(model, repeated, batch_size, args)
    return dict(short_side=sides, batch_size=batches)


def model_cfg(args):
    cfg = read_config(args.config, args.cfg_options, '--config')
    check_segmentor_config(cfg, f'--config {args.config}')
    return cfg


def print_report(report: dict) -> None:
    print(f"# {report['arch']} on {report['device']}, torch {report['torch']}, "
          f"{report['num_images']} image(s) of {report['runs'][0]['image_size']} "
          f"({report['runs'][0]['crops_per_image']:.1f} crops each), {report['config']}")
    for run in report['runs']:
        print(f"\n## {run['precision']}")
        print(f"latency {run['latency_ms']:.2f} ms/image; throughput " + ', '.join(
            f'batch {b}: {v:.1f} images/s' for b, v in run['throughput_images_per_s'].items()))
        print(f"arithmetic floor {run['floor_ms_per_image']:.3f} ms/image "
              f"({run['vit_gflop_per_image']:.0f} GFLOP of ViT at {PEAK_TFLOPS} TFLOP/s); "
              f"best throughput reaches {100 * run['fraction_of_floor']:.1f}% of it")
        if 'reference_ms' in run:
            print(f"reference loop {run['reference_ms']:.2f} ms/image -> speed-up "
                  f"{run['speedup_latency']:.1f}x (latency), {run['speedup_throughput']:.1f}x "
                  f"(throughput); max |logit diff| {run['max_abs_logit_diff']:.2e}" + (
                      f" (outlier choices differing: {run['outliers_differing']} of "
                      f"{run['outliers_total']})" if 'outliers_total' in run else ''))
        if 'stages_overhead_latency' in run:
            print(f"stages 2-6 over the same model with them off: "
                  f"{100 * run['stages_overhead_latency']:+.1f}% (batch 1), "
                  f"{100 * run['stages_overhead_throughput']:+.1f}% (batched)")
        print(f"peak memory {run['peak_memory_mb_batch1']:.0f} MB")
        print('| stage | ms / image (batch 1, synchronised timers) |\n| --- | --- |')
        for name, ms in run['ms_per_image_by_stage'].items():
            print(f'| {name} | {ms:.3f} |')
        if 'scaling' in run:
            print('| short side | crops / image | images/s batch 1 | images/s batched |\n'
                  '| --- | --- | --- | --- |')
            for side, row in run['scaling']['short_side'].items():
                print(f"| {side} | {row['crops_per_image']:.1f} | "
                      f"{row['latency_images_per_s']:.1f} | {row['batched_images_per_s']:.1f} |")
            print('| batch size | images/s |\n| --- | --- |')
            for size, value in run['scaling']['batch_size'].items():
                print(f'| {size} | {value:.1f} |')


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    check_arguments(args)
    torch.set_grad_enabled(False)
    cfg = model_cfg(args)
    report = dict(config=args.config, arch=cfg.model.clip.arch, device=args.device,
                  device_name=(torch.cuda.get_device_name() if args.device.startswith('cuda')
                               else f'cpu x{torch.get_num_threads()} threads'),
                  torch=torch.__version__, num_images=args.num_images,
                  date=time.strftime('%Y-%m-%d'),
                  runs=[])
    for precision in args.precision:
        report['runs'].append(measure(args, precision))
        gc.collect()  # free the last precision's models and graph pools before the next
        if args.device.startswith('cuda'):
            torch.cuda.empty_cache()
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(run_main(main))
