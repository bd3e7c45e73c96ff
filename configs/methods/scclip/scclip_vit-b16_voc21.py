# SC-CLIP's protocol on PASCAL VOC21 (with background): SuleBai/SC-CLIP
# configs/cfg_voc21.py over its segmentor defaults (_base_/methods/scclip.py): short side
# 336, logit_scale 50.0, prob_thd 0.15, area_thd 0.1.
# Published mIoU with OpenAI's ViT-B/16 weights: 64.6 (SC-CLIP README radar chart
# figs/scclip.jpg, published in fp16 on CUDA; here SC-CLIP's last block runs in fp32).
# Reproduce: --cfg-options model.clip.pretrained=/path/to/ViT-B-16.pt (or 'openai'),
# e.g. python tools/eval_all.py --method scclip --benchmarks voc21.
_base_ = [
    '../../_base_/methods/scclip.py', '../../_base_/datasets/voc21.py',
    '../../_base_/default_runtime.py'
]
model = dict(name_path={{_base_.name_path}}, logit_scale=50.0, prob_thd=0.15, area_thd=0.1)
