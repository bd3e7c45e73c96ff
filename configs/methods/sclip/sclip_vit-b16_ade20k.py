# SCLIP's protocol on ADE20K (150 classes): wangf3014/SCLIP configs/cfg_ade20k.py over
# its segmentor defaults (_base_/methods/sclip.py): short side 336.
# Published mIoU with OpenAI's ViT-B/16 weights: 16.45 (SCLIP README).
# Reproduce: --cfg-options model.clip.pretrained=/path/to/ViT-B-16.pt (or 'openai').
_base_ = [
    '../../_base_/methods/sclip.py', '../../_base_/datasets/ade20k.py',
    '../../_base_/default_runtime.py'
]
model = dict(name_path={{_base_.name_path}})
