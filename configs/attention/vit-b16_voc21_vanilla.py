# VOC21 foundation config with the last block's dense attention set to 'vanilla'
# (SPEC.md section 3).
_base_ = '../selfattn/selfattn_vit-b16_voc21.py'
model = dict(attention='vanilla')
