# RF-CLIP on PASCAL Context59 (no background) with PAMR (10 steps, dilations (8, 16): the RF_CLIP class default,
# eval.py --pamr on), the setting of the paper's 45.5 average (44.2 without).
# Published mIoU with OpenAI's ViT-B/16 weights: not published per benchmark.
# Reproduce: python tools/eval_all.py --method rfclip-pamr --benchmarks context59 --cfg-options
# model.clip.pretrained=/path/to/ViT-B-16.pt.
_base_ = './rfclip_vit-b16_context59.py'
model = dict(pamr_steps=10, pamr_stride=(8, 16))
