_base_ = './2_self_attn.py'
model = dict(apply_outlier_suppression=True)
