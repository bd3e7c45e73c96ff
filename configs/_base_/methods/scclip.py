# SC-CLIP (SuleBai/SC-CLIP): SCLIP's segmentor defaults plus SC-CLIP's five arguments
# (scclip_segmentor.py, clip/model.py), which every configs/cfg_<dataset>.py starts from.
# Its last block (attention='scclip', docs/stages.md#sc-clip): LOF anomalies of the last
# block's input resolved by their neighbours, a k-k attention mixed with the similarity of
# block 8, post-aggregation by the similarity of block 3, and the fusion branch of blocks
# 3..9 (summed); no standard last block, so stages 2-6 stay off. Windows of 224 with
# stride 112; PAMR off. The values below are the code's (none of its configs changes them).
_base_ = '../models/selfattn_clip.py'
model = dict(
    attention='scclip',
    scclip_cfg=dict(
        anomaly_neighbours=30,  # LOF n_neighbors (hard-coded)
        anomaly_contamination=0.05,  # LOF contamination (hard-coded)
        pre_layer=8,  # pre_adjust_idx
        post_layer=3,  # post_adjust_idx
        similarity_threshold=0.4,  # beta (a VisionTransformer attribute)
        similarity_scale=3.0,  # tau (hard-coded)
        fusion_layers=(3, 4, 5, 6, 7, 8, 9),  # range(multi_start_idx=3, multi_end_idx=10)
        cls_residual=0.3),  # res_cls
    slide_crop=224,
    slide_stride=112,
    logit_scale=40.0,
    prob_thd=0.0,
    area_thd=0.0,  # SC-CLIP: area_thd=None (off)
    pamr_steps=0,
    pamr_stride=(8, 16))
