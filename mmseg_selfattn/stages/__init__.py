"""Stages 2-6 of the pipeline (SPEC §1), one file each, in pipeline order.

Each stage is a pure function of tensors plus a thin registered module holding
its validated config; the segmentor builds them with ``build_stage``.
"""
from typing import Optional

from mmseg.registry import MODELS
from torch import nn

from ..config_checks import check_keys, init_defaults
from .ctd import ClusterTokenDebias
from .global_debias import GlobalDebias
from .outlier_suppression import OutlierSuppression
from .self_attn_enhancement import SelfAttentionEnhancement
from .similarity_enhancement import SimilarityEnhancement

# flag / cfg name of each stage -> its module, in the fixed pipeline order
PIPELINE_STAGES = {
    'similarity_enhancement': SimilarityEnhancement,
    'self_attn_enhancement': SelfAttentionEnhancement,
    'outlier_suppression': OutlierSuppression,
    'global_debias': GlobalDebias,
    'ctd': ClusterTokenDebias,
}


def build_stage(name: str, enabled: bool, cfg: Optional[dict]) -> Optional[nn.Module]:
    """The stage module for ``apply_<name>`` / ``<name>_cfg``; None when switched off.

    The cfg's keys are checked even when the stage is off, so a typo never passes silently.
    An optional ``type`` swaps in another module registered in ``MODELS`` with the same
    interface.
    """
    if not isinstance(enabled, bool):
        raise ValueError(f'apply_{name} must be True or False, got {enabled!r}.')
    if cfg is not None and not isinstance(cfg, dict):
        defaults = ', '.join(f'{key}={value!r}'
                             for key, value in init_defaults(PIPELINE_STAGES[name]).items())
        raise ValueError(f'{name}_cfg must be a dict, e.g. {name}_cfg=dict({defaults}) (the '
                         f'defaults), got {cfg!r}.')
    cfg = dict(cfg or {})
    stage_type = cfg.pop('type', PIPELINE_STAGES[name])
    if isinstance(stage_type, str):
        stage_type = MODELS.get(stage_type)
        if stage_type is None:
            raise ValueError(f"{name}_cfg.type is not registered in mmseg's MODELS.")
    elif not isinstance(stage_type, type):
        raise ValueError(f"{name}_cfg.type must be a name registered in mmseg's MODELS or a "
                         f'class, got {stage_type!r}.')
    check_keys(f'{name}_cfg', cfg, stage_type)
    return stage_type(**cfg) if enabled else None


__all__ = ['PIPELINE_STAGES', 'build_stage', 'SimilarityEnhancement', 'SelfAttentionEnhancement',
           'OutlierSuppression', 'GlobalDebias', 'ClusterTokenDebias']
