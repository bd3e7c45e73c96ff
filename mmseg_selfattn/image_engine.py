"""How images are run (SPEC §2): images of any sizes -> class probabilities, labels and
finiteness flags, through a ``CropPipeline`` (it knows no stage)::

    segment_groups()          a batch: with cuda_graph, the crops of all its groups by crop
                              shape through CUDA graphs of the pipeline, then each group's
                              merge and post-processing (graphed once its shape repeats)
    image_groups()            equally sized images, as many as fit the bounds
    segment_group()           one group; one CUDA graph per group shape with cuda_graph=True
        segment_images()
            window_patch_logits()   crop_batches() -> pipeline.stage_patch_logits()
            predictions_from_patch_logits()
            WindowMerge             upsample each crop, overlap-average, resize (bands of
                                    rows for huge outputs; the GPU kernel merges rows itself)
            PAMR (pamr_steps > 0)   on the merged full-resolution logits, batched
            pixel predictions       softmax(logit_scale * logits), max over synonyms
            final_predictions       area_thd (SCLIP's rule), prob_thd -> bg_idx
        multi-scale (test_scales): full-resolution logits averaged, then as above
"""
import itertools
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import postprocess_kernels
from .config_checks import check_bg_idx, check_int, check_number, check_scales
from .crop_pipeline import CropPipeline
from .cuda_graphs import CUDAGraphCache, flatten_encoded
from .encoder import EncodedCrops
from .pamr import PAMR, build_pamr
from .postprocess import (SynonymMax, final_predictions, finite_per_image,
                          merged_pixel_predictions, segment)
from .sliding_window import WindowMerge, check_window

# post-processing keys: with the pipeline's, what ``with_settings`` variants vary
POSTPROCESS_KEYS = ('logit_scale', 'prob_thd', 'area_thd', 'bg_idx', 'pamr_steps',
                    'pamr_stride', 'pamr_dilations')
_SERIALS = itertools.count()


class ImageEngine:
    """Runs a ``CropPipeline`` on whole images and post-processes its logits.

    Args:
        pipeline: crops -> patch-grid query logits.
        slide_crop / slide_stride: the sliding window in pixels (0: whole image).
        max_crops_per_forward: crops (of all images of a batch) per pipeline call.
        max_merge_elements: bound of the query logits merged at once (see the segmentor).
        test_scales: multi-scale inference, (1.0, ) = off.
        cuda_graph: replay CUDA graphs (GPU; not with stage timers): of the pipeline per
            crop-batch shape, of the merge and post-processing (PAMR included) per group
            shape, each captured once its shape has been seen twice.
        logit_scale / prob_thd / area_thd / bg_idx / pamr_*: post-processing, checked by
            ``check_postprocess``.
    """

    def __init__(self, pipeline: CropPipeline, slide_crop: int = 224, slide_stride: int = 112,
                 max_crops_per_forward: int = 64,
                 max_merge_elements: Union[int, str, None] = 'auto',
                 test_scales: Sequence[float] = (1.0, ), cuda_graph: bool = False,
                 **postprocess):
        self.pipeline = pipeline
        self.synonym_max = SynonymMax(pipeline.query_class.tolist())
        self.slide_crop, self.slide_stride = check_window(slide_crop, slide_stride)
        self.max_crops_per_forward = check_int('max_crops_per_forward', max_crops_per_forward, 1)
        if not (max_merge_elements in (None, 'auto') or (
                isinstance(max_merge_elements, int) and not isinstance(max_merge_elements, bool)
                and max_merge_elements >= 1)):
            raise ValueError("max_merge_elements must be an int >= 1, 'auto' or None, got "
                             f'{max_merge_elements!r}.')
        self.max_merge_elements = max_merge_elements
        self.test_scales = check_scales(test_scales)
        if not isinstance(cuda_graph, bool):
            raise ValueError(f'cuda_graph must be True or False, got {cuda_graph!r}.')
        self.cuda_graph = cuda_graph
        self._set_postprocess(**postprocess)
        self._window_merges: Dict[tuple, WindowMerge] = {}
        self._graphs = CUDAGraphCache(max_graphs=64)  # groups: whole, or merge + post
        self._crop_graphs = CUDAGraphCache(max_graphs=64)  # the pipeline per crop shape

    def _set_postprocess(self, logit_scale: float = 40.0, prob_thd: float = 0.0,
                         area_thd: float = 0.0, bg_idx: Optional[int] = 0,
                         pamr: Optional[PAMR] = None) -> None:
        self.logit_scale, self.prob_thd, self.area_thd = logit_scale, prob_thd, area_thd
        self.bg_idx, self.pamr = bg_idx, pamr
        self.serial = next(_SERIALS)  # identifies these settings' CUDA graphs

    def with_settings(self, pipeline: CropPipeline, **postprocess) -> 'ImageEngine':
        """An engine running ``pipeline`` with the windows, bounds and graph cache of this
        one (graph keys carry both serials) and ``postprocess`` (``check_postprocess``)."""
        variant = object.__new__(ImageEngine)
        variant.__dict__.update(self.__dict__)
        variant.pipeline = pipeline
        variant._set_postprocess(**postprocess)
        return variant

    # -- images -> logits ------------------------------------------------------------------
    def slide_inference(self, image: Tensor, output_size: Optional[Tuple[int, int]] = None
                        ) -> Tensor:
        """Query logits (Q, H, W) of one normalised image (3, H, W)."""
        return self.batch_slide_inference([image], None if output_size is None else
                                          [output_size])[0]

    def batch_slide_inference(self, images: Sequence[Tensor],
                              output_sizes: Optional[Sequence[Tuple[int, int]]] = None
                              ) -> List[Tensor]:
        """Query logits (Q, H', W') of normalised images (3, H, W) of any sizes, at
        ``output_sizes`` (default: each image's own size)."""
        outputs: List[Optional[Tensor]] = [None] * len(images)
        for indices, batch, merge in self.image_groups(images, output_sizes):
            for index, logits in zip(indices, self.merged_logits(batch, merge)):
                outputs[index] = logits
        return outputs

    def merged_logits(self, images: Tensor, merge: WindowMerge,
                      encoded: Optional[Sequence[EncodedCrops]] = None) -> Tensor:
        """Query logits (n, Q, H', W') of equally sized images (n, 3, H, W).

        Bilinear upsampling of every crop, overlap averaging and the resize to the output
        size are linear and separable, so they run as two matrix products straight from
        the patch-grid logits (``WindowMerge``). Pixels reached by a window with
        non-finite logits are NaN; the other windows' pixels are unaffected.
        """
        return _merge_masked(merge, self.window_patch_logits(images, merge, encoded))

    def window_patch_logits(self, images: Tensor, merge: WindowMerge,
                            encoded: Optional[Sequence[EncodedCrops]] = None) -> Tensor:
        """Patch-grid query logits (n * windows, Q, h, w) of all windows of equally sized
        images, image-major, at most ``max_crops_per_forward`` crops per pipeline call; or
        from ``encoded``, the ``encode_crops`` outputs of ``crop_batches(images, merge)``."""
        if encoded is None:
            encoded = (self.pipeline.encode_crops(crops)
                       for crops in self.crop_batches(images, merge))
            # RF-CLIP's global_image='whole': each image's embedding, once per image
            encoded = self.pipeline.attach_image_embeddings(encoded, images, merge.num_windows,
                                                            whole=bool(self.slide_crop))
        logits = [self.pipeline.stage_patch_logits(crops) for crops in encoded]
        return logits[0] if len(logits) == 1 else torch.cat(logits)

    def crop_batches(self, images: Tensor, merge: WindowMerge):
        """Yields the windows of equally sized images as batches of crops, at most
        ``max_crops_per_forward`` each, image-major. Crops are cut chunk by chunk: a
        huge image never holds all its crops at once."""
        chunk = self.max_crops_per_forward
        if merge.num_windows <= chunk:  # whole images per call
            per_call = chunk // merge.num_windows
            for i in range(0, len(images), per_call):
                yield merge.cut(images[i:i + per_call])
        else:  # an image with more windows than one call takes: its windows in chunks
            for image in images:
                for j in range(0, merge.num_windows, chunk):
                    yield merge.cut(image[None], slice(j, j + chunk))

    def image_groups(self, images: Sequence[Tensor],
                     output_sizes: Optional[Sequence[Tuple[int, int]]] = None):
        """Yields (indices, stacked images (n, 3, H, W), WindowMerge): images of one size
        and output size, as many per group as fit in ``max_crops_per_forward`` crops and
        ``max_merge_elements`` merged logits."""
        output_sizes = output_sizes or [tuple(image.shape[-2:]) for image in images]
        groups = defaultdict(list)  # (image size, output size) -> image indices
        for index, (image, output_size) in enumerate(zip(images, output_sizes)):
            groups[(tuple(image.shape[-2:]), tuple(output_size))].append(index)
        for (size, output_size), indices in groups.items():
            merge = self.window_merge(size, output_size, images[indices[0]].device)
            images_per_forward = self.max_crops_per_forward // merge.num_windows
            bound = self.merge_bound(images[indices[0]].device)
            if bound is not None:  # merged logits of the group, bounded
                logits_per_image = (self.synonym_max.num_queries * output_size[1]
                                    * self._merged_rows(merge, images[indices[0]]))
                images_per_forward = min(images_per_forward, bound // logits_per_image)
            images_per_forward = max(1, images_per_forward)
            for start in range(0, len(indices), images_per_forward):
                group = indices[start:start + images_per_forward]
                stacked = images[group[0]][None] if len(group) == 1 else torch.stack(
                    [images[i] for i in group])  # one huge image is not copied
                yield group, stacked, merge

    def window_merge(self, size: Tuple[int, int], output_size: Tuple[int, int],
                     device: torch.device) -> WindowMerge:
        """The (cached) ``WindowMerge`` of images of ``size`` merged to ``output_size``."""
        key = (size, output_size, str(device))
        if key not in self._window_merges:
            self._window_merges[key] = WindowMerge(size, output_size, self.slide_crop,
                                                   self.slide_stride,
                                                   self.pipeline.encoder.patch_size, device)
        return self._window_merges[key]

    # -- images -> probabilities and labels --------------------------------------------------
    def segment_group(self, images: Tensor, merge: WindowMerge,
                      encoded: Optional[Sequence[EncodedCrops]] = None
                      ) -> Tuple[Tensor, Tensor, Tensor]:
        """Class probabilities (n, C, H', W'), labels (n, H', W') and whether each image's
        probabilities are finite (n,), of equally sized images (n, 3, H, W); from their
        ``encode_crops`` outputs when ``encoded`` is given (tools/sweep.py)."""
        if self.test_scales != (1.0, ) and encoded is None:
            return self._segment_multiscale(images, merge.output_size)
        pipeline = self.pipeline
        key = (pipeline.serial, self.serial, tuple(images.shape), images.dtype,
               str(images.device), merge.output_size)
        if not self._graphs_apply(images):
            return self.segment_images(images, merge, encoded)
        if encoded is None:
            if self._graphs.accepts(key):
                return self._graphs(key, self.segment_images, (images, ), merge)
            return self.segment_images(images, merge)
        # the dense block runs before the graph, memoised: variants with equal dense
        # settings share it, and the graph's inputs are only what the stages read
        self_attn = pipeline.self_attn_enhancement
        for crops in encoded:
            pipeline.dense_block(crops, *((None, None) if self_attn is None
                                          else pipeline.enhancement_inputs(crops)))
        tensors, rebuild = flatten_encoded(encoded, pipeline.dense_key,
                                            pipeline.plain_dense_key)
        key += tuple(tuple(tensor.shape) for tensor in tensors)
        if not self._graphs.accepts(key):
            return self.segment_images(images, merge, encoded)
        return self._graphs(key, lambda batch, *flat: self.segment_images(
            batch, merge, rebuild(flat)), (images, *tensors))

    def _segment_multiscale(self, images: Tensor, output_size: Tuple[int, int]
                            ) -> Tuple[Tensor, Tensor, Tensor]:
        """``test_scales``: query logits of the images resized by every scale, merged to
        ``output_size`` and averaged, then PAMR and post-processing."""
        height, width = images.shape[-2:]
        scaled, merges = [], []
        for scale in self.test_scales:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            scaled.append(images if size == (height, width) else
                          F.interpolate(images, size=size, mode='bilinear', align_corners=False))
            merges.append(self.window_merge(size, output_size, images.device))
        crop_shapes = {merge.cut_size for merge in merges}
        windows = sum(merge.num_windows for merge in merges)
        if len(crop_shapes) == 1 and windows * len(images) <= self.max_crops_per_forward:
            # crops of every scale in one pipeline call, split back by scale
            crops = torch.cat([merge.cut(batch) for merge, batch in zip(merges, scaled)])
            patch_logits = self.pipeline.crop_patch_logits(crops).split(
                [merge.num_windows * len(images) for merge in merges])
            logits = sum(_merge_masked(merge, part) for merge, part in zip(merges, patch_logits))
        else:  # per scale, chunked as usual (huge images, mixed crop shapes)
            logits = sum(self.merged_logits(batch, merge) for merge, batch in zip(merges,
                                                                                  scaled))
        logits = logits / len(self.test_scales)
        if self.pamr is not None:
            logits = self.pamr_refined(images, logits)
        probs, labels = self.segment_logits(logits)
        return probs, labels, finite_per_image(probs)

    def pamr_refined(self, images: Tensor, logits: Tensor) -> Tensor:
        """PAMR refines the query logits (n, Q, H', W') of equally sized images with their
        pixels, resized to the logits' size; all images at once (PAMR is per image)."""
        resized = F.interpolate(images, size=logits.shape[-2:], mode='bilinear')
        return self.pamr(resized, logits.to(resized.dtype))

    # -- batches through CUDA graphs ---------------------------------------------------------
    def segment_groups(self, images: Sequence[Tensor],
                       output_sizes: Optional[Sequence[Tuple[int, int]]] = None):
        """Yields (indices, (probs, labels, finite)) of ``image_groups``, as
        ``segment_group`` gives them.

        With ``cuda_graph`` on a GPU, the crops of every group of the batch that fits one
        pipeline call go through the pipeline together, by crop shape (windows of any
        image size share one; whole images share their patch grid's), in chunks of
        ``max_crops_per_forward`` and a power-of-two split of the rest, so that few
        shapes recur and each replays its graph. Each group's merge and post-processing
        (PAMR included) then replays a graph per group shape. The pipeline is per crop,
        so this is the computation of ``segment_group``."""
        groups = list(self.image_groups(images, output_sizes))
        if not (groups and self._graphs_apply(groups[0][1]) and self.test_scales == (1.0, )):
            for indices, batch, merge in groups:
                yield indices, self.segment_group(batch, merge)
            return
        pooled = [len(batch) * merge.num_windows <= self.max_crops_per_forward
                  for _, batch, merge in groups]
        patch_logits = self._pooled_patch_logits(
            [(batch, merge) for (_, batch, merge), ok in zip(groups, pooled) if ok])
        for (indices, batch, merge), ok in zip(groups, pooled):
            if not ok:  # an image with more windows than one call: chunked as usual
                yield indices, self.segment_group(batch, merge)
                continue
            logits = patch_logits.pop(0)
            key = ('group', self.pipeline.serial, self.serial, tuple(batch.shape),
                   batch.dtype, str(batch.device), merge.output_size)
            if self._graphs.repeats(key):
                yield indices, self._graphs(key, self.predictions_from_patch_logits,
                                            (batch, logits), merge)
            else:
                yield indices, self.predictions_from_patch_logits(batch, logits, merge)

    def _pooled_patch_logits(self, groups: Sequence[Tuple[Tensor, WindowMerge]]
                             ) -> List[Tensor]:
        """Patch logits of each group's windows (as ``window_patch_logits``), from pipeline
        calls on the crops of all groups pooled by crop shape."""
        by_shape = defaultdict(list)  # crop shape -> [(group, its crops)]
        for index, (batch, merge) in enumerate(groups):
            by_shape[merge.cut_size].append((index, merge.cut(batch)))
        per_group: List[Optional[Tensor]] = [None] * len(groups)  # one crop shape each
        for parts in by_shape.values():
            crops = parts[0][1] if len(parts) == 1 else torch.cat([c for _, c in parts])
            logits = torch.cat([self._graphed_crop_logits(crops[chunk])
                                for chunk in _chunks(len(crops), self.max_crops_per_forward)])
            for (index, part), part_logits in zip(parts, logits.split([len(c) for _, c in parts])):
                per_group[index] = part_logits
        return per_group

    def _graphed_crop_logits(self, crops: Tensor) -> Tensor:
        pipeline = self.pipeline
        key = ('crops', pipeline.serial, tuple(crops.shape), crops.dtype, str(crops.device))
        if not self._crop_graphs.repeats(key):
            return pipeline.crop_patch_logits(crops)
        return self._crop_graphs(key, lambda batch: (pipeline.crop_patch_logits(batch), ),
                                 (crops, ))[0]

    def _graphs_apply(self, images: Tensor) -> bool:
        pipeline = self.pipeline
        return (self.cuda_graph and images.is_cuda and pipeline.timer is None
                and pipeline.recorder is None and pipeline.stage_check is None)

    def segment_images(self, images: Tensor, merge: WindowMerge,
                       encoded: Optional[Sequence[EncodedCrops]] = None
                       ) -> Tuple[Tensor, Tensor, Tensor]:
        """Class probabilities (n, C, H', W'), labels (n, H', W') and whether each image's
        probabilities are finite (n,) of equally sized images: the unit that
        ``segment_group`` captures."""
        return self.predictions_from_patch_logits(
            images, self.window_patch_logits(images, merge, encoded), merge)

    def predictions_from_patch_logits(self, images: Tensor, patch_logits: Tensor,
                                      merge: WindowMerge) -> Tuple[Tensor, Tensor, Tensor]:
        """``segment_images`` from the windows' patch logits: merge, PAMR, post-processing.

        Without PAMR, outputs bigger than ``max_merge_elements`` query logits are merged
        and post-processed in bands of rows into the returned tensors, so memory grows
        with what is returned, not with the number of queries."""
        # the merge zeroes a bad window's logits (they cannot spread): flag them here
        windows_finite = torch.isfinite(patch_logits).flatten(1).all(dim=1).view(
            len(images), -1).all(dim=1)
        if self.pamr is not None:
            probs, labels = self.segment_logits(
                self.pamr_refined(images, _merge_masked(merge, patch_logits)))
            return probs, labels, windows_finite & finite_per_image(probs)
        queries, (height, width) = patch_logits.shape[1], merge.output_size
        logits_per_row = -(-len(images) * queries * width * self._merged_rows(merge, images)
                           // height)
        bands = self.row_bands(logits_per_row, height, images.device)
        if len(bands) == 1:
            probs, labels, confidence = self._pixel_predictions(patch_logits, merge,
                                                                slice(None))
        else:
            probs = patch_logits.new_empty((len(images), self.synonym_max.num_classes, height,
                                            width), dtype=torch.float32)
            labels = probs.new_empty((len(images), height, width), dtype=torch.long)
            confidence = probs.new_empty(labels.shape) if self.prob_thd else None
            for rows in bands:
                band_probs, band_labels, band_confidence = self._pixel_predictions(
                    patch_logits, merge, rows)
                probs[:, :, rows], labels[:, rows] = band_probs, band_labels
                if confidence is not None:
                    confidence[:, rows] = band_confidence
        probs, labels = final_predictions(probs, labels, confidence, self.prob_thd,
                                          self.area_thd, self.bg_idx)
        return probs, labels, windows_finite & finite_per_image(probs)

    def segment_logits(self, query_logits: Tensor) -> Tuple[Tensor, Tensor]:
        """Query logits (n, Q, H, W) -> class probabilities (n, C, H, W): softmax over all
        queries of logit_scale * logits, max over each class's synonyms, renormalised;
        and labels (n, H, W): argmax, then SCLIP's small-class rule (area_thd) and unsure
        pixels (prob_thd) -> bg_idx (``postprocess.final_predictions``)."""
        return segment(query_logits, self.synonym_max, self.logit_scale, self.prob_thd,
                       self.area_thd, self.bg_idx)

    def _pixel_predictions(self, patch_logits: Tensor, merge: WindowMerge, rows: slice):
        return merged_pixel_predictions(patch_logits, merge, rows, self.synonym_max,
                                        self.logit_scale, self.prob_thd)

    # -- memory bounds -------------------------------------------------------------------------
    def _merged_rows(self, merge: WindowMerge, images: Tensor) -> int:
        """Rows of query logits per image held at once: the column-merged mosaic's where
        the GPU kernel merges the rows itself, else the output's (PAMR and multi-scale
        refine or average full-resolution logits)."""
        fused = (postprocess_kernels.supports(images) and self.pamr is None
                 and self.test_scales == (1.0, ))
        return merge.mosaic_rows if fused else merge.output_size[0]

    def merge_bound(self, device: torch.device) -> Optional[int]:
        """``max_merge_elements`` on ``device`` ('auto': 2**27 on GPU, 2**25 on CPU)."""
        if self.max_merge_elements == 'auto':
            return 2**27 if device.type == 'cuda' else 2**25
        return self.max_merge_elements

    def row_bands(self, elements_per_row: int, height: int,
                  device: torch.device = torch.device('cpu')) -> List[slice]:
        """Output rows merged at once: all, or bands of at most ``max_merge_elements``."""
        bound = self.merge_bound(device)
        if bound is None:
            return [slice(None)]
        rows = max(1, bound // max(1, elements_per_row))
        if rows >= height:
            return [slice(None)]
        return [slice(start, min(start + rows, height)) for start in range(0, height, rows)]


def check_postprocess(num_classes: int, logit_scale=40.0, prob_thd=0.0, area_thd=0.0,
                      bg_idx=0, pamr_steps=0, pamr_stride=(8, 16),
                      pamr_dilations=None) -> dict:
    """The post-processing keys, validated, as ``ImageEngine(**postprocess)`` takes them
    (PAMR built)."""
    return dict(logit_scale=check_number('logit_scale', logit_scale, 0, low_open=True),
                prob_thd=check_number('prob_thd', prob_thd, 0, 1),
                area_thd=check_number('area_thd', area_thd, 0, 1),
                bg_idx=check_bg_idx(bg_idx, num_classes, prob_thd or area_thd),
                pamr=build_pamr(pamr_steps, pamr_stride, pamr_dilations))


def _chunks(total: int, size: int) -> List[slice]:
    """[0, total) in slices of ``size``, the rest in descending powers of two: the shapes
    of pipeline calls, few and recurring."""
    full = total - total % size
    slices = [slice(start, start + size) for start in range(0, full, size)]
    start = full
    for bit in reversed(range((total - full).bit_length())):
        if (total - full) >> bit & 1:
            slices.append(slice(start, start + (1 << bit)))
            start += 1 << bit
    return slices


def _merge_masked(merge: WindowMerge, patch_logits: Tensor) -> Tensor:
    """``merge(patch_logits)`` with NaN where a window with non-finite logits reaches."""
    return merge(patch_logits).masked_fill(merge.non_finite_pixels(patch_logits)[:, None],
                                           float('nan'))
