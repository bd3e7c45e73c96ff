# SCLIP's protocol on COCO-Object (80 things + background): wangf3014/SCLIP
# configs/cfg_coco_object.py over its segmentor defaults (_base_/methods/sclip.py):
# short side 336, logit_scale 50.0, prob_thd 0.1.
# Published mIoU with OpenAI's ViT-B/16 weights: 33.52 (SCLIP README).
# Reproduce: --cfg-options model.clip.pretrained=/path/to/ViT-B-16.pt (or 'openai').
_base_ = [
    '../../_base_/methods/sclip.py', '../../_base_/datasets/coco_object.py',
    '../../_base_/default_runtime.py'
]
model = dict(name_path={{_base_.name_path}}, logit_scale=50.0, prob_thd=0.1)
