"""The registered segmentor: reads the config, builds the crop pipeline and the image
engine, and offers mmseg's ``BaseSegmentor`` surface."""
import copy
from collections import OrderedDict
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from mmengine.structures import PixelData
from mmseg.models.segmentors.base import BaseSegmentor
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from torch import Tensor

from .clip_loader import load_clip
from .config_checks import check_choice, check_number
from .crop_pipeline import PIPELINE_KEYS as CROP_PIPELINE_KEYS
from .crop_pipeline import CropPipeline
from .explain import ImageInput, StageMaps, explain
from .image_engine import POSTPROCESS_KEYS, ImageEngine, check_postprocess
from .machine import AUTO, resolve_precision
from .non_finite import PendingFiniteCheck, raise_if_not_finite
from .sliding_window import pad_to_patch_multiple
from .stages import PIPELINE_STAGES
from .startup_log import log_model_settings
from .text_classifier import TextClassifier, read_classes

VIT_DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}
# keys that act after blocks 1..L-1 (last block, stages, classifier, post-processing):
# ``with_pipeline`` varies them on a shared encoder (tools/sweep.py)
PIPELINE_KEYS = (*CROP_PIPELINE_KEYS, *POSTPROCESS_KEYS)


@MODELS.register_module()
class SelfAttnCLIPSegmentor(BaseSegmentor):
    """Training-free open-vocabulary segmentor on a frozen CLIP ViT.

    Call graph (SPEC §1-2) across the files::

        predict()                                       segmentor.py
            engine.segment_groups(): groups of images of one size   image_engine.py
                (cuda_graph=True: the crops of all groups by crop shape through CUDA
                graphs of the pipeline, then a graph per group shape for the rest)
                engine.window_patch_logits(): max_crops_per_forward crops per call
                    pipeline.crop_patch_logits()       crop_pipeline.py
                        1 encoder.encode()             encoder.py: A, q/k/v, x_cls
                        2 similarity enhancement       stages/: logits bias
                          encoder.dense_features()     last block, `attention` variant
                          (ResCLIP: RCS in P; SFR's pass 1 -> Ŝ -> pass 2; resclip.py)
                        3 self-attention enhancement   boosts tokens with a low A_ii
                        4 outlier suppression          replaces high A[cls,i]/A[i,i]
                        5 global debias                removes x_cls from X
                        6 CTD                          cluster-wise x_cls removal
                        7 classify                     cos(X, text queries), patch grid
                WindowMerge                            sliding_window.py: overlap average
                PAMR (pamr_steps > 0)                  pamr.py
                softmax, synonym max, area_thd, prob_thd  postprocess.py
            raise_if_not_finite(): the first stage with NaN / inf  non_finite.py

    Args (one line each; docs/config_keys.md has the details and allowed values):
        clip: ``dict(arch, pretrained, quick_gelu=None)`` for ``load_clip``.
        attention / gaussian_std: dense variant of the last block; naclip's window std.
        scclip_cfg: SC-CLIP's settings for attention='scclip' (``scclip.SCCLIPHead``).
        apply_rcs / rcs_cfg, apply_sfr / sfr_cfg: ResCLIP's RCS and SFR in the dense last
            block (naclip, sclip, clearclip, vanilla; ``resclip.py``), off by default.
        rfclip_cfg: RF-CLIP's last block for attention='rfclip' (``rfclip.RFCLIPHead``).
        apply_distraction_filter / distraction_filter_cfg: RF-CLIP's filter of distraction
            tokens after every block (``rfclip.DistractionFilter``), off by default.
        apply_text_refinement / text_refinement_cfg, global_semantics_weight, global_image:
            RF-CLIP's (CASS's) per-crop text refinement and global mix, off by default.
        name_path / class_names: a class-name file (one class per line, synonyms
            separated by ',' / ';'), or the class lines themselves.
        slide_crop / slide_stride: sliding window in pixels; 0 = the whole image (its
            whole patches, as the published code).
        max_crops_per_forward / max_merge_elements: crops per ViT call; query logits
            merged at once (bigger outputs go in bands of rows; 'auto', None = no bound).
        test_scales: multi-scale inference (the seed's extension), (1.0, ) = off.
        precision: the ViT's 'fp32', 'fp16' or 'bf16' (stages 2-6 always run in fp32), or
            'auto': fp16 where CUDA is available, else fp32 (``machine.py``).
        compile / cuda_graph: ``torch.compile`` blocks 1..L-1 and stages 2-7; replay CUDA
            graphs of shapes that recur (GPU; not with stage timers).
        logit_scale: temperature of the softmax over queries.
        prob_thd / area_thd / bg_idx: pixels whose best query probability is below
            ``prob_thd`` go to ``bg_idx``; SCLIP's small-class rule (``area_thd`` of the
            pixels of all classes but ``bg_idx``: dropped, pixels to the next-best class).
        pamr_steps / pamr_stride (alias pamr_dilations): PAMR iterations and dilations.
        apply_<stage> / <stage>_cfg: stages 2-6 (SPEC §1), off by default.
        cls_token_lambda: logit-level CLS debias (SPEC §1.5), 0 = off.
        pretrained / train_cfg / test_cfg: set to None by mmseg's ``init_model``;
            CLIP weights come from ``clip.pretrained``.
    """

    def __init__(self,
                 clip: Optional[dict] = None,
                 attention: str = 'naclip',
                 gaussian_std: float = 5.0,
                 scclip_cfg: Optional[dict] = None,
                 apply_rcs: bool = False,
                 rcs_cfg: Optional[dict] = None,
                 apply_sfr: bool = False,
                 sfr_cfg: Optional[dict] = None,
                 rfclip_cfg: Optional[dict] = None,
                 apply_distraction_filter: bool = False,
                 distraction_filter_cfg: Optional[dict] = None,
                 apply_text_refinement: bool = False,
                 text_refinement_cfg: Optional[dict] = None,
                 global_semantics_weight: float = 0.0,
                 global_image: str = 'whole',
                 name_path: Optional[str] = None,
                 class_names: Optional[Sequence[str]] = None,
                 slide_crop: int = 224,
                 slide_stride: int = 112,
                 max_crops_per_forward: int = 64,
                 max_merge_elements: Union[int, str, None] = 'auto',
                 test_scales: Sequence[float] = (1.0, ),
                 precision: str = 'fp32',  # the configs: 'auto'
                 compile: bool = False,
                 cuda_graph: bool = False,
                 logit_scale: float = 40.0,
                 prob_thd: float = 0.0,
                 area_thd: float = 0.0,
                 bg_idx: int = 0,
                 pamr_steps: int = 0,
                 pamr_stride: Sequence[int] = (8, 16),
                 pamr_dilations: Optional[Sequence[int]] = None,
                 apply_similarity_enhancement: bool = False,
                 similarity_enhancement_cfg: Optional[dict] = None,
                 apply_self_attn_enhancement: bool = False,
                 self_attn_enhancement_cfg: Optional[dict] = None,
                 apply_outlier_suppression: bool = False,
                 outlier_suppression_cfg: Optional[dict] = None,
                 apply_global_debias: bool = False,
                 global_debias_cfg: Optional[dict] = None,
                 cls_token_lambda: float = 0.0,
                 apply_ctd: bool = False,
                 ctd_cfg: Optional[dict] = None,
                 data_preprocessor: Optional[dict] = None,
                 init_cfg: Optional[dict] = None,
                 pretrained: None = None,
                 train_cfg: None = None,
                 test_cfg: None = None):
        arguments = locals()
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        if pretrained is not None:  # mmseg's init_model sets `model.pretrained = None`
            raise ValueError(f'pretrained={pretrained!r}: CLIP weights are chosen by '
                             "clip=dict(pretrained=...), e.g. clip.pretrained='openai'.")
        self.class_names = read_classes(name_path, class_names)
        self.vit_dtype = VIT_DTYPES[resolve_precision(
            check_choice('precision', precision, [*VIT_DTYPES, AUTO]))]
        if clip is not None and not isinstance(clip, dict):
            raise ValueError("clip must be a dict, e.g. clip=dict(arch='ViT-B-16', "
                             f"pretrained='openai'), got {clip!r}.")
        self._clip_cfg = dict(arch='ViT-B-16', pretrained='openai')
        self._clip_cfg.update(clip or {})
        for key, value in (('compile', compile), ('cuda_graph', cuda_graph)):
            if not isinstance(value, bool):
                raise ValueError(f'{key} must be True or False, got {value!r}.')
        self._window = dict(slide_crop=slide_crop, slide_stride=slide_stride,
                            max_crops_per_forward=max_crops_per_forward,
                            max_merge_elements=max_merge_elements, test_scales=test_scales,
                            cuda_graph=cuda_graph)
        clip_model = load_clip(**self._clip_cfg)
        # half-precision weights rather than autocast: no per-call weight casts, and
        # nn.MultiheadAttention keeps its fused inference path (autocast disables it)
        visual = clip_model.visual.to(self.vit_dtype)
        text_classifier = TextClassifier(clip_model, self._clip_cfg['arch'])
        self.pipeline_settings = {key: arguments[key] for key in PIPELINE_KEYS}
        post = self._postprocess(self.pipeline_settings)
        self.pipeline = CropPipeline(visual, text_classifier, self.class_names,
                                     self.vit_dtype, compile, **self._crop_settings())
        self._check_whole_image_embedding(self.pipeline)
        self.engine = ImageEngine(self.pipeline, **self._window, **post)
        self._register_load_state_dict_pre_hook(_checkpoint_keys_before_the_split)

    def with_pipeline(self, **overrides) -> 'SelfAttnCLIPSegmentor':
        """A segmentor that shares this one's CLIP (ViT weights, text embeddings, windows)
        and differs in ``PIPELINE_KEYS`` only: what comes after blocks 1..L-1, so both
        can run on the same ``encode_crops`` output (tools/sweep.py). A ``<stage>_cfg``
        given here replaces this segmentor's whole cfg of that stage."""
        unknown = sorted(set(overrides) - set(PIPELINE_KEYS))
        if unknown:
            raise ValueError(f'with_pipeline: {unknown} change the encoder\'s input or weights '
                             f'(a separate model); it takes {list(PIPELINE_KEYS)}.')
        variant = copy.copy(self)
        # nn.Module keeps its children in dicts: the variant gets its own
        for table in ('_modules', '_parameters', '_buffers'):
            setattr(variant, table, OrderedDict(getattr(self, table)))
        variant.pipeline_settings = {**self.pipeline_settings, **overrides}
        post = variant._postprocess(variant.pipeline_settings)
        variant.pipeline = self.pipeline.with_settings(**variant._crop_settings())
        variant._check_whole_image_embedding(variant.pipeline)
        variant.engine = self.engine.with_settings(variant.pipeline, **post)
        return variant

    def _crop_settings(self) -> dict:
        """The crop pipeline's keys, and ``logit_scale`` (SFR's pass 1 uses it)."""
        settings = {key: self.pipeline_settings[key]
                    for key in (*CROP_PIPELINE_KEYS, 'logit_scale')}
        return dict(settings, clip_arch=self._clip_cfg.get('arch'))

    def _check_whole_image_embedding(self, pipeline: CropPipeline) -> None:
        """RF-CLIP's global_image='whole' needs the whole images next to their windows,
        which the pooled CUDA-graph path and multi-scale inference do not pass on."""
        if not (pipeline.needs_whole_image and self._window['slide_crop']):
            return
        if self._window['cuda_graph']:
            raise ValueError("global_image='whole' (RF-CLIP's global embedding of the whole "
                             'image) cannot combine with cuda_graph=True; set '
                             "cuda_graph=False or global_image='crop'.")
        if tuple(self._window['test_scales']) != (1.0, ):
            raise ValueError("global_image='whole' (RF-CLIP's global embedding of the whole "
                             'image) cannot combine with test_scales '
                             f"{self._window['test_scales']!r}; use test_scales=(1.0, ) or "
                             "global_image='crop'.")

    def _postprocess(self, settings: dict) -> dict:
        """The validated post-processing settings, after the start-up lines of the parts
        outside stages 2-6 (the stages log theirs when the pipeline builds them)."""
        post = check_postprocess(len(self.class_names), **{
            key: settings[key] for key in POSTPROCESS_KEYS})
        precision = {dtype: key for key, dtype in VIT_DTYPES.items()}[self.vit_dtype]
        log_model_settings(self._clip_cfg, settings['attention'], self._window, precision,
                           self.class_names, post,
                           check_number('cls_token_lambda', settings['cls_token_lambda']))
        return post

    # -- mmseg's surface ---------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, inputs: Tensor,
                data_samples: Optional[List[SegDataSample]] = None) -> List[SegDataSample]:
        """Segment a batch; samples get ``seg_logits`` (class probabilities at the original
        size) and ``pred_sem_seg``. Raises, naming the image, if its probabilities are not
        finite (non-finite input pixels, or the first stage that produced NaN / inf)."""
        data_samples, images, metas = self.unpad_batch(inputs, data_samples)
        finite = []  # (image indices, (n,) bool), read once after the whole batch
        for indices, outputs in self.engine.segment_groups(
                images, [tuple(meta['ori_shape'][:2]) for meta in metas]):
            self.store_predictions(data_samples, indices, outputs, finite)
        if self._pending_finite_checks is None:
            raise_if_not_finite(self.engine, finite, images, metas)
        else:  # the previous batch's check, then this one's queued (this batch runs on)
            self.check_deferred_finite()
            self._pending_finite_checks.append(
                PendingFiniteCheck(self.engine, finite, images, metas))
        return data_samples

    _pending_finite_checks: Optional[List[PendingFiniteCheck]] = None

    @contextmanager
    def finite_checks_deferred(self) -> Iterator[None]:
        """Within it, ``predict`` does not wait for the GPU to check that a batch's
        probabilities are finite: the check is queued and made by the next ``predict``
        (or ``check_deferred_finite``, or the end of the block), so the host prepares
        the next batch while the GPU works on this one. The same error, one batch later
        (``MachineAwareTestLoop`` checks the last batch before the metrics)."""
        self._pending_finite_checks = []
        try:
            yield
            self.check_deferred_finite()
        finally:
            self._pending_finite_checks = None

    def check_deferred_finite(self) -> None:
        """Makes the queued finiteness checks of ``finite_checks_deferred`` now."""
        pending = self._pending_finite_checks or []
        while pending:
            pending.pop(0).check()

    def unpad_batch(self, inputs: Tensor, data_samples: Optional[List[SegDataSample]]
                    ) -> Tuple[List[SegDataSample], List[Tensor], List[dict]]:
        """Samples (new ones if None), every image at its own (resized) size without the
        batch padding, and the images' metas."""
        metas = _image_metas(inputs, data_samples)
        data_samples = data_samples or [SegDataSample() for _ in metas]
        images = [image[:, :meta['img_shape'][0], :meta['img_shape'][1]]
                  for image, meta in zip(inputs, metas)]
        return data_samples, images, metas

    @staticmethod
    def store_predictions(data_samples: List[SegDataSample], indices: List[int],
                          group_outputs: Tuple[Tensor, Tensor, Tensor], finite: list) -> None:
        """``segment_group``'s probabilities and labels into the group's samples; its
        finite flags onto ``finite`` (checked once per batch)."""
        probs, labels, ok = group_outputs
        for index, image_probs, image_labels in zip(indices, probs, labels):
            _set_prediction(data_samples[index], image_probs, image_labels)
        finite.append((indices, ok))

    def postprocess_result(self, seg_logits: List[Tensor],
                           data_samples: Optional[List[SegDataSample]] = None
                           ) -> List[SegDataSample]:
        """Query logits (Q, H, W) per image -> class probabilities and labels (SPEC §2)."""
        data_samples = data_samples or [SegDataSample() for _ in seg_logits]
        for logits, sample in zip(seg_logits, data_samples):
            probs, labels = self.engine.segment_logits(logits[None])
            _set_prediction(sample, probs[0], labels[0])
        return data_samples

    def explain(self, image: ImageInput) -> StageMaps:
        """Stage maps of one image (a file path or an (H, W, 3) uint8 BGR array) from a
        real run of ``predict``, in image coordinates: see ``mmseg_selfattn.explain``."""
        return explain(self, image)

    def extract_feat(self, inputs: Tensor) -> Tensor:
        """Dense patch features X (B, N, D) of inputs taken as crops."""
        encoder = self.pipeline.encoder
        inputs, _ = pad_to_patch_multiple(inputs, encoder.patch_size)
        if self.pipeline.scclip is not None:  # SC-CLIP's own last block
            return self.pipeline.dense_block(self.pipeline.encode_crops(inputs), None)
        if self.pipeline.rcs is not None or self.pipeline.sfr is not None:  # ResCLIP
            return self.pipeline.dense_block(self.pipeline.encode_crops(inputs), None,
                                             enhanced=False)
        return encoder.dense_features(encoder.encode(inputs))

    def encode_decode(self, inputs: Tensor, batch_img_metas: List[dict]) -> Tensor:
        """Sliding-window query logits (B, Q, H, W) of equally sized images."""
        return torch.stack(self.engine.batch_slide_inference(list(inputs)))

    def _forward(self, inputs: Tensor, data_samples: Optional[List[SegDataSample]] = None):
        return self.encode_decode(inputs, _image_metas(inputs, data_samples))

    def loss(self, inputs: Tensor, data_samples: List[SegDataSample]) -> Dict[str, Tensor]:
        raise NotImplementedError('SelfAttnCLIPSegmentor is training-free: it has no loss.')


def _set_prediction(sample: SegDataSample, probs: Tensor, labels: Tensor) -> None:
    sample.set_data({'seg_logits': PixelData(data=probs),
                     'pred_sem_seg': PixelData(data=labels[None])})


def _image_metas(inputs: Tensor, data_samples: Optional[List[SegDataSample]]) -> List[dict]:
    if data_samples is None:
        shape = tuple(inputs.shape[-2:])
        return [dict(img_shape=shape, ori_shape=shape, pad_shape=shape) for _ in inputs]
    return [sample.metainfo for sample in data_samples]


def _checkpoint_keys_before_the_split(state_dict, prefix, *args) -> None:
    """Checkpoints saved before the crop pipeline was its own module had its modules at
    the top (``encoder.``, ``text_classifier.``, stages): they load into ``pipeline.``."""
    moved = ('encoder', 'text_classifier', *PIPELINE_STAGES)
    for key in [key for key in state_dict
                if key.startswith(prefix) and key[len(prefix):].split('.')[0] in moved]:
        state_dict[prefix + 'pipeline.' + key[len(prefix):]] = state_dict.pop(key)
