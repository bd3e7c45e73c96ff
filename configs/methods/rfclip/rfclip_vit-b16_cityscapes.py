# RF-CLIP's protocol on Cityscapes (19 classes): liblacklucy/RF-CLIP configs/cfg_*.py for it over its
# segmentor defaults (_base_/methods/rfclip.py): short side 560, windows 224 / 112, prob_thd 0.0,
# global_semantics_weight 0.1, mean_vector_weight 0.03, h_threshold 0.14.
# global_image 'crop': the code takes each crop's own CLS embedding when the config is named
# 'city_scapes' (CASS's exception), not the whole image.
# Published mIoU with OpenAI's ViT-B/16 weights: not published per benchmark (the paper's
# 8-benchmark average is 44.2 without PAMR, 45.5 with it: rfclip-pamr_vit-b16_*.py).
# Reproduce: --cfg-options model.clip.pretrained=/path/to/ViT-B-16.pt (or 'openai'),
# e.g. python tools/eval_all.py --method rfclip --benchmarks cityscapes.
_base_ = [
    '../../_base_/methods/rfclip.py', '../../_base_/datasets/cityscapes.py',
    '../../_base_/default_runtime.py'
]
test_pipeline = _base_.test_pipeline
test_pipeline[1]['scale'] = (2048, 560)  # short side 560
test_dataloader = dict(dataset=dict(pipeline=test_pipeline))
model = dict(
    name_path={{_base_.name_path}},
    global_semantics_weight=0.1,
    global_image='crop',
    text_refinement_cfg=dict(cluster_threshold=0.14, weight=0.03, top_k=2, linkage='complete'))
