# Switches every stage of the pipeline on (settings: _base_/models/selfattn_clip.py).
all_stages_on = dict(
    apply_similarity_enhancement=True,
    apply_self_attn_enhancement=True,
    apply_outlier_suppression=True,
    apply_global_debias=True,
    apply_ctd=True)
