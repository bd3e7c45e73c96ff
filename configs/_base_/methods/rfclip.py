# RF-CLIP (liblacklucy/RF-CLIP at c2b333e): the RF_CLIP segmentor's class defaults (CASS's
# segmentor without DINO, NACLIP's encoder fork), which every configs/cfg_<dataset>.py of
# the repository starts from (../shared/methods/rf-clip.md §4). Its parts
# (docs/stages.md#rf-clip): the distraction filter after every block (the published
# channel list of OpenAI ViT-B/16), the reduced last block over the layer mean and the
# block input with the key-key attention of all 12 layers averaged (attention='rfclip'),
# and CASS's per-crop text refinement and global mix with the whole image's CLIP embedding
# (computed once per image; the code recomputes it for every crop, same value). Windows of
# 224 with stride 112; PAMR off (eval.py's default and eval_all.sh's `--pamr off`).
# The per-dataset gamma, a and h are set by each leaf config.
_base_ = '../models/selfattn_clip.py'
model = dict(
    attention='rfclip',
    rfclip_cfg=dict(
        kk_layers='all',  # K^0..K^{L-2} and the last block's, averaged (1/L)
        propagation_threshold=0.4,  # beta (hard-coded)
        branches=('block_input', 'layer_mean'),  # the two inputs, averaged
        normalize_propagation=False),  # the code's S has no row normalisation
    apply_distraction_filter=True,
    distraction_filter_cfg=dict(
        channels=(4, 162, 189, 326, 429, 474, 633, 713),  # hard-coded, ViT-B/16 only
        sigma=5.0,  # tau = 5 / 768 (hard-coded)
        alpha=0.4,  # (hard-coded)
        layers='all',  # after every block, the last included
        shift_by_min=True),  # the code's (f - min f) / sum(f - min f)
    apply_text_refinement=True,
    text_refinement_cfg=dict(cluster_threshold=0.1, weight=0.03, top_k=2, linkage='complete'),
    global_semantics_weight=0.0,
    global_image='whole',  # Cityscapes: 'crop' (the code's 'city_scapes' exception)
    slide_crop=224,
    slide_stride=112,
    logit_scale=40.0,
    prob_thd=0.0,
    area_thd=0.0,  # RF-CLIP: none
    pamr_steps=0,  # the class default is 10, but eval.py (default and eval_all.sh) sets 0
    pamr_stride=(8, 16),
    cuda_graph=False)  # the whole-image embedding is attached outside the pooled graphs
