"""How images are run (SPEC §2): images of any sizes -> class probabilities, labels and
finiteness flags, through a ``CropPipeline`` (it knows no stage)::

    image_groups()            equally sized images, as many as fit the bounds
    segment_group()           one CUDA graph per group shape with cuda_graph=True
        segment_images()
            window_patch_logits()   crop_batches() -> pipeline.stage_patch_logits()
            WindowMerge             upsample each crop, overlap-average, resize (bands of
                                    rows for huge outputs; the GPU kernel merges rows itself)
            pixel predictions       softmax(logit_scale * logits), max over synonyms
            final_predictions       area_thd (SCLIP's rule), prob_thd -> bg_idx
        multi-scale (test_scales) and PAMR: full-resolution logits, then post-processing
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
        cuda_graph: replay one CUDA graph per group shape (GPU; not with PAMR or timers).
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
        self._graphs = CUDAGraphCache()

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
        if self.pamr is not None:
            return self._segment_with_pamr(images, merge, encoded)
        pipeline = self.pipeline
        key = (pipeline.serial, self.serial, tuple(images.shape), images.dtype,
               str(images.device), merge.output_size)
        if not (self.cuda_graph and images.is_cuda and pipeline.timer is None
                and pipeline.recorder is None):
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

    def _segment_with_pamr(self, images: Tensor, merge: WindowMerge,
                           encoded: Optional[Sequence[EncodedCrops]] = None
                           ) -> Tuple[Tensor, Tensor, Tensor]:
        """Merged query logits refined by PAMR, then post-processing."""
        probs, labels = self.segment_logits(
            self.pamr_refined(images, self.merged_logits(images, merge, encoded)))
        return probs, labels, finite_per_image(probs)

    def pamr_refined(self, images: Tensor, logits: Tensor) -> Tensor:
        """PAMR refines each image's query logits (n, Q, H', W') with its pixels, resized
        to the logits' size."""
        resized = F.interpolate(images, size=logits.shape[-2:], mode='bilinear')
        return torch.cat([self.pamr(image[None], image_logits[None].to(image.dtype))
                          for image, image_logits in zip(resized, logits)])

    def segment_images(self, images: Tensor, merge: WindowMerge,
                       encoded: Optional[Sequence[EncodedCrops]] = None
                       ) -> Tuple[Tensor, Tensor, Tensor]:
        """Class probabilities (n, C, H', W'), labels (n, H', W') and whether each image's
        probabilities are finite (n,) of equally sized images: the unit that
        ``cuda_graph`` captures.

        Outputs bigger than ``max_merge_elements`` query logits are merged and
        post-processed in bands of rows into the returned tensors, so memory grows with
        what is returned, not with the number of queries."""
        patch_logits = self.window_patch_logits(images, merge, encoded)
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
        # the merge zeroes a bad window's logits (they cannot spread): flag them here
        windows_finite = torch.isfinite(patch_logits).flatten(1).all(dim=1)
        finite = windows_finite.view(len(images), -1).all(dim=1) & finite_per_image(probs)
        return probs, labels, finite

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


def _merge_masked(merge: WindowMerge, patch_logits: Tensor) -> Tensor:
    """``merge(patch_logits)`` with NaN where a window with non-finite logits reaches."""
    return merge(patch_logits).masked_fill(merge.non_finite_pixels(patch_logits)[:, None],
                                           float('nan'))
