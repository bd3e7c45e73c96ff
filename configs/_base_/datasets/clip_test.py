# Test-time data settings shared by every dataset base (as in the SCLIP/NACLIP configs):
# short side 336, mIoU. A dataset base sets test_dataloader.dataset. Batch size and loader
# workers follow the machine ('auto', mmseg_selfattn/machine.py): 16 images and up to 12
# workers on a GPU machine, 1 image and 2 workers on CPU (the published configs' values).
# The transforms and the metric are mmseg's, checked: bad data fails naming its file
# (mmseg_selfattn/transforms.py, metrics.py).
test_pipeline = [
    dict(type='LoadCheckedImageFromFile'),
    # short side 336; a 1 x 5000 image becomes 1 x 2048, not 0 x 2048
    dict(type='AtLeastOnePixelResize', scale=(2048, 336), keep_ratio=True),
    dict(type='LoadCheckedAnnotations'),  # reduce_zero_label comes from the dataset
    dict(type='PackSegInputs'),
]
test_dataloader = dict(
    batch_size='auto',
    num_workers='auto',
    persistent_workers=True,
    pin_memory=True,  # with the preprocessor's non_blocking copies
    sampler=dict(type='DefaultSampler', shuffle=False),
    # unserialised, an empty split still builds (mmengine's serialisation fails on it
    # obscurely), so that TestSetCheckHook can name the dataset and its paths
    dataset=dict(pipeline=test_pipeline, serialize_data=False))
# warns once per label value that is neither a class index nor 255
test_evaluator = dict(type='CheckedIoUMetric', iou_metrics=['mIoU'])
