# PASCAL VOC 2012 val (1,449 images), 21 classes (background + 20), as in SCLIP/NACLIP.
_base_ = './clip_test.py'
# class-name queries; a leaf passes it on as model.name_path
name_path = '{{fileDirname}}/../../class_names/voc21.txt'
test_dataloader = dict(
    dataset=dict(
        type='PascalVOCDataset',
        data_root='data/VOCdevkit/VOC2012',
        data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClass'),
        ann_file='ImageSets/Segmentation/val.txt'))
