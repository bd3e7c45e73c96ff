# RF-CLIP's protocol on PASCAL Context60 (with background): liblacklucy/RF-CLIP configs/cfg_*.py for it over its
# segmentor defaults (_base_/methods/rfclip.py): short side 336, windows 224 / 112, prob_thd 0.1,
# global_semantics_weight 0.25, mean_vector_weight 0.04, h_threshold 0.09.
# Published mIoU with OpenAI's ViT-B/16 weights: not published per benchmark (the paper's
# 8-benchmark average is 44.2 without PAMR, 45.5 with it: rfclip-pamr_vit-b16_*.py).
# Reproduce: --cfg-options model.clip.pretrained=/path/to/ViT-B-16.pt (or 'openai'),
# e.g. python tools/eval_all.py --method rfclip --benchmarks context60.
_base_ = [
    '../../_base_/methods/rfclip.py', '../../_base_/datasets/context60.py',
    '../../_base_/default_runtime.py'
]
model = dict(
    name_path={{_base_.name_path}},
    prob_thd=0.1,
    global_semantics_weight=0.25,
    text_refinement_cfg=dict(cluster_threshold=0.09, weight=0.04, top_k=2, linkage='complete'))
