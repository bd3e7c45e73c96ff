# RF-CLIP's protocol on COCO-Stuff164k (171 classes): liblacklucy/RF-CLIP configs/cfg_*.py for it over its
# segmentor defaults (_base_/methods/rfclip.py): short side 336, whole image (slide_crop 0), prob_thd 0.0,
# global_semantics_weight 0.2, mean_vector_weight 0.02, h_threshold 0.02.
# slide_crop 0 as at c2b333e (the version ab123c1 of the repository used windows 224 / 112:
# --cfg-options model.slide_crop=224).
# Published mIoU with OpenAI's ViT-B/16 weights: not published per benchmark (the paper's
# 8-benchmark average is 44.2 without PAMR, 45.5 with it: rfclip-pamr_vit-b16_*.py).
# Reproduce: --cfg-options model.clip.pretrained=/path/to/ViT-B-16.pt (or 'openai'),
# e.g. python tools/eval_all.py --method rfclip --benchmarks coco_stuff164k.
_base_ = [
    '../../_base_/methods/rfclip.py', '../../_base_/datasets/coco_stuff164k.py',
    '../../_base_/default_runtime.py'
]
model = dict(
    name_path={{_base_.name_path}},
    slide_crop=0,
    global_semantics_weight=0.2,
    text_refinement_cfg=dict(cluster_threshold=0.02, weight=0.02, top_k=2, linkage='complete'))
