# Frozen CLIP ViT-B/16, NACLIP attention, every post-hoc stage off.
# Stage keys and their math: SPEC.md sections 1-3.
model = dict(
    type='SelfAttnCLIPSegmentor',
    # CLIP's pixel statistics (OpenAI), in 0-255 RGB
    data_preprocessor=dict(
        type='SizeAgnosticSegDataPreProcessor',  # test batches may mix sizes
        mean=[122.771, 116.746, 104.094],
        std=[68.501, 66.632, 70.323],
        bgr_to_rgb=True,
        non_blocking=True,
        pad_val=0,
        seg_pad_val=255),
    clip=dict(arch='ViT-B-16', pretrained='openai'),
    attention='naclip',
    gaussian_std=5.0,
    # SC-CLIP's settings, read by attention='scclip' only (0-based blocks of ViT-B/16)
    scclip_cfg=dict(
        anomaly_neighbours=30, anomaly_contamination=0.05, pre_layer=8, post_layer=3,
        similarity_threshold=0.4, similarity_scale=3.0, fusion_layers=(3, 4, 5, 6, 7, 8, 9),
        cls_residual=0.3),
    # ResCLIP's RCS and SFR in the dense last block (naclip / sclip / clearclip / vanilla),
    # off here with their defaults (docs/stages.md#resclip; 0-based blocks of ViT-B/16)
    apply_rcs=False,
    rcs_cfg=dict(layers=(5, 6, 7, 8), weight=0.3, scale=2.0),
    apply_sfr=False,
    sfr_cfg=dict(weight=0.7, scale=1.8, threshold=0.3, line_decay=True,
                 exact_line_of_sight=False, blur_std=None, pamr_steps=10, pamr_stride=(8, 16),
                 half_precision_affinity=True),
    # RF-CLIP's parts (docs/stages.md#rf-clip), off here with their published values: its
    # last block (attention='rfclip'), the distraction filter after every block (channels
    # None: the published list, OpenAI ViT-B/16 only), CASS's text refinement and global mix
    rfclip_cfg=dict(kk_layers='all', propagation_threshold=0.4,
                    branches=('block_input', 'layer_mean'), normalize_propagation=False),
    apply_distraction_filter=False,
    distraction_filter_cfg=dict(channels=None, sigma=5.0, alpha=0.4, layers='all',
                                shift_by_min=True),
    apply_text_refinement=False,
    text_refinement_cfg=dict(cluster_threshold=0.1, weight=0.03, top_k=2, linkage='complete'),
    global_semantics_weight=0.0,
    global_image='whole',  # g of the whole image ('crop': of each window)
    name_path=None,  # set by each leaf config from its dataset base
    slide_crop=224,
    slide_stride=112,
    test_scales=(1.0, ),  # multi-scale inference, e.g. (0.75, 1.0, 1.25)
    max_crops_per_forward=64,  # crops of all images of a batch, per ViT forward
    precision='auto',  # fp16 on a GPU machine, fp32 on CPU; or 'fp32' / 'fp16' / 'bf16'
    cuda_graph=False,  # GPU: True replays CUDA graphs of shapes that recur (config_keys.md)
    compile=False,  # torch.compile: recompiles per shape, rarely pays off (performance.md)
    logit_scale=40.0,
    prob_thd=0.0,
    area_thd=0.0,
    bg_idx=0,
    pamr_steps=0,
    pamr_stride=(8, 16),
    # Stages 2-6 (SPEC §1), in pipeline order; each off here, with its defaults.
    apply_similarity_enhancement=False,
    similarity_enhancement_cfg=dict(
        layer=-4, weight=1.0, temperature=1.0, add_self_similarity=True,
        threshold=None),
    apply_self_attn_enhancement=False,
    self_attn_enhancement_cfg=dict(
        enhancement_strength=0.1, min_self_attn_threshold=0.15,
        mode='feature', strength_mode='fixed', ratio_ref=1.0,
        class_thresholds={},  # {} (not None): a leaf config can add classes
        layers=(-1, )),  # -1: the dense last block; earlier blocks: layer-wise
    apply_outlier_suppression=False,
    outlier_suppression_cfg=dict(
        top_k=10, min_ratio=None, interpolation='mean',
        neighbour_decontamination=0.0,
        score_attention='enhanced'),  # Ã when stage 3 is on (prevention), or 'original'
    apply_global_debias=False,
    global_debias_cfg=dict(factor=0.2),
    cls_token_lambda=0.0,
    apply_ctd=False,
    ctd_cfg=dict(eps=0.2, min_samples=4, scale=0.5, refine=0.0))
