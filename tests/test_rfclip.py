"""RF-CLIP (attention='rfclip', the distraction filter, the text refinement and the global
mix) against an independent one-crop-at-a-time re-derivation of the published forward,
written from ../shared/methods/rf-clip.md §2 (float64, one head at a time, Python loops
over tokens for the filter, the propagation and the clusters). Random weights never
trigger the filter, so a channel of the patch embedding is scaled (rf-clip.md §6)."""
import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from mmseg.registry import MODELS

from mmseg_selfattn.clip_loader import load_clip
from mmseg_selfattn.encoder import DenseCLIPEncoder
from mmseg_selfattn.rfclip import (PUBLISHED_CHANNELS, DistractionFilter,
                                   complete_linkage_clusters, distraction_filter,
                                   distraction_mask, refined_queries, rfclip_logits)

from conftest import TINY_ARCH, build_tiny_segmentor

CHANNELS = (5, 17, 40)
BOOSTED = 17  # conv1 row scaled by BOOST: about a quarter of the tokens flagged per block
BOOST = 20.0


@pytest.fixture(scope='module')
def perturbed_visual():
    torch.manual_seed(0)
    visual = load_clip(TINY_ARCH, pretrained=None).visual.eval()
    with torch.no_grad():
        visual.conv1.weight[BOOSTED] *= BOOST
    return visual


def perturb(model):
    with torch.no_grad():
        model.pipeline.encoder.visual.conv1.weight[BOOSTED] *= BOOST
    return model


# -- the re-derivation, one crop, float64 ----------------------------------------------------
def ref_layer_norm(norm, x):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()


def ref_filter(z, grid, channels, sigma=5.0, alpha=0.4):
    """Phi on one crop's block output z (T, C), token by token."""
    h, w = grid
    width = z.shape[1]
    out = z.clone()
    for i in range(h * w):
        f = z[1 + i]
        shifted = f - f.min()
        p = shifted / max(shifted.sum().item(), 1e-8)
        phi = max(p[c].item() for c in channels)
        if phi > sigma / width:
            r, c = divmod(i, w)
            box = torch.zeros_like(f)
            for rr, cc in itertools.product((r - 1, r, r + 1), (c - 1, c, c + 1)):
                if 0 <= rr < h and 0 <= cc < w:
                    box = box + z[1 + rr * w + cc]
            out[1 + i] = (1 - alpha) * f + alpha * box / 9
    return out


def ref_qkv(block, x):
    attn = block.attn
    width = x.shape[1]
    qkv = ref_layer_norm(block.ln_1, x) @ attn.in_proj_weight.double().T + \
        attn.in_proj_bias.double()
    heads = attn.num_heads
    d = width // heads
    split = lambda t: [t[:, j * d:(j + 1) * d] for j in range(heads)]  # noqa: E731
    return split(qkv[:, :width]), split(qkv[:, width:2 * width]), split(qkv[:, 2 * width:])


def ref_block(block, x):
    """A standard block (softmax(q k^T)), and its per-head softmax(k k^T)."""
    q, k, v = ref_qkv(block, x)
    d = q[0].shape[1]
    outs = [torch.softmax(qh @ kh.T / math.sqrt(d), -1) @ vh for qh, kh, vh in zip(q, k, v)]
    out = torch.cat(outs, 1) @ block.attn.out_proj.weight.double().T + \
        block.attn.out_proj.bias.double()
    x = x + out
    mlp = block.mlp
    hidden = ref_layer_norm(block.ln_2, x) @ mlp.c_fc.weight.double().T + mlp.c_fc.bias.double()
    hidden = mlp.gelu(hidden)  # GELU or QuickGELU, elementwise
    x = x + hidden @ mlp.c_proj.weight.double().T + mlp.c_proj.bias.double()
    return x, [torch.softmax(kh @ kh.T / math.sqrt(d), -1) for kh in k]


def ref_tokens(visual, crop, grid):
    """ln_pre(CLS + patch embedding + positional embedding) of one crop, float64."""
    encoder = DenseCLIPEncoder(visual, 'naclip')
    patches = F.conv2d(crop[None].double(), visual.conv1.weight.double(),
                       stride=visual.conv1.stride)[0].flatten(1).T
    x = torch.cat([visual.class_embedding.double()[None], patches]) + \
        encoder.positional_embedding(grid).double()
    return ref_layer_norm(visual.ln_pre, x)


def ref_rfclip(visual, crop, channels=CHANNELS, beta=0.4, use_filter=True):
    """(X (N, D), g_crop (D,)) of one crop by rf-clip.md §2 steps 1-4."""
    ph, pw = visual.conv1.kernel_size
    grid = (crop.shape[1] // ph, crop.shape[2] // pw)
    blocks = visual.transformer.resblocks
    num_blocks = len(blocks)
    x = ref_tokens(visual, crop, grid)
    outputs, kks = [], []
    for block in blocks:
        x, kk = ref_block(block, x)
        kks.append(kk)
        if use_filter:
            x = ref_filter(x, grid, channels)
        outputs.append(x)
    proj = visual.proj.double()
    g_crop = ref_layer_norm(visual.ln_post, outputs[-1][0]) @ proj
    guide = sum(outputs) / num_blocks
    n = grid[0] * grid[1]
    s = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            a, b = guide[1 + i], guide[1 + j]
            cos = (a @ b / (a.norm() * b.norm())).item()
            s[i, j] = cos if cos >= beta else 0.0
    last = blocks[-1]
    branch_outputs = []
    for u in (outputs[-2], guide):
        u = torch.cat([u[:1], s @ u[1:]])
        _, k, v = ref_qkv(last, u)
        d = k[0].shape[1]
        heads = []
        for h, (kh, vh) in enumerate(zip(k, v)):
            own = torch.softmax(kh @ kh.T / math.sqrt(d), -1)
            mean = (sum(kks[b][h] for b in range(num_blocks - 1)) + own) / num_blocks
            heads.append(mean[1:, 1:] @ vh[1:])
        branch_outputs.append(torch.cat(heads, 1) @ last.attn.out_proj.weight.double().T
                              + last.attn.out_proj.bias.double())
    features = ref_layer_norm(visual.ln_post, 0.5 * (branch_outputs[0] + branch_outputs[1]))
    return features @ proj, g_crop


def ref_complete_linkage(t, threshold):
    """Brute force from the definition: the partition reached by repeatedly merging the
    two clusters with the smallest maximum pairwise cosine distance while it is <= t."""
    unit = t / t.norm(dim=1, keepdim=True)
    dist = 1 - unit @ unit.T
    clusters = [[i] for i in range(len(t))]
    while len(clusters) > 1:
        best = min(((max(dist[a, b].item() for a in ca for b in cb), x, y)
                    for (x, ca), (y, cb) in itertools.combinations(enumerate(clusters), 2)))
        if best[0] > threshold:
            break
        _, x, y = best
        clusters[x] = clusters[x] + clusters[y]
        del clusters[y]
    return sorted(sorted(c) for c in clusters)


def ref_logits(features, g, t, clusters, gamma, a, top_k=2):
    """rf-clip.md §2 steps 6-7 for one crop: (N, Q)."""
    x = features / features.norm(dim=1, keepdim=True)
    g = g / g.norm()
    refined = t.clone()
    if clusters is not None:
        for members in clusters:
            r = max(members, key=lambda q: ((g @ t[q]).item(), -q))
            order = sorted(range(len(x)), key=lambda n: -(x[n] @ t[r]).item())[:top_k]
            m = x[order].mean(0)
            m = m / m.norm()
            moved = (1 - a) * t[r] + a * m
            refined[r] = moved / moved.norm()
    return (1 - gamma) * x @ refined.T + gamma * (g @ t.T)[None]


def partition(labels):
    groups = {}
    for i, label in enumerate(labels.tolist()):
        groups.setdefault(label, []).append(i)
    return sorted(groups.values())


# -- the distraction filter ------------------------------------------------------------------
def test_filter_matches_the_token_loop_and_fires(perturbed_visual):
    torch.manual_seed(4)
    z = torch.randn(3, 1 + 30, 64, dtype=torch.float64)
    z[:, 1:, 17] += torch.rand(3, 30, dtype=torch.float64) * 30  # some tokens flagged
    channels = torch.tensor(CHANNELS)
    flagged = distraction_mask(z[:, 1:], channels, 5.0)
    assert 0 < flagged.sum() < flagged.numel()
    ours = distraction_filter(z, (5, 6), channels)
    for b in range(3):
        torch.testing.assert_close(ours[b], ref_filter(z[b], (5, 6), CHANNELS), rtol=0,
                                   atol=1e-12)
    assert torch.equal(ours[:, 0], z[:, 0])  # CLS unchanged
    assert torch.equal(ours[:, 1:][~flagged], z[:, 1:][~flagged])


def test_filter_threshold_is_strict_and_alpha_zero_is_the_identity():
    # a token whose phi is exactly sigma / C is not flagged (phi > tau)
    width = 8
    f = torch.zeros(1, 2, width, dtype=torch.float64)
    f[0, 1] = torch.tensor([0, 1, 1, 1, 1, 1, 1, 1.0])  # shifted sum 7, p_1 = 1/7
    channels = torch.tensor([1])
    assert not distraction_mask(f[:, 1:], channels, sigma=8 / 7 * (1 + 1e-9))[0, 0]
    assert distraction_mask(f[:, 1:], channels, sigma=8 / 7 * (1 - 1e-9))[0, 0]
    z = torch.randn(2, 1 + 12, 16)
    z[:, 1:, 3] += 50
    assert torch.equal(distraction_filter(z, (3, 4), torch.tensor([3]), alpha=0.0), z)
    # a constant token: shifted sum 0 -> denominator 1e-8, p = 0, not flagged, no NaN
    z = torch.ones(1, 1 + 4, 16)
    out = distraction_filter(z, (2, 2), torch.tensor([3]))
    assert torch.equal(out, z)


def test_filter_paper_form_is_an_option():
    z = torch.randn(1, 1 + 6, 16, dtype=torch.float64).abs()
    z[0, 1:, 2] += torch.arange(6.0, dtype=torch.float64)
    mask = distraction_mask(z[:, 1:], torch.tensor([2]), 3.0, shift_by_min=False)
    plain = z[0, 1:, 2] / z[0, 1:].sum(-1)
    assert torch.equal(mask[0], plain > 3.0 / 16)


def test_encoder_filters_every_block_and_changes_x_cls(perturbed_visual):
    """encode with the filter equals the token loop after every block; x_cls changes."""
    torch.manual_seed(5)
    crops = torch.randn(2, 3, 40, 48)
    encoder = DenseCLIPEncoder(perturbed_visual, 'rfclip')
    flt = DistractionFilter(channels=CHANNELS)
    flt.resolve(None, 64, encoder.num_blocks)
    with torch.no_grad():
        plain = encoder.encode(crops)
        ours = encoder.encode(crops, distraction_filter=flt, mid_layers=(0, ))
    assert not torch.allclose(plain.x_cls, ours.x_cls, atol=1e-3)
    visual = copy.deepcopy(perturbed_visual).double()
    for b in range(2):
        x = ref_tokens(visual, crops[b], (5, 6))
        for index, block in enumerate(visual.transformer.resblocks[:-1]):
            x, _ = ref_block(block, x)
            x = ref_filter(x, (5, 6), CHANNELS)
            if index == 0:
                torch.testing.assert_close(ours.mid_features[0][b].double(), x[1:],
                                           rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.block_input[b].double(), x, rtol=1e-4, atol=1e-4)


def test_filter_channels_published_and_errors():
    assert PUBLISHED_CHANNELS['ViT-B-16'] == (4, 162, 189, 326, 429, 474, 633, 713)
    flt = DistractionFilter()
    flt.resolve('ViT-B-16', 768, 12)
    assert flt.channel_index.tolist() == [4, 162, 189, 326, 429, 474, 633, 713]
    assert flt.blocks == tuple(range(12))
    with pytest.raises(ValueError, match=r'distraction_filter_cfg\.channels.*ViT-L-14'):
        DistractionFilter().resolve('ViT-L-14', 1024, 24)
    with pytest.raises(ValueError, match=r'distraction_filter_cfg\.channels.*TINY|'
                       r'distraction_filter_cfg\.channels'):
        build_tiny_segmentor(apply_distraction_filter=True)
    with pytest.raises(ValueError, match=r'distraction_filter_cfg\.channels .*below the '
                       r'residual width 64'):
        build_tiny_segmentor(apply_distraction_filter=True,
                             distraction_filter_cfg=dict(channels=(3, 64)))
    with pytest.raises(ValueError, match=r'distraction_filter_cfg: unknown key'):
        build_tiny_segmentor(distraction_filter_cfg=dict(sigmaa=5))
    with pytest.raises(ValueError, match=r'distraction_filter_cfg\.alpha'):
        build_tiny_segmentor(distraction_filter_cfg=dict(alpha=1.5))
    with pytest.raises(ValueError, match=r'distraction_filter_cfg\.layers'):
        build_tiny_segmentor(apply_distraction_filter=True,
                             distraction_filter_cfg=dict(channels=(1, ), layers=(7, )))


# -- attention='rfclip' ----------------------------------------------------------------------
@pytest.mark.parametrize('size', [(32, 32), (40, 48)])
def test_rfclip_block_equals_the_derivation(perturbed_visual, size):
    """Batched X and x_cls equal the one-crop float64 re-derivation, filter on."""
    torch.manual_seed(6)
    crops = torch.randn(3, 3, *size)
    model = perturb(build_tiny_segmentor(
        attention='rfclip', apply_distraction_filter=True,
        distraction_filter_cfg=dict(channels=CHANNELS)))
    pipeline = model.pipeline
    with torch.no_grad():
        encoded = pipeline.encode_crops(crops)
        ours = pipeline.dense_block(encoded, None)
    visual = copy.deepcopy(pipeline.encoder.visual).double()
    for b in range(3):
        features, g_crop = ref_rfclip(visual, crops[b])
        torch.testing.assert_close(ours[b].double(), features, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(encoded.x_cls[b].double(), g_crop, rtol=1e-4, atol=1e-4)
    # the encoder keeps one (B, H, N, N) kk sum and one (B, T, C) mean, not L maps
    n = (size[0] // 8) * (size[1] // 8)
    assert encoded.kk_sum.shape == (3, 2, n, n)
    assert encoded.layer_mean.shape == (3, 1 + n, 64)


def test_rfclip_without_filter_and_batched_equals_one_at_a_time():
    torch.manual_seed(7)
    crops = torch.randn(4, 3, 32, 40)
    model = build_tiny_segmentor(attention='rfclip')
    pipeline = model.pipeline
    with torch.no_grad():
        batched = pipeline.dense_block(pipeline.encode_crops(crops), None)
        single = torch.cat([pipeline.dense_block(pipeline.encode_crops(c[None]), None)
                            for c in crops])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
    visual = copy.deepcopy(pipeline.encoder.visual).double()
    features, _ = ref_rfclip(visual, crops[0], use_filter=False)
    torch.testing.assert_close(batched[0].double(), features, rtol=1e-4, atol=1e-4)


def test_rfclip_cfg_options_and_errors():
    torch.manual_seed(8)
    crops = torch.randn(2, 3, 32, 32)
    base = build_tiny_segmentor(attention='rfclip')
    one = base.with_pipeline(rfclip_cfg=dict(branches=('layer_mean', )))
    norm = base.with_pipeline(rfclip_cfg=dict(normalize_propagation=True))
    with torch.no_grad():
        encoded = base.pipeline.encode_crops(crops)
        both = base.pipeline.dense_block(encoded, None)
        only = one.pipeline.dense_block(encoded, None)
        normalised = norm.pipeline.dense_block(encoded, None)
    assert not torch.allclose(both, only)
    assert torch.isfinite(normalised).all() and not torch.equal(both, normalised)
    with pytest.raises(ValueError, match=r'rfclip_cfg\.branches'):
        build_tiny_segmentor(attention='rfclip', rfclip_cfg=dict(branches=('x', )))
    with pytest.raises(ValueError, match=r'rfclip_cfg\.kk_layers.*block 2 must be in \[0, 1\]'):
        build_tiny_segmentor(attention='rfclip', rfclip_cfg=dict(kk_layers=(2, )))
    with pytest.raises(ValueError, match=r'rfclip_cfg: unknown key'):
        build_tiny_segmentor(rfclip_cfg=dict(beta=0.4))
    with pytest.raises(ValueError, match=r"attention='rfclip' cannot combine with "
                       r'apply_outlier_suppression=True'):
        build_tiny_segmentor(attention='rfclip', apply_outlier_suppression=True)
    with pytest.raises(ValueError, match=r'ResCLIP'):
        build_tiny_segmentor(attention='rfclip', apply_rcs=True)


def test_kk_layers_subset_divides_by_its_count():
    torch.manual_seed(9)
    crops = torch.randn(1, 3, 32, 32)
    model = build_tiny_segmentor(attention='rfclip', rfclip_cfg=dict(kk_layers=(1, )))
    with torch.no_grad():
        encoded = model.pipeline.encode_crops(crops)
    visual = copy.deepcopy(model.pipeline.encoder.visual).double()
    x = ref_tokens(visual, crops[0], (4, 4))
    kks = []
    for block in visual.transformer.resblocks[:-1]:
        x, kk = ref_block(block, x)
        kks.append(kk)
    expected = torch.stack([kk[1:, 1:] for kk in kks[1]])
    torch.testing.assert_close(encoded.kk_sum[0].double(), expected, rtol=1e-4, atol=1e-5)


# -- clusters, refinement, global mix --------------------------------------------------------
@pytest.mark.parametrize('seed', range(4))
@pytest.mark.parametrize('threshold', [0.0, 0.3, 0.7, 1.0, 2.0])
def test_complete_linkage_matches_brute_force_and_scipy(seed, threshold):
    torch.manual_seed(seed)
    t = F.normalize(torch.randn(9, 5, dtype=torch.float64) + 0.8, dim=-1)
    ours = complete_linkage_clusters(t, threshold)
    assert partition(ours) == ref_complete_linkage(t, threshold)
    # labels 0.. in order of first appearance
    first = [ours.tolist().index(label) for label in range(int(ours.max()) + 1)]
    assert first == sorted(first)
    from scipy.cluster.hierarchy import fcluster, linkage  # scikit-learn's dependency
    labels = fcluster(linkage(t.numpy(), method='complete', metric='cosine'), t=threshold,
                      criterion='distance')
    assert partition(torch.as_tensor(labels)) == partition(ours)


def test_complete_linkage_singletons_and_duplicates():
    t = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=-1)
    assert partition(complete_linkage_clusters(t, 0.0)) == [[0], [1], [2], [3], [4]]
    doubled = torch.cat([t, t[:1]])
    assert partition(complete_linkage_clusters(doubled, 0.0)) == [[0, 5], [1], [2], [3], [4]]
    assert complete_linkage_clusters(t[:1], 0.5).tolist() == [0]


@pytest.mark.parametrize('gamma,a', [(0.25, 0.04), (0.0, 0.3), (0.4, 0.0)])
def test_refined_logits_equal_the_derivation(gamma, a):
    torch.manual_seed(10)
    features = torch.randn(3, 12, 8, dtype=torch.float64)
    g = torch.randn(3, 8, dtype=torch.float64)
    t = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1)
    t[4] = F.normalize(t[1] + 0.1 * t[4], dim=0)  # a cluster of two
    from mmseg_selfattn.rfclip import TextRefinement
    refine = TextRefinement(cluster_threshold=0.2, weight=a)
    clusters = complete_linkage_clusters(t, 0.2)
    assert len(set(clusters.tolist())) < 6
    ours = rfclip_logits(features, g, t, gamma, refine, clusters)
    for b in range(3):
        expected = ref_logits(features[b], g[b], t, partition(clusters), gamma, a)
        torch.testing.assert_close(ours[b].double(), expected, rtol=1e-6, atol=1e-6)
    plain = rfclip_logits(features, g, t, gamma)
    expected = ref_logits(features[0], g[0], t, None, gamma, a)
    torch.testing.assert_close(plain[0].double(), expected, rtol=1e-6, atol=1e-6)


def test_refinement_neutral_values_are_bitwise():
    """a = 0 keeps every query (re-normalised unit vectors equal themselves up to
    rounding, so check the refined vectors), and gamma = 0 without refinement is the
    package's plain classifier, bitwise."""
    torch.manual_seed(11)
    crops = torch.randn(2, 3, 32, 32)
    plain = build_tiny_segmentor(attention='rfclip')
    mixed = plain.with_pipeline(global_semantics_weight=0.0, global_image='crop')
    with torch.no_grad():
        encoded = plain.pipeline.encode_crops(crops)
        assert torch.equal(plain.pipeline.stage_patch_logits(encoded),
                           mixed.pipeline.stage_patch_logits(encoded))
    features = F.normalize(torch.randn(2, 9, 8), dim=-1)
    t = F.normalize(torch.randn(4, 8), dim=-1)
    refined = refined_queries(features, F.normalize(torch.randn(2, 8), dim=-1), t,
                              torch.tensor([0, 1, 2, 3]), 0.0)
    torch.testing.assert_close(refined, t[None].expand(2, -1, -1), rtol=0, atol=1e-6)
    # top_k beyond N is clamped (every patch averaged)
    refined = refined_queries(features, F.normalize(torch.randn(2, 8), dim=-1), t,
                              torch.tensor([0, 0, 0, 0]), 1.0, top_k=50)
    assert torch.isfinite(refined).all()


def test_whole_image_embedding_once_per_image(monkeypatch):
    """global_image='whole': every crop's g is its image's whole-image x_cls (filter
    included), computed once per image group (not per crop); equals the derivation."""
    torch.manual_seed(12)
    images = torch.randn(2, 3, 44, 60)  # 5 x 7 whole patches; 32-pixel windows
    model = perturb(build_tiny_segmentor(
        attention='rfclip', apply_distraction_filter=True,
        distraction_filter_cfg=dict(channels=CHANNELS), apply_text_refinement=True,
        text_refinement_cfg=dict(cluster_threshold=0.5, weight=0.3),
        global_semantics_weight=0.3))
    pipeline, engine = model.pipeline, model.engine
    calls = []
    original = pipeline.image_embeddings
    monkeypatch.setattr(pipeline, 'image_embeddings',
                        lambda batch: calls.append(len(batch)) or original(batch))
    seen = []
    classify = pipeline.classify
    monkeypatch.setattr(pipeline, 'classify',
                        lambda f, x, g=None: seen.append(g) or classify(f, x, g))
    merge = engine.window_merge((44, 60), (44, 60), images.device)
    with torch.no_grad():
        logits = engine.window_patch_logits(images, merge)
    assert calls == [2]
    visual = copy.deepcopy(pipeline.encoder.visual).double()
    g = torch.cat(seen)
    windows = merge.num_windows
    assert g.shape[0] == 2 * windows
    for i in range(2):
        x = ref_tokens(visual, images[i, :, :40, :56], (5, 7))
        for block in visual.transformer.resblocks:
            x, _ = ref_block(block, x)
            x = ref_filter(x, (5, 7), CHANNELS)
        expected = ref_layer_norm(visual.ln_post, x[0]) @ visual.proj.double()
        for j in range(windows):
            torch.testing.assert_close(g[i * windows + j].double(), expected, rtol=1e-4,
                                       atol=1e-4)
    # the logits of one window equal the derivation with that g
    crops = merge.cut(images[:1])
    features, _ = ref_rfclip(visual, crops[0])
    queries = pipeline.text_classifier.query_embeddings(pipeline.class_names).double()
    clusters = partition(pipeline.query_clusters())
    expected = ref_logits(features, g[0].double(), queries, clusters, 0.3, 0.3)
    torch.testing.assert_close(logits[0].flatten(1).T.double(), expected, rtol=1e-4,
                               atol=1e-4)


def test_global_image_crop_uses_the_crop_cls_and_refusals():
    torch.manual_seed(13)
    model = build_tiny_segmentor(attention='naclip', global_semantics_weight=0.5,
                                 global_image='crop')
    crops = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        encoded = model.pipeline.encode_crops(crops)
        ours = model.pipeline.stage_patch_logits(encoded).flatten(2).transpose(1, 2)
        features = model.pipeline.dense_block(encoded, None)
    queries = model.pipeline.text_classifier.query_embeddings(model.pipeline.class_names)
    expected = 0.5 * F.normalize(features, dim=-1) @ queries.T + \
        0.5 * (F.normalize(encoded.x_cls, dim=-1) @ queries.T)[:, None]
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    whole = build_tiny_segmentor(global_semantics_weight=0.5)
    with pytest.raises(ValueError, match=r"global_image='whole'.*needs each crop's "
                       r'whole-image embedding'):
        whole.pipeline.stage_patch_logits(whole.pipeline.encode_crops(crops))
    with pytest.raises(ValueError, match=r"global_image='whole'.*cuda_graph=True"):
        build_tiny_segmentor(global_semantics_weight=0.5, cuda_graph=True)
    with pytest.raises(ValueError, match=r"global_image='whole'.*test_scales"):
        build_tiny_segmentor(global_semantics_weight=0.5, test_scales=(0.5, 1.0))
    with pytest.raises(ValueError, match=r'global_image must be one of'):
        build_tiny_segmentor(global_image='image')
    with pytest.raises(ValueError, match=r'global_semantics_weight must be a number in '
                       r'\[0, 1\]'):
        build_tiny_segmentor(global_semantics_weight=1.5)
    with pytest.raises(ValueError, match=r'text_refinement_cfg\.top_k'):
        build_tiny_segmentor(text_refinement_cfg=dict(top_k=0))
    with pytest.raises(ValueError, match=r"attention='scclip' cannot combine with "
                       r'apply_text_refinement=True'):
        build_tiny_segmentor(attention='scclip', apply_text_refinement=True,
                             scclip_cfg=dict(pre_layer=1, post_layer=0, fusion_layers=(0, 1)))


def test_whole_slide_zero_uses_the_crop_and_predict_runs():
    """slide_crop=0 (VOC21's preset): the window is the image, g is its own x_cls (no
    second pass); predict gives finite probabilities."""
    torch.manual_seed(14)
    model = build_tiny_segmentor(attention='rfclip', slide_crop=0, apply_text_refinement=True,
                                 global_semantics_weight=0.1)
    calls = []
    model.pipeline.image_embeddings = lambda batch: calls.append(1)
    images = torch.randn(1, 3, 40, 48)
    out = model.predict(images)
    assert calls == []
    assert torch.isfinite(out[0].seg_logits.data).all()


def test_sweep_variants_equal_their_own_predict():
    """tools/sweep.py's shared encodings: variants with and without the filter / the
    rfclip block / the whole-image g each equal their own predict."""
    from mmseg_selfattn.sweep import predict_variants
    base = perturb(build_tiny_segmentor(
        attention='rfclip', apply_distraction_filter=True,
        distraction_filter_cfg=dict(channels=CHANNELS), apply_text_refinement=True,
        global_semantics_weight=0.2))
    variants = [base, base.with_pipeline(attention='naclip', apply_distraction_filter=False,
                                         apply_text_refinement=False,
                                         global_semantics_weight=0.0),
                base.with_pipeline(global_semantics_weight=0.5, global_image='crop'),
                base.with_pipeline(attention='naclip', apply_rcs=True,
                                   rcs_cfg=dict(layers=(0, 1)))]
    torch.manual_seed(15)
    images = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        expected = [variant.predict(images)[1].seg_logits.data.clone() for variant in variants]
        for want, samples in zip(expected, predict_variants(variants, images, None)):
            torch.testing.assert_close(samples[1].seg_logits.data, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected[0], expected[1])


def test_whole_image_embedding_equals_the_whole_image_window():
    """g of an image (its whole patches, a side below one patch padded to one) is the
    x_cls of the slide_crop=0 window of that image."""
    torch.manual_seed(16)
    model = build_tiny_segmentor(attention='rfclip', slide_crop=0)
    for size in [(44, 60), (5, 37)]:
        images = torch.randn(2, 3, *size)
        merge = model.engine.window_merge(size, size, images.device)
        with torch.no_grad():
            ours = model.pipeline.image_embeddings(images)
            expected = model.pipeline.encode_crops(merge.cut(images)).x_cls
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_explain_runs_with_rfclip():
    """explain() (a real predict with the recorder on) runs with every RF-CLIP part and
    gives finite probabilities; the recorder is removed afterwards."""
    import numpy as np
    from mmengine.registry import init_default_scope
    init_default_scope('mmseg')
    model = perturb(build_tiny_segmentor(
        attention='rfclip', apply_distraction_filter=True,
        distraction_filter_cfg=dict(channels=CHANNELS), apply_text_refinement=True,
        global_semantics_weight=0.2))
    image = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    maps = model.explain(image)
    assert np.isfinite(np.asarray(maps.probabilities)).all()
    assert model.pipeline.recorder is None


def test_logits_batched_equal_one_crop_at_a_time():
    """Filter, rfclip block, refinement and the crop's own g: the batched logits equal
    those of one crop at a time."""
    model = perturb(build_tiny_segmentor(
        attention='rfclip', apply_distraction_filter=True,
        distraction_filter_cfg=dict(channels=CHANNELS), apply_text_refinement=True,
        text_refinement_cfg=dict(cluster_threshold=0.6, weight=0.5),
        global_semantics_weight=0.3, global_image='crop'))
    torch.manual_seed(17)
    crops = torch.randn(5, 3, 32, 40)
    with torch.no_grad():
        batched = model.pipeline.crop_patch_logits(crops)
        single = torch.cat([model.pipeline.crop_patch_logits(c[None]) for c in crops])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_cuda_graph_inputs_keep_the_whole_image_embedding():
    """flatten_encoded / rebuild (the sweep's CUDA-graph inputs) carry g."""
    from mmseg_selfattn.cuda_graphs import flatten_encoded
    model = build_tiny_segmentor(attention='rfclip', global_semantics_weight=0.4)
    torch.manual_seed(18)
    images = torch.randn(1, 3, 40, 56)
    merge = model.engine.window_merge((40, 56), (40, 56), images.device)
    with torch.no_grad():
        encoded = list(model.pipeline.attach_image_embeddings(
            (model.pipeline.encode_crops(c) for c in model.engine.crop_batches(images, merge)),
            images, merge.num_windows))
        expected = model.pipeline.stage_patch_logits(encoded[0])
        tensors, rebuild = flatten_encoded(encoded, model.pipeline.dense_key)
        again = model.pipeline.stage_patch_logits(rebuild(tensors)[0])
    assert torch.equal(expected, again)
