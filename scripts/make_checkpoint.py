"""Write a random checkpoint in Meta's exact format, for trying the engine and for tests and benchmarks.

    python scripts/make_checkpoint.py --out_dir checkpoints/tiny [--shape tiny|1b|7b] [--mp N]
        [--tokenizer_path FILE] [--seed S]

The folder gets params.json, consolidated.NN.pth (bf16; with rope.freqs for a Llama 1/2 vocabulary, as
Meta's), checklist.chk and tokenizer.model: the one given, or, without --tokenizer_path, a small SentencePiece
model trained here on this project's own source text (random weights speak gibberish anyway; the point is a
complete checkpoint with no download).
"""

import argparse
import io
import shutil
import sys
from pathlib import Path
from typing import Optional

import sentencepiece as spm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llama.checkpoint import random_checkpoint, writing  # noqa: E402
from llama.cli import one_line_errors, output_dir, positive_int  # noqa: E402
from llama.tokenizer import Tokenizer  # noqa: E402

SHAPES = {
    "tiny": {"dim": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4, "multiple_of": 64, "vocab_size": 1000},
    "1b": {"dim": 2048, "n_layers": 22, "n_heads": 32, "n_kv_heads": 4, "multiple_of": 256, "vocab_size": 32000},
    "7b": {"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256, "vocab_size": 32000},
}


def train_tokenizer(path: Path, vocab_size: int) -> None:
    """A byte-fallback BPE tokenizer of exactly vocab_size pieces, trained on the package's and the scripts'
    Python sources (deterministic, a second: not whatever else lies in the tree, a virtual environment's
    thousands of files). Where the text has too few merges, placeholder pieces make up the size."""
    root = Path(__file__).resolve().parents[1]
    lines = [line for f in sorted([*(root / "llama").glob("*.py"), *(root / "scripts").glob("*.py")])
             for line in f.read_text(errors="replace").splitlines() if line.strip()]
    placeholders = 0
    while True:
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, hard_vocab_limit=False, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, num_threads=1,
            minloglevel=2, user_defined_symbols=[f"<placeholder_{i}>" for i in range(placeholders)])
        size = spm.SentencePieceProcessor(model_proto=model.getvalue()).vocab_size()
        if size >= vocab_size:
            break
        placeholders += vocab_size - size
    path.write_bytes(model.getvalue())


def make(out: Path, shape: str, mp: int = 1, tokenizer_path: Optional[str] = None, seed: int = 0,
         device: str = "cpu") -> None:
    """Write a random checkpoint of the named shape, and its tokenizer.model, into the folder out; its random
    numbers drawn on device."""
    tokenizer = out / "tokenizer.model"
    if tokenizer_path:
        Tokenizer(tokenizer_path)  # a missing or unreadable file said as itself, not as the copy
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
        if tokenizer_path:
            shutil.copyfile(tokenizer_path, tokenizer)
        else:
            train_tokenizer(tokenizer, SHAPES[shape]["vocab_size"])
    params = {**SHAPES[shape], "norm_eps": 1e-5, "vocab_size": -1}  # -1, as Meta writes it: the tokenizer says
    random_checkpoint(str(out), params, mp=mp, seed=seed, vocab_size=Tokenizer(str(tokenizer)).n_words,
                      device=device)


def cached(cache_dir: Path, shape: str, device: str = "cpu") -> Path:
    """A random checkpoint of the named shape for benchmarks, written once (its numbers drawn on device: a GPU
    draws them at once where a CPU takes half a minute for the 7b shape) and reused after."""
    ckpt = cache_dir / f"bench-{shape}"
    if not (ckpt / "checklist.chk").is_file():  # written last: its presence means the checkpoint is whole
        print(f"writing a random {shape} checkpoint to {ckpt} (once) ...", flush=True)
        make(ckpt, shape, device=device)
    return ckpt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--mp", type=positive_int, default=1, help="number of shards (model-parallel size)")
    parser.add_argument("--tokenizer_path", help="tokenizer.model to use (default: train a small one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with output_dir(args.out_dir) as out:
        make(out, args.shape, args.mp, args.tokenizer_path, args.seed)
    print(f"wrote a random {args.shape} checkpoint with {args.mp} shard(s) and its tokenizer to {out}")


if __name__ == "__main__":
    with one_line_errors():
        main()
