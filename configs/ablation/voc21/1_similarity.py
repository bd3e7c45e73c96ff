_base_ = './0_baseline.py'
model = dict(apply_similarity_enhancement=True)
