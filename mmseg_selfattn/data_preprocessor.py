"""Test-time batching of images of different sizes."""
from typing import Any, Dict

from mmseg.models.data_preprocessor import SegDataPreProcessor
from mmseg.registry import MODELS
from mmseg.utils import stack_batch


@MODELS.register_module()
class SizeAgnosticSegDataPreProcessor(SegDataPreProcessor):
    """``SegDataPreProcessor`` whose test batches may mix image sizes.

    mmseg's version asserts one size per test batch. Here images of different
    sizes are padded (bottom/right, ``pad_val``) to the largest one; each sample's
    ``img_shape`` still gives its own size, and the segmentor crops the padding
    away before inference, so a batch gives the same predictions as batch size 1.

    Args:
        non_blocking: asynchronous host-to-device copies (with a pinned-memory loader).
        **kwargs: those of ``SegDataPreProcessor``.
    """

    def __init__(self, non_blocking: bool = False, **kwargs):
        super().__init__(**kwargs)
        self._non_blocking = non_blocking  # mmseg's class does not forward it

    def forward(self, data: dict, training: bool = False) -> Dict[str, Any]:
        if training or self.test_cfg:
            return super().forward(data, training)
        data = self.cast_data(data)
        inputs = data['inputs']
        if self.channel_conversion and inputs[0].size(0) == 3:
            inputs = [image.flip(0) for image in inputs]  # BGR <-> RGB, no index tensor
        inputs = [image.float() for image in inputs]
        if self._enable_normalize:
            inputs = [(image - self.mean) / self.std for image in inputs]
        inputs, _ = stack_batch(inputs, size_divisor=1, pad_val=self.pad_val,
                                seg_pad_val=self.seg_pad_val)
        return dict(inputs=inputs, data_samples=data.get('data_samples'))
