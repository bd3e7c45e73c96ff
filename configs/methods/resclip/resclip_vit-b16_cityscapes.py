# ResCLIP's protocol on Cityscapes (19 classes): yvhangyang/ResCLIP's configs/cfg_*.py for it
# (NACLIP's data pipeline and class file) over its segmentor defaults
# (_base_/methods/resclip.py): short side 560, windows 224 / 112, prob_thd 0.0, temp_thd 0.1,
# tau_r 2.0, lambda_r 0.2, tau_s 2.1, lambda_s 0.6.
# Published mIoU with OpenAI's ViT-B/16 weights: 35.9 (ResCLIP README figure
# figs/main_results_wo.png, NACLIP + ResCLIP; NACLIP alone 35.5; published in fp16 on CUDA).
# Reproduce: --cfg-options model.clip.pretrained=/path/to/ViT-B-16.pt (or 'openai'),
# e.g. python tools/eval_all.py --method resclip --benchmarks cityscapes.
_base_ = [
    '../../_base_/methods/resclip.py', '../../_base_/datasets/cityscapes.py',
    '../../_base_/default_runtime.py'
]
test_pipeline = _base_.test_pipeline
test_pipeline[1]['scale'] = (2048, 560)  # short side 560
test_dataloader = dict(dataset=dict(pipeline=test_pipeline))
model = dict(
    name_path={{_base_.name_path}},
    rcs_cfg=dict(layers=(5, 6, 7, 8), weight=0.2, scale=2.0),
    sfr_cfg=dict(weight=0.6, scale=2.1, threshold=0.1, line_decay=True,
                 exact_line_of_sight=False, blur_std=None, pamr_steps=10, pamr_stride=(8, 16),
                 half_precision_affinity=True))
