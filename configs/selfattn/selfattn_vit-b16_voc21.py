# PASCAL VOC 21 (with background). logit_scale=65, prob_thd=0.1, area_thd=0.1
# and background at index 0 follow the published SCLIP cfg_voc21.py (which
# NACLIP reuses); the data pipeline is SCLIP's (short side 336, 224/112 slide).
_base_ = [
    '../_base_/models/selfattn_clip.py', '../_base_/datasets/voc21.py',
    '../_base_/default_runtime.py'
]
model = dict(
    name_path={{_base_.name_path}},
    logit_scale=65.0,
    prob_thd=0.1,
    area_thd=0.1,
    bg_idx=0)
