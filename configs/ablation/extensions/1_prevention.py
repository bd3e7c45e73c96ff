# Prevention: outlier scores from the attention that self-attention enhancement boosted
# (score_attention='enhanced', the default; docs/stages.md section 4).
_base_ = '../../selfattn/selfattn-full_vit-b16_camvid.py'
model = dict(outlier_suppression_cfg=dict(score_attention='enhanced'))
