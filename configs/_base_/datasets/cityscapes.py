# Cityscapes val (500 images), 19 classes, label maps *_gtFine_labelTrainIds.png from
# mmseg's cityscapes.py converter.
_base_ = './clip_test.py'
name_path = '{{fileDirname}}/../../class_names/cityscapes.txt'
test_dataloader = dict(
    dataset=dict(
        type='CityscapesDataset',
        data_root='data/cityscapes',
        data_prefix=dict(img_path='leftImg8bit/val', seg_map_path='gtFine/val')))
