"""mmseg_selfattn: training-free open-vocabulary segmentation with a frozen CLIP ViT."""
from .mmcv_ops_standin import install_mmcv_ops_standin

install_mmcv_ops_standin()  # before anything imports mmseg

from .clip_loader import load_clip  # noqa: E402
from .data_preprocessor import SizeAgnosticSegDataPreProcessor  # noqa: E402
from .datasets import (CamVidDataset, COCOObjectDataset, PascalContext59Dataset,  # noqa: E402
                       PascalContext60Dataset, PascalVOC20Dataset)
from .encoder import DenseCLIPEncoder, EncodedCrops  # noqa: E402
from .hooks import ReleaseLoaderWorkersHook, TestSetCheckHook, TestTimelineHook  # noqa: E402
from .inference_wrapper import InferenceOnlyWrapper  # noqa: E402
from .machine import MachineAwareTestLoop  # noqa: E402
from .metrics import CheckedIoUMetric  # noqa: E402
from .progress import ProgressBarHook  # noqa: E402
from .segmentor import SelfAttnCLIPSegmentor  # noqa: E402
from .sweep import SweepLoop  # noqa: E402
from .text_classifier import TextClassifier  # noqa: E402
from .transforms import (AtLeastOnePixelResize, LoadCheckedAnnotations,  # noqa: E402
                         LoadCheckedImageFromFile)
from .visualization import SideBySideVisualizationHook  # noqa: E402

__version__ = '0.1.0'
__all__ = ['load_clip', 'CamVidDataset', 'COCOObjectDataset', 'PascalContext59Dataset',
           'PascalContext60Dataset', 'PascalVOC20Dataset', 'DenseCLIPEncoder', 'EncodedCrops',
           'SelfAttnCLIPSegmentor', 'SizeAgnosticSegDataPreProcessor', 'TextClassifier',
           'InferenceOnlyWrapper', 'MachineAwareTestLoop', 'TestSetCheckHook', 'ReleaseLoaderWorkersHook',
           'TestTimelineHook', 'CheckedIoUMetric', 'LoadCheckedImageFromFile', 'AtLeastOnePixelResize', 'LoadCheckedAnnotations',
           'ProgressBarHook', 'SideBySideVisualizationHook', 'SweepLoop']
