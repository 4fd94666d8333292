"""CUDA graphs for the two launch-bound calls of a PiVa step: the score's batched prediction and the
adapters' update (forward, backward and AdamW step), each captured once per input shape and replayed.

A PiVa step dispatches ~15,000 small operators (benchmark/real_size.py); on a fast GPU the CPU
launching them takes longer than the GPU running them (docs/performance.md). A replayed graph
launches them all at once. Inputs are copied into the captured buffers, so a new view's render,
noise and timestep need no recapture; a new shape (render size, batch pattern) captures again.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

_WARNED: set[str] = set()


def cuda_graphs_available(device: torch.device) -> bool:
    """True on a CUDA device; elsewhere says once, in one line, that the option runs eager."""
    if device.type == "cuda" and torch.cuda.is_available():
        return True
    if device.type not in _WARNED:
        _WARNED.add(device.type)
        warnings.warn(f"cuda_graphs=True needs a CUDA device (this prior is on {device.type}): running eager", stacklevel=3)
    return False


class Captured:
    """`fn(*tensors)` captured as a CUDA graph on its first call for each set of input shapes.

    The first calls of a shape run eager on a side stream (as torch's capture recipe asks: the
    allocator and cuBLAS workspaces settle, lazily made tensors such as route masks exist), then
    the graph is captured; later calls copy their inputs into the graph's own buffers and replay.
    The returned tensors are the graph's buffers: read or clone them before the next call.
    """

    def __init__(self, fn: Callable[..., tuple], warmup: int = 3) -> None:
        self.fn = fn
        self.warmup = warmup
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], tuple]] = {}
        self._seen: dict[tuple, int] = {}

    def __call__(self, *inputs: torch.Tensor, key: tuple = ()) -> tuple:
        shape_key = key + tuple((tuple(x.shape), x.dtype) for x in inputs)
        captured = self._graphs.get(shape_key)
        if captured is not None:
            graph, static_inputs, outputs = captured
            for buffer, x in zip(static_inputs, inputs):
                buffer.copy_(x)
            graph.replay()
            return outputs
        seen = self._seen.get(shape_key, 0)
        if seen < self.warmup:
            self._seen[shape_key] = seen + 1
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                out = self.fn(*inputs)
            torch.cuda.current_stream().wait_stream(stream)
            return out
        static_inputs = [x.clone() for x in inputs]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.fn(*static_inputs)
        self._graphs[shape_key] = (graph, static_inputs, outputs)
        graph.replay()  # capture records without running: this call's results come from a replay
        return outputs


def maybe_captured(enabled: bool, device: torch.device, fn: Callable[..., tuple]) -> Optional[Captured]:
    """A `Captured` of fn where the option is on and CUDA is there, else None (eager)."""
    return Captured(fn) if enabled and cuda_graphs_available(device) else None
