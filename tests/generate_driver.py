"""Generation (greedy by default) as a separate program, for the multi-process tests: prints the tokens as JSON on rank 0,
and with --logits_out saves the logits of a full forward pass over the first prompt there."""

import json
import os
import time
from typing import Optional

import torch

from llama import Llama
from llama.cli import print0, run


def main(ckpt_dir: str, tokenizer_path: str, prompts: list, max_gen_len: int = 8, logits_out: str = "",
         fail_on_rank: int = -1, fail_with: str = "ValueError", slow_on_rank: dict = None,
         dtype: Optional[str] = "float32", cpu_on_rank: dict = None, temperature: float = 0.0,
         seed_on_rank: dict = None, hook_on_rank: int = -1):
    """prompts: a JSON list of strings (fire parses it). fail_on_rank: make that rank's load fail (raise
    fail_with, bad input or a crash), to check that the others stop too instead of waiting for it. slow_on_rank:
    {rank: seconds} that rank's load takes longer. dtype: None to let each rank pick. cpu_on_rank: make
    ranks see a CPU of another kind, {rank: "avx2"} (no native bf16) or {rank: "arm"} (no AVX), as machines of
    different kinds in one run do. temperature > 0 samples, each rank with the seed seed_on_rank gives it
    (default 1), and every rank prints its tokens. hook_on_rank: that rank alone puts a forward hook (which
    reads, changing nothing) on the first block, as research code recording activations on one rank does."""
    rank = int(os.environ.get("RANK", 0))
    kind = (cpu_on_rank or {}).get(rank)
    if kind == "avx2":
        import llama.machine
        llama.machine.cpu_has_native_bf16 = lambda: False
    elif kind == "arm":
        torch.backends.cpu.get_cpu_capability = lambda: "DEFAULT"
    import llama.checkpoint
    from llama import distributed
    original = llama.checkpoint.Checkpoint.load_rank

    def load_rank(*args, **kwargs):
        time.sleep((slow_on_rank or {}).get(distributed.rank(), 0))
        if distributed.rank() == fail_on_rank:
            raise {"ValueError": ValueError, "RuntimeError": RuntimeError}[fail_with](
                f"injected failure on rank {fail_on_rank}")
        return original(*args, **kwargs)
    llama.checkpoint.Checkpoint.load_rank = load_rank
    g = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=64, max_batch_size=4, device="cpu", dtype=dtype,
                    seed=(seed_on_rank or {}).get(rank, 1))
    if rank == hook_on_rank:
        g.model.layers[0].register_forward_hook(lambda module, args, out: None)
    prompt_tokens = [g.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    if logits_out:
        logits = g.model.forward(torch.tensor(prompt_tokens[:1]), 0)[0]
        if torch.distributed.get_rank() == 0:
            torch.save(logits, logits_out)
    tokens, _ = g.generate(prompt_tokens, max_gen_len, temperature=temperature)
    if temperature:
        print(f"RANK {rank} TOKENS " + json.dumps(tokens), flush=True)
    print0("TOKENS " + json.dumps(tokens))


if __name__ == "__main__":
    run(main)
