"""Decoding steps replayed from CUDA graphs.

A decoding step of a 7B model launches about 700 small kernels; launched one by one from Python, on an H100,
the launches take longer than the kernels, whose work (reading 13.5 GB of weights) is about 4.5 ms. A CUDA
graph records a step's kernels once and replays them with one launch. A graph fixes every shape and address,
so a step is captured through ``Transformer.decode``, whose kernels don't depend on the position, once per
batch size and per bucket of ``BUCKET`` cache positions (attention reads up to the bucket's end, the rest
masked): a few dozen captures over a long generation, each one step's time.
"""

from contextlib import nullcontext
from typing import Dict, Optional, Tuple

import torch

from .research import hook_dicts, module_sets, replaced, tensor_sets
from .model import Caches, Transformer

BUCKET = 256  # cache positions per captured graph: at most this many more read per step than needed


class GraphedDecoder:
    """``decoder(tokens, pos, left_pad)`` returns what ``model.forward(tokens, pos, left_pad=left_pad,
    last_only=True)`` does, for one token per row in cache rows 0..batch, from a replayed CUDA graph.

    The graphs hold the addresses of the model's weights, rotary table and KV cache: a cache allocated anew
    (``setup_cache``), a module put in the place of another (a wrapper around a layer, say), a weight replaced by
    another tensor (``w.weight = nn.Parameter(...)``, ``load_state_dict(..., assign=True)``, ``w.weight.data =
    t``) or a table put in ``model.freqs_cis`` is noticed and the graphs captured again. Forward hooks, and
    forwards that research code has put in place of a block's, attention's, feed-forward's or norm's, would not
    run in a replay: while there are any, steps run eagerly (``model.forward``), calling them.
    """

    def __init__(self, model: Transformer, compile_elementwise: bool = False):
        self.model = model
        self.compile_elementwise = compile_elementwise  # capture with Transformer.compiled_elementwise
        self.pool = None  # one memory pool for all the graphs: steps never run at the same time
        self.inputs: Dict[int, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # batch -> tokens, pos, pad
        self.graphs: Dict[Tuple[int, int], Tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # (batch, keys) -> ...
        self.caches: Optional[Caches] = None  # the attentions' caches that the graphs write
        # The hooks' dicts, checked at every step: checking them costs a few microseconds where walking all the
        # modules costs hundreds, out of a 5 ms step; walked again only when a module has been set anywhere.
        # (Checking for replaced forwards walks five modules a layer: 20 us for a 7B model on a slow CPU.)
        self.module_sets = module_sets()
        self.hooks = hook_dicts(model.modules())
        self.tensors = (tensor_sets(), model.freqs_cis)  # what the graphs read besides the cache

    def __call__(self, tokens: torch.Tensor, pos: int, left_pad: Optional[torch.Tensor] = None) -> torch.Tensor:
        if tokens.shape[1] != 1:
            raise ValueError(f"a decoding step takes one token per row; got tokens of shape {tuple(tokens.shape)}")
        if module_sets() != self.module_sets:  # a module put in the place of another: its hooks, and graphs to redo
            self.module_sets, self.hooks = module_sets(), hook_dicts(self.model.modules())
            self.graphs.clear()
        tensors = (tensor_sets(), self.model.freqs_cis)
        if tensors[0] != self.tensors[0] or tensors[1] is not self.tensors[1]:  # a weight or table replaced
            self.tensors = tensors
            self.graphs.clear()
        if any(self.hooks) or replaced(self.model.replaceable_modules()):  # which a replay would skip
            return self.model.forward(tokens, pos, left_pad=left_pad, last_only=True)
        bsz = tokens.shape[0]
        caches = self.model.ready_cache(bsz, pos + 1)  # allocated on first use; a clear error if too small
        if caches is not self.caches:
            self.graphs.clear()  # a cache made anew (setup_cache, or research code's cache_k of another size)
            self.caches = caches
        if bsz not in self.inputs:  # (writable by a later step called outside inference mode too)
            with torch.inference_mode(False):
                self.inputs[bsz] = (torch.empty_like(tokens), torch.empty((), dtype=torch.long, device=tokens.device),
                                    torch.empty(bsz, dtype=torch.long, device=tokens.device))
        static_tokens, static_pos, static_pad = self.inputs[bsz]
        static_tokens.copy_(tokens)
        static_pos.fill_(pos)
        if left_pad is None:
            static_pad.zero_()
        else:
            static_pad.copy_(left_pad)
        keys = min(caches.positions, (pos // BUCKET + 1) * BUCKET)
        if (bsz, keys) not in self.graphs:
            if not self.graphs:  # a pool whose graphs are all gone is released, and can't be captured into again
                self.pool = torch.cuda.graph_pool_handle()
            self.graphs[(bsz, keys)] = self._capture(bsz, keys)
        graph, logits = self.graphs[(bsz, keys)]
        graph.replay()
        self.model.runs += 1  # a step, as model.forward counts its own
        return logits.clone()  # the next replay of any graph in the pool may overwrite it

    def _capture(self, bsz: int, keys: int) -> Tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Record one step of bsz rows reading keys cache positions. It is run twice first, on a side stream as
        capture wants (the first runs of some kernels allocate workspaces); those runs write this step's own
        keys and values into the cache, as its replay is about to do anyway."""
        tokens, pos, pad = self.inputs[bsz]
        step = lambda: self.model.decode(tokens, pos, pad, keys)  # noqa: E731
        with self.model.compiled_elementwise() if self.compile_elementwise else nullcontext():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = step()
        return graph, logits
