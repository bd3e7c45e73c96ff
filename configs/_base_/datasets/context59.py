# PASCAL Context val without background, 59 classes (reduce_zero_label: 0 -> ignore).
_base_ = './clip_test.py'
name_path = '{{fileDirname}}/../../class_names/context59.txt'
test_dataloader = dict(
    dataset=dict(
        type='PascalContext59Dataset',  # mmseg_selfattn/datasets.py
        data_root='data/VOCdevkit/VOC2010',
        data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClassContext'),
        ann_file='ImageSets/SegmentationContext/val.txt'))
