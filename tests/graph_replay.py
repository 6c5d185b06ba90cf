"""A CPU stand-in for CUDA graphs, so that llama.graphs' GraphedDecoder runs in the test suite without a GPU.

A CUDA graph records the kernels a capture launches and replays them on the same memory, whatever Python would
do differently the next time. This records the aten operations a capture makes (a TorchDispatchMode) and
replays them on the same tensors: each operation run again on the arguments it was given (the static inputs,
the weights and cache, and the outputs of the operations before it, updated in place), its results copied into
the tensors the capture returned. So a step that would replay wrongly on a GPU (a shape, a branch or a value
fixed at capture that should follow the position) replays wrongly here too. An operation that makes the host
wait for the device (``.item()``, a data-dependent shape), which a real capture refuses, fails here as well.

Work that torch's dispatcher doesn't see is not recorded: ``ReplayedDecoder`` turns the C kernels off while it
runs, as they are on a GPU. Weights packed for their products can't be used then: give it float32 weights (not
packed) or a model built with ``pack_weights=False``.
"""

from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, List, Tuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import llama.kernels
from llama import Llama
from llama.graphs import GraphedDecoder

# What would wait for the device in a capture: a value read back to the host, or an output whose shape is data.
# (Under inference_mode, as in Transformer.decode, .item() reaches the mode as aten.item, not decomposed.)
HOST_SYNCS = {torch.ops.aten.item.default, torch.ops.aten._local_scalar_dense.default,
              torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default, torch.ops.aten.nonzero.default,
              torch.ops.aten.masked_select.default}


class Graph:
    """torch.cuda.CUDAGraph's replay, on what ``graph(self)`` recorded."""

    def __init__(self) -> None:
        self.ops: List[Tuple[Any, tuple, dict, Any]] = []

    @torch.inference_mode()  # as the capture ran (Transformer.decode), which made its tensors inference tensors
    def replay(self) -> None:
        for func, args, kwargs, recorded in self.ops:
            for old, new in zip(tree_leaves(recorded), tree_leaves(func(*args, **kwargs))):
                # In place, a view, or an out= argument: the recorded tensor holds the result already.
                if isinstance(old, torch.Tensor) and not _same_memory(old, new):
                    old.copy_(new)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class _Recorder(TorchDispatchMode):
    def __init__(self, graph: Graph):
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_SYNCS:
            raise RuntimeError(f"{func} in a CUDA graph capture: it would wait for the device, which capture forbids")
        out = func(*args, **(kwargs or {}))
        self.graph.ops.append((func, args, kwargs or {}, out))
        return out


@contextmanager
def graph(g: Graph, pool: Any = None) -> Iterator[None]:
    """torch.cuda.graph's capture."""
    with _Recorder(g):
        yield


class _Stream:
    def wait_stream(self, other: "_Stream") -> None:
        pass


class ReplayedDecoder(GraphedDecoder):
    """llama.graphs' GraphedDecoder on the CPU: torch.cuda's graphs and streams are this module's, and the C
    kernels off, while it runs."""

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in {"CUDAGraph": Graph, "graph": graph, "Stream": _Stream, "current_stream": _Stream,
                                "stream": lambda s: nullcontext(), "graph_pool_handle": object}.items():
                patch.setattr(torch.cuda, name, value)
            patch.setattr(llama.kernels, "library", lambda: None)
            return super().__call__(*args, **kwargs)


def cpu_llama(ckpt: str, tokenizer_path: str, max_seq_len: int, max_batch_size: int, graphs: bool) -> Llama:
    """A float32 Llama on the CPU, decoding from graph replays (ReplayedDecoder) or eagerly."""
    g = Llama.build(ckpt, tokenizer_path, max_seq_len, max_batch_size, device="cpu", dtype="float32")
    g.decoder = ReplayedDecoder(g.model) if graphs else None
    return g
