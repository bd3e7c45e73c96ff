# SCLIP (wangf3014/SCLIP): the SCLIPSegmentation class defaults, which every
# cfg_<dataset>.py of the repository starts from. Its attention: q-q + k-k, residual
# and FFN of the last block kept.
_base_ = '../models/selfattn_clip.py'
model = dict(
    attention='sclip',
    slide_crop=224,
    slide_stride=112,
    logit_scale=40.0,
    prob_thd=0.0,
    area_thd=0.0,  # SCLIP: area_thd=None (off)
    pamr_steps=0,
    pamr_stride=(8, 16))
