"""CUDA graphs of a whole tensor function: captured once per input shape, then replayed.

At one image per call the GPU work of the pipeline (6 crops of ViT-B/16) takes
about a millisecond, but issuing its ~1,000 kernels from Python takes ten: the
call is bound by kernel launches. A CUDA graph records the kernels once and
replays them with one launch. The captured function must be free of host
syncs and host-to-device copies once warm (the segmentor's pipeline is:
cached text embeddings, window matrices and neighbour tables; DBSCAN without a
convergence test on the GPU).
"""
from typing import Callable, Dict, Hashable, Sequence, Tuple

import torch
from torch import Tensor


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
    """

    def __init__(self, warmup: int = 2, max_graphs: int = 32):
        self.warmup = warmup
        self.max_graphs = max_graphs
        self._graphs: Dict[Hashable, Tuple[torch.cuda.CUDAGraph, Tuple[Tensor, ...],
                                           Tuple[Tensor, ...]]] = {}
        self._pool = None

    def __call__(self, key: Hashable, function: Callable[..., Tuple[Tensor, ...]],
                 inputs: Sequence[Tensor], *args) -> Tuple[Tensor, ...]:
        """``function(*inputs, *args)`` by graph replay; ``key`` must fix the function, the
        input shapes and ``args``."""
        if key not in self._graphs:
            self._graphs[key] = self._capture(function, tuple(inputs), args)
        graph, static_inputs, static_outputs = self._graphs[key]
        for static, tensor in zip(static_inputs, inputs):
            static.copy_(tensor, non_blocking=True)
        graph.replay()
        return tuple(output.clone() for output in static_outputs)

    def accepts(self, key: Hashable) -> bool:
        """Whether ``key`` has a graph or may still get one."""
        return key in self._graphs or len(self._graphs) < self.max_graphs

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
        with torch.cuda.graph(graph, pool=self._pool):
            static_outputs = function(*static_inputs, *args)
        self._pool = graph.pool()
        return graph, static_inputs, static_outputs
