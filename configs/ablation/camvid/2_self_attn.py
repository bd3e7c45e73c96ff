_base_ = './1_similarity.py'
model = dict(apply_self_attn_enhancement=True)
