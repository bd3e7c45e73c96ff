# End-to-end throughput of tools/test.py on real files: the full pipeline on CamVid val
# (480x360 PNGs), fp16 with CUDA graphs, 32 images per batch, 8 loader workers, the split
# read 20 times so that start-up (workers, text embeddings, graph capture) is a small part
# of the timed loop.
_base_ = '../selfattn/selfattn-full_vit-b16_camvid.py'
model = dict(precision='fp16', cuda_graph=True, max_crops_per_forward=256)
test_dataloader = dict(
    batch_size=32,
    num_workers=8,
    dataset=dict(
        _delete_=True,
        type='RepeatDataset',
        times=20,
        dataset={{_base_.test_dataloader.dataset}}))
