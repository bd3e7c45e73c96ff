"""SC-CLIP (attention='scclip') against an independent one-crop-at-a-time re-derivation of
the published forward, written from ../shared/methods/sc-clip.md §2 (float64, Python-level
loops for LOF, the quantile and the neighbour means, one head at a time)."""
import math
import re

import pytest
import torch
import torch.nn.functional as F
from mmseg.registry import MODELS

from mmseg_selfattn.clip_loader import load_clip
from mmseg_selfattn.scclip import SCCLIPHead, anomaly_mask, lof_scores, scclip_features

from conftest import TINY_ARCH

B16_ARCH = 'ViT-Tiny-16-test'  # ViT-B/16's patch and 14 x 14 grid, 2 blocks


# -- the re-derivation, one crop --------------------------------------------------------------
def ref_lof(y, k=30):
    """The code's LOF, literally: squared distances, kNN without the token itself, the
    reach distance max(kappa_i, d_ij) (the code's: kappa of the token itself), the local
    reachability density and the ratio of densities."""
    num = len(y)
    k = min(k, num - 1)
    if k < 1:
        return [0.0] * num
    d = ((y[:, None] - y[None]) ** 2).sum(-1).tolist()
    knn = [sorted(range(num), key=lambda j: d[i][j])[1:k + 1] for i in range(num)]
    kappa = [d[i][knn[i][-1]] for i in range(num)]
    reach = [[max(kappa[i], d[i][j]) for j in knn[i]] for i in range(num)]
    lrd = [1 / (sum(r) / k) for r in reach]
    return [sum(lrd[j] for j in knn[i]) / k / lrd[i] for i in range(num)]


def ref_outliers(lof, contamination=0.05):
    """{i : LOF_i > quantile(LOF, 1 - c)}, linear interpolation between order statistics."""
    ordered = sorted(lof)
    position = (len(lof) - 1) * (1 - contamination)
    low = math.floor(position)
    high = min(low + 1, len(lof) - 1)
    quantile = ordered[low] + (ordered[high] - ordered[low]) * (position - low)
    return {i for i, value in enumerate(lof) if value > quantile}


def ref_resolve(y, outliers, grid):
    """Each outlier -> the mean of its in-grid 8-neighbours outside O (row-major grid)."""
    h, w = grid
    out = y.clone()
    for i in outliers:
        r, c = divmod(i, w)
        clean = [rr * w + cc for rr in (r - 1, r, r + 1) for cc in (c - 1, c, c + 1)
                 if (rr, cc) != (r, c) and 0 <= rr < h and 0 <= cc < w
                 and rr * w + cc not in outliers]
        if clean:
            out[i] = y[clean].mean(0)
    return out


def ref_cos(y):
    unit = y / y.norm(dim=-1, keepdim=True)
    return unit @ unit.T


def ref_thr(s, beta):
    n = len(s)
    return torch.tensor([[s[i, j].item() if (s[i, j] >= beta or i == j) else 0.0
                          for j in range(n)] for i in range(n)], dtype=s.dtype)


def ref_agg(w, y):
    return (w @ y) / (w.sum(1, keepdim=True) + 1e-6)


def ref_g(s, tau):
    mean = s.mean()
    logits = torch.where(s < mean, torch.full_like(s, -math.inf), tau * (s - mean))
    return logits.softmax(-1)


def ref_att(block, u, g):
    attn = block.attn
    width = u.shape[-1]
    heads = attn.num_heads
    d = width // heads
    x = F.layer_norm(u, (width, ), block.ln_1.weight.double(), block.ln_1.bias.double(),
                     block.ln_1.eps)
    w, b = attn.in_proj_weight.double(), attn.in_proj_bias.double()
    outs = []
    for h in range(heads):
        k = x @ w[width + h * d:width + (h + 1) * d].T + b[width + h * d:width + (h + 1) * d]
        v = x @ w[2 * width + h * d:2 * width + (h + 1) * d].T + b[2 * width + h * d:
                                                                    2 * width + (h + 1) * d]
        p = 0.5 * (g + (k @ k.T / math.sqrt(d)).softmax(-1))
        outs.append(p @ v)
    return torch.cat(outs, -1) @ attn.out_proj.weight.double().T + attn.out_proj.bias.double()


def ref_output(visual, f):
    ln = visual.ln_post
    return F.layer_norm(f, (f.shape[-1], ), ln.weight.double(), ln.bias.double(),
                        ln.eps) @ visual.proj.double()


def reference(visual, z_last, z_pre, z_post, fusion, grid, neighbours=30, contamination=0.05,
              threshold=0.4, scale=3.0, cls_residual=0.3, outliers=None):
    """One crop: z_* (1+N, C) block outputs, fusion = the list of the fusion layers' z^b."""
    z_last, z_pre, z_post = z_last.double(), z_pre.double(), z_post.double()
    y = z_last[1:]
    if outliers is None:
        outliers = ref_outliers(ref_lof(y, neighbours), contamination)
    x0 = ref_resolve(y, outliers, grid)
    s_pre = ref_cos(ref_resolve(z_pre[1:], outliers, grid))
    w_post = ref_thr(ref_cos(z_post[1:]), threshold)
    g = ref_g(s_pre, scale)
    x1 = ref_agg(ref_thr(s_pre, threshold), x0)
    last = visual.transformer.resblocks[-1]
    f = ref_agg(w_post, ref_att(last, x1, g) + cls_residual * z_last[0])
    if fusion:
        m = sum(z.double() for z in fusion)
        f = f + ref_agg(w_post, ref_att(last, m[1:], g) + cls_residual * m[0])
    return ref_output(visual, f)


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def b16_visual():
    torch.manual_seed(0)
    return load_clip(B16_ARCH, pretrained=None).visual.eval()


def random_layers(batch, grid, width, generator, planted=()):
    """(B, 1+N, C) stand-ins for z^{L-2}, z^pre, z^post and two fusion layers."""
    num = grid[0] * grid[1]
    layers = [torch.randn(batch, 1 + num, width, generator=generator) for _ in range(5)]
    for crop, token in planted:  # far from everything, each in its own direction
        direction = F.normalize(torch.randn(width, generator=generator), dim=0)
        layers[0][crop, 1 + token] += 40 * direction
    return layers


def batched(visual, layers, grid, fusion=True, **settings):
    z_last, z_pre, z_post, *fusion_layers = layers
    fusion_sum = sum(z.float() for z in fusion_layers) if fusion else None
    with torch.no_grad():
        return scclip_features(visual, z_last, z_pre[:, 1:], z_post[:, 1:], fusion_sum, grid,
                               **settings)


def per_crop(visual, layers, grid, fusion=True, **settings):
    z_last, z_pre, z_post, *fusion_layers = layers
    with torch.no_grad():
        return torch.stack([reference(visual, z_last[b], z_pre[b], z_post[b],
                                      [z[b] for z in fusion_layers] if fusion else [], grid,
                                      **settings) for b in range(len(z_last))])


def assert_close(ours, expected):
    torch.testing.assert_close(ours.double(), expected, atol=2e-4, rtol=2e-4)


# -- the batched forward against the re-derivation ---------------------------------------------
@pytest.mark.parametrize('grid', [(14, 14), (10, 14), (14, 20)], ids=lambda g: f'{g[0]}x{g[1]}')
def test_batched_forward_equals_the_one_crop_derivation(b16_visual, grid):
    generator = torch.Generator().manual_seed(sum(grid))
    layers = random_layers(3, grid, 64, generator, planted=[(0, 5), (0, 77), (2, 30)])
    assert_close(batched(b16_visual, layers, grid), per_crop(b16_visual, layers, grid))


def test_published_outlier_counts_and_planted_anomalies():
    """10 outliers at N = 196, 14 at 280, 7 at 140 (sc-clip.md §2.1); the planted ones are
    among them, with the highest LOF."""
    generator = torch.Generator().manual_seed(3)
    for num, count in ((196, 10), (280, 14), (140, 7)):
        features = torch.randn(2, num, 32, generator=generator)
        planted = [4, 50, num - 1]
        for token in planted:
            features[1, token] += 30 * F.normalize(torch.randn(32, generator=generator), dim=0)
        scores = lof_scores(features, 30)
        mask = anomaly_mask(scores, 0.05)
        assert mask.sum(-1).tolist() == [count, count]
        assert set(scores[1].topk(3).indices.tolist()) == set(planted)
        assert mask[1, planted].all()
        for crop in range(2):  # the literal formula and the quantile, one crop at a time
            reference_lof = ref_lof(features[crop].double())
            torch.testing.assert_close(scores[crop].double(),
                                       torch.tensor(reference_lof, dtype=torch.float64),
                                       rtol=1e-5, atol=0)
            assert set(mask[crop].nonzero().flatten().tolist()) == ref_outliers(reference_lof)


def test_lof_is_the_reduced_formula_not_scikit_learns():
    features = torch.randn(1, 120, 16, generator=torch.Generator().manual_seed(4))
    ours = lof_scores(features, 30)[0].double()
    y = features[0].double()
    d = torch.cdist(y, y).square()
    knn_d, knn = d.topk(31, largest=False)
    kappa = knn_d[:, -1]
    reduced = (kappa[:, None] / kappa[knn[:, 1:]]).mean(-1)  # (1/k) sum kappa_i / kappa_j
    torch.testing.assert_close(ours, reduced, rtol=1e-5, atol=0)
    neighbors = pytest.importorskip('sklearn.neighbors')
    for metric in ('euclidean', 'sqeuclidean'):
        sklearn_lof = -neighbors.LocalOutlierFactor(n_neighbors=30, metric=metric).fit(
            y.numpy()).negative_outlier_factor_
        assert (ours - torch.from_numpy(sklearn_lof)).abs().max() > 1e-2, metric


# -- neutral values: the formula with that part removed ------------------------------------------
def test_neutral_values_remove_their_part(b16_visual):
    grid = (7, 9)
    generator = torch.Generator().manual_seed(6)
    layers = random_layers(2, grid, 64, generator, planted=[(0, 10), (1, 40)])
    z_last, z_pre, z_post, *fusion = [z.double() for z in layers]
    last = b16_visual.transformer.resblocks[-1]

    # anomaly_contamination=0: O empty, i.e. no resolution at all
    ours = batched(b16_visual, layers, grid, contamination=0.0)
    assert_close(ours, per_crop(b16_visual, layers, grid, outliers=set()))
    assert not anomaly_mask(lof_scores(z_last[:, 1:].float(), 30), 0.0).any()

    # similarity_threshold > 1: W = I (Agg divides by 1 + 1e-6)
    ours = batched(b16_visual, layers, grid, threshold=1.5)
    expected = []
    for b in range(2):
        outliers = ref_outliers(ref_lof(z_last[b, 1:]))
        x0 = ref_resolve(z_last[b, 1:], outliers, grid)
        g = ref_g(ref_cos(ref_resolve(z_pre[b, 1:], outliers, grid)), 3.0)
        m = fusion[0][b] + fusion[1][b]
        f = ((ref_att(last, x0 / (1 + 1e-6), g) + 0.3 * z_last[b, 0])
             + (ref_att(last, m[1:], g) + 0.3 * m[0])) / (1 + 1e-6)
        expected.append(ref_output(b16_visual, f))
    assert_close(ours, torch.stack(expected))

    # fusion_layers=(): F2 = 0
    ours = batched(b16_visual, layers, grid, fusion=False)
    assert_close(ours, per_crop(b16_visual, layers, grid, fusion=False))

    # cls_residual=0: no CLS term in either branch
    ours = batched(b16_visual, layers, grid, cls_residual=0.0)
    expected = []
    for b in range(2):
        outliers = ref_outliers(ref_lof(z_last[b, 1:]))
        s_pre = ref_cos(ref_resolve(z_pre[b, 1:], outliers, grid))
        w_post, g = ref_thr(ref_cos(z_post[b, 1:]), 0.4), ref_g(s_pre, 3.0)
        x1 = ref_agg(ref_thr(s_pre, 0.4), ref_resolve(z_last[b, 1:], outliers, grid))
        m = fusion[0][b] + fusion[1][b]
        f = ref_agg(w_post, ref_att(last, x1, g)) + ref_agg(w_post, ref_att(last, m[1:], g))
        expected.append(ref_output(b16_visual, f))
    assert_close(ours, torch.stack(expected))


@pytest.mark.parametrize('grid', [(1, 1), (2, 3), (5, 5), (4, 7)], ids=lambda g: f'{g[0]}x{g[1]}')
def test_tiny_grids_and_empty_outlier_sets_are_finite(b16_visual, grid):
    """N < 31 (the published topk fails): k is clamped to N - 1; an empty O (tied LOF:
    identical tokens, or contamination 0) leaves the features unresolved."""
    generator = torch.Generator().manual_seed(7)
    layers = random_layers(2, grid, 64, generator)
    layers[0][1, 1:] = layers[0][1, 1]  # crop 1: all patches equal, LOF all tied
    ours = batched(b16_visual, layers, grid)
    assert torch.isfinite(ours).all()
    assert not anomaly_mask(lof_scores(layers[0][1:, 1:], 30), 0.05).any()
    if grid[0] * grid[1] > 1:
        assert_close(ours[:1], per_crop(b16_visual, [z[:1] for z in layers], grid))


def test_deterministic(b16_visual):
    layers = random_layers(2, (14, 14), 64, torch.Generator().manual_seed(8))
    assert torch.equal(batched(b16_visual, layers, (14, 14)), batched(b16_visual, layers, (14, 14)))


# -- the encoder and the pipeline ---------------------------------------------------------------
def block_outputs(encoder, images):
    """z^0 .. z^{L-2} (B, 1+N, C): open_clip's own blocks, one after the other, on the
    embedded crops (the positional embedding resized as the encoder does)."""
    grid = (images.shape[-2] // encoder.patch_size[0], images.shape[-1] // encoder.patch_size[1])
    x, outputs = encoder._embed(images, grid), []
    with torch.no_grad():
        for block in encoder.visual.transformer.resblocks[:-1]:
            x = block(x)
            outputs.append(x)
    return outputs


def build(arch=TINY_ARCH, **overrides):
    torch.manual_seed(0)
    return MODELS.build(dict(dict(
        type='SelfAttnCLIPSegmentor', clip=dict(arch=arch, pretrained=None),
        class_names=['sky', 'tree', 'road'], slide_crop=32, slide_stride=16, attention='scclip',
        scclip_cfg=dict(pre_layer=1, post_layer=0, fusion_layers=(0, 1))), **overrides))


@pytest.mark.parametrize('arch, size, cfg', [
    (TINY_ARCH, (48, 64), dict(pre_layer=-2, post_layer=0, fusion_layers=(0, 1))),
    (B16_ARCH, (224, 224), dict(pre_layer=0, post_layer=0, fusion_layers=(0, ))),
])
def test_pipeline_equals_the_derivation_on_open_clips_forward(arch, size, cfg):
    """The pipeline's X from its own encoding equals the re-derivation on the outputs of
    open_clip's blocks; the standard last block is not run."""
    model = build(arch, scclip_cfg=cfg)
    visual = model.pipeline.encoder.visual
    crops = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        encoded = model.pipeline.encode_crops(crops)
        ours = model.pipeline.dense_block(encoded, None)
    assert encoded.q is None and encoded.x_cls is None and encoded.attention is None
    z = block_outputs(model.pipeline.encoder, crops)
    grid = encoded.grid
    pre, post = (model.pipeline.scclip.pre_layer, model.pipeline.scclip.post_layer)
    # only what SC-CLIP reads is kept: two patch layers and one running sum
    assert set(encoded.mid_features) == {pre, post}
    assert list(encoded.layer_sums) == [model.pipeline.scclip.fusion_layers]
    expected = torch.stack([
        reference(visual, z[-1][b], z[pre][b], z[post][b],
                  [z[layer][b] for layer in model.pipeline.scclip.fusion_layers], grid)
        for b in range(2)])
    assert_close(ours, expected)


def test_segmentor_end_to_end_on_an_odd_size_image():
    model = build()
    image = torch.rand(1, 3, 37, 53, generator=torch.Generator().manual_seed(10)) * 255
    sample = model.predict(image)[0]
    probs = sample.seg_logits.data
    assert probs.shape == (3, 37, 53) and torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(0), torch.ones(37, 53))
    assert sample.pred_sem_seg.data.shape == (1, 37, 53)
    assert model.extract_feat(image).shape == (1, 5 * 7, 32)
    # whole image, one crop of a non-square grid
    assert torch.isfinite(build(slide_crop=0).predict(image)[0].seg_logits.data).all()


def test_with_pipeline_and_sweeps_mix_scclip_with_other_variants():
    from mmseg_selfattn.sweep import predict_variants
    model = build()
    image = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(11)) * 255
    naclip = model.with_pipeline(attention='naclip')
    neutral = model.with_pipeline(scclip_cfg=dict(pre_layer=1, post_layer=0, fusion_layers=(),
                                                  anomaly_contamination=0.0))
    alone = [m.predict(image)[0].seg_logits.data.clone() for m in (model, naclip, neutral)]
    for variants in ((model, naclip, neutral), (naclip, model, neutral)):
        swept = [samples[0].seg_logits.data.clone()
                 for samples in predict_variants(variants, image, None)]
        by_model = dict(zip(map(id, variants), swept))
        for m, expected in zip((model, naclip, neutral), alone):
            torch.testing.assert_close(by_model[id(m)], expected)
    assert not torch.allclose(alone[0], alone[2])
    # a sweep grid may vary one scclip_cfg key
    from mmseg_selfattn.sweep import check_grid, parse_grid, pipeline_overrides
    grid = check_grid(parse_grid(['scclip_cfg.similarity_threshold=0.3,0.5']))
    overrides = pipeline_overrides(model.pipeline_settings, dict(
        (key, values[0]) for key, values in grid.items()))
    assert overrides['scclip_cfg'] == dict(pre_layer=1, post_layer=0, fusion_layers=(0, 1),
                                           similarity_threshold=0.3)
    assert model.with_pipeline(**overrides).pipeline.scclip.similarity_threshold == 0.3


def test_cuda_graph_inputs_of_an_scclip_encoding():
    """``flatten_encoded`` (the graph inputs of a sweep's memoised dense block) has no x_cls
    or A to carry for scclip: X alone, rebuilt to the same logits."""
    from mmseg_selfattn.cuda_graphs import flatten_encoded
    pipeline = build().pipeline
    encoded = [pipeline.encode_crops(torch.randn(3, 3, 32, 32))]
    expected = pipeline.stage_patch_logits(encoded[0])  # fills the dense memo
    tensors, rebuild = flatten_encoded(encoded, pipeline.dense_key)
    assert len(tensors) == 1
    rebuilt = rebuild([tensor.clone() for tensor in tensors])
    assert rebuilt[0].x_cls is None
    assert torch.equal(pipeline.stage_patch_logits(rebuilt[0]), expected)


# -- config errors ---------------------------------------------------------------------------
@pytest.mark.parametrize('cfg, message', [
    (dict(anomaly_neighbours=0), 'scclip_cfg.anomaly_neighbours must be an int >= 1, got 0.'),
    (dict(anomaly_neighbours=2.5), 'scclip_cfg.anomaly_neighbours must be an int >= 1'),
    (dict(anomaly_contamination=1.5),
     'scclip_cfg.anomaly_contamination must be a number in [0, 1], got 1.5.'),
    (dict(anomaly_contamination=math.nan), 'scclip_cfg.anomaly_contamination must be a number'),
    (dict(pre_layer=2), 'scclip_cfg.pre_layer must be a block in [0, 1] or [-3, -2] (the ViT '
                        'has 3 blocks; SC-CLIP reads blocks 0..L-2 and replaces the last), got 2.'),
    (dict(pre_layer=-1), 'scclip_cfg.pre_layer must be a block in [0, 1] or [-3, -2]'),
    (dict(post_layer=1.0), 'scclip_cfg.post_layer must be an int (a 0-based block index, '
                           'negative from the end), got 1.0.'),
    (dict(post_layer=-4), 'scclip_cfg.post_layer must be a block in [0, 1]'),
    (dict(similarity_threshold=-0.1),
     'scclip_cfg.similarity_threshold must be a number in [0, inf), got -0.1.'),
    (dict(similarity_scale=math.inf), 'scclip_cfg.similarity_scale must be a number in [0, inf)'),
    (dict(fusion_layers=(0, 7)), 'scclip_cfg.fusion_layers must be a block in [0, 1] or [-3, -2]'),
    (dict(fusion_layers='01'), 'scclip_cfg.fusion_layers must be a list of ints'),
    (dict(fusion_layers=(1, -2)), 'scclip_cfg.fusion_layers must name each block once, got '
                                  '[1, -2] (blocks [1, 1]).'),
    (dict(cls_residual=math.inf), 'scclip_cfg.cls_residual must be a number in (-inf, inf)'),
    (dict(res_cls=0.3), "scclip_cfg: unknown key(s) ['res_cls']; allowed: ['anomaly_neighbours',"),
])
def test_bad_scclip_cfg_fails_at_build(cfg, message):
    cfg = dict(dict(pre_layer=1, post_layer=0, fusion_layers=(0, 1)), **cfg)
    with pytest.raises(ValueError, match='^' + re.escape(message)) as error:
        build(scclip_cfg=cfg)
    assert '\n' not in str(error.value)


@pytest.mark.parametrize('overrides, named', [
    (dict(apply_similarity_enhancement=True, similarity_enhancement_cfg=dict(layer=0)),
     'apply_similarity_enhancement=True'),
    (dict(apply_self_attn_enhancement=True), 'apply_self_attn_enhancement=True'),
    (dict(apply_outlier_suppression=True, apply_ctd=True),
     'apply_outlier_suppression=True, apply_ctd=True'),
    (dict(apply_global_debias=True), 'apply_global_debias=True'),
    (dict(cls_token_lambda=0.3), 'cls_token_lambda=0.3'),
])
def test_stages_that_read_a_or_x_cls_cannot_combine(overrides, named):
    with pytest.raises(ValueError, match=re.escape(
            f"attention='scclip' cannot combine with {named}: SC-CLIP never runs the standard "
            'last block')):
        build(**overrides)


def test_scclip_cfg_is_checked_for_other_variants_too():
    """A typo in scclip_cfg fails even when another variant is chosen; the layers are checked
    against the ViT only for attention='scclip' (the base config's 8 / 3 / 3..9 are ViT-B's)."""
    with pytest.raises(ValueError, match=re.escape("scclip_cfg: unknown key(s) ['beta']")):
        build(attention='naclip', scclip_cfg=dict(beta=0.4))
    with pytest.raises(ValueError, match=re.escape('scclip_cfg must be a dict')):
        build(attention='naclip', scclip_cfg=[1])
    assert build(attention='naclip', scclip_cfg=dict(pre_layer=8)).pipeline.scclip is None
    assert SCCLIPHead().fusion_layers == (3, 4, 5, 6, 7, 8, 9)
