# CamVid, 11 classes, no background class (so no prob/area thresholds). Not in
# the SCLIP/NACLIP papers: their no-background defaults (logit_scale=40) apply.
_base_ = [
    '../_base_/models/selfattn_clip.py', '../_base_/datasets/camvid.py',
    '../_base_/default_runtime.py'
]
model = dict(name_path={{_base_.name_path}})
