"""Non-finite outputs traced back to their source: the input pixels, or the first stage
whose output holds NaN / inf (one image rerun with a check after every stage)."""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def raise_if_not_finite(engine, finite: Sequence[Tuple[List[int], Tensor]],
                        images: List[Tensor], metas: List[dict],
                        host_flags: Optional[Tensor] = None) -> None:
    """Raises, naming the first image whose probabilities are not finite and the cause.

    Args:
        engine: the ``ImageEngine`` that ran the images.
        finite: (image indices, (n,) bool flags) of every group, read with one host sync.
        images, metas: the batch's images and metas (``img_path`` names an image).
        host_flags: the flags of ``finite`` already on the host (``PendingFiniteCheck``).
    """
    flags = _all_flags(finite).cpu() if host_flags is None else host_flags
    if bool(flags.all()):
        return
    indices = [index for group, _ in finite for index in group]
    index = indices[int((~flags).nonzero()[0])]
    name = metas[index].get('img_path') or f'image {index} of the batch'
    image = images[index]
    non_finite_pixels = int((~torch.isfinite(image)).sum())
    if non_finite_pixels:
        raise ValueError(f'{name}: {non_finite_pixels} input values are NaN or inf (after '
                         'the data preprocessor); the segmentor needs finite pixels.')
    stage = first_non_finite_stage(engine, image, tuple(metas[index]['ori_shape'][:2]))
    raise FloatingPointError(f'{name}: the class probabilities are not finite; the first '
                             f'NaN / inf values come from {stage}.')


class PendingFiniteCheck:
    """``raise_if_not_finite`` of one batch, made later: the flags are copied to pinned
    host memory behind the batch's GPU work, so queueing the check does not wait for the
    GPU, and :meth:`check` waits only for that batch (not for work queued after it)."""

    def __init__(self, engine, finite: Sequence[Tuple[List[int], Tensor]],
                 images: List[Tensor], metas: List[dict]) -> None:
        self.engine, self.finite, self.images, self.metas = engine, finite, images, metas
        flags = _all_flags(finite)
        self.ready = None
        if flags.is_cuda:
            self.flags = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            self.flags.copy_(flags, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.flags = flags

    def check(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()
        raise_if_not_finite(self.engine, self.finite, self.images, self.metas, self.flags)


def _all_flags(finite: Sequence[Tuple[List[int], Tensor]]) -> Tensor:
    return finite[0][1] if len(finite) == 1 else torch.cat([ok for _, ok in finite])


def first_non_finite_stage(engine, image: Tensor, output_size: Tuple[int, int]) -> str:
    """Reruns one image (3, H, W) with a finiteness check after every stage of the
    pipeline, the window merge, PAMR and the post-processing; names the first one."""
    def check(stage, tensors):
        if any(t is not None and not bool(torch.isfinite(t).all()) for t in tensors):
            raise _NonFiniteStage(stage)

    pipeline = engine.pipeline
    pipeline.stage_check = check
    try:
        merge = engine.window_merge(tuple(image.shape[-2:]), output_size, image.device)
        logits = engine.merged_logits(image[None], merge)
        check('the window merge', (logits, ))
        if engine.pamr is not None:
            resized = F.interpolate(image[None], size=output_size, mode='bilinear')
            logits = engine.pamr(resized, logits.to(resized.dtype))
            check('PAMR', (logits, ))
        check('post-processing (logit_scale, softmax)', (engine.segment_logits(logits)[0], ))
    except _NonFiniteStage as found:
        return f'stage {found.stage!r}'
    finally:
        pipeline.stage_check = None
    return 'an unknown stage (every stage is finite when the image is run alone)'


class _NonFiniteStage(Exception):
    def __init__(self, stage: str):
        super().__init__(stage)
        self.stage = stage
