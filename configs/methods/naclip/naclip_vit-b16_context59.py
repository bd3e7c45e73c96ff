# NACLIP's protocol on PASCAL Context59 (no background): sinahmr/NACLIP
# configs/cfg_context59.py over its segmentor defaults (_base_/methods/naclip.py): short
# side 336.
# Published mIoU with OpenAI's ViT-B/16 weights: 38.35 (NACLIP README, PAMR on).
# Reproduce: --cfg-options model.clip.pretrained=/path/to/ViT-B-16.pt (or 'openai').
_base_ = [
    '../../_base_/methods/naclip.py', '../../_base_/datasets/context59.py',
    '../../_base_/default_runtime.py'
]
model = dict(name_path={{_base_.name_path}})
