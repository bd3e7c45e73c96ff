# ADE20K (ADEChallengeData2016) val, 150 classes; label 0 ("other") ignored.
dataset_type = 'ADE20KDataset'
data_root = 'data/ade/ADEChallengeData2016'
# class-name queries; a leaf passes it on as model.name_path
name_path = '{{fileDirname}}/../../class_names/ade20k.txt'

test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 336), keep_ratio=True),  # short side 336
    dict(type='LoadAnnotations'),  # reduce_zero_label comes from the dataset
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
            img_path='images/validation',
            seg_map_path='annotations/validation'),
        reduce_zero_label=True,
        pipeline=test_pipeline))
test_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
