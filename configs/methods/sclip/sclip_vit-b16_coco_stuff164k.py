# SCLIP's protocol on COCO-Stuff164k (171 classes): wangf3014/SCLIP
# configs/cfg_coco_stuff164k.py over its segmentor defaults (_base_/methods/sclip.py):
# short side 448.
# Published mIoU with OpenAI's ViT-B/16 weights: 22.77 (SCLIP README).
# Reproduce: --cfg-options model.clip.pretrained=/path/to/ViT-B-16.pt (or 'openai').
_base_ = [
    '../../_base_/methods/sclip.py', '../../_base_/datasets/coco_stuff164k.py',
    '../../_base_/default_runtime.py'
]
test_pipeline = _base_.test_pipeline
test_pipeline[1]['scale'] = (2048, 448)  # short side 448
test_dataloader = dict(dataset=dict(pipeline=test_pipeline))
model = dict(name_path={{_base_.name_path}})
