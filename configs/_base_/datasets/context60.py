# PASCAL Context val (5,105 images), 60 classes with background at 0.
_base_ = './clip_test.py'
name_path = '{{fileDirname}}/../../class_names/context60.txt'
test_dataloader = dict(
    dataset=dict(
        type='PascalContext60Dataset',  # mmseg_selfattn/datasets.py
        data_root='data/VOCdevkit/VOC2010',
        data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClassContext'),
        ann_file='ImageSets/SegmentationContext/val.txt'))
