# Dynamic strength s_i = s * min(1, r_i / ratio_ref) (docs/stages.md section 3).
_base_ = './1_prevention.py'
model = dict(self_attn_enhancement_cfg=dict(strength_mode='cls_ratio', ratio_ref=1.0))
