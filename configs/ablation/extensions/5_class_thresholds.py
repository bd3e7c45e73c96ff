# Class-specific thresholds: thin or small CamVid classes get a higher τ than the large
# stuff classes (docs/stages.md section 3); illustrative values, tune per dataset.
_base_ = './1_prevention.py'
model = dict(self_attn_enhancement_cfg=dict(
    class_thresholds={'pole': 0.25, 'sign symbol': 0.25, 'pedestrian': 0.2, 'sky': 0.1,
                      'road': 0.1}))
