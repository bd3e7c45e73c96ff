"""Distributed evaluation wrapper for a frozen model."""
from mmengine.registry import MODEL_WRAPPERS
from torch import nn


@MODEL_WRAPPERS.register_module()
class InferenceOnlyWrapper(nn.Module):
    """Model wrapper for distributed evaluation of a frozen model.

    The Runner wraps every model in DistributedDataParallel when launched
    distributed, and DDP refuses a module without trainable parameters, such
    as our frozen CLIP. Evaluation needs no gradient sync: each rank runs its
    shard of the test set and IoUMetric gathers the results.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def val_step(self, data):
        return self.module.val_step(data)

    def test_step(self, data):
        return self.module.test_step(data)
