# NACLIP's protocol on PASCAL Context60 (with background): sinahmr/NACLIP
# configs/cfg_context60.py over its segmentor defaults (_base_/methods/naclip.py): short
# side 336, prob_thd 0.1.
# Published mIoU with OpenAI's ViT-B/16 weights: 34.99 (NACLIP README, PAMR on).
# Reproduce: --cfg-options model.clip.pretrained=/path/to/ViT-B-16.pt (or 'openai').
_base_ = [
    '../../_base_/methods/naclip.py', '../../_base_/datasets/context60.py',
    '../../_base_/default_runtime.py'
]
model = dict(name_path={{_base_.name_path}}, prob_thd=0.1)
