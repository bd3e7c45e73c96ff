# PASCAL VOC 2012 val, 21 classes (background + 20), as in SCLIP/NACLIP.
dataset_type = 'PascalVOCDataset'
data_root = 'data/VOCdevkit/VOC2012'
# class-name queries; a leaf passes it on as model.name_path
name_path = '{{fileDirname}}/../../class_names/voc21.txt'

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
            img_path='JPEGImages', seg_map_path='SegmentationClass'),
        ann_file='ImageSets/Segmentation/val.txt',
        pipeline=test_pipeline))
test_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
