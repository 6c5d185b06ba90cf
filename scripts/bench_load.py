"""How fast and how lean loading is, against what the disk and the checkpoint itself allow.

    python scripts/bench_load.py [--shape 1b] [--nproc 1,2] [--dtype bfloat16] [--no-pack] [--cache_dir checkpoints]

Makes (once, then reuses) a random checkpoint of the named shape in Meta's format, then in one run measures:
the time to simply read its bytes from disk (the ceiling), and for each process count, the time
``Llama.build`` takes, the first forward pass after it (so lazily read weights can't hide there), and each
rank's peak resident memory (getrusage) as a multiple of the checkpoint and of the rank's share of it.
Loading includes packing the weights for their products (kernels.c's, else oneDNN's) where Llama.build does it
by default (see its pack_weights); --no-pack measures loading without it.
"""

import argparse
import contextlib
import json
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from make_checkpoint import SHAPES, cached  # noqa: E402

from llama import distributed  # noqa: E402
from llama.cli import one_line_errors  # noqa: E402


def evict(ckpt: Path) -> None:
    """Drop the shards from the page cache, so the next read comes from the disk."""
    for path in ckpt.glob("*.pth"):
        with open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def read_time(ckpt: Path) -> float:
    """Seconds to read every shard's bytes into memory, in 16 MiB blocks: what loading can't beat."""
    buf = bytearray(16 << 20)
    start = time.perf_counter()
    for path in sorted(ckpt.glob("*.pth")):
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - start


def worker(ckpt: str, dtype: str, no_pack: bool) -> None:
    """One rank: build, one forward, report."""
    import torch
    from llama import Llama
    start = time.perf_counter()
    g = Llama.build(ckpt, str(Path(ckpt) / "tokenizer.model"), max_seq_len=256, max_batch_size=1, device="cpu",
                    dtype=dtype, pack_weights=False if no_pack else None)
    load = time.perf_counter() - start
    start = time.perf_counter()
    g.model.forward(torch.tensor([[1] * 8]), 0)
    first = time.perf_counter() - start
    weights = sum(p.numel() * p.element_size() for p in g.model.parameters())
    print("BENCH " + json.dumps({"rank": torch.distributed.get_rank(), "load_s": load, "first_forward_s": first,
                                 "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                                 "weights": weights, "packed": g.model.packed_weights()}), flush=True)
    # Leave together, the group shut down: a rank exiting with gloo's threads alive may abort.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def run(nproc: int, ckpt: Path, dtype: str, no_pack: bool) -> list:
    """Each rank's figures, the ranks started as a launcher starts them (its environment variables), not under
    torchrun, whose agent process would import torch beside them: seconds that are no part of loading."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--ckpt", str(ckpt), "--dtype", dtype] + \
        (["--no-pack"] if no_pack else [])
    with socket.socket() as s:  # a free port for rank 0's store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in distributed.LAUNCHER_VARS}
    records = []
    with contextlib.ExitStack() as stack:  # output to files: a rank's full pipe can't stall it while we wait
        files = [[stack.enter_context(tempfile.TemporaryFile("w+")) for _ in range(2)] for _ in range(nproc)]
        ranks = [subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env={
            **env, **({} if nproc == 1 else distributed.launcher_env(r, nproc, port))})
            for r, (out, err) in enumerate(files)]
        for r, (p, (out, err)) in enumerate(zip(ranks, files)):
            if p.wait():
                for other in ranks:
                    other.kill()
                err.seek(0)
                sys.exit(f"error: the load run with {nproc} process(es) failed on rank {r}:\n{err.read()[-3000:]}")
            out.seek(0)
            records += [json.loads(m) for m in re.findall(r"BENCH (\{[^{}]*\})", out.read())]
    return sorted(records, key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b", help="see scripts/make_checkpoint.py")
    parser.add_argument("--ckpt_dir", help="a checkpoint of your own (with its tokenizer.model) instead")
    parser.add_argument("--nproc", default="1,2", help="comma-separated process counts to load on")
    parser.add_argument("--dtype", default="bfloat16", help="dtype to load into (default: bfloat16)")
    parser.add_argument("--no-pack", action="store_true", help="Llama.build(pack_weights=False)")
    parser.add_argument("--cache_dir", default=str(ROOT / "checkpoints"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.ckpt, args.dtype, args.no_pack)
    ckpt = Path(args.ckpt_dir) if args.ckpt_dir else cached(Path(args.cache_dir), args.shape)
    size = sum(p.stat().st_size for p in ckpt.glob("*.pth"))
    print(f"checkpoint {ckpt}: {size / 1e9:.2f} GB in {len(list(ckpt.glob('*.pth')))} shard(s), loading as "
          f"{args.dtype}\n")
    print(f"{'cache':>5} {'procs':>5} {'rank':>4} {'load s':>7} {'read s':>7} {'x read':>7} {'1st fwd s':>9} "
          f"{'peak RSS GB':>11} {'x ckpt':>7} {'share GB':>8} {'target GB':>9} {'packed':>6}")
    for cold in (True, False):  # from the disk (page cache emptied first), then from the page cache
        if cold:
            evict(ckpt)
        raw = read_time(ckpt)  # warms the page cache for the warm runs
        for n in (int(x) for x in args.nproc.split(",")):
            if cold:
                evict(ckpt)
            for r in run(n, ckpt, args.dtype, args.no_pack):
                share = r["weights"]  # this rank's weights as loaded
                target = 1.2 * share + (0.5e9 if n > 1 else 0)
                print(f"{'disk' if cold else 'warm':>5} {n:>5} {r['rank']:>4} {r['load_s']:>7.2f} {raw:>7.2f} "
                      f"{r['load_s'] / raw:>7.2f} {r['first_forward_s']:>9.2f} {r['peak_rss'] / 1e9:>11.2f} "
                      f"{r['peak_rss'] / size:>7.2f} {share / 1e9:>8.2f} {target / 1e9:>9.2f} {r['packed']:>6}")
    print("\ntargets: load <= 1.5 x read; peak RSS <= 1.2 x the checkpoint on 1 process, "
          "<= 1.2 x the rank's share + 0.5 GB on several")


if __name__ == "__main__":
    with one_line_errors():
        main()
