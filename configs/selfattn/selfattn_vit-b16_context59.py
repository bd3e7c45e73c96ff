# PASCAL Context59 (no background): our pipeline (NACLIP attention, stages off) with the
# data and post-processing settings of SCLIP configs/cfg_context59.py: short side 336.
_base_ = [
    '../_base_/models/selfattn_clip.py', '../_base_/datasets/context59.py',
    '../_base_/default_runtime.py'
]
model = dict(name_path={{_base_.name_path}})
