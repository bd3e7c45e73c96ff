"""What each stage did on one image: the stage maps of a real run, in image coordinates.

``explain(model, image)`` (also ``model.explain(image)``) runs the model's own
``predict`` on the image, through the config's test pipeline, while the segmentor
hands over the tensors its stages compute for every crop (``segmentor.pipeline.recorder``):
nothing is recomputed another way. Per window, on the patch grid (``windows``):

- ``self_attention``   A_ii of the captured last-block attention (head mean)
- ``deficit``          e_i = max(0, τ - A_ii) from stage 3 (when on)
- ``outlier_score``    r_i = A[cls, i] / (A[i, i] + eps) from stage 4 (when on; with
                       ``score_attention='enhanced'`` and stage 3 on, of Ã)
- ``outlier``          1 for the tokens stage 4 chose, else 0; ``outlier_indices``
                       (windows, k) the chosen token indices, -1 = none
- ``cls_similarity_before`` / ``cls_similarity_after``
                       cos(X_i, x_cls) entering stage 5 and leaving stage 6 (the
                       features the classifier sees); equal when both debias stages are off
- ``ctd_clusters``     DBSCAN cluster id of stage 6 (when on), -1 = noise
- ``anomaly_score`` / ``anomaly``
                       SC-CLIP (``attention='scclip'``): the LOF score of every token of
                       the last block's input and 1 for the anomaly set O it replaced
- ``rcs_self_attention``
                       ResCLIP's RCS: the diagonal of A_c, the head mean of the attention
                       of ``rcs_cfg.layers`` that RCS mixes into the last block
- ``sfr_labels``       ResCLIP's SFR: pass 1's label (query index) of every patch, the
                       feedback that builds Ŝ

SC-CLIP has no standard last block: its maps hold no ``self_attention`` nor
``cls_similarity_*`` (there is no A and no x_cls).

The float maps are also merged into image coordinates (``maps``) exactly as the
logits are: bilinear upsampling of every window, overlap averaging and the resize to
the original size (``WindowMerge``); ``outlier`` then reads as the share of the
windows covering a pixel that chose it.
"""
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.dataset import Compose
from torch import Tensor

from .stages.outlier_suppression import outlier_mask_from_indices
from .transforms import decode_image_file

FLOAT_MAPS = ('self_attention', 'deficit', 'outlier_score', 'outlier',
              'cls_similarity_before', 'cls_similarity_after', 'anomaly_score', 'anomaly',
              'rcs_self_attention')
ID_MAPS = ('ctd_clusters', 'sfr_labels')  # ids: per-window mosaics, never averaged
ImageInput = Union[str, Path, np.ndarray]


@dataclass
class StageMaps:
    """Stage maps of one image (see the module docstring for the names).

    Attributes:
        image: (H, W, 3) uint8 RGB, the input at its original size.
        class_names: the model's classes, each a tuple of synonyms.
        probabilities: (C, H, W) class probabilities, as ``predict`` returns them.
        labels: (H, W) long, the predicted classes.
        maps: name -> (H, W) float map, merged across windows like the logits.
        windows: name -> per-window patch-grid tensor (num_windows, h, w), and
            ``outlier_indices`` (num_windows, k).
        window_boxes: (num_windows, 4) float (y1, y2, x1, x2) of every window in the
            original image's pixels.
        settings: enabled stage -> its settings (``model.pipeline.stage_settings``).
        recorded: the stages' tensors as the segmentor handed them over, all windows
            concatenated: ``attention`` (windows, T, T), ``x_cls`` (windows, D) (both
            not with SC-CLIP), ``features_before_debias`` / ``features_after_debias``
            (windows, N, D), and when their stages are on ``deficit``,
            ``outlier_scores`` (windows, N), ``outlier_indices`` (windows, k),
            ``ctd_labels`` (windows, N), ``anomaly_scores`` / ``anomalies`` (windows,
            N), ``rcs_attention`` (windows, T, T), ``sfr_labels`` (windows, N).
        outliers_score_enhanced: whether ``outlier_score`` is of Ã (prevention) or of A.
    """
    image: np.ndarray
    class_names: List[Tuple[str, ...]]
    probabilities: Tensor
    labels: Tensor
    maps: Dict[str, Tensor]
    windows: Dict[str, Tensor]
    window_boxes: Tensor
    settings: Dict[str, dict]
    recorded: Dict[str, Tensor]
    outliers_score_enhanced: bool = False
    _layout: dict = field(default_factory=dict, repr=False)

    def window_mosaic(self, name: str) -> Tensor:
        """(H, W) map of a per-window grid (e.g. ``ctd_clusters``): each pixel takes the
        value of its patch in the window whose centre is nearest (no averaging, so ids
        stay ids). Cluster ids are per window: the same id in two windows is unrelated."""
        grids = self.windows[name]
        rows, cols = (self._nearest_patches(axis) for axis in (0, 1))
        window = rows[0][:, None] * self._layout['window_cols'] + cols[0][None, :]
        return grids[window, rows[1][:, None], cols[1][None, :]]

    def outlier_points(self) -> Tensor:
        """(K, 2) float (x, y): the centres, in original-image pixels, of the patches that
        outlier suppression chose, over all windows (one row per window and outlier)."""
        indices = self.windows['outlier_indices']
        window, rank = (indices >= 0).nonzero(as_tuple=True)
        token = indices[window, rank]
        h, w = self._layout['grid']
        centres = []
        for axis, patch in ((1, token % w), (0, token // w)):  # x first
            start = self._layout['starts'][axis][window]
            size = self._layout['patch_extent'][axis]
            centre = start - self._layout['pad_offset'][axis] + (patch.float() + 0.5) * size
            centres.append(centre * self._layout['scale'][axis])
        return torch.stack(centres, dim=1)

    def _nearest_patches(self, axis: int) -> Tuple[Tensor, Tensor]:
        """For every original pixel row (axis 0) or column (axis 1): the nearest-centred
        window span and the patch index inside that window."""
        layout = self._layout
        spans = torch.tensor(layout['spans'][axis], dtype=torch.float32)  # (windows, 2)
        size = self.image.shape[axis]
        resized = (torch.arange(size) + 0.5) / layout['scale'][axis]  # pixel centres
        span = (resized[:, None] - spans.mean(dim=1)).abs().argmin(dim=1)
        inside = resized - spans[span, 0] + layout['pad_offset'][axis]
        patch = (inside // layout['patch_extent'][axis]).long()
        return span, patch.clamp(0, layout['grid'][axis] - 1)


@torch.no_grad()
def explain(model, image: ImageInput) -> StageMaps:
    """Stage maps of one image: a file path, or an (H, W, 3) uint8 array in BGR order as
    ``mmseg.apis.inference_model`` takes it (``np.asarray(pil_image)[..., ::-1]`` for
    PIL). The model should come from ``mmseg.apis.init_model`` (its ``cfg`` gives the
    test pipeline); without one the image is used at its own size."""
    if isinstance(image, (str, Path)):
        bgr = decode_image_file(str(image), 'color', 'cv2', None)
        data = dict(img_path=str(image))
    elif isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3:
        bgr, data = image, dict(img=image)
    else:
        raise ValueError('explain() takes an image file path or an (H, W, 3) uint8 BGR '
                         f'array, got {type(image).__name__}'
                         f'{getattr(image, "shape", "")}.')
    data = _test_pipeline(model, from_file='img_path' in data)(data)
    batch = model.data_preprocessor(dict(inputs=[data['inputs']],
                                         data_samples=[data['data_samples']]), False)
    records = defaultdict(list)

    def record(**tensors):
        for name, tensor in tensors.items():
            if tensor is not None:
                records[name].append(tensor)

    # the pipeline and the methods' own parts (SC-CLIP's head, ResCLIP's RCS / SFR)
    recorders = [part for part in (model.pipeline, *(getattr(model.pipeline, name, None)
                                                     for name in ('scclip', 'rcs', 'sfr')))
                 if part is not None]
    for part in recorders:
        part.recorder = record
    try:
        sample = model.predict(batch['inputs'], batch['data_samples'])[0]
    finally:
        for part in recorders:
            part.recorder = None
    tensors = {name: torch.cat(parts) for name, parts in records.items()}
    meta = sample.metainfo
    return _stage_maps(model, tensors, sample, np.ascontiguousarray(bgr[..., ::-1]),
                       tuple(meta['img_shape'][:2]), tuple(meta['ori_shape'][:2]))


def _test_pipeline(model, from_file: bool) -> Compose:
    cfg = getattr(model, 'cfg', None)
    steps = [dict(step) for step in cfg.test_pipeline] if cfg is not None else [
        dict(type='LoadImageFromFile'), dict(type='PackSegInputs')]
    steps = [step for step in steps if 'Annotations' not in step['type']]
    if not from_file:
        steps[0] = dict(type='LoadImageFromNDArray')
    return Compose(steps)


def _stage_maps(model, tensors: Dict[str, Tensor], sample, image: np.ndarray,
                size: Tuple[int, int], output_size: Tuple[int, int]) -> StageMaps:
    merge = model.engine.window_merge(size, output_size, sample.seg_logits.data.device)
    grid = merge.grid
    windows = {}
    if 'attention' in tensors:  # not with SC-CLIP
        windows['self_attention'] = tensors['attention'].diagonal(dim1=-2, dim2=-1)[:, 1:]
    if 'deficit' in tensors:
        windows['deficit'] = tensors['deficit']
    if 'outlier_scores' in tensors:
        windows['outlier_score'] = tensors['outlier_scores']
        indices = tensors['outlier_indices']
        windows['outlier'] = outlier_mask_from_indices(indices, grid[0] * grid[1]).float()
    if 'x_cls' in tensors:  # not with SC-CLIP
        x_cls = F.normalize(tensors['x_cls'], dim=-1)[:, None]
        for when in ('before', 'after'):
            features = F.normalize(tensors[f'features_{when}_debias'], dim=-1)
            windows[f'cls_similarity_{when}'] = (features * x_cls).sum(dim=-1)
    if 'ctd_labels' in tensors:
        windows['ctd_clusters'] = tensors['ctd_labels']
    if 'anomaly_scores' in tensors:
        windows['anomaly_score'] = tensors['anomaly_scores']
        windows['anomaly'] = tensors['anomalies']
    if 'rcs_attention' in tensors:
        windows['rcs_self_attention'] = tensors['rcs_attention'].diagonal(
            dim1=-2, dim2=-1)[:, 1:]
    if 'sfr_labels' in tensors:
        windows['sfr_labels'] = tensors['sfr_labels']
    windows = {name: value.unflatten(1, grid) if name in ID_MAPS
               else value.float().unflatten(1, grid) for name, value in windows.items()}
    float_names = [name for name in FLOAT_MAPS if name in windows]
    merged = merge(torch.stack([windows[name] for name in float_names], dim=1))[0]
    maps = dict(zip(float_names, merged))
    if 'outlier_scores' in tensors:
        windows['outlier_indices'] = indices

    scale = (output_size[0] / size[0], output_size[1] / size[1])
    boxes = torch.tensor(merge.windows, dtype=torch.float32)
    boxes = boxes * torch.tensor([scale[0], scale[0], scale[1], scale[1]])
    layout = dict(grid=grid, patch_extent=merge.patch_extent, pad_offset=merge.pad_offset,
                  scale=scale, spans=(merge.row_spans, merge.col_spans),
                  window_cols=len(merge.col_spans),
                  starts=(torch.tensor([y1 for y1, _, _, _ in merge.windows]).float(),
                          torch.tensor([x1 for _, _, x1, _ in merge.windows]).float()))
    cpu = lambda values: {name: value.cpu() for name, value in values.items()}  # noqa: E731
    return StageMaps(image=image, class_names=list(model.class_names),
                     probabilities=sample.seg_logits.data.cpu(),
                     labels=sample.pred_sem_seg.data[0].cpu(), maps=cpu(maps),
                     windows=cpu(windows), window_boxes=boxes,
                     settings=dict(model.pipeline.stage_settings), recorded=cpu(tensors),
                     outliers_score_enhanced=model.pipeline.outliers_score_enhanced,
                     _layout=layout)
