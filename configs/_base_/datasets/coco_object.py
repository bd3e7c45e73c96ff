# COCO-Object val2017 (5,000 images): background + 80 things, label maps
# *_instanceTrainIds.png from tools/dataset_converters/coco_object.py.
_base_ = './clip_test.py'
name_path = '{{fileDirname}}/../../class_names/coco_object.txt'
test_dataloader = dict(
    dataset=dict(
        type='COCOObjectDataset',  # mmseg_selfattn/datasets.py
        data_root='data/coco_stuff164k',
        data_prefix=dict(img_path='images/val2017', seg_map_path='annotations/val2017')))
