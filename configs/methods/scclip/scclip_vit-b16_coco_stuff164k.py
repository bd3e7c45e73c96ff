# SC-CLIP's protocol on COCO-Stuff164k (171 classes): SuleBai/SC-CLIP
# configs/cfg_coco_stuff164k.py over its segmentor defaults (_base_/methods/scclip.py):
# short side 336 (SCLIP: 448).
# Published mIoU with OpenAI's ViT-B/16 weights: 26.6 (SC-CLIP README radar chart
# figs/scclip.jpg, published in fp16 on CUDA; here SC-CLIP's last block runs in fp32).
# Reproduce: --cfg-options model.clip.pretrained=/path/to/ViT-B-16.pt (or 'openai'),
# e.g. python tools/eval_all.py --method scclip --benchmarks coco_stuff164k.
_base_ = [
    '../../_base_/methods/scclip.py', '../../_base_/datasets/coco_stuff164k.py',
    '../../_base_/default_runtime.py'
]
model = dict(name_path={{_base_.name_path}})
