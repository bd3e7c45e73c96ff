# ResCLIP (Yang et al., CVPR 2025; yvhangyang/ResCLIP): NACLIP's segmentor plus ResCLIP's two
# modules (shared/methods/resclip.md), which every configs/cfg_<dataset>.py starts from. The
# README's main rows are `test_all.sh wo_resi resclip 5`: NACLIP's attention (k-k plus a
# Gaussian window of std 5, reduced last block) with RCS (the per-head mean attention of
# blocks 6-9 mixed into P) and SFR (pass 1 -> PAMR-refined patch labels -> the affinity S
# added to the logits of pass 2); docs/stages.md#resclip. Windows of 224 with stride 112;
# the final PAMR is off (pass 1's PAMR, 10 steps, dilations (8, 16), is part of SFR).
# The per-benchmark leaves set tau_r/lambda_r (rcs_cfg), tau_s/lambda_s and temp_thd
# (sfr_cfg) and prob_thd; the values below are the class defaults' stand-ins.
_base_ = '../models/selfattn_clip.py'
model = dict(
    attention='naclip',  # attn_strategy='resclip' (the naclip branch line for line)
    gaussian_std=5.0,  # also the SFR blur's std (sfr_cfg.blur_std=None)
    apply_rcs=True,
    rcs_cfg=dict(layers=(5, 6, 7, 8), weight=0.3, scale=2.0),  # blocks 6-9, lambda_r, tau_r
    apply_sfr=True,
    sfr_cfg=dict(
        weight=0.7,  # lambda_s
        scale=1.8,  # tau_s
        threshold=0.3,  # temp_thd
        line_decay=True,  # delete_same_entity (every config)
        exact_line_of_sight=False,  # the published truncated check
        blur_std=None,  # = gaussian_std
        pamr_steps=10,  # pass 1's PAMR, hard-coded
        pamr_stride=(8, 16),
        half_precision_affinity=True),  # the published fp16 cast of S
    slide_crop=224,
    slide_stride=112,
    logit_scale=40.0,
    prob_thd=0.0,
    area_thd=0.0,  # ResCLIP: area_thd=None (dead)
    pamr_steps=0,
    pamr_stride=(8, 16))
