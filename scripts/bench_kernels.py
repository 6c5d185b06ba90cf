"""Where decoding a batch and decoding over a long cache spend their time on a CPU, kernel by kernel.

    python scripts/bench_kernels.py [--threads 2] [--reps 7]

1. The product decoding a batch of 16 runs most: 16 rows against a packed bf16 weight of the 1b shape's feed-forward
   (2048 x 5632), packed for oneDNN's product and for llama/kernels.c's (which ``Llama.build`` uses where the CPU
   has AVX-512 BF16; on AMX's tile registers where it has those too). Timed with the weight in the cache (compute
   alone) and streamed from memory (24 weights in turn, as the layers come), beside the time to read the weight's
   bytes at the bandwidth measured next to it. A kernel that overlaps reading and computing takes the larger of
   the two when streaming; one that doesn't, their sum.
2. Decoding attention for one layer of the 1b shape: 8 grouped queries per KV head (4 KV heads, head_dim 64)
   against 128 and 4096 cached positions in bf16, with 22 layers' caches in turn so they come from memory: the
   time and the rate it reads the cache at, of torch's scaled_dot_product_attention and of llama/kernels.c's
   kernel (which the engine uses where it can be built). The queries in the dtype the engine computes in on
   this CPU: bf16, or float32 where it has no native bf16 (torch's way then widens the cache first).
   Then a prompt's attention for one layer (4096 and 1000 tokens, causal, float32 queries, the keys and values
   from a bf16 cache), as torch computes it and as llama/kernels.c's prefill_attention does (which the engine
   uses where the CPU computes in float32), in GFLOP/s.
3. The products where the CPU has no native bf16 (float32 activations, bf16 weights): 1, 2, 4, 8, 16 and 128
   rows against 24 bf16 weights of 2048 x 5632 in turn, as torch computes them (below 8 rows, rows rounded to
   bf16 and a bf16 product; from 8, a float32 product of the weight converted a block at a time), as
   llama/kernels.c's linear_bf16 does on the weights as stored (up to 16 rows), and as its linear_packed_f32
   does on weights packed for it (which ``Llama.build`` uses there). On a CPU with native bf16 torch's side is
   native too, and the engine uses neither kernel.
4. Top-p sampling of one step (temperature 0.6, top_p 0.9) for 1 and 16 rows over Llama 2's and Llama 3's
   vocabularies, of logits as peaked as a trained model's: as the engine samples (the nucleus found among the
   most likely few hundred) and sorting the whole vocabulary, as Meta's does.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import read_rate, timed  # noqa: E402

from llama import kernels, sampling  # noqa: E402
from llama.cli import one_line_errors, positive_int  # noqa: E402
from llama.linear import PACK_ROWS, can_pack, packed_product, torch_linear  # noqa: E402
from llama.machine import compute_dtype_for  # noqa: E402

LAYERS, KV_HEADS, GROUP, HEAD_DIM, POSITIONS = 22, 4, 8, 64, 4096
CPU = torch.device("cpu")


def products(reps: int, probe: torch.Tensor) -> None:
    if not can_pack():
        print("products: bf16 weights can't be packed on this CPU; skipped")
        return
    rows, k, n = 16, 2048, 5632
    weights = [torch.randn(n, k).bfloat16() for _ in range(24)]
    x = torch.randn(rows, k).bfloat16()
    ways = {"oneDNN": [torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS) for w in weights]}
    if kernels.packs_bf16():
        ways["kernels.c"] = [kernels.pack_bf16(w) for w in weights]
    del weights
    read = k * n * 2 / read_rate(probe, CPU, reps)
    flops = 2 * rows * k * n
    amx = " (kernels.c's on AMX tiles)" if kernels.uses_amx() else ""
    print(f"products, {rows} rows x packed bf16 {n}x{k}{amx}:")
    print(f"  read its bytes        {read * 1e6:7.0f} us  (at the bandwidth measured now)")
    for name, packed in ways.items():
        cached = timed(lambda p=packed: packed_product(x, p[0]), CPU, reps * 4)
        streamed = timed(lambda p=packed: [packed_product(x, w) for w in p], CPU, reps) / len(packed)
        print(f"  {name:9} in cache  {cached * 1e6:7.0f} us  ({flops / cached / 1e9:.0f} GFLOP/s), streamed "
              f"{streamed * 1e6:.0f} us (larger of the two {max(cached, read) * 1e6:.0f}, "
              f"sum {(cached + read) * 1e6:.0f})")


def attention(reps: int) -> None:
    shape = (1, KV_HEADS, POSITIONS + 64, HEAD_DIM)
    caches = [(torch.randn(shape).bfloat16(), torch.randn(shape).bfloat16()) for _ in range(LAYERS)]
    q = torch.randn(1, KV_HEADS, GROUP, HEAD_DIM).to(compute_dtype_for(torch.bfloat16, CPU))
    print(f"decoding attention, one layer, {KV_HEADS} KV heads x {GROUP} queries, bf16 cache, "
          f"{str(q.dtype).removeprefix('torch.')} queries:")
    ways = {"torch": lambda q, k, v: F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))}
    if kernels.library():
        ways["kernels.c"] = lambda q, k, v: kernels.decode_attention(q, k, v, None)
    for n in (128, POSITIONS):
        for name, attend in ways.items():
            t = timed(lambda n=n, f=attend: [f(q, k[:, :, :n], v[:, :, :n]) for k, v in caches], CPU, reps) / LAYERS
            nbytes = 2 * KV_HEADS * n * HEAD_DIM * 2
            print(f"  {n:5} positions, {name:9} {t * 1e6:7.0f} us  (reads the cache at {nbytes / t / 1e9:.1f} GB/s)")


def prefill_attention(reps: int) -> None:
    print(f"prefill attention, one layer, {KV_HEADS} KV heads x {GROUP} queries, bf16 cache, float32 queries:")
    for tokens in (1000, POSITIONS):
        g = torch.Generator().manual_seed(tokens)
        q = torch.randn(1, tokens, KV_HEADS * GROUP, HEAD_DIM, generator=g).transpose(1, 2)
        keys, values = (torch.randn(1, KV_HEADS, tokens, HEAD_DIM, generator=g).bfloat16() for _ in range(2))
        ways = {"torch": lambda q, k, v: F.scaled_dot_product_attention(q, k.float(), v.float(), is_causal=True,
                                                                        enable_gqa=True)}
        if kernels.library():
            ways["kernels.c"] = kernels.prefill_attention
        flops = 4 * KV_HEADS * GROUP * HEAD_DIM * tokens * (tokens + 1) / 2  # the causal half's products
        for name, attend in ways.items():
            t = timed(lambda f=attend, q=q, k=keys, v=values: f(q, k, v), CPU, reps)
            print(f"  {tokens:5} tokens, {name:9} {t * 1e3:7.1f} ms  ({flops / t / 1e9:.0f} GFLOP/s)")


def float32_rows(reps: int) -> None:
    """torch's ways, linear_bf16 on the weights as stored (up to 16 rows), and linear_packed_f32 on packed ones."""
    k, n = 2048, 5632
    weights = [torch.randn(n, k).bfloat16() for _ in range(24)]
    print(f"products of float32 rows and bf16 weights, {n}x{k}, 24 in turn:")
    ways = {"torch": (torch_linear, weights)}
    if kernels.library():
        ways["linear_bf16"] = (kernels.linear_bf16, weights)
        ways["packed"] = (kernels.linear_packed_f32, [kernels.pack_f32(w) for w in weights])
    for rows in (1, 2, 4, 8, 16, 128):
        x = torch.randn(rows, k)
        for name, (product, ws) in ways.items():
            if name == "linear_bf16" and rows not in kernels.LINEAR_ROWS:
                continue
            t = timed(lambda f=product, x=x, ws=ws: [f(x, w) for w in ws], CPU, reps) / len(ws)
            print(f"  {rows:3} rows, {name:11} {t * 1e6:7.0f} us  (weight read at {n * k * 2 / t / 1e9:5.1f} GB/s, "
                  f"{2 * rows * n * k / t / 1e9:5.1f} GFLOP/s)")


def sample_steps(reps: int) -> None:
    print("top-p sampling, one step (temperature 0.6, top_p 0.9), logits as peaked as a trained model's:")
    g = torch.Generator().manual_seed(0)
    candidates = sampling.NUCLEUS_CANDIDATES
    for vocab in (32000, 128256):
        for rows in (1, 16):
            logits = torch.randn(rows, vocab, generator=g) * 5
            times = {}
            for way, k in (("engine's", candidates), ("sort all", vocab)):
                sampling.NUCLEUS_CANDIDATES = k
                times[way] = timed(lambda x=logits: sampling.sample(x, 0.6, 0.9, g), CPU, reps)
            sampling.NUCLEUS_CANDIDATES = candidates
            print(f"  {rows:2} rows x {vocab:6} tokens: " + ", ".join(f"{way} {t * 1e3:6.2f} ms"
                                                                  for way, t in times.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--reps", type=positive_int, default=7)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    probe = torch.ones(128 << 20)  # 512 MiB
    print(f"CPU {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
          f"read bandwidth {read_rate(probe, CPU, args.reps) / 1e9:.1f} GB/s")
    products(args.reps, probe)
    attention(args.reps)
    prefill_attention(args.reps)
    float32_rows(args.reps)
    sample_steps(args.reps)


if __name__ == "__main__":
    with one_line_errors():
        main()
