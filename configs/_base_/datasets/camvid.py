# CamVid (SegNet split) val, 11 classes; label 11 (unlabelled) -> 255.
dataset_type = 'CamVidDataset'  # mmseg_selfattn/datasets.py
data_root = 'data/camvid'
# class-name queries; a leaf passes it on as model.name_path
name_path = '{{fileDirname}}/../../class_names/camvid.txt'

test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 336), keep_ratio=True),  # short side 336
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
test_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    pin_memory=True,  # with the preprocessor's non_blocking copies
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(
            img_path='images/val', seg_map_path='annotations/val'),
        pipeline=test_pipeline))
test_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
