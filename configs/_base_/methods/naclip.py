# NACLIP (sinahmr/NACLIP): the NACLIPSegmentation class defaults, which every
# cfg_<dataset>.py of the repository starts from. Its attention: k-k plus a Gaussian
# neighbourhood window (std 5), "reduced" last block (no residual, no FFN). PAMR is ON by
# default (its eval.py --pamr on: 10 steps, dilations (8, 16)); its README's numbers use it.
_base_ = '../models/selfattn_clip.py'
model = dict(
    attention='naclip',
    gaussian_std=5.0,
    slide_crop=224,
    slide_stride=112,
    logit_scale=40.0,
    prob_thd=0.0,
    area_thd=0.0,
    pamr_steps=10,
    pamr_stride=(8, 16))
