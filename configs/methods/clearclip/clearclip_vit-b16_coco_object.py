# ClearCLIP's protocol on COCO-Object (80 things + background): mc-lan/ClearCLIP
# configs/cfg_coco_object.py over its segmentor defaults (_base_/methods/clearclip.py):
# short side 448, prob_thd 0.4.
# Published mIoU with OpenAI's ViT-B/16 weights: 33.0 (ClearCLIP paper, ECCV 2024, Table 1).
# Reproduce: --cfg-options model.clip.pretrained=/path/to/ViT-B-16.pt (or 'openai').
_base_ = [
    '../../_base_/methods/clearclip.py', '../../_base_/datasets/coco_object.py',
    '../../_base_/default_runtime.py'
]
test_pipeline = _base_.test_pipeline
test_pipeline[1]['scale'] = (2048, 448)  # short side 448
test_dataloader = dict(dataset=dict(pipeline=test_pipeline))
model = dict(name_path={{_base_.name_path}}, prob_thd=0.4)
