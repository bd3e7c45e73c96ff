# Multi-scale inference: the whole pipeline at 3 scales, query logits averaged at the
# original size before post-processing (model.test_scales; docs/stages.md).
_base_ = './1_prevention.py'
model = dict(test_scales=(0.75, 1.0, 1.25))
