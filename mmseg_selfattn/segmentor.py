"""The registered segmentor: wires encoder, stages, classifier and post-processing."""
import copy
import itertools
from collections import OrderedDict, defaultdict
from contextlib import nullcontext
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from mmengine.logging import print_log
from mmengine.structures import PixelData
from mmseg.models.segmentors.base import BaseSegmentor
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from torch import Tensor

from .clip_loader import load_clip
from .config_checks import check_choice, check_int, check_number, init_defaults
from .cuda_graphs import CUDAGraphCache
from .encoder import DenseCLIPEncoder, EncodedCrops
from .explain import ImageInput, StageMaps, explain
from . import postprocess_kernels
from .pamr import MAX_DILATION, PAMR
from .postprocess import (SynonymMax, final_predictions, finite_per_image,
                          merged_pixel_predictions, segment)
from .sliding_window import WindowMerge, pad_to_patch_multiple
from .stages import PIPELINE_STAGES, build_stage
from .stages.global_debias import cls_logit_bias
from .stages.self_attn_enhancement import enhanced_attention, self_attention_deficit
from .startup_log import log_enabled
from .text_classifier import (ClassNames, TextClassifier, parse_class_names,
                              query_to_class_index, read_class_file)


_PIPELINE_SERIALS = itertools.count()
VIT_DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}
# keys that act after blocks 1..L-1 (last block, stages, classifier, post-processing):
# ``with_pipeline`` varies them on a shared encoder (tools/sweep.py)
PIPELINE_KEYS = ('attention', 'gaussian_std', 'logit_scale', 'prob_thd', 'area_thd', 'bg_idx',
                 'cls_token_lambda', 'pamr_steps', 'pamr_stride', 'pamr_dilations',
                 *(f'{prefix}{name}{suffix}' for name in PIPELINE_STAGES
                   for prefix, suffix in (('apply_', ''), ('', '_cfg'))))


@MODELS.register_module()
class SelfAttnCLIPSegmentor(BaseSegmentor):
    """Training-free open-vocabulary segmentor on a frozen CLIP ViT.

    Call graph (SPEC §1-2)::

        predict(): a batch of images of any sizes, grouped by size (one CUDA graph
                   per group shape with cuda_graph=True)
            merged_logits(): windows of the group's images, max_crops_per_forward per call
                crop_patch_logits(): per batch of crops
                    1 encoder.encode()            standard forward, captures A, q/k/v, x_cls
                    2 similarity enhancement      logits bias from mid-layer similarity
                      encoder.dense_features()    last block in the `attention` variant -> X
                    3 self-attention enhancement  boosts tokens with a low A_ii
                    4 outlier suppression         replaces high A[cls,i]/A[i,i] tokens
                    5 global debias               removes x_cls from X
                    6 CTD                         cluster-wise x_cls removal
                    7 classify                    cos(X, text queries) on the patch grid
                WindowMerge: upsample each crop, overlap-average, resize to the original
            PAMR (pamr_steps > 0, per image)
            segment_logits(): softmax(logit_scale * logits), max over synonyms,
                area_thd (SCLIP's rule), prob_thd -> bg_idx (postprocess.py)

    Args:
        clip: ``dict(arch, pretrained, quick_gelu=None)`` for ``load_clip``.
        attention: dense variant of the last block (``DENSE_VARIANTS``).
        gaussian_std: naclip's neighbourhood window std, in patches.
        name_path: class-name file, one class per line, synonyms separated by ',' / ';'.
        class_names: the class lines themselves, instead of ``name_path``.
        slide_crop / slide_stride: sliding window in pixels; ``slide_crop=0`` runs
            the whole image as one crop.
        max_merge_elements: bounds the query logits merged at once (images x queries x
            rows x width): the full-resolution rows on CPU, with PAMR and with
            multi-scale, else on GPU the column-merged mosaic rows (the post-processing
            kernel merges the rows itself). Bigger outputs are merged and
            post-processed in bands of rows, so memory grows with the returned
            probabilities only. 'auto': 2**27 on GPU (batched throughput unchanged),
            2**25 on CPU (bounded RSS); None: no bound.
        max_crops_per_forward: bounds the crops (of all images of a batch) sent
            through the ViT at once.
        compile: ``torch.compile`` blocks 1..L-1 of the ViT (``explicit_block``: fuses
            LayerNorm, residual adds and biases) and stages 2-7 (hundreds of small
            kernels become a few dozen). The first call of each crop-batch shape
            compiles (about 20 s on an H200); needs Triton on GPU or a C++ compiler on
            CPU. Combine with ``cuda_graph``. Outputs differ from eager by rounding.
        cuda_graph: on GPU, capture the whole pipeline of a group of equally sized
            images (crops to labels) as a CUDA graph per group shape and replay it:
            removes the kernel-launch cost that bounds small batches. Ignored on CPU
            and while stage timers or PAMR are on; shapes beyond the 32nd run eagerly.
            Captured graphs keep the settings (thresholds, stages) of their capture.
        precision: dtype of the ViT's weights and activations, 'fp32', 'fp16' or
            'bf16' (explicit softmaxes run in fp32, fused attention and LayerNorm
            accumulate in fp32; stages 2-6 and the classifier always run in fp32).
        logit_scale: temperature of the softmax over queries.
        prob_thd / area_thd / bg_idx: pixels whose best query probability is below
            ``prob_thd`` go to class ``bg_idx``; a class other than ``bg_idx`` with no more
            than ``area_thd`` x the pixels of all classes but ``bg_idx`` is dropped (its
            probabilities 0, its pixels to their next-best class), as SCLIP's code does.
        test_scales: multi-scale inference (the seed's extension): the image is resized
            by each factor, the whole pipeline (windows, stages) runs at each scale, and
            the query logits, resized to the output size, are averaged before
            post-processing (and PAMR). Crops of all scales share ViT calls. (1.0, ) = off.
        pamr_steps / pamr_stride: PAMR iterations and dilations (0 steps = off);
            ``pamr_dilations`` is an alias of ``pamr_stride``.
        apply_<stage> / <stage>_cfg: stages 2-6 (SPEC §1), off by default.
        cls_token_lambda: logit-level CLS debias (SPEC §1.5), 0 = off.
        pretrained / train_cfg / test_cfg: set to None by mmseg's ``init_model``;
            CLIP weights come from ``clip.pretrained``.
    """

    def __init__(self,
                 clip: Optional[dict] = None,
                 attention: str = 'naclip',
                 gaussian_std: float = 5.0,
                 name_path: Optional[str] = None,
                 class_names: Optional[Sequence[str]] = None,
                 slide_crop: int = 224,
                 slide_stride: int = 112,
                 max_crops_per_forward: int = 64,
                 max_merge_elements: Union[int, str, None] = 'auto',
                 test_scales: Sequence[float] = (1.0, ),
                 precision: str = 'fp32',
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
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        if pretrained is not None:  # mmseg's init_model sets `model.pretrained = None`
            raise ValueError(f'pretrained={pretrained!r}: CLIP weights are chosen by '
                             "clip=dict(pretrained=...), e.g. clip.pretrained='openai'.")
        self.class_names = self._read_classes(name_path, class_names)
        query_class = query_to_class_index(self.class_names)  # (Q,) class of each query
        self.register_buffer('_query_class', query_class, persistent=False)  # moves with .to()
        self.synonym_max = SynonymMax(query_class.tolist())
        self.slide_crop, self.slide_stride = _check_window(slide_crop, slide_stride)
        self.max_crops_per_forward = check_int('max_crops_per_forward', max_crops_per_forward, 1)
        if not (max_merge_elements in (None, 'auto') or (
                isinstance(max_merge_elements, int) and not isinstance(max_merge_elements, bool)
                and max_merge_elements >= 1)):
            raise ValueError("max_merge_elements must be an int >= 1, 'auto' or None, got "
                             f'{max_merge_elements!r}.')
        self.max_merge_elements = max_merge_elements
        self.test_scales = _check_scales(test_scales)
        self.vit_dtype = VIT_DTYPES[check_choice('precision', precision, list(VIT_DTYPES))]
        self._window_merges: Dict[tuple, WindowMerge] = {}
        if clip is not None and not isinstance(clip, dict):
            raise ValueError("clip must be a dict, e.g. clip=dict(arch='ViT-B-16', "
                             f"pretrained='openai'), got {clip!r}.")
        self._clip_cfg = dict(arch='ViT-B-16', pretrained='openai')
        self._clip_cfg.update(clip or {})
        clip_model = load_clip(**self._clip_cfg)
        # half-precision weights rather than autocast: no per-call weight casts, and
        # nn.MultiheadAttention keeps its fused inference path (autocast disables it)
        # kept for _set_pipeline's encoder, not registered twice (encoder.visual is the one)
        self.__dict__['_visual'] = clip_model.visual.to(self.vit_dtype)
        self.text_classifier = TextClassifier(clip_model, self._clip_cfg['arch'])
        self._set_pipeline(
            attention=attention, gaussian_std=gaussian_std, logit_scale=logit_scale,
            prob_thd=prob_thd, area_thd=area_thd, bg_idx=bg_idx, cls_token_lambda=cls_token_lambda,
            pamr_steps=pamr_steps, pamr_stride=pamr_stride, pamr_dilations=pamr_dilations,
            apply_similarity_enhancement=apply_similarity_enhancement,
            similarity_enhancement_cfg=similarity_enhancement_cfg,
            apply_self_attn_enhancement=apply_self_attn_enhancement,
            self_attn_enhancement_cfg=self_attn_enhancement_cfg,
            apply_outlier_suppression=apply_outlier_suppression,
            outlier_suppression_cfg=outlier_suppression_cfg,
            apply_global_debias=apply_global_debias, global_debias_cfg=global_debias_cfg,
            apply_ctd=apply_ctd, ctd_cfg=ctd_cfg)
        self.timer = None  # optional `timer(stage_name)` context manager (tools/benchmark.py)
        self._recorder = None  # optional `record(**tensors)` callable (explain.py)
        for key, value in (('compile', compile), ('cuda_graph', cuda_graph)):
            if not isinstance(value, bool):
                raise ValueError(f'{key} must be True or False, got {value!r}.')
        self.compile = compile
        if compile:  # on this encoder instance only (a reference copy stays eager)
            self.encoder.compile_blocks()
        self.cuda_graph = cuda_graph
        self._graphs = CUDAGraphCache()

    # -- the settings after the encoder ---------------------------------------------------
    def _set_pipeline(self, attention, gaussian_std, logit_scale, prob_thd, area_thd, bg_idx,
                      cls_token_lambda, pamr_steps, pamr_stride, pamr_dilations,
                      **stage_keys) -> None:
        """Builds everything ``PIPELINE_KEYS`` set: the dense last block, stages 2-6, the
        classifier's and post-processing's settings, PAMR."""
        self._pipeline_serial = next(_PIPELINE_SERIALS)  # identifies these settings' graphs
        self._pipeline_kwargs = dict(
            attention=attention, gaussian_std=gaussian_std, logit_scale=logit_scale,
            prob_thd=prob_thd, area_thd=area_thd, bg_idx=bg_idx,
            cls_token_lambda=cls_token_lambda, pamr_steps=pamr_steps, pamr_stride=pamr_stride,
            pamr_dilations=pamr_dilations, **stage_keys)
        self.encoder = DenseCLIPEncoder(self._visual, attention, gaussian_std)
        self.logit_scale = check_number('logit_scale', logit_scale, 0, low_open=True)
        self.prob_thd = check_number('prob_thd', prob_thd, 0, 1)
        self.area_thd = check_number('area_thd', area_thd, 0, 1)
        self.bg_idx = _check_bg_idx(bg_idx, len(self.class_names), prob_thd or area_thd)
        self.pamr = self._build_pamr(pamr_steps, pamr_stride, pamr_dilations)
        self.cls_token_lambda = check_number('cls_token_lambda', cls_token_lambda)
        self._log_settings(self._clip_cfg, attention)  # then each enabled stage logs its line
        self.stage_settings: Dict[str, dict] = {}  # enabled stage -> its settings
        for name in PIPELINE_STAGES:
            enabled, cfg = stage_keys[f'apply_{name}'], stage_keys[f'{name}_cfg']
            stage = build_stage(name, enabled, cfg)
            setattr(self, name, stage)
            if stage is not None:
                settings = {key: value for key, value in (cfg or {}).items() if key != 'type'}
                self.stage_settings[name] = {**init_defaults(type(stage)), **settings}
        self._check_stage_compatibility(attention)
        attention_mode = (self.self_attn_enhancement is not None
                          and self.self_attn_enhancement.mode == 'attention')
        # what decides the dense block's output (its memo key in EncodedCrops)
        self._dense_key = (attention, self.encoder.gaussian_std,
                           repr(self.similarity_enhancement),
                           repr(self.self_attn_enhancement) if attention_mode else None)
        self._plain_dense_key = self._dense_key[:3] + (None, )  # without stage 3's edit
        # layer-wise enhancement of earlier blocks (part of the encoding)
        self._block_edits = {} if self.self_attn_enhancement is None else {
            index: (self.self_attn_enhancement.mode, strength,
                    self.self_attn_enhancement.threshold)
            for index, strength in self.self_attn_enhancement.resolve_layers(
                self.encoder.num_blocks).items()}
        self.register_buffer('_class_tau', self._class_thresholds(), persistent=False)

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
        # the graph cache (and its memory pool) is shared; keys carry the variant's serial
        variant._set_pipeline(**{**self._pipeline_kwargs, **overrides})
        return variant

    # -- pipeline on a batch of crops ------------------------------------------------------
    def crop_logits(self, crops: Tensor) -> Tensor:
        """Query logits (B, Q, H, W) of crops (B, 3, H, W), bilinear from the patch grid."""
        return F.interpolate(self.crop_patch_logits(crops), size=crops.shape[-2:],
                             mode='bilinear')

    def crop_patch_logits(self, crops: Tensor) -> Tensor:
        """Stages 1-7 on crops (B, 3, H, W) -> query logits on the patch grid (B, Q, h, w)."""
        return self.stage_patch_logits(self.encode_crops(crops))

    def encode_crops(self, crops: Tensor, capture_attention: bool = False,
                     mid_layers: Sequence[int] = ()) -> EncodedCrops:
        """Stage 1: blocks 1..L-1 and what the later stages need from them, for this
        segmentor's stages, plus the attention / mid layers asked for (tools/sweep.py
        encodes once for several ``with_pipeline`` variants)."""
        with self._timed('encode'):
            encoded = self.encoder.encode(
                crops.to(self.vit_dtype),
                capture_attention=(capture_attention or self._needs_attention
                                   or self._recorder is not None),
                mid_layers=(tuple(sorted({*self._mid_layers, *mid_layers})) if mid_layers
                            else self._mid_layers), block_edits=self._block_edits)
        self._check('encode', encoded.x_cls, encoded.attention)
        return encoded

    def stage_patch_logits(self, encoded: EncodedCrops) -> Tensor:
        """Stages 2-7 on encoded crops -> query logits on the patch grid (B, Q, h, w).
        ``encoded`` is read, not changed (its dense memo aside). With ``compile=True``
        they run ``torch.compile``d (not while stage timers, ``explain`` or the
        non-finite trace look inside)."""
        if (self.compile and self.timer is None and self._recorder is None
                and self._stage_check is None):
            self.text_classifier.query_embeddings(self.class_names)  # cached outside the graph
            # one graph per crop count and segmentor settings: more than dynamo's default 8
            # (past it the stages would silently run eagerly)
            with torch._dynamo.config.patch(recompile_limit=STAGE_GRAPHS):
                return _compiled_stages()(self, encoded)
        return self._stage_patch_logits(encoded)

    def _stage_patch_logits(self, encoded: EncodedCrops) -> Tensor:
        self_attn = self.self_attn_enhancement
        record = self._recorder  # explain(): keeps the stages' own tensors
        deficit = strength = None
        if self_attn is not None:
            deficit, strength = self._enhancement_inputs(encoded)
        features = self._dense_block(encoded, deficit, strength)
        # stages 2-6 and the classifier in fp32 (cheap, and DBSCAN's eps is precise)
        features, x_cls = features.float(), encoded.x_cls.float()
        if self_attn is not None and self_attn.mode == 'feature':  # rescales X
            with self._timed('self_attn_enhancement'):
                features = self_attn.enhance_features(features, deficit, strength)
            self._check('self_attn_enhancement', features)
        if self.outlier_suppression is not None:
            with self._timed('outlier_suppression'):
                features = self.outlier_suppression(
                    features, self._score_attention(encoded.attention, deficit, strength),
                    encoded.grid)
            self._check('outlier_suppression', features)
        if record is not None:
            record(attention=encoded.attention, x_cls=x_cls, deficit=deficit,
                   features_before_debias=features)
        if self.global_debias is not None:
            with self._timed('global_debias'):
                features = self.global_debias(features, x_cls)
            self._check('global_debias', features)
        if self.ctd is not None:
            with self._timed('ctd'):
                features = self.ctd(features, x_cls)
            self._check('ctd', features)
        if record is not None:
            record(features_after_debias=features, **self._stage_diagnostics())
        with self._timed('classify'):
            logits = self.classify(features, x_cls)  # (B, N, Q)
        self._check('classify', logits)
        return logits.transpose(1, 2).unflatten(-1, encoded.grid)

    @property
    def outliers_score_enhanced(self) -> bool:
        """Whether outlier suppression scores with Ã, the attention self-attention
        enhancement boosted (``score_attention='enhanced'``, SPEC §1.4), not A."""
        self_attn = self.self_attn_enhancement
        return (getattr(self.outlier_suppression, 'score_attention', 'original') == 'enhanced'
                and self_attn is not None and not self_attn.is_neutral)

    def _score_attention(self, attention: Tensor, deficit: Optional[Tensor],
                         strength) -> Tensor:
        """The attention outlier suppression scores with: Ã or A."""
        if not self.outliers_score_enhanced:
            return attention
        return enhanced_attention(attention, deficit, strength)

    def _dense_block(self, encoded: EncodedCrops, deficit: Optional[Tensor],
                     strength=None, enhanced: bool = True) -> Tensor:
        """X of the dense last block with stage 2's attention bias and, in 'attention'
        mode, stage 3's edit of P (``enhanced=False``: without it); memoised in
        ``encoded`` by ``_dense_key``."""
        key = self._dense_key if enhanced else self._plain_dense_key
        if key in encoded.dense_memo:
            return encoded.dense_memo[key]
        similarity, self_attn = self.similarity_enhancement, self.self_attn_enhancement
        attention_bias = probs_hook = None
        if similarity is not None:
            with self._timed('similarity_enhancement'):
                attention_bias = similarity.attention_bias(
                    [encoded.mid_features[index] for index in self._mid_layers])
            self._check('similarity_enhancement', attention_bias)
        if enhanced and self_attn is not None and self_attn.mode == 'attention':
            with self._timed('self_attn_enhancement'):  # edits P in the block
                probs_hook = self_attn.probs_hook(deficit, strength)
        with self._timed('dense_block'):
            features = self.encoder.dense_features(encoded, attention_bias, probs_hook)
        self._check('dense block' + (' with self-attention enhancement' if probs_hook else ''),
                    features)
        encoded.dense_memo[key] = features
        return features

    def _enhancement_inputs(self, encoded: EncodedCrops) -> Tuple[Tensor, object]:
        """Stage 3's deficit e (B, N) and strength (s, or s_i per token). With
        ``class_thresholds`` each token's τ is that of its class c(i), the argmax class
        of the classifier on the unenhanced dense features."""
        self_attn = self.self_attn_enhancement
        strength = self_attn.token_strength(encoded.attention)
        if self._class_tau is None:
            return self_attn.deficit(encoded.attention), strength
        plain = self._dense_block(encoded, None, enhanced=False)
        logits = self.classify(plain.float(), encoded.x_cls.float())  # (B, N, Q)
        tau = self._class_tau[self._query_class[logits.argmax(dim=-1)]]
        return self_attention_deficit(encoded.attention, tau), strength

    def _class_thresholds(self) -> Optional[Tensor]:
        """(C,) τ per class from ``self_attn_enhancement_cfg.class_thresholds`` (None when
        unset); a class is named by any of its synonyms."""
        self_attn = self.self_attn_enhancement
        if self_attn is None or not self_attn.class_thresholds:
            return None
        index = {name: c for c, synonyms in enumerate(self.class_names) for name in synonyms}
        unknown = sorted(set(self_attn.class_thresholds) - set(index))
        if unknown:
            raise ValueError(
                f'self_attn_enhancement_cfg.class_thresholds: unknown class(es) {unknown}; '
                f'the classes are {[synonyms[0] for synonyms in self.class_names]} (or any '
                'of their synonyms).')
        tau = torch.full((len(self.class_names), ), float(self_attn.threshold),
                         device=self._query_class.device)
        for name, value in self_attn.class_thresholds.items():
            tau[index[name]] = value
        return tau

    def _stage_diagnostics(self) -> Dict[str, Optional[Tensor]]:
        """What stages 4 and 6 kept of their latest call (for ``explain``)."""
        outliers, ctd = self.outlier_suppression, self.ctd
        return dict(
            outlier_scores=getattr(outliers, 'last_scores', None),
            outlier_indices=getattr(outliers, 'last_outlier_indices', None),
            ctd_labels=getattr(ctd, 'last_labels', None))

    def classify(self, features: Tensor, x_cls: Optional[Tensor] = None) -> Tensor:
        """cos(X_i, t_q) for every patch and query, (B, N, D) -> (B, N, Q), plus
        ``cls_token_lambda * cos(x_cls, t_q)`` when that is set."""
        queries = self.text_classifier.query_embeddings(self.class_names)
        logits = F.normalize(features.float(), dim=-1) @ queries.T
        if self.cls_token_lambda and x_cls is not None:
            logits = logits + cls_logit_bias(x_cls.float(), queries, self.cls_token_lambda)
        return logits

    # -- whole image -----------------------------------------------------------------------
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
        for indices, batch, merge in self._image_groups(images, output_sizes):
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
        images, image-major, at most ``max_crops_per_forward`` crops per ViT call; or from
        ``encoded``, the ``encode_crops`` outputs of ``crop_batches(images, merge)``."""
        if encoded is None:
            encoded = (self.encode_crops(crops) for crops in self.crop_batches(images, merge))
        logits = [self.stage_patch_logits(crops) for crops in encoded]
        return logits[0] if len(logits) == 1 else torch.cat(logits)

    def crop_batches(self, images: Tensor, merge: WindowMerge):
        """Yields the windows of equally sized images as batches of padded crops, at most
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

    def _image_groups(self, images: Sequence[Tensor],
                      output_sizes: Optional[Sequence[Tuple[int, int]]] = None):
        """Yields (indices, stacked images (n, 3, H, W), WindowMerge): images of one size
        and output size, as many per group as fit in ``max_crops_per_forward`` crops and
        ``max_merge_elements`` merged logits."""
        output_sizes = output_sizes or [tuple(image.shape[-2:]) for image in images]
        groups = defaultdict(list)  # (image size, output size) -> image indices
        for index, (image, output_size) in enumerate(zip(images, output_sizes)):
            groups[(tuple(image.shape[-2:]), tuple(output_size))].append(index)
        for (size, output_size), indices in groups.items():
            merge = self._window_merge(size, output_size, images[indices[0]].device)
            images_per_forward = self.max_crops_per_forward // merge.num_windows
            bound = self._merge_bound(images[indices[0]].device)
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

    def _window_merge(self, size: Tuple[int, int], output_size: Tuple[int, int],
                      device: torch.device) -> WindowMerge:
        key = (size, output_size, str(device))
        if key not in self._window_merges:
            self._window_merges[key] = WindowMerge(size, output_size, self.slide_crop,
                                                   self.slide_stride, self.encoder.patch_size,
                                                   device)
        return self._window_merges[key]

    @torch.no_grad()
    def predict(self, inputs: Tensor,
                data_samples: Optional[List[SegDataSample]] = None) -> List[SegDataSample]:
        """Segment a batch; samples get ``seg_logits`` (class probabilities at the original
        size) and ``pred_sem_seg``. Raises, naming the image, if its probabilities are not
        finite (non-finite input pixels, or the first stage that produced NaN / inf)."""
        data_samples, images, metas = self.unpad_batch(inputs, data_samples)
        finite = []  # (image indices, (n,) bool), read once after the whole batch
        for indices, batch, merge in self.image_groups(images, metas):
            self.store_predictions(data_samples, indices, self.segment_group(batch, merge),
                                   finite)
        self._check_finite_outputs(finite, images, metas)
        return data_samples

    def unpad_batch(self, inputs: Tensor, data_samples: Optional[List[SegDataSample]]
                    ) -> Tuple[List[SegDataSample], List[Tensor], List[dict]]:
        """Samples (new ones if None), every image at its own (resized) size without the
        batch padding, and the images' metas."""
        metas = _image_metas(inputs, data_samples)
        data_samples = data_samples or [SegDataSample() for _ in metas]
        images = [image[:, :meta['img_shape'][0], :meta['img_shape'][1]]
                  for image, meta in zip(inputs, metas)]
        return data_samples, images, metas

    def image_groups(self, images: List[Tensor], metas: List[dict]):
        """``_image_groups`` of a batch, output at the original sizes."""
        return self._image_groups(images, [tuple(meta['ori_shape'][:2]) for meta in metas])

    @staticmethod
    def store_predictions(data_samples: List[SegDataSample], indices: List[int],
                          group_outputs: Tuple[Tensor, Tensor, Tensor], finite: list) -> None:
        """``segment_group``'s probabilities and labels into the group's samples; its
        finite flags onto ``finite`` (checked once per batch)."""
        probs, labels, ok = group_outputs
        for index, image_probs, image_labels in zip(indices, probs, labels):
            _set_prediction(data_samples[index], image_probs, image_labels)
        finite.append((indices, ok))

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
        key = (self._pipeline_serial, tuple(images.shape), images.dtype, str(images.device),
               merge.output_size)
        if not (self.cuda_graph and images.is_cuda and self.timer is None
                and self._recorder is None):
            return self._segment_images(images, merge, encoded)
        if encoded is None:
            if self._graphs.accepts(key):
                return self._graphs(key, self._segment_images, (images, ), merge)
            return self._segment_images(images, merge)
        # the dense block runs before the graph, memoised: variants with equal dense
        # settings share it, and the graph's inputs are only what the stages read
        self_attn = self.self_attn_enhancement
        for crops in encoded:
            self._dense_block(crops, *((None, None) if self_attn is None
                                       else self._enhancement_inputs(crops)))
        tensors, rebuild = _flatten_encoded(encoded, self._dense_key, self._plain_dense_key)
        key += tuple(tuple(tensor.shape) for tensor in tensors)
        if not self._graphs.accepts(key):
            return self._segment_images(images, merge, encoded)
        return self._graphs(key, lambda batch, *flat: self._segment_images(
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
            merges.append(self._window_merge(size, output_size, images.device))
        crop_shapes = {merge.cut_size for merge in merges}
        windows = sum(merge.num_windows for merge in merges)
        if len(crop_shapes) == 1 and windows * len(images) <= self.max_crops_per_forward:
            # crops of every scale in one ViT call, split back by scale
            crops = torch.cat([merge.cut(batch) for merge, batch in zip(merges, scaled)])
            patch_logits = self.crop_patch_logits(crops).split(
                [merge.num_windows * len(images) for merge in merges])
            logits = sum(_merge_masked(merge, part) for merge, part in zip(merges, patch_logits))
        else:  # per scale, chunked as usual (huge images, mixed crop shapes)
            logits = sum(self.merged_logits(batch, merge) for merge, batch in zip(merges,
                                                                                  scaled))
        logits = logits / len(self.test_scales)
        if self.pamr is not None:
            logits = self._pamr_refined(images, logits)
        probs, labels = self.segment_logits(logits)
        return probs, labels, finite_per_image(probs)

    def _segment_with_pamr(self, images: Tensor, merge: WindowMerge,
                           encoded: Optional[Sequence[EncodedCrops]] = None
                           ) -> Tuple[Tensor, Tensor, Tensor]:
        """Merged query logits refined by PAMR, then post-processing."""
        probs, labels = self.segment_logits(
            self._pamr_refined(images, self.merged_logits(images, merge, encoded)))
        return probs, labels, finite_per_image(probs)

    def _pamr_refined(self, images: Tensor, logits: Tensor) -> Tensor:
        """PAMR refines each image's query logits (n, Q, H', W') with its pixels, resized
        to the logits' size."""
        resized = F.interpolate(images, size=logits.shape[-2:], mode='bilinear')
        return torch.cat([self.pamr(image[None], image_logits[None].to(image.dtype))
                          for image, image_logits in zip(resized, logits)])

    def _segment_images(self, images: Tensor, merge: WindowMerge,
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
        bands = self._row_bands(logits_per_row, height, images.device)
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

    def _pixel_predictions(self, patch_logits: Tensor, merge: WindowMerge, rows: slice):
        return merged_pixel_predictions(patch_logits, merge, rows, self.synonym_max,
                                        self.logit_scale, self.prob_thd)

    def _merged_rows(self, merge: WindowMerge, images: Tensor) -> int:
        """Rows of query logits per image held at once: the column-merged mosaic's where
        the GPU kernel merges the rows itself, else the output's (PAMR and multi-scale
        refine or average full-resolution logits)."""
        fused = (postprocess_kernels.supports(images) and self.pamr is None
                 and self.test_scales == (1.0, ))
        return merge.mosaic_rows if fused else merge.output_size[0]

    def _merge_bound(self, device: torch.device) -> Optional[int]:
        if self.max_merge_elements == 'auto':
            return 2**27 if device.type == 'cuda' else 2**25
        return self.max_merge_elements

    def _row_bands(self, elements_per_row: int, height: int,
                   device: torch.device = torch.device('cpu')) -> List[slice]:
        """Output rows merged at once: all, or bands of at most ``max_merge_elements``."""
        bound = self._merge_bound(device)
        if bound is None:
            return [slice(None)]
        rows = max(1, bound // max(1, elements_per_row))
        if rows >= height:
            return [slice(None)]
        return [slice(start, min(start + rows, height)) for start in range(0, height, rows)]

    # -- non-finite outputs -------------------------------------------------------------------
    _stage_check = None  # set only while a non-finite output is traced back to its stage

    def _check(self, stage: str, *tensors: Optional[Tensor]) -> None:
        if self._stage_check is not None:
            self._stage_check(stage, tensors)

    def _check_finite_outputs(self, finite, images: List[Tensor], metas: List[dict]) -> None:
        flags = (finite[0][1] if len(finite) == 1 else torch.cat([ok for _, ok in finite])
                 ).cpu()  # one host sync per batch
        if bool(flags.all()):
            return
        indices = [index for group, _ in finite for index in group]
        index = indices[int((~flags).nonzero()[0])]
        name = metas[index].get('img_path') or f'image {index} of the batch'
        image = images[index]
        non_finite_pixels = int((~torch.isfinite(image)).sum())
        if non_finite_pixels:
            raise ValueError(f'{name}: {non_finite_pixels} input values are NaN or inf (after '
                             'the data preprocessor); the segmentor needs finite pixels.')
        stage = self._first_non_finite_stage(image, tuple(metas[index]['ori_shape'][:2]))
        raise FloatingPointError(f'{name}: the class probabilities are not finite; the first '
                                 f'NaN / inf values come from {stage}.')

    def _first_non_finite_stage(self, image: Tensor, output_size: Tuple[int, int]) -> str:
        """Reruns one image with a finiteness check after every stage."""
        def check(stage, tensors):
            if any(t is not None and not bool(torch.isfinite(t).all()) for t in tensors):
                raise _NonFiniteStage(stage)

        self._stage_check = check
        try:
            merge = self._window_merge(tuple(image.shape[-2:]), output_size, image.device)
            logits = self.merged_logits(image[None], merge)
            self._check('the window merge', logits)
            if self.pamr is not None:
                resized = F.interpolate(image[None], size=output_size, mode='bilinear')
                logits = self.pamr(resized, logits.to(resized.dtype))
                self._check('PAMR', logits)
            self._check('post-processing (logit_scale, softmax)', self.segment_logits(logits)[0])
        except _NonFiniteStage as found:
            return f'stage {found.stage!r}'
        finally:
            self._stage_check = None
        return 'an unknown stage (every stage is finite when the image is run alone)'

    def postprocess_result(self, seg_logits: List[Tensor],
                           data_samples: Optional[List[SegDataSample]] = None
                           ) -> List[SegDataSample]:
        """Query logits (Q, H, W) per image -> class probabilities and labels (SPEC §2)."""
        data_samples = data_samples or [SegDataSample() for _ in seg_logits]
        for logits, sample in zip(seg_logits, data_samples):
            probs, labels = self.segment_logits(logits[None])
            _set_prediction(sample, probs[0], labels[0])
        return data_samples

    def segment_logits(self, query_logits: Tensor) -> Tuple[Tensor, Tensor]:
        """Query logits (n, Q, H, W) -> class probabilities (n, C, H, W): softmax over all
        queries of logit_scale * logits, max over each class's synonyms, renormalised;
        and labels (n, H, W): argmax, then SCLIP's small-class rule (area_thd) and unsure
        pixels (prob_thd) -> bg_idx (``postprocess.final_predictions``)."""
        return segment(query_logits, self.synonym_max, self.logit_scale, self.prob_thd,
                       self.area_thd, self.bg_idx)

    def explain(self, image: ImageInput) -> StageMaps:
        """Stage maps of one image (a file path or an (H, W, 3) uint8 BGR array) from a
        real run of ``predict``, in image coordinates: see ``mmseg_selfattn.explain``."""
        return explain(self, image)

    # -- BaseSegmentor interface -----------------------------------------------------------
    def extract_feat(self, inputs: Tensor) -> Tensor:
        """Dense patch features X (B, N, D) of inputs taken as crops."""
        inputs, _ = pad_to_patch_multiple(inputs, self.encoder.patch_size)
        return self.encoder.dense_features(self.encoder.encode(inputs))

    def encode_decode(self, inputs: Tensor, batch_img_metas: List[dict]) -> Tensor:
        """Sliding-window query logits (B, Q, H, W) of equally sized images."""
        return torch.stack([self.slide_inference(image) for image in inputs])

    def _forward(self, inputs: Tensor, data_samples: Optional[List[SegDataSample]] = None):
        return self.encode_decode(inputs, _image_metas(inputs, data_samples))

    def loss(self, inputs: Tensor, data_samples: List[SegDataSample]) -> Dict[str, Tensor]:
        raise NotImplementedError('SelfAttnCLIPSegmentor is training-free: it has no loss.')

    # -- construction helpers ----------------------------------------------------------------
    def _check_stage_compatibility(self, attention: str) -> None:
        if self.similarity_enhancement is not None and attention == 'maskclip':
            raise ValueError("apply_similarity_enhancement=True needs attention logits, but "
                             "attention='maskclip' has none; use another attention variant.")
        layers = self.similarity_enhancement.layers if self.similarity_enhancement else ()
        try:
            self._mid_layers = tuple(self.encoder.block_index(layer) for layer in layers)
        except ValueError as error:
            raise ValueError(f'similarity_enhancement_cfg.layer: {error}') from None
        # the captured attention A feeds stages 3 and 4
        self._needs_attention = (self.self_attn_enhancement is not None
                                 or self.outlier_suppression is not None)

    def _log_settings(self, clip_cfg: dict, attention: str) -> None:
        """Start-up lines of the parts outside stages 2-6 (those log their own)."""
        precision = {dtype: key for key, dtype in VIT_DTYPES.items()}[self.vit_dtype]
        window = (f'slide_crop={self.slide_crop}, slide_stride={self.slide_stride}'
                  if self.slide_crop else 'whole image')
        print_log(f"[Encoder] {clip_cfg['arch']} (pretrained={clip_cfg.get('pretrained')}), "
                  f'attention={attention}, {window}, precision={precision}',
                  logger='current')
        print_log(f'[Classifier] {self.synonym_max.num_classes} classes '
                  f'({self.synonym_max.num_queries} queries), logit_scale={self.logit_scale}, '
                  f'prob_thd={self.prob_thd}, area_thd={self.area_thd}, bg_idx={self.bg_idx}',
                  logger='current')
        if self.cls_token_lambda:
            log_enabled('CLS Logit Debias', f'cls_token_lambda={self.cls_token_lambda}')
        if self.pamr is not None:
            log_enabled('PAMR', f'steps={self.pamr.num_iter}, dilations={self.pamr.dilations}')

    def _timed(self, stage: str):
        return self.timer(stage) if self.timer is not None else nullcontext()

    @staticmethod
    def _read_classes(name_path: Optional[str],
                      class_names: Optional[Sequence[str]]) -> ClassNames:
        if (name_path is None) == (class_names is None):
            raise ValueError('set exactly one of name_path (a class-name file) and '
                             'class_names (a list of class lines).')
        if class_names is not None:
            return parse_class_names(class_names)
        return read_class_file(name_path)

    @staticmethod
    def _build_pamr(steps: int, stride: Sequence[int],
                    dilations_alias: Optional[Sequence[int]]) -> Optional[PAMR]:
        steps = check_int('pamr_steps', steps, 0)
        key, value = (('pamr_stride', stride) if dilations_alias is None
                      else ('pamr_dilations', dilations_alias))
        dilations = tuple(value) if isinstance(value, (list, tuple)) else (value, )
        if not dilations or any(isinstance(d, bool) or not isinstance(d, int)
                                or not 1 <= d <= MAX_DILATION for d in dilations):
            raise ValueError(f'{key} must be an int or a non-empty list of ints in '
                             f'[1, {MAX_DILATION}] (PAMR dilations: each pads the full-size '
                             f'logits by that many pixels per side), got {value!r}.')
        return PAMR(steps, dilations) if steps else None


_COMPILED_STAGES = []
STAGE_GRAPHS = 64  # compiled variants of the stages per process


def _compiled_stages():
    """``SelfAttnCLIPSegmentor._stage_patch_logits`` through ``torch.compile`` (one per
    process, built on first use; each segmentor's settings are guards of it)."""
    if not _COMPILED_STAGES:
        _COMPILED_STAGES.append(torch.compile(SelfAttnCLIPSegmentor._stage_patch_logits,
                                              dynamic=False))
    return _COMPILED_STAGES[0]


def _set_prediction(sample: SegDataSample, probs: Tensor, labels: Tensor) -> None:
    sample.set_data({'seg_logits': PixelData(data=probs),
                     'pred_sem_seg': PixelData(data=labels[None])})


def _image_metas(inputs: Tensor, data_samples: Optional[List[SegDataSample]]) -> List[dict]:
    if data_samples is None:
        shape = tuple(inputs.shape[-2:])
        return [dict(img_shape=shape, ori_shape=shape, pad_shape=shape) for _ in inputs]
    return [sample.metainfo for sample in data_samples]


def _check_window(crop: int, stride: int) -> Tuple[int, int]:
    crop = check_int('slide_crop', crop, 0)
    if crop:
        stride = check_int('slide_stride', stride, 1)
        if stride > crop:
            raise ValueError(f'slide_stride={stride} > slide_crop={crop} leaves pixels '
                             'uncovered; use 0 < slide_stride <= slide_crop.')
    return crop, stride


def _check_bg_idx(bg_idx, num_classes: int, needed: bool) -> Optional[int]:
    if bg_idx is None and not needed:
        return None
    if isinstance(bg_idx, bool) or not isinstance(bg_idx, int) or not 0 <= bg_idx < num_classes:
        raise ValueError(f'bg_idx must be a class index in [0, {num_classes - 1}] (it receives '
                         f'the pixels dropped by prob_thd / area_thd), got {bg_idx!r}.')
    return bg_idx


def _merge_masked(merge: WindowMerge, patch_logits: Tensor) -> Tensor:
    """``merge(patch_logits)`` with NaN where a window with non-finite logits reaches."""
    return merge(patch_logits).masked_fill(merge.non_finite_pixels(patch_logits)[:, None],
                                           float('nan'))


def _check_scales(scales) -> Tuple[float, ...]:
    values = tuple(scales) if isinstance(scales, (list, tuple)) else (scales, )
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float))
                         or not 0.05 <= v <= 8 for v in values):
        raise ValueError('test_scales must be a non-empty list of resize factors in '
                         f'[0.05, 8] (e.g. (0.75, 1.0, 1.25); (1.0, ) = single scale), got '
                         f'{scales!r}.')
    return tuple(float(v) for v in values)


def _flatten_encoded(encoded: Sequence[EncodedCrops], *dense_keys: tuple):
    """What stages 3-7 read of ``encode_crops`` outputs whose dense block is memoised
    (x_cls, attention, X under those of ``dense_keys`` present) as a flat list of
    tensors, and a function that rebuilds such outputs from tensors of the same shapes
    (CUDA-graph inputs)."""
    layouts, tensors = [], []
    for crops in encoded:
        has_attention = crops.attention is not None
        keys = [key for key in dict.fromkeys(dense_keys) if key in crops.dense_memo]
        layouts.append((crops.grid, has_attention, keys))
        tensors += [crops.x_cls, *([crops.attention] if has_attention else []),
                    *(crops.dense_memo[key] for key in keys)]

    def rebuild(flat: Sequence[Tensor]) -> List[EncodedCrops]:
        flat, rebuilt = list(flat), []
        for grid, has_attention, keys in layouts:
            x_cls, attention = flat.pop(0), flat.pop(0) if has_attention else None
            rebuilt.append(EncodedCrops(grid=grid, block_input=None, q=None, k=None, v=None,
                                        x_cls=x_cls, attention=attention,
                                        dense_memo={key: flat.pop(0) for key in keys}))
        return rebuilt

    return tensors, rebuild


class _NonFiniteStage(Exception):
    def __init__(self, stage: str):
        super().__init__(stage)
        self.stage = stage
