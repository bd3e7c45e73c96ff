# ClearCLIP (mc-lan/ClearCLIP): the ClearCLIPSegmentation class defaults, which every
# cfg_<dataset>.py of the repository starts from. Its attention: q-q, last block without
# residual and FFN. Windows of 448 with stride 224; every dataset uses short side 448.
_base_ = '../models/selfattn_clip.py'
model = dict(
    attention='clearclip',
    slide_crop=448,
    slide_stride=224,
    logit_scale=50.0,
    prob_thd=0.0,
    area_thd=0.0,
    pamr_steps=0,
    pamr_stride=(8, 16))
