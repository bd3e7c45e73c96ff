# Layer-wise adaptation: the enhancement also in the block before the dense one (its own
# attention), with a smaller strength than in the dense last block (docs/stages.md §3).
_base_ = './1_prevention.py'
model = dict(self_attn_enhancement_cfg=dict(layers=[-2, -1], enhancement_strength=[0.05, 0.1]))
