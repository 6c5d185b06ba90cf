"""The engine's speed against the machine's own ceilings, measured in one run.

    python scripts/benchmark.py [--shape tiny|1b|7b | --ckpt_dir DIR] [--threads N] [--reps 3]
        [--token-by-token] [--vs-hf] [--no-pack] [--no-kernels] [--no-graphs] [--compile] [--json FILE]
        [--device cpu|cuda] [--dtype bfloat16|...] [--cache_dir checkpoints]

Ceilings: memory read bandwidth (a large reduction) and matrix throughput (the better of two large square
matmuls in the fastest dtype the machine has), at the start and again in turns with each figure. Engine: load
time; prefill tokens/s (128-token prompt, batch 1 and 4); decode tokens/s (batch 1, 4, 16); decode step time
with 128, 1024 and 4096 tokens in the cache; a mixed-length batch (prompts of 16, 64, 256 and 1000 tokens,
64 new tokens each) end to end; peak RSS. Each figure is the median of --reps runs after a warm-up, and is
also given as a fraction of its roofline, max(bytes read / bandwidth, FLOPs / matmul rate), from the ceilings
timed in turns with it: decode, (bytes of weights and KV cache read per step / bandwidth, or 2 x parameters x
rows / matmul rate where that is more) / step time; prefill, (2 x parameters x tokens / matmul rate) / time.
--token-by-token also times the mixed batch fed one token at a time from the shortest prompt (the reference's
way), halfway through the mixed batch's runs; --vs-hf runs Hugging Face transformers' LlamaForCausalLM on the
same weights (after checking that its greedy tokens equal ours in float32) and gives our speed as a ratio to its,
each pair of figures timed in turns.
"""

import argparse
import functools
import importlib.util
import inspect
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Hashable, Optional, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from make_checkpoint import SHAPES, cached  # noqa: E402

from llama import Llama, Tokenizer, kernels  # noqa: E402
from llama.checkpoint import read_params  # noqa: E402
from llama.cli import one_line_errors, positive_int  # noqa: E402
from llama.distributed import pick_device  # noqa: E402
from llama.linear import packed_for  # noqa: E402
from llama.machine import compute_dtype_for, device_name  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable, device: torch.device) -> float:
    """Seconds of one call of fn, the device's queued work waited for before and after it."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def timed(fn: Callable, device: torch.device, reps: int) -> float:
    """Median seconds of reps calls, after one warm-up call."""
    return timed_in_turns({0: fn}, device, reps)[0]


def timed_in_turns(fns: Dict[Hashable, Callable], device: torch.device, reps: int) -> Dict[Hashable, float]:
    """Median seconds of reps calls of each function, called in turns (after a warm-up call of each): a
    drift of the machine's speed during the run (a shared host) then affects all alike and their ratios hold."""
    times: Dict[Hashable, list] = {key: [] for key in fns}
    for rep in range(reps + 1):
        for key, fn in fns.items():
            t = seconds(fn, device)
            if rep:
                times[key].append(t)
    return {key: statistics.median(t) for key, t in times.items()}


def read_rate(x: torch.Tensor, device: torch.device, reps: int) -> float:
    """Bytes/s of a reduction over x (the read bandwidth, for an x far larger than any cache)."""
    return x.nbytes / timed(x.sum, device, reps)


class Ceilings:
    """The machine's read bandwidth (bytes/s of a reduction over a tensor far larger than any cache) and matrix
    throughput (FLOP/s of a square matmul in the fastest dtype and size it has), timed again in turns with each
    figure: on a shared host both drift with the other tenants' load (the bandwidth by up to 2x within minutes), and a
    figure is compared with what the machine could do at the time. The probe tensors stay allocated through
    the run; ``nbytes`` is taken off the peak RSS."""

    def __init__(self, device: torch.device, reps: int, small: bool = False):
        """small: matrices of at most 512² for a trial run (the tiny shape), whose fractions say little: the
        large ones, timed again with every figure, took 35 of its 50 s on a 2-core AVX2 machine."""
        self.device, self.reps, self.small = device, reps, small
        self.x = torch.ones((512 if device.type == "cpu" else 4096) << 18, device=device)  # 512 MiB / 4 GiB fp32
        best = {str(d).removeprefix("torch."): self._fastest(d) for d in (torch.float32, torch.bfloat16,
                                                                           torch.float16)}
        self.rates = {k: rate for k, (rate, _) in best.items()}
        self.dtype = max(self.rates, key=self.rates.get)
        self.a = best[self.dtype][1]
        self.product = torch.empty_like(self.a)  # a @ a's, kept: a new one each time would land in the peak or not
        self.nbytes = self.x.nbytes + self.a.nbytes + self.product.nbytes

    def _fastest(self, dtype: torch.dtype) -> Tuple[float, torch.Tensor]:
        """The best rate over square sizes, and the matrix that gave it: which size runs fastest depends on the
        machine (here 2048² ran 10-15 % faster than 4096²). Smaller sizes where the CPU only emulates the
        dtype (it is slow), larger ones on a GPU (it needs them to be busy)."""
        emulated = compute_dtype_for(dtype, self.device) != dtype  # the engine computes in float32 there
        sizes = ((256, 512) if self.small else (512, 1024) if emulated else (2048, 4096) if self.device.type == "cpu"
                 else (4096, 8192))
        matrices = [torch.randn(n, n, device=self.device).to(dtype) for n in sizes]
        return max(((self._rate(a), a) for a in matrices), key=lambda r: r[0])

    def _rate(self, a: torch.Tensor) -> float:
        """FLOP/s of a @ a."""
        return 2 * a.shape[0] ** 3 / timed(lambda: a @ a, self.device, self.reps)

    def in_turns_with(self, fns: Dict[int, Callable], reps: int) -> Tuple[Dict[int, float], float, float]:
        """Median seconds of each of fns, and the bandwidth and matmul rate, all timed in turns: a drift of the
        host's speed during the measurement then moves figure and ceilings alike. (Measured after the figure,
        the ceilings could catch the host at another speed: on (c) a prompt ran at 698 GFLOP/s, and the probe
        after it at 996.)"""
        t = timed_in_turns({**fns, "read": self.x.sum, "matmul": lambda: torch.mm(self.a, self.a, out=self.product)},
                           self.device, reps)
        return ({k: v for k, v in t.items() if k in fns}, self.x.nbytes / t["read"],
                2 * self.a.shape[0] ** 3 / t["matmul"])


def decode_steps(g: Llama, batch: int, cached: Tuple[int, ...]) -> Dict[int, Callable]:
    """One decode step of `batch` rows with each count of positions cached before it. Attention reads the cache
    whatever it holds, so it is not filled first."""
    tokens = torch.ones(batch, 1, dtype=torch.long, device=g.device)
    return {n: lambda n=n: g.decode_step(tokens, n) for n in cached}


def prefill(g: Llama, batch: int, length: int) -> Callable:
    tokens = torch.randint(3, g.model.params.vocab_size, (batch, length), device=g.device)
    return lambda: g.model.forward(tokens, 0, last_only=True)


MIXED = (16, 64, 256, 1000)


def mixed_prompts(g: Llama) -> list:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, g.model.params.vocab_size, (n,), generator=gen).tolist() for n in MIXED]


def mixed_batch(g: Llama, reps: int, token_by_token: bool = False) -> Tuple[float, Optional[float]]:
    """Median seconds of reps generations of the mixed batch after a warm-up, and with token_by_token the seconds
    of the reference's way, timed halfway through them: a drift of the host's speed over the minutes between
    then moves both alike, and their ratio (a target) holds."""
    prompts = mixed_prompts(g)
    run = functools.partial(g.generate, prompts, 64, temperature=0)
    run()
    times, t_ref = [], None
    for rep in range(reps):
        if token_by_token and rep == reps // 2:
            t_ref = mixed_token_by_token(g)
        times.append(seconds(run, g.device))
    return statistics.median(times), t_ref


def mixed_token_by_token(g: Llama) -> float:
    """The reference's way: all rows step together, one token at a time from the shortest prompt's end."""
    prompts = mixed_prompts(g)
    total = max(MIXED) + 64
    tokens = torch.zeros(len(MIXED), total, dtype=torch.long, device=g.device)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p)
    known = torch.arange(total, device=g.device)[None, :] < torch.tensor(MIXED, device=g.device)[:, None]
    start = time.perf_counter()
    logits = g.model.forward(tokens[:, :min(MIXED)], 0, last_only=True)
    for pos in range(min(MIXED), total):
        tokens[:, pos] = torch.where(known[:, pos], tokens[:, pos], logits[:, -1].argmax(-1))
        if pos + 1 < total:
            logits = g.decode_step(tokens[:, pos:pos + 1], pos)
    sync(g.device)
    return time.perf_counter() - start


def hf_from(g: Llama, dtype: torch.dtype):
    """Hugging Face's LlamaForCausalLM holding the same weights (one process). HF rotates each head's two
    halves where Meta rotates interleaved pairs, so wq and wk rows are reordered to match, as HF's own
    conversion does; everything else is renamed only."""
    from transformers import LlamaConfig, LlamaForCausalLM
    p = g.model.params
    cfg = LlamaConfig(vocab_size=p.vocab_size, hidden_size=p.dim, intermediate_size=p.hidden_dim,
                      num_hidden_layers=p.n_layers, num_attention_heads=p.n_heads, num_key_value_heads=p.kv_heads,
                      rms_norm_eps=p.norm_eps, max_position_embeddings=p.max_seq_len, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": p.rope_theta})

    def halves(w: torch.Tensor, heads: int) -> torch.Tensor:
        return w.view(heads, p.head_dim // 2, 2, p.dim).transpose(1, 2).reshape(w.shape)

    ours = g.model.state_dict()
    state = {"model.embed_tokens.weight": ours["tok_embeddings.weight"], "model.norm.weight": ours["norm.weight"],
             "lm_head.weight": ours["output.weight"]}
    for i in range(p.n_layers):
        o, h = f"layers.{i}.", f"model.layers.{i}."
        state.update({
            h + "self_attn.q_proj.weight": halves(ours[o + "attention.wq.weight"], p.n_heads),
            h + "self_attn.k_proj.weight": halves(ours[o + "attention.wk.weight"], p.kv_heads),
            h + "self_attn.v_proj.weight": ours[o + "attention.wv.weight"],
            h + "self_attn.o_proj.weight": ours[o + "attention.wo.weight"],
            h + "mlp.gate_proj.weight": ours[o + "feed_forward.w1.weight"],
            h + "mlp.up_proj.weight": ours[o + "feed_forward.w3.weight"],
            h + "mlp.down_proj.weight": ours[o + "feed_forward.w2.weight"],
            h + "input_layernorm.weight": ours[o + "attention_norm.weight"],
            h + "post_attention_layernorm.weight": ours[o + "ffn_norm.weight"],
        })
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    with torch.device("meta"):  # no random initialisation of weights about to be replaced
        model = LlamaForCausalLM(cfg)
    model.load_state_dict({k: v.to(dtype).contiguous() for k, v in state.items()}, strict=True, assign=True)
    model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)  # its buffers, which the state dict lacks
    return model.eval()


def versus_hf(g: Llama, reps: int) -> Tuple[str, Dict[str, Tuple[float, float]]]:
    """Seconds of ours and HF's decode step (batch 1, 128 cached), 128-token prefill and mixed batch, each pair
    timed in turns: measured one after the other, a drift of a shared host's speed in between passed for a
    difference of the engines (HF's prefill 0.86 x ours in one run, 0.96-0.98 x in the runs before). HF runs in
    float32 (its default on a CPU, and the fastest it has on one without native bf16), or bf16 on a GPU.
    Returns HF's dtype and, per figure, (ours, theirs)."""
    dtype = torch.bfloat16 if g.device.type == "cuda" else torch.float32
    hf = hf_from(g, dtype).to(g.device)
    from transformers import DynamicCache
    vocab = g.model.params.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (1, 128), generator=gen).to(g.device)
    one = prompt[:, -1:]
    prompts = mixed_prompts(g)
    ids = torch.zeros(len(MIXED), max(MIXED), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left-padded, as HF generates a batch
        ids[i, -len(p):], mask[i, -len(p):] = torch.tensor(p), 1
    ids, mask = ids.to(g.device), mask.to(g.device)
    # transformers 5.24 renamed past_key_values to cache
    cache = {"cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values": DynamicCache()}
    with torch.inference_mode():
        hf(prompt, use_cache=True, **cache)  # 128 positions cached, as ours has at decode_step(one, 128)
        pairs = {
            "prefill 128 tokens, batch 1": (lambda: g.model.forward(prompt, 0, last_only=True),
                                            lambda: hf(prompt, logits_to_keep=1), reps),
            "decode batch 1 (128 cached)": (lambda: g.decode_step(one, 128),
                                            lambda: hf(one, use_cache=True, **cache), reps),
            "mixed batch 16/64/256/1000 +64": (
                lambda: g.generate(prompts, 64, temperature=0),
                lambda: hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64, min_new_tokens=64,
                                    do_sample=False, pad_token_id=0), max(1, reps // 2)),
        }
        times = {name: tuple(timed_in_turns({0: ours, 1: theirs}, g.device, n).values())
                 for name, (ours, theirs, n) in pairs.items()}
    return str(dtype).removeprefix("torch."), times


def same_greedy_tokens(ckpt: Path, device) -> None:
    """Both engines compute the same function: equal greedy tokens from the same weights, in float32."""
    g32 = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=64, max_batch_size=1, device=device,
                      dtype="float32")
    hf = hf_from(g32, torch.float32).to(g32.device)
    prompt = torch.randint(3, g32.model.params.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    ours = g32.generate([prompt[0].tolist()], 8, temperature=0)[0][0]
    with torch.inference_mode():
        theirs = hf.generate(input_ids=prompt.to(g32.device), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                             pad_token_id=0)[0, 16:].tolist()
    if ours[:len(theirs)] != theirs[:len(ours)]:
        sys.exit(f"error: greedy tokens differ in float32: ours {ours}, Hugging Face's {theirs}")
    print(f"float32 greedy tokens equal Hugging Face's: {ours}")


def parse_args() -> argparse.Namespace:
    """The flags, with what can be found wrong in them said before minutes of measuring."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b", help="see scripts/make_checkpoint.py")
    parser.add_argument("--ckpt_dir", help="a checkpoint of your own, with its tokenizer.model in it")
    parser.add_argument("--cache_dir", default=str(ROOT / "checkpoints"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="default: what the engine picks for the machine")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--no-pack", action="store_true", help="Llama.build(pack_weights=False)")
    parser.add_argument("--no-graphs", action="store_true", help="Llama.build(cuda_graphs=False)")
    parser.add_argument("--no-kernels", action="store_true", help="torch's operations where llama/kernels.c's "
                        "would run (LLAMA_KERNELS=0)")
    parser.add_argument("--compile", action="store_true", help="Llama.build(compile_elementwise=True)")
    parser.add_argument("--reps", type=positive_int, default=3)
    parser.add_argument("--token-by-token", action="store_true", help="also time the reference's way")
    parser.add_argument("--vs-hf", action="store_true", help="also run Hugging Face transformers")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    if args.json and (Path(args.json).is_dir() or not os.access(Path(args.json).resolve().parent, os.W_OK)):
        raise ValueError(f"--json {args.json}: can't write that file (a folder, or in no folder that is writable): "
                         "name a file in one, before the run rather than after it")
    if args.vs_hf and importlib.util.find_spec("transformers") is None:
        raise ValueError("--vs-hf runs Hugging Face transformers, which is not installed here: pip install "
                         "transformers")
    if args.ckpt_dir:  # a mistyped path fails now, not after the ceilings' seconds of probes
        Tokenizer(str(Path(args.ckpt_dir) / "tokenizer.model"))
        read_params(args.ckpt_dir)
    return args


def measure(g: Llama, ceil: Ceilings, args: argparse.Namespace, ckpt: Path, n_params: int,
            weight_bytes: int) -> list:
    """The table's rows after load: (name, value, unit, fraction of roofline or None, the ceilings timed in
    turns with it)."""
    kv_per_pos = g.model.params.cache_bytes(1, g.model.cache_dtype)
    rows = []

    def against(name: str, seconds: float, value: float, unit: str, nbytes: float, flops: float, bw: float,
                rate: float) -> None:
        """A row for a figure, as a fraction of its roofline: max(bytes read / bandwidth, FLOPs / matmul rate),
        with the ceilings timed in turns with it."""
        rows.append((name, value, unit, max(nbytes / bw, flops / rate) / seconds,
                     f"{bw / 1e9:.1f} GB/s, {rate / 1e9:.0f} GFLOP/s"))

    for b in (1, 4):
        times, bw, rate = ceil.in_turns_with({0: prefill(g, b, 128)}, args.reps)
        against(f"prefill 128 tokens, batch {b}", times[0], b * 128 / times[0], "tok/s", 0, 2 * n_params * b * 128,
                bw, rate)
    for b in (1, 4, 16):
        times, bw, rate = ceil.in_turns_with(decode_steps(g, b, (128,)), args.reps)
        against(f"decode batch {b} (128 cached)", times[128], b / times[128], "tok/s",
                weight_bytes + b * 128 * kv_per_pos, 2 * n_params * b, bw, rate)
    # The three cache lengths in turns too: their ratio is a target.
    steps, bw, rate = ceil.in_turns_with(decode_steps(g, 1, (128, 1024, 4096)), max(5, args.reps))
    for n, t in steps.items():
        against(f"decode step, {n} cached", t, t * 1e3, "ms", weight_bytes + n * kv_per_pos, 0, bw, rate)
    t, t_ref = mixed_batch(g, max(2 if args.token_by_token else 1, args.reps // 2), args.token_by_token)
    rows.append(("mixed batch 16/64/256/1000 +64", t, "s", None, ""))
    if t_ref is not None:
        rows.append(("  same, token by token", t_ref, "s", None, ""))
        rows.append(("  speed-up", t_ref / t, "x", None, ""))
    # On a GPU, the weights and cache live in its memory: its peak is the figure that matters there.
    memory = "peak GPU memory" if g.device.type == "cuda" else "peak RSS"
    peak = torch.cuda.max_memory_allocated(g.device) if g.device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    used = peak - ceil.nbytes
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.pth"))
    kv_bytes = sum(t.numel() * t.element_size() for layer in g.model.layers
                   for t in (layer.attention.cache_k, layer.attention.cache_v))
    rows.append((f"{memory} / checkpoint", used / ckpt_bytes, "x", None, ""))
    # The KV cache (16 rows x 4160 positions here) is the other large allocation, sized by the caller.
    rows.append(("  same, less the KV cache", (used - kv_bytes) / ckpt_bytes, "x", None, ""))
    rows.append(("decode 4096 / 128 cached", steps[4096] / steps[128], "x", None, ""))
    return rows


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_kernels:
        os.environ["LLAMA_KERNELS"] = "0"
    device = pick_device(args.device)
    ckpt = Path(args.ckpt_dir) if args.ckpt_dir else cached(Path(args.cache_dir), args.shape, str(device))
    ceil = Ceilings(device, args.reps, small=args.shape == "tiny" and not args.ckpt_dir)
    start = time.perf_counter()
    g = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=4160, max_batch_size=16,
                    device=device, dtype=args.dtype, pack_weights=False if args.no_pack else None,
                    cuda_graphs=False if args.no_graphs else None, compile_elementwise=args.compile)
    load_s = time.perf_counter() - start
    packed, machine = g.model.packed_weights() > 0, device_name(device)
    n_params = sum(t.numel() for t in g.model.parameters())
    weight_bytes = sum(t.numel() * t.element_size() for t in g.model.parameters())
    print(f"machine: {machine}, {torch.get_num_threads()} threads; weights {g.model.output.weight.dtype}"
          f"{f' (packed for {packed_for(g.model.compute_dtype)})' if packed else ''}, compute {g.model.compute_dtype}"
          f", KV cache {g.model.cache_dtype}"
          f"{', decoding from CUDA graphs' if g.decoder else ''}"
          f"{', C kernels of llama/kernels.c' if device.type == 'cpu' and kernels.library() else ''}"
          f"{', element-wise kernels compiled' if args.compile else ''}; "
          f"{n_params / 1e6:,.1f} M parameters, {weight_bytes / 1e6:,.1f} MB")
    _, bandwidth, matmul = ceil.in_turns_with({}, args.reps)
    print(f"ceilings at the start: read {bandwidth / 1e9:.1f} GB/s, matmul {matmul / 1e9:.0f} "
          f"GFLOP/s ({ceil.dtype}; " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in ceil.rates.items()) + ")")
    rows = [("load", load_s, "s", None, "")] + measure(g, ceil, args, ckpt, n_params, weight_bytes)

    fig: Dict[str, float] = {}
    print(f"\n{'':36} {'value':>10} {'unit':<6} {'of roofline':>11}   ceilings in turns with it")
    for name, value, unit, frac, ceilings in rows:
        print(f"{name:36} {value:>10.2f} {unit:<6} {'' if frac is None else f'{frac:.0%}':>11}   {ceilings}")
        fig[name] = value
        if frac is not None:
            fig[f"{name} (fraction of roofline)"] = frac
    if args.vs_hf:
        same_greedy_tokens(ckpt, device)
        hf_dtype, pairs = versus_hf(g, args.reps)
        print(f"\nversus Hugging Face transformers LlamaForCausalLM ({hf_dtype}), each pair timed in turns, "
              "our speed / theirs:")
        for name, (ours, theirs) in pairs.items():
            print(f"{name:36} {theirs / ours:>10.2f} x   (ours {ours * 1e3:.1f} ms, HF {theirs * 1e3:.1f} ms)")
            fig[f"vs HF: {name}"] = theirs / ours
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": machine, "packed": packed, "bandwidth": bandwidth, "matmul": matmul,
             "matmul_dtype": ceil.dtype, **{f"matmul_{k}": v for k, v in ceil.rates.items()},
             "ceilings by row": {r[0]: r[4] for r in rows if r[4]}, **fig}, indent=1))


if __name__ == "__main__":
    with one_line_errors():
        main()
