"""Stage 5, global debias: the formula, its geometry and the logit-level form."""
import pytest
import torch
from mmseg.registry import MODELS

from mmseg_selfattn.stages.global_debias import GlobalDebias, cls_logit_bias, global_debias


def test_matches_the_formula():
    torch.manual_seed(0)
    features, x_cls = torch.randn(2, 7, 5, dtype=torch.float64), torch.randn(2, 5,
                                                                              dtype=torch.float64)
    out = global_debias(features, x_cls, 0.2)
    for b in range(2):
        for i in range(7):
            x, c = features[b, i], x_cls[b]
            cos = torch.dot(x, c) / (x.norm() * c.norm())
            assert torch.allclose(out[b, i], x - 0.2 * cos * c, atol=1e-12)


def test_geometry_orthogonal_unchanged_and_parallel_component_shrinks():
    torch.manual_seed(0)
    x_cls = torch.randn(1, 6, dtype=torch.float64)
    unit_cls = x_cls[0] / x_cls[0].norm()
    orthogonal = torch.randn(3, 6, dtype=torch.float64)
    orthogonal -= (orthogonal @ unit_cls)[:, None] * unit_cls  # project x_cls out
    mixed = orthogonal[0] + 2.0 * unit_cls
    features = torch.cat([orthogonal, mixed[None]])[None]
    factor = 0.3
    out = global_debias(features, x_cls, factor)

    assert torch.allclose(out[0, :3], orthogonal, atol=1e-12)
    cos = 2.0 / mixed.norm()
    # component along x_cls: 2 - factor * cos * |x_cls|; the orthogonal part is kept
    assert torch.allclose(out[0, 3] @ unit_cls, 2.0 - factor * cos * x_cls.norm(), atol=1e-12)
    assert torch.allclose(out[0, 3] - (out[0, 3] @ unit_cls) * unit_cls, orthogonal[0],
                          atol=1e-12)


def test_factor_zero_is_identity():
    features, x_cls = torch.randn(2, 4, 3), torch.randn(2, 3)
    assert global_debias(features, x_cls, 0.0) is features
    assert GlobalDebias(factor=0)(features, x_cls) is features


def test_module_builds_from_registry():
    torch.manual_seed(0)
    features, x_cls = torch.randn(2, 4, 3), torch.randn(2, 3)
    stage = MODELS.build(dict(type='GlobalDebias', factor=0.5))
    assert GlobalDebias.cfg_key == 'global_debias_cfg'
    assert torch.equal(stage(features, x_cls), global_debias(features, x_cls, 0.5))
    with pytest.raises(ValueError, match='disagree'):
        stage(features, torch.randn(3, 3))


def test_zero_vectors_never_give_nan():
    features = torch.zeros(1, 3, 4)
    features[0, 1] = 1.0
    for x_cls in (torch.zeros(1, 4), torch.ones(1, 4)):
        out = global_debias(features, x_cls, 0.2)
        assert torch.isfinite(out).all()
        assert torch.equal(out[0, 0], features[0, 0])
    assert torch.isfinite(cls_logit_bias(torch.zeros(2, 4), torch.eye(4)[:3], -0.3)).all()


def test_keeps_dtype():
    features, x_cls = torch.randn(1, 5, 4).half(), torch.randn(1, 4).half()
    out = global_debias(features, x_cls, 0.2)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_cls_logit_bias_shape_and_value():
    torch.manual_seed(0)
    x_cls = torch.randn(2, 6)
    queries = torch.nn.functional.normalize(torch.randn(3, 6), dim=-1)
    bias = cls_logit_bias(x_cls, queries, -0.3)
    assert bias.shape == (2, 1, 3)
    for b in range(2):
        for q in range(3):
            cos = torch.dot(x_cls[b], queries[q]) / x_cls[b].norm()
            assert torch.allclose(bias[b, 0, q], -0.3 * cos, atol=1e-6)
    logits = torch.randn(2, 10, 3)
    assert (logits + bias).shape == logits.shape


@pytest.mark.parametrize('factor', [-0.1, float('nan'), 'big', None])
def test_validation_names_the_key(factor):
    with pytest.raises(ValueError, match=r'global_debias_cfg\.factor'):
        GlobalDebias(factor=factor)
