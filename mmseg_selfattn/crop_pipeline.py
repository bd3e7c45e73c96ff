"""What is computed for a batch of crops (SPEC §1): crops -> patch-grid query logits.

``CropPipeline`` owns the dense encoder, stages 2-6 and the text classifier::

    crop_patch_logits(crops)
        encode_crops()            1 standard forward: A, q/k/v, mid features, x_cls
        stage_patch_logits()
            dense_block()         2 similarity bias on the logits; last block in the
                                    `attention` variant (3 'attention' mode edits P) -> X
                                    (attention='scclip': scclip.SCCLIPHead, stages 2-6 off)
                                    (ResCLIP: RCS mixes A_c into P; SFR runs pass 1, the
                                    block with RCS only -> classify -> labels -> Ŝ, then
                                    pass 2 with Ŝ in the logits)
            3 self-attention enhancement ('feature' mode rescales X)
            4 outlier suppression   replaces high A[cls,i]/A[i,i] tokens
            5 global debias         removes x_cls from X
            6 CTD                   cluster-wise x_cls removal
            classify()              cos(X, text queries) on the patch grid

Variants (``with_settings``) share the encoder's weights and the text embeddings and
differ in ``PIPELINE_KEYS``: what comes after blocks 1..L-1, so several of them can run on
one ``encode_crops`` output (tools/sweep.py).
"""
import itertools
from contextlib import nullcontext
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config_checks import check_choice, check_number, init_defaults
from .encoder import DenseCLIPEncoder, EncodedCrops
from .resclip import build_resclip
from .rfclip import (GLOBAL_IMAGES, build_distraction_filter, build_rfclip,
                     build_text_refinement, complete_linkage_clusters, rfclip_logits)
from .scclip import build_scclip
from .sliding_window import pad_to_patch_multiple
from .stages import PIPELINE_STAGES, build_stage
from .stages.global_debias import cls_logit_bias
from .stages.self_attn_enhancement import enhanced_attention, self_attention_deficit
from .text_classifier import ClassNames, TextClassifier, query_to_class_index

# keys of the pipeline: the dense last block, stages 2-6 and the classifier
PIPELINE_KEYS = ('attention', 'gaussian_std', 'scclip_cfg', 'apply_rcs', 'rcs_cfg', 'apply_sfr',
                 'sfr_cfg', 'cls_token_lambda', 'rfclip_cfg', 'apply_distraction_filter',
                 'distraction_filter_cfg', 'apply_text_refinement', 'text_refinement_cfg',
                 'global_semantics_weight', 'global_image',
                 *(f'{prefix}{name}{suffix}' for name in PIPELINE_STAGES
                   for prefix, suffix in (('apply_', ''), ('', '_cfg'))))
STAGE_GRAPHS = 64  # compiled variants of the stages per process
_SERIALS = itertools.count()


class CropPipeline(nn.Module):
    """Stages 1-7 on batches of crops.

    Args:
        visual: the CLIP image tower (in the ViT's precision; shared by variants).
        text_classifier: the text tower's prompt-ensemble embeddings (shared).
        class_names: the classes, each a tuple of synonyms (one query each).
        vit_dtype: dtype the crops are cast to for the ViT.
        compile: ``torch.compile`` blocks 1..L-1 and stages 2-7.
        attention, gaussian_std: the dense last block (``DenseCLIPEncoder``).
        scclip_cfg: SC-CLIP's settings (``scclip.SCCLIPHead``), used by attention='scclip'.
        apply_rcs / rcs_cfg, apply_sfr / sfr_cfg: ResCLIP's two modules in the dense block
            (``resclip.ResidualCrossCorrelation``, ``resclip.SemanticFeedback``).
        logit_scale: the segmentor's softmax temperature, which SFR's pass 1 also uses
            (not a ``PIPELINE_KEYS`` entry: the segmentor passes its post-processing one).
        cls_token_lambda: logit-level CLS debias (SPEC §1.5), 0 = off.
        rfclip_cfg: RF-CLIP's last block (``rfclip.RFCLIPHead``), used by attention='rfclip'.
        apply_distraction_filter / distraction_filter_cfg: RF-CLIP's Phi after every block
            (``rfclip.DistractionFilter``; part of the encoding).
        apply_text_refinement / text_refinement_cfg, global_semantics_weight, global_image:
            RF-CLIP's (CASS's) per-crop text refinement and the convex global mix with the
            crop's ('crop') or its whole image's ('whole') CLIP embedding.
        clip_arch: the open_clip arch name (the filter's published channel list).
        apply_<stage> / <stage>_cfg: stages 2-6.

    Hooks (None = off): ``timer(stage)`` a context manager timing each stage
    (tools/benchmark.py), ``recorder(**tensors)`` keeping the stages' tensors
    (explain.py), ``stage_check(stage, tensors)`` after each stage (non_finite.py).
    """

    def __init__(self, visual: nn.Module, text_classifier: TextClassifier,
                 class_names: ClassNames, vit_dtype: torch.dtype = torch.float32,
                 compile: bool = False, attention: str = 'naclip', gaussian_std: float = 5.0,
                 scclip_cfg: Optional[dict] = None, apply_rcs: bool = False,
                 rcs_cfg: Optional[dict] = None, apply_sfr: bool = False,
                 sfr_cfg: Optional[dict] = None, logit_scale: float = 40.0,
                 cls_token_lambda: float = 0.0, rfclip_cfg: Optional[dict] = None,
                 apply_distraction_filter: bool = False,
                 distraction_filter_cfg: Optional[dict] = None,
                 apply_text_refinement: bool = False,
                 text_refinement_cfg: Optional[dict] = None,
                 global_semantics_weight: float = 0.0, global_image: str = 'whole',
                 clip_arch: Optional[str] = None, **stage_keys):
        super().__init__()
        self.__dict__['_visual'] = visual  # registered once, as encoder.visual
        self.text_classifier = text_classifier
        self.class_names = class_names
        # (Q,) class of each query; a buffer, so it moves with .to()
        self.register_buffer('query_class', query_to_class_index(class_names),
                             persistent=False)
        self.vit_dtype = vit_dtype
        self.compile = compile
        self.timer = self.recorder = self.stage_check = None
        self.serial = next(_SERIALS)  # identifies these settings (CUDA-graph keys)
        self.settings = dict(attention=attention, gaussian_std=gaussian_std,
                             scclip_cfg=scclip_cfg, apply_rcs=apply_rcs, rcs_cfg=rcs_cfg,
                             apply_sfr=apply_sfr, sfr_cfg=sfr_cfg, logit_scale=logit_scale,
                             cls_token_lambda=cls_token_lambda, rfclip_cfg=rfclip_cfg,
                             apply_distraction_filter=apply_distraction_filter,
                             distraction_filter_cfg=distraction_filter_cfg,
                             apply_text_refinement=apply_text_refinement,
                             text_refinement_cfg=text_refinement_cfg,
                             global_semantics_weight=global_semantics_weight,
                             global_image=global_image, clip_arch=clip_arch, **stage_keys)
        self.encoder = DenseCLIPEncoder(visual, attention, gaussian_std)
        self.scclip = build_scclip(attention, scclip_cfg, self.encoder.num_blocks)
        self.rcs, self.sfr = build_resclip(attention, apply_rcs, rcs_cfg, apply_sfr, sfr_cfg,
                                           self.encoder.num_blocks)
        self.rfclip = build_rfclip(attention, rfclip_cfg, self.encoder.num_blocks)
        self.distraction_filter = build_distraction_filter(
            apply_distraction_filter, distraction_filter_cfg, clip_arch,
            visual.conv1.out_channels, self.encoder.num_blocks)
        self.text_refinement = build_text_refinement(apply_text_refinement,
                                                     text_refinement_cfg)
        self.global_semantics_weight = check_number('global_semantics_weight',
                                                    global_semantics_weight, 0, 1)
        self.global_image = check_choice('global_image', global_image, GLOBAL_IMAGES)
        self._query_clusters = None  # the refinement's clusters, once per class list
        self.logit_scale = check_number('logit_scale', logit_scale, 0, low_open=True)
        if compile:  # on this encoder instance only (a reference copy stays eager)
            self.encoder.compile_blocks()
        self.cls_token_lambda = check_number('cls_token_lambda', cls_token_lambda)
        self.stage_settings: Dict[str, dict] = {}  # enabled stage -> its settings
        for name in PIPELINE_STAGES:  # each enabled stage logs its start-up line
            enabled, cfg = stage_keys[f'apply_{name}'], stage_keys[f'{name}_cfg']
            stage = build_stage(name, enabled, cfg)
            setattr(self, name, stage)
            if stage is not None:
                settings = {key: value for key, value in (cfg or {}).items() if key != 'type'}
                self.stage_settings[name] = {**init_defaults(type(stage)), **settings}
        self._check_stage_compatibility(attention)
        attention_mode = (self.self_attn_enhancement is not None
                          and self.self_attn_enhancement.mode == 'attention')
        self._check_resclip_compatibility(attention_mode)
        resclip = repr(self.rcs) + repr(self.sfr) + (
            f'logit_scale={self.logit_scale}' if self.sfr is not None else '')
        # what decides the dense block's output (its memo key in EncodedCrops)
        self.dense_key = (attention, self.encoder.gaussian_std,
                          repr(self.similarity_enhancement) + repr(self.scclip) + resclip
                          + repr(self.rfclip),
                          repr(self.self_attn_enhancement) if attention_mode else None)
        self.plain_dense_key = self.dense_key[:3] + (None, )  # without stage 3's edit
        # layer-wise enhancement of earlier blocks (part of the encoding)
        self.block_edits = {} if self.self_attn_enhancement is None else {
            index: (self.self_attn_enhancement.mode, strength,
                    self.self_attn_enhancement.threshold)
            for index, strength in self.self_attn_enhancement.resolve_layers(
                self.encoder.num_blocks).items()}
        self.register_buffer('_class_tau', self._class_thresholds(), persistent=False)

    def with_settings(self, **overrides) -> 'CropPipeline':
        """A pipeline on the same ViT weights and text classifier whose ``PIPELINE_KEYS``
        are these settings with ``overrides`` (a ``<stage>_cfg`` replaces the whole cfg)."""
        unknown = sorted(set(overrides) - {*PIPELINE_KEYS, 'logit_scale', 'clip_arch'})
        if unknown:
            raise ValueError(f'{unknown} are not pipeline keys; it takes {list(PIPELINE_KEYS)} '
                             "(and 'logit_scale', 'clip_arch').")
        variant = CropPipeline(self._visual, self.text_classifier, self.class_names,
                               self.vit_dtype, False, **{**self.settings, **overrides})
        variant.compile = self.compile  # compiled stages; its blocks run eagerly
        return variant.to(self.query_class.device)

    # -- crops -> logits ---------------------------------------------------------------------
    def crop_logits(self, crops: Tensor) -> Tensor:
        """Query logits (B, Q, H, W) of crops (B, 3, H, W), bilinear from the patch grid."""
        return F.interpolate(self.crop_patch_logits(crops), size=crops.shape[-2:],
                             mode='bilinear')

    def crop_patch_logits(self, crops: Tensor) -> Tensor:
        """Stages 1-7 on crops (B, 3, H, W) -> query logits on the patch grid (B, Q, h, w)."""
        return self.stage_patch_logits(self.encode_crops(crops))

    def encode_crops(self, crops: Tensor, capture_attention: bool = False,
                     mid_layers: Sequence[int] = (), layer_sums: Sequence[tuple] = (),
                     last_block: bool = False,
                     attention_means: Sequence[tuple] = ()) -> EncodedCrops:
        """Stage 1: blocks 1..L-1 and what the later stages need from them, for this
        pipeline's stages, plus the attention / mid layers / layer sums / standard last
        block / attention means asked for (tools/sweep.py encodes once for several
        variants). The crops are kept in the result (SFR's PAMR guide)."""
        layer_sums = tuple(dict.fromkeys((*self.layer_sums, *layer_sums)))
        attention_means = tuple(dict.fromkeys((*self.attention_means, *attention_means)))
        last_block = last_block or self.needs_last_block
        # only SC-CLIP / ResCLIP ask for these (the reference loop's encoder takes none)
        scclip_keys = ({} if last_block and not layer_sums
                       else dict(layer_sums=layer_sums, last_block=last_block))
        if attention_means:
            scclip_keys['attention_means'] = attention_means
        if self.distraction_filter is not None:  # RF-CLIP
            scclip_keys['distraction_filter'] = self.distraction_filter
        if self.rfclip is not None:
            scclip_keys['kk_layers'] = self.rfclip.kk_blocks
        with self._timed('encode'):
            encoded = self.encoder.encode(
                crops.to(self.vit_dtype),
                capture_attention=last_block and (capture_attention or self.needs_attention
                                                  or self.recorder is not None),
                mid_layers=(tuple(sorted({*self.mid_layers, *mid_layers})) if mid_layers
                            else self.mid_layers), block_edits=self.block_edits,
                **scclip_keys)
        encoded.crops = crops
        self._check('encode', encoded.x_cls, encoded.attention)
        return encoded

    def stage_patch_logits(self, encoded: EncodedCrops) -> Tensor:
        """Stages 2-7 on encoded crops -> query logits on the patch grid (B, Q, h, w).
        ``encoded`` is read, not changed (its dense memo aside). With ``compile=True``
        they run ``torch.compile``d (not while the hooks look inside)."""
        if (self.compile and self.timer is None and self.recorder is None
                and self.stage_check is None):
            self.text_classifier.query_embeddings(self.class_names)  # cached outside the graph
            if self.text_refinement is not None:
                self.query_clusters()  # (numpy) outside the graph
            # one graph per crop count and settings: more than dynamo's default 8 (past it
            # the stages would silently run eagerly)
            with torch._dynamo.config.patch(recompile_limit=STAGE_GRAPHS):
                return _compiled_stages()(self, encoded)
        return self._stage_patch_logits(encoded)

    def _stage_patch_logits(self, encoded: EncodedCrops) -> Tensor:
        self_attn = self.self_attn_enhancement
        record = self.recorder  # explain(): keeps the stages' own tensors
        deficit = strength = None
        if self_attn is not None:
            deficit, strength = self.enhancement_inputs(encoded)
        features = self.dense_block(encoded, deficit, strength)
        # stages 2-6 and the classifier in fp32 (cheap, and DBSCAN's eps is precise)
        features = features.float()
        x_cls = None if encoded.x_cls is None else encoded.x_cls.float()  # None: scclip
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
            logits = self.classify(features, x_cls, self._global_embedding(encoded))  # (B, N, Q)
        self._check('classify', logits)
        return logits.transpose(1, 2).unflatten(-1, encoded.grid)

    def classify(self, features: Tensor, x_cls: Optional[Tensor] = None,
                 global_embedding: Optional[Tensor] = None) -> Tensor:
        """cos(X_i, t_q) for every patch and query, (B, N, D) -> (B, N, Q), plus
        ``cls_token_lambda * cos(x_cls, t_q)`` when that is set. With RF-CLIP's text
        refinement or global mix (``global_embedding`` g, (B, D)): (1 - gamma)
        cos(X_i, t~_q) + gamma cos(g, t_q) (``rfclip.rfclip_logits``)."""
        queries = self.text_classifier.query_embeddings(self.class_names)
        if global_embedding is not None and self.uses_global_embedding:
            logits = rfclip_logits(features, global_embedding, queries,
                                   self.global_semantics_weight, self.text_refinement,
                                   self.query_clusters() if self.text_refinement else None)
        else:
            logits = F.normalize(features.float(), dim=-1) @ queries.T
        if self.cls_token_lambda and x_cls is not None:
            logits = logits + cls_logit_bias(x_cls.float(), queries, self.cls_token_lambda)
        return logits

    # -- RF-CLIP's global embedding and query clusters --------------------------------------
    @property
    def uses_global_embedding(self) -> bool:
        """Whether the classifier reads g (RF-CLIP's refinement or global mix is on)."""
        return self.text_refinement is not None or self.global_semantics_weight > 0

    @property
    def needs_whole_image(self) -> bool:
        """Whether g is the embedding of each crop's whole image (``global_image='whole'``)."""
        return self.uses_global_embedding and self.global_image == 'whole'

    def query_clusters(self) -> Tensor:
        """(Q,) complete-linkage cluster of each query (computed once per class list)."""
        if self._query_clusters is None:
            queries = self.text_classifier.query_embeddings(self.class_names)
            self._query_clusters = complete_linkage_clusters(
                queries, self.text_refinement.cluster_threshold).to(queries.device)
        return self._query_clusters

    def image_embeddings(self, images: Tensor) -> Tensor:
        """g (n, D): the projected CLS of the standard forward (distraction filter and
        layer-wise edits included) of whole normalised images (n, 3, H, W), their whole
        patches (the patch convolution drops the rest, as the published code)."""
        ph, pw = self.encoder.patch_size
        height, width = images.shape[-2:]
        # as slide_crop=0 feeds the whole image: its whole patches, at least one (a side
        # smaller than a patch is zero-padded to one)
        whole = pad_to_patch_multiple(
            images[..., :max(height - height % ph, min(height, ph)),
                   :max(width - width % pw, min(width, pw))], (ph, pw))[0]
        keys = {} if self.distraction_filter is None else dict(
            distraction_filter=self.distraction_filter)
        with self._timed('global_embedding'):
            return self.encoder.encode(whole.to(self.vit_dtype), block_edits=self.block_edits,
                                       **keys).x_cls

    def attach_image_embeddings(self, encoded, images: Tensor, num_windows: int,
                                whole: bool = True):
        """The ``encode_crops`` outputs of the windows of ``images`` (image-major, in
        order), each with ``global_embedding`` set: its image's ``image_embeddings``
        (computed once per image, not per crop), or with ``whole=False`` (the window is
        the whole image) the crop's own x_cls. Unchanged when g is not needed."""
        if not self.needs_whole_image:
            return encoded
        return self._attached(encoded, images, num_windows, whole)

    def _attached(self, encoded, images: Tensor, num_windows: int, whole: bool):
        embeddings = self.image_embeddings(images) if whole else None
        offset = 0
        for crops in encoded:
            count = len(crops.block_input)
            if embeddings is None:
                crops.global_embedding = crops.x_cls
            else:
                owner = torch.arange(offset, offset + count, device=embeddings.device)
                crops.global_embedding = embeddings[owner // num_windows]
            offset += count
            yield crops

    def _global_embedding(self, encoded: EncodedCrops) -> Optional[Tensor]:
        if not self.uses_global_embedding:
            return None
        if self.global_image == 'crop':
            return encoded.x_cls.float()
        if encoded.global_embedding is None:
            raise ValueError(
                "global_image='whole' (RF-CLIP) needs each crop's whole-image embedding, "
                'which ImageEngine.window_patch_logits attaches (not cuda_graph=True, '
                "test_scales or a sweep's shared encodings); use global_image='crop' there.")
        return encoded.global_embedding.float()

    # -- stages 2-4 inputs -----------------------------------------------------------------
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

    def dense_block(self, encoded: EncodedCrops, deficit: Optional[Tensor],
                    strength=None, enhanced: bool = True) -> Tensor:
        """X of the dense last block with stage 2's attention bias and, in 'attention'
        mode, stage 3's edit of P (``enhanced=False``: without it); memoised in
        ``encoded`` by ``dense_key``."""
        key = self.dense_key if enhanced else self.plain_dense_key
        if key in encoded.dense_memo:
            return encoded.dense_memo[key]
        similarity, self_attn = self.similarity_enhancement, self.self_attn_enhancement
        attention_bias = probs_hook = None
        if similarity is not None:
            with self._timed('similarity_enhancement'):
                attention_bias = similarity.attention_bias(
                    [encoded.mid_features[index] for index in self.mid_layers])
            self._check('similarity_enhancement', attention_bias)
        if enhanced and self_attn is not None and self_attn.mode == 'attention':
            with self._timed('self_attn_enhancement'):  # edits P in the block
                probs_hook = self_attn.probs_hook(deficit, strength)
        with self._timed('dense_block'):
            if self.scclip is not None:
                features = self.scclip(self.encoder.visual, encoded)
            elif self.rfclip is not None:
                features = self.rfclip(self.encoder.visual, encoded)
            elif self.rcs is not None or self.sfr is not None:
                features = self._resclip_features(encoded, attention_bias, probs_hook)
            else:
                features = self.encoder.dense_features(encoded, attention_bias, probs_hook)
        self._check('dense block' + (' with self-attention enhancement' if probs_hook else ''),
                    features)
        encoded.dense_memo[key] = features
        return features

    def _resclip_features(self, encoded: EncodedCrops, attention_bias: Optional[Tensor],
                          probs_hook) -> Tensor:
        """ResCLIP's dense block: RCS's hook on P (both passes); with SFR, pass 1 (the
        block with RCS, no stage-2 bias or stage-3 edit, classified without x_cls) gives
        Ŝ, and pass 2 transforms every logit term by it before the window and the bias.
        Stage 3's 'attention' hook (refused with RCS) runs after RCS's."""
        rcs = None if self.rcs is None else self.rcs.hook(encoded)
        hook = rcs if probs_hook is None else (probs_hook if rcs is None else
                                              _composed(rcs, probs_hook))
        if self.sfr is None:
            return self.encoder.dense_features(encoded, attention_bias, hook)
        if encoded.crops is None:
            raise ValueError('apply_sfr=True needs the crops in the encoding (SFR guides '
                             "pass 1's PAMR with them): encode with CropPipeline.encode_crops.")
        with self._timed('sfr_pass1'):
            pass1 = self.encoder.dense_features(encoded, None, rcs)
            logits = self.classify(pass1.float()).transpose(1, 2).unflatten(-1, encoded.grid)
            s_hat = self.sfr.affinity(logits, encoded.crops, self.logit_scale,
                                      self.encoder.patch_size, self.encoder.gaussian_std)
        self._check('SFR pass 1', logits, s_hat)
        return self.encoder.dense_features(encoded, attention_bias, hook,
                                           self.sfr.transform(s_hat))

    def enhancement_inputs(self, encoded: EncodedCrops) -> Tuple[Tensor, object]:
        """Stage 3's deficit e (B, N) and strength (s, or s_i per token). With
        ``class_thresholds`` each token's τ is that of its class c(i), the argmax class
        of the classifier on the unenhanced dense features."""
        self_attn = self.self_attn_enhancement
        strength = self_attn.token_strength(encoded.attention)
        if self._class_tau is None:
            return self_attn.deficit(encoded.attention), strength
        plain = self.dense_block(encoded, None, enhanced=False)
        logits = self.classify(plain.float(), encoded.x_cls.float())  # (B, N, Q)
        tau = self._class_tau[self.query_class[logits.argmax(dim=-1)]]
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
                         device=self.query_class.device)
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

    def _check_resclip_compatibility(self, attention_mode: bool) -> None:
        """RCS changes the row sum of P to τ_r (τ_r (2 - λ_r) for sclip), which stage 3's
        'attention' mode assumes to be 1 (2): refused together. SFR keeps the row sums."""
        self.attention_means: Tuple[tuple, ...] = (
            (self.rcs.layers, ) if self.rcs is not None else ())
        if self.rcs is not None and attention_mode:
            raise ValueError(
                "apply_rcs=True cannot combine with apply_self_attn_enhancement=True in "
                "mode='attention': RCS scales the rows of P to sum to tau_r, and stage 3's "
                "boost of P assumes rows summing to 1 (2 for sclip); use mode='feature' or "
                'switch one off (docs/stages.md#resclip).')

    def _check_stage_compatibility(self, attention: str) -> None:
        self.layer_sums: Tuple[tuple, ...] = ()  # SC-CLIP's fusion sum
        self.needs_last_block = self.scclip is None
        if self.scclip is not None:
            self._check_scclip_compatibility()
            return
        if self.rfclip is not None:
            self._check_rfclip_compatibility()
            return
        if self.similarity_enhancement is not None and attention == 'maskclip':
            raise ValueError("apply_similarity_enhancement=True needs attention logits, but "
                             "attention='maskclip' has none; use another attention variant.")
        layers = self.similarity_enhancement.layers if self.similarity_enhancement else ()
        try:
            self.mid_layers = tuple(self.encoder.block_index(layer) for layer in layers)
        except ValueError as error:
            raise ValueError(f'similarity_enhancement_cfg.layer: {error}') from None
        # the captured attention A feeds stages 3 and 4
        self.needs_attention = (self.self_attn_enhancement is not None
                                or self.outlier_suppression is not None)

    def _stages_switched_on(self) -> List[str]:
        """The keys of stages 2-6 and ``cls_token_lambda`` that are on, as a user sets them."""
        enabled = [f'apply_{name}=True' for name in PIPELINE_STAGES
                   if getattr(self, name) is not None]
        if self.cls_token_lambda:
            enabled.append(f'cls_token_lambda={self.cls_token_lambda}')
        return enabled

    def _check_rfclip_compatibility(self) -> None:
        """RF-CLIP's last block is its own two-branch reduced block: stage 2's bias and
        stage 3's edit have no place in its averaged kk attention, stages 3-4 read the
        standard A, which RF-CLIP does not use, and stages 5-6 / cls_token_lambda would
        be a new method; one error naming the keys that are on."""
        enabled = self._stages_switched_on()
        if enabled:
            raise ValueError(
                f"attention='rfclip' cannot combine with {', '.join(enabled)}: RF-CLIP's "
                'last block averages the key-key attention of every layer over two '
                'propagated inputs and takes no logit bias, P edit or feature stage; switch '
                'them off (docs/stages.md#rf-clip).')
        self.mid_layers = ()
        self.needs_attention = False

    def _check_scclip_compatibility(self) -> None:
        """SC-CLIP never runs the standard last block: no A and no x_cls, which stages 3-6
        and cls_token_lambda read; stage 2's logit bias has no place in its calibrated
        attention (a mixture of G and a softmax, not a logit sum). One error naming the
        keys that are on."""
        enabled = self._stages_switched_on()
        if self.text_refinement is not None:
            enabled.append('apply_text_refinement=True')
        if self.global_semantics_weight:
            enabled.append(f'global_semantics_weight={self.global_semantics_weight}')
        if enabled:
            raise ValueError(
                f"attention='scclip' cannot combine with {', '.join(enabled)}: SC-CLIP never "
                'runs the standard last block, so the attention A and the CLS embedding x_cls '
                'that stages 3-6 and cls_token_lambda read do not exist, and its calibrated '
                'attention takes no logit bias (stage 2); switch them off '
                '(docs/stages.md#sc-clip).')
        scclip = self.scclip
        self.mid_layers = tuple(sorted({scclip.pre_layer, scclip.post_layer}))
        self.layer_sums = (scclip.fusion_layers, ) if scclip.fusion_layers else ()
        self.needs_attention = False

    def _check(self, stage: str, *tensors: Optional[Tensor]) -> None:
        if self.stage_check is not None:
            self.stage_check(stage, tensors)

    def _timed(self, stage: str):
        return self.timer(stage) if self.timer is not None else nullcontext()


def _composed(first, second):
    """The probs hook ``second(first(P))``."""
    def hook(probs: Tensor) -> Tensor:
        return second(first(probs))
    return hook


_COMPILED_STAGES = []


def _compiled_stages():
    """``CropPipeline._stage_patch_logits`` through ``torch.compile`` (one per process,
    built on first use; each pipeline's settings are guards of it)."""
    if not _COMPILED_STAGES:
        _COMPILED_STAGES.append(torch.compile(CropPipeline._stage_patch_logits, dynamic=False))
    return _COMPILED_STAGES[0]
