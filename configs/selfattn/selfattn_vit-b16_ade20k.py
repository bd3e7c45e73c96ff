# ADE20K, 150 classes, no background query: the model base's defaults
# (logit_scale=40, no thresholds) as in the published SCLIP/NACLIP cfg_ade20k.py.
_base_ = [
    '../_base_/models/selfattn_clip.py', '../_base_/datasets/ade20k.py',
    '../_base_/default_runtime.py'
]
model = dict(name_path={{_base_.name_path}})
