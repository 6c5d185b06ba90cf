"""Greedy generation as a separate program, for the multi-process tests: prints the tokens as JSON on rank 0."""

import json
from llama import Llama
from llama.cli import print0, run


def main(ckpt_dir: str, tokenizer_path: str, prompts: list, max_gen_len: int = 8):
    """prompts: a JSON list of strings (fire parses it)."""
    g = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=64, max_batch_size=4, device="cpu", dtype="float32")
    prompt_tokens = [g.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    tokens, _ = g.generate(prompt_tokens, max_gen_len, temperature=0)
    print0("TOKENS " + json.dumps(tokens))


if __name__ == "__main__":
    run(main)
