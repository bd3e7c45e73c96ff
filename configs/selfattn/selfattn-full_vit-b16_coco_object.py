# Full six-stage pipeline with the default stage settings of _base_/models.
_base_ = ['./selfattn_vit-b16_coco_object.py', '../_base_/all_stages.py']
model = {{_base_.all_stages_on}}
