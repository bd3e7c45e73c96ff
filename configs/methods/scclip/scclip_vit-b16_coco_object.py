# SC-CLIP's protocol on COCO-Object (80 things + background): SuleBai/SC-CLIP
# configs/cfg_coco_object.py over its segmentor defaults (_base_/methods/scclip.py): short
# side 336, logit_scale 55.0, prob_thd 0.35.
# Published mIoU with OpenAI's ViT-B/16 weights: 37.7 (SC-CLIP README radar chart
# figs/scclip.jpg, published in fp16 on CUDA; here SC-CLIP's last block runs in fp32).
# Reproduce: --cfg-options model.clip.pretrained=/path/to/ViT-B-16.pt (or 'openai'),
# e.g. python tools/eval_all.py --method scclip --benchmarks coco_object.
_base_ = [
    '../../_base_/methods/scclip.py', '../../_base_/datasets/coco_object.py',
    '../../_base_/default_runtime.py'
]
model = dict(name_path={{_base_.name_path}}, logit_scale=55.0, prob_thd=0.35)
