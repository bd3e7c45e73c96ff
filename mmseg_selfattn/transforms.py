"""Test-pipeline transforms that name the file on bad data instead of failing deep
inside mmcv/cv2 or IoUMetric (issue "Reliability: every bad input gets one clear
error or a correct result")."""
from typing import Optional, Tuple

import mmcv
import numpy as np
from mmcv.transforms import LoadImageFromFile
from mmcv.transforms.processing import _scale_size
from mmengine import fileio
from mmseg.datasets.transforms import LoadAnnotations, Resize
from mmseg.registry import TRANSFORMS


def decode_image_file(path: str, flag: str, backend: str,
                      backend_args: Optional[dict]) -> np.ndarray:
    """The decoded image of ``path``; ``ValueError`` naming the file if it is empty or
    cannot be decoded (where cv2 would assert or return None, pillow raise)."""
    content = fileio.get(path, backend_args=backend_args)  # FileNotFoundError names it
    if not content:
        raise ValueError(f'{path}: not a readable image (0 bytes)')
    undecodable = f'{path}: not a readable image ({len(content)} bytes that {backend} ' \
                  'cannot decode)'
    try:
        image = mmcv.imfrombytes(content, flag=flag, backend=backend)
    except Exception as error:  # pillow raises OSError, SyntaxError, ...
        raise ValueError(undecodable) from error
    if image is None:  # cv2's answer to bytes it cannot decode
        raise ValueError(undecodable)
    return image


@TRANSFORMS.register_module()
class LoadCheckedImageFromFile(LoadImageFromFile):
    """mmcv's ``LoadImageFromFile`` whose errors name the file: a missing, empty or
    undecodable image raises one clear ``FileNotFoundError`` / ``ValueError``."""

    def transform(self, results: dict) -> Optional[dict]:
        path = results['img_path']
        if self.file_client_args is not None:  # deprecated mmcv option: keep its behaviour
            return super().transform(results)
        try:
            image = decode_image_file(path, self.color_type, self.imdecode_backend,
                                      self.backend_args)
        except (OSError, ValueError):
            if self.ignore_empty:
                return None
            raise
        if self.to_float32:
            image = image.astype(np.float32)
        results['img'] = image
        results['img_shape'] = image.shape[:2]
        results['ori_shape'] = image.shape[:2]
        return results


@TRANSFORMS.register_module()
class AtLeastOnePixelResize(Resize):
    """mmseg's ``Resize`` that never produces a side of 0 pixels.

    ``scale=(2048, 336), keep_ratio=True`` scales a 1 x 5000 image by 0.41 to 0 x 2048,
    which cv2 refuses; such an image becomes 1 x 2048 instead (the segmentor handles
    images smaller than its crop). Every other image is resized exactly as ``Resize``.
    """

    def transform(self, results: dict) -> dict:
        height, width = results['img'].shape[:2]
        new_width, new_height = self._target_size(width, height)
        if new_width >= 1 and new_height >= 1:
            return super().transform(results)
        exact = Resize(scale=(max(new_width, 1), max(new_height, 1)), keep_ratio=False,
                       clip_object_border=self.clip_object_border, backend=self.backend,
                       interpolation=self.interpolation)
        results = exact.transform(results)
        results['keep_ratio'] = self.keep_ratio
        return results

    def _target_size(self, width: int, height: int) -> Tuple[int, int]:
        """(w, h) that ``Resize`` would produce, following mmcv's own rounding."""
        scale = self.scale or _scale_size((width, height), self.scale_factor)
        if not self.keep_ratio:
            return scale
        return mmcv.rescale_size((width, height), scale)


@TRANSFORMS.register_module()
class LoadCheckedAnnotations(LoadAnnotations):
    """mmseg's ``LoadAnnotations`` (same ``reduce_zero_label`` and ``label_map``
    encoding) that refuses a label map it would load wrongly, naming the file:

    - empty or undecodable file;
    - not single-channel (e.g. an RGB colour rendering of the labels);
    - values outside 0..255 (mmseg's uint8 cast would wrap 300 to 44 silently);
    - size different from the image's (``results['ori_shape']``, when the image was
      loaded before), which would only fail in IoUMetric after inference.

    Only a trailing channel axis of size 1 is squeezed, so a 1 x W label map stays
    2-D (mmseg's ``squeeze()`` makes it 1-D, which ``PackSegInputs`` cannot pack).
    Without ``seg_map_path`` (``mmseg.apis.inference_model`` drops only the type
    ``LoadAnnotations`` from the pipeline) there is nothing to load: a no-op.
    """

    def transform(self, results: dict) -> dict:
        if 'seg_map_path' not in results:
            return results
        return super().transform(results)

    def _load_seg_map(self, results: dict) -> None:
        path = results['seg_map_path']
        labels = decode_image_file(path, 'unchanged', self.imdecode_backend,
                                   self.backend_args)
        if labels.ndim == 3 and labels.shape[2] == 1:
            labels = labels[..., 0]
        image_shape = results.get('ori_shape')
        if labels.ndim != 2:
            raise ValueError(
                f'{path}: label map of shape {labels.shape} has {labels.shape[2]} channels, '
                'expected one channel of class indices (a palette or grayscale PNG, not '
                'an RGB colour rendering)'
                + (f'; its image is {image_shape[0]} x {image_shape[1]}'
                   if image_shape else ''))
        if image_shape is not None and labels.shape != tuple(image_shape):
            raise ValueError(
                f'{path}: label map is {labels.shape[0]} x {labels.shape[1]} (H x W) but '
                f'its image {results.get("img_path", "")} is {image_shape[0]} x '
                f'{image_shape[1]}: every label map must have the size of its image')
        if labels.dtype != np.uint8 and (labels.min() < 0 or labels.max() > 255):
            value = labels.min() if labels.min() < 0 else labels.max()
            raise ValueError(f'{path}: label value {value} does not fit the 8-bit label maps '
                             'of mmseg (0..255: class indices and 255 for ignore)')
        results['gt_seg_map'] = self._encode(labels.astype(np.uint8), results)
        results['seg_fields'].append('gt_seg_map')

    def _encode(self, labels: np.ndarray, results: dict) -> np.ndarray:
        """reduce_zero_label and label_map exactly as mmseg's ``LoadAnnotations``."""
        if self.reduce_zero_label is None:
            self.reduce_zero_label = results['reduce_zero_label']
        assert self.reduce_zero_label == results['reduce_zero_label'], \
            'Initialize dataset with `reduce_zero_label` as ' \
            f'{results["reduce_zero_label"]} but when load annotation ' \
            f'the `reduce_zero_label` is {self.reduce_zero_label}'
        if self.reduce_zero_label:
            labels[labels == 0] = 255  # 0 -> 255 (ignore), 1..254 -> 0..253, 255 stays
            labels = labels - 1
            labels[labels == 254] = 255
        if results.get('label_map', None) is not None:
            original = labels.copy()  # maps read the original values, not mapped ones
            for old_id, new_id in results['label_map'].items():
                labels[original == old_id] = new_id
        return labels
