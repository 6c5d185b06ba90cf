"""Where a decoding step spends its time, kernel by kernel: torch.profiler over steps of the engine as
``Llama.build`` makes it, on a GPU (the kernels its CUDA graph replays) or a CPU (torch's operations and
llama/kernels.c's calls, each named). Profile before changing the engine, to know what a change can gain.

    python scripts/profile_step.py [--shape 1b | --ckpt_dir DIR] [--batch 1] [--cached 128] [--steps 10]
        [--prefill] [--compile] [--threads N] [--rows 25]

Prints, per step: the wall time, the time of all kernels (on a GPU the rest is the gaps between them), and the
kernels or operations taking the most time, with their calls per step and share. --prefill profiles a forward
pass of --cached tokens instead (a prompt of that length, from position 0).
"""

import argparse
import functools
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import decode_steps, prefill, sync  # noqa: E402
from make_checkpoint import SHAPES, cached  # noqa: E402

from llama import Llama, kernels  # noqa: E402
from llama.cli import one_line_errors, positive_int  # noqa: E402
from llama.distributed import pick_device  # noqa: E402
from llama.machine import device_name  # noqa: E402

# llama/kernels.c's calls, which the profiler can't see inside: each is recorded under its name.
KERNELS = ("decode_attention", "prefill_attention", "rms_norm", "add_rms_norm", "swiglu", "rope", "linear_bf16",
           "linear_packed_f32", "linear_packed_bf16")


def name_kernels() -> None:
    if kernels.library() is None:  # off, or not built: no call of theirs runs
        return
    for name in KERNELS:
        f = getattr(kernels, name)

        @functools.wraps(f)
        def named(*args, _f=f, _name=f"kernels.{name}", **kwargs):
            with record_function(_name):
                return _f(*args, **kwargs)
        setattr(kernels, name, named)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b", help="see scripts/make_checkpoint.py")
    parser.add_argument("--ckpt_dir", help="a checkpoint of your own, with its tokenizer.model in it")
    parser.add_argument("--cache_dir", default=str(Path(__file__).resolve().parents[1] / "checkpoints"))
    parser.add_argument("--device")
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--cached", type=positive_int, default=128, help="positions in the cache before the step")
    parser.add_argument("--steps", type=positive_int, default=10)
    parser.add_argument("--prefill", action="store_true", help="profile a prompt of --cached tokens instead")
    parser.add_argument("--compile", action="store_true", help="Llama.build(compile_elementwise=True)")
    parser.add_argument("--threads", type=positive_int)
    parser.add_argument("--rows", type=positive_int, default=25)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    ckpt = Path(args.ckpt_dir) if args.ckpt_dir else cached(Path(args.cache_dir), args.shape, str(device))
    g = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=args.cached + 1,
                    max_batch_size=args.batch, device=device, compile_elementwise=args.compile)
    step = prefill(g, args.batch, args.cached) if args.prefill else \
        decode_steps(g, args.batch, (args.cached,))[args.cached]
    name_kernels()
    for _ in range(3):  # warm-up: captures, compiles, first-use allocations
        step()
    sync(device)
    gpu = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(device)
        wall = (time.perf_counter() - start) / args.steps
    events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    own = (lambda e: e.self_device_time_total) if gpu else (lambda e: e.self_cpu_time_total)
    events.sort(key=own, reverse=True)
    total = sum(own(e) for e in events) / args.steps
    what = f"prefill of {args.cached} tokens" if args.prefill else f"decoding step, {args.cached} cached"
    print(f"{what}, batch {args.batch} ({device_name(device)}): "
          f"{wall * 1e3:.3f} ms a step (wall), {total / 1e3:.3f} ms of " + ("kernels" if gpu else "operations"))
    print(f"{'us / step':>10} {'share':>6} {'calls':>6}   name")
    for e in events[:args.rows]:
        print(f"{own(e) / args.steps:>10.1f} {own(e) / args.steps / (wall * 1e6):>6.1%} "
              f"{e.count / args.steps:>6.1f}   {e.key[:100]}")


if __name__ == "__main__":
    with one_line_errors():
        main()
