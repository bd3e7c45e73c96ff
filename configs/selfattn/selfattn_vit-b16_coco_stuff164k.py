# COCO-Stuff164k (171 classes): our pipeline (NACLIP attention, stages off) with the
# data and post-processing settings of SCLIP configs/cfg_coco_stuff164k.py: short side
# 448.
_base_ = [
    '../_base_/models/selfattn_clip.py', '../_base_/datasets/coco_stuff164k.py',
    '../_base_/default_runtime.py'
]
test_pipeline = _base_.test_pipeline
test_pipeline[1]['scale'] = (2048, 448)  # short side 448
test_dataloader = dict(dataset=dict(pipeline=test_pipeline))
model = dict(name_path={{_base_.name_path}})
