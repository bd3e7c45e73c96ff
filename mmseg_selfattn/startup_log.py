"""Start-up lines: one per enabled part of the pipeline, with its settings.

The format is the seed's: ``[Self-Attention Enhancement] Enabled with strength=0.1,
threshold=0.15, mode=feature``.
"""
from mmengine.logging import print_log


def log_enabled(title: str, settings: str) -> None:
    print_log(f'[{title}] Enabled with {settings}', logger='current')


def log_model_settings(clip_cfg: dict, attention: str, window: dict, precision: str,
                       class_names, post: dict, cls_token_lambda: float) -> None:
    """The lines of the parts outside stages 2-6: encoder, classifier and
    post-processing, CLS logit debias and PAMR when enabled."""
    crop = window['slide_crop']
    where = (f"slide_crop={crop}, slide_stride={window['slide_stride']}" if crop
             else 'whole image')
    print_log(f"[Encoder] {clip_cfg['arch']} (pretrained={clip_cfg.get('pretrained')}), "
              f'attention={attention}, {where}, precision={precision}', logger='current')
    print_log(f'[Classifier] {len(class_names)} classes '
              f'({sum(map(len, class_names))} queries), '
              f"logit_scale={post['logit_scale']}, prob_thd={post['prob_thd']}, "
              f"area_thd={post['area_thd']}, bg_idx={post['bg_idx']}", logger='current')
    if cls_token_lambda:
        log_enabled('CLS Logit Debias', f'cls_token_lambda={cls_token_lambda}')
    if post['pamr'] is not None:
        log_enabled('PAMR', f"steps={post['pamr'].num_iter}, dilations={post['pamr'].dilations}")
