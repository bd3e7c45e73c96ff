# CamVid (SegNet split) val, 11 classes; label 11 (unlabelled) -> 255.
_base_ = './clip_test.py'
name_path = '{{fileDirname}}/../../class_names/camvid.txt'
test_dataloader = dict(
    dataset=dict(
        type='CamVidDataset',  # mmseg_selfattn/datasets.py
        data_root='data/camvid',
        data_prefix=dict(img_path='images/val', seg_map_path='annotations/val')))
