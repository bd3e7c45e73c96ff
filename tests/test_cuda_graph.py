"""cuda_graph=True replays the captured pipeline: same outputs as eager (needs a GPU)."""
import pytest
import torch
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

from mmseg_selfattn.cuda_graphs import CUDAGraphCache

from conftest import TINY_ARCH

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA graphs need a GPU')


def build(**overrides):
    cfg = dict(type='SelfAttnCLIPSegmentor', clip=dict(arch=TINY_ARCH, pretrained=None),
               class_names=['sky, clouds', 'tree', 'road; street; lane'], slide_crop=32,
               slide_stride=16, apply_similarity_enhancement=True,
               similarity_enhancement_cfg=dict(layer=-2), apply_self_attn_enhancement=True,
               apply_outlier_suppression=True, apply_global_debias=True, apply_ctd=True,
               prob_thd=0.1, area_thd=0.1)
    cfg.update(overrides)
    torch.manual_seed(0)
    return MODELS.build(cfg).cuda().eval()


@needs_cuda
def test_graph_replays_equal_eager_for_mixed_sizes():
    eager, graphed = build(), build(cuda_graph=True)
    sizes = [(40, 48), (40, 48), (24, 56)]
    generator = torch.Generator().manual_seed(0)
    padded = torch.randn(3, 3, 40, 56, generator=generator).cuda()
    samples = [SegDataSample(metainfo=dict(img_shape=size, ori_shape=size)) for size in sizes]
    expected = eager.predict(padded, samples)
    for _ in range(2):  # capture, then replay
        outputs = graphed.predict(padded, [SegDataSample(metainfo=s.metainfo) for s in samples])
        for out, ref in zip(outputs, expected):
            torch.testing.assert_close(out.seg_logits.data, ref.seg_logits.data, atol=1e-5,
                                       rtol=0)
            assert torch.equal(out.pred_sem_seg.data, ref.pred_sem_seg.data)
    assert len(graphed.engine._graphs) == 2  # one graph per group shape


@needs_cuda
def test_cache_returns_owned_outputs():
    cache, scaled = CUDAGraphCache(), lambda x, scale: (x * scale, )
    first = cache('k', scaled, (torch.ones(4, device='cuda'), ), 2.0)[0]
    second = cache('k', scaled, (torch.full((4, ), 3.0, device='cuda'), ), 2.0)[0]
    assert first.tolist() == [2.0] * 4 and second.tolist() == [6.0] * 4


@needs_cuda
def test_shapes_beyond_the_cap_run_eagerly():
    graphed = build(cuda_graph=True)
    graphed.engine._graphs.max_graphs = 1
    eager = build()
    for size in [(40, 48), (24, 56)]:
        image = torch.randn(1, 3, *size).cuda()
        for _ in range(2):  # captured on the second sighting, if there is room
            torch.testing.assert_close(graphed.predict(image)[0].seg_logits.data,
                                       eager.predict(image)[0].seg_logits.data, atol=1e-5,
                                       rtol=0)
    assert len(graphed.engine._graphs) == 1


@needs_cuda
def test_banded_merge_and_non_finite_check_inside_the_graph():
    eager = build(max_merge_elements=None)
    graphed = build(cuda_graph=True, max_merge_elements=7 * 56 * 5)  # bands of 5 rows
    image = torch.randn(1, 3, 40, 56).cuda()
    for _ in range(2):  # capture, then replay
        torch.testing.assert_close(graphed.predict(image)[0].seg_logits.data,
                                   eager.predict(image)[0].seg_logits.data, atol=1e-5, rtol=0)
    image[0, 0, 3, 4] = float('nan')
    with pytest.raises(ValueError, match='1 input values are NaN or inf'):
        graphed.predict(image)


@needs_cuda
def test_sweep_variants_replay_their_own_graphs():
    from mmseg_selfattn.sweep import predict_variants
    base = build(cuda_graph=True)
    variants = [base.with_pipeline(**overrides) for overrides in (
        {}, dict(attention='sclip'), dict(outlier_suppression_cfg=dict(top_k=3)),
        dict(apply_ctd=False))]
    inputs = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(1)).cuda()
    expected = []
    for variant in variants:
        eager = variant.with_pipeline()
        eager.engine.cuda_graph = False
        expected.append([(s.seg_logits.data, s.pred_sem_seg.data)
                         for s in eager.predict(inputs)])
    for _ in range(2):  # capture, then replay
        outputs = [[(s.seg_logits.data.clone(), s.pred_sem_seg.data.clone()) for s in samples]
                   for samples in predict_variants(variants, inputs, None)]
        for variant_outputs, variant_expected in zip(outputs, expected):
            for (probs, labels), (ref_probs, ref_labels) in zip(variant_outputs,
                                                                 variant_expected):
                torch.testing.assert_close(probs, ref_probs, atol=1e-5, rtol=0)
                assert torch.equal(labels, ref_labels)
    assert not torch.equal(outputs[0][0][0], outputs[1][0][0])  # the variants differ
    assert len(base.engine._graphs) == 4  # one per variant, in the shared cache


@needs_cuda
@pytest.mark.parametrize('precision', ['fp32', 'fp16'])
def test_compiled_model_inside_the_graph_equals_eager(precision):
    from mmseg_selfattn import crop_pipeline
    eager = build(precision=precision)
    fast = build(precision=precision, compile=True, cuda_graph=True)
    image = torch.randn(2, 3, 40, 56).cuda()
    for _ in range(2):  # compile + capture, then replay
        ours, theirs = fast.predict(image)[0], eager.predict(image)[0]
        if precision == 'fp32':  # rounding only
            torch.testing.assert_close(ours.seg_logits.data, theirs.seg_logits.data, atol=1e-4,
                                       rtol=0)
        else:  # half-precision rounding can flip a near-tied outlier or DBSCAN choice
            assert torch.isfinite(ours.seg_logits.data).all()
            assert (ours.pred_sem_seg.data == theirs.pred_sem_seg.data).float().mean() >= 0.95
    assert crop_pipeline._COMPILED_STAGES  # the stages ran compiled
    logits = fast.engine.slide_inference(image[0])  # eager call of the compiled parts
    assert (logits - eager.engine.slide_inference(image[0])).abs().max() <= (
        1e-5 if precision == 'fp32' else 5e-2)


@needs_cuda
@pytest.mark.parametrize('window', [dict(slide_crop=32, slide_stride=16),
                                    dict(slide_crop=0)])
@pytest.mark.parametrize('pamr_steps', [0, 3])
def test_pooled_crops_and_group_graphs_equal_eager(window, pamr_steps):
    """A batch of mixed sizes: crops of all groups pooled by crop shape (windows of any
    size; whole images of one patch grid), graphs captured on the second sighting, equal
    to the eager group-by-group run."""
    settings = dict(window, pamr_steps=pamr_steps, pamr_stride=(1, 2),
                    max_crops_per_forward=8)
    eager, graphed = build(**settings), build(cuda_graph=True, **settings)
    sizes = [(40, 48), (41, 50), (40, 48), (24, 56), (33, 40), (40, 48)]
    generator = torch.Generator().manual_seed(2)
    padded = torch.randn(len(sizes), 3, 41, 56, generator=generator).cuda()
    samples = [SegDataSample(metainfo=dict(img_shape=s, ori_shape=(s[0] + 3, s[1] - 2)))
               for s in sizes]
    expected = eager.predict(padded, samples)
    for _ in range(3):  # eager (first sighting), capture, replay
        outputs = graphed.predict(padded, [SegDataSample(metainfo=s.metainfo) for s in samples])
        for out, ref in zip(outputs, expected):
            torch.testing.assert_close(out.seg_logits.data, ref.seg_logits.data, atol=1e-5,
                                       rtol=0)
            assert torch.equal(out.pred_sem_seg.data, ref.pred_sem_seg.data)
    assert len(graphed.engine._crop_graphs) >= 1 and len(graphed.engine._graphs) >= 1
    if window['slide_crop']:  # one crop shape, pooled in chunks of 8, the rest split in
        # powers of two (few graph shapes for any window count)
        chunk_sizes = {key[2][0] for key in graphed.engine._crop_graphs._graphs}
        assert chunk_sizes and all(n <= 8 and n & (n - 1) == 0 for n in chunk_sizes)


@needs_cuda
def test_a_shape_seen_once_is_not_captured():
    graphed = build(cuda_graph=True)
    graphed.predict(torch.randn(1, 3, 40, 48).cuda())
    assert len(graphed.engine._graphs) == 0 and len(graphed.engine._crop_graphs) == 0
    graphed.predict(torch.randn(1, 3, 40, 48).cuda())
    assert len(graphed.engine._graphs) == 1 and len(graphed.engine._crop_graphs) == 1


@needs_cuda
def test_a_failed_capture_runs_eagerly_and_stops_capturing():
    cache = CUDAGraphCache(warmup=0)

    def synchronising(x):  # a host sync: not capturable
        return (x * float(x.sum()), )

    x = torch.ones(3, device='cuda')
    with pytest.warns(UserWarning, match='CUDA graph capture failed'):
        assert cache('a', synchronising, (x, ))[0].tolist() == [3.0] * 3
    assert not cache.accepts('b') and len(cache) == 0
    assert (x + 1).tolist() == [2.0] * 3  # the device still works
