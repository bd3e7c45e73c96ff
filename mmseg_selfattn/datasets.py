"""Datasets that MMSegmentation 1.2.2 does not ship: CamVid and the lineage's own
benchmark variants (VOC20, Context60/59, COCO-Object; SCLIP/NACLIP's class lists)."""
from typing import Dict, Optional, Sequence

from mmseg.datasets import (BaseSegDataset, COCOStuffDataset, PascalContextDataset,
                            PascalContextDataset59, PascalVOCDataset)
from mmseg.registry import DATASETS


@DATASETS.register_module()
class CamVidDataset(BaseSegDataset):
    """CamVid, SegNet split: 11 classes, 480x360 urban driving photos.

    Layout (images and label maps are ``.png`` with identical names)::

        data_root/images/val/0016E5_07959.png
        data_root/annotations/val/0016E5_07959.png

    Label maps store 0..10 for the classes below and 11 for "unlabelled".
    The 11 -> ``ignore_index`` (255) mapping is part of the dataset's
    ``label_map``, which ``LoadAnnotations`` applies to every loaded map, so
    IoUMetric never sees label 11. ``reduce_zero_label`` must stay False:
    label 0 is sky, a real class.

    Args:
        img_suffix (str): Image file suffix. Defaults to '.png'.
        seg_map_suffix (str): Label map file suffix. Defaults to '.png'.
        reduce_zero_label (bool): Must be False (0 is sky).
        **kwargs: Passed to :class:`BaseSegDataset`.
    """
    METAINFO = dict(
        classes=('sky', 'building', 'pole', 'road', 'pavement', 'tree',
                 'sign symbol', 'fence', 'car', 'pedestrian', 'bicyclist'),
        # colours of the SegNet tutorial's CamVid label visualisation
        palette=[[128, 128, 128], [128, 0, 0], [192, 192, 128],
                 [128, 64, 128], [60, 40, 222], [128, 128, 0],
                 [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0],
                 [0, 128, 192]])
    UNLABELLED = 11

    def __init__(self,
                 img_suffix: str = '.png',
                 seg_map_suffix: str = '.png',
                 reduce_zero_label: bool = False,
                 **kwargs) -> None:
        if reduce_zero_label:
            raise ValueError('CamVidDataset: reduce_zero_label must be False, '
                             'label 0 is the class "sky".')
        super().__init__(
            img_suffix=img_suffix,
            seg_map_suffix=seg_map_suffix,
            reduce_zero_label=False,
            **kwargs)

    @classmethod
    def get_label_map(cls,
                      new_classes: Optional[Sequence] = None
                      ) -> Optional[Dict[int, int]]:
        """Label map of :class:`BaseSegDataset`, plus unlabelled (11) -> 255.

        With the default classes this is ``{11: 255}``; with a custom subset
        of classes it is mmseg's old-id -> new-id map with 11 -> 255 added.
        The ignore value is fixed at 255, as in mmseg's own label maps.
        """
        label_map = super().get_label_map(new_classes) or {}
        label_map[cls.UNLABELLED] = 255
        return label_map


@DATASETS.register_module()
class PascalVOC20Dataset(PascalVOCDataset):
    """PASCAL VOC 2012 without its background class: 20 classes (SCLIP's VOC20).

    Same files as :class:`PascalVOCDataset` (``JPEGImages/*.jpg``,
    ``SegmentationClass/*.png`` palette PNGs, ``ImageSets/Segmentation/val.txt``).
    ``reduce_zero_label=True`` turns background (0) into ignore (255) and shifts the
    classes 1..20 to 0..19; the void border (255) stays ignored.
    """
    METAINFO = dict(classes=PascalVOCDataset.METAINFO['classes'][1:],
                    palette=PascalVOCDataset.METAINFO['palette'][1:])

    def __init__(self, ann_file: str, reduce_zero_label: bool = True, **kwargs) -> None:
        _require_reduce_zero_label(type(self).__name__, reduce_zero_label, True,
                                   'the 20 classes are stored as 1..20, background as 0')
        super().__init__(ann_file=ann_file, reduce_zero_label=True, **kwargs)


@DATASETS.register_module()
class PascalContext60Dataset(PascalContextDataset):
    """PASCAL Context, 60 classes with background at 0 (``reduce_zero_label=False``).

    Layout (mmseg's ``pascal_context.py`` converter writes the label maps)::

        VOC2010/JPEGImages/2008_000002.jpg
        VOC2010/SegmentationClassContext/2008_000002.png   (0 background, 1..59)
        VOC2010/ImageSets/SegmentationContext/val.txt
    """

    def __init__(self, ann_file: str = '', reduce_zero_label: bool = False,
                 **kwargs) -> None:
        _require_reduce_zero_label(type(self).__name__, reduce_zero_label, False,
                                   'label 0 is the class "background"')
        super().__init__(ann_file=ann_file, reduce_zero_label=False, **kwargs)


@DATASETS.register_module()
class PascalContext59Dataset(PascalContextDataset59):
    """PASCAL Context without background: 59 classes, background (0) ignored.

    Same files as :class:`PascalContext60Dataset`; ``reduce_zero_label=True`` maps
    0 -> 255 and 1..59 -> 0..58.
    """

    def __init__(self, ann_file: str = '', reduce_zero_label: bool = True,
                 **kwargs) -> None:
        _require_reduce_zero_label(type(self).__name__, reduce_zero_label, True,
                                   'the 59 classes are stored as 1..59, background as 0')
        super().__init__(ann_file=ann_file, reduce_zero_label=True, **kwargs)


@DATASETS.register_module()
class COCOObjectDataset(BaseSegDataset):
    """COCO-Object: the 80 COCO thing classes plus background at 0 (81 classes).

    Label maps come from the raw COCO-Stuff164k masks
    (``tools/dataset_converters/coco_object.py``): things -> 1..80, stuff and
    unlabelled -> 0. Layout, beside COCO-Stuff's own label maps::

        coco_stuff164k/images/val2017/000000000139.jpg
        coco_stuff164k/annotations/val2017/000000000139_instanceTrainIds.png
    """
    METAINFO = dict(
        classes=('background', ) + COCOStuffDataset.METAINFO['classes'][:80],
        palette=[[0, 0, 0]] + COCOStuffDataset.METAINFO['palette'][:80])

    def __init__(self,
                 img_suffix: str = '.jpg',
                 seg_map_suffix: str = '_instanceTrainIds.png',
                 reduce_zero_label: bool = False,
                 **kwargs) -> None:
        _require_reduce_zero_label(type(self).__name__, reduce_zero_label, False,
                                   'label 0 is the class "background"')
        super().__init__(img_suffix=img_suffix, seg_map_suffix=seg_map_suffix,
                         reduce_zero_label=False, **kwargs)


def _require_reduce_zero_label(dataset: str, value: bool, required: bool, why: str) -> None:
    if value is not required:
        raise ValueError(f'{dataset}: reduce_zero_label must be {required} ({why}), '
                         f'got {value!r}.')
