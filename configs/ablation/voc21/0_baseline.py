# Ablation on voc21: each file adds one stage to the previous one (tools/ablate.py).
_base_ = '../../selfattn/selfattn_vit-b16_voc21.py'
