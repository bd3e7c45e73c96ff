# ResCLIP's protocol on COCO-Stuff164k: yvhangyang/ResCLIP's configs/cfg_*.py for it (NACLIP's
# data pipeline and class file) over its segmentor defaults (_base_/methods/resclip.py): short
# side 336, windows 224 / 112, prob_thd 0.0, temp_thd 0.11, tau_r 2.0, lambda_r 0.4, tau_s 1.8,
# lambda_s 0.7.
# Published mIoU with OpenAI's ViT-B/16 weights: 24.7 (ResCLIP README figure
# figs/main_results_wo.png, NACLIP + ResCLIP; NACLIP alone 23.3; published in fp16 on CUDA).
# Reproduce: --cfg-options model.clip.pretrained=/path/to/ViT-B-16.pt (or 'openai'),
# e.g. python tools/eval_all.py --method resclip --benchmarks coco_stuff164k.
_base_ = [
    '../../_base_/methods/resclip.py', '../../_base_/datasets/coco_stuff164k.py',
    '../../_base_/default_runtime.py'
]
model = dict(
    name_path={{_base_.name_path}},
    rcs_cfg=dict(layers=(5, 6, 7, 8), weight=0.4, scale=2.0),
    sfr_cfg=dict(weight=0.7, scale=1.8, threshold=0.11, line_decay=True,
                 exact_line_of_sight=False, blur_std=None, pamr_steps=10, pamr_stride=(8, 16),
                 half_precision_affinity=True))
