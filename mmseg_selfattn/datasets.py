"""Datasets that MMSegmentation 1.2.2 does not ship."""
from typing import Dict, Optional, Sequence

from mmseg.datasets import BaseSegDataset
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
