"""A pure-torch stand-in for ``mmcv.ops``, installed only when mmcv-lite is used.

mmseg 1.2.2 imports ``mmcv.ops`` at module level in a few places, but
mmcv-lite ships no compiled ops (``mmcv._ext``), so ``import mmseg.models``
fails. This stand-in provides ``point_sample`` (plain ``grid_sample``) and
turns every other op into a function that raises a clear error when called.
With the full mmcv installed nothing is changed.
"""
import importlib.util
import sys
import types
import warnings

import torch
import torch.nn.functional as F


def point_sample(input: torch.Tensor, points: torch.Tensor, align_corners: bool = False,
                 **kwargs) -> torch.Tensor:
    """``mmcv.ops.point_sample``: sample ``input`` (N, C, H, W) at points in [0, 1]^2."""
    add_dim = points.dim() == 3
    if add_dim:
        points = points.unsqueeze(2)
    output = F.grid_sample(input, 2.0 * points - 1.0, align_corners=align_corners, **kwargs)
    return output.squeeze(3) if add_dim else output


def _missing_op(name: str):

    def unavailable(*args, **kwargs):
        raise RuntimeError(
            f'mmcv.ops.{name} needs the compiled mmcv ops, but only mmcv-lite is installed. '
            'mmseg_selfattn does not use it; install the full mmcv (mmcv<2.2.0) to use it.')

    unavailable.__name__ = name
    return unavailable


def _missing_op_attribute(name: str):
    if name.startswith('__'):  # keep Python's own protocol lookups honest
        raise AttributeError(name)
    return _missing_op(name)


def _real_ops_available() -> bool:
    try:
        return importlib.util.find_spec('mmcv._ext') is not None
    except ImportError:  # mmcv itself missing
        return False


def install_mmcv_ops_standin() -> bool:
    """Register the stand-in as ``mmcv.ops`` if the compiled ops are missing.

    Returns True when the stand-in was installed (or already was).
    """
    if isinstance(sys.modules.get('mmcv.ops'), types.ModuleType) and getattr(
            sys.modules['mmcv.ops'], '__mmseg_selfattn_standin__', False):
        return True
    if _real_ops_available():
        return False
    # mmcv-lite: mmcv.cnn warns at import that this op is missing (the package needs none)
    warnings.filterwarnings('ignore', 'Fail to import ``MultiScaleDeformableAttention``')
    import mmcv

    ops = types.ModuleType('mmcv.ops', __doc__)
    ops.__mmseg_selfattn_standin__ = True
    ops.point_sample = point_sample
    ops.__getattr__ = _missing_op_attribute
    sys.modules['mmcv.ops'] = ops
    mmcv.ops = ops
    return True
