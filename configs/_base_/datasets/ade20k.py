# ADE20K (ADEChallengeData2016) val (2,000 images), 150 classes; label 0 ("other") ignored.
_base_ = './clip_test.py'
name_path = '{{fileDirname}}/../../class_names/ade20k.txt'
test_dataloader = dict(
    dataset=dict(
        type='ADE20KDataset',
        data_root='data/ade/ADEChallengeData2016',
        data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
        reduce_zero_label=True))
