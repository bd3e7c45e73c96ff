# ResCLIP's protocol on PASCAL VOC20 (no background): yvhangyang/ResCLIP's configs/cfg_*.py for
# it (NACLIP's data pipeline and class file) over its segmentor defaults
# (_base_/methods/resclip.py): short side 336, slide_crop 0 (whole image), prob_thd 0.0, temp_thd
# 0.1, tau_r 2.0, lambda_r 0.6, tau_s 2.1, lambda_s 0.6.
# Published mIoU with OpenAI's ViT-B/16 weights: 86.0 (ResCLIP README figure
# figs/main_results_wo.png, NACLIP + ResCLIP; NACLIP alone 79.7; published in fp16 on CUDA).
# Reproduce: --cfg-options model.clip.pretrained=/path/to/ViT-B-16.pt (or 'openai'),
# e.g. python tools/eval_all.py --method resclip --benchmarks voc20.
_base_ = [
    '../../_base_/methods/resclip.py', '../../_base_/datasets/voc20.py',
    '../../_base_/default_runtime.py'
]
model = dict(
    name_path={{_base_.name_path}}, slide_crop=0,
    rcs_cfg=dict(layers=(5, 6, 7, 8), weight=0.6, scale=2.0),
    sfr_cfg=dict(weight=0.6, scale=2.1, threshold=0.1, line_decay=True,
                 exact_line_of_sight=False, blur_std=None, pamr_steps=10, pamr_stride=(8, 16),
                 half_precision_affinity=True))
