"""``tools/test.py --show-dir``: one picture per test image, photo | ground truth |
prediction at the image's original size, painted with the dataset's palette."""
import math
import os.path as osp
from pathlib import Path
from typing import Dict, Iterable, List, Sequence

import numpy as np
from mmengine.hooks import Hook
from mmseg.registry import HOOKS
from PIL import Image, ImageDraw, ImageFont

from .transforms import decode_image_file

IGNORE_COLOUR = (0, 0, 0)  # label 255 and any label that is not a class
WHITE = (255, 255, 255)


def colour_table(palette: Sequence[Sequence[int]]) -> np.ndarray:
    """Label -> RGB: the palette's colours, black for labels beyond it (255 included)."""
    table = np.zeros((max(256, len(palette)), 3), np.uint8)
    table[:len(palette)] = palette
    return table


def labels_present(*label_maps: np.ndarray) -> List[int]:
    """The labels that occur in any of the maps, ascending."""
    return sorted(set().union(*(np.flatnonzero(np.bincount(labels.ravel()))
                                for labels in label_maps)))


def legend_entries(labels: Iterable[int], classes: Sequence[str],
                   palette: Sequence[Sequence[int]]) -> List[tuple]:
    """(colour, name) of every class among ``labels``, then 'ignore' for the others."""
    labels = list(labels)
    entries = [(tuple(palette[label]), classes[label]) for label in labels
               if label < len(classes)]
    if any(label >= len(classes) for label in labels):
        entries.append((IGNORE_COLOUR, 'ignore (255)'))
    return entries


def render_sample(image: np.ndarray, gt: np.ndarray, pred: np.ndarray,
                  classes: Sequence[str], palette: Sequence[Sequence[int]],
                  title: str = '') -> np.ndarray:
    """RGB picture: ``title``, then the photo, the ground truth and the prediction side
    by side at the photo's size (H x W, label maps painted with ``palette``, ignored
    labels black), then a legend of the classes in either label map."""
    height, width = image.shape[:2]
    for name, labels in (('ground truth', gt), ('prediction', pred)):
        if labels.shape != (height, width):
            raise ValueError(f'the {name} is {labels.shape[0]}x{labels.shape[1]} but the '
                             f'image {height}x{width}: show-dir pictures need label maps at '
                             'the original size (annotations loaded after the Resize).')
    font_size = max(12, min(height, width) // 25)
    font = ImageFont.load_default(font_size)
    line, gap = round(1.4 * font_size), max(4, font_size // 2)
    entries = legend_entries(labels_present(gt, pred), classes, palette)
    entry_width = line + 3 * gap + math.ceil(max(font.getlength(name) for _, name in entries))
    panels_width, panels_top = 3 * width + 2 * gap, gap + 2 * line
    columns = max(1, panels_width // entry_width)
    legend_top = panels_top + height + gap
    canvas = Image.new('RGB', (panels_width + 2 * gap, legend_top + gap
                               + math.ceil(len(entries) / columns) * line), WHITE)

    colours = colour_table(palette)
    panels = (('image', image), ('ground truth', colours[gt]), ('prediction', colours[pred]))
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, gap), title, fill='black', font=font)
    for index, (caption, panel) in enumerate(panels):
        left = gap + index * (width + gap)
        draw.text((left, gap + line), caption, fill='black', font=font)
        canvas.paste(Image.fromarray(np.ascontiguousarray(panel)), (left, panels_top))
    for index, (colour, name) in enumerate(entries):
        left = gap + (index % columns) * entry_width
        top = legend_top + (index // columns) * line
        draw.rectangle((left, top + 2, left + line - 4, top + line - 2), fill=colour,
                       outline=(128, 128, 128))
        draw.text((left + line + gap // 2, top), name, fill='black', font=font)
    return np.asarray(canvas)


def picture_names(image_paths: Iterable[str]) -> Dict[str, str]:
    """Image path -> '<stem>.png'; stems seen before get '_2', '_3', ..."""
    names, taken = {}, set()
    for path in image_paths:
        stem = name = Path(path).stem
        index = 2
        while name in taken:
            name, index = f'{stem}_{index}', index + 1
        taken.add(name)
        names[path] = f'{name}.png'
    return names


def random_weights(model_cfg) -> bool:
    """Whether ``model.clip.pretrained`` asks for random CLIP weights."""
    pretrained = model_cfg.get('clip', {}).get('pretrained', 'openai')
    return pretrained is None or str(pretrained).lower() == 'none'


@HOOKS.register_module()
class SideBySideVisualizationHook(Hook):
    """Writes ``out_dir/<image stem>.png`` (see :func:`render_sample`) for every test
    image; every rank writes the images it evaluated."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def before_test(self, runner) -> None:
        dataset = runner.test_loop.dataloader.dataset
        self.classes = dataset.metainfo['classes']
        self.palette = dataset.metainfo['palette']
        self.names = picture_names(dataset.get_data_info(index)['img_path']
                                   for index in range(len(dataset)))
        self.note = '  [random weights]' if random_weights(runner.cfg.get('model', {})) \
            else ''
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)

    def after_test_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        for sample in outputs:
            image = decode_image_file(sample.img_path, 'color', 'cv2', None)[..., ::-1]
            picture = render_sample(
                image, sample.gt_sem_seg.data[0].cpu().numpy(),
                sample.pred_sem_seg.data[0].cpu().numpy(), self.classes, self.palette,
                osp.basename(sample.img_path) + self.note)
            Image.fromarray(picture).save(osp.join(self.out_dir, self.names[sample.img_path]),
                                          compress_level=1)
