"""CUDA graphs of a whole tensor function: captured once per input shape, then replayed.

At one image per call the GPU work of the pipeline (6 crops of ViT-B/16) takes
about a millisecond, but issuing its ~1,000 kernels from Python takes ten: the
call is bound by kernel launches. A CUDA graph records the kernels once and
replays them with one launch. The captured function must be free of host
syncs and host-to-device copies once warm (the segmentor's pipeline is:
cached text embeddings, window matrices and neighbour tables; DBSCAN without a
convergence test on the GPU).
"""
import warnings
from collections import Counter
from typing import Callable, Dict, Hashable, List, Sequence, Tuple

import torch
from torch import Tensor

from .encoder import EncodedCrops


class CUDAGraphCache:
    """Runs ``function(*inputs, *args) -> tuple of tensors`` through one CUDA graph per key.

    The function is passed with each call (a bound method stored here would keep its
    module alive in a reference cycle).

    The first call of a key warms the function up on a side stream (filling every
    lazy cache), captures it, then replays. Inputs are copied into the graph's static
    buffers and outputs are cloned out of them, so callers own their results. All
    graphs share one memory pool: they run one at a time on the current stream and
    no tensor of one graph is read by another.

    Args:
        warmup: eager calls before the capture.
        max_graphs: at most this many graphs are kept; ``accepts`` is False for new keys
            beyond it (the caller runs those eagerly), bounding memory when input
            sizes keep changing.
        capture_after: ``repeats`` is True from this sighting of a key on: a capture
            costs about three eager calls, so a shape seen once (the long tail of a
            dataset's image sizes) is cheaper run eagerly.
    """

    def __init__(self, warmup: int = 2, max_graphs: int = 32, capture_after: int = 2):
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.capture_after = capture_after
        self._graphs: Dict[Hashable, Tuple[torch.cuda.CUDAGraph, Tuple[Tensor, ...],
                                           Tuple[Tensor, ...]]] = {}
        self._sightings: Counter = Counter()
        self._refused = False
        self._pool = None

    def __call__(self, key: Hashable, function: Callable[..., Tuple[Tensor, ...]],
                 inputs: Sequence[Tensor], *args) -> Tuple[Tensor, ...]:
        """``function(*inputs, *args)`` by graph replay; ``key`` must fix the function, the
        input shapes and ``args``."""
        if key not in self._graphs:
            try:
                self._graphs[key] = self._capture(function, tuple(inputs), args)
            except RuntimeError as error:  # torch.AcceleratorError included
                if 'captur' not in str(error):
                    raise
                self._refuse(key, error)
                return tuple(function(*inputs, *args))
        graph, static_inputs, static_outputs = self._graphs[key]
        for static, tensor in zip(static_inputs, inputs):
            static.copy_(tensor, non_blocking=True)
        graph.replay()
        return tuple(output.clone() for output in static_outputs)

    def accepts(self, key: Hashable) -> bool:
        """Whether ``key`` has a graph or may still get one."""
        return key in self._graphs or (len(self._graphs) < self.max_graphs
                                       and not self._refused)

    def _refuse(self, key: Hashable, error: Exception) -> None:
        """A failed capture: the call runs eagerly, and no further key is captured (the
        failure would repeat), with one warning."""
        self._refused = True
        warnings.warn(f'CUDA graph capture failed ({" ".join(str(error).split())[:200]}); '
                      'running eagerly from now on.')
        torch.cuda.synchronize()

    def repeats(self, key: Hashable) -> bool:
        """Counts a sighting of ``key``; whether it has a graph or gets one now (seen
        ``capture_after`` times, fewer than ``max_graphs`` graphs kept)."""
        if key in self._graphs:
            return True
        self._sightings[key] += 1
        return self._sightings[key] >= self.capture_after and self.accepts(key)

    def __len__(self) -> int:
        return len(self._graphs)

    def _capture(self, function, inputs: Tuple[Tensor, ...], args: tuple):
        static_inputs = tuple(tensor.clone() for tensor in inputs)
        side_stream = torch.cuda.Stream(device=inputs[0].device)
        side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side_stream):
            for _ in range(self.warmup):
                function(*static_inputs, *args)
        torch.cuda.current_stream().wait_stream(side_stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's pin-memory thread may allocate meanwhile
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode='thread_local'):
            static_outputs = function(*static_inputs, *args)
        self._pool = graph.pool()
        return graph, static_inputs, static_outputs


def flatten_encoded(encoded: Sequence[EncodedCrops], *dense_keys: tuple):
    """What stages 3-7 read of ``encode_crops`` outputs whose dense block is memoised
    (x_cls when present (not for scclip), attention, RF-CLIP's whole-image embedding, X
    under those of ``dense_keys`` present) as a flat list of tensors, and a function that rebuilds such outputs from
    tensors of the same shapes (CUDA-graph inputs)."""
    layouts, tensors = [], []
    for crops in encoded:
        has_cls, has_attention = crops.x_cls is not None, crops.attention is not None
        has_global = crops.global_embedding is not None
        keys = [key for key in dict.fromkeys(dense_keys) if key in crops.dense_memo]
        layouts.append((crops.grid, has_cls, has_attention, has_global, keys))
        tensors += [*([crops.x_cls] if has_cls else []),
                    *([crops.attention] if has_attention else []),
                    *([crops.global_embedding] if has_global else []),
                    *(crops.dense_memo[key] for key in keys)]

    def rebuild(flat: Sequence[Tensor]) -> List[EncodedCrops]:
        flat, rebuilt = list(flat), []
        for grid, has_cls, has_attention, has_global, keys in layouts:
            x_cls = flat.pop(0) if has_cls else None
            attention = flat.pop(0) if has_attention else None
            global_embedding = flat.pop(0) if has_global else None
            rebuilt.append(EncodedCrops(grid=grid, block_input=None, q=None, k=None, v=None,
                                        x_cls=x_cls, attention=attention,
                                        global_embedding=global_embedding,
                                        dense_memo={key: flat.pop(0) for key in keys}))
        return rebuilt

    return tensors, rebuild
