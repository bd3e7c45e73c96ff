# RF-CLIP's protocol on ADE20K (150 classes): liblacklucy/RF-CLIP configs/cfg_*.py for it over its
# segmentor defaults (_base_/methods/rfclip.py): short side 336, windows 224 / 112, prob_thd 0.0,
# global_semantics_weight 0.3, mean_vector_weight 0.05, h_threshold 0.06.
# Published mIoU with OpenAI's ViT-B/16 weights: not published per benchmark (the paper's
# 8-benchmark average is 44.2 without PAMR, 45.5 with it: rfclip-pamr_vit-b16_*.py).
# Reproduce: --cfg-options model.clip.pretrained=/path/to/ViT-B-16.pt (or 'openai'),
# e.g. python tools/eval_all.py --method rfclip --benchmarks ade20k.
_base_ = [
    '../../_base_/methods/rfclip.py', '../../_base_/datasets/ade20k.py',
    '../../_base_/default_runtime.py'
]
model = dict(
    name_path={{_base_.name_path}},
    global_semantics_weight=0.3,
    text_refinement_cfg=dict(cluster_threshold=0.06, weight=0.05, top_k=2, linkage='complete'))
