"""Stage 4, outlier suppression: planted outliers, neighbour averages checked by hand."""
import math

import pytest
import torch
from mmseg.registry import MODELS

from mmseg_selfattn.stages.outlier_suppression import (OutlierSuppression,
                                                       decontaminate_neighbours, grid_neighbours,
                                                       outlier_scores, rank_outliers,
                                                       replace_outliers, select_outliers)


def planted_attention(grid, planted, seed=0):
    """(B, T, T) attention, rows summing to 1, in which the planted patch tokens of each crop
    have a large A[cls, i] and a small A[i, i] (earlier planted = higher score); every
    other patch the opposite."""
    torch.manual_seed(seed)
    num_tokens = grid[0] * grid[1]
    attention = torch.rand(len(planted), 1 + num_tokens, 1 + num_tokens) + 0.1
    patches = torch.arange(1, 1 + num_tokens)
    attention[:, patches, patches] = 5.0  # strong self-attention: r small
    attention = attention / attention.sum(dim=-1, keepdim=True)
    for crop, tokens in enumerate(planted):
        for rank, token in enumerate(tokens):
            # move mass from A[i, i] to the rest of row i, so the row still sums to 1
            row = attention[crop, 1 + token]
            row += (row[1 + token] - 1e-3) / num_tokens
            row[1 + token] = 1e-3
            attention[crop, 0, 1 + token] = 0.1 * (10 - rank)
        attention[crop, 0] /= attention[crop, 0].sum()  # keeps the order of the planted r
    return attention


def mask_of(tokens, num_tokens):
    mask = torch.zeros(num_tokens, dtype=torch.bool)
    mask[list(tokens)] = True
    return mask


def cosine(a, b):
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


# --- scores and selection ------------------------------------------------------------------
def test_scores_are_cls_over_self_attention():
    attention = planted_attention((3, 4), [[5]])
    scores = outlier_scores(attention, eps=1e-6)
    assert scores.shape == (1, 12)
    for i in range(12):
        expected = attention[0, 0, 1 + i] / (attention[0, 1 + i, 1 + i] + 1e-6)
        assert torch.allclose(scores[0, i], expected)


def test_planted_outliers_are_found_exactly():
    grid, planted = (3, 4), [[2, 7, 11], [0, 5, 9]]
    scores = outlier_scores(planted_attention(grid, planted))
    mask = select_outliers(scores, top_k=3)
    for crop, tokens in enumerate(planted):
        assert torch.equal(mask[crop], mask_of(tokens, 12))
    assert torch.equal(rank_outliers(scores, 3), torch.tensor(planted))


def test_min_ratio_keeps_only_tokens_above_it():
    grid, planted = (3, 4), [[2, 7], [4]]
    scores = outlier_scores(planted_attention(grid, planted))
    # planted r is in the hundreds, the others are far below 1
    assert scores[0, [2, 7]].min() > 10 and scores[0].sort().values[-3] < 1
    mask = select_outliers(scores, top_k=5, min_ratio=10.0)
    assert torch.equal(mask[0], mask_of([2, 7], 12))
    assert torch.equal(mask[1], mask_of([4], 12))
    indices = rank_outliers(scores, top_k=5, min_ratio=10.0)
    assert indices.tolist() == [[2, 7, -1, -1, -1], [4, -1, -1, -1, -1]]

    stage = OutlierSuppression(top_k=5, min_ratio=10.0)
    features = torch.randn(2, 12, 3)
    out = stage(features, planted_attention(grid, planted), grid)
    assert stage.last_outlier_indices.tolist() == indices.tolist()
    assert torch.equal(out, replace_outliers(features, mask, grid))


def test_top_k_larger_than_n_clamps_and_ties_are_deterministic():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0]])
    assert rank_outliers(scores, 10).tolist() == [[1, 2, 3, 0]]
    assert select_outliers(scores, 10).all()
    assert rank_outliers(scores, 1).tolist() == [[1]]  # tie goes to the lower index


# --- neighbourhood --------------------------------------------------------------------------
def test_grid_neighbours_on_a_non_square_grid():
    index, in_grid = grid_neighbours((3, 5))
    counts = in_grid.sum(dim=1).view(3, 5)
    assert counts.tolist() == [[3, 5, 5, 5, 3], [5, 8, 8, 8, 5], [3, 5, 5, 5, 3]]
    # token (1, 4) = 9 on the right border: (0,3) (0,4) (1,3) (2,3) (2,4)
    assert sorted(index[9][in_grid[9]].tolist()) == [3, 4, 8, 13, 14]
    _, single_row = grid_neighbours((1, 4))
    assert single_row.sum(dim=1).tolist() == [1, 2, 2, 1]
    _, single = grid_neighbours((1, 1))
    assert single.sum().item() == 0


# --- replacement ----------------------------------------------------------------------------
# 4 x 5 grid; outliers: interior (1,1)=6, edge (0,3)=3, corner (3,4)=19 and (1,2)=7,
# which borders both 6 and 3. Clean neighbours derived by hand:
GRID = (4, 5)
OUTLIERS = [6, 3, 19, 7]
CLEAN_NEIGHBOURS = {
    6: [0, 1, 2, 5, 10, 11, 12],  # interior, 7 excluded
    3: [2, 4, 8, 9],  # top edge, 7 excluded
    19: [13, 14, 18],  # corner
    7: [1, 2, 8, 11, 12, 13],  # 3 and 6 excluded
}


def test_each_outlier_becomes_the_mean_of_its_clean_neighbours():
    torch.manual_seed(0)
    features = torch.randn(1, 20, 6)
    mask = mask_of(OUTLIERS, 20)[None]
    replaced = replace_outliers(features, mask, GRID, 'mean')
    for token, neighbours in CLEAN_NEIGHBOURS.items():
        expected = features[0, neighbours].mean(dim=0)  # original, not partially replaced
        assert torch.allclose(replaced[0, token], expected, atol=1e-6)
    clean = ~mask[0]
    assert torch.equal(replaced[0, clean], features[0, clean])


def test_outlier_without_clean_neighbour_keeps_its_value():
    torch.manual_seed(0)
    features = torch.randn(1, 20, 4)
    mask = mask_of([0, 1, 5, 6], 20)[None]  # corner 0 and all its neighbours
    replaced = replace_outliers(features, mask, GRID, 'inverse_cosine')
    assert torch.equal(replaced[0, 0], features[0, 0])
    assert not torch.allclose(replaced[0, 1], features[0, 1])  # 1 has clean neighbours 2, 7
    assert torch.allclose(replace_outliers(features, mask, GRID, 'mean')[0, 6],
                          features[0, [2, 7, 10, 11, 12]].mean(dim=0), atol=1e-6)


def test_inverse_cosine_weights():
    torch.manual_seed(0)
    features = torch.randn(2, 20, 8)
    mask = mask_of(OUTLIERS, 20)[None].expand(2, -1)
    replaced = replace_outliers(features, mask, GRID, 'inverse_cosine')
    for crop in range(2):
        for token, neighbours in CLEAN_NEIGHBOURS.items():
            x_i = features[crop, token]
            exps = [math.exp(1 - cosine(x_i, features[crop, j])) for j in neighbours]
            expected = sum(e / sum(exps) * features[crop, j] for e, j in zip(exps, neighbours))
            assert torch.allclose(replaced[crop, token], expected, atol=1e-5)


# --- decontamination ------------------------------------------------------------------------
def test_decontamination_formula_by_hand():
    torch.manual_seed(0)
    grid, tau = (3, 6), 0.3
    features = torch.randn(1, 18, 5)
    mask = mask_of([7, 9], 18)[None]  # (1,1) and (1,3)
    out = decontaminate_neighbours(features, mask, grid, tau)
    x = features[0]

    # token 0 borders outlier 7 only
    assert torch.allclose(out[0, 0], x[0] - tau * cosine(x[7], x[0]) * x[7], atol=1e-6)
    # token 2 = (0,2) borders both outliers: contributions add up
    expected = x[2] - tau * cosine(x[7], x[2]) * x[7] - tau * cosine(x[9], x[2]) * x[9]
    assert torch.allclose(out[0, 2], expected, atol=1e-6)
    # outliers and tokens of column 5 (no outlier neighbour) are unchanged
    for token in [7, 9, 5, 11, 17]:
        assert torch.equal(out[0, token], x[token])


def test_stage_uses_original_features_for_both_steps():
    torch.manual_seed(0)
    grid, tau = (3, 6), 0.5
    features = torch.randn(1, 18, 5)
    attention = planted_attention(grid, [[7, 9]])
    stage = OutlierSuppression(top_k=2, neighbour_decontamination=tau)
    out = stage(features, attention, grid)
    x = features[0]
    # 7's clean neighbours 0,1,2,6,8,12,13,14 averaged before their decontamination
    assert torch.allclose(out[0, 7], x[[0, 1, 2, 6, 8, 12, 13, 14]].mean(dim=0), atol=1e-6)
    # 8 borders both outliers, decontaminated with the pre-replacement x_7 and x_9
    expected = x[8] - tau * cosine(x[7], x[8]) * x[7] - tau * cosine(x[9], x[8]) * x[9]
    assert torch.allclose(out[0, 8], expected, atol=1e-6)
    assert torch.equal(out[0, 5], x[5])


# --- the module -----------------------------------------------------------------------------
def test_module_end_to_end_and_diagnostics():
    grid, planted = (4, 5), [OUTLIERS, [0, 19, 12, 4]]
    attention = planted_attention(grid, planted)
    torch.manual_seed(1)
    features = torch.randn(2, 20, 6)
    stage = MODELS.build(dict(type='OutlierSuppression', top_k=4))
    out = stage(features, attention, grid)
    assert out.shape == features.shape and out.dtype == features.dtype
    assert torch.equal(out, replace_outliers(features, select_outliers(
        outlier_scores(attention), 4), grid, 'mean'))
    for token, neighbours in CLEAN_NEIGHBOURS.items():
        assert torch.allclose(out[0, token], features[0, neighbours].mean(dim=0), atol=1e-6)

    assert torch.equal(stage.last_scores, outlier_scores(attention))
    assert stage.last_outlier_indices.dtype == torch.long
    assert stage.last_outlier_indices.tolist() == planted
    assert (stage.last_scores.gather(1, stage.last_outlier_indices).diff(dim=1) <= 0).all()


@pytest.mark.parametrize('interpolation', ['mean', 'inverse_cosine'])
def test_candidate_rows_give_the_all_token_result(interpolation):
    """The stage computes only its top-k rows (-1 = none); same as computing every row."""
    torch.manual_seed(2)
    features = torch.randn(2, 20, 6)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[0, [0, 6, 7, 13]] = True
    mask[1, [19]] = True
    candidates = torch.tensor([[13, 0, 7, 6], [19, -1, -1, -1]])
    everywhere = replace_outliers(features, mask, (4, 5), interpolation)
    assert not torch.equal(everywhere, features)
    torch.testing.assert_close(
        replace_outliers(features, mask, (4, 5), interpolation, candidates=candidates),
        everywhere, atol=1e-6, rtol=0)


def test_top_k_zero_returns_the_input_itself():
    features = torch.randn(2, 12, 4)
    attention = planted_attention((3, 4), [[1], [2]])
    stage = OutlierSuppression(top_k=0, neighbour_decontamination=0.5)
    out = stage(features, attention, (3, 4))
    assert out is features
    assert stage.last_outlier_indices.shape == (2, 0)
    assert decontaminate_neighbours(features, torch.ones(2, 12, dtype=torch.bool), (3, 4),
                                    0.0) is features


def test_zero_vectors_never_give_nan():
    grid = (3, 4)
    features = torch.zeros(1, 12, 4)
    features[0, 6] = torch.tensor([1.0, 2.0, 0.0, 0.0])
    attention = torch.zeros(1, 13, 13)  # zero diagonal: eps guards the score
    attention[0, 0, [1 + 5, 1 + 6]] = 1.0
    for interpolation in ('mean', 'inverse_cosine'):
        stage = OutlierSuppression(top_k=2, interpolation=interpolation,
                                   neighbour_decontamination=1.0)
        out = stage(features, attention, grid)
        assert torch.isfinite(out).all() and torch.isfinite(stage.last_scores).all()


@pytest.mark.parametrize('dtype', [torch.float64, torch.float16])
def test_keeps_dtype(dtype):
    torch.manual_seed(0)
    features = torch.randn(1, 12, 4).to(dtype)
    attention = planted_attention((3, 4), [[3, 8]]).to(dtype)
    stage = OutlierSuppression(top_k=2, interpolation='inverse_cosine',
                               neighbour_decontamination=0.2)
    out = stage(features, attention, (3, 4))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert stage.last_outlier_indices.tolist() == [[3, 8]]


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match='disagree'):
        OutlierSuppression()(torch.randn(1, 12, 4), torch.rand(1, 13, 13), (4, 4))


@pytest.mark.parametrize('kwargs, key', [
    (dict(top_k=-1), 'outlier_suppression_cfg.top_k must be an int >= 0, got -1'),
    (dict(top_k=2.5), 'outlier_suppression_cfg.top_k'),
    (dict(min_ratio=-0.1), 'outlier_suppression_cfg.min_ratio'),
    (dict(interpolation='median'), 'outlier_suppression_cfg.interpolation'),
    (dict(neighbour_decontamination=-1), 'outlier_suppression_cfg.neighbour_decontamination'),
    (dict(eps=0), 'outlier_suppression_cfg.eps'),
])
def test_validation_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace('.', r'\.')):
        OutlierSuppression(**kwargs)
    assert OutlierSuppression.cfg_key == 'outlier_suppression_cfg'
