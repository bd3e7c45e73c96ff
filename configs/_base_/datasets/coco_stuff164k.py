# COCO-Stuff164k val2017 (5,000 images), 171 classes, label maps *_labelTrainIds.png
# from mmseg's coco_stuff164k.py converter.
_base_ = './clip_test.py'
name_path = '{{fileDirname}}/../../class_names/coco_stuff.txt'
test_dataloader = dict(
    dataset=dict(
        type='COCOStuffDataset',
        data_root='data/coco_stuff164k',
        data_prefix=dict(img_path='images/val2017', seg_map_path='annotations/val2017')))
