"""Write tiny random datasets in the exact on-disk layouts of the eight benchmarks.

    python tools/fabricate_benchmarks.py OUT [--images 3] [--seed 0]

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
the data wiring is checked, not only the happy path. Images are random colour blocks
of varying sizes: the evaluation wiring runs, the mIoU means nothing.

A mistake in the arguments (OUT naming a file, ``--images`` below 1, a negative
``--seed``, a folder that cannot be written) is one line on stderr, exit status 2.
"""
import argparse
import os.path as osp
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from mmseg_selfattn.cli import check_out_dir, run_main, user_files  # noqa: E402


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


def _sizes(rng: np.random.Generator, count: int, aspect: float = 1.3) -> List[Tuple[int, int]]:
    heights = rng.integers(40, 97, count)
    return [(int(h), int(h * aspect * rng.uniform(0.8, 1.2))) for h in heights]


def _save_jpg(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=95)


def _save_png(path: Path, labels: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(labels, mode='L')
    if palette:
        image = image.convert('P')
        image.putpalette(VOC_PALETTE.flatten().tolist())
    image.save(path)


def _voc_like(root: Path, rng, count: int, seg_dir: str, split_dir: str, values: int,
              palette: bool, void: bool) -> List[Sample]:
    samples, names = [], []
    for index, (h, w) in enumerate(_sizes(rng, count)):
        name = f'2008_{index:06d}'
        image, label = root / 'JPEGImages' / f'{name}.jpg', root / seg_dir / f'{name}.png'
        _save_jpg(image, _random_image(rng, h, w))
        _save_png(label, _random_labels(rng, h, w, values, void), palette)
        samples.append((image, label))
        names.append(name)
    _save_jpg(root / 'JPEGImages' / '2007_999999.jpg', _random_image(rng, 40, 50))  # not in val
    (root / split_dir).mkdir(parents=True, exist_ok=True)
    (root / split_dir / 'val.txt').write_text(''.join(f'{n}\n' for n in names))
    (root / split_dir / 'train.txt').write_text('2007_999999\n')
    return samples


def fabricate_voc2012(root: Path, rng, count: int) -> List[Sample]:
    return _voc_like(root, rng, count, 'SegmentationClass', 'ImageSets/Segmentation', 21,
                     palette=True, void=True)


def fabricate_voc2010_context(root: Path, rng, count: int) -> List[Sample]:
    return _voc_like(root, rng, count, 'SegmentationClassContext',
                     'ImageSets/SegmentationContext', 60, palette=False, void=False)


def fabricate_coco_stuff164k(root: Path, rng, count: int) -> Dict[str, List[Sample]]:
    stuff, objects = [], []
    for index, (h, w) in enumerate(_sizes(rng, count)):
        name = f'{139 + index:012d}'
        image = root / 'images' / 'val2017' / f'{name}.jpg'
        _save_jpg(image, _random_image(rng, h, w))
        labels = root / 'annotations' / 'val2017'
        _save_png(labels / f'{name}.png', _random_labels(rng, h, w, 182, True))  # raw ids
        _save_png(labels / f'{name}_labelTrainIds.png', _random_labels(rng, h, w, 171, True))
        _save_png(labels / f'{name}_instanceTrainIds.png', _random_labels(rng, h, w, 81, False))
        stuff.append((image, labels / f'{name}_labelTrainIds.png'))
        objects.append((image, labels / f'{name}_instanceTrainIds.png'))
    return dict(coco_stuff164k=stuff, coco_object=objects)


def fabricate_cityscapes(root: Path, rng, count: int) -> List[Sample]:
    samples = []
    for index, (h, w) in enumerate(_sizes(rng, count, aspect=2.0)):
        city = ('frankfurt', 'lindau', 'munster')[index % 3]
        stem = f'{city}_{index:06d}_000019'
        image = root / 'leftImg8bit' / 'val' / city / f'{stem}_leftImg8bit.png'
        label = root / 'gtFine' / 'val' / city / f'{stem}_gtFine_labelTrainIds.png'
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_random_image(rng, h, w)).save(image)
        _save_png(label, _random_labels(rng, h, w, 19, True))
        _save_png(label.with_name(f'{stem}_gtFine_labelIds.png'),
                  _random_labels(rng, h, w, 34, False))  # raw ids, beside the train ids
        samples.append((image, label))
    return samples


def fabricate_ade20k(root: Path, rng, count: int) -> List[Sample]:
    samples = []
    for index, (h, w) in enumerate(_sizes(rng, count)):
        name = f'ADE_val_{index + 1:08d}'
        image = root / 'images' / 'validation' / f'{name}.jpg'
        label = root / 'annotations' / 'validation' / f'{name}.png'
        _save_jpg(image, _random_image(rng, h, w))
        _save_png(label, _random_labels(rng, h, w, 151, False))
        samples.append((image, label))
    return samples


def fabricate(out: Path, num_images: int = 3, seed: int = 0) -> Dict[str, List[Sample]]:
    """Writes all five roots below ``out``; returns the (image, label map) files of each
    benchmark, in split order."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    voc = fabricate_voc2012(out / 'VOCdevkit' / 'VOC2012', rng, num_images)
    context = fabricate_voc2010_context(out / 'VOCdevkit' / 'VOC2010', rng, num_images)
    coco = fabricate_coco_stuff164k(out / 'coco_stuff164k', rng, num_images)
    return dict(voc21=voc, context60=context, coco_object=coco['coco_object'], voc20=voc,
                context59=context, coco_stuff164k=coco['coco_stuff164k'],
                cityscapes=fabricate_cityscapes(out / 'cityscapes', rng, num_images),
                ade20k=fabricate_ade20k(out / 'ade' / 'ADEChallengeData2016', rng,
                                        num_images))


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('out', help='folder to write the five dataset roots into')
    parser.add_argument('--images', type=int, default=3, help='images per split')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error(f'argument --images: must be >= 1, got {args.images}')
    if args.seed < 0:
        parser.error(f'argument --seed: must be >= 0, got {args.seed}')
    check_out_dir('OUT', args.out)
    with user_files(f'OUT {args.out}', (OSError, )):  # e.g. not writable, a file on the path
        benchmarks = fabricate(Path(args.out), args.images, args.seed)
    for benchmark, samples in benchmarks.items():
        print(f'{benchmark}: {len(samples)} images')


if __name__ == '__main__':
    sys.exit(run_main(main))
