"""ResCLIP's formulas (shared/methods/resclip.md) against plain re-derivations: Python
loops over tokens / pixels on tiny inputs, written from the page, not from the code."""
import math
from collections import Counter

import numpy as np
import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock

from mmseg_selfattn.dense_attention import DENSE_VARIANTS, attention_probs, dense_attention
from mmseg_selfattn.pamr import PAMR
from mmseg_selfattn.resclip import (AttentionMean, block_head_probs, blur_width, head_probs,
                                    line_of_sight, pass1_pamr, patch_labels, rcs_attention,
                                    rcs_hook, rcs_mix, sfr_logits, sfr_matrix)

GRIDS = [(4, 5), (3, 7)]


def random_labels(batch, grid, num_labels, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_labels, (batch, *grid), generator=generator)


# -- plain references ---------------------------------------------------------------------
def reference_visible(grid, i, j, exact):
    """V_ij from the page: labels at round(p_i (1 - m/M) + p_j m/M), m = 0..d_ij, float32,
    half to even, all equal c_i (exact: step m / d_ij)."""
    h, w = len(grid), len(grid[0])
    pi, pj = (i // w, i % w), (j // w, j % w)
    d = max(abs(pi[0] - pj[0]), abs(pi[1] - pj[1]))
    big_m = max(h, w) - 1
    f32 = np.float32
    for m in range(d + 1):
        if m == 0:
            t = f32(0)
        else:
            t = f32(m) / f32(d if exact else big_m)
        r = f32(pi[0]) * (f32(1) - t) + f32(pj[0]) * t
        c = f32(pi[1]) * (f32(1) - t) + f32(pj[1]) * t
        if grid[int(np.round(r))][int(np.round(c))] != grid[pi[0]][pi[1]]:
            return False
    return True


def reference_sfr(grid, std, line_decay, exact):
    """Ŝ (T x T nested lists) of one crop's label grid, from the page."""
    h, w = len(grid), len(grid[0])
    n = h * w
    big_m = max(h, w) - 1
    label = [grid[i // w][i % w] for i in range(n)]
    e = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            e[i][j] = 1.0 if label[i] == label[j] else 0.0
            if line_decay and not reference_visible(grid, i, j, exact):
                d = max(abs(i // w - j // w), abs(i % w - j % w))
                e[i][j] *= math.exp(-d / big_m)
    width = min(n, math.floor(6 * std + 1))
    if width % 2 == 0:
        width -= 1
    gauss = [math.exp(-(k - width // 2)**2 / (2 * std**2)) for k in range(width)]
    gauss = [g / sum(gauss) for g in gauss]
    s = [[0.0] * (n + 1) for _ in range(n + 1)]
    for i in range(n):
        row = []
        for j in range(n):
            acc = 0.0
            for k in range(width):
                jj = j + k - width // 2
                if 0 <= jj < n:
                    acc += gauss[k] * e[i][jj]
            row.append(max(acc, 0.0))
        total = sum(row)
        for j in range(n):
            s[i + 1][j + 1] = row[j] / (total + 1e-8)
    peak = max(max(r) for r in s)
    return [[v / peak if peak > 0 else 0.0 for v in r] for r in s]


def reference_patch_labels(logits, logit_scale, threshold, p):
    """(Q, H, W) crop-size logits of one crop -> (h, w) labels, loops over pixels."""
    num_q, height, width = logits.shape
    pixel = [[0] * width for _ in range(height)]
    for y in range(height):
        for x in range(width):
            scores = [logit_scale * float(logits[q, y, x]) for q in range(num_q)]
            top = max(scores)
            probs = [math.exp(s - top) for s in scores]
            probs = [v / sum(probs) for v in probs]
            best = max(range(num_q), key=lambda q: (probs[q], -q))
            pixel[y][x] = best if probs[best] >= threshold else 0
    h, w = height // p, width // p
    out = [[0] * w for _ in range(h)]
    for r in range(h):
        for c in range(w):
            counts = Counter(pixel[y][x] for y in range(r * p, r * p + p)
                             for x in range(c * p, c * p + p))
            most = max(counts.values())
            out[r][c] = min(lab for lab, cnt in counts.items() if cnt == most)
    return out


# -- RCS ----------------------------------------------------------------------------------
def test_head_probs_match_multi_head_attention_weights():
    torch.manual_seed(0)
    block = ResidualAttentionBlock(32, 4).eval()
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        hidden = block.ln_1(x)
        _, expected = block.attn(hidden, hidden, hidden, need_weights=True,
                                 average_attn_weights=False)
        got = block_head_probs(block, x)
    assert got.shape == (2, 4, 9, 9) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_head_probs_plain_softmax_per_head():
    torch.manual_seed(10)
    q, k = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    got = head_probs(q, k)
    for b, head, i in np.ndindex(2, 2, 5):
        scores = [sum(float(q[b, head, i, c]) * float(k[b, head, j, c]) for c in range(4)) / 2
                  for j in range(5)]
        exps = [math.exp(s - max(scores)) for s in scores]
        for j in range(5):
            assert abs(float(got[b, head, i, j]) - exps[j] / sum(exps)) < 1e-6
    assert head_probs(q.half(), k.half()).dtype == torch.float32


def test_rcs_attention_is_the_plain_mean_per_head():
    torch.manual_seed(1)
    maps = [torch.rand(2, 3, 6, 6).softmax(-1) for _ in range(4)]
    got = rcs_attention(maps)
    for b in range(2):
        for head in range(3):
            for i in range(6):
                for j in range(6):
                    plain = sum(float(m[b, head, i, j]) for m in maps) / 4
                    assert abs(float(got[b, head, i, j]) - plain) < 1e-7
    copies = [m.clone() for m in maps]
    running = AttentionMean()
    for m in maps:
        running.add(m)
    assert torch.equal(running.value(), got)
    assert all(torch.equal(m, c) for m, c in zip(maps, copies))  # inputs untouched
    with pytest.raises(ValueError):
        rcs_attention([])


@pytest.mark.parametrize('variant', ['naclip', 'sclip'])
def test_rcs_mix_formula_and_row_sums(variant):
    torch.manual_seed(2)
    q, k = torch.randn(2, 2, 7, 4), torch.randn(2, 2, 7, 4)
    probs = attention_probs(DENSE_VARIANTS[variant], q, k)
    a_c = torch.rand(2, 2, 7, 7).softmax(-1)
    weight, scale = 0.3, 2.0
    got = rcs_mix(probs, a_c, weight, scale)
    for index in np.ndindex(*probs.shape):
        plain = scale * ((1 - weight) * float(probs[index]) + weight * float(a_c[index]))
        assert abs(float(got[index]) - plain) < 1e-6
    row_sum = DENSE_VARIANTS[variant].row_sum
    # rows sum to τ_r ((1 - λ_r) row_sum + λ_r): τ_r, or τ_r (2 - λ_r) for sclip
    expected_sum = scale * ((1 - weight) * row_sum + weight)
    torch.testing.assert_close(got.sum(-1), torch.full((2, 2, 7), expected_sum))
    assert got.dtype == probs.dtype


def test_rcs_neutral_values_leave_probs_bitwise():
    torch.manual_seed(3)
    probs = torch.rand(3, 2, 5, 5).softmax(-1)
    a_c = torch.rand(3, 2, 5, 5).softmax(-1)
    assert torch.equal(rcs_mix(probs, a_c, 0.0, 1.0), probs)
    half = probs.half()
    assert torch.equal(rcs_mix(half, a_c, 0.0, 1.0), half)


def test_rcs_hook_in_dense_attention():
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 2, 6, 4) for _ in range(3))
    a_c = torch.rand(2, 2, 6, 6).softmax(-1)
    variant = DENSE_VARIANTS['clearclip']
    got = dense_attention(variant, q, k, v, probs_hook=rcs_hook(a_c, 0.4, 2.0))
    expected = rcs_mix(attention_probs(variant, q, k), a_c, 0.4, 2.0) @ v
    torch.testing.assert_close(got, expected)


# -- SFR logit transform ------------------------------------------------------------------
def test_sfr_logits_formula_broadcast_over_heads():
    torch.manual_seed(5)
    logits = torch.randn(2, 3, 5, 5)
    s_hat = torch.rand(2, 5, 5)
    weight, scale = 0.7, 1.8
    got = sfr_logits(logits, s_hat, weight, scale, half_precision=False)
    for b, head, i, j in np.ndindex(*logits.shape):
        plain = scale * ((1 - weight) * float(logits[b, head, i, j])
                         + weight * float(s_hat[b, i, j]))
        assert abs(float(got[b, head, i, j]) - plain) < 1e-6
    # exact fp32: bitwise the same expression written out in fp32
    expected = scale * ((1 - weight) * logits + weight * s_hat[:, None])
    assert torch.equal(got, expected)


def test_sfr_logits_half_precision_only_rounds_the_term():
    torch.manual_seed(6)
    logits = torch.randn(2, 3, 5, 5)
    s_hat = torch.rand(2, 5, 5)
    s_hat[:, 0] = 0
    weight, scale = 0.7, 2.2
    exact = sfr_logits(logits, s_hat, weight, scale, half_precision=False)
    half = sfr_logits(logits, s_hat, weight, scale, half_precision=True)
    assert half.dtype == torch.float32
    term = scale * weight * s_hat[:, None].expand_as(logits)
    error = (half - exact).abs()
    # fp16 rounds Ŝ and λ_s Ŝ: two half-ulps (2^-11 each) of the term, plus fp32 ulps
    assert torch.all(error <= term * 2**-10 + 1e-6)
    assert error.max() > 0  # the cast does change something
    term_half = (weight * s_hat.half()).float()
    torch.testing.assert_close(half, scale * ((1 - weight) * logits + term_half[:, None]))


def test_sfr_neutral_values_leave_logits_bitwise():
    torch.manual_seed(7)
    logits = torch.randn(2, 3, 5, 5)
    s_hat = torch.rand(2, 5, 5)
    for half_precision in (True, False):
        assert torch.equal(sfr_logits(logits, s_hat, 0.0, 1.0, half_precision), logits)


# -- pass 1 labels ------------------------------------------------------------------------
@pytest.mark.parametrize('size', [(8, 12), (9, 13)])  # 9, 13: extra pixels are ignored
def test_patch_labels_match_pixel_loops(size):
    torch.manual_seed(8)
    logits = torch.randn(3, 4, *size) * 0.05
    crops = torch.randn(3, 3, *size)
    got = patch_labels(logits, crops, 40.0, 0.5, 4)
    assert got.shape == (3, 2, 3) and got.dtype == torch.long
    for b in range(3):
        assert got[b].tolist() == reference_patch_labels(logits[b], 40.0, 0.5, 4)


def test_patch_labels_with_pamr_refine_before_the_softmax():
    torch.manual_seed(9)
    logits = torch.randn(2, 3, 16, 16) * 0.05
    crops = torch.randn(2, 3, 16, 16)
    pamr = PAMR(3, (1, 2))
    got = patch_labels(logits, crops, 40.0, 0.3, 4, pamr=pamr)
    refined = pamr(crops, logits)
    for b in range(2):
        assert got[b].tolist() == reference_patch_labels(refined[b], 40.0, 0.3, 4)
    published = pass1_pamr()
    assert (published.num_iter, published.dilations) == (10, (8, 16))


def test_patch_mode_ties_go_to_the_smallest_label():
    logits = torch.full((1, 4, 2, 4), -10.0)
    # patch 0 (2x2): labels 3, 3, 1, 1 -> 1; patch 1: 2, 3, 3, 2 -> 2
    for (y, x), query in {(0, 0): 3, (0, 1): 3, (1, 0): 1, (1, 1): 1,
                          (0, 2): 2, (0, 3): 3, (1, 2): 3, (1, 3): 2}.items():
        logits[0, query, y, x] = 10.0
    got = patch_labels(logits, torch.zeros(1, 3, 2, 4), 1.0, 0.0, 2)
    assert got.tolist() == [[[1, 2]]]


def test_query_zero_fallback_under_the_threshold():
    logits = torch.zeros(1, 3, 4, 4)
    logits[0, 2] = 0.01  # query 2 wins, but p = softmax(0.4 [0, 0, 1]) is far below 0.9
    assert patch_labels(logits, torch.zeros(1, 3, 4, 4), 40.0, 0.9, 2).eq(0).all()
    assert patch_labels(logits, torch.zeros(1, 3, 4, 4), 40.0, 0.2, 2).eq(2).all()
    logits[0, 2] = 1.0  # p_2 ~ 1: kept
    assert patch_labels(logits, torch.zeros(1, 3, 4, 4), 40.0, 0.9, 2).eq(2).all()


def test_patch_labels_need_crop_size_logits():
    with pytest.raises(ValueError, match='crop size'):
        patch_labels(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 4, 4), 40.0, 0.5, 2)


# -- SFR matrix ---------------------------------------------------------------------------
@pytest.mark.parametrize('grid', GRIDS)
@pytest.mark.parametrize('line_decay,exact', [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize('std', [1.0, 5.0])  # 5.0: K clamped to N, made odd
def test_sfr_matrix_matches_the_plain_loops(grid, line_decay, exact, std):
    labels = random_labels(3, grid, 3, seed=grid[1])
    got = sfr_matrix(labels, std, line_decay=line_decay, exact_line_of_sight=exact)
    n = grid[0] * grid[1]
    assert got.shape == (3, n + 1, n + 1) and got.dtype == torch.float32
    for b in range(3):
        expected = torch.tensor(reference_sfr(labels[b].tolist(), std, line_decay, exact))
        torch.testing.assert_close(got[b], expected.float(), atol=1e-6, rtol=1e-5)
        assert got[b, 0].eq(0).all() and got[b, :, 0].eq(0).all()
        assert got[b].max() == 1


@pytest.mark.parametrize('grid', GRIDS)
@pytest.mark.parametrize('exact', [False, True])
def test_line_of_sight_matches_the_plain_loops(grid, exact):
    labels = random_labels(2, grid, 2, seed=11)
    got = line_of_sight(labels, exact)
    n = grid[0] * grid[1]
    for b in range(2):
        plain = [[reference_visible(labels[b].tolist(), i, j, exact) for j in range(n)]
                 for i in range(n)]
        assert got[b].tolist() == plain


def test_line_of_sight_trap_published_checks_only_the_start():
    # (0,3) -> (0,7) on a 14x14 grid, wall at column 5: step 1/M = 1/13 reaches column
    # 3 + 4 * 4/13 = 4.2 only, so the published form sees no wall
    labels = torch.zeros(1, 14, 14, dtype=torch.long)
    labels[..., 5] = 1
    i, j = 3, 7
    assert line_of_sight(labels)[0, i, j]
    assert not line_of_sight(labels, exact=True)[0, i, j]
    grid = labels[0].tolist()
    assert reference_visible(grid, i, j, False) and not reference_visible(grid, i, j, True)
    published = sfr_matrix(labels, 5.0)
    exact = sfr_matrix(labels, 5.0, exact_line_of_sight=True)
    assert not torch.equal(published, exact)


def test_blur_width():
    assert blur_width(196, 5.0) == 31
    assert blur_width(20, 5.0) == 19  # even N: one less
    assert blur_width(21, 5.0) == 21
    assert blur_width(100, 0.5) == 3  # floor(4) even: one less
    assert blur_width(1, 5.0) == 1


def test_sfr_matrix_batched_equals_one_crop_at_a_time_and_is_deterministic():
    labels = random_labels(3, (4, 5), 4, seed=12)
    batched = sfr_matrix(labels, 2.0)
    single = torch.cat([sfr_matrix(labels[b:b + 1], 2.0) for b in range(3)])
    assert torch.equal(batched, single)
    assert torch.equal(batched, sfr_matrix(labels, 2.0))
    logits = torch.randn(3, 4, 8, 12)
    crops = torch.randn(3, 3, 8, 12)
    pamr = PAMR(2, (1, 2))
    together = patch_labels(logits, crops, 40.0, 0.2, 4, pamr)
    apart = torch.cat([patch_labels(logits[b:b + 1], crops[b:b + 1], 40.0, 0.2, 4, pamr)
                       for b in range(3)])
    assert torch.equal(together, apart)


@pytest.mark.parametrize('labels', [
    torch.zeros(2, 4, 5, dtype=torch.long),  # constant
    torch.zeros(2, 1, 1, dtype=torch.long),  # 1x1 grid
    torch.arange(21).view(1, 3, 7),  # all different
    torch.arange(7).view(1, 1, 7),  # one grid row
])
@pytest.mark.parametrize('exact', [False, True])
def test_sfr_matrix_finite_on_degenerate_grids(labels, exact):
    s_hat = sfr_matrix(labels, 5.0, exact_line_of_sight=exact)
    assert torch.isfinite(s_hat).all() and s_hat.max() == 1
    logits = sfr_logits(torch.randn(labels.shape[0], 2, *s_hat.shape[-2:]), s_hat, 0.7, 1.8)
    assert torch.isfinite(logits).all()


def test_sfr_matrix_on_a_large_grid_is_finite():
    labels = random_labels(1, (28, 42), 5, seed=13)
    s_hat = sfr_matrix(labels, 5.0)
    assert s_hat.shape == (1, 1177, 1177) and torch.isfinite(s_hat).all()
