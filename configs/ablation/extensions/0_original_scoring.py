# The seed's extensions on CamVid, one at a time over the full pipeline (tools/ablate.py).
# Row 0: outlier suppression scores with the unenhanced attention A (before prevention).
_base_ = '../../selfattn/selfattn-full_vit-b16_camvid.py'
model = dict(outlier_suppression_cfg=dict(score_attention='original'))
