"""The linear layers and how their products run: fairscale's column- and row-parallel layers, whose weights load
from Meta's shards as they are, with their products made fast where torch's are slow.

- bf16 weights computing in float32 (CPUs without native bf16): ``linear``, by kernels.c or converted a block at
  a time.
- Packed copies of the weights for kernels.c's or oneDNN's products (``pack``, ``Packable``), made by
  ``Transformer.pack_weights``.
- wq/wk/wv and w1/w3 as one product each: ``Fused`` (a GPU, concatenated weights), ``PackedFused`` (packed),
  which give way to each layer's own product where research code hooks or replaces one (``llama.research``).
"""

import threading
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import layers as fs_layers
from fairscale.nn.model_parallel import mappings
from torch import nn

from . import kernels, pages
from .research import WatchedParameter, hooked, own_forward, replaced, stamp


# For bf16 weights on a CPU without native bf16, whose bf16 matrix products are 5-100x slower than its float32
# ones while its bf16 matrix-vector products are as fast as float32's on half the bytes: products of 1 to 16 rows
# (decoding) go to kernels.linear_bf16, which reads the weight as it is stored (half the bytes) and
# converts each element once for all the rows, in registers. Otherwise, products with at least this many rows run
# in the activations' dtype, the weight converted for the call; fewer rows in the weight's dtype.
WIDE_ROWS = 8
# The weight is converted this many bytes at a time into one reused buffer, each block used while it is still in
# the CPU's cache. Converting it whole allocates a fresh tensor per call, and faulting in its pages costs 5-20x
# the product itself (measured on AVX2 kernels, scripts/benchmark.py's 1b shape).
CONVERT_BYTES = 8 << 20
_buffers = threading.local()


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T, returned in x's dtype whatever the weight is stored in. Computed in x's dtype, except for
    fewer than WIDE_ROWS rows where kernels.linear_bf16 doesn't apply (float16 weights on a CPU, or bf16 ones
    without the kernels): those round x to the weight's dtype, a matrix-vector product reading half the bytes."""
    if x.dtype == weight.dtype:
        return _product(x, weight)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):  # autograd: torch's operations only
        return F.linear(x, weight.to(x.dtype))
    out = kernels.linear_bf16(x, weight)  # 1 to 16 rows, on a CPU
    return out if out is not None else torch_linear(x, weight)


def torch_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``linear`` for a weight stored in another dtype than x, by torch's operations alone: where
    kernels.linear_bf16 doesn't apply (and scripts/bench_kernels.py's baseline)."""
    if x.numel() >= WIDE_ROWS * x.shape[-1]:
        return _converted_product(x, weight)
    return _product(x.to(weight.dtype), weight).to(x.dtype)


def _converted_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T in x's dtype, converting the weight a block of rows at a time (see CONVERT_BYTES)."""
    n, k = weight.shape
    rows = min(n, max(1, CONVERT_BYTES // (k * x.element_size())))
    buffer = _buffer(rows * k, x.dtype, x.device)
    x2 = x.reshape(-1, k)
    out = torch.empty(n, x2.shape[0], dtype=x.dtype, device=x.device)  # transposed: each block's rows contiguous
    for start in range(0, n, rows):
        block = weight[start:start + rows]
        torch.mm(buffer[:block.numel()].view(block.shape).copy_(block), x2.t(), out=out[start:start + rows])
    return out.t().contiguous().view(*x.shape[:-1], n)


def _buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This thread's conversion buffer for dtype on device, grown as needed."""
    by_kind = _buffers.__dict__.setdefault("by_kind", {})
    buffer = by_kind.get((device, dtype))
    if buffer is None or buffer.numel() < numel:
        with torch.inference_mode(False):  # made in a forward pass, still writable outside one
            buffer = by_kind[(device, dtype)] = torch.empty(numel, dtype=dtype, device=device)
    return buffer


# Where ATen's bf16 matrix-vector product beats oneDNN's: measured on AVX-512 CPUs, ATen's reads the weight at over
# 90 % of the memory bandwidth and oneDNN's at about 60 %; on AVX2 ones oneDNN's is a few percent faster.
ATEN_BF16_GEMV = torch.backends.cpu.get_cpu_capability() == "AVX512"


_MKLDNN_SWITCH = threading.Lock()


def _product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear, with oneDNN turned off for one row of bf16 on the CPUs above (decoding one sequence from weights
    not packed, which is nothing but such products). The switch is the process's: one thread at a time turns it,
    or one could turn it back to another's off, and leave oneDNN off for good (the user's own bf16 products
    then 40x slower)."""
    if not ATEN_BF16_GEMV or x.device.type != "cpu" or x.dtype != torch.bfloat16 or x.numel() != x.shape[-1]:
        return F.linear(x, weight)
    with _MKLDNN_SWITCH:
        enabled = torch._C._get_mkldnn_enabled()
        torch._C._set_mkldnn_enabled(False)
        try:
            return F.linear(x, weight)
        finally:
            torch._C._set_mkldnn_enabled(enabled)


# oneDNN's bf16 products (on CPUs with native bf16) reorder the weight into a blocked layout on every call. With
# a few rows, as in decoding a batch, that costs more than the product: 4-16 rows read the weights at 35-45 % of the
# memory bandwidth, against 60-100 % from a copy kept in the blocked layout (scripts/benchmark.py's 1b shape). So
# the weights are kept packed: in the order of kernels.c's linear_packed_bf16 where the CPU has AVX-512 BF16 (its
# products of 8-16 rows stream 10-25 % faster than oneDNN's; it runs on AMX's tiles where the CPU has them,
# faster than oneDNN's there too: docs/performance.md), else in
# the blocked layout oneDNN picks for products of PACK_ROWS rows, which serves one row and whole prompts as well.
# Where the CPU has no native bf16 (products in float32), they are kept in the order of kernels.c's
# linear_packed_f32, which widens them in registers: 16 rows 1.35-1.65x faster than linear_bf16 on the weights as
# stored, and prompts as fast as float32 products of the weights converted, with no float32 copy of them.
PACK_ROWS = 16


def can_pack(compute: torch.dtype = torch.bfloat16) -> bool:
    """Whether bf16 weights can be kept packed on this CPU for products in ``compute``: float32 by kernels.c's
    linear_packed_f32; bf16 by its linear_packed_bf16 (AVX-512 BF16), or by oneDNN (AVX-512 or AVX-NE-CONVERT);
    no other dtype."""
    if compute == torch.float32:
        return kernels.packed_f32_columns() > 0
    return compute == torch.bfloat16 and (kernels.packs_bf16() or (torch.backends.mkldnn.is_available()
                                                                  and torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def packed_for(compute: torch.dtype = torch.bfloat16) -> str:
    """Whose product the packed weights are for, in words."""
    if compute == torch.float32:
        return "kernels.c, widened to float32"
    return ("kernels.c, AMX" if kernels.uses_amx() else "kernels.c") if kernels.packs_bf16() else "oneDNN"


def packs_rows(rows: int, compute: torch.dtype) -> bool:
    """Whether a weight of this many output rows can be packed for products in ``compute`` (given can_pack):
    linear_packed_f32 takes whole blocks of columns; oneDNN takes any."""
    return compute != torch.float32 or rows % kernels.packed_f32_columns() == 0


def pack(weight: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """A packed copy of a bf16 weight for products in ``compute`` (given can_pack and packs_rows): for
    kernels.c's products where they apply, else oneDNN's blocked layout."""
    if compute == torch.float32:
        return kernels.pack_f32(weight)
    packed = kernels.pack_bf16(weight)
    return packed if packed is not None else torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)


def packed_product(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for x and a copy of the weight made by ``pack`` for x's dtype."""
    if packed.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    if x.dtype == torch.float32:
        return kernels.linear_packed_f32(x, packed)
    return kernels.linear_packed_bf16(x, packed)


class Packable:
    """The product of the parallel linear layers below: ``linear``, or ``packed_product`` on a packed copy of the
    weight (made by ``pack``) while the weight is the very tensor it was made from, unedited. Any other weight, an
    in-place edit, or autograd falls back to ``linear``; a stale copy is freed."""
    weight: nn.Parameter
    # (copy, the dtype of products it serves, the weight's stamp)
    blocked: Optional[tuple[torch.Tensor, torch.dtype, tuple]] = None

    def pack(self, compute: torch.dtype) -> None:
        w = self.weight
        self.blocked = (pack(w, compute), compute, stamp(w))

    def __getstate__(self) -> dict:
        """Copies and pickles leave the packed copy out (oneDNN's opaque tensors can be neither, and a copy would
        be a second one of the weights): they compute from the weight."""
        return {k: v for k, v in self.__dict__.items() if k != "blocked"}

    def valid(self) -> bool:
        """Whether the packed copy is still the weight's (freed where it is not)."""
        if self.blocked is not None and self.blocked[2] != stamp(self.weight):
            self.blocked = None
        return self.blocked is not None

    def product(self, x: torch.Tensor) -> torch.Tensor:
        if self.valid() and x.dtype == self.blocked[1] and not torch.is_grad_enabled():
            return packed_product(x, self.blocked[0])
        return linear(x, self.weight)


class PackedFused:
    """Column-parallel layers fed the same input (wq, wk, wv; w1, w3) with one blocked copy of their weights'
    concatenation (``Transformer.pack_weights``): one product for all of them, as ``Fused`` makes on a GPU, while
    each layer keeps its own weight, mapped from the checkpoint. Fewer, larger products decoded the 1b shape 3-8 %
    faster at batch 1 and 1-4 % at batch 16 (7 products a layer become 4). Where any layer's weight is no longer
    the tensor packed, unedited, the copy is freed and the layers compute alone, as they do under autograd."""

    def __init__(self, *layers: "ColumnParallelLinear", buffer: torch.Tensor, compute: torch.dtype):
        """Packs the layers' weights for products in ``compute``, concatenated in buffer (at least as large,
        their dtype), and lets go of their mapped pages. One buffer for all the groups: a temporary concatenation
        per group left the allocator's freed blocks interleaved with the packed copies, and a load's peak memory
        5 % higher."""
        self.layers = layers
        weights = [layer.weight for layer in layers]
        whole = buffer[:sum(w.numel() for w in weights)].view(-1, weights[0].shape[1])
        for part, w in zip(whole.split([w.shape[0] for w in weights]), weights):
            part.copy_(w.detach())
            pages.drop(w)
        self.blocked: Optional[torch.Tensor] = pack(whole, compute)
        self.compute = compute
        self.stamps = [stamp(w) for w in weights]

    def __getstate__(self) -> dict:
        """As ``Packable``: copies and pickles compute layer by layer, from their own weights."""
        return {"layers": self.layers, "blocked": None, "stamps": []}

    def valid(self) -> bool:
        """Whether the blocked copy is still the layers' weights (freed where it is not)."""
        if self.blocked is not None and self.stamps != [stamp(m.weight) for m in self.layers]:
            self.blocked = None
        return self.blocked is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The layers' outputs, concatenated on the last dimension."""
        if self.valid() and x.dtype == self.compute and not one_by_one(self.layers):
            return packed_product(x, self.blocked)
        return torch.cat([layer(x) for layer in self.layers], dim=-1)


class Fused:
    """Column-parallel layers fed the same input (wq, wk, wv; w1, w3), their weights made views of one
    concatenated tensor: one product for all of them. On a GPU that is fewer kernels, each closer to the
    bandwidth (a graphed decoding step of the 7b shape on an H100: 8.08 ms unfused, 6.79 ms fused). The layers keep
    their own weights, names and state_dict entries. Where any layer's weight is no longer the view made here
    (replaced, or moved with ``.to``), the concatenation is freed and each layer computes alone, as it does with
    autograd. (``Transformer.setup_cache`` fuses moved weights again.)"""

    def __init__(self, *layers: "ColumnParallelLinear"):
        self.layers = layers
        self.weight: Optional[torch.Tensor] = torch.cat([layer.weight.detach() for layer in layers])
        self.sizes = [layer.weight.shape[0] for layer in layers]
        for layer, part in zip(layers, self.weight.split(self.sizes)):
            layer.weight = WatchedParameter(part, requires_grad=layer.weight.requires_grad)
        self.views = [layer.weight.data_ptr() for layer in layers]

    def valid(self) -> bool:
        """Whether the layers' weights are still views of the concatenation (freed where they are not: after
        ``.half()`` on a GPU it would hold two thirds of the old weights)."""
        if self.weight is not None and [layer.weight.data_ptr() for layer in self.layers] != self.views:
            self.weight = None
        return self.weight is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The layers' outputs, concatenated on the last dimension."""
        if not self.valid() or one_by_one(self.layers):
            return torch.cat([layer(x) for layer in self.layers], dim=-1)
        return linear(x, self.weight)


def one_by_one(layers: Tuple[nn.Module, ...]) -> bool:
    """Whether fused layers must each compute alone: for autograd (the gradient of each weight), a hook on one,
    or a forward of research code's own in its place."""
    return torch.is_grad_enabled() or hooked(layers) or replaced(layers)


# On one rank fairscale's mappings are identities, but each is an autograd function call, 155 a decoding step of
# the 1b shape: skipping them (and fusing RMSNorm into one call) made that step 4-5 % faster.
@own_forward
class ColumnParallelLinear(Packable, fs_layers.ColumnParallelLinear):
    """fairscale's column-parallel layer, its product done by ``Packable``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.output_size_per_partition == self.out_features:  # one rank
            return self.product(x)
        y = self.product(mappings.copy_to_model_parallel_region(x))
        return mappings.gather_from_model_parallel_region(y) if self.gather_output else y


@own_forward
class RowParallelLinear(Packable, fs_layers.RowParallelLinear):
    """fairscale's row-parallel layer (input already split across ranks), its product done by ``Packable``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_size_per_partition == self.in_features:  # one rank
            return self.product(x)
        return mappings.reduce_from_model_parallel_region(self.product(x))
