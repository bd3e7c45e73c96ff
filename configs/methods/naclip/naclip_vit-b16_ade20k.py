# NACLIP's protocol on ADE20K (150 classes): sinahmr/NACLIP configs/cfg_ade20k.py over
# its segmentor defaults (_base_/methods/naclip.py): short side 336.
# Published mIoU with OpenAI's ViT-B/16 weights: 19.05 (NACLIP README, PAMR on).
# Reproduce: --cfg-options model.clip.pretrained=/path/to/ViT-B-16.pt (or 'openai').
_base_ = [
    '../../_base_/methods/naclip.py', '../../_base_/datasets/ade20k.py',
    '../../_base_/default_runtime.py'
]
model = dict(name_path={{_base_.name_path}})
