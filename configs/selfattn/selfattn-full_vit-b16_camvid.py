# Full six-stage pipeline with the default stage settings of _base_/models.
_base_ = './selfattn_vit-b16_camvid.py'
model = dict(
    apply_similarity_enhancement=True,
    apply_self_attn_enhancement=True,
    apply_outlier_suppression=True,
    apply_global_debias=True,
    apply_ctd=True)
