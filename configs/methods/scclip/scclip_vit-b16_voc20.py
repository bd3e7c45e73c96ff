# SC-CLIP's protocol on PASCAL VOC20 (no background): SuleBai/SC-CLIP configs/cfg_voc20.py
# over its segmentor defaults (_base_/methods/scclip.py): short side 336.
# Published mIoU with OpenAI's ViT-B/16 weights: 84.3 (SC-CLIP README radar chart
# figs/scclip.jpg, published in fp16 on CUDA; here SC-CLIP's last block runs in fp32).
# Reproduce: --cfg-options model.clip.pretrained=/path/to/ViT-B-16.pt (or 'openai'),
# e.g. python tools/eval_all.py --method scclip --benchmarks voc20.
_base_ = [
    '../../_base_/methods/scclip.py', '../../_base_/datasets/voc20.py',
    '../../_base_/default_runtime.py'
]
model = dict(name_path={{_base_.name_path}})
