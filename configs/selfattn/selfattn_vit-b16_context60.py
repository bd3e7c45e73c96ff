# PASCAL Context60 (with background): our pipeline (NACLIP attention, stages off) with
# the data and post-processing settings of SCLIP configs/cfg_context60.py: short side
# 336, logit_scale 50.0, prob_thd 0.1.
_base_ = [
    '../_base_/models/selfattn_clip.py', '../_base_/datasets/context60.py',
    '../_base_/default_runtime.py'
]
model = dict(name_path={{_base_.name_path}}, logit_scale=50.0, prob_thd=0.1, bg_idx=0)
