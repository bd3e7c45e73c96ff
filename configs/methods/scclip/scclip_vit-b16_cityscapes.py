# SC-CLIP's protocol on Cityscapes (19 classes): SuleBai/SC-CLIP
# configs/cfg_city_scapes.py over its segmentor defaults (_base_/methods/scclip.py): short
# side 560.
# Published mIoU with OpenAI's ViT-B/16 weights: 41.0 (SC-CLIP README radar chart
# figs/scclip.jpg, published in fp16 on CUDA; here SC-CLIP's last block runs in fp32).
# Reproduce: --cfg-options model.clip.pretrained=/path/to/ViT-B-16.pt (or 'openai'),
# e.g. python tools/eval_all.py --method scclip --benchmarks cityscapes.
_base_ = [
    '../../_base_/methods/scclip.py', '../../_base_/datasets/cityscapes.py',
    '../../_base_/default_runtime.py'
]
test_pipeline = _base_.test_pipeline
test_pipeline[1]['scale'] = (2048, 560)  # short side 560
test_dataloader = dict(dataset=dict(pipeline=test_pipeline))
model = dict(name_path={{_base_.name_path}})
