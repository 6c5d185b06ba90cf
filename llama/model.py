"""The Llama transformer: ModelArgs, its layers and the preallocated KV cache.

Module names equal the keys of Meta's checkpoints, and the tensor-parallel layers are fairscale's
(``llama.linear``), so that each rank's ``consolidated.NN.pth`` slice loads into it as it is.
"""

import dataclasses
import functools
import logging
import math
import operator
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import layers as fs_layers
from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size, model_parallel_is_initialized
from torch import nn

from . import distributed, kernels, pages
from .checks import is_int, is_number
from .linear import ColumnParallelLinear, Fused, Packable, PackedFused, RowParallelLinear, can_pack, packs_rows
from .machine import cache_dtype_for, compute_dtype_for
from .research import apply_layer, fused, hooked, own_forward, replaced, watch


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1  # -1 in params.json: the tokenizer gives it
    multiple_of: int = 256  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # Llama 2: 1e4, Code Llama: 1e6, Llama 3: 5e5
    use_scaled_rope: bool = False  # Llama 3.1's long-context frequency scaling (scale_rope_freqs)
    rope_scaling_factor: Optional[float] = None  # its factor; None: rope_factor's rule
    max_batch_size: int = 32
    max_seq_len: int = 2048

    @classmethod
    def from_params(cls, params: dict, **overrides) -> "ModelArgs":
        """Build from a params.json dict; keys this engine doesn't know are ignored with a warning."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown and distributed.rank() == 0:  # one line, not a warning's echo of this source line per rank
            logging.getLogger("llama").warning("params.json: ignoring unknown keys %s", unknown)
        return cls(**{k: v for k, v in params.items() if k in known}, **overrides)

    def check(self) -> None:
        """Fail with what is wrong where the shapes can't make a model (Meta's would fail deep in a layer, or not
        at all until its output is garbage)."""
        least = {"dim": 1, "n_layers": 1, "n_heads": 1, "multiple_of": 1, "max_batch_size": 1, "max_seq_len": 1}
        for name, low in least.items():
            value = getattr(self, name)
            if not is_int(value) or value < low:
                raise ValueError(f"ModelArgs.{name} must be an integer >= {low}, got {value!r}")
        if not is_int(self.vocab_size) or self.vocab_size < 1:
            raise ValueError(f"ModelArgs.vocab_size must be a positive integer, got {self.vocab_size!r} (params.json's "
                             "-1 means the tokenizer's: set it to tokenizer.n_words, as Meta's build does)")
        optional = ("ffn_dim_multiplier", "rope_scaling_factor")  # None: not given
        for name in ("norm_eps", "rope_theta") + optional:
            value = getattr(self, name)
            if not (is_number(value) and 0 < value < math.inf) and not (value is None and name in optional):
                raise ValueError(f"ModelArgs.{name} must be a positive number, got {value!r}")
        if not isinstance(self.use_scaled_rope, bool):
            raise ValueError(f"ModelArgs.use_scaled_rope must be true or false, got {self.use_scaled_rope!r}")
        if self.n_kv_heads is not None and (not is_int(self.n_kv_heads) or self.n_kv_heads < 1):
            raise ValueError(f"ModelArgs.n_kv_heads must be an integer >= 1 (or None: n_heads), got "
                             f"{self.n_kv_heads!r}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"ModelArgs.n_kv_heads ({self.n_kv_heads!r}) must divide n_heads ({self.n_heads}): "
                             "each KV head serves a group of query heads")
        if self.dim % self.n_heads or self.head_dim % 2:
            raise ValueError(f"ModelArgs.dim ({self.dim}) must be n_heads ({self.n_heads}) times an even head "
                             "dimension: rotary embeddings turn pairs of each head's values")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def local_kv_heads(self, world: int) -> int:
        """The KV heads each of world ranks holds: its share, or one (copied) where there are more ranks."""
        return max(1, self.kv_heads // world)

    def cache_bytes(self, world: int, dtype: torch.dtype) -> int:
        """Bytes of one position of one row in a rank's KV cache: keys and values of every layer."""
        return 2 * self.n_layers * self.local_kv_heads(world) * self.head_dim * dtype.itemsize

    @property
    def rope_factor(self) -> float:
        """How many times use_scaled_rope slows the longest wavelengths. Meta's params.json don't say and Meta's
        code takes 8, right for Llama 3.1, 3.3 and 3.2's vision models; Llama 3.2's 1B and 3B were trained with
        32 (their Hugging Face configs, corrected after the release; with 8 they degrade over long contexts,
        meta-llama/llama-models#241). Those two are told by their shapes; a params.json may also give it as
        rope_scaling_factor."""
        if self.rope_scaling_factor is not None:
            return self.rope_scaling_factor
        llama32_small = {(2048, 16, 32, 8), (3072, 28, 24, 8)}  # 1B and 3B: dim, layers, heads, KV heads
        return 32.0 if (self.dim, self.n_layers, self.n_heads, self.kv_heads) in llama32_small else 8.0

    @property
    def hidden_dim(self) -> int:
        """The SwiGLU width, derived exactly as Meta's params.json intend (e.g. 11008 for 7B)."""
        return swiglu_width(4 * self.dim, self.multiple_of, self.ffn_dim_multiplier)


def family_embed_dim(vocab_size: int) -> int:
    """How Meta's code for a model of this vocabulary shards the embedding: Llama 3 (128256 tokens) on the
    vocabulary, Llama 1/2 and Code Llama on the embedding dimension."""
    return 0 if vocab_size >= 128000 else 1


def swiglu_width(hidden_dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float] = None) -> int:
    """Meta's FeedForward's width from its hidden_dim argument (4 x dim): two thirds of it (SwiGLU's three
    matrices then cost what two of 4 x dim would), times ffn_dim_multiplier, rounded up to a multiple_of."""
    hidden = int(2 * hidden_dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@contextmanager
def _skip_fairscale_init() -> Iterator[None]:
    """fairscale's layers fill their weights (and, with several ranks, a full-size master copy) when built.

    The weights come from the checkpoint anyway, so skip that work: the layers keep uninitialised storage that
    the load replaces with the checkpoint's tensors, and that is never touched (so never resident) before.
    """
    original = fs_layers._initialize_affine_weight
    fs_layers._initialize_affine_weight = lambda *args, **kwargs: None
    try:
        yield
    finally:
        fs_layers._initialize_affine_weight = original


def _as_loaded(weight: torch.Tensor) -> torch.Tensor:
    """fairscale's init_method for the layers: none, as Meta's (the checkpoint's weights replace them)."""
    return weight


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """One call, which sums the squares in float32 whatever x's dtype (bf16 sums lose too much) and rounds once,
    after the weight; Meta's rounds to x's dtype before it, which costs three more kernels on a GPU. On a CPU,
    kernels.rms_norm's (torch's is seven small operations there). (torch's rounds a weight wider than x to x's
    dtype first: only where compute_dtype was set narrower than the weights.)"""
    out = kernels.rms_norm(x, weight, eps)
    return out if out is not None else torch_rms_norm(x, weight, eps)


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm by torch's fused operation (one kernel on a GPU, compiled by ``Transformer.compiled_elementwise``)."""
    return torch.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: on a CPU, kernels.swiglu's one call (torch's is three there)."""
    out = kernels.swiglu(gate, up)
    return out if out is not None else torch_swiglu(gate, up)


def torch_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """x + y (a residual sum), and rms_norm of it: on a CPU, kernels.add_rms_norm's one call."""
    out = kernels.add_rms_norm(x, y, weight, eps)
    if out is not None:
        return out
    h = x + y
    return h, rms_norm(h, weight, eps)


def torch_add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """add_rms_norm by torch's operations, for ``Transformer.compiled_elementwise`` to make one kernel of them."""
    h = x + y
    return h, torch_rms_norm(h, weight, eps)


@own_forward
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.norm = rms_norm  # or its compiled form (Transformer.compiled_elementwise)
        self.add_norm = add_rms_norm  # or its compiled form (Transformer.compiled_elementwise)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.promote_types(x.dtype, self.weight.dtype) != x.dtype:  # Meta's way, for its dtype: the weight's
            return self._norm(x.float()).type_as(x) * self.weight
        return self.norm(x, self.weight, self.eps)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        """Meta's: x scaled to a root mean square of one, without the weight (research code calls it)."""
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def after_add(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """x + y (a residual sum; x where y is None), and it normalised: one kernel within
        ``Transformer.compiled_elementwise``, one call on a CPU."""
        return self.add_norm(x, y, self.weight, self.eps) if y is not None else (x, self.norm(x, self.weight, self.eps))


def rope_frequencies(dim: int, theta: float, device: Optional[torch.device] = None) -> torch.Tensor:
    """The rotary frequency of each pair of a head's dim dimensions, unscaled, in float32: theta ** (-2i / dim)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32)[: dim // 2] / dim))


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0, use_scaled: bool = False,
                         device: Optional[torch.device] = None, factor: float = 8.0) -> torch.Tensor:
    """The rotary rotations cos + i sin of positions 0..end-1 for heads of dim, (end, dim // 2), complex64, with
    Llama 3.1's scaling by factor where use_scaled (``ModelArgs.rope_factor``): Meta's name and first arguments,
    so research code importing it runs."""
    freqs = rope_frequencies(dim, theta, device)
    if use_scaled:
        freqs = scale_rope_freqs(freqs, factor)
    angles = torch.outer(torch.arange(end, device=device, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_scaling(freqs: torch.Tensor, scale_factor: float = 8.0, high_freq_factor: float = 4.0) -> torch.Tensor:
    """Meta's name and arguments (llama-models) for ``scale_rope_freqs``, for research code that imports it."""
    return scale_rope_freqs(freqs, scale_factor, high_freq_factor=high_freq_factor)


def scale_rope_freqs(freqs: torch.Tensor, factor: float = 8.0, low_freq_factor: float = 1.0,
                     high_freq_factor: float = 4.0, original_context: int = 8192) -> torch.Tensor:
    """Llama 3.1's scaling: wavelengths longer than the original context / low_freq_factor are stretched by
    factor, those shorter than original context / high_freq_factor are kept, and the band between blends
    the two linearly in original_context / wavelength."""
    wavelen = 2 * math.pi / freqs
    blend = ((original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0, 1)
    scaled = (1 - blend) * freqs / factor + blend * freqs
    scaled = torch.where(wavelen < original_context / high_freq_factor, freqs, scaled)
    return torch.where(wavelen > original_context / low_freq_factor, freqs / factor, scaled)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... in float32, multiplying them as complex numbers, as
    Meta's code does: three kernels on a GPU, where the same in real arithmetic takes ten.

    x: (batch, seq, heads, head_dim); rotations: (batch, seq, 1, head_dim // 2), complex. On a CPU, kernels.rope's
    one call (the same in real arithmetic, float32).
    """
    out = kernels.rope(x, rotations)
    return out if out is not None else torch_rope(x, rotations)


def torch_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    z = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(z * rotations).flatten(-2).type_as(x)


def real_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """torch_rope in real arithmetic, for ``Transformer.compiled_elementwise``: Inductor generates no code for
    complex numbers and would launch torch_rope's complex multiply on its own; of this it makes one kernel."""
    cos_sin = torch.view_as_real(rotations)
    cos, sin = cos_sin[..., 0], cos_sin[..., 1]
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)


def reshape_for_broadcast(freqs_cis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Meta's, for research code that imports it: freqs_cis, (seq, head_dim // 2), viewed to broadcast over x's
    other dimensions, x being (batch, seq, heads, head_dim // 2) (queries or keys as complex numbers)."""
    if x.dim() < 2 or freqs_cis.shape != (x.shape[1], x.shape[-1]):
        raise ValueError(f"freqs_cis of shape {tuple(freqs_cis.shape)} can't rotate x of shape {tuple(x.shape)}: "
                         "it must be (x.shape[1], x.shape[-1])")
    return freqs_cis.view(*[d if i in (1, x.dim() - 1) else 1 for i, d in enumerate(x.shape)])


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Meta's name and arguments, for research code that imports it: xq and xk, (batch, seq, heads, head_dim),
    rotated by freqs_cis, (seq, head_dim // 2) (``precompute_freqs_cis``)."""
    rotations = freqs_cis[None, :, None, :]
    return torch_rope(xq, rotations), torch_rope(xk, rotations)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Meta's, for research code that imports it: each KV head of x, (batch, seq, kv_heads, head_dim), n_rep times
    in a row. The engine's attention shares the KV heads without copying them (``enable_gqa``, the C kernel)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=2)


def rotate_and_cache(qkv: torch.Tensor, rotations: torch.Tensor, cache: torch.Tensor, positions: torch.Tensor,
                     heads: int, rope: Callable = apply_rope, one_write: bool = False) -> torch.Tensor:
    """Rotate the queries and keys of qkv, (batch, seq, heads + 2 * kv_heads, head_dim), in one call; write the
    keys and values into cache, (2, batch, kv_heads, cache positions, head_dim), at positions, in its dtype;
    return the queries. one_write: keys and values stacked and written by one ``index_copy_``, for Inductor
    (``Transformer.compiled_elementwise``), which makes one kernel of the stack and the write; else one write
    each, as eager is best: there the stack would be one more copy, and one more allocation in every layer."""
    kv_heads = (qkv.shape[2] - heads) // 2
    qk = rope(qkv[:, :, :heads + kv_heads], rotations)
    k, v = qk[:, :, heads:], qkv[:, :, heads + kv_heads:]  # (batch, seq, kv_heads, head_dim)
    if one_write:
        cache.index_copy_(3, positions, torch.stack((k, v)).transpose(2, 3).to(cache.dtype))
    else:
        cache[0].index_copy_(2, positions, k.transpose(1, 2).to(cache.dtype))
        cache[1].index_copy_(2, positions, v.transpose(1, 2).to(cache.dtype))
    return qk[:, :, :heads]


@dataclass
class Window:
    """Where one forward pass sits: the cache positions of its tokens (None: training, no cache), the cache
    positions first_key..key_end its attention reads, the cache rows, and the rotary rotations and additive
    attention mask for its tokens (None for several tokens: causal from first_key, the rows' tokens a prompt
    of their own with only padding before it). Positions are a tensor on the device, so that a step's kernels
    don't depend on where it is (``Transformer.decode``)."""
    positions: Optional[torch.Tensor]
    key_end: int
    rows: slice
    rotations: torch.Tensor
    mask: Optional[torch.Tensor]
    first_key: int = 0

    @staticmethod
    def of(x: torch.Tensor, where: Union["Window", int], freqs_cis: Optional[torch.Tensor],
           mask: Optional[torch.Tensor]) -> "Window":
        """where itself, or the window that Meta's arguments to a block or attention make (start_pos; freqs_cis,
        the rotations of x's positions; the mask or None): research code written for Meta's model calls them so,
        running the layers itself as its Transformer.forward does."""
        if isinstance(where, Window):
            return where
        if freqs_cis is None:
            raise ValueError("called with a start_pos, a block or attention also takes Meta's freqs_cis (the "
                             "model's freqs_cis[start_pos:start_pos + seqlen]) and mask")
        bsz, seqlen = x.shape[:2]
        if mask is None and seqlen > 1:  # Meta's: every key; the engine's None would be causal
            mask = torch.zeros((seqlen, where + seqlen), dtype=x.dtype, device=x.device)
        positions = torch.arange(where, where + seqlen, device=x.device)
        return Window(positions, where + seqlen, slice(0, bsz), freqs_cis[None, :, None, :], mask)


@dataclass
class Writes:
    """How many times research code has written a model's KV caches itself: called an attention (or a block) with
    Meta's arguments, running the layers as Meta's forward does, or assigned ``cache_k``. One count that a
    Transformer shares with its attentions (``Transformer.cache_writes``). (The model's own passes, which call them
    with a Window, count as one run each: ``Transformer.runs``.)"""
    n: int = 0


class MetasCache:
    """Meta's ``cache_k`` (0) or ``cache_v`` (1) of an Attention, (batch, positions, kv_heads, head_dim): a view of
    its cache_kv, which research code reads, edits in place, or assigns (to save and restore a cache). Read
    before the first forward pass, it is there, zeros, as Meta's is from ``__init__``."""

    def __init__(self, i: int):
        self.i = i

    def __get__(self, attention: Optional["Attention"], owner: type):
        return self if attention is None else attention._meta_view(self.i)

    def __set__(self, attention: "Attention", value: torch.Tensor) -> None:
        attention._assign(self.i, value)


@own_forward
class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        mp = get_model_parallel_world_size()
        self.n_kv_heads = args.kv_heads
        self.n_local_heads = args.n_heads // mp
        # With more ranks than KV heads, each rank holds a copy of the one KV head its query heads share.
        self.n_local_kv_heads = args.local_kv_heads(mp)
        self.n_rep = self.n_local_heads // self.n_local_kv_heads  # Meta's names, for research code
        self.head_dim = args.head_dim
        self.cache_size = (args.max_batch_size, args.max_seq_len)  # of a cache made on first use
        kv_dim = self.n_local_kv_heads * mp * self.head_dim
        kw = dict(bias=False, init_method=_as_loaded)
        self.wq = ColumnParallelLinear(args.dim, args.n_heads * self.head_dim, gather_output=False, **kw)
        self.wk = ColumnParallelLinear(args.dim, kv_dim, gather_output=False, **kw)
        self.wv = ColumnParallelLinear(args.dim, kv_dim, gather_output=False, **kw)
        self.wo = RowParallelLinear(args.n_heads * self.head_dim, args.dim, input_is_parallel=True, **kw)
        self.cache_kv: Optional[torch.Tensor] = None  # keys and values; cache_k and cache_v view them
        self.wqkv: Optional[Union[Fused, PackedFused]] = None  # Transformer.fuse_weights, pack_weights
        self.rotate_and_cache = rotate_and_cache  # or its compiled form (Transformer.compiled_elementwise)
        self.writes = Writes()  # its Transformer's, in one

    def allocate_cache(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype, device: torch.device) -> None:
        """A cache of this size, dtype and device: the one there where it is one (research code may hold views of
        it), else a new one of zeros."""
        # (batch, kv_heads, seq, head_dim) each: the layout attention reads, so no per-step transpose of the cache.
        # Keys and values in one tensor, so that a compiled step writes both in one kernel (rotate_and_cache).
        shape = (2, max_batch_size, self.n_local_kv_heads, max_seq_len, self.head_dim)
        c = self.cache_kv
        if c is None or c.shape != shape or c.dtype != dtype or c.device != device:
            with torch.inference_mode(False):  # a cache made in a forward pass is still editable outside one
                self.cache_kv = torch.zeros(shape, dtype=dtype, device=device)

    cache_k = MetasCache(0)
    cache_v = MetasCache(1)

    def _meta_view(self, i: int) -> torch.Tensor:
        if self.cache_kv is None:
            w = next(self.parameters())
            self.allocate_cache(*self.cache_size, cache_dtype_for(w.dtype, compute_dtype_for(w.dtype, w.device)),
                                w.device)
        return self.cache_kv[i].transpose(1, 2)

    def _assign(self, i: int, value: torch.Tensor) -> None:
        """Meta's ``attention.cache_k = t``: t's contents copied into the cache attention reads (the engine keeps
        keys and values in one tensor, on its device), the cache made t's batch x positions where t is another
        size, and t's dtype where t is another (what both held kept): Meta's attention code makes its cache its
        queries' dtype so (``self.cache_k = self.cache_k.to(xq)``), and then computes with what it reads back."""
        now = self._meta_view(i)
        if not isinstance(value, torch.Tensor) or value.dim() != 4 or value.shape[2:] != now.shape[2:]:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"cache_{'kv'[i]} must be a (batch, positions, {now.shape[2]}, {now.shape[3]}) tensor, "
                             f"got {got}")
        if (value.data_ptr(), value.shape, value.stride(), value.dtype) == (now.data_ptr(), now.shape, now.stride(),
                                                                           now.dtype):
            return  # itself (Meta's ``self.cache_k = self.cache_k.to(xq)``)
        if value.shape != now.shape or value.dtype != now.dtype:
            old = self.cache_kv
            self.allocate_cache(value.shape[0], value.shape[1], value.dtype, old.device)
            rows, positions = min(old.shape[1], value.shape[0]), min(old.shape[3], value.shape[1])
            self.cache_kv[:, :rows, :, :positions] = old[:, :rows, :, :positions]
        self.cache_kv[i] = value.transpose(1, 2)
        self.writes.n += 1

    def forward(self, x: torch.Tensor, start_pos: Union[Window, int], freqs_cis: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, *, last_only: bool = False) -> torch.Tensor:
        """x through attention in a Window, or at Meta's arguments (start_pos, freqs_cis, mask: ``Window.of``).
        last_only: the output at the last position only, (batch, 1, dim), every position's keys and values
        cached all the same: the last query alone attends, as in decoding."""
        w = Window.of(x, start_pos, freqs_cis, mask)
        if w is not start_pos:  # Meta's arguments: perhaps research code's own loop over the layers
            self.writes.n += 1
        bsz, seqlen, _ = x.shape
        heads, kv_heads = self.n_local_heads, self.n_local_kv_heads
        if self.cache_kv is None and w.positions is not None:  # called on its own, as Meta's allocates in __init__
            self.allocate_cache(*self.cache_size, x.dtype, x.device)
        parts = self._modules
        wqkv = fused(self.wqkv, parts["wq"], parts["wk"], parts["wv"])
        qkv = wqkv(x) if wqkv is not None else torch.cat([apply_layer(parts[n], x) for n in ("wq", "wk", "wv")], -1)
        qkv = qkv.view(bsz, seqlen, heads + 2 * kv_heads, self.head_dim)
        gqa = heads != kv_heads
        if w.positions is None:  # training: whole sequences at once, no cache
            qk = apply_rope(qkv[:, :, :heads + kv_heads], w.rotations)
            q, k, v = qk[:, :, :heads], qk[:, :, heads:], qkv[:, :, heads + kv_heads:]
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True, enable_gqa=gqa)
        else:
            q = self.rotate_and_cache(qkv, w.rotations, self.cache_kv[:, w.rows], w.positions, heads)
            keys, values = self.cache_kv[:, w.rows, :, w.first_key:w.key_end]
            mask = w.mask.to(q.dtype) if w.mask is not None else None  # (a hooked norm may widen x: Meta's way)
            if last_only and seqlen > 1:
                q, mask, seqlen = q[:, -1:], mask[..., -1:, :] if mask is not None else None, 1
            if seqlen == 1:
                # Decoding: the query heads that share a KV head go in as the queries of one head (the mask,
                # (bsz, 1, 1, key_end), broadcasts over them). enable_gqa's CPU kernel is 10-20x slower here.
                group = q.reshape(bsz, kv_heads, -1, self.head_dim)
                out = kernels.decode_attention(group, keys, values, mask)  # on a CPU; None elsewhere
                if out is None:
                    out = F.scaled_dot_product_attention(group, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask)
                out = out.reshape(bsz, heads, 1, self.head_dim)  # CUDA's kernels return it strided
            else:
                q = q.transpose(1, 2)
                out = kernels.prefill_attention(q, keys, values) if mask is None else None  # CPU, float32
                if out is None:
                    out = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask,
                                                         is_causal=mask is None, enable_gqa=gqa)
        return apply_layer(self.wo, out.transpose(1, 2).reshape(bsz, seqlen, -1))


@own_forward
class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float] = None):
        """Meta's arguments: hidden_dim is 4 x dim, of which the width is derived (``swiglu_width``)."""
        super().__init__()
        hidden_dim = swiglu_width(hidden_dim, multiple_of, ffn_dim_multiplier)
        kw = dict(bias=False, init_method=_as_loaded)
        self.w1 = ColumnParallelLinear(dim, hidden_dim, gather_output=False, **kw)
        self.w2 = RowParallelLinear(hidden_dim, dim, input_is_parallel=True, **kw)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, gather_output=False, **kw)
        self.w13: Optional[Union[Fused, PackedFused]] = None  # Transformer.fuse_weights, pack_weights
        self.swiglu = swiglu  # or its compiled form (Transformer.compiled_elementwise)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self._modules
        w13 = fused(self.w13, parts["w1"], parts["w3"])
        gate, up = w13(x).chunk(2, dim=-1) if w13 is not None else (apply_layer(self.w1, x), apply_layer(self.w3, x))
        return apply_layer(self.w2, self.swiglu(gate, up))


BLOCK_PARTS = ("attention_norm", "ffn_norm", "attention", "feed_forward")


class Caches(NamedTuple):
    """The attentions' KV caches (``Transformer.ready_cache``), and the fewest rows and positions any holds."""
    tensors: List[torch.Tensor]
    rows: int
    positions: int


@own_forward
class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.n_heads, self.dim, self.head_dim, self.layer_id = args.n_heads, args.dim, args.head_dim, layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, 4 * args.dim, args.multiple_of, args.ffn_dim_multiplier)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, start_pos: Union[Window, int], freqs_cis: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Meta's block, each part called as a module (for their hooks), in a Window or at Meta's arguments
        (start_pos, freqs_cis, mask), which attention is given as they came; ``residuals`` is the fused way."""
        h = x + self.attention(self.attention_norm(x), start_pos, freqs_cis, mask)
        return h + apply_layer(self.feed_forward, self.ffn_norm(h))

    def residuals(self, x: torch.Tensor, carry: Optional[torch.Tensor], w: Window,
                  last_only: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """The block on x + carry (carry: the previous block's last output; None: x alone), as (h, out) whose sum
        is its output, that sum left to the next norm (``Transformer._run``): each residual sum is done by the
        norm after it, one kernel within ``Transformer.compiled_elementwise`` and one call on a CPU. last_only:
        the output at the last position only, for the last block of a pass whose logits are the last
        position's: wo and the feed-forward then run for one position, not the prompt's every one (4 % of a
        prompt's products at 22 layers)."""
        x, normed = self.attention_norm.after_add(x, carry)
        out = self.attention(normed, w, last_only=last_only)
        h, normed = self.ffn_norm.after_add(x[:, -1:] if last_only else x, out)
        return h, apply_layer(self.feed_forward, normed)


@own_forward
class Transformer(nn.Module):
    """Meta's Llama transformer, its layers split across the model-parallel group (``llama.distributed.setup``).
    Built outside one, it sets one up as ``Llama.build`` does: one process without a launcher, where Meta's
    failed on fairscale's assertion; torchrun's processes under it.

    ``Transformer(ModelArgs)`` allocates its weights uninitialised, as they are to be loaded; ``Llama.build``
    loads them and allocates the KV cache with ``setup_cache``. Used on its own, call ``setup_cache`` (or
    ``.to(device, dtype)`` and forward, which allocates it on first use, and again after the weights move).
    """

    def __init__(self, params: ModelArgs):
        super().__init__()
        params.check()
        if not model_parallel_is_initialized():
            distributed.setup(None, None)
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        with _skip_fairscale_init():
            self.tok_embeddings = self._embedding(params)(params.vocab_size, params.dim, init_method=_as_loaded)
            self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
            self.norm = RMSNorm(params.dim, params.norm_eps)
            self.output = ColumnParallelLinear(params.dim, params.vocab_size, bias=False, init_method=_as_loaded)
        # Meta's name and length (Llama 2's context is twice max_seq_len's default): (2 x max_seq_len, head_dim // 2),
        # made again on the weights' device by setup_cache.
        self.freqs_cis = self._rotations(2 * params.max_seq_len, torch.device("cpu"))
        self.compute_dtype: Optional[torch.dtype] = None  # set with the KV cache
        self.cache_dtype: Optional[torch.dtype] = None  # the KV cache's when made (research code may assign another)
        self.cache_made_for: Optional[Tuple[torch.device, torch.dtype]] = None  # the weights' device and dtype then
        self.runs = 0  # forward passes, decoding steps and caches made: each changes what the KV cache holds
        self.writes = Writes()  # and research code's own
        for attention in self.attentions():
            attention.writes = self.writes
        self._caches = Caches([], 0, 0)  # as ready_cache found them last
        self._compiled: Optional[tuple[Callable, ...]] = None  # compiled_elementwise

    def cache_writes(self) -> Tuple[int, int]:
        """What changes where the KV caches' contents may have: the model's runs and research code's writes."""
        return self.runs, self.writes.n

    @staticmethod
    def _embedding(params: ModelArgs) -> type:
        """The embedding split as Meta's code splits it for this family (``family_embed_dim``), so that its
        shards load as they are: on the vocabulary for Llama 3 (whose lookup masks other ranks' tokens, waiting
        for the device: one process, whose CUDA graphs allow none, takes it whole either way)."""
        split_vocabulary = family_embed_dim(params.vocab_size) == 0 and get_model_parallel_world_size() > 1
        return fs_layers.VocabParallelEmbedding if split_vocabulary else fs_layers.ParallelEmbedding

    def setup_cache(self, max_batch_size: Optional[int] = None, max_seq_len: Optional[int] = None,
                    compute_dtype: Optional[torch.dtype] = None, cache_dtype: Optional[torch.dtype] = None) -> None:
        """Allocate the KV cache and rotary tables on the weights' device: each attention's cache kept where it is
        already of this size, dtype and device (research code may hold views of it: ``Attention.cache_k``), and the
        table where it is long enough (research code may have put its own there, as on Meta's model).

        compute_dtype: the dtype of activations, by default ``compute_dtype_for`` the weights' dtype and device.
        Weights stored narrower (bf16 on a CPU without native bf16, computing in float32) are converted as
        ``linear`` needs them. cache_dtype: the KV cache's, by default ``cache_dtype_for`` those two (float32
        keeps keys and values unrounded where bf16 weights compute in float32, for twice the bytes).
        """
        p = self.params
        max_batch_size = p.max_batch_size if max_batch_size is None else max_batch_size
        max_seq_len = p.max_seq_len if max_seq_len is None else max_seq_len
        for name, value in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len)):
            if not is_int(value) or value < 1:
                raise ValueError(f"setup_cache: {name} must be an integer >= 1, got {value!r}")
        weight = self.tok_embeddings.weight  # (not the output's: research code may put nn.Identity() there)
        self.compute_dtype = compute_dtype or compute_dtype_for(weight.dtype, weight.device)
        self.cache_dtype = cache_dtype or cache_dtype_for(weight.dtype, self.compute_dtype)
        watch(self)  # edits through .data seen by packed copies (pack_weights) and stream's kept cache
        for owner, name, members in self._fusable():  # weights fused, then moved or converted by .to(): again
            group = getattr(owner, name)
            if isinstance(group, Fused) and group.layers == members and not group.valid():
                setattr(owner, name, Fused(*members))
        self.cache_made_for = (weight.device, weight.dtype)
        self.runs += 1
        for attention in self.attentions():
            attention.allocate_cache(max_batch_size, max_seq_len, self.cache_dtype, weight.device)
        if self.freqs_cis.shape[0] < 2 * max_seq_len:
            self.freqs_cis = self._rotations(2 * max_seq_len, weight.device)
        else:  # kept, as Meta's forward keeps it: research code may have put a table of its own there
            self.freqs_cis = self.freqs_cis.to(weight.device)

    def attentions(self) -> List["Attention"]:
        """Each block's attention module, with its KV cache, wherever it is in the block: research code may have
        put a block or an attention in a wrapper of its own."""
        found: List[Attention] = []
        for layer in self.layers._modules.values():
            a = layer._modules.get("attention")
            found += (a,) if isinstance(a, Attention) else (m for m in layer.modules() if isinstance(m, Attention))
        return found

    def _rotations(self, end: int, device: torch.device) -> torch.Tensor:
        """precompute_freqs_cis with the arguments of Meta's signatures alone (dim, end, theta; use_scaled where
        it is, as Llama 3.1's), looked up at call time: research code may put its own there (RoPE scaling)."""
        p = self.params
        scaled = (True,) if p.use_scaled_rope else ()
        factor = {"factor": p.rope_factor} if p.use_scaled_rope and p.rope_factor != 8.0 else {}
        return precompute_freqs_cis(p.head_dim, end, p.rope_theta, *scaled, **factor).to(device)

    def pack_weights(self) -> int:
        """Give each bf16 weight mapped from a checkpoint file a packed copy for products in the compute dtype
        (``setup_cache``'s, else the weights'; see ``llama.linear.pack``), and let go of its mapped pages: the
        process keeps one copy of the weights, and the weight tensors read back from the page cache or file if
        anything uses them. Each layer's wq, wk, wv share one copy, and its w1, w3 another (``PackedFused``),
        where all of them can be packed. Returns how many weights were packed: none where no way can
        (``can_pack``); other weights (copied, converted, on a GPU, edited since they were mapped, or of a shape
        the product can't take) are left as they are."""
        compute = self.compute_dtype or self.tok_embeddings.weight.dtype
        if not can_pack(compute):
            return 0
        droppable = pages.droppable()

        def packs(m: Packable) -> bool:
            w = m.weight
            return w.dtype == torch.bfloat16 and packs_rows(w.shape[0], compute) and droppable(w)

        groups = list(self._fusable())
        sizes = [sum(m.weight.numel() for m in members) for _, _, members in groups]
        buffer = torch.empty(max(sizes, default=0), dtype=torch.bfloat16)
        grouped: set[Packable] = set()
        for owner, name, members in groups:  # a group that can't be packed keeps what it had (Fused, or nothing)
            if all(map(packs, members)):
                setattr(owner, name, PackedFused(*members, buffer=buffer, compute=compute))
                grouped.update(members)
        del buffer
        for m in self.modules():
            if isinstance(m, Packable) and m not in grouped and packs(m):
                m.pack(compute)
                pages.drop(m.weight)
        return self.packed_weights()

    def fuse_weights(self) -> None:
        """Make each layer's wq, wk, wv one product, and its w1, w3 another (``Fused``). Each fused tensor is
        allocated before its parts are let go of, so drop other references to the weights first (the loaded
        state dict), or they stay allocated beside it."""
        for owner, name, members in self._fusable():
            setattr(owner, name, Fused(*members))

    def _fusable(self) -> Iterator[tuple[nn.Module, str, tuple["ColumnParallelLinear", ...]]]:
        """Each layer's column-parallel layers fed the same input, and the attribute their one product goes in:
        wq, wk, wv (``Attention.wqkv``); w1, w3 (``FeedForward.w13``)."""
        for m in self.modules():
            if isinstance(m, Attention):
                yield m, "wqkv", (m.wq, m.wk, m.wv)
            elif isinstance(m, FeedForward):
                yield m, "w13", (m.w1, m.w3)

    @contextmanager
    def compiled_elementwise(self) -> Iterator[None]:
        """Within it, RMSNorm with the residual sum before it, the rotary rotation with the cache write after it
        (``rotate_and_cache``) and SwiGLU's gate run compiled by torch.compile (one kernel each, or two for the
        rotation and write, where eager PyTorch launches up to three), the products and attention left to cuBLAS
        and cuDNN.
        For capturing CUDA graphs (``llama.graphs``): a replayed step runs the compiled kernels without the
        host-side cost of calling them, which makes eager calls such as a prefill slower (7b shape on an H100,
        a 128-token prefill: 12 ms eager, 48 ms compiled). Compiled once per model, for any batch size. What it
        gained on a GPU: docs/performance.md."""
        if self._compiled is None:
            rotate = functools.partial(rotate_and_cache, rope=real_rope, one_write=True)
            self._compiled = tuple(torch.compile(f, dynamic=True)
                                   for f in (torch_rms_norm, rotate, torch_swiglu, torch_add_rms_norm))
        self._use_elementwise(*self._compiled)
        try:
            with warnings.catch_warnings():  # the rotations' table is complex: Inductor warns of it, though only viewed
                warnings.filterwarnings("ignore", message="Torchinductor does not support code generation for complex")
                yield
        finally:
            self._use_elementwise(rms_norm, rotate_and_cache, swiglu, add_rms_norm)

    def _use_elementwise(self, norm: Callable, rotate: Callable, gate: Callable, add_norm: Callable) -> None:
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.norm, m.add_norm = norm, add_norm
            elif isinstance(m, Attention):
                m.rotate_and_cache = rotate
            elif isinstance(m, FeedForward):
                m.swiglu = gate

    def packed_weights(self) -> int:
        """How many weights have a packed copy now, of their own or shared (``pack_weights``; edits and
        replacements drop them)."""
        alone = sum(isinstance(m, Packable) and m.valid() for m in self.modules())
        groups = [getattr(owner, name) for owner, name, _ in self._fusable()]
        return alone + sum(len(g.layers) for g in groups if isinstance(g, PackedFused) and g.valid())

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int, *, left_pad: Optional[torch.Tensor] = None,
                first_row: int = 0, last_only: bool = False) -> torch.Tensor:
        """Logits (batch, seqlen, vocab) in float32 for ``tokens`` at cache positions start_pos...

        left_pad: per row, how many leading cache positions are padding (a ragged batch aligned on its last
        prompt token). Those positions are masked out and each row's rotary positions start after its padding.
        first_row: the KV cache row of the first row of tokens (to prefill part of a batch).
        last_only: return the logits of the last position only, (batch, 1, vocab): all that sampling needs.
        """
        start_pos = self._check_input(tokens, start_pos, left_pad, first_row)
        bsz, seqlen = tokens.shape
        self.ready_cache(first_row + bsz, start_pos + seqlen)
        positions = torch.arange(start_pos, start_pos + seqlen, device=tokens.device)
        # Rows whose every position before start_pos is padding (a prompt from position 0, or each of a group of
        # equal-length prompts left-padded to a longer one's end, as Llama.generate prefills them) are prompts of
        # their own: attention reads their keys alone, causal, which its kernels know without a mask and skip the
        # masked half of (a 1000-token prompt's attention on a CPU 1.35x faster in float32, 1.57x in bf16; a
        # 256-token prompt padded to 1000 reads 256 keys instead of 1000).
        if left_pad is None:
            fresh = start_pos == 0
        else:  # (not asked of one token, as in decoding, which would wait for the device each step)
            fresh = seqlen > 1 and bool((left_pad == start_pos).all())
        return self._run(tokens, positions, start_pos + seqlen, first_row, left_pad,
                         masked=not fresh and (seqlen > 1 or left_pad is not None), last_only=last_only,
                         first_key=start_pos if fresh else 0, start=start_pos)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, left_pad: torch.Tensor, key_end: int) -> torch.Tensor:
        """Logits (batch, 1, vocab) of one decoding step, like ``forward(tokens, pos, left_pad=left_pad,
        last_only=True)``, but with nothing in it that depends on the position's value: pos is a 0-dim tensor on
        the device, and attention reads the first ``key_end`` cache positions with those after pos masked. So one
        capture of its kernels (a CUDA graph, ``llama.graphs``) serves every position below key_end. The caller
        keeps pos < key_end (checking it here would wait for the device)."""
        self.ready_cache(tokens.shape[0], key_end)
        return self._run(tokens, pos.view(1), key_end, 0, left_pad, masked=True, last_only=True)

    def _check_input(self, tokens: torch.Tensor, start_pos: int, left_pad: Optional[torch.Tensor] = None,
                     first_row: int = 0) -> int:
        """start_pos as an int, or an error saying what is wrong with the arguments. Values in tensors (token ids,
        left_pad) are checked on a CPU only: on a GPU that would wait for the device at every step (an id out of
        range ends there in a device-side assert, as with Meta's; ``Llama.generate`` checks the prompts' ids
        before)."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
            got = f"a tensor of shape {tuple(tokens.shape)}, {tokens.dtype}" if isinstance(tokens, torch.Tensor) \
                else type(tokens).__name__
            raise ValueError(f"tokens must be a (batch, seqlen) tensor of token ids, got {got}")
        if not tokens.numel():
            raise ValueError(f"tokens must hold at least one row and one position, got shape {tuple(tokens.shape)}")
        if not is_int(first_row) or first_row < 0:
            raise ValueError(f"first_row must be an integer >= 0 (the KV cache row of tokens' first), got "
                             f"{first_row!r}")
        if left_pad is not None and (not isinstance(left_pad, torch.Tensor) or left_pad.shape != tokens.shape[:1]
                                     or left_pad.is_floating_point() or left_pad.dtype == torch.bool
                                     or left_pad.device != tokens.device
                                     or (left_pad.device.type == "cpu" and bool((left_pad < 0).any()))):
            got = (f"a tensor of shape {tuple(left_pad.shape)}, {left_pad.dtype}, on {left_pad.device}"
                   if isinstance(left_pad, torch.Tensor) else type(left_pad).__name__)
            raise ValueError(f"left_pad must be a tensor of {tokens.shape[0]} integers >= 0 on {tokens.device} (each "
                             f"row's padding), got {got}")
        try:
            start_pos = operator.index(start_pos)
        except TypeError:
            raise ValueError(f"start_pos must be an integer, got {start_pos!r}") from None
        if start_pos < 0:
            raise ValueError(f"start_pos must be >= 0, got {start_pos}")
        if tokens.device.type == "cpu":
            low, high = torch.aminmax(tokens)
            if low < 0 or high >= self.vocab_size:
                raise ValueError(f"token ids must be in [0, {self.vocab_size}), got {int(low)}..{int(high)}")
        return start_pos

    def ready_cache(self, rows: int, positions: int) -> "Caches":
        """The attentions' caches, ready for rows x positions (a clear error where they are too small): allocated
        on first use, and again where ``.to()`` has moved or converted the weights since (as Meta's cache follows
        its activations), on their device, computing in ``compute_dtype_for`` their dtype, holding what it held.
        The same object until one of them is made anew, so a caller can tell by identity."""
        weight = self.tok_embeddings.weight
        attentions = self.attentions()
        held = [a.cache_kv for a in attentions]
        if self.cache_made_for != (weight.device, weight.dtype) or any(c is None for c in held):  # or one put in
            made = next((c for c in held if c is not None), None)
            self.setup_cache(*((made.shape[1], made.shape[3]) if made is not None else ()))
            for attention, old in zip(attentions, held):
                if old is not None and old is not attention.cache_kv:
                    attention.cache_kv.copy_(old)
            held = [a.cache_kv for a in attentions]
        known = self._caches.tensors
        if len(held) != len(known) or not all(map(operator.is_, held, known)):  # their sizes read again: 16 us
            self._caches = Caches(held, min((c.shape[1] for c in held), default=0),
                                  min((c.shape[3] for c in held), default=0))
        c = self._caches
        if held and (rows > c.rows or positions > c.positions):
            raise ValueError(f"cache rows up to {rows} x positions up to {positions} exceed the KV cache "
                             f"({c.rows} x {c.positions}): raise max_batch_size / max_seq_len")
        return c

    def _run(self, tokens: torch.Tensor, positions: torch.Tensor, key_end: int, first_row: int,
             left_pad: Optional[torch.Tensor], masked: bool, last_only: bool, first_key: int = 0,
             start: Optional[int] = None) -> torch.Tensor:
        """The forward pass of tokens at cache positions (a tensor; start, the first, where the caller knows it
        on the host), attention reading cache positions first_key..key_end."""
        self.runs += 1
        bsz = tokens.shape[0]
        pad = left_pad if left_pad is not None else torch.zeros(bsz, dtype=torch.long, device=tokens.device)
        rope_pos = (positions[None, :] - pad[:, None]).clamp(min=0)  # (bsz, seqlen)
        mask = None
        if masked:
            k_pos = torch.arange(key_end, device=tokens.device)[None, None, :]
            q_pos = positions[None, :, None]
            # Causal, and no key in a row's padding, except a padding query's own slot (avoids all-masked rows).
            allowed = ((k_pos <= q_pos) & ((k_pos >= pad[:, None, None]) | (k_pos == q_pos))).unsqueeze(1)
            # Additive, made once here: given as booleans, attention would convert them in every layer.
            mask = torch.zeros(allowed.shape, dtype=self.compute_dtype, device=tokens.device)
            mask.masked_fill_(allowed.logical_not(), float("-inf"))
        w = Window(positions, key_end, slice(first_row, first_row + bsz), self.freqs_cis[rope_pos].unsqueeze(2), mask,
                   first_key)
        h = self.tok_embeddings(tokens).to(self.compute_dtype)
        # Only the last position goes through the final norm and output, unless hooks on them would see it (they
        # see every position, as on Meta's model), on any rank: the output's gather takes the same on every rank.
        # And Meta's way where any rank goes it (a hook on one rank's block), or the ranks' collectives differ; and
        # the last block for the last position alone too, unless hooks in it would see the others. One collective.
        metas, tail_hooked, last_hooked = distributed.any_ranks(
            self.runs_metas_way(), hooked((self.norm, self.output)),
            tokens.shape[1] > 1 and hooked(list(self.layers)[-1].modules()))
        tail = last_only and not tail_hooked
        if metas:  # each block and norm called, with Meta's arguments where they can say the pass
            args = self._metas_arguments(w, start, left_pad, h.dtype) or (w,)
            for layer in self.layers:
                h = layer(h, *args)
            logits = apply_layer(self.output, self.norm(h[:, -1:] if tail else h)).float()
        else:
            trim = tail and tokens.shape[1] > 1 and not last_hooked
            carry = None
            for i, layer in enumerate(self.layers, 1):
                h, carry = layer.residuals(h, carry, w, last_only=trim and i == len(self.layers))
            logits = apply_layer(self.output, self.norm.after_add(h, carry)[1]).float()
        return logits[:, -1:] if last_only and not tail else logits

    def runs_metas_way(self) -> bool:
        """Whether a pass must call each block and norm as Meta's forward does (not ``TransformerBlock.residuals``),
        and attention with Meta's arguments where they can describe the pass (``_metas_arguments``): while a hook
        waits on a block, norm, attention or feed-forward, or research code has replaced the forward of one
        (``llama.research.replaced``)."""
        modules = self.replaceable_modules()
        return hooked(modules) or replaced(modules)

    def replaceable_modules(self) -> List[nn.Module]:
        """The modules whose forward research code hooks or replaces: blocks, norms, attention and feed-forward.
        The fused way would skip some or call attention with the engine's arguments; a CUDA graph's replay
        (``llama.graphs``) skips them all. (Found through ``_modules``: nn.Module's attribute lookup would cost a
        microsecond each, a hundred microseconds a step.)"""
        modules: List[nn.Module] = [self.norm]
        for layer in self.layers._modules.values():
            modules.append(layer)  # and its parts, where it is a block (not a wrapper of research code's)
            modules += filter(None, map(layer._modules.get, BLOCK_PARTS))
        return modules

    def _metas_arguments(self, w: Window, start: Optional[int], left_pad: Optional[torch.Tensor],
                         dtype: torch.dtype) -> Optional[tuple]:
        """(start_pos, freqs_cis, mask) as Meta's forward gives its blocks, where the pass is one that Meta's code
        makes: its rows from cache row 0, none left-padded, at a position known on the host (start)."""
        if start is None or w.rows.start != 0 or (left_pad is not None and bool(left_pad.any())):
            return None
        seqlen, device = w.positions.shape[0], w.positions.device
        mask = None
        if seqlen > 1:
            mask = torch.full((seqlen, seqlen), float("-inf"), device=device).triu(1)
            mask = torch.hstack([torch.zeros((seqlen, start), device=device), mask]).to(dtype)
        return start, self.freqs_cis[start:start + seqlen], mask

    def forward_train(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (batch, seqlen, vocab) of whole sequences from position 0, with autograd and without the KV
        cache: for training (scripts/train_demo.py), where forward's inference mode and cache don't belong."""
        if self.freqs_cis.shape[0] < tokens.shape[1] or self.freqs_cis.device != tokens.device:
            self.freqs_cis = self._rotations(max(tokens.shape[1], 2 * self.params.max_seq_len), tokens.device)
        h = self.tok_embeddings(tokens)
        w = Window(None, tokens.shape[1], slice(None), self.freqs_cis[: tokens.shape[1]][None, :, None, :], None)
        for layer in self.layers:
            h = layer(h, w)
        return apply_layer(self.output, self.norm(h)).float()
