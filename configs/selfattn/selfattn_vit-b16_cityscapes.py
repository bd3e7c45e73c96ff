# Cityscapes (19 classes): our pipeline (NACLIP attention, stages off) with the data and
# post-processing settings of SCLIP configs/cfg_city_scapes.py: short side 560.
_base_ = [
    '../_base_/models/selfattn_clip.py', '../_base_/datasets/cityscapes.py',
    '../_base_/default_runtime.py'
]
test_pipeline = _base_.test_pipeline
test_pipeline[1]['scale'] = (2048, 560)  # short side 560
test_dataloader = dict(dataset=dict(pipeline=test_pipeline))
model = dict(name_path={{_base_.name_path}})
