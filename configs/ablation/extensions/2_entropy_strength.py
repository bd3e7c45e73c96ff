# Dynamic strength s_i = s * H_i / log T (docs/stages.md section 3).
_base_ = './1_prevention.py'
model = dict(self_attn_enhancement_cfg=dict(strength_mode='entropy'))
