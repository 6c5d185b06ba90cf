"""What this machine offers a run: its device's name, the dtypes it computes fast in (weights, activations, KV
cache), and the memory it has left. The device itself is ``distributed.pick_device``'s: a launcher's rank decides
which GPU."""

import os
from typing import Optional, Union

import torch

from . import distributed, kernels


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: without them torch's bf16 matrix products are emulated and 5-100x slower."""
    flags = kernels.cpu_id().split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype_for(weights: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of activations and KV cache: the weights', unless they are 16-bit on a CPU without native
    instructions for them, where float32 products are the fast ones (``llama.linear``: the weights widened in
    registers by kernels.c, or converted a block at a time)."""
    if device.type == "cpu" and weights in (torch.bfloat16, torch.float16):
        return weights if weights == torch.bfloat16 and cpu_has_native_bf16() else torch.float32
    return weights


def cache_dtype_for(weights: torch.dtype, compute: torch.dtype) -> torch.dtype:
    """The dtype of the KV cache: the compute dtype, except bf16 weights computing in float32 (a CPU without native
    bf16) keep bf16 keys and values, as Meta's cache is in its weights' dtype. Decoding reads the whole cache at
    each step: half the bytes made a step at 4096 cached positions of the 1b shape ~7 ms faster on such a CPU
    (docs/performance.md). Attention widens them as it reads them."""
    return torch.bfloat16 if weights == torch.bfloat16 and compute == torch.float32 else compute


DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


def pick_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    """The dtype to keep the weights in: the requested one, or the fastest accurate one for this machine.

    bf16 on x86 CPUs too: decoding reads every weight once per token, so half the bytes is nearly twice the
    speed, and ``compute_dtype_for`` keeps the products fast where the CPU lacks native bf16.
    """
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:  # float64 too, for exact comparisons
        return dtype
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: use one of bfloat16, float16, float32")
        return DTYPES[dtype]
    if device.type == "cuda":  # bf16 where the GPU computes in it (Ampere on); emulated (a T4, a V100) it is slow
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16 if torch.backends.cpu.get_cpu_capability().startswith("AVX") else torch.float32


def one_compute_dtype(weights: torch.dtype, compute: torch.dtype) -> torch.dtype:
    """The compute dtype of every rank: ranks add up and gather each other's activations, so they must agree.

    Machines of different kinds pick differently (a CPU with native bf16 computes in bf16, one without in
    float32); all then compute in float32, which both run at full speed on bf16 weights. Weights picked in
    different dtypes (bf16 on some GPUs, float16 on others) can only be settled by the user's choice of one.
    """
    picks = distributed.everyones((weights, compute))
    if len({w for w, _ in picks}) > 1:
        raise ValueError("the processes picked different dtypes for the weights (" + ", ".join(
            f"rank {r}: {str(w).removeprefix('torch.')}" for r, (w, _) in enumerate(picks)) + "): pass a dtype "
            "that every machine supports")
    return compute if len({c for _, c in picks}) == 1 else torch.float32


def device_name(device: torch.device) -> str:
    """The GPU's name, or what decides the CPU's speed: its instruction set and whether it computes in bf16."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {torch.backends.cpu.get_cpu_capability()}, native bf16: {'yes' if cpu_has_native_bf16() else 'no'}"


def available_memory(device: torch.device, meminfo: str = "/proc/meminfo") -> Optional[int]:
    """Bytes this device can still give: the GPU's free memory; on Linux, MemAvailable, which counts the page
    cache the kernel would give back (MemFree does not: it is small right after a checkpoint was downloaded or
    copied, whose pages fill the cache). Elsewhere (macOS), the machine's memory in all, which at least refuses
    a model that could never fit, where a load would swap until the system kills it. None where it can't be
    told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open(meminfo) as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # no sysconf (Windows), or no such name
        return None
