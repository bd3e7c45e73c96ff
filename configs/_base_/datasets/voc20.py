# PASCAL VOC 2012 val without background, 20 classes (reduce_zero_label: 0 -> ignore).
_base_ = './clip_test.py'
name_path = '{{fileDirname}}/../../class_names/voc20.txt'
test_dataloader = dict(
    dataset=dict(
        type='PascalVOC20Dataset',  # mmseg_selfattn/datasets.py
        data_root='data/VOCdevkit/VOC2012',
        data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClass'),
        ann_file='ImageSets/Segmentation/val.txt'))
