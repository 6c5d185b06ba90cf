"""CPU kernels that torch lacks, in C (``kernels.c``), compiled on first use and called through ctypes.

- ``decode_attention``: torch's ``scaled_dot_product_attention`` reads a long KV cache at about a tenth of the
  memory bandwidth when one query token attends to it, which made a step at 4096 cached positions 30 % slower
  than one at 128 on the 1b shape. This reads it in one blocked pass, a bf16 cache with float32 queries too
  (``machine.cache_dtype_for``), and not a row's left padding.
- ``prefill_attention``: a prompt's causal attention in float32 (where the CPU has no native bf16), as products
  of matrices: torch's ran a 1000-token prompt of the 1b shape at 60-70 GFLOP/s on an AMD Zen 3, this at 95-115
  (4096 tokens: 1.2-1.3x torch's).
- ``rms_norm``, ``swiglu``, ``rope``: torch's are chains of small operations on the CPU (seven for RMSNorm, three
  for the gate, seven for the rotation, each 5-70 us there), 4 and 6 calls a layer of each decoding step; each of
  these is one. torch's RMSNorm alone cost 4 ms of a 107 ms step of the 1b shape on an Intel Xeon.
  ``add_rms_norm`` is the residual sum before a norm and the norm in one call.
- ``linear_bf16``: float32 rows times bf16 weights, for decoding (1 to 16 rows) on a CPU without native bf16
  products. torch converts the weight once per row there (a 2048 x 5632 weight read at 51, 28, 14 and 7 GB/s
  for 1, 2, 4 and 7 rows), or from 8 rows converts it to float32 a block at a time for a float32 product; this
  converts each weight element once for all the rows, in registers, and reads one row's weight in order.
- ``linear_packed_f32``: float32 rows times a bf16 weight kept in an order of its own (``pack_f32``), widened in
  registers: what ``Transformer.pack_weights`` packs for on a CPU without native bf16. Its outer product keeps
  12 sums in registers where ``linear_bf16``'s dot products keep a few: 16 rows ran 1.35-1.65x faster, 1 to 3
  rows as fast, and prompts as fast as torch's float32 products of the weight converted, on half the bytes.
- ``linear_packed_bf16``: bf16 rows times a bf16 weight kept in an order of its own (``pack_bf16``), with AVX-512
  BF16's dot-product instruction, for CPUs that have it: what ``Transformer.pack_weights`` packs for there. Its
  products of 8-16 rows (decoding a batch) streamed 10-25 % faster than oneDNN's on its own packed weights.
  Where the CPU also has AMX's tile registers (``uses_amx``) the same packed weights go through them: 16 rows
  streamed 7-42 % faster than oneDNN's (which uses AMX too), and prompts as fast.

The source is compiled with the machine's C compiler (``$CC``, else ``cc``; GCC, for its generic vectors) with
``-march=native``, into ``$LLAMA_KERNEL_CACHE`` (default ``~/.cache/llama``), once per source, flags and
CPU (its model and instruction-set flags); a compiler error or a missing compiler is logged once, and torch's
operations are used instead.
``LLAMA_KERNELS=0`` turns the kernels off (``scripts/benchmark.py --no-kernels``), for comparing.
"""

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=gnu11", "-shared", "-fPIC")
MAX_HEAD_DIM, MAX_GROUP, BLOCK = 256, 16, 64  # as kernels.c's MAX_D, MAX_G, BLOCK
LINEAR_ROWS = range(1, 17)  # where linear_bf16 beats torch's ways (scripts/bench_kernels.py)
_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}


def enabled() -> bool:
    return os.environ.get("LLAMA_KERNELS", "1") != "0"


def build(flags: Optional[tuple[str, ...]] = None) -> ctypes.CDLL:
    """Compile kernels.c with these flags (default FLAGS) or reuse the library a previous call left, and load
    it. Raises RuntimeError with the compiler's message if it fails. Safe across processes: each compiles to a
    temporary name and renames it into place."""
    flags = flags or FLAGS
    cc = os.environ.get("CC", "cc")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, cc.encode(), *map(str.encode, flags), cpu_id().encode()])).hexdigest()[:16]
    cache = Path(os.environ.get("LLAMA_KERNEL_CACHE") or Path.home() / ".cache" / "llama")
    target = cache / f"kernels-{key}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            done = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True)
            if done.returncode:
                errors = "\n".join(done.stderr.strip().splitlines()[:10])  # the first of them say why
                raise RuntimeError(f"compiling {SOURCE.name} with {cc} failed:\n{errors}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    for name, ints in (("decode_attention_f32", 2), ("decode_attention_bf16", 1)):  # threads (, bf16_cache)
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 8 + [ctypes.c_float] + [ctypes.c_int] * ints
        fn.restype = None
    lib.prefill_attention.argtypes = ([ctypes.c_void_p] * 5 + [ctypes.c_int64] * 9 + [ctypes.c_float]
                                      + [ctypes.c_int] * 2)
    lib.prefill_attention.restype = None
    lib.rms_norm.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2 + [ctypes.c_float] + [ctypes.c_int] * 3
    lib.rms_norm.restype = None
    lib.swiglu.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2
    lib.swiglu.restype = None
    lib.rope.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [ctypes.c_int] * 2
    lib.rope.restype = None
    products = ["linear_bf16", "linear_packed_f32"] + (["linear_packed_bf16"] if lib.has_linear_packed_bf16() else [])
    for name in products:
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
        fn.restype = None
    return lib


def cpu_id() -> str:
    """What -march=native compiles for: the CPU's model and instruction-set flags, so that a cache directory
    shared by different machines (a home directory on a cluster) never hands one a library built for another."""
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(sorted({line for line in f if line.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return f"{platform.machine()} {platform.processor()} {torch.backends.cpu.get_cpu_capability()}"


_library: list = []  # library()'s answer, once it has been asked


def library() -> Optional[ctypes.CDLL]:
    """The compiled kernels, or None (off, or they could not be built: logged once). Kept in a module variable
    rather than by functools.lru_cache, which torch.compile (of a whole model, by research code) warns of when
    it traces a call; ``library.cache_clear()`` forgets it all the same."""
    if not _library:
        _library.append(_load())
    return _library[0]


library.cache_clear = _library.clear


def _load() -> Optional[ctypes.CDLL]:
    if not enabled():
        return None
    try:
        return build()
    except (OSError, RuntimeError) as e:
        log.warning("CPU kernels unavailable, using torch's operations instead: %s", e)
        return None


def _reads_the_cache(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """What both attention kernels ask of their arguments: on the CPU, a head_dim they take (q's last; a multiple
    of 64, at most MAX_HEAD_DIM), keys and values of one dtype, shape and layout, each position's head_dim
    contiguous, and no autograd."""
    dim = q.shape[-1]
    return (q.device.type == "cpu" and dim % 64 == 0 and dim <= MAX_HEAD_DIM and keys.dtype == values.dtype
            and keys.shape == values.shape and keys.stride() == values.stride() and keys.stride(2) == dim
            and keys.stride(3) == 1 and not (torch.is_grad_enabled() and q.requires_grad))


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Attention of one query token per row, the query heads that share a KV head grouped: q (batch, kv_heads,
    group, head_dim); keys and values (batch, kv_heads, positions, head_dim), each position's head_dim
    contiguous (views into the KV cache), of q's dtype or bf16; mask additive, (batch, 1, 1, positions), or
    None. Returns (batch, kv_heads, group, head_dim) like ``scaled_dot_product_attention`` with the default
    scale, or None where the kernel doesn't apply (not on the CPU, dtypes, layout, autograd, or no kernels), for
    the caller to use torch's."""
    bsz, kv_heads, group, dim = q.shape
    applies = (_reads_the_cache(q, keys, values) and q.dtype in _DTYPES and keys.dtype in (q.dtype, torch.bfloat16)
               and keys.shape[:2] == (bsz, kv_heads) and 1 <= group <= MAX_GROUP
               and (mask is None or (mask.dtype == q.dtype and mask.shape == (bsz, 1, 1, keys.shape[2])
                                     and mask.stride(3) == 1)))
    lib = library() if applies else None
    if lib is None:
        return None
    q = q.contiguous()
    out = torch.empty_like(q)
    args = (q.data_ptr(), keys.data_ptr(), values.data_ptr(), 0 if mask is None else mask.data_ptr(), out.data_ptr(),
            bsz, kv_heads, group, dim, keys.shape[2], keys.stride(0), keys.stride(1),
            0 if mask is None else mask.stride(0), dim ** -0.5, torch.get_num_threads())
    if q.dtype == torch.float32:
        lib.decode_attention_f32(*args, int(keys.dtype == torch.bfloat16))
    else:
        lib.decode_attention_bf16(*args)
    return out


def prefill_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> Optional[torch.Tensor]:
    """Causal attention of a prompt to its own keys and values, as ``scaled_dot_product_attention(q, keys, values,
    is_causal=True, enable_gqa=True)``: q float32 (batch, heads, tokens, head_dim), each token's heads side by side
    (the rotated queries, transposed); keys and values (batch, kv_heads, tokens, head_dim), views into the KV
    cache, float32 or bf16. Returns (batch, heads, tokens, head_dim), the transpose of a contiguous (batch,
    tokens, heads, head_dim), or None where the kernel doesn't apply (not on the CPU, dtypes, layout, autograd,
    or no kernels), for the caller to use torch's. bf16 queries (a CPU with native bf16) are left to torch."""
    bsz, heads, tokens, dim = q.shape
    kv_heads = keys.shape[1]
    applies = (_reads_the_cache(q, keys, values) and q.dtype == torch.float32 and keys.dtype in _DTYPES
               and keys.shape == (bsz, kv_heads, tokens, dim) and heads % kv_heads == 0
               and q.stride(3) == 1 and q.stride(1) == dim)
    lib = library() if applies else None
    if lib is None:
        return None
    out = torch.empty(bsz, tokens, heads, dim, dtype=torch.float32)  # whatever torch's default dtype is
    span = -(-tokens // BLOCK) * BLOCK * dim  # keys transposed BLOCK positions at a time
    scratch = torch.empty(2 * bsz * kv_heads * span, dtype=torch.float32)
    lib.prefill_attention(q.data_ptr(), keys.data_ptr(), values.data_ptr(), out.data_ptr(), scratch.data_ptr(), bsz,
                          tokens, kv_heads, heads // kv_heads, dim, q.stride(0), q.stride(2), keys.stride(0),
                          keys.stride(1), dim ** -0.5, torch.get_num_threads(), int(keys.dtype == torch.bfloat16))
    return out.transpose(1, 2)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> Optional[torch.Tensor]:
    """``torch.rms_norm(x, (dim,), weight, eps)`` in x's dtype, summed in float32, for x and weight each float32
    or bf16. None where the kernel doesn't apply (device, dtypes, layout, a dim not a multiple of 16, autograd,
    or no kernels)."""
    out = _norm(x, None, weight, eps)
    return out[1] if out is not None else None


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """x + y (a residual sum, x and y of one shape and dtype), and rms_norm of it, in one call. None where
    rms_norm would be, or y is not like x."""
    if y.shape != x.shape or y.dtype != x.dtype or y.device != x.device or not y.is_contiguous():
        return None
    return _norm(x, y, weight, eps)


def _norm(x: torch.Tensor, y: Optional[torch.Tensor], weight: torch.Tensor,
          eps: float) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(x + y, or x where y is None; its norm), by kernels.c's rms_norm, or None where it doesn't apply."""
    dim = x.shape[-1]
    applies = (x.device.type == "cpu" and x.dtype in _DTYPES and weight.dtype in _DTYPES and x.is_contiguous()
               and weight.shape == (dim,) and weight.is_contiguous() and dim % 16 == 0
               and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, y, weight))))
    lib = library() if applies else None
    if lib is None:
        return None
    total = torch.empty_like(x) if y is not None else x
    out = torch.empty_like(x)
    lib.rms_norm(x.data_ptr(), 0 if y is None else y.data_ptr(), total.data_ptr(), weight.data_ptr(), out.data_ptr(),
                 x.numel() // dim if dim else 0, dim, eps, torch.get_num_threads(), x.dtype == torch.bfloat16,
                 weight.dtype == torch.bfloat16)
    return total, out


def _row_stride(t: torch.Tensor, dims: int) -> Optional[int]:
    """The stride between consecutive rows of t's leading dimensions, all but the last ``dims`` (each row's own
    dimensions, the last of them contiguous), where those rows are evenly spaced; else None."""
    if t.dim() <= dims or t.stride(-1) != 1:
        return None
    row = t.stride(-dims - 1)
    expected = row
    for size, stride in zip(reversed(t.shape[:-dims]), reversed(t.stride()[:-dims])):
        if size != 1 and stride != expected:
            return None
        expected *= size
    return row


def _elementwise_applies(x: torch.Tensor, other: torch.Tensor) -> bool:
    """x and other on the CPU, of one dtype the kernels take, and no gradient to record. (Checks written out:
    these run several times a layer, where a decoding step's Python costs as much as its small operations.)"""
    return (x.dtype in _DTYPES and other.dtype == x.dtype and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or other.requires_grad)))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> Optional[torch.Tensor]:
    """``silu(gate) * up`` (same shapes and dtype, float32 or bf16), contiguous, for gate and up rows evenly spaced
    (as the halves of one product's output are). None where the kernel doesn't apply (device, dtype, layout, a
    last dimension not a multiple of 16, autograd, or no kernels)."""
    hidden, stride = gate.shape[-1], _row_stride(gate, 1)
    applies = (_elementwise_applies(gate, up) and gate.shape == up.shape and hidden > 0 and hidden % 16 == 0
               and stride is not None and up.stride() == gate.stride())
    lib = library() if applies else None
    if lib is None:
        return None
    out = torch.empty_like(gate, memory_format=torch.contiguous_format)
    lib.swiglu(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel() // hidden, hidden, stride,
               torch.get_num_threads(), gate.dtype == torch.bfloat16)
    return out


def rope(x: torch.Tensor, rotations: torch.Tensor) -> Optional[torch.Tensor]:
    """x (batch, seq, heads, head_dim) with each interleaved pair rotated by its token's rotation, rotations
    (batch, seq, 1, head_dim // 2) complex64: what ``model.apply_rope`` computes, contiguous. x's tokens evenly
    spaced, its heads contiguous. None where the kernel doesn't apply (shapes, device, dtypes, layout, a head_dim
    not a multiple of 16, autograd, or no kernels)."""
    if x.dim() != 4:
        return None
    bsz, seqlen, heads, dim = x.shape
    stride = _row_stride(x, 2)
    applies = (_elementwise_applies(x, x) and rotations.dtype == torch.complex64 and rotations.is_contiguous()
               and rotations.shape == (bsz, seqlen, 1, dim // 2) and dim % 16 == 0 and stride is not None
               and x.stride(2) == dim)
    lib = library() if applies else None
    if lib is None:
        return None
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    lib.rope(x.data_ptr(), rotations.data_ptr(), out.data_ptr(), bsz * seqlen, heads, dim, stride,
             torch.get_num_threads(), x.dtype == torch.bfloat16)
    return out


def linear_bf16(x: torch.Tensor, weight: torch.Tensor) -> Optional[torch.Tensor]:
    """x @ weight.T for x float32 with 1 to 16 rows (its last dimension the weight's second) and weight bf16
    (out, in), in float32: x is not rounded to bf16. None where the kernel doesn't apply (device, dtypes,
    layout, rows, autograd, or no kernels). More rows are left to float32 matrix products, which match this
    kernel from about 32 rows on."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    applies = (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.bfloat16
               and weight.dim() == 2 and weight.shape[1] == k and weight.is_contiguous() and k % 16 == 0
               and rows in LINEAR_ROWS and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))
    lib = library() if applies else None
    if lib is None:
        return None
    x2 = x.reshape(rows, k).contiguous()
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=torch.float32)
    lib.linear_bf16(x2.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, weight.shape[0], k,
                    torch.get_num_threads())
    return out


def pack_f32(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """A copy of a bf16 weight (out, in) in ``linear_packed_f32``'s order, (out / C, in, C) for C columns (twice
    the kernels' vector width): at each input, the weights of a block's first and second C/2 columns
    interleaved, so that each 32-bit lane holds one of each. None where it doesn't apply (no kernels, device,
    dtype, or out not a multiple of C)."""
    columns = packed_f32_columns()
    if not (columns and weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.dim() == 2
            and weight.shape[0] % columns == 0):
        return None
    n, k = weight.shape
    return weight.detach().view(n // columns, 2, columns // 2, k).permute(0, 3, 2, 1).reshape(n // columns, k, columns)


def packed_f32_columns() -> int:
    """The columns of a block of ``pack_f32``'s order (twice the kernels' vector width); 0 without kernels."""
    lib = library()
    return lib.packed_f32_columns() if lib is not None else 0


def linear_packed_f32(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for float32 x (..., in) and a bf16 weight packed by ``pack_f32``, in float32: the weight is
    widened in registers and x is not rounded."""
    blocks, k, columns = packed.shape
    return _packed_product("linear_packed_f32", x, packed, torch.float32, blocks * columns, k)


def packs_bf16() -> bool:
    """Whether ``pack_bf16`` and ``linear_packed_bf16`` work here: the kernels built for a CPU with AVX-512 BF16."""
    lib = library()
    return lib is not None and bool(lib.has_linear_packed_bf16())


def uses_amx() -> bool:
    """Whether ``linear_packed_bf16`` runs on AMX's tile registers here (for inputs a multiple of 32)."""
    lib = library()
    return lib is not None and bool(lib.uses_amx())


def pack_bf16(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """A copy of a bf16 weight (out, in) in ``linear_packed_bf16``'s order, (out / 16, in / 2, 16, 2): each pair
    of inputs of 16 outputs side by side. None where it doesn't apply (no such kernel, device, dtype, or sizes:
    out a multiple of 16 and in of 2)."""
    applies = (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.dim() == 2
               and weight.shape[0] % 16 == 0 and weight.shape[1] % 2 == 0 and packs_bf16())
    if not applies:
        return None
    n, k = weight.shape
    return weight.detach().view(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def linear_packed_bf16(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for bf16 x (..., in) and a weight packed by ``pack_bf16``, in bf16 (float32 sums)."""
    blocks, pairs, _, _ = packed.shape
    return _packed_product("linear_packed_bf16", x, packed, torch.bfloat16, blocks * 16, pairs * 2)


def _packed_product(name: str, x: torch.Tensor, packed: torch.Tensor, dtype: torch.dtype, n: int,
                    k: int) -> torch.Tensor:
    """kernels.c's product ``name`` of x (..., k), which must be dtype on the CPU, and a weight (n, k) packed for
    it; the result in dtype."""
    if x.dtype != dtype or x.shape[-1] != k or x.device.type != "cpu":
        kind = "bf16" if dtype == torch.bfloat16 else "float32"
        raise ValueError(f"{name} takes {kind} rows of {k} on the CPU, not {x.dtype} {tuple(x.shape)} on {x.device}")
    x2 = x.reshape(-1, k).contiguous()
    out = torch.empty(*x.shape[:-1], n, dtype=dtype)
    getattr(library(), name)(x2.data_ptr(), packed.data_ptr(), out.data_ptr(), x2.shape[0], n, k,
                             torch.get_num_threads())
    return out
