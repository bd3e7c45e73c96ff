"""Write random datasets in the exact on-disk layouts of the eight benchmarks.

    python tools/fabricate_benchmarks.py OUT [--images 3 | --real-counts] [--real-sizes]
        [--benchmarks voc21 ade20k ...] [--workers N] [--seed 0]

OUT gets the folders the dataset bases expect below ``data/`` (so ``--data-root OUT``
of ``tools/eval_all.py`` / ``tools/check_data.py`` finds them)::

    VOCdevkit/VOC2012  JPEGImages/*.jpg, SegmentationClass/*.png (palette PNGs, 0..20,
                       255 void), ImageSets/Segmentation/val.txt        -> VOC21, VOC20
    VOCdevkit/VOC2010  JPEGImages/*.jpg, SegmentationClassContext/*.png (0..59),
                       ImageSets/SegmentationContext/val.txt           -> Context60, 59
    coco_stuff164k     images/val2017/*.jpg, annotations/val2017/*_labelTrainIds.png
                       (0..170, 255) and *_instanceTrainIds.png (0..80) -> Stuff, Object
    cityscapes         leftImg8bit/val/<city>/*_leftImg8bit.png,
                       gtFine/val/<city>/*_gtFine_labelTrainIds.png (0..18, 255)
    ade/ADEChallengeData2016  images/validation/*.jpg, annotations/validation/*.png
                       (0 other, 1..150)

Each root also holds files that a real download has and an evaluation must skip
(training images outside the split file, raw masks beside the converted ones), so
the data wiring is checked, not only the happy path. The mIoU on them means nothing.

- default: tiny images (40-96 px high) of random colour blocks, ``--images`` per split;
  fast, for testing the wiring. One random stream over all roots, written serially (the
  files are the same as those of earlier versions of this tool).
- ``--real-sizes``: each benchmark's real image sizes and formats, for timing an
  evaluation as a user runs it (batching by shape, CUDA graphs, decoding). Images are
  smooth colour fields (bilinearly upsampled random grids at three scales) with grain,
  so that they compress and decode like photos (JPEG quality 90: about 85 KB on average
  for VOC's sizes, 135 KB for COCO's, 150 KB for ADE20K's; Cityscapes PNGs about
  3.5 MB); label maps are blobby regions (level sets of an upsampled random field) in
  the benchmark's encoding. Sizes (W x H) are drawn from an approximation of each
  validation split:

    VOC2012, VOC2010     JPEG. 500x375 45%, 500x333 15%, 375x500 15%, 333x500 5%,
                         500 x U[250, 500) 15%, U[250, 500) x 500 5%
    COCO-Stuff val2017   JPEG. 640x480 45%, 640x427 25%, 480x640 12%, 427x640 8%,
                         640 x U[360, 640) 7%, U[360, 640) x 640 3%
    Cityscapes val       PNG. 2048x1024 always
    ADE20K validation    JPEG. 683x512 50%, 512x683 15%, 512x512 15%, the rest W, H
                         uniform in [256, 1024] with W/H in [0.5, 2]

  Every image draws from its own random stream (seed, root, image index), so the files
  do not depend on ``--workers`` (processes writing them in parallel) nor on
  ``--benchmarks``.
- ``--real-counts`` (instead of ``--images``): the real split sizes, VOC2012 val 1,449,
  VOC2010 Context val 5,105, COCO-Stuff164k val2017 5,000, Cityscapes val 500, ADE20K
  validation 2,000.
- ``--benchmarks``: write only the roots these benchmarks need (VOC20 shares VOC21's,
  Context59 Context60's, COCO-Object COCO-Stuff's); default all eight.

A mistake in the arguments (OUT naming a file, ``--images`` below 1 or with
``--real-counts``, a negative ``--seed``, an unknown benchmark, a folder that cannot be
written) is one line on stderr, exit status 2.
"""
import argparse
import functools
import multiprocessing
import os
import os.path as osp
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from mmseg_selfattn.benchmarks import BENCHMARKS  # noqa: E402
from mmseg_selfattn.cli import check_out_dir, integer, run_main, user_files  # noqa: E402


def voc_palette() -> np.ndarray:
    """PASCAL VOC's colour map (256 x RGB) of its palette PNGs: bits of the label spread
    over the high bits of r, g, b."""
    labels = np.arange(256)
    palette = np.zeros((256, 3), np.uint8)
    for shift in range(8):
        for channel in range(3):
            bit = (labels >> (3 * shift + channel)) & 1
            palette[:, channel] |= (bit << (7 - shift)).astype(np.uint8)
    return palette


VOC_PALETTE = voc_palette()

Sample = Tuple[Path, Path]  # (image, label map) as written
Size = Tuple[int, int]  # (height, width)


# -- content: tiny random blocks (default) or photo-like fields (--real-sizes) ---------------
def _random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    blocks = rng.integers(0, 256, (max(1, height // 16), max(1, width // 16), 3), np.uint8)
    image = np.kron(blocks, np.ones((16, 16, 1), np.uint8))
    image = np.pad(image, ((0, max(0, height - image.shape[0])),
                           (0, max(0, width - image.shape[1])), (0, 0)), mode='edge')
    return image[:height, :width]


def _random_labels(rng: np.random.Generator, height: int, width: int, values: int,
                   void: bool) -> np.ndarray:
    """Blocks of labels in [0, values), plus a void (255) frame when ``void``."""
    blocks = rng.integers(0, values, (max(1, height // 8) + 1, max(1, width // 8) + 1))
    labels = np.kron(blocks, np.ones((8, 8), np.int64))[:height, :width].astype(np.uint8)
    if void:
        labels[:2, :] = labels[:, :2] = 255
    return labels


def smooth_field(rng: np.random.Generator, height: int, width: int, cell: float,
                 channels: int) -> np.ndarray:
    """(height, width, channels) float32 in [0, 1]: a random grid with one value per
    ``cell`` pixels, upsampled bilinearly (PIL)."""
    grid = rng.random((channels, max(2, round(height / cell)), max(2, round(width / cell))),
                      dtype=np.float32)
    return np.stack([np.asarray(Image.fromarray(plane, 'F').resize(
        (width, height), Image.BILINEAR)) for plane in grid], axis=-1)


def photo_like(rng: np.random.Generator, height: int, width: int,
               grain: float = 12.0) -> np.ndarray:
    """An (H, W, 3) uint8 image that compresses like a photo: colour fields at the scale
    of the image and of 24 pixels, a grey texture of 2.5 pixels (5 x ``grain`` levels)
    and grey noise (standard deviation ``grain``)."""
    image = (150 * smooth_field(rng, height, width, max(height, width) / 3, 3)
             + 70 * smooth_field(rng, height, width, 24, 3)
             + 5 * grain * smooth_field(rng, height, width, 2.5, 1))
    image += grain * rng.standard_normal((height, width, 1), dtype=np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def blobby_labels(rng: np.random.Generator, height: int, width: int, values: int,
                  void: bool, regions: int = 8) -> np.ndarray:
    """Labels in [0, values) on blobby regions (the ``regions`` level sets of a smooth
    random field, each given a random label), plus a void (255) frame when ``void``."""
    field = smooth_field(rng, height, width, max(height, width) / 4, 1)[..., 0]
    field = (field - field.min()) / max(float(field.max() - field.min()), 1e-6)
    levels = rng.integers(0, values, regions).astype(np.uint8)
    labels = levels[np.minimum((field * regions).astype(np.intp), regions - 1)]
    if void:
        labels[:2, :] = labels[:, :2] = 255
    return labels


@dataclass(frozen=True)
class Content:
    """How a root's files are drawn: image(rng, h, w), labels(rng, h, w, values, void)."""
    image: Callable[..., np.ndarray]
    labels: Callable[..., np.ndarray]
    jpeg_quality: int
    png_compress_level: int  # of RGB PNGs (Cityscapes): 1 decodes as fast as 6, writes 4x faster
    distractor_size: Size  # of the training image outside the split file


SMALL = Content(_random_image, _random_labels, 95, 6, (40, 50))


def real_content(grain: float) -> Content:
    return Content(functools.partial(photo_like, grain=grain), blobby_labels, 90, 1, (375, 500))


# -- sizes ------------------------------------------------------------------------------------
# (share, (min height, max height), (min width, max width)), bounds inclusive
SizeMix = Sequence[Tuple[float, Size, Size]]
VOC_SIZES: SizeMix = ((.45, (375, 375), (500, 500)), (.15, (333, 333), (500, 500)),
                      (.15, (500, 500), (375, 375)), (.05, (500, 500), (333, 333)),
                      (.15, (250, 499), (500, 500)), (.05, (500, 500), (250, 499)))
COCO_SIZES: SizeMix = ((.45, (480, 480), (640, 640)), (.25, (427, 427), (640, 640)),
                       (.12, (640, 640), (480, 480)), (.08, (640, 640), (427, 427)),
                       (.07, (360, 639), (640, 640)), (.03, (640, 640), (360, 639)))
CITYSCAPES_SIZES: SizeMix = ((1., (1024, 1024), (2048, 2048)), )
ADE20K_SIZES: SizeMix = ((.50, (512, 512), (683, 683)), (.15, (683, 683), (512, 512)),
                         (.15, (512, 512), (512, 512)), (.20, (256, 1024), (256, 1024)))
MAX_ASPECT = 2.0  # W/H and H/W of a drawn size


def real_sizes(mix: SizeMix, count: int, rng: np.random.Generator) -> np.ndarray:
    """(count, 2) int (height, width) drawn from ``mix``; a size whose aspect ratio is
    beyond ``MAX_ASPECT`` is drawn again from its component."""
    shares = np.array([share for share, _, _ in mix])
    component = rng.choice(len(mix), size=count, p=shares / shares.sum())
    sizes = np.zeros((count, 2), np.int64)
    redraw = np.ones(count, bool)
    while redraw.any():
        for index, (_, heights, widths) in enumerate(mix):
            rows = np.flatnonzero(redraw & (component == index))
            sizes[rows, 0] = rng.integers(heights[0], heights[1] + 1, rows.size)
            sizes[rows, 1] = rng.integers(widths[0], widths[1] + 1, rows.size)
        aspect = sizes[:, 1] / sizes[:, 0]
        redraw = (aspect > MAX_ASPECT) | (aspect < 1 / MAX_ASPECT)
    return sizes


def small_sizes(rng: np.random.Generator, count: int, aspect: float = 1.3) -> List[Size]:
    heights = rng.integers(40, 97, count)
    return [(int(h), int(h * aspect * rng.uniform(0.8, 1.2))) for h in heights]


# -- files -------------------------------------------------------------------------------------
def _save_jpg(path: Path, image: np.ndarray, quality: int = 95) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=quality)


def _save_png(path: Path, labels: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(labels, mode='L')
    if palette:
        image = image.convert('P')
        image.putpalette(VOC_PALETTE.flatten().tolist())
    image.save(path)


# Writers of one image of a root: (root, index, size, rng, content) -> the samples of the
# root's benchmarks (RootSpec.benchmarks order). Draws: the image, then each label map.
def _voc_name(index: int) -> str:
    return f'2008_{index:06d}'


def write_voc_image(root: Path, index: int, size: Size, rng, content: Content, seg_dir: str,
                    values: int, palette: bool, void: bool) -> Tuple[Sample, Sample]:
    name = _voc_name(index)
    image, label = root / 'JPEGImages' / f'{name}.jpg', root / seg_dir / f'{name}.png'
    _save_jpg(image, content.image(rng, *size), content.jpeg_quality)
    _save_png(label, content.labels(rng, *size, values, void), palette)
    return (image, label), (image, label)


def write_voc_split(root: Path, count: int, rng, content: Content, split_dir: str) -> None:
    """The split files, and a training image that is not in the val split."""
    _save_jpg(root / 'JPEGImages' / '2007_999999.jpg',
              content.image(rng, *content.distractor_size), content.jpeg_quality)
    (root / split_dir).mkdir(parents=True, exist_ok=True)
    (root / split_dir / 'val.txt').write_text(''.join(f'{_voc_name(i)}\n' for i in range(count)))
    (root / split_dir / 'train.txt').write_text('2007_999999\n')


def write_coco_image(root: Path, index: int, size: Size, rng,
                     content: Content) -> Tuple[Sample, Sample]:
    name = f'{139 + index:012d}'
    image = root / 'images' / 'val2017' / f'{name}.jpg'
    _save_jpg(image, content.image(rng, *size), content.jpeg_quality)
    labels = root / 'annotations' / 'val2017'
    _save_png(labels / f'{name}.png', content.labels(rng, *size, 182, True))  # raw ids
    _save_png(labels / f'{name}_labelTrainIds.png', content.labels(rng, *size, 171, True))
    _save_png(labels / f'{name}_instanceTrainIds.png', content.labels(rng, *size, 81, False))
    return ((image, labels / f'{name}_labelTrainIds.png'),
            (image, labels / f'{name}_instanceTrainIds.png'))


def write_cityscapes_image(root: Path, index: int, size: Size, rng,
                           content: Content) -> Tuple[Sample]:
    city = ('frankfurt', 'lindau', 'munster')[index % 3]
    stem = f'{city}_{index:06d}_000019'
    image = root / 'leftImg8bit' / 'val' / city / f'{stem}_leftImg8bit.png'
    label = root / 'gtFine' / 'val' / city / f'{stem}_gtFine_labelTrainIds.png'
    image.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(content.image(rng, *size)).save(image,
                                                     compress_level=content.png_compress_level)
    _save_png(label, content.labels(rng, *size, 19, True))
    _save_png(label.with_name(f'{stem}_gtFine_labelIds.png'),
              content.labels(rng, *size, 34, False))  # raw ids, beside the train ids
    return ((image, label), )


def write_ade20k_image(root: Path, index: int, size: Size, rng,
                       content: Content) -> Tuple[Sample]:
    name = f'ADE_val_{index + 1:08d}'
    image = root / 'images' / 'validation' / f'{name}.jpg'
    label = root / 'annotations' / 'validation' / f'{name}.png'
    _save_jpg(image, content.image(rng, *size), content.jpeg_quality)
    _save_png(label, content.labels(rng, *size, 151, False))
    return ((image, label), )


@dataclass(frozen=True)
class RootSpec:
    """One dataset root below OUT and the benchmarks that read it."""
    folder: str
    benchmarks: Tuple[str, ...]
    write_image: Callable[..., tuple]
    sizes: SizeMix
    small_aspect: float = 1.3  # W/H of the tiny images
    grain: float = 12.0  # photo_like's texture and noise at real sizes
    write_split: Optional[Callable[..., None]] = None


ROOTS: Tuple[RootSpec, ...] = (
    RootSpec('VOCdevkit/VOC2012', ('voc21', 'voc20'),
             functools.partial(write_voc_image, seg_dir='SegmentationClass', values=21,
                               palette=True, void=True), VOC_SIZES,
             write_split=functools.partial(write_voc_split,
                                           split_dir='ImageSets/Segmentation')),
    RootSpec('VOCdevkit/VOC2010', ('context60', 'context59'),
             functools.partial(write_voc_image, seg_dir='SegmentationClassContext', values=60,
                               palette=False, void=False), VOC_SIZES,
             write_split=functools.partial(write_voc_split,
                                           split_dir='ImageSets/SegmentationContext')),
    RootSpec('coco_stuff164k', ('coco_stuff164k', 'coco_object'), write_coco_image,
             COCO_SIZES),
    RootSpec('cityscapes', ('cityscapes', ), write_cityscapes_image, CITYSCAPES_SIZES,
             small_aspect=2.0, grain=4.0),
    RootSpec('ade/ADEChallengeData2016', ('ade20k', ), write_ade20k_image, ADE20K_SIZES),
)
# streams of a root's random sizes and of its distractor files, beside those of its images
SIZES_STREAM, DISTRACTOR_STREAM = 2**31 - 1, 2**31 - 2


def real_counts() -> Dict[str, int]:
    """Benchmark -> the size of its real validation split (what ``--real-counts`` writes)."""
    return {key: benchmark.num_val_images for key, benchmark in BENCHMARKS.items()}


def roots_for(benchmarks: Optional[Iterable[str]]) -> List[int]:
    """Indices in ROOTS of the roots that ``benchmarks`` read (None: all)."""
    if benchmarks is None:
        return list(range(len(ROOTS)))
    unknown = sorted(set(benchmarks) - set(BENCHMARKS))
    if unknown:
        raise ValueError(f'unknown benchmark(s) {", ".join(unknown)}; known: '
                         f'{", ".join(BENCHMARKS)}')
    return [index for index, spec in enumerate(ROOTS) if set(spec.benchmarks) & set(benchmarks)]


def _write_small_root(out: Path, spec: RootSpec, count: int, rng) -> List[tuple]:
    """The tiny images of one root from the shared stream ``rng``, in order."""
    root = out / spec.folder
    written = [spec.write_image(root, index, size, rng, SMALL)
               for index, size in enumerate(small_sizes(rng, count, spec.small_aspect))]
    if spec.write_split:
        spec.write_split(root, count, rng, SMALL)
    return written


def _write_real_image(task: Tuple[str, int, int, int, int, int]) -> tuple:
    """One real-size image (a Pool task): (out, root index, image index, height, width,
    seed), with its own random stream."""
    out, root_index, index, height, width, seed = task
    spec = ROOTS[root_index]
    rng = np.random.default_rng([seed, root_index, index])
    return spec.write_image(Path(out) / spec.folder, index, (height, width), rng,
                            real_content(spec.grain))


def _write_real_roots(out: Path, counts: Dict[int, int], seed: int,
                      workers: int) -> Dict[int, List[tuple]]:
    """The real-size images of the roots ``counts`` (root index -> images), over
    ``workers`` processes."""
    tasks, first = [], {}
    for root_index, count in counts.items():
        sizes = real_sizes(ROOTS[root_index].sizes, count,
                           np.random.default_rng([seed, root_index, SIZES_STREAM]))
        first[root_index] = len(tasks)
        tasks += [(str(out), root_index, index, int(h), int(w), seed)
                  for index, (h, w) in enumerate(sizes)]
    if workers > 1 and len(tasks) > 1:
        with multiprocessing.Pool(min(workers, len(tasks))) as pool:
            written = pool.map(_write_real_image, tasks,
                               chunksize=max(1, len(tasks) // (8 * workers)))
    else:
        written = [_write_real_image(task) for task in tasks]
    for root_index, count in counts.items():
        spec = ROOTS[root_index]
        if spec.write_split:
            spec.write_split(out / spec.folder, count,
                             np.random.default_rng([seed, root_index, DISTRACTOR_STREAM]),
                             real_content(spec.grain))
    return {root_index: written[first[root_index]:first[root_index] + count]
            for root_index, count in counts.items()}


def fabricate(out: Path, num_images: Optional[int] = 3, seed: int = 0, real_sizes: bool = False,
              benchmarks: Optional[Sequence[str]] = None,
              workers: int = 1) -> Dict[str, List[Sample]]:
    """Writes the roots of ``benchmarks`` (None: all five roots) below ``out``; returns
    the (image, label map) files of each of those benchmarks, in split order.

    Args:
        num_images: images per split; None: the real split sizes (``real_counts()``).
        real_sizes: each benchmark's real sizes and formats, photo-like content (module
            docstring); else tiny random blocks.
        workers: processes writing real-size images (the files do not depend on it).
    """
    out = Path(out)
    indices = roots_for(benchmarks)
    counts = {index: num_images or real_counts()[ROOTS[index].benchmarks[0]]
              for index in indices}
    if real_sizes:
        written = _write_real_roots(out, counts, seed, workers)
    else:
        rng = np.random.default_rng(seed)
        written = {index: _write_small_root(out, ROOTS[index], count, rng)
                   for index, count in counts.items()}
    samples = {key: [images[slot] for images in written[index]]
               for index in indices for slot, key in enumerate(ROOTS[index].benchmarks)}
    return {key: samples[key] for key in BENCHMARKS
            if key in samples and (benchmarks is None or key in benchmarks)}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('out', help='folder to write the dataset roots into')
    count = parser.add_mutually_exclusive_group()
    count.add_argument('--images', type=int, help='images per split (default 3)')
    count.add_argument('--real-counts', action='store_true',
                       help='the real validation split sizes (VOC2012 1,449, VOC2010 5,105, '
                       'COCO 5,000, Cityscapes 500, ADE20K 2,000)')
    parser.add_argument('--real-sizes', action='store_true',
                        help="each benchmark's real image sizes and formats, photo-like "
                        'content (default: tiny random blocks)')
    parser.add_argument('--benchmarks', nargs='+', choices=list(BENCHMARKS), metavar='NAME',
                        help=f'write only the roots these need (default: all eight: '
                        f'{" ".join(BENCHMARKS)})')
    parser.add_argument('--workers', type=integer(1), default=min(8, os.cpu_count() or 1),
                        help='processes writing --real-sizes images (default: min(8, CPUs))')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    if args.images is not None and args.images < 1:
        parser.error(f'argument --images: must be >= 1, got {args.images}')
    if args.seed < 0:
        parser.error(f'argument --seed: must be >= 0, got {args.seed}')
    args.num_images = None if args.real_counts else (args.images or 3)
    return args


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    check_out_dir('OUT', args.out)
    with user_files(f'OUT {args.out}', (OSError, )):  # e.g. not writable, a file on the path
        benchmarks = fabricate(Path(args.out), args.num_images, args.seed, args.real_sizes,
                               args.benchmarks, args.workers)
    for benchmark, samples in benchmarks.items():
        print(f'{benchmark}: {len(samples)} images')


if __name__ == '__main__':
    sys.exit(run_main(main))
